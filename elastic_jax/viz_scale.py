"""Plots of the length-scaling benchmark (``benchmarks/bench_scale.py``, issue 19).

``plot_scale(paths)`` reads one or more bench_scale JSON files (lengths may be split over several
runs or machines) and returns a pyplot-free figure (``viz.new_figure``) with three log-log
panels: prefill time per mode (and HF transformers' where measured) against prompt length, with
dashed T and T^2 guides; decode step time and router time per layer; measured peak memory next to
the memory model's prediction (and HF's peak).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from elastic_jax import viz

HF_LABEL = "HF transformers (SDPA)"


def load_scale_rows(paths: str | Path | Sequence[str | Path]) -> tuple[list[dict], list[dict]]:
    """(metas, rows) of bench_scale JSON files; a (what, mode, tokens) row of a later file
    replaces the same row of an earlier one."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    metas, rows = [], {}
    for p in paths:
        data = json.loads(Path(p).read_text())
        if "rows" not in data:
            raise ValueError(f"{p}: no 'rows' (a bench_scale --predict file has no measurements)")
        metas.append(data.get("meta", {}))
        for r in data["rows"]:
            rows[(r["what"], r.get("mode"), r.get("tokens"))] = r
    return metas, list(rows.values())


def _series(rows, what: str, key: str, label_of) -> dict[str, list[tuple[int, float]]]:
    out: dict[str, list[tuple[int, float]]] = {}
    for r in rows:
        if r["what"] == what and r.get(key) is not None and "skipped" not in r:
            out.setdefault(label_of(r), []).append((r["tokens"], float(r[key])))
    return out


def _guides(ax, pts: list[tuple[int, float]]) -> None:
    """Dashed lines through the first point growing as T and as T^2."""
    x0, y0 = min(pts)
    x1 = max(x for x, _ in pts)
    for power, style in ((1, ":"), (2, "--")):
        ax.plot([x0, x1], [y0, y0 * (x1 / x0) ** power], style, color="grey", lw=0.8,
                label=f"~T^{power}" if power > 1 else "~T")  # fmt: skip


def plot_scale(paths: str | Path | Sequence[str | Path], *, title: str | None = None):
    """Three log-log panels from bench_scale JSON file(s); returns the figure."""
    metas, rows = load_scale_rows(paths)
    prefill = _series(rows, "prefill", "s", lambda r: r["mode"])
    if not prefill:
        raise ValueError("no measured prefill rows in the given file(s)")
    prefill.update(_series(rows, "hf_prefill", "s", lambda r: HF_LABEL))
    small = _series(rows, "decode", "ms", lambda r: "decode step (ms, batch 1)")
    small.update(_series(rows, "router", "ms_per_layer", lambda r: "router per layer (ms)"))
    peak: dict[str, dict[int, float]] = {"measured peak": {}, "memory model": {}}
    for r in rows:
        if r["what"] == "prefill" and r.get("peak_gib") is not None:
            t = r["tokens"]
            peak["measured peak"][t] = max(peak["measured peak"].get(t, 0.0), r["peak_gib"])
            pred = r["pred_running_gib"]
            peak["memory model"][t] = max(peak["memory model"].get(t, 0.0), pred)
    peak_series = {k: sorted(v.items()) for k, v in peak.items() if v}
    peak_series.update(_series(rows, "hf_prefill", "peak_gib", lambda r: HF_LABEL))

    fig, axes = viz.new_figure(1, 3, width=15.0, height=4.0)
    colors = viz.color_map(prefill)
    viz.plot_latency_vs_context(
        prefill, ylabel="prefill time (s)", title="prefill", colors=colors, ax=axes[0, 0]
    )
    ax = axes[0, 0]
    _guides(ax, prefill.get("dense") or next(iter(prefill.values())))
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    if small:
        viz.plot_latency_vs_context(small, ylabel="ms", title="decode and router", ax=axes[0, 1])
    else:
        axes[0, 1].set_visible(False)
    if peak_series:
        viz.plot_latency_vs_context(
            peak_series, ylabel="GiB", title="peak memory (max over modes)", ax=axes[0, 2]
        )
    else:  # CPU runs report no memory
        axes[0, 2].set_visible(False)
    device = ", ".join(sorted({m.get("device", "?") for m in metas}))
    fig.suptitle(title or f"cost vs prompt length: {device}", fontsize=10)
    return fig
