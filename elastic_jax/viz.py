"""Plot helpers for the research notebooks (``notebooks/``), plus a tolerant benchmark-JSON loader.

matplotlib is imported lazily, inside the helpers, so the package itself does not need it
(``pip install -e ".[notebooks]"`` brings it). Every ``plot_*`` function returns a
``matplotlib.figure.Figure`` built without pyplot (no global figure registry) that renders itself
as a PNG in Jupyter: end a cell with the figure to show it. Each accepts ``ax=`` to draw into an
existing axes instead (then it returns that axes' figure), so notebooks can compose panels with
``new_figure``.

Data conventions (all plain Python / numpy, no JAX):

* head modes ``[L][H]`` ints: 0 dense, 1 XAttention, -1 streaming (as in
  ``generate(..., return_info=True).prefill_info[i]["modes"]``);
* kept fractions ``[L][H]`` floats in [0, 1] (``prefill_info[i]["kept_fraction"]``);
* block masks ``[nQb, nKb]`` bool (one head of ``xattn_select(..., return_mask=True).mask`` or
  of ``block_mask_from_modes``), query blocks aligned to the end of the key axis;
* a *series map* ``{label: [(x, y), ...]}`` for line and bar plots (``series`` builds one from
  benchmark rows).
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from elastic_jax.elastic_config import MODE_DENSE, MODE_STREAMING, MODE_XATTN

# PNG resolution of notebook figures: keeps committed notebooks small (a few tens of KB a plot).
DPI = 80

MODE_NAMES: Mapping[int, str] = {
    MODE_STREAMING: "streaming",
    MODE_DENSE: "dense",
    MODE_XATTN: "xattn",
}
# Colour-blind-safe (ColorBrewer Set2) colours per mode, and a one-letter tag drawn in cells.
MODE_COLORS: Mapping[int, str] = {
    MODE_STREAMING: "#8da0cb",
    MODE_DENSE: "#fc8d62",
    MODE_XATTN: "#66c2a5",
}
MODE_LETTERS: Mapping[int, str] = {MODE_STREAMING: "S", MODE_DENSE: "D", MODE_XATTN: "X"}

SeriesMap = Mapping[str, Sequence[tuple[Any, float]]]

# ------------------------------------------------------------------------------- figures


@functools.cache  # caches one class object (not data): defined on first use, after the import
def _figure_class():
    """A ``Figure`` subclass with ``_repr_png_`` (created on first use: lazy matplotlib import)."""
    from matplotlib.figure import Figure

    class NotebookFigure(Figure):
        """A matplotlib Figure that Jupyter displays as a PNG of ``DPI`` dots per inch."""

        def _repr_png_(self) -> bytes:
            return figure_png(self)

    return NotebookFigure


def new_figure(nrows: int = 1, ncols: int = 1, *, width: float = 6.0, height: float = 3.5):
    """A pyplot-free figure and a 2-D array of axes ``[nrows, ncols]``.

    width / height: inches of the whole figure.
    """
    if nrows < 1 or ncols < 1:
        raise ValueError(f"nrows={nrows}, ncols={ncols} must both be >= 1")
    fig = _figure_class()(figsize=(width, height), dpi=DPI, layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def figure_png(fig, dpi: int = DPI) -> bytes:
    """PNG bytes of ``fig`` (tight bounding box)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    return buf.getvalue()


def _target(ax, width: float, height: float):
    """(figure, axes): the given axes' figure, or a new single-axes figure."""
    if ax is not None:
        return ax.figure, ax
    fig, axes = new_figure(width=width, height=height)
    return fig, axes[0, 0]


def _grid(n: int, ncols: int, panel_w: float, panel_h: float):
    ncols = max(1, min(ncols, n))
    nrows = math.ceil(n / ncols)
    fig, axes = new_figure(nrows, ncols, width=panel_w * ncols + 0.8, height=panel_h * nrows + 0.6)
    for a in axes.flat[n:]:
        a.set_visible(False)
    return fig, axes


def _as_2d(name: str, value) -> np.ndarray:
    arr = np.asarray(value)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be 2-D [rows, cols], got shape {arr.shape}")
    return arr


