"""Pallas Mosaic GPU (Hopper) forward kernel for block-sparse causal attention.

FlashAttention-3 structure. A work item is one 128-row query tile (= one mask-block row, so
every warpgroup walks the same kept-block list) of one query head. Warpgroups 0 and 1 each own
64 query rows and run wgmma Q@K^T, the online softmax and wgmma P@V, ping-ponging through a
shared barrier so one warpgroup's softmax overlaps the other's matrix work. Warpgroup 2 is the
producer: it walks the tile list (one row of ``schedule.make_plan`` per item, kept-block
indices read from global memory) and streams K/V tiles by TMA into ``num_stages`` shared
buffers. Dropped blocks are never copied or multiplied. The causal / length mask is applied
only on the suffix of tiles that need it.

Two kernels: ``_kernel`` runs one item per CTA; ``_kernel_persistent`` runs several items per
CTA (``heads_per_cta`` heads of one query tile, or a persistent static round robin), keeping
the K/V pipeline and a double-buffered Q running across items, which hides the per-item
prologue and epilogue when kept lists are short.

Dims: B batch, Tq/Tk query/key length (padded to multiples of the 128 block by the caller),
H query heads, K kv heads, G = H / K, D head dim (64 or 128).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import _compat
from pallas_kernels.block_sparse_attn import schedule
from pallas_kernels.block_sparse_attn.config import MosaicConfig

_LOG2E = math.log2(math.e)
# Finite: a row fully masked in its first tile must not produce (-inf) - (-inf) = NaN.
_MASK_VALUE = -1e30
_COMPUTE_WGS = 2


def _num_sms() -> int:
    """Streaming multiprocessors of the default device (132 on an H100 SXM)."""
    return int(_compat.device_info().core_count or 132)


def supported(q: jax.Array, block_size: int) -> bool:
    """Whether ``auto`` may use this kernel for ``q`` [B, Tq, H, D] on the default device."""
    dev = _compat.device_info()
    cc = dev.compute_capability
    return (
        dev.platform in _compat.GPU_PLATFORMS
        and cc is not None
        and cc.startswith("9")
        and q.dtype in (jnp.bfloat16, jnp.float16)
        and q.shape[-1] in (64, 128)
        and block_size == 128
    )


def _load_plan(plan_ref, h, t, b):
    """One query tile's row of ``schedule.make_plan``: 8 independent scalar loads."""
    return tuple(plan_ref[b, h, t, i] for i in range(schedule.PLAN_FIELDS))


def _walk(plan, indices_ref, h, t, b, *, q_offset, block_size, tile_q, tk):
    """The tile walk of query tile ``t`` of head ``h`` of sequence ``b`` from its plan row.
    Returns (q_rel, q_start, kv_len, n, nu, tile_index(p, masked))."""
    n, nu, sink_t, band_lo, mode, kv_len, last_base, last_block = plan
    sub = block_size // tk
    q_rel = t * tile_q  # first query row of this tile in q (tile == mask-block row)
    rel_row = jnp.minimum(t, indices_ref.shape[2] - 1)
    max_pos = indices_ref.shape[3] - 1

    def tile_index(p, masked=False):
        if masked:  # no memory read on the compute warpgroups' critical path
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

    return q_rel, q_offset + q_rel, kv_len, n, nu, tile_index


