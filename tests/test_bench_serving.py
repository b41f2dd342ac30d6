"""benchmarks/bench_serving.py on CPU: the tiny shape, a handful of requests, every method."""

from __future__ import annotations

import json
import re

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


@pytest.mark.slow  # ~30 s on 2 CPU cores: 2 child processes, mostly compiling (interpret mode)
def test_tiny_run(tmp_path):
    """The engine and a static path, each in its own child process (the default isolation)."""
    out = tmp_path / "serving.json"
    res = bs.main(
        ["--shape", "tiny", "--requests", "7", "--max-prompt", "256", "--max-new-cap", "5",
         "--slots", "3", "--static-b8-requests", "8", "--methods", "engine-elastic,static-b8",
         "--out", str(out)]
    )  # fmt: skip
    saved = json.loads(out.read_text())
    methods = [r["method"] for r in saved["rows"]]
    assert methods == ["engine elastic", "static b8"]
    for r in saved["rows"]:
        assert r["compiles"] == 0 and r["requests_per_min"] > 0
    eng = saved["rows"][0]
    assert eng["requests"] == 7 and eng["output_tokens"] == sum(
        min(bs.LONGBENCH_E_BUDGETS[t], 5)
        for t in [w.task for w in bs.make_workload(7, 256, 512, max_new_cap=5)]
    )
    assert saved["meta"]["shape"] == "tiny" and saved["meta"]["isolation"] == "process"
    assert saved["meta"]["platform"] == "cpu"  # reported by the children
    assert "engine elastic / static b8" in saved["ratios"]
    assert saved["decode_step"]["steps"] >= 0
    assert res["rows"] == saved["rows"]
    # Every method records its prefill time; the engine's prefill bounds its speedup.
    by = {r["method"]: r for r in saved["rows"]}
    assert all(0 < r["prefill_s_total"] < r["wall_s"] for r in saved["rows"])
    # The static batches share one cache size, which holds every request of the run.
    need = max(len(w.prompt) + w.max_new_tokens for w in bs.make_workload(7, 256, 512, 0, 5))
    assert by["static b8"]["cache_capacity"] >= need
    (key,) = saved["ceilings"]
    assert key == "engine elastic / static b8"
    want = (eng["requests"] / eng["prefill_s_total"]) / (
        by["static b8"]["requests"] / by["static b8"]["wall_s"]
    )
    assert saved["ceilings"][key] == pytest.approx(want)


def test_a_failed_method_is_recorded_and_the_run_goes_on(tmp_path, monkeypatch):
    def out_of_memory(*args, **kwargs):
        raise RuntimeError("RESOURCE_EXHAUSTED: out of memory (simulated)")

    import importlib

    # The module, not the package's ``generate`` function of the same name.
    generate_module = importlib.import_module("elastic_jax.generate")
    monkeypatch.setattr(generate_module, "generate_static_iter", out_of_memory)
    out = tmp_path / "serving.json"
    bs.main(
        ["--shape", "tiny", "--requests", "3", "--max-prompt", "256", "--max-new-cap", "2",
         "--slots", "2", "--static-b8-requests", "2", "--static-b1-requests", "1",
         "--methods", "static-b8,static-b1,engine-dense", "--isolation", "none",
         "--out", str(out)]
    )  # fmt: skip
    rows = json.loads(out.read_text())["rows"]
    assert [r["method"] for r in rows] == ["static b8", "static b1", "engine dense"]
    assert "RESOURCE_EXHAUSTED" in rows[0]["error"] and "RESOURCE_EXHAUSTED" in rows[1]["error"]
    # The row names the static batch that failed and the memory model's prediction for it.
    (note,) = rows[0]["error_context"]
    assert note.startswith("warm-up batch 1/1: batch 2, prompt bucket") and "predicted peak" in note
    # ... and XLA's buffer sizes for that batch's compiled prefill (CPU has a memory analysis).
    num = r"([\d.e+-]+)"
    m = re.search(rf"compiled prefill: temp {num} GiB, aliased {num} GiB, one cache array {num} GiB",
                  note)  # fmt: skip
    assert m, note
    temp, aliased, one = map(float, m.groups())
    assert one > 0 and aliased == pytest.approx(2 * one, rel=0.01)  # K and V updated in place
    assert temp > 0
    assert rows[2]["requests"] == 3 and rows[2]["requests_per_min"] > 0


