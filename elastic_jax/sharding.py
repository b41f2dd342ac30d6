"""Tensor-parallel (and batch-parallel) sharding of the model with JAX's own machinery.

A ``jax.sharding.Mesh`` with two named axes: ``"data"`` (batch) and ``"model"`` (heads / MLP
columns / vocab). Every array is described once by LOGICAL axis names (``PARAM_AXES``,
``CACHE_AXES``, ``HIDDEN`` ...) and ``RULES`` maps logical names to mesh axes, so one table decides
the layout of params, the paged KV cache and activations:

  wq [L, E, H, D], wo [L, H, D, E]      heads split over "model" (Megatron column / row split)
  wk, wv [L, E, K, D]                   kv heads split over "model" (replicated when K < model)
  w_gate, w_up [L, E, F], w_down [L, F, E]   MLP split column / row over "model"
  embed [V, E], lm_head [E, V]          vocab split over "model"
  KV cache k, v [L, K, P, N, D]         kv heads split over "model"
  hidden states h [B, T, E]             batch over "data", replicated over "model"

XLA (GSPMD) partitions the projections and MLP from the parameter shardings and inserts the two
all-reduces per layer; the model constrains ``h`` at layer boundaries (``constrain``). The
attention kernels (Pallas custom calls, or the jnp references on CPU) cannot be partitioned by
XLA, so ``attention.py`` runs them under ``jax.shard_map`` over the head axis
(``map_prefill_over_heads``, ``map_decode_over_heads``): each device sees its own H / m query heads
and K / m kv heads, with the head modes, XAttention kept-block lists and stats of those heads.

How the model finds the mesh: the jitted steps run under ``jax.set_mesh(mesh)`` (``generate()``
does this for a ``Model`` whose ``mesh`` is set; see ``mesh_context``). Without a mesh (or with a
mesh of no "model" axis) every helper here is the identity, so single-device behaviour and
signatures are unchanged. The context mesh is part of jit's cache key.

GQA with K < m kv heads: the model axis size m must be a multiple of K. wk / wv are replicated,
each device computes all K kv heads (small: K * D * E per token) and ``replicate_kv_heads``
repeats them to m heads (kv head j -> heads j*r .. j*r+r-1, r = m / K), of which each device keeps
its one; the KV cache then has m heads (one per device, ``create_cache``). The router still sees
the K original kv heads, so its decisions and stats are unchanged.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from elastic_jax import kv_cache as kv_cache_lib
from elastic_jax import params as params_lib
from elastic_jax.config import ModelConfig

DATA, MODEL = "data", "model"

# Logical axis -> mesh axis (None: replicated). The one table behind every PartitionSpec here.
RULES: Mapping[str, str | None] = {
    "batch": DATA,
    "heads": MODEL,
    "kv_heads": MODEL,
    "mlp": MODEL,
    "vocab": MODEL,
    "embed": None,
    "head_dim": None,
    "seq": None,
    "layers": None,
    "pages": None,
    "page_slot": None,
    "router": None,
    "blocks": None,
}
# Logical axes whose size MUST divide their mesh axis (each device holds the same heads); other
# axes (batch, mlp, vocab) are replicated when their size does not divide the mesh axis.
_STRICT = ("heads",)

# Parameter leaves by field name (stacked layer leaves start with "layers"). Router leaves are
# tiny and shared by all kv heads: replicated.
PARAM_AXES: Mapping[str, tuple[str, ...]] = {
    "embed": ("vocab", "embed"),
    "final_norm": ("embed",),
    "lm_head": ("embed", "vocab"),
    "attn_norm": ("layers", "embed"),
    "mlp_norm": ("layers", "embed"),
    "wq": ("layers", "embed", "heads", "head_dim"),
    "wk": ("layers", "embed", "kv_heads", "head_dim"),
    "wv": ("layers", "embed", "kv_heads", "head_dim"),
    "q_norm": ("layers", "head_dim"),
    "k_norm": ("layers", "head_dim"),
    "wo": ("layers", "heads", "head_dim", "embed"),
    "w_gate": ("layers", "embed", "mlp"),
    "w_up": ("layers", "embed", "mlp"),
    "w_down": ("layers", "mlp", "embed"),
    # Llama-family biases (present only with attention_bias / mlp_bias).
    "q_bias": ("layers", "heads", "head_dim"),
    "k_bias": ("layers", "kv_heads", "head_dim"),
    "v_bias": ("layers", "kv_heads", "head_dim"),
    "o_bias": ("layers", "embed"),
    "gate_bias": ("layers", "mlp"),
    "up_bias": ("layers", "mlp"),
    "down_bias": ("layers", "embed"),
}
CACHE_AXES = kv_cache_lib.KVCache(
    k=("layers", "kv_heads", "pages", "page_slot", "head_dim"),
    v=("layers", "kv_heads", "pages", "page_slot", "head_dim"),
    page_table=("batch", "pages"),
    lengths=("batch",),
)
# Activations.
HIDDEN = ("batch", "seq", "embed")  # h: [B, T, E]
Q_HEADS = ("batch", "seq", "heads", "head_dim")  # q, attention output: [B, T, H, D]
KV_HEADS = ("batch", "seq", "kv_heads", "head_dim")  # k, v: [B, T, K, D]


# ------------------------------------------------------------------------------------ mesh


def make_mesh(model_parallel: int, data_parallel: int = 1, *, devices=None) -> Mesh:
    """A ("data", "model") mesh of ``data_parallel * model_parallel`` devices (default: the first
    ones of ``jax.devices()``, which spans every host after ``jax.distributed.initialize()``).

    Axis types are Auto: XLA propagates shardings from the parameters (GSPMD), the model adds
    constraints at layer boundaries and ``shard_map`` around the attention kernels.
    """
    for name, n in (("model_parallel", model_parallel), ("data_parallel", data_parallel)):
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"{name}={n!r} must be a positive integer")
    devices = jax.devices() if devices is None else list(devices)
    need = model_parallel * data_parallel
    if need > len(devices):
        raise ValueError(
            f"data_parallel={data_parallel} x model_parallel={model_parallel} = {need} devices, "
            f"but only {len(devices)} are available ({jax.default_backend()}); on CPU fake "
            "devices come from XLA_FLAGS=--xla_force_host_platform_device_count=N set before "
            "jax is imported"
        )
    return jax.make_mesh(
        (data_parallel, model_parallel),
        (DATA, MODEL),
        axis_types=(AxisType.Auto, AxisType.Auto),
        devices=devices[:need],
    )


def mesh_context(mesh: Mesh | None):
    """``jax.set_mesh(mesh)``, or a no-op context for ``mesh=None``. Run the model's jitted steps
    inside it so that they trace with the mesh (shard_map, sharding constraints)."""
    return contextlib.nullcontext() if mesh is None else jax.set_mesh(mesh)


def _model_size(mesh) -> int:
    return dict(mesh.shape).get(MODEL, 1)


def context_mesh():
    """The mesh set by ``jax.set_mesh`` while tracing, if it has a "model" axis (and we are not
    already inside a ``shard_map`` over it), else None."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or MODEL not in mesh.axis_names or MODEL in mesh.manual_axes:
        return None
    return mesh


