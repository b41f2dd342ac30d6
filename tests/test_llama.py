"""Llama-3.x backbone: logits and greedy generation equal transformers' LlamaForCausalLM on tiny
random checkpoints (llama3 rope scaling or not, tied or untied, with projection biases), and bad
Llama configs fail with errors that name the field."""

from __future__ import annotations

import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from convert.hf_to_jax import ConversionError, convert
from elastic_jax import generate, load_model
from elastic_jax.config import config_from_hf, rope_inv_freq
from elastic_jax.model import forward_jit
from elastic_jax.testing.tiny import TINY_LLAMA, TINY_LLAMA3_SCALING


def _hf_logits(hf_dir, tokens: np.ndarray) -> np.ndarray:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(torch.tensor(tokens)).logits.numpy()


def _our_logits(conv_dir, tokens: np.ndarray) -> np.ndarray:
    m = load_model(conv_dir)
    lengths = jnp.full((tokens.shape[0],), tokens.shape[1], jnp.int32)
    return np.asarray(
        forward_jit(m.params, jnp.asarray(tokens, jnp.int32), lengths, m.config, m.runtime)
    )


def _hf_config(**overrides) -> dict:
    base = dict(
        TINY_LLAMA,
        architectures=["LlamaForCausalLM"],
        max_position_embeddings=131072,
        rope_scaling=dict(TINY_LLAMA3_SCALING, original_max_position_embeddings=8192),
    )
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


@pytest.mark.parametrize(
    "overrides",
    [
        dict(),  # untied, default rope
        dict(rope_scaling=TINY_LLAMA3_SCALING),  # llama3 scaling, untied
        dict(rope_scaling=TINY_LLAMA3_SCALING, tie_word_embeddings=True, legacy_rope_format=False),
        dict(attention_bias=True, mlp_bias=True, num_key_value_heads=1, head_dim=32),
    ],
    ids=["untied", "llama3-untied", "llama3-tied-rope_parameters", "bias-mqa-head_dim32"],
)
def test_fp32_logits_match_transformers_llama(tiny_checkpoints, overrides):
    hf_dir, conv = tiny_checkpoints(family="llama", **overrides)
    cfg = load_model(conv).config
    assert (cfg.qk_norm, cfg.attention_bias) == (False, bool(overrides.get("attention_bias")))
    tokens = np.random.default_rng(1).integers(0, 512, (2, 200))
    ref = _hf_logits(hf_dir, tokens)
    ours = _our_logits(conv, tokens)
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)


