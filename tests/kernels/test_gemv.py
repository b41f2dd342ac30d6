"""pallas_kernels.gemv: the stacked-weight decode GEMV (interpret mode) against its reference."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.gemv import GemvConfig, default_config, stacked_gemv, stacked_gemv_reference


def _inputs(B, K, N, L, dtype=jnp.bfloat16, seed=0):
    kx, kw = jax.random.split(jax.random.PRNGKey(seed))
    return jax.random.normal(kx, (B, K), dtype), jax.random.normal(kw, (L, K, N), dtype)


@pytest.mark.parametrize(
    "B,K,N,L,config",
    [
        (1, 256, 192, 3, None),
        (2, 512, 256, 2, GemvConfig(block_n=64, block_k=32, splits=4)),
        (16, 256, 128, 2, GemvConfig(block_n=128, block_k=64, splits=1)),
        (17, 128, 64, 1, None),  # rows padded to 32
        (1, 256, 192, 3, GemvConfig(block_n=64, block_k=64, splits=2, rows_in_kernel=True)),
        (3, 512, 128, 2, GemvConfig(block_n=128, block_k=32, splits=4, rows_in_kernel=True)),
        (17, 128, 64, 2, GemvConfig(block_n=32, block_k=64, splits=1, rows_in_kernel=True)),
        (1, 256, 128, 3, GemvConfig(block_n=64, block_k=32, splits=2, tensor_cores=False)),
        (1, 512, 64, 2, GemvConfig(block_n=64, block_k=64, splits=1, tensor_cores=False)),
    ],
)
def test_matches_reference(B, K, N, L, config):
    x, w = _inputs(B, K, N, L)
    for layer in {0, L - 1}:
        got = stacked_gemv(x, w, layer, config=config, interpret=True)
        want = stacked_gemv_reference(x, w, layer)
        assert got.shape == (B, N) and got.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-5, atol=2e-4)
    # The layer really selects: another layer's product differs.
    if L > 1:
        other = stacked_gemv_reference(x, w, 0 if layer else 1)
        assert not np.allclose(np.asarray(got), np.asarray(other), atol=1e-2)


def test_default_config_divides_and_fills_the_gpu():
    for K, N in ((4096, 2560), (4096, 4096), (2560, 9728), (256, 192)):
        c = default_config(K, N)
        assert N % c.block_n == 0 and K % (c.splits * c.block_k) == 0
    c = default_config(4096, 2560)  # 4B out-projection: 20 column blocks x 16 splits
    assert (2560 // c.block_n) * c.splits >= 256


def test_bad_input_is_named():
    x, w = _inputs(2, 256, 128, 2)
    with pytest.raises(ValueError, match="K=256 columns"):
        stacked_gemv(x, w[:, :128], 0, interpret=True)
    with pytest.raises(ValueError, match="layer=2"):
        stacked_gemv(x, w, 2, interpret=True)
    with pytest.raises(ValueError, match="block_n"):
        stacked_gemv(x, w, 0, config=GemvConfig(block_n=96), interpret=True)
    with pytest.raises(ValueError, match="multiple of 16"):
        stacked_gemv(x[:, :100], w[:, :100], 0, interpret=True)
    with pytest.raises(ValueError, match="one row"):
        stacked_gemv(x, w, 0, config=GemvConfig(block_n=64, tensor_cores=False), interpret=True)
    with pytest.raises(ValueError, match="implementation"):
        stacked_gemv(x, w, 0, implementation="cuda")


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")
@pytest.mark.parametrize("B,K,N", [(1, 4096, 2560), (8, 4096, 4096), (16, 9728, 2560)])
@pytest.mark.parametrize("rows_in_kernel", [False, True])
def test_gpu_matches_reference(B, K, N, rows_in_kernel):
    """Compiled on the GPU at the Qwen3 4B/8B out- and down-projection sizes, 36 layers, with
    x's rows padded by XLA or inside the kernel."""
    x, w = _inputs(B, K, N, 36)
    cfg = dataclasses.replace(default_config(K, N), rows_in_kernel=rows_in_kernel)
    for layer in (0, 35):
        got = stacked_gemv(x, w, layer, config=cfg)
        want = stacked_gemv_reference(x, w, layer)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-3, atol=2e-2)


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")
@pytest.mark.parametrize("block_k", [32, 64])
def test_gpu_cuda_core_path_matches_reference(block_k):
    """The one-row CUDA-core path compiled at the 4B out-projection size."""
    x, w = _inputs(1, 4096, 2560, 36)
    cfg = GemvConfig(block_n=128, block_k=block_k, splits=8, tensor_cores=False)
    for layer in (0, 35):
        got = stacked_gemv(x, w, layer, config=cfg)
        want = stacked_gemv_reference(x, w, layer)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-3, atol=2e-2)


