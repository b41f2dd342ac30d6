"""Block-sparse causal flash attention with per-head dense / streaming / XAttention modes.

``block_sparse_attention`` (api.py) is the entry point; ``reference.py`` defines the semantics
and exports helpers to build a dense block mask (``block_mask_from_modes``) and the compact
kept-block list from a bool mask (``kept_blocks_from_mask``).
"""

from pallas_kernels.block_sparse_attn.api import IMPLEMENTATIONS, block_sparse_attention
from pallas_kernels.block_sparse_attn.config import Config, MosaicConfig, lookup_config
from pallas_kernels.block_sparse_attn.reference import (
    MODE_DENSE,
    MODE_SPARSE,
    MODE_STREAMING,
    block_mask_from_modes,
    block_sparse_attention_reference,
    kept_blocks_from_mask,
)

__all__ = [
    "IMPLEMENTATIONS",
    "MODE_DENSE",
    "MODE_SPARSE",
    "MODE_STREAMING",
    "Config",
    "MosaicConfig",
    "block_mask_from_modes",
    "block_sparse_attention",
    "block_sparse_attention_reference",
    "kept_blocks_from_mask",
    "lookup_config",
]
