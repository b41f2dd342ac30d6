"""Whole-model torch reference of PawQwen3 prefill: the transformers Qwen3 backbone with every
layer's attention replaced by ``PawQwen3AttentionPort`` (the official eval prefill attention).

Only prefill logits (no cache). Sequences are right-padded with ``lengths``; every part of the
backbone other than attention is per token, so tokens past a sequence's length never affect it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .layer import PawQwen3AttentionPort


def load_checkpoint_tensors(ckpt_dir: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a (possibly sharded) safetensors checkpoint, as torch tensors."""
    from safetensors.torch import load_file

    ckpt = Path(ckpt_dir)
    index = ckpt / "model.safetensors.index.json"
    files = (
        sorted(set(json.loads(index.read_text())["weight_map"].values()))
        if index.exists()
        else ["model.safetensors"]
    )
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        tensors.update(load_file(str(ckpt / f)))
    return tensors


class _AttentionAdapter(nn.Module):
    """Stands in for transformers' Qwen3Attention inside a decoder layer."""

    def __init__(self, port: PawQwen3AttentionPort):
        super().__init__()
        self.port = port
        self.lengths: torch.Tensor | None = None
        self.force_modes: torch.Tensor | None = None
        self.info: dict[str, Any] | None = None

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any):
        out, self.info = self.port(hidden_states, self.lengths, self.force_modes)
        return out, None


class OfficialPawQwen3:
    """``OfficialPawQwen3(ckpt_dir)(input_ids, lengths) -> (logits [B, T, V], per-layer infos)``."""

    def __init__(
        self,
        ckpt_dir: str | Path,
        *,
        dtype: torch.dtype = torch.float32,
        xattn_semantics: str = "official",
    ):
        from transformers import Qwen3ForCausalLM

        ckpt = Path(ckpt_dir)
        self.hf_config = json.loads((ckpt / "config.json").read_text())
        self.model = Qwen3ForCausalLM.from_pretrained(str(ckpt), dtype=dtype).eval()
        tensors = load_checkpoint_tensors(ckpt)
        rot = self.model.model.rotary_emb
        self.adapters: list[_AttentionAdapter] = []
        for i, layer in enumerate(self.model.model.layers):
            port = PawQwen3AttentionPort(
                self.hf_config,
                inv_freq=rot.inv_freq,
                attention_scaling=rot.attention_scaling,
                xattn_semantics=xattn_semantics,
            )
            port.load_checkpoint_layer(tensors, i)
            adapter = _AttentionAdapter(port.to(dtype))
            layer.self_attn = adapter
            self.adapters.append(adapter)

    @torch.no_grad()
    def __call__(
        self,
        input_ids: torch.Tensor,
        lengths: torch.Tensor | None = None,
        force_modes: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, list[dict[str, Any]]]:
        """input_ids: [B, T]; lengths: [B] (right padding) or None; force_modes: [H] or [B, H]
        applied to every layer. Logits past a sequence's length are meaningless."""
        for a in self.adapters:
            a.lengths, a.force_modes = lengths, force_modes
        logits = self.model(input_ids=input_ids).logits
        return logits, [a.info for a in self.adapters]