def _label_layer_head_axes(ax, title: str, shape: tuple[int, int]) -> None:
    """Title, axis names and one tick per cell of a [layers, heads] heatmap."""
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(shape[1]))
    ax.set_yticks(range(shape[0]))
    ax.tick_params(labelsize=7)


# ------------------------------------------------------------------------ router / head modes


def plot_head_modes(
    cases: Mapping[str, Sequence[Sequence[int]]],
    *,
    ncols: int = 4,
    title: str | None = None,
    annotate: bool = True,
):
    """Per-layer, per-head prefill modes, one heatmap per case.

    cases: {label: modes [L][H]} with modes in {0 dense, 1 xattn, -1 streaming}.
    annotate: draw the mode letter (D / X / S) in each cell (skipped above 256 cells).
    """
    from matplotlib.colors import BoundaryNorm, ListedColormap
    from matplotlib.patches import Patch

    if not cases:
        raise ValueError("cases is empty: pass {label: modes [L][H]}")
    order = (MODE_STREAMING, MODE_DENSE, MODE_XATTN)
    cmap = ListedColormap([MODE_COLORS[m] for m in order])
    norm = BoundaryNorm([-1.5, -0.5, 0.5, 1.5], cmap.N)
    first = _as_2d("modes", next(iter(cases.values())))
    panel_w = max(1.6, 0.28 * first.shape[1] + 0.6)
    panel_h = max(1.4, 0.28 * first.shape[0] + 0.6)
    fig, axes = _grid(len(cases), ncols, panel_w, panel_h)
    for ax, (label, modes) in zip(axes.flat, cases.items()):
        m = _as_2d(f"modes of {label!r}", modes).astype(int)
        bad = sorted(set(np.unique(m).tolist()) - set(order))
        if bad:
            raise ValueError(f"modes of {label!r} contain {bad}; allowed: {list(order)}")
        ax.imshow(m, cmap=cmap, norm=norm, aspect="auto", interpolation="nearest")
        if annotate and m.size <= 256:
            for (i, j), v in np.ndenumerate(m):
                ax.text(j, i, MODE_LETTERS[int(v)], ha="center", va="center", fontsize=7)
        _label_layer_head_axes(ax, label, m.shape)
    fig.legend(
        handles=[Patch(color=MODE_COLORS[k], label=MODE_NAMES[k]) for k in order],
        loc="outside lower center",
        ncols=3,
        fontsize=8,
    )
    if title:
        fig.suptitle(title)
    return fig


