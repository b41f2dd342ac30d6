"""Continuous batching (issue 15): the serving engine against today's static path and HF
transformers on a LongBench-E-shaped workload, Qwen3-4B shape, random bf16 weights.

    PYTHONPATH=. python3 benchmarks/bench_serving.py --sections hf --out $OUT/serving_4b_hf.json
    PYTHONPATH=. python3 benchmarks/bench_serving.py --hf-from $OUT/serving_4b_hf.json \
        --out $OUT/serving_4b.json

(two commands, each under 10 minutes; the second puts the first's HF row into its table/ratios).

Workload (seeded, ``make_workload``): ``--requests`` (200) requests, each a LongBench-E task drawn
uniformly from the 13 (its official max_new_tokens, ``dataset2maxlen``: 32 to 512) and a prompt
length drawn uniformly within one of the three LongBench-E length buckets, the buckets taken in
turn: 0-4K (from 2K), 4-8K and 8K-32K, with prompt + budget <= ``--max-prompt`` (32768; the bucket
edges scale with it: max/16, max/8, max/4, max). The 0-4K bucket starts at 2K so that it pads to
one prefill bucket (4096): five prefill buckets in all (4K, 8K, 16K, 24K, 32K), each compiled once
per mode before timing. Prompt ids are random. Random weights never stop early
(no stop ids), so every request runs its whole budget. All requests arrive at t=0 (an offline
batch, like a LongBench run), so queue wait is the time until a request's prefill starts.

Methods (one process, one GPU; compile excluded everywhere: each method first runs every shape
it will meet, and backend compilations during the timed part are counted, expected 0):
  engine elastic / dense  ``serving.Engine`` with ``--slots`` slots (8) on all requests. PawQwen3
                          with a router of fixed random weights (``full+xattn``); "dense" forces
                          every head dense (same weights).
  static b8               ``generate_static`` (today's path: one padded batch, every row waits for
                          the slowest) in batches of 8 consecutive requests of a seeded subset of
                          ``--static-b8-requests`` (16), dense attention, scaled per request.
  static b1               ``generate_static`` one request at a time on a subset of
                          ``--static-b1-requests`` (10), dense, scaled per request.
  hf b1                   transformers ``generate`` (SDPA, bf16 at construction, batch 1) on the
                          same subset as static b1 (``--hf-requests``, 10), in a child process that
                          runs before JAX takes the GPU; skipped when torch/CUDA are missing.
                          Not in the default sections (time): ``--sections hf`` runs it alone.
Subsets are the first k requests of a seeded permutation of the workload; "scaled per request"
means requests/min = k / wall of the subset (their mean prompt and budget are printed beside the
full workload's). Decode step time: the median wall time of the engine's steps (elastic run)
that admitted nothing with every slot busy (one step behind, so it is the device step time),
against the HBM-bound ideal (weights + the running requests' K/V read once per step at the
device's peak HBM bandwidth).

Order: hf (if asked), engine elastic, static b8, static b1, engine dense; the JSON is rewritten
after each, so a run cut off keeps what it measured. Budget (H100, 4b defaults, estimated, not
measured yet): engine ~1.5-2 min per mode + compile (5 prefill buckets + 1 decode step per mode),
static ~1.5 min with compile, so ~6-7 min; --sections hf alone ~2.5 min. Shrink with --requests, --max-prompt, --shape tiny (CPU smoke:
tests/test_bench_serving.py).
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


def subset(workload: list[Request], k: int, seed: int) -> list[Request]:
    order = np.random.default_rng(seed + 1).permutation(len(workload))
    return [workload[i] for i in order[:k]]


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


def build_model(shape: str, max_tokens: int, seed: int = 0):
    """PawQwen3 of ``SHAPES[shape]``, random bf16 weights, router with fixed random weights."""
    import jax

    from benchmarks.bench_engine import ROUTER_ELASTIC
    from benchmarks.bench_model import make_config
    from elastic_jax.config import RuntimeConfig
    from elastic_jax.loader import Model
    from elastic_jax.params import init_random

    cfg = make_config(shape, ROUTER_ELASTIC["full+xattn"])
    params = jax.jit(init_random, static_argnums=0)(cfg, jax.random.PRNGKey(seed))
    jax.block_until_ready(params)
    return Model(cfg, params, None, RuntimeConfig(attention_mode="elastic"), max_tokens)


def run_engine(model, reqs: list[Request], slots: int, pool_tokens: int | None, max_tokens: int):
    """Warm up (one request per prompt bucket), then all requests at t=0 through one Engine."""
    from elastic_jax import engine as buckets
    from elastic_jax.serving import Engine

    eng = Engine(model, slots, max_request_tokens=max_tokens, max_tokens_in_pool=pool_tokens)
    chunk = model.runtime.prefill_chunk
    seen: dict[int, Request] = {}
    for r in reqs:
        seen.setdefault(buckets.prompt_bucket(len(r.prompt), chunk), r)
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


def run_static(model, reqs: list[Request], batch: int) -> dict:
    """Today's path: ``generate_static`` on consecutive batches of ``batch`` requests."""
    from elastic_jax.generate import generate_static, generate_static_iter

    groups = [reqs[i : i + batch] for i in range(0, len(reqs), batch)]
    t0 = time.perf_counter()
    for g in groups:  # warm-up: each batch's shapes (prompt bucket, batch, capacity)
        it = generate_static_iter(
            model, [r.prompt for r in g], max_new_tokens=[r.max_new_tokens for r in g],
            stop_token_ids=[],
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
        for g in groups:
            start = time.perf_counter() - t0
            res = generate_static(
                model, [r.prompt for r in g], max_new_tokens=[r.max_new_tokens for r in g],
                stop_token_ids=[],
            )  # fmt: skip
            assert [len(t) for t in res.token_ids] == [r.max_new_tokens for r in g]
            queue += [start] * len(g)
            prefill_s += res.timings[0].prefill_ms / 1e3  # the whole batch's prefill
        wall = time.perf_counter() - t0
    return summary(
        f"static b{batch}", reqs, wall, queue, cc.count,
        warmup_s=warm_s, prefill_s_total=prefill_s, scaled=True,
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


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="4b", choices=sorted(SHAPES))
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--max-prompt", type=int, default=32768)
    p.add_argument("--max-new-cap", type=int, default=None, help="cap budgets (smoke runs)")
    p.add_argument("--slots", type=int, default=8)
    p.add_argument("--pool-tokens", type=int, default=None, help="default: slots x max-prompt")
    p.add_argument("--static-b8-requests", type=int, default=16)
    p.add_argument("--static-b1-requests", type=int, default=10)
    p.add_argument("--hf-requests", type=int, default=10)
    p.add_argument("--hf-device", default="cuda")
    p.add_argument("--hf-timeout-s", type=float, default=240)
    p.add_argument(
        "--sections",
        default="engine,static",
        help="comma list of hf, engine, static (hf runs first, in a child process)",
    )
    p.add_argument("--hf-from", default=None, help="take the hf b1 row from an earlier --out")
    p.add_argument("--hbm-gbps", type=float, default=None, help="default: by device name")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    p.add_argument("--hf-worker", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.hf_worker:
        hf_worker(*args.hf_worker)
        return {}
    # Entry point: let XLA take most of the GPU (weights + a 38 GiB pool + batch-8 32K prefill).
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")
    sections = set(args.sections.split(","))
    t_start = time.perf_counter()
    V = SHAPES[args.shape]["vocab_size"]
    work = make_workload(args.requests, args.max_prompt, V, args.seed, args.max_new_cap)
    sub1 = subset(work, args.static_b1_requests, args.seed)
    sub8 = subset(work, args.static_b8_requests, args.seed)
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
        "argv": sys.argv[1:] if argv is None else list(argv),
    }
    result = {"meta": meta, "rows": rows, "decode_step": None, "ratios": {}, "notes": notes}

    def save() -> None:  # after every section, so a cut-off run keeps what it measured
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

    if args.hf_from:
        old = json.loads(Path(args.hf_from).read_text())
        if old["meta"]["workload"] != meta["workload"] or old["meta"]["seed"] != args.seed:
            raise ValueError(f"{args.hf_from} was measured on another workload (seed / sizes)")
        rows += [r for r in old["rows"] if r["method"] == "hf b1"]
        meta["hf"] = old["meta"].get("hf")
    if "hf" in sections:  # first: the child needs the GPU before JAX takes it
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
    if not sections & {"engine", "static"}:
        _print_table(result)
        return result

    import jax

    from elastic_jax.config import RuntimeConfig

    base = build_model(args.shape, args.max_prompt, args.seed)
    dense = dataclasses.replace(base, runtime=RuntimeConfig(attention_mode="dense"))
    dev = jax.devices()[0]
    meta.update(device=dev.device_kind, platform=dev.platform, jax=jax.__version__)
    hbm = args.hbm_gbps * 1e9 if args.hbm_gbps else None
    if hbm is None and dev.platform == "gpu":
        # The ceiling measured in this run (bench_decode: the best of cudaMemcpy and XLA copies),
        # as the decode issue defines the ideal; the datasheet peak is kept beside it.
        from benchmarks.bench_decode import copy_bandwidth, torch_copy_bandwidth

        hbm = max(torch_copy_bandwidth() or 0.0, copy_bandwidth(4.0)["copy"])
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
            gc.collect()
            return {"method": f"static b{batch}", "error": f"{type(e).__name__}: {str(e)[:200]}"}

    # The product first, then its baselines, so a run cut off by its time limit keeps the most.
    methods = []
    if "engine" in sections:
        methods.append(lambda: engine_row("engine elastic", base))
    if "static" in sections:
        methods += [lambda b=b, r=r: static_row(b, r) for b, r in ((8, sub8), (1, sub1)) if r]
    if "engine" in sections:
        methods.append(lambda: engine_row("engine dense", dense))
    for method in methods:
        rows.append(method())
        print(rows[-1], flush=True)
        save()
    save()
    _print_table(result)
    return result


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
