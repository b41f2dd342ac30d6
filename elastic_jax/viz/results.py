"""A tolerant reader of benchmark JSON (``benchmarks/results/``) and helpers that turn its rows
into series maps and Markdown tables (notebook 04). Plain Python, no matplotlib.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from elastic_jax.viz.common import format_number


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
