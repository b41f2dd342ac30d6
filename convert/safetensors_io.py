"""Minimal safetensors reader (header + memory-mapped tensors) with bfloat16 support.

The ``safetensors`` numpy API cannot return bfloat16 arrays, and we want to check every header
(names, shapes, dtypes, file size) before reading any tensor data, so we read the format directly:
8-byte little-endian header length, a JSON header, then the raw tensor bytes.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np

DTYPES = {
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F16": np.dtype(np.float16),
    "F32": np.dtype(np.float32),
    "F64": np.dtype(np.float64),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}


class SafetensorsError(ValueError):
    """A safetensors file is unreadable, truncated or inconsistent."""


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    begin: int  # absolute byte offset in the file
    end: int


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Parse and validate the header of one safetensors file (reads no tensor data)."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise SafetensorsError(f"{path}: file too short to be safetensors ({size} bytes)")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8 or n > 100 * 2**20:
            raise SafetensorsError(
                f"{path}: header length {n} exceeds the file size ({size} bytes)"
            )
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise SafetensorsError(f"{path}: corrupt header ({e})") from None
    base = 8 + n
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        if meta.get("dtype") not in DTYPES:
            raise SafetensorsError(
                f"{path}: tensor '{name}' has unsupported dtype {meta.get('dtype')!r}"
            )
        dtype = DTYPES[meta["dtype"]]
        shape = tuple(int(s) for s in meta["shape"])
        begin, end = (base + int(o) for o in meta["data_offsets"])
        if end - begin != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize:
            raise SafetensorsError(
                f"{path}: tensor '{name}' byte range does not match shape {shape}"
            )
        if end > size:
            raise SafetensorsError(
                f"{path}: truncated: tensor '{name}' ends at byte {end} but the file has {size} bytes"
            )
        out[name] = TensorInfo(path, name, dtype, shape, begin, end)
    return out


def load(info: TensorInfo) -> np.ndarray:
    """Read one tensor (a copy, so the memory map can close)."""
    with open(info.file, "rb") as f:
        f.seek(info.begin)
        buf = f.read(info.end - info.begin)
    if len(buf) != info.end - info.begin:
        raise SafetensorsError(f"{info.file}: truncated while reading tensor '{info.name}'")
    return np.frombuffer(buf, dtype=info.dtype).reshape(info.shape).copy()
