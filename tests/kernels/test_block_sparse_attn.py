"""Block-sparse attention: Pallas Triton kernel (interpret mode on CPU) vs the jnp reference.

The reference itself is checked against an independent float64 numpy attention with a mask
built by explicit loops. Kernel inputs have every key block the kernel must not read (dropped
blocks, blocks past the sequence length) filled with NaN, so reading one fails the test.
GPU-only cases (realistic sizes, Mosaic GPU kernel, cuDNN) are marked ``gpu``.
"""

from __future__ import annotations

import contextlib
import io
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.block_sparse_attn import (
    Config,
    MosaicConfig,
    block_mask_from_modes,
    block_sparse_attention,
    block_sparse_attention_reference,
    kept_blocks_from_mask,
    lookup_config,
)
from pallas_kernels.block_sparse_attn.pallas_triton import block_sparse_attention_triton

# Kernel vs reference (STYLE.md: f32 1e-5, bf16 1e-2, rtol = atol / 10). bf16 kernels also
# round the softmax weights to bf16 before P @ V, as flash kernels do. bf16 rtol is 1e-2, not
# 1e-3: both outputs are rounded to bf16, whose one-ulp step at |x| in [2, 4) is 0.0156.
TOL = {jnp.float32: dict(atol=1e-5, rtol=1e-6), jnp.bfloat16: dict(atol=1e-2, rtol=1e-2)}
SMALL = Config(block_q=32, block_k=32, num_warps=4, num_stages=2)


def _random_block_mask(key, b, h, n_qb, n_kb, density, offset_blocks=0):
    """Random causal block mask with the sink and diagonal blocks kept: [B, H, nQb, nKb]."""
    rows = offset_blocks + jnp.arange(n_qb)[:, None]
    cols = jnp.arange(n_kb)[None, :]
    rnd = jax.random.bernoulli(key, density, (b, h, n_qb, n_kb))
    return (rnd | (cols == 0) | (cols == rows)) & (cols <= rows)


def _inputs(seed, b, t_q, t_k, h, kh, d, dtype):
    ks = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(ks[0], (b, t_q, h, d), jnp.float32).astype(dtype)
    k = jax.random.normal(ks[1], (b, t_k, kh, d), jnp.float32).astype(dtype)
    v = jax.random.normal(ks[2], (b, t_k, kh, d), jnp.float32).astype(dtype)
    return q, k, v


