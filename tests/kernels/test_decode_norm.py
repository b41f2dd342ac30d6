"""``pallas_kernels.decode_norm.add_rms_norm``: the Pallas kernel (interpret mode on CPU, the
real one under ``-m gpu``) against the jnp reference, and its input checks."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from elastic_jax.layers import apply_rope, rms_norm, rope_cos_sin
from pallas_kernels.decode_norm import (
    add_rms_norm,
    add_rms_norm_reference,
    qk_norm_rope,
    qk_norm_rope_reference,
)
from pallas_kernels.decode_norm.pallas_triton import row_chunk

ON_GPU = jax.default_backend() == "gpu"


def _inputs(B, E, S, dtype, seed=0):
    k = jax.random.split(jax.random.PRNGKey(seed), 5)
    return dict(
        h=(3.0 * jax.random.normal(k[0], (B, E))).astype(dtype),
        weight=(1.0 + 0.2 * jax.random.normal(k[1], (E,))).astype(dtype),
        partials=jax.random.normal(k[2], (S, B, E), jnp.float32),
        residual=jax.random.normal(k[3], (B, E)).astype(dtype),
        bias=jax.random.normal(k[4], (E,)).astype(dtype),
    )


UPDATES = {
    "partials": ("partials",),
    "partials+bias": ("partials", "bias"),
    "residual": ("residual",),
    "none": (),
}


def _check(B, E, S, dtype, update, out_rows, interpret):
    x = _inputs(B, E, S, dtype)
    kw = {name: x[name] for name in UPDATES[update]}
    got_h, got_x = add_rms_norm(
        x["h"], x["weight"], eps=1e-6, out_rows=out_rows, implementation="pallas",
        interpret=interpret, **kw,
    )  # fmt: skip
    want_h, want_x = add_rms_norm_reference(x["h"], x["weight"], eps=1e-6, out_rows=out_rows, **kw)
    assert got_h.shape == (B, E) and got_x.shape == (out_rows or B, E)
    assert got_h.dtype == got_x.dtype == dtype
    # float32 sums in another order: equal up to one rounding of the output dtype
    tol = 1e-5 if dtype == jnp.float32 else 2**-7
    for got, want in ((got_h, want_h), (got_x, want_x)):
        np.testing.assert_allclose(
            np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=tol, atol=tol
        )
    if out_rows and out_rows > B:
        assert not np.any(np.asarray(got_x[B:], np.float32)), "padding rows must be zero"
    # the update really went in: h_new differs from h wherever an update was given
    if update != "none":
        assert not np.allclose(np.asarray(got_h, np.float32), np.asarray(x["h"], np.float32))


@pytest.mark.parametrize(
    "B,E,S,out_rows,dtype,updates",
    [
        (1, 2560, 8, 2, jnp.bfloat16, list(UPDATES)),  # Qwen3-4B width, batch 1, two rows
        (3, 64, 1, None, jnp.float32, ["partials", "residual"]),
        (2, 96, 5, 4, jnp.float32, ["partials+bias", "none"]),  # odd splits, four rows
    ],
    ids=["b1-4b-width-bf16", "b3-f32", "b2-odd-splits-f32"],
)
def test_add_rms_norm_matches_reference(B, E, S, out_rows, dtype, updates):
    for update in updates:
        _check(B, E, S, dtype, update, out_rows, interpret=True)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("update", list(UPDATES))
@pytest.mark.parametrize("B,E,S,out_rows", [(1, 2560, 16, 2), (8, 4096, 8, None)])
def test_add_rms_norm_gpu(B, E, S, out_rows, update):
    _check(B, E, S, jnp.bfloat16, update, out_rows, interpret=False)


def test_row_chunk_is_a_power_of_two_dividing_e():
    assert [row_chunk(e) for e in (2560, 4096, 5120, 64, 96, 48)] == [512, 1024, 1024, 64, 32, 16]


def test_add_rms_norm_rejects_bad_input():
    x = _inputs(2, 64, 3, jnp.float32)
    h, w = x["h"], x["weight"]
    cases = [
        (dict(partials=x["partials"], residual=x["residual"]), "not both"),
        (dict(partials=x["partials"][:, :1]), "partials must be"),
        (dict(residual=x["residual"][:, :32]), "residual must be"),
        (dict(residual=x["residual"], bias=x["bias"]), "bias"),
        (dict(out_rows=1), "out_rows"),
        (dict(implementation="cuda"), "implementation"),
    ]
    for kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            add_rms_norm(h, w, eps=1e-6, **kwargs)
    with pytest.raises(ValueError, match="weight must be"):
        add_rms_norm(h, w[:32], eps=1e-6)
    with pytest.raises(ValueError, match="multiple of 16"):
        add_rms_norm(h[:, :40], w[:40], eps=1e-6)


# --------------------------------------------------------------------------- qk_norm_rope


def _qk_inputs(R, B, H, K, D, dtype, norm: bool, seed=1):
    k = jax.random.split(jax.random.PRNGKey(seed), 4)
    pos = jnp.asarray([[5 + 4093 * b] for b in range(B)], jnp.int32)  # far apart: distinct angles
    inv_freq = (1.0 / (1e6 ** (np.arange(0, D, 2) / D))).astype(np.float32)
    cos, sin = rope_cos_sin(pos, inv_freq, 1.0, dtype)
    w = lambda key: (1.0 + 0.2 * jax.random.normal(key, (D,))).astype(dtype)  # noqa: E731
    return dict(
        q=(2.0 * jax.random.normal(k[0], (R, H, D))).astype(dtype),
        k=(2.0 * jax.random.normal(k[1], (R, K, D))).astype(dtype),
        cos=cos,
        sin=sin,
        q_weight=w(k[2]) if norm else None,
        k_weight=w(k[3]) if norm else None,
    )


def test_qk_norm_rope_reference_is_the_models_norm_and_rope():
    """The reference is exactly ``layers.rms_norm`` then ``layers.apply_rope`` (bf16)."""
    x = _qk_inputs(2, 1, 4, 2, 16, jnp.bfloat16, norm=True)
    got_q, got_k = qk_norm_rope_reference(
        x["q"], x["k"], x["cos"][:, 0], x["sin"][:, 0], batch=1,
        q_weight=x["q_weight"], k_weight=x["k_weight"],
    )  # fmt: skip
    for got, t, w in ((got_q, x["q"], x["q_weight"]), (got_k, x["k"], x["k_weight"])):
        want = apply_rope(rms_norm(t[:1, None], w, 1e-6), x["cos"], x["sin"])[:, 0]
        np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


def _check_qk(R, B, H, K, D, dtype, norm, interpret):
    x = _qk_inputs(R, B, H, K, D, dtype, norm)
    args = (x["q"], x["k"], x["cos"][:, 0], x["sin"][:, 0])
    kw = dict(batch=B, q_weight=x["q_weight"], k_weight=x["k_weight"])
    got = qk_norm_rope(*args, **kw, implementation="pallas", interpret=interpret)
    want = qk_norm_rope_reference(*args, **kw)
    tol = 1e-5 if dtype == jnp.float32 else 2**-7
    for g, w, heads in zip(got, want, (H, K)):
        assert g.shape == (B, heads, D) and g.dtype == dtype
        np.testing.assert_allclose(
            np.asarray(g, np.float32), np.asarray(w, np.float32), rtol=tol, atol=tol
        )


@pytest.mark.parametrize(
    "R,B,H,K,D,dtype,norm",
    [
        (2, 1, 32, 8, 128, jnp.bfloat16, True),  # Qwen3 heads, batch 1 with its padding row
        (2, 1, 32, 8, 128, jnp.bfloat16, False),  # Llama: RoPE only
        (3, 3, 4, 2, 16, jnp.float32, True),
        (4, 2, 6, 3, 64, jnp.float32, False),  # rows past the batch, head counts not 2^n
    ],
    ids=["b1-qwen3-bf16", "b1-llama-bf16", "b3-f32", "b2-of-4-rows-odd-heads-f32"],
)
def test_qk_norm_rope_matches_reference(R, B, H, K, D, dtype, norm):
    _check_qk(R, B, H, K, D, dtype, norm, interpret=True)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("norm", [True, False])
@pytest.mark.parametrize("R,B", [(2, 1), (8, 8)])
def test_qk_norm_rope_gpu(R, B, norm):
    _check_qk(R, B, 32, 8, 128, jnp.bfloat16, norm, interpret=False)


def test_qk_norm_rope_rejects_bad_input():
    x = _qk_inputs(2, 1, 4, 2, 16, jnp.float32, norm=True)
    q, k, c, s = x["q"], x["k"], x["cos"][:, 0], x["sin"][:, 0]
    cases = [
        ((q[0], k, c, s), {}, "q must be"),
        ((q, k, c, s), dict(batch=3), "batch="),
        ((q, k, c[:, :8], s), dict(batch=1), "cos and sin"),
        ((q, k, c, s), dict(batch=1, q_weight=x["q_weight"]), "together"),
        ((q, k, c, s), dict(batch=1, implementation="cuda"), "implementation"),
        ((q[..., :12], k[..., :12], c[:, :12], s[:, :12]), dict(batch=1), "power of two"),
    ]
    for args, kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            qk_norm_rope(*args, **kwargs)
