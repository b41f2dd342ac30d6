"""Pure-jnp reference of ``stacked_gemv``."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def stacked_gemv_reference(x: jax.Array, w: jax.Array, layer: int) -> jax.Array:
    """x: [B, K], w: [L, K, N] -> float32 [B, N] = x @ w[layer] (f32 accumulation)."""
    return jnp.einsum("bk,kn->bn", x, w[layer], preferred_element_type=jnp.float32).astype(
        jnp.float32
    )
