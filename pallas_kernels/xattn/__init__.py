"""XAttention antidiagonal scoring and threshold block selection (produces the kept-block list
that ``pallas_kernels.block_sparse_attn`` consumes).

Modules: ``reference`` (pure jnp, defines correctness), ``pallas_triton`` (Pallas Triton
kernels), ``select`` (the selection rule shared by all implementations), ``config`` (tilings
and the autotune table), ``synthetic`` (structured test inputs), ``api`` (``xattn_select``).
"""

from pallas_kernels.xattn.api import IMPLEMENTATIONS, XAttnSelection, xattn_select
from pallas_kernels.xattn.config import Config

__all__ = ["IMPLEMENTATIONS", "Config", "XAttnSelection", "xattn_select"]
