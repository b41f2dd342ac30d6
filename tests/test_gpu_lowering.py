"""The GPU code paths, lowered for CUDA on a machine without a GPU.

GPU time is scarce, so CI checks what it can without one: with ``_compat.device_info`` reporting
an H100 (``fake_gpu``), the model's jitted steps and every kernel at every shape of the committed
autotune tables are lowered with ``lowering_platforms=("cuda",)``. Lowering runs each Pallas
kernel's GPU lowering (Triton IR for the Triton kernels, the Mosaic GPU pipeline down to NVVM
for the Hopper kernel), so a tuned config that does not tile its shape, a kernel that uses an
op its backend cannot lower, or a dispatch change that sends the model to the wrong kernel
fails here. Not covered: Triton's PTX compile, XLA's GPU compile, and running anything.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from benchmarks.bench_engine import ROUTER_ELASTIC
from benchmarks.bench_model import make_config
from elastic_jax import engine, kv_cache
from elastic_jax import params as params_lib
from elastic_jax.config import RuntimeConfig
from elastic_jax.serving import steps
from pallas_kernels import _compat
from pallas_kernels.block_sparse_attn import block_sparse_attention
from pallas_kernels.gemv import GemvConfig, stacked_gemv
from pallas_kernels.paged_decode import paged_decode_attention
from pallas_kernels.xattn import xattn_select

TABLES = Path(__file__).resolve().parents[1] / "pallas_kernels" / "autotune"
H100 = _compat.DeviceInfo("gpu", "NVIDIA H100 80GB HBM3", "9.0", 132)
A100 = _compat.DeviceInfo("gpu", "NVIDIA A100-SXM4-80GB", "8.0", 108)
MOSAIC = "mosaic_gpu"
sds = jax.ShapeDtypeStruct
bf16 = jnp.bfloat16


@pytest.fixture
def fake_gpu(monkeypatch):
    """``use(info)`` makes kernels and model see that device. jit caches are cleared on entry
    and exit: a trace cached for the CPU must not be reused here, nor a GPU trace later."""

    def use(info: _compat.DeviceInfo = H100):
        monkeypatch.setattr(_compat, "device_info", lambda: info)

    jax.clear_caches()
    yield use
    monkeypatch.undo()
    jax.clear_caches()


def lower_for_cuda(fn, *args) -> str:
    """StableHLO text of ``jax.jit(fn)`` lowered for CUDA at ``args`` (ShapeDtypeStructs)."""
    return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


def gpu_kernels(text: str) -> list[dict]:
    """Each GPU kernel call in lowered text: {"kernel": Triton kernel name or "mosaic_gpu",
    plus the Triton launch settings (num_warps, num_stages, grid_x/y/z) when present}."""
    out = []
    for line in text.splitlines():
        m = re.search(r"custom_call @(\S+?)\(", line)
        if m is None:
            continue
        target = m.group(1)
        if target.startswith("mosaic_gpu"):
            out.append({"kernel": MOSAIC})
        elif target == "__gpu$xla.gpu.triton":
            line = re.sub(r'ir = "[^"]*"', "", line)  # the serialized module may hold anything
            call = {"kernel": re.search(r'name = "([^"]*)"', line).group(1)}
            for key in ("num_warps", "num_stages", "grid_x", "grid_y", "grid_z"):
                v = re.search(rf"\b{key} = (\d+) : i32", line)
                if v:
                    call[key] = int(v.group(1))
            out.append(call)
    return out


def kernel_names(text: str) -> set[str]:
    return {c["kernel"] for c in gpu_kernels(text)}


def parse_key(key: str) -> dict:
    """``"B=1,H=32,S=8192,bfloat16"`` -> {"B": 1, "H": 32, "S": 8192, "dtype": "bfloat16"}."""
    out = {}
    for part in key.split(","):
        name, eq, value = part.partition("=")
        if eq:
            out[name] = int(value)
        else:
            out["dtype"] = part
    return out


def table_entries(name: str):
    """pytest params (device dir, key, entry) of every device's table ``name``."""
    for path in sorted(TABLES.glob(f"*/{name}")):
        yield from ((path.parent.name, path, entry) for entry in json.loads(path.read_text()))


# --------------------------------------------------------------------------- the checker itself


