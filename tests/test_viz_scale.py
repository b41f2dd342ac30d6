"""plot_scale draws the bench_scale JSON (synthetic rows; Agg backend, no display)."""

from __future__ import annotations

import json
import os

import pytest

os.environ.setdefault("MPLBACKEND", "Agg")
pytest.importorskip("matplotlib")

from elastic_jax import viz, viz_scale  # noqa: E402


def _write(path, device, lengths, dense_s=1.0):
    rows = []
    for t in lengths:
        f = t / lengths[0]
        for mode, s in (("dense", dense_s * f * f), ("syn0.01", 0.3 * dense_s * f)):
            rows.append({"what": "prefill", "mode": mode, "tokens": t, "s": s,
                         "peak_gib": 10.0 * f, "pred_running_gib": 10.5 * f})  # fmt: skip
        rows.append({"what": "prefill", "mode": "syn0.30", "tokens": t, "skipped": "no fit"})
        rows.append({"what": "decode", "tokens": t, "ms": 12.0 * f})
        rows.append({"what": "router", "tokens": t, "ms_per_layer": 0.03})
    path.write_text(json.dumps({"meta": {"device": device}, "rows": rows}))
    return path


def test_plot_scale_merges_files_and_draws_log_log(tmp_path):
    a = _write(tmp_path / "a.json", "H100", [8192, 16384])
    b = _write(tmp_path / "b.json", "H200", [16384, 32768], dense_s=2.0)
    metas, rows = viz_scale.load_scale_rows([a, b])
    dense = sorted((r["tokens"], r["s"]) for r in rows if r.get("mode") == "dense")
    # 16K comes from the later file (b), once.
    assert dense == [(8192, 1.0), (16384, 2.0), (32768, 8.0)]
    fig = viz_scale.plot_scale([a, b])
    ax = fig.axes[0]
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
    labels = [line.get_label() for line in ax.get_lines()]
    assert {"dense", "syn0.01", "~T", "~T^2"} <= set(labels) and "syn0.30" not in labels
    line = ax.get_lines()[labels.index("dense")]
    assert list(line.get_xdata()) == [8192, 16384, 32768]
    assert list(line.get_ydata()) == [1.0, 2.0, 8.0]
    peak_labels = [line.get_label() for line in fig.axes[2].get_lines()]
    assert peak_labels == ["measured peak", "memory model"]
    assert "H100, H200" in fig._suptitle.get_text()
    assert viz.figure_png(fig)[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_scale_rejects_predict_only_file(tmp_path):
    p = tmp_path / "p.json"
    p.write_text(json.dumps({"predicted": {}}))
    with pytest.raises(ValueError, match="no 'rows'"):
        viz_scale.plot_scale(p)
