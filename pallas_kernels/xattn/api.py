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

    Returns:
      ``XAttnSelection`` with ``nQb = ceil(Tq / block_size)``, ``nKb = ceil(Tk / block_size)``.
      ``Tq == 1`` is the official decode path: all blocks up to the length are kept (no
      estimate; ``scores`` is None).
    """
    _check_inputs(
        q, k, kv_lengths, head_mask, stride, threshold, norm, block_size, implementation, sink_rule
    )
    b, t_q, h, d = q.shape
    t_k = k.shape[1]
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
