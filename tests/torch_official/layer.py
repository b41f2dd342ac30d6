"""One PawQwen3 attention layer of the official eval model, prefill path, plain torch on CPU.

Written from ``Qwen3Attention.forward`` (no KV cache) of ``elasticattn/training/eval/
modeling_flash_qwen.py`` and ``Xattention_prefill_dim4``:

  q = q_norm(q_proj(x)), k = k_norm(k_proj(x)), v = v_proj(x)         [B, T, heads, D]
  z_kv = mask_allocator(k)              PRE-RoPE keys, per KV head      [B, K]
  head types = mode table(repeat_interleave(z_kv, G))                  [B, H]
  q, k = RoPE(q, k) (positions 0..T-1); k, v repeat-interleaved to H heads
  per sequence: XAttention estimate for all heads, then Block-Sparse-Attention with
  dense (type 0) / XAttention kept blocks (1) / streaming sink + local band (-1)
  o_proj

Submodule names are the official ones: ``model.layers.{i}.self_attn.*`` checkpoint tensors load
with ``load_state_dict`` after stripping the prefix (drop ``attn_mask_log_alphas``,
``mask_allocator.log_temp``, ``mask_allocator.task_embedding.weight``: unused at inference).

Batch note (``batch1``): the official non-varlen path builds the head types from sequence 0 only
and applies them to the whole batch (spec 8.1), and padded batches go through a varlen path that
ignores the router (8.2); it also takes the XAttention chunk size from sequence 0 (8.7), which
changes masks under ``xattn_semantics="official"`` (see ``xattn``). Here every sequence is routed
on its own tokens (``lengths``, right padding) with its own chunk size, so the official behaviour
is reproduced exactly only for batch 1 without padding; compare with the official code at batch 1.

``xattn_semantics``: "official" (default) reproduces ``find_blocks_chunked`` including its
first-chunk quirk; "spec" uses the spec 5.4 rule (what ``pallas_kernels/xattn`` implements).

Numerics: projections as cuBLAS (fp32 accumulate, one rounding), RMSNorm and RoPE as the official
code (fp32 compute, rounding points kept), attention in fp32 (Block-Sparse-Attention rounds P to
bf16 before P@V: expect bf16-level differences there when running in bf16). Elastic parameters
are read from config.json with the official defaults; stride / threshold / norm default to the
official hard-coded 16 / 0.8 / 1. Block granularity is ``block_size`` (official: 128 only).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from .attention import (
    causal_block_mask,
    head_mask_type,
    masked_attention,
    streaming_block_mask,
    token_mask,
)
from .router import AttentionRouter, linear_gpu
from .xattn import xattn_estimate

TRAINING_ONLY_SUFFIXES = (
    "attn_mask_log_alphas",
    "mask_allocator.log_temp",
    "mask_allocator.task_embedding.weight",
)


class Qwen3RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        # official: weight * normed.to(input dtype), one rounding of the product
        return (self.weight.float() * h.to(dtype).float()).to(dtype)


def rope_inv_freq(hf: dict[str, Any]) -> tuple[torch.Tensor, float]:
    """inv_freq [D/2] fp32 and attention_scaling, through transformers (default and yarn)."""
    from transformers import Qwen3Config
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding

    keys = (
        "hidden_size",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "rope_theta",
        "rope_scaling",
        "rope_parameters",
        "max_position_embeddings",
    )
    rot = Qwen3RotaryEmbedding(Qwen3Config(**{k: hf[k] for k in keys if k in hf}))
    return rot.inv_freq.float(), float(rot.attention_scaling)


def apply_rope(x: torch.Tensor, inv_freq: torch.Tensor, scaling: float) -> torch.Tensor:
    """Non-interleaved RoPE at positions 0..T-1 (flash_attn rotary: tables rounded to x.dtype,
    rotation computed in fp32, one rounding). x: [B, T, heads, D]."""
    t = x.shape[1]
    freqs = torch.outer(torch.arange(t, dtype=torch.float32), inv_freq)
    cos = (torch.cos(freqs) * scaling).to(x.dtype).float()[None, :, None, :]
    sin = (torch.sin(freqs) * scaling).to(x.dtype).float()[None, :, None, :]
    cos, sin = torch.cat([cos, cos], -1), torch.cat([sin, sin], -1)
    xf = x.float()
    half = x.shape[-1] // 2
    rot = torch.cat([-xf[..., half:], xf[..., :half]], dim=-1)
    return (xf * cos + rot * sin).to(x.dtype)


class PawQwen3AttentionPort(nn.Module):
    """Official PawQwen3 prefill attention of one layer (see module docstring)."""

    def __init__(
        self,
        hf: dict[str, Any],
        *,
        inv_freq: torch.Tensor | None = None,
        attention_scaling: float | None = None,
        xattn_semantics: str = "official",
    ):
        super().__init__()
        e, h = hf["hidden_size"], hf["num_attention_heads"]
        kv = hf.get("num_key_value_heads") or h
        d = hf.get("head_dim") or e // h
        eps = hf["rms_norm_eps"]
        self.num_heads, self.num_kv, self.head_dim = h, kv, d
        self.q_proj = nn.Linear(e, h * d, bias=False)
        self.k_proj = nn.Linear(e, kv * d, bias=False)
        self.v_proj = nn.Linear(e, kv * d, bias=False)
        self.o_proj = nn.Linear(h * d, e, bias=False)
        self.q_norm = Qwen3RMSNorm(d, eps)
        self.k_norm = Qwen3RMSNorm(d, eps)
        self.mask_allocator = AttentionRouter(
            kv,
            d,
            use_softmax=bool(hf.get("use_softmax", False)),
            mask_temp=float(hf.get("mask_temp", 1.0)),
        )
        self.toggle_type = hf.get("toggle_type", "streaming")
        self.retrieval_mode = hf.get("retrieval_mode", "full")
        self.block_size = int(hf.get("block_size", 128))
        self.sink_blocks = -(-int(hf.get("sink_size", 128)) // self.block_size)
        self.local_blocks = -(-int(hf.get("local_window_size", 1024)) // self.block_size)
        self.stride = int(hf.get("xattn_stride", 16))
        self.threshold = float(hf.get("xattn_threshold", 0.8))
        self.norm = float(hf.get("xattn_norm", 1))
        self.xattn_semantics = xattn_semantics
        if inv_freq is None:
            inv_freq, attention_scaling = rope_inv_freq(hf)
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)
        self.attention_scaling = float(attention_scaling)

    def load_checkpoint_layer(self, tensors: dict[str, torch.Tensor], layer: int) -> None:
        """Load ``model.layers.{layer}.self_attn.*`` from a name -> tensor dict (strict, training-only
        tensors dropped)."""
        prefix = f"model.layers.{layer}.self_attn."
        state = {
            name[len(prefix) :]: t
            for name, t in tensors.items()
            if name.startswith(prefix) and not name.endswith(TRAINING_ONLY_SUFFIXES)
        }
        self.load_state_dict(state, strict=True)

    @torch.no_grad()
    def forward(
        self,
        hidden_states: torch.Tensor,
        lengths: torch.Tensor | None = None,
        force_modes: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """hidden_states: [B, T, E] (after input_layernorm); lengths: [B] (right padding) or None;
        force_modes: int [B, H] or [H] head types overriding the router.

        Returns (output [B, T, E] (zeros past each length before o_proj), info) with info keys
        z_kv [B, K], logits [B, K, C], head_modes [B, H], block_masks / xattn_masks / attn_sums:
        per sequence [H, nB, nB] (xattn entries None when no head uses XAttention).
        """
        b, t, _ = hidden_states.shape
        h, kv, d = self.num_heads, self.num_kv, self.head_dim
        g = h // kv
        dtype = self.q_proj.weight.dtype
        x = hidden_states.to(dtype)
        q = self.q_norm(linear_gpu(x, self.q_proj).view(b, t, h, d))
        k = self.k_norm(linear_gpu(x, self.k_proj).view(b, t, kv, d))
        v = linear_gpu(x, self.v_proj).view(b, t, kv, d)
        lengths = torch.full((b,), t) if lengths is None else lengths.long()

        z_kv, logits = self.mask_allocator(k, lengths)  # pre-RoPE keys
        modes = head_mask_type(
            z_kv.repeat_interleave(g, dim=1), self.retrieval_mode, self.toggle_type
        )
        if force_modes is not None:
            modes = force_modes.int().expand(b, h).clone()

        q = apply_rope(q, self.inv_freq, self.attention_scaling)
        k = apply_rope(k, self.inv_freq, self.attention_scaling)
        k = k.repeat_interleave(g, dim=2)
        v = v.repeat_interleave(g, dim=2)

        out = torch.zeros(b, t, h, d, dtype=dtype)
        block_masks, xattn_masks, attn_sums = [], [], []
        bs = self.block_size
        for i, n in enumerate(lengths.tolist()):
            qi, ki, vi = (a[i, :n].transpose(0, 1) for a in (q, k, v))  # [H, L, D]
            nb = -(-n // bs)
            per_head = [causal_block_mask(nb)] * h
            xmask = xsum = None
            if bool((modes[i] == 1).any()):
                xsum, xmask = xattn_estimate(
                    qi,
                    ki,
                    block_size=bs,
                    stride=self.stride,
                    threshold=self.threshold,
                    norm=self.norm,
                    semantics=self.xattn_semantics,
                )
            stream = streaming_block_mask(nb, self.sink_blocks, self.local_blocks)
            for head in range(h):
                mode = int(modes[i, head])
                if mode == 1:
                    per_head[head] = xmask[head]
                elif mode == -1:
                    per_head[head] = stream
                elif mode != 0:
                    raise ValueError(f"head mode {mode} of sequence {i}, head {head}")
            bm = torch.stack(per_head)
            o = masked_attention(qi, ki, vi, token_mask(bm, n, bs), 1.0 / math.sqrt(d))
            out[i, :n] = o.transpose(0, 1)
            block_masks.append(bm)
            xattn_masks.append(xmask)
            attn_sums.append(xsum)
        o = linear_gpu(out.reshape(b, t, h * d), self.o_proj)
        info = dict(
            z_kv=z_kv,
            logits=logits,
            head_modes=modes,
            block_masks=block_masks,
            xattn_masks=xattn_masks,
            attn_sums=attn_sums,
        )
        return o, info