def test_llama3_inv_freq_equals_transformers():
    """The llama3 frequency table is bit-identical to transformers' at the real 8B setting."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling = dict(TINY_LLAMA3_SCALING, original_max_position_embeddings=8192)
    hf = LlamaConfig(
        hidden_size=4096,
        num_attention_heads=32,
        max_position_embeddings=131072,
        rope_parameters={**scaling, "rope_theta": 500000.0},
    )
    ref, scale = ROPE_INIT_FUNCTIONS["llama3"](hf, "cpu")
    ours, our_scale = rope_inv_freq(config_from_hf(_hf_config(hidden_size=4096, head_dim=128)))
    np.testing.assert_array_equal(ours, ref.numpy())
    assert our_scale == scale == 1.0
    # Scaling changed the low frequencies (it is not the default table).
    plain, _ = rope_inv_freq(
        config_from_hf(_hf_config(hidden_size=4096, head_dim=128, rope_scaling=None))
    )
    assert ours[-1] == pytest.approx(plain[-1] / 8) and ours[0] == plain[0]


def test_greedy_generate_matches_transformers_llama(tiny_checkpoints):
    hf_dir, conv = tiny_checkpoints(family="llama", rope_scaling=TINY_LLAMA3_SCALING)
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    model = load_model(conv, page_size=16, prefill_chunk=128)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(6, 512, n).tolist() for n in (5, 37, 300)]
    res = generate(model, prompts, max_new_tokens=10, stop_token_ids=[])
    for p, got in zip(prompts, res.token_ids):
        out = hf.generate(
            torch.tensor([p]), max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=0
        )
        assert got == out[0, len(p) :].tolist()


def test_llama_chat_prompt_and_eos_ids(tiny_checkpoints):
    """The chat template comes from the checkpoint's tokenizer files, BOS appears once, and the
    stop set holds every eos id of generation_config.json."""
    _, conv = tiny_checkpoints(family="llama")
    model = load_model(conv)
    tok = model.tokenizer
    ids = [tok.token_to_id(t) for t in ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>")]
    assert sorted(tok.eos_token_ids) == sorted(ids)
    text = tok.apply_chat_template([{"role": "user", "content": "hello"}])
    assert text.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>")
    assert text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    bos = tok.token_to_id("<|begin_of_text|>")
    assert tok.encode(text, add_special_tokens=False).count(bos) == 1
    assert tok.encode("hello")[0] == bos  # raw prompts get BOS from the post-processor
    res = generate(model, ["hello"], max_new_tokens=4, chat_template=True)
    assert len(res.token_ids[0]) <= 4


# ------------------------------------------------------------------------------ bad configs


@pytest.mark.parametrize(
    "overrides, match",
    [
        (
            dict(rope_scaling={"rope_type": "longrope", "factor": 2.0}),
            "'longrope' is not supported",
        ),
        (
            dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "high_freq_factor": 4.0}),
            "low_freq_factor is required for llama3",
        ),
        (
            dict(rope_scaling=dict(TINY_LLAMA3_SCALING, factor=None)),
            "factor=None must be given",
        ),
        (
            dict(rope_scaling=dict(TINY_LLAMA3_SCALING, high_freq_factor=1.0)),
            "high_freq_factor=1.0 must be > low_freq_factor=1.0",
        ),
        (dict(hidden_act="gelu"), "hidden_act='gelu' is not supported"),
        (dict(num_hidden_layers=None), r"missing required field.*num_hidden_layers"),
        (dict(num_key_value_heads=3), "num_key_value_heads=3 must divide"),
    ],
)
def test_bad_llama_configs(overrides, match):
    with pytest.raises(ValueError, match=match):
        config_from_hf(_hf_config(**overrides), source="llama/config.json")


def test_llama3_defaults_original_max_position(tmp_path):
    """As transformers: a llama3 block without original_max_position_embeddings uses
    max_position_embeddings."""
    scaling = {
        k: v for k, v in TINY_LLAMA3_SCALING.items() if k != "original_max_position_embeddings"
    }
    cfg = config_from_hf(_hf_config(rope_scaling=scaling, max_position_embeddings=2048))
    assert cfg.rope.original_max_position_embeddings == 2048


def test_bias_tensors_without_the_flag_are_an_error(tiny_checkpoints, tmp_path):
    """A checkpoint with q_proj biases but attention_bias=false (or a Qwen3-style k_norm in a
    Llama checkpoint) is refused, naming the tensor: skipping it would change the layer."""
    hf_src, _ = tiny_checkpoints(family="llama", attention_bias=True)
    hf = tmp_path / "hf"
    shutil.copytree(hf_src, hf)
    cfg = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps({**cfg, "attention_bias": False}))
    with pytest.raises(
        ConversionError, match=r"model\.layers\.0\.self_attn\.(k|o|q|v)_proj\.bias.*attention_bias"
    ):
        convert(hf, tmp_path / "out", progress=False)

    from safetensors.numpy import save_file

    from convert.safetensors_io import load, read_header

    hf2 = tmp_path / "hf2"
    shutil.copytree(tiny_checkpoints(family="llama")[0], hf2)
    tensors = {n: load(i) for n, i in read_header(hf2 / "model.safetensors").items()}
    tensors["model.layers.1.self_attn.k_norm.weight"] = np.ones(16, np.float32)
    save_file(tensors, hf2 / "model.safetensors")
    with pytest.raises(ConversionError, match=r"layers\.1\.self_attn\.k_norm\.weight.*no per-head"):
        convert(hf2, tmp_path / "out2", progress=False)