def plot_kept_fraction(
    cases: Mapping[str, Sequence[Sequence[float]]],
    *,
    ncols: int = 4,
    title: str | None = None,
    annotate: bool = True,
):
    """Per-layer, per-head kept fraction of causal attention blocks, one heatmap per case.

    cases: {label: kept [L][H]} with values in [0, 1] (1 = dense).
    """
    if not cases:
        raise ValueError("cases is empty: pass {label: kept_fraction [L][H]}")
    first = _as_2d("kept_fraction", next(iter(cases.values())))
    panel_w = max(1.6, 0.3 * first.shape[1] + 0.6)
    panel_h = max(1.4, 0.3 * first.shape[0] + 0.6)
    fig, axes = _grid(len(cases), ncols, panel_w, panel_h)
    image = None
    for ax, (label, kept) in zip(axes.flat, cases.items()):
        k = _as_2d(f"kept_fraction of {label!r}", kept).astype(float)
        image = ax.imshow(k, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
        if annotate and k.size <= 256:
            for (i, j), v in np.ndenumerate(k):
                ax.text(
                    j,
                    i,
                    f"{v:.2f}"[1:] if v < 1 else "1",
                    ha="center",
                    va="center",
                    fontsize=6,
                    color="white" if v < 0.6 else "black",
                )
        _label_layer_head_axes(ax, label, k.shape)
    fig.colorbar(image, ax=axes.ravel().tolist(), label="kept / causal blocks", shrink=0.8)
    if title:
        fig.suptitle(title)
    return fig


def sparsity_per_layer(kept: Sequence[Sequence[float]]) -> np.ndarray:
    """Fraction of causal blocks skipped per layer: ``1 - mean over heads of kept [L][H]``.

    Every head of a sequence has the same number of causal blocks, so the plain mean is exact.
    Returns float [L].
    """
    k = _as_2d("kept_fraction", kept).astype(float)
    return 1.0 - k.mean(axis=1)


def plot_sparsity_per_layer(
    cases: Mapping[str, Sequence[Sequence[float]]], *, title: str | None = None, ax=None
):
    """Prefill sparsity per layer (``sparsity_per_layer``) as grouped bars, one colour per case.

    cases: {label: kept_fraction [L][H]}.
    """
    if not cases:
        raise ValueError("cases is empty: pass {label: kept_fraction [L][H]}")
    fig, ax = _target(ax, 6.0, 3.0)
    values = {label: sparsity_per_layer(k) for label, k in cases.items()}
    num_layers = max(len(v) for v in values.values())
    width = 0.8 / len(values)
    for i, (label, v) in enumerate(values.items()):
        ax.bar(np.arange(len(v)) + (i - (len(values) - 1) / 2) * width, v, width, label=label)
    ax.set_xticks(range(num_layers))
    ax.set_xlabel("layer")
    ax.set_ylabel("skipped / causal blocks")
    ax.set_ylim(0, 1)
    ax.grid(axis="y", alpha=0.3)
    _legend(ax, len(values))
    if title:
        ax.set_title(title)
    return fig


def plot_token_influence(
    curves: Mapping[str, Sequence[float]],
    *,
    length: int,
    pool_tokens: int = 100,
    title: str | None = None,
    ax=None,
):
    """How much each token position moves the router's decision, one curve per label.

    curves: {label: influence [T]} (e.g. the norm of d(router margin)/d(key_t) per position).
    length: the prompt length; the pooled windows ``[0, pool_tokens)`` and
      ``[length - pool_tokens, length)`` of ctx_q pooling are shaded.
    """
    if not curves:
        raise ValueError("curves is empty: pass {label: influence [T]}")
    fig, ax = _target(ax, 6.5, 2.8)
    for side in ((0, min(pool_tokens, length)), (max(0, length - pool_tokens), length)):
        ax.axvspan(*side, color="0.9", zorder=0)
    for label, y in curves.items():
        y = np.asarray(y, float)
        ax.plot(np.arange(len(y)), y, label=label, lw=1)
    ax.set_xlim(0, length)
    ax.set_xlabel("token position")
    ax.set_ylabel("influence on router logit")
    ax.legend(fontsize=7, ncols=2)
    ax.set_title(title or f"shaded: first / last {pool_tokens} tokens (ctx_q pooling)", fontsize=9)
    return fig


def plot_router_margins(
    margins: Mapping[str, Sequence[Sequence[float]]], *, title: str | None = None, ax=None
):
    """Router logit margins (class 1 minus class 0) per KV head, as a strip plot per variant.

    margins: {variant: margin [N, K]} over N prompts; a margin > 0 means class 1 ("retrieval"
    head, ``retrieval_mode``), <= 0 class 0 (``toggle_type``).
    """
    if not margins:
        raise ValueError("margins is empty: pass {variant: margin [N, K]}")
    fig, ax = _target(ax, 6.5, 3.0)
    arrays = {k: _as_2d(f"margins of {k!r}", v).astype(float) for k, v in margins.items()}
    num_kv = max(a.shape[1] for a in arrays.values())
    width = 0.8 / len(arrays)
    for i, (label, a) in enumerate(arrays.items()):
        offset = (i - (len(arrays) - 1) / 2) * width
        # Deterministic horizontal spread so overlapping points stay visible.
        spread = np.linspace(-0.3, 0.3, a.shape[0]) * width
        xs = np.arange(a.shape[1])[None, :] + offset + spread[:, None]
        ax.scatter(xs.ravel(), a.ravel(), s=10, label=label, alpha=0.8)
    ax.axhline(0.0, color="k", lw=0.8)
    ax.set_xticks(range(num_kv))
    ax.set_xlabel("KV head")
    ax.set_ylabel("logit margin (class 1 - class 0)")
    ax.legend(fontsize=7, ncols=2)
    if title:
        ax.set_title(title, fontsize=9)
    return fig


def mode_fractions(modes: Sequence[Sequence[int]]) -> dict[str, float]:
    """{"dense", "xattn", "streaming"} -> fraction of (layer, head) pairs in that mode."""
    m = _as_2d("modes", modes)
    return {MODE_NAMES[k]: float(np.mean(m == k)) for k in (MODE_DENSE, MODE_XATTN, MODE_STREAMING)}


def plot_mode_mix(rows: Mapping[str, Mapping[str, float]], *, title: str | None = None, ax=None):
    """Stacked bars of head-mode fractions per configuration, with its prefill sparsity.

    rows: {label: {"dense": f, "xattn": f, "streaming": f, "sparsity": s}}; missing modes count
    as 0; "sparsity" (optional) is drawn as a black diamond on the same 0-1 axis.
    """
    if not rows:
        raise ValueError("rows is empty: pass {label: {mode: fraction, 'sparsity': s}}")
    fig, ax = _target(ax, max(5.0, 0.9 * len(rows) + 1.5), 3.4)
    labels = list(rows)
    x = np.arange(len(labels))
    bottom = np.zeros(len(labels))
    for mode in (MODE_DENSE, MODE_XATTN, MODE_STREAMING):
        name = MODE_NAMES[mode]
        vals = np.array([float(rows[k].get(name, 0.0)) for k in labels])
        ax.bar(x, vals, 0.6, bottom=bottom, color=MODE_COLORS[mode], label=f"{name} heads")
        bottom += vals
    sp = [rows[k].get("sparsity") for k in labels]
    if any(s is not None for s in sp):
        xs = [i for i, s in enumerate(sp) if s is not None]
        ys = [float(s) for s in sp if s is not None]
        ax.scatter(xs, ys, marker="D", color="k", zorder=3, label="prefill sparsity")
        for xi, yi in zip(xs, ys):
            ax.annotate(
                f"{yi:.2f}", (xi, yi), textcoords="offset points", xytext=(8, -3), fontsize=7
            )
    ax.set_xticks(x, labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("fraction")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    if title:
        ax.set_title(title, fontsize=9)
    return fig


# --------------------------------------------------------------------------------- block masks


def causal_block_mask(n_q_blocks: int, n_k_blocks: int) -> np.ndarray:
    """bool [nQb, nKb]: block-level causality with queries aligned to the end of the keys."""
    if n_q_blocks < 1 or n_k_blocks < n_q_blocks:
        raise ValueError(f"need 1 <= nQb <= nKb; got nQb={n_q_blocks}, nKb={n_k_blocks}")
    rows = np.arange(n_q_blocks)[:, None] + (n_k_blocks - n_q_blocks)
    return np.arange(n_k_blocks)[None, :] <= rows


def kept_fraction(mask) -> float:
    """Kept / causal blocks of one block mask [nQb, nKb] (blocks past the diagonal ignored)."""
    m = _as_2d("mask", mask).astype(bool)
    causal = causal_block_mask(*m.shape)
    return float((m & causal).sum() / causal.sum())


def plot_block_masks(
    masks: Mapping[str, Any], *, ncols: int = 4, title: str | None = None, panel: float = 2.0
):
    """Block masks as images: kept blocks dark, skipped causal blocks light, non-causal white.

    masks: {label: bool [nQb, nKb]}; each panel's title gets its kept fraction of causal blocks.
    """
    from matplotlib.colors import ListedColormap

    if not masks:
        raise ValueError("masks is empty: pass {label: bool [nQb, nKb]}")
    cmap = ListedColormap(["white", "#dde6f0", "#2b5c8a"])
    fig, axes = _grid(len(masks), ncols, panel, panel + 0.3)
    for ax, (label, mask) in zip(axes.flat, masks.items()):
        m = _as_2d(f"mask {label!r}", mask).astype(bool)
        causal = causal_block_mask(*m.shape)
        img = np.where(causal, np.where(m, 2, 1), 0)
        ax.imshow(img, cmap=cmap, vmin=0, vmax=2, interpolation="nearest")
        ax.set_title(f"{label}\nkept {kept_fraction(m):.0%}", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0, 0].set_ylabel("query block")
    axes[-1, 0].set_xlabel("key block")
    if title:
        fig.suptitle(title)
    return fig


def plot_heatmap(
    values,
    *,
    title: str | None = None,
    xlabel: str = "",
    ylabel: str = "",
    colorbar: str = "",
    cmap: str = "magma",
    log: bool = False,
    row_labels: Sequence[str] | None = None,
    ax=None,
):
    """A single 2-D array as a heatmap (e.g. |kernel - reference| per head and token).

    values: [rows, cols] floats. log: logarithmic colour scale (zeros drawn at the smallest
    positive value). row_labels: one tick label per row (default: row indices when few rows).
    """
    from matplotlib.colors import LogNorm

    v = _as_2d("values", values).astype(float)
    if row_labels is not None and len(row_labels) != v.shape[0]:
        raise ValueError(f"row_labels has {len(row_labels)} entries for {v.shape[0]} rows")
    fig, ax = _target(ax, 6.0, 3.0)
    norm = None
    if log:
        positive = v[v > 0]
        floor = float(positive.min()) if positive.size else 1e-12
        norm = LogNorm(vmin=floor, vmax=max(float(v.max()), floor * 10))
        v = np.maximum(v, floor)
    image = ax.imshow(v, aspect="auto", cmap=cmap, norm=norm, interpolation="nearest")
    fig.colorbar(image, ax=ax, label=colorbar)
    if row_labels is not None or v.shape[0] <= 16:
        ax.set_yticks(range(v.shape[0]), row_labels or [str(i) for i in range(v.shape[0])])
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=9)
    return fig


def plot_kept_vs_length(
    series: SeriesMap,
    *,
    title: str | None = None,
    logy: bool = False,
    colors: Mapping[str, Any] | None = None,
    ax=None,
):
    """Kept fraction of causal blocks against sequence length, one line per configuration.

    series: {label: [(tokens, kept_fraction), ...]}.
    """
    fig, ax = _target(ax, 6.0, 3.2)
    _draw_lines(ax, series, marker="o", colors=colors)
    ax.set_xscale("log", base=2)
    if logy:
        ax.set_yscale("log")
    else:
        ax.set_ylim(0, 1.02)
    ax.set_xlabel("sequence length (tokens)")
    ax.set_ylabel("kept / causal blocks")
    ax.xaxis.set_major_formatter(_token_formatter())
    ax.grid(alpha=0.3)
    _legend(ax, len(series))
    if title:
        ax.set_title(title, fontsize=9)
    return fig


# ---------------------------------------------------------------------------- timings (01, 04)


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
    fig, ax = _target(ax, 6.0, 3.0)
    for label, ts in arrivals_ms.items():
        ts = np.asarray(ts, float)
        ax.step(ts, np.arange(1, len(ts) + 1), where="post", label=label, marker=".", ms=3)
    ax.set_xscale("log")
    ax.set_xlabel("time since the call started (ms, log scale)")
    ax.set_ylabel("tokens received")
    ax.grid(alpha=0.3, which="both")
    _legend(ax, len(arrivals_ms))
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
    fig, ax = _target(ax, 6.5, 3.6)
    _draw_lines(ax, series, marker="o", colors=colors)
    ax.set_xscale("log", base=2)
    if logy:
        ax.set_yscale("log")
    ax.xaxis.set_major_formatter(_token_formatter())
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3, which="both")
    _legend(ax, len(series))
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
    xs = sorted({x for v in others.values() for x, _ in v}, key=_sort_key)
    fig, ax = _target(ax, max(6.0, 1.2 * len(xs) + 2.5), 3.6)
    _draw_bars(ax, others, xs, fmt="{:.2f}x", label_fn=_x_label, colors=colors)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_ylabel(ylabel or f"speed-up over {baseline}")
    _legend(ax, len(others))
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
    fig, ax = _target(ax, 6.5, 3.6)
    _draw_lines(ax, series, marker="o", colors=colors)
    for i, (label, value) in enumerate((peak or {}).items()):
        ax.axhline(value, color="0.4", ls=("--", ":", "-.")[i % 3], lw=0.9, label=label)
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(_token_formatter())
    ax.set_xlabel("sequence length (tokens)")
    ax.set_ylabel("TFLOP/s")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    _legend(ax, len(series) + len(peak or {}))
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
    xs = _ordered_xs(series)
    fig, ax = _target(ax, max(6.5, 1.4 * len(xs) + 3.0), 3.8)
    _draw_bars(ax, series, xs, fmt="{:.2f}", label_fn=str, colors=colors)
    for i, (label, value) in enumerate((ceilings or {}).items()):
        ax.axhline(value, color="0.3", ls=("--", ":", "-.")[i % 3], lw=0.9, label=label)
    ax.set_ylabel(ylabel)
    _legend(ax, len(series) + len(ceilings or {}))
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
    xs = _ordered_xs(series)
    fig, ax = _target(ax, max(6.0, 1.3 * len(xs) + 3.0), 3.6)
    _draw_bars(ax, series, xs, fmt=fmt, label_fn=_x_label, colors=colors)
    if logy:
        ax.set_yscale("log")
    ax.set_ylabel(ylabel)
    _legend(ax, len(series))
    if title:
        ax.set_title(title, fontsize=9)
    return fig


