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
    """``use(info)`` makes kernels and model see that device. jit caches are cleared on entry,
    on every switch of device and on exit: a trace cached for the CPU (or the other device)
    must not be reused here, nor a GPU trace later. Each clear costs the tests that follow
    about a second of re-tracing, so the cases of this module are grouped into few tests."""

    def use(info: _compat.DeviceInfo = H100):
        jax.clear_caches()
        monkeypatch.setattr(_compat, "device_info", lambda: info)

    yield use
    monkeypatch.undo()
    jax.clear_caches()


def check_each(cases, check) -> None:
    """Run ``check(*args)`` for every ``(name, args)`` of ``cases``; fail once, naming every
    case that raised (a tuning table with one bad entry shows all of them at once)."""
    failures = []
    for name, args in cases:
        try:
            check(*args)
        except Exception as e:  # noqa: BLE001 - reported below, with the case's name
            failures.append(f"{name}: {type(e).__name__}: {str(e)[:500]}")
    assert not failures, "\n".join(failures)


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


def _tables(name: str):
    for path in sorted(TABLES.glob(f"*/{name}")):
        yield path.parent.name, json.loads(path.read_text())


def _lower_block_sparse(impl: str, block: int, key: str, tuned: dict) -> None:
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
    assert [c["kernel"] for c in calls] == [want], calls
    if impl == "pallas_triton":
        got = (calls[0]["num_warps"], calls[0]["num_stages"])
        assert got == (tuned["num_warps"], tuned["num_stages"]), got


def _lower_paged_decode(key: str, tuned: dict) -> None:
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
    assert [c["kernel"] for c in calls] == ["paged_decode_attention"], calls
    call = calls[0]
    assert (call["num_warps"], call["num_stages"]) == (tuned["num_warps"], tuned["num_stages"])
    grid = (call["grid_x"], call.get("grid_y", 1), call.get("grid_z", 1))
    assert tuned["num_splits"] in grid, (grid, tuned)


def _lower_xattn(key: str, tuned: dict) -> None:
    s = parse_key(key)
    S, D = s["S"], s["D"]
    args = (sds((1, S, 32, D), s["dtype"]), sds((1, S, 8, D), s["dtype"]), sds((1,), jnp.int32))

    def f(q, k, lengths):
        sel = xattn_select(q, k, kv_lengths=lengths, stride=s["stride"], block_size=s["block"])
        return sel.block_counts, sel.block_indices

    calls = gpu_kernels(lower_for_cuda(f, *args))
    names = [c["kernel"] for c in calls]
    assert names[0] == "xattn_score" and set(names) == {"xattn_score", "xattn_select"}, names
    got = (calls[0]["num_warps"], calls[0]["num_stages"])
    assert got == (tuned["num_warps"], tuned["num_stages"]), got


def table_cases():
    """(name, (lowering function, its args)) for every entry of every committed table."""
    for device, table in _tables("block_sparse_attn.json"):
        for impl in ("pallas_mosaic_gpu", "pallas_triton"):
            for block, entries in table.get(impl, {}).items():
                for key, tuned in entries.items():
                    args = (impl, int(block), key, tuned)
                    yield f"{device} {impl} {key}", (_lower_block_sparse, args)
    for device, table in _tables("paged_decode.json"):
        for key, entry in table["configs"].items():
            yield f"{device} paged_decode {key}", (_lower_paged_decode, (key, entry["config"]))
    for device, table in _tables("xattn.json"):
        for key, tuned in table.items():
            yield f"{device} xattn {key}", (_lower_xattn, (key, tuned))


def test_autotune_table_entries_lower(fake_gpu):
    """Each tuned tiling of every committed table lowers at its own shape, through the table
    lookup (no config given), with the table's launch settings: block-sparse attention with
    per-head modes, kept-block lists and prompt lengths as the elastic prefill passes them; paged
    decode on a stacked two-layer cache with the new token as the extra key (one program column
    per split); the XAttention scoring then selection kernels at Qwen3's 32 / 8 heads."""
    fake_gpu()
    cases = list(table_cases())
    assert len(cases) >= 20, "the committed tables hold 24 entries"
    check_each(cases, lambda fn, args: fn(*args))


