"""Paged decode attention: one new token per sequence against its KV pages (flash-decoding).

``paged_decode_attention`` (api.py) is the entry point; ``paged_decode_reference`` defines the
semantics; ``pallas_triton.py`` holds the GPU kernel; ``config.py`` the tiling and autotune table.
"""

from pallas_kernels.paged_decode.api import IMPLEMENTATIONS, paged_decode_attention
from pallas_kernels.paged_decode.config import (
    PagedDecodeConfig,
    get_config,
    ragged_num_splits,
    shape_key,
)
from pallas_kernels.paged_decode.reference import paged_decode_reference

__all__ = [
    "IMPLEMENTATIONS",
    "PagedDecodeConfig",
    "get_config",
    "paged_decode_attention",
    "paged_decode_reference",
    "ragged_num_splits",
    "shape_key",
]
