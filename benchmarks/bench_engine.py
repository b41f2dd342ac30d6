"""Long-context engine benchmark (issue 9): Qwen3-8B-shaped model with random bf16 weights.

    PYTHONPATH=. python3 benchmarks/bench_engine.py --sections prefill --out $OUT/qwen3_8b_prefill.json
    PYTHONPATH=. python3 benchmarks/bench_engine.py --sections decode,parts --out $OUT/qwen3_8b_decode.json

Sections (each appends rows to the JSON and prints a table at the end):
  parts    the ingredients of the "ideal" times, measured in this run: bf16 GEMM rate (8192^3),
           cuDNN causal attention per layer, XAttention estimate+selection per layer, router per
           layer, at each prefill length.
  prefill  whole-model prefill (all 36 layers, cache write, last logits), median of --reps after
           a warm-up: dense (cuDNN attention), elastic full+xattn and xattn+streaming (router with
           fixed random weights), and every head forced to XAttention with synthetic kept-block
           densities (``RuntimeConfig.synthetic_kept_fraction``; the estimate still runs).
  decode   decode tokens/s (Pallas paged decode kernel) at --decode-context for each batch.
  profile  JAX-profiler kernel breakdown of one dense prefill (cuDNN and Pallas attention) at
           the first length, and of decode steps at each --profile-decode batch:context, with the
           decode attention's K/V bandwidth from kernel time alone.

Ideal (dense) = model GEMM FLOPs / measured GEMM rate + 36 x cuDNN attention time.
Ideal (elastic) = dense measured time - 36 x cuDNN time x (1 - kept fraction) + 36 x estimate time.
"""

from __future__ import annotations

import argparse
import json
import os

import jax
import jax.numpy as jnp

from benchmarks.bench_model import (
    bench_decode,
    bench_prefill,
    decode_caller,
    decode_capacity,
    make_config,
    median_seconds,
    prefill_caller,
)
from benchmarks.profiling import device_kernel_times
from benchmarks.shapes import SHAPES
from elastic_jax import engine, kv_cache
from elastic_jax.config import RuntimeConfig
from elastic_jax.params import init_random

ROUTER_ELASTIC = {
    "full+xattn": {
        "retrieval_mode": "full",
        "toggle_type": "xattn",
        "pooling_mode": "ctx_q",
        "use_softmax": True,
        "enable_ada_sparsity": True,
    },
    "xattn+streaming": {
        "retrieval_mode": "xattn",
        "toggle_type": "streaming",
        "pooling_mode": "ctx_q",
        "use_softmax": True,
        "enable_ada_sparsity": True,
    },
}


# cuDNN on the GPU; XLA on CPU (smoke runs of the script only).
_CUDNN = "cudnn" if jax.default_backend() == "gpu" else None
_DENSE_IMPLS = ("cudnn", "pallas") if jax.default_backend() == "gpu" else ("xla", "pallas")


def gemm_flops_per_token(shape: str) -> float:
    s = SHAPES[shape]
    E, F, H, K, D = (
        s["hidden_size"],
        s["intermediate_size"],
        s["num_heads"],
        s["num_kv_heads"],
        s["head_dim"],
    )
    per_layer = E * (H * D + 2 * K * D) + H * D * E + 3 * E * F
    return 2.0 * s["num_layers"] * per_layer  # the last-token lm_head is negligible


