"""The serving engine's device side: two jitted functions over a pool of S decode slots.

  prefill_insert  batch-1 prefill of one admitted request (``model.prefill``, so the same kernels,
                  buckets and router-on-the-whole-prompt semantics as ``generate``'s static path)
                  written into the request's own pages of the shared pool, its first token sampled
                  on device and put into the slot's entry of the token vector.
  decode_slots    one decode step of all S slots + per-slot sampling. Empty slots are held at
                  length 0 (the paged decode kernel reads no K/V for them) and their page-table
                  row is all trash page, so their one-token write lands in the trash page.

Shapes (S slots, M pages per slot, P pool pages incl. the trash page, T prompt bucket):
  pool: KVCache with k, v [L, K, P, N, D], page_table int32 [S, M], lengths int32 [S];
  tokens: int32 [S] the next token each slot consumes; SlotParams: [S] arrays (below).
Compiled once per (S, M, P) for decode and once per prompt bucket T for prefill (and per
``any_sampling`` flag): admitting or finishing a request only changes array values.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from elastic_jax import model as model_lib
from elastic_jax.config import ModelConfig, RuntimeConfig
from elastic_jax.engine import DECODE_COMPILER_OPTIONS
from elastic_jax.kv_cache import KVCache
from elastic_jax.params import Params
from elastic_jax.sampling import sample_rows


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SlotParams:
    """Per-slot request settings, uploaded from the host when a request is admitted or finishes.

    active: bool [S]; temperature, top_p: float32 [S]; top_k, seed, ban_below: int32 [S];
    stop_ids: int32 [S, J] (-1 padding; banned while a slot's position < ban_below)."""

    active: jax.Array
    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    seed: jax.Array
    ban_below: jax.Array
    stop_ids: jax.Array

    def sample(self, logits, positions, any_sampling: bool, rows=None):
        """``sample_rows`` with this table's settings (``rows``: int32 [B] slot of each row)."""
        p = self if rows is None else jax.tree.map(lambda x: x[rows], self)
        return sample_rows(
            logits,
            positions,
            p.temperature,
            p.top_k,
            p.top_p,
            p.seed,
            p.stop_ids,
            p.ban_below,
            any_sampling,
        )


@functools.partial(
    jax.jit, static_argnames=("cfg", "rt", "any_sampling"), donate_argnames=("pool",)
)
def prefill_insert(
    params: Params,
    pool: KVCache,
    tokens: jax.Array,
    slots: SlotParams,
    prompt: jax.Array,
    length: jax.Array,
    slot: jax.Array,
    cfg: ModelConfig,
    rt: RuntimeConfig,
    any_sampling: bool,
):
    """Prefill one request into its pages (``pool.page_table[slot]``, set by the host) in place.

    prompt: int32 [1, T] right-padded; length: int32 [1]; slot: int32 scalar.
    Returns (pool with lengths[slot] = length, tokens with the first new token at ``slot``,
    prefill stats of [L, 1, H] arrays).
    """
    row = pool.page_table[slot][None]  # [1, M]
    one = KVCache(k=pool.k, v=pool.v, page_table=row, lengths=jnp.zeros((1,), jnp.int32))
    logits, one, stats = model_lib.prefill(params, one, prompt, length, cfg, rt)
    first = slots.sample(logits, length - 1, any_sampling, rows=slot[None])
    pool = KVCache(
        k=one.k,
        v=one.v,
        page_table=pool.page_table,
        lengths=pool.lengths.at[slot].set(length[0]),
    )
    return pool, tokens.at[slot].set(first[0]), stats


@functools.partial(
    jax.jit,
    static_argnames=("cfg", "rt", "any_sampling"),
    donate_argnames=("pool",),
    compiler_options=DECODE_COMPILER_OPTIONS,
)
def decode_slots(
    params: Params,
    pool: KVCache,
    tokens: jax.Array,
    slots: SlotParams,
    cfg: ModelConfig,
    rt: RuntimeConfig,
    any_sampling: bool,
):
    """One decode step of every slot. tokens: int32 [S]. Returns (next tokens int32 [S] (0 for
    empty slots), pool). Empty slots are forced to length 0 before attention (no K/V read)."""
    lengths = jnp.where(slots.active, pool.lengths, 0)
    pool = dataclasses.replace(pool, lengths=lengths)
    logits, pool = model_lib.decode(params, pool, tokens, cfg, rt)
    nxt = slots.sample(logits, lengths, any_sampling)
    pool = dataclasses.replace(pool, lengths=jnp.where(slots.active, pool.lengths, 0))
    return jnp.where(slots.active, nxt, 0), pool
