"""Per-model LongBench rules that depend on the backbone family (prompt budget, chat template).

LongBench's ``config/model2maxlen.json`` (THUDM/LongBench at commit 2e00731f, the file next to
the LongBench v2 ``pred.py``) gives ``"Llama-3.1-8B-Instruct": 120000`` tokens; the LongBench v1
``LongBench/config/model2maxlen.json`` at the same commit lists no Llama-3 model. Chat models
there are prompted through their own tokenizer's chat template (a single user turn); the
harness does the same with the checkpoint's template files (``elastic_jax.tokenizer``), so
Llama-3.1 prompts get ``<|begin_of_text|>`` and the system/user/assistant headers from the
checkpoint, not from a hard-coded string.
"""

from __future__ import annotations

import types
from collections.abc import Mapping
from typing import Any

from elastic_jax.config import LLAMA_ARCHITECTURES

# Architecture family -> LongBench's prompt budget (tokens before the chat template).
OFFICIAL_MAX_LENGTH: Mapping[str, int] = types.MappingProxyType({"llama": 120_000})

# Room left for the chat template and the longest generation (512) under the context window.
GENERATION_ROOM = 1024


def family(config: Any) -> str:
    """ "llama" for Llama / PawLlama configs, "qwen3" otherwise."""
    return "llama" if getattr(config, "architecture", None) in LLAMA_ARCHITECTURES else "qwen3"


def official_max_length(config: Any, window: int) -> int:
    """The prompt budget for a model with context ``window``: LongBench's model2maxlen value for
    its family when it has one (Llama-3.1: 120000), capped at ``window - GENERATION_ROOM``;
    otherwise ``window - GENERATION_ROOM`` (Qwen3: no official entry)."""
    room = window - GENERATION_ROOM
    official = OFFICIAL_MAX_LENGTH.get(family(config))
    return room if official is None else min(official, room)
