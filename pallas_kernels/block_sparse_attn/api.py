"""Public entry point: ``block_sparse_attention`` with implementation selection.

Implementations: ``"reference"`` (jnp, any platform), ``"pallas_triton"`` (Pallas Triton
backend; interpret mode on CPU), ``"pallas_mosaic_gpu"`` (Hopper wgmma/TMA kernel, GPU only),
``"cudnn"`` (dense causal only, through ``jax.nn.dot_product_attention``). ``"auto"`` picks
the Mosaic GPU kernel on Hopper when the shapes suit it, else the Triton kernel on GPU, and the
reference elsewhere.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from pallas_kernels import _compat
from pallas_kernels.block_sparse_attn import config as config_lib
from pallas_kernels.block_sparse_attn.pallas_triton import block_sparse_attention_triton
from pallas_kernels.block_sparse_attn.reference import block_sparse_attention_reference

try:  # The Mosaic GPU backend is optional: a jax without it just loses the option.
    from pallas_kernels.block_sparse_attn import pallas_mosaic_gpu as _mgpu
except ImportError:  # pragma: no cover
    _mgpu = None

IMPLEMENTATIONS = ("auto", "reference", "pallas_triton", "pallas_mosaic_gpu", "cudnn")
_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)


def _check_inputs(
    q,
    k,
    v,
    head_modes,
    block_counts,
    block_indices,
    kv_lengths,
    block_q,
    block_k,
    sink_blocks,
    local_blocks,
):
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(
            f"q, k, v must be 4-D [B, T, heads, D]; got {q.shape}, {k.shape}, {v.shape}"
        )
    b, t_q, h, d = q.shape
    bk, t_k, kh, dk = k.shape
    if v.shape != k.shape:
        raise ValueError(f"v.shape={v.shape} must equal k.shape={k.shape}")
    if bk != b or dk != d:
        raise ValueError(f"k.shape={k.shape} must match q.shape={q.shape} in B and D")
    if kh == 0 or h % kh:
        raise ValueError(f"kv heads K={kh} must divide query heads H={h}")
    if t_q > t_k or t_q == 0:
        raise ValueError(f"need 0 < Tq <= Tk; got Tq={t_q}, Tk={t_k}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in _DTYPES:
        raise ValueError(
            f"q/k/v dtypes must match and be bf16/f16/f32; got {q.dtype}, {k.dtype}, {v.dtype}"
        )
    if head_modes.shape != (b, h):
        raise ValueError(f"head_modes.shape={head_modes.shape} must be (B, H)=({b}, {h})")
    if block_q <= 0 or block_k <= 0:
        raise ValueError(f"block_q={block_q}, block_k={block_k} must be positive")
    n_qb = -(-t_q // block_q)
    if (block_counts is None) != (block_indices is None):
        raise ValueError("block_counts and block_indices must be given together")
    if block_counts is not None:
        if block_counts.shape != (b, h, n_qb):
            raise ValueError(
                f"block_counts.shape={block_counts.shape} must be (B, H, nQb)={(b, h, n_qb)}"
            )
        if block_indices.ndim != 4 or block_indices.shape[:3] != (b, h, n_qb):
            raise ValueError(
                f"block_indices.shape={block_indices.shape} must be "
                f"(B, H, nQb, nKb)=({b}, {h}, {n_qb}, nKb)"
            )
    if kv_lengths is not None and kv_lengths.shape != (b,):
        raise ValueError(f"kv_lengths.shape={kv_lengths.shape} must be (B,)=({b},)")
    if sink_blocks < 0 or local_blocks < 0 or sink_blocks + local_blocks == 0:
        raise ValueError(
            f"need sink_blocks >= 0, local_blocks >= 0, not both 0; got "
            f"{sink_blocks}, {local_blocks}"
        )


def _pad_axis(x: jax.Array, axis: int, multiple: int) -> jax.Array:
    rem = (-x.shape[axis]) % multiple
    if rem == 0:
        return x
    pads = [(0, 0)] * x.ndim
    pads[axis] = (0, rem)
    return jnp.pad(x, pads)


def mosaic_supported(q: jax.Array, block_size: int = 128) -> bool:
    """Whether the Hopper Mosaic GPU kernel takes ``q`` [B, Tq, H, D] on the default device."""
    return _mgpu is not None and _mgpu.supported(q, block_size)


def _pick_auto(q, block_size: int) -> str:
    if not _compat.on_gpu():
        return "reference"
    if mosaic_supported(q, block_size):
        return "pallas_mosaic_gpu"
    return "pallas_triton"


@functools.partial(
    jax.jit,
    static_argnames=(
        "sink_blocks",
        "local_blocks",
        "sm_scale",
        "return_lse",
        "block_q",
        "block_k",
        "implementation",
        "interpret",
        "config",
        "v_finite_past_length",
    ),
)
def block_sparse_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    head_modes: jax.Array,
    block_counts: jax.Array | None = None,
    block_indices: jax.Array | None = None,
    *,
    kv_lengths: jax.Array | None = None,
    v_finite_past_length: bool = False,
    sink_blocks: int = 1,
    local_blocks: int = 8,
    sm_scale: float | None = None,
    return_lse: bool = False,
    block_q: int | None = None,
    block_k: int | None = None,
    implementation: str = "auto",
    interpret: bool | None = None,
    config: config_lib.Config | config_lib.MosaicConfig | None = None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Causal attention with per-head dense / streaming / block-sparse modes and GQA.

    Semantics in ``pallas_kernels/README.md`` and ``reference.py``. Head modes and kept-block
    lists are data: changing them does not recompile.

    Args:
      q: [B, Tq, H, D]; k, v: [B, Tk, K, D] (Tq <= Tk, queries aligned to the end of the keys).
      head_modes: [B, H] int32: 0 dense causal, 1 block-sparse, -1 streaming.
      block_counts: [B, H, nQb] int32 kept key blocks per query-block row (mode 1 heads).
      block_indices: [B, H, nQb, nKb] int32 kept key-block indices, ascending, causal (no
        index past the row's diagonal block), padded by repeating the last kept index.
      kv_lengths: [B] int32 valid keys per sequence (default Tk). The kernels skip query
        tiles wholly at or past a sequence's length; output rows past it are not meaningful.
      v_finite_past_length: the caller guarantees ``v`` is finite past ``kv_lengths`` (e.g. it
        was computed from pad tokens). Masked keys get weight 0, but the Mosaic kernel's
        matmul reads them, and 0 x NaN is NaN; with this set it skips the pass that zeroes them.
      sink_blocks, local_blocks: streaming window in key blocks.
      sm_scale: softmax scale (default 1/sqrt(D)).
      return_lse: also return the log-sum-exp [B, H, Tq] f32 (natural log).
      block_q, block_k: mask block sizes (default 128; the Pallas kernels need them equal).
      implementation: one of ``IMPLEMENTATIONS``.
      interpret: run Pallas kernels in interpret mode (default: unless on GPU).
      config: kernel tiling; default from the autotune table of this device kind.

    Returns:
      out [B, Tq, H, D] in q.dtype, plus lse [B, H, Tq] f32 if ``return_lse``.
    """
    block_q = 128 if block_q is None else block_q
    block_k = block_q if block_k is None else block_k
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation={implementation!r} not in {IMPLEMENTATIONS}")
    _check_inputs(
        q,
        k,
        v,
        head_modes,
        block_counts,
        block_indices,
        kv_lengths,
        block_q,
        block_k,
        sink_blocks,
        local_blocks,
    )
    b, t_q, h, d = q.shape
    t_k = k.shape[1]
    scale = 1.0 / math.sqrt(d) if sm_scale is None else float(sm_scale)
    if implementation == "auto":
        # Shapes the kernels do not take (unequal or misaligned blocks) use the reference.
        kernel_ok = block_q == block_k and (t_k - t_q) % block_q == 0
        implementation = _pick_auto(q, block_q) if kernel_ok else "reference"
    if implementation == "reference":
        return block_sparse_attention_reference(
            q,
            k,
            v,
            head_modes,
            block_counts,
            block_indices,
            kv_lengths=kv_lengths,
            sink_blocks=sink_blocks,
            local_blocks=local_blocks,
            sm_scale=scale,
            return_lse=return_lse,
            block_q=block_q,
            block_k=block_k,
        )
    if implementation == "cudnn":
        return _cudnn(q, k, v, kv_lengths, scale, return_lse)

    block_size = block_q
    if block_k != block_q:
        raise NotImplementedError(
            f"{implementation} needs block_q == block_k; got {block_q}, {block_k}"
        )
    if (t_k - t_q) % block_size:
        raise ValueError(
            f"Tk - Tq = {t_k - t_q} must be a multiple of the block size "
            f"{block_size} for {implementation}"
        )
    if interpret is None:
        interpret = _compat.default_interpret()
    lengths_given = kv_lengths is not None
    if kv_lengths is None:
        kv_lengths = jnp.full((b,), t_k, jnp.int32)
    if block_counts is None:
        # No block-sparse heads: tiny placeholder tables, never used for modes 0 / -1.
        block_counts = jnp.ones((b, h, 1), jnp.int32)
        block_indices = jnp.zeros((b, h, 1, 1), jnp.int32)
    if config is None:
        config = config_lib.lookup_config(
            "cpu" if interpret else _compat.device_kind(),
            backend=implementation,
            batch=b,
            q_heads=h,
            kv_heads=k.shape[2],
            seq_len=t_k,
            head_dim=d,
            dtype=jnp.dtype(q.dtype).name,
            block_size=block_size,
        )
    config.check_divides(block_size)

    if implementation == "pallas_mosaic_gpu":
        if _mgpu is None:
            raise NotImplementedError("pallas_mosaic_gpu is not available in this jax")
        if not isinstance(config, config_lib.MosaicConfig):
            raise ValueError(f"pallas_mosaic_gpu needs a MosaicConfig, got {config!r}")
        if q.dtype not in (jnp.bfloat16, jnp.float16) or d not in (64, 128):
            raise NotImplementedError(
                f"pallas_mosaic_gpu needs bf16/f16 and D in (64, 128); got {q.dtype}, D={d}"
            )
        out, lse = _mgpu.block_sparse_attention_mosaic(
            q,
            k,
            v,
            head_modes,
            block_counts,
            block_indices,
            kv_lengths,
            q_offset=t_k - t_q,
            sm_scale=scale,
            block_size=block_size,
            sink_blocks=sink_blocks,
            local_blocks=local_blocks,
            return_lse=return_lse,
            config=config,
            interpret=interpret,
            # Without lengths every key is valid; finite padding needs no zeroing either.
            zero_v_past_length=lengths_given and not v_finite_past_length,
        )
        return (out, lse) if return_lse else out

    if not isinstance(config, config_lib.Config):
        raise ValueError(f"pallas_triton needs a Config, got {config!r}")
    # Triton tiles want a power-of-two head dim and whole tiles: zero-pad (padded keys sit
    # past kv_lengths, padded queries past Tq; both are sliced off or masked).
    d_pad = max(16, 1 << (d - 1).bit_length())
    qp = _pad_axis(_pad_axis(q, 3, d_pad), 1, config.block_q)
    kp = _pad_axis(_pad_axis(k, 3, d_pad), 1, block_size)
    vp = _pad_axis(_pad_axis(v, 3, d_pad), 1, block_size)
    out, lse = block_sparse_attention_triton(
        qp,
        kp,
        vp,
        head_modes,
        block_counts,
        block_indices,
        kv_lengths,
        q_offset=t_k - t_q,
        sm_scale=scale,
        block_size=block_size,
        sink_blocks=sink_blocks,
        local_blocks=local_blocks,
        return_lse=return_lse,
        config=config,
        interpret=interpret,
    )
    out = out[:, :t_q, :, :d]
    if return_lse:
        return out, lse[:, :, :t_q]
    return out


def _cudnn(q, k, v, kv_lengths, scale, return_lse):
    """Dense causal attention through cuDNN. Ignores head modes: only for all-dense calls."""
    if return_lse:
        raise NotImplementedError("implementation='cudnn' does not return the LSE")
    if q.shape[1] != k.shape[1]:
        raise NotImplementedError(
            f"implementation='cudnn' needs Tq == Tk; got {q.shape[1]}, {k.shape[1]}"
        )
    return jax.nn.dot_product_attention(
        q,
        k,
        v,
        scale=scale,
        is_causal=True,
        query_seq_lengths=kv_lengths,
        key_value_seq_lengths=kv_lengths,
        implementation="cudnn",
    )
