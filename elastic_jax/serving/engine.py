"""``Engine``: continuous batching over a fixed number of decode slots and one shared KV page pool.

Host loop (``step``), all on static shapes:
  1. admit: while the FIFO queue's head fits (a free slot AND free pages for prompt +
     max_new_tokens), take pages from the ``PageAllocator``, write the slot's page-table row
     and settings, and run its batch-1 prefill (``steps.prefill_insert``) into those pages; the
     first token is sampled on device into the slot's entry of the token vector;
  2. queue one decode step of all S slots (``steps.decode_slots``) on the token vector;
  3. read the token vector the step in 2 consumed (one step behind, so the device always has the
     next step queued: the int32 [S] vector is the only device->host transfer per step), hand
     every running request its token, and finish requests on a stop token or their budget: slot
     and pages are freed at once (the step already queued for them computes one token that is
     dropped; its write lands at position prompt + max_new_tokens - 1, still inside the request's
     reservation; any position past a request's pages goes to the trash page).

Design choices:
  - Reserve at admission, no preemption: a request takes pages for its whole budget up front, so
    a running request can never run out of pages and nothing ever has to be evicted or recomputed.
    The cost is pool capacity held for tokens not generated yet (a request that stops early frees
    them at once). The queue is strict FIFO: a large request at the head waits for pages rather
    than be overtaken forever by small ones.
  - Prefill is whole-prompt and runs between decode steps (the running requests wait for it). It
    is not split into chunks: the PawQwen3 router of every layer pools keys of the WHOLE prompt
    (first and last 100 tokens, after the previous layer ran on all of it), so a token-chunked
    prefill would need the whole prompt's layer outputs before attention anyway. (A layer-chunked
    prefill, a few layers per decode step, would stay exact; not done.)
  - Prefill timing blocks on the prefill's output, so ``prefill_ms`` is dispatch -> first token
    ready (it includes finishing the decode step in flight, a few ms).
"""

from __future__ import annotations

import dataclasses
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from elastic_jax import engine as buckets
from elastic_jax import kv_cache, memory
from elastic_jax.loader import Model
from elastic_jax.sampling import SamplingParams
from elastic_jax.serving import steps
from elastic_jax.serving.pages import PageAllocator
from pallas_kernels.paged_decode import ragged_num_splits


@dataclasses.dataclass(frozen=True)
class RequestTiming:
    """Per request: queue_ms (submit -> prefill start), prefill_ms (prefill start -> first token
    ready), decode_ms (first token -> last token read on the host)."""

    prompt_tokens: int
    new_tokens: int
    prefill_ms: float
    decode_ms: float
    queue_ms: float = 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        return self.new_tokens / (self.decode_ms / 1e3) if self.decode_ms > 0 else float("nan")

    @property
    def total_ms(self) -> float:
        return self.queue_ms + self.prefill_ms + self.decode_ms


@dataclasses.dataclass(frozen=True)
class TokenEvent:
    request: int
    token_id: int
    step: int  # index of this token among the request's new tokens


@dataclasses.dataclass(frozen=True)
class RequestResult:
    """token_ids: new tokens (a final stop token included); finish_reason "stop" or "length";
    callback_error: the exception its callback raised (the request still ran to the end)."""

    request_id: int
    prompt_tokens: int
    token_ids: list[int]
    finish_reason: str
    timing: RequestTiming
    prefill_info: dict[str, Any] | None
    callback_error: BaseException | None = None


def prefill_info(stats: dict[str, Any], n: int) -> list[dict[str, Any]]:
    """Per request of a prefill batch: modes [L][H] (0 dense, 1 XAttention, -1 streaming),
    kept-block fraction [L][H], ``sparsity`` (fraction of causal attention blocks skipped over
    the whole prefill), ``router_class`` [L][K] and ``sparse_head_fraction`` (fraction of KV heads
    the router put in class 0, the paper's Omega_MSR; None when no router ran).
    stats: host arrays of [L, B, H] (``model.prefill``)."""
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


@dataclasses.dataclass(eq=False)
class _Request:
    rid: int
    prompt: list[int]
    max_new_tokens: int
    sampling: SamplingParams
    stops: frozenset[int]
    stop_ids: np.ndarray  # int32 [J], -1 padded
    min_new_tokens: int
    seed: int
    callback: Callable[[TokenEvent], None] | None
    t_submit: float
    tokens: list[int] = dataclasses.field(default_factory=list)
    slot: int = -1
    pages: list[int] = dataclasses.field(default_factory=list)
    t_admit: float = 0.0
    t_first: float = 0.0
    stats: Any = None
    callback_error: BaseException | None = None