def test_gpu_kernels_reads_triton_and_mosaic_calls(fake_gpu):
    """The parser finds a Triton kernel with its launch settings, and nothing on a CPU-only
    graph (so an assertion on its result can fail)."""
    fake_gpu()
    q = sds((1, 4, 128), bf16)
    pages = sds((2, 5, 16, 128), bf16)
    args = (q, pages, pages, sds((1, 4), jnp.int32), sds((1,), jnp.int32))
    calls = gpu_kernels(lower_for_cuda(lambda *a: paged_decode_attention(*a), *args))
    assert [c["kernel"] for c in calls] == ["paged_decode_attention"]
    assert {"num_warps", "num_stages", "grid_x"} <= set(calls[0])
    ref = lower_for_cuda(lambda *a: paged_decode_attention(*a, implementation="reference"), *args)
    assert gpu_kernels(ref) == []


# --------------------------------------------------------------------------- autotune tables


def _bsa_cases():
    for device, path in (
        (p.parent.name, p) for p in sorted(TABLES.glob("*/block_sparse_attn.json"))
    ):
        table = json.loads(path.read_text())
        for impl in ("pallas_mosaic_gpu", "pallas_triton"):
            for block, entries in table.get(impl, {}).items():
                for key in entries:
                    yield pytest.param(impl, int(block), key, id=f"{device}-{impl}-{key}")


@pytest.mark.parametrize("impl,block,key", list(_bsa_cases()))
def test_block_sparse_table_entry_lowers(fake_gpu, impl, block, key):
    """Each tuned tiling lowers at its own shape, through the table lookup (no config given),
    with per-head modes, kept-block lists and prompt lengths as the elastic prefill passes
    them."""
    fake_gpu()
    s = parse_key(key)
    B, H, K, S, D = s["B"], s["H"], s["K"], s["S"], s["D"]
    n = S // block
    args = (
        sds((B, S, H, D), s["dtype"]),
        sds((B, S, K, D), s["dtype"]),
        sds((B, S, K, D), s["dtype"]),
        sds((B, H), jnp.int32),
        sds((B, H, n), jnp.int32),
        sds((B, H, n, n), jnp.int32),
        sds((B,), jnp.int32),
    )

    def f(q, k, v, modes, counts, indices, lengths):
        return block_sparse_attention(
            q, k, v, modes, counts, indices, kv_lengths=lengths, block_q=block, implementation=impl
        )

    want = MOSAIC if impl == "pallas_mosaic_gpu" else "block_sparse_attention_fwd"
    calls = gpu_kernels(lower_for_cuda(f, *args))
    assert [c["kernel"] for c in calls] == [want]
    if impl == "pallas_triton":
        cfg = json.loads(next(TABLES.glob("*/block_sparse_attn.json")).read_text())[impl]
        tuned = cfg[str(block)][key]
        assert (calls[0]["num_warps"], calls[0]["num_stages"]) == (
            tuned["num_warps"],
            tuned["num_stages"],
        )


def _paged_cases():
    for path in sorted(TABLES.glob("*/paged_decode.json")):
        for key, entry in json.loads(path.read_text())["configs"].items():
            yield pytest.param(key, entry["config"], id=f"{path.parent.name}-{key}")


@pytest.mark.parametrize("key,tuned", list(_paged_cases()))
def test_paged_decode_table_entry_lowers(fake_gpu, key, tuned):
    """Each tuned paged-decode tiling lowers at its shape (a stacked two-layer cache, the new
    token as the extra key, as the decode step calls it) with the table's launch settings and
    one program column per split."""
    fake_gpu()
    s = parse_key(key)
    B, H, K, S, N, D = s["B"], s["H"], s["K"], s["S"], s["N"], s["D"]
    M = S // N
    pages = sds((2, K, B * M + 1, N, D), s["dtype"])
    args = (
        sds((B, H, D), s["dtype"]),
        pages,
        pages,
        sds((B, M), jnp.int32),
        sds((B,), jnp.int32),
        sds((B, K, D), s["dtype"]),
    )

    def f(q, kp, vp, table, lengths, extra):
        return paged_decode_attention(
            q, kp, vp, table, lengths, jnp.int32(1), k_extra=extra, v_extra=extra
        )

    calls = gpu_kernels(lower_for_cuda(f, *args))
    assert [c["kernel"] for c in calls] == ["paged_decode_attention"]
    call = calls[0]
    assert (call["num_warps"], call["num_stages"]) == (tuned["num_warps"], tuned["num_stages"])
    grid = (call["grid_x"], call.get("grid_y", 1), call.get("grid_z", 1))
    assert tuned["num_splits"] in grid, (grid, tuned)


