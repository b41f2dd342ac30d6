"""Per-layer head router of PawQwen3: ctx_q pooling, the router MLP, its decision, head modes.

Source: ``AttentionRouter`` and ``Qwen3Attention.forward`` of the official eval model
(``elasticattn/training/eval/modeling_flash_qwen.py``), spec sections 1.3, 2 and 3.

Flow for one layer (prefill only; decode never routes):
  k: [B, T, K, D] keys after k_norm, BEFORE RoPE  --ctx_q_pool-->  pooled [B, K, D]
  --router_logits-->  logits [B, K, 2]  --router_decision-->  z_kv int32 [B, K] in {0, 1}
  --head_modes-->  modes int32 [B, H] in {0 dense, 1 xattn, -1 streaming} (GQA repeat-interleave).

Every function works on ONE layer's ``RouterParams``; stack layers along a leading axis and use
``jax.lax.scan`` / ``jax.vmap`` over it. Differences from the official code (on purpose):
  * every sequence of a batch is routed on its own keys and its own length (the official batch>1
    path applies sequence 0's decision to every sequence, spec 8.1);
  * padded batches keep the router (the official varlen path forces XAttention on all heads and
    pools whole-segment means, spec 8.2); pooling is head-100 + tail-100 per sequence;
  * the sigmoid head (use_softmax=false) is noise-free (the official eval adds Gumbel noise, 8.11).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Collection

import jax
import jax.numpy as jnp
import numpy as np

from elastic_jax.elastic_config import (
    MODE_TABLE,
    POOL_TOKENS,
    ElasticConfig,
    unsupported_pair_message,
)

_HIGHEST = jax.lax.Precision.HIGHEST
# torch.nn.LayerNorm default eps (the sigmoid head's parameter-free LayerNorm).
_LAYER_NORM_EPS = 1e-5


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RouterParams:
    """One layer's router weights in JAX orientation (``y = x @ w + b``), D = head_dim.

    HF ``mask_allocator.cls_feat_extractor.{0,2}`` -> ``feat_w0/b0``, ``feat_w2/b2``;
    ``mask_allocator.cls_router_head_agnostic.{0,2,4}`` -> ``head_w0/b0``, ``head_w2/b2``,
    ``head_w4/b4``. Stacked over layers every leaf gets a leading ``[L]`` axis.
    """

    feat_w0: jax.Array  # [D, 4D]
    feat_b0: jax.Array  # [4D]
    feat_w2: jax.Array  # [4D, D]
    feat_b2: jax.Array  # [D]
    head_w0: jax.Array  # [D, 4D]
    head_b0: jax.Array  # [4D]
    head_w2: jax.Array  # [4D, D]
    head_b2: jax.Array  # [D]
    head_w4: jax.Array  # [D, C]; C = 2 (use_softmax) or 1 (sigmoid head)
    head_b4: jax.Array  # [C]

    @property
    def num_classes(self) -> int:
        return int(self.head_w4.shape[-1])

    @staticmethod
    def shapes(head_dim: int, use_softmax: bool = True) -> dict[str, tuple[int, ...]]:
        """Field name -> JAX-orientation shape of one layer (declared once; the HF shapes of
        ``router_tensor_names`` are derived from it)."""
        d, c = head_dim, 2 if use_softmax else 1
        return {
            "feat_w0": (d, 4 * d), "feat_b0": (4 * d,), "feat_w2": (4 * d, d), "feat_b2": (d,),
            "head_w0": (d, 4 * d), "head_b0": (4 * d,), "head_w2": (4 * d, d), "head_b2": (d,),
            "head_w4": (d, c), "head_b4": (c,),
        }  # fmt: skip


# ---------------------------------------------------------------------------------------- pooling


def ctx_q_pool(k: jax.Array, lengths: jax.Array | None = None) -> jax.Array:
    """``ctx_q`` pooling: mean of the first and the last 100 keys of each sequence (spec 2.2).

    Args:
      k: [B, T, K, D] keys after k_norm and BEFORE RoPE. Sequence b occupies tokens
        ``[0, lengths[b])`` (right padding); tokens past its length are ignored.
      lengths: int32 [B], each sequence's own length (may be traced); None means all T.
        Values are clipped to [1, T]: a length-0 row (batch padding) pools token 0 and stays finite.
    Returns:
      pooled: [B, K, D] in k.dtype, ``mean(concat(k[:min(100, L)], k[max(0, L-100):L]))`` with fp32
      accumulation rounded once to k.dtype (torch's bf16 mean). Overlapping tokens count twice
      (100 <= L < 200); for L < 100 it equals the plain mean of the L tokens.
    """
    if k.ndim != 4:
        raise ValueError(f"k must be [B, T, K, D], got shape {k.shape}")
    b, t = k.shape[0], k.shape[1]
    w = min(POOL_TOKENS, t)  # static window size
    if lengths is None:
        lengths = jnp.full((b,), t, jnp.int32)
    elif lengths.shape != (b,):
        raise ValueError(f"lengths must be [B]={b}, got shape {lengths.shape}")
    lengths = jnp.clip(lengths.astype(jnp.int32), 1, t)
    valid = jnp.arange(w, dtype=jnp.int32)[None, :] < lengths[:, None]  # [B, W]; all true if L>=W
    # Slice before upcasting: only 2 x 100 tokens per sequence are read, so routing stays cheap
    # at 128K tokens.
    head = k[:, :w].astype(jnp.float32)  # [B, W, K, D]
    tail_start = jnp.maximum(lengths - w, 0)  # [B]
    tail = jax.vmap(lambda x, s: jax.lax.dynamic_slice_in_dim(x, s, w, axis=0))(k, tail_start)
    tail = tail.astype(jnp.float32)
    mask = valid[:, :, None, None].astype(jnp.float32)
    total = jnp.sum(head * mask, axis=1) + jnp.sum(tail * mask, axis=1)  # [B, K, D] fp32
    count = 2 * jnp.minimum(lengths, w).astype(jnp.float32)  # [B]
    return (total / count[:, None, None]).astype(k.dtype)


# ----------------------------------------------------------------------------------------- MLP


def _linear(x: jax.Array, w: jax.Array, b: jax.Array) -> jax.Array:
    """torch ``nn.Linear`` on GPU in x.dtype: fp32 accumulation and bias, one rounding to x.dtype."""
    y = jnp.matmul(x, w.astype(x.dtype), precision=_HIGHEST, preferred_element_type=jnp.float32)
    return (y + b.astype(jnp.float32)).astype(x.dtype)


def _silu(x: jax.Array) -> jax.Array:
    # torch computes bf16 SiLU in fp32 and rounds once.
    return jax.nn.silu(x.astype(jnp.float32)).astype(x.dtype)


def router_logits(pooled: jax.Array, params: RouterParams) -> jax.Array:
    """The official ``AttentionRouter`` MLP, per KV head (weights shared across heads).

    Args:
      pooled: [B, K, D] (``ctx_q_pool`` output); the computation dtype is pooled.dtype.
      params: one layer's ``RouterParams``.
    Returns:
      logits: [B, K, C] in pooled.dtype. C = 2: raw logits of the softmax head. C = 1 (sigmoid
      head): the logit after the eval model's parameter-free LayerNorm across the K heads.

    ``f = L2(silu(L0(pooled)))``; ``logits = R4(silu(R2(silu(R0(f)))))``.
    """
    if pooled.ndim != 3:
        raise ValueError(f"pooled must be [B, K, D], got shape {pooled.shape}")
    f = _linear(
        _silu(_linear(pooled, params.feat_w0, params.feat_b0)), params.feat_w2, params.feat_b2
    )
    h = _silu(_linear(f, params.head_w0, params.head_b0))
    h = _silu(_linear(h, params.head_w2, params.head_b2))
    logits = _linear(h, params.head_w4, params.head_b4)
    if params.num_classes == 1:
        # nn.LayerNorm([K, 1], elementwise_affine=False): normalise the K logits of a sequence.
        x = logits.astype(jnp.float32)
        mean = jnp.mean(x, axis=(-2, -1), keepdims=True)
        var = jnp.mean(jnp.square(x - mean), axis=(-2, -1), keepdims=True)
        logits = ((x - mean) * jax.lax.rsqrt(var + _LAYER_NORM_EPS)).astype(pooled.dtype)
    return logits


def router_decision(logits: jax.Array, *, mask_temp: float = 1.0) -> jax.Array:
    """Router class per KV head: int32 [B, K] in {0, 1} (1 = "retrieval" head).

    Args:
      logits: [B, K, 2] (softmax head) or [B, K, 1] (sigmoid head) from ``router_logits``.
      mask_temp: tau of the sigmoid head (``sigmoid(logit / tau) > 0.5``); unused for 2 logits.

    Bit-exact with the official eval path (spec 2.4): softmax in fp32 of the logits, rounded to
    the logits dtype, class 1 iff ``p1 > p0`` strictly, so ties and near-ties whose probabilities
    round equal go to class 0 (torch argmax returns the first maximum).
    """
    c = logits.shape[-1]
    dtype = logits.dtype
    if c == 2:
        p = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(dtype)
        return (p[..., 1] > p[..., 0]).astype(jnp.int32)
    if c == 1:
        scaled = (logits.astype(jnp.float32) / mask_temp).astype(dtype)
        s = jax.nn.sigmoid(scaled.astype(jnp.float32)).astype(dtype)
        return (s[..., 0] > 0.5).astype(jnp.int32)
    raise ValueError(f"logits must end in 2 (softmax head) or 1 (sigmoid head), got {logits.shape}")


# ------------------------------------------------------------------------------------ head modes


def head_modes(z_kv: jax.Array, retrieval_mode: str, toggle_type: str, num_heads: int) -> jax.Array:
    """Attention mode per query head from the per-KV-head router class (spec section 3).

    Args:
      z_kv: int [..., K] in {0, 1}.
      retrieval_mode, toggle_type: mode names of class 1 and class 0 heads (static).
      num_heads: H, a multiple of K.
    Returns:
      int32 [..., H]: 0 dense, 1 xattn, -1 streaming. KV head j's mode is copied to query heads
      ``j*G .. j*G+G-1`` (repeat-interleave, G = H // K), like the official GQA expansion.
    """
    if (retrieval_mode, toggle_type) not in MODE_TABLE:
        raise ValueError(unsupported_pair_message(retrieval_mode, toggle_type))
    num_kv = z_kv.shape[-1]
    if num_kv < 1 or num_heads % num_kv:
        raise ValueError(f"num_heads={num_heads} must be a multiple of z_kv.shape[-1]={num_kv}")
    m0, m1 = MODE_TABLE[(retrieval_mode, toggle_type)]
    modes_kv = jnp.where(z_kv == 1, jnp.int32(m1), jnp.int32(m0))
    return jnp.repeat(modes_kv, num_heads // num_kv, axis=-1)


def route(
    k: jax.Array,
    lengths: jax.Array | None,
    params: RouterParams,
    cfg: ElasticConfig,
    num_heads: int,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Route one layer: pre-RoPE keys -> (head modes [B, H], z_kv [B, K], logits [B, K, C]).

    k: [B, T, K, D] after k_norm, before RoPE; lengths: int32 [B] or None (see ``ctx_q_pool``).
    """
    if params.num_classes != cfg.router_classes:
        raise ValueError(
            f"router head has {params.num_classes} output(s) but use_softmax={cfg.use_softmax} "
            f"expects {cfg.router_classes}"
        )
    logits = router_logits(ctx_q_pool(k, lengths), params)
    z_kv = router_decision(logits, mask_temp=cfg.mask_temp)
    return head_modes(z_kv, cfg.retrieval_mode, cfg.toggle_type, num_heads), z_kv, logits


# ------------------------------------------------------------------------ HF checkpoint names

ROUTER_PREFIX = "model.layers.{layer}.self_attn.mask_allocator."
# (HF module path, our weight field, our bias field); indices 1 and 3 are parameter-free SiLUs.
_ROUTER_LAYOUT = (
    ("cls_feat_extractor.0", "feat_w0", "feat_b0"),
    ("cls_feat_extractor.2", "feat_w2", "feat_b2"),
    ("cls_router_head_agnostic.0", "head_w0", "head_b0"),
    ("cls_router_head_agnostic.2", "head_w2", "head_b2"),
    ("cls_router_head_agnostic.4", "head_w4", "head_b4"),
)
# Per-layer tensors that exist in trained checkpoints but are unused at inference (spec 1.3):
# the training temperature, the static L0 head-mask logits and the task embedding.
TRAINING_ONLY_SUFFIXES = (
    "self_attn.mask_allocator.log_temp",
    "self_attn.attn_mask_log_alphas",
    "self_attn.mask_allocator.task_embedding.weight",
)
_TRAINING_ONLY_RE = re.compile(
    r"^model\.layers\.\d+\.(" + "|".join(re.escape(s) for s in TRAINING_ONLY_SUFFIXES) + r")$"
)


def is_training_only_tensor(name: str) -> bool:
    """True for checkpoint tensors the converter must skip (``TRAINING_ONLY_SUFFIXES``)."""
    return _TRAINING_ONLY_RE.match(name) is not None


def router_tensor_names(
    layer: int, use_softmax: bool, *, head_dim: int
) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> expected HF shape (torch ``[out, in]``) of one layer's router.

    ``head_dim`` (the router width d) is required: the shapes are ``[4d, d]``, ``[d, 4d]``, ...
    """
    prefix = ROUTER_PREFIX.format(layer=layer)
    shapes = RouterParams.shapes(head_dim, use_softmax)
    names: dict[str, tuple[int, ...]] = {}
    for module, w_field, b_field in _ROUTER_LAYOUT:
        names[f"{prefix}{module}.weight"] = shapes[w_field][::-1]  # JAX [in, out] -> HF [out, in]
        names[f"{prefix}{module}.bias"] = shapes[b_field]
    return names


def router_params_from_hf(
    get_tensor: Callable[[str], np.ndarray],
    layer: int,
    head_dim: int,
    use_softmax: bool,
    *,
    available: Collection[str] | None = None,
    source: str | None = None,
    dtype: np.dtype | str | None = None,
) -> RouterParams:
    """Load one layer's router from HF checkpoint tensors, transposed to ``[in, out]``.

    Args:
      get_tensor: HF name -> array (numpy, or anything ``np.asarray`` accepts).
      layer, head_dim, use_softmax: which layer and the expected shapes (``router_tensor_names``).
      available: the checkpoint's tensor names; when given, missing tensors are reported before
        any tensor is read. Otherwise a ``KeyError`` (or safetensors' "does not contain tensor"
        error) from ``get_tensor`` counts as missing.
      source: file or directory named in errors.
      dtype: cast every leaf to this dtype (default: keep the checkpoint dtype).
    Raises:
      ValueError: listing every missing router tensor of the layer, or naming a tensor whose shape
        differs from the expected one (with a use_softmax hint when only the class count differs).
    """
    where = f" in {source}" if source else ""
    expected = router_tensor_names(layer, use_softmax, head_dim=head_dim)
    if available is not None:
        missing = [n for n in expected if n not in available]
        if missing:
            raise ValueError(_missing_message(missing, layer, where))
    arrays: dict[str, np.ndarray] = {}
    missing = []
    for name in expected:
        try:
            arrays[name] = np.asarray(get_tensor(name))
        except Exception as e:  # noqa: BLE001 - only "missing" errors are translated
            if isinstance(e, KeyError) or "does not contain tensor" in str(e):
                missing.append(name)
            else:
                raise
    if missing:
        raise ValueError(_missing_message(missing, layer, where))
    fields = {}
    for module, w_field, b_field in _ROUTER_LAYOUT:
        w_name = f"{ROUTER_PREFIX.format(layer=layer)}{module}.weight"
        for name, field in ((w_name, w_field), (w_name[: -len("weight")] + "bias", b_field)):
            arr = arrays[name]
            if tuple(arr.shape) != expected[name]:
                raise ValueError(
                    _shape_message(name, expected[name], arr.shape, where, use_softmax, head_dim)
                )
            if arr.ndim == 2:
                arr = np.ascontiguousarray(arr.T)  # torch [out, in] -> JAX [in, out]
            fields[field] = arr if dtype is None else arr.astype(dtype)
    return RouterParams(**fields)


def _missing_message(missing: list[str], layer: int, where: str) -> str:
    return (
        f"PawQwen3 checkpoint{where} lacks {len(missing)} router tensor(s) of layer {layer}: "
        f"{missing} (a PawQwen3ForCausalLM checkpoint needs the mask_allocator weights of every "
        "layer; a plain Qwen3 checkpoint should use architectures ['Qwen3ForCausalLM'])"
    )


def _shape_message(
    name: str,
    expected: tuple[int, ...],
    actual: tuple[int, ...],
    where: str,
    use_softmax: bool,
    head_dim: int,
) -> str:
    msg = f"router tensor {name}{where} has shape {tuple(actual)}, expected {expected}"
    other_c = 1 if use_softmax else 2
    if (
        name.endswith(".4.weight")
        and tuple(actual) == (other_c, head_dim)
        or (name.endswith(".4.bias") and tuple(actual) == (other_c,))
    ):
        msg += (
            f" (the checkpoint has a {other_c}-output router head: config.json's use_softmax "
            f"should be {'false' if use_softmax else 'true'})"
        )
    return msg
