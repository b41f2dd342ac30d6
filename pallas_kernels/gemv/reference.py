"""Pure-jnp reference of ``stacked_gemv``."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def stacked_gemv_reference(x: jax.Array, w: jax.Array, layer: int) -> jax.Array:
    """x: [B, K], w: [L, K, N] -> float32 [B, N] = x @ w[layer] (f32 accumulation)."""
    return jnp.einsum("bk,kn->bn", x, w[layer], preferred_element_type=jnp.float32).astype(
        jnp.float32
    )


def stacked_gemv_attn_reference(
    acc: jax.Array, m: jax.Array, l: jax.Array, w: jax.Array, layer: int
) -> jax.Array:
    """acc [B, K, S, Gp, D], m, l [B, K, S, Gp] (paged decode split partials), w [L, H * D, N]
    -> float32 [B, N]: the splits merged (rows ``h % G`` of kv head ``h // G``), cast to w's
    dtype, flattened to [B, H * D], times w[layer]."""
    from pallas_kernels.paged_decode.pallas_triton import merge_splits

    B, K, _, _, D = acc.shape
    G = w.shape[1] // D // K
    o = merge_splits(acc[:, :, :, :G], m[..., :G], l[..., :G])  # [B, K, G, D]
    return stacked_gemv_reference(o.reshape(B, K * G * D).astype(w.dtype), w, layer)
