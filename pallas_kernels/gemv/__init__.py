"""Decode GEMV over a stacked ``[L, K, N]`` weight: reads layer ``l`` in place (no slice copy)."""

from pallas_kernels.gemv.api import (
    GemvConfig,
    default_config,
    get_config,
    shape_key,
    stacked_gemv,
    supported,
)
from pallas_kernels.gemv.reference import stacked_gemv_reference

__all__ = [
    "GemvConfig",
    "default_config",
    "get_config",
    "shape_key",
    "stacked_gemv",
    "stacked_gemv_reference",
    "supported",
]
