"""Decode GEMV over a stacked ``[L, K, N]`` weight: reads layer ``l`` in place (no slice copy);
``stacked_gemv_attn`` takes its x as paged decode attention's unmerged split partials."""

from pallas_kernels.gemv.api import (
    GemvConfig,
    default_config,
    get_config,
    shape_key,
    stacked_gemv,
    stacked_gemv_attn,
    supported,
)
from pallas_kernels.gemv.reference import stacked_gemv_attn_reference, stacked_gemv_reference

__all__ = [
    "GemvConfig",
    "default_config",
    "get_config",
    "shape_key",
    "stacked_gemv",
    "stacked_gemv_attn",
    "stacked_gemv_attn_reference",
    "stacked_gemv_reference",
    "supported",
]