def test_subset_stands_for_the_workload():
    work = bs.make_workload(200, 32768, 151936, seed=0)
    full = bs.describe(work)
    for k in (10, 24):
        sub = bs.subset(work, k, seed=0)
        d = bs.describe(sub)
        assert d["requests"] == k and len({id(r) for r in sub}) == k
        assert d["mean_prompt"] == pytest.approx(full["mean_prompt"], rel=0.02)
        assert d["mean_budget"] == pytest.approx(full["mean_budget"], rel=0.02)
        per_bucket = [sum(r.bucket == b for r in sub) for b in bs._names(work)]
        assert max(per_bucket) - min(per_bucket) <= 1  # the buckets are equal thirds
    assert [r.prompt for r in bs.subset(work, 10, 0)] == [r.prompt for r in bs.subset(work, 10, 0)]
    assert bs.subset(work, 0, 0) == [] and len(bs.subset(work, 500, 0)) == 200


def _earlier_out(path, meta, rows, decode_step=None):
    path.write_text(json.dumps({"meta": meta, "rows": rows, "decode_step": decode_step}))
    return str(path)


def test_rows_from_adds_rows_of_the_same_workload_only(tmp_path):
    work = bs.make_workload(6, 256, 512, seed=0, max_new_cap=3)
    meta = {"workload": bs.describe(work), "seed": 0, "device": "GPU X"}
    earlier = [
        {"method": "hf b1", "requests_per_min": 1.0},
        {"method": "static b8", "error": "out of memory"},
        {"method": "engine dense", "requests_per_min": 9.0},
    ]
    path = _earlier_out(tmp_path / "a.json", meta, earlier, {"steps": 3, "median_ms": 1.0})
    rows = [{"method": "engine dense", "requests_per_min": 10.0}]
    result = {"decode_step": None}
    mine = {"workload": bs.describe(work), "seed": 0}
    bs._merge_rows_from(path, mine, rows, result)
    # Its own measurement wins, errors are not carried over, the device and decode step are.
    assert [r["method"] for r in rows] == ["engine dense", "hf b1"]
    assert rows[0]["requests_per_min"] == 10.0
    assert mine["device"] == "GPU X" and result["decode_step"]["steps"] == 3
    other = {"workload": bs.describe(bs.make_workload(7, 256, 512, 0, 3)), "seed": 0}
    with pytest.raises(ValueError, match="another workload"):
        bs._merge_rows_from(path, other, [], {"decode_step": None})
    elsewhere = {"workload": bs.describe(work), "seed": 0, "device": "GPU Y"}
    with pytest.raises(ValueError, match="GPU X"):
        bs._merge_rows_from(path, elsewhere, [], {"decode_step": None})
    finer = {"workload": bs.describe(work), "seed": 0, "prompt_bucket_steps": 8}
    with pytest.raises(ValueError, match="prompt_bucket_steps=1, not 8"):
        bs._merge_rows_from(path, finer, [], {"decode_step": None})
    fused = {"workload": bs.describe(work), "seed": 0, "decode_norm": "pallas"}
    with pytest.raises(ValueError, match="decode_norm=xla, not pallas"):
        bs._merge_rows_from(path, fused, [], {"decode_step": None})


def test_methods_and_sections_are_checked():
    with pytest.raises(ValueError, match="unknown"):
        bs.main(["--methods", "engine-fast", "--shape", "tiny"])
    with pytest.raises(ValueError, match="sections"):
        bs.main(["--sections", "engines", "--shape", "tiny"])


def test_methods_run_in_the_documented_order():
    args = bs.argparse.Namespace(methods="engine-dense,hf,static-b1,engine-elastic,hf")
    assert bs._parse_methods(args) == ["hf", "engine-elastic", "static-b1", "engine-dense"]
