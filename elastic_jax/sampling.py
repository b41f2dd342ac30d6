"""Token selection from logits: greedy, or temperature with optional top-k / top-p."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """temperature 0 means greedy; top_k 0 means no top-k cut; top_p 1.0 means no nucleus cut."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature} must be >= 0")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k} must be >= 0")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1]")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def sample(
    logits: jax.Array, key: jax.Array, sp: SamplingParams, banned: jax.Array | None = None
) -> jax.Array:
    """logits: float32 [B, V]; banned: bool [B, V] tokens that may not be chosen (e.g. EOS before
    min_new_tokens). Returns int32 [B]."""
    if banned is not None:
        logits = jnp.where(banned, -jnp.inf, logits)
    if sp.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / sp.temperature
    if sp.top_k:
        kth = jax.lax.top_k(logits, sp.top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if sp.top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        # Keep the smallest prefix whose mass reaches top_p (always at least the top token).
        before = jnp.cumsum(probs, axis=-1) - probs
        cutoff_idx = jnp.sum(before < sp.top_p, axis=-1, keepdims=True) - 1
        cutoff = jnp.take_along_axis(sorted_logits, cutoff_idx, axis=-1)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def sample_rows(
    logits: jax.Array,
    positions: jax.Array,
    temperature: jax.Array,
    top_k: jax.Array,
    top_p: jax.Array,
    seeds: jax.Array,
    stop_ids: jax.Array,
    ban_below: jax.Array,
    any_sampling: bool,
) -> jax.Array:
    """Per-row sampling parameters (the serving engine's slots), traced so that admitting a
    request with other parameters never recompiles.

    logits: float32 [B, V]; positions: int32 [B] position of the token each row consumed (its
    random key is ``fold_in(PRNGKey(seeds[b]), positions[b])``, so a row's draw does not depend on
    the other rows); temperature, top_p: float32 [B] (temperature 0: greedy, exactly argmax);
    top_k: int32 [B] (0: no cut); stop_ids: int32 [B, J] (-1 padding) banned while
    ``positions < ban_below`` (int32 [B], i.e. before min_new_tokens). ``any_sampling`` (static):
    False compiles the greedy-only step (no sort over V). Returns int32 [B].
    """
    B, V = logits.shape
    ban = (positions < ban_below)[:, None] & (stop_ids >= 0)
    cols = jnp.where(ban, stop_ids, V)  # column V is out of range: dropped
    logits = logits.at[jnp.arange(B)[:, None], cols].set(-jnp.inf, mode="drop")
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if not any_sampling:
        return greedy
    x = logits / jnp.where(temperature > 0, temperature, 1.0)[:, None]
    sorted_x = -jnp.sort(-x, axis=-1)  # descending
    k = jnp.where(top_k > 0, jnp.minimum(top_k, V), V)
    kth = jnp.take_along_axis(sorted_x, (k - 1)[:, None], axis=-1)
    x = jnp.where(x < kth, -jnp.inf, x)
    # Nucleus over the top-k survivors (the order ``sample`` applies them in).
    sorted_x = jnp.where(jnp.arange(V)[None, :] < k[:, None], sorted_x, -jnp.inf)
    probs = jax.nn.softmax(sorted_x, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs
    cutoff_idx = jnp.sum(before < top_p[:, None], axis=-1, keepdims=True) - 1
    cutoff = jnp.take_along_axis(sorted_x, cutoff_idx, axis=-1)
    x = jnp.where((top_p[:, None] < 1.0) & (x < cutoff), -jnp.inf, x)
    keys = jax.vmap(lambda s, p: jax.random.fold_in(jax.random.PRNGKey(s), p))(seeds, positions)
    drawn = jax.vmap(lambda key, row: jax.random.categorical(key, row))(keys, x)
    return jnp.where(temperature > 0, drawn.astype(jnp.int32), greedy)
