"""Tensor-parallel sharding (``elastic_jax.sharding``) on fake CPU devices.

XLA_FLAGS=--xla_force_host_platform_device_count must be set before jax initialises, and the other
tests share this process (``jax.config.update("jax_num_cpu_devices", 8)`` raises once a backend
exists), so the multi-device runs happen in ONE subprocess: this file run as a script
(``_worker``). For every case the worker loads a tiny checkpoint twice, on one device and on a
mesh, runs prefill + greedy decode steps (jitted engine steps) and ``generate()`` with both, and
writes the raw results; the tests here compare them. Checkpoints are built in this process by the
shared session fixtures.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

WORKER_DEVICES = 8
XATTN_STREAMING = {"retrieval_mode": "xattn", "toggle_type": "streaming"}

# name -> checkpoint (kind, kv heads; always 8 query heads), mesh (data, model), runtime options,
# prompt bucket T, whether to also run generate().
CASES: dict[str, dict] = {
    "qwen_k4_tp4": dict(kind="qwen", kv=4, mesh=(1, 4), mode="elastic", impl="reference", T=256),
    "paw_k4_tp4_elastic": dict(
        kind="paw", kv=4, mesh=(1, 4), mode="elastic", impl="reference", T=512
    ),
    # GQA with fewer kv heads than devices: 2 kv heads replicated 4x over 8 devices, 1 q head each.
    "paw_k2_tp8_elastic": dict(
        kind="paw", kv=2, mesh=(1, 8), mode="elastic", impl="reference", T=512, generate=False
    ),
    # Batch over the data axis (generate() of one prompt: batch 1 cannot be split, replicated).
    "paw_k4_dp2_tp2_dense": dict(
        kind="paw", kv=4, mesh=(2, 2), mode="dense", impl="reference", T=256, shard_model=True
    ),
    # The GPU code path: Pallas Triton kernels (interpret mode) inside shard_map.
    "paw_k4_tp2_pallas": dict(
        kind="paw", kv=4, mesh=(1, 2), mode="elastic", impl="pallas", T=384, generate=False
    ),
}
ELASTIC_CASES = [n for n, c in CASES.items() if c["kind"] == "paw" and c["mode"] == "elastic"]
GENERATE_CASES = [n for n, c in CASES.items() if c.get("generate", True)]
DECODE_STEPS = 2
GENERATE_TOKENS = 5

# fp32 tiny models: the sharded run only changes summation order (all-reduce of partial sums).
LOGITS_ATOL = 1e-5
LOGITS_RTOL = 1e-5


# ------------------------------------------------------------------------------ worker


def _prompts(T: int) -> tuple[np.ndarray, np.ndarray]:
    """Two right-padded prompts of T - 20 and T - 150 tokens: tokens int32 [2, T], lengths [2].
    For a power-of-two T >= 128 this is exactly the bucket ``generate()`` pads them to, so its
    prefill reuses the compiled step."""
    rng = np.random.default_rng(3)
    lengths = np.array([T - 20, T - 150], np.int32)
    tokens = rng.integers(3, 500, (2, T)).astype(np.int32)
    tokens[np.arange(T)[None, :] >= lengths[:, None]] = 0
    return tokens, lengths


def _prefill_decode(model, tokens: np.ndarray, lengths: np.ndarray, steps: int):
    """Jitted engine prefill + ``steps`` greedy decode steps, with the cache ``generate()`` would
    allocate. Returns (logits float32 [1 + steps, B, V], stats of prefill, cache at the end)."""
    import jax.numpy as jnp

    from elastic_jax import engine, kv_cache, sharding

    cfg, rt = model.config, model.runtime
    B = tokens.shape[0]
    capacity = engine.capacity_bucket(int(lengths.max()) + GENERATE_TOKENS, rt.page_size)
    if model.mesh is None:
        cache = kv_cache.create(cfg, B, capacity, page_size=rt.page_size)
    else:
        cache = sharding.create_cache(cfg, B, capacity, model.mesh, page_size=rt.page_size)
    with sharding.mesh_context(model.mesh):
        logits, cache, stats = engine.prefill_step(
            model.params, cache, jnp.asarray(tokens), jnp.asarray(lengths), cfg, rt
        )
        out = [np.asarray(logits)]
        for _ in range(steps):
            tok = jnp.argmax(logits, axis=-1).astype(jnp.int32)
            logits, cache = engine.decode_step(model.params, cache, tok, cfg, rt)
            out.append(np.asarray(logits))
    return np.stack(out), {k: np.asarray(v) for k, v in stats.items()}, cache


def _collective_counts(model, tokens, lengths) -> dict:
    """shard_map regions in the traced prefill / decode and all-gathers in the compiled prefill
    (0: no weight or KV is gathered)."""
    import jax
    import jax.numpy as jnp

    from elastic_jax import engine, sharding
    from elastic_jax import model as model_lib

    cfg, rt = model.config, model.runtime
    # The shapes of _prefill_decode, so that compiling the prefill step hits jit's cache.
    capacity = engine.capacity_bucket(int(lengths.max()) + GENERATE_TOKENS, rt.page_size)
    cache = sharding.create_cache(
        cfg, tokens.shape[0], capacity, model.mesh, page_size=rt.page_size
    )
    args = (model.params, cache, jnp.asarray(tokens), jnp.asarray(lengths))
    with sharding.mesh_context(model.mesh):
        pre = jax.make_jaxpr(model_lib.prefill, static_argnums=(4, 5))(*args, cfg, rt)
        dec = jax.make_jaxpr(model_lib.decode, static_argnums=(3, 4))(
            model.params, cache, args[2][:, 0], cfg, rt
        )
        hlo = engine.prefill_step.lower(*args, cfg, rt).compile().as_text()
    return {
        "prefill_shard_maps": str(pre).count("shard_map"),
        "decode_shard_maps": str(dec).count("shard_map"),
        "prefill_all_gathers": hlo.count(" all-gather(") + hlo.count(" all-gather-start("),
        "prefill_all_reduces": hlo.count(" all-reduce(") + hlo.count(" all-reduce-start("),
    }


def _spec(x) -> list:
    """A placed array's PartitionSpec as a list, padded with None to its rank."""
    spec = list(x.sharding.spec)
    return spec + [None] * (x.ndim - len(spec))


