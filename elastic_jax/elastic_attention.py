"""Elastic prefill attention: per-head dense / streaming / XAttention in one attention call.

For every layer: XAttention block selection (``pallas_kernels.xattn``) for the heads in mode 1,
then one block-sparse attention call (``pallas_kernels.block_sparse_attn``) for all heads, whose
per-head modes and kept-block lists are data (no recompilation when the router changes its mind).
The same block masks feed the jnp references (CPU) and the Pallas kernels (GPU).

Head modes: 0 dense causal, 1 XAttention kept blocks, -1 streaming (sink + local band).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from elastic_jax.config import ModelConfig, RuntimeConfig
from elastic_jax.elastic_config import MODE_DENSE, MODE_STREAMING, MODE_XATTN
from pallas_kernels._compat import on_gpu


def _kernel_impls(impl: str) -> tuple[str, str]:
    """(xattn implementation, block-sparse implementation) for a resolved prefill impl.
    "pallas" off the GPU, and "triton" anywhere, run the Pallas Triton kernels (interpret mode off
    the GPU)."""
    if impl in ("reference", "xla"):
        return "reference", "reference"
    return ("auto", "auto") if on_gpu() and impl != "triton" else ("pallas_triton", "pallas_triton")


# Scratch budget of one XAttention estimate pass (its buffers grow as T^2, see
# ``pallas_kernels.xattn.api.scratch_bytes``). Up to 128K tokens at batch 1 the 8B shape's
# estimate (1.2 GiB) runs in one pass as before; longer prompts run over KV-head groups.
ESTIMATE_PASS_BYTES = 2 << 30


def estimate_kv_heads_per_pass(
    batch: int, q_len: int, k_len: int, heads: int, kv_heads: int, stride: int, block: int
) -> int | None:
    """KV heads per XAttention estimate pass: None (one pass) when the whole estimate's scratch
    fits ``ESTIMATE_PASS_BYTES``, else the largest divisor of ``kv_heads`` whose pass fits (at
    least 1). Results do not depend on it (heads are independent)."""
    from pallas_kernels.xattn.api import scratch_bytes

    def pass_bytes(kv: int) -> int:
        s = scratch_bytes(
            batch, q_len, k_len, kv * heads // kv_heads, stride=stride, block_size=block
        )
        return s["score_w"] + s["score_m_l"] + s["block_sums"] + s["select_mask"]

    if pass_bytes(kv_heads) <= ESTIMATE_PASS_BYTES:
        return None
    fitting = [
        d for d in range(1, kv_heads) if kv_heads % d == 0 and pass_bytes(d) <= ESTIMATE_PASS_BYTES
    ]
    return max(fitting, default=1)


def needs_estimate(cfg: ModelConfig, rt: RuntimeConfig) -> bool:
    """Static: can any head be in XAttention mode under this config / forced mode?"""
    if rt.attention_mode == "xattn":
        return True
    if rt.attention_mode != "elastic":
        return False
    return cfg.elastic.uses_xattn


def block_stats(
    head_modes: jax.Array,
    counts: jax.Array | None,
    kv_lengths: jax.Array,
    num_rows: int,
    block: int,
    sink_blocks: int,
    local_blocks: int,
) -> dict[str, jax.Array]:
    """Kept and causal key blocks per (sequence, head) over each sequence's own query blocks.

    head_modes: int32 [B, H]; counts: int32 [B, H, num_rows] (XAttention rows) or None;
    kv_lengths: int32 [B]. Returns {"kept_blocks", "causal_blocks"}: float32 [B, H].
    """
    nb = (kv_lengths + block - 1) // block  # valid query-block rows per sequence  [B]
    causal = (nb * (nb + 1) // 2).astype(jnp.float32)  # rows i keep i+1 causal blocks
    rows = jnp.arange(num_rows, dtype=jnp.int32)
    # Streaming row i: the sink blocks up to i, plus the band [i - local + 1, i], minus overlap.
    sink_part = jnp.minimum(sink_blocks, rows + 1)
    start = jnp.maximum(0, rows - local_blocks + 1)
    overlap = jnp.maximum(0, sink_part - start)
    per_row_streaming = sink_part + (rows - start + 1) - overlap  # [nQb]
    valid = rows[None, :] < nb[:, None]  # [B, nQb]
    streaming = jnp.sum(jnp.where(valid, per_row_streaming[None], 0), axis=-1).astype(jnp.float32)
    if counts is not None:
        xattn = jnp.sum(jnp.where(valid[:, None], counts, 0), axis=-1).astype(jnp.float32)
    else:
        xattn = jnp.zeros(head_modes.shape, jnp.float32)
    kept = jnp.where(
        head_modes == MODE_DENSE,
        causal[:, None],
        jnp.where(head_modes == MODE_STREAMING, streaming[:, None], xattn),
    )
    return {"kept_blocks": kept, "causal_blocks": jnp.broadcast_to(causal[:, None], kept.shape)}


def _synthetic_lists(counts, indices, q_len: int, k_len: int, block: int, fraction: float):
    """Benchmark knob (``RuntimeConfig.synthetic_kept_fraction``): random causal kept-block lists
    of about ``fraction`` density, sink and diagonal kept. The estimate's lists are consumed
    (data dependence) so the estimate is not optimised away."""
    from pallas_kernels.xattn.select import block_list_from_mask

    B, H, n_qb = counts.shape
    n_kb = -(-k_len // block)
    diag = (k_len - q_len) // block + jnp.arange(n_qb)
    cols = jnp.arange(n_kb)
    u = jax.random.uniform(jax.random.PRNGKey(0), (B, H, n_qb, n_kb))
    keep = (u < fraction) | (cols == 0) | (cols == diag[:, None])
    keep = keep & (cols <= diag[:, None])
    # Tie the result to the estimate's output so XLA keeps the estimate in the timed graph.
    keep = keep | (indices[..., :n_kb] < 0)
    return block_list_from_mask(keep)


def elastic_prefill_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    kv_lengths: jax.Array,
    head_modes: jax.Array,
    cfg: ModelConfig,
    rt: RuntimeConfig,
    impl: str,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """q: [B, T, H, D] post-RoPE; k, v: [B, T, K, D] post-RoPE; kv_lengths: int32 [B];
    head_modes: int32 [B, H]. Returns (out [B, T, H, D], stats of ``block_stats``)."""
    from pallas_kernels.block_sparse_attn.api import block_sparse_attention

    e = cfg.elastic
    xattn_impl, bsa_impl = _kernel_impls(impl)
    counts = indices = None
    if needs_estimate(cfg, rt):
        from pallas_kernels.xattn.api import xattn_select

        sel = xattn_select(
            q,
            k,
            kv_lengths=kv_lengths,
            stride=e.xattn_stride,
            threshold=e.xattn_threshold,
            norm=e.xattn_norm,
            block_size=e.block_size,
            head_mask=head_modes == MODE_XATTN,
            implementation=xattn_impl,
            sink_rule=rt.xattn_sink_rule,
            kv_heads_per_pass=estimate_kv_heads_per_pass(
                q.shape[0],
                q.shape[1],
                k.shape[1],
                q.shape[2],
                k.shape[2],
                e.xattn_stride,
                e.block_size,
            ),
        )
        counts, indices = sel.block_counts, sel.block_indices
        if rt.synthetic_kept_fraction is not None:
            counts, indices = _synthetic_lists(
                counts, indices, q.shape[1], k.shape[1], e.block_size, rt.synthetic_kept_fraction
            )
    out = block_sparse_attention(
        q,
        k,
        v,
        head_modes,
        counts,
        indices,
        kv_lengths=kv_lengths,
        sink_blocks=e.sink_blocks,
        local_blocks=e.local_blocks,
        block_q=e.block_size,
        block_k=e.block_size,
        implementation=bsa_impl,
    )
    num_rows = -(-q.shape[1] // e.block_size)
    stats = {}
    if rt.collect_stats:
        stats = block_stats(
            head_modes, counts, kv_lengths, num_rows, e.block_size, e.sink_blocks, e.local_blocks
        )
    if rt.collect_masks:
        from pallas_kernels.block_sparse_attn.reference import block_mask_from_modes

        stats["block_mask"] = block_mask_from_modes(
            head_modes,
            counts,
            indices,
            q_len=q.shape[1],
            k_len=k.shape[1],
            block_q=e.block_size,
            block_k=e.block_size,
            sink_blocks=e.sink_blocks,
            local_blocks=e.local_blocks,
        )
    return out, stats
