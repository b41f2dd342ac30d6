"""``generate()``: prompts in, continuations out, through the continuous-batching engine.

tokenize -> ``serving.Engine`` (slots over a shared paged KV pool: each request is prefilled into
its own pages when a slot and pages are free, all running requests decode together, a finished
request frees its slot at once). The only device->host transfer per step is the int32 [S] token
vector, read one step behind so the device always has the next step queued.

``generate_static`` / ``generate_static_iter`` keep the former static path (one padded batch,
every row waits for the slowest): benchmarks compare against it, and a model with a mesh uses it.
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
from elastic_jax.serving.engine import Engine, RequestTiming, TokenEvent
from elastic_jax.serving.engine import prefill_info as _prefill_info

__all__ = [
    "GenerationResult",
    "RequestTiming",
    "TokenEvent",
    "generate",
    "generate_iter",
    "generate_static",
    "generate_static_iter",
    "stream_text",
]


@dataclasses.dataclass(frozen=True)
class GenerationResult:
    """token_ids: new tokens per request (a final stop token included, as transformers does);
    texts: decoded new tokens (special tokens skipped); prefill_info: per request, when asked;
    callback_errors: the stream callback's exception per request, when any raised."""

    token_ids: list[list[int]]
    texts: list[str] | None
    timings: list[RequestTiming]
    prefill_info: list[dict[str, Any]] | None = None
    callback_errors: list[BaseException | None] | None = None  # per request; None if none raised


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


def _per_prompt(name: str, value: Any, n: int) -> list:
    """A scalar broadcast to n prompts, or a sequence of exactly n values."""
    if np.isscalar(value):
        return [value] * n
    out = list(value)
    if len(out) != n:
        raise ValueError(f"{name} has {len(out)} values for {n} prompts")
    return out


def _budgets_and_stops(
    model: Model, ids: list[list[int]], max_new_tokens, stop_token_ids
) -> tuple[list[int], set[int]]:
    budgets = [int(m) for m in _per_prompt("max_new_tokens", max_new_tokens, len(ids))]
    if min(budgets) < 1:
        raise ValueError(f"max_new_tokens must be >= 1 per prompt (got {max_new_tokens})")
    stops = set(model.config.eos_token_ids if stop_token_ids is None else stop_token_ids)
    if stop_token_ids is None and model.tokenizer is not None:
        stops |= set(model.tokenizer.eos_token_ids)
    for i, (p, m) in enumerate(zip(ids, budgets)):
        if len(p) + m > model.max_tokens:
            raise ValueError(
                f"prompt {i}: {len(p)} prompt tokens + max_new_tokens={m} exceeds the cache "
                f"capacity of {model.max_tokens} tokens (max_cache_tokens / max_position_embeddings)"
            )
    return budgets, stops


