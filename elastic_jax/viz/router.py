"""Router decisions: per-layer, per-head prefill modes, kept fractions, sparsity per layer,
token influence on the router and router margins (notebooks 01 and 02).

Head modes ``[L][H]`` are ints: 0 dense, 1 XAttention, -1 streaming (as in
``generate(..., return_info=True).prefill_info[i]["modes"]``); kept fractions ``[L][H]`` are floats
in [0, 1] (``prefill_info[i]["kept_fraction"]``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from elastic_jax.elastic_config import MODE_DENSE, MODE_STREAMING, MODE_XATTN
from elastic_jax.viz.common import as_2d, grid, label_layer_head_axes, legend, target

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
    first = as_2d("modes", next(iter(cases.values())))
    panel_w = max(1.6, 0.28 * first.shape[1] + 0.6)
    panel_h = max(1.4, 0.28 * first.shape[0] + 0.6)
    fig, axes = grid(len(cases), ncols, panel_w, panel_h)
    for ax, (label, modes) in zip(axes.flat, cases.items()):
        m = as_2d(f"modes of {label!r}", modes).astype(int)
        bad = sorted(set(np.unique(m).tolist()) - set(order))
        if bad:
            raise ValueError(f"modes of {label!r} contain {bad}; allowed: {list(order)}")
        ax.imshow(m, cmap=cmap, norm=norm, aspect="auto", interpolation="nearest")
        if annotate and m.size <= 256:
            for (i, j), v in np.ndenumerate(m):
                ax.text(j, i, MODE_LETTERS[int(v)], ha="center", va="center", fontsize=7)
        label_layer_head_axes(ax, label, m.shape)
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
    first = as_2d("kept_fraction", next(iter(cases.values())))
    panel_w = max(1.6, 0.3 * first.shape[1] + 0.6)
    panel_h = max(1.4, 0.3 * first.shape[0] + 0.6)
    fig, axes = grid(len(cases), ncols, panel_w, panel_h)
    image = None
    for ax, (label, kept) in zip(axes.flat, cases.items()):
        k = as_2d(f"kept_fraction of {label!r}", kept).astype(float)
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
        label_layer_head_axes(ax, label, k.shape)
    fig.colorbar(image, ax=axes.ravel().tolist(), label="kept / causal blocks", shrink=0.8)
    if title:
        fig.suptitle(title)
    return fig


def sparsity_per_layer(kept: Sequence[Sequence[float]]) -> np.ndarray:
    """Fraction of causal blocks skipped per layer: ``1 - mean over heads of kept [L][H]``.

    Every head of a sequence has the same number of causal blocks, so the plain mean is exact.
    Returns float [L].
    """
    k = as_2d("kept_fraction", kept).astype(float)
    return 1.0 - k.mean(axis=1)


def plot_sparsity_per_layer(
    cases: Mapping[str, Sequence[Sequence[float]]], *, title: str | None = None, ax=None
):
    """Prefill sparsity per layer (``sparsity_per_layer``) as grouped bars, one colour per case.

    cases: {label: kept_fraction [L][H]}.
    """
    if not cases:
        raise ValueError("cases is empty: pass {label: kept_fraction [L][H]}")
    fig, ax = target(ax, 6.0, 3.0)
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
    legend(ax, len(values))
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
    fig, ax = target(ax, 6.5, 2.8)
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
    fig, ax = target(ax, 6.5, 3.0)
    arrays = {k: as_2d(f"margins of {k!r}", v).astype(float) for k, v in margins.items()}
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
    m = as_2d("modes", modes)
    return {MODE_NAMES[k]: float(np.mean(m == k)) for k in (MODE_DENSE, MODE_XATTN, MODE_STREAMING)}


def plot_mode_mix(rows: Mapping[str, Mapping[str, float]], *, title: str | None = None, ax=None):
    """Stacked bars of head-mode fractions per configuration, with its prefill sparsity.

    rows: {label: {"dense": f, "xattn": f, "streaming": f, "sparsity": s}}; missing modes count
    as 0; "sparsity" (optional) is drawn as a black diamond on the same 0-1 axis.
    """
    if not rows:
        raise ValueError("rows is empty: pass {label: {mode: fraction, 'sparsity': s}}")
    fig, ax = target(ax, max(5.0, 0.9 * len(rows) + 1.5), 3.4)
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
