"""Autotune tables: ``<device_kind>/<kernel>.json``, committed data read at run time, never written
by library code (the ``autotune_*.py`` scripts regenerate them on a device)."""

from __future__ import annotations

import functools
import json
import os

TABLE_DIR = os.path.dirname(__file__)


@functools.lru_cache(maxsize=32)
def _table_text(device_kind: str, filename: str) -> str:
    # Cached as an immutable string: the files are read-only package data.
    path = os.path.join(TABLE_DIR, device_kind, filename)
    if not os.path.exists(path):
        return "{}"
    with open(path) as f:
        return f.read()


def load_table(device_kind: str, filename: str) -> dict:
    """The parsed table ``<device_kind>/<filename>``, or {} when this device has none. A fresh
    dict per call (tables are small and read at trace time), so no caller can change another's."""
    return json.loads(_table_text(device_kind, filename))
