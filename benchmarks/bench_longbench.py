"""LongBench harness throughput (issue 5): samples/min of ``run_longbench`` dense vs elastic on a
Qwen3-shaped PawQwen3 with random bf16 weights, over synthetic long-context fixtures.

    PYTHONPATH=. JAX_PLATFORMS=cuda python3 benchmarks/bench_longbench.py --shape 4b \
        --out $OUT/longbench_4b.json

Defaults: 6 LongBench-E tasks (qasper 128, multifieldqa_en 64, hotpotqa 32, gov_report 512, trec
64, lcc 64 new tokens) x 3 lengths (8K, 16K, 32K buckets) x 1 sample = 18 samples per mode. The
start-up estimate for the 4b shape on one H100 is ~39 s per timed pass, ~100 s per warm-up
(compile time guessed at 30 s per shape and mode), ~320 s in all (``--per-length 2``: ~415 s);
it is printed at start, the measured warm-up time beside it.

What runs: an in-memory ``elastic_jax.loader.Model`` (``make_config(shape, ROUTER_ELASTIC[router])``,
``init_random`` params, router with fixed random weights), a small byte-level BPE tokenizer
(``elastic_jax.testing.tiny.build_tokenizer``, built locally -- nothing is downloaded; its ids are
all < the model's vocab), and LongBench-E-format fixtures from
``elastic_jax.longbench.synthetic.make_synthetic_data`` measured with that tokenizer. Then, per
attention mode, ``run_longbench(model.with_runtime(attention_mode=mode), ...)`` -- prompt
building, chat template, generate (prefill + greedy decode), one jsonl record per sample -- is
timed end to end (wall clock around the call; the scoring/report step is off: its metric packages
are not on the device and scores of random weights mean nothing).

Prompt lengths: ``--lengths`` are prefill buckets (``engine.prompt_bucket``). Fixtures aim under
each by the longest generation of the task set plus ~3% (``fixture_target``), so that the templated
prompt pads to exactly that bucket and prompt + generation fits a cache of the same size: one
(prompt bucket, cache capacity) shape per length, hence one prefill and one decode compilation per
length and mode. Every prompt's bucket and capacity is checked before anything runs (a note, not
an error, if one lands elsewhere: it is then timed in its own shape, warmed up like the rest).

No compilation in the timed pass. Compiled shapes are fixed by (prompt bucket T, batch bucket,
cache capacity bucket of prompt + max_new_tokens, RuntimeConfig). The warm-up runs the very same
fixture files through the very same ``run_longbench`` call (same tasks, hence same per-task
max_new_tokens and ``--max-new-tokens-cap``, same model and runtime) into a throwaway output dir;
only its generate function differs: it drives ``generate_iter`` and stops after the second token,
by which time ``prefill_step``, ``sample_step`` and ``decode_sample_step`` (and the eager ops of
the host loop) have compiled for every (T, capacity) the timed pass will meet. Capacity is
computed from the requested max_new_tokens before the loop, so stopping early does not change
it. The timed pass then writes to a fresh dir. ``jax.monitoring``'s backend-compile events are
counted during each timed pass and reported (``compiles`` column; expected 0).

Random weights never emit EOS reliably, so generation usually runs to each task's max-gen length
(the harness's real decode work); read samples/min together with the generated-token column.

Budget: ``--budget-s`` (default 540) bounds the whole run; a generate call is not started past
the deadline (the pass stops, its completed samples are reported, ``over_budget`` is set). The
JSON is rewritten after every pass, so an interrupted run still leaves its numbers.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax

from benchmarks.bench_engine import ROUTER_ELASTIC
from benchmarks.bench_model import make_config
from benchmarks.shapes import SHAPES
from elastic_jax import engine
from elastic_jax.config import RuntimeConfig
from elastic_jax.generate import GenerationResult, generate, generate_iter
from elastic_jax.loader import Model
from elastic_jax.longbench.dataset import load_task_data, read_predictions
from elastic_jax.longbench.prompts import build_prompt
from elastic_jax.longbench.runner import default_max_length, run_longbench
from elastic_jax.longbench.synthetic import make_synthetic_data
from elastic_jax.longbench.tasks import TaskRun, resolve_tasks
from elastic_jax.params import init_random
from elastic_jax.tokenizer import Tokenizer

MODES = ("dense", "elastic")
# LongBench-E tasks with short and long generation: 128, 64, 32, 512, 64, 64 new tokens.
DEFAULT_TASKS = "qasper_e,multifieldqa_en_e,hotpotqa_e,gov_report_e,trec_e,lcc_e"
TOKENIZER_VOCAB = 512  # small byte-level BPE: builds in ~1 s, ids < any benchmark shape's vocab
WARMUP_TOKENS = 2  # the 2nd token is read after the first decode step was compiled and run
BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"

# Cost model for the start-up estimate: Qwen3-4B shape on one H100 (BENCHMARKS.md, Qwen3-4B shape;
# results/qwen3_4b_h100.json: dense prefill 0.145 s at 8K, 1.006 s at 32K; decode 10.9 ms/token at 8K,
# batch 1), scaled by parameter count for other shapes. Compile time (prefill + decode step) per
# (prompt bucket, capacity) shape and mode is a guess.
_PREFILL_S_PER_TOKEN = 1.34e-5
_PREFILL_S_PER_TOKEN2 = 5.3e-10
_DECODE_S_PER_STEP = 0.0105
_DECODE_S_PER_CONTEXT_TOKEN = 5e-8
_COMPILE_S_PER_SHAPE_GUESS = 30.0
_SETUP_S_GUESS = 40.0


class OverBudget(RuntimeError):
    """Raised by the generate wrappers when the run's deadline has passed."""


