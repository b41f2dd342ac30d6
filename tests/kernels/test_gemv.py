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
