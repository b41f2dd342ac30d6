"""Synthetic post-RoPE q/k inputs for tests and benchmarks of sparse attention.

i.i.d. N(0, 1) q/k keep ~90% of the blocks at threshold 0.9 (the antidiagonal estimate
averages ``stride`` dot products, which flattens weak structure), so they test nothing about
sparsity. ``structured_qk`` builds inputs whose attention looks like a language model's:

- **local bias through RoPE**: every query and key carries the same vector ``c`` before RoPE,
  so after RoPE ``q_i . k_j`` gains ``|c|^2 * mean_f cos(theta_f (i - j))``, which decays
  about logarithmically with the distance (RoPE frequencies are geometric): attention
  weights then fall off like a power of the distance;
- **heavy hitters**: a few spans of keys (the first tokens, the "sink", and ``n_heavy``
  random spans of ``heavy_len`` tokens) carry a vector ``u`` that every query also
  carries; ``u`` lives in the lowest RoPE frequencies, so the bonus barely depends on the
  distance;
- **low-rank content**: the remaining q/k content is ``noise`` times a rank-``rank`` random
  mixture (per kv head; query heads of a group share the basis), i.e. random logits.

With the defaults the estimate (threshold 0.9, block 128, stride 16 or 8) keeps 5-30% of the
causal blocks at 8K-128K tokens: 9-12% on the benchmark's 32-head inputs at 32K/64K/128K
(BENCHMARKS.md, XAttention estimate), 15-24% on single-head draws; i.i.d. N(0, 1) inputs keep 90%.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def apply_rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotate-half RoPE (HF Llama/Qwen3 layout). x: [B, T, heads, D] f32; positions: [T]."""
    d = x.shape[-1]
    inv_freq = theta ** (-jnp.arange(0, d, 2, dtype=jnp.float32) / d)  # [D/2]
    ang = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]  # [T, D/2]
    cos = jnp.concatenate([jnp.cos(ang)] * 2, axis=-1)[None, :, None, :]
    sin = jnp.concatenate([jnp.sin(ang)] * 2, axis=-1)[None, :, None, :]
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return x * cos + rotated * sin


def random_qk(
    key: jax.Array,
    batch: int,
    seq_len: int,
    q_heads: int,
    kv_heads: int,
    head_dim: int,
    dtype=jnp.bfloat16,
):
    """i.i.d. N(0, 1) q: [B, T, H, D] and k: [B, T, K, D]."""
    kq, kk = jax.random.split(key)
    q = jax.random.normal(kq, (batch, seq_len, q_heads, head_dim), jnp.float32)
    k = jax.random.normal(kk, (batch, seq_len, kv_heads, head_dim), jnp.float32)
    return q.astype(dtype), k.astype(dtype)


def structured_qk(
    key: jax.Array,
    batch: int,
    seq_len: int,
    q_heads: int,
    kv_heads: int,
    head_dim: int,
    *,
    dtype=jnp.bfloat16,
    local_strength: float = 4.0,
    heavy_strength: float = 2.5,
    n_heavy: int = 8,
    heavy_len: int = 32,
    noise: float = 1.0,
    rank: int = 16,
    rope_theta: float = 1e6,
):
    """Structured post-RoPE q: [B, T, H, D], k: [B, T, K, D] (see the module docstring).

    Args:
      local_strength: ``|c|`` in units of ``D**0.25`` (the logit bonus at distance 0 is
        ``local_strength**2``).
      heavy_strength: ``|u|`` in the same units for queries and heavy keys.
      n_heavy, heavy_len: number and length of the random heavy-hitter key spans (the first
        ``heavy_len`` tokens are always heavy).
      noise: scale of the random low-rank content (per-token logit std about ``noise**2``).
      rank: rank of the random content of each kv head.
    """
    g = q_heads // kv_heads
    d = head_dim
    unit = d**0.25  # logits are divided by sqrt(D): scale vectors so bonuses are O(strength^2)
    keys = jax.random.split(key, 7)
    half = d // 2
    # c: spread over all rotary frequencies (locality); u: the 4 lowest frequencies only.
    c = jax.random.normal(keys[0], (batch, 1, kv_heads, 1, d))
    c = c / jnp.linalg.norm(c, axis=-1, keepdims=True) * (local_strength * unit)
    low = (jnp.arange(d) % half) >= half - 4
    u = jax.random.normal(keys[1], (batch, 1, kv_heads, 1, d)) * low
    u = u / jnp.linalg.norm(u, axis=-1, keepdims=True) * (heavy_strength * unit)

    basis = jax.random.normal(keys[2], (batch, 1, kv_heads, rank, d)) / jnp.sqrt(rank)
    zq = jax.random.normal(keys[3], (batch, seq_len, kv_heads, g, rank))
    zk = jax.random.normal(keys[4], (batch, seq_len, kv_heads, rank))
    q = noise * jnp.einsum("btkgr,bxkrd->btkgd", zq, basis)
    k = noise * jnp.einsum("btkr,bxkrd->btkd", zk, basis)

    pos = jnp.arange(seq_len)
    starts = jax.random.randint(keys[5], (batch, n_heavy), 0, max(1, seq_len - heavy_len))
    heavy = (pos[None, :] < heavy_len) | jnp.any(
        (pos[None, None, :] >= starts[:, :, None])
        & (pos[None, None, :] < starts[:, :, None] + heavy_len),
        axis=1,
    )  # [B, T]
    q = q + c + u  # c, u: [B, 1, K, 1, D] broadcast over T and G
    k = k + c[:, :, :, 0] + heavy[:, :, None, None] * u[:, :, :, 0]
    q = apply_rope(q.reshape(batch, seq_len, q_heads, d), pos, rope_theta)
    k = apply_rope(k, pos, rope_theta)
    return q.astype(dtype), k.astype(dtype)


def causal_density(
    mask: jax.Array, kv_lengths: jax.Array | None = None, block_size: int = 128
) -> float:
    """Kept fraction of the causal (valid) blocks of a prefill mask [B, H, nQb, nKb]."""
    b, _, n_qb, n_kb = mask.shape
    if kv_lengths is None:
        kv_lengths = jnp.full((b,), n_kb * block_size, jnp.int32)
    n_valid = -(-kv_lengths // block_size)
    r = jnp.arange(n_qb)[:, None] + (n_kb - n_qb)
    c = jnp.arange(n_kb)[None, :]
    causal = (
        (c <= r)[None] & (c[None] < n_valid[:, None, None]) & (r[None] < n_valid[:, None, None])
    )
    return float(jnp.sum(mask & causal[:, None]) / (mask.shape[1] * jnp.sum(causal)))