@dataclasses.dataclass(eq=False)  # identity equality: unregistering removes this instance
class CompileCounter:
    """Counts XLA backend compilations (all of them: jitted steps and eager ops) while active."""

    count: int = 0
    seconds: float = 0.0

    def __call__(self, event: str, duration_secs: float, **kwargs: Any) -> None:
        if event == BACKEND_COMPILE_EVENT:
            self.count += 1
            self.seconds += duration_secs

    def __enter__(self) -> CompileCounter:
        jax.monitoring.register_event_duration_secs_listener(self)
        return self

    def __exit__(self, *exc) -> None:
        jax.monitoring.unregister_event_duration_listener(self)


# ----------------------------------------------------------------------------- setup


def make_tokenizer(directory: Path, model_vocab: int) -> Tokenizer:
    """Write a byte-level BPE tokenizer (Qwen3 special tokens + chat template) to ``directory``
    and load it with ``elastic_jax.tokenizer.Tokenizer``. Built locally; nothing is downloaded."""
    from elastic_jax.testing.tiny import build_tokenizer

    vocab = min(TOKENIZER_VOCAB, model_vocab)
    if vocab < 300:
        raise ValueError(f"model vocab_size={model_vocab} < 300: too small for the tokenizer")
    build_tokenizer(vocab).save_pretrained(str(directory))
    tok = Tokenizer(directory)
    if tok.vocab_size > model_vocab:
        raise ValueError(f"tokenizer has {tok.vocab_size} ids, model vocab is {model_vocab}")
    return tok


def build_model(shape: str, router: str, tokenizer: Tokenizer, seed: int = 0) -> Model:
    """PawQwen3 of ``SHAPES[shape]`` with random bf16 weights (router included)."""
    if router not in ROUTER_ELASTIC:
        raise ValueError(f"router={router!r}; allowed: {sorted(ROUTER_ELASTIC)}")
    cfg = make_config(shape, ROUTER_ELASTIC[router])
    params = jax.jit(init_random, static_argnums=0)(cfg, jax.random.PRNGKey(seed))
    jax.block_until_ready(params)
    return Model(cfg, params, tokenizer, RuntimeConfig(attention_mode="elastic"))


