"""Continuous batching (issue 15): the serving engine against today's static path and HF
transformers on a LongBench-E-shaped workload, Qwen3-4B shape, random bf16 weights.

    PYTHONPATH=. python3 benchmarks/bench_serving.py --methods hf,engine-elastic,static-b1 \
        --out $OUT/serving_a.json
    PYTHONPATH=. python3 benchmarks/bench_serving.py --methods static-b8,engine-dense \
        --rows-from scratch/serving_a.json --out $OUT/serving_4b.json

(two calls on one machine, each under 10 minutes; the second adds the first's rows to its table
and ratios after checking workload and device; copy the first file into a carried folder).

Workload (seeded, ``make_workload``): ``--requests`` (200) requests, each a LongBench-E task drawn
uniformly from the 13 (its official max_new_tokens, ``dataset2maxlen``: 32 to 512) and a prompt
length drawn uniformly within one of the three LongBench-E length buckets, the buckets taken in
turn: 0-4K (from 2K), 4-8K and 8K-32K, with prompt + budget <= ``--max-prompt`` (32768; the bucket
edges scale with it: max/16, max/8, max/4, max). The 0-4K bucket starts at 2K so that it pads to
one prefill bucket (4096): five prefill buckets in all (4K, 8K, 16K, 24K, 32K), each compiled once
per mode before timing. Prompt ids are random. Random weights never stop early
(no stop ids), so every request runs its whole budget. All requests arrive at t=0 (an offline
batch, like a LongBench run), so queue wait is the time until a request's prefill starts.

Methods (one GPU; each JAX method in its own child process, ``--isolation process``, so none
inherits another's allocator state; compile excluded everywhere: each method first runs every
shape it will meet, and backend compilations during the timed part are counted, expected 0):
  engine elastic / dense  ``serving.Engine`` with ``--slots`` slots (8) on all requests. PawQwen3
                          with a router of fixed random weights (``full+xattn``); "dense" forces
                          every head dense (same weights).
  static b8               ``generate_static`` (today's path: one padded batch, every row waits for
                          the slowest) in batches of 8 consecutive requests of a subset of
                          ``--static-b8-requests`` (24), dense attention, scaled per request.
  static b1               ``generate_static`` one request at a time on a subset of
                          ``--static-b1-requests`` (24), dense, scaled per request.
                          Both static methods give every batch one cache capacity (the
                          largest any of their batches gets by default; work per step is
                          the same): with sizes varying per batch, batch 8 on an H100 failed
                          an 18 GiB cache allocation with 33 GiB free in pieces.
  hf b1                   transformers ``generate`` (SDPA, bf16 at construction, batch 1) on a
                          subset of ``--hf-requests`` (10), in a child process that runs before
                          JAX takes the GPU; skipped when torch/CUDA are missing. Not in the
                          default methods (time).
Subsets (``subset``) stand for the workload: each length bucket its share, mean prompt length and
mean budget within about 1% of the workload's; "scaled per request" means requests/min = k / wall
of the subset (their means are printed beside the workload's). Decode step time: the median wall
time of the engine's steps (elastic run) that admitted nothing with every slot busy (one step
behind, so it is the device step time), against the HBM-bound ideal (weights + the running
requests' K/V once per step at the copy bandwidth measured in the run).

Order: hf, engine elastic, static b8, static b1, engine dense (those asked); the JSON is rewritten
after each, so a run cut off keeps what it measured. Budget (H100, 4b defaults; measured with
in-process methods and the former 10-request static subsets: hf 54 s + start, engine elastic
73 s + 89 s warm-up, engine dense 82 s + 24 s, static b1 6 s + 90 s; estimated for the defaults:
hf ~2 min, engine elastic ~3 min, static b1 ~2 min, static b8 ~2.5 min, engine dense ~2 min).
Shrink with --requests, --max-prompt, --shape tiny (CPU smoke: tests/test_bench_serving.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.shapes import SHAPES, hf_config_kwargs

LONGBENCH_E_BUDGETS = {  # dataset2maxlen of the 13 LongBench-E tasks (LONGBENCH.md 1.1)
    "qasper": 128, "multifieldqa_en": 64, "hotpotqa": 32, "2wikimqa": 32, "gov_report": 512,
    "multi_news": 512, "trec": 64, "triviaqa": 32, "samsum": 128, "passage_count": 32,
    "passage_retrieval_en": 32, "lcc": 64, "repobench-p": 64,
}  # fmt: skip
HBM_BYTES_PER_S = {"H100": 3.35e12, "H200": 4.8e12}  # SXM peak
BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


@dataclasses.dataclass(frozen=True)
class Request:
    task: str
    bucket: str
    prompt: list[int]
    max_new_tokens: int


def longbench_e_budgets() -> dict[str, int]:
    """Per-task max_new_tokens from the package's dataset2maxlen (checked against the table)."""
    from elastic_jax.longbench.tasks import resolve_tasks

    got = {r.spec.name: r.spec.max_new_tokens for r in resolve_tasks("e")}
    if got != LONGBENCH_E_BUDGETS:
        raise ValueError(f"LongBench-E budgets changed: {got}")
    return got