def _attend(
    q_smem, k_smem, v_smem, bars, *, wg, n, nu, base, tile_index, q_pos0, kv_len, scale_log2, stages
):
    """One compute warpgroup's flash loop over ``n`` K/V tiles (buffers ``(base + p) %
    stages``); the last ``n - nu`` get the causal / length mask. q_smem: [bq, D].
    Returns the unnormalised (acc [bq, D], m [bq] (log2 domain), l [bq]) in WGMMA layouts."""
    k_ready, v_ready, k_free, v_free, sched = bars
    bq, d = q_smem.shape
    tk = k_smem.shape[1]

    def sched_sync():
        plgpu.barrier_arrive(sched)
        plgpu.barrier_wait(sched)

    row_layout = plgpu.Layout.WGMMA.reduce(1)
    m_i = plgpu.layout_cast(jnp.full((bq,), -jnp.inf, jnp.float32), row_layout)
    l_i = plgpu.layout_cast(jnp.zeros((bq,), jnp.float32), row_layout)
    acc = plgpu.layout_cast(jnp.zeros((bq, d), jnp.float32), plgpu.Layout.WGMMA)

    @pl.when(n > 0)
    def _():
        plgpu.barrier_wait(k_ready.at[lax.rem(base, stages)])

    # Offset the two warpgroups by one phase: ping-pong of matmuls and softmax.
    pl.when(wg == 1)(sched_sync)

    def body(p, carry, *, masked):
        acc, m_i, l_i = carry
        slot = lax.rem(base + p, stages)

        def qk(acc_ref):
            plgpu.wgmma(acc_ref, q_smem, plgpu.transpose_ref(k_smem.at[slot], (1, 0)))
            sched_sync()
            return acc_ref[...]

        s = pl.run_scoped(qk, plgpu.ACC((bq, tk), jnp.float32))
        plgpu.barrier_arrive(k_free.at[slot])
        if masked:
            iota = functools.partial(
                plgpu.broadcasted_iota, jnp.int32, (bq, tk), layout=plgpu.Layout.WGMMA
            )
            k_pos = iota(1) + tile_index(p, masked=True) * tk
            ok = (k_pos <= iota(0) + q_pos0) & (k_pos < kv_len)
            s = jnp.where(ok, s, _MASK_VALUE)
        m_new = jnp.maximum(m_i, s.max(axis=1) * scale_log2)
        alpha = jnp.exp2(m_i - m_new)
        p_ij = jnp.exp2(s * scale_log2 - lax.broadcast_in_dim(m_new, s.shape, [0]))
        acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
        l_i = l_i * alpha + p_ij.sum(axis=1)
        p16 = p_ij.astype(q_smem.dtype)
        acc, l_i, m_new, p16 = lax.optimization_barrier((acc, l_i, m_new, p16))
        plgpu.barrier_arrive(sched)  # softmax done
        plgpu.barrier_wait(v_ready.at[slot])
        plgpu.barrier_wait(sched)  # the other warpgroup's matmul has been issued

        def pv(acc_ref):
            plgpu.wgmma(acc_ref, p16, v_smem.at[slot])

            @pl.when(p + 1 < n)  # wait for the next K while P@V runs
            def _():
                plgpu.barrier_wait(k_ready.at[lax.rem(base + p + 1, stages)])

        acc = pl.run_state(pv)(plgpu.ACC.init(acc))
        plgpu.barrier_arrive(v_free.at[slot])
        return acc, m_new, l_i

    carry = lax.fori_loop(0, nu, functools.partial(body, masked=False), (acc, m_i, l_i))
    carry = lax.fori_loop(nu, n, functools.partial(body, masked=True), carry)
    pl.when(wg == 0)(sched_sync)
    return carry


def _normalize(acc, m_i, l_i):
    """(acc / l, natural-log LSE); rows that saw no key get 0 and -inf."""
    has_keys = l_i > 0
    l_safe = jnp.where(has_keys, l_i, 1.0)
    out = acc / lax.broadcast_in_dim(l_safe, acc.shape, [0])
    lse = jnp.where(has_keys, (m_i + jnp.log2(l_safe)) * (1.0 / _LOG2E), -jnp.inf)
    return out, lse