def fixture_target(bucket: int, max_new_tokens: int) -> int:
    """Prompt length the fixtures aim at for a bucket: room for the longest generation, plus ~3%
    for the synthetic generator's tolerance (1% or a sentence) and the chat template's tokens."""
    target = bucket - max_new_tokens - max(64, math.ceil(0.03 * bucket))
    if target < 64:
        raise ValueError(
            f"length {bucket} leaves no room for prompts after max_new_tokens={max_new_tokens}; "
            "pass longer --lengths or a --max-new-tokens-cap"
        )
    return target


def write_fixtures(
    data_dir: Path,
    tasks: str,
    buckets: Sequence[int],
    per_length: int,
    tok: Tokenizer,
    max_new_tokens: int,
) -> dict[int, int]:
    """Synthetic LongBench files in ``data_dir``; returns {fixture target: bucket}."""
    targets = {fixture_target(b, max_new_tokens): b for b in buckets}
    make_synthetic_data(
        data_dir, tasks=tasks, lengths=list(targets), per_length=per_length, tokenizer=tok
    )
    return targets


def prompt_table(
    model: Model,
    data_dir: Path,
    runs: Sequence[TaskRun],
    targets: dict[int, int],
    cap: int | None,
) -> list[dict]:
    """Per sample: task, nominal bucket, templated prompt tokens, the prompt bucket it pads to
    and its cache capacity bucket (the prompts exactly as run_longbench builds them)."""
    max_length = default_max_length(model)
    rows = []
    for run in runs:
        for s in load_task_data(data_dir, run):
            p = build_prompt(run.spec, s, model.tokenizer, max_length=max_length)
            n = len(p.token_ids)
            m = _capped(run.spec.max_new_tokens, 0, cap)[0]
            rows.append(
                {
                    "task": run.key,
                    "_id": s["_id"],
                    "nominal": targets[_target_of(s["_id"])],
                    "prompt_tokens": n,
                    "bucket": engine.prompt_bucket_for(n, model.runtime),
                    "max_new_tokens": m,
                    "capacity": engine.capacity_bucket(n + m, model.runtime.page_size),
                }
            )
    return rows


def _target_of(sample_id: str) -> int:
    # synthetic ids are f"{task_key}-{target}-{i}"; task keys may contain "-" (repobench-p).
    return int(sample_id.rsplit("-", 2)[1])


# ----------------------------------------------------------------------------- estimate


def _num_params(shape: str) -> float:
    s = SHAPES[shape]
    E, F = s["hidden_size"], s["intermediate_size"]
    H, K, D = s["num_heads"], s["num_kv_heads"], s["head_dim"]
    per_layer = E * (H * D + 2 * K * D) + H * D * E + 3 * E * F
    return s["vocab_size"] * E + s["num_layers"] * per_layer


def estimate_seconds(shape: str, prompts: Sequence[dict]) -> dict[str, float]:
    """Expected seconds on one H100 (4B-shape constants scaled by parameter count)."""
    scale = _num_params(shape) / _num_params("4b")

    def prefill(T):
        return scale * (_PREFILL_S_PER_TOKEN * T + _PREFILL_S_PER_TOKEN2 * T * T)

    def decode(T, n):
        return scale * n * (_DECODE_S_PER_STEP + _DECODE_S_PER_CONTEXT_TOKEN * T)

    timed = warm = 0.0
    for p in prompts:
        n = p["max_new_tokens"]
        timed += prefill(p["bucket"]) + decode(p["bucket"], n)
        warm += prefill(p["bucket"]) + decode(p["bucket"], WARMUP_TOKENS)
    compiles = len({(p["bucket"], p["capacity"]) for p in prompts}) * _COMPILE_S_PER_SHAPE_GUESS
    per_mode = timed + warm + compiles
    return {
        "timed_pass_s": timed,
        "warmup_s": warm + compiles,
        "total_s": _SETUP_S_GUESS + len(MODES) * per_mode,
    }


# ----------------------------------------------------------------------------- generate wrappers


