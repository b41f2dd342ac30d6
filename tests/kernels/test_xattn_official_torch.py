"""Our XAttention selection vs a torch (CPU) re-implementation of the official estimate.

The re-implementation below is written from the official code (LCM-Lab/Elastic-Attention,
elasticattn/src/Xattention.py: ``Xattention_prefill_dim4`` -> ``xattn_estimate`` with
``use_triton=True`` -> ``flat_group_gemm_fuse_reshape`` + ``softmax_fuse_block_sum`` (causal
kernel), and elasticattn/src/utils.py ``find_blocks_chunked``), following the Triton kernels'
arithmetic with torch ops: chunk-size rule and zero padding to whole chunks, bf16 GEMM output,
online base-2 softmax per segment of ``block/stride`` columns with the running sum started at
1.0 (bug 8.10, harmless), ``-1e6`` causal fill inside the diagonal segment, rows past
``real_q_len`` zeroed, bf16 block sums, float64 selection with the two sorts, the final
``triu`` cleanup and the cut to valid blocks. One deliberate choice: ``torch.sort`` is called
with ``stable=True`` (the official call leaves the order of equal values unspecified; we
define it as lower index first).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from pallas_kernels.xattn import Config, synthetic, xattn_select

LOG2E = 1.4426950408889634


def _chunk_size_rule(k_len: int) -> int:
    p2 = 1 << (k_len - 1).bit_length()
    return int(max(min(max(2048, p2), 128 * 1024 * 2048 // p2), 2048))


def _gemm_fuse_reshape(q, k, stride):
    """flat_group_gemm_fuse_reshape: out[a, c] = sum_s q[a*S + S-1-s] . k[c*S + s] -> bf16."""
    b, h, lq, d = q.shape
    lk = k.shape[2]
    qr = q.float().reshape(b, h, lq // stride, stride, d).flip(3).reshape(b, h, lq // stride, -1)
    kr = k.float().reshape(b, h, lk // stride, stride * d)
    return torch.matmul(qr, kr.transpose(2, 3)).to(torch.bfloat16)


def _softmax_fuse_block_sum_causal(scores, rb, chunk_start, real_q_len, scale):
    """softmax_fuse_block_sum_kernel_causal with segment_size == block size (rb columns)."""
    b, h, rows, cols = scores.shape
    n_blocks, n_iters = rows // rb, cols // rb
    x_all = scores.float() * scale
    out = torch.zeros(b, h, n_blocks, n_iters, dtype=torch.float32)
    for block_id in range(n_blocks):
        offs_q = torch.arange(rb) + chunk_start + block_id * rb
        n_before = (chunk_start + (block_id + 1) * rb - 1) // rb
        xb = x_all[:, :, block_id * rb : (block_id + 1) * rb]
        m_i = torch.full((b, h, rb), -math.inf)
        l_i = torch.ones(b, h, rb)
        segs = []
        for it in range(n_before + 1):
            x = xb[..., it * rb : (it + 1) * rb]
            if it == n_before:
                mask = offs_q[:, None] >= (torch.arange(rb)[None, :] + it * rb)
                x = torch.where(mask, x, torch.tensor(-1.0e6))
            segs.append(x)
            m_new = torch.maximum(m_i, x.max(-1).values)
            alpha = torch.exp2(m_i - m_new)
            l_i = l_i * alpha + torch.exp2(x - m_new[..., None]).sum(-1)
            m_i = m_new
        l_inv = 1.0 / l_i
        sum_mask = (offs_q < real_q_len)[:, None]
        for it, x in enumerate(segs):
            p = torch.exp2(x - m_i[..., None]) * l_inv[..., None]
            p = torch.where(sum_mask, p, torch.tensor(0.0))
            out[:, :, block_id, it] = p.sum((-1, -2))
    return out.to(torch.bfloat16)


def _find_blocks_chunked(input_tensor, current_index, threshold):
    """find_blocks_chunked(..., decoding=False, mode="prefill", causal=True)."""
    batch_size, head_num, chunk_num, block_num = input_tensor.shape
    input_tensor = input_tensor.to(float)
    total_sum = input_tensor.sum(dim=-1, keepdim=True)
    required_sum = total_sum * threshold
    mask = torch.zeros_like(input_tensor, dtype=torch.bool)
    mask[:, :, :, 0] = 1
    mask[:, :, :, current_index : current_index + chunk_num] = (
        torch.eye(chunk_num).unsqueeze(0).unsqueeze(0).expand(1, head_num, chunk_num, chunk_num)
    )
    other_values = input_tensor.masked_fill(mask, 0)
    sorted_values, _ = torch.sort(other_values, dim=-1, descending=True, stable=True)
    sorted_values = torch.cat(
        [
            torch.zeros((batch_size, head_num, chunk_num, 1)),
            torch.where(mask, input_tensor, 0).sum(dim=-1, keepdim=True),
            sorted_values[:, :, :, :-2],
        ],
        dim=-1,
    )
    _, index = torch.sort(
        torch.where(mask, 100000 * (1 + input_tensor), input_tensor),
        dim=-1,
        descending=True,
        stable=True,
    )
    cumulative_sum_without_self = torch.cat(
        [torch.zeros((batch_size, head_num, chunk_num, 1)), sorted_values[:, :, :, 0:-1]],
        dim=-1,
    ).cumsum(dim=-1)
    index_mask = cumulative_sum_without_self < required_sum
    index = torch.where(index_mask, index, 0)
    mask = mask.view(batch_size, head_num * chunk_num, block_num)
    index = index.view(batch_size, head_num * chunk_num, block_num)
    mask[:, torch.arange(mask.shape[1]).unsqueeze(dim=-1), index] = True
    mask = mask.view(batch_size, head_num, chunk_num, block_num)
    mask[:, :, :, current_index + chunk_num :] = False
    return mask


def _xattn_estimate(q, k, block_size, stride, norm, threshold, chunk_size):
    """xattn_estimate(use_triton=True, causal=True, select_mode="inverse", kdb=1)."""
    b, h, k_len, d = k.shape
    q_len = q.shape[2]
    k_pad = ((k_len + chunk_size - 1) // chunk_size) * chunk_size - k_len
    q_pad = ((q_len + chunk_size - 1) // chunk_size) * chunk_size - q_len
    k_block_num = (k_len + k_pad) // block_size
    q_block_num = (q_len + q_pad) // block_size
    q_chunk_num = (q_len + q_pad) // chunk_size
    pk = torch.nn.functional.pad(k, (0, 0, 0, k_pad))
    pq = torch.nn.functional.pad(q, (0, 0, 0, q_pad))
    rchunk, rb = chunk_size // stride, block_size // stride
    real_q_len = (k_len + k_pad) // stride - k_pad // stride
    scale = LOG2E / math.sqrt(d) / stride / norm
    masks = []
    for ci in range(q_chunk_num):
        chunk_start = (k_block_num - q_block_num) * rb + ci * rchunk
        scores = _gemm_fuse_reshape(pq[:, :, ci * chunk_size : (ci + 1) * chunk_size], pk, stride)
        attn_sum = _softmax_fuse_block_sum_causal(scores, rb, chunk_start, real_q_len, scale)
        masks.append(
            _find_blocks_chunked(
                attn_sum, k_block_num - q_block_num + ci * (rchunk // rb), threshold
            )
        )
    simple = torch.cat(masks, dim=-2)
    n = min(q_block_num, simple.shape[-1])
    simple[:, :, -n:, -n:] &= ~torch.triu(torch.ones(n, n, dtype=torch.bool), diagonal=1)
    return simple


def official_masks(q, k, lengths, *, stride, block_size, threshold, norm=1.0):
    """Xattention_prefill_dim4's estimate loop: q [B, T, H, D], k [B, T, K, D] (numpy f32
    holding bf16 values), per-sequence lengths -> bool [B, H, nb, nb]."""
    b, t, h, _ = q.shape
    g = h // k.shape[2]
    nb = -(-t // block_size)
    out = np.zeros((b, h, nb, nb), bool)
    chunk_size = None
    for i in range(b):
        n = int(lengths[i])
        qi = torch.from_numpy(q[i : i + 1, :n]).to(torch.bfloat16).transpose(1, 2)
        ki = torch.from_numpy(k[i : i + 1, :n]).to(torch.bfloat16).transpose(1, 2)
        ki = ki.repeat_interleave(g, dim=1)
        if chunk_size is None:  # computed from the first sequence and reused (bug 8.7)
            chunk_size = _chunk_size_rule(n)
        m = _xattn_estimate(qi, ki, block_size, stride, norm, threshold, chunk_size)
        valid = -(-n // block_size)
        out[i, :, :valid, :valid] = m[0, :, :valid, :valid].numpy()
    return out


CASES = [
    # (stride, block, threshold, lengths)
    (8, 64, 0.9, (600, 389)),
    (16, 128, 0.9, (600, 257)),
    (16, 64, 0.95, (520, 600)),
]


@pytest.mark.parametrize("stride,block,threshold,lengths", CASES)
def test_random_inputs_match_official(stride, block, threshold, lengths):
    t, h, kh, d = max(lengths), 4, 2, 32
    q, k = synthetic.random_qk(jax.random.key(stride + block), len(lengths), t, h, kh, d)
    kv = jnp.asarray(lengths, jnp.int32)
    want = official_masks(
        np.asarray(q, np.float32),
        np.asarray(k, np.float32),
        lengths,
        stride=stride,
        block_size=block,
        threshold=threshold,
    )
    for impl, cfg in (
        ("reference", None),
        ("pallas_triton", Config(block_m=16, block_n=16, block_k=16)),
    ):
        got = xattn_select(
            q,
            k,
            kv_lengths=kv,
            stride=stride,
            block_size=block,
            threshold=threshold,
            return_mask=True,
            implementation=impl,
            interpret=True,
            config=cfg,
            sink_rule="official",
        )
        np.testing.assert_array_equal(np.asarray(got.mask), want, err_msg=impl)


def test_structured_input_matches_official():
    t, h, kh, d, stride, block, threshold = 1024, 2, 1, 64, 16, 64, 0.9
    q, k = synthetic.structured_qk(jax.random.key(3), 1, t, h, kh, d)
    kv = jnp.asarray([t], jnp.int32)
    want = official_masks(
        np.asarray(q, np.float32),
        np.asarray(k, np.float32),
        [t],
        stride=stride,
        block_size=block,
        threshold=threshold,
    )
    got = xattn_select(
        q,
        k,
        kv_lengths=kv,
        stride=stride,
        block_size=block,
        threshold=threshold,
        return_mask=True,
        implementation="pallas_triton",
        interpret=True,
        config=Config(block_m=32, block_n=32, block_k=32),
        sink_rule="official",
    )
    np.testing.assert_array_equal(np.asarray(got.mask), want)
    density = synthetic.causal_density(got.mask, kv, block)
    assert density < 0.6, density  # the structured input must actually be sparse