def make_workload(
    n: int, max_prompt: int, vocab: int, seed: int = 0, max_new_cap: int | None = None
) -> list[Request]:
    """``n`` requests: task uniform over LongBench-E, length bucket in turn (0-4K, 4-8K, 8K+),
    length uniform in the bucket, prompt + budget <= max_prompt."""
    budgets = longbench_e_budgets()
    tasks = sorted(budgets)
    edges = [max_prompt // 16, max_prompt // 8, max_prompt // 4, max_prompt]
    names = [f"0-{edges[1]}", f"{edges[1]}-{edges[2]}", f"{edges[2]}+"]
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        task = tasks[int(rng.integers(len(tasks)))]
        m = budgets[task] if max_new_cap is None else min(budgets[task], max_new_cap)
        b = i % 3
        lo, hi = edges[b] + (b > 0), min(edges[b + 1], max_prompt - m)
        if hi <= lo:
            raise ValueError(f"--max-prompt {max_prompt} too small for budget {m}")
        length = int(rng.integers(lo, hi + 1))
        prompt = rng.integers(0, vocab, length).tolist()
        out.append(Request(task, names[b], prompt, m))
    return out


SUBSET_TRIALS = 4000


def subset(workload: list[Request], k: int, seed: int) -> list[Request]:
    """``k`` requests that stand for the workload: each length bucket gets its share of ``k``
    (largest remainder), and of ``SUBSET_TRIALS`` seeded draws the one whose mean prompt length
    and mean budget are closest (sum of relative errors) to the workload's is kept. A baseline
    timed on the subset and scaled per request is then timed on the same kind of work as the
    engine on the whole workload (the first-k of a permutation drew, at k=10, a mean budget of
    51 against the workload's 117, which flattered the static batch-1 path)."""
    if k >= len(workload):
        return list(workload)
    if k <= 0:
        return []
    names = _names(workload)
    members = {b: [i for i, r in enumerate(workload) if r.bucket == b] for b in names}
    exact = {b: k * len(members[b]) / len(workload) for b in names}
    share = {b: int(exact[b]) for b in names}
    for b in sorted(names, key=lambda b: exact[b] - share[b], reverse=True)[
        : k - sum(share.values())
    ]:
        share[b] += 1
    prompt = np.array([len(r.prompt) for r in workload], float)
    budget = np.array([r.max_new_tokens for r in workload], float)
    want_p, want_b = prompt.mean(), budget.mean()
    rng = np.random.default_rng(seed + 1)
    best, best_err = None, np.inf
    for _ in range(SUBSET_TRIALS):
        idx = np.concatenate(
            [rng.choice(members[b], share[b], replace=False) for b in names if share[b]]
        )
        err = abs(prompt[idx].mean() / want_p - 1) + abs(budget[idx].mean() / want_b - 1)
        if err < best_err:
            best, best_err = np.sort(idx), err
    return [workload[i] for i in best]


def describe(reqs: list[Request]) -> dict[str, float]:
    return {
        "requests": len(reqs),
        "mean_prompt": float(np.mean([len(r.prompt) for r in reqs])) if reqs else 0.0,
        "mean_budget": float(np.mean([r.max_new_tokens for r in reqs])) if reqs else 0.0,
        "output_tokens": int(sum(r.max_new_tokens for r in reqs)),
    }


def prefill_ceilings(by: dict[str, dict]) -> dict[str, float]:
    """Amdahl bound of each engine-vs-static ratio: the engine batches decode but runs every
    prompt's prefill, so it can never take less than its measured prefill time. The ceiling is
    the ratio the engine would reach if decode were free: the engine's requests per minute of
    prefill over the static method's requests per minute of wall time."""
    out = {}
    for eng_name in ("engine elastic", "engine dense"):
        eng = by.get(eng_name)
        if not eng or not eng.get("prefill_s_total"):
            continue
        prefill_only = 60.0 * eng["requests"] / eng["prefill_s_total"]
        for other in ("static b1", "static b8"):
            if other in by:
                out[f"{eng_name} / {other}"] = prefill_only / by[other]["requests_per_min"]
    return out


def summary(method: str, reqs, wall: float, queue_s: list[float], compiles: int, **extra):
    toks = sum(r.max_new_tokens for r in reqs)
    return {
        "method": method,
        **describe(reqs),
        "wall_s": wall,
        "requests_per_min": 60.0 * len(reqs) / wall,
        "output_tok_per_s": toks / wall,
        "queue_mean_s": float(np.mean(queue_s)) if queue_s else 0.0,
        "queue_max_s": float(np.max(queue_s)) if queue_s else 0.0,
        "compiles": compiles,
        **extra,
    }


# ----------------------------------------------------------------------------- HF (child)


def hf_worker(spec_path: str, out_path: str) -> None:
    """Child process: transformers generate, batch 1, SDPA, bf16, on each request of the spec."""
    spec = json.loads(Path(spec_path).read_text())
    result: dict[str, Any] = {"rows": []}
    try:
        import torch
        import transformers
        from transformers import Qwen3Config, Qwen3ForCausalLM
    except ImportError as e:
        result["skipped"] = f"torch/transformers not importable: {e}"
        Path(out_path).write_text(json.dumps(result))
        return
    dev = spec["device"]
    if dev.startswith("cuda") and not torch.cuda.is_available():
        result["skipped"] = "no CUDA device for torch"
        Path(out_path).write_text(json.dumps(result))
        return
    s = SHAPES[spec["shape"]]
    cfg = Qwen3Config(
        **hf_config_kwargs(s),
        max_position_embeddings=262144,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6},
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    with torch.device(dev):
        model = Qwen3ForCausalLM._from_config(cfg, dtype=torch.bfloat16).eval()

    def sync():
        if dev.startswith("cuda"):
            torch.cuda.synchronize()

    def gen(prompt, m):
        ids = torch.tensor([prompt], device=dev)
        return model.generate(
            ids, max_new_tokens=m, min_new_tokens=m, do_sample=False, eos_token_id=None,
            pad_token_id=0,
        )  # fmt: skip

    with torch.no_grad():
        gen(spec["requests"][0]["prompt"][:64], 4)  # warm-up (kernels, allocator)
        for r in spec["requests"]:
            sync()
            t0 = time.perf_counter()
            out = gen(r["prompt"], r["max_new_tokens"])
            sync()
            result["rows"].append(
                {
                    "prompt": len(r["prompt"]),
                    "new_tokens": int(out.shape[1]) - len(r["prompt"]),
                    "s": time.perf_counter() - t0,
                }
            )
    result["meta"] = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": torch.cuda.get_device_name() if dev.startswith("cuda") else dev,
    }
    Path(out_path).write_text(json.dumps(result))