def _check_deadline(deadline: float) -> None:
    if time.perf_counter() > deadline:
        raise OverBudget("time budget spent")


def _capped(max_new_tokens: int, min_new_tokens: int, cap: int | None) -> tuple[int, int]:
    if cap is None:
        return max_new_tokens, min_new_tokens
    return min(max_new_tokens, cap), min(min_new_tokens, cap)


def timed_generate(cap: int | None, deadline: float):
    """``generate`` with the new-token cap and the deadline check (run_longbench's generate_fn)."""

    def fn(model, prompts, *, max_new_tokens, min_new_tokens=0, **kwargs):
        _check_deadline(deadline)
        m, mn = _capped(max_new_tokens, min_new_tokens, cap)
        return generate(model, prompts, max_new_tokens=m, min_new_tokens=mn, **kwargs)

    return fn


def warmup_generate(cap: int | None, deadline: float):
    """Same shapes as ``timed_generate`` (same budgets, hence the same cache capacity) but stops
    after WARMUP_TOKENS tokens: prefill, first-token sampling and one decode step all compile."""

    def fn(model, prompts, *, max_new_tokens, min_new_tokens=0, **kwargs):
        _check_deadline(deadline)
        m, mn = _capped(max_new_tokens, min_new_tokens, cap)
        it = generate_iter(model, prompts, max_new_tokens=m, min_new_tokens=mn, **kwargs)
        ids: list[list[int]] = [[] for _ in prompts]
        try:
            for event in it:
                ids[event.request].append(event.token_id)
                if event.step + 1 >= WARMUP_TOKENS:
                    break
        finally:
            it.close()
        return GenerationResult(ids, [""] * len(prompts), timings=[], prefill_info=None)

    return fn


# ----------------------------------------------------------------------------- one pass


def run_pass(
    model: Model,
    mode: str,
    data_dir: Path,
    tasks: str,
    out_dir: Path,
    generate_fn,
) -> dict:
    """One ``run_longbench`` call for ``mode``; returns wall seconds, compile count, records
    and whether the deadline stopped it."""
    over = False
    with CompileCounter() as cc:
        t0 = time.perf_counter()
        try:
            run_longbench(
                model.with_runtime(attention_mode=mode),
                data_dir,
                tasks,
                out_dir,
                attention_modes=mode,
                generate_fn=generate_fn,
                progress=False,
                write_report=False,
            )
        except OverBudget:
            over = True
        wall = time.perf_counter() - t0
    records = [r for p in sorted((out_dir / mode).glob("*.jsonl")) for r in read_predictions(p)]
    return {
        "wall_s": wall,
        "compiles": cc.count,
        "compile_s": cc.seconds,
        "over_budget": over,
        "records": records,
    }


def _mean(xs: Sequence[float | None]) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.fmean(xs) if xs else None


def summarize(mode: str, records: Sequence[dict], wall_s: float, targets: dict[int, int]) -> dict:
    """Throughput row of one timed pass (per-sample fields as run_longbench writes them)."""
    n = len(records)
    pre = [r["prefill_ms"] / 1e3 for r in records if r.get("prefill_ms") is not None]
    dec = [r["decode_ms"] / 1e3 for r in records if r.get("decode_ms") is not None]
    gen = sum(r["new_tokens"] for r in records)
    sparsity = _mean([r.get("sparsity") for r in records])
    by_len = {}
    for b in sorted(set(targets.values())):
        rs = [r for r in records if targets[_target_of(r["_id"])] == b]
        if rs:
            by_len[str(b)] = {
                "samples": len(rs),
                "prompt_tokens": _mean([r["prompt_tokens"] for r in rs]),
                "prefill_s": _mean([r["prefill_ms"] / 1e3 for r in rs]),
                "decode_s": _mean([r["decode_ms"] / 1e3 for r in rs]),
                "new_tokens": sum(r["new_tokens"] for r in rs),
                "sparsity": _mean([r.get("sparsity") for r in rs]),
            }
    return {
        "mode": mode,
        "samples": n,
        "wall_s": wall_s,
        "samples_per_min": 60.0 * n / wall_s if n and wall_s > 0 else 0.0,
        "prefill_s_mean": _mean(pre),
        "decode_s_mean": _mean(dec),
        "prefill_s_total": sum(pre),
        "decode_s_total": sum(dec),
        # prompt building, tokenization, host loop, jsonl writes: wall minus generate's timers
        "other_s": wall_s - sum(pre) - sum(dec),
        "generated_tokens": gen,
        "decode_tok_per_s": gen / sum(dec) if sum(dec) > 0 else None,
        "prompt_tokens_mean": _mean([r["prompt_tokens"] for r in records]),
        "sparsity_mean": sparsity,
        "kept_fraction_mean": None if sparsity is None else 1.0 - sparsity,
        "sparse_head_fraction_mean": _mean(
            [(r.get("prefill_info") or {}).get("sparse_head_fraction") for r in records]
        ),
        "by_length": by_len,
    }


