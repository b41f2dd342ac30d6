"""CPU smoke run of the length-scaling benchmark (tiny shape): every row kind is produced, in
process and through the one-child-per-length driver, and the time guard skips lengths."""

from __future__ import annotations

import json

import pytest

from benchmarks import bench_scale


@pytest.mark.slow
def test_scale_benchmark_in_process(tmp_path):
    out = tmp_path / "scale.json"
    res = bench_scale.main(
        ["--shape", "tiny", "--lengths", "256", "--modes", "dense,full+xattn,syn0.30",
         "--reps", "1", "--decode-steps", "2", "--warmup", "compile", "--in-process",
         "--out", str(out)]
    )  # fmt: skip
    assert json.loads(out.read_text()) == json.loads(json.dumps(res))
    assert res["meta"]["shape"] == "tiny" and res["meta"]["dtype"] == "bfloat16"
    pre = [r for r in res["rows"] if r["what"] == "prefill"]
    assert [(r["tokens"], r["mode"]) for r in pre] == [
        (256, m) for m in ("dense", "full+xattn", "syn0.30")
    ]
    assert all(r["s"] > 0 and r["pred_gib"] > 0 and r["warmup"] == "compile" for r in pre)
    assert all(r["pred_running_gib"] >= r["pred_gib"] - 1e-12 for r in pre)
    syn = [r for r in pre if r["mode"] == "syn0.30"]
    assert all(r["head_mode_fractions"]["1"] == 1.0 for r in syn)
    assert all(r["kept_fraction"] == 1.0 for r in pre if r["mode"] == "dense")
    router = [r for r in res["rows"] if r["what"] == "router"]
    decode = [r for r in res["rows"] if r["what"] == "decode"]
    assert [r["tokens"] for r in router] == [256] and router[0]["ms_per_layer"] > 0
    assert [r["tokens"] for r in decode] == [256] and decode[0]["ms"] > 0
    assert set(res["predicted"]) == {"256"}
    # The file the benchmark wrote is what the plot helper reads.
    pytest.importorskip("matplotlib")
    from elastic_jax import viz_scale

    fig = viz_scale.plot_scale(out)
    assert [line.get_label() for line in fig.axes[0].get_lines()][:3] == [
        "dense",
        "full+xattn",
        "syn0.30",
    ]


def test_scale_benchmark_child_per_length_and_time_guard(tmp_path):
    """Each length runs in a child process (meta comes from the child); a length predicted to
    end past --max-seconds is skipped, not started."""
    out = tmp_path / "scale.json"
    res = bench_scale.main(
        ["--shape", "tiny", "--lengths", "256,1048576", "--modes", "dense", "--reps", "1",
         "--decode-steps", "0", "--no-router", "--max-seconds", "300", "--out", str(out)]
    )  # fmt: skip
    rows = res["rows"]
    assert res["meta"]["shape"] == "tiny" and res["meta"]["platform"] == "cpu"
    assert [(r["what"], r["tokens"]) for r in rows] == [("prefill", 256), ("skipped", 1048576)]
    assert rows[0]["s"] > 0 and rows[0]["mode"] == "dense"
    assert rows[0]["warmup"] == "run"  # --warmup auto: compile-only from 256K tokens
    assert "time guard" in rows[1]["reason"]


def test_predict_seconds_and_modes():
    assert bench_scale._predict_seconds([], 1024) == 0.0
    assert bench_scale._predict_seconds([(1024, 10.0)], 4096) == pytest.approx(40.0)
    # Growth x3 per doubling measured; x4 at most.
    assert bench_scale._predict_seconds([(1024, 10.0), (2048, 30.0)], 4096) == pytest.approx(90)
    assert bench_scale._predict_seconds([(1024, 1.0), (2048, 10.0)], 4096) == pytest.approx(40)
    with pytest.raises(ValueError, match="mode 'sparse'"):
        bench_scale.parse_mode("sparse")
    _, rt = bench_scale.parse_mode("syn0.05")
    assert rt.synthetic_kept_fraction == 0.05 and rt.attention_mode == "xattn"


@pytest.mark.slow  # ~20 s: a torch child and a JAX child
def test_scale_benchmark_hf_rows(tmp_path, capsys):
    """--hf: HF transformers' prefill runs in its own process at each length (here on the CPU),
    and the table and plot show it beside our dense path."""
    pytest.importorskip("transformers")
    out = tmp_path / "scale.json"
    res = bench_scale.main(
        ["--shape", "tiny", "--lengths", "256", "--modes", "dense", "--reps", "1",
         "--decode-steps", "0", "--no-router", "--hf", "--hf-device", "cpu", "--out", str(out)]
    )  # fmt: skip
    (hf,) = [r for r in res["rows"] if r["what"] == "hf_prefill"]
    assert hf["tokens"] == 256 and hf["s"] > 0 and hf["hf_meta"]["attn"] == "sdpa"
    assert "HF / ours dense" in capsys.readouterr().out
    pytest.importorskip("matplotlib")
    from elastic_jax import viz_scale

    fig = viz_scale.plot_scale(out)
    assert viz_scale.HF_LABEL in [line.get_label() for line in fig.axes[0].get_lines()]


def test_scale_hf_out_of_memory_stops_longer_lengths(tmp_path, monkeypatch):
    """HF runs once, in one child for every length, before ours; after it runs out of memory
    at one length, longer lengths record why (``bench_hf --stop-after-oom``, faked here as its
    output file); our own children still run at every length."""
    import sys

    hf_calls, ours = [], []
    fake = {"meta": {"attn": "sdpa"}, "rows": [
        {"what": "prefill", "tokens": 256, "batch": 1, "ms": None, "oom": True},
        {"what": "prefill", "tokens": 512, "batch": 1, "ms": None,
         "not_run": "out of memory at 256 tokens"},
        {"what": "prefill", "tokens": 1024, "batch": 1, "ms": None,
         "not_run": "out of memory at 256 tokens"},
    ]}  # fmt: skip

    def fake_hf_cmd(args, lengths, out):
        hf_calls.append(lengths)
        code = f"import json; json.dump({fake!r}, open({out!r}, 'w'))"
        return [sys.executable, "-c", code]

    def fake_child(args, T, modes, rows_path, decode, router):
        ours.append(T)
        return [sys.executable, "-c", "pass"]

    monkeypatch.setattr(bench_scale, "hf_cmd", fake_hf_cmd)
    monkeypatch.setattr(bench_scale, "_child_cmd", fake_child)
    res = bench_scale.main(
        ["--shape", "tiny", "--lengths", "256,512,1024", "--modes", "dense", "--hf"]
    )
    assert hf_calls == [[256, 512, 1024]] and ours == [256, 512, 1024]
    hf = [r for r in res["rows"] if r["what"] == "hf_prefill"]
    assert [r["skipped"] for r in hf] == ["out of memory"] + ["out of memory at 256 tokens"] * 2
    assert hf[0]["oom"] is True and hf[0]["hf_meta"] == {"attn": "sdpa"}
    with pytest.raises(ValueError, match="--in-process"):
        bench_scale.main(["--shape", "tiny", "--lengths", "256", "--hf", "--in-process"])