def _worker(spec_path: str, out_path: str) -> None:
    import jax

    from elastic_jax import generate, load_model, sharding
    from elastic_jax.params import init_random

    spec = json.loads(Path(spec_path).read_text())
    arrays: dict[str, np.ndarray] = {}
    meta: dict[str, dict] = {"num_devices": len(jax.devices())}
    for name, case in spec.items():
        decode_impl = "pallas" if case["impl"] == "pallas" else "reference"
        opts = dict(
            attention_mode=case["mode"],
            prefill_impl=case["impl"],
            decode_impl=decode_impl,
            page_size=64,
        )
        single = load_model(case["path"], **opts).with_runtime(collect_masks=True)
        mesh = sharding.make_mesh(case["mesh"][1], case["mesh"][0])
        if case.get("shard_model"):  # shard an already loaded model
            tp = sharding.shard_model(single, mesh)
        else:  # restore straight into the shardings
            tp = load_model(case["path"], mesh=mesh, **opts).with_runtime(collect_masks=True)
        tokens, lengths = _prompts(case["T"])
        info: dict = {}
        for tag, model in (("single", single), ("mesh", tp)):
            logits, stats, cache = _prefill_decode(model, tokens, lengths, DECODE_STEPS)
            arrays[f"{name}/{tag}/logits"] = logits
            for key, value in stats.items():
                arrays[f"{name}/{tag}/stats/{key}"] = value
            info[tag] = {
                "cache_shape": list(cache.k.shape),
                "cache_spec": _spec(cache.k) if tag == "mesh" else None,
            }
            if case.get("generate", True):
                prompts = [t[:n].tolist() for t, n in zip(tokens, lengths)]
                res = generate(model, prompts, max_new_tokens=GENERATE_TOKENS, return_info=True)
                info[tag]["generate"] = res.token_ids
                info[tag]["prefill_info"] = res.prefill_info
                if case["mesh"][0] > 1:
                    # A batch of 1 cannot be split over the data axis: replicated there.
                    one = generate(model, prompts[:1], max_new_tokens=3)
                    info[tag]["generate_one"] = one.token_ids
        for field in ("wq", "wk", "wo", "w_down"):
            info[f"{field}_spec"] = _spec(getattr(tp.params.layers, field))
        if name == "qwen_k4_tp4":
            info["collectives"] = _collective_counts(tp, tokens, lengths)
            key = jax.random.PRNGKey(5)
            ref = jax.jit(init_random, static_argnums=0)(single.config, key)
            sharded = sharding.random_params(single.config, key, mesh)
            info["random_params_equal"] = all(
                bool(np.array_equal(x, y))
                for x, y in zip(jax.tree.leaves(ref), jax.tree.leaves(sharded))
            )
            info["random_params_wq_spec"] = _spec(sharded.layers.wq)
        meta[name] = info
    np.savez(out_path, **arrays)
    Path(out_path).with_suffix(".json").write_text(json.dumps(meta))


