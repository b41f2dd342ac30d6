"""Scoring prediction files and writing the results JSON + markdown report.

Layout read: `<out_dir>/<mode>/<task>.jsonl` (+ `run_config.json`), as written by the runner.
Per task we report the official LongBench score (eval.py `scorer`: 100 x mean over samples,
2 decimals), the LongBench-E length buckets (eval.py `scorer_e`: 0-4k / 4-8k / 8k+ on the
`length` field), and the means of prefill sparsity and timings. Per suite: category means and
the macro mean of the (rounded) task scores, plus the sample-weighted mean (all samples pooled),
which is how the paper's "Avg." may have been computed (unverified, see data/paper_results.json).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from .dataset import read_predictions
from .metrics import score_sample
from .tasks import (
    ALL_TASKS,
    CATEGORIES,
    LONGBENCH_E_TASKS,
    PAPER_CATEGORY_LABELS,
    PAPER_TASK_ORDER,
    TaskRun,
    task_from_key,
)

BUCKETS: tuple[str, ...] = ("0-4k", "4-8k", "8k+")
MODE_ORDER: tuple[str, ...] = ("dense", "elastic", "streaming", "xattn")
# Our attention mode -> the paper's row it should be compared with.
PAPER_ROW_FOR_MODE: Mapping[str, str] = {"dense": "dense", "xattn": "XAttention"}
DEFAULT_ELASTIC_PAPER_ROW = "EA (FA-SSA)"
# prefill_info key holding the fraction of heads routed sparse (the paper's Omega_MSR), if the
# model reports it; "sparsity" (fraction of causal blocks skipped) is always used.
MSR_INFO_KEY = "sparse_head_fraction"
RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"


def length_bucket(length: int) -> str:
    """eval.py scorer_e: length < 4000 -> 0-4k, < 8000 -> 4-8k, else 8k+ (words / zh chars)."""
    if length < 4000:
        return "0-4k"
    if length < 8000:
        return "4-8k"
    return "8k+"


@dataclasses.dataclass(frozen=True)
class TaskResult:
    """Scores and statistics of one prediction file.

    `score` and `buckets` follow eval.py exactly (bucket None when it has no sample); `total`
    is the unrounded sum of per-sample scores in [0, n]. Timing and sparsity fields are means
    over the samples that report them (None if none do).
    """

    key: str
    task: str
    suite: str
    category: str
    n: int
    score: float
    total: float
    buckets: dict[str, float | None]
    bucket_n: dict[str, int]
    sparsity: float | None
    prefill_ms: float | None
    decode_ms: float | None
    decode_tokens_per_s: float | None
    samples_per_min: float | None
    prompt_tokens: float | None
    truncated: int
    info_means: dict[str, float]

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def _mean(values: Iterable[Any]) -> float | None:
    vals = [float(v) for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def score_records(run: TaskRun, records: Sequence[Mapping[str, Any]]) -> TaskResult:
    """Score prediction records (dicts with pred, answers, all_classes, length, ...)."""
    total = 0.0
    by_bucket: dict[str, list[float]] = {b: [] for b in BUCKETS}
    for rec in records:
        # eval.py takes all_classes from the file's last line for every sample; LongBench's
        # trec/lsht files use one class list throughout, so the per-sample list is the same.
        s = score_sample(run.spec, rec["pred"], rec["answers"], rec.get("all_classes"))
        total += s
        if rec.get("length") is not None:
            by_bucket[length_bucket(int(rec["length"]))].append(s)
    n = len(records)
    wall = [r.get("wall_ms") for r in records if r.get("wall_ms") is not None]
    info_keys = sorted({k for r in records for k in (r.get("prefill_info") or {})})
    return TaskResult(
        key=run.key,
        task=run.spec.name,
        suite=run.suite,
        category=run.spec.category,
        n=n,
        # eval.py scorer(): sequential sum, then round(100 * total / n, 2).
        score=round(100 * total / n, 2) if n else 0.0,
        total=total,
        # eval.py scorer_e(): round(100 * np.mean(bucket), 2) per bucket.
        buckets={
            b: (round(100 * float(np.mean(v)), 2) if v else None) for b, v in by_bucket.items()
        },
        bucket_n={b: len(v) for b, v in by_bucket.items()},
        sparsity=_mean(r.get("sparsity") for r in records),
        prefill_ms=_mean(r.get("prefill_ms") for r in records),
        decode_ms=_mean(r.get("decode_ms") for r in records),
        decode_tokens_per_s=_mean(r.get("decode_tokens_per_s") for r in records),
        samples_per_min=(60_000.0 * len(wall) / sum(wall)) if wall and sum(wall) > 0 else None,
        prompt_tokens=_mean(r.get("prompt_tokens") for r in records),
        truncated=sum(1 for r in records if r.get("truncated")),
        info_means={
            k: v
            for k in info_keys
            if (v := _mean((r.get("prefill_info") or {}).get(k) for r in records)) is not None
        },
    )


def score_prediction_file(path: str | os.PathLike, run: TaskRun) -> TaskResult:
    return score_records(run, read_predictions(path))


def _task_sort_key(key: str) -> tuple[int, int]:
    run = task_from_key(key)
    return (int(run.longbench_e), ALL_TASKS.index(run.spec.name))


def _mode_sort_key(mode: str) -> tuple[int, str]:
    return (MODE_ORDER.index(mode) if mode in MODE_ORDER else len(MODE_ORDER), mode)


def collect_results(out_dir: str | os.PathLike) -> dict[str, dict[str, TaskResult]]:
    """mode -> task key -> TaskResult, for every `<out_dir>/<mode>/<task>.jsonl` found.

    Files whose name is not a LongBench task key are ignored; empty files are skipped.
    """
    out = Path(out_dir)
    if not out.is_dir():
        raise FileNotFoundError(f"results dir {out} does not exist")
    results: dict[str, dict[str, TaskResult]] = {}
    for mode_dir in sorted((p for p in out.iterdir() if p.is_dir()), key=lambda p: p.name):
        per_task = {}
        for path in mode_dir.glob("*.jsonl"):
            try:
                run = task_from_key(path.stem)
            except ValueError:
                continue
            records = read_predictions(path)
            if records:
                per_task[run.key] = score_records(run, records)
        if per_task:
            results[mode_dir.name] = dict(
                sorted(per_task.items(), key=lambda kv: _task_sort_key(kv[0]))
            )
    return dict(sorted(results.items(), key=lambda kv: _mode_sort_key(kv[0])))


def summarize_suite(suite: str, tasks: Mapping[str, TaskResult]) -> dict:
    """Category means, macro mean and sample-weighted mean of one suite's task results."""
    expected = LONGBENCH_E_TASKS if suite == "LongBench-E" else ALL_TASKS
    present = {r.task: r for r in tasks.values() if r.suite == suite}
    categories = {}
    for cat in CATEGORIES:
        scores = [r.score for r in present.values() if r.category == cat]
        if scores:
            categories[cat] = round(sum(scores) / len(scores), 2)
    n = sum(r.n for r in present.values())
    return {
        "tasks": {r.key: r.to_json() for r in present.values()},
        "categories": categories,
        "macro_mean": round(sum(r.score for r in present.values()) / len(present), 2),
        "n_tasks": len(present),
        "complete": all(t in present for t in expected),
        "missing": [t for t in expected if t not in present],
        "sample_weighted_mean": round(100 * sum(r.total for r in present.values()) / n, 2),
        "n_samples": n,
        "bucket_macro_mean": {
            b: _round_or_none(_mean(r.buckets[b] for r in present.values())) for b in BUCKETS
        },
        "sparsity": _mean(r.sparsity for r in present.values()),
        "prefill_ms": _mean(r.prefill_ms for r in present.values()),
        "decode_ms": _mean(r.decode_ms for r in present.values()),
        "samples_per_min": _pooled_rate(present.values()),
    }


