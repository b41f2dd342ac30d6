"""Engine invariants: greedy generate equals transformers, decode after prefill equals a full
forward, chunked prefill equals one-shot prefill, paged cache layout does not matter."""

from __future__ import annotations

import dataclasses
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from elastic_jax import attention as attn
from elastic_jax import engine, generate, kv_cache, load_model
from elastic_jax.config import RuntimeConfig
from elastic_jax.model import decode, forward, prefill
from pallas_kernels._compat import on_gpu


@pytest.fixture(scope="module")
def hf_model(tiny_qwen3):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_qwen3[0], dtype=torch.float32).eval()


def _hf_greedy(hf, prompt: list[int], n: int) -> list[int]:
    out = hf.generate(
        torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    return out[0, len(prompt) :].tolist()


def test_greedy_generate_matches_transformers(tiny_qwen3, hf_model):
    # page_size 16 so prompts span many pages; prefill_chunk 128 so the 300-token prompt is
    # prefilled in chunks (bucket 384 = 3 chunks).
    model = load_model(tiny_qwen3[1], page_size=16, prefill_chunk=128)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 512, n).tolist() for n in (5, 37, 300)]
    res = generate(model, prompts, max_new_tokens=12, stop_token_ids=[])
    for p, got in zip(prompts, res.token_ids):
        assert got == _hf_greedy(hf_model, p, 12)
    assert [t.new_tokens for t in res.timings] == [12, 12, 12]
    assert all(t.prefill_ms > 0 and t.decode_tokens_per_s > 0 for t in res.timings)


def test_generate_text_prompts_chat_template_and_stop(tiny_qwen3, hf_model):
    model = load_model(tiny_qwen3[1])
    tok = model.tokenizer
    text = "the long context block"
    chat = tok.apply_chat_template([{"role": "user", "content": text}], enable_thinking=False)
    res = generate(
        model,
        [text],
        max_new_tokens=6,
        chat_template=True,
        enable_thinking=False,
        stop_token_ids=[],
    )
    assert res.token_ids[0] == _hf_greedy(hf_model, tok.encode(chat), 6)
    # A stop token ends the request and is returned (as transformers does).
    first = res.token_ids[0][0]
    res2 = generate(
        model,
        [text],
        max_new_tokens=6,
        chat_template=True,
        enable_thinking=False,
        stop_token_ids=[first],
    )
    assert res2.token_ids[0] == [first]
    # min_new_tokens bans stop tokens for the first steps.
    res3 = generate(
        model,
        [text],
        max_new_tokens=3,
        chat_template=True,
        enable_thinking=False,
        stop_token_ids=[first],
        min_new_tokens=1,
    )
    assert res3.token_ids[0][0] != first


@pytest.mark.parametrize("batch", [1, 2])  # batch 1 takes decode's two-row projection path
def test_decode_after_prefill_equals_full_forward(tiny_qwen3, batch):
    model = load_model(tiny_qwen3[1], page_size=16)
    cfg, rt, params = model.config, model.runtime, model.params
    rng = np.random.default_rng(3)
    lengths = np.array([21, 40], np.int32)[:batch]
    full = rng.integers(3, 512, (batch, 48)).astype(np.int32)
    T = 128
    tokens = np.zeros((batch, T), np.int32)
    for b, n in enumerate(lengths):
        tokens[b, :n] = full[b, :n]
    cache = kv_cache.create(cfg, batch, 64, page_size=16)
    logits, cache, _ = prefill(params, cache, jnp.asarray(tokens), jnp.asarray(lengths), cfg, rt)
    steps = [logits]
    for s in range(6):
        nxt = full[np.arange(batch), lengths + s]
        logits, cache = decode(params, cache, jnp.asarray(nxt), cfg, rt)
        steps.append(logits)
    ref = np.asarray(forward(params, jnp.asarray(full), jnp.full((batch,), 48, jnp.int32), cfg, rt))
    for s, got in enumerate(steps):
        want = ref[np.arange(batch), lengths - 1 + s]
        np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=0)
    assert np.asarray(cache.lengths).tolist() == (lengths + 6).tolist()


