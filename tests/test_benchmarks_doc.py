"""BENCHMARKS.md and benchmarks/results/ agree: every result file is cited, every cited file exists.

A file name in backticks that ends in .json or .csv (no folder) must be either a result file in
``benchmarks/results/`` or a file a benchmark script writes (a name in a ``benchmarks/*.py``
source), e.g. ``paged_decode_rows.json`` before it is copied under its results name.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "BENCHMARKS.md"
RESULTS = ROOT / "benchmarks" / "results"

_CITED = re.compile(r"`([\w.\-]+\.(?:json|csv))`")


def cited_files(text: str) -> set[str]:
    """File names (no folder) in backticks that end in .json or .csv."""
    return set(_CITED.findall(text))


def test_cited_files_parse():
    text = "a `x_h100.json`, `dir/y.json`, `z.csv` and `not a file` or x.json"
    assert cited_files(text) == {"x_h100.json", "z.csv"}


def test_every_result_file_is_cited():
    text = DOC.read_text(encoding="utf-8")
    files = sorted(p.name for p in RESULTS.iterdir() if p.suffix in (".json", ".csv"))
    assert files, f"no result files in {RESULTS}"
    uncited = [f for f in files if f"`{f}`" not in text]
    assert not uncited, f"result files not cited in BENCHMARKS.md: {uncited}"


def test_every_cited_file_exists():
    scripts = "\n".join(p.read_text(encoding="utf-8") for p in (ROOT / "benchmarks").glob("*.py"))
    existing = {p.name for p in RESULTS.iterdir()}
    missing = [
        name
        for name in sorted(cited_files(DOC.read_text(encoding="utf-8")))
        if name not in existing and name not in scripts
    ]
    assert not missing, f"BENCHMARKS.md cites files that are not in {RESULTS}: {missing}"
