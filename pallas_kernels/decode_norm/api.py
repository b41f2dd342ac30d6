"""Public entry point of the decode step's fused residual add + RMSNorm (see ``pallas_triton``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels import _compat
from pallas_kernels.decode_norm.pallas_triton import add_rms_norm_pallas
from pallas_kernels.decode_norm.reference import add_rms_norm_reference

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
