"""HF Qwen3 tensor names -> our parameter layout (``elastic_jax.params``).

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
            Rule(p + "self_attn.q_norm.weight", (D,), "layers.q_norm", i, lambda x: x),
            Rule(p + "self_attn.k_norm.weight", (D,), "layers.k_norm", i, lambda x: x),
            Rule(p + "post_attention_layernorm.weight", (E,), "layers.mlp_norm", i, lambda x: x),
            Rule(p + "mlp.gate_proj.weight", (F, E), "layers.w_gate", i, _t),
            Rule(p + "mlp.up_proj.weight", (F, E), "layers.w_up", i, _t),
            Rule(p + "mlp.down_proj.weight", (E, F), "layers.w_down", i, _t),
        ]
    return rules


def is_ignorable(name: str, cfg: ModelConfig) -> bool:
    if cfg.tie_word_embeddings and name == "lm_head.weight":
        return True  # tied: lm_head is the embedding
    return any(p.fullmatch(name) for p in IGNORED_PATTERNS)