def _legend(ax, n: int) -> None:
    """Small legend inside the axes for a few entries, right of it for many."""
    if n > 4:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    else:
        ax.legend(fontsize=7)


def color_map(labels: Iterable[str]) -> dict[str, Any]:
    """{label: colour} from matplotlib's default cycle (tab10, then tab20), in order; pass it as
    ``colors=`` to several plots so a label has the same colour in every panel."""
    from matplotlib import colormaps

    labels = list(dict.fromkeys(labels))
    palette = colormaps["tab10" if len(labels) <= 10 else "tab20"].colors
    return {label: palette[i % len(palette)] for i, label in enumerate(labels)}


def figure_legend(fig, *, ncols: int = 1, fontsize: int = 7):
    """Replace the per-axes legends of ``fig`` by one legend right of the figure holding every
    distinct label once (for multi-panel figures). Returns ``fig``."""
    handles: dict[str, Any] = {}
    for ax in fig.axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
        if ax.get_legend() is not None:
            ax.get_legend().remove()
    fig.legend(
        handles.values(), handles.keys(), loc="outside right upper", ncols=ncols, fontsize=fontsize
    )
    return fig


def _draw_lines(ax, series: SeriesMap, marker: str, colors: Mapping[str, Any] | None = None):
    if not series:
        raise ValueError("series is empty: pass {label: [(x, y), ...]}")
    for label, pts in series.items():
        pts = sorted(pts, key=lambda p: _sort_key(p[0]))
        if pts:
            color = None if colors is None else colors.get(label)
            ax.plot(
                [p[0] for p in pts],
                [p[1] for p in pts],
                marker=marker,
                ms=4,
                label=label,
                color=color,
            )


