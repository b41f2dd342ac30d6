"""Jit-compiled prefill / decode steps and the shape buckets that bound recompilation.

Buckets (every distinct shape compiles once per process):
  - prompt length T: next power of two >= the longest prompt, at least 128; above
    ``prefill_chunk`` tokens, the next multiple of ``prefill_chunk`` (e.g. 8K steps up to 128K).
    ``RuntimeConfig.prompt_bucket_steps`` = k > 1 cuts every doubling into k steps instead
    (less padding, k times the prefill compilations);
  - batch: next power of two >= the number of prompts (padding rows are 1-token dummies);
  - cache capacity per sequence: ``capacity_bucket`` of the longest prompt + max_new_tokens
    (next power of two, or above 8K tokens a sixteenth-of-a-power-of-two step).
Decode compiles once per (batch bucket, capacity bucket); the host loop never recompiles.
"""

from __future__ import annotations

import functools

import jax

from elastic_jax import model as model_lib
from elastic_jax.config import ModelConfig, RuntimeConfig
from elastic_jax.kv_cache import KVCache
from elastic_jax.params import Params
from elastic_jax.sampling import SamplingParams, sample

MIN_PROMPT_BUCKET = 128


def next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def prompt_bucket(n: int, chunk: int, steps: int = 1) -> int:
    """Padded prompt length for a prompt of ``n`` tokens: the next multiple of
    ``next_pow2(n) / steps`` (at least 128 tokens, and above ``chunk`` at most ``chunk``).
    steps=1: powers of two up to ``chunk``, then multiples of ``chunk`` (module docstring).
    steps=8, chunk 8192: 3000 -> 3072, 5000 -> 5120, 20000 -> 20480 (steps=1: 4096, 8192,
    24576)."""
    p = max(MIN_PROMPT_BUCKET, next_pow2(n))
    step = max(p // steps, MIN_PROMPT_BUCKET)
    if n > chunk:
        step = min(step, chunk)
    return -(-n // step) * step


def prompt_bucket_for(n: int, rt: RuntimeConfig) -> int:
    """``prompt_bucket`` with the runtime's ``prefill_chunk`` and ``prompt_bucket_steps``."""
    return prompt_bucket(n, rt.prefill_chunk, rt.prompt_bucket_steps)


def batch_bucket(n: int) -> int:
    return next_pow2(n)


CAPACITY_STEP_MIN = 8192


def capacity_bucket(n: int, page_size: int) -> int:
    """Cache tokens per sequence for ``n`` tokens: the next power of two p >= n, or, where
    smaller, the next multiple of max(p / 16, 8192, page_size) tokens. At most 16 buckets per
    doubling (decode compiles per bucket), and long requests no longer double their cache: a
    256K prompt + 64 new tokens gets 288K tokens (40.5 GiB for the 8B shape), not 512K (72 GiB,
    more than an 80 GB GPU holds next to the weights)."""
    p = max(page_size, next_pow2(n))
    step = max(p // 16, CAPACITY_STEP_MIN, page_size)
    return min(p, -(-n // step) * step)


@functools.partial(jax.jit, static_argnames=("cfg", "rt"), donate_argnames=("cache",))
def prefill_step(
    params: Params,
    cache: KVCache,
    tokens: jax.Array,
    lengths: jax.Array,
    cfg: ModelConfig,
    rt: RuntimeConfig,
):
    """Jitted ``model.prefill``: (logits [B, V], cache, stats)."""
    return model_lib.prefill(params, cache, tokens, lengths, cfg, rt)


# XLA options for the decode steps (empty: XLA's defaults). In the H100 profile cuBLAS read a copy
# of each layer's out-projection slice of the stacked [L, ...] weights (a "memcpy" kernel, 0.43 ms
# of a 4B step). {"xla_gpu_cublas_fallback": False} would avoid it, but with jax 0.11.2 the decode
# step then fails to compile (autotuning finds no Triton config for 36 of its 240 GEMMs).
DECODE_COMPILER_OPTIONS: dict = {}


@functools.partial(
    jax.jit,
    static_argnames=("cfg", "rt"),
    donate_argnames=("cache",),
    compiler_options=DECODE_COMPILER_OPTIONS,
)
def decode_step(
    params: Params, cache: KVCache, tokens: jax.Array, cfg: ModelConfig, rt: RuntimeConfig
):
    """Jitted ``model.decode``: (logits [B, V], cache)."""
    return model_lib.decode(params, cache, tokens, cfg, rt)


@functools.partial(
    jax.jit,
    static_argnames=("cfg", "rt", "sp"),
    donate_argnames=("cache",),
    compiler_options=DECODE_COMPILER_OPTIONS,
)
def decode_sample_step(
    params: Params,
    cache: KVCache,
    tokens: jax.Array,
    key: jax.Array,
    banned: jax.Array,
    cfg: ModelConfig,
    rt: RuntimeConfig,
    sp: SamplingParams,
):
    """One decode step fused with sampling, so only int32 [B] tokens leave the device.
    banned: bool [B, V]. Returns (next tokens int32 [B], cache)."""
    logits, cache = model_lib.decode(params, cache, tokens, cfg, rt)
    return sample(logits, key, sp, banned), cache


@functools.partial(jax.jit, static_argnames=("sp",))
def sample_step(logits: jax.Array, key: jax.Array, banned: jax.Array, sp: SamplingParams):
    return sample(logits, key, sp, banned)
