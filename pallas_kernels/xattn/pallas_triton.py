"""Pallas Triton kernels for the XAttention estimate and block selection.

Scoring (``score_partials``): the strided antidiagonal GEMM is an ordinary causal GEMM of
reshaped rows ``[Tq/S, S*D] x [S*D, Tk/S]``. One program computes one lower-triangular tile
of ``block_m x block_n`` reshaped rows/columns: an MMA loop over the S token offsets (and
head-dim chunks), then a fused epilogue that rounds the fp32 accumulator to bf16 (as the
official kernel stores it), scales, masks causally and reduces the tile to per-row softmax
partials:

  m[a, j]     = max over the tile's visible columns of the logit of row a,
  l[a, j]     = sum_c exp2(x[a, c] - m[a, j]),
  w[a, kb]    = sum_{c in key block kb} exp2(x[a, c] - m[a, j]).

Nothing of size ``(T/S)^2`` reaches memory (the official code writes the bf16 score matrix and
reads it twice). ``combine_partials`` (XLA) then merges the tiles of each row exactly like an
online softmax (``M = max_j m``, ``L = sum_j l * exp2(m - M)``) and sums the normalised
``w`` over the ``block/S`` rows of each query block; these are the bf16 block sums. Every
program's tile is independent (no online state across tiles), so tiles are ordered like a
GEMM for L2 reuse: the G query heads of one KV head run the same tile back to back, and row
tiles are grouped ``group_m`` at a time.

Selection (``select_pallas``): one program per ``select_rows`` query-block rows of one head;
threshold search by bisection (``select.threshold_search_keep``) in registers, then a
scatter store that compacts the kept blocks into the ascending index list.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from pallas_kernels import _compat
from pallas_kernels.xattn import select as select_lib
from pallas_kernels.xattn.config import Config


def tile_order(
    n_i: int, n_j: int, row_offset: int, block_m: int, block_n: int, group_m: int
) -> tuple[np.ndarray, np.ndarray]:
    """Lower-triangular tiles (i, j) in a grouped order (static, numpy).

    Tile (i, j) is needed iff its first column is visible to its last row:
    ``j * block_n <= row_offset + (i + 1) * block_m - 1``. Within a group of ``group_m`` row
    tiles, tiles go column by column so that consecutive programs share the K panel.
    """
    ti, tj = [], []
    for g0 in range(0, n_i, group_m):
        rows = range(g0, min(g0 + group_m, n_i))
        for j in range(n_j):
            for i in rows:
                if j * block_n <= row_offset + (i + 1) * block_m - 1:
                    ti.append(i)
                    tj.append(j)
    return np.asarray(ti, np.int32), np.asarray(tj, np.int32)


def _score_kernel(
    ti_ref,  # [P] int32, row tile of each program
    tj_ref,  # [P] int32, column tile of each program
    kv_ref,  # [B] int32, valid keys per sequence
    act_ref,  # [B, H] int32, 1 where the head needs the estimate
    q_ref,  # [Rq_pad, S, D] (this batch entry and query head)
    k_ref,  # [Rk_pad, S, D] (this batch entry and kv head)
    w_ref,  # [Rq_pad, nKbt] f32, per-row per-key-block partial sums
    mt_ref,  # [nJ, Rq_pad] f32, per-row tile max
    lt_ref,  # [nJ, Rq_pad] f32, per-row tile sum
    *,
    stride: int,
    rows_per_block: int,
    block_m: int,
    block_n: int,
    block_k: int,
    head_dim: int,
    kv_heads: int,
    groups: int,
    row_offset: int,
    scale: float,
):
    # Grid: (query head within its KV group, tile, batch * kv head).
    g = pl.program_id(0)
    p = pl.program_id(1)
    bk = pl.program_id(2)
    # lax.div/rem (truncating) on non-negative ints: jnp's floor_divide/remainder do not
    # lower on the Triton backend.
    b = jax.lax.div(bk, kv_heads)
    h = jax.lax.rem(bk, kv_heads) * groups + g
    i = ti_ref[p]
    j = tj_ref[p]
    kv_len = kv_ref[b]
    n_valid_rows = jax.lax.div(kv_len + (stride - 1), stride)
    row0 = row_offset + i * block_m
    run = (act_ref[b, h] != 0) & (row0 < n_valid_rows) & (j * block_n < n_valid_rows)

    @pl.when(run)
    def _():
        s_ = stride
        r_start = pl.multiple_of(i * block_m, block_m)
        c_start = pl.multiple_of(j * block_n, block_n)
        q_tok = (r_start + jnp.arange(block_m, dtype=jnp.int32)) * s_
        k_tok = (c_start + jnp.arange(block_n, dtype=jnp.int32)) * s_
        q_lim = kv_len - row_offset * s_  # local query token t is valid iff t < q_lim
        n_d = head_dim // block_k

        def body(step, acc):
            s = jax.lax.div(step, n_d)
            d0 = pl.multiple_of(jax.lax.rem(step, n_d) * block_k, block_k)
            # Zero queries/keys past the sequence end, as the official zero padding does.
            q_mask = (q_tok + (s_ - 1 - s) < q_lim)[:, None]
            k_mask = (k_tok + s < kv_len)[:, None]
            qt = _compat.triton_load(
                q_ref.at[pl.ds(r_start, block_m), s_ - 1 - s, pl.ds(d0, block_k)],
                mask=q_mask,
                other=0.0,
            )  # [block_m, block_k]
            kt = _compat.triton_load(
                k_ref.at[pl.ds(c_start, block_n), s, pl.ds(d0, block_k)], mask=k_mask, other=0.0
            )  # [block_n, block_k]
            return acc + jax.lax.dot_general(
                qt, kt, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32
            )

        acc = jax.lax.fori_loop(0, s_ * n_d, body, jnp.zeros((block_m, block_n), jnp.float32))
        # The official GEMM stores bf16; the softmax kernel reads it back as f32 * scale.
        x = acc.astype(jnp.bfloat16).astype(jnp.float32) * scale
        a_abs = row_offset + r_start + jnp.arange(block_m, dtype=jnp.int32)
        c_abs = c_start + jnp.arange(block_n, dtype=jnp.int32)
        x = jnp.where(c_abs[None, :] <= a_abs[:, None], x, -jnp.inf)
        m = jnp.max(x, axis=1)
        m_safe = jnp.where(m == -jnp.inf, 0.0, m)  # rows with no visible column here
        e = jnp.exp2(x - m_safe[:, None])
        l = jnp.sum(e, axis=1)
        kbt = block_n // rows_per_block
        wt = jnp.sum(e.reshape(block_m, kbt, rows_per_block), axis=2)
        w_ref[pl.ds(r_start, block_m), pl.ds(j * kbt, kbt)] = wt
        mt_ref[j, pl.ds(r_start, block_m)] = m
        lt_ref[j, pl.ds(r_start, block_m)] = l


def combine_geometry(t_q: int, t_k: int, *, stride: int, block_size: int, config: Config) -> dict:
    """Static keyword arguments of ``combine_partials`` for these lengths and tiles."""
    return dict(
        row_offset=(t_k - t_q) // stride,
        n_qb=select_lib.cdiv(t_q, block_size),
        n_kb=select_lib.cdiv(t_k, block_size),
        rb=block_size // stride,
        block_n=config.block_n,
    )


def score_partials(
    q: jax.Array,
    k: jax.Array,
    kv_lengths: jax.Array,
    head_active: jax.Array,
    *,
    stride: int,
    norm: float,
    block_size: int,
    config: Config,
    interpret: bool,
):
    """Run the scoring kernel.

    Args:
      q: [B, Tq, H, D]; k: [B, Tk, K, D]; kv_lengths: int32 [B]; head_active: bool [B, H].

    Returns:
      w f32 [B, H, Rq_pad, nKbt], mt f32 [B, H, nJ, Rq_pad], lt f32 [B, H, nJ, Rq_pad]
      (entries of tiles that were not computed are unspecified).
    """
    from pallas_kernels.xattn.reference import softmax_scale

    b, t_q, h, d = q.shape
    t_k, kh = k.shape[1], k.shape[2]
    g = h // kh
    s = stride
    rb = block_size // s
    bm, bn = config.block_m, config.block_n
    n_qb, n_kb = select_lib.cdiv(t_q, block_size), select_lib.cdiv(t_k, block_size)
    n_i = select_lib.cdiv(n_qb * rb, bm)
    n_j = select_lib.cdiv(n_kb * rb, bn)
    rq_pad, rk_pad = n_i * bm, n_j * bn
    row_offset = (t_k - t_q) // s
    ti, tj = tile_order(n_i, n_j, row_offset, bm, bn, config.group_m)

    # Pad to whole tiles (a no-op for tile-aligned lengths) and split tokens into stride groups.
    q5 = jnp.pad(q, ((0, 0), (0, rq_pad * s - t_q), (0, 0), (0, 0))).reshape(b, rq_pad, s, h, d)
    k5 = jnp.pad(k, ((0, 0), (0, rk_pad * s - t_k), (0, 0), (0, 0))).reshape(b, rk_pad, s, kh, d)
    kbt = bn // rb

    kernel = functools.partial(
        _score_kernel,
        stride=s,
        rows_per_block=rb,
        block_m=bm,
        block_n=bn,
        block_k=config.block_k,
        head_dim=d,
        kv_heads=kh,
        groups=g,
        row_offset=row_offset,
        scale=softmax_scale(d, s, norm),
    )
    full1 = lambda n: pl.BlockSpec((n,), lambda gi, pi, bki: (0,))  # noqa: E731
    in_specs = [
        full1(len(ti)),
        full1(len(tj)),
        full1(b),
        pl.BlockSpec((b, h), lambda gi, pi, bki: (0, 0)),
        pl.BlockSpec(
            (None, rq_pad, s, None, d),
            lambda gi, pi, bki: (bki // kh, 0, 0, (bki % kh) * g + gi, 0),
        ),
        pl.BlockSpec(
            (None, rk_pad, s, None, d), lambda gi, pi, bki: (bki // kh, 0, 0, bki % kh, 0)
        ),
    ]
    head_map = lambda gi, pi, bki: (bki // kh, (bki % kh) * g + gi, 0, 0)  # noqa: E731
    out_specs = [
        pl.BlockSpec((None, None, rq_pad, n_j * kbt), head_map),
        pl.BlockSpec((None, None, n_j, rq_pad), head_map),
        pl.BlockSpec((None, None, n_j, rq_pad), head_map),
    ]
    out_shape = [
        jax.ShapeDtypeStruct((b, h, rq_pad, n_j * kbt), jnp.float32),
        jax.ShapeDtypeStruct((b, h, n_j, rq_pad), jnp.float32),
        jax.ShapeDtypeStruct((b, h, n_j, rq_pad), jnp.float32),
    ]
    w, mt, lt = pl.pallas_call(
        kernel,
        grid=(g, len(ti), b * kh),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        interpret=interpret,
        compiler_params=_compat.triton_compiler_params(config.num_warps, config.num_stages),
        name="xattn_score",
    )(
        jnp.asarray(ti),
        jnp.asarray(tj),
        kv_lengths.astype(jnp.int32),
        head_active.astype(jnp.int32),
        q5,
        k5,
    )
    return w, mt, lt


def combine_partials(
    w,
    mt,
    lt,
    kv_lengths,
    head_active,
    *,
    stride: int,
    row_offset: int,
    rb: int,
    block_n: int,
    n_qb: int,
    n_kb: int,
) -> jax.Array:
    """Merge the per-tile softmax partials into bf16 block sums (XLA).

    Args:
      w: f32 [B, H, Rq_pad, nKbt]; mt, lt: f32 [B, H, nJ, Rq_pad] (from ``score_partials``).

    Returns:
      bf16 [B, H, nQb, nKb]; zero for inactive heads, padding rows and future blocks.
    """
    b, h, rq_pad, n_kbt = w.shape
    n_j = mt.shape[2]
    kbt = block_n // rb
    a_abs = row_offset + jnp.arange(rq_pad, dtype=jnp.int32)
    n_valid_rows = select_lib.cdiv(kv_lengths.astype(jnp.int32), stride)
    row_ok = a_abs[None, :] < n_valid_rows[:, None]  # [B, Rq]
    tile_ok = (jnp.arange(n_j, dtype=jnp.int32) * block_n)[None, :] <= a_abs[:, None]  # [Rq, nJ]
    use = head_active[:, :, None, None] & row_ok[:, None, :, None] & tile_ok[None, None]
    m_t = jnp.where(use, jnp.swapaxes(mt, 2, 3), -jnp.inf)  # [B, H, Rq, nJ]
    m_row = jnp.max(m_t, axis=-1, keepdims=True)
    m_row = jnp.where(jnp.isfinite(m_row), m_row, 0.0)
    corr = jnp.where(use, jnp.exp2(m_t - m_row), 0.0)
    l_row = jnp.sum(jnp.where(use, jnp.swapaxes(lt, 2, 3), 0.0) * corr, axis=-1, keepdims=True)
    l_inv = jnp.where(l_row > 0, 1.0 / l_row, 0.0)
    f = corr * l_inv  # [B, H, Rq, nJ]: exp2(m_tile - M) / L
    f_w = jnp.broadcast_to(f[..., None], (b, h, rq_pad, n_j, kbt)).reshape(b, h, rq_pad, n_kbt)
    use_w = jnp.broadcast_to(use[..., None], (b, h, rq_pad, n_j, kbt)).reshape(f_w.shape)
    p = jnp.where(use_w, w * f_w, 0.0)  # never reads entries of tiles that were skipped
    sums = jnp.sum(p.reshape(b, h, rq_pad // rb, rb, n_kbt), axis=3)
    return sums[:, :, :n_qb, :n_kb].astype(jnp.bfloat16)


def _select_kernel(
    kv_ref,  # [B] int32
    sink_ref,  # [B] int32, rows with absolute block >= this count the sink as forced
    act_ref,  # [B, H] int32
    bs_ref,  # [nQb_pad, N] bf16 block sums of this (batch, head)
    cnt_ref,  # [nQb_pad] int32
    idx_ref,  # [nQb_pad, N] int32
    mask_ref,  # [nQb_pad, N] int8
    *,
    rows: int,
    block_size: int,
    q_block_offset: int,
    threshold: float,
):
    # Grid: (row group, head, batch).
    r0 = pl.program_id(0) * rows
    h = pl.program_id(1)
    b = pl.program_id(2)
    kv_len = kv_ref[b]
    sink_from = sink_ref[b]
    active = act_ref[b, h] != 0
    v = bs_ref[pl.ds(r0, rows), :].astype(jnp.float32)  # [rows, N]
    n = v.shape[1]
    col = jax.lax.broadcasted_iota(jnp.int32, (rows, n), 1)
    row = r0 + jax.lax.broadcasted_iota(jnp.int32, (rows, n), 0)
    diag = q_block_offset + row
    n_valid = jax.lax.div(kv_len + (block_size - 1), block_size)
    if threshold < 1.0:
        diag_1 = q_block_offset + r0 + jax.lax.broadcasted_iota(jnp.int32, (rows, 1), 0)
        forced, single = select_lib.forced_blocks(diag_1, col, sink_from)
        keep = select_lib.threshold_search_keep(v, forced, threshold, single)
    else:
        keep = jnp.ones((rows, n), bool)
    keep = (keep | jnp.logical_not(active)) & (col <= diag) & (col < n_valid)
    row_valid = diag < n_valid
    mask_ref[pl.ds(r0, rows), :] = (keep & row_valid).astype(jnp.int8)
    list_keep = jnp.where(row_valid, keep, col == 0)
    ki = list_keep.astype(jnp.int32)
    cnt = jnp.sum(ki, axis=1)
    pos = jnp.cumsum(ki, axis=1) - ki
    last = jnp.max(jnp.where(list_keep, col, -1), axis=1)
    # Kept blocks to their compacted slots; the tail slots repeat the last kept block.
    _compat.triton_store(idx_ref.at[row, pos], col, mask=list_keep)
    _compat.triton_store(
        idx_ref.at[pl.ds(r0, rows), :],
        jnp.broadcast_to(last[:, None], (rows, n)),
        mask=col >= cnt[:, None],
    )
    cnt_ref[pl.ds(r0, rows)] = cnt


def select_pallas(
    block_sums: jax.Array,
    kv_lengths: jax.Array,
    head_active: jax.Array,
    *,
    threshold: float,
    block_size: int,
    q_block_offset: int,
    config: Config,
    interpret: bool,
    sink_rule: str = "always",
):
    """Selection kernel.

    Args:
      block_sums: bf16 [B, H, nQb, nKb]; kv_lengths: int32 [B]; head_active: bool [B, H].

    Returns:
      (counts int32 [B, H, nQb], indices int32 [B, H, nQb, nKb], mask bool [B, H, nQb, nKb]).
    """
    b, h, n_qb, n_kb = block_sums.shape
    rows = config.select_rows
    n = max(16, pl.next_power_of_2(n_kb))
    n_qb_pad = select_lib.cdiv(n_qb, rows) * rows
    sums = jnp.pad(block_sums, ((0, 0), (0, 0), (0, n_qb_pad - n_qb), (0, n - n_kb)))
    kernel = functools.partial(
        _select_kernel,
        rows=rows,
        block_size=block_size,
        q_block_offset=q_block_offset,
        threshold=threshold,
    )
    head_map = lambda r, hh, bb: (bb, hh, 0, 0)  # noqa: E731
    counts, indices, mask = pl.pallas_call(
        kernel,
        grid=(n_qb_pad // rows, h, b),
        in_specs=[
            pl.BlockSpec((b,), lambda r, hh, bb: (0,)),
            pl.BlockSpec((b,), lambda r, hh, bb: (0,)),
            pl.BlockSpec((b, h), lambda r, hh, bb: (0, 0)),
            pl.BlockSpec((None, None, n_qb_pad, n), head_map),
        ],
        out_specs=[
            pl.BlockSpec((None, None, n_qb_pad), lambda r, hh, bb: (bb, hh, 0)),
            pl.BlockSpec((None, None, n_qb_pad, n), head_map),
            pl.BlockSpec((None, None, n_qb_pad, n), head_map),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((b, h, n_qb_pad), jnp.int32),
            jax.ShapeDtypeStruct((b, h, n_qb_pad, n), jnp.int32),
            jax.ShapeDtypeStruct((b, h, n_qb_pad, n), jnp.int8),
        ],
        interpret=interpret,
        compiler_params=_compat.triton_compiler_params(config.select_num_warps, 1),
        name="xattn_select",
    )(
        kv_lengths.astype(jnp.int32),
        select_lib.sink_forced_from(kv_lengths, block_size, sink_rule),
        head_active.astype(jnp.int32),
        sums,
    )
    if (n_qb_pad, n) != (n_qb, n_kb):
        counts = counts[:, :, :n_qb]
        indices = indices[:, :, :n_qb, :n_kb]
        mask = mask[:, :, :n_qb, :n_kb]
    return counts, indices, mask.astype(bool)