def test_chunked_prefill_equals_one_shot(tiny_qwen3):
    model = load_model(tiny_qwen3[1])
    cfg = model.config
    rng = np.random.default_rng(4)
    tokens = jnp.asarray(rng.integers(3, 512, (2, 512)).astype(np.int32))
    lengths = jnp.array([512, 300], jnp.int32)
    outs = []
    for chunk in (8192, 128):
        rt = model.with_runtime(prefill_chunk=chunk, page_size=32).runtime
        cache = kv_cache.create(cfg, 2, 1024, page_size=32)
        logits, cache, _ = prefill(model.params, cache, tokens, lengths, cfg, rt)
        outs.append((np.asarray(logits), np.asarray(cache.k), np.asarray(cache.v)))
    for a, b in zip(*outs):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


def test_shuffled_page_table_gives_same_tokens(tiny_qwen3):
    model = load_model(tiny_qwen3[1], page_size=16)
    cfg, rt = model.config, model.runtime
    rng = np.random.default_rng(5)
    prompt = rng.integers(3, 512, (2, 70)).astype(np.int32)
    tokens = np.zeros((2, 128), np.int32)
    tokens[:, :70] = prompt
    lengths = jnp.array([70, 55], jnp.int32)
    results = []
    for table in (None, rng.permutation(2 * 8).reshape(2, 8).astype(np.int32)):
        cache = kv_cache.create(cfg, 2, 128, page_size=16, page_table=table)
        logits, cache, _ = prefill(model.params, cache, jnp.asarray(tokens), lengths, cfg, rt)
        seq = [np.asarray(logits)]
        tok = jnp.argmax(logits, -1).astype(jnp.int32)
        for _ in range(4):
            logits, cache = decode(model.params, cache, tok, cfg, rt)
            seq.append(np.asarray(logits))
            tok = jnp.argmax(logits, -1).astype(jnp.int32)
        results.append(np.stack(seq))
    np.testing.assert_allclose(results[0], results[1], atol=1e-5, rtol=0)


def test_sampling_seeded_and_streaming(tiny_qwen3):
    model = load_model(tiny_qwen3[1])
    prompts = [[5, 6, 7, 8], [9, 10]]
    a = generate(
        model, prompts, max_new_tokens=8, temperature=1.0, top_p=0.9, seed=7, stop_token_ids=[]
    )
    b = generate(
        model, prompts, max_new_tokens=8, temperature=1.0, top_p=0.9, seed=7, stop_token_ids=[]
    )
    assert a.token_ids == b.token_ids
    greedy = generate(model, prompts, max_new_tokens=8, stop_token_ids=[])
    top1 = generate(
        model, prompts, max_new_tokens=8, temperature=0.7, top_k=1, seed=3, stop_token_ids=[]
    )
    assert top1.token_ids == greedy.token_ids
    events = []
    generate(model, prompts, max_new_tokens=5, stop_token_ids=[], stream=events.append)
    for r in range(2):
        assert [e.token_id for e in events if e.request == r] == greedy.token_ids[r][:5]


def test_stream_text_concatenates_to_text(tiny_qwen3):
    from elastic_jax import stream_text

    model = load_model(tiny_qwen3[1])
    pieces = list(stream_text(model, "hello world", max_new_tokens=10, stop_token_ids=[]))
    full = generate(model, ["hello world"], max_new_tokens=10, stop_token_ids=[]).texts[0]
    assert "".join(pieces) == full


def test_bad_generate_inputs(tiny_qwen3):
    model = load_model(tiny_qwen3[1], max_cache_tokens=64)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate(model, [[1, 2], []], max_new_tokens=2)
    with pytest.raises(ValueError, match="exceeds the cache capacity of 64"):
        generate(model, [[1] * 60], max_new_tokens=5)
    with pytest.raises(ValueError, match="outside"):
        generate(model, [[1, 999]], max_new_tokens=2)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, [[1]], max_new_tokens=2, temperature=1.0, top_p=0.0)


