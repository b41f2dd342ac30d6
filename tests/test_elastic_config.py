"""ElasticConfig: defaults, overrides, idempotency, purity and clear errors (spec 1.2, 3, 8)."""

from __future__ import annotations

import copy
import dataclasses

import jax
import jax.numpy as jnp
import pytest

from elastic_jax.config import ConfigError, config_from_hf
from elastic_jax.elastic_config import (
    MODE_DENSE,
    MODE_STREAMING,
    MODE_TABLE,
    MODE_XATTN,
    OFFICIAL_DEFAULTS,
    TRAINING_ONLY_CONFIG_FIELDS,
    ElasticConfig,
)

# The minimum a runnable config.json needs beyond the official defaults.
RUNNABLE = {"pooling_mode": "ctx_q", "enable_ada_sparsity": True}

BACKBONE = {
    "architectures": ["PawQwen3ForCausalLM"],
    "model_type": "qwen3",
    "vocab_size": 512,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1e6,
    "max_position_embeddings": 4096,
}

CHECKPOINT_FIELDS = {
    "sink_size": 64,
    "local_window_size": 2048,
    "toggle_type": "streaming",
    "retrieval_mode": "xattn",
    "pooling_mode": "ctx_q",
    "use_softmax": True,
    "enable_ada_sparsity": True,
    "block_size": 64,
    "xattn_stride": 8,
    "xattn_threshold": 0.9,
    "xattn_norm": 2,
    "mask_temp": 0.5,
    "use_task_emb_for_mask": False,
    "topk_k": 2048,
    "enable_lambda_task": True,
    "suggested_threshold": 0.37,
}


def test_defaults_when_absent():
    cfg = ElasticConfig.from_hf_dict({**BACKBONE, **RUNNABLE})
    assert cfg.sink_size == 128
    assert cfg.local_window_size == 1024
    assert cfg.toggle_type == "streaming"
    assert cfg.retrieval_mode == "full"
    assert cfg.xattn_stride == 16
    assert cfg.xattn_threshold == 0.8
    assert cfg.xattn_norm == 1.0
    assert cfg.block_size == 128
    assert cfg.mask_temp == 1.0
    assert cfg.use_softmax is False  # the official code default (sigmoid head)
    assert cfg.sink_blocks == 1 and cfg.local_blocks == 8
    assert cfg.class_modes == (MODE_STREAMING, MODE_DENSE)


def test_no_pretrained_config_fallback_is_runnable():
    cfg = ElasticConfig()
    assert (cfg.pooling_mode, cfg.use_softmax, cfg.enable_ada_sparsity) == ("ctx_q", True, True)
    assert cfg == ElasticConfig.from_hf_dict(cfg.to_hf_dict())


def test_checkpoint_values_override_defaults():
    cfg = ElasticConfig.from_hf_dict({**BACKBONE, **CHECKPOINT_FIELDS})
    for name in dataclasses.asdict(cfg):
        assert getattr(cfg, name) == CHECKPOINT_FIELDS[name], name
    assert isinstance(cfg.xattn_norm, float) and isinstance(cfg.block_size, int)
    assert cfg.sink_blocks == 1 and cfg.local_blocks == 32 and cfg.reshaped_block == 8
    assert cfg.class_modes == (MODE_STREAMING, MODE_XATTN)


def test_idempotent_pure_and_hashable():
    d = {**BACKBONE, **CHECKPOINT_FIELDS, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}
    before = copy.deepcopy(d)
    a = ElasticConfig.from_hf_dict(d)
    b = ElasticConfig.from_hf_dict(d)
    assert d == before  # input untouched
    assert a == b and hash(a) == hash(b)
    assert ElasticConfig.from_hf_dict({**d, **a.to_hf_dict()}) == a
    assert ElasticConfig(**dataclasses.asdict(a)) == a
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.sink_size = 1  # type: ignore[misc]

    # Usable as a jit static argument (hash/eq drive the compilation cache).
    f = jax.jit(lambda x, cfg: x * cfg.sink_blocks, static_argnums=1)
    assert int(f(jnp.int32(2), a)) == 2 * a.sink_blocks


def test_training_only_fields_ignored():
    junk = {name: "not-a-valid-value" for name in TRAINING_ONLY_CONFIG_FIELDS}
    assert ElasticConfig.from_hf_dict({**RUNNABLE, **junk}) == ElasticConfig.from_hf_dict(RUNNABLE)


