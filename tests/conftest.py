"""Shared fixtures: tiny random HF checkpoints built on CPU with transformers, converted once per
test session (nothing is downloaded)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# One XLA compilation cache per test run, set up by the process pytest starts (the xdist
# controller) and inherited by both workers and every subprocess (notebook kernels, benchmark
# children, the sharding worker), which compile many of the same tiny-model steps: about 15% of
# the suite's time. Only compiles of 1 s or more are stored (JAX's default), so the
# compile-counting tests still see their small functions compile. Removed at the end of the run.
_OWN_XLA_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _OWN_XLA_CACHE:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="elastic_jax_tests_xla_")

import pytest  # noqa: E402


def pytest_sessionfinish(session):
    if _OWN_XLA_CACHE and not hasattr(session.config, "workerinput"):  # the controller
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


def _key(kwargs: dict) -> str:
    return json.dumps(kwargs, sort_keys=True, default=str)


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    """Factory: ``tiny_checkpoints(dtype="float32", family="qwen3", **config_overrides) ->
    (hf_dir, converted_dir)`` (family "llama": a tiny Llama-3.x). Each distinct argument set is
    built and converted once per session."""
    from convert.hf_to_jax import convert
    from elastic_jax.testing.tiny import make_tiny_llama, make_tiny_qwen3

    built: dict[str, tuple] = {}

    def make(dtype: str = "float32", seed: int = 0, family: str = "qwen3", **overrides):
        key = _key({"dtype": dtype, "seed": seed, "family": family, **overrides})
        if key not in built:
            root = tmp_path_factory.mktemp("tiny")
            maker = make_tiny_llama if family == "llama" else make_tiny_qwen3
            hf_dir = maker(root / "hf", seed=seed, dtype=dtype, **overrides)
            conv = convert(
                hf_dir,
                root / "converted",
                dtype="fp32" if dtype == "float32" else "bf16",
                progress=False,
            )
            built[key] = (hf_dir, conv)
        return built[key]

    return make


@pytest.fixture(scope="session")
def tiny_qwen3(tiny_checkpoints):
    """The default tiny Qwen3 (fp32, tied embeddings, 4 q heads / 2 kv heads)."""
    return tiny_checkpoints()


@pytest.fixture(scope="session")
def tiny_paw_checkpoints(tmp_path_factory):
    """Factory: ``tiny_paw_checkpoints(elastic=None, **kwargs) -> (hf_dir, converted_dir)`` for a
    tiny PawQwen3 checkpoint (fp32), built and converted once per argument set."""
    from convert.hf_to_jax import convert
    from elastic_jax.testing.tiny_elastic import make_tiny_pawqwen3

    built: dict[str, tuple] = {}

    def make(elastic: dict | None = None, seed: int = 0, **kwargs):
        key = _key({"elastic": elastic, "seed": seed, **kwargs})
        if key not in built:
            root = tmp_path_factory.mktemp("tiny_paw")
            hf_dir = make_tiny_pawqwen3(root / "hf", seed=seed, elastic=elastic, **kwargs)
            conv = convert(hf_dir, root / "converted", dtype="fp32", progress=False)
            built[key] = (hf_dir, conv)
        return built[key]

    return make
