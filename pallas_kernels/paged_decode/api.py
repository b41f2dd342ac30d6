"""Public entry point of paged decode attention: validates input and picks the implementation."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from pallas_kernels import _compat
from pallas_kernels.paged_decode.config import PagedDecodeConfig, get_config
from pallas_kernels.paged_decode.pallas_triton import paged_decode_pallas
from pallas_kernels.paged_decode.reference import paged_decode_reference

IMPLEMENTATIONS = ("auto", "pallas", "reference")
_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)


def _check_inputs(q, k_pages, v_pages, page_table, lengths, layer=None) -> None:
    if q.ndim != 3:
        raise ValueError(f"q must be [B, H, D], got shape {q.shape}")
    want = 4 if layer is None else 5
    if k_pages.ndim != want:
        layout = "[K, P, N, D]" if layer is None else "[L, K, P, N, D] (layer given)"
        raise ValueError(f"k_pages must be {layout}, got shape {k_pages.shape}")
    if v_pages.shape != k_pages.shape:
        raise ValueError(f"v_pages shape {v_pages.shape} != k_pages shape {k_pages.shape}")
    batch, num_heads, head_dim = q.shape
    num_kv_heads, _, _, kv_head_dim = k_pages.shape[-4:]
    if kv_head_dim != head_dim:
        raise ValueError(f"head dim of q ({head_dim}) != head dim of k_pages ({kv_head_dim})")
    if num_heads % num_kv_heads:
        raise ValueError(f"kv heads K={num_kv_heads} must divide query heads H={num_heads}")
    if page_table.ndim != 2 or page_table.shape[0] != batch:
        raise ValueError(f"page_table must be [B={batch}, max_pages], got {page_table.shape}")
    if lengths.shape != (batch,):
        raise ValueError(f"lengths must be [B={batch}], got shape {lengths.shape}")
    if page_table.dtype != jnp.int32 or lengths.dtype != jnp.int32:
        raise ValueError(
            f"page_table and lengths must be int32, got {page_table.dtype} and {lengths.dtype}"
        )
    if q.dtype not in _DTYPES:
        raise ValueError(f"q dtype {q.dtype} not in {[jnp.dtype(d).name for d in _DTYPES]}")
    if k_pages.dtype != q.dtype or v_pages.dtype != q.dtype:
        raise ValueError(
            f"k_pages/v_pages dtype ({k_pages.dtype}, {v_pages.dtype}) must equal q dtype {q.dtype}"
        )


def _check_extra(q, k_pages, k_extra, v_extra) -> None:
    if (k_extra is None) != (v_extra is None):
        raise ValueError("k_extra and v_extra must be given together")
    if k_extra is None:
        return
    batch, _, head_dim = q.shape
    want = (batch, k_pages.shape[-4], head_dim)
    for name, x in (("k_extra", k_extra), ("v_extra", v_extra)):
        if x.shape != want:
            raise ValueError(f"{name} must be [B, K, D] = {list(want)}, got shape {x.shape}")
        if x.dtype != k_pages.dtype:
            raise ValueError(f"{name} dtype {x.dtype} must equal the cache dtype {k_pages.dtype}")


def _check_pallas_shapes(k_pages: jax.Array) -> None:
    _, _, page_size, head_dim = k_pages.shape[-4:]
    for name, value in (("page size N", page_size), ("head dim D", head_dim)):
        if value < 16 or value & (value - 1):
            raise NotImplementedError(
                f"pallas paged decode needs {name} a power of two >= 16, got {value}; "
                "use implementation='reference'"
            )


def paged_decode_attention(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    page_table: jax.Array,
    lengths: jax.Array,
    layer: jax.Array | int | None = None,
    *,
    k_extra: jax.Array | None = None,
    v_extra: jax.Array | None = None,
    sm_scale: float | None = None,
    pages_per_block: int | None = None,
    num_splits: int | None = None,
    implementation: str = "auto",
    interpret: bool | None = None,
    config: PagedDecodeConfig | None = None,
    return_lse: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Attention of one new token per sequence against its paged KV cache.

    Args:
      q: [B, H, D] (bf16, fp16 or f32); query head ``h`` uses kv head ``h // (H // K)``.
      k_pages, v_pages: [K, P, N, D] cache of one layer, same dtype as ``q``; or the stacked
        cache of every layer [L, K, P, N, D] together with ``layer``.
      page_table: int32 [B, max_pages]; ``page_table[b, i]`` holds tokens
        ``[i * N, (i + 1) * N)`` of sequence ``b``. Entries past the sequence's pages must be
        valid page ids but are never read.
      lengths: int32 [B] valid tokens per sequence, including the token being decoded (its K/V
        already written). Values above ``max_pages * N`` are clamped; 0 gives a zero output.
      layer: int32 scalar (may be traced) selecting the layer of a stacked cache; the kernel
        reads that layer in place (no copy of the layer's pages).
      k_extra, v_extra: [B, K, D] (dtype of the cache) or None: one more key/value per sequence
        and kv head that is not in the cache, always visible, after the cache's ``lengths[b]``
        tokens. The decode step passes the token being decoded this way, so the cache stays
        read-only inside its layer loop and no second merge follows the kernel.
      sm_scale: softmax scale, default ``1 / sqrt(D)``.
      pages_per_block, num_splits: override the tuned tiling (see ``PagedDecodeConfig``).
      implementation: ``"auto"`` (Pallas on GPU, reference elsewhere), ``"pallas"`` or
        ``"reference"``.
      interpret: run the Pallas kernel in interpret mode; None: interpret unless on GPU.
      config: a full tiling to use instead of the autotune table / heuristic.
      return_lse: also return the natural-log softmax normaliser f32 [B, H] (-inf for a zero
        length), so a caller can merge this result with attention over other keys (for one
        key per kv head, ``k_extra``/``v_extra`` do that inside the kernel).

    Returns:
      [B, H, D] in ``q.dtype``.
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation={implementation!r} not in {IMPLEMENTATIONS}")
    _check_inputs(q, k_pages, v_pages, page_table, lengths, layer)
    _check_extra(q, k_pages, k_extra, v_extra)
    head_dim = q.shape[-1]
    scale = 1.0 / math.sqrt(head_dim) if sm_scale is None else float(sm_scale)

    if implementation == "auto":
        implementation = "pallas" if _compat.on_gpu() else "reference"
    if implementation == "reference":
        if layer is not None:
            k_pages, v_pages = k_pages[layer], v_pages[layer]
        return paged_decode_reference(
            q,
            k_pages,
            v_pages,
            page_table,
            lengths,
            k_extra=k_extra,
            v_extra=v_extra,
            sm_scale=scale,
            return_lse=return_lse,
        )
    if layer is not None:
        layer = jnp.asarray(layer, jnp.int32)

    _check_pallas_shapes(k_pages)
    batch, num_heads, _ = q.shape
    num_kv_heads, _, page_size, _ = k_pages.shape[-4:]
    max_pages = page_table.shape[1]
    if config is None:
        device_kind = _compat.device_kind() if _compat.on_gpu() else None
        config = get_config(
            batch, num_heads, num_kv_heads, max_pages, page_size, head_dim, q.dtype, device_kind
        )
    overrides = {}
    if pages_per_block is not None:
        overrides.update(pages_per_block=pages_per_block, page_chunks=1)
    if num_splits is not None:
        overrides["num_splits"] = num_splits
    config = dataclasses.replace(config, **overrides).clamp(max_pages, page_size)
    if interpret is None:
        interpret = _compat.default_interpret()
    return paged_decode_pallas(
        q,
        k_pages,
        v_pages,
        page_table,
        lengths,
        layer,
        k_extra,
        v_extra,
        sm_scale=scale,
        config=config,
        interpret=bool(interpret),
        return_lse=return_lse,
    )
