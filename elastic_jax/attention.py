"""Attention dispatch: the one place the model meets the kernels.

Prefill: ``prefill_attention(q, k, v, kv_lengths, head_modes, ...)`` runs dense causal attention
(plain Qwen3, or every head forced dense) or the elastic per-head path (XAttention block selection
for mode-1 heads, then one block-sparse attention call for all heads).
Decode: ``decode_attention(q, k_pages, v_pages, page_table, lengths, ...)`` is always dense.

Implementations are chosen by ``RuntimeConfig`` (static): Pallas kernels / cuDNN on GPU, pure-jnp
references on CPU. Head modes: 0 dense causal, 1 XAttention block-sparse, -1 streaming.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from elastic_jax import elastic_attention, sharding
from elastic_jax.config import ModelConfig, RuntimeConfig
from pallas_kernels._compat import on_gpu as _on_gpu


def resolve_prefill_impl(rt: RuntimeConfig) -> str:
    if rt.prefill_impl != "auto":
        return rt.prefill_impl
    return "pallas" if _on_gpu() else "reference"


def resolve_decode_impl(rt: RuntimeConfig) -> str:
    if rt.decode_impl != "auto":
        return rt.decode_impl
    return "pallas" if _on_gpu() else "reference"


# ---------------------------------------------------------------------------- dense (XLA)


def dense_causal_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    kv_lengths: jax.Array | None = None,
    q_chunk: int = 1024,
) -> jax.Array:
    """Causal GQA attention in plain jnp, tiled over queries to bound memory.

    q: [B, Tq, H, D]; k, v: [B, Tk, K, D]; kv_lengths: int32 [B] (default Tk).
    Query i sits at position Tk - Tq + i. Softmax in float32, probabilities cast to v.dtype for the
    value matmul (as flash attention does). Returns [B, Tq, H, D] in q.dtype.
    """
    B, Tq, H, D = q.shape
    Tk, K = k.shape[1], k.shape[2]
    G = H // K
    scale = 1.0 / math.sqrt(D)
    lengths = jnp.full((B,), Tk, jnp.int32) if kv_lengths is None else kv_lengths
    key_pos = jnp.arange(Tk, dtype=jnp.int32)

    def tile(args):
        q_t, start = args  # q_t: [B, C, H, D]
        C = q_t.shape[1]
        qg = q_t.reshape(B, C, K, G, D)
        s = jnp.einsum("bckgd,bskd->bkgcs", qg, k, preferred_element_type=jnp.float32) * scale
        q_pos = Tk - Tq + start + jnp.arange(C, dtype=jnp.int32)
        mask = (key_pos[None, :] <= q_pos[:, None])[None] & (
            key_pos[None, None, :] < lengths[:, None, None]
        )
        s = jnp.where(mask[:, None, None], s, -jnp.inf)
        p = jax.nn.softmax(s, axis=-1)
        p = jnp.where(jnp.isnan(p), 0.0, p)  # padded queries with no visible key
        o = jnp.einsum(
            "bkgcs,bskd->bckgd", p.astype(v.dtype), v, preferred_element_type=jnp.float32
        )
        return o.reshape(B, C, H, D).astype(q.dtype)

    if Tq <= q_chunk or Tq % q_chunk:
        return tile((q, 0))
    n = Tq // q_chunk
    q_tiles = jnp.moveaxis(q.reshape(B, n, q_chunk, H, D), 1, 0)
    starts = jnp.arange(n, dtype=jnp.int32) * q_chunk
    out = jax.lax.map(tile, (q_tiles, starts))
    return jnp.moveaxis(out, 0, 1).reshape(B, Tq, H, D)


def cudnn_causal_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """cuDNN flash attention (GPU only). Right-padded prompts need no length mask: a valid query
    never sees a key past its own position."""
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")


# ---------------------------------------------------------------------------- prefill


def prefill_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    kv_lengths: jax.Array,
    head_modes: jax.Array | None,
    cfg: ModelConfig,
    rt: RuntimeConfig,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """q: [B, T, H, D] (post RoPE); k, v: [B, T, K, D]; kv_lengths: int32 [B];
    head_modes: int32 [B, H] or None (all dense). Returns (out [B, T, H, D], stats) where stats
    holds ``kept_blocks`` / ``causal_blocks`` float32 [B, H] when head modes are given.
    Every stats leaf is [B, H, ...] (per-head), so it can be computed on each device's heads."""
    impl = resolve_prefill_impl(rt)

    def local(q, k, v, kv_lengths, head_modes):
        if head_modes is None:
            return _dense_prefill(q, k, v, kv_lengths, rt), {}
        return elastic_attention.elastic_prefill_attention(
            q, k, v, kv_lengths, head_modes, cfg, rt, impl
        )

    # Under a jax.set_mesh mesh with a "model" axis: shard_map, each device on its own heads.
    return sharding.map_prefill_over_heads(local, q, k, v, kv_lengths, head_modes)


