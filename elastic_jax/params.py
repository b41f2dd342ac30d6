"""Weight pytrees. Shapes are declared once, in ``abstract()``; init, load and the converter's
checks all derive from it.

Per-layer weights are stacked along a leading layer axis L so the forward pass scans over layers
(one compiled layer body, fast compiles for 36-layer models).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from elastic_jax.config import ModelConfig
from elastic_jax.router import RouterParams


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class LayerParams:
    """One decoder layer (or all layers stacked: every shape gains a leading L).

    attn_norm, mlp_norm: [E]; wq: [E, H, D]; wk, wv: [E, K, D]; wo: [H, D, E];
    w_gate, w_up: [E, F]; w_down: [F, E].
    Per-family optional leaves (None when the config does not use them):
    q_norm, k_norm: [D] (``cfg.qk_norm``, Qwen3); q_bias: [H, D], k_bias, v_bias: [K, D],
    o_bias: [E] (``cfg.attention_bias``); gate_bias, up_bias: [F], down_bias: [E]
    (``cfg.mlp_bias``); router: the elastic router of the layer
    (``elastic_jax.router.RouterParams``, PawQwen3 / PawLlama).
    """

    attn_norm: jax.Array
    wq: jax.Array
    wk: jax.Array
    wv: jax.Array
    wo: jax.Array
    mlp_norm: jax.Array
    w_gate: jax.Array
    w_up: jax.Array
    w_down: jax.Array
    q_norm: jax.Array | None = None
    k_norm: jax.Array | None = None
    q_bias: jax.Array | None = None
    k_bias: jax.Array | None = None
    v_bias: jax.Array | None = None
    o_bias: jax.Array | None = None
    gate_bias: jax.Array | None = None
    up_bias: jax.Array | None = None
    down_bias: jax.Array | None = None
    router: Any = None


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Params:
    """embed: [V, E]; layers: LayerParams stacked over L; final_norm: [E];
    lm_head: [E, V], or None when tied to ``embed``."""

    embed: jax.Array
    layers: LayerParams
    final_norm: jax.Array
    lm_head: jax.Array | None = None


def router_abstract(cfg: ModelConfig, dtype) -> Any:
    """Stacked router weights of an elastic model (None for plain Qwen3 / Llama)."""
    if not cfg.is_elastic:
        return None
    L, d = cfg.num_layers, cfg.head_dim
    shapes = RouterParams.shapes(d, use_softmax=cfg.elastic.use_softmax)
    return RouterParams(**{k: jax.ShapeDtypeStruct((L, *s), dtype) for k, s in shapes.items()})


def abstract(cfg: ModelConfig) -> Params:
    """The parameter pytree as ``jax.ShapeDtypeStruct`` leaves."""
    L, E, F = cfg.num_layers, cfg.hidden_size, cfg.intermediate_size
    H, K, D, V = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.vocab_size
    dt = cfg.jnp_dtype

    def s(*shape):
        return jax.ShapeDtypeStruct(shape, dt)

    def opt(flag: bool, *shape):
        return s(*shape) if flag else None

    ab, mb = cfg.attention_bias, cfg.mlp_bias
    layers = LayerParams(
        attn_norm=s(L, E),
        wq=s(L, E, H, D),
        wk=s(L, E, K, D),
        wv=s(L, E, K, D),
        wo=s(L, H, D, E),
        mlp_norm=s(L, E),
        w_gate=s(L, E, F),
        w_up=s(L, E, F),
        w_down=s(L, F, E),
        q_norm=opt(cfg.qk_norm, L, D),
        k_norm=opt(cfg.qk_norm, L, D),
        q_bias=opt(ab, L, H, D),
        k_bias=opt(ab, L, K, D),
        v_bias=opt(ab, L, K, D),
        o_bias=opt(ab, L, E),
        gate_bias=opt(mb, L, F),
        up_bias=opt(mb, L, F),
        down_bias=opt(mb, L, E),
        router=router_abstract(cfg, dt),
    )
    return Params(
        embed=s(V, E),
        layers=layers,
        final_norm=s(E),
        lm_head=None if cfg.tie_word_embeddings else s(E, V),
    )


_FAN_IN = {
    "wq": lambda c: c.hidden_size,
    "wk": lambda c: c.hidden_size,
    "wv": lambda c: c.hidden_size,
    "wo": lambda c: c.num_heads * c.head_dim,
    "w_gate": lambda c: c.hidden_size,
    "w_up": lambda c: c.hidden_size,
    "w_down": lambda c: c.intermediate_size,
    "embed": lambda c: c.hidden_size,
    "lm_head": lambda c: c.hidden_size,
}


def init_random(cfg: ModelConfig, key: jax.Array, *, scale: float = 1.0) -> Params:
    """Random weights with the right shapes (benchmarks and tests; not a training init):
    norms are ones, matrices N(0, scale^2 / fan_in), biases N(0, 0.01)."""
    paths_leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract(cfg))
    keys = jax.random.split(key, len(paths_leaves))
    out = []
    for k, (path, leaf) in zip(keys, paths_leaves):
        name = jax.tree_util.keystr(path)
        if "norm" in name:
            out.append(jnp.ones(leaf.shape, leaf.dtype))
        elif name.endswith("_b") or "bias" in name:
            out.append((0.01 * jax.random.normal(k, leaf.shape, jnp.float32)).astype(leaf.dtype))
        else:
            field = name.rsplit(".", 1)[-1]
            fan_in = _FAN_IN[field](cfg) if field in _FAN_IN else leaf.shape[-2]
            w = jax.random.normal(k, leaf.shape, jnp.float32) * (scale / np.sqrt(fan_in))
            out.append(w.astype(leaf.dtype))
    return jax.tree_util.tree_unflatten(treedef, out)


# ---------------------------------------------------------------------- dict conversion


def to_state_dict(params: Params) -> dict[str, Any]:
    """Nested plain dict (what we write with orbax); None leaves are dropped."""

    def conv(x):
        if dataclasses.is_dataclass(x):
            return {
                f.name: conv(getattr(x, f.name))
                for f in dataclasses.fields(x)
                if getattr(x, f.name) is not None
            }
        return x

    return conv(params)


def from_state_dict(cfg: ModelConfig, state: dict[str, Any]) -> Params:
    """Inverse of ``to_state_dict``, checking every shape against ``abstract(cfg)``."""
    ref = abstract(cfg)

    def build(template, d, path):
        if dataclasses.is_dataclass(template):
            kwargs = {}
            for f in dataclasses.fields(template):
                sub = getattr(template, f.name)
                if sub is None:
                    kwargs[f.name] = None
                    continue
                if f.name not in d:
                    raise KeyError(f"checkpoint is missing parameter '{path}{f.name}'")
                kwargs[f.name] = build(sub, d[f.name], f"{path}{f.name}.")
            return type(template)(**kwargs)
        if tuple(d.shape) != tuple(template.shape):
            raise ValueError(
                f"parameter '{path[:-1]}' has shape {tuple(d.shape)}, expected {tuple(template.shape)}"
            )
        return d

    return build(ref, state, "")