# ------------------------------------------------------------------------------ fixtures


def _run_cases(spec: dict, tmp: Path) -> None:
    """Run every case in one subprocess with fake devices; it writes results.npz/.json in tmp."""
    spec_path, out_path = tmp / "spec.json", tmp / "results.npz"
    spec_path.write_text(json.dumps(spec))
    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ)
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={WORKER_DEVICES}"
    )
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(repo), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), str(spec_path), str(out_path)],
        env=env,
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, f"worker failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-6000:]}"


def _load(tmp: Path):
    out_path = tmp / "results.npz"
    return dict(np.load(out_path)), json.loads(out_path.with_suffix(".json").read_text())


@pytest.fixture(scope="module")
def results(tiny_checkpoints, tiny_paw_checkpoints, tmp_path_factory):
    """Build the checkpoints here, run every case in one subprocess with fake devices. Under
    pytest-xdist the workers share one run (~100 s on 2 cores): the first to take the lock in the
    run's common temp dir runs it, the others read its files."""
    spec = {}
    for name, case in CASES.items():
        heads = {"num_attention_heads": 8, "num_key_value_heads": case["kv"]}
        if case["kind"] == "qwen":
            _, conv = tiny_checkpoints(**heads)
        else:
            _, conv = tiny_paw_checkpoints(elastic=XATTN_STREAMING, **heads)
        spec[name] = {**case, "path": str(conv)}
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        tmp = tmp_path_factory.mktemp("sharding")
        _run_cases(spec, tmp)
        return _load(tmp)
    import fcntl

    shared = tmp_path_factory.getbasetemp().parent  # <run>/popen-gwN -> <run>, one per run
    with open(shared / "sharding.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        done = shared / "sharding_results"
        if not (done / "results.json").exists():
            done.mkdir(exist_ok=True)
            _run_cases(spec, done)
        return _load(done)


# ------------------------------------------------------------------------------ tests


def test_worker_saw_fake_devices(results):
    _, meta = results
    assert meta["num_devices"] == WORKER_DEVICES


@pytest.mark.parametrize("name", list(CASES))
def test_prefill_and_decode_logits_match_single_device(results, name):
    arrays, _ = results
    single, mesh = arrays[f"{name}/single/logits"], arrays[f"{name}/mesh/logits"]
    assert single.shape == mesh.shape == (1 + DECODE_STEPS, 2, 512)
    assert np.all(np.isfinite(single)) and np.abs(single).max() > 0.1  # not a degenerate output
    np.testing.assert_allclose(mesh, single, atol=LOGITS_ATOL, rtol=LOGITS_RTOL)


@pytest.mark.parametrize("name", GENERATE_CASES)
def test_greedy_generate_identical(results, name):
    _, meta = results
    single, mesh = meta[name]["single"], meta[name]["mesh"]
    assert [len(t) for t in single["generate"]] == [GENERATE_TOKENS] * 2
    assert mesh["generate"] == single["generate"]
    if CASES[name]["mesh"][0] > 1:
        assert len(single["generate_one"][0]) == 3
        assert mesh["generate_one"] == single["generate_one"]


@pytest.mark.parametrize("name", ELASTIC_CASES)
def test_router_decisions_modes_and_blocks_identical(results, name):
    arrays, meta = results
    for key in ("modes", "router_class", "kept_blocks", "causal_blocks", "block_mask"):
        single = arrays[f"{name}/single/stats/{key}"]
        mesh = arrays[f"{name}/mesh/stats/{key}"]
        assert mesh.shape == single.shape, key
        np.testing.assert_array_equal(mesh, single, err_msg=key)
    # The case is meaningful only if the router mixes streaming and XAttention heads.
    assert set(np.unique(arrays[f"{name}/single/stats/modes"])) == {-1, 1}
    cfg_kv = CASES[name]["kv"]
    assert arrays[f"{name}/mesh/stats/router_class"].shape[-1] == cfg_kv  # not the replicas
    if name in GENERATE_CASES:
        assert meta[name]["mesh"]["prefill_info"] == meta[name]["single"]["prefill_info"]


def test_parameter_and_cache_layouts(results):
    _, meta = results
    tp4 = meta["qwen_k4_tp4"]
    assert tp4["wq_spec"] == [None, None, "model", None]
    assert tp4["wk_spec"] == [None, None, "model", None]
    assert tp4["wo_spec"] == [None, "model", None, None]
    assert tp4["w_down_spec"] == [None, "model", None]
    assert tp4["mesh"]["cache_shape"] == tp4["single"]["cache_shape"]  # K=4 heads, 1 per device
    assert tp4["mesh"]["cache_spec"] == [None, "model", None, None, None]
    # K=2 < 8 devices: wk/wv replicated, the cache holds 8 kv heads (each one 4x), 1 per device.
    rep = meta["paw_k2_tp8_elastic"]
    assert rep["wk_spec"] == [None, None, None, None]
    assert rep["single"]["cache_shape"][1] == 2 and rep["mesh"]["cache_shape"][1] == 8
    assert rep["mesh"]["cache_spec"] == [None, "model", None, None, None]


def test_random_params_generated_sharded(results):
    _, meta = results
    assert meta["qwen_k4_tp4"]["random_params_equal"] is True
    assert meta["qwen_k4_tp4"]["random_params_wq_spec"] == [None, None, "model", None]


def test_attention_runs_in_shard_map_without_gathers(results):
    _, meta = results
    c = meta["qwen_k4_tp4"]["collectives"]
    assert c["prefill_shard_maps"] >= 1  # one in the scanned layer body
    assert c["decode_shard_maps"] >= 2  # one per (unrolled) layer
    assert c["prefill_all_gathers"] == 0  # no weight / KV gathered
    assert c["prefill_all_reduces"] >= 3  # embedding + attention out + MLP down


# ------------------------------------------------------------- errors (this process, 1 device)


def _cfg(heads: int, kv: int):
    from elastic_jax.config import config_from_hf
    from elastic_jax.testing.tiny import TINY_QWEN3, hf_config_dict

    hf = hf_config_dict(num_attention_heads=heads, num_key_value_heads=kv, head_dim=16)
    hf["architectures"] = ["Qwen3ForCausalLM"]
    assert TINY_QWEN3["hidden_size"] == 64
    return config_from_hf(hf, dtype="float32")


def test_heads_not_divisible_by_model_axis_is_a_clear_error():
    from elastic_jax import sharding

    with pytest.raises(ValueError, match=r"num_attention_heads=8 .* size 3.*\[1, 2, 4, 8\]"):
        sharding.check_model_parallel(_cfg(8, 4), 3)


@pytest.mark.parametrize(
    "heads, kv, m, pattern",
    [
        (12, 3, 2, r"num_key_value_heads=3 is not divisible by the model axis size 2"),
        (12, 3, 4, r"num_key_value_heads=3 is smaller than the model axis size 4"),
        (12, 4, 6, r"num_key_value_heads=4 is smaller than the model axis size 6"),
    ],
)
def test_kv_heads_that_cannot_be_split_or_replicated(heads, kv, m, pattern):
    from elastic_jax import sharding

    with pytest.raises(ValueError, match=pattern):
        sharding.check_model_parallel(_cfg(heads, kv), m)


@pytest.mark.parametrize("kv, m, replicas", [(4, 2, 1), (4, 4, 1), (2, 4, 2), (2, 8, 4), (1, 8, 8)])
def test_kv_replicas(kv, m, replicas):
    from elastic_jax import sharding

    sharding.check_model_parallel(_cfg(8, kv), m)
    assert sharding.kv_replicas(kv, m) == replicas


def test_param_specs_follow_the_rules_table():
    from jax.sharding import AbstractMesh, AxisType
    from jax.sharding import PartitionSpec as P

    from elastic_jax import sharding

    mesh = AbstractMesh((2, 4), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
    cfg = dataclasses.replace(_cfg(8, 2), intermediate_size=130)  # F=130 does not split by 4
    specs = sharding.param_specs(cfg, mesh)
    assert specs.layers.wq == P(None, None, "model", None)
    assert specs.layers.wo == P(None, "model", None, None)
    assert specs.layers.wk == P(None, None, None, None)  # K=2 < 4: replicated
    assert specs.layers.w_gate == P(None, None, None)  # 130 % 4: replicated, not an error
    assert specs.embed == P("model", None)
    assert specs.lm_head is None  # tied
    with pytest.raises(ValueError, match="num_attention_heads=8"):
        sharding.param_specs(_cfg(8, 2), AbstractMesh((3,), ("model",), (AxisType.Auto,)))
    with pytest.raises(ValueError, match="needs Auto axes"):
        sharding.param_specs(_cfg(8, 2), AbstractMesh((2,), ("model",), (AxisType.Explicit,)))
    with pytest.raises(ValueError, match="map mesh axis 'model' twice"):
        sharding.logical_to_spec(("heads", "mlp"), (8, 8), {"model": 2})
    # Hidden states: batch over "data" when it divides, else replicated; never over "model".
    assert sharding.logical_to_spec(sharding.HIDDEN, (4, 16, 64), mesh.shape) == P(
        "data", None, None
    )
    assert sharding.logical_to_spec(sharding.HIDDEN, (1, 16, 64), mesh.shape) == P(None, None, None)


def test_make_mesh_names_the_device_shortfall():
    import jax

    from elastic_jax import sharding

    n = len(jax.devices())
    with pytest.raises(ValueError, match=rf"= {2 * n} devices, but only {n} are available"):
        sharding.make_mesh(n, 2)
    with pytest.raises(ValueError, match="model_parallel=0"):
        sharding.make_mesh(0)


def test_single_device_path_is_untouched():
    """Without a mesh context every helper is the identity (no sharding ops in the jaxpr)."""
    import jax
    import jax.numpy as jnp

    from elastic_jax import sharding

    def f(h, k, v):
        k, v = sharding.replicate_kv_heads(k, v)
        return sharding.constrain(h, sharding.HIDDEN), k, v

    jaxpr = str(
        jax.make_jaxpr(f)(jnp.ones((1, 4, 8)), jnp.ones((1, 4, 2, 4)), jnp.ones((1, 4, 2, 4)))
    )
    assert "sharding_constraint" not in jaxpr and "shard_map" not in jaxpr


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2])
