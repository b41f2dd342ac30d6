"""Decode step against its HBM-bound ideal (issue 16): Qwen3-shaped models with random bf16 weights.

    PYTHONPATH=. python3 benchmarks/bench_decode.py --configs 4b:1:32768,8b:1:65536 \
        --out $OUT/decode.json [--profile] [--gemv] [--generate]

For each ``shape:batch:context`` it prints the step time, the bytes a step must read (every
weight once, the LM head included, plus the K/V of every active sequence), the achieved
bandwidth, the device's copy bandwidth measured in the same run, and step time / ideal, where
ideal = bytes / copy bandwidth. Step times:

  jit       ``engine.decode_sample_step`` (decode + greedy sampling, as the host loop runs it)
            queued back to back for ``--steps`` steps and waited for once: the device-side cost
            of a step with dispatch overlapped, which is what ``generate()`` can reach.
  generate  ``generate()`` on random prompts of ``context`` tokens, ``--gen-tokens`` new tokens
            each: milliseconds per step, host loop included, between the last request's first
            token and the first request's last (every request decoding; the engine prefills
            them one at a time, so earlier requests' decode time also holds later prefills).

``--profile`` adds a kernel breakdown of the jitted step (JAX profiler): device span, kernel sum
(span - sum = launch gaps), and time per kernel class. ``--gemv`` times the step's matrix-vector
products alone (each weight matrix at batch B) to show how close XLA's GEMV gets to the copy
bandwidth.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.bench_model import filled_cache, make_config, median_seconds, time_calls
from benchmarks.shapes import SHAPES
from elastic_jax import engine
from elastic_jax.config import DECODE_NORMS, DECODE_OUT_PROJS, ModelConfig, RuntimeConfig
from elastic_jax.model import resolve_decode_out_proj
from elastic_jax.params import Params, init_random
from elastic_jax.sampling import SamplingParams


def copy_bandwidth(gib: float = 2.0, reps: int = 20) -> dict[str, float]:
    """Device bandwidths in bytes/s, each the median of ``reps`` calls over a ``gib`` buffer:
    ``copy`` = the best of three elementwise copies (bytes read + bytes written; XLA vectorises
    dtypes differently, so the best one stands for the hardware), ``read`` = a sum (bytes read).
    ``copy`` is the ceiling the decode step is compared with (issue 16)."""
    n = int(gib * 2**30) // 4
    x = jax.random.bits(jax.random.PRNGKey(0), (n,), jnp.uint32)
    variants = {
        "u32+1": (jax.jit(lambda a: a + jnp.uint32(1)), x),
        "bf16*2": (
            jax.jit(lambda a: a * jnp.bfloat16(2)),
            jax.lax.bitcast_convert_type(x, jnp.bfloat16).reshape(-1),
        ),
        "f32 neg": (jax.jit(lambda a: -a), jax.lax.bitcast_convert_type(x, jnp.float32)),
    }
    best = max(2 * a.nbytes / median_seconds(f, reps, a) for f, a in variants.values())
    read = x.nbytes / median_seconds(jax.jit(lambda a: jnp.sum(a, dtype=jnp.uint32)), reps, x)
    return {"copy": best, "read": read}


def torch_copy_bandwidth(gib: float = 4.0) -> float | None:
    """cudaMemcpy device-to-device bandwidth (bytes read + written) through torch, in a child
    process so it runs before JAX takes the GPU memory; None where torch or CUDA is missing."""
    import subprocess
    import sys

    code = (
        "import torch\n"
        f"n = int({gib!r} * 2**30)\n"
        "a = torch.empty(n, dtype=torch.uint8, device='cuda'); b = torch.empty_like(a)\n"
        "a.random_(0, 255)\n"
        "for _ in range(3): b.copy_(a)\n"
        "s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)\n"
        "ts = []\n"
        "for _ in range(20):\n"
        "    s.record(); b.copy_(a); e.record(); e.synchronize(); ts.append(s.elapsed_time(e))\n"
        "ts.sort(); print(2 * n / (ts[len(ts) // 2] / 1e3))\n"
    )
    try:
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
        )
        return float(out.stdout.strip().splitlines()[-1])
    except Exception:  # noqa: BLE001 - optional peer measurement
        return None


def weight_bytes_read(params: Params, cfg: ModelConfig, batch: int) -> int:
    """Weight bytes one decode step reads: every layer weight, the final norm and the LM head
    (the embedding itself when tied); an untied embedding contributes only the looked-up rows."""
    layers = sum(x.nbytes for x in jax.tree.leaves(params.layers))
    head = params.embed.nbytes if params.lm_head is None else params.lm_head.nbytes
    rows = 0 if params.lm_head is None else batch * cfg.hidden_size * params.embed.dtype.itemsize
    return layers + params.final_norm.nbytes + head + rows


def kv_bytes_read(cfg: ModelConfig, batch: int, context: int) -> int:
    """K and V of ``context`` cached tokens of ``batch`` sequences, every layer."""
    itemsize = jnp.dtype(cfg.jnp_dtype).itemsize
    return 2 * batch * context * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * itemsize


def _stepper(params, cfg, rt, batch, context, steps):
    """``run(n)``: n greedy decode steps queued back to back on a filled cache; returns tokens."""
    cache = filled_cache(cfg, batch, context, context + 2 * steps + 64, rt.page_size)
    holder = {"cache": cache, "tok": jnp.zeros((batch,), jnp.int32)}
    key = jax.random.PRNGKey(0)
    banned = jnp.zeros((batch, cfg.vocab_size), bool)
    sp = SamplingParams()

    def run(n):
        for _ in range(n):
            holder["tok"], holder["cache"] = engine.decode_sample_step(
                params, holder["cache"], holder["tok"], key, banned, cfg, rt, sp
            )
        # Keep lengths at the context: every timed step reads the same number of K/V tokens.
        holder["cache"].lengths = jnp.full((batch,), context, jnp.int32)
        return holder["tok"]

    return run


def time_jit_step(params, cfg, rt, batch, context, steps) -> tuple[float, object]:
    run = _stepper(params, cfg, rt, batch, context, steps)
    jax.block_until_ready(run(3))
    times = time_calls(lambda: run(steps), 3)
    return statistics.median(times) / steps, run


def steady_step_ms(arrivals: list[list[float]]) -> float:
    """Host-loop decode step (ms) while every request is decoding, from each request's token
    arrival times (seconds, in order). The engine prefills requests one at a time, so a
    request's own decode time also holds the other requests' prefills; the window here starts
    when the last request's first token arrives and ends at the first request to finish.
    Raises ValueError when that window holds no step (budgets too short for the batch)."""
    start = max(a[0] for a in arrivals)
    end = min(a[-1] for a in arrivals)
    inside = [t for t in arrivals[0] if start < t <= end]
    if not inside:
        raise ValueError("no decode step with every request running: raise --gen-tokens")
    return (end - start) * 1e3 / len(inside)


def time_generate(params, cfg, rt, batch, context, new_tokens) -> float:
    """Decode ms per step of ``generate()`` (host loop included) with all ``batch`` requests
    running (``steady_step_ms``), median of two calls after a warm-up call."""
    from elastic_jax.generate import generate
    from elastic_jax.loader import Model

    model = Model(cfg, params, None, rt, max_cache_tokens=context + new_tokens + 256)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, cfg.vocab_size, context).tolist() for _ in range(batch)]
    kw = dict(max_new_tokens=new_tokens, stop_token_ids=[])
    generate(model, prompts, **kw)  # compile every bucket
    per_step = []
    for _ in range(2):
        arrivals: list[list[float]] = [[] for _ in range(batch)]

        def stamp(e, arrivals=arrivals) -> None:
            arrivals[e.request].append(time.perf_counter())

        generate(model, prompts, stream=stamp, **kw)
        per_step.append(steady_step_ms(arrivals))
    return statistics.median(per_step)


_KERNEL_CLASSES = (
    ("decode_attention", ("paged_decode",)),
    ("gemv/gemm", ("gemm", "gemv", "cublas", "cutlass", "dot", "matmul", "sm90_xmma", "nvjet")),
    ("cache_write", ("scatter",)),
    ("copy", ("memcpy", "copy")),
)


def classify(name: str) -> str:
    low = name.lower()
    for cls, keys in _KERNEL_CLASSES:
        if any(k in low for k in keys):
            return cls
    return "other (fusions: norms, rope, merge, sampling)"


def profile_step(run, steps: int) -> dict:
    from benchmarks.profiling import device_kernel_stats

    with tempfile.TemporaryDirectory() as d:
        span, ksum, per_name, launches = device_kernel_stats(lambda i: run(1), steps, d)
    per_class: collections.Counter = collections.Counter()
    launches_per_class: collections.Counter = collections.Counter()
    for name, us in per_name.items():
        per_class[classify(name)] += us
        launches_per_class[classify(name)] += launches[name]
    top = per_name.most_common(12)
    return {
        "span_ms": span / 1e3,
        "kernel_sum_ms": ksum / 1e3,
        "per_class_ms": {k: v / 1e3 for k, v in per_class.items()},
        "kernels_per_step": round(sum(launches.values()), 1),
        "kernels_per_class": {k: round(v, 1) for k, v in launches_per_class.items()},
        "top_kernels_ms": [(n, us / 1e3) for n, us in top],
        # every kernel: (name, ms per step, launches per step), longest first
        "kernels": [(n, us / 1e3, round(launches[n], 2)) for n, us in per_name.most_common()],
    }


def gemv_table(params: Params, cfg: ModelConfig, batch: int, copy_bw: float) -> list[dict]:
    """Each distinct weight matrix of a layer times a [batch, in] activation, alone, the layers'
    copies cycled so the L2 does not hold the weight; then the LM head (``lm_head_variants``)."""
    rows = []
    lp = params.layers
    mats = {
        "wq": lp.wq.reshape(cfg.num_layers, cfg.hidden_size, -1),
        "wk": lp.wk.reshape(cfg.num_layers, cfg.hidden_size, -1),
        "wo": lp.wo.reshape(cfg.num_layers, -1, cfg.hidden_size),
        "w_gate": lp.w_gate,
        "w_down": lp.w_down,
    }
    for name, w in mats.items():
        x = jnp.ones((batch, w.shape[1]), w.dtype)
        f = jax.jit(lambda x, w: [x @ w[i] for i in range(w.shape[0])])
        t = median_seconds(f, 10, x, w) / w.shape[0]
        rows.append({"matrix": name, "shape": list(w.shape[1:]), **_rates(w[0].nbytes, t, copy_bw)})
        if name in ("wo", "w_down"):  # the same products through the stacked-weight Pallas GEMV
            # (bench_gemv imports this module: imported here; 4 layers of the stack, not all,
            # so the table does not compile one kernel per layer)
            from benchmarks.bench_gemv import time_stacked
            from pallas_kernels.gemv import stacked_gemv

            t = time_stacked(stacked_gemv, x, w, reps=10, cycle=4)
            rows.append(
                {"matrix": f"{name} (pallas stacked_gemv)", "shape": list(w.shape[1:]),
                 **_rates(w[0].nbytes, t, copy_bw)}
            )  # fmt: skip
    return rows + lm_head_variants(params, cfg, batch, copy_bw)


def _rates(nbytes: int, seconds: float, copy_bw: float) -> dict:
    return {
        "us": seconds * 1e6,
        "tb_s": nbytes / seconds / 1e12,
        "of_copy_bw": nbytes / seconds / copy_bw,
    }


def dump_hlo(params, cfg, rt, batch: int, context: int, out_dir: str) -> None:
    """Write the optimized HLO of the jitted decode step (gzip) for offline reading."""
    import gzip

    cache = jax.eval_shape(lambda: filled_cache(cfg, batch, context, context + 128, rt.page_size))
    tok = jax.ShapeDtypeStruct((batch,), jnp.int32)
    banned = jax.ShapeDtypeStruct((batch, cfg.vocab_size), jnp.bool_)
    key = jax.ShapeDtypeStruct((2,), jnp.uint32)
    text = (
        engine.decode_sample_step.lower(params, cache, tok, key, banned, cfg, rt, SamplingParams())
        .compile()
        .as_text()
    )
    os.makedirs(out_dir, exist_ok=True)
    name = f"{out_dir}/decode_hlo_{cfg.hidden_size}_{batch}.txt.gz"
    with gzip.open(name, "wt") as f:
        f.write(text)


def lm_head_variants(params: Params, cfg: ModelConfig, batch: int, copy_bw: float) -> list[dict]:
    """The LM head GEMV written three ways (which one XLA lowers to the fastest kernel)."""
    tied = params.lm_head is None
    w = params.embed if tied else params.lm_head  # [V, E] tied, [E, V] untied
    spec = "be,ve->bv" if tied else "be,ev->bv"
    x = jnp.ones((batch, cfg.hidden_size), w.dtype)
    fns = {
        "f32 out": lambda x, w: jnp.einsum(spec, x, w, preferred_element_type=jnp.float32),
        "bf16 out": lambda x, w: jnp.einsum(spec, x, w).astype(jnp.float32),
        "pad 8 rows": lambda x, w: jnp.einsum(
            spec,
            jnp.pad(x, ((0, max(0, 8 - x.shape[0])), (0, 0))),
            w,
            preferred_element_type=jnp.float32,
        )[: x.shape[0]],
    }
    return [
        {"matrix": f"lm_head ({name})", "shape": list(w.shape),
         **_rates(w.nbytes, median_seconds(jax.jit(fn), 10, x, w), copy_bw)}
        for name, fn in fns.items()
    ]  # fmt: skip


def parse_configs(spec: str) -> list[tuple[str, int, int]]:
    out = []
    for item in spec.split(","):
        shape, b, ctx = item.split(":")
        if shape not in SHAPES:
            raise ValueError(f"--configs: unknown shape {shape!r}; allowed: {sorted(SHAPES)}")
        out.append((shape, int(b), int(ctx)))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--configs",
        default="4b:1:32768,8b:1:32768,8b:1:65536",
        help="comma list of shape:batch:context",
    )
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--gen-tokens", type=int, default=64)
    p.add_argument("--generate", action="store_true", help="also time generate()")
    p.add_argument("--profile", action="store_true")
    p.add_argument("--gemv", action="store_true")
    p.add_argument("--decode-impl", default="auto")
    p.add_argument(
        "--decode-out-proj",
        default="auto",
        choices=DECODE_OUT_PROJS,
        help="the attention out-projection in decode (RuntimeConfig.decode_out_proj)",
    )
    p.add_argument(
        "--decode-norm",
        default="xla",
        choices=DECODE_NORMS,
        help="the residual adds and RMSNorms in decode (RuntimeConfig.decode_norm)",
    )
    p.add_argument("--dump-hlo", default=None, help="directory: write each step's optimized HLO")
    p.add_argument("--label", default="", help="free text stored with the rows (e.g. XLA flags)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    torch_bw = torch_copy_bandwidth() if jax.default_backend() == "gpu" else None
    dev = jax.devices()[0]
    bw = copy_bandwidth(0.25 if dev.platform == "cpu" else 4.0)
    # The ceiling is the best copy measured: XLA's elementwise copies and cudaMemcpy (torch).
    copy_bw = max(bw["copy"], torch_bw or 0.0)
    print(
        f"{dev.device_kind}: copy {copy_bw / 1e12:.3f} TB/s, read {bw['read'] / 1e12:.3f} TB/s",
        flush=True,
    )
    rt = RuntimeConfig(
        attention_mode="dense",
        decode_impl=args.decode_impl,
        decode_out_proj=args.decode_out_proj,
        decode_norm=args.decode_norm,
    )
    rows, gemv, params_for = [], {}, {}
    for shape, batch, context in parse_configs(args.configs):
        if shape not in params_for:
            params_for.clear()  # one shape's weights on the device at a time
            cfg = make_config(shape)
            params_for[shape] = (
                cfg,
                jax.jit(init_random, static_argnums=0)(cfg, jax.random.PRNGKey(0)),
            )
        cfg, params = params_for[shape]
        w_bytes = weight_bytes_read(params, cfg, batch)
        kv = kv_bytes_read(cfg, batch, context)
        ideal_ms = (w_bytes + kv) / copy_bw * 1e3
        row = {
            "shape": shape,
            "batch": batch,
            "context": context,
            "weights_gb": w_bytes / 1e9,
            "kv_gb": kv / 1e9,
            "ideal_ms": ideal_ms,
            "label": args.label,
            "decode_out_proj": resolve_decode_out_proj(rt, cfg),
            "decode_norm": rt.decode_norm,
        }
        try:
            sec, run = time_jit_step(params, cfg, rt, batch, context, args.steps)
            row["jit_ms"] = sec * 1e3
            row["jit_ratio"] = row["jit_ms"] / ideal_ms
            row["jit_tb_s"] = (w_bytes + kv) / sec / 1e12
            if args.profile and dev.platform == "gpu":
                try:
                    row["profile"] = profile_step(run, 10)
                except Exception as e:  # noqa: BLE001 - a trace problem must not lose the row
                    row["profile_error"] = f"{type(e).__name__}: {str(e)[:200]}"
            del run
            if args.generate:
                row["generate_ms"] = time_generate(params, cfg, rt, batch, context, args.gen_tokens)
                row["generate_ratio"] = row["generate_ms"] / ideal_ms
        except Exception as e:  # noqa: BLE001 - an OOM at one size must not lose the others
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.out:  # after every row: a later OOM or time-out must not lose this one
            with open(args.out, "w") as f:
                json.dump(
                    {
                        "copy_bw_tb_s": copy_bw / 1e12,
                        "label": args.label,
                        "decode_out_proj": args.decode_out_proj,  # as asked; rows: resolved
                        "rows": rows,
                    },
                    f,
                    indent=2,
                )
        if args.dump_hlo:
            dump_hlo(params, cfg, rt, batch, context, args.dump_hlo)
        if args.gemv and (shape, batch) not in gemv:
            gemv[(shape, batch)] = gemv_table(params, cfg, batch, copy_bw)
    meta = {
        "device": dev.device_kind,
        "jax": jax.__version__,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "dtype": "bfloat16",
        "copy_bw_tb_s": copy_bw / 1e12,
        "read_bw_tb_s": bw["read"] / 1e12,
        "xla_copy_bw_tb_s": bw["copy"] / 1e12,
        "torch_memcpy_bw_tb_s": None if torch_bw is None else torch_bw / 1e12,
        "steps": args.steps,
        "label": args.label,
        "decode_out_proj": args.decode_out_proj,  # as asked; each row has it resolved
        "decode_norm": args.decode_norm,
    }
    print(
        f"\n{meta['device']}  jax {meta['jax']}  copy {meta['copy_bw_tb_s']:.3f} TB/s  {args.label}"
    )
    print(
        f"{'shape':5} {'B':>3} {'ctx':>6} {'GB/step':>8} {'ideal ms':>9} {'jit ms':>8} "
        f"{'ratio':>6} {'TB/s':>6} {'gen ms':>8} {'ratio':>6}"
    )
    for r in rows:
        if "error" in r:
            print(f"{r['shape']:5} {r['batch']:>3} {r['context']:>6} ERROR {r['error'][:80]}")
            continue
        g = r.get("generate_ms")
        print(
            f"{r['shape']:5} {r['batch']:>3} {r['context']:>6} "
            f"{r['weights_gb'] + r['kv_gb']:>8.2f} {r['ideal_ms']:>9.2f} {r['jit_ms']:>8.2f} "
            f"{r['jit_ratio']:>6.2f} {r['jit_tb_s']:>6.2f} "
            + (f"{g:>8.2f} {r['generate_ratio']:>6.2f}" if g else "")
        )
        if "profile" in r:
            pr = r["profile"]
            cls = ", ".join(f"{k} {v:.2f}" for k, v in sorted(pr["per_class_ms"].items()))
            print(
                f"      profile: span {pr['span_ms']:.2f} ms, kernels {pr['kernel_sum_ms']:.2f} "
                f"ms ({cls})"
            )
    for (shape, batch), gr in gemv.items():
        print(
            f"GEMV {shape} B={batch}: "
            + ", ".join(f"{g['matrix']} {g['us']:.1f}us {g['tb_s']:.2f}TB/s" for g in gr)
        )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(
                {"meta": meta, "rows": rows, "gemv": {f"{s}:{b}": g for (s, b), g in gemv.items()}},
                f,
                indent=2,
            )


if __name__ == "__main__":
    main()
