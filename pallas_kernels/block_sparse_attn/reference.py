"""Pure-jnp reference for block-sparse causal attention with per-head modes.

Defines the semantics every kernel in this package must reproduce (see
``pallas_kernels/README.md``). Dims: B batch, Tq query length, Tk key length, H query heads,
K kv heads, G = H / K, D head dim, bs block size, nQb = ceil(Tq / bs), nKb = ceil(Tk / bs).

Query ``i`` sits at absolute position ``Tk - Tq + i``. It sees key ``j`` iff
``j <= Tk - Tq + i`` and ``j < kv_lengths[b]``, and additionally, per head mode:

- ``0`` dense: nothing else.
- ``-1`` streaming: with ``ib = (Tk - Tq + i) // block_k`` and ``jb = j // block_k``,
  ``jb < sink_blocks`` or ``ib - local_blocks + 1 <= jb <= ib``.
- ``1`` block-sparse: ``j // block_k`` is among the first ``block_counts[b, h, i // block_q]``
  entries of ``block_indices[b, h, i // block_q]``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

MODE_DENSE = 0
MODE_SPARSE = 1
MODE_STREAMING = -1

# Score elements per query chunk; bounds the reference's memory (about 4 bytes each).
_CHUNK_ELEMENTS = 1 << 24


def kept_blocks_from_mask(block_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Bool block mask -> the compact kept-block list of ``pallas_kernels/README.md``.

    Args:
      block_mask: [B, H, nQb, nKb] bool, True where a key block is kept.

    Returns:
      block_counts: [B, H, nQb] int32, number of kept blocks per row.
      block_indices: [B, H, nQb, nKb] int32, kept block indices ascending in the first
        ``count`` entries, the rest repeating the last kept index (0 for an empty row).
    """
    block_mask = jnp.asarray(block_mask, jnp.bool_)
    counts = jnp.sum(block_mask, axis=-1, dtype=jnp.int32)
    # A stable sort of "not kept" puts kept indices first, in ascending order.
    order = jnp.argsort(~block_mask, axis=-1, stable=True).astype(jnp.int32)
    last = jnp.take_along_axis(order, jnp.maximum(counts - 1, 0)[..., None], axis=-1)
    last = jnp.where(counts[..., None] > 0, last, 0)
    pos = jnp.arange(block_mask.shape[-1], dtype=jnp.int32)
    indices = jnp.where(pos < counts[..., None], order, last)
    return counts, indices


