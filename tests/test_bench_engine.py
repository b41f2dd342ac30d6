"""CPU smoke run of the engine benchmark script (tiny shape): every section that runs off the GPU
produces its rows, so the device run does not discover a broken script."""

from __future__ import annotations

import json
import sys

import jax
import pytest

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


def test_bench_model_fill_and_warmup(tmp_path):
    """filled_cache fills every (layer, kv head) slice with its own values; bench_prefill reports
    every timed call (the warm-up is waited for, so none absorbs it)."""
    import numpy as np

    from benchmarks.bench_model import bench_prefill, filled_cache, make_config
    from elastic_jax.config import RuntimeConfig
    from elastic_jax.params import init_random

    cfg = make_config("tiny")
    cache = filled_cache(cfg, 2, 200, 256, 64)
    k = np.asarray(cache.k, np.float32)
    assert np.asarray(cache.lengths).tolist() == [200, 200]
    assert 0.8 < k.std() < 1.2 and not np.array_equal(k[0, 0], k[0, 1])
    assert not np.array_equal(k[0, 0], k[1, 0])
    params = init_random(cfg, jax.random.PRNGKey(0))
    sec, info = bench_prefill(params, cfg, RuntimeConfig(attention_mode="dense"), 128, 3)
    assert len(info["all_s"]) == 3 and sec == sorted(info["all_s"])[1]
    # Compile-only warm-up (long prompts): every call is timed; elastic stats still come back.
    el = make_config("tiny", bench_engine.ROUTER_ELASTIC["full+xattn"])
    params = init_random(el, jax.random.PRNGKey(0))
    sec, info = bench_prefill(
        params, el, RuntimeConfig(attention_mode="elastic"), 256, 2, warmup="compile"
    )
    assert len(info["all_s"]) == 2 and info["warmup"] == "compile"
    assert 0 < info["kept_fraction"] <= 1
    with pytest.raises(ValueError, match="warmup='twice'"):
        bench_prefill(params, el, RuntimeConfig(attention_mode="elastic"), 256, 1, warmup="twice")


def test_ab_prefill_against_itself(tmp_path, monkeypatch):
    """The A/B script runs the tree against a renamed copy of itself: identical logits."""
    monkeypatch.setattr(sys, "path", list(sys.path))  # the script prepends --old-dir
    for name in [m for m in sys.modules if m.startswith("elastic_jax_old")]:
        monkeypatch.delitem(sys.modules, name)
    import re
    import shutil
    from pathlib import Path

    from benchmarks import bench_ab_prefill

    src = Path(__file__).resolve().parents[1] / "elastic_jax"
    dst = tmp_path / "elastic_jax_old"
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", "data"))
    for f in dst.rglob("*.py"):
        f.write_text(re.sub(r"\belastic_jax\b", "elastic_jax_old", f.read_text()))
    out = tmp_path / "ab.json"
    bench_ab_prefill.main(
        ["--old-dir", str(tmp_path), "--shape", "tiny", "--lengths", "256", "--impls", "xla",
         "--reps", "2", "--out", str(out)]
    )  # fmt: skip
    rows = json.loads(out.read_text())["rows"]
    assert [(r["impl"], r["tokens"]) for r in rows] == [("xla", 256)]
    assert rows[0]["max_abs_logit_diff"] == 0.0
    assert len(rows[0]["new_all"]) == 2 and len(rows[0]["old_all"]) == 2
    for name in [m for m in sys.modules if m.startswith("elastic_jax_old")]:
        del sys.modules[name]