def _issue_kv(k_ref, v_ref, k_smem, v_smem, bars, *, b, kv_h, key_tile, tk, slot, wait):
    """Producer: TMA one K/V tile into buffer ``slot`` (after it is released if ``wait``)."""
    k_ready, v_ready, k_free, v_free = bars
    ks = pl.ds(pl.multiple_of(key_tile * tk, tk), tk)
    if wait:
        plgpu.barrier_wait(k_free.at[slot])
    plgpu.copy_gmem_to_smem(k_ref.at[b, ks, kv_h], k_smem.at[slot], k_ready.at[slot])
    if wait:
        plgpu.barrier_wait(v_free.at[slot])
    plgpu.copy_gmem_to_smem(v_ref.at[b, ks, kv_h], v_smem.at[slot], v_ready.at[slot])


def _kernel(
    plan_ref,  # [B, H, nQt, PLAN_FIELDS] int32 (GMEM; schedule.make_plan)
    indices_ref,  # [B, H, nQb', nKb'] int32
    q_ref,  # [B, Tq, H, D]
    k_ref,  # [B, Tk, K, D]
    v_ref,  # [B, Tk, K, D]
    o_ref,  # [B, Tq, H, D]
    lse_ref,  # [B, H, Tq] f32 or None
    scoped,
    *,
    num_q_tiles: int,
    group: int,
    cfg: MosaicConfig,
    walk_kw: dict,
    scale_log2: float,
):
    """One CTA per (head, query tile, sequence)."""
    smem, (k_ready, v_ready, q_ready), (k_free, v_free), sched = scoped
    qo_smem2, k_smem, v_smem, lse_smem2 = smem
    bq, tk, stages = cfg.block_q_wg, cfg.block_k, cfg.num_stages
    h = lax.axis_index("heads")
    t = num_q_tiles - 1 - lax.axis_index("q_seq")  # heaviest causal rows launch first
    b = lax.axis_index("batch")
    wg = lax.axis_index("wg")
    plan = _load_plan(plan_ref, h, t, b)
    q_rel, q_start, kv_len, n, nu, tile_index = _walk(plan, indices_ref, h, t, b, **walk_kw)

    @pl.when(wg < _COMPUTE_WGS)
    def _compute():
        plgpu.set_max_registers(232, action="increase")
        qo_smem = qo_smem2.at[wg]
        row0 = q_rel + wg * bq
        plgpu.copy_gmem_to_smem(q_ref.at[b, pl.ds(row0, bq), h], qo_smem, q_ready.at[wg])
        plgpu.barrier_wait(q_ready.at[wg])
        acc, m_i, l_i = _attend(
            qo_smem,
            k_smem,
            v_smem,
            (k_ready, v_ready, k_free, v_free, sched),
            wg=wg,
            n=n,
            nu=nu,
            base=0,
            tile_index=tile_index,
            q_pos0=q_start + wg * bq,
            kv_len=kv_len,
            scale_log2=scale_log2,
            stages=stages,
        )
        out, lse = _normalize(acc, m_i, l_i)
        qo_smem[...] = out.astype(qo_smem.dtype)
        if lse_smem2 is not None:
            lse_smem2.at[wg][...] = lse
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(qo_smem, o_ref.at[b, pl.ds(row0, bq), h])
        if lse_smem2 is not None:
            plgpu.copy_smem_to_gmem(lse_smem2.at[wg], lse_ref.at[b, h, pl.ds(row0, bq)])
        # Only the shared-memory reads must finish before exit; the global writes land anyway.
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    @pl.when(wg == _COMPUTE_WGS)
    def _producer():
        plgpu.set_max_registers(40, action="decrease")
        kv = dict(b=b, kv_h=lax.div(h, group), tk=tk)
        bars = (k_ready, v_ready, k_free, v_free)
        for i in range(stages):
            pl.when(i < n)(
                functools.partial(
                    _issue_kv,
                    k_ref,
                    v_ref,
                    k_smem,
                    v_smem,
                    bars,
                    key_tile=tile_index(i),
                    slot=i,
                    wait=False,
                    **kv,
                )
            )

        @pl.loop(0, jnp.maximum(n - stages, 0))
        def _(p):
            _issue_kv(
                k_ref,
                v_ref,
                k_smem,
                v_smem,
                bars,
                key_tile=tile_index(p + stages),
                slot=lax.rem(p, stages),
                wait=True,
                **kv,
            )