def test_table_entry_wins_over_the_default(tmp_path, monkeypatch):
    import json

    from pallas_kernels import autotune
    from pallas_kernels.gemv import get_config, shape_key

    kind = "test_gpu_gemv_table"
    (tmp_path / kind).mkdir()
    tuned = {"block_n": 32, "block_k": 64, "splits": 2, "num_warps": 8, "num_stages": 3}
    (tmp_path / kind / "gemv.json").write_text(
        json.dumps({"configs": {shape_key(1, 256, 128, jnp.bfloat16): {"config": tuned}}})
    )
    monkeypatch.setattr(autotune, "TABLE_DIR", str(tmp_path))
    assert get_config(1, 256, 128, jnp.bfloat16, kind) == GemvConfig(**tuned)
    assert get_config(2, 256, 128, jnp.bfloat16, kind) == default_config(256, 128)  # no entry
    assert get_config(1, 256, 128, jnp.bfloat16, None) == default_config(256, 128)


def test_sweep_benchmark_writes_a_table(tmp_path):
    import json

    from benchmarks import bench_gemv

    out, table = tmp_path / "gemv.json", tmp_path / "table.json"
    bench_gemv.main(
        ["--shapes", "128x64", "--batches", "1,3", "--layers", "3", "--cycle", "2", "--reps", "1",
         "--block-n", "32,64", "--block-k", "64", "--splits", "1,2", "--warps", "4",
         "--out", str(out), "--table", str(table)]
    )  # fmt: skip
    rows = json.loads(out.read_text())["rows"]
    assert {r["impl"] for r in rows} >= {"xla", "pallas default", "pallas"}
    assert all(r["us"] > 0 for r in rows if "error" not in r)
    # per shape, the best tensor-core config is timed again with its rows padded in the kernel
    assert {r["B"] for r in rows if r.get("config", {}).get("rows_in_kernel")} == {1, 3}
    configs = json.loads(table.read_text())["configs"]
    assert set(configs) == {"B=1,K=128,N=64,bfloat16", "B=3,K=128,N=64,bfloat16"}
    for entry in configs.values():
        GemvConfig(**entry["config"])  # readable by get_config


# ----------------------------------------------- out-projection fed by attention split partials


def _attn_partials(B, lengths, splits, dtype, seed=0, implementation="pallas"):
    """Paged decode attention partials (H=8 query heads over K=2 kv heads, D=32, with the
    decoded token as an extra key) and the merged output of the reference, [B, H*D]."""
    from pallas_kernels.paged_decode import paged_decode_partials, paged_decode_reference
    from tests.kernels.test_paged_decode import Case, make_inputs

    case = Case(B, 2, 4, 32, 16, 8, 8 * B, dtype)
    q, k, v, table, lens = make_inputs(case, lengths, seed, poison=True)
    kx, vx = (jax.random.normal(jax.random.PRNGKey(seed + i), (B, 2, 32), dtype) for i in (1, 2))
    parts = paged_decode_partials(
        q, k, v, table, lens, k_extra=kx, v_extra=vx, num_splits=splits,
        implementation=implementation, interpret=True,
    )  # fmt: skip
    o = paged_decode_reference(q, k, v, table, lens, k_extra=kx, v_extra=vx)
    return parts, o.reshape(B, -1)


