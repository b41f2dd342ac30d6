"""The research notebooks run top to bottom on the CPU, and the committed copies are clean runs.

Every ``notebooks/NN_*.ipynb`` is executed in a fresh ipykernel on this interpreter (through
``notebooks/execute.py``, the script that also saves them), with tiny random checkpoints built
inside the notebooks; any failing cell fails the test. Budget: each notebook well under 60 s on
one core (measured: see notebooks/README.md), the per-cell timeout bounds a hung kernel.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")

from nbclient.exceptions import CellExecutionError  # noqa: E402

NOTEBOOKS_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(NOTEBOOKS_DIR.glob("[0-9][0-9]_*.ipynb"))
CELL_TIMEOUT_S = 120  # per cell; a notebook takes 2-50 s on one core


def _load_execute_module():
    spec = importlib.util.spec_from_file_location("notebooks_execute", NOTEBOOKS_DIR / "execute.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


execute = _load_execute_module()


def _outputs(nb, output_type=None):
    return [
        o
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.outputs
        if output_type is None or o.output_type == output_type
    ]


def _text(nb) -> str:
    parts = []
    for o in _outputs(nb):
        if o.output_type == "stream":
            parts.append(o.text)
        else:
            data = o.get("data", {})
            parts.append(data.get("text/markdown", "") + data.get("text/plain", ""))
    return "\n".join(parts)


def test_the_four_notebooks_exist():
    names = [p.stem for p in NOTEBOOKS]
    assert names == ["01_quickstart", "02_router", "03_block_masks", "04_performance"], names


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_top_to_bottom(path):
    nb, seconds = execute.execute_notebook(path, timeout=CELL_TIMEOUT_S)
    code_cells = [c for c in nb.cells if c.cell_type == "code"]
    assert [c.execution_count for c in code_cells] == list(range(1, len(code_cells) + 1))
    assert not _outputs(nb, "error")
    images = [o for o in _outputs(nb) if "image/png" in o.get("data", {})]
    assert images, f"{path.name} drew no figure"
    print(f"{path.name}: {seconds:.1f} s")


@pytest.mark.slow
def test_performance_notebook_without_results(tmp_path, monkeypatch):
    """04 must run, and say so, when no benchmark JSON exists yet (and skip broken files)."""
    (tmp_path / "broken.json").write_text("{not json")
    monkeypatch.setenv("ELASTIC_JAX_BENCH_RESULTS", str(tmp_path))
    nb, _ = execute.execute_notebook(NOTEBOOKS_DIR / "04_performance.ipynb", timeout=60)
    text = _text(nb)
    assert "No benchmark results yet" in text
    assert "skipped: broken.json" in text
    assert not [o for o in _outputs(nb) if "image/png" in o.get("data", {})]


@pytest.mark.slow
def test_performance_notebook_with_unexpected_results(tmp_path, monkeypatch):
    """Rows with missing or null fields are skipped or reported, never a failing cell."""
    tables = {
        "odd_prefill.json": {
            "rows": [
                {"what": "prefill", "case": "dense", "tokens": 1024, "ms": None},
                {"what": "prefill", "case": "dense", "s": 1.0},
                {"what": "prefill", "case": "dense", "tokens": 2048, "s": 0.5},
            ]
        },
        "odd_kernel.json": [{"seq": 8192, "tflops": 100.0, "label": "k"}, {"tflops": 1.0}],
        "odd_decode.json": {"rows": [{"what": "decode", "tokens": 1024, "batch": 2, "ms": 5.0}]},
    }
    for name, data in tables.items():
        (tmp_path / name).write_text(json.dumps(data))
    monkeypatch.setenv("ELASTIC_JAX_BENCH_RESULTS", str(tmp_path))
    nb, _ = execute.execute_notebook(NOTEBOOKS_DIR / "04_performance.ipynb", timeout=60)
    text = _text(nb)
    assert "3 result files" in text
    assert "Dense vs elastic prefill: could not plot" in text  # only a baseline: no speed-up
    assert "| odd_decode |  |  | 1024 | 2 | 5.00 | 400 |" in text
    assert len([o for o in _outputs(nb) if "image/png" in o.get("data", {})]) == 3


def test_a_failing_cell_fails(tmp_path):
    """The runner raises on an error and the kernel runs on this test's interpreter."""
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_code_cell("import sys\nprint(sys.executable)"),
        nbformat.v4.new_code_cell("raise ValueError('boom from a notebook cell')"),
        nbformat.v4.new_code_cell("print('never reached')"),
    ]
    path = tmp_path / "failing.ipynb"
    nbformat.write(nb, path)
    with pytest.raises(CellExecutionError, match="boom from a notebook cell"):
        execute.execute_notebook(path, timeout=60)

    nb.cells = nb.cells[:1]
    nbformat.write(nb, path)
    executed, _ = execute.execute_notebook(path, timeout=60)
    assert executed.cells[0].outputs[0].text.strip() == sys.executable


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_committed_notebook_is_a_clean_run(path):
    """Saved with outputs from one top-to-bottom run: every code cell executed once, in order,
    no errors, figures present, outputs small (GitHub shows them when browsing the repo)."""
    nb = nbformat.read(path, as_version=4)
    code_cells = [c for c in nb.cells if c.cell_type == "code"]
    counts = [c.execution_count for c in code_cells]
    assert counts == list(range(1, len(code_cells) + 1)), (
        f"{path.name}: execution counts {counts}; re-run `python notebooks/execute.py`"
    )
    assert not _outputs(nb, "error")
    assert [o for o in _outputs(nb) if "image/png" in o.get("data", {})], "no saved figures"
    assert nb.metadata["kernelspec"]["name"] == execute.KERNEL_NAME
    assert path.stat().st_size < 1_000_000, f"{path.name} is {path.stat().st_size} bytes"


def test_all_notebooks_under_three_megabytes():
    total = sum(p.stat().st_size for p in NOTEBOOKS)
    assert total < 3_000_000, f"notebooks total {total} bytes"


def test_notebook_paths_resolves_names(tmp_path):
    assert execute.notebook_paths() == NOTEBOOKS
    assert execute.notebook_paths(["02_router"]) == [NOTEBOOKS_DIR / "02_router.ipynb"]
    with pytest.raises(FileNotFoundError, match="no_such_notebook"):
        execute.notebook_paths(["no_such_notebook"])
