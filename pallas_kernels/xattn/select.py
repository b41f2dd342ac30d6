"""Threshold selection of key blocks per query-block row, shared by every implementation.

The official rule (``find_blocks_chunked``, causal prefill) for one row ``v[0..nKb)`` of bf16
block sums with diagonal block ``d``:

- ``forced`` = {0, d}; ``required = threshold * sum(v)``; the other blocks are visited in
  descending value order and block ``o`` is kept iff ``sum(v[forced]) + (sum of the others
  visited before o) < required`` (so the block that crosses the threshold is kept);
- then blocks after the diagonal and blocks past the sequence length are dropped.

Ties: the official code sorts with ``torch.sort`` (order among equal values unspecified). We
fix it to the stable order: among equal values the lower block index comes first.

Sink rule (``sink_rule``). The official code builds ``forced`` as "column 0, then overwrite
columns ``[current_index, current_index + rows)`` with the identity". In the FIRST query chunk
of the official loop ``current_index == 0``, so the overwrite clears column 0 from ``forced``
on every row but row 0: those rows count only the diagonal as forced. With a single forced
block the official position bookkeeping (``sorted_values[..., :-2]`` after prepending two
entries) keeps one more "other" than the rule above (the top other is kept for free and each
later one is tested against the prefix without its predecessor). Column 0 still ends up kept
on every row, because every position that fails the test writes index 0 into the mask.

- ``"always"`` (default; the spec and issue semantics): sink and diagonal forced on every row.
- ``"official"``: reproduce the official code bit for bit: rows whose absolute query block is
  below the official first chunk (``chunk = max(min(max(2048, P), 2**28 // P), 2048)`` tokens,
  ``P = next_pow2(kv_length)``, computed per sequence as if alone) force only the diagonal,
  with the one-extra-block bookkeeping, and keep column 0.

Two equivalent evaluations:

- ``reference.select_mask_reference`` transcribes the official sorts and cumulative sums.
- ``threshold_search_keep`` (here) avoids the sort. With ``G(t) = sum of others with value
  > t``, an "other" block with value ``u`` is kept iff ``forced_sum + G(u) + r * u <
  required`` where ``r`` is its rank among the others equal to ``u``. ``G`` is monotone, so
  the smallest value ``t0`` with ``forced_sum + G(t0) < required`` splits the row: values
  above ``t0`` are kept, values below are dropped, and ties at ``t0`` are kept in index
  order while the running sum stays below ``required``. Non-negative bf16 values are ordered
  like their 16-bit patterns, so ``t0`` is found by bisection over the 15-bit pattern range
  (16 steps, each one masked row sum). The one-extra-block case adds the next block in the
  same order (next tie at ``t0``, else the lowest-index block of the largest value below
  ``t0``). The same function runs in XLA and inside the Pallas selection kernel.

Sums are float32 (the official code uses float64): the two can only differ when
``forced_sum + prefix`` lies within float32 rounding of ``required``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Bit pattern of +inf in bfloat16: every finite non-negative bf16 value is below it.
_BF16_INF_BITS = 0x7F80
_BISECTION_STEPS = 16  # ceil(log2(0x7F80 + 2))


def cdiv(a, b):
    return -(-a // b)


def row_geometry(n_qb: int, n_kb: int, q_block_offset: int, kv_lengths: jax.Array, block_size: int):
    """Per-row diagonal block and validity.

    Returns:
      diag: int32 [nQb], absolute key-block index of each query-block row's diagonal.
      n_valid_kb: int32 [B], key blocks holding at least one valid key.
      causal_valid: bool [B, nQb, nKb], blocks a dense causal row would visit.
      row_valid: bool [B, nQb], rows holding at least one valid query.
    """
    diag = q_block_offset + jnp.arange(n_qb, dtype=jnp.int32)
    n_valid_kb = cdiv(kv_lengths.astype(jnp.int32), block_size)
    col = jnp.arange(n_kb, dtype=jnp.int32)
    row_valid = diag[None, :] < n_valid_kb[:, None]
    causal_valid = (
        (col[None, None, :] <= diag[None, :, None])
        & (col[None, None, :] < n_valid_kb[:, None, None])
        & row_valid[:, :, None]
    )
    return diag, n_valid_kb, causal_valid, row_valid


SINK_RULES = ("always", "official")


def official_chunk_blocks(kv_lengths: jax.Array, block_size: int) -> jax.Array:
    """Blocks per query chunk of the official loop for each sequence length (int32 [B])."""
    n = jnp.maximum(kv_lengths.astype(jnp.int32), 1)
    p2 = jnp.left_shift(1, 32 - jax.lax.clz(n - 1))  # next power of two >= n
    chunk = jnp.maximum(jnp.minimum(jnp.maximum(2048, p2), (1 << 28) // p2), 2048)
    return chunk // block_size


def sink_forced_from(kv_lengths: jax.Array, block_size: int, sink_rule: str) -> jax.Array:
    """int32 [B]: rows whose absolute block is >= this value count the sink as forced."""
    if sink_rule == "always":
        return jnp.zeros(kv_lengths.shape, jnp.int32)
    if sink_rule == "official":
        return official_chunk_blocks(kv_lengths, block_size)
    raise ValueError(f"sink_rule={sink_rule!r} must be one of {SINK_RULES}")


def forced_blocks(diag: jax.Array, col: jax.Array, sink_from: jax.Array):
    """Forced blocks and single-forced rows (broadcasting over leading dims).

    Args:
      diag: int32 [..., R, 1] absolute diagonal block per row; col: int32 [..., R, N];
      sink_from: int32 broadcastable to [..., R, 1] (from ``sink_forced_from``).

    Returns:
      forced bool [..., R, N], single bool [..., R, 1].
    """
    sink = diag >= sink_from
    forced = (col == diag) | (sink & (col == 0))
    single = jnp.logical_not(sink) | (diag == 0)
    return forced, single


def threshold_search_keep(
    v: jax.Array, forced: jax.Array, threshold: float, single: jax.Array | None = None
) -> jax.Array:
    """Kept blocks of each row by the official threshold rule, without sorting.

    Args:
      v: float32 [..., N], non-negative values exactly representable in bf16.
      forced: bool [..., N], the forced blocks of each row (see ``forced_blocks``).
      threshold: the cumulative-mass threshold.
      single: optional bool [..., 1], rows with a single forced block (official
        bookkeeping keeps one more block there).

    Returns:
      bool [..., N]: forced blocks, the selected others and column 0 (causality not applied).
    """
    bits = jax.lax.bitcast_convert_type(v, jnp.int32) >> 16  # bf16 pattern, monotone in v
    others = jnp.logical_not(forced)
    total = jnp.sum(v, axis=-1, keepdims=True)
    required = total * jnp.float32(threshold)
    forced_sum = jnp.sum(jnp.where(forced, v, 0.0), axis=-1, keepdims=True)

    def sum_above(t):
        return jnp.sum(jnp.where(others & (bits > t), v, 0.0), axis=-1, keepdims=True)

    def step(_, carry):
        lo, hi = carry
        mid = lo + jax.lax.shift_right_arithmetic(hi - lo, 1)  # (hi - lo) >= 1
        ok = forced_sum + sum_above(mid) < required
        return jnp.where(ok, lo, mid), jnp.where(ok, mid, hi)

    # Invariant: the condition is false at lo (or lo == -1, untested) and true at hi (or
    # hi == inf bits, untested); the loop ends with hi == lo + 1 = smallest passing pattern.
    lo0 = jnp.full(total.shape, -1, jnp.int32)
    hi0 = jnp.full(total.shape, _BF16_INF_BITS, jnp.int32)
    _, t0 = jax.lax.fori_loop(0, _BISECTION_STEPS, step, (lo0, hi0))

    above = others & (bits > t0)
    tie = others & (bits == t0)
    tie_i = tie.astype(jnp.int32)
    rank = jnp.cumsum(tie_i, axis=-1) - tie_i  # stable: lower index first
    tie_keep = tie & (forced_sum + sum_above(t0) + rank.astype(jnp.float32) * v < required)
    keep = forced | above | tie_keep
    col0 = jax.lax.broadcasted_iota(jnp.int32, v.shape, v.ndim - 1) == 0
    if single is None:
        return keep | col0
    # One more block in the visiting order: the next tie at t0, else the lowest-index block
    # of the largest value below t0.
    n_tie_kept = jnp.sum(tie_keep.astype(jnp.int32), axis=-1, keepdims=True)
    next_tie = tie & (rank == n_tie_kept)
    # max over int32, not jnp.any: reduce_or has no Pallas Triton lowering.
    has_next_tie = jnp.max(next_tie.astype(jnp.int32), axis=-1, keepdims=True) > 0
    below = others & (bits < t0)
    t1 = jnp.max(jnp.where(below, bits, -1), axis=-1, keepdims=True)
    at_t1 = (below & (bits == t1)).astype(jnp.int32)
    first_t1 = (at_t1 == 1) & (jnp.cumsum(at_t1, axis=-1) == 1)
    extra = jnp.where(has_next_tie, next_tie, first_t1) & single & (required > 0)
    return keep | extra | col0


def block_list_from_mask(list_keep: jax.Array):
    """Compact a kept-block mask into the kernel list format (pallas_kernels/README.md).

    Args:
      list_keep: bool [..., nKb] with at least one True per row.

    Returns:
      counts int32 [...], indices int32 [..., nKb] (ascending, tail repeats the last kept).
    """
    n = list_keep.shape[-1]
    counts = jnp.sum(list_keep, axis=-1, dtype=jnp.int32)
    # Stable argsort of "not kept" puts kept blocks first, in ascending index order.
    order = jnp.argsort(jnp.logical_not(list_keep), axis=-1, stable=True).astype(jnp.int32)
    last = jnp.take_along_axis(order, jnp.maximum(counts - 1, 0)[..., None], axis=-1)
    slot = jnp.arange(n, dtype=jnp.int32)
    indices = jnp.where(slot < counts[..., None], order, last)
    return counts, indices


def finalize_rows(keep, causal_valid, row_valid, head_active):
    """Apply causality/validity and the head mask; build the list-side mask.

    Args:
      keep: bool [B, H, nQb, nKb] from the threshold rule.
      causal_valid: bool [B, nQb, nKb]; row_valid: bool [B, nQb].
      head_active: bool [B, H] (heads whose rows come from the estimate).

    Returns:
      mask: bool [B, H, nQb, nKb], official semantics (False on padding rows).
      list_keep: same, but padding rows keep block 0 so that every list is non-empty.
    """
    causal = causal_valid[:, None]
    mask = jnp.where(head_active[:, :, None, None], keep, True) & causal
    col0 = jnp.arange(keep.shape[-1]) == 0
    list_keep = jnp.where(row_valid[:, None, :, None], mask, col0)
    return mask, list_keep


def select_xla(
    block_sums: jax.Array,
    kv_lengths: jax.Array,
    head_active: jax.Array,
    *,
    threshold: float,
    block_size: int,
    q_block_offset: int,
    sink_rule: str = "always",
):
    """Selection in plain XLA ops (threshold search + argsort compaction).

    Args:
      block_sums: bf16 [B, H, nQb, nKb].
      kv_lengths: int32 [B]; head_active: bool [B, H].

    Returns:
      (counts int32 [B, H, nQb], indices int32 [B, H, nQb, nKb], mask bool [B, H, nQb, nKb]).
    """
    _, _, n_qb, n_kb = block_sums.shape
    diag, _, causal_valid, row_valid = row_geometry(
        n_qb, n_kb, q_block_offset, kv_lengths, block_size
    )
    col = jnp.arange(n_kb, dtype=jnp.int32)[None, None, None, :]
    sink_from = sink_forced_from(kv_lengths, block_size, sink_rule)[:, None, None, None]
    forced, single = forced_blocks(diag[None, None, :, None], col, sink_from)
    if threshold >= 1.0:
        keep = jnp.ones(block_sums.shape, bool)
    else:
        keep = threshold_search_keep(block_sums.astype(jnp.float32), forced, threshold, single)
    mask, list_keep = finalize_rows(keep, causal_valid, row_valid, head_active)
    counts, indices = block_list_from_mask(list_keep)
    return counts, indices, mask
