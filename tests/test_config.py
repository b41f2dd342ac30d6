"""Config parsing and RoPE frequencies."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest

from elastic_jax.config import ConfigError, RuntimeConfig, config_from_hf, rope_inv_freq
from elastic_jax.testing.tiny import hf_config_dict

BASE = {**hf_config_dict(), "architectures": ["Qwen3ForCausalLM"]}


def test_legacy_and_v5_rope_formats_agree():
    legacy = {
        **BASE,
        "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024},
    }
    v5 = {k: v for k, v in BASE.items() if k != "rope_theta"}
    v5["rope_parameters"] = {
        "rope_type": "yarn",
        "rope_theta": BASE["rope_theta"],
        "factor": 4.0,
        "original_max_position_embeddings": 1024,
    }
    snapshot = copy.deepcopy(legacy)
    a, b = config_from_hf(legacy), config_from_hf(v5)
    assert legacy == snapshot  # never mutated
    assert a.rope == b.rope and a.rope.rope_type == "yarn"
    assert config_from_hf(legacy) == a  # idempotent


@pytest.mark.parametrize(
    "scaling",
    [
        None,
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256},
        {
            "type": "yarn",
            "factor": 2.0,
            "attention_factor": 1.3,
            "original_max_position_embeddings": 512,
            "beta_fast": 16,
        },
    ],
)
def test_rope_matches_transformers(scaling):
    import torch
    from transformers import Qwen3Config
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf = {**BASE, "rope_scaling": scaling, "head_dim": 64}
    ours, scale = rope_inv_freq(config_from_hf(hf))
    params = {"rope_type": "default", "rope_theta": BASE["rope_theta"]}
    if scaling:
        params = {
            **{k: v for k, v in scaling.items() if k != "type"},
            "rope_type": "yarn",
            "rope_theta": BASE["rope_theta"],
        }
    hf_cfg = Qwen3Config(
        **{k: v for k, v in hf.items() if k not in ("rope_scaling", "rope_theta", "architectures")},
        rope_parameters=params,
    )
    if scaling is None:
        # transformers' default rule, written out (its "default" entry moved between versions).
        inv = 1.0 / (BASE["rope_theta"] ** (torch.arange(0, 64, 2).float() / 64))
        ref_scale = 1.0
    else:
        inv, ref_scale = ROPE_INIT_FUNCTIONS["yarn"](hf_cfg, "cpu")
        default = 1.0 / (BASE["rope_theta"] ** (np.arange(0, 64, 2) / 64))
        assert not np.allclose(ours, default)  # yarn really changes the frequencies
    np.testing.assert_allclose(ours, inv.numpy(), rtol=1e-6)
    assert scale == pytest.approx(ref_scale)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"num_key_value_heads": 3}, "num_key_value_heads=3 must divide num_attention_heads=4"),
        ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "'dynamic' is not supported"),
        ({"rope_scaling": {"rope_type": "yarn"}}, "factor"),
        ({"architectures": []}, "'architectures' is missing"),
        ({"hidden_size": -1}, "hidden_size=-1"),
        ({"use_sliding_window": True}, "use_sliding_window"),
    ],
)
def test_bad_config_values(change, message):
    with pytest.raises(ConfigError, match=message):
        config_from_hf({**BASE, **change}, source="x/config.json")


def test_config_round_trip():
    cfg = config_from_hf(BASE)
    assert type(cfg).from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_runtime_config_validation():
    with pytest.raises(ValueError, match="prefill_impl='mosaic'; allowed"):
        RuntimeConfig(prefill_impl="mosaic")
    with pytest.raises(ValueError, match="page_size=100 must be a positive power of two"):
        RuntimeConfig(page_size=100)
    with pytest.raises(ValueError, match="decode_num_splits=0 must be None or a positive int"):
        RuntimeConfig(decode_num_splits=0)
    assert RuntimeConfig(decode_num_splits=32).decode_num_splits == 32
    with pytest.raises(ValueError, match="prompt_bucket_steps=3 must be a positive power of two"):
        RuntimeConfig(prompt_bucket_steps=3)