def run_hf(shape: str, reqs: list[Request], device: str, timeout_s: float) -> dict:
    """transformers in a child process (before this process's JAX takes the GPU)."""
    if not reqs:
        return {"skipped": "no requests"}
    with tempfile.TemporaryDirectory() as tmp:
        spec, out = Path(tmp) / "spec.json", Path(tmp) / "out.json"
        spec.write_text(
            json.dumps(
                {
                    "shape": shape,
                    "device": device,
                    "requests": [
                        {"prompt": r.prompt, "max_new_tokens": r.max_new_tokens} for r in reqs
                    ],
                }
            )
        )
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(
                [sys.executable, "-m", "benchmarks.bench_serving", "--hf-worker", str(spec),
                 str(out)],
                timeout=timeout_s, capture_output=True, text=True,
                env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
            )  # fmt: skip
        except subprocess.TimeoutExpired:
            return {"skipped": f"HF child ran past {timeout_s:.0f} s"}
        if proc.returncode != 0 or not out.exists():
            return {"skipped": f"HF child failed (rc {proc.returncode}): {proc.stderr[-800:]}"}
        res = json.loads(out.read_text())
        res["child_wall_s"] = time.perf_counter() - t0
        return res


# ----------------------------------------------------------------------------- JAX side


@dataclasses.dataclass(eq=False)
class CompileCounter:
    count: int = 0

    def __call__(self, event: str, duration_secs: float, **kwargs: Any) -> None:
        if event == BACKEND_COMPILE_EVENT:
            self.count += 1

    def __enter__(self) -> CompileCounter:
        import jax

        jax.monitoring.register_event_duration_secs_listener(self)
        return self

    def __exit__(self, *exc) -> None:
        import jax

        jax.monitoring.unregister_event_duration_listener(self)


def build_model(
    shape: str,
    max_tokens: int,
    seed: int = 0,
    decode_num_splits: int | None = None,
    prompt_bucket_steps: int = 1,
    decode_norm: str = "xla",
):
    """PawQwen3 of ``SHAPES[shape]``, random bf16 weights, router with fixed random weights;
    ``decode_num_splits``: ``RuntimeConfig.decode_num_splits`` (None: the static paths use the
    table / heuristic, the engine ``ragged_num_splits``); ``prompt_bucket_steps``: the
    ``RuntimeConfig`` field of every method."""
    import jax

    from benchmarks.bench_engine import ROUTER_ELASTIC
    from benchmarks.bench_model import make_config
    from elastic_jax.config import RuntimeConfig
    from elastic_jax.loader import Model
    from elastic_jax.params import init_random

    cfg = make_config(shape, ROUTER_ELASTIC["full+xattn"])
    params = jax.jit(init_random, static_argnums=0)(cfg, jax.random.PRNGKey(seed))
    jax.block_until_ready(params)
    rt = RuntimeConfig(
        attention_mode="elastic",
        decode_num_splits=decode_num_splits,
        prompt_bucket_steps=prompt_bucket_steps,
        decode_norm=decode_norm,
    )
    return Model(cfg, params, None, rt, max_tokens)


