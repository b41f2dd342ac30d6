"""The converter: round trip, sharded inputs, --verify, and a clear error for each bad input."""

from __future__ import annotations

import json
import pickle
import shutil

import numpy as np
import pytest

from convert import hf_to_jax
from convert.hf_to_jax import ConversionError, convert, main
from elastic_jax import checkpoint, load_model


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_sharded_checkpoint_converts_and_verifies(tiny_checkpoints, tmp_path):
    hf_dir, ref_conv = tiny_checkpoints()
    sharded = tmp_path / "sharded"
    from elastic_jax.testing.tiny import make_tiny_qwen3

    make_tiny_qwen3(sharded, max_shard_size="40KB")
    assert (sharded / "model.safetensors.index.json").exists()
    assert len(list(sharded.glob("*.safetensors"))) > 1
    out = convert(sharded, tmp_path / "out", dtype="fp32", verify=True, progress=False)
    a = checkpoint.load_state(out, checkpoint.load_config(out))
    b = checkpoint.load_state(ref_conv, checkpoint.load_config(ref_conv))
    np.testing.assert_array_equal(a["layers"]["wq"], b["layers"]["wq"])
    for name in ("tokenizer.json", "tokenizer_config.json", "hf_config.json"):
        assert (out / name).exists()


def test_cli_bf16_and_existing_output(tiny_qwen3, tmp_path, capsys):
    out = tmp_path / "bf16"
    assert main([str(tiny_qwen3[0]), str(out), "--dtype", "bf16", "--verify", "--quiet"]) == 0
    model = load_model(out)
    assert model.params.layers.wq.dtype.name == "bfloat16"
    assert main([str(tiny_qwen3[0]), str(out), "--quiet"]) == 2
    assert "already exists" in capsys.readouterr().err


def test_missing_shard(tiny_qwen3, tmp_path):
    hf = _copy(tiny_qwen3[0], tmp_path / "hf")
    (hf / "model.safetensors").rename(hf / "model-00001-of-00002.safetensors")
    index = {
        "weight_map": {
            "model.embed_tokens.weight": "model-00001-of-00002.safetensors",
            "model.norm.weight": "model-00002-of-00002.safetensors",
        }
    }
    (hf / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ConversionError, match="model-00002-of-00002.safetensors"):
        convert(hf, tmp_path / "out", progress=False)


def test_wrong_tensor_shape(tiny_qwen3, tmp_path):
    hf = _copy(tiny_qwen3[0], tmp_path / "hf")
    cfg = json.loads((hf / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (hf / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(
        ConversionError, match=r"model\.layers\.0\.mlp\.gate_proj\.weight.*\[128, 64\].*\[96, 64\]"
    ):
        convert(hf, tmp_path / "out", progress=False)


def test_missing_tensor(tiny_qwen3, tmp_path):
    from safetensors.numpy import save_file

    from convert.safetensors_io import load, read_header

    hf = _copy(tiny_qwen3[0], tmp_path / "hf")
    infos = read_header(hf / "model.safetensors")
    kept = {n: load(i) for n, i in infos.items() if n != "model.layers.1.self_attn.k_norm.weight"}
    save_file(kept, hf / "model.safetensors")
    with pytest.raises(
        ConversionError, match=r"missing tensor.*model\.layers\.1\.self_attn\.k_norm"
    ):
        convert(hf, tmp_path / "out", progress=False)


def test_unknown_architecture_and_missing_field(tiny_qwen3, tmp_path):
    hf = _copy(tiny_qwen3[0], tmp_path / "hf")
    cfg = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps({**cfg, "architectures": ["MistralForCausalLM"]}))
    with pytest.raises(ValueError, match="unknown architecture 'MistralForCausalLM'"):
        convert(hf, tmp_path / "out", progress=False)
    del cfg["num_hidden_layers"]
    (hf / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(
        ValueError, match=r"config\.json: missing required field.*num_hidden_layers"
    ):
        convert(hf, tmp_path / "out", progress=False)


class _Boom:
    """Unpickling this object would create a marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_only_checkpoint_is_refused_without_unpickling(tiny_qwen3, tmp_path):
    hf = _copy(tiny_qwen3[0], tmp_path / "hf")
    (hf / "model.safetensors").unlink()
    marker = tmp_path / "unpickled"
    (hf / "pytorch_model.bin").write_bytes(pickle.dumps(_Boom(marker)))
    with pytest.raises(ConversionError, match="only pickle weights.*pytorch_model.bin"):
        convert(hf, tmp_path / "out", progress=False)
    assert not marker.exists()


def test_truncated_safetensors(tiny_qwen3, tmp_path):
    hf = _copy(tiny_qwen3[0], tmp_path / "hf")
    data = (hf / "model.safetensors").read_bytes()
    (hf / "model.safetensors").write_bytes(data[: len(data) - 1000])
    with pytest.raises(ConversionError, match="model.safetensors: truncated"):
        convert(hf, tmp_path / "out", progress=False)


def test_interrupted_conversion_leaves_no_output(tiny_qwen3, tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(hf_to_jax.checkpoint, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        convert(tiny_qwen3[0], tmp_path / "out", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_load_model_errors(tiny_qwen3, tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_model(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="not a converted elastic-jax checkpoint"):
        load_model(tiny_qwen3[0])  # an HF dir, not converted
    with pytest.raises(ValueError, match="needs a PawQwen3 / PawLlama checkpoint"):
        load_model(tiny_qwen3[1], attention_mode="streaming")
    with pytest.raises(ValueError, match="attention_mode='sparse'; allowed"):
        load_model(tiny_qwen3[1], attention_mode="sparse")
