"""Timing plots: token arrival timelines, latency against context length, speed-ups, TFLOP/s,
decode bandwidth and grouped bars (notebooks 01 and 04). Inputs are series maps
``{label: [(x, y), ...]}`` (``elastic_jax.viz.results.series`` builds them from benchmark rows).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from elastic_jax.viz.common import (
    SeriesMap,
    draw_bars,
    draw_lines,
    legend,
    ordered_xs,
    sort_key,
    target,
    token_formatter,
    x_label,
)


def plot_token_timeline(
    arrivals_ms: Mapping[str, Sequence[float]], *, title: str | None = None, ax=None
):
    """Token index against arrival time (ms since the call started), one line per label.

    arrivals_ms: {label: [t_0, t_1, ...]}; the first point includes prefill (and compile on the
    first call of a shape), the slope after it is the decode rate. Log x axis, so a compile
    spike and a fast decode both stay readable.
    """
    if not arrivals_ms:
        raise ValueError("arrivals_ms is empty: pass {label: [ms, ...]}")
    fig, ax = target(ax, 6.0, 3.0)
    for label, ts in arrivals_ms.items():
        ts = np.asarray(ts, float)
        ax.step(ts, np.arange(1, len(ts) + 1), where="post", label=label, marker=".", ms=3)
    ax.set_xscale("log")
    ax.set_xlabel("time since the call started (ms, log scale)")
    ax.set_ylabel("tokens received")
    ax.grid(alpha=0.3, which="both")
    legend(ax, len(arrivals_ms))
    if title:
        ax.set_title(title, fontsize=9)
    return fig


def plot_latency_vs_context(
    series: SeriesMap,
    *,
    ylabel: str = "latency (ms)",
    title: str | None = None,
    logy: bool = True,
    colors: Mapping[str, Any] | None = None,
    ax=None,
):
    """Latency against context length (log2 x axis), one line per implementation / case.

    series: {label: [(tokens, time), ...]} in one time unit (``ylabel`` names it).
    """
    fig, ax = target(ax, 6.5, 3.6)
    draw_lines(ax, series, marker="o", colors=colors)
    ax.set_xscale("log", base=2)
    if logy:
        ax.set_yscale("log")
    ax.xaxis.set_major_formatter(token_formatter())
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3, which="both")
    legend(ax, len(series))
    if title:
        ax.set_title(title, fontsize=9)
    return fig


def plot_speedup(
    series: SeriesMap,
    *,
    baseline: str,
    title: str | None = None,
    ylabel: str | None = None,
    colors: Mapping[str, Any] | None = None,
    ax=None,
):
    """Speed-up over a baseline series as grouped bars (baseline time / time), per x value.

    series: {label: [(x, time), ...]} in one time unit, including ``baseline``. Bars are drawn
    for every non-baseline point whose x the baseline also has; the 1x line marks the baseline.
    """
    if baseline not in series:
        raise ValueError(f"baseline={baseline!r} is not a series; have {sorted(series)}")
    base = {x: float(y) for x, y in series[baseline]}
    others = {
        k: [(x, base[x] / float(y)) for x, y in v if x in base and float(y) > 0]
        for k, v in series.items()
        if k != baseline
    }
    others = {k: v for k, v in others.items() if v}
    if not others:
        raise ValueError(f"no series shares an x value with baseline={baseline!r}")
    xs = sorted({x for v in others.values() for x, _ in v}, key=sort_key)
    fig, ax = target(ax, max(6.0, 1.2 * len(xs) + 2.5), 3.6)
    draw_bars(ax, others, xs, fmt="{:.2f}x", label_fn=x_label, colors=colors)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_ylabel(ylabel or f"speed-up over {baseline}")
    legend(ax, len(others))
    if title:
        ax.set_title(title, fontsize=9)
    return fig


def plot_tflops(
    series: SeriesMap,
    *,
    peak: Mapping[str, float] | None = None,
    title: str | None = None,
    colors: Mapping[str, Any] | None = None,
    ax=None,
):
    """Achieved TFLOP/s against sequence length, one line per implementation.

    series: {label: [(tokens, tflops), ...]}. peak: optional {label: TFLOP/s} reference lines
    (e.g. a measured GEMM rate).
    """
    fig, ax = target(ax, 6.5, 3.6)
    draw_lines(ax, series, marker="o", colors=colors)
    for i, (label, value) in enumerate((peak or {}).items()):
        ax.axhline(value, color="0.4", ls=("--", ":", "-.")[i % 3], lw=0.9, label=label)
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(token_formatter())
    ax.set_xlabel("sequence length (tokens)")
    ax.set_ylabel("TFLOP/s")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    legend(ax, len(series) + len(peak or {}))
    if title:
        ax.set_title(title, fontsize=9)
    return fig


def plot_bandwidth(
    series: SeriesMap,
    *,
    ceilings: Mapping[str, float] | None = None,
    ylabel: str = "K/V bandwidth (TB/s)",
    title: str | None = None,
    colors: Mapping[str, Any] | None = None,
    ax=None,
):
    """Decode bandwidth as grouped bars: one group per shape, one bar per implementation.

    series: {implementation: [(shape label, TB/s), ...]}. ceilings: optional {label: TB/s}
    horizontal reference lines (e.g. a measured read-only streaming rate).
    """
    xs = ordered_xs(series)
    fig, ax = target(ax, max(6.5, 1.4 * len(xs) + 3.0), 3.8)
    draw_bars(ax, series, xs, fmt="{:.2f}", label_fn=str, colors=colors)
    for i, (label, value) in enumerate((ceilings or {}).items()):
        ax.axhline(value, color="0.3", ls=("--", ":", "-.")[i % 3], lw=0.9, label=label)
    ax.set_ylabel(ylabel)
    legend(ax, len(series) + len(ceilings or {}))
    if title:
        ax.set_title(title, fontsize=9)
    return fig


def plot_grouped_bars(
    series: SeriesMap,
    *,
    ylabel: str,
    fmt: str = "{:.3g}",
    logy: bool = False,
    title: str | None = None,
    colors: Mapping[str, Any] | None = None,
    ax=None,
):
    """Any {label: [(group, value), ...]} as grouped bars (e.g. decode tokens/s per shape, or
    errors per head with ``logy=True``)."""
    xs = ordered_xs(series)
    fig, ax = target(ax, max(6.0, 1.3 * len(xs) + 3.0), 3.6)
    draw_bars(ax, series, xs, fmt=fmt, label_fn=x_label, colors=colors)
    if logy:
        ax.set_yscale("log")
    ax.set_ylabel(ylabel)
    legend(ax, len(series))
    if title:
        ax.set_title(title, fontsize=9)
    return fig