def test_buckets():
    assert engine.prompt_bucket(1, 8192) == 128
    assert engine.prompt_bucket(129, 8192) == 256
    assert engine.prompt_bucket(8192, 8192) == 8192
    assert engine.prompt_bucket(8193, 8192) == 16384
    assert engine.prompt_bucket(100_000, 8192) == 106_496
    # Finer steps: k buckets per doubling, never coarser than the chunk above it.
    assert engine.prompt_bucket(1, 8192, 8) == 128
    assert engine.prompt_bucket(3000, 8192, 8) == 3072
    assert engine.prompt_bucket(5000, 8192, 8) == 5120
    assert engine.prompt_bucket(20_000, 8192, 8) == 20_480
    assert engine.prompt_bucket(100_000, 8192, 8) == 106_496  # the chunk caps the step
    assert engine.prompt_bucket(200, 8192, 8) == 256
    assert engine.prompt_bucket(300, 256, 8) == 384  # tests/test_serving.py's finer buckets
    assert engine.prompt_bucket(513, 256, 8) == 640
    assert engine.prompt_bucket(300, 256) == 512
    for steps in (1, 2, 4, 8, 16):
        for n in range(1, 70_000, 997):
            b = engine.prompt_bucket(n, 8192, steps)
            assert n <= b and b % 128 == 0 and b <= max(128, 2 * n)
    assert engine.batch_bucket(3) == 4
    assert engine.capacity_bucket(300, 128) == 512
    # Long requests step by a sixteenth of the power of two (never below 8K tokens) instead
    # of doubling: a 256K prompt + 64 new tokens gets a 288K cache, not 512K.
    assert engine.capacity_bucket(20_000, 128) == 24_576
    assert engine.capacity_bucket(262_144 + 64, 128) == 294_912
    assert engine.capacity_bucket(262_144, 128) == 262_144
    for n in range(1, 600_000, 997):
        c = engine.capacity_bucket(n, 128)
        assert n <= c <= engine.next_pow2(max(n, 128)) and c % 128 == 0


def test_decode_compiles_once_per_bucket(tiny_qwen3):
    from elastic_jax.generate import generate_static
    from elastic_jax.serving import steps

    model = load_model(tiny_qwen3[1])
    for run, step in ((generate, steps.decode_slots), (generate_static, engine.decode_sample_step)):
        run(model, [[1, 2, 3]], max_new_tokens=3, stop_token_ids=[])
        before = step._cache_size()
        run(model, [[4, 5, 6, 7]], max_new_tokens=6, stop_token_ids=[])
        assert step._cache_size() == before
    jax.clear_caches()


def test_pallas_decode_kernel_in_the_model(tiny_qwen3):
    """The model's decode step through the Pallas paged kernel (interpret mode on CPU, reading the
    stacked cache in place) gives the reference's tokens and logits."""
    ref = load_model(tiny_qwen3[1], page_size=16, decode_impl="reference")
    ker = load_model(tiny_qwen3[1], page_size=16, decode_impl="pallas")
    prompts = [np.random.default_rng(9).integers(3, 512, n).tolist() for n in (20, 45)]
    a = generate(ref, prompts, max_new_tokens=5, stop_token_ids=[])
    b = generate(ker, prompts, max_new_tokens=5, stop_token_ids=[])
    assert a.token_ids == b.token_ids


def test_decode_num_splits_reaches_the_kernel(tiny_qwen3):
    """RuntimeConfig.decode_num_splits sets the Pallas decode kernel's split count (interpret
    mode on CPU); every split count gives the reference's attention output on a ragged batch."""
    from pallas_kernels.paged_decode import api as pd

    model = load_model(tiny_qwen3[1], page_size=16)
    cfg = model.config
    rng = np.random.default_rng(3)
    B, P, M = 2, 12, 6
    L, K, D, H = cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, cfg.num_heads
    k_cache = jnp.asarray(rng.standard_normal((L, K, P, 16, D)), jnp.float32)
    v_cache = jnp.asarray(rng.standard_normal((L, K, P, 16, D)), jnp.float32)
    table = jnp.asarray(rng.permutation(P)[: B * M].reshape(B, M), jnp.int32)
    lengths = jnp.asarray([90, 17], jnp.int32)
    q = jnp.asarray(rng.standard_normal((B, H, D)), jnp.float32)
    kn = jnp.asarray(rng.standard_normal((B, K, D)), jnp.float32)
    vn = jnp.asarray(rng.standard_normal((B, K, D)), jnp.float32)
    args = (q, kn, vn, k_cache, v_cache, jnp.int32(1), table, lengths)
    rt = model.runtime
    want = attn.decode_attention(*args, dataclasses.replace(rt, decode_impl="reference"))
    seen = []
    real = pd.paged_decode_pallas

    def spy(*a, config, **kw):
        seen.append(config.num_splits)
        return real(*a, config=config, **kw)

    with mock.patch.object(pd, "paged_decode_pallas", spy):
        for splits in (1, 3):
            got = attn.decode_attention(
                *args, dataclasses.replace(rt, decode_impl="pallas", decode_num_splits=splits)
            )
            np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-5, atol=2e-5)
    assert seen == [1, 3]


