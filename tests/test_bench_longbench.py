"""benchmarks/bench_longbench.py on CPU: the tiny shape through the real harness, dense and
elastic, with the warm-up guaranteeing that the timed passes compile nothing."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import pytest

from benchmarks import bench_longbench as bl


def test_compile_counter_sees_a_fresh_compile_and_not_a_cached_call():
    f = jax.jit(lambda x: x * 3 + 1)
    x = jnp.arange(7, dtype=jnp.float32)
    with bl.CompileCounter() as first:
        f(x).block_until_ready()
    with bl.CompileCounter() as second:
        f(x).block_until_ready()
    assert first.count >= 1 and first.seconds > 0
    assert second.count == 0


def test_fixture_target_leaves_room_and_rejects_too_short_lengths():
    for bucket, gen in ((8192, 512), (32768, 512), (512, 8)):
        t = bl.fixture_target(bucket, gen)
        assert t + gen + 0.01 * t + 8 <= bucket  # generator tolerance + template tokens fit
    with pytest.raises(ValueError, match="no room"):
        bl.fixture_target(256, 200)


def test_bad_arguments_fail_before_any_work():
    with pytest.raises(ValueError, match="--modes"):
        bl.parse_args(["--modes", "dense,sparse"])
    with pytest.raises(ValueError, match="--lengths"):
        bl.parse_args(["--lengths", "64"])
    with pytest.raises(ValueError, match="unknown task"):
        bl.main(["--shape", "tiny", "--tasks", "nosuchtask"])


def test_tiny_run_dense_vs_elastic(tmp_path):
    out = tmp_path / "lb.json"
    lengths = [512, 1024]
    res = bl.main(
        [
            "--shape", "tiny", "--lengths", ",".join(map(str, lengths)), "--per-length", "1",
            "--tasks", "hotpotqa_e,trec_e", "--max-new-tokens-cap", "8",
            "--work-dir", str(tmp_path / "work"), "--out", str(out),
        ]
    )  # fmt: skip
    saved = json.loads(out.read_text())
    assert saved["rows"] == json.loads(json.dumps(res["rows"]))
    assert saved["meta"]["shape"] == "tiny" and saved["meta"]["tasks"] == ["hotpotqa_e", "trec_e"]
    assert saved["meta"]["jax"] == jax.__version__ and saved["meta"]["device"]
    # Every prompt pads to its nominal bucket, and prompt + generation fits the same capacity.
    assert len(saved["prompts"]) == 4
    for p in saved["prompts"]:
        assert p["bucket"] == p["capacity"] == p["nominal"] and p["prompt_tokens"] < p["bucket"]
    rows = {r["mode"]: r for r in saved["rows"]}
    assert set(rows) == {"dense", "elastic"}
    for mode, r in rows.items():
        assert r["samples"] == 4, mode
        assert r["wall_s"] > 0 and r["samples_per_min"] > 0
        assert r["prefill_s_mean"] > 0 and r["decode_s_mean"] >= 0
        assert 4 <= r["generated_tokens"] <= 4 * 8  # the cap holds
        assert set(r["by_length"]) == {str(n) for n in lengths}
        assert not r["over_budget"]
        # The warm-up compiled (the counter works here) and the timed pass compiled nothing.
        assert saved["warmup"][mode]["compiles"] > 0
        assert r["compiles"] == 0, mode
    assert rows["dense"]["sparsity_mean"] == 0.0
    assert 0.0 <= rows["elastic"]["sparsity_mean"] < 1.0
    ratio = rows["elastic"]["samples_per_min"] / rows["dense"]["samples_per_min"]
    assert saved["ratio_elastic_over_dense_samples_per_min"] == pytest.approx(ratio)
    # The timed predictions are the harness's own files: one record per sample and mode.
    for mode in rows:
        files = sorted((tmp_path / "work" / "timed" / mode).glob("*.jsonl"))
        assert [f.stem for f in files] == ["hotpotqa_e", "trec_e"]
        assert sum(len(f.read_text().splitlines()) for f in files) == 4


def test_over_budget_stops_and_says_so(tmp_path):
    res = bl.main(
        [
            "--shape", "tiny", "--lengths", "512", "--tasks", "trec_e",
            "--max-new-tokens-cap", "2", "--budget-s", "0", "--work-dir", str(tmp_path),
        ]
    )  # fmt: skip
    assert res["rows"] == []
    assert any("budget" in n for n in res["notes"])
