"""Analytic device-memory model of prefill and decode, and ``check_fits``: a clear error before
any work when a request cannot fit the device.

Peak bytes are a sum of named terms (docs/memory.md has the formulas and the check against the
measured peaks). Letters: B batch, T prompt bucket (padded length), C cache capacity per
sequence, L layers, E hidden, F MLP hidden, H query heads, K kv heads, D head dim, V vocab,
N page size, P pages. ``bytes`` is the activation dtype's size (2 for bf16).

Prefill is layer-major (``model.prefill``): one layer holds the whole prompt's activations at a
time. Its peak is

  persistent (weights, KV cache, tokens, RoPE tables, last logits)
  + max(estimate phase, attention phase)       (per layer, whole prompt)
  + MLP chunk                                  (kept on top: see docs/memory.md, calibration)

- estimate phase (elastic with XAttention heads): h, q, k, v + one estimate pass's scratch
  (``pallas_kernels.xattn.api.scratch_bytes``, T^2) + the kept-block lists of all heads;
- attention phase: h, q, k, v, the attention output o, the kept-block lists, and (elastic path)
  the copy of v with keys past the length zeroed (Mosaic kernel);
- synthetic phase (benchmark knob ``synthetic_kept_fraction`` only): h, q, k, v, the estimate's
  lists and the random lists that replace them ([B, H, nQb, nKb] uniforms, mask, argsort).

Decode: weights + cache + one step's small buffers (logits, every layer's new K/V).
"""

from __future__ import annotations

import dataclasses
import math

import jax

from elastic_jax import params as params_lib
from elastic_jax.config import ModelConfig, RuntimeConfig
from elastic_jax.elastic_attention import estimate_kv_heads_per_pass, needs_estimate
from pallas_kernels.xattn.api import scratch_bytes

GIB = float(1 << 30)


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    """Predicted peak device bytes of one step, by term (insertion order = report order)."""

    phase: str  # "prefill" or "decode"
    terms: dict[str, int]
    notes: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.terms.values())

    def table(self) -> str:
        """One line per term in GiB, then the total."""
        lines = [f"  {name:<22} {b / GIB:9.2f} GiB" for name, b in self.terms.items() if b]
        lines.append(f"  {'total':<22} {self.total / GIB:9.2f} GiB")
        return "\n".join(lines)


def _itemsize(cfg: ModelConfig) -> int:
    return cfg.jnp_dtype.itemsize


def weight_bytes(cfg: ModelConfig) -> int:
    """Exact bytes of the parameter pytree (``params.abstract``: embeddings, untied lm_head,
    every layer's projections, MLP and norms, the router's weights when elastic)."""
    leaves = jax.tree.leaves(params_lib.abstract(cfg))
    return sum(math.prod(x.shape) * x.dtype.itemsize for x in leaves)