# ------------------------------------------------------------------------------- validation


def kv_replicas(num_kv_heads: int, model_parallel: int) -> int:
    """How many times each kv head is repeated so that every device holds whole kv heads:
    1 when K >= m (K must be a multiple of m), m / K when K < m (m must be a multiple of K)."""
    K, m = num_kv_heads, model_parallel
    if K >= m:
        if K % m:
            raise ValueError(
                f"num_key_value_heads={K} is not divisible by the model axis size {m}: each "
                f"device must hold whole kv heads; use a model_parallel dividing {K}"
            )
        return 1
    if m % K:
        raise ValueError(
            f"num_key_value_heads={K} is smaller than the model axis size {m} and does not "
            f"divide it: kv heads can be replicated only when model_parallel is a multiple of {K}"
        )
    return m // K


def check_model_parallel(cfg: ModelConfig, model_parallel: int) -> None:
    """Raise ValueError (naming the numbers) unless ``cfg`` can be split over ``model_parallel``
    devices: H % m == 0, and K % m == 0 or m % K == 0 (kv-head replication)."""
    H, K, m = cfg.num_heads, cfg.num_kv_heads, model_parallel
    if H % m:
        divisors = [d for d in range(1, H + 1) if H % d == 0]
        raise ValueError(
            f"num_attention_heads={H} is not divisible by the model axis size {m}: every device "
            f"must hold the same number of query heads; model_parallel must be one of {divisors}"
        )
    kv_replicas(K, m)


