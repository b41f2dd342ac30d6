"""bench_hf (the transformers peer) on the tiny shape on the CPU: decode at batch > 1 runs from one
row's prefill repeated, and every asked batch gets a row."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("transformers")
pytest.importorskip("torch")


def test_decode_batches_from_one_prefill(tmp_path):
    from benchmarks import bench_hf

    out = tmp_path / "hf.json"
    bench_hf.main(
        ["--shape", "tiny", "--prefill", "", "--decode-context", "48", "--decode-batch", "1,3",
         "--decode-steps", "2", "--device", "cpu", "--out", str(out)]
    )  # fmt: skip
    rows = json.loads(out.read_text())["rows"]
    assert [(r["what"], r["batch"], r["tokens"]) for r in rows] == [
        ("decode", 1, 48),
        ("decode", 3, 48),
    ]
    assert all(r["ms"] > 0 for r in rows)
    assert rows[1]["tok_per_s"] == pytest.approx(3 / (rows[1]["ms"] / 1e3))
