"""Autotune tables: ``<device_kind>/<kernel>.json``, committed data read at run time, never written
by library code (the ``autotune_*.py`` scripts regenerate them on a device)."""

from __future__ import annotations

import functools
import json
import os

TABLE_DIR = os.path.dirname(__file__)


@functools.lru_cache(maxsize=32)
def load_table(device_kind: str, filename: str) -> dict:
    """The parsed table ``<device_kind>/<filename>``, or {} when this device has none.
    Cached per (device kind, file): the files are read-only package data."""
    path = os.path.join(TABLE_DIR, device_kind, filename)
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)
