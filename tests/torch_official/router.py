"""The official eval ``AttentionRouter`` (inference path), in plain torch, CPU.

Written from ``AttentionRouter`` in ``elasticattn/training/eval/modeling_flash_qwen.py``. Submodule
names are the official ones, so ``model.layers.{i}.self_attn.mask_allocator.*`` state-dict entries
load into it (strip the prefix; ``log_temp`` / ``task_embedding`` are not attributes here, as in
the eval module, so load with ``strict=False`` or drop them).

GPU numerics are emulated explicitly (CPU torch may round differently): every Linear accumulates
and adds its bias in fp32 and rounds once to the activation dtype; SiLU, softmax, sigmoid and
LayerNorm compute in fp32 and round once.

Differences from the official code (spec 8): ``lengths`` routes each sequence of a padded batch on
its own tokens with the head/tail rule (official: batch > 1 uses sequence 0's decision, padded
varlen batches pool whole-segment means and skip the router); the sigmoid head has no Gumbel
noise. For batch 1 without padding the results are the official ones.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

POOL_TOKENS = 100


def linear_gpu(x: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
    """nn.Linear as cuBLAS computes it for bf16: fp32 accumulation and bias, one rounding."""
    bias = None if layer.bias is None else layer.bias.float()
    return F.linear(x.float(), layer.weight.float(), bias).to(x.dtype)


def ctx_q_pool_official(x: torch.Tensor) -> torch.Tensor:
    """Official non-varlen pooling: ``concat(x[:, :100], x[:, -100:]).mean(1)``.

    x: [B, T, K, D] pre-RoPE keys (every row T tokens long). Returns [B, K, D] in x.dtype (fp32
    accumulation, one rounding, like torch's bf16 mean on GPU)."""
    pooled = torch.cat([x[:, :POOL_TOKENS], x[:, -POOL_TOKENS:]], dim=1).float().mean(dim=1)
    return pooled.to(x.dtype)


def ctx_q_pool_per_sequence(x: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
    """Head/tail pooling of each sequence on its own tokens ``[0, lengths[b])`` (our fix)."""
    if lengths is None:
        return ctx_q_pool_official(x)
    return torch.cat(
        [ctx_q_pool_official(x[b : b + 1, : int(n)]) for b, n in enumerate(lengths.tolist())]
    )


class AttentionRouter(nn.Module):
    """``mask_allocator`` of one layer: [B, T, K, D] pre-RoPE keys -> class per KV head."""

    def __init__(
        self,
        num_key_value_heads: int,
        d_feature: int,
        *,
        use_softmax: bool = True,
        mask_temp: float = 1.0,
    ):
        super().__init__()
        d = d_feature
        self.num_kv = num_key_value_heads
        self.use_softmax = use_softmax
        self.tau = mask_temp
        self.cls_feat_extractor = nn.Sequential(nn.Linear(d, 4 * d), nn.SiLU(), nn.Linear(4 * d, d))
        head: list[nn.Module] = [
            nn.Linear(d, 4 * d),
            nn.SiLU(),
            nn.Linear(4 * d, d),
            nn.SiLU(),
            nn.Linear(d, 2 if use_softmax else 1),
        ]
        if not use_softmax:
            head.append(nn.LayerNorm([num_key_value_heads, 1], elementwise_affine=False))
        self.cls_router_head_agnostic = nn.Sequential(*head)

    @staticmethod
    def _run(seq: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
        for module in seq:
            if isinstance(module, nn.Linear):
                x = linear_gpu(x, module)
            elif isinstance(module, nn.SiLU):
                x = F.silu(x.float()).to(x.dtype)
            elif isinstance(module, nn.LayerNorm):
                x = F.layer_norm(x.float(), module.normalized_shape, eps=module.eps).to(x.dtype)
            else:
                raise TypeError(f"unexpected router module {module}")
        return x

    @torch.no_grad()
    def logits(self, pooled: torch.Tensor) -> torch.Tensor:
        """pooled [B, K, D] -> logits [B, K, 2] (or [B, K, 1] after the LayerNorm)."""
        dtype = self.cls_feat_extractor[0].weight.dtype
        pooled = pooled.to(dtype)
        return self._run(self.cls_router_head_agnostic, self._run(self.cls_feat_extractor, pooled))

    def decide(self, logits: torch.Tensor) -> torch.Tensor:
        """int64 [B, K]: class 1 ("retrieval") or 0. Softmax head: argmax of the probabilities
        rounded to the logits dtype (first maximum on ties -> class 0). Sigmoid head (noise-free):
        ``sigmoid(logit / tau) > 0.5``."""
        if self.use_softmax:
            z_soft = F.softmax(logits.float(), dim=-1).to(logits.dtype)
            return z_soft.argmax(dim=-1)
        scaled = (logits.float() / self.tau).to(logits.dtype)
        z_soft = torch.sigmoid(scaled.float()).to(logits.dtype)
        return (z_soft > 0.5).long()[..., 0]

    @torch.no_grad()
    def forward(
        self, x: torch.Tensor, lengths: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [B, T, K, D] keys after k_norm, before RoPE; lengths: [B] or None.
        Returns (z_kv int64 [B, K], logits [B, K, C])."""
        logits = self.logits(ctx_q_pool_per_sequence(x, lengths))
        return self.decide(logits), logits