def _fmt(x, nd=2) -> str:
    return "-" if x is None else f"{x:.{nd}f}"


def print_tables(result: dict) -> None:
    meta = result["meta"]
    print(
        f"\n{meta['device']}  jax {meta['jax']}  Qwen3-{meta['shape']} shape PawQwen3 "
        f"(router {meta['router']}), bf16 random weights; {meta['samples_per_mode']} samples/mode "
        f"= {len(meta['tasks'])} tasks x {len(meta['lengths'])} lengths x {meta['per_length']}",
        flush=True,
    )
    hdr = (
        f"{'mode':8} {'samples':>7} {'wall s':>8} {'samp/min':>9} {'prefill s':>9} "
        f"{'decode s':>9} {'other s':>8} {'gen tok':>8} {'dec tok/s':>9} {'sparsity':>8} "
        f"{'kept':>6} {'compiles':>8}"
    )
    print(hdr)
    for r in result["rows"]:
        print(
            f"{r['mode']:8} {r['samples']:>7} {r['wall_s']:>8.1f} {r['samples_per_min']:>9.2f} "
            f"{_fmt(r['prefill_s_mean'], 3):>9} {_fmt(r['decode_s_mean'], 3):>9} "
            f"{r['other_s']:>8.1f} {r['generated_tokens']:>8} {_fmt(r['decode_tok_per_s'], 1):>9} "
            f"{_fmt(r['sparsity_mean'], 3):>8} {_fmt(r['kept_fraction_mean'], 3):>6} "
            f"{r['compiles']:>8}",
            flush=True,
        )
    print("(prefill s / decode s: means per sample; other s: wall - all prefill - all decode)")
    print(
        f"\n{'mode':8} {'bucket':>7} {'samples':>7} {'prompt tok':>10} {'prefill s':>9} "
        f"{'decode s':>9} {'gen tok':>8} {'sparsity':>8}"
    )
    for r in result["rows"]:
        for b, x in r["by_length"].items():
            print(
                f"{r['mode']:8} {b:>7} {x['samples']:>7} {x['prompt_tokens']:>10.0f} "
                f"{_fmt(x['prefill_s'], 3):>9} {_fmt(x['decode_s'], 3):>9} {x['new_tokens']:>8} "
                f"{_fmt(x['sparsity'], 3):>8}",
                flush=True,
            )
    if result.get("ratio_elastic_over_dense_samples_per_min") is not None:
        print(
            "\nelastic / dense samples/min: "
            f"{result['ratio_elastic_over_dense_samples_per_min']:.3f}; prefill time: "
            f"{_fmt(result.get('ratio_dense_over_elastic_prefill_s'), 3)}x faster elastic",
            flush=True,
        )
    for note in result["notes"]:
        print("NOTE:", note, flush=True)


# ----------------------------------------------------------------------------- main


