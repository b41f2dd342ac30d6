"""Tiling config of the paged decode kernel, its heuristic default and the autotune table.

Lookup order (STYLE.md): an exact hit in ``autotune/<device_kind>/paged_decode.json`` for the
shape key, then the heuristic. The table is written by ``benchmarks/bench_paged_decode.py``
(``--write-table``) and committed; code never writes it at run time.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from pathlib import Path

import numpy as np

_TABLE_DIR = Path(__file__).resolve().parent.parent / "autotune"
TABLE_NAME = "paged_decode.json"

# Streaming multiprocessors of the GPUs we tune for (H100 / H200: 132). Only the heuristic uses
# it, so a different GPU gets a reasonable, not an optimal, default.
_DEFAULT_NUM_SMS = 132


def _is_pow2(x: int) -> bool:
    return x > 0 and (x & (x - 1)) == 0


@dataclasses.dataclass(frozen=True)
class PagedDecodeConfig:
    """How one ``(sequence, kv head)`` pair is split and tiled.

    Attributes:
      pages_per_block: pages loaded per loop step (the key block is ``pages_per_block * N``
        tokens); a power of two.
      page_chunks: for pages too large for the shared-memory pipeline, each page is loaded in
        this many token chunks (key block ``N / page_chunks``); a power of two, and
        ``pages_per_block`` must then be 1.
      num_splits: the page range of each sequence is cut into this many contiguous parts, each
        one program (flash-decoding); partial results are merged afterwards. 1 skips the merge.
      num_warps: Triton warps per program (power of two).
      num_stages: Triton software-pipelining depth of the K/V loads.
    """

    pages_per_block: int = 1
    page_chunks: int = 1
    num_splits: int = 1
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self) -> None:
        if not _is_pow2(self.pages_per_block):
            raise ValueError(
                f"pages_per_block={self.pages_per_block} must be a positive power of two"
            )
        if not _is_pow2(self.page_chunks):
            raise ValueError(f"page_chunks={self.page_chunks} must be a positive power of two")
        if self.page_chunks > 1 and self.pages_per_block > 1:
            raise ValueError(
                f"page_chunks={self.page_chunks} needs pages_per_block=1, "
                f"got {self.pages_per_block}"
            )
        if self.num_splits < 1:
            raise ValueError(f"num_splits={self.num_splits} must be >= 1")
        if not _is_pow2(self.num_warps):
            raise ValueError(f"num_warps={self.num_warps} must be a positive power of two")
        if self.num_stages < 1:
            raise ValueError(f"num_stages={self.num_stages} must be >= 1")

    def block_tokens(self, page_size: int) -> int:
        """Tokens of one key block (one loop step)."""
        return page_size * self.pages_per_block // self.page_chunks

    def clamp(self, max_pages: int, page_size: int) -> PagedDecodeConfig:
        """Shrink the tiling to fit a page table of ``max_pages`` columns of ``page_size``."""
        ppb = min(self.pages_per_block, 1 << (max(max_pages, 1).bit_length() - 1))
        chunks = min(self.page_chunks, max(page_size // 16, 1))
        cfg = dataclasses.replace(self, pages_per_block=ppb, page_chunks=chunks)
        blocks = math.ceil(max_pages * page_size / cfg.block_tokens(page_size))
        return dataclasses.replace(cfg, num_splits=max(min(self.num_splits, blocks), 1))


def shape_key(
    batch: int,
    num_heads: int,
    num_kv_heads: int,
    max_pages: int,
    page_size: int,
    head_dim: int,
    dtype,
) -> str:
    """Autotune key, e.g. ``B=1,H=32,K=8,S=65536,N=128,D=128,bfloat16`` (S = max_pages * N)."""
    return (
        f"B={batch},H={num_heads},K={num_kv_heads},S={max_pages * page_size},"
        f"N={page_size},D={head_dim},{np.dtype(dtype).name}"
    )


def _key_blocks(cfg: PagedDecodeConfig, max_pages: int, page_size: int) -> int:
    """Key blocks of a full page table under ``cfg``'s block size."""
    return math.ceil(max_pages * page_size / cfg.block_tokens(page_size))


def _nearest_pow2(x: float) -> int:
    """The power of two nearest ``x`` in log scale (1 below 1)."""
    return 1 << max(0, round(math.log2(x))) if x >= 1 else 1


def heuristic_config(
    batch: int, num_kv_heads: int, max_pages: int, page_size: int
) -> PagedDecodeConfig:
    """One page (or a 128-token chunk of a larger one) per step, and about four waves of
    programs over the SMs, rounded to a power of two (H100 sweeps: gathering several small pages
    per step and split counts that leave a partial last wave were the slow choices)."""
    chunks = max(1, page_size // 128)
    stages = 4 if page_size // chunks <= 64 else 3  # K+V stages must fit in shared memory
    cfg = PagedDecodeConfig(page_chunks=chunks, num_stages=stages)
    splits = _nearest_pow2(4 * _DEFAULT_NUM_SMS / max(batch * num_kv_heads, 1))
    splits = max(1, min(splits, _key_blocks(cfg, max_pages, page_size) // 2))
    return dataclasses.replace(cfg, num_splits=splits)


def ragged_num_splits(batch: int, num_kv_heads: int, max_pages: int, page_size: int) -> int:
    """Split count for a batch whose rows differ widely in length (the serving engine's slots):
    the uniform heuristic's, raised until the longest row alone has about one program per SM
    (``num_kv_heads * splits`` ~ SMs, a power of two), since that row's programs set the kernel
    time. H100, 8 rows of a 32K table at 100/10/15/25/10/30/12/20% of it
    (``bench_paged_decode.py --shapes 10``): 172.4 us at the heuristic's 8 splits, 152.4 us at
    16, 152-154 us anywhere from 9 to 64."""
    uniform = heuristic_config(batch, num_kv_heads, max_pages, page_size)
    one_row = _nearest_pow2(_DEFAULT_NUM_SMS / max(num_kv_heads, 1))
    blocks = _key_blocks(uniform, max_pages, page_size)
    return max(uniform.num_splits, min(one_row, max(blocks // 2, 1)))


@functools.lru_cache(maxsize=8)
def _load_table(device_kind: str) -> tuple[tuple[str, tuple[tuple[str, int], ...]], ...]:
    """The committed table as an immutable tuple (so the cache holds no mutable state)."""
    path = _TABLE_DIR / device_kind / TABLE_NAME
    if not path.is_file():
        return ()
    entries = json.loads(path.read_text())["configs"]
    return tuple(
        (key, tuple(sorted((k, int(v)) for k, v in entry["config"].items())))
        for key, entry in entries.items()
    )


def lookup_config(key: str, device_kind: str | None) -> PagedDecodeConfig | None:
    """The tuned config for ``key`` on ``device_kind``, or None when the table has no entry."""
    if device_kind is None:
        return None
    for entry_key, fields in _load_table(device_kind):
        if entry_key == key:
            return PagedDecodeConfig(**dict(fields))
    return None


def get_config(
    batch: int,
    num_heads: int,
    num_kv_heads: int,
    max_pages: int,
    page_size: int,
    head_dim: int,
    dtype,
    device_kind: str | None,
) -> PagedDecodeConfig:
    """Table hit for this shape on ``device_kind``, else the heuristic; clamped to the table."""
    key = shape_key(batch, num_heads, num_kv_heads, max_pages, page_size, head_dim, dtype)
    cfg = lookup_config(key, device_kind)
    if cfg is None:
        cfg = heuristic_config(batch, num_kv_heads, max_pages, page_size)
    return cfg.clamp(max_pages, page_size)