@pytest.mark.parametrize(
    ("pair", "modes"),
    [
        (("full", "xattn"), (MODE_XATTN, MODE_DENSE)),
        (("full", "streaming"), (MODE_STREAMING, MODE_DENSE)),
        (("xattn", "streaming"), (MODE_STREAMING, MODE_XATTN)),
        (("xattn", "xattn"), (MODE_XATTN, MODE_XATTN)),
        (("full", "full"), (MODE_DENSE, MODE_DENSE)),
    ],
)
def test_mode_table_pairs(pair, modes):
    cfg = ElasticConfig.from_hf_dict(
        {**RUNNABLE, "retrieval_mode": pair[0], "toggle_type": pair[1]}
    )
    assert cfg.class_modes == modes
    assert cfg.router_ignored == (modes[0] == modes[1])
    assert cfg.uses_xattn == (MODE_XATTN in modes)
    assert len(MODE_TABLE) == 5


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("toggle_type", "sliding", r"toggle_type='sliding' is unknown; allowed: .*streaming"),
        ("retrieval_mode", "topk", r"retrieval_mode='topk' is unknown; allowed: .*xattn"),
        ("pooling_mode", "first_token", r"pooling_mode='first_token' is not implemented.*ctx_q"),
        ("pooling_mode", "max", r"pooling_mode='max' is unknown; allowed: 'ctx_q'"),
        ("enable_ada_sparsity", False, r"enable_ada_sparsity=False is not supported"),
        ("block_size", 96, r"block_size=96 is not supported.*\(64, 128\)"),
        ("block_size", 256, r"block_size=256"),
        ("block_size", "128", r"block_size='128' must be an integer"),
        ("local_window_size", 0, r"local_window_size=0 must be >= 1"),
        ("sink_size", -1, r"sink_size=-1 must be >= 0"),
        ("xattn_stride", 24, r"xattn_stride=24 must be a positive divisor of block_size=128"),
        ("xattn_stride", 0, r"xattn_stride=0 must be a positive divisor"),
        ("xattn_threshold", 0.0, r"xattn_threshold=0.0 must lie in \(0, inf\)"),
        ("xattn_threshold", -0.5, r"xattn_threshold=-0.5"),
        ("xattn_threshold", float("inf"), r"xattn_threshold=inf"),
        ("xattn_threshold", True, r"xattn_threshold=True must be a number"),
        ("xattn_norm", 0, r"xattn_norm=0.0 must lie in \(0, inf\)"),
        ("mask_temp", 0.0, r"mask_temp=0.0 must lie in \(0, inf\)"),
        ("use_softmax", "true", r"use_softmax='true' must be a boolean"),
        ("sink_size", 12.5, r"sink_size=12.5 must be an integer"),
    ],
)
def test_bad_values_raise_clear_errors(field, value, match):
    with pytest.raises(ConfigError, match=match) as info:
        ElasticConfig.from_hf_dict({**RUNNABLE, field: value}, source="ckpt/config.json")
    assert str(info.value).startswith("ckpt/config.json: ")
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    ("retrieval", "toggle"),
    [
        ("xattn", "full"),
        ("full", "local"),
        ("xattn", "topk"),
        ("full", "none"),
        ("xattn", "triangle"),
    ],
)
def test_unsupported_pair_raises(retrieval, toggle):
    msg = rf"retrieval_mode: {retrieval} and toggle_type: {toggle} is not supported"
    with pytest.raises(ValueError, match=msg):
        ElasticConfig.from_hf_dict({**RUNNABLE, "retrieval_mode": retrieval, "toggle_type": toggle})


def test_absent_required_fields_say_so():
    # Official defaults for absent keys are not runnable: the error says which keys were absent.
    with pytest.raises(ConfigError, match=r"first_token.*absent from config.json"):
        ElasticConfig.from_hf_dict({"enable_ada_sparsity": True})
    with pytest.raises(ConfigError, match=r"enable_ada_sparsity=False.*absent"):
        ElasticConfig.from_hf_dict({"pooling_mode": "ctx_q"})
    assert OFFICIAL_DEFAULTS["pooling_mode"] == "first_token"


def test_block_size_64_derived_blocks():
    cfg = ElasticConfig(block_size=64, sink_size=100, local_window_size=129)
    assert (cfg.sink_blocks, cfg.local_blocks, cfg.reshaped_block) == (2, 3, 4)
    cfg = ElasticConfig(sink_size=0, local_window_size=1)
    assert (cfg.sink_blocks, cfg.local_blocks) == (0, 1)


def test_model_config_integration():
    """The lead's ModelConfig builds ElasticConfig for PawQwen3 only, and round-trips it."""
    paw = config_from_hf({**BACKBONE, **CHECKPOINT_FIELDS})
    assert paw.elastic == ElasticConfig.from_hf_dict(CHECKPOINT_FIELDS)
    assert type(paw).from_dict(paw.to_dict()) == paw
    plain = config_from_hf(
        {**BACKBONE, "architectures": ["Qwen3ForCausalLM"], "toggle_type": "bogus"}
    )
    assert plain.elastic is None
    with pytest.raises(ConfigError, match=r"toggle_type='bogus'"):
        config_from_hf({**BACKBONE, **CHECKPOINT_FIELDS, "toggle_type": "bogus"})
