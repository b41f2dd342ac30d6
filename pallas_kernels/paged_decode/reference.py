"""Pure-jnp reference for paged decode attention: gather the pages, then masked softmax.

It defines the semantics the Pallas kernel must match:

- query head ``h`` attends with kv head ``h // G`` (``G = H // K``, GQA);
- sequence ``b`` sees the first ``lengths[b]`` tokens of the concatenation of its pages
  ``page_table[b, 0], page_table[b, 1], ...`` (each page holds ``N`` tokens);
- keys and values at positions ``>= lengths[b]`` never contribute, even when they hold NaN;
- a sequence with ``lengths[b] == 0`` gets a zero output.

It materialises ``[K, B, max_pages * N, D]`` copies of the cache, so it is meant for tests, CPU
runs and as the XLA baseline of the benchmark, not for long contexts in production.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def paged_decode_reference(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    page_table: jax.Array,
    lengths: jax.Array,
    *,
    k_extra: jax.Array | None = None,
    v_extra: jax.Array | None = None,
    sm_scale: float | None = None,
    return_lse: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """One-token attention of each sequence against its pages (and optional extra keys).

    Args:
      q: [B, H, D] query of the token being decoded.
      k_pages, v_pages: [K, P, N, D] paged cache of one layer (kv-head major).
      page_table: int32 [B, max_pages] page ids of each sequence, in token order.
      lengths: int32 [B] valid tokens of each sequence (including the decoded token).
      k_extra, v_extra: [B, K, D] or None: one more key/value per sequence and kv head that is
        not in the cache (the token being decoded), always visible, after the cache's tokens.
      sm_scale: softmax scale; default ``1 / sqrt(D)``.

    Returns:
      [B, H, D] in ``q.dtype``; with ``return_lse`` also the natural-log softmax normaliser
      f32 [B, H] (-inf for a zero length).
    """
    batch, num_heads, head_dim = q.shape
    num_kv_heads, _, page_size, _ = k_pages.shape
    group = num_heads // num_kv_heads
    max_pages = page_table.shape[1]
    seq_len = max_pages * page_size
    scale = 1.0 / math.sqrt(head_dim) if sm_scale is None else float(sm_scale)

    # [K, B, max_pages, N, D] -> [K, B, S, D]; indexing per axis keeps offsets out of int32.
    k = k_pages[:, page_table].reshape(num_kv_heads, batch, seq_len, head_dim)
    v = v_pages[:, page_table].reshape(num_kv_heads, batch, seq_len, head_dim)
    valid = jnp.arange(seq_len, dtype=jnp.int32)[None, :] < lengths[:, None]  # [B, S]

    qg = q.reshape(batch, num_kv_heads, group, head_dim)
    # f32 logits and softmax; HIGHEST so that f32 inputs are not rounded to tf32 on GPU.
    logits = jnp.einsum(
        "bkgd,kbsd->bkgs",
        qg,
        k,
        preferred_element_type=jnp.float32,
        precision=jax.lax.Precision.HIGHEST,
    )
    logits = jnp.where(valid[:, None, None, :], logits * scale, -jnp.inf)
    # Zero masked values too: 0 * NaN would leak garbage past the length into the output.
    v = jnp.where(valid[None, :, :, None], v.astype(jnp.float32), 0.0)
    if k_extra is not None:
        extra = jnp.einsum(
            "bkgd,bkd->bkg",
            qg,
            k_extra.astype(q.dtype),
            preferred_element_type=jnp.float32,
            precision=jax.lax.Precision.HIGHEST,
        )
        logits = jnp.concatenate([logits, extra[..., None] * scale], axis=-1)
        vx = jnp.transpose(v_extra.astype(jnp.float32), (1, 0, 2))[:, :, None]  # [K, B, 1, D]
        v = jnp.concatenate([v, vx], axis=2)
    m = jnp.max(logits, axis=-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)  # all-masked rows (length 0) stay finite
    p = jnp.exp(logits - m)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    out = jnp.einsum("bkgs,kbsd->bkgd", p, v, precision=jax.lax.Precision.HIGHEST)
    out = out / jnp.where(denom == 0.0, 1.0, denom)
    out = out.reshape(batch, num_heads, head_dim).astype(q.dtype)
    if not return_lse:
        return out
    lse = jnp.where(denom > 0, m + jnp.log(jnp.where(denom > 0, denom, 1.0)), -jnp.inf)
    return out, lse.reshape(batch, num_heads)
