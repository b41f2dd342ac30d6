"""Torch (CPU) re-implementation of the official Elastic Attention eval prefill, for tests.

Written from LCM-Lab/Elastic-Attention (``elasticattn/training/eval/modeling_flash_qwen.py``,
``elasticattn/src/Xattention.py``, ``elasticattn/src/utils.py``); no Triton, no CUDA, no
flash-attn / Block-Sparse-Attention. Modules:

- ``router``: ``AttentionRouter`` (official submodule names), ctx_q pooling, argmax rule.
- ``xattn``: XAttention estimate (Triton-path numerics) and ``find_blocks_chunked``.
- ``attention``: head types (mode table), streaming block mask, token masks, masked attention.
- ``layer``: ``PawQwen3AttentionPort``, one prefill attention layer.
- ``model``: ``OfficialPawQwen3``, transformers' Qwen3 backbone with the ported attention.

Differences from the official code (spec section 8): per-sequence routing in a batch (official:
sequence 0's decision for every sequence; padded batches skip the router), noise-free sigmoid
router head. Compare against official behaviour at batch 1 without padding.
"""

from .attention import (
    causal_block_mask,
    head_mask_type,
    masked_attention,
    streaming_block_mask,
    token_mask,
)
from .layer import PawQwen3AttentionPort, apply_rope
from .model import OfficialPawQwen3, load_checkpoint_tensors
from .router import AttentionRouter, ctx_q_pool_official, ctx_q_pool_per_sequence
from .xattn import find_blocks_chunked, official_chunk_size, xattn_estimate

__all__ = [
    "AttentionRouter",
    "OfficialPawQwen3",
    "PawQwen3AttentionPort",
    "apply_rope",
    "causal_block_mask",
    "ctx_q_pool_official",
    "ctx_q_pool_per_sequence",
    "find_blocks_chunked",
    "head_mask_type",
    "load_checkpoint_tensors",
    "masked_attention",
    "official_chunk_size",
    "streaming_block_mask",
    "token_mask",
    "xattn_estimate",
]
