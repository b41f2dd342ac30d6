"""HF Qwen3 / Llama tensor names -> our parameter layout (``elastic_jax.params``).

Each rule names the HF tensor, its expected HF shape, where it goes in our tree (field, layer or
None) and how it is transformed. The converter checks every shape against these rules before
reading any tensor data.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from elastic_jax.config import ModelConfig

# Tensors that may appear in checkpoints but have no place in the inference model.
IGNORED_PATTERNS = (
    re.compile(r"model\.rotary_emb\.inv_freq"),
    re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq"),
)


@dataclass(frozen=True)
class Rule:
    hf_name: str
    hf_shape: tuple[int, ...]
    target: str  # dotted field path in Params, e.g. "layers.wq" or "embed"
    layer: int | None  # index along the stacked layer axis, or None
    transform: Callable[[np.ndarray], np.ndarray]


def _t(x: np.ndarray) -> np.ndarray:
    return x.T


def _heads(n: int, d: int) -> Callable[[np.ndarray], np.ndarray]:
    return lambda x: x.reshape(n, d)


# Unknown tensors under these module paths change what the layer computes (a norm, a bias or a
# router layer our model does not have), so the converter refuses them instead of skipping.
_COMPUTE_MODULE = re.compile(r"model\.layers\.\d+\.(self_attn|mlp)\.")


def unexpected_tensor_message(name: str, cfg: ModelConfig) -> str | None:
    """Why an unknown checkpoint tensor cannot be ignored, or None if skipping it is safe."""
    if not _COMPUTE_MODULE.match(name):
        return None
    hints = []
    if name.endswith(("q_norm.weight", "k_norm.weight")) and not cfg.qk_norm:
        hints.append(f"{cfg.architecture} has no per-head q/k RMSNorm")
    if name.endswith(("_proj.bias",)):
        flag = "mlp_bias" if ".mlp." in name else "attention_bias"
        hints.append(f"config.json has {flag}={getattr(cfg, flag)}")
    if ".mask_allocator." in name:
        hints.append("not part of the router layout we implement (docs/spec_notes.md)")
    hint = f" ({'; '.join(hints)})" if hints else ""
    return (
        f"tensor '{name}' is not used by {cfg.architecture} as configured{hint}; converting "
        "without it would compute a different layer"
    )


def backbone_rules(cfg: ModelConfig) -> list[Rule]:
    E, F, H, K, D, V = (
        cfg.hidden_size,
        cfg.intermediate_size,
        cfg.num_heads,
        cfg.num_kv_heads,
        cfg.head_dim,
        cfg.vocab_size,
    )
    rules = [
        Rule("model.embed_tokens.weight", (V, E), "embed", None, lambda x: x),
        Rule("model.norm.weight", (E,), "final_norm", None, lambda x: x),
    ]
    if not cfg.tie_word_embeddings:
        rules.append(Rule("lm_head.weight", (V, E), "lm_head", None, _t))
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        rules += [
            Rule(p + "input_layernorm.weight", (E,), "layers.attn_norm", i, lambda x: x),
            Rule(
                p + "self_attn.q_proj.weight",
                (H * D, E),
                "layers.wq",
                i,
                lambda x: x.T.reshape(E, H, D),
            ),
            Rule(
                p + "self_attn.k_proj.weight",
                (K * D, E),
                "layers.wk",
                i,
                lambda x: x.T.reshape(E, K, D),
            ),
            Rule(
                p + "self_attn.v_proj.weight",
                (K * D, E),
                "layers.wv",
                i,
                lambda x: x.T.reshape(E, K, D),
            ),
            Rule(
                p + "self_attn.o_proj.weight",
                (E, H * D),
                "layers.wo",
                i,
                lambda x: x.T.reshape(H, D, E),
            ),
            Rule(p + "post_attention_layernorm.weight", (E,), "layers.mlp_norm", i, lambda x: x),
            Rule(p + "mlp.gate_proj.weight", (F, E), "layers.w_gate", i, _t),
            Rule(p + "mlp.up_proj.weight", (F, E), "layers.w_up", i, _t),
            Rule(p + "mlp.down_proj.weight", (E, F), "layers.w_down", i, _t),
        ]
        if cfg.qk_norm:  # Qwen3
            rules += [
                Rule(p + "self_attn.q_norm.weight", (D,), "layers.q_norm", i, lambda x: x),
                Rule(p + "self_attn.k_norm.weight", (D,), "layers.k_norm", i, lambda x: x),
            ]
        if cfg.attention_bias:
            rules += [
                Rule(p + "self_attn.q_proj.bias", (H * D,), "layers.q_bias", i, _heads(H, D)),
                Rule(p + "self_attn.k_proj.bias", (K * D,), "layers.k_bias", i, _heads(K, D)),
                Rule(p + "self_attn.v_proj.bias", (K * D,), "layers.v_bias", i, _heads(K, D)),
                Rule(p + "self_attn.o_proj.bias", (E,), "layers.o_bias", i, lambda x: x),
            ]
        if cfg.mlp_bias:
            rules += [
                Rule(p + "mlp.gate_proj.bias", (F,), "layers.gate_bias", i, lambda x: x),
                Rule(p + "mlp.up_proj.bias", (F,), "layers.up_bias", i, lambda x: x),
                Rule(p + "mlp.down_proj.bias", (E,), "layers.down_bias", i, lambda x: x),
            ]
    return rules


def is_ignorable(name: str, cfg: ModelConfig) -> bool:
    if cfg.tie_word_embeddings and name == "lm_head.weight":
        return True  # tied: lm_head is the embedding
    return any(p.fullmatch(name) for p in IGNORED_PATTERNS)
