"""PawQwen3 end to end: agreement with a torch port of the official inference code, forced modes,
per-sequence routing, parity with plain Qwen3, and clear errors for bad checkpoints."""

from __future__ import annotations

import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from convert.hf_to_jax import ConversionError, convert
from elastic_jax import generate, kv_cache, load_model
from elastic_jax.model import decode, forward, prefill

XATTN_STREAMING = {"retrieval_mode": "xattn", "toggle_type": "streaming"}
FULL_XATTN = {"retrieval_mode": "full", "toggle_type": "xattn"}


def _tokens(seed: int, *shape: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(3, 500, shape).astype(np.int32)


def _prefill_all(model, tokens: np.ndarray, lengths, *, collect_masks=False, **rt_changes):
    rt = model.with_runtime(collect_masks=collect_masks, **rt_changes).runtime
    B, T = tokens.shape
    cache = kv_cache.create(model.config, B, T, page_size=64)
    logits, cache, stats = prefill(
        model.params, cache, jnp.asarray(tokens), jnp.asarray(lengths, jnp.int32), model.config, rt
    )
    return np.asarray(logits), cache, {k: np.asarray(v) for k, v in stats.items()}


@pytest.mark.parametrize(
    "elastic", [XATTN_STREAMING, FULL_XATTN], ids=["xattn+streaming", "full+xattn"]
)
def test_matches_official_torch_port(tiny_paw_checkpoints, elastic):
    from torch_official.model import OfficialPawQwen3

    hf_dir, conv = tiny_paw_checkpoints(elastic=elastic)
    model = load_model(conv, prefill_impl="reference")
    T = 700
    tokens = _tokens(11, 1, T)
    port = OfficialPawQwen3(hf_dir, dtype=torch.float32)
    ref_logits, infos = port(torch.tensor(tokens, dtype=torch.long))
    rt = model.with_runtime(collect_masks=True).runtime
    ours = np.asarray(
        forward(model.params, jnp.asarray(tokens), jnp.array([T], jnp.int32), model.config, rt)
    )
    _, _, stats = _prefill_all(model, tokens, [T], collect_masks=True)
    modes_seen = set()
    for layer, info in enumerate(infos):
        np.testing.assert_array_equal(stats["modes"][layer, 0], info["head_modes"][0].numpy())
        np.testing.assert_array_equal(stats["block_mask"][layer, 0], info["block_masks"][0].numpy())
        modes_seen |= set(info["head_modes"][0].tolist())
    assert len(modes_seen) == 2  # the tiny router really mixes modes
    np.testing.assert_allclose(ours, ref_logits.numpy(), atol=1e-4, rtol=0)


def test_forced_dense_equals_plain_qwen3_exactly(tiny_paw_checkpoints, tiny_checkpoints):
    _, paw = tiny_paw_checkpoints(elastic=XATTN_STREAMING)
    _, qwen = tiny_checkpoints()
    tokens = _tokens(1, 2, 300)
    lengths = jnp.array([300, 300], jnp.int32)
    outs = []
    for path, mode in ((paw, "dense"), (qwen, "elastic")):
        m = load_model(path, attention_mode=mode)
        outs.append(
            np.asarray(forward(m.params, jnp.asarray(tokens), lengths, m.config, m.runtime))
        )
    np.testing.assert_array_equal(outs[0], outs[1])


def test_full_full_and_threshold_one_equal_dense(tiny_paw_checkpoints):
    tokens = _tokens(2, 1, 400)
    dense = load_model(tiny_paw_checkpoints(elastic=XATTN_STREAMING)[1], attention_mode="dense")
    ref, _, _ = _prefill_all(dense, tokens, [400])
    for elastic in (
        {"retrieval_mode": "full", "toggle_type": "full"},
        {"retrieval_mode": "xattn", "toggle_type": "xattn", "xattn_threshold": 1.0},
    ):
        m = load_model(tiny_paw_checkpoints(elastic=elastic)[1], prefill_impl="reference")
        got, _, stats = _prefill_all(m, tokens, [400])
        np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)
        np.testing.assert_array_equal(stats["kept_blocks"], stats["causal_blocks"])


def test_forced_modes_and_sparsity_info(tiny_paw_checkpoints):
    _, conv = tiny_paw_checkpoints(elastic=XATTN_STREAMING)
    prompt = _tokens(3, 1, 1000)[0].tolist()
    infos = {}
    for mode in ("elastic", "dense", "streaming", "xattn"):
        m = load_model(conv, attention_mode=mode, prefill_impl="reference")
        infos[mode] = generate(m, [prompt], max_new_tokens=2, return_info=True).prefill_info[0]
    assert infos["dense"]["sparsity"] == 0.0 and infos["dense"]["modes"] is None
    assert {v for row in infos["streaming"]["modes"] for v in row} == {-1}
    assert {v for row in infos["xattn"]["modes"] for v in row} == {1}
    # 8 blocks of 128; streaming keeps sink + 2 local blocks per row: 1+2+3+3+3+3+3+3 of 36.
    assert infos["streaming"]["sparsity"] == pytest.approx(1 - 21 / 36)
    assert infos["streaming"]["router_class"] is None
    el = infos["elastic"]
    assert 0 < el["sparsity"] < 1
    assert el["sparse_head_fraction"] == pytest.approx(np.mean(np.array(el["router_class"]) == 0))