def _draw_bars(
    ax, series: SeriesMap, xs: Sequence, fmt: str, label_fn, colors: Mapping[str, Any] | None = None
) -> None:
    if not series:
        raise ValueError("series is empty: pass {label: [(x, y), ...]}")
    width = 0.8 / len(series)
    pos = {x: i for i, x in enumerate(xs)}
    for j, (label, pts) in enumerate(series.items()):
        pts = [(x, y) for x, y in pts if x in pos and y is not None]
        offs = [(pos[x] + (j - (len(series) - 1) / 2) * width, float(y)) for x, y in pts]
        color = None if colors is None else colors.get(label)
        bars = ax.bar([o[0] for o in offs], [o[1] for o in offs], width, label=label, color=color)
        if len(series) * len(xs) <= 24:
            ax.bar_label(
                bars, labels=[fmt.format(o[1]) for o in offs], fontsize=6, rotation=90, padding=2
            )
    ax.set_xticks(range(len(xs)), [label_fn(x) for x in xs], fontsize=8)
    ax.margins(y=0.15)
    ax.grid(axis="y", alpha=0.3)


def _ordered_xs(series: SeriesMap) -> list:
    """x values in first-appearance order (categories) or sorted (numbers)."""
    xs: list = []
    for pts in series.values():
        for x, _ in pts:
            if x not in xs:
                xs.append(x)
    if all(isinstance(x, (int, float)) for x in xs):
        xs.sort()
    return xs


