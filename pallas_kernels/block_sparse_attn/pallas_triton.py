"""Pallas (Triton backend) forward kernel for block-sparse causal attention.

One program per (query head, query tile, sequence). Each program reads its row of the plan
(``schedule.make_plan``: how many key tiles to visit, how many need no mask, and the head's
streaming / block-sparse parameters), walks the ascending list of key tiles its head may see
(dense: causal prefix; streaming: sink tiles then the local band; block-sparse: the kept-block
list) with a dynamic-bound loop (dropped tiles are neither loaded nor multiplied), and applies
masks only to the tiles that need them: the suffix of tiles crossing the diagonal or the
sequence length.

Dims: B batch, Tq/Tk query/key length (padded to tile multiples by the caller), H query heads,
K kv heads, G = H / K, D head dim, bs mask block size, tq/tk kernel tile sizes (divide bs).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import _compat
from pallas_kernels.block_sparse_attn import schedule
from pallas_kernels.block_sparse_attn.config import Config

# Finite mask value: a fully masked first tile then gives exp2(0) = 1 weights that the next
# unmasked tile wipes out (alpha = 0) instead of NaN from (-inf) - (-inf).
_MASK_VALUE = float(jnp.finfo(jnp.float32).min)
_LOG2E = math.log2(math.e)


def _kernel(
    plan_ref,  # [B, H, nQt, PLAN_FIELDS] int32 (whole array; schedule.make_plan)
    indices_ref,  # [B, H, nQb', nKb'] int32 (whole array)
    q_ref,  # [tq, D]
    k_ref,  # [Tk, D] (kv head h // G of sequence b)
    v_ref,  # [Tk, D]
    o_ref,  # [tq, D]
    lse_ref,  # [tq] f32, or None
    *,
    scale_log2: float,
    q_offset: int,
    num_q_tiles: int,
    block_size: int,
    tk: int,
):
    tq, d = q_ref.shape
    h = pl.program_id(0)
    t = num_q_tiles - 1 - pl.program_id(1)  # heaviest causal rows launch first
    b = pl.program_id(2)
    sub = block_size // tk
    q_start = q_offset + t * tq  # absolute position of the tile's first query
    rel_row = jnp.minimum(jax.lax.div(t * tq, block_size), indices_ref.shape[2] - 1)
    max_pos = indices_ref.shape[3] - 1
    n, nu, sink_t, band_lo, mode, kv_len, last_base, last_block = (
        plan_ref[b, h, t, i] for i in range(schedule.PLAN_FIELDS)
    )

    def tile_index(p, masked):
        if masked:
            return schedule.tile_index_masked(
                p,
                mode=mode,
                sub=sub,
                sink_t=sink_t,
                band_lo=band_lo,
                last_base=last_base,
                last_block=last_block,
            )
        return schedule.tile_index(
            p,
            mode=mode,
            sub=sub,
            sink_t=sink_t,
            band_lo=band_lo,
            load_block=lambda i: indices_ref[b, h, rel_row, jnp.minimum(i, max_pos)],
        )

    q = q_ref[...]
    q_pos = q_start + jax.lax.broadcasted_iota(jnp.int32, (tq, tk), 0)

    def body(p, carry, *, masked):
        acc, m_i, l_i = carry
        k_start = tile_index(p, masked) * tk
        ks = pl.ds(pl.multiple_of(k_start, tk), tk)
        k = k_ref[ks, :]
        s = _compat.triton_dot(q, k, trans_b=True).astype(jnp.float32) * scale_log2  # [tq, tk]
        v = v_ref[ks, :]
        if masked:
            k_pos = k_start + jax.lax.broadcasted_iota(jnp.int32, (tq, tk), 1)
            s = jnp.where((k_pos <= q_pos) & (k_pos < kv_len), s, _MASK_VALUE)
            # Keys past kv_len may hold anything (NaN padding): 0 * NaN would leak.
            k_row = k_start + jax.lax.broadcasted_iota(jnp.int32, (tk, d), 0)
            v = jnp.where(k_row < kv_len, v, jnp.zeros_like(v))
        m_new = jnp.maximum(m_i, jnp.max(s, axis=1))
        alpha = jnp.exp2(m_i - m_new)
        p_ij = jnp.exp2(s - m_new[:, None])
        l_i = l_i * alpha + jnp.sum(p_ij, axis=1)
        acc = acc * alpha[:, None] + _compat.triton_dot(p_ij.astype(v.dtype), v).astype(jnp.float32)
        return acc, m_new, l_i

    carry = (
        jnp.zeros((tq, d), jnp.float32),
        jnp.full((tq,), -jnp.inf, jnp.float32),
        jnp.zeros((tq,), jnp.float32),
    )
    carry = jax.lax.fori_loop(0, nu, functools.partial(body, masked=False), carry)
    acc, m_i, l_i = jax.lax.fori_loop(nu, n, functools.partial(body, masked=True), carry)
    has_keys = l_i > 0
    l_safe = jnp.where(has_keys, l_i, 1.0)
    o_ref[...] = (acc / l_safe[:, None]).astype(o_ref.dtype)
    if lse_ref is not None:
        lse_ref[...] = jnp.where(has_keys, (m_i + jnp.log2(l_safe)) / _LOG2E, -jnp.inf)


def block_sparse_attention_triton(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    head_modes: jax.Array,
    block_counts: jax.Array,
    block_indices: jax.Array,
    kv_lengths: jax.Array,
    *,
    q_offset: int,
    sm_scale: float,
    block_size: int,
    sink_blocks: int,
    local_blocks: int,
    return_lse: bool,
    config: Config,
    interpret: bool,
    debug: bool = False,
) -> tuple[jax.Array, jax.Array | None]:
    """Run the kernel on validated, tile-padded inputs.

    Args:
      q: [B, Tq, H, D] with Tq a multiple of config.block_q; k, v: [B, Tk, K, D] with Tk a
        multiple of block_size; head_modes [B, H]; block_counts [B, H, nQb'];
        block_indices [B, H, nQb', nKb'] (nQb', nKb' >= 1; rows of non-sparse heads unused);
        kv_lengths [B] int32.
      q_offset: absolute position of query 0 (multiple of block_size).

    Returns:
      out [B, Tq, H, D] (q.dtype), lse [B, H, Tq] f32 or None.
    """
    b, t_q, h, d = q.shape
    _, t_k, kh, _ = k.shape
    g = h // kh
    tq = config.block_q
    n_qt = t_q // tq
    plan = schedule.make_plan(
        head_modes,
        kv_lengths,
        block_counts,
        block_indices,
        num_q_tiles=n_qt,
        q_offset=q_offset,
        block_size=block_size,
        tq=tq,
        tk=config.block_k,
        sink_blocks=sink_blocks,
        local_blocks=local_blocks,
    )
    kernel = functools.partial(
        _kernel,
        scale_log2=sm_scale * _LOG2E,
        q_offset=q_offset,
        num_q_tiles=n_qt,
        block_size=block_size,
        tk=config.block_k,
    )
    # Grid axes: (query head h, query tile (reversed in-kernel), sequence b). Heads vary
    # fastest so the G heads sharing one K/V stream run together and hit L2.
    q_map = lambda hh, tt, bb: (bb, n_qt - 1 - tt, hh, 0)
    kv_map = lambda hh, tt, bb: (bb, 0, hh // g, 0)
    whole = pl.no_block_spec  # small int32 tables, indexed with scalars in-kernel
    in_specs = [
        whole,
        whole,
        pl.BlockSpec((None, tq, None, d), q_map),
        pl.BlockSpec((None, t_k, None, d), kv_map),
        pl.BlockSpec((None, t_k, None, d), kv_map),
    ]
    out_specs = [pl.BlockSpec((None, tq, None, d), q_map)]
    out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype)]
    if return_lse:
        out_specs.append(pl.BlockSpec((None, None, tq), lambda hh, tt, bb: (bb, hh, n_qt - 1 - tt)))
        out_shape.append(jax.ShapeDtypeStruct((b, h, t_q), jnp.float32))
    else:
        kernel = functools.partial(kernel, lse_ref=None)
    outs = pl.pallas_call(
        kernel,
        grid=(h, n_qt, b),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=_compat.triton_compiler_params(config.num_warps, config.num_stages),
        interpret=interpret,
        debug=debug,  # prints the kernel jaxpr and Triton IR when lowering (tests use it)
        name="block_sparse_attention_fwd",
    )(
        plan,
        block_indices.astype(jnp.int32),
        q,
        k,
        v,
    )
    return outs[0], (outs[1] if return_lse else None)
