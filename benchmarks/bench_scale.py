"""Cost growth with prompt length (issue 19): Qwen3-8B shape, random bf16 weights, batch 1.

    XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 PYTHONPATH=. python3 benchmarks/bench_scale.py \
        --lengths 8192,16384,32768,65536,131072,262144 --max-seconds 560 --out $OUT/scale.json
    python3 benchmarks/bench_scale.py --predict --lengths 8192,...,524288   # memory model only

For each prompt length, in increasing order, one fresh subprocess (so each length's peak
memory is its own: JAX cannot reset ``peak_bytes_in_use``) measures:
  - prefill time (``prefill_step``, whole model, cache of T + 256 tokens, median of --reps after
    a warm-up: one untimed call, or from 256K (``--warmup auto``) an ahead-of-time compile
    only, since one 512K dense call takes minutes) and kept fraction for every mode: ``dense``
    (the "auto" dense kernel), the two routers of ``bench_engine.ROUTER_ELASTIC`` (fixed
    random router weights), and every head forced to XAttention with synthetic kept-block
    densities (``syn0.01`` = 1%);
  - router time per layer (all layers' routers in one jit, as ``bench_engine`` parts);
  - decode step time at a context of T tokens (batch 1, Pallas paged decode on GPU);
  - the running peak (``memory_stats()["peak_bytes_in_use"]``) after each mode, next to the memory
    model's prediction (``elastic_jax.memory``) for that mode and the running max of predictions.
    Modes run dense first, so the first row's peak is dense alone. ``--process-per-mode`` runs
    every (length, mode) in its own process instead (exact per-mode peaks, more compile time).

With ``--hf``, HF transformers' prefill (``bench_hf``: SDPA, bf16, median of ``--hf-reps``
after a warm-up, torch's peak) runs first, at every length in one process of its own, until it
runs out of memory; the table prints its time over our dense path's.

Before each run the memory model's ``check_fits`` is applied: a row that is predicted not to
fit is recorded as skipped with the numbers (``--no-fit-check`` runs it anyway).
``--max-seconds``: no new length starts once the next one is predicted (from the growth of the
previous lengths) to end past it, and a running child is stopped at it; rows already measured
are kept (each child appends its rows to a file as it goes). Lengths can also be split over
several commands and the JSON files merged (``plot_scale`` takes a list).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time

DEFAULT_MODES = "dense,full+xattn,xattn+streaming,syn0.01,syn0.05,syn0.30"
CACHE_MARGIN = 256  # cache tokens past the prompt (as bench_model.prefill_caller)
AOT_FROM_TOKENS = 262144  # --warmup auto: compile-only warm-up from this length


def parse_mode(mode: str):
    """mode name -> (elastic router dict or None, RuntimeConfig)."""
    from benchmarks.bench_engine import ROUTER_ELASTIC
    from elastic_jax.config import RuntimeConfig

    if mode == "dense":
        return ROUTER_ELASTIC["full+xattn"], RuntimeConfig(attention_mode="dense")
    if mode in ROUTER_ELASTIC:
        return ROUTER_ELASTIC[mode], RuntimeConfig(attention_mode="elastic")
    if mode.startswith("syn"):
        frac = float(mode[3:])
        rt = RuntimeConfig(attention_mode="xattn", synthetic_kept_fraction=frac)
        return ROUTER_ELASTIC["full+xattn"], rt
    raise ValueError(f"mode {mode!r}: one of dense, {', '.join(ROUTER_ELASTIC)}, syn<fraction>")


def model_config(shape: str, elastic: dict | None, max_len: int):
    from benchmarks.bench_model import make_config

    cfg = make_config(shape, elastic)
    return dataclasses.replace(
        cfg, max_position_embeddings=max(cfg.max_position_embeddings, max_len + CACHE_MARGIN)
    )


def predict(shape: str, modes: list[str], T: int) -> dict[str, dict]:
    """Memory model per mode at T tokens: prefill (cache T + 256) and decode, in GiB."""
    from elastic_jax import memory

    out = {}
    for mode in modes:
        el, rt = parse_mode(mode)
        cfg = model_config(shape, el, T)
        pre = memory.prefill_terms(cfg, rt, T, 1, T + CACHE_MARGIN)
        dec = memory.decode_terms(cfg, rt, 1, T + 64)
        out[mode] = {
            "prefill_gib": pre.total / memory.GIB,
            "decode_gib": dec.total / memory.GIB,
            "terms_gib": {k: v / memory.GIB for k, v in pre.terms.items()},
            **pre.notes,
        }
    return out


# ------------------------------------------------------------------------------ one length


def _emit(path: str | None, row: dict) -> None:
    print(json.dumps(row), flush=True)
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")


def _peak_gib() -> float | None:
    import jax

    stats = jax.devices()[0].memory_stats()
    return None if not stats else stats.get("peak_bytes_in_use", 0) / 2**30


def run_length(args, T: int, modes: list[str], rows_path: str | None) -> None:
    """Measure every mode at T tokens in this process, appending rows to ``rows_path``."""
    import jax
    import jax.numpy as jnp

    from benchmarks.bench_engine import _router_in_jit
    from benchmarks.bench_model import bench_decode, bench_prefill
    from elastic_jax import memory
    from elastic_jax.config import RuntimeConfig
    from elastic_jax.params import init_random

    _emit(rows_path, {"what": "meta", **_meta(args)})
    preds = predict(args.shape, modes, T)
    # One set of weights (router included): every mode shares them.
    cfg0 = model_config(args.shape, parse_mode(modes[0])[0], T)
    params = jax.jit(init_random, static_argnums=0)(cfg0, jax.random.PRNGKey(0))
    running_pred = memory.weight_bytes(cfg0) / memory.GIB
    for mode in modes:
        el, rt = parse_mode(mode)
        cfg = model_config(args.shape, el, T)
        row = {"what": "prefill", "mode": mode, "tokens": T, "pred_gib": preds[mode]["prefill_gib"]}
        row["estimate_passes"] = preds[mode].get("estimate_passes")
        try:
            if not args.no_fit_check:
                memory.check_fits(cfg, rt, T, 1, T + CACHE_MARGIN)
        except ValueError as e:
            _emit(rows_path, {**row, "skipped": str(e).splitlines()[0]})
            continue
        t0 = time.perf_counter()
        sec, info = bench_prefill(params, cfg, rt, T, args.reps, warmup=warmup_for(args, T))
        running_pred = max(running_pred, preds[mode]["prefill_gib"])
        row.update(
            s=sec,
            all_s=info["all_s"],
            warmup=info["warmup"],
            wall_s=time.perf_counter() - t0,
            kept_fraction=info.get("kept_fraction", 1.0),
            head_mode_fractions=info.get("head_mode_fractions"),
            peak_gib=_peak_gib(),
            pred_running_gib=running_pred,
        )
        _emit(rows_path, row)

    if args.router and any(parse_mode(m)[1].attention_mode == "elastic" for m in modes):
        s = model_config(args.shape, None, T)
        key = jax.random.PRNGKey(T)
        k = jax.random.normal(key, (1, T, s.num_kv_heads, s.head_dim), jnp.bfloat16)
        cfg = model_config(args.shape, parse_mode("full+xattn")[0], T)
        t_router = _router_in_jit(cfg, params.layers.router, k, s.num_heads, reps=5)
        del k
        _emit(rows_path, {"what": "router", "tokens": T, "ms_per_layer": t_router * 1e3})

    if args.decode_steps > 0:
        rt = RuntimeConfig(attention_mode="dense")
        t0 = time.perf_counter()
        sec = bench_decode(params, cfg0, rt, 1, T, args.decode_steps)
        _emit(
            rows_path,
            {
                "what": "decode",
                "tokens": T,
                "batch": 1,
                "ms": sec * 1e3,
                "wall_s": time.perf_counter() - t0,
                "pred_gib": preds[modes[0]]["decode_gib"],
                "peak_gib": _peak_gib(),
            },
        )


# ------------------------------------------------------------------------------ driver


def _child_cmd(args, T: int, modes: list[str], rows_path: str, decode: bool, router: bool):
    cmd = [sys.executable, "-m", "benchmarks.bench_scale", "--child", "--shape", args.shape]
    cmd += ["--lengths", str(T), "--modes", ",".join(modes), "--reps", str(args.reps)]
    cmd += ["--warmup", args.warmup]
    cmd += ["--decode-steps", str(args.decode_steps if decode else 0), "--rows", rows_path]
    cmd += [] if router else ["--no-router"]
    cmd += ["--no-fit-check"] if args.no_fit_check else []
    return cmd


def warmup_for(args, T: int) -> str:
    """Prefill warm-up at T tokens: "auto" runs one untimed call below ``AOT_FROM_TOKENS`` and
    only compiles from there (one 8B dense prefill of 512K tokens takes minutes)."""
    if args.warmup != "auto":
        return args.warmup
    return "compile" if T >= AOT_FROM_TOKENS else "run"


def hf_cmd(args, lengths: list[int], out: str) -> list[str]:
    """The ``bench_hf`` child: prefill at every length in one process (one import and one
    model build), longer lengths not tried after an out-of-memory."""
    cmd = [sys.executable, "-m", "benchmarks.bench_hf", "--shape", args.shape]
    cmd += ["--prefill", ",".join(map(str, lengths)), "--reps", str(args.hf_reps)]
    return cmd + ["--device", args.hf_device, "--stop-after-oom", "--out", out]


def run_hf(args, lengths: list[int], timeout: float) -> list[dict]:
    """HF transformers prefill at each length (``bench_hf``: SDPA, bf16, ``logits_to_keep=1``,
    median of ``--hf-reps`` after a warm-up) in its own process, before JAX takes the device:
    one row ``{"what": "hf_prefill", ...}`` per length with seconds and torch's peak, or why
    there is none."""
    rows = [{"what": "hf_prefill", "tokens": T, "batch": 1} for T in lengths]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "hf.json")
        try:
            proc = subprocess.run(
                hf_cmd(args, lengths, out), timeout=timeout, capture_output=True, text=True
            )
        except subprocess.TimeoutExpired:
            return [{**r, "skipped": f"timeout after {timeout:.0f} s"} for r in rows]
        if proc.returncode != 0 or not os.path.exists(out):
            tail = (proc.stderr or "").strip().splitlines()[-1:] or ["no output"]
            return [{**r, "skipped": f"exit {proc.returncode}: {tail[0]}"} for r in rows]
        with open(out) as f:
            data = json.load(f)
    got = {r["tokens"]: r for r in data["rows"] if r["what"] == "prefill"}
    for row in rows:
        g = got[row["tokens"]]
        row["hf_meta"] = data["meta"]
        if g.get("not_run"):
            row["skipped"] = g["not_run"]
        elif g.get("oom"):
            row.update(skipped="out of memory", oom=True)
        else:
            row.update(s=g["ms"] / 1e3, peak_gib=g.get("peak_gib"), reps=args.hf_reps)
    return rows


def _read_rows(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _meta(args) -> dict:
    import jax

    from benchmarks.shapes import SHAPES

    dev = jax.devices()[0]
    stats = dev.memory_stats() or {}
    return {
        "device": dev.device_kind,
        "platform": dev.platform,
        "jax": jax.__version__,
        "jaxlib": importlib.metadata.version("jaxlib"),
        "python": platform.python_version(),
        "shape": args.shape,
        "config": SHAPES[args.shape],
        "dtype": "bfloat16",
        "bytes_limit_gib": stats.get("bytes_limit", 0) / 2**30 or None,
        "mem_fraction_env": os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION"),
        "cache_tokens": f"T + {CACHE_MARGIN}",
        "reps": args.reps,
        "warmup": args.warmup,
        "decode_steps": args.decode_steps,
    }


def drive(args, lengths: list[int], modes: list[str]) -> list[dict]:
    """One child process per length (or per (length, mode)), within ``--max-seconds``. This
    process never touches the accelerator (it would hold memory its children need)."""
    rows: list[dict] = []
    start = time.perf_counter()
    done: list[tuple[int, float]] = []  # (tokens, seconds) of each finished length
    env = dict(os.environ)
    env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
    env.setdefault("PYTHONPATH", os.getcwd())
    if args.hf:  # first, in one process, while JAX holds nothing
        for row in run_hf(args, lengths, args.max_seconds):
            rows.append(row)
            print(row, flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for T in lengths:
            elapsed = time.perf_counter() - start
            guess = _predict_seconds(done, T)
            left = args.max_seconds - elapsed
            if guess > left:
                rows.append({"what": "skipped", "tokens": T, "reason": f"time guard: ~{guess:.0f} s"
                             f" predicted, {left:.0f} s left of --max-seconds"})  # fmt: skip
                print(rows[-1], flush=True)
                continue
            groups = [[m] for m in modes] if args.process_per_mode else [modes]
            t0 = time.perf_counter()
            for i, group in enumerate(groups):
                path = os.path.join(tmp, f"rows_{T}_{i}.jsonl")
                cmd = _child_cmd(args, T, group, path, decode=i == 0, router=i == 0)
                remaining = max(1.0, args.max_seconds - (time.perf_counter() - start))
                try:
                    proc = subprocess.run(cmd, env=env, timeout=remaining)
                    status = proc.returncode
                except subprocess.TimeoutExpired:
                    status = "timeout"
                got = _read_rows(path)
                rows += got
                if status != 0:
                    rows.append({"what": "child_failed", "tokens": T, "modes": group,
                                 "status": status, "rows_kept": len(got)})  # fmt: skip
                    print(rows[-1], flush=True)
            done.append((T, time.perf_counter() - t0))
    return rows


def _predict_seconds(done: list[tuple[int, float]], T: int) -> float:
    """Seconds the next length will take: the growth per doubling of the last two lengths
    (clamped to [1, 4]: fixed costs up to attention's T^2), x2 per doubling after one length."""
    if not done:
        return 0.0
    t_last, s_last = done[-1]
    growth = 2.0
    if len(done) > 1:
        t_prev, s_prev = done[-2]
        growth = (s_last / max(s_prev, 1e-9)) ** (1 / math.log2(t_last / t_prev))
        growth = min(4.0, max(1.0, growth))
    return s_last * growth ** math.log2(T / t_last)


def print_table(result: dict) -> None:
    meta = result["meta"]
    print(f"\n{meta.get('device')}  jax {meta.get('jax')}  Qwen3-{meta.get('shape')} shape, bf16")
    print(f"{'tokens':>7} {'mode':16} {'prefill s':>10} {'kept':>6} {'peak GiB':>9} "
          f"{'pred GiB':>9} {'pred run':>9}")  # fmt: skip
    for r in result["rows"]:
        if r["what"] == "prefill" and "skipped" not in r:
            peak = "-" if r.get("peak_gib") is None else f"{r['peak_gib']:.1f}"
            print(f"{r['tokens']:>7} {r['mode']:16} {r['s']:>10.3f} {r['kept_fraction']:>6.3f} "
                  f"{peak:>9} {r['pred_gib']:>9.1f} {r['pred_running_gib']:>9.1f}")  # fmt: skip
        elif r["what"] == "prefill":
            print(f"{r['tokens']:>7} {r['mode']:16} skipped: {r['skipped']}")
        elif r["what"] == "hf_prefill":
            if "skipped" in r:
                print(f"{r['tokens']:>7} {'HF transformers':16} skipped: {r['skipped']}")
                continue
            dense = next((d for d in result["rows"] if d["what"] == "prefill"
                          and d.get("mode") == "dense" and d["tokens"] == r["tokens"]
                          and "s" in d), None)  # fmt: skip
            ratio = f"  (HF / ours dense {r['s'] / dense['s']:.2f}x)" if dense else ""
            peak = "-" if r.get("peak_gib") is None else f"{r['peak_gib']:.1f}"
            print(f"{r['tokens']:>7} {'HF transformers':16} {r['s']:>10.3f} {1.0:>6.3f} "
                  f"{peak:>9}{ratio}")  # fmt: skip
        elif r["what"] == "router":
            print(f"{r['tokens']:>7} {'router/layer':16} {r['ms_per_layer']:>8.3f} ms")
        elif r["what"] == "decode":
            print(f"{r['tokens']:>7} {'decode step':16} {r['ms']:>8.3f} ms  (batch 1)")
        else:
            print(r)


def print_predictions(shape: str, lengths: list[int], modes: list[str]) -> dict:
    table = {T: predict(shape, modes, T) for T in lengths}
    print(f"Predicted peak GiB, Qwen3-{shape} shape, batch 1, cache T + {CACHE_MARGIN}")
    print(f"{'tokens':>7} " + " ".join(f"{m:>16}" for m in modes) + f" {'decode':>8}")
    for T, p in table.items():
        cells = " ".join(f"{p[m]['prefill_gib']:>16.1f}" for m in modes)
        print(f"{T:>7} {cells} {p[modes[0]]['decode_gib']:>8.1f}")
    return {str(T): p for T, p in table.items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="8b")
    p.add_argument("--lengths", default="8192,16384,32768,65536,131072,262144")
    p.add_argument("--modes", default=DEFAULT_MODES)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument(
        "--warmup",
        default="auto",
        choices=("auto", "run", "compile"),
        help="prefill warm-up: one untimed call (run), ahead-of-time compile only (compile), "
        f"or run below {AOT_FROM_TOKENS} tokens and compile from there (auto)",
    )
    p.add_argument("--decode-steps", type=int, default=10, help="0: no decode rows")
    p.add_argument("--no-router", dest="router", action="store_false")
    p.add_argument(
        "--hf",
        action="store_true",
        help="also HF transformers prefill (SDPA) at each length, in one process first; "
        "after an out-of-memory, longer lengths are not tried",
    )
    p.add_argument("--hf-reps", type=int, default=1)
    p.add_argument("--hf-device", default="cuda")
    p.add_argument("--no-fit-check", action="store_true")
    p.add_argument("--process-per-mode", action="store_true")
    p.add_argument("--in-process", action="store_true", help="no subprocesses (smoke tests)")
    p.add_argument("--max-seconds", type=float, default=560.0)
    p.add_argument("--predict", action="store_true", help="memory model only, no device work")
    p.add_argument("--out", default=None)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--rows", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    lengths = sorted(int(x) for x in args.lengths.split(",") if x)
    modes = [m for m in args.modes.split(",") if m]
    for m in modes:
        parse_mode(m)  # unknown modes fail here, before any work
    if args.hf and args.in_process:
        raise ValueError("--hf runs HF in a child process: not with --in-process")
    if args.child:
        run_length(args, lengths[0], modes, args.rows)
        return None
    result = {"predicted": print_predictions(args.shape, lengths, modes)}
    if not args.predict:
        if args.in_process:
            with tempfile.TemporaryDirectory() as tmp:
                path = os.path.join(tmp, "rows.jsonl")
                for T in lengths:
                    run_length(args, T, modes, path)
                rows = _read_rows(path)
        else:
            rows = drive(args, lengths, modes)
        metas = [r for r in rows if r["what"] == "meta"]
        result = {
            "meta": {k: v for k, v in metas[0].items() if k != "what"} if metas else {},
            **result,
            "rows": [r for r in rows if r["what"] != "meta"],
        }
        print_table(result)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