def _sort_key(x):
    return (0, float(x), "") if isinstance(x, (int, float)) else (1, 0.0, str(x))


def format_tokens(n: float) -> str:
    """1024 -> "1K", 131072 -> "128K", 1536 -> "1.5K", 100 -> "100"."""
    n = float(n)
    if n >= 1024 and n % 1024 == 0:
        return f"{int(n) // 1024}K"
    if n >= 1024:
        return f"{n / 1024:.1f}K"
    return f"{n:g}"


def format_number(v: float, digits: int = 3) -> str:
    """``digits`` significant digits without exponents for ordinary magnitudes:
    1675.4 -> "1675", 12.345 -> "12.3", 0.04431 -> "0.0443", 2.5e-7 -> "2.5e-07"."""
    v = float(v)
    if not math.isfinite(v) or v == 0:
        return f"{v:g}"
    magnitude = math.floor(math.log10(abs(v)))
    if magnitude >= digits - 1 and abs(v) < 1e15:
        return f"{v:.0f}"
    if magnitude >= -4:
        return f"{v:.{max(0, digits - 1 - magnitude)}f}"
    return f"{v:.{digits - 1}e}"


def _x_label(x) -> str:
    return format_tokens(x) if isinstance(x, (int, float)) else str(x)


def _token_formatter():
    from matplotlib.ticker import FuncFormatter

    return FuncFormatter(lambda v, _pos: format_tokens(v))