def _pooled_rate(results: Iterable[TaskResult]) -> float | None:
    # samples/min over the suite = total samples / total minutes (per-task rates are n/minutes).
    samples = minutes = 0.0
    for r in results:
        if r.samples_per_min:
            samples += r.n
            minutes += r.n / r.samples_per_min
    return samples / minutes if minutes > 0 else None


def _round_or_none(x: float | None, nd: int = 2) -> float | None:
    return None if x is None else round(x, nd)


def _load_paper() -> dict:
    path = resources.files(__package__).joinpath("data").joinpath("paper_results.json")
    with path.open("r", encoding="utf-8") as f:
        return json.load(f)


def paper_model(name: str) -> tuple[str, dict]:
    """(canonical name, tables) for a model of data/paper_results.json; case-insensitive."""
    models = _load_paper()["models"]
    for canon, tables in models.items():
        if canon.lower() == name.lower():
            return canon, tables
    raise ValueError(f"compare_paper={name!r} unknown; the paper reports: {', '.join(models)}")


def paper_comparison(
    modes: Mapping[str, Mapping[str, dict]],
    model_name: str,
    elastic_row: str = DEFAULT_ELASTIC_PAPER_ROW,
) -> dict:
    """Our per-task / per-category numbers beside the paper's (Table 7 and Tables 1/8).

    Args:
      modes: mode -> suite -> summary (as in results.json["modes"]).
      model_name: a model of data/paper_results.json.
      elastic_row: the paper row our "elastic" mode is compared with.
    """
    canon, paper = paper_model(model_name)
    if elastic_row not in paper["tasks"]:
        raise ValueError(f"elastic_row={elastic_row!r} unknown; rows: {', '.join(paper['tasks'])}")
    row_for = {**PAPER_ROW_FOR_MODE, "elastic": elastic_row}
    suite = "LongBench-E"
    if not any(suite in m for m in modes.values()):
        suite = "LongBench"  # only v1 files: compared, but flagged in the note
    cat_of = {PAPER_CATEGORY_LABELS[c]: c for c in CATEGORIES}
    out: dict[str, Any] = {
        "model": canon,
        "suite": suite,
        "rows": {m: row_for.get(m) for m in modes},
        "tasks": {},
        "categories": {},
        "avg": {},
    }
    for task in PAPER_TASK_ORDER:
        key = f"{task}_e" if suite == "LongBench-E" else task
        entry = {"label": task_from_key(task).spec.paper_label, "ours": {}, "paper": {}}
        for mode, suites in modes.items():
            t = suites.get(suite, {}).get("tasks", {}).get(key)
            entry["ours"][mode] = None if t is None else t["score"]
            if row_for.get(mode):
                entry["paper"][mode] = paper["tasks"][row_for[mode]][task]
        out["tasks"][task] = entry
    for label, cat in cat_of.items():
        entry = {"ours": {}, "paper": {}, "ours_sparsity": {}, "ours_msr": {}, "paper_msr": {}}
        for mode, suites in modes.items():
            s = suites.get(suite)
            entry["ours"][mode] = None if s is None else s["categories"].get(cat)
            if s is not None:
                tasks = [t for t in s["tasks"].values() if t["category"] == cat]
                entry["ours_sparsity"][mode] = _mean(t["sparsity"] for t in tasks)
                entry["ours_msr"][mode] = _mean(t["info_means"].get(MSR_INFO_KEY) for t in tasks)
            row = row_for.get(mode)
            if row:
                entry["paper"][mode] = paper["categories"][row][label]
                entry["paper_msr"][mode] = paper.get("msr", {}).get(row, {}).get(label)
        out["categories"][label] = entry
    for mode, suites in modes.items():
        s = suites.get(suite)
        out["avg"][mode] = {
            "ours_macro_mean": None if s is None else s["macro_mean"],
            "ours_sample_weighted_mean": None if s is None else s["sample_weighted_mean"],
            "complete": None if s is None else s["complete"],
            "paper": paper["avg"][row_for[mode]] if row_for.get(mode) else None,
        }
    return out


