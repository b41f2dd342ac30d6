"""Tiny random PawQwen3 / PawLlama HF checkpoints: a tiny Qwen3 or Llama checkpoint plus the
official router tensors.

``make_tiny_pawqwen3`` builds the backbone with ``elastic_jax.testing.tiny.make_tiny_qwen3`` and then
adds, for every layer, the router ("mask allocator") tensors under their official names and
shapes (spec 1.3), optionally the training-only tensors a trained checkpoint carries, and the
elastic fields in config.json with ``architectures: ["PawQwen3ForCausalLM"]``.
``make_tiny_pawllama`` does the same on a tiny Llama backbone (``PawLlamaForCausalLM``, the
layout assumed in docs/spec_notes.md: same router names and shapes, router over k_proj output
before RoPE). Needs torch and transformers (the ``dev`` extra).

Mixed decisions. With plain random weights a router tends to pick one class for every head: the
pooled keys of random tokens are small and alike, so the output is dominated by the biases. With
``mixed_router=True`` (default) the router is calibrated on the checkpoint's own pre-RoPE keys for
random prompts: the first layer is scaled and centred on the pooled keys' statistics, and the last
bias is shifted so that, per layer, the median logit margin over the calibration prompts is zero.
Typical prompts then give class 0 for some heads and class 1 for others (which heads depends on
the prompt; with 2 layers x 2 KV heads all four decisions agree for roughly 1 prompt in 8).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

from elastic_jax.elastic_config import POOL_TOKENS
from elastic_jax.router import router_tensor_names
from elastic_jax.testing.tiny import make_tiny_llama, make_tiny_qwen3

# backbone family -> (backbone builder, elastic architecture name, config.json model_type)
_FAMILIES = {
    "qwen3": (make_tiny_qwen3, "PawQwen3ForCausalLM", "qwen3"),
    "llama": (make_tiny_llama, "PawLlamaForCausalLM", "llama"),
}

# Elastic config.json fields of the tiny checkpoints: every field the official PawQwen3Config
# writes (training-only ones included, so loaders see what a real checkpoint has), with a short
# local window so streaming differs from dense at a few hundred tokens, and retrieval "xattn" +
# toggle "streaming" so the two router classes pick two different sparse modes.
DEFAULT_TINY_ELASTIC: dict[str, Any] = {
    "sink_size": 128,
    "local_window_size": 256,
    "toggle_type": "streaming",
    "retrieval_mode": "xattn",
    "pooling_mode": "ctx_q",
    "use_softmax": True,
    "enable_ada_sparsity": True,
    "block_size": 128,
    "xattn_stride": 16,
    "xattn_threshold": 0.8,
    "xattn_norm": 1,
    "mask_temp": 1.0,
    "use_task_emb_for_mask": False,
    # training-only
    "disable_linear_regularization_term": False,
    "suggested_sparsity": None,
    "triangle_n_last": 128,
    "enable_layerwise_sparsity": False,
    "layerwise_sparsity_schedule": "high-low-high",
    "layerwise_sparsity_min_ratio": 0.5,
    "layerwise_sparsity_max_ratio": 1.0,
    "layerwise_sparsity_power": 1.0,
    "layerwise_sparsity_weight": 1.0,
    "erank_analysis_path": None,
    "topk_k": 2048,
    "pooling_seq": True,
    "enable_lambda_task": True,
    "enable_contrastive_loss": False,
}

# Calibration prompts: (batch, length). Lengths on both sides of the 200-token head/tail split.
_CALIB_SHAPES = ((8, 320), (8, 64))


def make_tiny_pawqwen3(
    out_dir: str | Path,
    *,
    seed: int = 0,
    router_seed: int | None = None,
    elastic: dict[str, Any] | None = None,
    training_only_tensors: bool = True,
    mixed_router: bool = True,
    family: str = "qwen3",
    backbone: str | Path | None = None,
    calibration_device: str = "cpu",
    **qwen3_overrides: Any,
) -> Path:
    """Write a tiny random PawQwen3ForCausalLM (or, with ``family="llama"``,
    PawLlamaForCausalLM) checkpoint to ``out_dir``.

    Args:
      out_dir: directory to create (must not exist or be empty).
      seed: torch seed of the Qwen3 backbone (same backbone as ``make_tiny_qwen3(seed=seed)``).
      router_seed: seed of the router weights and calibration prompts (default ``seed + 1``).
      elastic: config.json fields overriding ``DEFAULT_TINY_ELASTIC``; a value of None removes the
        key (to test the official defaults of absent keys).
      training_only_tensors: also write ``mask_allocator.log_temp`` (scalar),
        ``self_attn.attn_mask_log_alphas`` [K] and ``mask_allocator.task_embedding.weight`` [4, D].
      mixed_router: calibrate the router so that both classes occur (module docstring).
      family: backbone, "qwen3" or "llama" (``make_tiny_pawllama``).
      backbone: an existing checkpoint directory of that family (from ``make_tiny_qwen3`` /
        ``make_tiny_llama``) to copy instead of building one; ``seed`` and ``qwen3_overrides``
        are then unused. Large test models build their backbone once and share it between the
        plain and elastic variants.
      calibration_device: torch device of the calibration forward passes ("cuda" for large
        models on a GPU machine).
      **qwen3_overrides: passed to the backbone builder, ``make_tiny_qwen3`` or
        ``make_tiny_llama`` (``dtype``, ``max_shard_size``, ``num_key_value_heads``,
        ``num_hidden_layers``, ``head_dim``, ``rope_scaling``, ...).
    Returns:
      The checkpoint directory.
    """
    import torch

    if family not in _FAMILIES:
        raise ValueError(f"family={family!r}; allowed: {sorted(_FAMILIES)}")
    make_backbone, architecture, model_type = _FAMILIES[family]
    if backbone is None:
        out = make_backbone(out_dir, seed=seed, **qwen3_overrides)
    else:
        if qwen3_overrides:
            raise ValueError(f"backbone= given: overrides {sorted(qwen3_overrides)} unused")
        out = Path(shutil.copytree(backbone, out_dir))
    router_seed = seed + 1 if router_seed is None else router_seed
    cfg_path = out / "config.json"
    hf = json.loads(cfg_path.read_text())
    fields = dict(DEFAULT_TINY_ELASTIC)
    for key, value in (elastic or {}).items():
        if value is None:
            fields.pop(key, None)
        else:
            fields[key] = value
    use_softmax = bool(fields.get("use_softmax", False))
    num_layers = hf["num_hidden_layers"]
    num_kv = hf.get("num_key_value_heads") or hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]

    gen = torch.Generator().manual_seed(router_seed)
    pooled = _calibration_pooled_keys(out, gen, calibration_device) if mixed_router else None
    new: dict[str, torch.Tensor] = {}
    for layer in range(num_layers):
        weights = _router_weights(
            head_dim, use_softmax, gen, None if pooled is None else pooled[layer]
        )
        names = router_tensor_names(layer, use_softmax, head_dim=head_dim)
        for name, tensor in zip(names, weights):
            assert tuple(tensor.shape) == names[name], (name, tensor.shape)
            new[name] = tensor
        if training_only_tensors:
            prefix = f"model.layers.{layer}.self_attn."
            new[prefix + "mask_allocator.log_temp"] = torch.log(
                torch.tensor(float(fields.get("mask_temp", 1.0)))
            )
            new[prefix + "attn_mask_log_alphas"] = 4.5 + 0.01 * torch.randn(num_kv, generator=gen)
            new[prefix + "mask_allocator.task_embedding.weight"] = torch.randn(
                4, head_dim, generator=gen
            )
    _add_tensors(out, new)

    hf["architectures"] = [architecture]
    # PawQwen3Config subclasses Qwen3Config without its own model_type (assumed alike for Llama).
    hf["model_type"] = model_type
    for key in DEFAULT_TINY_ELASTIC:
        hf.pop(key, None)
    hf.update(fields)
    cfg_path.write_text(json.dumps(hf, indent=2))
    return out


def make_tiny_pawllama(out_dir: str | Path, **kwargs: Any) -> Path:
    """``make_tiny_pawqwen3(out_dir, family="llama", **kwargs)``: a tiny PawLlamaForCausalLM."""
    return make_tiny_pawqwen3(out_dir, family="llama", **kwargs)


def read_checkpoint_tensors(ckpt_dir: str | Path) -> dict:
    """All tensors of a (possibly sharded) safetensors checkpoint as numpy arrays (bf16 kept as
    ml_dtypes.bfloat16)."""
    from safetensors import safe_open

    out = {}
    for path in _shard_files(Path(ckpt_dir)):
        with safe_open(str(path), "np") as f:
            for name in f.keys():
                out[name] = f.get_tensor(name)
    return out


# --------------------------------------------------------------------------------- internals


def _shard_files(ckpt: Path) -> list[Path]:
    index = ckpt / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [ckpt / f for f in sorted(set(weight_map.values()))]
    return [ckpt / "model.safetensors"]


def _add_tensors(ckpt: Path, new: dict) -> None:
    """Add tensors to the checkpoint in its own dtype; sharded: into the shard holding the same
    layer's q_proj, and rewrite the index (weight_map and total_size)."""
    from safetensors.torch import load_file, save_file

    index_path = ckpt / "model.safetensors.index.json"
    index = json.loads(index_path.read_text()) if index_path.exists() else None
    shards = {p.name: load_file(str(p)) for p in _shard_files(ckpt)}
    dtype = next(iter(next(iter(shards.values())).values())).dtype
    added_bytes = added_params = 0
    for name, tensor in new.items():
        tensor = tensor.to(dtype).contiguous()
        added_bytes += tensor.numel() * tensor.element_size()
        added_params += tensor.numel()
        if index is None:
            shard = "model.safetensors"
        else:
            layer_prefix = name.split(".self_attn.")[0]
            shard = index["weight_map"][f"{layer_prefix}.self_attn.q_proj.weight"]
            index["weight_map"][name] = shard
        shards[shard][name] = tensor
    for shard, tensors in shards.items():
        save_file(tensors, str(ckpt / shard), metadata={"format": "pt"})
    if index is not None:
        meta = index.setdefault("metadata", {})
        if "total_size" in meta:
            meta["total_size"] = int(meta["total_size"]) + added_bytes
        if "total_parameters" in meta:
            meta["total_parameters"] = int(meta["total_parameters"]) + added_params
        index["weight_map"] = dict(sorted(index["weight_map"].items()))
        index_path.write_text(json.dumps(index, indent=2))