def run_engine(model, reqs: list[Request], slots: int, pool_tokens: int | None, max_tokens: int):
    """Warm up (one request per prompt bucket), then all requests at t=0 through one Engine."""
    from elastic_jax import engine as buckets
    from elastic_jax.serving import Engine

    eng = Engine(model, slots, max_request_tokens=max_tokens, max_tokens_in_pool=pool_tokens)
    seen: dict[int, Request] = {}
    for r in reqs:
        seen.setdefault(buckets.prompt_bucket_for(len(r.prompt), model.runtime), r)
    t0 = time.perf_counter()
    for r in seen.values():
        eng.submit(r.prompt, 2)
    eng.run()
    eng.pop_results()
    warm_s = time.perf_counter() - t0
    steady: list[tuple[float, int]] = []
    with CompileCounter() as cc:
        t0 = time.perf_counter()
        ids = [eng.submit(r.prompt, r.max_new_tokens) for r in reqs]
        while not eng.idle:
            p0, full = eng.prefills, eng.num_running == slots
            ctx = eng.context_tokens
            ts = time.perf_counter()
            eng.step()
            dt = time.perf_counter() - ts
            if full and eng.prefills == p0 and eng.num_running == slots:
                steady.append((dt, ctx))
        wall = time.perf_counter() - t0
    res = eng.pop_results()
    out = [res[i] for i in ids]
    assert [len(o.token_ids) for o in out] == [r.max_new_tokens for r in reqs]
    queue = [o.timing.queue_ms / 1e3 for o in out]
    extra = {
        "warmup_s": warm_s,
        "prefill_s_total": sum(o.timing.prefill_ms for o in out) / 1e3,
        "decode_steps": eng.decode_steps,
        "mean_sparsity": float(np.mean([(o.prefill_info or {}).get("sparsity", 0.0) for o in out])),
    }
    return summary("engine", reqs, wall, queue, cc.count, **extra), steady


def _static_group_note(model, group: list[Request], phase: str, i: int, n: int, cap: int) -> str:
    """Which static batch failed and what the memory model predicted for it (the prompt bucket,
    batch bucket and cache capacity ``cap`` it ran with)."""
    from elastic_jax import engine, memory

    cfg, rt = model.config, model.runtime
    T = engine.prompt_bucket_for(max(len(r.prompt) for r in group), rt)
    B = engine.batch_bucket(len(group))
    est = memory.peak_estimate(cfg, rt, T, B, cap)
    return (
        f"{phase} batch {i + 1}/{n}: batch {B}, prompt bucket {T}, cache {cap} tokens/row, "
        f"predicted peak {est.total / 2**30:.1f} GiB ({est.phase}); "
        + _compiled_prefill_memory(model, T, B, cap)
    )


def _compiled_prefill_memory(model, T: int, B: int, cap: int) -> str:
    """XLA's own buffer sizes for that batch's prefill step (compiled from shapes, nothing
    allocated): a temp near one cache array's size means the step copies the cache instead of
    updating it in place."""
    import jax
    import jax.numpy as jnp

    from elastic_jax import engine, kv_cache

    cfg, rt = model.config, model.runtime
    cache = jax.eval_shape(lambda: kv_cache.create(cfg, B, cap, page_size=rt.page_size))
    tokens = jax.ShapeDtypeStruct((B, T), jnp.int32)
    lengths = jax.ShapeDtypeStruct((B,), jnp.int32)
    try:
        compiled = engine.prefill_step.lower(model.params, cache, tokens, lengths, cfg, rt)
        m = compiled.compile().memory_analysis()
    except Exception as e:  # a diagnostic must not hide the error it explains
        return f"compiled prefill: not analysed ({type(e).__name__})"
    if m is None:
        return "compiled prefill: no memory analysis on this backend"
    gib = 2.0**30
    return (
        f"compiled prefill: temp {m.temp_size_in_bytes / gib:.4g} GiB, aliased "
        f"{m.alias_size_in_bytes / gib:.4g} GiB, one cache array "
        f"{cache.k.size * cache.k.dtype.itemsize / gib:.4g} GiB"
    )


