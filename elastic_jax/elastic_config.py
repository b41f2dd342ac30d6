"""PawQwen3 elastic-attention settings: an immutable dataclass read from a checkpoint's config.json.

Source of truth: ``PawQwen3Config.__init__`` and ``Qwen3Attention.__init__``/``forward`` in the
official eval model (LCM-Lab/Elastic-Attention, ``elasticattn/training/eval/modeling_flash_qwen.py``)
and spec sections 1.2, 3 and 8 (``shared/spec/ELASTIC_ATTENTION.md``).

Two sets of defaults, on purpose:

* ``ElasticConfig()`` (no checkpoint at hand, e.g. a model built from scratch in a test) uses
  the settings the released checkpoints were trained and evaluated with (``pooling_mode="ctx_q"``,
  ``use_softmax=True``, ``enable_ada_sparsity=True``), so the bare default is runnable.
* ``ElasticConfig.from_hf_dict`` fills keys ABSENT from config.json with the official code's
  defaults (``OFFICIAL_DEFAULTS``: ``pooling_mode="first_token"``, ``use_softmax=False``,
  ``enable_ada_sparsity=False``...), exactly what the official eval model would run with. Those
  three defaults are not runnable by the official eval model either (first_token pooling raises at
  the first prefill; enable_ada_sparsity=false crashes, spec section 8.3), so a config.json that
  lacks them gets a clear error instead of a silent guess. Checkpoints saved by the official
  training script always contain every field, so this costs real checkpoints nothing.

Head mode integers (per query head): ``MODE_DENSE = 0``, ``MODE_XATTN = 1``,
``MODE_STREAMING = -1`` (the Block-Sparse-Attention ``head_mask_type`` values).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Mapping
from typing import Any

from elastic_jax.errors import ConfigError

MODE_DENSE = 0
MODE_XATTN = 1
MODE_STREAMING = -1

# Tokens averaged at each end of the prompt by ``ctx_q`` pooling (hard-coded in the official router).
POOL_TOKENS = 100

# (retrieval_mode, toggle_type) -> (mode of router class 0 heads, mode of router class 1 heads).
# Class 1 = "retrieval" head (uses retrieval_mode), class 0 = "toggled" head (uses toggle_type).
# Spec section 3; the official forward's if/elif chain, with its undefined SamplerConditionError
# replaced by a ValueError.
MODE_TABLE: Mapping[tuple[str, str], tuple[int, int]] = {
    ("full", "xattn"): (MODE_XATTN, MODE_DENSE),
    ("full", "streaming"): (MODE_STREAMING, MODE_DENSE),
    ("xattn", "streaming"): (MODE_STREAMING, MODE_XATTN),
    ("xattn", "xattn"): (MODE_XATTN, MODE_XATTN),
    ("full", "full"): (MODE_DENSE, MODE_DENSE),
}

# Every value the official code knows; only the pairs of MODE_TABLE have an inference head type.
KNOWN_TOGGLE_TYPES = ("streaming", "xattn", "full", "local", "triangle", "topk", "none")
KNOWN_RETRIEVAL_MODES = ("full", "xattn")
# Pooling modes known to the official TRAINING router; the eval router implements only ctx_q.
KNOWN_POOLING_MODES = ("ctx_q", "first_token", "q", "ctx", "mean_all")
SUPPORTED_BLOCK_SIZES = (64, 128)

# Defaults of the official code for keys absent from config.json (PawQwen3Config.__init__,
# ``getattr(config, ..., default)`` in the eval attention, and the eval's hard-coded xattn_params).
OFFICIAL_DEFAULTS: Mapping[str, Any] = {
    "sink_size": 128,
    "local_window_size": 1024,
    "toggle_type": "streaming",
    "retrieval_mode": "full",
    "pooling_mode": "first_token",
    "use_softmax": False,
    "enable_ada_sparsity": False,
    "block_size": 128,
    "xattn_stride": 16,
    "xattn_threshold": 0.8,
    "xattn_norm": 1.0,
    "mask_temp": 1.0,
    "use_task_emb_for_mask": False,
}

# config.json keys written by the official training code that have no effect on inference: read
# and ignored (never validated, never an error).
TRAINING_ONLY_CONFIG_FIELDS = (
    "disable_linear_regularization_term",
    "suggested_sparsity",
    "suggested_threshold",
    "triangle_n_last",
    "enable_layerwise_sparsity",
    "layerwise_sparsity_schedule",
    "layerwise_sparsity_min_ratio",
    "layerwise_sparsity_max_ratio",
    "layerwise_sparsity_power",
    "layerwise_sparsity_weight",
    "erank_analysis_path",
    "topk_k",
    "pooling_seq",
    "enable_lambda_task",
    "enable_contrastive_loss",
    "mask_hard_sample",
)

_INT_FIELDS = ("sink_size", "local_window_size", "block_size", "xattn_stride")
_FLOAT_FIELDS = ("xattn_threshold", "xattn_norm", "mask_temp")
_BOOL_FIELDS = ("use_softmax", "enable_ada_sparsity", "use_task_emb_for_mask")


def _ceil_div(a: int, b: int) -> int:
    return (a + b - 1) // b


@dataclasses.dataclass(frozen=True)
class ElasticConfig:
    """Elastic-attention settings of one PawQwen3 checkpoint (hashable; safe as a jit static).

    Fields (config.json names):
      sink_size: streaming sink tokens (>= 0), rounded up to whole attention blocks.
      local_window_size: streaming local window tokens (>= 1), rounded up to whole blocks; the band
        includes the diagonal block.
      toggle_type / retrieval_mode: mode of router class 0 / class 1 heads (see ``MODE_TABLE``).
      pooling_mode: router pooling; only ``"ctx_q"`` (mean of first and last 100 pre-RoPE keys).
      use_softmax: True: 2-logit head + argmax; False: 1-logit head + parameter-free LayerNorm
        across KV heads + ``sigmoid(logit / mask_temp) > 0.5`` (noise-free, spec 2.5).
      enable_ada_sparsity: must be True (the router path); False is broken officially (spec 8.3).
      block_size: attention / XAttention block size in tokens (64 or 128; the official kernels
        only run 128).
      xattn_stride / xattn_threshold / xattn_norm: XAttention antidiagonal stride S (must divide
        block_size), cumulative-mass threshold (> 0; >= 1 keeps every causal block), score divisor.
      mask_temp: router temperature; only affects the sigmoid variant's rounding (argmax ignores it).
      use_task_emb_for_mask: training-only (task embedding); kept for round trips, no effect here.
    """

    sink_size: int = 128
    local_window_size: int = 1024
    toggle_type: str = "streaming"
    retrieval_mode: str = "full"
    pooling_mode: str = "ctx_q"
    use_softmax: bool = True
    enable_ada_sparsity: bool = True
    block_size: int = 128
    xattn_stride: int = 16
    xattn_threshold: float = 0.8
    xattn_norm: float = 1.0
    mask_temp: float = 1.0
    use_task_emb_for_mask: bool = False

    def __post_init__(self) -> None:
        # Normalise numeric types first (JSON ints for float fields, numpy scalars) so that equal
        # configs compare and hash equal, then validate everything before any work is done.
        for name in _INT_FIELDS:
            object.__setattr__(self, name, _as_int(name, getattr(self, name)))
        for name in _FLOAT_FIELDS:
            object.__setattr__(self, name, _as_float(name, getattr(self, name)))
        for name in _BOOL_FIELDS:
            object.__setattr__(self, name, _as_bool(name, getattr(self, name)))
        self._validate()

    # ------------------------------------------------------------------ validation

    def _validate(self) -> None:
        if self.toggle_type not in KNOWN_TOGGLE_TYPES:
            raise ConfigError(
                f"toggle_type={self.toggle_type!r} is unknown; allowed: {KNOWN_TOGGLE_TYPES}"
            )
        if self.retrieval_mode not in KNOWN_RETRIEVAL_MODES:
            raise ConfigError(
                f"retrieval_mode={self.retrieval_mode!r} is unknown; "
                f"allowed: {KNOWN_RETRIEVAL_MODES}"
            )
        if (self.retrieval_mode, self.toggle_type) not in MODE_TABLE:
            raise ConfigError(unsupported_pair_message(self.retrieval_mode, self.toggle_type))
        if self.pooling_mode != "ctx_q":
            known = self.pooling_mode in KNOWN_POOLING_MODES
            raise ConfigError(
                f"pooling_mode={self.pooling_mode!r} is "
                + ("not implemented by the official eval router" if known else "unknown")
                + "; allowed: 'ctx_q'"
                + (
                    " ('first_token' is the official PawQwen3Config default used when the key is "
                    "absent; checkpoints trained with training.sh store 'ctx_q')"
                    if self.pooling_mode == "first_token"
                    else ""
                )
            )
        if not self.enable_ada_sparsity:
            raise ConfigError(
                "enable_ada_sparsity=False is not supported: PawQwen3 inference needs the "
                "per-input router (enable_ada_sparsity=true); the official eval path with false is "
                "broken (z_kv_batch undefined). allowed: True"
            )
        if self.block_size not in SUPPORTED_BLOCK_SIZES:
            raise ConfigError(
                f"block_size={self.block_size} is not supported by the kernels; "
                f"allowed: {SUPPORTED_BLOCK_SIZES}"
            )
        if self.sink_size < 0:
            raise ConfigError(f"sink_size={self.sink_size} must be >= 0")
        if self.local_window_size < 1:
            raise ConfigError(
                f"local_window_size={self.local_window_size} must be >= 1 (a streaming row must "
                "keep its diagonal block, or rows past the sink would attend to nothing)"
            )
        if self.xattn_stride < 1 or self.block_size % self.xattn_stride:
            raise ConfigError(
                f"xattn_stride={self.xattn_stride} must be a positive divisor of "
                f"block_size={self.block_size}"
            )
        if not (self.xattn_threshold > 0 and math.isfinite(self.xattn_threshold)):
            raise ConfigError(
                f"xattn_threshold={self.xattn_threshold} must lie in (0, inf) "
                "(values >= 1 keep every causal block)"
            )
        if not (self.xattn_norm > 0 and math.isfinite(self.xattn_norm)):
            raise ConfigError(f"xattn_norm={self.xattn_norm} must lie in (0, inf)")
        if not (self.mask_temp > 0 and math.isfinite(self.mask_temp)):
            raise ConfigError(f"mask_temp={self.mask_temp} must lie in (0, inf)")

    # ------------------------------------------------------------------ derived values

    @property
    def sink_blocks(self) -> int:
        """Streaming sink in key blocks: ``ceil(sink_size / block_size)``.

        The official code divides by a hard-coded 128 (the Block-Sparse-Attention block) whatever
        ``block_size`` says; we divide by the attention block size our kernels actually use, which
        is the same for the only block size the official code runs (128)."""
        return _ceil_div(self.sink_size, self.block_size)

    @property
    def local_blocks(self) -> int:
        """Streaming local band in key blocks, diagonal included: ``ceil(local_window_size /
        block_size)`` (same divisor note as ``sink_blocks``)."""
        return _ceil_div(self.local_window_size, self.block_size)

    @property
    def reshaped_block(self) -> int:
        """XAttention reshaped rows per block: ``block_size // xattn_stride``."""
        return self.block_size // self.xattn_stride

    @property
    def class_modes(self) -> tuple[int, int]:
        """(mode of router class 0 heads, mode of router class 1 heads) from ``MODE_TABLE``."""
        return MODE_TABLE[(self.retrieval_mode, self.toggle_type)]

    @property
    def router_ignored(self) -> bool:
        """True when both classes map to the same mode (full+full, xattn+xattn)."""
        m0, m1 = self.class_modes
        return m0 == m1

    @property
    def uses_xattn(self) -> bool:
        return MODE_XATTN in self.class_modes

    @property
    def uses_streaming(self) -> bool:
        return MODE_STREAMING in self.class_modes

    @property
    def router_classes(self) -> int:
        """Router output width: 2 logits (softmax head) or 1 (sigmoid head)."""
        return 2 if self.use_softmax else 1

    # ------------------------------------------------------------------ HF config.json

    @classmethod
    def from_hf_dict(cls, d: Mapping[str, Any], *, source: str = "config.json") -> ElasticConfig:
        """Read the elastic fields of a parsed config.json (never mutates ``d``; idempotent).

        Absent keys take the official code's defaults (``OFFICIAL_DEFAULTS``). Keys in
        ``TRAINING_ONLY_CONFIG_FIELDS`` and all backbone keys are ignored. Raises ``ConfigError``
        (a ``ValueError``) naming ``source``, the field, its value and the allowed values.
        """
        if not isinstance(d, Mapping):
            raise ConfigError(f"{source}: expected a JSON object, got {type(d).__name__}")
        values = {name: d.get(name, default) for name, default in OFFICIAL_DEFAULTS.items()}
        missing = [n for n in ("pooling_mode", "enable_ada_sparsity") if n not in d]
        try:
            return cls(**values)
        except ConfigError as e:
            hint = (
                f" (absent from {source}: {missing}; official defaults applied)" if missing else ""
            )
            raise ConfigError(f"{source}: {e}{hint}") from None

    def to_hf_dict(self) -> dict[str, Any]:
        """The config.json fields that reproduce this config through ``from_hf_dict``."""
        return dataclasses.asdict(self)


def unsupported_pair_message(retrieval_mode: str, toggle_type: str) -> str:
    """Error text for a (retrieval_mode, toggle_type) pair without an inference head mapping."""
    return (
        f"retrieval_mode: {retrieval_mode} and toggle_type: {toggle_type} is not supported; "
        f"supported (retrieval_mode, toggle_type) pairs: {sorted(MODE_TABLE)}"
    )


def _as_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{name}={value!r} must be an integer")
    return int(value)


def _as_float(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ConfigError(f"{name}={value!r} must be a number")
    return float(value)


def _as_bool(name: str, value: Any) -> bool:
    # numpy bools are not ``bool`` instances; accept them, reject strings like "true".
    if isinstance(value, bool) or type(value).__name__ == "bool_":
        return bool(value)
    raise ConfigError(f"{name}={value!r} must be a boolean (JSON true/false)")
