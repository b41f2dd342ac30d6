"""CPU smoke run of the Llama-3.1 prefill benchmark (tiny shape): both sides produce rows, the
summary puts them side by side with the paper's speed-ups, and the benchmark's 8B config is the
one config.json of Llama-3.1-8B-Instruct gives."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import bench_llama
from elastic_jax.config import config_from_hf

# Llama-3.1-8B-Instruct's config.json (the fields our ModelConfig reads).
LLAMA31_8B_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "attention_bias": False,
    "bos_token_id": 128000,
    "eos_token_id": [128001, 128008, 128009],
    "hidden_act": "silu",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "max_position_embeddings": 131072,
    "mlp_bias": False,
    "model_type": "llama",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
    "vocab_size": 128256,
}


def test_bench_config_is_llama31_8b():
    ours = bench_llama.make_llama_config("llama8b")
    ref = config_from_hf(LLAMA31_8B_CONFIG)
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                  "num_kv_heads", "head_dim", "rms_norm_eps", "rope", "tie_word_embeddings",
                  "qk_norm", "attention_bias", "mlp_bias", "max_position_embeddings"):  # fmt: skip
        assert getattr(ours, field) == getattr(ref, field), field
    assert bench_llama.make_llama_config("llama8b", "XA-SSA").elastic.toggle_type == "streaming"


@pytest.mark.parametrize("tokens", [4096, 32768, 131072])
@pytest.mark.parametrize("skipped", [0.65, 0.995])
def test_synthetic_fraction_hits_the_esr_when_it_can(tokens, skipped):
    n = -(-tokens // 128)
    causal, forced = n * (n + 1) // 2, 2 * n - 1
    f = bench_llama.synthetic_fraction(tokens, skipped)
    expected_kept = forced + f * (causal - forced)
    if forced <= (1 - skipped) * causal:
        assert expected_kept / causal == pytest.approx(1 - skipped)
    else:  # sink + diagonal alone keep more than the target: keep nothing else
        assert f == pytest.approx(0, abs=1e-6)


def test_bench_llama_parts_on_cpu(tmp_path, capsys):
    args = ["--shape", "tiny", "--lengths", "512", "--reps", "1", "--hf-reps", "1"]
    ours = bench_llama.main(["--part", "jax", *args, "--out", str(tmp_path / "jax.json")])
    hf = bench_llama.main(["--part", "hf", *args, "--device", "cpu"])
    assert json.loads((tmp_path / "jax.json").read_text())["rows"] == ours["rows"]
    assert [r["case"] for r in ours["rows"]] == ["dense", "XA-SSA", "FA-XA"]
    assert all(r["s"] > 0 for r in ours["rows"] + hf["rows"])
    # 4 block rows: sink + diagonal keep 7 of 10 causal blocks, the knob adds ~nothing.
    assert ours["rows"][1]["kept_fraction"] == pytest.approx(0.7)
    (line,) = bench_llama.summarize(hf["rows"] + ours["rows"])
    assert line["tokens"] == 512 and line["dense_vs_hf"] > 0
    assert line["XA-SSA"]["paper"] == 3.28 and line["FA-XA"]["paper"] == 1.51
    assert line["FA-XA"]["skipped"] == pytest.approx(0.3)
    assert line["XA-SSA"]["vs_dense"] == pytest.approx(line["dense_s"] / line["XA-SSA"]["s"])
    bench_llama.print_table([line], {"jax": "cpu"})
    assert "3.28x" in capsys.readouterr().out


@pytest.mark.slow
def test_bench_llama_all_runs_both_children(tmp_path):
    out = tmp_path / "all.json"
    root = Path(__file__).resolve().parents[1]
    subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_llama", "--shape", "tiny", "--lengths", "256",
         "--reps", "1", "--hf-reps", "1", "--device", "cpu", "--out", str(out)],
        cwd=root, check=True, timeout=600,
    )  # fmt: skip
    res = json.loads(out.read_text())
    assert res["meta"]["hf"]["status"] == "ok" and res["meta"]["jax"]["status"] == "ok"
    assert {r["case"] for r in res["rows"]} == {"HF SDPA", "dense", "XA-SSA", "FA-XA"}
    assert res["summary"][0]["tokens"] == 256