# ------------------------------------------------------------------------------ specs


def logical_to_spec(
    axes: tuple[str | None, ...], shape: tuple[int, ...], mesh_shape: Mapping[str, int]
) -> PartitionSpec:
    """PartitionSpec of an array of ``shape`` whose dims have logical names ``axes``.

    A dim is split over its mesh axis (``RULES``) when that axis has size > 1 and divides it;
    kv heads fewer than the model axis are replicated (see module docstring); other
    non-dividing dims are replicated, except query heads (ValueError).
    """
    if len(axes) != len(shape):
        raise ValueError(f"logical axes {axes} do not match shape {shape}")
    spec: list[str | None] = []
    for name, size in zip(axes, shape):
        mesh_axis = None if name is None else RULES[name]
        n = 1 if mesh_axis is None else mesh_shape.get(mesh_axis, 1)
        if mesh_axis is not None and mesh_axis in spec:
            raise ValueError(f"logical axes {axes} map mesh axis {mesh_axis!r} twice")
        if n == 1:
            spec.append(None)
        elif size % n == 0:
            spec.append(mesh_axis)
        elif name in _STRICT:
            raise ValueError(
                f"axis {name!r} of size {size} (shape {shape}) is not divisible by mesh axis "
                f"{mesh_axis!r} of size {n}"
            )
        else:
            if name == "kv_heads":
                kv_replicas(size, n)  # raises unless n is a multiple of size (replication)
            spec.append(None)
    return PartitionSpec(*spec)


def _check_mesh(mesh) -> None:
    """Our meshes use Auto axes: GSPMD propagates shardings from the params. (A ``jax.make_mesh``
    mesh defaults to Explicit axes, under which the sharded einsums would need out_sharding.)"""
    if any(t != AxisType.Auto for t in mesh.axis_types):
        raise ValueError(
            f"mesh axis_types={mesh.axis_types}: the model needs Auto axes; build the mesh with "
            "elastic_jax.sharding.make_mesh (or axis_types=(AxisType.Auto,) * ndim)"
        )


def param_specs(cfg: ModelConfig, mesh) -> params_lib.Params:
    """``Params`` pytree of PartitionSpecs (router leaves replicated)."""
    _check_mesh(mesh)
    mesh_shape = dict(mesh.shape)
    check_model_parallel(cfg, mesh_shape.get(MODEL, 1))

    def spec(path, leaf):
        keys = [getattr(p, "name", getattr(p, "key", None)) for p in path]
        if "router" in keys:
            return PartitionSpec(*([None] * leaf.ndim))
        return logical_to_spec(PARAM_AXES[keys[-1]], leaf.shape, mesh_shape)

    return jax.tree_util.tree_map_with_path(spec, params_lib.abstract(cfg))


def param_shardings(cfg: ModelConfig, mesh: Mesh) -> params_lib.Params:
    """``Params`` pytree of ``NamedSharding``s."""
    return jax.tree.map(lambda s: NamedSharding(mesh, s), param_specs(cfg, mesh))


def param_state_shardings(cfg: ModelConfig, mesh: Mesh) -> dict[str, Any]:
    """The shardings as the nested dict ``checkpoint.load_params(..., sharding=)`` restores with
    (orbax reads each device's shard straight from disk)."""
    return params_lib.to_state_dict(param_shardings(cfg, mesh))


def shard_params(params: params_lib.Params, cfg: ModelConfig, mesh: Mesh) -> params_lib.Params:
    """Place an existing ``Params`` pytree on ``mesh`` (``jax.device_put`` per leaf)."""
    return jax.device_put(params, param_shardings(cfg, mesh))


def random_params(
    cfg: ModelConfig, key: jax.Array, mesh: Mesh, *, scale: float = 1.0
) -> params_lib.Params:
    """``params.init_random`` generated directly in the sharded layout (benchmarks: an 8B model
    never sits whole on one device). Same values as the single-device init (partitionable
    threefry)."""
    init = jax.jit(
        params_lib.init_random,
        static_argnums=0,
        static_argnames="scale",
        out_shardings=param_shardings(cfg, mesh),
    )
    return init(cfg, key, scale=scale)


