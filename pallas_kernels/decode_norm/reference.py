"""Pure-jnp reference of ``add_rms_norm`` (the decode step's residual add + RMSNorm)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def add_rms_norm_reference(
    h: jax.Array,
    weight: jax.Array,
    *,
    eps: float,
    partials: jax.Array | None = None,
    bias: jax.Array | None = None,
    residual: jax.Array | None = None,
    out_rows: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """h: [B, E]; weight: [E]; partials: float32 [S, B, E] (a split GEMV's output) or residual:
    [B, E] (h.dtype), at most one; bias: [E] added to the partials' float32 sum.

    Returns (h_new [B, E], x [R, E]), both in h.dtype, R = out_rows (default B):
      upd   = (sum_s partials[s] + bias) cast to h.dtype, or residual (none: h_new = h)
      h_new = h + upd
      x[:B] = weight * (h_new / rms(h_new)) with the norm in float32, cast to h.dtype before
              the weight multiply (the model's ``layers.rms_norm``, HF's order); x[B:] = 0.
    """
    dt = h.dtype
    if partials is not None:
        upd = jnp.sum(partials.astype(jnp.float32), axis=0)
        if bias is not None:
            upd = upd + bias.astype(jnp.float32)
        h = h + upd.astype(dt)
    elif residual is not None:
        h = h + residual.astype(dt)
    h32 = h.astype(jnp.float32)
    var = jnp.mean(h32 * h32, axis=-1, keepdims=True)
    x = weight.astype(dt) * (h32 * jax.lax.rsqrt(var + eps)).astype(dt)
    rows = h.shape[0] if out_rows is None else out_rows
    x = jnp.pad(x, ((0, rows - h.shape[0]), (0, 0)))
    return h, x


def qk_norm_rope_reference(
    q: jax.Array,
    k: jax.Array,
    cos: jax.Array,
    sin: jax.Array,
    *,
    batch: int,
    q_weight: jax.Array | None = None,
    k_weight: jax.Array | None = None,
    eps: float = 1e-6,
) -> tuple[jax.Array, jax.Array]:
    """q: [R, H, D], k: [R, K, D] (R >= batch rows; rows past ``batch`` are ignored);
    cos, sin: [batch, D]; q_weight, k_weight: [D] per-head RMSNorm weights (Qwen3's q_norm /
    k_norm) or None (Llama: RoPE only).

    Returns (q [batch, H, D], k [batch, K, D]) in q.dtype: each head normed as the model's
    ``layers.rms_norm`` (when weights are given), then rotate-half RoPE in the activation dtype
    as ``layers.apply_rope`` (x * cos + rotate_half(x) * sin, each product rounded)."""

    def one(x, w):
        x = x[:batch]
        dt = x.dtype
        if w is not None:
            x32 = x.astype(jnp.float32)
            var = jnp.mean(x32 * x32, axis=-1, keepdims=True)
            x = w.astype(dt) * (x32 * jax.lax.rsqrt(var + eps)).astype(dt)
        half = x.shape[-1] // 2
        rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
        c, s = cos[:, None, :].astype(dt), sin[:, None, :].astype(dt)
        return x * c + rotated * s

    return one(q, q_weight), one(k, k_weight)
