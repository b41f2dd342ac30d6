"""XAttention estimate of the official eval path, in plain torch on CPU (no Triton, no CUDA).

Written from ``elasticattn/src/Xattention.py`` (``xattn_estimate`` with ``use_triton=True``:
``flat_group_gemm_fuse_reshape`` + ``softmax_fuse_block_sum_kernel_causal``; ``Xattention_prefill_dim4``
post-processing) and ``elasticattn/src/utils.py`` (``find_blocks_chunked``). Prefill only
(q_len == k_len). Plain functions so kernel tests can import them.

Numerics of the Triton path, reproduced: antidiagonal scores accumulated in fp32 and STORED in the
input dtype; softmax in fp32 with ``exp2`` and ``scale = log2(e) / sqrt(D) / stride / norm``;
block sums in fp32 stored in the input dtype; selection in float64 on those stored values.

Selection semantics. ``semantics="official"`` reproduces ``find_blocks_chunked`` exactly, including
what its mask construction does in the FIRST query chunk (``current_index == 0``): assigning the
identity to columns ``[0, chunk)`` overwrites the forced sink column, so there only the diagonal
block is forced and counted; the heaviest other block is then kept unconditionally and each next
block is kept while (diagonal + the kept blocks before the previous one) < threshold x total, i.e.
the greedy loop lags one block behind and usually keeps one block more than spec 5.4. The sink
column ends up kept anyway, because entries that fail the threshold are redirected to column 0.
Rows of later chunks follow spec 5.4 (sink and diagonal forced and counted, then greedy). As the
chunk is ``max(2048, next_pow2(L))`` tokens up to L = 16K, every row of a prompt <= 16K tokens is a
first-chunk row, and the official mask depends on the chunk size. ``semantics="spec"`` applies the
spec 5.4 rule to every row (chunk-invariant). Checked on CPU against the official function on
random inputs: identical masks after the causal step.

Ties in the descending sorts are broken by the lower block index (stable sorts); the official
``torch.sort`` leaves tie order unspecified.
"""

from __future__ import annotations

import math

import torch

LOG2E = 1.4426950408889634
# Triton kernel's masked value (added after scaling).
_MASKED = -1.0e6
SEMANTICS = ("official", "spec")