def cache_specs(cache: kv_cache_lib.KVCache, mesh) -> kv_cache_lib.KVCache:
    mesh_shape = dict(mesh.shape)
    return jax.tree.map(
        lambda axes, x: logical_to_spec(axes, x.shape, mesh_shape),
        CACHE_AXES,
        cache,
        is_leaf=lambda a: isinstance(a, tuple),
    )


def shard_cache(cache: kv_cache_lib.KVCache, mesh: Mesh) -> kv_cache_lib.KVCache:
    """Place a cache on ``mesh``: kv heads over "model" (its K must be the model's K, or the
    model axis size when K < m: see ``create_cache``), page table and lengths over "data"."""
    specs = cache_specs(cache, mesh)
    return jax.device_put(cache, jax.tree.map(lambda s: NamedSharding(mesh, s), specs))


def create_cache(
    cfg: ModelConfig,
    batch: int,
    capacity: int,
    mesh: Mesh | None,
    *,
    page_size: int = 128,
    dtype=None,
) -> kv_cache_lib.KVCache:
    """``kv_cache.create`` for a sharded model: max(K, m) kv heads (replicated K < m heads, one
    per device), allocated directly in its sharding (no full copy on one device). Without a mesh
    (None): ``kv_cache.create`` itself."""
    if mesh is None:
        return kv_cache_lib.create(cfg, batch, capacity, page_size=page_size, dtype=dtype)
    _check_mesh(mesh)
    m = _model_size(mesh)
    check_model_parallel(cfg, m)
    K = cfg.num_kv_heads * kv_replicas(cfg.num_kv_heads, m)
    cfg_eff = dataclasses.replace(cfg, num_kv_heads=K)

    def make():
        return kv_cache_lib.create(cfg_eff, batch, capacity, page_size=page_size, dtype=dtype)

    specs = cache_specs(jax.eval_shape(make), mesh)
    return jax.jit(make, out_shardings=jax.tree.map(lambda s: NamedSharding(mesh, s), specs))()


def shard_model(model, mesh: Mesh):
    """A ``loader.Model`` with its params placed on ``mesh`` and ``mesh`` set (so ``generate``
    runs sharded)."""
    check_model_parallel(model.config, _model_size(mesh))
    params = shard_params(model.params, model.config, mesh)
    return dataclasses.replace(model, params=params, mesh=mesh)


# ---------------------------------------------------------------- inside the model (traced)


def constrain(x: jax.Array, axes: tuple[str | None, ...]) -> jax.Array:
    """Sharding constraint by logical axes under the context mesh; identity without one."""
    mesh = context_mesh()
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(axes, x.shape, dict(mesh.shape)))


def constrain_cache(cache: kv_cache_lib.KVCache) -> kv_cache_lib.KVCache:
    """Keep the cache in its ``CACHE_AXES`` layout (so a donated cache comes back as it went in)."""
    mesh = context_mesh()
    if mesh is None:
        return cache
    specs = cache_specs(cache, mesh)
    return jax.tree.map(jax.lax.with_sharding_constraint, cache, specs)


def replicate_kv_heads(k: jax.Array, v: jax.Array) -> tuple[jax.Array, jax.Array]:
    """k, v: [B, T, K, D] -> [B, T, K * r, D] with r = ``kv_replicas(K, m)`` under a mesh
    (repeat-interleave: kv head j becomes heads j*r .. j*r+r-1, so device d's query heads
    d*H/m .. still use their own kv head), sharded over the kv-head axis. Identity when r = 1
    or without a mesh."""
    mesh = context_mesh()
    if mesh is None:
        return k, v
    r = kv_replicas(k.shape[2], _model_size(mesh))
    if r > 1:
        k, v = jnp.repeat(k, r, axis=2), jnp.repeat(v, r, axis=2)
    return constrain(k, KV_HEADS), constrain(v, KV_HEADS)