def run_static(model, reqs: list[Request], batch: int) -> dict:
    """Today's path: ``generate_static`` on consecutive batches of ``batch`` requests. An
    exception leaves with a note naming the batch it came from (``_static_group_note``)."""
    from elastic_jax.generate import _cache_capacity, generate_static, generate_static_iter

    groups = [reqs[i : i + batch] for i in range(0, len(reqs), batch)]
    # One cache size for every batch (the largest any batch gets by default): the allocator
    # reuses the last batch's blocks (varying sizes fragmented an 80 GB GPU at batch 8).
    capacity = max(
        _cache_capacity(model, [r.prompt for r in g], [r.max_new_tokens for r in g]) for g in groups
    )
    stage = ("warm-up", 0)  # (phase, batch index) for the note
    try:
        t0 = time.perf_counter()
        for i, g in enumerate(groups):  # warm-up: each batch's shapes (bucket, batch, capacity)
            stage = ("warm-up", i)
            it = generate_static_iter(
                model, [r.prompt for r in g], max_new_tokens=[r.max_new_tokens for r in g],
                stop_token_ids=[], cache_capacity=capacity,
            )  # fmt: skip
            for _ in range(2 * len(g)):
                if next(it, None) is None:
                    break
            it.close()
        warm_s = time.perf_counter() - t0
        queue = []
        prefill_s = 0.0
        with CompileCounter() as cc:
            t0 = time.perf_counter()
            for i, g in enumerate(groups):
                stage = ("timed", i)
                start = time.perf_counter() - t0
                res = generate_static(
                    model, [r.prompt for r in g], max_new_tokens=[r.max_new_tokens for r in g],
                    stop_token_ids=[], cache_capacity=capacity,
                )  # fmt: skip
                assert [len(t) for t in res.token_ids] == [r.max_new_tokens for r in g]
                queue += [start] * len(g)
                prefill_s += res.timings[0].prefill_ms / 1e3  # the whole batch's prefill
            wall = time.perf_counter() - t0
    except Exception as e:
        phase, i = stage
        e.add_note(_static_group_note(model, groups[i], phase, i, len(groups), capacity))
        raise
    return summary(
        f"static b{batch}", reqs, wall, queue, cc.count,
        warmup_s=warm_s, prefill_s_total=prefill_s, scaled=True, cache_capacity=capacity,
    )  # fmt: skip


def decode_ideal(model, steady: list[tuple[float, int]], hbm: float | None) -> dict:
    import jax

    if not steady:
        return {"steps": 0}
    cfg = model.config
    weight_bytes = sum(x.nbytes for x in jax.tree.leaves(model.params))
    kv_per_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 2  # k+v, bf16
    ms = statistics.median(dt for dt, _ in steady) * 1e3
    ctx = statistics.median(c for _, c in steady)
    out = {"steps": len(steady), "median_ms": ms, "median_context_tokens": ctx}
    if hbm:
        ideal = (weight_bytes + kv_per_token * ctx) / hbm * 1e3
        out.update(hbm_bytes_per_s=hbm, ideal_ms=ideal, fraction_of_ideal=ideal / ms)
    return out


METHODS = ("engine-elastic", "static-b8", "static-b1", "engine-dense")  # the product first


def _label(method: str) -> str:
    return method.replace("-", " ")


def _parse_methods(args) -> list[str]:
    if args.methods:
        names = [m.strip() for m in args.methods.split(",") if m.strip()]
    else:
        sections = set(args.sections.split(","))
        bad = sections - {"hf", "engine", "static"}
        if bad:
            raise ValueError(f"--sections: unknown {sorted(bad)}; allowed: hf, engine, static")
        names = [m for m in METHODS if m.split("-")[0] in sections]
        names = (["hf"] if "hf" in sections else []) + names
    bad = [m for m in names if m not in (*METHODS, "hf")]
    if bad:
        raise ValueError(f"--methods: unknown {bad}; allowed: hf, {', '.join(METHODS)}")
    order = ("hf", *METHODS)  # the documented order, whatever order they were asked in
    return sorted(dict.fromkeys(names), key=order.index)


def _workload_argv(args) -> list[str]:
    """The options that fix the workload and the methods' settings, for a child process."""
    out = ["--shape", args.shape, "--requests", str(args.requests)]
    out += ["--max-prompt", str(args.max_prompt), "--slots", str(args.slots)]
    out += ["--static-b8-requests", str(args.static_b8_requests)]
    out += ["--static-b1-requests", str(args.static_b1_requests), "--seed", str(args.seed)]
    for flag, value in (
        ("--max-new-cap", args.max_new_cap),
        ("--pool-tokens", args.pool_tokens),
        ("--hbm-gbps", args.hbm_gbps),
        ("--decode-num-splits", args.decode_num_splits),
        ("--prompt-bucket-steps", args.prompt_bucket_steps),
        ("--decode-norm", args.decode_norm),
    ):
        if value is not None:
            out += [flag, str(value)]
    return out


