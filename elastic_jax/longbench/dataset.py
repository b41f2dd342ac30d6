"""Reading LongBench data files and our prediction files, with errors that name file and line.

Data files are the official jsonl files (`<task>.jsonl`, `<task>_e.jsonl` from THUDM/LongBench
`data.zip`), one JSON object per line with fields input, context, answers, length, dataset,
language, all_classes, _id. Nothing here touches the network.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

from .tasks import TaskRun

# field -> (check, description) for one data line.
_FIELDS: dict[str, tuple[Any, str]] = {
    "_id": (lambda v: isinstance(v, str) and v != "", "a non-empty string"),
    "input": (lambda v: isinstance(v, str), "a string"),
    "context": (lambda v: isinstance(v, str), "a string"),
    "answers": (
        lambda v: isinstance(v, list) and len(v) > 0 and all(isinstance(a, str) for a in v),
        "a non-empty list of strings",
    ),
    "length": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0, "an int >= 0"),
    "all_classes": (
        lambda v: v is None or (isinstance(v, list) and all(isinstance(c, str) for c in v)),
        "null or a list of strings",
    ),
}


def data_path(data_dir: str | os.PathLike, run: TaskRun) -> Path:
    return Path(data_dir) / f"{run.key}.jsonl"


def _parse_line(path: Path, lineno: int, line: str) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(
            f"{path}:{lineno}: malformed JSON line ({e.msg} at column {e.colno})"
        ) from None


def load_task_data(data_dir: str | os.PathLike, run: TaskRun) -> list[dict]:
    """All samples of one task file, in file order, validated.

    Raises:
      FileNotFoundError: the task file is missing (message names the path and where to get it).
      ValueError: a malformed line, a missing/ill-typed field, a duplicate _id or an empty file
        (message names file and line).
    """
    path = data_path(data_dir, run)
    if not path.is_file():
        raise FileNotFoundError(
            f"task {run.key!r}: data file {path} not found. Download the LongBench data "
            "(data.zip from https://huggingface.co/datasets/THUDM/LongBench) and pass the "
            "folder holding the *.jsonl files as the data dir; see docs/longbench.md"
        )
    samples: list[dict] = []
    first_line_of: dict[str, int] = {}
    with path.open("r", encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            obj = _parse_line(path, lineno, line)
            if not isinstance(obj, dict):
                raise ValueError(
                    f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}"
                )
            for field, (check, what) in _FIELDS.items():
                if field not in obj:
                    raise ValueError(f"{path}:{lineno}: missing field {field!r}")
                if not check(obj[field]):
                    raise ValueError(
                        f"{path}:{lineno}: field {field!r} must be {what}, got {obj[field]!r:.80}"
                    )
            if run.spec.metric == "classification" and not obj["all_classes"]:
                raise ValueError(
                    f"{path}:{lineno}: task {run.spec.name!r} is scored by classification and "
                    "needs a non-empty 'all_classes' list"
                )
            sid = obj["_id"]
            if sid in first_line_of:
                raise ValueError(
                    f"{path}:{lineno}: duplicate _id {sid!r} (first on line {first_line_of[sid]})"
                )
            first_line_of[sid] = lineno
            samples.append(obj)
    if not samples:
        raise ValueError(f"{path}: no samples (empty file)")
    return samples


def read_predictions(path: str | os.PathLike, *, repair: bool = False) -> list[dict]:
    """Records of a prediction file (ours: one JSON object per line, each with _id and pred).

    A crash can leave a last line that is cut short (no trailing newline, or not valid JSON).
    With `repair=True` that line is dropped from the file (with a warning) so the sample is
    generated again; otherwise it is ignored. A bad line anywhere else is an error.

    Raises:
      ValueError: malformed line before the last one, record without _id/pred, duplicate _id.
    """
    path = Path(path)
    if not path.exists():
        return []
    data = path.read_bytes()
    lines = data.split(b"\n")
    # After a clean write the file ends with "\n", so the last piece is b"".
    complete, last = lines[:-1], lines[-1]
    records: list[dict] = []
    seen: dict[str, int] = {}
    keep_bytes = 0
    for lineno, raw in enumerate(complete, start=1):
        text = raw.decode("utf-8", errors="replace")
        is_last = lineno == len(complete) and last == b""
        if text.strip():
            try:
                rec = json.loads(text)
            except json.JSONDecodeError as e:
                if is_last:
                    last = raw  # treat as a torn final write
                    break
                raise ValueError(
                    f"{path}:{lineno}: malformed JSON line ({e.msg} at column {e.colno}); "
                    "the prediction file is corrupt, delete it to regenerate this task"
                ) from None
            if not isinstance(rec, dict) or "_id" not in rec or "pred" not in rec:
                raise ValueError(f"{path}:{lineno}: prediction record needs '_id' and 'pred'")
            if rec["_id"] in seen:
                raise ValueError(
                    f"{path}:{lineno}: duplicate _id {rec['_id']!r} (first on line "
                    f"{seen[rec['_id']]})"
                )
            seen[rec["_id"]] = lineno
            records.append(rec)
        keep_bytes += len(raw) + 1
    if last != b"":
        if repair:
            warnings.warn(
                f"{path}: dropping an incomplete last line ({len(last)} bytes, from an "
                "interrupted run); that sample will be generated again",
                RuntimeWarning,
                stacklevel=2,
            )
            with path.open("r+b") as f:
                f.truncate(keep_bytes)
                f.flush()
                os.fsync(f.fileno())
    return records