def measure_parts(shape: str, lengths: list[int], reps: int) -> list[dict]:
    from pallas_kernels.xattn.api import xattn_select

    rows = []
    n = 8192 if jax.default_backend() == "gpu" else 512  # CPU: a smoke run of the script
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.bfloat16)
    b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.bfloat16)
    mm = jax.jit(lambda x, y: x @ y)
    sec = median_seconds(mm, 10, a, b)
    rows.append({"part": f"gemm_{n}^3", "ms": sec * 1e3, "tflops": 2 * n**3 / sec / 1e12})
    print(rows[-1], flush=True)
    s = SHAPES[shape]
    H, K, D = s["num_heads"], s["num_kv_heads"], s["head_dim"]
    cfg = make_config(shape, ROUTER_ELASTIC["full+xattn"])
    # Under jit XLA drops the unused (non-router) weights.
    rparams = jax.jit(lambda key: init_random(cfg, key).layers.router)(jax.random.PRNGKey(2))
    for T in lengths:
        key = jax.random.PRNGKey(T)
        q = jax.random.normal(key, (1, T, H, D), jnp.bfloat16)
        k = jax.random.normal(jax.random.fold_in(key, 1), (1, T, K, D), jnp.bfloat16)
        v = jax.random.normal(jax.random.fold_in(key, 2), (1, T, K, D), jnp.bfloat16)
        att = jax.jit(
            lambda q, k, v: jax.nn.dot_product_attention(
                q, k, v, is_causal=True, implementation=_CUDNN
            )
        )
        t_att = median_seconds(att, reps, q, k, v)
        est = jax.jit(
            lambda q, k: (
                xattn_select(
                    q, k, stride=16, threshold=0.8, block_size=128, sink_rule="official"
                ).block_counts
            )
        )
        t_est = median_seconds(est, reps, q, k)
        t_router = _router_in_jit(cfg, rparams, k, H, reps)
        flops = 4 * H * D * T * (T + 1) / 2
        rows.append(
            {
                "part": "per_layer",
                "tokens": T,
                "cudnn_ms": t_att * 1e3,
                "cudnn_tflops": flops / t_att / 1e12,
                "estimate_ms": t_est * 1e3,
                "router_ms": t_router * 1e3,
            }
        )
        print(rows[-1], flush=True)
    return rows


def _router_in_jit(cfg, rparams, k, num_heads: int, reps: int) -> float:
    """Seconds per layer of the router as the model runs it: all layers in one jit (a scan over
    the stacked router weights), so per-call dispatch is not counted. Each layer reads its keys
    at a layer-dependent offset so XLA cannot hoist the pooling out of the loop."""
    from elastic_jax.router import route

    L, T = jax.tree.leaves(rparams)[0].shape[0], k.shape[1]
    k_big = jnp.concatenate([k, k[:, :L]], axis=1)  # [1, T + L, K, D]
    n_valid = jnp.array([T], jnp.int32)

    def all_layers(k_big, n):
        def body(c, xs):
            lp, layer = xs
            k_l = jax.lax.dynamic_slice_in_dim(k_big, layer, T, axis=1)
            return c, route(k_l, n, lp, cfg.elastic, num_heads)[0]

        return jax.lax.scan(body, 0, (rparams, jnp.arange(L, dtype=jnp.int32)))[1]

    return median_seconds(jax.jit(all_layers), reps, k_big, n_valid) / L


def run_prefill(shape, lengths, densities, density_lengths, reps, dense_impls=_DENSE_IMPLS):
    rows = []
    cfg_by_mode = {name: make_config(shape, el) for name, el in ROUTER_ELASTIC.items()}
    # One set of weights (router included); the dense rows ignore the router.
    params = jax.jit(init_random, static_argnums=0)(
        cfg_by_mode["full+xattn"], jax.random.PRNGKey(0)
    )
    dense_cfg = cfg_by_mode["full+xattn"]
    cases = [
        (f"dense ({impl})", dense_cfg, RuntimeConfig(attention_mode="dense", prefill_impl=impl))
        for impl in dense_impls
    ]
    for name, cfg in cfg_by_mode.items():
        cases.append((f"elastic {name}", cfg, RuntimeConfig(attention_mode="elastic")))
    for T in lengths:
        for label, cfg, rt in cases:
            sec, info = bench_prefill(params, cfg, rt, T, reps)
            rows.append({"what": "prefill", "case": label, "tokens": T, "s": sec, **info})
            print(rows[-1], flush=True)
        if T in density_lengths:
            for d in densities:
                rt = RuntimeConfig(attention_mode="xattn", synthetic_kept_fraction=d)
                sec, info = bench_prefill(params, cfg_by_mode["full+xattn"], rt, T, reps)
                rows.append(
                    {
                        "what": "prefill",
                        "case": f"xattn synthetic {d:.2f}",
                        "tokens": T,
                        "s": sec,
                        **info,
                    }
                )
                print(rows[-1], flush=True)
    stats = jax.devices()[0].memory_stats() or {}
    rows.append({"what": "peak_memory", "gib": stats.get("peak_bytes_in_use", 0) / 2**30})
    return rows