def _xattn_cases():
    for path in sorted(TABLES.glob("*/xattn.json")):
        for key, tuned in json.loads(path.read_text()).items():
            yield pytest.param(key, tuned, id=f"{path.parent.name}-{key}")


@pytest.mark.parametrize("key,tuned", list(_xattn_cases()))
def test_xattn_table_entry_lowers(fake_gpu, key, tuned):
    """Each tuned XAttention tiling lowers at its shape (Qwen3 heads: 32 query, 8 kv): the
    scoring kernel with the table's launch settings, then the selection kernel."""
    fake_gpu()
    s = parse_key(key)
    S, D = s["S"], s["D"]
    args = (sds((1, S, 32, D), s["dtype"]), sds((1, S, 8, D), s["dtype"]), sds((1,), jnp.int32))

    def f(q, k, lengths):
        sel = xattn_select(q, k, kv_lengths=lengths, stride=s["stride"], block_size=s["block"])
        return sel.block_counts, sel.block_indices

    calls = gpu_kernels(lower_for_cuda(f, *args))
    names = [c["kernel"] for c in calls]
    assert names[0] == "xattn_score" and set(names) == {"xattn_score", "xattn_select"}, names
    assert (calls[0]["num_warps"], calls[0]["num_stages"]) == (
        tuned["num_warps"],
        tuned["num_stages"],
    )


