"""Long-context engine benchmark (issue 9): Qwen3-8B-shaped model with random bf16 weights.

    PYTHONPATH=. python3 benchmarks/bench_engine.py --sections prefill --out $OUT/engine_prefill.json
    PYTHONPATH=. python3 benchmarks/bench_engine.py --sections decode,parts --out $OUT/engine_decode.json

Sections (each appends rows to the JSON and prints a table at the end):
  parts    the ingredients of the "ideal" times, measured in this run: bf16 GEMM rate (8192^3),
           cuDNN causal attention per layer, XAttention estimate+selection per layer, router per
           layer, at each prefill length.
  prefill  whole-model prefill (all 36 layers, cache write, last logits), median of --reps after
           a warm-up: dense (cuDNN attention), elastic full+xattn and xattn+streaming (router with
           fixed random weights), and every head forced to XAttention with synthetic kept-block
           densities (``RuntimeConfig.synthetic_kept_fraction``; the estimate still runs).
  decode   decode tokens/s (Pallas paged decode kernel) at --decode-context for each batch.

Ideal (dense) = model GEMM FLOPs / measured GEMM rate + 36 x cuDNN attention time.
Ideal (elastic) = dense measured time - 36 x cuDNN time x (1 - kept fraction) + 36 x estimate time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.bench_model import bench_decode, bench_prefill, make_config
from benchmarks.shapes import SHAPES
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


def _median_s(fn, reps: int, *args) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


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


def measure_parts(lengths: list[int], reps: int) -> list[dict]:
    from pallas_kernels.xattn.api import xattn_select

    rows = []
    a = jax.random.normal(jax.random.PRNGKey(0), (8192, 8192), jnp.bfloat16)
    b = jax.random.normal(jax.random.PRNGKey(1), (8192, 8192), jnp.bfloat16)
    mm = jax.jit(lambda x, y: x @ y)
    sec = _median_s(mm, 10, a, b)
    rows.append({"part": "gemm_8192^3", "ms": sec * 1e3, "tflops": 2 * 8192**3 / sec / 1e12})
    print(rows[-1], flush=True)
    s = SHAPES["8b"]
    H, K, D = s["num_heads"], s["num_kv_heads"], s["head_dim"]
    cfg = make_config("8b", ROUTER_ELASTIC["full+xattn"])
    from elastic_jax.router import route

    rparams = init_random(cfg, jax.random.PRNGKey(2)).layers.router
    layer0 = jax.tree.map(lambda x: x[0], rparams)
    for T in lengths:
        key = jax.random.PRNGKey(T)
        q = jax.random.normal(key, (1, T, H, D), jnp.bfloat16)
        k = jax.random.normal(jax.random.fold_in(key, 1), (1, T, K, D), jnp.bfloat16)
        v = jax.random.normal(jax.random.fold_in(key, 2), (1, T, K, D), jnp.bfloat16)
        att = jax.jit(
            lambda q, k, v: jax.nn.dot_product_attention(
                q, k, v, is_causal=True, implementation="cudnn"
            )
        )
        t_att = _median_s(att, reps, q, k, v)
        est = jax.jit(
            lambda q, k: (
                xattn_select(
                    q, k, stride=16, threshold=0.8, block_size=128, sink_rule="official"
                ).block_counts
            )
        )
        t_est = _median_s(est, reps, q, k)
        n_valid = jnp.array([T], jnp.int32)
        rt_fn = jax.jit(lambda k, n: route(k, n, layer0, cfg.elastic, H)[0])
        t_router = _median_s(rt_fn, reps, k, n_valid)
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


def run_prefill(shape, lengths, densities, density_lengths, reps):
    rows = []
    cfg_by_mode = {name: make_config(shape, el) for name, el in ROUTER_ELASTIC.items()}
    # One set of weights (router included); the dense rows ignore the router.
    params = jax.jit(init_random, static_argnums=0)(
        cfg_by_mode["full+xattn"], jax.random.PRNGKey(0)
    )
    cases = [("dense", cfg_by_mode["full+xattn"], RuntimeConfig(attention_mode="dense"))]
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
        "o_proj": (jax.jit(lambda o: jnp.einsum("bthd,hde->bte", o, lp.wo)), (o,)),
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

            sec = _median_s(call, reps)
        else:
            sec = _median_s(fn, reps, *args)
        rows.append({"part": "layer_breakdown", "tokens": T, "piece": name, "ms": sec * 1e3})
        print(rows[-1], flush=True)
    return rows


def run_decode(shape: str, context: int, batches: list[int], steps: int):
    cfg = make_config(shape)
    params = jax.jit(init_random, static_argnums=0)(cfg, jax.random.PRNGKey(0))
    rows = []
    for B in batches:
        rt = RuntimeConfig(attention_mode="dense", decode_impl="pallas")
        sec = bench_decode(params, cfg, rt, B, context, steps)
        rows.append(
            {"what": "decode", "batch": B, "tokens": context, "ms": sec * 1e3, "tok_per_s": B / sec}
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
        result["parts"] = measure_parts(lengths, reps=5)
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
    if "decode" in sections:
        result["decode"] = run_decode(
            args.shape, args.decode_context, [int(x) for x in args.decode_batch.split(",")], 10
        )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
