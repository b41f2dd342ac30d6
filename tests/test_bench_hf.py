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


def test_prefill_stops_after_out_of_memory(tmp_path, monkeypatch):
    """--stop-after-oom: the first prompt length that runs out of memory gets an "oom" row and
    the longer ones are not tried (their rows say why); without it every length is tried."""
    import torch

    from benchmarks import bench_hf

    tried = []

    class OutOfMemoryAt512(torch.nn.Module):
        def forward(self, ids, **kwargs):
            tried.append(ids.shape[1])
            if ids.shape[1] >= 512:
                raise torch.OutOfMemoryError("simulated")
            return None

    monkeypatch.setattr(bench_hf, "build", lambda shape, device: OutOfMemoryAt512())
    out = tmp_path / "hf.json"
    argv = ["--shape", "tiny", "--prefill", "256,512,1024", "--reps", "1", "--device", "cpu",
            "--out", str(out)]  # fmt: skip
    bench_hf.main(argv + ["--stop-after-oom"])
    rows = json.loads(out.read_text())["rows"]
    assert [(r["tokens"], r.get("oom"), r.get("not_run")) for r in rows] == [
        (256, None, None),
        (512, True, None),
        (1024, None, "out of memory at 512 tokens"),
    ]
    assert rows[0]["ms"] > 0 and tried == [256, 256, 512]  # warm-up + 1 rep, then the OOM
    tried.clear()
    bench_hf.main(argv)
    assert tried == [256, 256, 512, 1024]
