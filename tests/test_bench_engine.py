"""CPU smoke run of the engine benchmark script (tiny shape): every section that runs off the GPU
produces its rows, so the device run does not discover a broken script."""

from __future__ import annotations

import json

from benchmarks import bench_engine


def test_engine_benchmark_smoke(tmp_path):
    out = tmp_path / "engine.json"
    bench_engine.main(
        ["--shape", "tiny", "--sections", "parts,prefill,decode", "--lengths", "256",
         "--density-lengths", "256", "--densities", "0.3", "--decode-context", "256",
         "--decode-batch", "1,2", "--reps", "1", "--out", str(out)]
    )  # fmt: skip
    res = json.loads(out.read_text())
    assert res["meta"]["shape"] == "tiny"
    per_layer = [r for r in res["parts"] if r["part"] == "per_layer"]
    assert [r["tokens"] for r in per_layer] == [256]
    assert per_layer[0]["router_ms"] > 0 and per_layer[0]["estimate_ms"] > 0
    cases = {r["case"]: r for r in res["prefill"] if r["what"] == "prefill"}
    assert set(cases) == {
        "dense (xla)",
        "dense (pallas)",
        "elastic full+xattn",
        "elastic xattn+streaming",
        "xattn synthetic 0.30",
    }
    assert all(r["s"] > 0 for r in cases.values())
    # Elastic rows report what the router chose; the synthetic row forces every head to xattn.
    assert cases["xattn synthetic 0.30"]["head_mode_fractions"]["1"] == 1.0
    assert 0 < cases["elastic full+xattn"]["kept_fraction"] <= 1
    assert [(r["batch"], r["tokens"]) for r in res["decode"]] == [(1, 256), (2, 256)]
    assert all(r["ms"] > 0 for r in res["decode"])
    # The decode step updates the cache in place: all of it aliased to the output.
    assert all(abs(r["alias_gib"] - r["cache_gib"]) < 1e-3 * r["cache_gib"] for r in res["decode"])
