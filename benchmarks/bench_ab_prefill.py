"""A/B of the dense prefill between an older commit and the working tree, in one process.

The older commit's ``elastic_jax`` is imported as the package ``elastic_jax_old``. Both run on
the same weights (one set of arrays, two pytree types), one after the other in alternating
order, so clock and power-cap drift hit both sides alike. Prepare the old package once:

    mkdir -p scratch/abpkg && git archive <commit> elastic_jax | tar -x -C scratch/abpkg
    mv scratch/abpkg/elastic_jax scratch/abpkg/elastic_jax_old
    grep -rl elastic_jax scratch/abpkg/elastic_jax_old | xargs sed -i 's/\\belastic_jax\\b/elastic_jax_old/g'

then (device, carrying ``scratch``):

    PYTHONPATH=. JAX_PLATFORMS=cuda python3 benchmarks/bench_ab_prefill.py --old-dir scratch/abpkg \\
        --parts --out $OUT/ab.json

Prints one row per length: median seconds of each side, the XLA temp size of each compiled
step, and the largest logit difference (the two sides should agree).
"""

from __future__ import annotations

import argparse
import importlib
import json
import statistics
import sys

import jax
import jax.numpy as jnp

from benchmarks.bench_engine import measure_parts
from benchmarks.bench_model import make_config, time_calls
from elastic_jax import engine, kv_cache
from elastic_jax.config import RuntimeConfig
from elastic_jax.params import init_random


def _temp_gib(step, *args) -> float | None:
    m = step.lower(*args).compile().memory_analysis()
    return None if m is None else m.temp_size_in_bytes / 2**30


def ab_row(old, params, old_params, cfg, impl: str, T: int, reps: int) -> dict:
    """Interleaved timing of the old and new ``prefill_step`` at T tokens (batch 1)."""
    rt = RuntimeConfig(attention_mode="dense", prefill_impl=impl)
    ort = old.config.RuntimeConfig(attention_mode="dense", prefill_impl=impl)
    tokens = jax.random.randint(jax.random.PRNGKey(0), (1, T), 0, cfg.vocab_size, jnp.int32)
    lengths = jnp.array([T], jnp.int32)
    holder = {"cache": kv_cache.create(cfg, 1, T + 256, page_size=rt.page_size)}

    def as_old(c):
        return old.kv_cache.KVCache(k=c.k, v=c.v, page_table=c.page_table, lengths=c.lengths)

    def run_new():
        logits, holder["cache"], _ = engine.prefill_step(
            params, holder["cache"], tokens, lengths, cfg, rt
        )
        return logits

    def run_old():
        logits, c, _ = old.engine.prefill_step(
            old_params, as_old(holder["cache"]), tokens, lengths, cfg, ort
        )
        holder["cache"] = kv_cache.KVCache(k=c.k, v=c.v, page_table=c.page_table, lengths=c.lengths)
        return logits

    c = holder["cache"]
    temp_new = _temp_gib(engine.prefill_step, params, c, tokens, lengths, cfg, rt)
    temp_old = _temp_gib(old.engine.prefill_step, old_params, as_old(c), tokens, lengths, cfg, ort)
    out_new = jax.block_until_ready(run_new())  # compile + warm-up, both sides
    out_old = jax.block_until_ready(run_old())
    times = {"new": [], "old": []}
    for r in range(reps):
        order = (("new", run_new), ("old", run_old))
        for name, fn in order if r % 2 == 0 else order[::-1]:
            times[name] += time_calls(fn, 1)
    new_s, old_s = statistics.median(times["new"]), statistics.median(times["old"])
    return {
        "impl": impl,
        "tokens": T,
        "new_s": new_s,
        "old_s": old_s,
        "old_over_new": old_s / new_s,
        "new_all": times["new"],
        "old_all": times["old"],
        "temp_gib_new": temp_new,
        "temp_gib_old": temp_old,
        "max_abs_logit_diff": float(jnp.max(jnp.abs(out_new - out_old))),
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--old-dir", required=True, help="directory holding elastic_jax_old/")
    p.add_argument("--shape", default="8b")
    p.add_argument("--lengths", default="32768,65536,131072")
    p.add_argument("--impls", default="pallas", help="prefill_impl values, comma separated")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--parts", action="store_true", help="also GEMM rate and cuDNN per layer")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    sys.path.insert(0, args.old_dir)
    try:
        old = importlib.import_module("elastic_jax_old")
        for mod in ("config", "engine", "kv_cache", "params"):
            importlib.import_module(f"elastic_jax_old.{mod}")
    except ImportError as e:
        raise SystemExit(
            f"--old-dir {args.old_dir}: no usable elastic_jax_old package ({e})"
        ) from e
    lengths = [int(x) for x in args.lengths.split(",")]
    result = {"meta": {"device": jax.devices()[0].device_kind, "jax": jax.__version__}}
    if args.parts:
        result["parts"] = measure_parts(args.shape, lengths, reps=5)
    cfg = make_config(args.shape)
    params = jax.jit(init_random, static_argnums=0)(cfg, jax.random.PRNGKey(0))
    # The old package's Params pytree over the same arrays (same fields, same order).
    old_shapes = jax.eval_shape(lambda: old.params.init_random(cfg, jax.random.PRNGKey(0)))
    old_params = jax.tree.unflatten(jax.tree.structure(old_shapes), jax.tree.leaves(params))
    rows = []
    for impl in args.impls.split(","):
        for T in lengths:
            rows.append(ab_row(old, params, old_params, cfg, impl, T, args.reps))
            print(json.dumps(rows[-1]), flush=True)
    result["rows"] = rows
    stats = jax.devices()[0].memory_stats() or {}
    result["meta"]["peak_gib_process"] = stats.get("peak_bytes_in_use", 0) / 2**30
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