# ------------------------------------------------------------------- benchmark results (04)


@dataclasses.dataclass(frozen=True)
class ResultTable:
    """One list of row dicts found in a benchmark JSON file.

    source: file stem (``engine_8b_prefill``); name: where the list sits in the file (``rows``,
    ``prefill``, ``table``; ``""`` for a top-level list); meta: the file's metadata dict
    (``meta`` / ``env`` / ``versions``), possibly empty.
    """

    source: str
    name: str
    rows: tuple[Mapping[str, Any], ...]
    meta: Mapping[str, Any]

    @property
    def columns(self) -> frozenset[str]:
        return frozenset(k for r in self.rows for k in r)

    @property
    def device(self) -> str | None:
        d = self.meta.get("device") or self.meta.get("torch_device")
        return None if d is None else str(d)


@dataclasses.dataclass(frozen=True)
class BenchmarkResults:
    """Tables of every readable ``*.json`` in a directory. files: the JSON files read (sorted);
    skipped: ``"name: reason"`` for files that could not be used."""

    tables: tuple[ResultTable, ...]
    files: tuple[str, ...]
    skipped: tuple[str, ...]

    def __bool__(self) -> bool:
        return bool(self.tables)


_META_KEYS = ("meta", "env", "versions", "environment")


def load_benchmark_results(directory: str | Path) -> BenchmarkResults:
    """Read every ``*.json`` in ``directory`` (non-recursive) into ``ResultTable``s.

    Tolerant by design (benchmarks change their output): a missing directory gives empty
    results; unreadable or non-JSON files are listed in ``skipped``; any list of dicts at any
    depth (up to 4 levels) becomes a table named by its key path (``"a.b"``), its rows the dicts
    that hold at least one number. Nothing is assumed about column names.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return BenchmarkResults((), (), ())
    tables: list[ResultTable] = []
    files: list[str] = []
    skipped: list[str] = []
    for path in sorted(directory.glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            skipped.append(f"{path.name}: {type(e).__name__}: {e}")
            continue
        files.append(path.name)
        meta: dict[str, Any] = {}
        if isinstance(data, dict):
            for key in _META_KEYS:
                if isinstance(data.get(key), dict):
                    meta = {k: v for k, v in data[key].items() if not isinstance(v, (dict, list))}
                    break
        found = [
            ResultTable(path.stem, name, rows, meta) for name, rows in _find_row_lists(data, "", 0)
        ]
        if not found:
            skipped.append(f"{path.name}: no list of result rows found")
        tables.extend(found)
    return BenchmarkResults(tuple(tables), tuple(files), tuple(skipped))


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _find_row_lists(data, prefix: str, depth: int) -> Iterable[tuple[str, tuple[dict, ...]]]:
    if depth > 4:
        return
    if isinstance(data, list):
        rows = tuple(r for r in data if isinstance(r, dict) and any(map(_is_number, r.values())))
        if rows:
            yield prefix, rows
        return
    if isinstance(data, dict):
        for key, value in data.items():
            if key in _META_KEYS:
                continue
            yield from _find_row_lists(value, f"{prefix}.{key}" if prefix else str(key), depth + 1)


def find_tables(
    results: BenchmarkResults | Iterable[ResultTable],
    *columns: str,
    source: str | None = None,
) -> list[ResultTable]:
    """Tables having every column in ``columns`` (and whose source contains ``source``)."""
    tables = results.tables if isinstance(results, BenchmarkResults) else tuple(results)
    return [
        t for t in tables if set(columns) <= t.columns and (source is None or source in t.source)
    ]


Key = str | Sequence[str] | Callable[[Mapping[str, Any]], Any]


def _get(row: Mapping[str, Any], key: Key):
    """A row's value for ``key``: a column name, the first present of several, or a function."""
    if callable(key):
        return key(row)
    if isinstance(key, str):
        return row.get(key)
    for k in key:
        if row.get(k) is not None:
            return row[k]
    return None