def test_gemv_variants_lower(fake_gpu):
    """The out-projection GEMV's variants (those ``benchmarks/run_gemv_ab.sh`` times) lower for
    the 8B wo shape, one program per (column block, K split)."""
    fake_gpu()
    K, N = 4096, 4096
    variants = [
        ("b1", 1, GemvConfig()),
        ("b8", 8, GemvConfig()),
        ("b1-rows-in-kernel", 1, GemvConfig(rows_in_kernel=True)),
        ("b8-rows-in-kernel", 8, GemvConfig(rows_in_kernel=True)),
        ("b1-cuda-cores", 1, GemvConfig(block_n=64, block_k=32, splits=16, tensor_cores=False)),
    ]

    def check(B, config):
        args = (sds((B, K), bf16), sds((36, K, N), bf16))
        fn = lambda x, w: stacked_gemv(x, w, 35, config=config)  # noqa: E731
        calls = gpu_kernels(lower_for_cuda(fn, *args))
        assert [c["kernel"] for c in calls] == ["stacked_gemv"], calls
        assert (calls[0]["grid_x"], calls[0]["grid_y"]) == (N // config.block_n, config.splits)

    check_each([(name, (B, cfg)) for name, B, cfg in variants], check)


# --------------------------------------------------------------------------- the model's steps

SLOTS, PAGE, SLOT_PAGES = 8, 128, 64  # engine pool: 8 slots of 8K tokens
ELASTIC = {MOSAIC, "xattn_score", "xattn_select"}
DECODE = {"paged_decode_attention", "stacked_gemv"}
FUSED_NORMS = {"add_rms_norm", "qk_norm_rope"}


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


def prefill_kernels(params, cfg, rt, batch: int, T: int) -> set:
    """Kernels of ``generate``'s jitted prefill step over a [batch, T] bucket."""
    cache = _cache(cfg, batch, T // PAGE)
    tokens, lengths = sds((batch, T), jnp.int32), sds((batch,), jnp.int32)
    fn = lambda p, c, t, n: engine.prefill_step(p, c, t, n, cfg, rt)  # noqa: E731
    return kernel_names(lower_for_cuda(fn, params, cache, tokens, lengths))


def decode_kernels(params, cfg, rt, batch: int) -> set:
    """Kernels of ``generate``'s jitted decode step at batch ``batch`` over a 32K cache."""
    cache = _cache(cfg, batch, 32768 // PAGE)
    fn = lambda p, c, t: engine.decode_step(p, c, t, cfg, rt)  # noqa: E731
    return kernel_names(lower_for_cuda(fn, params, cache, sds((batch,), jnp.int32)))


def test_prefill_step_dispatch(fake_gpu):
    """``generate``'s prefill step. On Hopper both modes attend with the Mosaic kernel (dense
    prompts too, lengths passed so bucket padding is skipped), elastic prompts after the
    XAttention kernels; forced head modes (the paper's baselines), the benchmarks' synthetic
    density, a bucket that is not a power of two (``prompt_bucket_steps``) and stats off lower
    the same way; ``prefill_impl="reference"`` stays in jnp (the dispatch reads the runtime, not
    only the device). On an A100 the Triton kernel takes the Mosaic kernel's place (dense there
    is cuDNN by default, which cannot be lowered without cuDNN installed: hence "pallas")."""
    cases = [
        ("h100 dense", H100, "dense", 2, 4096, {}, {MOSAIC}),
        ("h100 elastic", H100, "elastic", 2, 4096, {}, ELASTIC),
        ("forced streaming", H100, "streaming", 1, 4096, {}, {MOSAIC}),
        ("forced xattn", H100, "xattn", 1, 4096, {}, ELASTIC),
        ("synthetic density", H100, "elastic", 1, 4096, {"synthetic_kept_fraction": 0.05}, ELASTIC),
        ("bucket 12K", H100, "elastic", 1, 12288, {"prompt_bucket_steps": 8}, ELASTIC),
        ("stats off", H100, "elastic", 1, 4096, {"collect_stats": False}, ELASTIC),
        ("reference", H100, "elastic", 2, 4096, {"prefill_impl": "reference"}, set()),
        ("a100 dense", A100, "dense", 2, 4096, {"prefill_impl": "pallas"}, {"block_sparse_attention_fwd"}),
        ("a100 elastic", A100, "elastic", 2, 4096, {}, {"block_sparse_attention_fwd", "xattn_score", "xattn_select"}),
    ]  # fmt: skip

    def check(device, mode, batch, T, rt, want):
        if device is not _compat.device_info():
            fake_gpu(device)
        got = prefill_kernels(*_model(mode, **rt), batch, T)
        assert got == want, got

    check_each([(name, args) for name, *args in cases], check)


def test_decode_step_dispatch(fake_gpu):
    """``generate``'s decode step on an H100, at batch 1 and 8: the Pallas paged kernel for
    attention and the Pallas GEMV for the out-projection (``decode_out_proj="auto"``); with
    ``decode_norm="pallas"`` the residual adds and norms become ``add_rms_norm`` kernels (summing
    the GEMV's partials) and the q/k norms with RoPE a ``qk_norm_rope`` kernel; the runtime
    switches to XLA's out-projection, then to jnp attention as well."""
    fake_gpu()
    cases = [
        ("b1", 1, {}, DECODE),
        ("b8", 8, {}, DECODE),
        ("b1 fused norms", 1, {"decode_norm": "pallas"}, DECODE | FUSED_NORMS),
        ("b8 fused norms", 8, {"decode_norm": "pallas"}, DECODE | FUSED_NORMS),
        ("xla out-proj", 1, {"decode_out_proj": "xla"}, {"paged_decode_attention"}),
        ("reference attention", 1, {"decode_impl": "reference"}, set()),
    ]

    def check(batch, rt, want):
        got = decode_kernels(*_model("elastic", **rt), batch)
        assert got == want, got

    check_each([(name, args) for name, *args in cases], check)


def test_engine_steps_kernels(fake_gpu):
    """The serving engine's two steps, dense and elastic: batch-1 prefill into a slot's pages
    (the same kernels as the static prefill) and the decode step of all slots."""
    fake_gpu()

    def check(mode, want_prefill):
        params, cfg, rt = _model(mode)
        pool = _cache(cfg, SLOTS, SLOT_PAGES)
        tokens, slots = sds((SLOTS,), jnp.int32), _slot_params()
        prefill = lower_for_cuda(
            lambda p, c, t, s, prompt, n, slot: steps.prefill_insert(
                p, c, t, s, prompt, n, slot, cfg, rt, False
            ),
            params,
            pool,
            tokens,
            slots,
            sds((1, 4096), jnp.int32),
            sds((1,), jnp.int32),
            sds((), jnp.int32),
        )
        assert kernel_names(prefill) == want_prefill
        decode = lower_for_cuda(
            lambda p, c, t, s: steps.decode_slots(p, c, t, s, cfg, rt, False),
            params,
            pool,
            tokens,
            slots,
        )
        assert kernel_names(decode) == DECODE

    check_each([("dense", ("dense", {MOSAIC})), ("elastic", ("elastic", ELASTIC))], check)


def test_pawllama_steps_lower(fake_gpu):
    """PawLlama at the Llama-3.1-8B shape (no q/k norm, llama3 RoPE scaling): elastic prefill
    and decode (fused norms too) lower with the same kernels as PawQwen3."""
    from benchmarks.bench_llama import SETTINGS, make_llama_config

    fake_gpu()
    cfg = dataclasses.replace(make_llama_config("llama8b", next(iter(SETTINGS))), num_layers=2)
    params = params_lib.abstract(cfg)
    assert prefill_kernels(params, cfg, RuntimeConfig(), 1, 8192) == ELASTIC
    assert decode_kernels(params, cfg, RuntimeConfig(), 1) == DECODE
    assert decode_kernels(params, cfg, RuntimeConfig(decode_norm="pallas"), 1) == (
        DECODE | FUSED_NORMS
    )


def test_long_context_prefill_lowers_8b_512k(fake_gpu):
    """A 512K-token elastic prefill of the 8B shape (issue 19's longest prompt) lowers: every
    kernel's grid and index math at that size."""
    fake_gpu()
    assert prefill_kernels(*_model("elastic", shape="8b"), 1, 1 << 19) == ELASTIC
