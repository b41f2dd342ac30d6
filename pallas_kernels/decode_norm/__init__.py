"""The decode step's small norm kernels: residual add + RMSNorm (+ the float32 sum of a split
GEMV's partials) as one kernel, and per-head q/k RMSNorm + RoPE as one kernel."""

from pallas_kernels.decode_norm.api import add_rms_norm, qk_norm_rope
from pallas_kernels.decode_norm.reference import add_rms_norm_reference, qk_norm_rope_reference

__all__ = ["add_rms_norm", "add_rms_norm_reference", "qk_norm_rope", "qk_norm_rope_reference"]