def run_method_child(args, method: str, copy_bw: float | None, tmp: str) -> dict:
    """One JAX method in its own process: it starts on an empty GPU (no allocator state left by
    the previous method: in one process the static batch-8 run after the engine ran out of
    memory at 53 GiB predicted of 75 available) and a crash loses only its own row."""
    out = Path(tmp) / f"{method}.json"
    cmd = [sys.executable, "-m", "benchmarks.bench_serving", *_workload_argv(args)]
    cmd += ["--methods", method, "--isolation", "none", "--out", str(out)]
    if copy_bw:
        cmd += ["--copy-bw-tb-s", repr(copy_bw / 1e12)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    try:
        proc = subprocess.run(
            cmd, timeout=args.method_timeout_s, stderr=subprocess.PIPE, text=True, env=env
        )
    except subprocess.TimeoutExpired:
        err = f"child ran past --method-timeout-s {args.method_timeout_s:.0f}"
        return {"rows": [{"method": _label(method), "error": err}]}
    if proc.returncode != 0 or not out.exists():
        tail = proc.stderr[-600:].strip()
        err = f"child failed (rc {proc.returncode}): {tail}"
        return {"rows": [{"method": _label(method), "error": err}]}
    return json.loads(out.read_text())


def _merge_rows_from(path: str, meta: dict, rows: list[dict], result: dict) -> None:
    """Rows (and the decode step) of an earlier --out of this benchmark on the same workload."""
    old = json.loads(Path(path).read_text())
    if old["meta"]["workload"] != meta["workload"] or old["meta"]["seed"] != meta["seed"]:
        raise ValueError(f"--rows-from {path}: measured on another workload (seed / sizes)")
    for key, default in (("prompt_bucket_steps", 1), ("decode_norm", "xla")):
        theirs, mine = (m.get(key, default) for m in (old["meta"], meta))
        if theirs != mine:
            raise ValueError(f"--rows-from {path}: measured with {key}={theirs}, not {mine}")
    for key in ("device", "hf"):
        if old["meta"].get(key) is not None:
            meta.setdefault(key, old["meta"][key])
    if meta.get("device") and old["meta"].get("device") not in (None, meta["device"]):
        raise ValueError(
            f"--rows-from {path}: measured on {old['meta']['device']}, not {meta['device']}"
        )
    have = {r["method"] for r in rows}
    rows += [r for r in old["rows"] if r["method"] not in have and "error" not in r]
    if old.get("decode_step") and not result.get("decode_step"):
        result["decode_step"] = old["decode_step"]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="4b", choices=sorted(SHAPES))
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--max-prompt", type=int, default=32768)
    p.add_argument("--max-new-cap", type=int, default=None, help="cap budgets (smoke runs)")
    p.add_argument("--slots", type=int, default=8)
    p.add_argument("--pool-tokens", type=int, default=None, help="default: slots x max-prompt")
    p.add_argument("--static-b8-requests", type=int, default=24)
    p.add_argument("--static-b1-requests", type=int, default=24)
    p.add_argument("--hf-requests", type=int, default=10)
    p.add_argument("--hf-device", default="cuda")
    p.add_argument("--hf-timeout-s", type=float, default=240)
    p.add_argument(
        "--sections",
        default="engine,static",
        help="comma list of hf, engine, static (hf runs first, in a child process)",
    )
    p.add_argument(
        "--methods",
        default=None,
        help=f"comma list of hf, {', '.join(METHODS)} (overrides --sections)",
    )
    p.add_argument(
        "--isolation",
        default="process",
        choices=("process", "none"),
        help="process: each JAX method in its own child process (default); none: all in this one",
    )
    p.add_argument("--method-timeout-s", type=float, default=None)
    p.add_argument(
        "--rows-from",
        action="append",
        default=[],
        help="add the rows of an earlier --out on the same workload and device (repeatable)",
    )
    p.add_argument("--hbm-gbps", type=float, default=None, help="default: by device name")
    p.add_argument("--copy-bw-tb-s", type=float, default=None, help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--decode-num-splits",
        type=int,
        default=None,
        help="RuntimeConfig.decode_num_splits of every method (default: table / heuristic; the "
        "engine: ragged_num_splits)",
    )
    p.add_argument(
        "--prompt-bucket-steps",
        type=int,
        default=1,
        help="RuntimeConfig.prompt_bucket_steps of every JAX method (prompt buckets per doubling)",
    )
    p.add_argument(
        "--decode-norm",
        default="xla",
        choices=("xla", "pallas"),
        help="RuntimeConfig.decode_norm of every JAX method (fused add + norm kernels: pallas)",
    )
    p.add_argument("--out", default=None)
    p.add_argument("--hf-worker", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.hf_worker:
        hf_worker(*args.hf_worker)
        return {}
    methods = _parse_methods(args)
    # Entry point: let XLA take most of the GPU (weights + a 38 GiB pool + batch-8 32K prefill).
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")
    t_start = time.perf_counter()
    V = SHAPES[args.shape]["vocab_size"]
    work = make_workload(args.requests, args.max_prompt, V, args.seed, args.max_new_cap)
    subsets = {
        "static-b1": subset(work, args.static_b1_requests, args.seed),
        "static-b8": subset(work, args.static_b8_requests, args.seed),
    }
    hf_reqs = subset(work, args.hf_requests, args.seed)
    rows: list[dict] = []
    notes: list[str] = []
    meta: dict[str, Any] = {
        "shape": args.shape,
        "config": SHAPES[args.shape],
        "dtype": "bfloat16",
        "router": "full+xattn (random weights)",
        "slots": args.slots,
        "pool_tokens": args.pool_tokens or args.slots * args.max_prompt,
        "max_prompt": args.max_prompt,
        "workload": describe(work),
        "buckets": {b: describe([r for r in work if r.bucket == b]) for b in _names(work)},
        "seed": args.seed,
        "prompt_bucket_steps": args.prompt_bucket_steps,
        "decode_norm": args.decode_norm,
        "isolation": args.isolation,
        "argv": sys.argv[1:] if argv is None else list(argv),
    }
    result = {"meta": meta, "rows": rows, "decode_step": None, "ratios": {}, "notes": notes}

    def save() -> None:  # after every method, so a cut-off run keeps what it measured
        meta["total_s"] = time.perf_counter() - t_start
        by = {r["method"]: r for r in rows if "error" not in r}
        for eng_name in ("engine elastic", "engine dense"):
            for other in ("static b1", "static b8", "hf b1"):
                if eng_name in by and other in by:
                    result["ratios"][f"{eng_name} / {other}"] = (
                        by[eng_name]["requests_per_min"] / by[other]["requests_per_min"]
                    )
        result["ceilings"] = prefill_ceilings(by)
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=2))

    for path in args.rows_from:
        _merge_rows_from(path, meta, rows, result)
    if "hf" in methods:  # first: the child needs the GPU before JAX takes it
        hf = run_hf(args.shape, hf_reqs, args.hf_device, args.hf_timeout_s)
        meta["hf"] = hf.get("meta")
        if "skipped" in hf:
            notes.append(f"hf b1 skipped: {hf['skipped']}")
            print("note:", notes[-1], flush=True)
        else:
            wall = sum(r["s"] for r in hf["rows"])
            queue = list(np.cumsum([0.0] + [r["s"] for r in hf["rows"]])[:-1])
            rows.append(summary("hf b1", hf_reqs, wall, queue, 0, scaled=True))
            print(rows[-1], flush=True)
        save()
    jax_methods = [m for m in methods if m != "hf" and (m not in subsets or subsets[m])]
    if jax_methods and args.isolation == "process":
        _run_isolated(args, jax_methods, meta, rows, result, save)
    elif jax_methods:
        _run_in_process(args, jax_methods, work, subsets, meta, rows, result, save)
    save()
    _print_table(result)
    return result