def _kernel_persistent(
    plan_ref,  # [B, H, nQt, PLAN_FIELDS] int32 (GMEM; schedule.make_plan)
    indices_ref,  # [B, H, nQb', nKb'] int32
    q_ref,  # [B, Tq, H, D]
    k_ref,  # [B, Tk, K, D]
    v_ref,  # [B, Tk, K, D]
    o_ref,  # [B, Tq, H, D]
    lse_ref,  # [B, H, Tq] f32 or None
    scoped,
    *,
    num_q_tiles: int,
    num_heads: int,
    batch: int,
    num_ctas: int,
    heads_per_cta: int,
    group: int,
    cfg: MosaicConfig,
    walk_kw: dict,
    scale_log2: float,
):
    """Each CTA loops over several (head, query tile, sequence) items, so one item's Q load,
    first K/V tiles and output store overlap the previous item's work (matters when kept
    lists are short). Items per CTA: ``heads_per_cta`` heads of one query tile (grouped), or
    a static round robin over all items on ``num_ctas`` CTAs (persistent). K/V buffers cycle
    over a CTA-wide tile counter; Q is double-buffered, loaded by the producer, and reused to
    stage the output."""
    smem, (k_ready, v_ready, q_ready), (k_free, v_free, q_free), sched = scoped
    q_smem, k_smem, v_smem, lse_smem = smem
    bq, tk, stages = cfg.block_q_wg, cfg.block_k, cfg.num_stages
    wg = lax.axis_index("wg")
    if heads_per_cta:
        # Grouped: CTA (head group, query tile, sequence) walks its heads_per_cta heads; the
        # hardware hands out CTAs in grid order, so co-resident CTAs stay close (L2 reuse).
        n_items = heads_per_cta
        h0 = lax.axis_index("hgroup") * heads_per_cta
        t0 = num_q_tiles - 1 - lax.axis_index("q_seq")  # heaviest causal rows launch first
        b0 = lax.axis_index("batch")

        def item_coords(i):
            return h0 + jnp.minimum(i, n_items - 1), t0, b0

    else:
        # Persistent: CTA c takes items c, c + num_ctas, ... (static round robin).
        cta = lax.axis_index("cta")
        total = num_heads * num_q_tiles * batch
        n_items = lax.div(total - cta + num_ctas - 1, num_ctas)

        def item_coords(i):
            w = cta + jnp.minimum(i, n_items - 1) * num_ctas  # heads fastest, then sequences,
            h = lax.rem(w, num_heads)  # then query tiles, heaviest first
            rest = lax.div(w, num_heads)
            return h, num_q_tiles - 1 - lax.div(rest, batch), lax.rem(rest, batch)

    def item_walk(i, plan):
        """Walk of item ``i`` and the prefetched plan row of item ``i + 1``: its loads are
        issued now and consumed a whole item later, off the critical path."""
        h, t, b = item_coords(i)
        nxt = _load_plan(plan_ref, *item_coords(i + 1))
        return (h, b) + _walk(plan, indices_ref, h, t, b, **walk_kw), nxt

    first_plan = _load_plan(plan_ref, *item_coords(0))

    @pl.when(wg < _COMPUTE_WGS)
    def _compute():
        plgpu.set_max_registers(232, action="increase")
        # Release every buffer once so the producer's first waits pass.
        for s in range(stages):
            plgpu.barrier_arrive(k_free.at[s])
            plgpu.barrier_arrive(v_free.at[s])
        for s in range(2):
            plgpu.barrier_arrive(q_free.at[s])

        def item(i, carry):
            base, plan = carry
            (h, b, q_rel, q_start, kv_len, n, nu, tile_index), nxt = item_walk(i, plan)
            buf = lax.rem(i, 2)
            q_view = q_smem.at[buf].at[pl.ds(wg * bq, bq)]
            plgpu.barrier_wait(q_ready.at[buf])
            acc, m_i, l_i = _attend(
                q_view,
                k_smem,
                v_smem,
                (k_ready, v_ready, k_free, v_free, sched),
                wg=wg,
                n=n,
                nu=nu,
                base=base,
                tile_index=tile_index,
                q_pos0=q_start + wg * bq,
                kv_len=kv_len,
                scale_log2=scale_log2,
                stages=stages,
            )
            out, lse = _normalize(acc, m_i, l_i)
            # The output goes out through this warpgroup's (now unused) rows of the Q buffer,
            # which is handed back to the producer once the store has read it.
            q_view[...] = out.astype(q_view.dtype)
            if lse_smem is not None:
                lse_smem.at[wg][...] = lse
            plgpu.commit_smem()
            row0 = q_rel + wg * bq
            plgpu.copy_smem_to_gmem(q_view, o_ref.at[b, pl.ds(row0, bq), h])
            if lse_smem is not None:
                plgpu.copy_smem_to_gmem(lse_smem.at[wg], lse_ref.at[b, h, pl.ds(row0, bq)])
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)
            plgpu.barrier_arrive(q_free.at[buf])
            return base + n, nxt

        lax.fori_loop(0, n_items, item, (jnp.int32(0), first_plan))
        # Only the shared-memory reads must finish before exit; the global writes land anyway.
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    @pl.when(wg == _COMPUTE_WGS)
    def _producer():
        plgpu.set_max_registers(40, action="decrease")
        bars = (k_ready, v_ready, k_free, v_free)

        def item(i, carry):
            g, plan = carry
            (h, b, q_rel, _, _, n, _, tile_index), nxt = item_walk(i, plan)
            buf = lax.rem(i, 2)
            plgpu.barrier_wait(q_free.at[buf])
            plgpu.copy_gmem_to_smem(
                q_ref.at[b, pl.ds(q_rel, 2 * bq), h], q_smem.at[buf], q_ready.at[buf]
            )

            def tile(p, g):
                _issue_kv(
                    k_ref,
                    v_ref,
                    k_smem,
                    v_smem,
                    bars,
                    b=b,
                    kv_h=lax.div(h, group),
                    key_tile=tile_index(p),
                    tk=tk,
                    slot=lax.rem(g, stages),
                    wait=True,
                )
                return g + 1

            return lax.fori_loop(0, n, tile, g), nxt

        lax.fori_loop(0, n_items, item, (jnp.int32(0), first_plan))