def _calibration_pooled_keys(ckpt: Path, gen, device: str = "cpu") -> list:
    """Per layer: ctx_q-pooled pre-RoPE keys [N, D] (fp32, on the CPU) of random prompts run
    through the backbone with transformers (hooks on every layer's k_norm (Qwen3) or k_proj
    (Llama): the keys the router pools, reshaped to [B, T, K, D]). Only the decoder runs: the LM
    head's logits are not needed."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32).eval().to(device)
    layers = model.model.layers
    head_dim = model.config.head_dim
    captured: list[list] = [[] for _ in layers]

    def hook(idx):
        def fn(_m, _i, out):
            captured[idx].append(out.detach().reshape(*out.shape[:2], -1, head_dim).cpu())

        return fn

    hooks = [
        getattr(layer.self_attn, "k_norm", layer.self_attn.k_proj).register_forward_hook(hook(i))
        for i, layer in enumerate(layers)
    ]
    try:
        with torch.no_grad():
            for batch, length in _CALIB_SHAPES:
                ids = torch.randint(0, model.config.vocab_size, (batch, length), generator=gen)
                model.model(input_ids=ids.to(device))
    finally:
        for h in hooks:
            h.remove()
        del model
        if device != "cpu":
            torch.cuda.empty_cache()  # give the memory back (JAX shares the GPU)
    pooled = []
    for keys in captured:
        per_layer = []
        for k in keys:  # [B, T, K, D]
            n = min(POOL_TOKENS, k.shape[1])
            p = torch.cat([k[:, :n], k[:, -n:]], dim=1).mean(dim=1)  # [B, K, D]
            per_layer.append(p.reshape(-1, p.shape[-1]))
        pooled.append(torch.cat(per_layer, dim=0))
    return pooled


def _router_weights(d: int, use_softmax: bool, gen, pooled) -> list:
    """The 10 router tensors in ``router_tensor_names`` order (fp32, torch [out, in])."""
    import torch

    def randn(*shape):
        return torch.randn(*shape, generator=gen)

    c = 2 if use_softmax else 1
    fw0, fb0 = randn(4 * d, d) / math.sqrt(d), 0.1 * randn(4 * d)
    fw2, fb2 = 2 * randn(d, 4 * d) / math.sqrt(4 * d), 0.1 * randn(d)
    hw0, hb0 = 2 * randn(4 * d, d) / math.sqrt(d), 0.1 * randn(4 * d)
    hw2, hb2 = 2 * randn(d, 4 * d) / math.sqrt(4 * d), 0.1 * randn(d)
    hw4, hb4 = 2 * randn(c, d) / math.sqrt(d), torch.zeros(c)
    if pooled is not None:
        # Centre and whiten the first layer on the pooled keys so its pre-activations are ~N(0, 1)
        # across prompts and heads (pooled keys are small: means of ~200 unit-RMS vectors).
        mu, sd = pooled.mean(0), pooled.std().clamp_min(1e-6)
        fw0 = fw0 / sd
        fb0 = fb0 - fw0 @ mu
        if use_softmax:
            # Margin l1 - l0 on the calibration set; scale to spread ~2, centre on its median.
            h = _router_hidden(pooled, fw0, fb0, fw2, fb2, hw0, hb0, hw2, hb2)
            margin = h @ (hw4[1] - hw4[0])
            scale = 2.0 / margin.std().clamp_min(1e-6)
            hw4 = hw4 * scale
            hb4 = torch.tensor([0.0, -float((margin * scale).median())])
        # sigmoid head: the LayerNorm across KV heads already centres each layer's logits.
    return [fw0, fb0, fw2, fb2, hw0, hb0, hw2, hb2, hw4, hb4]


def _router_hidden(x, fw0, fb0, fw2, fb2, hw0, hb0, hw2, hb2):
    import torch.nn.functional as F

    f = F.linear(F.silu(F.linear(x, fw0, fb0)), fw2, fb2)
    return F.silu(F.linear(F.silu(F.linear(f, hw0, hb0)), hw2, hb2))