def _poison(k, v, head_modes, counts, indices, kv_lengths, *, t_q, bs, sink, local):
    """NaN in every K/V position no query head of a kv group may read (block granularity),
    and in every key at or past the sequence length."""
    b, t_k, kh, _ = k.shape
    h = head_modes.shape[1]
    mask = block_mask_from_modes(
        head_modes,
        counts,
        indices,
        q_len=t_q,
        k_len=t_k,
        block_q=bs,
        block_k=bs,
        sink_blocks=sink,
        local_blocks=local,
    )
    needed = mask.any(axis=2).reshape(b, kh, h // kh, -1).any(axis=2)  # [B, K, nKb]
    needed_tok = jnp.repeat(needed, bs, axis=-1)[:, :, :t_k].transpose(0, 2, 1)  # [B, Tk, K]
    in_len = jnp.arange(t_k)[None, :, None] < kv_lengths[:, None, None]
    ok = (needed_tok & in_len)[..., None]
    return jnp.where(ok, k, jnp.nan), jnp.where(ok, v, jnp.nan)


def _check(
    *,
    seed=0,
    b=1,
    t_q=256,
    t_k=None,
    h=2,
    kh=1,
    d=64,
    bs=64,
    dtype=jnp.float32,
    modes=None,
    density=0.4,
    kv_lengths=None,
    sink=1,
    local=2,
    config=SMALL,
    block_mask=None,
    return_lse=True,
):
    t_k = t_q if t_k is None else t_k
    q, k, v = _inputs(seed, b, t_q, t_k, h, kh, d, dtype)
    n_qb, n_kb = -(-t_q // bs), -(-t_k // bs)
    modes = jnp.ones((b, h), jnp.int32) if modes is None else jnp.asarray(modes, jnp.int32)
    if block_mask is None:
        block_mask = _random_block_mask(
            jax.random.key(seed + 7), b, h, n_qb, n_kb, density, offset_blocks=(t_k - t_q) // bs
        )
    counts, indices = kept_blocks_from_mask(block_mask)
    kv_len = (
        jnp.full((b,), t_k, jnp.int32) if kv_lengths is None else jnp.asarray(kv_lengths, jnp.int32)
    )
    kw = dict(
        kv_lengths=kv_len, sink_blocks=sink, local_blocks=local, block_q=bs, return_lse=return_lse
    )
    want = block_sparse_attention(q, k, v, modes, counts, indices, implementation="reference", **kw)
    kp, vp = _poison(k, v, modes, counts, indices, kv_len, t_q=t_q, bs=bs, sink=sink, local=local)
    got = block_sparse_attention(
        q,
        kp,
        vp,
        modes,
        counts,
        indices,
        implementation="pallas_triton",
        interpret=True,
        config=config,
        **kw,
    )
    if not return_lse:
        got, want = (got, None), (want, None)
    # Queries at or past kv_lengths are padding (output unspecified): compare valid rows.
    q_pos = (t_k - t_q) + jnp.arange(t_q)
    valid = q_pos[None, :] < kv_len[:, None]  # [B, Tq]
    out, ref = np.asarray(got[0], np.float32), np.asarray(want[0], np.float32)
    sel = np.asarray(valid)
    assert np.isfinite(out[sel]).all(), "kernel output has NaN: a dropped block was read"
    np.testing.assert_allclose(out[sel], ref[sel], **TOL[dtype])
    if return_lse:
        lse, lse_ref = np.asarray(got[1]), np.asarray(want[1])
        sel_h = np.broadcast_to(sel[:, None, :], lse.shape)
        np.testing.assert_allclose(lse[sel_h], lse_ref[sel_h], atol=1e-4, rtol=1e-5)
    return got


# --------------------------------------------------------------------------- reference itself


def _numpy_attention(q, k, v, modes, block_mask, kv_len, *, bs, sink, local, scale):
    """float64 attention with the mask written out by loops (independent of reference.py)."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    b, t_q, h, d = q.shape
    t_k, kh = k.shape[1], k.shape[2]
    out = np.zeros((b, t_q, h, d))
    lse = np.full((b, h, t_q), -np.inf)
    for bi in range(b):
        for hi in range(h):
            for i in range(t_q):
                p = t_k - t_q + i
                keep = np.zeros(t_k, bool)
                for j in range(t_k):
                    if j > p or j >= kv_len[bi]:
                        continue
                    if modes[bi, hi] == 0:
                        keep[j] = True
                    elif modes[bi, hi] == -1:
                        keep[j] = j // bs < sink or p // bs - local + 1 <= j // bs <= p // bs
                    else:
                        keep[j] = bool(block_mask[bi, hi, i // bs, j // bs])
                if not keep.any():
                    continue
                s = k[bi, :, hi // (h // kh)] @ q[bi, i, hi] * scale
                s = np.where(keep, s, -np.inf)
                m = s.max()
                w = np.exp(s - m)
                out[bi, i, hi] = w @ v[bi, :, hi // (h // kh)] / w.sum()
                lse[bi, hi, i] = m + np.log(w.sum())
    return out, lse


def test_reference_matches_float64_loops():
    b, t_q, t_k, h, kh, d, bs = 2, 40, 56, 4, 2, 8, 8
    q, k, v = _inputs(3, b, t_q, t_k, h, kh, d, jnp.float32)
    modes = np.array([[0, 1, -1, 1], [-1, 1, 0, 1]])
    mask = np.asarray(_random_block_mask(jax.random.key(1), b, h, 5, 7, 0.3, offset_blocks=2))
    kv_len = np.array([56, 50])
    counts, indices = kept_blocks_from_mask(mask)
    out, lse = block_sparse_attention_reference(
        q,
        k,
        v,
        jnp.asarray(modes),
        counts,
        indices,
        kv_lengths=jnp.asarray(kv_len),
        sink_blocks=1,
        local_blocks=2,
        return_lse=True,
        block_q=bs,
        block_k=bs,
    )
    want_out, want_lse = _numpy_attention(
        q, k, v, modes, mask, kv_len, bs=bs, sink=1, local=2, scale=1 / math.sqrt(d)
    )
    valid = (t_k - t_q + np.arange(t_q))[None, :] < kv_len[:, None]
    np.testing.assert_allclose(np.asarray(out)[valid], want_out[valid], atol=1e-5, rtol=1e-5)
    vh = np.broadcast_to(valid[:, None], lse.shape)
    np.testing.assert_allclose(np.asarray(lse)[vh], want_lse[vh], atol=1e-5, rtol=1e-5)


def test_kept_blocks_from_mask_layout():
    mask = jnp.array([[[[1, 0, 1, 0], [0, 0, 0, 0], [1, 1, 1, 1]]]], bool)
    counts, indices = kept_blocks_from_mask(mask)
    np.testing.assert_array_equal(counts[0, 0], [2, 0, 4])
    np.testing.assert_array_equal(indices[0, 0], [[0, 2, 2, 2], [0, 0, 0, 0], [0, 1, 2, 3]])


def test_block_mask_from_modes():
    modes = jnp.array([[0, -1, 1]], jnp.int32)
    sparse = jnp.zeros((1, 3, 6, 6), bool).at[0, 2, 5, jnp.array([0, 3, 5])].set(True)
    counts, indices = kept_blocks_from_mask(sparse)
    mask = np.asarray(
        block_mask_from_modes(
            modes,
            counts,
            indices,
            q_len=6 * 16,
            k_len=6 * 16,
            block_q=16,
            block_k=16,
            sink_blocks=1,
            local_blocks=2,
        )
    )
    np.testing.assert_array_equal(mask[0, 0], np.tril(np.ones((6, 6), bool)))
    want_stream = np.tril(np.ones((6, 6), bool)) & ~np.tril(np.ones((6, 6), bool), -2)
    want_stream[:, 0] = True
    np.testing.assert_array_equal(mask[0, 1], want_stream)
    np.testing.assert_array_equal(mask[0, 2, 5], [1, 0, 0, 1, 0, 1])
    assert not mask[0, 2, :5].any()


# --------------------------------------------------------------------------- kernel vs reference


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_all_kept_equals_dense_causal(dtype):
    b, t, h, kh, d, bs = 1, 192, 4, 2, 64, 64
    full = jnp.broadcast_to(jnp.tril(jnp.ones((3, 3), bool)), (b, h, 3, 3))
    got = _check(
        b=b, t_q=t, h=h, kh=kh, d=d, bs=bs, dtype=dtype, block_mask=full, return_lse=False
    )[0]
    q, k, v = _inputs(0, b, t, t, h, kh, d, dtype)
    dense = jax.nn.dot_product_attention(
        q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), is_causal=True
    )
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(dense), **TOL[dtype])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_only_diagonal(dtype):
    eye = jnp.broadcast_to(jnp.eye(4, dtype=bool), (1, 2, 4, 4))
    _check(t_q=256, dtype=dtype, block_mask=eye)


@pytest.mark.parametrize("density", [0.1, 0.3, 0.7])
def test_random_masks(density):
    _check(seed=int(density * 10), b=2, t_q=320, density=density)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_streaming_heads(dtype):
    _check(t_q=320, h=2, modes=[[-1, -1]], sink=1, local=2, dtype=dtype)


def test_streaming_sink_only_and_wide_sink():
    # local_blocks=0: rows past the sink see only the sink blocks; sink wider than the band.
    _check(t_q=320, h=2, modes=[[-1, -1]], sink=1, local=0)
    _check(t_q=320, h=2, modes=[[-1, -1]], sink=3, local=1)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_mixed_modes_one_call(dtype):
    _check(b=2, t_q=256, h=6, kh=3, modes=[[0, 1, -1, 1, 0, -1], [1, -1, 0, 0, 1, 1]], dtype=dtype)


@pytest.mark.parametrize("group", [1, 2, 4, 8])
def test_gqa_ratios(group):
    _check(seed=group, t_q=192, h=8, kh=8 // group, modes=[[1, 0, -1, 1, 1, -1, 0, 1]])


def test_head_dim_128_block_128():
    _check(
        t_q=384,
        h=2,
        d=128,
        bs=128,
        modes=[[1, -1]],
        config=Config(block_q=64, block_k=64, num_warps=4, num_stages=2),
        local=1,
    )


def test_block_128_tiles_split_both_ways():
    # Kernel tiles smaller than the mask block in both directions (4 q tiles x 4 k tiles).
    _check(
        t_q=300,
        h=3,
        d=64,
        bs=128,
        modes=[[1, 0, -1]],
        local=1,
        config=Config(block_q=32, block_k=32, num_warps=4, num_stages=2),
    )


def test_head_dim_not_power_of_two():
    _check(t_q=128, d=48, modes=[[1, -1]])


@pytest.mark.parametrize("t", [1, 77, 300])
def test_lengths_not_multiple_of_block(t):
    _check(t_q=t, modes=[[1, -1]], config=Config(block_q=64, block_k=32, num_warps=4, num_stages=2))


def test_q_len_shorter_than_kv_len():
    # Chunked prefill: 128 queries at the end of 320 keys (offset 192 = 3 blocks).
    _check(b=2, t_q=128, t_k=320, h=3, kh=1, modes=[[1, 0, -1], [-1, 1, 0]], kv_lengths=[320, 250])


def test_batch_different_lengths():
    _check(b=3, t_q=300, h=2, modes=[[1, -1], [0, 1], [-1, 0]], kv_lengths=[300, 129, 64])


def test_row_with_only_the_sink_block():
    # Rows 2..4 keep only block 0 (no diagonal): their queries see just the sink keys.
    n = 5
    mask = jnp.zeros((1, 2, n, n), bool).at[:, :, :, 0].set(True)
    mask = mask.at[:, :, :2].set(jnp.tril(jnp.ones((2, n), bool)))
    _check(t_q=n * 64, block_mask=mask)


def test_poisoning_detects_a_read_of_a_dropped_block():
    # Guard for the guard: a kernel told to keep blocks that the poisoner drops must fail.
    # One query-block row at the end of 3 key blocks; the poisoner keeps only the diagonal.
    b, h, bs = 1, 1, 64
    q, k, v = _inputs(0, b, bs, 3 * bs, h, h, 32, jnp.float32)
    modes = jnp.ones((b, h), jnp.int32)
    diag = jnp.array([False, False, True]).reshape(1, 1, 1, 3)
    full = jnp.ones((1, 1, 1, 3), bool)
    kv_len = jnp.full((b,), 3 * bs, jnp.int32)
    kp, vp = _poison(
        k, v, modes, *kept_blocks_from_mask(diag), kv_len, t_q=bs, bs=bs, sink=1, local=1
    )
    kw = dict(block_q=bs, implementation="pallas_triton", interpret=True, config=SMALL)
    ok = block_sparse_attention(q, kp, vp, modes, *kept_blocks_from_mask(diag), **kw)
    bad = block_sparse_attention(q, kp, vp, modes, *kept_blocks_from_mask(full), **kw)
    assert np.isfinite(np.asarray(ok)).all()
    assert np.isnan(np.asarray(bad)).all()


def test_no_recompile_when_modes_or_blocks_change():
    b, t, h, bs = 1, 128, 2, 64
    q, k, v = _inputs(0, b, t, t, h, h, 32, jnp.float32)
    kw = dict(block_q=bs, implementation="pallas_triton", interpret=True, config=SMALL)
    m1 = jnp.broadcast_to(jnp.eye(2, dtype=bool), (b, h, 2, 2))
    m2 = jnp.broadcast_to(jnp.tril(jnp.ones((2, 2), bool)), (b, h, 2, 2))
    o1 = block_sparse_attention(q, k, v, jnp.array([[1, 0]]), *kept_blocks_from_mask(m1), **kw)
    size = block_sparse_attention._cache_size()
    o2 = block_sparse_attention(q, k, v, jnp.array([[-1, 1]]), *kept_blocks_from_mask(m2), **kw)
    assert block_sparse_attention._cache_size() == size
    assert not np.allclose(np.asarray(o1), np.asarray(o2))


def test_dense_only_call_without_block_lists():
    b, t, h, kh, d = 1, 160, 4, 2, 32
    q, k, v = _inputs(5, b, t, t, h, kh, d, jnp.float32)
    modes = jnp.array([[0, -1, 0, -1]], jnp.int32)
    kw = dict(block_q=64, sink_blocks=1, local_blocks=1)
    got = block_sparse_attention(
        q, k, v, modes, implementation="pallas_triton", interpret=True, config=SMALL, **kw
    )
    want = block_sparse_attention(q, k, v, modes, implementation="reference", **kw)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), **TOL[jnp.float32])


# --------------------------------------------------------------------------- index math


def _lower_triton_ir(b, t, h, kh, d, bs):
    sd = jax.ShapeDtypeStruct
    n = t // bs
    args = (
        sd((b, t, h, d), jnp.bfloat16),
        sd((b, t, kh, d), jnp.bfloat16),
        sd((b, t, kh, d), jnp.bfloat16),
        sd((b, h), jnp.int32),
        sd((b, h, n), jnp.int32),
        sd((b, h, n, n), jnp.int32),
        sd((b,), jnp.int32),
    )

    def f(*a):
        return block_sparse_attention_triton(
            *a,
            q_offset=0,
            sm_scale=0.1,
            block_size=bs,
            sink_blocks=1,
            local_blocks=8,
            return_lse=True,
            config=Config(),
            interpret=False,
            debug=True,
        )

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",))
    text = buf.getvalue()
    return text[text.index("The Triton module") :]


def _addptr_offset_types(ir_text):
    """Offset element types of every pointer add on a bf16 (q/k/v/out) tensor of pointers."""
    pat = re.compile(r"tt\.addptr [^:]+: tensor<[0-9x]+x!tt\.ptr<bf16>>, tensor<[0-9x]+x(i\d+)>")
    return set(pat.findall(ir_text))


def test_index_math_is_64_bit_past_2_pow_31_elements():
    """Lower (no allocation) the GPU kernel for q with 3 * 2**32 elements and K/V with
    3 * 2**30 > 2**31: every q/k/v/out pointer offset must be computed in i64. A small shape
    lowers with i32 offsets, which shows the check can tell them apart."""
    big = _addptr_offset_types(_lower_triton_ir(3, 1 << 20, 32, 8, 128, 128))
    small = _addptr_offset_types(_lower_triton_ir(1, 1024, 4, 2, 128, 128))
    assert big == {"i64"}, big
    assert small == {"i32"}, small


# --------------------------------------------------------------------------- config and errors


def test_config_validation():
    with pytest.raises(ValueError, match="block_q=96"):
        Config(block_q=96)
    with pytest.raises(ValueError, match="num_warps=3"):
        Config(num_warps=3)
    with pytest.raises(ValueError, match="num_stages=0"):
        Config(num_stages=0)
    with pytest.raises(ValueError, match="must divide the mask block size 64"):
        Config(block_q=128).check_divides(64)
    with pytest.raises(ValueError, match="block_k=32"):
        MosaicConfig(block_k=32)
    with pytest.raises(ValueError, match="exclusive"):
        MosaicConfig(persistent=True, heads_per_cta=2)
    with pytest.raises(ValueError, match="heads_per_cta=0"):
        MosaicConfig(heads_per_cta=0)


def test_lookup_config_falls_back_to_heuristic():
    cfg = lookup_config(
        "no_such_device",
        backend="pallas_triton",
        batch=1,
        q_heads=32,
        kv_heads=8,
        seq_len=4096,
        head_dim=128,
        dtype="bfloat16",
        block_size=128,
    )
    assert isinstance(cfg, Config) and 128 % cfg.block_q == 0 and 128 % cfg.block_k == 0


def test_api_errors():
    q, k, v = _inputs(0, 1, 64, 64, 4, 2, 32, jnp.float32)
    modes = jnp.zeros((1, 4), jnp.int32)
    with pytest.raises(ValueError, match="head_modes.shape"):
        block_sparse_attention(q, k, v, jnp.zeros((1, 3), jnp.int32))
    with pytest.raises(ValueError, match="must divide query heads"):
        block_sparse_attention(q, k[:, :, :1].repeat(3, 2), v[:, :, :1].repeat(3, 2), modes)
    with pytest.raises(ValueError, match="Tq <= Tk"):
        block_sparse_attention(q, k[:, :32], v[:, :32], modes)
    with pytest.raises(ValueError, match="implementation="):
        block_sparse_attention(q, k, v, modes, implementation="triton")
    with pytest.raises(ValueError, match="block_counts.shape"):
        block_sparse_attention(
            q,
            k,
            v,
            modes,
            jnp.ones((1, 4, 2), jnp.int32),
            jnp.zeros((1, 4, 2, 1), jnp.int32),
            block_q=16,
        )
    with pytest.raises(ValueError, match="multiple of the block size"):
        block_sparse_attention(q[:, :40], k, v, modes, block_q=16, implementation="pallas_triton")
    with pytest.raises(ValueError, match="not both 0"):
        block_sparse_attention(q, k, v, modes, sink_blocks=0, local_blocks=0)


# --------------------------------------------------------------------------- GPU


def _gpu():
    return jax.default_backend() == "gpu"


GPU_CASES = [
    ("pallas_triton", None),
    ("pallas_mosaic_gpu", MosaicConfig()),
    ("pallas_mosaic_gpu", MosaicConfig(persistent=True)),
    ("pallas_mosaic_gpu", MosaicConfig(heads_per_cta=4)),
    ("pallas_mosaic_gpu", MosaicConfig(block_k=64, num_stages=3, heads_per_cta=2)),
]


@pytest.mark.gpu
@pytest.mark.skipif(not _gpu(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("implementation,config", GPU_CASES)
def test_gpu_vs_reference_and_cudnn(implementation, config):
    b, t, h, kh, d, bs = 2, 2048, 8, 2, 128, 128
    q, k, v = _inputs(0, b, t, t, h, kh, d, jnp.bfloat16)
    n = t // bs
    mask = _random_block_mask(jax.random.key(1), b, h, n, n, 0.3)
    counts, indices = kept_blocks_from_mask(mask)
    modes = jnp.array([[0, 1, -1, 1, 1, 0, -1, 1]] * b, jnp.int32)
    kv_len = jnp.array([t, 1500], jnp.int32)
    kw = dict(kv_lengths=kv_len, sink_blocks=1, local_blocks=4, return_lse=True)
    got = block_sparse_attention(
        q, k, v, modes, counts, indices, implementation=implementation, config=config, **kw
    )
    want = block_sparse_attention(q, k, v, modes, counts, indices, implementation="reference", **kw)
    valid = np.asarray(jnp.arange(t)[None, :] < kv_len[:, None])
    np.testing.assert_allclose(
        np.asarray(got[0], np.float32)[valid],
        np.asarray(want[0], np.float32)[valid],
        **TOL[jnp.bfloat16],
    )
    vh = np.broadcast_to(valid[:, None], got[1].shape)
    np.testing.assert_allclose(np.asarray(got[1])[vh], np.asarray(want[1])[vh], atol=2e-3)
    # Chunked prefill: the last 768 queries of the 2048 keys, without LSE.
    tq = 768
    mask_c = _random_block_mask(
        jax.random.key(2), b, h, tq // bs, n, 0.2, offset_blocks=(t - tq) // bs
    )
    kw_c = dict(kv_lengths=kv_len, sink_blocks=2, local_blocks=3)
    lists = kept_blocks_from_mask(mask_c)
    got_c = block_sparse_attention(
        q[:, t - tq :], k, v, modes, *lists, implementation=implementation, config=config, **kw_c
    )
    want_c = block_sparse_attention(
        q[:, t - tq :], k, v, modes, *lists, implementation="reference", **kw_c
    )
    valid_c = valid[:, t - tq :]
    np.testing.assert_allclose(
        np.asarray(got_c, np.float32)[valid_c],
        np.asarray(want_c, np.float32)[valid_c],
        **TOL[jnp.bfloat16],
    )
    # All kept == cuDNN dense causal.
    full = jnp.broadcast_to(jnp.tril(jnp.ones((n, n), bool)), (b, h, n, n))
    ours = block_sparse_attention(
        q,
        k,
        v,
        jnp.ones((b, h), jnp.int32),
        *kept_blocks_from_mask(full),
        implementation=implementation,
        config=config,
    )
    cudnn = block_sparse_attention(q, k, v, jnp.zeros((b, h), jnp.int32), implementation="cudnn")
    np.testing.assert_allclose(
        np.asarray(ours, np.float32), np.asarray(cudnn, np.float32), **TOL[jnp.bfloat16]
    )
