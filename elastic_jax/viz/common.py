"""Shared pieces of the plot helpers: pyplot-free figures that render as PNG in Jupyter,
panel grids, legends, colours, line / bar drawing and number formatting.

matplotlib is imported inside the functions (lazily), so importing ``elastic_jax.viz`` does not
need it.
"""

from __future__ import annotations

import functools
import io
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

# PNG resolution of notebook figures: keeps committed notebooks small (a few tens of KB a plot).
DPI = 80

# {label: [(x, y), ...]}: the input of every line / bar plot (``results.series`` builds one).
SeriesMap = Mapping[str, Sequence[tuple[Any, float]]]


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


def target(ax, width: float, height: float):
    """(figure, axes): the given axes' figure, or a new single-axes figure."""
    if ax is not None:
        return ax.figure, ax
    fig, axes = new_figure(width=width, height=height)
    return fig, axes[0, 0]


def grid(n: int, ncols: int, panel_w: float, panel_h: float):
    ncols = max(1, min(ncols, n))
    nrows = math.ceil(n / ncols)
    fig, axes = new_figure(nrows, ncols, width=panel_w * ncols + 0.8, height=panel_h * nrows + 0.6)
    for a in axes.flat[n:]:
        a.set_visible(False)
    return fig, axes


def as_2d(name: str, value) -> np.ndarray:
    arr = np.asarray(value)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be 2-D [rows, cols], got shape {arr.shape}")
    return arr


def label_layer_head_axes(ax, title: str, shape: tuple[int, int]) -> None:
    """Title, axis names and one tick per cell of a [layers, heads] heatmap."""
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(shape[1]))
    ax.set_yticks(range(shape[0]))
    ax.tick_params(labelsize=7)


def legend(ax, n: int) -> None:
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


def draw_lines(ax, series: SeriesMap, marker: str, colors: Mapping[str, Any] | None = None):
    if not series:
        raise ValueError("series is empty: pass {label: [(x, y), ...]}")
    for label, pts in series.items():
        pts = sorted(pts, key=lambda p: sort_key(p[0]))
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


def draw_bars(
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


def ordered_xs(series: SeriesMap) -> list:
    """x values in first-appearance order (categories) or sorted (numbers)."""
    xs: list = []
    for pts in series.values():
        for x, _ in pts:
            if x not in xs:
                xs.append(x)
    if all(isinstance(x, (int, float)) for x in xs):
        xs.sort()
    return xs


def sort_key(x):
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


def x_label(x) -> str:
    return format_tokens(x) if isinstance(x, (int, float)) else str(x)


def token_formatter():
    from matplotlib.ticker import FuncFormatter

    return FuncFormatter(lambda v, _pos: format_tokens(v))
