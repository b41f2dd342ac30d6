"""Router: ctx_q pooling, MLP structure, decision rule, head modes, HF weight loading (spec 1.3, 2, 3).

Comparisons with the torch port of the official code live in test_torch_official_layer.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from elastic_jax.elastic_config import ElasticConfig
from elastic_jax.router import (
    TRAINING_ONLY_SUFFIXES,
    RouterParams,
    ctx_q_pool,
    head_modes,
    is_training_only_tensor,
    route,
    router_decision,
    router_logits,
    router_params_from_hf,
    router_tensor_names,
)

BF16 = jnp.bfloat16
D = 16


def hf_router_tensors(
    layer: int, d: int = D, classes: int = 2, seed: int = 0, dtype=np.float32
) -> dict[str, np.ndarray]:
    """Random router tensors in HF (torch [out, in]) orientation."""
    rng = np.random.default_rng(seed)
    names = router_tensor_names(layer, classes == 2, head_dim=d)
    return {n: (rng.standard_normal(s) / np.sqrt(s[-1])).astype(dtype) for n, s in names.items()}


def np_router_logits(pooled: np.ndarray, t: dict[str, np.ndarray], layer: int) -> np.ndarray:
    """float64 reference of the official AttentionRouter structure, from HF-orientation tensors."""
    p = f"model.layers.{layer}.self_attn.mask_allocator."

    def lin(x, name):
        return x @ t[p + name + ".weight"].astype(np.float64).T + t[p + name + ".bias"]

    def silu(x):
        return x / (1 + np.exp(-x))

    f = lin(silu(lin(pooled.astype(np.float64), "cls_feat_extractor.0")), "cls_feat_extractor.2")
    h = silu(lin(f, "cls_router_head_agnostic.0"))
    h = silu(lin(h, "cls_router_head_agnostic.2"))
    return lin(h, "cls_router_head_agnostic.4")


def params_from(t, layer=0, d=D, use_softmax=True):
    return router_params_from_hf(t.__getitem__, layer, d, use_softmax)


# ----------------------------------------------------------------------------------- decision


def test_decision_argmax_shape_dtype_range():
    logits = jnp.array([[[1.0, 2.0], [3.0, -1.0], [-5.0, -4.0]]], jnp.float32)  # [1, 3, 2]
    z = router_decision(logits)
    assert z.shape == (1, 3) and z.dtype == jnp.int32
    np.testing.assert_array_equal(z, [[1, 0, 1]])
    rng = np.random.default_rng(0)
    big = jnp.asarray(rng.standard_normal((5, 8, 2)), BF16)
    zb = np.asarray(router_decision(big))
    assert set(np.unique(zb)) <= {0, 1} and zb.shape == (5, 8)
    assert 0 < zb.mean() < 1


def test_decision_batch_rows_independent():
    rng = np.random.default_rng(1)
    logits = jnp.asarray(rng.standard_normal((4, 3, 2)) * 3, BF16)
    batched = router_decision(logits)
    for b in range(4):
        np.testing.assert_array_equal(batched[b], router_decision(logits[b : b + 1])[0])
    np.testing.assert_array_equal(
        batched, (np.asarray(logits, np.float32)[..., 1] > np.asarray(logits, np.float32)[..., 0])
    )


def test_ties_and_bf16_near_ties_go_to_class_0():
    tie = jnp.array([[[0.5, 0.5], [-2.0, -2.0]]], BF16)
    np.testing.assert_array_equal(router_decision(tie), [[0, 0]])
    # l1 - l0 = 2^-8: p1 = 0.500977 and p0 = 0.499023 both round to 0.5 in bf16 -> class 0 (the
    # official argmax on rounded probabilities), although l1 > l0 and fp32 would say class 1.
    near = jnp.array([[[0.0, 2.0**-8]]], BF16)
    assert int(router_decision(near)[0, 0]) == 0
    assert int(router_decision(near.astype(jnp.float32))[0, 0]) == 1
    clear = jnp.array([[[0.0, 2.0**-5]]], BF16)
    assert int(router_decision(clear)[0, 0]) == 1


def test_sigmoid_head_decision():
    # [B=1, K=3, 1] post-LayerNorm logits: > 0 -> class 1, exactly 0 -> class 0.
    logits = jnp.array([[[1.2], [0.0], [-1.2]]], BF16)
    np.testing.assert_array_equal(router_decision(logits), [[1, 0, 0]])
    np.testing.assert_array_equal(router_decision(logits, mask_temp=0.3), [[1, 0, 0]])
    with pytest.raises(ValueError, match="end in 2"):
        router_decision(jnp.zeros((1, 2, 3)))


# ------------------------------------------------------------------------------------ the MLP


def test_router_logits_structure_fp32():
    t = hf_router_tensors(0, seed=2)
    pooled = np.random.default_rng(3).standard_normal((3, 2, D)).astype(np.float32)
    got = router_logits(jnp.asarray(pooled), params_from(t))
    assert got.shape == (3, 2, 2) and got.dtype == jnp.float32
    np.testing.assert_allclose(got, np_router_logits(pooled, t, 0), rtol=1e-5, atol=1e-5)


def test_router_logits_bf16_rounding_points():
    """bf16: each Linear accumulates in fp32 and rounds once; SiLU rounds once (torch on GPU)."""
    t = hf_router_tensors(0, seed=4, dtype=ml_dtypes.bfloat16)
    pooled = np.random.default_rng(5).standard_normal((2, 2, D)).astype(ml_dtypes.bfloat16)
    p = "model.layers.0.self_attn.mask_allocator."

    def r(x):
        return np.asarray(x, np.float32).astype(ml_dtypes.bfloat16)

    def lin(x, name):
        w = t[p + name + ".weight"].astype(np.float64)
        return r(x.astype(np.float64) @ w.T + t[p + name + ".bias"].astype(np.float64))

    def silu(x):
        x = x.astype(np.float64)
        return r(x / (1 + np.exp(-x)))

    f = lin(silu(lin(pooled, "cls_feat_extractor.0")), "cls_feat_extractor.2")
    ref = lin(
        silu(lin(silu(lin(f, "cls_router_head_agnostic.0")), "cls_router_head_agnostic.2")),
        "cls_router_head_agnostic.4",
    )
    got = router_logits(jnp.asarray(pooled), params_from(t))
    assert got.dtype == BF16
    # fp64 vs fp32 accumulation can move a value across a bf16 rounding boundary: allow 1 ulp.
    np.testing.assert_allclose(
        np.asarray(got, np.float32), ref.astype(np.float32), rtol=2**-7, atol=1e-6
    )


def test_sigmoid_head_layernorm_across_heads():
    t = hf_router_tensors(0, classes=1, seed=6)
    pooled = np.random.default_rng(7).standard_normal((2, 4, D)).astype(np.float32)
    got = np.asarray(router_logits(jnp.asarray(pooled), params_from(t, use_softmax=False)))
    raw = np_router_logits(pooled, t, 0)  # [B, K, 1]
    mean = raw.mean(axis=(1, 2), keepdims=True)
    ref = (raw - mean) / np.sqrt(raw.var(axis=(1, 2), keepdims=True) + 1e-5)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(router_decision(jnp.asarray(got)), (ref[..., 0] > 0))


# -------------------------------------------------------------------------------- ctx_q_pool


def np_pool(k: np.ndarray) -> np.ndarray:
    """Spec 2.2 for one sequence k: [T, K, D] -> [K, D] (float64)."""
    k = k.astype(np.float64)
    return np.concatenate([k[:100], k[max(0, len(k) - 100) :]]).mean(axis=0)


@pytest.mark.parametrize("t", [1, 99, 100, 150, 199, 200, 5000])
def test_ctx_q_pool_lengths(t):
    k = np.random.default_rng(t).standard_normal((1, t, 2, D)).astype(np.float32)
    got = ctx_q_pool(jnp.asarray(k))
    assert got.shape == (1, 2, D) and got.dtype == jnp.float32
    np.testing.assert_allclose(got[0], np_pool(k[0]), rtol=1e-5, atol=1e-6)
    if t < 100:
        np.testing.assert_allclose(got[0], k[0].mean(0), rtol=1e-5, atol=1e-6)
    if t >= 200:
        ref = (k[0, :100].astype(np.float64).mean(0) + k[0, -100:].mean(0)) / 2
        np.testing.assert_allclose(got[0], ref, rtol=1e-5, atol=1e-6)


def test_ctx_q_pool_bf16_rounds_once():
    k = np.random.default_rng(0).standard_normal((1, 150, 2, D)).astype(ml_dtypes.bfloat16)
    got = ctx_q_pool(jnp.asarray(k))
    assert got.dtype == BF16
    ref = np_pool(k[0].astype(np.float32)).astype(np.float32).astype(ml_dtypes.bfloat16)
    # fp32 accumulation order may differ from the float64 reference by one bf16 rounding step
    np.testing.assert_allclose(
        np.asarray(got[0], np.float32), ref.astype(np.float32), rtol=2**-8, atol=0
    )


def test_ctx_q_pool_padded_batch_equals_single_calls():
    lengths = np.array([5000, 1, 99, 150, 200, 4321], np.int32)
    t = int(lengths.max())
    rng = np.random.default_rng(9)
    k = rng.standard_normal((len(lengths), t, 2, D)).astype(np.float32)
    for b, n in enumerate(lengths):
        k[b, n:] = 1e4  # padding garbage must not leak
    pooled = jax.jit(ctx_q_pool)(jnp.asarray(k), jnp.asarray(lengths))
    for b, n in enumerate(lengths):
        single = ctx_q_pool(jnp.asarray(k[b : b + 1, :n]))
        # XLA may order the fp32 sums differently for different shapes: a few fp32 ulps.
        np.testing.assert_allclose(pooled[b], single[0], rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(pooled[b], np_pool(k[b, :n]), rtol=1e-5, atol=1e-6)
    zero = ctx_q_pool(jnp.asarray(k[:1]), jnp.array([0], jnp.int32))
    assert np.isfinite(np.asarray(zero)).all()
    with pytest.raises(ValueError, match=r"lengths must be \[B\]"):
        ctx_q_pool(jnp.asarray(k), jnp.array([3], jnp.int32))
    with pytest.raises(ValueError, match=r"k must be \[B, T, K, D\]"):
        ctx_q_pool(jnp.asarray(k[0]))


# --------------------------------------------------------------------------------- head modes


@pytest.mark.parametrize(
    ("retrieval", "toggle", "class0", "class1"),
    [
        ("full", "full", 0, 0),
        ("full", "streaming", -1, 0),
        ("full", "xattn", 1, 0),
        ("xattn", "streaming", -1, 1),
        ("xattn", "xattn", 1, 1),
    ],
)
def test_head_modes_table(retrieval, toggle, class0, class1):
    z = jnp.array([[0, 1], [1, 0]], jnp.int32)
    modes = head_modes(z, retrieval, toggle, num_heads=2)
    assert modes.dtype == jnp.int32
    np.testing.assert_array_equal(modes, [[class0, class1], [class1, class0]])


def test_head_modes_gqa_repeat_interleave():
    z = jnp.array([[1, 0, 0]], jnp.int32)
    modes = head_modes(z, "xattn", "streaming", num_heads=12)
    np.testing.assert_array_equal(modes, [[1] * 4 + [-1] * 4 + [-1] * 4])
    with pytest.raises(ValueError, match="num_heads=10 must be a multiple"):
        head_modes(z, "xattn", "streaming", num_heads=10)


@pytest.mark.parametrize(("retrieval", "toggle"), [("xattn", "full"), ("full", "local")])
def test_head_modes_unsupported_pair(retrieval, toggle):
    with pytest.raises(
        ValueError, match=f"retrieval_mode: {retrieval} and toggle_type: {toggle} is not"
    ):
        head_modes(jnp.zeros((1, 2), jnp.int32), retrieval, toggle, num_heads=4)


# ------------------------------------------------------------------------------------- route


def test_route_vmaps_over_stacked_layers():
    cfg = ElasticConfig(retrieval_mode="xattn", toggle_type="streaming")
    layers = [params_from(hf_router_tensors(i, seed=10 + i), layer=i) for i in range(3)]
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
    assert stacked.feat_w0.shape == (3, D, 4 * D)
    rng = np.random.default_rng(11)
    keys = jnp.asarray(rng.standard_normal((3, 2, 260, 2, D)) * 0.3 + 0.2, BF16)  # [L, B, T, K, D]
    lengths = jnp.array([260, 120], jnp.int32)
    fn = jax.jit(jax.vmap(lambda k, p: route(k, lengths, p, cfg, 4)))
    modes, z, logits = fn(keys, stacked)
    assert modes.shape == (3, 2, 4) and z.shape == (3, 2, 2) and logits.shape == (3, 2, 2, 2)
    for i, p in enumerate(layers):
        m_i, z_i, l_i = route(keys[i], lengths, p, cfg, 4)
        np.testing.assert_array_equal(modes[i], m_i)
        np.testing.assert_array_equal(logits[i], l_i)
    bad = ElasticConfig(use_softmax=False)
    with pytest.raises(ValueError, match=r"2 output\(s\) but use_softmax=False expects 1"):
        route(keys[0], lengths, layers[0], bad, 4)


# ------------------------------------------------------------------------ HF checkpoint names


def test_router_tensor_names_and_shapes():
    names = router_tensor_names(3, True, head_dim=128)
    p = "model.layers.3.self_attn.mask_allocator."
    assert names == {
        p + "cls_feat_extractor.0.weight": (512, 128),
        p + "cls_feat_extractor.0.bias": (512,),
        p + "cls_feat_extractor.2.weight": (128, 512),
        p + "cls_feat_extractor.2.bias": (128,),
        p + "cls_router_head_agnostic.0.weight": (512, 128),
        p + "cls_router_head_agnostic.0.bias": (512,),
        p + "cls_router_head_agnostic.2.weight": (128, 512),
        p + "cls_router_head_agnostic.2.bias": (128,),
        p + "cls_router_head_agnostic.4.weight": (2, 128),
        p + "cls_router_head_agnostic.4.bias": (2,),
    }
    sig = router_tensor_names(0, False, head_dim=8)
    assert sig["model.layers.0.self_attn.mask_allocator.cls_router_head_agnostic.4.weight"] == (
        1,
        8,
    )


def test_weights_loaded_transposed():
    t = hf_router_tensors(5, seed=12)
    p = router_params_from_hf(t.__getitem__, 5, D, True, available=set(t))
    pre = "model.layers.5.self_attn.mask_allocator."
    np.testing.assert_array_equal(p.feat_w0, t[pre + "cls_feat_extractor.0.weight"].T)
    np.testing.assert_array_equal(p.head_w4, t[pre + "cls_router_head_agnostic.4.weight"].T)
    np.testing.assert_array_equal(p.head_b2, t[pre + "cls_router_head_agnostic.2.bias"])
    assert p.feat_w0.shape == (D, 4 * D) and p.feat_w2.shape == (4 * D, D)
    assert p.head_w4.shape == (D, 2) and p.num_classes == 2
    # Functional check of the orientation: x @ W_jax == x @ W_hf.T
    x = np.random.default_rng(13).standard_normal((1, 2, D)).astype(np.float32)
    np.testing.assert_allclose(
        router_logits(jnp.asarray(x), p), np_router_logits(x, t, 5), rtol=1e-5, atol=1e-5
    )
    assert isinstance(p, RouterParams)
    assert {f: getattr(p, f).shape for f in RouterParams.shapes(D)} == RouterParams.shapes(D)
    assert RouterParams.shapes(D, use_softmax=False)["head_w4"] == (D, 1)
    bf = router_params_from_hf(t.__getitem__, 5, D, True, dtype=ml_dtypes.bfloat16)
    assert bf.feat_w0.dtype == ml_dtypes.bfloat16


def test_missing_router_tensors_listed():
    t = hf_router_tensors(1)
    gone = [
        "model.layers.1.self_attn.mask_allocator.cls_router_head_agnostic.4.bias",
        "model.layers.1.self_attn.mask_allocator.cls_feat_extractor.0.weight",
    ]
    for n in gone:
        del t[n]
    for kwargs in ({"available": set(t)}, {}):
        with pytest.raises(ValueError, match=r"lacks 2 router tensor\(s\) of layer 1") as info:
            router_params_from_hf(
                t.__getitem__, 1, D, True, source="ckpt/model.safetensors", **kwargs
            )
        msg = str(info.value)
        assert all(n in msg for n in gone) and "ckpt/model.safetensors" in msg


def test_missing_router_tensor_from_safetensors_file(tmp_path):
    from safetensors import safe_open
    from safetensors.numpy import save_file

    t = hf_router_tensors(0)
    del t["model.layers.0.self_attn.mask_allocator.cls_feat_extractor.2.bias"]
    path = tmp_path / "model.safetensors"
    save_file(t, str(path))
    with safe_open(str(path), "np") as f:  # safetensors raises its own error type, not KeyError
        with pytest.raises(ValueError, match=r"cls_feat_extractor\.2\.bias"):
            router_params_from_hf(f.get_tensor, 0, D, True, source=str(path))


def test_wrong_shape_names_tensor_and_hints_use_softmax():
    t = hf_router_tensors(0, classes=2)
    with pytest.raises(
        ValueError,
        match=r"cls_router_head_agnostic\.4\.weight in f\.st has shape "
        r"\(2, 16\), expected \(1, 16\).*use_softmax should be true",
    ):
        router_params_from_hf(t.__getitem__, 0, D, False, source="f.st")
    t2 = hf_router_tensors(0)
    t2["model.layers.0.self_attn.mask_allocator.cls_feat_extractor.0.weight"] = np.zeros((D, 4 * D))
    with pytest.raises(
        ValueError,
        match=r"cls_feat_extractor\.0\.weight has shape \(16, 64\), "
        r"expected \(64, 16\)",
    ):
        router_params_from_hf(t2.__getitem__, 0, D, True)


def test_training_only_tensors_recognised_and_ignored():
    names = [f"model.layers.7.{s}" for s in TRAINING_ONLY_SUFFIXES]
    assert all(is_training_only_tensor(n) for n in names)
    t = hf_router_tensors(7)
    assert not any(is_training_only_tensor(n) for n in t)
    assert not is_training_only_tensor("model.layers.7.self_attn.q_proj.weight")
    assert not is_training_only_tensor("foo.self_attn.attn_mask_log_alphas")
    extra = {**t, names[0]: np.zeros(()), names[1]: np.zeros(2), names[2]: np.zeros((4, D))}
    p = router_params_from_hf(extra.__getitem__, 7, D, True, available=set(extra))
    np.testing.assert_array_equal(
        p.feat_b0, t["model.layers.7.self_attn.mask_allocator.cls_feat_extractor.0.bias"]
    )
