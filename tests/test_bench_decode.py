"""CPU smoke test of the decode-vs-ideal benchmark (issue 16): it runs end to end on the tiny
shape, and its byte counts match the model's arrays."""

from __future__ import annotations

import json

import jax

from benchmarks import bench_decode
from benchmarks.bench_model import make_config
from elastic_jax.params import init_random


def test_bench_decode_runs_and_writes_rows(tmp_path):
    out = tmp_path / "decode.json"
    bench_decode.main(
        [
            "--configs",
            "tiny:2:128",
            "--steps",
            "2",
            "--generate",
            "--gen-tokens",
            "6",
            "--out",
            str(out),
        ]
    )
    rows = json.loads(out.read_text())["rows"]
    assert [(r["batch"], r["context"]) for r in rows] == [(2, 128)]
    for r in rows:
        assert "error" not in r, r
        assert r["jit_ms"] > 0 and r["generate_ms"] > 0
        assert abs(r["jit_ratio"] - r["jit_ms"] / r["ideal_ms"]) < 1e-9


def test_bytes_per_step_count_every_weight_and_the_kv():
    cfg = make_config("tiny")
    params = init_random(cfg, jax.random.PRNGKey(0))
    total = sum(x.nbytes for x in jax.tree.leaves(params))
    # Tied embeddings: the embedding is read once, as the LM head.
    assert bench_decode.weight_bytes_read(params, cfg, batch=4) == total
    kv = bench_decode.kv_bytes_read(cfg, batch=3, context=100)
    itemsize = 2  # bf16
    assert kv == 2 * 3 * 100 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * itemsize


def test_steady_step_counts_only_steps_with_every_request_running():
    import pytest

    # Request 0 decodes alone while request 1 prefills (0.0 -> 1.0 s), then both step every
    # 10 ms; request 0 finishes first at 1.05 s.
    r0 = [0.0, 0.01, 1.0, 1.01, 1.02, 1.03, 1.04, 1.05]
    r1 = [1.0, 1.01, 1.02, 1.03, 1.04, 1.05, 1.06]
    assert bench_decode.steady_step_ms([r0, r1]) == pytest.approx(10.0)
    with pytest.raises(ValueError, match="gen-tokens"):
        bench_decode.steady_step_ms([[0.0, 0.5], [1.0, 1.1]])


def test_pallas_out_projection_fused_norms_and_gemv_table(tmp_path):
    out = tmp_path / "decode.json"
    bench_decode.main(
        ["--configs", "tiny:2:64", "--steps", "1", "--decode-out-proj", "pallas", "--gemv",
         "--decode-norm", "pallas", "--out", str(out)]
    )  # fmt: skip
    saved = json.loads(out.read_text())
    assert saved["meta"]["decode_out_proj"] == "pallas" and saved["rows"][0]["jit_ms"] > 0
    assert saved["meta"]["decode_norm"] == saved["rows"][0]["decode_norm"] == "pallas"
    names = [r["matrix"] for r in saved["gemv"]["tiny:2"]]
    assert "wo (pallas stacked_gemv)" in names and "w_down (pallas stacked_gemv)" in names