def time_ms(row: Mapping[str, Any]) -> float | None:
    """A row's time in milliseconds from whichever of ms / s / seconds / us it carries."""
    for key, scale in (("ms", 1.0), ("s", 1e3), ("seconds", 1e3), ("us", 1e-3)):
        if _is_number(row.get(key)):
            return float(row[key]) * scale
    return None


def series(
    rows: Iterable[Mapping[str, Any]],
    *,
    x: Key,
    y: Key,
    label: Key,
    where: Callable[[Mapping[str, Any]], bool] | None = None,
) -> dict[str, list[tuple[Any, float]]]:
    """A series map ``{label: [(x, y), ...]}`` from benchmark rows.

    x, y, label: a column name, a tuple of candidate names (first present wins) or a function
    of the row. Rows without a finite numeric y or without x are skipped (e.g. an OOM row with
    ``ms: null``), as are rows ``where`` rejects. Points keep row order; a repeated (label, x)
    keeps the last value.
    """
    out: dict[str, dict[Any, float]] = {}
    for row in rows:
        if where is not None and not where(row):
            continue
        xv, yv = _get(row, x), _get(row, y)
        if xv is None or not _is_number(yv):
            continue
        out.setdefault(str(_get(row, label)), {})[xv] = float(yv)
    return {k: list(v.items()) for k, v in out.items()}


def markdown_table(
    rows: Iterable[Mapping[str, Any]],
    columns: Sequence[str | tuple[str, Key]],
    *,
    digits: int = 3,
) -> str:
    """A Markdown table of ``rows``; columns: names, or (header, key) with key as in ``series``.

    Floats are shown with ``digits`` significant digits; missing values as an empty cell.
    """
    cols = [(c, c) if isinstance(c, str) else c for c in columns]
    lines = ["| " + " | ".join(h for h, _ in cols) + " |", "|" + "---|" * len(cols)]
    for row in rows:
        cells = []
        for _, key in cols:
            v = _get(row, key)
            if v is None:
                cells.append("")
            elif isinstance(v, float):
                cells.append(format_number(v, digits))
            else:
                cells.append(str(v).replace("|", "/"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
