"""Which key tiles one query tile visits: shared by the Triton and Mosaic GPU kernels.

All values are int32 scalars computed in-kernel from the head mode, the sequence length and
(for block-sparse heads) the kept-block list, so modes and lists are data, not compile-time
constants. Visited tiles are in ascending key order; tile ``p`` of the walk is key tile
``tile_index(p)`` (keys ``[tile_index(p) * tk, (tile_index(p) + 1) * tk)``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.block_sparse_attn.reference import MODE_SPARSE, MODE_STREAMING


def tile_plan(
    mode, kv_len, count, last_block, *, q_start, block_size, tq, tk, sink_blocks, local_blocks
):
    """Number of key tiles to visit and how many of them need no mask (scalars).

    Visited tiles are ascending; the ones needing a mask (crossing the causal diagonal or
    ``kv_len``) form a suffix. Tile ``p`` maps to key tile ``tile_index(p)``.
    """
    sub = block_size // tk  # kernel tiles per mask block
    # lax.div/rem, not // and %: operands are non-negative and the Triton lowering of
    # jnp's floor division rejects the sign fix-up it emits.
    row = jax.lax.div(q_start, block_size)  # absolute mask-block row of this query tile
    hi_tile = jax.lax.div(jnp.minimum(kv_len, q_start + tq) + tk - 1, tk)  # causal+length
    full_tiles = jax.lax.div(jnp.minimum(kv_len, q_start + 1), tk)  # tiles all rows see
    # Dense: the causal prefix.
    n_dense, nu_dense = hi_tile, full_tiles
    # Streaming: sink tiles, then the band of `local_blocks` blocks ending at the diagonal.
    sink_t = jnp.minimum(sink_blocks * sub, hi_tile)
    band_lo = jnp.maximum(sink_blocks * sub, (row - local_blocks + 1) * sub)
    n_band = jnp.maximum(hi_tile - band_lo, 0)
    n_stream = sink_t + n_band
    nu_stream = jnp.minimum(sink_t, full_tiles) + jnp.clip(full_tiles - band_lo, 0, n_band)
    # Block-sparse: kept blocks ascending and causal; only the last one can cross the
    # diagonal, so trim its tiles past the causal bound and mask the rest of it.
    trim = jnp.clip((last_block + 1) * sub - hi_tile, 0, sub)
    n_sparse = jnp.maximum(count * sub - trim, 0)
    nu_sparse = jnp.minimum(
        n_sparse, jnp.maximum(count - 1, 0) * sub + jnp.clip(full_tiles - last_block * sub, 0, sub)
    )
    is_sparse = mode == MODE_SPARSE
    is_stream = mode == MODE_STREAMING
    n = jnp.where(is_sparse, n_sparse, jnp.where(is_stream, n_stream, n_dense))
    nu = jnp.where(is_sparse, nu_sparse, jnp.where(is_stream, nu_stream, nu_dense))
    # A tile whose queries all sit at or past kv_len is padding: visit nothing.
    n = jnp.where(q_start < kv_len, n, 0)
    return n, jnp.minimum(nu, n), sink_t, band_lo


def tile_index(p, *, mode, sub, sink_t, band_lo, load_block):
    """Key tile of walk step ``p``; ``load_block(i)`` reads entry ``i`` of the kept list."""
    sparse_t = load_block(jax.lax.div(p, sub)) * sub + jax.lax.rem(p, sub)
    stream_t = jnp.where(p < sink_t, p, band_lo + p - sink_t)
    return jnp.where(mode == MODE_SPARSE, sparse_t, jnp.where(mode == MODE_STREAMING, stream_t, p))


# Fields of one row of the precomputed plan (``make_plan``): int32 [B, H, nQt, PLAN_FIELDS].
PLAN_N, PLAN_NU, PLAN_SINK_T, PLAN_BAND_LO, PLAN_MODE, PLAN_KV_LEN, PLAN_LAST_BASE, PLAN_LAST = (
    range(8)
)
PLAN_FIELDS = 8


def make_plan(
    head_modes: jax.Array,
    kv_lengths: jax.Array,
    block_counts: jax.Array,
    block_indices: jax.Array,
    *,
    num_q_tiles: int,
    q_offset: int,
    block_size: int,
    tq: int,
    tk: int,
    sink_blocks: int,
    local_blocks: int,
) -> jax.Array:
    """Every query tile's walk, computed once by XLA before the kernel.

    A kernel then reads one row of independent scalars per query tile instead of a chain of
    dependent loads (mode -> count -> last kept block) at the start of every tile.

    Args:
      head_modes: [B, H]; kv_lengths: [B]; block_counts: [B, H, nQb'];
      block_indices: [B, H, nQb', nKb'].

    Returns:
      int32 [B, H, num_q_tiles, PLAN_FIELDS]: n, nu, sink_t, band_lo (``tile_plan``), mode,
      kv_len, (count - 1) * sub and the last kept block (``tile_index_masked``).
    """
    sub = block_size // tk
    t = jnp.arange(num_q_tiles, dtype=jnp.int32)
    q_start = (q_offset + t * tq)[None, None, :]  # [1, 1, nQt]
    rel_row = jnp.minimum((t * tq) // block_size, block_counts.shape[2] - 1)
    last_pos = jnp.clip(block_counts - 1, 0, block_indices.shape[3] - 1)
    last_row = jnp.take_along_axis(block_indices, last_pos[..., None], axis=-1)[..., 0]
    count = block_counts[:, :, rel_row].astype(jnp.int32)  # [B, H, nQt]
    last = last_row[:, :, rel_row].astype(jnp.int32)
    mode = jnp.broadcast_to(head_modes[:, :, None], count.shape).astype(jnp.int32)
    kv_len = jnp.broadcast_to(kv_lengths[:, None, None], count.shape).astype(jnp.int32)
    n, nu, sink_t, band_lo = tile_plan(
        mode,
        kv_len,
        count,
        last,
        q_start=q_start,
        block_size=block_size,
        tq=tq,
        tk=tk,
        sink_blocks=sink_blocks,
        local_blocks=local_blocks,
    )
    sink_t = jnp.broadcast_to(sink_t, count.shape)
    band_lo = jnp.broadcast_to(band_lo, count.shape)
    last_base = jnp.maximum(count - 1, 0) * sub
    fields = (n, nu, sink_t, band_lo, mode, kv_len, last_base, last)
    return jnp.stack([f.astype(jnp.int32) for f in fields], axis=-1)


def tile_index_masked(p, *, mode, sub, sink_t, band_lo, last_base, last_block):
    """``tile_index`` for steps of the masked suffix (``p >= nu``), with no memory read:
    a block-sparse head's masked tiles all lie in its last kept block."""
    sparse_t = last_block * sub + (p - last_base)
    stream_t = jnp.where(p < sink_t, p, band_lo + p - sink_t)
    return jnp.where(mode == MODE_SPARSE, sparse_t, jnp.where(mode == MODE_STREAMING, stream_t, p))