def block_sparse_attention_mosaic(
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
    config: MosaicConfig,
    interpret: bool,
    zero_v_past_length: bool = True,
) -> tuple[jax.Array, jax.Array | None]:
    """Pad, run the kernel, slice. Shapes as in ``api.block_sparse_attention``."""
    b, t_q, h, d = q.shape
    _, t_k, kh, _ = k.shape
    tile = 2 * config.block_q_wg
    pad_q = (-t_q) % tile
    pad_k = (-t_k) % block_size
    if pad_q:
        q = jnp.pad(q, ((0, 0), (0, pad_q), (0, 0), (0, 0)))
    if pad_k:
        k = jnp.pad(k, ((0, 0), (0, pad_k), (0, 0), (0, 0)))
        v = jnp.pad(v, ((0, 0), (0, pad_k), (0, 0), (0, 0)))
    if zero_v_past_length:
        # wgmma reads V straight from shared memory, so keys past kv_len (masked to weight 0)
        # must hold finite values: 0 * NaN would leak into the output.
        valid = jnp.arange(v.shape[1])[None, :] < kv_lengths[:, None]
        v = jnp.where(valid[:, :, None, None], v, jnp.zeros((), v.dtype))
    n_qt = q.shape[1] // tile
    stages = config.num_stages
    bq, tk = config.block_q_wg, config.block_k
    if interpret:
        # jax 0.10's Mosaic GPU interpreter lacks run_state and layouts and stalls on the
        # producer/consumer barriers; this kernel is tested on the GPU only.
        raise NotImplementedError("pallas_mosaic_gpu has no interpret mode; use pallas_triton")
    plan = schedule.make_plan(
        head_modes,
        kv_lengths,
        block_counts,
        block_indices,
        num_q_tiles=n_qt,
        q_offset=q_offset,
        block_size=block_size,
        tq=tile,
        tk=tk,
        sink_blocks=sink_blocks,
        local_blocks=local_blocks,
    )
    walk_kw = dict(q_offset=q_offset, block_size=block_size, tile_q=tile, tk=tk)
    common = dict(
        num_q_tiles=n_qt, group=h // kh, cfg=config, walk_kw=walk_kw, scale_log2=sm_scale * _LOG2E
    )
    transforms = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
    kv_smem = [plgpu.SMEM((stages, tk, d), x.dtype, transforms=transforms) for x in (k, v)]
    lse_smem = plgpu.SMEM((_COMPUTE_WGS, bq), jnp.float32) if return_lse else None
    kv_ready = (plgpu.Barrier(num_barriers=stages), plgpu.Barrier(num_barriers=stages))
    kv_free = (plgpu.Barrier(num_arrivals=_COMPUTE_WGS, num_barriers=stages),) * 2
    sched = plgpu.Barrier(num_arrivals=_COMPUTE_WGS)
    total = h * n_qt * b
    if config.persistent or config.heads_per_cta > 1:
        if config.persistent:
            num_ctas, hpc = min(total, _num_sms()), 0
            grid, grid_names = (num_ctas,), ("cta",)
        else:
            if h % config.heads_per_cta:
                raise ValueError(f"heads_per_cta={config.heads_per_cta} must divide H={h}")
            num_ctas, hpc = 0, config.heads_per_cta
            grid, grid_names = (h // hpc, n_qt, b), ("hgroup", "q_seq", "batch")
        kernel = functools.partial(
            _kernel_persistent, num_heads=h, batch=b, num_ctas=num_ctas, heads_per_cta=hpc, **common
        )
        scratch = (
            [plgpu.SMEM((2, tile, d), q.dtype, transforms=transforms), *kv_smem, lse_smem],
            (*kv_ready, plgpu.Barrier(num_barriers=2)),
            (*kv_free, plgpu.Barrier(num_arrivals=_COMPUTE_WGS, num_barriers=2)),
            sched,
        )
    else:
        kernel = functools.partial(_kernel, **common)
        scratch = (
            [plgpu.SMEM((_COMPUTE_WGS, bq, d), q.dtype, transforms=transforms), *kv_smem, lse_smem],
            (*kv_ready, plgpu.Barrier(num_barriers=_COMPUTE_WGS)),
            kv_free,
            sched,
        )
        # (query head, query tile (reversed in-kernel), sequence)
        grid, grid_names = (h, n_qt, b), ("heads", "q_seq", "batch")

    def entry(plan_ref, indices_ref, q_ref, k_ref, v_ref, o_ref, lse_ref=None):
        refs = (plan_ref, indices_ref, q_ref, k_ref, v_ref, o_ref, lse_ref)
        pl.run_scoped(lambda *args: kernel(*refs, args), *scratch, collective_axes="wg")

    out_type = [jax.ShapeDtypeStruct(q.shape, q.dtype)]
    if return_lse:
        out_type.append(jax.ShapeDtypeStruct((b, h, q.shape[1]), jnp.float32))
    outs = plgpu.kernel(
        entry,
        out_type=out_type,
        grid=grid,
        grid_names=grid_names,
        num_threads=_COMPUTE_WGS + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
    )(plan, block_indices.astype(jnp.int32), q, k, v)
    out = outs[0][:, :t_q]
    lse = outs[1][:, :, :t_q] if return_lse else None
    return out, lse
