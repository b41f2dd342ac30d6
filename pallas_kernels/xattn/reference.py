"""Pure-jnp reference of the XAttention estimate and block selection (defines correctness).

Semantics follow the official Triton path (elasticattn/src/Xattention.py ``xattn_estimate``
with ``use_triton=True``; spec section 5):

1. Antidiagonal strided scores: reshaped query row ``a`` (tokens ``a*S .. a*S+S-1``) against
   reshaped key row ``c``: ``sum_s dot(Q[a*S + S-1-s], K[c*S + s])``, fp32 accumulation,
   rounded to bf16 (the kernel's output dtype).
2. Logits ``f32(score) * f32(log2(e) / sqrt(D) / S / norm)``; causal in reshaped coordinates
   (column ``c`` visible to absolute row ``A`` iff ``c <= A``); base-2 softmax per row.
3. Per (query block, key block): sum of the ``(block/S) x (block/S)`` probabilities, over
   rows ``A < ceil(kv_length / S)`` only, in fp32, stored as bf16.
4. Selection: ``select_mask_reference`` (transcription of ``find_blocks_chunked``).

Each sequence is estimated as if alone, zero-padded after its own length (as the official
code does when it slices each sequence to its length): queries at absolute positions
``>= kv_length`` and keys at positions ``>= kv_length`` are zeroed before scoring. Zero
padding to any multiple of the block size gives the same mask (padded rows are dropped,
padded columns lie after the diagonal of every valid row).

Query positions are aligned to the end of the key axis (``Tk - Tq`` a multiple of the block
size), so a later chunk of a chunked prefill uses its real positions.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from pallas_kernels.xattn import select as select_lib

LOG2E = 1.4426950408889634


def softmax_scale(head_dim: int, stride: int, norm: float) -> float:
    """Base-2 logit scale exactly as the official code computes it (float64, then f32)."""
    return LOG2E / math.sqrt(head_dim) / stride / norm


def zero_invalid_tokens(q: jax.Array, k: jax.Array, kv_lengths: jax.Array, n_q: int, n_k: int):
    """Pad q/k with zeros to ``n_q``/``n_k`` tokens and zero tokens past each sequence length.

    q: [B, Tq, H, D], k: [B, Tk, K, D]; query ``i`` sits at absolute position ``Tk - Tq + i``.
    """
    t_q, t_k = q.shape[1], k.shape[1]
    q = jnp.pad(q, ((0, 0), (0, n_q - t_q), (0, 0), (0, 0)))
    k = jnp.pad(k, ((0, 0), (0, n_k - t_k), (0, 0), (0, 0)))
    q_pos = (t_k - t_q) + jnp.arange(n_q)
    k_pos = jnp.arange(n_k)
    kv = kv_lengths[:, None, None, None]
    q = jnp.where(q_pos[None, :, None, None] < kv, q, jnp.zeros((), q.dtype))
    k = jnp.where(k_pos[None, :, None, None] < kv, k, jnp.zeros((), k.dtype))
    return q, k


def estimate_block_sums_reference(
    q: jax.Array,
    k: jax.Array,
    kv_lengths: jax.Array,
    *,
    stride: int,
    norm: float,
    block_size: int,
    chunk_blocks: int | None = None,
) -> jax.Array:
    """Block sums of the antidiagonal estimate, chunked over query blocks.

    Args:
      q: [B, Tq, H, D] (post q_norm/RoPE); k: [B, Tk, K, D]; kv_lengths: int32 [B].
      chunk_blocks: query blocks per chunk (bounds the [B, H, rows, Tk/S] score buffer);
        default: as many as keep that buffer near 2^26 elements.

    Returns:
      bf16 [B, H, nQb, nKb]; zero on rows of padding queries and after the diagonal.
    """
    b, t_q, h, d = q.shape
    t_k, kh = k.shape[1], k.shape[2]
    g = h // kh
    s = stride
    rb = block_size // s
    n_qb, n_kb = select_lib.cdiv(t_q, block_size), select_lib.cdiv(t_k, block_size)
    rows_k = n_kb * rb
    if chunk_blocks is None:
        chunk_blocks = max(1, (1 << 26) // max(1, b * h * rb * rows_k))
    chunk_blocks = min(chunk_blocks, n_qb)
    n_chunks = select_lib.cdiv(n_qb, chunk_blocks)
    n_qb_pad = n_chunks * chunk_blocks

    qp, kp = zero_invalid_tokens(q, k, kv_lengths, n_qb_pad * block_size, rows_k * s)
    # Reverse the token order inside each stride group: entry s of row a is token a*S+S-1-s.
    qr = qp.reshape(b, n_qb_pad * rb, s, kh, g, d)[:, :, ::-1]
    kr = kp.reshape(b, rows_k, s, kh, d)
    qr = qr.reshape(b, n_chunks, chunk_blocks * rb, s, kh, g, d)

    scale = jnp.float32(softmax_scale(d, s, norm))
    row_offset = (t_k - t_q) // s
    n_valid_rows = select_lib.cdiv(kv_lengths.astype(jnp.int32), s)  # [B]
    col = jnp.arange(rows_k)

    def one_chunk(args):
        qc, c = args  # qc: [B, rows, S, K, G, D]
        rows = row_offset + c * (chunk_blocks * rb) + jnp.arange(chunk_blocks * rb)
        sc = jnp.einsum("basKgd,bcsKd->bKgac", qc, kr, preferred_element_type=jnp.float32)
        # The official GEMM kernel stores its fp32 accumulator as bf16.
        x = sc.astype(jnp.bfloat16).astype(jnp.float32) * scale
        x = jnp.where(col[None, :] <= rows[:, None], x, -jnp.inf)
        m = jnp.max(x, axis=-1, keepdims=True)
        e = jnp.exp2(x - m)
        p = e * (1.0 / jnp.sum(e, axis=-1, keepdims=True))
        valid = rows[None, :] < n_valid_rows[:, None]  # [B, rows]
        p = jnp.where(valid[:, None, None, :, None], p, 0.0)
        p = p.reshape(b, kh, g, chunk_blocks, rb, n_kb, rb)
        return jnp.sum(p, axis=(4, 6)).astype(jnp.bfloat16)  # [B, K, G, cb, nKb]

    out = jax.lax.map(one_chunk, (jnp.moveaxis(qr, 1, 0), jnp.arange(n_chunks)))
    out = jnp.moveaxis(out, 0, 3).reshape(b, h, n_qb_pad, n_kb)
    return out[:, :, :n_qb]


def select_mask_reference(
    block_sums: jax.Array,
    kv_lengths: jax.Array,
    *,
    threshold: float,
    block_size: int,
    q_block_offset: int,
    sink_rule: str = "always",
) -> jax.Array:
    """Transcription of the official ``find_blocks_chunked`` (causal prefill) in jnp.

    Same sorts, prepended entries and exclusive cumulative sums as the official code (float32
    instead of float64, stable sorts); ``sink_rule`` chooses which rows count the sink as
    forced (see ``select``).

    Args:
      block_sums: bf16 [B, H, nQb, nKb]; kv_lengths: int32 [B].
      q_block_offset: absolute block index of query-block row 0, ``(Tk - Tq) // block``.

    Returns:
      bool [B, H, nQb, nKb] (causality and validity applied, padding rows all False).
    """
    _, _, n_qb, n_kb = block_sums.shape
    diag, _, causal_valid, _ = select_lib.row_geometry(
        n_qb, n_kb, q_block_offset, kv_lengths, block_size
    )
    # Two zero columns keep the official [..., :-2] slicing meaningful for tiny rows; zero
    # columns (the official pads to whole chunks) change nothing before the causal cut.
    v = jnp.pad(block_sums.astype(jnp.float32), ((0, 0), (0, 0), (0, 0), (0, 2)))
    n = n_kb + 2
    col = jnp.arange(n, dtype=jnp.int32)[None, None, None, :]
    sink_from = select_lib.sink_forced_from(kv_lengths, block_size, sink_rule)
    forced, _ = select_lib.forced_blocks(
        diag[None, None, :, None], col, sink_from[:, None, None, None]
    )
    forced = jnp.broadcast_to(forced, v.shape)
    required = jnp.sum(v, axis=-1, keepdims=True) * jnp.float32(threshold)
    forced_sum = jnp.sum(jnp.where(forced, v, 0.0), axis=-1, keepdims=True)
    other_sorted = -jnp.sort(-jnp.where(forced, 0.0, v), axis=-1)  # descending
    zero = jnp.zeros(forced_sum.shape, jnp.float32)
    shifted = jnp.concatenate([zero, forced_sum, other_sorted[..., :-2]], axis=-1)
    cum = jnp.cumsum(jnp.concatenate([zero, shifted[..., :-1]], axis=-1), axis=-1)
    order = jnp.argsort(-jnp.where(forced, 100000.0 * (1.0 + v), v), axis=-1, stable=True)
    passed = cum < required
    keep_in_order = jnp.take_along_axis(passed, jnp.argsort(order, axis=-1), axis=-1)
    # Every failing position writes index 0 (official `torch.where(index_mask, index, 0)`).
    col0 = (col == 0) & jnp.any(jnp.logical_not(passed), axis=-1, keepdims=True)
    keep = forced | keep_in_order | col0
    return keep[..., :n_kb] & causal_valid[:, None]


def xattn_select_reference(
    q: jax.Array,
    k: jax.Array,
    kv_lengths: jax.Array,
    head_active: jax.Array,
    *,
    stride: int,
    threshold: float,
    norm: float,
    block_size: int,
    chunk_blocks: int | None = None,
    sink_rule: str = "always",
):
    """Whole reference pipeline for prefill rows (Tq > 1).

    Returns:
      (counts [B, H, nQb], indices [B, H, nQb, nKb], mask [B, H, nQb, nKb], block_sums).
    """
    t_q, t_k = q.shape[1], k.shape[1]
    q_block_offset = (t_k - t_q) // block_size
    sums = estimate_block_sums_reference(
        q, k, kv_lengths, stride=stride, norm=norm, block_size=block_size, chunk_blocks=chunk_blocks
    )
    sums = jnp.where(head_active[:, :, None, None], sums, jnp.zeros((), sums.dtype))
    n_qb, n_kb = sums.shape[2:]
    _, _, causal_valid, row_valid = select_lib.row_geometry(
        n_qb, n_kb, q_block_offset, kv_lengths, block_size
    )
    if threshold >= 1.0:
        keep = jnp.ones(sums.shape, bool)
    else:
        keep = select_mask_reference(
            sums,
            kv_lengths,
            threshold=threshold,
            block_size=block_size,
            q_block_offset=q_block_offset,
            sink_rule=sink_rule,
        )
    mask, list_keep = select_lib.finalize_rows(keep, causal_valid, row_valid, head_active)
    counts, indices = select_lib.block_list_from_mask(list_keep)
    return counts, indices, mask, sums