def dense_prefill_kernel(q: jax.Array, rt: RuntimeConfig) -> str:
    """Which kernel runs all-dense prefill: "mosaic" (our block-sparse kernel, every head dense,
    Hopper), "triton" (the same kernel's Triton version; interpret mode on CPU), "cudnn" or
    "reference" (jnp). "auto" on GPU takes the Mosaic kernel where it supports the shapes, else
    cuDNN: in the 8B model the Mosaic kernel measured equal to cuDNN at 32K/64K and 4% faster
    at 128K (BENCHMARKS.md, end-to-end prefill)."""
    impl = rt.prefill_impl
    if impl in ("reference", "xla") or (impl == "auto" and not _on_gpu()):
        return "reference"
    if impl in ("cudnn", "triton"):
        return impl
    from pallas_kernels.block_sparse_attn.api import mosaic_supported

    if _on_gpu() and mosaic_supported(q):
        return "mosaic"
    return "triton" if impl == "pallas" else "cudnn"


def _dense_prefill(q, k, v, kv_lengths, rt: RuntimeConfig) -> jax.Array:
    kernel = dense_prefill_kernel(q, rt)
    if kernel == "cudnn":
        return cudnn_causal_attention(q, k, v)
    if kernel in ("mosaic", "triton"):
        from pallas_kernels.block_sparse_attn import api as bsa

        modes = jnp.zeros(q.shape[:1] + q.shape[2:3], jnp.int32)
        # The lengths let the kernel skip the query tiles of a prompt's bucket padding (a 17K
        # prompt in the 32K bucket computed 3.5x its attention without them). The padding's V
        # comes from pad tokens through the model, so it is finite: no zeroing pass.
        return bsa.block_sparse_attention(
            q,
            k,
            v,
            modes,
            kv_lengths=kv_lengths,
            v_finite_past_length=True,
            implementation="pallas_mosaic_gpu" if kernel == "mosaic" else "pallas_triton",
        )
    return dense_causal_attention(
        q, k, v, kv_lengths=kv_lengths, q_chunk=min(rt.prefill_chunk, 1024)
    )


# ---------------------------------------------------------------------------- decode


def decode_attention(
    q: jax.Array,
    k_new: jax.Array,
    v_new: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    layer: jax.Array,
    page_table: jax.Array,
    lengths: jax.Array,
    rt: RuntimeConfig,
) -> jax.Array:
    """Dense one-token attention for every head (whatever its prefill mode) over one layer of the
    paged cache plus the new token itself.

    q: [B, H, D]; k_new, v_new: [B, K, D] of the token being decoded (not in the cache yet);
    k_cache, v_cache: [L, K, P, N, D]; layer: int32 scalar; lengths: int32 [B] tokens already in
    the cache. The new key is an extra key of the paged kernel (it seeds the kernel's online
    softmax), so the decode step only reads the cache inside its layer loop and writes
    all layers' new K/V once afterwards (an in-loop write made XLA copy the whole cache each
    step). Returns [B, H, D] in q.dtype.
    """
    # Under a jax.set_mesh mesh with a "model" axis: shard_map, each device on its own heads.
    return sharding.map_decode_over_heads(
        lambda *a: _decode_attention_local(*a, rt),
        q,
        k_new,
        v_new,
        k_cache,
        v_cache,
        layer,
        page_table,
        lengths,
    )


def _decode_attention_local(q, k_new, v_new, k_cache, v_cache, layer, page_table, lengths, rt):
    from pallas_kernels.paged_decode import api as pd

    impl = "pallas" if resolve_decode_impl(rt) == "pallas" else "reference"
    # The new token's K/V as the cache would store them (its dtype), attended as an extra key.
    return pd.paged_decode_attention(
        q,
        k_cache,
        v_cache,
        page_table,
        lengths,
        layer,
        k_extra=k_new.astype(k_cache.dtype),
        v_extra=v_new.astype(v_cache.dtype),
        num_splits=rt.decode_num_splits,
        implementation=impl,
    )
