"""Continuous batching: ``Engine`` (slots + a shared paged KV pool), ``PageAllocator``."""

from elastic_jax.serving.engine import (
    Engine,
    RequestResult,
    RequestTiming,
    TokenEvent,
    prefill_info,
)
from elastic_jax.serving.pages import PageAllocator

__all__ = [
    "Engine",
    "PageAllocator",
    "RequestResult",
    "RequestTiming",
    "TokenEvent",
    "prefill_info",
]