def build_results(
    out_dir: str | os.PathLike,
    *,
    compare_paper: str | None = None,
    elastic_row: str = DEFAULT_ELASTIC_PAPER_ROW,
) -> dict:
    """Score everything under out_dir; returns the dict written to results.json."""
    collected = collect_results(out_dir)
    if not collected:
        raise FileNotFoundError(f"no prediction files (<mode>/<task>.jsonl) under {out_dir}")
    modes: dict[str, dict] = {}
    configs: dict[str, Any] = {}
    for mode, tasks in collected.items():
        suites = sorted({r.suite for r in tasks.values()}, key=lambda s: s != "LongBench-E")
        modes[mode] = {s: summarize_suite(s, tasks) for s in suites}
        cfg = Path(out_dir) / mode / "run_config.json"
        configs[mode] = json.loads(cfg.read_text(encoding="utf-8")) if cfg.exists() else None
    results: dict[str, Any] = {"modes": modes, "run_config": configs}
    if len(modes) > 1:
        results["comparison"] = mode_comparison(modes)
    if compare_paper is not None:
        results["paper"] = paper_comparison(modes, compare_paper, elastic_row)
    return results


def mode_comparison(modes: Mapping[str, Mapping[str, dict]]) -> dict:
    """Every mode against the baseline (dense if present, else the first mode), per suite."""
    baseline = "dense" if "dense" in modes else next(iter(modes))
    out: dict[str, Any] = {"baseline": baseline, "suites": {}}
    for suite, base in modes[baseline].items():
        per_mode = {}
        for mode, suites in modes.items():
            if mode == baseline or suite not in suites:
                continue
            other = suites[suite]
            tasks = {}
            for key, b in base["tasks"].items():
                o = other["tasks"].get(key)
                if o is None:
                    continue
                tasks[key] = {
                    "baseline": b["score"],
                    "score": o["score"],
                    "delta": round(o["score"] - b["score"], 2),
                    **_speed_versus(b, o),
                }
            per_mode[mode] = {
                "tasks": tasks,
                "macro_mean": other["macro_mean"],
                "baseline_macro_mean": base["macro_mean"],
                "delta_macro_mean": round(other["macro_mean"] - base["macro_mean"], 2),
                **_speed_versus(base, other),
            }
        if per_mode:
            out["suites"][suite] = per_mode
    return out