def layer_breakdown(shape: str, T: int, reps: int) -> list[dict]:
    """Time one layer's pieces at T tokens (batch 1), to explain the gap to the ideal."""
    from elastic_jax import kv_cache
    from elastic_jax import model as model_lib
    from elastic_jax.layers import apply_rope, rms_norm

    cfg = make_config(shape)
    rt = RuntimeConfig(attention_mode="dense")
    params = jax.jit(init_random, static_argnums=0)(cfg, jax.random.PRNGKey(0))
    lp = jax.tree.map(lambda x: x[0], params.layers)
    h = jax.random.normal(jax.random.PRNGKey(1), (1, T, cfg.hidden_size), jnp.bfloat16)
    pos = jnp.arange(T, dtype=jnp.int32)[None]
    cos, sin = model_lib._rope_tables(pos, cfg)
    n = jnp.array([T], jnp.int32)

    def qkv(h):
        x = rms_norm(h, lp.attn_norm, cfg.rms_norm_eps)
        q, k, v = model_lib.project_qkv(x, lp, cfg)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    q, k, v = jax.jit(qkv)(h)
    o = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
    cache = kv_cache.create(cfg, 1, T, page_size=rt.page_size)
    pages, slots = kv_cache.token_slots(cache, pos)
    pieces = {
        "whole layer (no cache write)": (
            jax.jit(lambda h: model_lib.layer_prefill(h, lp, cos, sin, n, cfg, rt)[0]),
            (h,),
        ),
        "norm+qkv+rope": (jax.jit(qkv), (h,)),
        "cudnn attention": (
            jax.jit(
                lambda q, k, v: jax.nn.dot_product_attention(
                    q, k, v, is_causal=True, implementation="cudnn"
                )
            ),
            (q, k, v),
        ),
        "o_proj": (jax.jit(lambda o: model_lib.out_proj(o, lp.wo)), (o,)),
        "mlp block": (jax.jit(lambda h: model_lib._mlp_block(h, lp, cfg)), (h,)),
        "cache write (1 layer)": (
            jax.jit(
                lambda ck, cv, k, v: kv_cache.write(ck, cv, 0, pages, slots, k, v),
                donate_argnums=(0, 1),
            ),
            None,
        ),
    }
    rows = []
    for name, (fn, args) in pieces.items():
        if args is None:
            holder = [cache.k, cache.v]

            def call(fn=fn, holder=holder):
                holder[0], holder[1] = fn(holder[0], holder[1], k, v)
                return holder[0]

            sec = median_seconds(call, reps)
        else:
            sec = median_seconds(fn, reps, *args)
        rows.append({"part": "layer_breakdown", "tokens": T, "piece": name, "ms": sec * 1e3})
        print(rows[-1], flush=True)
    return rows


def profile_section(
    shape: str, T: int, decode_points: list[tuple[int, int]], out_dir: str
) -> list[dict]:
    """Kernel-level breakdown from the JAX profiler: one dense prefill at T tokens per dense
    implementation, and decode steps at each (batch, context) of ``decode_points`` with the
    decode attention's achieved K/V bandwidth (kernel time only, merge epilogue excluded)."""
    cfg = make_config(shape)
    params = jax.jit(init_random, static_argnums=0)(cfg, jax.random.PRNGKey(0))
    rows = [_profile_prefill(params, cfg, impl, T, out_dir) for impl in ("cudnn", "pallas")]
    rows += [_profile_decode(params, cfg, b, ctx, out_dir) for b, ctx in decode_points]
    return rows


def _top_kernels(per) -> list[tuple[str, float]]:
    return [(n, us / 1e3) for n, us in per.most_common(12)]


def _profile_prefill(params, cfg, impl: str, T: int, out_dir: str) -> dict:
    run = prefill_caller(
        params, cfg, RuntimeConfig(attention_mode="dense", prefill_impl=impl), T, 3
    )

    def call(i):
        return run()[0]

    jax.block_until_ready(call(0))
    span, busy, per = device_kernel_times(call, 1, os.path.join(out_dir, f"trace_pf_{impl}"))
    row = {
        "part": "profile_prefill",
        "impl": impl,
        "tokens": T,
        "span_ms": span / 1e3,
        "kernels_ms": busy / 1e3,
        "top": _top_kernels(per),
    }
    print(json.dumps(row, indent=1), flush=True)
    return row


