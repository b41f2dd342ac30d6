"""PawLlama (Llama backbone + the PawQwen3 router, layout assumed in docs/spec_notes.md): converts,
routes on the pre-RoPE k_proj keys exactly as a torch router fed from transformers'
LlamaForCausalLM, mixes head modes, generates, equals plain Llama when forced dense, and refuses
checkpoints whose router layout differs, naming the tensor."""

from __future__ import annotations

import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from convert.hf_to_jax import ConversionError, convert
from elastic_jax import generate, kv_cache, load_model
from elastic_jax.elastic_config import MODE_TABLE
from elastic_jax.model import forward, prefill
from elastic_jax.testing.tiny import TINY_LLAMA3_SCALING

XATTN_STREAMING = {"retrieval_mode": "xattn", "toggle_type": "streaming"}
LLAMA = dict(family="llama", rope_scaling=TINY_LLAMA3_SCALING)


def _tokens(seed: int, *shape: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(6, 500, shape).astype(np.int32)


def _prefill_stats(model, tokens: np.ndarray):
    B, T = tokens.shape
    cache = kv_cache.create(model.config, B, T, page_size=64)
    lengths = jnp.full((B,), T, jnp.int32)
    logits, _, stats = prefill(
        model.params, cache, jnp.asarray(tokens), lengths, model.config, model.runtime
    )
    return np.asarray(logits), {k: np.asarray(v) for k, v in stats.items()}


def _torch_router_classes(hf_dir, tokens: np.ndarray) -> np.ndarray:
    """[L, K] router classes from an independent path: transformers' Llama forward, keys taken
    at each layer's k_proj output (pre-RoPE), pooled and routed by the torch router port."""
    from torch_official.model import load_checkpoint_tensors
    from torch_official.router import AttentionRouter
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    cfg = hf.config
    keys: list[torch.Tensor] = []
    hooks = [
        layer.self_attn.k_proj.register_forward_hook(
            lambda _m, _i, out: keys.append(out.reshape(*out.shape[:2], -1, cfg.head_dim))
        )
        for layer in hf.model.layers
    ]
    with torch.no_grad():
        hf(torch.tensor(tokens, dtype=torch.long))
    for h in hooks:
        h.remove()
    state = load_checkpoint_tensors(hf_dir)
    classes = []
    for layer, k in enumerate(keys):
        router = AttentionRouter(cfg.num_key_value_heads, cfg.head_dim)
        prefix = f"model.layers.{layer}.self_attn.mask_allocator."
        router.load_state_dict(
            {n[len(prefix) :]: t for n, t in state.items() if n.startswith(prefix)}, strict=False
        )
        z, _ = router(k)  # pools the first and last 100 keys itself
        classes.append(z[0].numpy())
    return np.stack(classes)


def test_pawllama_routes_like_torch_and_mixes_modes(tiny_paw_checkpoints):
    hf_dir, conv = tiny_paw_checkpoints(elastic=XATTN_STREAMING, **LLAMA)
    model = load_model(conv, prefill_impl="reference")
    assert model.config.architecture == "PawLlamaForCausalLM" and not model.config.qk_norm
    m0, m1 = MODE_TABLE[("xattn", "streaming")]
    seen = set()
    for seed in range(4):
        tokens = _tokens(seed, 1, 300 + 100 * (seed % 2))  # two lengths: two compiles
        _, stats = _prefill_stats(model, tokens)
        want = _torch_router_classes(hf_dir, tokens)
        np.testing.assert_array_equal(stats["router_class"][:, 0], want)
        G = model.config.group_size
        np.testing.assert_array_equal(
            stats["modes"][:, 0], np.repeat(np.where(want == 1, m1, m0), G, axis=-1)
        )
        seen |= set(stats["modes"].ravel().tolist())
    assert seen == {m0, m1}  # the calibrated tiny router really mixes modes


def test_pawllama_generates_and_forced_dense_equals_llama(tiny_paw_checkpoints, tiny_checkpoints):
    _, paw = tiny_paw_checkpoints(elastic=XATTN_STREAMING, **LLAMA)
    _, plain = tiny_checkpoints(**LLAMA)  # same backbone seed
    tokens = _tokens(7, 2, 260)
    lengths = jnp.array([260, 260], jnp.int32)
    outs = []
    for path, mode in ((paw, "dense"), (plain, "elastic")):
        m = load_model(path, attention_mode=mode)
        outs.append(
            np.asarray(forward(m.params, jnp.asarray(tokens), lengths, m.config, m.runtime))
        )
    np.testing.assert_array_equal(outs[0], outs[1])

    model = load_model(paw, prefill_impl="reference")
    prompt = _tokens(8, 1, 900)  # 8 blocks: long enough for streaming to skip blocks
    res = generate(model, [prompt[0].tolist()], max_new_tokens=5, return_info=True)
    assert len(res.token_ids[0]) == 5
    info = res.prefill_info[0]
    assert 0 < info["sparsity"] < 1 and info["router_class"] is not None
    # Elastic prefill changes the logits (sparse heads) but not the shapes or finiteness.
    el, _ = _prefill_stats(model, prompt)
    assert np.isfinite(el).all() and el.shape == (1, model.config.vocab_size)


def test_pawllama_layout_mismatches_name_the_tensor(tiny_paw_checkpoints, tmp_path):
    from safetensors.numpy import save_file

    from convert.safetensors_io import load, read_header

    hf_dir, _ = tiny_paw_checkpoints(elastic=XATTN_STREAMING, **LLAMA)
    name = "model.layers.1.self_attn.mask_allocator.cls_feat_extractor.0.weight"

    def rewrite(dst, edit):
        hf = shutil.copytree(hf_dir, tmp_path / dst)
        tensors = {n: load(i) for n, i in read_header(hf / "model.safetensors").items()}
        edit(tensors)
        save_file(tensors, hf / "model.safetensors")
        return hf

    # Router width of a different head_dim (e.g. a router over hidden states, not head keys).
    hf = rewrite("wide", lambda t: t.__setitem__(name, np.zeros((64, 32), np.float32)))
    with pytest.raises(ConversionError, match=rf"{name}.*\[64, 32\].*expected \[64, 16\]"):
        convert(hf, tmp_path / "out", progress=False)
    # Router tensors missing.
    hf = rewrite("gone", lambda t: t.pop(name))
    with pytest.raises(ConversionError, match=f"missing tensor.*{name}"):
        convert(hf, tmp_path / "out2", progress=False)
    # An extra router layer, or q/k norms (a router pooling normed keys), is not our layout.
    extra = "model.layers.0.self_attn.mask_allocator.cls_router_head_agnostic.6.weight"
    hf = rewrite("extra", lambda t: t.__setitem__(extra, np.zeros((2, 2), np.float32)))
    with pytest.raises(ConversionError, match=rf"{extra}.*router layout"):
        convert(hf, tmp_path / "out3", progress=False)
    knorm = "model.layers.0.self_attn.k_norm.weight"
    hf = rewrite("knorm", lambda t: t.__setitem__(knorm, np.ones(16, np.float32)))
    with pytest.raises(ConversionError, match=rf"{knorm}.*PawLlamaForCausalLM has no per-head"):
        convert(hf, tmp_path / "out4", progress=False)
    # Elastic fields are validated as for PawQwen3.
    hf = shutil.copytree(hf_dir, tmp_path / "cfg")
    cfg = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps({**cfg, "pooling_mode": "first_token"}))
    with pytest.raises(ValueError, match="pooling_mode='first_token'"):
        convert(hf, tmp_path / "out5", progress=False)
    assert not any((tmp_path / f"out{s}").exists() for s in ("", "2", "3", "4", "5"))
