"""Public entry point: ``xattn_select`` (XAttention estimate + block selection).

Implementations: ``"reference"`` (jnp estimate + sort-based selection, any platform) and
``"pallas_triton"`` (Pallas Triton scoring kernel, XLA combine, Pallas or XLA selection per
``Config.select_impl``; interpret mode on CPU). ``"auto"``: ``pallas_triton`` on GPU, else
``reference``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from pallas_kernels import _compat
from pallas_kernels.xattn import config as config_lib
from pallas_kernels.xattn import pallas_triton, reference
from pallas_kernels.xattn import select as select_lib

IMPLEMENTATIONS = ("auto", "reference", "pallas_triton")
_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class XAttnSelection:
    """Kept key blocks per (sequence, query head, query-block row).

    Attributes:
      block_counts: int32 [B, H, nQb], number of kept blocks (>= 1).
      block_indices: int32 [B, H, nQb, nKb], kept absolute key-block indices, ascending, tail
        entries repeat the last kept one (format of pallas_kernels/README.md).
      mask: optional bool [B, H, nQb, nKb], the same blocks as a dense mask, with the official
        semantics on padding rows (all False; their list is ``[0]``).
      scores: optional bf16 [B, H, nQb, nKb], the estimate's block sums (zero after the
        diagonal, on padding rows and for heads skipped through ``head_mask``).
    """

    block_counts: jax.Array
    block_indices: jax.Array
    mask: jax.Array | None = None
    scores: jax.Array | None = None


def _check_inputs(
    q, k, kv_lengths, head_mask, stride, threshold, norm, block_size, implementation, sink_rule
):
    if q.ndim != 4 or k.ndim != 4:
        raise ValueError(f"q, k must be 4-D [B, T, heads, D]; got {q.shape}, {k.shape}")
    b, t_q, h, d = q.shape
    bk, t_k, kh, dk = k.shape
    if bk != b or dk != d:
        raise ValueError(f"k.shape={k.shape} must match q.shape={q.shape} in B and D")
    if kh == 0 or h % kh:
        raise ValueError(f"kv heads K={kh} must divide query heads H={h}")
    if t_q == 0 or t_q > t_k:
        raise ValueError(f"need 0 < Tq <= Tk; got Tq={t_q}, Tk={t_k}")
    if q.dtype != k.dtype or q.dtype not in _DTYPES:
        raise ValueError(f"q/k dtypes must match and be bf16/f16/f32; got {q.dtype}, {k.dtype}")
    if not (isinstance(stride, int) and stride >= 1 and block_size % stride == 0):
        raise ValueError(
            f"stride={stride!r} must be a positive int dividing block_size={block_size}"
        )
    if block_size not in (64, 128):
        raise ValueError(f"block_size={block_size!r} must be 64 or 128")
    if (block_size // stride) & (block_size // stride - 1):
        raise ValueError(f"block_size // stride = {block_size // stride} must be a power of two")
    if not threshold > 0:
        raise ValueError(f"threshold={threshold!r} must be > 0")
    if not norm > 0:
        raise ValueError(f"norm={norm!r} must be > 0")
    if t_q > 1 and (t_k - t_q) % block_size:
        raise ValueError(f"Tk - Tq = {t_k - t_q} must be a multiple of block_size={block_size}")
    if kv_lengths is not None and kv_lengths.shape != (b,):
        raise ValueError(f"kv_lengths.shape={kv_lengths.shape} must be (B,)=({b},)")
    if head_mask is not None and head_mask.shape != (b, h):
        raise ValueError(f"head_mask.shape={head_mask.shape} must be (B, H)=({b}, {h})")
    if sink_rule not in select_lib.SINK_RULES:
        raise ValueError(f"sink_rule={sink_rule!r} must be one of {select_lib.SINK_RULES}")
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation={implementation!r} must be one of {IMPLEMENTATIONS}")
    if implementation == "pallas_triton" and (d < 16 or d & (d - 1)):
        raise NotImplementedError(f"pallas_triton needs a power-of-two head_dim >= 16; got {d}")


def _decode_selection(b, h, n_kb, kv_lengths, block_size, return_mask):
    """Tq == 1 (the official ``decoding=True`` path): every key block up to the length."""
    n_valid = select_lib.cdiv(kv_lengths.astype(jnp.int32), block_size)  # [B]
    col = jnp.arange(n_kb, dtype=jnp.int32)
    mask = jnp.broadcast_to((col[None, :] < n_valid[:, None])[:, None, None, :], (b, h, 1, n_kb))
    list_keep = mask | (col == 0)
    counts, indices = select_lib.block_list_from_mask(list_keep)
    return XAttnSelection(counts, indices, mask if return_mask else None, None)


def xattn_select(
    q: jax.Array,
    k: jax.Array,
    *,
    kv_lengths: jax.Array | None = None,
    stride: int = 16,
    threshold: float = 0.8,
    norm: float = 1.0,
    block_size: int = 128,
    head_mask: jax.Array | None = None,
    return_mask: bool = False,
    return_scores: bool = False,
    implementation: str = "auto",
    interpret: bool | None = None,
    config: config_lib.Config | None = None,
    sink_rule: str = "always",
    kv_heads_per_pass: int | None = None,
) -> XAttnSelection:
    """XAttention antidiagonal estimate and threshold block selection (official semantics).

    Args:
      q: [B, Tq, H, D], post q_norm/RoPE. Query ``i`` sits at absolute position
        ``Tk - Tq + i`` (``Tk - Tq`` a multiple of ``block_size`` unless ``Tq == 1``).
      k: [B, Tk, K, D], post k_norm/RoPE; query head ``h`` uses kv head ``h // (H // K)``.
      kv_lengths: int32 [B] valid keys per sequence (default Tk). Each sequence is
        estimated as if alone with its own length (zero-padded after it).
      stride, threshold, norm, block_size: XAttention parameters (official defaults
        16 / 0.8 / 1 / 128). ``threshold >= 1`` keeps every causal block.
      head_mask: optional bool [B, H]; False marks heads that need no estimate (not mode 1).
        They are skipped, and their rows list every causal block (as a dense head would).
      return_mask / return_scores: also return the dense bool mask / the bf16 block sums.
      implementation: one of ``IMPLEMENTATIONS``.
      interpret: run Pallas kernels in interpret mode (None: unless on GPU).
      config: tiling; default from the autotune table of this device, else a heuristic.
      sink_rule: ``"always"`` (sink and diagonal forced on every row, the spec's rule) or
        ``"official"`` (the official code's first-chunk bookkeeping, see ``select``).
      kv_heads_per_pass: estimate this many KV heads (with their query heads) at a time, one
        pass after another in a loop (None: all at once). Heads are independent, so the result
        is the same; only the estimate's scratch shrinks, which grows as T^2 (``scratch_bytes``:
        16 GiB per layer at 512K tokens and 32 heads in one pass). Must divide K.

    Returns:
      ``XAttnSelection`` with ``nQb = ceil(Tq / block_size)``, ``nKb = ceil(Tk / block_size)``.
      ``Tq == 1`` is the official decode path: all blocks up to the length are kept (no
      estimate; ``scores`` is None).
    """
    _check_inputs(
        q, k, kv_lengths, head_mask, stride, threshold, norm, block_size, implementation, sink_rule
    )
    b, t_q, h, d = q.shape
    t_k, kh = k.shape[1], k.shape[2]
    if kv_heads_per_pass is not None and not (
        isinstance(kv_heads_per_pass, int)
        and 1 <= kv_heads_per_pass <= kh
        and kh % kv_heads_per_pass == 0
    ):
        raise ValueError(f"kv_heads_per_pass={kv_heads_per_pass!r} must be a divisor of K={kh}")
    if kv_heads_per_pass is not None and kv_heads_per_pass < kh and t_q > 1:
        return _select_in_passes(
            q,
            k,
            kv_heads_per_pass,
            kv_lengths=kv_lengths,
            stride=stride,
            threshold=threshold,
            norm=norm,
            block_size=block_size,
            head_mask=head_mask,
            return_mask=return_mask,
            return_scores=return_scores,
            implementation=implementation,
            interpret=interpret,
            config=config,
            sink_rule=sink_rule,
        )
    n_kb = select_lib.cdiv(t_k, block_size)
    if kv_lengths is None:
        kv_lengths = jnp.full((b,), t_k, jnp.int32)
    kv_lengths = jnp.minimum(kv_lengths.astype(jnp.int32), t_k)
    head_active = jnp.ones((b, h), bool) if head_mask is None else head_mask.astype(bool)
    if t_q == 1:
        return _decode_selection(b, h, n_kb, kv_lengths, block_size, return_mask)

    if implementation == "auto":
        implementation = "pallas_triton" if _compat.on_gpu() else "reference"
    if interpret is None:
        interpret = _compat.default_interpret()
    q_block_offset = (t_k - t_q) // block_size

    if implementation == "reference":
        if threshold >= 1.0 and not return_scores:
            head_active = jnp.zeros_like(head_active)  # every row: all causal blocks
        counts, indices, mask, sums = reference.xattn_select_reference(
            q,
            k,
            kv_lengths,
            head_active,
            stride=stride,
            threshold=threshold,
            norm=norm,
            block_size=block_size,
            sink_rule=sink_rule,
        )
    else:
        if config is None:
            config = config_lib.lookup_config(
                _compat.device_kind(),
                stride=stride,
                block_size=block_size,
                head_dim=d,
                seq_len=t_k,
                dtype=jnp.dtype(q.dtype).name,
            )
        config.check_shapes(head_dim=d, rows_per_block=block_size // stride)
        n_qb = select_lib.cdiv(t_q, block_size)
        if threshold >= 1.0 and not return_scores:
            sums = jnp.zeros((b, h, n_qb, n_kb), jnp.bfloat16)  # not needed: all causal
        else:
            w, mt, lt = pallas_triton.score_partials(
                q,
                k,
                kv_lengths,
                head_active,
                stride=stride,
                norm=norm,
                block_size=block_size,
                config=config,
                interpret=interpret,
            )
            geom = pallas_triton.combine_geometry(
                t_q, t_k, stride=stride, block_size=block_size, config=config
            )
            sums = pallas_triton.combine_partials(
                w, mt, lt, kv_lengths, head_active, stride=stride, **geom
            )
        select_active = head_active if threshold < 1.0 else jnp.zeros_like(head_active)
        if config.select_impl == "pallas":
            counts, indices, mask = pallas_triton.select_pallas(
                sums,
                kv_lengths,
                select_active,
                threshold=threshold,
                block_size=block_size,
                q_block_offset=q_block_offset,
                config=config,
                interpret=interpret,
                sink_rule=sink_rule,
            )
        else:
            counts, indices, mask = select_lib.select_xla(
                sums,
                kv_lengths,
                select_active,
                threshold=threshold,
                block_size=block_size,
                q_block_offset=q_block_offset,
                sink_rule=sink_rule,
            )
    return XAttnSelection(
        counts, indices, mask if return_mask else None, sums if return_scores else None
    )


def _select_in_passes(q, k, kv_heads_per_pass: int, *, head_mask, **kw) -> XAttnSelection:
    """``xattn_select`` over groups of ``kv_heads_per_pass`` KV heads (and their G query heads
    each), one group per iteration of a ``fori_loop``: the loop makes the passes run one after
    another, so only one pass's scratch is live. Each pass's outputs go into the full-size
    outputs in place (``dynamic_update_slice`` along the head axis)."""
    b, _, h, _ = q.shape
    kh = k.shape[2]
    hp = kv_heads_per_pass * (h // kh)
    head_active = jnp.ones((b, h), bool) if head_mask is None else head_mask.astype(bool)

    def one_pass(i):
        q_i = jax.lax.dynamic_slice_in_dim(q, i * hp, hp, axis=2)
        k_i = jax.lax.dynamic_slice_in_dim(k, i * kv_heads_per_pass, kv_heads_per_pass, axis=2)
        act_i = jax.lax.dynamic_slice_in_dim(head_active, i * hp, hp, axis=1)
        sel = xattn_select(q_i, k_i, head_mask=act_i, **kw)
        outs = (sel.block_counts, sel.block_indices, sel.mask, sel.scores)
        return tuple(x for x in outs if x is not None)

    # Full-size outputs: every output has the head axis at position 1.
    shapes = jax.eval_shape(one_pass, 0)
    init = tuple(jnp.zeros((s.shape[0], h, *s.shape[2:]), s.dtype) for s in shapes)

    def body(i, outs):
        return tuple(
            jax.lax.dynamic_update_slice_in_dim(o, x, i * hp, axis=1)
            for o, x in zip(outs, one_pass(i))
        )

    outs = list(jax.lax.fori_loop(0, kh // kv_heads_per_pass, body, init))
    counts, indices = outs.pop(0), outs.pop(0)
    mask = outs.pop(0) if kw["return_mask"] else None
    scores = outs.pop(0) if kw["return_scores"] else None
    return XAttnSelection(counts, indices, mask, scores)


def scratch_bytes(
    batch: int,
    q_len: int,
    k_len: int,
    heads: int,
    *,
    stride: int = 16,
    block_size: int = 128,
    tile: int = 128,
) -> dict[str, int]:
    """Bytes of the estimate's per-call buffers on the GPU path (``pallas_triton``) for
    ``heads`` query heads, by buffer. ``tile``: the scoring kernel's block_m = block_n (128
    for long inputs; the autotune table may pick another, which changes the padding only).

    - ``score_w``: f32 [B, H, Rq_pad, nKbt], each row's partial sums per key block (Rq = Tq /
      stride reshaped rows, nKbt ~ Tk / block_size): grows as Tq * Tk.
    - ``score_m_l``: f32 [B, H, nJ, Rq_pad] x 2, per-row per-column-tile max and sum.
    - ``block_sums``: bf16 [B, H, nQb, nKb].
    - ``select_mask``: int8 [B, H, nQb, nKb] written by the selection kernel.
    - ``select_lists``: int32 [B, H, nQb, nKb] kept-block indices + int32 [B, H, nQb] counts
      (the outputs: live until the attention kernel has run).
    """
    cdiv = select_lib.cdiv
    rb = block_size // stride
    n_qb, n_kb = cdiv(q_len, block_size), cdiv(k_len, block_size)
    rq_pad = cdiv(n_qb * rb, tile) * tile
    n_j = cdiv(n_kb * rb, tile)
    n_kbt = n_j * (tile // rb)
    bh = batch * heads
    return {
        "score_w": bh * rq_pad * n_kbt * 4,
        "score_m_l": 2 * bh * n_j * rq_pad * 4,
        "block_sums": bh * n_qb * n_kb * 2,
        "select_mask": bh * n_qb * n_kb,
        "select_lists": bh * n_qb * n_kb * 4 + bh * n_qb * 4,
    }