def map_prefill_over_heads(
    fn: Callable[..., tuple[jax.Array, dict[str, jax.Array]]],
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    kv_lengths: jax.Array,
    head_modes: jax.Array | None,
):
    """Run ``fn(q, k, v, kv_lengths, head_modes) -> (out, stats)`` on each device's own heads.

    q: [B, T, H, D]; k, v: [B, T, K, D]; kv_lengths: int32 [B]; head_modes: int32 [B, H] or None.
    out: [B, T, H, D]; every stats leaf is [B, H, ...] (per-head stats, block masks). Without a
    context mesh this is ``fn(...)``. Under one, ``fn`` sees H / m query heads and K / m kv heads
    (K already replicated to >= m by ``replicate_kv_heads``) and its own sequences' batch rows.
    """
    mesh = context_mesh()
    if mesh is None:
        return fn(q, k, v, kv_lengths, head_modes)
    m = _model_size(mesh)
    H, K = q.shape[2], k.shape[2]
    if H % m or K % m:
        raise ValueError(
            f"attention under a model axis of size {m} needs query heads H={H} and kv heads "
            f"K={K} divisible by it (create the cache with sharding.create_cache and keep "
            "sharding.replicate_kv_heads in the model)"
        )
    shape = dict(mesh.shape)
    q_spec = logical_to_spec(Q_HEADS, q.shape, shape)
    kv_spec = logical_to_spec(KV_HEADS, k.shape, shape)
    args = (q, k, v, kv_lengths) + (() if head_modes is None else (head_modes,))
    in_specs = (q_spec, kv_spec, kv_spec, logical_to_spec(("batch",), kv_lengths.shape, shape))
    if head_modes is not None:
        in_specs += (logical_to_spec(("batch", "heads"), head_modes.shape, shape),)

    def local(*a):
        return fn(*a) if head_modes is not None else fn(*a, None)

    out_shape = jax.eval_shape(local, *args)
    stats_specs = jax.tree.map(
        lambda s: logical_to_spec(("batch", "heads") + (None,) * (s.ndim - 2), s.shape, shape),
        out_shape[1],
    )
    # check_vma=False: the Pallas kernels are opaque to shard_map's replication checks.
    return jax.shard_map(
        local, in_specs=in_specs, out_specs=(q_spec, stats_specs), check_vma=False
    )(*args)


def map_decode_over_heads(
    fn: Callable[..., jax.Array],
    q: jax.Array,
    k_new: jax.Array,
    v_new: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    layer: jax.Array,
    page_table: jax.Array,
    lengths: jax.Array,
) -> jax.Array:
    """Run ``fn(q, k_new, v_new, k_cache, v_cache, layer, page_table, lengths) -> [B, H, D]`` on
    each device's own heads (identity wrapper without a context mesh).

    q: [B, H, D]; k_new, v_new: [B, K, D]; k_cache, v_cache: [L, K, P, N, D] (kv heads over
    "model", replicated over "data"); layer: int32 scalar; page_table: int32 [B, M];
    lengths: int32 [B].
    """
    mesh = context_mesh()
    if mesh is None:
        return fn(q, k_new, v_new, k_cache, v_cache, layer, page_table, lengths)
    m = _model_size(mesh)
    if q.shape[1] % m or k_cache.shape[1] % m or k_new.shape[1] != k_cache.shape[1]:
        raise ValueError(
            f"decode under a model axis of size {m} needs H={q.shape[1]} and the cache's kv heads "
            f"K={k_cache.shape[1]} divisible by it and the new token's kv heads "
            f"({k_new.shape[1]}) equal to the cache's (create it with sharding.create_cache)"
        )
    shape = dict(mesh.shape)
    q_spec = logical_to_spec(("batch", "heads", "head_dim"), q.shape, shape)
    kv_spec = logical_to_spec(("batch", "kv_heads", "head_dim"), k_new.shape, shape)
    cache_spec = logical_to_spec(CACHE_AXES.k, k_cache.shape, shape)
    in_specs = (
        q_spec,
        kv_spec,
        kv_spec,
        cache_spec,
        cache_spec,
        PartitionSpec(),  # layer
        logical_to_spec(CACHE_AXES.page_table, page_table.shape, shape),
        logical_to_spec(CACHE_AXES.lengths, lengths.shape, shape),
    )
    layer = jnp.asarray(layer, jnp.int32)
    return jax.shard_map(fn, in_specs=in_specs, out_specs=q_spec, check_vma=False)(
        q, k_new, v_new, k_cache, v_cache, layer, page_table, lengths
    )
