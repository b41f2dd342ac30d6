"""Model configuration: an immutable dataclass read from a Hugging Face ``config.json``.

Everything is validated once, at load time, with errors that name the field, its value and what is
allowed. Nothing in here is re-checked inside jit, and nothing is mutated after construction:
variants are made with ``dataclasses.replace``.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import jax
import numpy as np

from elastic_jax.elastic_config import ElasticConfig
from elastic_jax.errors import ConfigError  # re-exported: callers import it from here

SUPPORTED_ARCHITECTURES = (
    "Qwen3ForCausalLM",
    "PawQwen3ForCausalLM",
    "LlamaForCausalLM",
    "PawLlamaForCausalLM",
)
ELASTIC_ARCHITECTURES = ("PawQwen3ForCausalLM", "PawLlamaForCausalLM")
# Llama backbones: no q/k RMSNorm, optional projection biases (the only per-family differences).
LLAMA_ARCHITECTURES = ("LlamaForCausalLM", "PawLlamaForCausalLM")
SUPPORTED_ROPE_TYPES = ("default", "yarn", "llama3")
_REQUIRED_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "rms_norm_eps",
)


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """RoPE parameters, normalised from either ``rope_scaling`` (checkpoints) or ``rope_parameters``
    (transformers >= 5)."""

    rope_type: str = "default"
    theta: float = 1_000_000.0
    factor: float | None = None
    original_max_position_embeddings: int | None = None
    attention_factor: float | None = None
    beta_fast: float | None = None
    beta_slow: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True
    low_freq_factor: float | None = None  # llama3
    high_freq_factor: float | None = None  # llama3


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Qwen3 / PawQwen3 / Llama / PawLlama architecture. Letters used in docstrings:
    E = hidden_size, F = intermediate_size, H = num_heads, K = num_kv_heads, D = head_dim,
    V = vocab_size.

    Per-family differences are explicit flags (one model code path): ``qk_norm`` (Qwen3: RMSNorm
    of each q/k head before RoPE; Llama: none), ``attention_bias`` (q/k/v/o projection biases) and
    ``mlp_bias`` (gate/up/down biases). Defaults are Qwen3's, so older converted checkpoints load
    unchanged."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope: RopeConfig
    max_position_embeddings: int
    tie_word_embeddings: bool
    dtype: str = "bfloat16"
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    # ElasticConfig for PawQwen3 / PawLlama (None for plain models).
    elastic: ElasticConfig | None = None
    qk_norm: bool = True  # Qwen3: RMSNorm on q and k per head; Llama: none
    attention_bias: bool = False
    mlp_bias: bool = False

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def jnp_dtype(self):
        return jax.numpy.dtype(self.dtype)

    @property
    def is_elastic(self) -> bool:
        return self.elastic is not None

    def validate(self) -> ModelConfig:
        positive = (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "max_position_embeddings",
        )
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name}={value!r} must be a positive integer")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_key_value_heads={self.num_kv_heads} must divide "
                f"num_attention_heads={self.num_heads}"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if self.dtype not in ("bfloat16", "float32", "float16"):
            raise ConfigError(f"dtype={self.dtype!r}; allowed: 'bfloat16', 'float32', 'float16'")
        if not self.rms_norm_eps > 0:
            raise ConfigError(f"rms_norm_eps={self.rms_norm_eps!r} must be > 0")
        if self.rope.rope_type not in SUPPORTED_ROPE_TYPES:
            raise ConfigError(
                f"rope_scaling type {self.rope.rope_type!r} is not supported; "
                f"allowed: {SUPPORTED_ROPE_TYPES}"
            )
        if self.rope.rope_type in ("yarn", "llama3"):
            kind = self.rope.rope_type
            if self.rope.factor is None or self.rope.factor <= 0:
                raise ConfigError(
                    f"rope_scaling.factor={self.rope.factor!r} must be given and > 0 for {kind}"
                )
            if not self.rope.original_max_position_embeddings:
                raise ConfigError(
                    f"rope_scaling.original_max_position_embeddings is required for {kind}"
                )
        if self.rope.rope_type == "llama3":
            lo, hi = self.rope.low_freq_factor, self.rope.high_freq_factor
            for name, value in (("low_freq_factor", lo), ("high_freq_factor", hi)):
                if value is None:
                    raise ConfigError(f"rope_scaling.{name} is required for llama3 (missing)")
            if not hi > lo:
                raise ConfigError(
                    f"rope_scaling.high_freq_factor={hi} must be > low_freq_factor={lo} for llama3"
                )
        return self

    # ---------------------------------------------------------------- serialisation

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["elastic"] = None if self.elastic is None else dataclasses.asdict(self.elastic)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        d = dict(d)
        d["rope"] = RopeConfig(**d["rope"])
        d["eos_token_ids"] = tuple(d.get("eos_token_ids", ()))
        if d.get("elastic") is not None:
            d["elastic"] = ElasticConfig(**d["elastic"])
        return cls(**d).validate()


# -------------------------------------------------------------------- HF config.json


def _rope_from_hf(hf: dict[str, Any]) -> RopeConfig:
    params = hf.get("rope_parameters")
    scaling = hf.get("rope_scaling")
    if params and isinstance(params, dict) and "rope_theta" in params:
        merged = dict(params)
    else:
        merged = dict(scaling or {})
        merged["rope_theta"] = hf.get("rope_theta", 10_000.0)
    rope_type = merged.get("rope_type", merged.get("type", "default"))
    orig = merged.get("original_max_position_embeddings")
    if rope_type in ("yarn", "llama3") and orig is None:
        # transformers falls back to max_position_embeddings for yarn and llama3.
        orig = hf.get("max_position_embeddings")
    return RopeConfig(
        rope_type=rope_type,
        theta=float(merged["rope_theta"]),
        factor=None if merged.get("factor") is None else float(merged["factor"]),
        original_max_position_embeddings=None if orig is None else int(orig),
        attention_factor=merged.get("attention_factor"),
        beta_fast=merged.get("beta_fast"),
        beta_slow=merged.get("beta_slow"),
        mscale=merged.get("mscale"),
        mscale_all_dim=merged.get("mscale_all_dim"),
        truncate=bool(merged.get("truncate", True)),
        low_freq_factor=_opt_float(merged.get("low_freq_factor")),
        high_freq_factor=_opt_float(merged.get("high_freq_factor")),
    )


def _opt_float(x: Any) -> float | None:
    return None if x is None else float(x)


def config_from_hf(
    hf: dict[str, Any], *, source: str = "config.json", dtype: str = "bfloat16"
) -> ModelConfig:
    """Build a validated ``ModelConfig`` from a parsed HF ``config.json`` (never mutates ``hf``)."""
    archs = hf.get("architectures") or []
    if not archs:
        raise ConfigError(f"{source}: field 'architectures' is missing")
    arch = archs[0]
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ConfigError(
            f"{source}: unknown architecture {arch!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    missing = [f for f in _REQUIRED_FIELDS if f not in hf]
    if missing:
        raise ConfigError(f"{source}: missing required field(s) {missing}")
    num_heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // num_heads
    eos = hf.get("eos_token_id")
    eos_ids = () if eos is None else tuple(eos) if isinstance(eos, list) else (int(eos),)
    elastic = None
    if arch in ELASTIC_ARCHITECTURES:
        elastic = ElasticConfig.from_hf_dict(hf, source=source)
    if hf.get("use_sliding_window"):
        raise ConfigError(f"{source}: use_sliding_window=true is not supported")
    if hf.get("hidden_act", "silu") != "silu":
        raise ConfigError(
            f"{source}: hidden_act={hf['hidden_act']!r} is not supported; allowed: 'silu'"
        )
    llama = arch in LLAMA_ARCHITECTURES
    cfg = ModelConfig(
        architecture=arch,
        vocab_size=int(hf["vocab_size"]),
        hidden_size=int(hf["hidden_size"]),
        intermediate_size=int(hf["intermediate_size"]),
        num_layers=int(hf["num_hidden_layers"]),
        num_heads=int(num_heads),
        num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
        head_dim=int(head_dim),
        rms_norm_eps=float(hf["rms_norm_eps"]),
        rope=_rope_from_hf(hf),
        max_position_embeddings=int(hf.get("max_position_embeddings", 32768)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        dtype=dtype,
        eos_token_ids=eos_ids,
        pad_token_id=hf.get("pad_token_id"),
        elastic=elastic,
        qk_norm=not llama,
        attention_bias=bool(hf.get("attention_bias", False)),
        mlp_bias=bool(hf.get("mlp_bias", False)),
    )
    try:
        return cfg.validate()
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def load_hf_config(path: str | Path, *, dtype: str = "bfloat16") -> ModelConfig:
    """Read ``config.json`` from a checkpoint directory (or the file itself)."""
    p = Path(path)
    if p.is_dir():
        p = p / "config.json"
    if not p.exists():
        raise FileNotFoundError(f"config file not found: {p}")
    try:
        hf = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{p}: not valid JSON ({e})") from None
    return config_from_hf(hf, source=str(p), dtype=dtype)


# -------------------------------------------------------------------- RoPE frequencies


def rope_inv_freq(cfg: ModelConfig) -> tuple[np.ndarray, float]:
    """Inverse frequencies ``[D/2]`` (float32) and the cos/sin scaling factor, as transformers
    computes them (default, yarn and llama3)."""
    r, dim = cfg.rope, cfg.head_dim
    exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim
    # torch's ``theta ** tensor`` rounds a float64-accurate power to float32, then 1/x in float32.
    base = (1.0 / (np.float64(r.theta) ** exponents.astype(np.float64)).astype(np.float32)).astype(
        np.float32
    )
    if r.rope_type == "default":
        return base, 1.0
    if r.rope_type == "llama3":
        return _llama3_inv_freq(base, r), 1.0
    # yarn: port of transformers' _compute_yarn_parameters (float32 like torch).
    factor = r.factor

    def get_mscale(scale: float, mscale: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

    attention_factor = r.attention_factor
    if attention_factor is None:
        if r.mscale and r.mscale_all_dim:
            attention_factor = get_mscale(factor, r.mscale) / get_mscale(factor, r.mscale_all_dim)
        else:
            attention_factor = get_mscale(factor)
    beta_fast = r.beta_fast or 32
    beta_slow = r.beta_slow or 1
    orig = r.original_max_position_embeddings

    def correction_dim(num_rotations: float) -> float:
        return (dim * math.log(orig / (num_rotations * 2 * math.pi))) / (2 * math.log(r.theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if r.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # as transformers: avoid a zero-width ramp
    pos_freqs = np.float32(r.theta) ** exponents
    inv_extra = (1.0 / pos_freqs).astype(np.float32)
    inv_inter = (1.0 / (np.float32(factor) * pos_freqs)).astype(np.float32)
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    extra_factor = (1 - ramp).astype(np.float32)
    inv_freq = inv_inter * (1 - extra_factor) + inv_extra * extra_factor
    return inv_freq.astype(np.float32), float(attention_factor)


def _llama3_inv_freq(inv_freq: np.ndarray, r: RopeConfig) -> np.ndarray:
    """Port of transformers' ``_compute_llama3_parameters`` (float32 like torch): wavelengths
    longer than ``orig / low_freq_factor`` are divided by ``factor``, shorter than
    ``orig / high_freq_factor`` kept, and the band between interpolated smoothly."""
    f32 = np.float32
    orig = r.original_max_position_embeddings
    low_wavelen = orig / r.low_freq_factor
    high_wavelen = orig / r.high_freq_factor
    # torch evaluates ``scalar / tensor`` as ``reciprocal(tensor) * scalar``; same here, so the
    # band edges fall on the same side of the thresholds.
    wavelen = (np.reciprocal(inv_freq) * f32(2 * math.pi)).astype(f32)
    scaled = np.where(wavelen > low_wavelen, inv_freq / f32(r.factor), inv_freq).astype(f32)
    smooth = (
        (np.reciprocal(wavelen) * f32(orig) - f32(r.low_freq_factor))
        / f32(r.high_freq_factor - r.low_freq_factor)
    ).astype(f32)
    smoothed = ((1 - smooth) * scaled / f32(r.factor) + smooth * scaled).astype(f32)
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled).astype(f32)


# -------------------------------------------------------------------- runtime options

ATTENTION_MODES = ("elastic", "dense", "streaming", "xattn")
PREFILL_IMPLS = ("auto", "reference", "pallas", "triton", "cudnn", "xla")
DECODE_IMPLS = ("auto", "reference", "pallas")
DECODE_OUT_PROJS = ("auto", "xla", "pallas")
DECODE_NORMS = ("xla", "pallas")


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class RuntimeConfig:
    """How to run a model (static under jit; not part of the checkpoint).

    attention_mode: "elastic" follows the router (plain Qwen3: dense); "dense", "streaming" and
      "xattn" force every head into one mode regardless of the router (paper baselines).
    prefill_impl: "auto" (GPU: Pallas kernels; all-dense prefill through our block-sparse kernel
      with every head dense on Hopper, cuDNN on other GPUs; CPU: references), "reference"
      (pure jnp), "pallas" (Pallas kernels only), "triton" (the Pallas Triton kernels even on
      Hopper: the path of other GPUs, kept reachable for tests), "cudnn" (cuDNN for all-dense
      prefill), "xla" (our chunked jnp dense attention).
    decode_impl: "auto" (GPU: Pallas paged decode kernel; CPU: reference), "reference", "pallas".
    decode_out_proj: the decode step's attention out-projection: "auto" ("pallas" where decode
      attention runs the Pallas kernel on one GPU without a mesh and the shape tiles; otherwise
      "xla"), "xla" (a dot on the layer's slice of the stacked weight; XLA copied the slice
      before its cuBLAS GEMV) or "pallas" (``pallas_kernels.gemv.stacked_gemv``: reads the
      stacked weight in place; one device only; interpret mode on CPU).
      H100, Qwen3-4B at 32K: "pallas" takes the step from 6.29 to 5.78 ms at batch 1 and from
      17.32 to 16.62 ms at batch 8 (BENCHMARKS.md).
    decode_norm: the decode step's residual adds and RMSNorms: "xla" (jnp, left to XLA's
      fusions: small kernels of 1-6 us each in the H100 profile) or "pallas"
      (``pallas_kernels.decode_norm.add_rms_norm``: each add + norm in one kernel, two a layer,
      taking the out-projection GEMV's split partials unsummed when ``decode_out_proj`` is
      "pallas", and writing the batch-1 QKV input's zero row itself; plus
      ``decode_norm.qk_norm_rope``: the q/k norms and RoPE in one kernel; one device only;
      interpret mode on CPU). Not yet timed on a GPU, hence not the default.
    decode_num_splits: parts the Pallas paged decode kernel cuts each sequence's pages into
      (flash-decoding; ``PagedDecodeConfig.num_splits``), or None for the autotune table / the
      heuristic, which assume every row at the cache's full length. A ragged batch wants more:
      its longest row's parts set the kernel time, so ``serving.Engine`` decodes with
      ``paged_decode.ragged_num_splits`` where this is None. Ignored by the reference
      implementation.
    prefill_chunk: tokens per chunk for the MLP of prefill (and the reference attention's query
      tiles): bounds memory for long prompts; prompt buckets above it are its multiples.
    prompt_bucket_steps: prompt-length buckets per doubling (``engine.prompt_bucket``): 1 pads
      a prompt to the next power of two (above ``prefill_chunk``: its next multiple), k > 1 to
      the next multiple of a k-th of that power of two. A LongBench-E-shaped mix pays for
      about 33% more prefill FLOPs than its real lengths at 1 and 11% at 8, at the price of up
      to k times as many prefill compilations.
    page_size: tokens per KV-cache page.
    collect_stats: return per-layer/head modes and kept-block fractions from prefill.
    xattn_sink_rule: "official" (default) reproduces the official ``find_blocks_chunked``
      exactly, including its first-query-chunk bookkeeping (rows of the first estimate chunk
      force only the diagonal and keep one extra block; the sink column is still always kept);
      "always" forces sink + diagonal on every row (the written spec's rule). See
      docs/spec_notes.md.
    synthetic_kept_fraction: BENCHMARK KNOB, never for real use: the XAttention estimate still
      runs (its cost is measured) but XAttention heads then keep a random causal block set of
      about this fraction (sink and diagonal kept). Random weights give attention no structure,
      so this is how benchmarks time the sparse path at controlled densities.
    collect_masks: also return every layer's block mask [B, H, nQb, nKb] (inspection, notebooks
      and tests; O(T^2 / block^2) memory per layer, so leave it off for long prompts).
    """

    attention_mode: str = "elastic"
    prefill_impl: str = "auto"
    decode_impl: str = "auto"
    decode_out_proj: str = "auto"
    decode_norm: str = "xla"
    decode_num_splits: int | None = None
    prefill_chunk: int = 8192
    prompt_bucket_steps: int = 1
    page_size: int = 128
    collect_stats: bool = True
    collect_masks: bool = False
    xattn_sink_rule: str = "official"
    synthetic_kept_fraction: float | None = None

    def __post_init__(self):
        checks = (
            ("attention_mode", ATTENTION_MODES),
            ("prefill_impl", PREFILL_IMPLS),
            ("decode_impl", DECODE_IMPLS),
            ("decode_out_proj", DECODE_OUT_PROJS),
            ("decode_norm", DECODE_NORMS),
            ("xattn_sink_rule", ("official", "always")),
        )
        for name, allowed in checks:
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r}; allowed: {allowed}")
        f = self.synthetic_kept_fraction
        if f is not None and not 0.0 < f <= 1.0:
            raise ValueError(f"synthetic_kept_fraction={f!r} must lie in (0, 1]")
        n = self.decode_num_splits
        if n is not None and (not isinstance(n, int) or n < 1):
            raise ValueError(f"decode_num_splits={n!r} must be None or a positive int")
        for name in ("prefill_chunk", "page_size", "prompt_bucket_steps"):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0 or v & (v - 1):
                raise ValueError(f"{name}={v!r} must be a positive power of two")
