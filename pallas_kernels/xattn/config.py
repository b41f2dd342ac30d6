"""Kernel tilings for the XAttention estimate and the per-device autotune table lookup.

Tiles are counted in *reshaped* rows/columns: one reshaped row is a group of ``stride``
consecutive tokens (``block_size // stride`` reshaped rows make one mask block).
"""

from __future__ import annotations

import dataclasses

from pallas_kernels import autotune

_TABLE_NAME = "xattn.json"
SELECT_IMPLEMENTATIONS = ("pallas", "xla")


def _is_pow2(x: int) -> bool:
    return isinstance(x, int) and x > 0 and (x & (x - 1)) == 0


@dataclasses.dataclass(frozen=True)
class Config:
    """Tiling of the Pallas Triton scoring kernel and of the selection step.

    Attributes:
      block_m: reshaped query rows per score tile (power of two, >= 16).
      block_n: reshaped key columns per score tile (power of two, >= 16).
      block_k: head-dim chunk per MMA step (power of two, >= 16, divides D).
      num_warps / num_stages: launch settings of the scoring kernel.
      group_m: row tiles per L2 group in the tile order (consecutive programs share K panels).
      select_rows: query-block rows per program of the Pallas selection kernel (power of two).
      select_num_warps: warps per program of the selection kernel.
      select_impl: ``"pallas"`` (Triton selection kernel) or ``"xla"`` (jnp threshold search).
    """

    block_m: int = 128
    block_n: int = 128
    block_k: int = 64
    num_warps: int = 8
    num_stages: int = 3
    group_m: int = 8
    select_rows: int = 4
    select_num_warps: int = 4
    select_impl: str = "pallas"

    def __post_init__(self):
        for name in ("block_m", "block_n", "block_k"):
            val = getattr(self, name)
            if not (_is_pow2(val) and val >= 16):
                raise ValueError(f"{name}={val!r} must be a power of two >= 16")
        for name in ("num_warps", "select_num_warps"):
            val = getattr(self, name)
            if not (_is_pow2(val) and val <= 16):
                raise ValueError(f"{name}={val!r} must be a power of two <= 16")
        if not (isinstance(self.num_stages, int) and self.num_stages >= 1):
            raise ValueError(f"num_stages={self.num_stages!r} must be an int >= 1")
        if not (isinstance(self.group_m, int) and self.group_m >= 1):
            raise ValueError(f"group_m={self.group_m!r} must be an int >= 1")
        if not _is_pow2(self.select_rows):
            raise ValueError(f"select_rows={self.select_rows!r} must be a power of two")
        if self.select_impl not in SELECT_IMPLEMENTATIONS:
            raise ValueError(
                f"select_impl={self.select_impl!r} must be one of {SELECT_IMPLEMENTATIONS}"
            )

    def check_shapes(self, *, head_dim: int, rows_per_block: int) -> None:
        """Raise ValueError unless the tiles fit ``head_dim`` and whole mask blocks."""
        if head_dim % self.block_k:
            raise ValueError(f"Config.block_k={self.block_k} must divide head_dim={head_dim}")
        for name in ("block_m", "block_n"):
            if getattr(self, name) % rows_per_block:
                raise ValueError(
                    f"Config.{name}={getattr(self, name)} must be a multiple of "
                    f"block_size // stride = {rows_per_block}"
                )


def shape_key(*, stride: int, block_size: int, head_dim: int, seq_len: int, dtype: str) -> str:
    """Autotune table key, e.g. ``"stride=16,block=128,D=128,S=65536,bfloat16"``."""
    return f"stride={stride},block={block_size},D={head_dim},S={seq_len},{dtype}"


def _load_table(device_kind: str) -> dict:
    return autotune.load_table(device_kind, _TABLE_NAME)


def heuristic_config(*, head_dim: int, rows: int, rows_per_block: int) -> Config:
    """Default tiling when the table has no entry: 128x128 tiles for long inputs, smaller
    tiles (never below one mask block or 16) for short ones."""
    tile = 128
    while tile > 16 and tile // 2 >= rows and tile // 2 >= rows_per_block:
        tile //= 2
    tile = max(tile, rows_per_block)
    block_k = min(64, head_dim) if head_dim >= 16 else head_dim
    return Config(
        block_m=tile,
        block_n=tile,
        block_k=block_k,
        num_warps=8 if tile >= 128 else 4,
        num_stages=3,
    )


def lookup_config(
    device_kind: str,
    *,
    stride: int,
    block_size: int,
    head_dim: int,
    seq_len: int,
    dtype: str,
) -> Config:
    """Table lookup: exact key, else the entry with the same (stride, block, D, dtype) and the
    nearest sequence length (in powers of two), else the heuristic default."""
    table = _load_table(device_kind)
    rows = -(-seq_len // stride)
    rb = block_size // stride
    entry = table.get(
        shape_key(
            stride=stride, block_size=block_size, head_dim=head_dim, seq_len=seq_len, dtype=dtype
        )
    )
    if entry is None:
        best = None
        prefix = f"stride={stride},block={block_size},D={head_dim},"
        for key, cfg in table.items():
            if not (key.startswith(prefix) and key.endswith("," + dtype)):
                continue
            s = int(key[len(prefix) :].split(",")[0].split("=")[1])
            dist = abs(s.bit_length() - seq_len.bit_length())
            if best is None or dist < best[0]:
                best = (dist, cfg)
        entry = None if best is None else best[1]
    if entry is None:
        return heuristic_config(head_dim=head_dim, rows=rows, rows_per_block=rb)
    cfg = Config(**entry)
    # A table tile larger than the (short) input would only add padding: fall back.
    if cfg.block_m > max(rows, rb) * 2:
        return heuristic_config(head_dim=head_dim, rows=rows, rows_per_block=rb)
    return cfg
