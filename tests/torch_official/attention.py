"""Head mask types, streaming block masks and masked attention (what Block-Sparse-Attention
computes for the official eval prefill), plain torch on CPU.

Head types (``head_mask_type`` of Block-Sparse-Attention): 0 dense causal, 1 XAttention kept
blocks, -1 streaming. Within a kept block every key is visible except in the diagonal block, which
is token-causal; keys past the sequence are never visible. So per head the token mask is
``block_mask[i // bs, j // bs] & (j <= i)``, and one fp32 masked softmax attention gives the output.
"""

from __future__ import annotations

import math

import torch

# The five (retrieval_mode, toggle_type) pairs of the official forward.
SUPPORTED_PAIRS = (
    ("full", "xattn"),
    ("full", "streaming"),
    ("xattn", "streaming"),
    ("xattn", "xattn"),
    ("full", "full"),
)


def head_mask_type(z: torch.Tensor, retrieval_mode: str, toggle_type: str) -> torch.Tensor:
    """Per query head type from the router class, as the official forward's if/elif chain.

    z: [..., H] in {0, 1} (already repeat-interleaved to query heads). The official code applies
    ``z[0]`` (sequence 0) to the whole batch; call this per sequence instead (spec 8.1).
    """
    z = z.long()
    one, minus_one = torch.ones_like(z), -torch.ones_like(z)
    if retrieval_mode == "full" and toggle_type == "xattn":
        out = 1 - z
    elif retrieval_mode == "full" and toggle_type == "streaming":
        out = torch.where(z == 1, torch.zeros_like(z), minus_one)
    elif retrieval_mode == "xattn" and toggle_type == "streaming":
        out = torch.where(z == 1, one, minus_one)
    elif retrieval_mode == "xattn" and toggle_type == "xattn":
        out = one
    elif retrieval_mode == "full" and toggle_type == "full":
        out = 1 - one
    else:  # official: undefined SamplerConditionError
        raise ValueError(
            f"retrieval_mode: {retrieval_mode} and toggle_type: {toggle_type} is not supported"
        )
    return out.int()


def causal_block_mask(n_blocks: int) -> torch.Tensor:
    """bool [n, n] lower triangle (dense heads)."""
    return torch.ones(n_blocks, n_blocks, dtype=torch.bool).tril()


def streaming_block_mask(n_blocks: int, sink_blocks: int, local_blocks: int) -> torch.Tensor:
    """bool [n, n]: row i keeps ``j < sink_blocks`` or ``i - local_blocks + 1 <= j <= i``, causal
    (Block-Sparse-Attention streaming with q_len == k_len; spec section 4)."""
    i = torch.arange(n_blocks).unsqueeze(1)
    j = torch.arange(n_blocks).unsqueeze(0)
    return ((j < sink_blocks) | (j >= i - local_blocks + 1)) & (j <= i)


def token_mask(block_mask: torch.Tensor, length: int, block_size: int) -> torch.Tensor:
    """block_mask bool [H, nB, nB] -> token mask bool [H, L, L] (token-causal)."""
    idx = torch.arange(length) // block_size
    m = block_mask[:, idx][:, :, idx]
    return m & torch.ones(length, length, dtype=torch.bool).tril()


def masked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor,
    scale: float | None = None,
) -> torch.Tensor:
    """q, k, v: [H, L, D] (k, v repeated to H heads); mask bool [H, L, L] (every row has a True).
    fp32 softmax(q k^T * scale) v, returned in q.dtype. scale defaults to 1/sqrt(D)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    s = s.masked_fill(~mask, float("-inf"))
    return torch.matmul(torch.softmax(s, dim=-1), v.float()).to(q.dtype)