@pytest.mark.parametrize(
    "B,lengths,splits,gemv_splits",
    [(1, [70], 3, 8), (3, [0, 128, 37], 4, 2), (2, [5, 100], 1, 1), (17, [9] * 17, 2, 4)],
)
def test_attn_out_projection_matches_merge_then_gemv(B, lengths, splits, gemv_splits):
    """Kernel partials (zero-length rows, uneven and single splits, 16+ rows) merged inside the
    GEMV equal the reference attention output times w[layer], f32 end to end."""
    from pallas_kernels.gemv import stacked_gemv_attn

    (acc, m, l), o = _attn_partials(B, lengths, splits, jnp.float32)
    assert acc.shape[2] == splits
    w = jax.random.normal(jax.random.PRNGKey(5), (2, 8 * 32, 64), jnp.float32)
    cfg = GemvConfig(block_n=32, block_k=32, splits=gemv_splits)
    for layer in (0, 1):
        got = stacked_gemv_attn(acc, m, l, w, layer, config=cfg, interpret=True)
        want = stacked_gemv_reference(o, w, layer)
        assert got.shape == (B, 64) and got.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-4)
        ref = stacked_gemv_attn(acc, m, l, w, layer, implementation="reference")
        np.testing.assert_allclose(np.asarray(ref), np.asarray(want), rtol=1e-5, atol=1e-4)


def test_attn_out_projection_bf16_and_reference_partials():
    """bf16 (the merged output is rounded to bf16 before the dot, as the unfused path), and the
    reference's one-split partials through the same kernel."""
    from pallas_kernels.gemv import stacked_gemv_attn

    w = jax.random.normal(jax.random.PRNGKey(6), (3, 8 * 32, 128), jnp.bfloat16)
    for impl in ("pallas", "reference"):
        (acc, m, l), o = _attn_partials(2, [40, 77], 4, jnp.bfloat16, implementation=impl)
        got = stacked_gemv_attn(acc, m, l, w, 2, interpret=True)
        want = stacked_gemv_reference(o, w, 2)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-2, atol=0.3)


def test_attn_out_projection_bad_input_is_named():
    from pallas_kernels.gemv import stacked_gemv_attn

    (acc, m, l), _ = _attn_partials(1, [20], 2, jnp.float32)
    w = jnp.zeros((2, 8 * 32, 64), jnp.float32)
    with pytest.raises(ValueError, match="m and l must be"):
        stacked_gemv_attn(acc, m[:, :, :1], l, w, 0)
    with pytest.raises(ValueError, match="float32"):
        stacked_gemv_attn(acc.astype(jnp.bfloat16), m, l, w, 0)
    with pytest.raises(ValueError, match="H\\*D"):
        stacked_gemv_attn(acc, m, l, w[:, :200], 0)
    with pytest.raises(ValueError, match="layer=2"):
        stacked_gemv_attn(acc, m, l, w, 2)


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")
@pytest.mark.parametrize("B,K,E", [(1, 8, 2560), (8, 8, 4096)])
def test_gpu_attn_out_projection_matches_reference(B, K, E):
    """Compiled on the GPU at the Qwen3 4B / 8B decode shapes (32 heads over K kv heads, D=128,
    a 4K-token paged cache, 36 stacked layers): the paged kernel's partials merged inside the
    out-projection equal the merged kernel output times w[layer]."""
    from pallas_kernels.gemv import stacked_gemv_attn
    from pallas_kernels.paged_decode import paged_decode_attention, paged_decode_partials

    H, D, N, T = 32, 128, 128, 4096
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    q = jax.random.normal(keys[0], (B, H, D), jnp.bfloat16)
    k = jax.random.normal(keys[1], (K, B * T // N, N, D), jnp.bfloat16)
    v = jax.random.normal(keys[2], (K, B * T // N, N, D), jnp.bfloat16)
    table = jnp.arange(B * T // N, dtype=jnp.int32).reshape(B, T // N)
    lengths = jnp.asarray([T - 37 * b for b in range(B)], jnp.int32)
    w = jax.random.normal(keys[3], (36, H * D, E), jnp.bfloat16)
    for splits in (1, 8):
        acc, m, l = paged_decode_partials(q, k, v, table, lengths, num_splits=splits)
        o = paged_decode_attention(q, k, v, table, lengths, num_splits=splits)
        for layer in (0, 35):
            got = stacked_gemv_attn(acc, m, l, w, layer)
            want = stacked_gemv_reference(o.reshape(B, H * D), w, layer)
            np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-2, atol=0.05)
