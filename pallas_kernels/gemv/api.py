"""Public entry point of the decode GEMV over a stacked weight (see ``pallas_triton``)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from pallas_kernels import _compat
from pallas_kernels.gemv.pallas_triton import stacked_gemv_partials
from pallas_kernels.gemv.reference import stacked_gemv_reference

TARGET_PROGRAMS = 256  # about two waves of 132 SMs (H100): enough loads in flight for HBM
TABLE_NAME = (
    "gemv.json"  # pallas_kernels/autotune/<device_kind>/gemv.json (benchmarks/bench_gemv.py)
)


@dataclasses.dataclass(frozen=True)
class GemvConfig:
    """block_n: output columns per program; block_k: weight rows per loop step; splits: K
    splits (float32 partials summed by the caller); num_warps / num_stages: Triton's;
    tensor_cores: a Triton dot on x padded to 16 rows (True), or multiply + column sum on the
    CUDA cores without padding (False; one row only); rows_in_kernel: with tensor cores, pad
    x's rows to 16 inside the kernel and store only the real rows of the partials (False: XLA
    pads x before the call)."""

    block_n: int = 128
    block_k: int = 128
    splits: int = 8
    num_warps: int = 4
    num_stages: int = 3
    tensor_cores: bool = True
    rows_in_kernel: bool = False


def supported(K: int, N: int) -> bool:
    """Whether ``default_config`` (so ``stacked_gemv`` without a config) handles [K, N]."""
    return K % 16 == 0 and N % 16 == 0


def default_config(K: int, N: int) -> GemvConfig:
    """The widest column block (<= 128) that divides N, then K splits (<= 16, each a whole number
    of 128-row steps) until about ``TARGET_PROGRAMS`` programs. Untuned: a starting point for
    the GPU autotune table."""
    block_n = next((b for b in (128, 64, 32, 16) if N % b == 0), None)
    if block_n is None:
        raise ValueError(f"stacked_gemv: N={N} must be a multiple of 16")
    block_k = next((b for b in (128, 64, 32, 16) if K % b == 0), None)
    if block_k is None:
        raise ValueError(f"stacked_gemv: K={K} must be a multiple of 16")
    splits = 1
    while (
        splits < 16
        and (N // block_n) * splits < TARGET_PROGRAMS
        and K % (2 * splits * block_k) == 0
    ):
        splits *= 2
    return GemvConfig(block_n=block_n, block_k=block_k, splits=splits)


def shape_key(B: int, K: int, N: int, dtype) -> str:
    """Autotune key, e.g. ``B=1,K=4096,N=2560,bfloat16``."""
    return f"B={B},K={K},N={N},{jnp.dtype(dtype).name}"


def get_config(B: int, K: int, N: int, dtype, device_kind: str | None) -> GemvConfig:
    """The tuned config of ``device_kind``'s table for this shape, else ``default_config``."""
    if device_kind is not None:
        from pallas_kernels.autotune import load_table

        entry = (
            load_table(device_kind, TABLE_NAME).get("configs", {}).get(shape_key(B, K, N, dtype))
        )
        if entry is not None:
            return GemvConfig(**entry["config"])
    return default_config(K, N)


def _check(x: jax.Array, w: jax.Array, layer: int, cfg: GemvConfig) -> None:
    if x.ndim != 2 or w.ndim != 3:
        raise ValueError(
            f"stacked_gemv: x must be [B, K] and w [L, K, N]; got {x.shape}, {w.shape}"
        )
    B, K = x.shape
    L, Kw, N = w.shape
    if Kw != K:
        raise ValueError(f"stacked_gemv: x has K={K} columns, w[layer] has {Kw} rows")
    if not isinstance(layer, int) or not 0 <= layer < L:
        raise ValueError(f"stacked_gemv: layer={layer!r} must be a Python int in [0, {L})")
    if not cfg.tensor_cores and B != 1:
        raise ValueError(f"stacked_gemv: GemvConfig(tensor_cores=False) takes one row; got B={B}")
    if N % cfg.block_n or K % (cfg.splits * cfg.block_k):
        raise ValueError(
            f"stacked_gemv: N={N} must divide by block_n={cfg.block_n} and K={K} by "
            f"splits*block_k={cfg.splits}*{cfg.block_k}"
        )


def stacked_gemv(
    x: jax.Array,
    w: jax.Array,
    layer: int,
    *,
    config: GemvConfig | None = None,
    implementation: str = "pallas",
    interpret: bool | None = None,
    partials: bool = False,
) -> jax.Array:
    """x: [B, K], w: [L, K, N] (stacked per-layer weights), layer: static int -> float32 [B, N]
    = x @ w[layer], reading w[layer] in place. implementation: "pallas" or "reference".
    config: default: this GPU's autotune table entry for (B, K, N, dtype), else
    ``default_config``. partials: return the K splits' float32 partials [S, B, N] unsummed
    (for a consumer that sums them itself, ``decode_norm.add_rms_norm``); the reference
    returns its one "split" [1, B, N]."""
    if implementation == "reference":
        out = stacked_gemv_reference(x, w, layer)
        return out[None] if partials else out
    if implementation != "pallas":
        raise ValueError(f"implementation={implementation!r}; allowed: ('pallas', 'reference')")
    cfg = config
    if cfg is None:  # shapes read loosely here: _check names a wrong rank below
        device = _compat.device_kind() if _compat.on_gpu() else None
        cfg = get_config(x.shape[0], x.shape[-1], w.shape[-1], w.dtype, device)
    _check(x, w, layer, cfg)
    parts = stacked_gemv_partials(
        x.astype(w.dtype),
        w,
        layer=layer,
        block_n=cfg.block_n,
        block_k=cfg.block_k,
        splits=cfg.splits,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
        tensor_cores=cfg.tensor_cores,
        rows_in_kernel=cfg.rows_in_kernel,
        interpret=_compat.default_interpret() if interpret is None else interpret,
    )
    return parts if partials else jnp.sum(parts, axis=0)
