"""The decode step's residual add + RMSNorm (+ the float32 sum of a split GEMV's partials) as
one kernel."""

from pallas_kernels.decode_norm.api import add_rms_norm
from pallas_kernels.decode_norm.reference import add_rms_norm_reference

__all__ = ["add_rms_norm", "add_rms_norm_reference"]
