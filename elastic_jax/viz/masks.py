"""Block masks and 2-D maps: causal block masks, kept fractions, mask images, heatmaps and kept
fraction against sequence length (notebook 03).

Block masks are bool ``[nQb, nKb]`` (one head of ``xattn_select(..., return_mask=True).mask`` or of
``block_mask_from_modes``), query blocks aligned to the end of the key axis.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from elastic_jax.viz.common import (
    SeriesMap,
    as_2d,
    draw_lines,
    grid,
    legend,
    target,
    token_formatter,
)


def causal_block_mask(n_q_blocks: int, n_k_blocks: int) -> np.ndarray:
    """bool [nQb, nKb]: block-level causality with queries aligned to the end of the keys."""
    if n_q_blocks < 1 or n_k_blocks < n_q_blocks:
        raise ValueError(f"need 1 <= nQb <= nKb; got nQb={n_q_blocks}, nKb={n_k_blocks}")
    rows = np.arange(n_q_blocks)[:, None] + (n_k_blocks - n_q_blocks)
    return np.arange(n_k_blocks)[None, :] <= rows


def kept_fraction(mask) -> float:
    """Kept / causal blocks of one block mask [nQb, nKb] (blocks past the diagonal ignored)."""
    m = as_2d("mask", mask).astype(bool)
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
    fig, axes = grid(len(masks), ncols, panel, panel + 0.3)
    for ax, (label, mask) in zip(axes.flat, masks.items()):
        m = as_2d(f"mask {label!r}", mask).astype(bool)
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

    v = as_2d("values", values).astype(float)
    if row_labels is not None and len(row_labels) != v.shape[0]:
        raise ValueError(f"row_labels has {len(row_labels)} entries for {v.shape[0]} rows")
    fig, ax = target(ax, 6.0, 3.0)
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
    fig, ax = target(ax, 6.0, 3.2)
    draw_lines(ax, series, marker="o", colors=colors)
    ax.set_xscale("log", base=2)
    if logy:
        ax.set_yscale("log")
    else:
        ax.set_ylim(0, 1.02)
    ax.set_xlabel("sequence length (tokens)")
    ax.set_ylabel("kept / causal blocks")
    ax.xaxis.set_major_formatter(token_formatter())
    ax.grid(alpha=0.3)
    legend(ax, len(series))
    if title:
        ax.set_title(title, fontsize=9)
    return fig
