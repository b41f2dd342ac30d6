"""Paged decode attention as a Pallas kernel on the Triton GPU backend (flash-decoding).

One program per ``(sequence b, kv head k, split s)``. It holds the ``G`` query heads of kv head
``k`` as one ``[Gp, D]`` tile (``Gp`` = ``G`` padded to the 16 rows a Triton dot needs, with
rows of neighbouring heads that are dropped at the end), so each K/V page is read once for the
whole group. Split ``s`` walks its share of the sequence's
``ceil(lengths[b] / block_tokens)`` key blocks (``pages_per_block`` whole pages, or one
``1 / page_chunks`` slice of a page) with an online softmax; the bounds are
computed from ``lengths[b]`` inside the kernel, so pages past the length are never read and a
short sequence in a long static table costs only its own pages. Full blocks run unmasked; the
one partial block at the end runs masked, with its page ids clamped to the last valid page.

Splits write partial ``(acc, m, l)`` (``m`` in log2 units); a small jnp epilogue merges them.
With ``num_splits == 1`` the kernel writes the normalised output directly.

Optional extra keys (``k_extra``, ``v_extra``: one key/value per (sequence, kv head) that is not
in the cache, i.e. the token being decoded) seed the online softmax of split 0, so the model's
decode step needs no second merge of the new token after the kernel (that merge was 4-5 small
XLA kernels per layer, a visible share of a batch-1 step).

Index math: K/V stay 4-D refs indexed per axis (kv head by the BlockSpec, page id and token
inside the kernel); the Pallas Triton lowering switches to 64-bit offsets once an array
exceeds 2**32 bytes, so no flattened int32 product appears.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import _compat
from pallas_kernels.paged_decode.config import PagedDecodeConfig

# Finite running-max start: keeps exp2(m_prev - m_new) well defined for empty splits.
_M_INIT = -1e30
_MIN_DOT_ROWS = 16  # Triton's tl.dot needs M >= 16


def _dot_nt(a: jax.Array, b: jax.Array) -> jax.Array:
    """[M, D] x [N, D] -> [M, N] in f32."""
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _dot_nn(a: jax.Array, b: jax.Array) -> jax.Array:
    """[M, N] x [N, D] -> [M, D] in f32."""
    return lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _paged_decode_kernel(
    lengths_ref,  # [B] int32 (whole array)
    layer_ref,  # [1] int32: layer of a stacked [L, ...] cache (unused when not stacked)
    page_table_ref,  # [max_pages] int32 (row b)
    q_ref,  # [H, D] (sequence b)
    k_ref,  # [P, N, D] (kv head k), or [L, P, N, D] for a stacked cache
    v_ref,  # same as k_ref
    *refs,  # [kx [D], vx [D] when has_extra], then the outputs:
    # partials: acc [Gp, D] f32, m [Gp] f32, l [Gp] f32; else o [Gp, D]
    has_extra: bool,
    stacked: bool,
    partials: bool,
    group: int,
    rows: int,
    page_size: int,
    pages_per_block: int,
    page_chunks: int,
    num_splits: int,
    max_pages: int,
    scale_log2: float,
):
    out_refs = refs[2:] if has_extra else refs
    b = pl.program_id(0)
    split = pl.program_id(2)
    block_tokens = page_size * pages_per_block // page_chunks
    length = jnp.minimum(lengths_ref[b], max_pages * page_size)
    n_pages = lax.div(length + (page_size - 1), page_size)
    n_blocks = lax.div(length + (block_tokens - 1), block_tokens)
    n_full = lax.div(length, block_tokens)
    per_split = lax.div(n_blocks + (num_splits - 1), num_splits)
    lo = split * per_split
    hi = jnp.minimum(lo + per_split, n_blocks)
    full_hi = jnp.maximum(lo, jnp.minimum(hi, n_full))
    tail_lo = jnp.maximum(lo, n_full)  # [tail_lo, hi) holds the partial block or nothing

    # The G query heads of kv head k, padded to `rows` with (ignored) neighbouring heads, so
    # no padded copy of q is made outside the kernel.
    num_heads, head_dim = q_ref.shape
    head = pl.program_id(1) * group + lax.iota(jnp.int32, rows)
    q = q_ref[jnp.minimum(head, num_heads - 1)]  # [Gp, D]

    # A stacked cache is indexed by layer inside the kernel, so the layer's pages are read in
    # place (slicing [L, ...] outside would copy the whole layer every decode step).
    lead = (layer_ref[0],) if stacked else ()

    def load_block(blk, masked: bool):
        if page_chunks > 1:
            # Blocks never cross a page, and n_blocks keeps the page index below n_pages.
            page = page_table_ref[lax.div(blk, page_chunks)]
            rows_in_page = pl.ds(lax.rem(blk, page_chunks) * block_tokens, block_tokens)
            return k_ref[(*lead, page, rows_in_page)], v_ref[(*lead, page, rows_in_page)]
        first = blk * pages_per_block
        if pages_per_block == 1:
            page = page_table_ref[first]
            return k_ref[(*lead, page)], v_ref[(*lead, page)]  # [N, D] each
        if masked:
            # Pages past the length repeat the last valid page, which this block reads anyway.
            idx = first + lax.iota(jnp.int32, pages_per_block)
            pages = page_table_ref[jnp.minimum(idx, n_pages - 1)]
        else:
            pages = page_table_ref[pl.ds(first, pages_per_block)]
        k = k_ref[(*lead, pages)].reshape(block_tokens, head_dim)  # [ppb * N, D]
        v = v_ref[(*lead, pages)].reshape(block_tokens, head_dim)
        return k, v

    def step(blk, carry, masked: bool):
        acc, m, l = carry
        k, v = load_block(blk, masked)
        s = _dot_nt(q, k) * scale_log2  # [Gp, bk] logits in log2 units
        if masked:
            valid = blk * block_tokens + lax.iota(jnp.int32, block_tokens) < length
            s = jnp.where(valid[None, :], s, -jnp.inf)
            v = jnp.where(valid[:, None], v, jnp.zeros_like(v))  # garbage may be NaN
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        alpha = jnp.exp2(m - m_new)
        p = jnp.exp2(s - m_new[:, None])
        l = l * alpha + jnp.sum(p, axis=1)
        acc = acc * alpha[:, None] + _dot_nn(p.astype(v.dtype), v)
        return acc, m_new, l

    acc0 = jnp.zeros((rows, head_dim), jnp.float32)
    m0 = jnp.full((rows,), _M_INIT, jnp.float32)
    l0 = jnp.zeros((rows,), jnp.float32)
    if has_extra:
        # Split 0 starts from the extra key as if it were one block of one token.
        kx = refs[0][...].astype(jnp.float32)  # [D]
        vx = refs[1][...].astype(jnp.float32)
        s_x = jnp.sum(q.astype(jnp.float32) * kx[None, :], axis=1) * scale_log2  # [Gp]
        first = split == 0
        m0 = jnp.where(first, s_x, m0)
        l0 = jnp.where(first, jnp.ones_like(l0), l0)
        acc0 = jnp.where(first, jnp.broadcast_to(vx[None, :], (rows, head_dim)), acc0)
    carry = (acc0, m0, l0)
    carry = lax.fori_loop(lo, full_hi, functools.partial(step, masked=False), carry)
    acc, m, l = lax.fori_loop(tail_lo, hi, functools.partial(step, masked=True), carry)

    # Only the G real rows are stored; the padding rows of the outputs stay unwritten and are
    # sliced away by the caller (this saves 3/4 of the partials' traffic when G = 4).
    real = lax.iota(jnp.int32, rows) < group
    real_2d = jnp.broadcast_to(real[:, None], (rows, head_dim))
    if not partials:
        (o_ref,) = out_refs
        o = (acc / jnp.where(l == 0.0, 1.0, l)[:, None]).astype(o_ref.dtype)
        _compat.triton_store(o_ref, o, mask=real_2d)
    else:
        acc_ref, m_ref, l_ref = out_refs
        _compat.triton_store(acc_ref, acc, mask=real_2d)
        _compat.triton_store(m_ref, m, mask=real)
        _compat.triton_store(l_ref, l, mask=real)


def merge_splits(acc: jax.Array, m: jax.Array, l: jax.Array) -> jax.Array:
    """Combine flash-decoding partials.

    Args:
      acc: [B, K, S, G, D] f32 unnormalised outputs of each split.
      m: [B, K, S, G] f32 running max of each split, log2 units.
      l: [B, K, S, G] f32 softmax denominators of each split (relative to ``m``).

    Returns:
      [B, K, G, D] f32; rows whose every split is empty are zero.
    """
    m_max = jnp.max(m, axis=2, keepdims=True)
    w = jnp.exp2(m - m_max)  # [B, K, S, G]
    denom = jnp.sum(w * l, axis=2)
    out = jnp.sum(w[..., None] * acc, axis=2)
    return out / jnp.where(denom == 0.0, 1.0, denom)[..., None]


@functools.partial(jax.jit, static_argnames=("sm_scale", "config", "interpret", "return_lse"))
def paged_decode_pallas(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    page_table: jax.Array,
    lengths: jax.Array,
    layer: jax.Array | None = None,
    k_extra: jax.Array | None = None,
    v_extra: jax.Array | None = None,
    *,
    sm_scale: float,
    config: PagedDecodeConfig,
    interpret: bool,
    return_lse: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Paged decode attention; arguments as in ``api.paged_decode_attention`` (validated there).

    q: [B, H, D]; k_pages, v_pages: [K, P, N, D], or [L, K, P, N, D] with ``layer`` an int32
    scalar; page_table: int32 [B, max_pages]; lengths: int32 [B]; k_extra, v_extra: [B, K, D]
    or None (one more key per sequence and kv head, after the cache's tokens). Returns [B, H, D]
    in q.dtype,
    and with ``return_lse`` also the natural-log softmax normaliser f32 [B, H] (-inf for length 0).
    """
    stacked = k_pages.ndim == 5
    num_layers = k_pages.shape[0] if stacked else 1
    layer_arr = jnp.zeros((1,), jnp.int32) if layer is None else jnp.reshape(layer, (1,))
    batch, num_heads, head_dim = q.shape
    num_kv_heads, num_pages, page_size, _ = k_pages.shape[-4:]
    group = num_heads // num_kv_heads
    max_pages = page_table.shape[1]
    rows = max(_MIN_DOT_ROWS, 1 << (group - 1).bit_length())
    splits = config.num_splits
    partials = splits > 1 or return_lse  # the LSE needs the (m, l) partials

    has_extra = k_extra is not None
    kernel = functools.partial(
        _paged_decode_kernel,
        has_extra=has_extra,
        stacked=stacked,
        partials=partials,
        group=group,
        rows=rows,
        page_size=page_size,
        pages_per_block=config.pages_per_block,
        page_chunks=config.page_chunks,
        num_splits=splits,
        max_pages=max_pages,
        scale_log2=sm_scale * math.log2(math.e),
    )
    if stacked:
        kv_spec = pl.BlockSpec(
            (num_layers, None, num_pages, page_size, head_dim), lambda b, k, s: (0, k, 0, 0, 0)
        )
    else:
        kv_spec = pl.BlockSpec((None, num_pages, page_size, head_dim), lambda b, k, s: (k, 0, 0, 0))
    in_specs = [
        pl.BlockSpec((batch,), lambda b, k, s: (0,)),  # lengths
        pl.BlockSpec((1,), lambda b, k, s: (0,)),  # layer
        pl.BlockSpec((None, max_pages), lambda b, k, s: (b, 0)),  # page_table
        pl.BlockSpec((None, num_heads, head_dim), lambda b, k, s: (b, 0, 0)),  # q
        kv_spec,
        kv_spec,
    ]
    extra_args = ()
    if has_extra:
        extra_spec = pl.BlockSpec((None, None, head_dim), lambda b, k, s: (b, k, 0))
        in_specs += [extra_spec, extra_spec]
        extra_args = (k_extra, v_extra)
    if not partials:
        out_shape = jax.ShapeDtypeStruct((batch, num_kv_heads, rows, head_dim), q.dtype)
        out_specs = pl.BlockSpec((None, None, rows, head_dim), lambda b, k, s: (b, k, 0, 0))
    else:
        part = (batch, num_kv_heads, splits, rows)
        out_shape = (
            jax.ShapeDtypeStruct((*part, head_dim), jnp.float32),
            jax.ShapeDtypeStruct(part, jnp.float32),
            jax.ShapeDtypeStruct(part, jnp.float32),
        )
        out_specs = (
            pl.BlockSpec((None, None, None, rows, head_dim), lambda b, k, s: (b, k, s, 0, 0)),
            pl.BlockSpec((None, None, None, rows), lambda b, k, s: (b, k, s, 0)),
            pl.BlockSpec((None, None, None, rows), lambda b, k, s: (b, k, s, 0)),
        )
    # grid: (sequence b, kv head k, split s)
    result = pl.pallas_call(
        kernel,
        grid=(batch, num_kv_heads, splits),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=_compat.triton_compiler_params(config.num_warps, config.num_stages),
        interpret=interpret,
        name="paged_decode_attention",
    )(lengths, layer_arr, page_table, q, k_pages, v_pages, *extra_args)

    if not partials:
        return result[:, :, :group].reshape(batch, num_heads, head_dim).astype(q.dtype)
    acc, m, l = result
    m, l = m[..., :group], l[..., :group]
    out = merge_splits(acc[:, :, :, :group], m, l)
    out = out.reshape(batch, num_heads, head_dim).astype(q.dtype)
    if not return_lse:
        return out
    # log2-domain running max and denominators of every split -> natural-log LSE per head.
    m_max = jnp.max(m, axis=2)
    denom = jnp.sum(jnp.exp2(m - m_max[:, :, None]) * l, axis=2)
    lse = jnp.where(
        denom > 0, (m_max + jnp.log2(jnp.where(denom > 0, denom, 1.0))) * math.log(2), -jnp.inf
    )
    return out, lse.reshape(batch, num_heads)