def block_mask_from_modes(
    head_modes: jax.Array,
    block_counts: jax.Array | None,
    block_indices: jax.Array | None,
    *,
    q_len: int,
    k_len: int,
    block_q: int = 128,
    block_k: int = 128,
    sink_blocks: int = 1,
    local_blocks: int = 8,
) -> jax.Array:
    """Dense bool block mask of the key blocks each (head, query-block row) may visit.

    Rows are query blocks of ``block_q`` (row ``r`` = queries ``[r*block_q, (r+1)*block_q)``),
    columns key blocks of ``block_k``. A block is True when at least part of it is visible
    under the head's mode and block-level causality (the last key block a row may see is
    the one holding the row's last query position). Per-sequence lengths are not applied.

    Args:
      head_modes: [B, H] int32 in {0, 1, -1}.
      block_counts: [B, H, nQb] int32 or None (no block-sparse heads).
      block_indices: [B, H, nQb, nKb'] int32 or None.

    Returns:
      [B, H, nQb, nKb] bool.
    """
    n_qb, n_kb = -(-q_len // block_q), -(-k_len // block_k)
    offset = k_len - q_len
    rows = jnp.arange(n_qb)
    last_q = jnp.minimum(offset + (rows + 1) * block_q, k_len) - 1  # [nQb]
    diag = last_q // block_k  # last visible key block per row
    first_q_block = (offset + rows * block_q) // block_k  # streaming band anchor
    cols = jnp.arange(n_kb)
    causal = cols[None, :] <= diag[:, None]  # [nQb, nKb]
    band = (cols[None, :] >= first_q_block[:, None] - local_blocks + 1) | (
        cols[None, :] < sink_blocks
    )
    streaming = causal & band
    modes = head_modes[:, :, None, None]
    mask = jnp.where(modes == MODE_STREAMING, streaming[None, None], causal[None, None])
    if block_counts is not None and block_indices is not None:
        pos = jnp.arange(block_indices.shape[-1])
        listed = pos < block_counts[..., None]  # [B, H, nQb, nKb']
        onehot = (block_indices[..., None] == cols) & listed[..., None]
        sparse = jnp.any(onehot, axis=-2) & causal[None, None]
        mask = jnp.where(modes == MODE_SPARSE, sparse, mask)
    return mask


def _token_mask(
    head_modes: jax.Array,
    block_counts: jax.Array | None,
    block_indices: jax.Array | None,
    kv_lengths: jax.Array,
    q_pos: jax.Array,
    q_row: jax.Array,
    k_len: int,
    *,
    block_k: int,
    sink_blocks: int,
    local_blocks: int,
) -> jax.Array:
    """Visibility of every key for a chunk of queries: [B, H, Tc, Tk] bool.

    ``q_pos`` [Tc] are absolute query positions, ``q_row`` [Tc] their relative block rows.
    """
    k_pos = jnp.arange(k_len)
    base = (k_pos[None, :] <= q_pos[:, None])[None] & (
        k_pos[None, None, :] < kv_lengths[:, None, None]
    )  # [B, Tc, Tk]
    kb = k_pos // block_k
    qb = q_pos // block_k
    band = (kb[None, :] >= qb[:, None] - local_blocks + 1) | (kb[None, :] < sink_blocks)
    modes = head_modes[:, :, None, None]
    extra = jnp.where(modes == MODE_STREAMING, band[None, None], True)
    if block_counts is not None and block_indices is not None:
        counts = block_counts[:, :, q_row]  # [B, H, Tc]
        idx = block_indices[:, :, q_row, :]  # [B, H, Tc, nKb']
        listed = jnp.arange(idx.shape[-1]) < counts[..., None]
        n_kb = -(-k_len // block_k)
        kept_blocks = jnp.any(
            (idx[..., None] == jnp.arange(n_kb)) & listed[..., None], axis=-2
        )  # [B, H, Tc, nKb]
        sparse = jnp.take(kept_blocks, kb, axis=-1)  # [B, H, Tc, Tk]
        extra = jnp.where(modes == MODE_SPARSE, sparse, extra)
    return base[:, None] & extra


def block_sparse_attention_reference(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    head_modes: jax.Array,
    block_counts: jax.Array | None = None,
    block_indices: jax.Array | None = None,
    *,
    kv_lengths: jax.Array | None = None,
    sink_blocks: int = 1,
    local_blocks: int = 8,
    sm_scale: float | None = None,
    return_lse: bool = False,
    block_q: int = 128,
    block_k: int = 128,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Masked softmax attention built from the token mask; fp32 scores and softmax.

    Args:
      q: [B, Tq, H, D]; k, v: [B, Tk, K, D]; head_modes: [B, H] int32.
      block_counts: [B, H, nQb] int32; block_indices: [B, H, nQb, nKb] int32 (mode 1 heads).
      kv_lengths: [B] int32 valid keys per sequence (default Tk).

    Returns:
      out [B, Tq, H, D] in q.dtype, and lse [B, H, Tq] float32 (natural log) when
      ``return_lse``. Rows with no visible key get out 0 and lse -inf.
    """
    b, t_q, h, d = q.shape
    _, t_k, kh, _ = k.shape
    g = h // kh
    scale = 1.0 / math.sqrt(d) if sm_scale is None else sm_scale
    if kv_lengths is None:
        kv_lengths = jnp.full((b,), t_k, jnp.int32)
    offset = t_k - t_q
    kf = k.astype(jnp.float32)
    vf = v.astype(jnp.float32)
    chunk = max(16, min(t_q, _CHUNK_ELEMENTS // max(1, b * h * t_k)))
    outs, lses = [], []
    for c0 in range(0, t_q, chunk):
        c1 = min(t_q, c0 + chunk)
        qc = q[:, c0:c1].astype(jnp.float32).reshape(b, c1 - c0, kh, g, d)
        q_idx = jnp.arange(c0, c1)
        mask = _token_mask(
            head_modes,
            block_counts,
            block_indices,
            kv_lengths,
            offset + q_idx,
            q_idx // block_q,
            t_k,
            block_k=block_k,
            sink_blocks=sink_blocks,
            local_blocks=local_blocks,
        ).reshape(b, kh, g, c1 - c0, t_k)
        # HIGHEST: keep fp32 inputs at fp32 in the score and value matmuls (no tf32 on GPU).
        s = jnp.einsum("btkgd,bskd->bkgts", qc, kf, precision=jax.lax.Precision.HIGHEST)
        s = jnp.where(mask, s * scale, -jnp.inf)
        m = jnp.max(s, axis=-1, keepdims=True)
        m = jnp.where(jnp.isfinite(m), m, 0.0)
        p = jnp.exp(s - m)
        denom = jnp.sum(p, axis=-1, keepdims=True)
        o = jnp.einsum("bkgts,bskd->btkgd", p, vf, precision=jax.lax.Precision.HIGHEST)
        inv = jnp.where(denom > 0, 1.0 / jnp.where(denom > 0, denom, 1.0), 0.0)
        o = o * jnp.moveaxis(inv, -2, 1)  # [B, Tc, K, G, 1]
        outs.append(o.reshape(b, c1 - c0, h, d))
        lse = jnp.where(denom > 0, jnp.log(jnp.where(denom > 0, denom, 1.0)) + m, -jnp.inf)
        lses.append(lse[..., 0].reshape(b, h, c1 - c0))
    out = jnp.concatenate(outs, axis=1).astype(q.dtype)
    if return_lse:
        return out, jnp.concatenate(lses, axis=-1)
    return out
