"""benchmarks/bench_serving.py on CPU: the tiny shape, a handful of requests, every method."""

from __future__ import annotations

import json

import pytest

from benchmarks import bench_serving as bs


def test_workload_shape():
    work = bs.make_workload(30, 32768, 151936, seed=0)
    assert len(work) == 30
    for i, r in enumerate(work):
        n = len(r.prompt)
        lo, hi = [(2048, 4096), (4097, 8192), (8193, 32768)][i % 3]
        assert lo <= n <= hi and n + r.max_new_tokens <= 32768
        assert r.max_new_tokens == bs.LONGBENCH_E_BUDGETS[r.task]
    again = bs.make_workload(30, 32768, 151936, seed=0)
    assert [r.prompt for r in again] == [r.prompt for r in work]


@pytest.mark.slow  # ~90 s on 2 CPU cores, mostly compiling (elastic prefill in interpret mode)
def test_tiny_run(tmp_path):
    out = tmp_path / "serving.json"
    res = bs.main(
        ["--shape", "tiny", "--requests", "7", "--max-prompt", "256", "--max-new-cap", "5",
         "--slots", "3", "--static-b8-requests", "8", "--static-b1-requests", "2",
         "--sections", "engine,static", "--out", str(out)]
    )  # fmt: skip
    saved = json.loads(out.read_text())
    methods = [r["method"] for r in saved["rows"]]
    assert methods == ["engine elastic", "static b8", "static b1", "engine dense"]
    for r in saved["rows"]:
        assert r["compiles"] == 0 and r["requests_per_min"] > 0
    eng = saved["rows"][0]
    assert eng["requests"] == 7 and eng["output_tokens"] == sum(
        min(bs.LONGBENCH_E_BUDGETS[t], 5)
        for t in [w.task for w in bs.make_workload(7, 256, 512, max_new_cap=5)]
    )
    assert saved["meta"]["shape"] == "tiny" and "engine dense / static b8" in saved["ratios"]
    assert res["rows"] == saved["rows"]
    # Every method records its prefill time; the engine's prefill bounds its speedup.
    by = {r["method"]: r for r in saved["rows"]}
    assert all(0 < r["prefill_s_total"] < r["wall_s"] for r in saved["rows"])
    for key, ceiling in saved["ceilings"].items():
        eng, other = key.split(" / ")
        want = (by[eng]["requests"] / by[eng]["prefill_s_total"]) / (
            by[other]["requests"] / by[other]["wall_s"]
        )
        assert ceiling == pytest.approx(want)
    assert set(saved["ceilings"]) == {
        f"{e} / {o}" for e in ("engine elastic", "engine dense") for o in ("static b1", "static b8")
    }


def test_a_failed_method_is_recorded_and_the_run_goes_on(tmp_path, monkeypatch):
    def out_of_memory(*args, **kwargs):
        raise RuntimeError("RESOURCE_EXHAUSTED: out of memory (simulated)")

    monkeypatch.setattr(bs, "run_static", out_of_memory)
    out = tmp_path / "serving.json"
    bs.main(
        ["--shape", "tiny", "--requests", "3", "--max-prompt", "256", "--max-new-cap", "2",
         "--slots", "2", "--static-b8-requests", "2", "--static-b1-requests", "1",
         "--sections", "engine,static", "--out", str(out)]
    )  # fmt: skip
    rows = json.loads(out.read_text())["rows"]
    assert [r["method"] for r in rows] == [
        "engine elastic",
        "static b8",
        "static b1",
        "engine dense",
    ]
    assert "RESOURCE_EXHAUSTED" in rows[1]["error"] and "RESOURCE_EXHAUSTED" in rows[2]["error"]
    assert rows[0]["requests"] == 3 and rows[3]["requests_per_min"] > 0
