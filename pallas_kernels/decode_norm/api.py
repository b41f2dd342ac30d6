"""Public entry point of the decode step's fused residual add + RMSNorm (see ``pallas_triton``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels import _compat
from pallas_kernels.decode_norm.pallas_triton import add_rms_norm_pallas
from pallas_kernels.decode_norm.qk_rope import qk_norm_rope_pallas
from pallas_kernels.decode_norm.reference import add_rms_norm_reference, qk_norm_rope_reference

IMPLEMENTATIONS = ("auto", "pallas", "reference")


def _check(h, weight, partials, residual, bias, out_rows) -> None:
    if h.ndim != 2:
        raise ValueError(f"add_rms_norm: h must be [B, E]; got shape {h.shape}")
    B, E = h.shape
    if E % 16:
        raise ValueError(f"add_rms_norm: E={E} must be a multiple of 16")
    if weight.shape != (E,):
        raise ValueError(f"add_rms_norm: weight must be [E={E}]; got shape {weight.shape}")
    if partials is not None and residual is not None:
        raise ValueError("add_rms_norm: give partials or residual, not both")
    if partials is not None and (partials.ndim != 3 or partials.shape[1:] != (B, E)):
        raise ValueError(f"add_rms_norm: partials must be [S, B={B}, E={E}]; got {partials.shape}")
    if residual is not None and residual.shape != (B, E):
        raise ValueError(f"add_rms_norm: residual must be [B={B}, E={E}]; got {residual.shape}")
    if bias is not None and (partials is None or bias.shape != (E,)):
        raise ValueError("add_rms_norm: bias must be [E] and comes with partials")
    if out_rows is not None and (not isinstance(out_rows, int) or out_rows < B):
        raise ValueError(f"add_rms_norm: out_rows={out_rows!r} must be an int >= B={B}")


def add_rms_norm(
    h: jax.Array,
    weight: jax.Array,
    *,
    eps: float,
    partials: jax.Array | None = None,
    residual: jax.Array | None = None,
    bias: jax.Array | None = None,
    out_rows: int | None = None,
    num_warps: int = 4,
    implementation: str = "auto",
    interpret: bool | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Residual add then RMSNorm, in one kernel on GPU.

    Args:
      h: [B, E] residual stream.
      weight: [E] norm weight.
      eps: RMSNorm epsilon.
      partials: float32 [S, B, E] split partials of a GEMV (summed in float32, plus ``bias``,
        then cast to h.dtype) to add to h; or
      residual: [B, E] to add to h (at most one of the two; none: just the norm).
      bias: [E], with ``partials`` only.
      out_rows: rows of x (default B); rows past B are zero (the batch-1 decode step pads the
        QKV projection's input to two rows).
      implementation: "auto" (Pallas on GPU, reference elsewhere), "pallas" or "reference".
      interpret: Pallas interpret mode (None: unless on GPU).

    Returns:
      (h_new [B, E], x [out_rows, E]), both h.dtype; see ``add_rms_norm_reference``.
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation={implementation!r}; allowed: {IMPLEMENTATIONS}")
    _check(h, weight, partials, residual, bias, out_rows)
    if implementation == "auto":
        implementation = "pallas" if _compat.on_gpu() else "reference"
    if implementation == "reference":
        return add_rms_norm_reference(
            h, weight, eps=eps, partials=partials, residual=residual, bias=bias, out_rows=out_rows
        )
    if residual is not None:
        residual = residual.astype(h.dtype)
    return add_rms_norm_pallas(
        h,
        weight,
        None if partials is None else partials.astype(jnp.float32),
        residual,
        bias,
        eps=float(eps),
        out_rows=h.shape[0] if out_rows is None else out_rows,
        num_warps=num_warps,
        interpret=_compat.default_interpret() if interpret is None else interpret,
    )


def qk_norm_rope(
    q: jax.Array,
    k: jax.Array,
    cos: jax.Array,
    sin: jax.Array,
    *,
    batch: int | None = None,
    q_weight: jax.Array | None = None,
    k_weight: jax.Array | None = None,
    eps: float = 1e-6,
    num_warps: int = 1,
    implementation: str = "auto",
    interpret: bool | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Per-head q/k RMSNorm (optional) then rotate-half RoPE of one decode token, one kernel.

    Args:
      q: [R, H, D]; k: [R, K, D] (R >= batch: rows past ``batch``, e.g. the batch-1 QKV
        padding row, are not read).
      cos, sin: [batch, D] RoPE tables of each sequence's position.
      batch: sequences (default R).
      q_weight, k_weight: [D] norm weights (both or neither; neither: RoPE only).
      eps: RMSNorm epsilon.
      implementation: "auto" (Pallas on GPU, reference elsewhere), "pallas" or "reference".

    Returns:
      (q [batch, H, D], k [batch, K, D]) in q.dtype; see ``qk_norm_rope_reference``.
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation={implementation!r}; allowed: {IMPLEMENTATIONS}")
    if q.ndim != 3 or k.ndim != 3 or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(
            f"qk_norm_rope: q must be [R, H, D] and k [R, K, D]; got {q.shape}, {k.shape}"
        )
    R, _, D = q.shape
    batch = R if batch is None else batch
    if not isinstance(batch, int) or not 1 <= batch <= R:
        raise ValueError(f"qk_norm_rope: batch={batch!r} must be an int in [1, R={R}]")
    if D % 2 or (D // 2) & (D // 2 - 1):
        raise ValueError(f"qk_norm_rope: head dim D={D} must be twice a power of two")
    if cos.shape != (batch, D) or sin.shape != (batch, D):
        raise ValueError(
            f"qk_norm_rope: cos and sin must be [batch={batch}, D={D}]; got {cos.shape}, {sin.shape}"
        )
    if (q_weight is None) != (k_weight is None):
        raise ValueError("qk_norm_rope: give q_weight and k_weight together (or neither)")
    if q_weight is not None and (q_weight.shape != (D,) or k_weight.shape != (D,)):
        raise ValueError(f"qk_norm_rope: q_weight, k_weight must be [D={D}]")
    if k.dtype != q.dtype:
        raise ValueError(f"qk_norm_rope: q and k dtypes differ ({q.dtype}, {k.dtype})")
    if implementation == "auto":
        implementation = "pallas" if _compat.on_gpu() else "reference"
    if implementation == "reference":
        return qk_norm_rope_reference(
            q, k, cos, sin, batch=batch, q_weight=q_weight, k_weight=k_weight, eps=eps
        )
    return qk_norm_rope_pallas(
        q,
        k,
        cos,
        sin,
        q_weight,
        k_weight,
        batch=batch,
        eps=float(eps),
        num_warps=num_warps,
        interpret=_compat.default_interpret() if interpret is None else interpret,
    )
