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
            "tiny:1:256,tiny:2:128",
            "--steps",
            "2",
            "--generate",
            "--gen-tokens",
            "3",
            "--out",
            str(out),
        ]
    )
    rows = json.loads(out.read_text())["rows"]
    assert [(r["batch"], r["context"]) for r in rows] == [(1, 256), (2, 128)]
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
