"""Logits parity with transformers' Qwen3ForCausalLM on tiny random checkpoints."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from elastic_jax import load_model
from elastic_jax.model import forward_jit

YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}


def _hf_logits(hf_dir, tokens: np.ndarray, dtype) -> np.ndarray:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=dtype).eval()
    with torch.no_grad():
        return hf(torch.tensor(tokens)).logits.float().numpy()


def _our_logits(conv_dir, tokens: np.ndarray) -> np.ndarray:
    m = load_model(conv_dir)
    lengths = jnp.full((tokens.shape[0],), tokens.shape[1], jnp.int32)
    return np.asarray(
        forward_jit(m.params, jnp.asarray(tokens, jnp.int32), lengths, m.config, m.runtime)
    )


@pytest.mark.parametrize(
    "overrides",
    [
        dict(num_key_value_heads=4),  # GQA ratio 1
        dict(num_key_value_heads=1, tie_word_embeddings=False),  # ratio 4, untied
        dict(rope_scaling=YARN),  # yarn, tied
        dict(rope_scaling=YARN, tie_word_embeddings=False, legacy_rope_format=False),
    ],
    ids=["gqa1-tied", "gqa4-untied", "yarn-tied", "yarn-untied-rope_parameters"],
)
def test_fp32_logits_match_transformers(tiny_checkpoints, overrides):
    hf_dir, conv = tiny_checkpoints(**overrides)
    tokens = np.random.default_rng(1).integers(0, 512, (2, 200))
    ref = _hf_logits(hf_dir, tokens, torch.float32)
    ours = _our_logits(conv, tokens)
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)


def test_bf16_logits_close_to_transformers(tiny_checkpoints):
    hf_dir, conv = tiny_checkpoints(dtype="bfloat16")
    tokens = np.random.default_rng(2).integers(0, 512, (2, 160))
    ref = _hf_logits(hf_dir, tokens, torch.bfloat16)
    ours = _our_logits(conv, tokens)
    # Both sides round activations to bf16 at every layer boundary but in different op orders, so
    # logits (|logit| up to ~10) differ by a few bf16 ulps; greedy choices must still agree.
    scale = np.abs(ref).max()
    assert np.abs(ours - ref).max() <= 0.03 * scale
    assert (ours.argmax(-1) == ref.argmax(-1)).mean() >= 0.97