def test_each_sequence_routed_on_its_own(tiny_paw_checkpoints):
    _, conv = tiny_paw_checkpoints(elastic=XATTN_STREAMING)
    model = load_model(conv, prefill_impl="reference")
    # Find two prompts whose router decisions differ.
    candidates, singles, pair = [], [], None
    for seed in range(100, 112):
        candidates.append(_tokens(seed, 1, 600))
        singles.append(_prefill_all(model, candidates[-1], [600]))
        pair = next(
            (
                (len(singles) - 1, j)
                for j in range(len(singles) - 1)
                if not np.array_equal(singles[-1][2]["modes"], singles[j][2]["modes"])
            ),
            None,
        )
        if pair:
            break
    assert pair is not None, "the tiny router gave every prompt the same decisions"
    a, b = candidates[pair[0]][0], candidates[pair[1]][0][:450]
    single_b = _prefill_all(model, b[None], [450])
    batch = np.zeros((2, 600), np.int32)
    batch[0], batch[1, :450] = a, b
    logits, _, stats = _prefill_all(model, batch, [600, 450])
    np.testing.assert_array_equal(stats["modes"][:, 0], singles[pair[0]][2]["modes"][:, 0])
    np.testing.assert_array_equal(stats["modes"][:, 1], single_b[2]["modes"][:, 0])
    np.testing.assert_allclose(logits[0], singles[pair[0]][0][0], atol=1e-4, rtol=0)
    np.testing.assert_allclose(logits[1], single_b[0][0], atol=1e-4, rtol=0)


def test_decode_ignores_prefill_modes(tiny_paw_checkpoints):
    _, conv = tiny_paw_checkpoints(elastic=XATTN_STREAMING)
    model = load_model(conv, prefill_impl="reference")
    tokens = _tokens(4, 1, 512)
    _, cache, stats = _prefill_all(model, tokens, [500])
    assert (stats["kept_blocks"] < stats["causal_blocks"]).any()
    tok = jnp.array([7], jnp.int32)
    outs = []
    for mode in ("elastic", "dense", "streaming"):
        cache_copy = kv_cache.KVCache(cache.k + 0, cache.v + 0, cache.page_table, cache.lengths)
        logits, _ = decode(
            model.params,
            cache_copy,
            tok,
            model.config,
            model.with_runtime(attention_mode=mode).runtime,
        )
        outs.append(np.asarray(logits))
    np.testing.assert_array_equal(outs[0], outs[1])
    np.testing.assert_array_equal(outs[0], outs[2])


def test_chunked_elastic_prefill_equals_one_shot(tiny_paw_checkpoints):
    _, conv = tiny_paw_checkpoints(elastic=FULL_XATTN)
    model = load_model(conv, prefill_impl="reference")
    tokens = _tokens(5, 2, 1024)
    a = _prefill_all(model, tokens, [1024, 700], prefill_chunk=8192)
    b = _prefill_all(model, tokens, [1024, 700], prefill_chunk=256)
    np.testing.assert_allclose(a[0], b[0], atol=1e-5, rtol=0)
    np.testing.assert_array_equal(a[2]["modes"], b[2]["modes"])
    np.testing.assert_array_equal(a[2]["kept_blocks"], b[2]["kept_blocks"])


def test_missing_router_tensor_and_bad_elastic_config(tiny_paw_checkpoints, tmp_path):
    from safetensors.numpy import save_file

    from convert.safetensors_io import load, read_header

    hf_dir, _ = tiny_paw_checkpoints(elastic=XATTN_STREAMING)
    hf = shutil.copytree(hf_dir, tmp_path / "hf")
    infos = read_header(hf / "model.safetensors")
    gone = "model.layers.1.self_attn.mask_allocator.cls_router_head_agnostic.4.weight"
    save_file({n: load(i) for n, i in infos.items() if n != gone}, hf / "model.safetensors")
    with pytest.raises(ConversionError, match="mask_allocator.cls_router_head_agnostic.4.weight"):
        convert(hf, tmp_path / "out", progress=False)

    hf2 = shutil.copytree(hf_dir, tmp_path / "hf2")
    cfg = json.loads((hf2 / "config.json").read_text())
    (hf2 / "config.json").write_text(json.dumps({**cfg, "toggle_type": "local"}))
    with pytest.raises(ValueError, match="retrieval_mode: xattn and toggle_type: local"):
        convert(hf2, tmp_path / "out2", progress=False)
    (hf2 / "config.json").write_text(json.dumps({**cfg, "block_size": 96}))
    with pytest.raises(ValueError, match="block_size=96"):
        convert(hf2, tmp_path / "out3", progress=False)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out2").exists()


def test_pallas_kernels_in_the_model_match_reference(tiny_paw_checkpoints):
    """Prefill through the Pallas Triton kernels (interpret mode on CPU): XAttention selection and
    block-sparse attention give the reference's logits and kept blocks."""
    _, conv = tiny_paw_checkpoints(elastic=XATTN_STREAMING)
    tokens = _tokens(6, 1, 384)
    ref = _prefill_all(load_model(conv, prefill_impl="reference"), tokens, [384])
    ker = _prefill_all(load_model(conv, prefill_impl="pallas"), tokens, [384])
    np.testing.assert_allclose(ker[0], ref[0], atol=1e-4, rtol=0)
    np.testing.assert_array_equal(ker[2]["kept_blocks"], ref[2]["kept_blocks"])
    np.testing.assert_array_equal(ker[2]["modes"], ref[2]["modes"])
