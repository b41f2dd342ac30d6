"""End-to-end model benchmark on the GPU with random weights: prefill and decode of a Qwen3-shaped
model through our jitted steps, printed as one table and written as JSON.

    PYTHONPATH=. python3 benchmarks/bench_model.py --shape 4b --prefill 8192,32768 \
        --decode-context 8192 --decode-batch 1,8 --out $OUT/qwen3_4b.json

Prefill time is the jitted ``prefill_step`` (whole prompt, all layers, cache write, last logits),
median of ``--reps`` after a warm-up (compile excluded). Decode time is the median per-step time of
``decode_step`` at a filled context. Weights are random (bf16); elastic modes use a router with
fixed random weights or forced head modes.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.shapes import SHAPES
from elastic_jax import engine, kv_cache
from elastic_jax.config import ModelConfig, RopeConfig, RuntimeConfig
from elastic_jax.params import init_random


def make_config(shape: str, elastic: dict | None = None) -> ModelConfig:
    el = None
    if elastic is not None:
        from elastic_jax.elastic_config import ElasticConfig

        el = ElasticConfig.from_hf_dict(elastic)
    return ModelConfig(
        architecture="PawQwen3ForCausalLM" if el else "Qwen3ForCausalLM",
        rms_norm_eps=1e-6,
        rope=RopeConfig(theta=1_000_000.0),
        max_position_embeddings=262144,
        dtype="bfloat16",
        elastic=el,
        **SHAPES[shape],
    ).validate()


def time_calls(fn, reps: int) -> list[float]:
    """Seconds of each of ``reps`` calls of ``fn()``, each waited for on the device."""
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        out.append(time.perf_counter() - t0)
    return out


def median_seconds(fn, reps: int, *args) -> float:
    """Median seconds of ``fn(*args)`` over ``reps`` calls after one warm-up call."""
    jax.block_until_ready(fn(*args))
    return statistics.median(time_calls(lambda: fn(*args), reps))


def prefill_caller(
    params, cfg: ModelConfig, rt: RuntimeConfig, T: int, seed: int = 0, aot: bool = False
):
    """``run() -> (logits, stats)``: one jitted prefill of a random T-token prompt (batch 1). The
    cache (T + 256 tokens) is donated to each call and replaced by the call's output. ``aot``:
    compile ahead of time here (``lower().compile()``), so the first ``run()`` executes only."""
    tokens = jax.random.randint(jax.random.PRNGKey(seed), (1, T), 0, cfg.vocab_size, jnp.int32)
    lengths = jnp.array([T], jnp.int32)
    holder = {"cache": kv_cache.create(cfg, 1, T + 256, page_size=rt.page_size)}
    if aot:
        step = engine.prefill_step.lower(
            params, holder["cache"], tokens, lengths, cfg=cfg, rt=rt
        ).compile()
    else:
        step = functools.partial(engine.prefill_step, cfg=cfg, rt=rt)

    def run():
        logits, holder["cache"], stats = step(params, holder["cache"], tokens, lengths)
        return logits, stats

    return run


def bench_prefill(
    params,
    cfg: ModelConfig,
    rt: RuntimeConfig,
    T: int,
    reps: int,
    seed: int = 0,
    warmup: str = "run",
):
    """Median seconds of one prefill of a T-token prompt (batch 1), and the info dict: every
    timed call's seconds (``all_s``) and, for elastic runs, kept fraction and head modes.

    ``warmup``: "run" (compile, then one untimed call) or "compile" (ahead-of-time compile
    only; every call is timed: for prompts whose one call takes minutes)."""
    if warmup not in ("run", "compile"):
        raise ValueError(f"warmup={warmup!r}: one of 'run', 'compile'")
    run = prefill_caller(params, cfg, rt, T, seed, aot=warmup == "compile")
    last = {}

    def timed():
        last["out"] = run()
        return last["out"][0]

    if warmup == "run":
        # Compile + warm-up, waited for whole: blocking on the stats alone returned at once for
        # the dense path (no stats), so the first timed call used to absorb the warm-up's tail.
        jax.block_until_ready(run())
    times = time_calls(timed, reps)
    stats = last["out"][1]
    info = {"all_s": times, "warmup": warmup}
    if stats:
        kept = np.asarray(stats["kept_blocks"], np.float64).sum()
        causal = np.asarray(stats["causal_blocks"], np.float64).sum()
        info["kept_fraction"] = float(kept / max(causal, 1))
        modes = np.asarray(stats["modes"])
        info["head_mode_fractions"] = {str(m): float((modes == m).mean()) for m in (0, 1, -1)}
    return statistics.median(times), info


def filled_cache(cfg: ModelConfig, batch: int, context: int, capacity: int, page_size: int):
    """A paged cache of ``capacity`` tokens per sequence holding ``context`` random tokens each:
    random K/V stand in for a prefill (decode cost does not depend on values), filled in place
    (donated) so the cache is never held twice, one (layer, kv head) slice at a time: random
    bits for the whole tensor need temporaries several times its size (at batch 8, 32K one
    18 GiB allocation ran the GPU out of memory)."""
    cache = kv_cache.create(cfg, batch, capacity, page_size=page_size)

    def fill_slices(x, key):  # x: [L, K, P, N, D]
        L, K = x.shape[:2]

        def body(i, x):
            part = jax.random.normal(jax.random.fold_in(key, i), (1, 1, *x.shape[2:]), x.dtype)
            return jax.lax.dynamic_update_slice(x, part, (i // K, i % K, 0, 0, 0))

        return jax.lax.fori_loop(0, L * K, body, x)

    fill = jax.jit(fill_slices, donate_argnums=0)
    key = jax.random.PRNGKey(1)
    k = fill(cache.k, key)
    v = fill(cache.v, jax.random.fold_in(key, 1))
    return dataclasses.replace(cache, k=k, v=v, lengths=jnp.full((batch,), context, jnp.int32))


def decode_caller(
    params,
    cfg: ModelConfig,
    rt: RuntimeConfig,
    batch: int,
    context: int,
    capacity: int,
    step_fn=None,
):
    """``step() -> logits``: one decode step of ``batch`` sequences against a ``filled_cache``
    holding ``context`` tokens each (``capacity`` per sequence), the cache donated and replaced
    each call. ``step_fn(params, cache, tokens) -> (logits, cache)`` defaults to
    ``engine.decode_step`` under ``cfg``, ``rt`` (a caller may pass the same step compiled)."""
    if step_fn is None:

        def step_fn(p, c, t):
            return engine.decode_step(p, c, t, cfg, rt)

    holder = {"cache": filled_cache(cfg, batch, context, capacity, rt.page_size)}
    tok = jnp.zeros((batch,), jnp.int32)

    def step():
        logits, holder["cache"] = step_fn(params, holder["cache"], tok)
        return logits

    return step


def bench_decode(
    params,
    cfg: ModelConfig,
    rt: RuntimeConfig,
    batch: int,
    context: int,
    steps: int,
    step_fn=None,
):
    """Median seconds per decode step at ``context`` tokens already in the cache (capacity
    ``decode_capacity(context, steps)``; ``step_fn`` as in ``decode_caller``)."""
    step = decode_caller(params, cfg, rt, batch, context, decode_capacity(context, steps), step_fn)
    jax.block_until_ready(step())
    times = time_calls(step, steps)
    return statistics.median(times)


def decode_capacity(context: int, steps: int) -> int:
    """Cache tokens per sequence for ``bench_decode``: the context, the timed steps, a margin."""
    return context + steps + 8


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="4b", choices=sorted(SHAPES))
    p.add_argument("--prefill", default="8192,32768")
    p.add_argument("--decode-context", type=int, default=8192)
    p.add_argument("--decode-batch", default="1,8")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--decode-steps", type=int, default=20)
    p.add_argument("--prefill-impl", default="auto")
    p.add_argument("--decode-impl", default="auto,reference")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    cfg = make_config(args.shape)
    params = jax.jit(init_random, static_argnums=0)(cfg, jax.random.PRNGKey(0))
    dev = jax.devices()[0]
    rows = []
    for T in [int(x) for x in args.prefill.split(",") if x]:
        rt = RuntimeConfig(attention_mode="dense", prefill_impl=args.prefill_impl)
        sec, _ = bench_prefill(params, cfg, rt, T, args.reps)
        rows.append(
            {
                "what": "prefill",
                "impl": args.prefill_impl,
                "tokens": T,
                "batch": 1,
                "ms": sec * 1e3,
                "tok_per_s": T / sec,
            }
        )
        print(rows[-1], flush=True)
    for impl in args.decode_impl.split(","):
        for B in [int(x) for x in args.decode_batch.split(",") if x]:
            rt = RuntimeConfig(attention_mode="dense", decode_impl=impl)
            sec = bench_decode(params, cfg, rt, B, args.decode_context, args.decode_steps)
            rows.append(
                {
                    "what": "decode",
                    "impl": impl,
                    "tokens": args.decode_context,
                    "batch": B,
                    "ms": sec * 1e3,
                    "tok_per_s": B / sec,
                }
            )
            print(rows[-1], flush=True)
    stats = dev.memory_stats() or {}
    meta = {
        "device": dev.device_kind,
        "jax": jax.__version__,
        "shape": args.shape,
        "config": SHAPES[args.shape],
        "dtype": "bfloat16",
        "peak_bytes": stats.get("peak_bytes_in_use"),
    }
    print(f"\n{meta['device']}  jax {meta['jax']}  Qwen3-{args.shape} shape, bf16, random weights")
    print(f"{'step':8} {'impl':10} {'batch':>5} {'tokens':>7} {'ms':>10} {'tok/s':>10}")
    for r in rows:
        print(
            f"{r['what']:8} {r['impl']:10} {r['batch']:>5} {r['tokens']:>7} {r['ms']:>10.2f} "
            f"{r['tok_per_s']:>10.1f}"
        )
    if meta["peak_bytes"]:
        print(f"peak GPU memory: {meta['peak_bytes'] / 2**30:.1f} GiB")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