def _cache_capacity(
    model: Model, ids: list[list[int]], budgets: list[int], requested: int | None = None
) -> int:
    """Cache tokens per sequence: ``engine.capacity_bucket`` of the longest prompt + budget,
    capped at ``model.max_tokens`` (rounded to pages), which no sequence grows past (checked in
    ``_budgets_and_stops``): 8 x 32K prompts with a 32K cap get 32K tokens each, not 64K.
    ``requested``: a fixed capacity instead (checked: it must hold the longest prompt + budget
    and stay within ``model.max_tokens``; rounded up to pages)."""
    N = model.runtime.page_size
    need = max(len(p) + m for p, m in zip(ids, budgets))
    cap = -(-model.max_tokens // N) * N
    if requested is None:
        return min(engine.capacity_bucket(need, N), cap)
    if not need <= requested <= cap:
        raise ValueError(
            f"cache_capacity={requested}: must hold the longest prompt + max_new_tokens ({need}) "
            f"and stay within the model's {model.max_tokens} tokens"
        )
    return -(-requested // N) * N


def _run_to_end(it: Iterator[TokenEvent]) -> GenerationResult:
    """Exhaust a generation iterator; its return value is the result."""
    while True:
        try:
            next(it)
        except StopIteration as stop:
            return stop.value


def generate_static_iter(
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
    cache_capacity: int | None = None,
) -> Iterator[TokenEvent]:
    """The former static path: all prompts in one padded batch (batch bucket x longest prompt's
    bucket), decoded together until the slowest request finishes. Yields a ``TokenEvent`` per
    token; the ``GenerationResult`` is the generator's return value. ``prefill_ms`` is the whole
    batch's prefill, ``queue_ms`` 0.

    ``cache_capacity``: cache tokens per row (default: the capacity bucket of the longest
    prompt + budget). The same value on consecutive calls gives every call's cache the same
    size: the allocator reuses the previous call's blocks instead of fragmenting (batch 8 of
    32K prompts on an 80 GB GPU failed an 18 GiB cache allocation with 33 GiB free in pieces),
    and the steps compile once. Work per step does not depend on it (attention reads each
    row's length, not the capacity)."""
    if greedy:
        temperature = 0.0
    sp = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
    cfg, rt = model.config, model.runtime
    ids = _prepare_prompts(model, prompts, chat_template, enable_thinking)
    n = len(ids)
    budgets, stops = _budgets_and_stops(model, ids, max_new_tokens, stop_token_ids)

    T = engine.prompt_bucket_for(max(len(p) for p in ids), rt)
    B = engine.batch_bucket(n)
    tokens = np.full((B, T), cfg.pad_token_id or 0, np.int32)
    lengths = np.ones((B,), np.int32)
    for b, p in enumerate(ids):
        tokens[b, : len(p)] = p
        lengths[b] = len(p)
    capacity = _cache_capacity(model, ids, budgets, cache_capacity)
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


MAX_DEFAULT_SLOTS = 64


def _serve(
    model: Model,
    prompts: Sequence[str] | Sequence[Sequence[int]],
    stream: Callable[[TokenEvent], None] | None,
    *,
    max_new_tokens: int | Sequence[int] = 64,
    temperature: float | Sequence[float] = 0.0,
    top_k: int | Sequence[int] = 0,
    top_p: float | Sequence[float] = 1.0,
    seed: int = 0,
    stop_token_ids: Sequence[int] | None = None,
    min_new_tokens: int = 0,
    chat_template: bool = False,
    enable_thinking: bool | None = None,
    return_info: bool = False,
    greedy: bool | None = None,
    num_slots: int | None = None,
) -> Iterator[TokenEvent]:
    """Run the prompts through a ``serving.Engine``. With ``stream`` the engine calls it per
    token (an exception is recorded on that request only); without, the events are yielded."""
    ids = _prepare_prompts(model, prompts, chat_template, enable_thinking)
    n = len(ids)
    budgets, stops = _budgets_and_stops(model, ids, max_new_tokens, stop_token_ids)
    temps = _per_prompt("temperature", 0.0 if greedy else temperature, n)
    sps = [
        SamplingParams(temperature=float(t), top_k=int(k), top_p=float(p))
        for t, k, p in zip(temps, _per_prompt("top_k", top_k, n), _per_prompt("top_p", top_p, n))
    ]
    if model.mesh is not None:  # the engine runs on one device
        if len(set(sps)) > 1:
            raise ValueError("per-prompt sampling parameters need a model without a mesh")
        sp = sps[0]
        it = generate_static_iter(
            model, ids, max_new_tokens=budgets, temperature=sp.temperature, top_k=sp.top_k,
            top_p=sp.top_p, seed=seed, stop_token_ids=sorted(stops),
            min_new_tokens=min_new_tokens, return_info=return_info,
        )  # fmt: skip
        while True:
            try:
                event = next(it)
            except StopIteration as stop:
                return stop.value
            if stream is not None:
                stream(event)
            else:
                yield event
    S = num_slots or min(engine.batch_bucket(n), MAX_DEFAULT_SLOTS)
    capacity = _cache_capacity(model, ids, budgets)
    eng = Engine(
        model,
        S,
        max_request_tokens=capacity,
        max_stop_ids=max(8, engine.next_pow2(len(stops))),
        collect_info=return_info,
    )
    events: list[TokenEvent] = []
    index: dict[int, int] = {}
    for i, (p, m, sp) in enumerate(zip(ids, budgets, sps)):

        def emit(e: TokenEvent, i=i) -> None:
            e = TokenEvent(i, e.token_id, e.step)
            if stream is not None:
                stream(e)
            else:
                events.append(e)

        rid = eng.submit(
            p,
            m,
            sampling=sp,
            stop_token_ids=sorted(stops),
            min_new_tokens=min_new_tokens,
            seed=(seed * 1_000_003 + i) % (2**31),
            callback=emit,
        )
        index[rid] = i
    while not eng.idle:
        eng.step()
        yield from events
        events.clear()
    results = [None] * n
    for rid, res in eng.pop_results().items():
        results[index[rid]] = res
    out = [r.token_ids for r in results]
    texts = None
    if model.tokenizer is not None:
        texts = [model.tokenizer.decode(o, skip_special_tokens=True) for o in out]
    info = [r.prefill_info for r in results] if return_info else None
    errors = [r.callback_error for r in results]
    return GenerationResult(
        out, texts, [r.timing for r in results], info, errors if any(errors) else None
    )


def generate_iter(
    model: Model, prompts: Sequence[str] | Sequence[Sequence[int]], **kwargs: Any
) -> Iterator[TokenEvent]:
    """Like ``generate`` but yields a ``TokenEvent`` per new token as it arrives; the
    ``GenerationResult`` is the generator's return value (``StopIteration.value``)."""
    return (yield from _serve(model, prompts, None, **kwargs))


def generate_static(model: Model, prompts, **kwargs: Any) -> GenerationResult:
    """``generate`` through the former static path (``generate_static_iter``), no streaming."""
    return _run_to_end(generate_static_iter(model, prompts, **kwargs))


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
      max_new_tokens: int or one per prompt. temperature (0 = greedy), top_k, top_p: one value
        or one per prompt. seed: request i draws from its own stream (seed, i), so sampled
        tokens do not depend on what else is in the batch.
      stop_token_ids: default: the checkpoint's EOS ids. min_new_tokens: stop tokens banned before.
      chat_template: wrap each string prompt as one user turn (``enable_thinking`` passed on).
      return_info: include per-request prefill info (head modes, kept-block fractions, sparsity).
      num_slots: requests decoded together (default: the batch bucket of the prompt count, at
        most 64); more prompts than slots wait in the engine's queue.
      stream: called with a ``TokenEvent`` for every token as it arrives. An exception it raises
        is recorded in ``GenerationResult.callback_errors`` for that request (which stops being
        streamed but still runs to its end); the other requests are not affected. (A model
        with a mesh runs the static path, where such an exception propagates.)
    Returns:
      ``GenerationResult`` with token ids, texts, per-request timings (queue, prefill and decode
      ms, decode tok/s).
    """
    return _run_to_end(_serve(model, prompts, stream, **kwargs))


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