def _run_isolated(args, methods, meta, rows, result, save) -> None:
    from benchmarks.bench_decode import torch_copy_bandwidth

    # cudaMemcpy bandwidth before any child takes the GPU (None without torch / CUDA); only the
    # engine-elastic row reports the decode step against it.
    copy_bw = torch_copy_bandwidth() if "engine-elastic" in methods else None
    with tempfile.TemporaryDirectory() as tmp:
        for method in methods:
            res = run_method_child(
                args, method, copy_bw if method == "engine-elastic" else None, tmp
            )
            child_dev = res.get("meta", {}).get("device")
            if meta.get("device") and child_dev and child_dev != meta["device"]:
                result["notes"].append(
                    f"{method} ran on {child_dev}, other rows on {meta['device']}"
                )
            for key in ("device", "platform", "jax", "copy_bw_tb_s", "datasheet_hbm_tb_s"):
                if res.get("meta", {}).get(key) is not None:
                    meta.setdefault(key, res["meta"][key])
            rows += [r for r in res["rows"] if r["method"] == _label(method)]
            if method == "engine-elastic" and res.get("decode_step"):
                result["decode_step"] = res["decode_step"]
            print(rows[-1], flush=True)
            save()


def _run_in_process(args, methods, work, subsets, meta, rows, result, save) -> None:
    import jax

    base = build_model(
        args.shape,
        args.max_prompt,
        args.seed,
        args.decode_num_splits,
        args.prompt_bucket_steps,
        args.decode_norm,
    )
    dense = base.with_runtime(attention_mode="dense")
    dev = jax.devices()[0]
    meta.update(device=dev.device_kind, platform=dev.platform, jax=jax.__version__)
    hbm = args.hbm_gbps * 1e9 if args.hbm_gbps else None
    if hbm is None and dev.platform == "gpu" and "engine-elastic" in methods:
        # The ceiling measured in this run (bench_decode: the best of cudaMemcpy and XLA copies),
        # as the decode issue defines the ideal; the datasheet peak is kept beside it. A parent
        # process measures cudaMemcpy before JAX takes the GPU and passes it in.
        from benchmarks.bench_decode import copy_bandwidth, torch_copy_bandwidth

        torch_bw = args.copy_bw_tb_s * 1e12 if args.copy_bw_tb_s else torch_copy_bandwidth()
        hbm = max(torch_bw or 0.0, copy_bandwidth(4.0)["copy"])
        meta["copy_bw_tb_s"] = hbm / 1e12
    for name, bw in HBM_BYTES_PER_S.items():
        if name in dev.device_kind:
            meta["datasheet_hbm_tb_s"] = bw / 1e12
            hbm = hbm or bw
    pool = args.pool_tokens or args.slots * args.max_prompt

    def engine_row(label, model):
        row, steady = run_engine(model, work, args.slots, pool, args.max_prompt)
        gc.collect()  # the engine's pool goes before the next one is allocated
        row["method"] = label
        if label == "engine elastic":
            result["decode_step"] = decode_ideal(model, steady, hbm)
        return row

    def static_row(batch, reqs):
        try:
            return run_static(dense, reqs, batch)
        except Exception as e:  # noqa: BLE001 - an OOM here must not lose the other rows
            row = {"method": f"static b{batch}", "error": f"{type(e).__name__}: {str(e)[:200]}"}
            row["error_context"] = getattr(e, "__notes__", [])  # which batch, its predicted peak
            stats = dev.memory_stats() or {}  # the allocator at the failure (None on CPU)
            keep = ("bytes_in_use", "peak_bytes_in_use", "bytes_limit", "largest_free_block_bytes")
            row["memory_stats_gib"] = {k: stats[k] / 2**30 for k in keep if k in stats}
            gc.collect()
            return row

    run = {
        "engine-elastic": lambda: engine_row("engine elastic", base),
        "static-b8": lambda: static_row(8, subsets["static-b8"]),
        "static-b1": lambda: static_row(1, subsets["static-b1"]),
        "engine-dense": lambda: engine_row("engine dense", dense),
    }
    for method in methods:
        rows.append(run[method]())
        print(rows[-1], flush=True)
        save()


