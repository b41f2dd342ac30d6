"""Kernel tilings for block-sparse attention and the per-device autotune table lookup.

The *mask* block size (``block_q``/``block_k`` arguments of ``block_sparse_attention``) fixes
what a kept-block index means. A kernel *tile* is a divisor of it: a 128x128 kept block can
be processed as two 128x64 tiles, say. ``Config`` holds the tile sizes and launch settings.
"""

from __future__ import annotations

import dataclasses

from pallas_kernels import autotune

_TABLE_NAME = "block_sparse_attn.json"


def _is_pow2(x: int) -> bool:
    return x > 0 and (x & (x - 1)) == 0


@dataclasses.dataclass(frozen=True)
class Config:
    """Tiling of the Pallas Triton kernel.

    Attributes:
      block_q: query rows per program (power of two, >= 16).
      block_k: keys per inner-loop step (power of two, >= 16).
      num_warps: warps per program (1..16, power of two).
      num_stages: software-pipelining depth of the key loop (>= 1).
    """

    block_q: int = 128
    block_k: int = 64
    num_warps: int = 8
    num_stages: int = 3

    def __post_init__(self):
        for name in ("block_q", "block_k"):
            val = getattr(self, name)
            if not (isinstance(val, int) and _is_pow2(val) and val >= 16):
                raise ValueError(f"{name}={val!r} must be a power of two >= 16")
        if not (_is_pow2(self.num_warps) and self.num_warps <= 16):
            raise ValueError(f"num_warps={self.num_warps!r} must be a power of two <= 16")
        if not (isinstance(self.num_stages, int) and self.num_stages >= 1):
            raise ValueError(f"num_stages={self.num_stages!r} must be an int >= 1")

    def check_divides(self, block_size: int) -> None:
        """Raise ValueError unless both tiles divide the mask block size."""
        for name in ("block_q", "block_k"):
            if block_size % getattr(self, name):
                raise ValueError(
                    f"Config.{name}={getattr(self, name)} must divide the mask block size "
                    f"{block_size}"
                )


@dataclasses.dataclass(frozen=True)
class MosaicConfig:
    """Tiling of the Pallas Mosaic GPU (Hopper, warp-specialized) kernel.

    Two compute warpgroups each own ``block_q_wg`` query rows of one ``2 * block_q_wg`` query
    tile (which must equal the mask block size, so both walk the same kept-block list); a
    third warpgroup streams K/V tiles of ``block_k`` keys through ``num_stages`` buffers.
    ``heads_per_cta`` > 1: each CTA walks that many query heads of one query tile in turn,
    overlapping one head's prologue and epilogue with the previous head's work.
    ``persistent``: one CTA per SM looping over all query tiles (static round robin).
    """

    block_q_wg: int = 64
    block_k: int = 128
    num_stages: int = 2
    persistent: bool = False
    heads_per_cta: int = 1

    def __post_init__(self):
        if self.block_q_wg != 64:
            raise ValueError(f"block_q_wg={self.block_q_wg!r} must be 64")
        if self.block_k not in (64, 128):
            raise ValueError(f"block_k={self.block_k!r} must be 64 or 128")
        if not (isinstance(self.num_stages, int) and 2 <= self.num_stages <= 4):
            raise ValueError(f"num_stages={self.num_stages!r} must be in 2..4")
        if not (isinstance(self.heads_per_cta, int) and self.heads_per_cta >= 1):
            raise ValueError(f"heads_per_cta={self.heads_per_cta!r} must be an int >= 1")
        if self.persistent and self.heads_per_cta > 1:
            raise ValueError("persistent=True and heads_per_cta > 1 are exclusive")

    def check_divides(self, block_size: int) -> None:
        if 2 * self.block_q_wg != block_size or block_size % self.block_k:
            raise ValueError(
                f"MosaicConfig needs 2*block_q_wg == block size and block_k | block size; "
                f"got block_q_wg={self.block_q_wg}, block_k={self.block_k}, "
                f"block size={block_size}"
            )


def shape_key(
    *, batch: int, q_heads: int, kv_heads: int, seq_len: int, head_dim: int, dtype: str
) -> str:
    """Autotune table key, e.g. ``"B=1,H=32,K=8,S=32768,D=128,bfloat16"``."""
    return f"B={batch},H={q_heads},K={kv_heads},S={seq_len},D={head_dim},{dtype}"


def _load_table(device_kind: str) -> dict:
    return autotune.load_table(device_kind, _TABLE_NAME)


def _parse_key(key: str) -> dict[str, str]:
    parts = key.split(",")
    out = {p.split("=")[0]: p.split("=")[1] for p in parts if "=" in p}
    out["dtype"] = parts[-1]
    return out


def heuristic_config(head_dim: int, block_size: int) -> Config:
    """Default Triton tiling when the table has no entry: the best of the H100 sweep
    (128x128 tiles, 8 warps, 2 stages), shrunk to the mask block size."""
    del head_dim  # the sweep covered D=128; D=64 tiles the same way
    block = min(128, block_size)
    return Config(block_q=block, block_k=block, num_warps=8 if block >= 128 else 4, num_stages=2)


def lookup_config(
    device_kind: str,
    *,
    backend: str,
    batch: int,
    q_heads: int,
    kv_heads: int,
    seq_len: int,
    head_dim: int,
    dtype: str,
    block_size: int,
) -> Config | MosaicConfig:
    """Table lookup: exact shape key, else the same (H, K, D, dtype) with the nearest S,
    else the heuristic default. ``backend`` is ``"pallas_triton"`` or ``"pallas_mosaic_gpu"``.
    """
    table = _load_table(device_kind).get(backend, {}).get(str(block_size), {})
    key = shape_key(
        batch=batch,
        q_heads=q_heads,
        kv_heads=kv_heads,
        seq_len=seq_len,
        head_dim=head_dim,
        dtype=dtype,
    )
    entry = table.get(key)
    if entry is None:
        best = None
        for k, cfg in table.items():
            p = _parse_key(k)
            if (p.get("H"), p.get("K"), p.get("D"), p["dtype"]) != (
                str(q_heads),
                str(kv_heads),
                str(head_dim),
                dtype,
            ):
                continue
            dist = abs(int(p["S"]).bit_length() - seq_len.bit_length())
            if best is None or dist < best[0]:
                best = (dist, cfg)
        entry = None if best is None else best[1]
    cls = MosaicConfig if backend == "pallas_mosaic_gpu" else Config
    if entry is None:
        return cls() if cls is MosaicConfig else heuristic_config(head_dim, block_size)
    return cls(**entry)