class Engine:
    """Continuous-batching generation for one ``Model`` (module docstring: the loop and choices).

    Args:
      model: from ``load_model`` (one device: ``model.mesh`` must be None).
      num_slots: S, requests decoded together (the decode batch).
      max_request_tokens: the longest prompt + max_new_tokens one request may have (sets M =
        pages per slot; default ``model.max_tokens``).
      num_pages: pool pages (the trash page not counted); default S * M, every slot full.
        Alternatively ``max_tokens_in_pool`` (rounded up to pages).
      max_stop_ids: J, stop ids per request (a static shape).
      collect_info: keep each request's prefill stats for ``RequestResult.prefill_info``.

    Use: ``rid = engine.submit(prompt_ids, max_new_tokens, ...)``, then ``engine.run()`` (or
    ``step()`` in your own loop) and ``engine.result(rid)``.
    """

    def __init__(
        self,
        model: Model,
        num_slots: int,
        *,
        max_request_tokens: int | None = None,
        num_pages: int | None = None,
        max_tokens_in_pool: int | None = None,
        max_stop_ids: int = 8,
        collect_info: bool = True,
    ):
        if model.mesh is not None:
            raise NotImplementedError(
                "serving.Engine runs on one device (model.mesh must be None); generate() with a "
                "mesh uses the static batch path"
            )
        if not isinstance(num_slots, int) or num_slots < 1:
            raise ValueError(f"num_slots={num_slots!r} must be an int >= 1")
        if num_pages is not None and max_tokens_in_pool is not None:
            raise ValueError("pass num_pages or max_tokens_in_pool, not both")
        if max_stop_ids < 1:
            raise ValueError(f"max_stop_ids={max_stop_ids} must be >= 1")
        self.model = model
        cfg, rt = model.config, model.runtime
        N = rt.page_size
        self.num_slots = S = num_slots
        cap = model.max_tokens if max_request_tokens is None else max_request_tokens
        if cap < 2:
            raise ValueError(f"max_request_tokens={cap} must be >= 2")
        self.pages_per_slot = M = -(-cap // N)
        self.max_request_tokens = M * N
        if max_tokens_in_pool is not None:
            num_pages = -(-max_tokens_in_pool // N)
        self.allocator = PageAllocator(S * M if num_pages is None else num_pages)
        # Before any device work: the pool plus the batch-1 prefill of the longest prompt this
        # engine accepts must fit the device (elastic_jax/memory.py; no check on the CPU).
        memory.check_fits(
            cfg,
            rt,
            buckets.prompt_bucket_for(self.max_request_tokens - 1, rt),
            1,
            (self.allocator.num_pages + 1) * N,
        )
        # Decode splits for ragged slots: the kernel's table and heuristic assume every row at
        # the full length; here one long row among short ones sets the kernel time
        # (``ragged_num_splits``). A value the user set is kept.
        self.decode_runtime = rt
        if rt.decode_num_splits is None:
            splits = ragged_num_splits(S, cfg.num_kv_heads, M, N)
            self.decode_runtime = dataclasses.replace(rt, decode_num_splits=splits)
        trash = self.allocator.trash_page
        self.max_stop_ids = max_stop_ids
        self.collect_info = collect_info
        pool = kv_cache.create(
            cfg,
            S,
            M * N,
            page_size=N,
            page_table=np.zeros((S, M), np.int32),
            num_pages=self.allocator.num_pages + 1,
        )
        self._table = np.full((S, M), trash, np.int32)  # host copy of the page table
        self._pool = dataclasses.replace(pool, page_table=jnp.asarray(self._table))
        self._host = {
            "active": np.zeros(S, bool),
            "temperature": np.zeros(S, np.float32),
            "top_k": np.zeros(S, np.int32),
            "top_p": np.ones(S, np.float32),
            "seed": np.zeros(S, np.int32),
            "ban_below": np.zeros(S, np.int32),
            "stop_ids": np.full((S, max_stop_ids), -1, np.int32),
        }
        self._slots_dev: steps.SlotParams | None = None
        self._tok = jnp.zeros((S,), jnp.int32)  # next token each slot consumes (device)
        self._owner: list[_Request | None] = [None] * S
        self._queue: deque[_Request] = deque()
        self._results: dict[int, RequestResult] = {}
        self._next_id = 0
        self.decode_steps = 0  # counters, for benchmarks and logs
        self.prefills = 0

    # ------------------------------------------------------------------ public API

    @property
    def num_running(self) -> int:
        return sum(r is not None for r in self._owner)

    @property
    def num_queued(self) -> int:
        return len(self._queue)

    @property
    def context_tokens(self) -> int:
        """Tokens in the cache of the running requests (what a decode step's attention reads)."""
        return sum(len(r.prompt) + len(r.tokens) for r in self._owner if r is not None)

    @property
    def idle(self) -> bool:
        return not self._queue and self.num_running == 0

    def pages_needed(self, prompt_tokens: int, max_new_tokens: int) -> int:
        """Pages a request reserves: prompt + budget tokens (the step queued past its end writes
        the last token's K/V at position prompt + budget - 1, the last reserved one)."""
        return -(-(prompt_tokens + max_new_tokens) // self.model.runtime.page_size)

    def submit(
        self,
        prompt_ids: Sequence[int],
        max_new_tokens: int = 64,
        *,
        sampling: SamplingParams | None = None,
        stop_token_ids: Sequence[int] = (),
        min_new_tokens: int = 0,
        seed: int = 0,
        callback: Callable[[TokenEvent], None] | None = None,
    ) -> int:
        """Queue a request; returns its id. Raises ValueError now (nothing else affected) for a
        request that can never run (``sampling`` default: greedy): empty prompt, ids outside the vocab, a budget < 1, more than
        ``max_stop_ids`` stop ids, or prompt + budget over the per-request capacity or the pool."""
        sampling = SamplingParams() if sampling is None else sampling
        ids = [int(t) for t in prompt_ids]
        V = self.model.config.vocab_size
        if not ids:
            raise ValueError("prompt is empty (0 tokens)")
        bad = [t for t in ids if not 0 <= t < V]
        if bad:
            raise ValueError(f"prompt has token ids outside [0, {V}): {bad[:5]}")
        if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens!r} must be an int >= 1")
        if min_new_tokens < 0:
            raise ValueError(f"min_new_tokens={min_new_tokens} must be >= 0")
        stops = sorted({int(s) for s in stop_token_ids if 0 <= int(s) < V})
        if len(stops) > self.max_stop_ids:
            raise ValueError(
                f"{len(stops)} stop ids; this engine takes at most max_stop_ids={self.max_stop_ids}"
            )
        need = len(ids) + int(max_new_tokens)
        if need > self.max_request_tokens:
            raise ValueError(
                f"{len(ids)} prompt tokens + max_new_tokens={max_new_tokens} exceeds the "
                f"per-request capacity of {self.max_request_tokens} tokens (max_request_tokens)"
            )
        pages = self.pages_needed(len(ids), int(max_new_tokens))
        if pages > self.allocator.num_pages:
            raise ValueError(
                f"{len(ids)} prompt tokens + max_new_tokens={max_new_tokens} need {pages} pages; "
                f"the pool has {self.allocator.num_pages} (num_pages / max_tokens_in_pool)"
            )
        stop_arr = np.full(self.max_stop_ids, -1, np.int32)
        stop_arr[: len(stops)] = stops
        req = _Request(
            rid=self._next_id,
            prompt=ids,
            max_new_tokens=int(max_new_tokens),
            sampling=sampling,
            stops=frozenset(int(s) for s in stop_token_ids),
            stop_ids=stop_arr,
            min_new_tokens=int(min_new_tokens),
            seed=int(seed) % (2**31),
            callback=callback,
            t_submit=time.perf_counter(),
        )
        self._next_id += 1
        self._queue.append(req)
        return req.rid

    def result(self, rid: int) -> RequestResult:
        return self._results[rid]

    def pop_results(self) -> dict[int, RequestResult]:
        """Results finished so far (by request id), removed from the engine."""
        out, self._results = self._results, {}
        return out

    def run(self, on_result: Callable[[RequestResult], None] | None = None) -> None:
        """Step until every submitted request has finished. ``on_result`` is called with each
        result as its request finishes (an exception there propagates)."""
        while not self.idle:
            for res in self.step():
                if on_result is not None:
                    on_result(res)

    def step(self) -> list[RequestResult]:
        """Admit what fits, queue one decode step, read the previous one. Returns the requests
        that finished in this step."""
        self._admit()
        if self.num_running == 0:
            return []
        read = self._tok
        self._tok, self._pool = steps.decode_slots(
            self.model.params,
            self._pool,
            read,
            self._slots(),
            self.model.config,
            self.decode_runtime,
            self._any_sampling(),
        )
        self.decode_steps += 1
        return self._consume(np.asarray(read))

    # ------------------------------------------------------------------ internals

    def _any_sampling(self) -> bool:
        return bool((self._host["temperature"][self._host["active"]] > 0).any())

    def _slots(self) -> steps.SlotParams:
        if self._slots_dev is None:  # re-uploaded only after an admission or a finish
            self._slots_dev = steps.SlotParams(**{k: jnp.asarray(v) for k, v in self._host.items()})
        return self._slots_dev

    def _admit(self) -> None:
        while self._queue:
            req = self._queue[0]
            free = [s for s, r in enumerate(self._owner) if r is None]
            need = self.pages_needed(len(req.prompt), req.max_new_tokens)
            if not free or not self.allocator.can_alloc(need):
                return
            self._queue.popleft()
            self._start(req, free[0], self.allocator.alloc(need))

    def _start(self, req: _Request, slot: int, pages: list[int]) -> None:
        cfg, rt = self.model.config, self.model.runtime
        req.slot, req.pages = slot, pages
        self._owner[slot] = req
        self._table[slot] = self.allocator.trash_page
        self._table[slot, : len(pages)] = pages
        sp = req.sampling
        h = self._host
        h["active"][slot] = True
        h["temperature"][slot] = sp.temperature
        h["top_k"][slot] = sp.top_k
        h["top_p"][slot] = sp.top_p
        h["seed"][slot] = req.seed
        h["ban_below"][slot] = len(req.prompt) + req.min_new_tokens - 1
        h["stop_ids"][slot] = req.stop_ids
        self._slots_dev = None
        self._pool = dataclasses.replace(self._pool, page_table=jnp.asarray(self._table))
        n = len(req.prompt)
        T = buckets.prompt_bucket_for(n, rt)
        prompt = np.full((1, T), cfg.pad_token_id or 0, np.int32)
        prompt[0, :n] = req.prompt
        req.t_admit = time.perf_counter()
        self.prefills += 1
        self._pool, self._tok, stats = steps.prefill_insert(
            self.model.params,
            self._pool,
            self._tok,
            self._slots(),
            jnp.asarray(prompt),
            jnp.asarray([n], jnp.int32),
            jnp.int32(slot),
            cfg,
            rt,
            sp.temperature > 0,
        )
        self._tok.block_until_ready()
        req.t_first = time.perf_counter()
        req.stats = stats if self.collect_info else None

    def _consume(self, host: np.ndarray) -> list[RequestResult]:
        finished = []
        for slot, req in enumerate(self._owner):
            if req is None:
                continue
            t = int(host[slot])
            req.tokens.append(t)
            if req.callback is not None and req.callback_error is None:
                try:
                    req.callback(TokenEvent(req.rid, t, len(req.tokens) - 1))
                except Exception as e:  # noqa: BLE001 - isolated to this request
                    req.callback_error = e
            if t in req.stops or len(req.tokens) >= req.max_new_tokens:
                finished.append(self._finish(req, "stop" if t in req.stops else "length"))
        return finished

    def _finish(self, req: _Request, reason: str) -> RequestResult:
        now = time.perf_counter()
        slot = req.slot
        self._owner[slot] = None
        self.allocator.free(req.pages)
        self._table[slot] = self.allocator.trash_page
        self._host["active"][slot] = False
        self._host["stop_ids"][slot] = -1
        self._slots_dev = None
        self._pool = dataclasses.replace(self._pool, page_table=jnp.asarray(self._table))
        info = None
        if req.stats is not None:
            info = prefill_info(jax.device_get(req.stats), 1)[0]
        timing = RequestTiming(
            prompt_tokens=len(req.prompt),
            new_tokens=len(req.tokens),
            prefill_ms=(req.t_first - req.t_admit) * 1e3,
            decode_ms=(now - req.t_first) * 1e3,
            queue_ms=(req.t_admit - req.t_submit) * 1e3,
        )
        res = RequestResult(
            req.rid, len(req.prompt), req.tokens, reason, timing, info, req.callback_error
        )
        self._results[req.rid] = res
        return res