def _speed_versus(base: Mapping[str, Any], other: Mapping[str, Any]) -> dict:
    """Sparsity and speed of ``other`` beside ``base`` (a task's or a suite's summary)."""
    return {
        "sparsity": other["sparsity"],
        "prefill_speedup": _ratio(base["prefill_ms"], other["prefill_ms"]),
        "samples_per_min": other["samples_per_min"],
        "baseline_samples_per_min": base["samples_per_min"],
    }


def _ratio(num: float | None, den: float | None) -> float | None:
    return None if not num or not den else num / den


# ----------------------------------------------------------------------------------- markdown


def _f(x: Any, nd: int = 2) -> str:
    if x is None:
        return "—"
    if isinstance(x, float):
        return f"{x:.{nd}f}"
    return str(x)


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += [
        "| " + " | ".join(_f(c) if not isinstance(c, str) else c for c in r) + " |" for r in rows
    ]
    return lines


def _suite_section(mode: str, suite: str, s: Mapping[str, Any]) -> list[str]:
    lines = [f"## {mode} — {suite}", ""]
    rows = []
    for key, t in s["tasks"].items():
        rows.append(
            [key, t["category"], t["n"], t["score"]]
            + [t["buckets"][b] for b in BUCKETS]
            + [
                _f(t["sparsity"], 3),
                _f(t["prefill_ms"], 1),
                _f(t["decode_ms"], 1),
                _f(t["decode_tokens_per_s"], 1),
                _f(t["samples_per_min"], 2),
                t["truncated"],
            ]
        )
    header = ["Task", "Category", "n", "Score", *BUCKETS, "Sparsity", "Prefill ms", "Decode ms"]
    lines += _table(header + ["Decode tok/s", "Samples/min", "Truncated"], rows)
    lines += ["", *_table(["Category", "Score"], s["categories"].items()), ""]
    expected = 13 if suite == "LongBench-E" else 21
    mean_label = (
        f"Mean over the {expected} tasks"
        if s["complete"]
        else f"Mean over {s['n_tasks']} of {expected} tasks (missing: {', '.join(s['missing'])})"
    )
    lines += [
        f"- {mean_label}: **{_f(s['macro_mean'])}**",
        f"- Sample-weighted mean ({s['n_samples']} samples): {_f(s['sample_weighted_mean'])}",
        "- Length buckets, mean over tasks: "
        + ", ".join(f"{b}: {_f(v)}" for b, v in s["bucket_macro_mean"].items()),
        f"- Mean prefill sparsity: {_f(s['sparsity'], 3)}; samples/min: {_f(s['samples_per_min'])}",
        "",
    ]
    return lines