def _parse_ints(text: str, name: str) -> list[int]:
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{name}={text!r}: expected a comma list of integers") from None
    if not vals or min(vals) < 128:
        raise ValueError(f"{name}={text!r}: need at least one length, each >= 128")
    return vals


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="4b", choices=sorted(SHAPES))
    p.add_argument("--router", default="full+xattn", choices=sorted(ROUTER_ELASTIC))
    p.add_argument("--lengths", default="8192,16384,32768", help="prompt-length buckets")
    p.add_argument("--per-length", type=int, default=1, help="samples per task and length")
    p.add_argument("--tasks", default=DEFAULT_TASKS)
    p.add_argument("--modes", default="dense,elastic")
    p.add_argument(
        "--max-new-tokens-cap", type=int, default=None, help="cap on each task's max-gen length"
    )
    p.add_argument("--budget-s", type=float, default=540.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work-dir", default=None, help="keep tokenizer/fixtures/predictions here")
    p.add_argument("--out", default=None, help="JSON output path")
    args = p.parse_args(argv)
    args.lengths = _parse_ints(args.lengths, "--lengths")
    args.modes = [m for m in args.modes.split(",") if m]
    bad = [m for m in args.modes if m not in MODES]
    if bad or not args.modes:
        raise ValueError(f"--modes={args.modes}: allowed {MODES}")
    if args.per_length < 1:
        raise ValueError(f"--per-length={args.per_length} must be >= 1")
    if args.max_new_tokens_cap is not None and args.max_new_tokens_cap < 1:
        raise ValueError(f"--max-new-tokens-cap={args.max_new_tokens_cap} must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    runs = resolve_tasks(args.tasks)  # fails fast on an unknown task
    t_start = time.perf_counter()
    deadline = t_start + args.budget_s
    with tempfile.TemporaryDirectory(prefix="bench_longbench_") as tmp:
        work = Path(args.work_dir or tmp)
        return _run(args, runs, work, t_start, deadline)


def _run(args, runs, work: Path, t_start: float, deadline: float) -> dict:
    dev = jax.devices()[0]
    work.mkdir(parents=True, exist_ok=True)
    tok_dir, data_dir = work / "tokenizer", work / "data"
    for stale in ("warmup", "timed"):  # run_longbench would resume (skip) finished samples
        shutil.rmtree(work / stale, ignore_errors=True)
    tok_dir.mkdir(exist_ok=True)
    tok = make_tokenizer(tok_dir, SHAPES[args.shape]["vocab_size"])
    print(f"[{time.perf_counter() - t_start:6.1f}s] building {args.shape} model", flush=True)
    model = build_model(args.shape, args.router, tok, args.seed)
    longest = max(_capped(r.spec.max_new_tokens, 0, args.max_new_tokens_cap)[0] for r in runs)
    targets = write_fixtures(data_dir, args.tasks, args.lengths, args.per_length, tok, longest)
    prompts = prompt_table(model, data_dir, runs, targets, args.max_new_tokens_cap)
    notes = []
    off = [p for p in prompts if not p["bucket"] == p["capacity"] == p["nominal"]]
    if off:
        notes.append(
            f"{len(off)} prompt(s) pad to another prompt bucket or cache capacity than their "
            "nominal length: "
            + ", ".join(
                f"{p['_id']}: {p['prompt_tokens']} tokens -> bucket {p['bucket']}, capacity "
                f"{p['capacity']}"
                for p in off[:5]
            )
        )
    for note in notes:
        print("NOTE:", note, flush=True)
    shapes = sorted({(p["bucket"], p["capacity"]) for p in prompts})
    est = estimate_seconds(args.shape, prompts)
    print(
        f"[{time.perf_counter() - t_start:6.1f}s] {len(prompts)} samples/mode, prompt tokens "
        f"{min(p['prompt_tokens'] for p in prompts)}-{max(p['prompt_tokens'] for p in prompts)}, "
        f"(prompt bucket, capacity) shapes {shapes}. H100 estimate (4B constants scaled by "
        f"params; compile guessed): timed pass {est['timed_pass_s']:.0f} s/mode, warm-up "
        f"{est['warmup_s']:.0f} s/mode, total {est['total_s']:.0f} s (budget {args.budget_s:.0f} s)",
        flush=True,
    )
    result: dict[str, Any] = {
        "meta": {
            "device": dev.device_kind,
            "platform": dev.platform,
            "jax": jax.__version__,
            "shape": args.shape,
            "config": SHAPES[args.shape],
            "dtype": "bfloat16",
            "router": args.router,
            "elastic_config": ROUTER_ELASTIC[args.router],
            "lengths": args.lengths,
            "fixture_targets": sorted(targets),
            "per_length": args.per_length,
            "tasks": [r.key for r in runs],
            "max_new_tokens": {r.key: r.spec.max_new_tokens for r in runs},
            "max_new_tokens_cap": args.max_new_tokens_cap,
            "samples_per_mode": len(prompts),
            "budget_s": args.budget_s,
            "estimate_s": est,
            "argv": args.argv,
        },
        "prompts": prompts,
        "rows": [],
        "warmup": {},
        "notes": notes,
    }
    gen_timed = timed_generate(args.max_new_tokens_cap, deadline)
    gen_warm = warmup_generate(args.max_new_tokens_cap, deadline)
    for mode in args.modes:
        if time.perf_counter() > deadline:
            notes.append(f"{mode}: skipped, time budget spent")
            break
        print(f"[{time.perf_counter() - t_start:6.1f}s] {mode}: warm-up pass", flush=True)
        w = run_pass(model, mode, data_dir, args.tasks, work / "warmup", gen_warm)
        result["warmup"][mode] = {k: w[k] for k in ("wall_s", "compiles", "compile_s")}
        print(
            f"[{time.perf_counter() - t_start:6.1f}s] {mode}: warm-up {w['wall_s']:.1f} s, "
            f"{w['compiles']} compiles ({w['compile_s']:.1f} s)",
            flush=True,
        )
        if w["over_budget"]:
            notes.append(f"{mode}: warm-up stopped by the time budget; no timed pass")
            break
        t = run_pass(model, mode, data_dir, args.tasks, work / "timed", gen_timed)
        row = summarize(mode, t["records"], t["wall_s"], targets)
        row.update(compiles=t["compiles"], compile_s=t["compile_s"], over_budget=t["over_budget"])
        result["rows"].append(row)
        print(
            f"[{time.perf_counter() - t_start:6.1f}s] {mode}: {row['samples']} samples in "
            f"{row['wall_s']:.1f} s = {row['samples_per_min']:.2f} samples/min, "
            f"{row['compiles']} compiles",
            flush=True,
        )
        if t["over_budget"]:
            notes.append(
                f"{mode}: timed pass stopped by the time budget after {row['samples']} of "
                f"{len(prompts)} samples"
            )
        if t["compiles"]:
            notes.append(f"{mode}: {t['compiles']} compilations inside the timed pass")
        _add_ratios(result)
        _write(result, args.out)
    result["meta"]["total_s"] = time.perf_counter() - t_start
    stats = dev.memory_stats() or {}
    result["meta"]["peak_bytes"] = stats.get("peak_bytes_in_use")
    _add_ratios(result)
    _write(result, args.out)
    print_tables(result)
    print(f"total {result['meta']['total_s']:.1f} s", flush=True)
    return result


def _add_ratios(result: dict) -> None:
    rows = {r["mode"]: r for r in result["rows"]}
    d, e = rows.get("dense"), rows.get("elastic")
    ok = d and e and d["samples"] and e["samples"]
    result["ratio_elastic_over_dense_samples_per_min"] = (
        e["samples_per_min"] / d["samples_per_min"] if ok else None
    )
    result["ratio_dense_over_elastic_prefill_s"] = (
        d["prefill_s_mean"] / e["prefill_s_mean"]
        if ok and d["prefill_s_mean"] and e["prefill_s_mean"]
        else None
    )


def _write(result: dict, path: str | None) -> None:
    if path:
        Path(path).write_text(json.dumps(result, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
