"""Memory model (elastic_jax/memory.py): exact terms against real buffers on CPU, the modelled
8B peaks against the peaks measured on the H100 (BENCHMARKS.md section 1), and ``check_fits``
raising before any work in ``generate``/``load_model``."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from benchmarks.bench_engine import ROUTER_ELASTIC
from benchmarks.bench_model import make_config
from elastic_jax import kv_cache, memory
from elastic_jax.config import RuntimeConfig
from elastic_jax.params import init_random

GIB = 2.0**30


@pytest.mark.parametrize("elastic", [None, ROUTER_ELASTIC["full+xattn"]])
def test_weight_and_cache_bytes_are_exact(elastic):
    cfg = make_config("tiny", elastic)
    params = init_random(cfg, jax.random.PRNGKey(0))
    assert memory.weight_bytes(cfg) == sum(x.nbytes for x in jax.tree.leaves(params))
    cache = kv_cache.create(cfg, 3, 200, page_size=16)
    assert memory.cache_bytes(cfg, 3, 200, 16) == sum(x.nbytes for x in jax.tree.leaves(cache))


def test_prefill_terms_against_measured_8b_peaks():
    """H100 runs of bench_engine (batch 1, cache of T + 256 tokens): the 64K call peaked at
    26.8 GiB and the 128K call at 38.1 GiB (elastic and synthetic cases included); the XLA temp
    of the dense Pallas prefill was 1.40 / 2.48 / 3.92 GiB at 32K / 64K / 128K."""
    el = make_config("8b", ROUTER_ELASTIC["full+xattn"])
    dense = make_config("8b")
    cases = [
        RuntimeConfig(),
        RuntimeConfig(attention_mode="xattn", synthetic_kept_fraction=0.3),
    ]
    for T, measured in ((65536, 26.80), (131072, 38.10)):
        pred = max(memory.prefill_terms(el, rt, T, 1, T + 256).total for rt in cases) / GIB
        assert abs(pred - measured) / measured < 0.03, (T, pred, measured)
    rt = RuntimeConfig(attention_mode="dense")
    for T, temp in ((32768, 1.40), (65536, 2.48), (131072, 3.92)):
        t = memory.prefill_terms(dense, rt, T, 1, T + 256).terms
        act = sum(t[n] for n in ("h_q_k_v", "attn_out", "block_lists", "v_zeroed", "mlp_chunk"))
        assert abs(act / GIB - temp) / temp < 0.08, (T, act / GIB, temp)


def test_long_prompts_estimate_in_passes_and_grow_as_expected():
    el = make_config("8b", ROUTER_ELASTIC["full+xattn"])
    rt = RuntimeConfig()
    e256 = memory.prefill_terms(el, rt, 2**18, 1, 2**18 + 256)
    e512 = memory.prefill_terms(el, rt, 2**19, 1, 2**19 + 256)
    assert e256.notes["estimate_passes"] == "4" and e512.notes["estimate_passes"] == "8"
    # Cache: 144 KiB per token (36 layers x 8 kv heads x 128 dims x K,V x bf16).
    per_token = 36 * 8 * 128 * 2 * 2
    assert e512.terms["kv_cache"] == pytest.approx(per_token * (2**19 + 256 + 128), rel=1e-3)
    # One estimate pass (4 query heads at 512K) stays near its 2 GiB budget instead of 16 GiB
    # for all 32 heads, so the attention phase (4 GiB output) is the larger one again.
    from pallas_kernels.xattn.api import scratch_bytes

    one_pass = sum(v for n, v in scratch_bytes(1, 2**19, 2**19, 4).items() if n != "select_lists")
    assert one_pass < 2.5 * GIB < 16 * GIB < scratch_bytes(1, 2**19, 2**19, 32)["score_w"] + 1
    assert e512.notes["peak_phase"] == "attention phase"
    # Inspection masks of every layer (collect_masks) are T^2 too: 4.5 GiB at 256K.
    masks = memory.prefill_terms(el, RuntimeConfig(collect_masks=True), 2**18, 1, 2**18)
    assert masks.terms["collected_masks"] == 36 * 32 * 2048 * 2048
    # 256K fits an 80 GB H100 at XLA_PYTHON_CLIENT_MEM_FRACTION=0.95; 512K does not.
    h100 = int(0.95 * 79.1 * GIB)
    memory.check_fits(el, rt, 2**18, 1, 2**18 + 256, device_bytes=h100)
    with pytest.raises(ValueError, match="does not fit"):
        memory.check_fits(el, rt, 2**19, 1, 2**19 + 256, device_bytes=h100)


def test_check_fits_message_and_cpu_skip():
    cfg = make_config("tiny")
    rt = RuntimeConfig()
    est = memory.check_fits(cfg, rt, 256, 2, 512)  # CPU: no memory stats, nothing checked
    assert est.total > memory.weight_bytes(cfg)
    with pytest.raises(ValueError) as err:
        memory.check_fits(cfg, rt, 256, 2, 512, device_bytes=est.total - 1)
    msg = str(err.value)
    assert "batch=2" in msg and "prompt_len=256" in msg and "kv_cache" in msg
    assert f"{est.total / GIB:.1f} GiB" in msg
    assert memory.check_fits(cfg, rt, 256, 2, 512, device_bytes=est.total) == est


def test_generate_and_load_refuse_before_work(tiny_qwen3, monkeypatch):
    from elastic_jax import generate, load_model

    model = load_model(tiny_qwen3[1], page_size=16)
    need = memory.peak_estimate(model.config, model.runtime, 128, 1, 256).total
    monkeypatch.setattr(memory, "device_bytes_limit", lambda device=None: need - 1)
    with pytest.raises(ValueError, match="does not fit the device"):
        generate(model, [[1] * 100], max_new_tokens=100)
    # A shorter request fits; the weights-only check of load_model passes too.
    out = generate(model, [[1, 2, 3]], max_new_tokens=2)
    assert len(out.token_ids[0]) >= 1
    load_model(tiny_qwen3[1], page_size=16)
    monkeypatch.setattr(memory, "device_bytes_limit", lambda device=None: 1000)
    with pytest.raises(ValueError, match="does not fit the device"):
        load_model(tiny_qwen3[1], page_size=16)
    assert np.isfinite(need)


@pytest.mark.parametrize("mode", ["xattn", "elastic"])
def test_model_prefill_with_estimate_passes_equals_one_pass(monkeypatch, mode):
    """The model's prefill with the XAttention estimate split over KV heads (forced here by a
    1-byte pass budget) gives the same logits, cache and stats as the one-pass estimate."""
    import jax.numpy as jnp

    from elastic_jax import elastic_attention
    from elastic_jax import model as model_lib

    # Low threshold, small blocks: random weights then give a really sparse selection.
    el = {**ROUTER_ELASTIC["full+xattn"], "xattn_threshold": 0.3, "block_size": 64}
    cfg = make_config("tiny", el)
    params = init_random(cfg, jax.random.PRNGKey(0))
    rt = RuntimeConfig(attention_mode=mode)
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 512), 0, cfg.vocab_size, jnp.int32)
    lengths = jnp.array([512, 300], jnp.int32)

    def run():
        cache = kv_cache.create(cfg, 2, 640, page_size=rt.page_size)
        fn = jax.jit(lambda p, c, t, n: model_lib.prefill(p, c, t, n, cfg, rt))
        return jax.device_get(fn(params, cache, tokens, lengths))

    one = run()
    assert elastic_attention.estimate_kv_heads_per_pass(2, 512, 512, 4, 2, 16, 64) is None
    monkeypatch.setattr(elastic_attention, "ESTIMATE_PASS_BYTES", 1)
    assert elastic_attention.estimate_kv_heads_per_pass(2, 512, 512, 4, 2, 16, 64) == 1
    split = run()
    for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(split)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    modes = np.asarray(one[2]["modes"])
    assert (modes == 1).any()  # some heads really ran the estimate
    xattn = modes == 1
    kept = np.asarray(one[2]["kept_blocks"])[xattn].sum()
    assert kept < 0.9 * np.asarray(one[2]["causal_blocks"])[xattn].sum()