def official_chunk_size(k_len: int) -> int:
    """``Xattention_prefill_dim4``'s chunk rule (computed from the first sequence officially)."""
    p = 1 << (k_len - 1).bit_length()
    return int(max(min(max(2048, p), 128 * 1024 * 2048 // p), 2048))


def antidiagonal_scores(q: torch.Tensor, k: torch.Tensor, stride: int) -> torch.Tensor:
    """Strided antidiagonal scores (``flat_group_gemm_fuse_reshape``, select_mode "inverse").

    q: [H, Lq, D], k: [H, Lk, D] (lengths multiples of ``stride``).
    Returns [H, Lq/stride, Lk/stride] in q.dtype:
    ``score[a, b] = sum_s dot(q[a*S + S-1-s], k[b*S + s])`` accumulated in fp32, rounded once.
    """
    s = stride
    qr = torch.cat([q[:, s - 1 - i :: s, :] for i in range(s)], dim=-1).float()
    kr = torch.cat([k[:, i::s, :] for i in range(s)], dim=-1).float()
    return torch.matmul(qr, kr.transpose(-1, -2)).to(q.dtype)


def softmax_block_sums(
    scores: torch.Tensor,
    *,
    head_dim: int,
    stride: int,
    norm: float,
    block_size: int,
    row_offset: int,
    real_rows: int,
) -> torch.Tensor:
    """``softmax_fuse_block_sum_kernel_causal`` for one query chunk.

    scores: [H, R, C] rows = reshaped query rows ``row_offset .. row_offset+R-1``, columns = all
      reshaped key rows (C multiple of the reshaped block). Row a sees columns b <= a.
    real_rows: rows ``>= real_rows`` (padding) contribute zero.
    Returns [H, R/rb, C/rb] block sums in scores.dtype (rb = block_size // stride).
    """
    h, r, c = scores.shape
    rb = block_size // stride
    scale = torch.tensor(LOG2E / math.sqrt(head_dim) / stride / norm, dtype=torch.float32)
    x = scores.float() * scale
    rows = torch.arange(r).unsqueeze(1) + row_offset
    cols = torch.arange(c).unsqueeze(0)
    x = torch.where(rows >= cols, x, torch.full_like(x, _MASKED))
    m = x.amax(dim=-1, keepdim=True)
    e = torch.exp2(x - m)
    p = e * (1.0 / e.sum(dim=-1, keepdim=True))
    p = torch.where(rows < real_rows, p, torch.zeros_like(p))
    # Columns of blocks past the row block's diagonal are never read by the kernel (zero output).
    p = torch.where((cols // rb) <= (rows // rb), p, torch.zeros_like(p))
    sums = p.view(h, r // rb, rb, c // rb, rb).sum(dim=-1).sum(dim=-2)
    return sums.to(scores.dtype)


def find_blocks_chunked(
    input_tensor: torch.Tensor,
    current_index: int,
    threshold: float,
    *,
    decoding: bool = False,
    causal: bool = True,
    force_sink_all_rows: bool = False,
) -> torch.Tensor:
    """Threshold block selection of one query chunk (``find_blocks_chunked``, threshold mode).

    input_tensor: [B, H, C, N] block sums (row r is query block ``current_index + r``).
    force_sink_all_rows: False = official (see module docstring); True = spec 5.4 rule.
    Returns bool [B, H, C, N].
    """
    b, h, c, n = input_tensor.shape
    if decoding:  # mode="prefill" with decoding=True
        return torch.ones_like(input_tensor, dtype=torch.bool)
    x = input_tensor.to(torch.float64)
    required = x.sum(dim=-1, keepdim=True) * threshold
    eye = torch.eye(c, dtype=torch.bool).expand(b, h, c, c)
    if causal:
        mask = torch.zeros_like(x, dtype=torch.bool)
        mask[..., 0] = True
        if force_sink_all_rows:
            mask[..., current_index : current_index + c] |= eye
        else:
            mask[..., current_index : current_index + c] = eye  # overwrites column 0 when ci == 0
        other = x.masked_fill(mask, 0)
        sorted_other = torch.sort(other, dim=-1, descending=True, stable=True).values
        forced_sum = torch.where(mask, x, torch.zeros_like(x)).sum(dim=-1, keepdim=True)
        zeros = torch.zeros_like(forced_sum)
        sorted_values = torch.cat([zeros, forced_sum, sorted_other[..., :-2]], dim=-1)
        order = torch.where(mask, 100000 * (1 + x), x)
        index = torch.sort(order, dim=-1, descending=True, stable=True).indices
        cum_without_self = torch.cat([zeros, sorted_values[..., :-1]], dim=-1).cumsum(dim=-1)
    else:
        mask = torch.zeros_like(x, dtype=torch.bool)
        sorted_values, index = torch.sort(x, dim=-1, descending=True, stable=True)
        zeros = torch.zeros_like(required)
        cum_without_self = torch.cat([zeros, sorted_values[..., :-1]], dim=-1).cumsum(dim=-1)
    # Entries that fail the threshold are redirected to column 0 (so column 0 always ends up kept).
    index = torch.where(cum_without_self < required, index, torch.zeros_like(index))
    mask = mask.scatter(-1, index, True)
    if causal:
        mask[..., current_index + c :] = False
    return mask


def xattn_estimate(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    block_size: int = 128,
    stride: int = 16,
    threshold: float = 0.8,
    norm: float = 1.0,
    chunk_size: int | None = None,
    semantics: str = "official",
) -> tuple[torch.Tensor, torch.Tensor]:
    """XAttention block mask of one sequence in prefill (what ``Xattention_prefill_dim4`` uses).

    q, k: [H, L, D] post-q_norm/k_norm, post-RoPE; k already repeated to the H query heads.
    chunk_size: query chunk in tokens (default: ``official_chunk_size(L)``); only matters for
      ``semantics="official"`` (first-chunk rows, module docstring).
    Returns:
      attn_sum: [H, nB, nB] block sums (q.dtype), nB = ceil(L / block_size), future blocks 0.
      mask: bool [H, nB, nB], causal, rows/cols of blocks past the sequence False.
    """
    if semantics not in SEMANTICS:
        raise ValueError(f"semantics={semantics!r}; allowed: {SEMANTICS}")
    if q.shape != k.shape or q.ndim != 3:
        raise ValueError(f"q and k must both be [H, L, D] (prefill), got {q.shape} and {k.shape}")
    if block_size % stride:
        raise ValueError(f"stride={stride} must divide block_size={block_size}")
    h, length, d = q.shape
    chunk = official_chunk_size(length) if chunk_size is None else chunk_size
    if chunk % block_size:
        raise ValueError(f"chunk_size={chunk} must be a multiple of block_size={block_size}")
    padded = -(-length // chunk) * chunk
    qp = torch.nn.functional.pad(q, (0, 0, 0, padded - length))
    kp = torch.nn.functional.pad(k, (0, 0, 0, padded - length))
    rchunk, rb = chunk // stride, block_size // stride
    # real_q_len of the kernel: k_reshaped_seq_len - k_num_to_pad // stride = ceil(L / stride)
    real_rows = padded // stride - (padded - length) // stride
    sums, masks = [], []
    for ci in range(padded // chunk):
        scores = antidiagonal_scores(qp[:, ci * chunk : (ci + 1) * chunk], kp, stride)
        s = softmax_block_sums(
            scores,
            head_dim=d,
            stride=stride,
            norm=norm,
            block_size=block_size,
            row_offset=ci * rchunk,
            real_rows=real_rows,
        )
        sums.append(s)
        masks.append(
            find_blocks_chunked(
                s.unsqueeze(0),
                ci * (rchunk // rb),
                threshold,
                force_sink_all_rows=(semantics == "spec"),
            )[0]
        )
    attn_sum, mask = torch.cat(sums, dim=-2), torch.cat(masks, dim=-2)
    nb = mask.shape[-1]
    mask = mask & torch.ones(nb, nb, dtype=torch.bool).tril()
    valid = -(-length // block_size)
    return attn_sum[:, :valid, :valid], mask[:, :valid, :valid]
