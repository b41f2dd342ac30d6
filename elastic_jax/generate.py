"""``generate()``: the small host loop around the jitted prefill and decode steps.

tokenize -> bucket -> prefill (fills the paged cache) -> sample -> decode until every request hit a
stop token or its token budget. The only device->host transfer per step is the int32 [B] token
vector, read one step behind so the device always has the next step queued.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from elastic_jax import engine, memory, sharding
from elastic_jax.loader import Model
from elastic_jax.sampling import SamplingParams


@dataclasses.dataclass(frozen=True)
class RequestTiming:
    prompt_tokens: int
    new_tokens: int
    prefill_ms: float  # the batch's prefill (shared by its requests)
    decode_ms: float  # from the end of prefill to this request's last token

    @property
    def decode_tokens_per_s(self) -> float:
        return self.new_tokens / (self.decode_ms / 1e3) if self.decode_ms > 0 else float("nan")


@dataclasses.dataclass(frozen=True)
class GenerationResult:
    """token_ids: new tokens per request (a final stop token included, as transformers does);
    texts: decoded new tokens (special tokens skipped); prefill_info: per request, when asked."""

    token_ids: list[list[int]]
    texts: list[str] | None
    timings: list[RequestTiming]
    prefill_info: list[dict[str, Any]] | None = None


@dataclasses.dataclass(frozen=True)
class TokenEvent:
    request: int
    token_id: int
    step: int


def _prepare_prompts(
    model: Model,
    prompts: Sequence[str] | Sequence[Sequence[int]],
    chat_template: bool,
    enable_thinking: bool | None,
) -> list[list[int]]:
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence):
        raise TypeError("prompts must be a list of strings or a list of token-id lists")
    if len(prompts) == 0:
        raise ValueError("prompts is empty")
    out = []
    V = model.config.vocab_size
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            if model.tokenizer is None:
                raise ValueError("this model has no tokenizer: pass token ids")
            if chat_template:
                p = model.tokenizer.apply_chat_template(
                    [{"role": "user", "content": p}],
                    add_generation_prompt=True,
                    enable_thinking=enable_thinking,
                )
            ids = model.tokenizer.encode(p)
        else:
            ids = [int(t) for t in p]
        if not ids:
            raise ValueError(f"prompt {i} is empty (0 tokens)")
        bad = [t for t in ids if not 0 <= t < V]
        if bad:
            raise ValueError(f"prompt {i} has token ids outside [0, {V}): {bad[:5]}")
        out.append(ids)
    return out


def _prefill_info(stats: dict[str, Any], n: int) -> list[dict[str, Any]]:
    """Per request: modes [L][H] (0 dense, 1 XAttention, -1 streaming), kept-block fraction
    [L][H], ``sparsity`` (fraction of causal attention blocks skipped over the whole prefill),
    ``router_class`` [L][K] and ``sparse_head_fraction`` (fraction of KV heads the router put in
    class 0, the paper's Omega_MSR; None when no router ran)."""
    empty = {
        "modes": None,
        "kept_fraction": None,
        "sparsity": 0.0,
        "router_class": None,
        "sparse_head_fraction": None,
    }
    if not stats:
        return [dict(empty) for _ in range(n)]
    modes = np.asarray(stats["modes"])  # [L, B, H]
    kept = np.asarray(stats["kept_blocks"], np.float64)
    causal = np.asarray(stats["causal_blocks"], np.float64)
    classes = np.asarray(stats["router_class"]) if "router_class" in stats else None  # [L, B, K]
    out = []
    for b in range(n):
        info = dict(empty)
        info["modes"] = modes[:, b].tolist()
        info["kept_fraction"] = (kept[:, b] / np.maximum(causal[:, b], 1)).tolist()
        info["sparsity"] = float(1.0 - kept[:, b].sum() / max(causal[:, b].sum(), 1.0))
        if classes is not None:
            info["router_class"] = classes[:, b].tolist()
            info["sparse_head_fraction"] = float((classes[:, b] == 0).mean())
        out.append(info)
    return out


def generate_iter(
    model: Model,
    prompts: Sequence[str] | Sequence[Sequence[int]],
    *,
    max_new_tokens: int | Sequence[int] = 64,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    stop_token_ids: Sequence[int] | None = None,
    min_new_tokens: int = 0,
    chat_template: bool = False,
    enable_thinking: bool | None = None,
    return_info: bool = False,
    greedy: bool | None = None,
) -> Iterator[TokenEvent]:
    """Like ``generate`` but yields a ``TokenEvent`` per new token as it arrives; the
    ``GenerationResult`` is the generator's return value (``StopIteration.value``)."""
    if greedy:
        temperature = 0.0
    sp = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
    cfg, rt = model.config, model.runtime
    ids = _prepare_prompts(model, prompts, chat_template, enable_thinking)
    n = len(ids)
    budgets = [int(max_new_tokens)] * n if np.isscalar(max_new_tokens) else list(max_new_tokens)
    if len(budgets) != n or min(budgets) < 1:
        raise ValueError(f"max_new_tokens must be >= 1 per prompt (got {max_new_tokens})")
    stops = set(cfg.eos_token_ids if stop_token_ids is None else stop_token_ids)
    if stop_token_ids is None and model.tokenizer is not None:
        stops |= set(model.tokenizer.eos_token_ids)
    for i, (p, m) in enumerate(zip(ids, budgets)):
        if len(p) + m > model.max_tokens:
            raise ValueError(
                f"prompt {i}: {len(p)} prompt tokens + max_new_tokens={m} exceeds the cache "
                f"capacity of {model.max_tokens} tokens (max_cache_tokens / max_position_embeddings)"
            )

    T = engine.prompt_bucket(max(len(p) for p in ids), rt.prefill_chunk)
    B = engine.batch_bucket(n)
    tokens = np.full((B, T), cfg.pad_token_id or 0, np.int32)
    lengths = np.ones((B,), np.int32)
    for b, p in enumerate(ids):
        tokens[b, : len(p)] = p
        lengths[b] = len(p)
    capacity = engine.capacity_bucket(max(len(p) + m for p, m in zip(ids, budgets)), rt.page_size)
    if model.mesh is None:  # one device: fail before any work when the request cannot fit
        memory.check_fits(cfg, rt, T, B, capacity)
    cache = sharding.create_cache(cfg, B, capacity, model.mesh, page_size=rt.page_size)

    banned_eos = np.zeros((B, cfg.vocab_size), bool)
    banned_eos[:, [s for s in stops if 0 <= s < cfg.vocab_size]] = True
    no_ban = jnp.zeros((B, cfg.vocab_size), bool)
    ban = jnp.asarray(banned_eos)
    key = jax.random.PRNGKey(seed)

    t0 = time.perf_counter()
    with sharding.mesh_context(model.mesh):  # traces the steps with the mesh (no-op if None)
        logits, cache, stats = engine.prefill_step(
            model.params, cache, jnp.asarray(tokens), jnp.asarray(lengths), cfg, rt
        )
        key, sub = jax.random.split(key)
        tok = engine.sample_step(logits, sub, ban if min_new_tokens > 0 else no_ban, sp)
    tok.block_until_ready()
    t_prefill = time.perf_counter()
    prefill_ms = (t_prefill - t0) * 1e3

    out: list[list[int]] = [[] for _ in range(n)]
    done = [False] * n
    finish_ms = [0.0] * n
    step = 0
    max_steps = max(budgets)
    while True:
        # Queue the next step before reading this one's tokens (keeps the device busy).
        nxt = None
        if step + 1 < max_steps and not all(done):
            key, sub = jax.random.split(key)
            banned = ban if step + 1 < min_new_tokens else no_ban
            with sharding.mesh_context(model.mesh):
                nxt, cache = engine.decode_sample_step(
                    model.params, cache, tok, sub, banned, cfg, rt, sp
                )
        host = np.asarray(tok)
        now_ms = (time.perf_counter() - t_prefill) * 1e3
        for b in range(n):
            if done[b]:
                continue
            t = int(host[b])
            out[b].append(t)
            yield TokenEvent(b, t, step)
            if t in stops or len(out[b]) >= budgets[b]:
                done[b] = True
                finish_ms[b] = now_ms
        step += 1
        if nxt is None or all(done):
            break
        tok = nxt

    texts = None
    if model.tokenizer is not None:
        texts = [model.tokenizer.decode(o, skip_special_tokens=True) for o in out]
    timings = [RequestTiming(len(p), len(o), prefill_ms, f) for p, o, f in zip(ids, out, finish_ms)]
    info = _prefill_info(jax.device_get(stats), n) if return_info else None
    return GenerationResult(out, texts, timings, info)


def generate(
    model: Model,
    prompts: Sequence[str] | Sequence[Sequence[int]],
    *,
    stream: Callable[[TokenEvent], None] | None = None,
    **kwargs: Any,
) -> GenerationResult:
    """Generate continuations for a batch of prompts of different lengths.

    Args:
      model: from ``load_model``.
      prompts: strings (tokenized, optionally through the chat template) or token-id lists.
      max_new_tokens: int or one per prompt. temperature (0 = greedy), top_k, top_p, seed.
      stop_token_ids: default: the checkpoint's EOS ids. min_new_tokens: stop tokens banned before.
      chat_template: wrap each string prompt as one user turn (``enable_thinking`` passed on).
      return_info: include per-request prefill info (head modes, kept-block fractions, sparsity).
      stream: called with a ``TokenEvent`` for every token as it arrives.
    Returns:
      ``GenerationResult`` with token ids, texts, per-request timings (prefill ms, decode tok/s).
    """
    it = generate_iter(model, prompts, **kwargs)
    while True:
        try:
            event = next(it)
        except StopIteration as stop:
            return stop.value
        if stream is not None:
            stream(event)


def stream_text(model: Model, prompt: str | Sequence[int], **kwargs: Any) -> Iterator[str]:
    """Yield the text of one prompt's continuation piece by piece as tokens arrive."""
    if model.tokenizer is None:
        raise ValueError("stream_text needs a tokenizer")
    ids: list[int] = []
    shown = ""
    for event in generate_iter(model, [prompt], **kwargs):
        ids.append(event.token_id)
        text = model.tokenizer.decode(ids, skip_special_tokens=True)
        if len(text) > len(shown) and not text.endswith("\ufffd"):  # wait for whole characters
            yield text[len(shown) :]
            shown = text