def test_pallas_dense_prefill_in_the_model(tiny_qwen3):
    """Dense prefill through our block-sparse kernel with every head dense (interpret mode on
    CPU) gives the reference's last-token logits on a ragged, right-padded batch."""
    base = load_model(tiny_qwen3[1], page_size=16, prefill_impl="reference")
    rng = np.random.default_rng(11)
    lengths = np.array([200, 77])
    tokens = jnp.asarray(rng.integers(3, 512, (2, 256)), jnp.int32)
    outs = []
    for impl in ("reference", "pallas"):
        m = base.with_runtime(prefill_impl=impl)
        cache = kv_cache.create(m.config, 2, 272, page_size=16)
        logits, cache, _ = engine.prefill_step(
            m.params, cache, tokens, jnp.asarray(lengths, jnp.int32), m.config, m.runtime
        )
        outs.append(np.asarray(logits))
    assert np.isfinite(outs[1]).all()
    np.testing.assert_allclose(outs[1], outs[0], atol=2e-4, rtol=2e-4)


def test_dense_prefill_kernel_gets_the_lengths(monkeypatch):
    """The dense kernel path hands the prompt lengths to the kernel (so it skips the query tiles
    of the bucket padding) and declares the padding's V finite (no zeroing pass)."""
    from elastic_jax import attention
    from elastic_jax.config import RuntimeConfig
    from pallas_kernels.block_sparse_attn import api as bsa

    seen = []
    real = bsa.block_sparse_attention

    def spy(*args, **kwargs):
        seen.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(bsa, "block_sparse_attention", spy)
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    q = jax.random.normal(keys[0], (2, 256, 4, 64), jnp.float32)
    k, v = (jax.random.normal(key, (2, 256, 2, 64), jnp.float32) for key in keys[1:])
    lengths = jnp.asarray([200, 77], jnp.int32)
    out = attention._dense_prefill(q, k, v, lengths, RuntimeConfig(prefill_impl="pallas"))
    (kw,) = seen
    assert kw["v_finite_past_length"] is True
    np.testing.assert_array_equal(np.asarray(kw["kv_lengths"]), [200, 77])
    want = attention.dense_causal_attention(q, k, v, kv_lengths=lengths)
    for b, n in enumerate([200, 77]):  # valid rows only: padding rows are not defined
        np.testing.assert_allclose(out[b, :n], want[b, :n], atol=2e-5, rtol=2e-5)