def _comparison_section(cmp: Mapping[str, Any]) -> list[str]:
    lines = []
    base = cmp["baseline"]
    for suite, per_mode in cmp["suites"].items():
        for mode, c in per_mode.items():
            lines += [f"## {mode} vs {base} — {suite}", ""]
            rows = [
                [
                    key,
                    t["baseline"],
                    t["score"],
                    _f(t["delta"]),
                    _f(t["sparsity"], 3),
                    _f(t["prefill_speedup"], 2),
                    _f(t["baseline_samples_per_min"]),
                    _f(t["samples_per_min"]),
                ]
                for key, t in c["tasks"].items()
            ]
            rows.append(
                [
                    "**mean**",
                    c["baseline_macro_mean"],
                    c["macro_mean"],
                    _f(c["delta_macro_mean"]),
                    _f(c["sparsity"], 3),
                    _f(c["prefill_speedup"], 2),
                    _f(c["baseline_samples_per_min"]),
                    _f(c["samples_per_min"]),
                ]
            )
            header = ["Task", base, mode, "Δ", f"{mode} sparsity", "Prefill speedup"]
            lines += _table(header + [f"{base} samples/min", f"{mode} samples/min"], rows)
            lines.append("")
    return lines


def _paper_section(p: Mapping[str, Any]) -> list[str]:
    modes = list(p["rows"])
    lines = [f"## Ours vs paper ({p['model']}, {p['suite']})", ""]
    if p["suite"] != "LongBench-E":
        lines += ["Note: ours are on LongBench v1 files, the paper reports LongBench-E.", ""]
    header = ["Task"]
    for m in modes:
        header.append(f"ours {m}")
        if p["rows"][m]:
            header += [f"paper {p['rows'][m]}", "Δ"]

    def cells(ours: Mapping, paper: Mapping) -> list[str]:
        out = []
        for m in modes:
            out.append(_f(ours.get(m)))
            if p["rows"][m]:
                o, q = ours.get(m), paper.get(m)
                out += [_f(q), _f(None if o is None or q is None else round(o - q, 2))]
        return out

    rows = [[e["label"], *cells(e["ours"], e["paper"])] for e in p["tasks"].values()]
    avg_ours = {m: a["ours_macro_mean"] for m, a in p["avg"].items()}
    avg_paper = {m: a["paper"] for m, a in p["avg"].items()}
    rows.append(["**Avg (ours: macro mean)**", *cells(avg_ours, avg_paper)])
    sw = {m: a["ours_sample_weighted_mean"] for m, a in p["avg"].items()}
    rows.append(["Avg (ours: sample-weighted)", *cells(sw, avg_paper)])
    lines += _table(header, rows)
    cat_rows = [[lab, *cells(e["ours"], e["paper"])] for lab, e in p["categories"].items()]
    lines += ["", *_table(["Category", *header[1:]], cat_rows)]
    has_msr = any(v is not None for e in p["categories"].values() for v in e["ours_msr"].values())
    what = (
        "ours block sparsity / ours Ω_MSR / paper Ω_MSR"
        if has_msr
        else ("ours block sparsity / paper Ω_MSR")
    )
    sp_rows = []
    for lab, e in p["categories"].items():
        row = [lab]
        for m in modes:
            vals = [e["ours_sparsity"].get(m)]
            vals += [e["ours_msr"].get(m)] if has_msr else []
            row.append(" / ".join(_f(v, 2) for v in [*vals, e["paper_msr"].get(m)]))
        sp_rows.append(row)
    lines += [
        "",
        "Sparsity: block sparsity = fraction of causal attention blocks skipped in prefill; "
        "Ω_MSR = fraction of heads routed to the sparse mode (the paper's measure; ours from "
        f"prefill_info['{MSR_INFO_KEY}'] when the model reports it).",
        "",
        *_table(["Category", *(f"{m}: {what}" for m in modes)], sp_rows),
        "",
    ]
    return lines


def render_markdown(results: Mapping[str, Any]) -> str:
    lines = ["# LongBench results", ""]
    for mode, suites in results["modes"].items():
        for suite, s in suites.items():
            lines += _suite_section(mode, suite, s)
    if "comparison" in results:
        lines += _comparison_section(results["comparison"])
    if "paper" in results:
        lines += _paper_section(results["paper"])
    return "\n".join(lines).rstrip() + "\n"


def write_report(
    out_dir: str | os.PathLike,
    *,
    compare_paper: str | None = None,
    elastic_row: str = DEFAULT_ELASTIC_PAPER_ROW,
) -> dict:
    """Score `out_dir` and write `results.json` and `results.md` there; returns the results."""
    results = build_results(out_dir, compare_paper=compare_paper, elastic_row=elastic_row)
    out = Path(out_dir)
    (out / RESULTS_JSON).write_text(
        json.dumps(results, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    (out / RESULTS_MD).write_text(render_markdown(results), encoding="utf-8")
    return results
