"""Unit tests of ``elastic_jax.viz``: plot helpers draw what they are given (Agg, no display) and
the benchmark loader tolerates whatever JSON the benchmarks write."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("MPLBACKEND", "Agg")
pytest.importorskip("matplotlib")

from elastic_jax import viz  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
REPO = Path(__file__).resolve().parents[1]


def test_import_does_not_load_matplotlib():
    code = "import sys, elastic_jax.viz; print('matplotlib' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO
    )
    assert out.stdout.strip() == "False"


def test_figures_render_as_png_in_notebooks():
    fig, axes = viz.new_figure(1, 2, width=3, height=2)
    assert axes.shape == (1, 2)
    png = fig._repr_png_()
    assert png.startswith(PNG_MAGIC)
    assert viz.figure_png(fig, dpi=40).startswith(PNG_MAGIC)
    assert len(viz.figure_png(fig, dpi=40)) < len(png)  # lower dpi, fewer bytes
    with pytest.raises(ValueError, match="nrows=0"):
        viz.new_figure(0, 1)


# ------------------------------------------------------------------------------- router plots


def test_plot_head_modes_draws_the_modes():
    modes = [[0, 1, -1, 1], [-1, -1, 0, 0]]
    fig = viz.plot_head_modes({"a": modes, "b": [[1, 1, 1, 1], [0, 0, 0, 0]]}, ncols=2)
    axes = [a for a in fig.axes if a.get_visible()]
    np.testing.assert_array_equal(np.asarray(axes[0].images[0].get_array()), modes)
    assert [a.get_title() for a in axes] == ["a", "b"]
    letters = [t.get_text() for t in axes[0].texts]
    assert letters == ["D", "X", "S", "X", "S", "S", "D", "D"]
    assert fig._repr_png_().startswith(PNG_MAGIC)


def test_plot_head_modes_rejects_bad_input():
    with pytest.raises(ValueError, match=r"contain \[2\]"):
        viz.plot_head_modes({"x": [[0, 2]]})
    with pytest.raises(ValueError, match="2-D"):
        viz.plot_head_modes({"x": [0, 1]})
    with pytest.raises(ValueError, match="empty"):
        viz.plot_head_modes({})


def test_kept_fraction_and_sparsity_per_layer():
    kept = [[1.0, 0.5], [0.25, 0.25]]
    fig = viz.plot_kept_fraction({"k": kept})
    np.testing.assert_allclose(np.asarray(fig.axes[0].images[0].get_array()), kept)
    np.testing.assert_allclose(viz.sparsity_per_layer(kept), [0.25, 0.75])
    fig = viz.plot_sparsity_per_layer({"k": kept, "dense": [[1.0, 1.0], [1.0, 1.0]]})
    heights = [p.get_height() for p in fig.axes[0].patches]
    np.testing.assert_allclose(heights, [0.25, 0.75, 0.0, 0.0])


def test_mode_fractions_and_mode_mix():
    fr = viz.mode_fractions([[0, 1, 1, -1]])
    assert fr == {"dense": 0.25, "xattn": 0.5, "streaming": 0.25}
    fig = viz.plot_mode_mix({"p": {**fr, "sparsity": 0.4}, "q": {"dense": 1.0}})
    ax = fig.axes[0]
    # Stacked bars: dense then xattn then streaming, bottoms accumulate.
    bars = [(p.get_x() + p.get_width() / 2, p.get_y(), p.get_height()) for p in ax.patches]
    assert bars[0][1:] == (0.0, 0.25) and bars[2][1:] == (0.25, 0.5)
    assert bars[4][1:] == (0.75, 0.25)
    offsets = ax.collections[0].get_offsets()
    np.testing.assert_allclose(offsets, [[0, 0.4]])


def test_token_influence_and_router_margins():
    fig = viz.plot_token_influence(
        {"h0": np.r_[np.ones(5), np.zeros(10), np.ones(5)]}, length=20, pool_tokens=5
    )
    ax = fig.axes[0]
    assert len(ax.patches) == 2  # the two shaded pooled windows
    np.testing.assert_allclose(ax.lines[0].get_ydata()[:6], [1, 1, 1, 1, 1, 0])
    margins = {"a": np.array([[0.5, -1.0], [1.5, -2.0]]), "b": np.zeros((3, 2))}
    fig = viz.plot_router_margins(margins)
    ys = np.asarray(fig.axes[0].collections[0].get_offsets())[:, 1]
    np.testing.assert_allclose(sorted(ys), sorted(margins["a"].ravel()))


# ------------------------------------------------------------------------------- block masks


def test_causal_block_mask_and_kept_fraction():
    np.testing.assert_array_equal(
        viz.causal_block_mask(2, 3), [[True, True, False], [True, True, True]]
    )
    mask = np.tril(np.ones((4, 4), bool))
    assert viz.kept_fraction(mask) == 1.0
    mask[3, 1:3] = False
    assert viz.kept_fraction(mask) == pytest.approx(8 / 10)
    above = np.ones((4, 4), bool)  # blocks past the diagonal do not count
    assert viz.kept_fraction(above) == 1.0
    with pytest.raises(ValueError, match="nQb <= nKb"):
        viz.causal_block_mask(3, 2)


def test_plot_block_masks_levels_and_titles():
    mask = np.array([[1, 0, 0], [0, 1, 0], [1, 0, 1]], bool)
    fig = viz.plot_block_masks({"m": mask})
    img = np.asarray(fig.axes[0].images[0].get_array())
    # 2 kept, 1 causal but skipped, 0 above the diagonal.
    np.testing.assert_array_equal(img, [[2, 0, 0], [1, 2, 0], [2, 1, 2]])
    assert fig.axes[0].get_title() == "m\nkept 67%"


def test_plot_heatmap_and_kept_vs_length():
    err = np.array([[0.0, 1e-6], [2e-6, 4e-6]])
    fig = viz.plot_heatmap(err, log=True, row_labels=["x", "y"])
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["x", "y"]
    with pytest.raises(ValueError, match="row_labels"):
        viz.plot_heatmap(err, row_labels=["x"])
    fig = viz.plot_kept_vs_length({"s": [(4096, 0.2), (1024, 0.5)]})
    np.testing.assert_allclose(fig.axes[0].lines[0].get_xdata(), [1024, 4096])  # sorted by x


# ------------------------------------------------------------------------------ timing plots


def test_plot_speedup_bars_are_baseline_over_time():
    s = {"dense": [(1024, 10.0), (2048, 40.0)], "sparse": [(1024, 5.0), (2048, 10.0), (4096, 1)]}
    fig = viz.plot_speedup(s, baseline="dense")
    heights = [p.get_height() for p in fig.axes[0].patches]
    np.testing.assert_allclose(heights, [2.0, 4.0])  # 4096 has no baseline: no bar
    with pytest.raises(ValueError, match="baseline='nope'"):
        viz.plot_speedup(s, baseline="nope")


def test_line_plots_and_colors():
    colors = viz.color_map(["a", "b", "a"])
    assert list(colors) == ["a", "b"] and colors["a"] != colors["b"]
    fig = viz.plot_latency_vs_context({"b": [(2048, 3.0), (1024, 1.0)]}, colors=colors)
    line = fig.axes[0].lines[0]
    np.testing.assert_allclose(line.get_ydata(), [1.0, 3.0])
    assert tuple(line.get_color()[:3]) == tuple(colors["b"][:3])
    fig = viz.plot_tflops({"k": [(8192, 500.0)]}, peak={"GEMM": 660.0})
    assert fig.axes[0].lines[-1].get_ydata()[0] == 660.0
    fig = viz.plot_token_timeline({"warm": [1.0, 2.0, 4.0]})
    np.testing.assert_allclose(fig.axes[0].lines[0].get_ydata(), [1, 2, 3])
    with pytest.raises(ValueError, match="empty"):
        viz.plot_latency_vs_context({})


def test_bar_plots_and_shared_legend():
    s = {"ours": [("64K, B=1", 2.1), ("64K, B=8", 2.7)], "torch": [("64K, B=1", 2.8)]}
    fig = viz.plot_bandwidth(s, ceilings={"copy": 2.4})
    ax = fig.axes[0]
    np.testing.assert_allclose([p.get_height() for p in ax.patches], [2.1, 2.7, 2.8])
    assert [t.get_text() for t in ax.get_xticklabels()] == ["64K, B=1", "64K, B=8"]
    assert ax.lines[0].get_ydata()[0] == 2.4
    fig, axes = viz.new_figure(1, 2)
    viz.plot_grouped_bars({"a": [(1024, 1.0)]}, ylabel="x", ax=axes[0, 0])
    viz.plot_grouped_bars({"a": [(1024, 2.0)], "b": [(1024, 3.0)]}, ylabel="x", ax=axes[0, 1])
    viz.figure_legend(fig)
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["a", "b"]
    assert all(a.get_legend() is None for a in fig.axes)


def test_formatting():
    assert [viz.format_tokens(n) for n in (100, 1024, 1536, 131072)] == [
        "100",
        "1K",
        "1.5K",
        "128K",
    ]
    got = [viz.format_number(v) for v in (1675.4, 12.345, 0.04431, 2.5e-7, 0.0, 1.0)]
    assert got == ["1675", "12.3", "0.0443", "2.50e-07", "0", "1.00"]


# ---------------------------------------------------------------------- benchmark results


def _write(path: Path, data) -> None:
    path.write_text(data if isinstance(data, str) else json.dumps(data))


def test_load_benchmark_results_is_tolerant(tmp_path):
    _write(
        tmp_path / "model.json",
        {
            "meta": {"device": "GPU X", "config": {"a": 1}},
            "rows": [
                {"what": "prefill", "tokens": 1024, "ms": 5.0},
                {"what": "prefill", "tokens": 2048, "ms": None},
            ],
        },
    )
    _write(tmp_path / "flat.json", [{"impl": "k", "tbps": 2.0}, "not a row", {"note": "x"}])
    _write(
        tmp_path / "nested.json",
        {"env": {"device": "GPU Y"}, "a": {"b": [{"seq": 8192, "tflops": 500.0}]}, "n": 3},
    )
    _write(tmp_path / "broken.json", "{oops")
    _write(tmp_path / "empty.json", {"errors": []})
    _write(tmp_path / "notes.md", "| not | json |")
    res = viz.load_benchmark_results(tmp_path)
    assert res and res.files == ("empty.json", "flat.json", "model.json", "nested.json")
    assert [s.split(":")[0] for s in res.skipped] == ["broken.json", "empty.json"]
    by = {(t.source, t.name): t for t in res.tables}
    assert set(by) == {("model", "rows"), ("flat", ""), ("nested", "a.b")}
    assert by[("model", "rows")].device == "GPU X"
    assert by[("model", "rows")].meta == {"device": "GPU X"}  # nested meta values dropped
    assert by[("nested", "a.b")].device == "GPU Y"
    assert len(by[("flat", "")].rows) == 1  # rows without a number are not results
    assert by[("model", "rows")].columns == {"what", "tokens", "ms"}
    assert [t.source for t in viz.find_tables(res, "tokens", "ms")] == ["model"]
    assert viz.find_tables(res, "tflops", source="model") == []
    assert not viz.load_benchmark_results(tmp_path / "missing")


def test_series_time_and_markdown():
    rows = [
        {"case": "dense", "tokens": 2048, "s": 2.0},
        {"case": "dense", "tokens": 1024, "ms": 900.0},
        {"case": "elastic", "tokens": 1024, "seconds": 0.5},
        {"case": "elastic", "tokens": 2048, "ms": None},  # OOM row: skipped
        {"case": "elastic", "seq": 4096, "us": 1000.0},  # x from a candidate column
        {"case": "other", "tokens": 1024, "ms": 1.0},
    ]
    s = viz.series(
        rows, x=("tokens", "seq"), y=viz.time_ms, label="case", where=lambda r: r["case"] != "other"
    )
    assert s == {"dense": [(2048, 2000.0), (1024, 900.0)], "elastic": [(1024, 500.0), (4096, 1.0)]}
    assert viz.time_ms({"x": 1}) is None
    md = viz.markdown_table(rows[:2] + [{"case": "a|b"}], ["case", ("t (ms)", viz.time_ms)])
    assert md.splitlines() == [
        "| case | t (ms) |",
        "|---|---|",
        "| dense | 2000 |",
        "| dense | 900 |",
        "| a/b |  |",
    ]


def test_repository_results_load():
    res = viz.load_benchmark_results(REPO / "benchmarks" / "results")
    assert all(t.rows for t in res.tables)