@pytest.mark.parametrize(
    "B,config",
    [
        (1, GemvConfig()),
        (8, GemvConfig()),
        (1, GemvConfig(rows_in_kernel=True)),
        (8, GemvConfig(rows_in_kernel=True)),
        (1, GemvConfig(block_n=64, block_k=32, splits=16, tensor_cores=False)),
    ],
    ids=["b1", "b8", "b1-rows-in-kernel", "b8-rows-in-kernel", "b1-cuda-cores"],
)
def test_gemv_variants_lower(fake_gpu, B, config):
    """The out-projection GEMV's variants (those ``benchmarks/run_gemv_ab.sh`` times) lower for
    the 8B wo shape, one program per (column block, K split)."""
    fake_gpu()
    K, N = 4096, 4096
    args = (sds((B, K), bf16), sds((36, K, N), bf16))
    calls = gpu_kernels(lower_for_cuda(lambda x, w: stacked_gemv(x, w, 35, config=config), *args))
    assert [c["kernel"] for c in calls] == ["stacked_gemv"]
    assert (calls[0]["grid_x"], calls[0]["grid_y"]) == (N // config.block_n, config.splits)


# --------------------------------------------------------------------------- the model's steps

SLOTS, PAGE, SLOT_PAGES = 8, 128, 64  # engine pool: 8 slots of 8K tokens


def _model(attention_mode: str, shape: str = "4b", **rt_fields):
    """Two layers of the benchmark's PawQwen3 shape: abstract params, config, runtime."""
    cfg = dataclasses.replace(make_config(shape, ROUTER_ELASTIC["full+xattn"]), num_layers=2)
    return params_lib.abstract(cfg), cfg, RuntimeConfig(attention_mode=attention_mode, **rt_fields)


def _cache(cfg, batch: int, pages_per_seq: int) -> kv_cache.KVCache:
    L, K, D = cfg.num_layers, cfg.num_kv_heads, cfg.head_dim
    pages = sds((L, K, batch * pages_per_seq + 1, PAGE, D), cfg.jnp_dtype)
    return kv_cache.KVCache(
        k=pages,
        v=pages,
        page_table=sds((batch, pages_per_seq), jnp.int32),
        lengths=sds((batch,), jnp.int32),
    )


def _slot_params() -> steps.SlotParams:
    f32, i32 = jnp.float32, jnp.int32
    S = SLOTS
    return steps.SlotParams(
        active=sds((S,), jnp.bool_),
        temperature=sds((S,), f32),
        top_k=sds((S,), i32),
        top_p=sds((S,), f32),
        seed=sds((S,), i32),
        ban_below=sds((S,), i32),
        stop_ids=sds((S, 2), i32),
    )


def static_prefill_kernels(attention_mode: str, batch: int = 2, T: int = 4096, **rt) -> set:
    params, cfg, rtc = _model(attention_mode, **rt)
    cache = _cache(cfg, batch, T // PAGE)
    tokens, lengths = sds((batch, T), jnp.int32), sds((batch,), jnp.int32)
    return kernel_names(
        lower_for_cuda(
            lambda p, c, t, n: engine.prefill_step(p, c, t, n, cfg, rtc),
            params,
            cache,
            tokens,
            lengths,
        )
    )


def static_decode_kernels(batch: int, **rt) -> set:
    params, cfg, rtc = _model("elastic", **rt)
    cache = _cache(cfg, batch, 32768 // PAGE)
    tokens = sds((batch,), jnp.int32)
    return kernel_names(
        lower_for_cuda(lambda p, c, t: engine.decode_step(p, c, t, cfg, rtc), params, cache, tokens)
    )


@pytest.mark.parametrize(
    "device,mode,rt,want",
    [
        (H100, "dense", {}, {MOSAIC}),
        (H100, "elastic", {}, {MOSAIC, "xattn_score", "xattn_select"}),
        (A100, "dense", {"prefill_impl": "pallas"}, {"block_sparse_attention_fwd"}),
        (A100, "elastic", {}, {"block_sparse_attention_fwd", "xattn_score", "xattn_select"}),
    ],
    ids=["h100-dense", "h100-elastic", "a100-dense-pallas", "a100-elastic"],
)
def test_static_prefill_step_kernels(fake_gpu, device, mode, rt, want):
    """``generate``'s prefill step: on Hopper both modes attend with the Mosaic kernel (dense
    prompts too, lengths passed so bucket padding is skipped), elastic prompts after the
    XAttention kernels; elsewhere the Triton kernel. (A100 dense by default is cuDNN, which
    cannot be lowered without cuDNN installed, hence ``prefill_impl="pallas"`` there.)"""
    fake_gpu(device)
    assert static_prefill_kernels(mode, **rt) == want


def test_prefill_step_reference_runtime_has_no_kernels(fake_gpu):
    """``prefill_impl="reference"`` keeps a GPU prefill in jnp: the dispatch reads the runtime
    config, not only the device."""
    fake_gpu()
    assert static_prefill_kernels("elastic", prefill_impl="reference") == set()


@pytest.mark.parametrize("batch", [1, 8])
def test_static_decode_step_kernels(fake_gpu, batch):
    """``generate``'s decode step on an H100: the Pallas paged kernel for attention and the
    Pallas GEMV for the out-projection (``decode_out_proj="auto"``), at batch 1 and 8."""
    fake_gpu()
    assert static_decode_kernels(batch) == {"paged_decode_attention", "stacked_gemv"}


@pytest.mark.parametrize("batch", [1, 8])
def test_decode_step_with_fused_norms(fake_gpu, batch):
    """``decode_norm="pallas"``: the residual adds and norms become ``add_rms_norm`` kernels
    beside the paged kernel and the GEMV (whose partials they sum), the q/k norms and RoPE a
    ``qk_norm_rope`` kernel."""
    fake_gpu()
    want = {"paged_decode_attention", "stacked_gemv", "add_rms_norm", "qk_norm_rope"}
    assert static_decode_kernels(batch, decode_norm="pallas") == want


def test_decode_step_xla_out_proj_and_reference_attention(fake_gpu):
    """The runtime switches: XLA's dot for the out-projection, then jnp attention as well."""
    fake_gpu()
    assert static_decode_kernels(1, decode_out_proj="xla") == {"paged_decode_attention"}
    assert static_decode_kernels(1, decode_impl="reference") == set()


@pytest.mark.parametrize("mode", ["dense", "elastic"])
def test_engine_steps_kernels(fake_gpu, mode):
    """The serving engine's two steps: batch-1 prefill into a slot's pages (the same kernels as
    the static prefill) and the decode step of all slots (paged kernel and GEMV)."""
    fake_gpu()
    params, cfg, rt = _model(mode)
    pool = _cache(cfg, SLOTS, SLOT_PAGES)
    tokens, slots = sds((SLOTS,), jnp.int32), _slot_params()
    T = 4096
    prefill = lower_for_cuda(
        lambda p, c, t, s, prompt, n, slot: steps.prefill_insert(
            p, c, t, s, prompt, n, slot, cfg, rt, False
        ),
        params,
        pool,
        tokens,
        slots,
        sds((1, T), jnp.int32),
        sds((1,), jnp.int32),
        sds((), jnp.int32),
    )
    want = {MOSAIC} if mode == "dense" else {MOSAIC, "xattn_score", "xattn_select"}
    assert kernel_names(prefill) == want
    decode = lower_for_cuda(
        lambda p, c, t, s: steps.decode_slots(p, c, t, s, cfg, rt, False),
        params,
        pool,
        tokens,
        slots,
    )
    assert kernel_names(decode) == {"paged_decode_attention", "stacked_gemv"}


@pytest.mark.parametrize(
    "mode,T,rt,want",
    [
        ("streaming", 4096, {}, {MOSAIC}),
        ("xattn", 4096, {}, {MOSAIC, "xattn_score", "xattn_select"}),
        (
            "elastic",
            4096,
            {"synthetic_kept_fraction": 0.05},
            {MOSAIC, "xattn_score", "xattn_select"},
        ),
        ("elastic", 12288, {"prompt_bucket_steps": 8}, {MOSAIC, "xattn_score", "xattn_select"}),
        ("elastic", 4096, {"collect_stats": False}, {MOSAIC, "xattn_score", "xattn_select"}),
    ],
    ids=["forced-streaming", "forced-xattn", "synthetic-density", "bucket-12k", "no-stats"],
)
def test_prefill_variants_lower(fake_gpu, mode, T, rt, want):
    """Forced head modes (the paper's baselines), the benchmarks' synthetic density, a bucket
    that is not a power of two (``prompt_bucket_steps``) and stats off all lower on Hopper."""
    fake_gpu()
    assert static_prefill_kernels(mode, batch=1, T=T, **rt) == want


def test_pawllama_steps_lower(fake_gpu):
    """PawLlama at the Llama-3.1-8B shape (no q/k norm, llama3 RoPE scaling): elastic prefill
    and decode (fused norms too) lower with the same kernels as PawQwen3."""
    from benchmarks.bench_llama import SETTINGS, make_llama_config

    fake_gpu()
    cfg = dataclasses.replace(make_llama_config("llama8b", next(iter(SETTINGS))), num_layers=2)
    params = params_lib.abstract(cfg)
    T = 8192
    cache = _cache(cfg, 1, T // PAGE)
    rt = RuntimeConfig(attention_mode="elastic")
    prefill = lower_for_cuda(
        lambda p, c, t, n: engine.prefill_step(p, c, t, n, cfg, rt),
        params,
        cache,
        sds((1, T), jnp.int32),
        sds((1,), jnp.int32),
    )
    assert kernel_names(prefill) == {MOSAIC, "xattn_score", "xattn_select"}
    for norm, extra in (("xla", set()), ("pallas", {"add_rms_norm", "qk_norm_rope"})):
        rtd = RuntimeConfig(decode_norm=norm)
        decode = lower_for_cuda(
            lambda p, c, t, rtd=rtd: engine.decode_step(p, c, t, cfg, rtd),
            params,
            cache,
            sds((1,), jnp.int32),
        )
        assert kernel_names(decode) == {"paged_decode_attention", "stacked_gemv"} | extra


def test_long_context_prefill_lowers_8b_512k(fake_gpu):
    """A 512K-token elastic prefill of the 8B shape (issue 19's longest prompt) lowers: every
    kernel's grid and index math at that size."""
    fake_gpu()
    params, cfg, rt = _model("elastic", shape="8b")
    T = 1 << 19
    cache = _cache(cfg, 1, T // PAGE)
    calls = gpu_kernels(
        lower_for_cuda(
            lambda p, c, t, n: engine.prefill_step(p, c, t, n, cfg, rt),
            params,
            cache,
            sds((1, T), jnp.int32),
            sds((1,), jnp.int32),
        )
    )
    assert {c["kernel"] for c in calls} == {MOSAIC, "xattn_score", "xattn_select"}