def _profile_decode(params, cfg, batch: int, context: int, out_dir: str) -> dict:
    rt = RuntimeConfig(attention_mode="dense", decode_impl="pallas")
    run = decode_caller(params, cfg, rt, batch, context, context + 64)

    def step(i):
        return run()

    jax.block_until_ready(step(0))
    calls = 5
    trace = os.path.join(out_dir, f"trace_decode_{batch}_{context}")
    span, busy, per = device_kernel_times(step, calls, trace)
    attn_us = sum(us for n, us in per.items() if "paged_decode" in n)
    kv_bytes = 2 * batch * context * cfg.num_kv_heads * cfg.head_dim * 2 * cfg.num_layers
    row = {
        "part": "profile_decode",
        "batch": batch,
        "context": context,
        "step_span_ms": span / 1e3,
        "kernels_ms": busy / 1e3,
        "paged_decode_kernel_ms": attn_us / 1e3,
        "decode_attention_tb_s": kv_bytes / (attn_us * 1e-6) / 1e12 if attn_us else None,
        "top": _top_kernels(per),
    }
    print(json.dumps(row, indent=1), flush=True)
    return row


def compile_decode(params, cfg, rt: RuntimeConfig, batch: int, capacity: int):
    """``decode_step`` compiled for a cache of ``capacity`` tokens per sequence, and its buffer
    sizes (GiB): ``temp`` should be small and ``alias`` the whole cache (updated in place); a
    cache-sized temp means the step copies the cache."""
    cache = jax.eval_shape(lambda: kv_cache.create(cfg, batch, capacity, page_size=rt.page_size))
    tok = jax.ShapeDtypeStruct((batch,), jnp.int32)
    compiled = engine.decode_step.lower(params, cache, tok, cfg, rt).compile()
    m = compiled.memory_analysis()
    if m is None:  # backends without memory analysis
        return compiled, {}
    gib = 2.0**30
    return compiled, {
        "cache_gib": 2 * cache.k.size * cache.k.dtype.itemsize / gib,
        "alias_gib": m.alias_size_in_bytes / gib,
        "temp_gib": m.temp_size_in_bytes / gib,
    }


def run_decode(shape: str, context: int, batches: list[int], steps: int):
    cfg = make_config(shape)
    params = jax.jit(init_random, static_argnums=0)(cfg, jax.random.PRNGKey(0))
    rows = []
    for B in batches:
        rt = RuntimeConfig(attention_mode="dense", decode_impl="pallas")
        compiled, mem = compile_decode(params, cfg, rt, B, decode_capacity(context, steps))
        print({"decode_memory": mem, "batch": B, "tokens": context}, flush=True)
        sec = bench_decode(params, cfg, rt, B, context, steps, step_fn=compiled)
        rows.append(
            {
                "what": "decode",
                "batch": B,
                "tokens": context,
                "ms": sec * 1e3,
                "tok_per_s": B / sec,
                **mem,
            }
        )
        print(rows[-1], flush=True)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--sections", default="parts,prefill,decode")
    p.add_argument("--shape", default="8b", choices=sorted(SHAPES))
    p.add_argument("--lengths", default="32768,65536,131072")
    p.add_argument("--densities", default="0.05,0.1,0.3")
    p.add_argument("--density-lengths", default="131072")
    p.add_argument("--decode-context", type=int, default=65536)
    p.add_argument("--decode-batch", default="1,8")
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--out", default=None)
    p.add_argument(
        "--profile-decode", default="1:65536,8:32768", help="batch:context points to profile"
    )
    p.add_argument("--trace-dir", default="/tmp/elastic_jax_traces")
    args = p.parse_args(argv)
    lengths = [int(x) for x in args.lengths.split(",")]
    sections = args.sections.split(",")
    result = {
        "meta": {
            "device": jax.devices()[0].device_kind,
            "jax": jax.__version__,
            "shape": args.shape,
            "config": SHAPES[args.shape],
            "dtype": "bfloat16",
            "gemm_flops_per_token": gemm_flops_per_token(args.shape),
        }
    }
    if "parts" in sections:
        result["parts"] = measure_parts(args.shape, lengths, reps=5)
    if "breakdown" in sections:
        result["breakdown"] = layer_breakdown(args.shape, lengths[0], reps=5)
    if "prefill" in sections:
        result["prefill"] = run_prefill(
            args.shape,
            lengths,
            [float(x) for x in args.densities.split(",")],
            [int(x) for x in args.density_lengths.split(",")],
            args.reps,
        )
    if "profile" in sections:
        result["profile"] = profile_section(
            args.shape,
            lengths[0],
            [tuple(int(x) for x in p.split(":")) for p in args.profile_decode.split(",")],
            args.trace_dir,
        )
    if "decode" in sections:
        result["decode"] = run_decode(
            args.shape, args.decode_context, [int(x) for x in args.decode_batch.split(",")], 10
        )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