def cache_pages(batch: int, capacity: int, page_size: int) -> int:
    """Pages of ``kv_cache.create`` with the default page table: B * ceil(C / N) + 1 (trash)."""
    return batch * -(-capacity // page_size) + 1


def cache_bytes(cfg: ModelConfig, batch: int, capacity: int, page_size: int) -> int:
    """K and V pages [L, K, P, N, D] x 2, plus the int32 page table [B, M] and lengths [B]."""
    P = cache_pages(batch, capacity, page_size)
    kv = 2 * cfg.num_layers * cfg.num_kv_heads * P * page_size * cfg.head_dim * _itemsize(cfg)
    return kv + 4 * batch * (-(-capacity // page_size) + 1)


def _attention_path(cfg: ModelConfig, rt: RuntimeConfig) -> tuple[bool, bool]:
    """(elastic per-head path?, XAttention estimate runs?) under this config."""
    dense = rt.attention_mode == "dense" or (rt.attention_mode == "elastic" and not cfg.is_elastic)
    if dense:
        return False, False
    return True, needs_estimate(cfg, rt)


def prefill_terms(
    cfg: ModelConfig, rt: RuntimeConfig, prompt_len: int, batch: int, capacity: int
) -> MemoryEstimate:
    """Predicted peak of one ``prefill_step`` over a [batch, prompt_len] bucket with a cache of
    ``capacity`` tokens per sequence (``prompt_len`` is the padded bucket length it runs at)."""

    B, T = batch, prompt_len
    E, F, H, K, D = (
        cfg.hidden_size,
        cfg.intermediate_size,
        cfg.num_heads,
        cfg.num_kv_heads,
        cfg.head_dim,
    )
    a = _itemsize(cfg)
    elastic, estimate = _attention_path(cfg, rt)
    h = B * T * E * a
    q = o = B * T * H * D * a
    kv = 2 * B * T * K * D * a
    lists = est = zero_v = synthetic = 0
    notes = {}
    if elastic:
        zero_v = B * T * K * D * a  # Mosaic kernel: v with keys past the length zeroed
        e = cfg.elastic
        if estimate:
            kvp = estimate_kv_heads_per_pass(B, T, T, H, K, e.xattn_stride, e.block_size)
            heads_per_pass = H if kvp is None else kvp * H // K
            notes["estimate_passes"] = str(1 if kvp is None else K // kvp)
            s_all = scratch_bytes(B, T, T, H, stride=e.xattn_stride, block_size=e.block_size)
            s = scratch_bytes(
                B, T, T, heads_per_pass, stride=e.xattn_stride, block_size=e.block_size
            )
            lists = s_all["select_lists"]
            est = s["score_w"] + s["score_m_l"] + s["block_sums"] + s["select_mask"]
            if kvp is not None:  # each pass slices its heads of q and k
                est += B * T * (heads_per_pass + kvp) * D * a
            if rt.synthetic_kept_fraction is not None:
                # Benchmark knob: f32 uniforms + bool mask + argsort (int32 iota and sorted
                # keys) + the new lists, all [B, H, nQb, nKb].
                n_blocks = -(-T // e.block_size)
                synthetic = B * H * n_blocks * n_blocks * (4 + 1 + 4 + 1 + 4)
    per_layer = {
        "estimate phase": h + q + kv + lists + est,
        # Benchmark knob only: after the estimate, next to its lists.
        "synthetic phase": h + q + kv + lists + synthetic,
        "attention phase": h + q + kv + o + lists + zero_v,
    }
    phase = max(per_layer, key=per_layer.get)
    notes["peak_phase"] = phase
    chunk = min(T, rt.prefill_chunk)
    terms = {
        "weights": weight_bytes(cfg),
        "kv_cache": cache_bytes(cfg, B, capacity, rt.page_size),
        "tokens_rope": B * T * 4 * 2 + 2 * B * T * D * a,  # tokens, positions; cos, sin
        "h_q_k_v": h + q + kv,
        "attn_out": o if phase == "attention phase" else 0,
        "block_lists": lists,
        "v_zeroed": zero_v if phase == "attention phase" else 0,
        "estimate_pass": est if phase == "estimate phase" else 0,
        "synthetic_lists": synthetic if phase == "synthetic phase" else 0,
        "mlp_chunk": 3 * B * chunk * F * a,  # gate, up, silu(gate) * up: [B, chunk, F]
        "logits": B * cfg.vocab_size * 4 + B * E * a,
    }
    if rt.collect_masks and elastic:
        # Every layer's bool block mask [B, H, nQb, nKb], stacked over layers by the scan.
        n_blocks = -(-T // cfg.elastic.block_size)
        terms["collected_masks"] = cfg.num_layers * B * H * n_blocks * n_blocks
    return MemoryEstimate("prefill", terms, notes)


def decode_terms(cfg: ModelConfig, rt: RuntimeConfig, batch: int, capacity: int) -> MemoryEstimate:
    """Predicted peak of one ``decode_step`` (the cache is donated and updated in place)."""
    a = _itemsize(cfg)
    B, K, D, L = batch, cfg.num_kv_heads, cfg.head_dim, cfg.num_layers
    terms = {
        "weights": weight_bytes(cfg),
        "kv_cache": cache_bytes(cfg, B, capacity, rt.page_size),
        "new_kv": 2 * L * B * K * D * a,  # every layer's new K/V, written once at the end
        # Flash-decoding partials: at most one split per page of the capacity, 16-row tiles, f32.
        "decode_partials": B * K * -(-capacity // rt.page_size) * 16 * (D + 2) * 4,
        "logits": B * cfg.vocab_size * 4 + 4 * B * cfg.hidden_size * a,
    }
    return MemoryEstimate("decode", terms)


def peak_estimate(
    cfg: ModelConfig, rt: RuntimeConfig, prompt_len: int, batch: int, capacity: int
) -> MemoryEstimate:
    """The larger of prefill and decode (prefill, whenever a prompt is longer than a page)."""
    pre = prefill_terms(cfg, rt, prompt_len, batch, capacity)
    dec = decode_terms(cfg, rt, batch, capacity)
    return pre if pre.total >= dec.total else dec


def device_bytes_limit(device=None) -> int | None:
    """The allocator's limit (``memory_stats()["bytes_limit"]``) of ``device`` (default: the
    first device), or None where the backend reports no memory stats (CPU)."""
    device = jax.devices()[0] if device is None else device
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if not stats or "bytes_limit" not in stats:
        return None
    return int(stats["bytes_limit"])


def check_fits(
    cfg: ModelConfig,
    rt: RuntimeConfig,
    prompt_len: int,
    batch: int,
    capacity: int,
    device_bytes: int | None = None,
) -> MemoryEstimate:
    """Raise ValueError, before any work, when the predicted peak of a request does not fit.

    prompt_len: the padded prompt bucket prefill runs at; capacity: cache tokens per sequence;
    device_bytes: the memory available to this process (default: ``device_bytes_limit()``;
    on a backend without memory stats, CPU, nothing is checked). The whole peak is compared,
    weights included, whether or not they are already on the device. Returns the estimate.
    """
    est = peak_estimate(cfg, rt, prompt_len, batch, capacity)
    limit = device_bytes_limit() if device_bytes is None else device_bytes
    if limit is not None and est.total > limit:
        raise ValueError(
            f"request does not fit the device: {est.phase} of batch={batch} at "
            f"prompt_len={prompt_len} (bucket) with a cache of {capacity} tokens per sequence "
            f"needs {est.total / GIB:.1f} GiB, {limit / GIB:.1f} GiB available "
            f"(memory_stats bytes_limit; raise it with XLA_PYTHON_CLIENT_MEM_FRACTION). "
            f"By term (elastic_jax/memory.py, docs/memory.md):\n{est.table()}\n"
            "Use a shorter prompt, a smaller batch or fewer new tokens."
        )
    return est