def test_cli_generates(tiny_qwen3, capsys):
    from elastic_jax.cli import main

    assert (
        main(
            [
                str(tiny_qwen3[1]),
                "--prompt",
                "hello",
                "--prompt",
                "the long context",
                "--max-new-tokens",
                "3",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "[0]" in out and "[1]" in out and "prefill sparsity 0.000" in out


@pytest.mark.parametrize(
    "impl, kernel",
    [("auto", "reference"), ("reference", "reference"), ("xla", "reference"),
     ("pallas", "triton"), ("triton", "triton"), ("cudnn", "cudnn")],
)  # fmt: skip
def test_dense_prefill_kernel_choice_on_cpu(impl, kernel):
    from elastic_jax.attention import dense_prefill_kernel
    from elastic_jax.config import RuntimeConfig

    q = jnp.zeros((1, 256, 4, 128), jnp.bfloat16)
    assert dense_prefill_kernel(q, RuntimeConfig(prefill_impl=impl)) == kernel


def test_residual_in_chunks_equals_whole():
    from elastic_jax.layers import residual_in_chunks

    h = jax.random.normal(jax.random.PRNGKey(0), (2, 96, 8))
    w = jax.random.normal(jax.random.PRNGKey(1), (8, 8))

    def block(t):  # per-token residual block, nonlinear so a misplaced chunk shows
        return t + jnp.tanh(t @ w)

    np.testing.assert_allclose(residual_in_chunks(block, h, 32), block(h), atol=1e-6, rtol=0)
    np.testing.assert_allclose(residual_in_chunks(block, h, 128), block(h), atol=1e-6, rtol=0)
    # 96 = 64 + a 32-token tail chunk
    np.testing.assert_allclose(residual_in_chunks(block, h, 64), block(h), atol=1e-6, rtol=0)


def test_pallas_out_projection_in_the_model(tiny_qwen3):
    """decode_out_proj="pallas" (the stacked-weight GEMV, interpret mode on CPU) gives the XLA
    out-projection's decode logits on a ragged batch."""
    base = load_model(tiny_qwen3[1], page_size=16, decode_impl="reference")
    base = base.with_runtime(decode_out_proj="xla")
    ker = base.with_runtime(decode_out_proj="pallas")
    cfg = base.config
    cache = kv_cache.create(cfg, 2, 64, page_size=16)
    tokens = jnp.asarray(np.random.default_rng(6).integers(3, 512, (2, 32)), jnp.int32)
    _, cache, _ = engine.prefill_step(
        base.params, cache, tokens, jnp.asarray([32, 17], jnp.int32), cfg, base.runtime
    )
    nxt = jnp.asarray([7, 11], jnp.int32)
    want, _ = decode(base.params, cache, nxt, cfg, base.runtime)
    got, _ = decode(ker.params, cache, nxt, cfg, ker.runtime)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-4, rtol=1e-4)
    assert np.argmax(np.asarray(got), -1).tolist() == np.argmax(np.asarray(want), -1).tolist()


def test_decode_out_projection_auto_is_xla_off_gpu(tiny_qwen3):
    from elastic_jax.model import resolve_decode_out_proj

    cfg = load_model(tiny_qwen3[1]).config
    assert resolve_decode_out_proj(RuntimeConfig(), cfg) == ("pallas" if on_gpu() else "xla")
    assert resolve_decode_out_proj(RuntimeConfig(decode_out_proj="pallas"), cfg) == "pallas"
    odd = dataclasses.replace(cfg, hidden_size=cfg.hidden_size + 8)  # no 16-column tiling
    assert resolve_decode_out_proj(RuntimeConfig(), odd) == "xla"
    assert resolve_decode_out_proj(RuntimeConfig(decode_impl="reference"), cfg) == "xla"
    with pytest.raises(ValueError, match="decode_out_proj"):
        RuntimeConfig(decode_out_proj="cublas")


@pytest.mark.parametrize(
    "family,out_proj",
    [("qwen3", "xla"), ("llama-biases", "pallas")],
)
def test_fused_decode_norm_in_the_model(tiny_checkpoints, family, out_proj):
    """decode_norm="pallas" (residual add + RMSNorm and q/k norm + RoPE kernels, interpret mode
    on CPU) gives the XLA norms' decode logits and cache, at batch 1 (the two-row QKV input) and
    on a ragged batch of 2: Qwen3 (q/k norms) with XLA's out-projection (the residual input), and
    Llama with biases (RoPE only) with the Pallas out-projection (its split partials summed in
    the kernel, plus o_proj's bias)."""
    if family == "llama-biases":
        ckpt = tiny_checkpoints(family="llama", attention_bias=True, mlp_bias=True)
    else:
        ckpt = tiny_checkpoints()
    base = load_model(ckpt[1], page_size=16, decode_impl="reference")
    base = base.with_runtime(decode_out_proj=out_proj)
    fused = base.with_runtime(decode_norm="pallas")
    cfg = base.config
    rng = np.random.default_rng(7)
    for lengths in ([32], [32, 17]):
        B = len(lengths)
        cache = kv_cache.create(cfg, B, 64, page_size=16)
        tokens = jnp.asarray(rng.integers(3, cfg.vocab_size, (B, 32)), jnp.int32)
        _, cache, _ = engine.prefill_step(
            base.params, cache, tokens, jnp.asarray(lengths, jnp.int32), cfg, base.runtime
        )
        nxt = jnp.asarray(rng.integers(3, cfg.vocab_size, (B,)), jnp.int32)
        want, want_cache = decode(base.params, cache, nxt, cfg, base.runtime)
        got, got_cache = decode(fused.params, cache, nxt, cfg, fused.runtime)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-4, rtol=1e-4)
        np.testing.assert_allclose(
            np.asarray(got_cache.k), np.asarray(want_cache.k), atol=1e-5, rtol=1e-5
        )
        assert np.argmax(np.asarray(got), -1).tolist() == np.argmax(np.asarray(want), -1).tolist()


def test_fused_decode_norm_is_validated():
    with pytest.raises(ValueError, match="decode_norm"):
        RuntimeConfig(decode_norm="triton")