def _names(work: list[Request]) -> list[str]:
    return list(dict.fromkeys(r.bucket for r in work))


def _print_table(result: dict) -> None:
    m = result["meta"]
    print(
        f"\n{m.get('device', '-')}  jax {m.get('jax', '-')}  Qwen3-{m['shape']} shape, bf16 random weights, "
        f"{m['workload']['requests']} requests (mean prompt {m['workload']['mean_prompt']:.0f}, "
        f"mean budget {m['workload']['mean_budget']:.0f}), {m['slots']} slots"
    )
    head = f"{'method':15} {'reqs':>5} {'prompt':>7} {'budget':>6} {'wall s':>8} {'req/min':>8}"
    print(head + f" {'out tok/s':>9} {'queue mean s':>12} {'queue max s':>11} {'compiles':>8}")
    for r in result["rows"]:
        if "error" in r:
            print(f"{r['method']:15} ERROR {r['error'][:100]}")
            continue
        print(
            f"{r['method']:15} {r['requests']:>5} {r['mean_prompt']:>7.0f} {r['mean_budget']:>6.0f} "
            f"{r['wall_s']:>8.1f} {r['requests_per_min']:>8.2f} {r['output_tok_per_s']:>9.1f} "
            f"{r['queue_mean_s']:>12.1f} {r['queue_max_s']:>11.1f} {r['compiles']:>8}"
            + ("  (subset, scaled per request)" if r.get("scaled") else "")
        )
    d = result["decode_step"]
    if d and d.get("steps"):
        line = f"engine decode step (all slots busy, {d['steps']} steps, median context "
        line += f"{d['median_context_tokens']:.0f} tokens): {d['median_ms']:.2f} ms"
        if "ideal_ms" in d:
            line += f", HBM-bound ideal {d['ideal_ms']:.2f} ms ({d['fraction_of_ideal']:.0%})"
        print(line)
    ceilings = result.get("ceilings", {})
    for k, v in result["ratios"].items():
        bound = f"  (prefill-bound ceiling {ceilings[k]:.2f}x)" if k in ceilings else ""
        print(f"{k}: {v:.2f}x requests/min{bound}")
    for r in result["rows"]:
        if r.get("prefill_s_total") and "error" not in r:
            share = r["prefill_s_total"] / r["wall_s"]
            print(
                f"{r['method']}: prefill {r['prefill_s_total']:.1f} s = {share:.0%} of its wall time"
            )
    for n in result["notes"]:
        print("note:", n)


if __name__ == "__main__":
    main()
