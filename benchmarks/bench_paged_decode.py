"""Device benchmark and autotuner of paged decode attention (one run, one GPU).

For each shape (context L, batch B, page size N; H=32, K=8, D=128, bf16, every sequence at
length L, except the ragged shape: lengths as in the serving engine's steady state, Pallas and
the reference only, no table entry) it times, in the same process:

- the Pallas Triton kernel over a small search space of ``PagedDecodeConfig`` (the best one goes
  into the autotune table),
- the jnp reference (XLA; gathers the pages, then masked softmax),
- plain XLA attention on contiguous K/V (einsum, f32 softmax) and cuDNN through
  ``jax.nn.dot_product_attention(implementation="cudnn")`` on contiguous ``[B, L, K, D]``,
- torch ``scaled_dot_product_attention`` on contiguous ``[B, H, 1, D]`` q vs ``[B, K, L, D]``
  K/V with ``enable_gqa=True``: the default backend choice and each backend forced,
- ceilings: a device-to-device copy (bytes read + written) and a read-only reduction.

Bandwidth = K/V bytes read (``2 * B * L * K * D * 2``) / time. JAX calls are timed as R calls
in one jitted program (rotating over page-table sets so the working set exceeds L2), wall clock
around ``block_until_ready``, median over reps; torch calls as R calls in one CUDA graph, CUDA
events, median over reps. Compile time is excluded. The tuned config is also timed with one
dispatch per call ("1 jit/call" rows). ``--profile`` instead prints kernel-only device time per
call from a JAX profiler trace.

Usage (device): XLA_PYTHON_CLIENT_PREALLOCATE=false JAX_PLATFORMS=cuda PYTHONPATH=. python3
  benchmarks/bench_paged_decode.py --out $OUT [--shapes 0,1] [--profile]
CPU check of the script itself: ``--smoke``.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from collections.abc import Mapping  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from pallas_kernels import _compat  # noqa: E402
from pallas_kernels.paged_decode import (  # noqa: E402
    PagedDecodeConfig,
    paged_decode_reference,
    shape_key,
)
from pallas_kernels.paged_decode.config import heuristic_config  # noqa: E402
from pallas_kernels.paged_decode.pallas_triton import paged_decode_pallas  # noqa: E402

H, K, D = 32, 8, 128
DTYPE = jnp.bfloat16
SM_SCALE = 1.0 / math.sqrt(D)
L2_ROTATE_BYTES = 256 << 20  # working set per timed loop, well past the 50 MB L2
TARGET_LOOP_S = 2e-3  # R calls per timed loop take about this long
EST_BW = 3.0e12  # only to size R and the reps
QS_PER_SHAPE = 16  # distinct queries, cycled over the calls


@dataclasses.dataclass(frozen=True)
class RunSettings:
    """What the CPU smoke run changes; built once in main() and passed down."""

    interpret: bool = False  # run the Pallas kernel in interpret mode (CPU)
    num_sms: int | None = None  # SM count for the split candidates; None: the device's
    max_calls: int = 256  # calls per timed loop (one dispatch each; torch graphs)
    max_calls_in_jit: int = 16  # calls per timed loop traced into one jitted program


DEVICE_SETTINGS = RunSettings()
SMOKE_SETTINGS = RunSettings(interpret=True, num_sms=4, max_calls=2, max_calls_in_jit=2)


@dataclasses.dataclass(frozen=True)
class Shape:
    context: int
    batch: int
    page_size: int
    search: str  # "full": splits, then knobs, then splits again; "splits": splits only
    ragged: bool = False  # lengths as in the serving engine's steady state (RAGGED_FRACTIONS)


# Fractions of the table length held by the rows of a ragged batch: one row at the full length,
# the rest short, about the serving benchmark's steady state (8 slots, 65K tokens cached in all
# at a 32K table, BENCHMARKS.md "Serving"). Each row's work is split into num_splits programs, so
# the long row's programs set the kernel time; the ragged shapes time that case, which the
# uniform shapes (every row at the full length) cannot show. They write no autotune entry.
RAGGED_FRACTIONS = (1.0, 0.1, 0.15, 0.25, 0.1, 0.3, 0.12, 0.2)


def row_lengths(s: Shape) -> list[int]:
    if not s.ragged:
        return [s.context] * s.batch
    fr = RAGGED_FRACTIONS
    return [max(1, int(s.context * fr[b % len(fr)])) for b in range(s.batch)]


SHAPES = (
    Shape(65536, 1, 128, "full"),
    Shape(65536, 8, 128, "full"),
    Shape(131072, 1, 128, "splits"),
    Shape(131072, 8, 128, "splits"),
    Shape(16384, 1, 128, "splits"),
    Shape(16384, 8, 128, "splits"),
    Shape(65536, 1, 64, "full"),
    Shape(65536, 8, 64, "full"),
    Shape(65536, 1, 256, "full"),
    Shape(65536, 8, 256, "full"),
    Shape(32768, 8, 128, "splits", ragged=True),
)

# (pages_per_block, page_chunks, num_warps, num_stages) per page size; the K+V tiles of all
# stages must fit in 227 KB of shared memory (a 128x128 bf16 tile is 32 KB).
KNOBS: Mapping[int, tuple[tuple[int, int, int, int], ...]] = {
    64: ((2, 1, 4, 3), (2, 1, 4, 2), (2, 1, 8, 3), (1, 1, 4, 4), (4, 1, 4, 1)),
    128: ((1, 1, 4, 3), (1, 1, 4, 2), (1, 1, 8, 3), (1, 2, 4, 4), (1, 2, 4, 3)),
    256: ((1, 2, 4, 3), (1, 2, 4, 2), (1, 2, 8, 3), (1, 4, 4, 4), (1, 1, 4, 1)),
}


def kv_bytes(s: Shape) -> int:
    """K/V bytes one call reads (the rows' actual lengths)."""
    return 2 * sum(row_lengths(s)) * K * D * jnp.dtype(DTYPE).itemsize


def median_s(times: list[float]) -> float:
    return statistics.median(times)


def reps_for(t_est: float, calls: int) -> int:
    return int(min(25, max(5, 0.1 / (calls * t_est))))


def n_calls(t_est: float, cap: int) -> int:
    return int(min(cap, max(4, math.ceil(TARGET_LOOP_S / t_est))))


def time_jax(impl, shared, per_call, t_est: float, rs: RunSettings, dispatch: bool = False):
    """Seconds per call of ``impl(*shared, *per_call(i))``, median over reps.

    Default: R calls traced into ONE jitted program (as in a model's decode step) so host
    dispatch and the gaps between executables are not timed; each call gets its own q (XLA
    cannot merge calls) and a rotating page table (the working set exceeds L2).
    ``dispatch=True``: R separate dispatches of a one-call jit, back to back.
    Returns (seconds, (output of call 0, compile seconds)).
    """
    calls = n_calls(t_est, rs.max_calls if dispatch else rs.max_calls_in_jit)
    per = [per_call(i % rs.max_calls) for i in range(calls)]
    if dispatch:
        fn = jax.jit(impl)

        def run():
            for p in per:
                out = fn(*shared, *p)
            return out

        t0 = time.perf_counter()
        first = jax.block_until_ready(fn(*shared, *per[0]))
    else:
        fn = jax.jit(lambda shared, per: [impl(*shared, *p) for p in per])

        def run():
            return fn(shared, per)

        t0 = time.perf_counter()
        first = jax.block_until_ready(run())[0]
    compile_s = time.perf_counter() - t0
    jax.block_until_ready(run())
    times = []
    for _ in range(reps_for(t_est, calls)):
        t0 = time.perf_counter()
        jax.block_until_ready(run())
        times.append((time.perf_counter() - t0) / calls)
    return median_s(times), (first, compile_s)


def time_torch(torch, call, t_est: float, max_calls: int) -> float:
    """Seconds per call of ``call(i)``: R calls captured in one CUDA graph, CUDA events."""
    calls = n_calls(t_est, max_calls)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for i in range(3):
            call(i)
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for i in range(calls):
                call(i)

        def run():
            graph.replay()
    except Exception:  # some backends refuse capture: time eager launches instead

        def run():
            for i in range(calls):
                call(i)

    run()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps_for(t_est, calls)):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e-3 / calls)
    return median_s(times)


def split_candidates(s: Shape, blocks: int, num_sms: int, full: bool) -> list[int]:
    """Splits for 1, 2 and 4 waves of programs over the SMs (+ the powers of two just below)."""
    programs = s.batch * K
    waves = [math.ceil(w * num_sms / programs) for w in (1, 2, 4)]
    cands = set(waves)
    if full:
        cands |= {1 << max(0, (c - 1).bit_length() - 1) for c in waves}
        if programs < 32:
            cands.add(1 << (math.ceil(8 * num_sms / programs) - 1).bit_length())
    return sorted(c for c in cands if 1 <= c <= blocks)


def config_str(c: PagedDecodeConfig) -> str:
    return (
        f"ppb={c.pages_per_block},chunks={c.page_chunks},splits={c.num_splits},"
        f"w={c.num_warps},st={c.num_stages}"
    )


def rel_err(a, b) -> float | None:
    if a is None or b is None:
        return None
    a = np.asarray(a, np.float32)
    b = np.asarray(b, np.float32)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def make_cache(s: Shape, seed: int):
    """Pages for ``n_sets`` disjoint page tables (rotated between calls), shuffled."""
    set_pages = s.batch * s.context // s.page_size
    set_bytes = 2 * set_pages * s.page_size * K * D * jnp.dtype(DTYPE).itemsize  # K + V pages
    n_sets = int(min(4, max(1, math.ceil(L2_ROTATE_BYTES / set_bytes))))
    num_pages = set_pages * n_sets
    keys = jax.random.split(jax.random.key(seed), 4)
    shape = (K, num_pages, s.page_size, D)
    k_pages = jax.random.normal(keys[0], shape, DTYPE)
    v_pages = jax.random.normal(keys[1], shape, DTYPE)
    qs = list(jax.random.normal(keys[2], (QS_PER_SHAPE, s.batch, H, D), DTYPE))
    perm = jax.random.permutation(keys[3], num_pages).astype(jnp.int32)
    tables = tuple(perm.reshape(n_sets, s.batch, -1)[i] for i in range(n_sets))
    lengths = jnp.asarray(row_lengths(s), jnp.int32)
    return qs, k_pages, v_pages, tables, lengths


def contiguous(pages, table, s: Shape):
    """[K, P, N, D] pages + [B, maxp] table -> [B, K, L, D] contiguous."""
    x = pages[:, table].reshape(K, s.batch, s.context, D)
    return jnp.transpose(x, (1, 0, 2, 3))


def xla_contiguous_attention(q, k, v):
    """q: [B, H, D]; k, v: [B, K, L, D]. Plain XLA: einsum + f32 softmax."""
    qg = q.reshape(q.shape[0], K, H // K, D)
    s = jnp.einsum("bkgd,bkld->bkgl", qg, k, preferred_element_type=jnp.float32) * SM_SCALE
    p = jax.nn.softmax(s, axis=-1)
    o = jnp.einsum("bkgl,bkld->bkgd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return o.reshape(q.shape).astype(q.dtype)


class Bench:
    def __init__(self, args, torch, rs: RunSettings):
        self.args = args
        self.torch = torch
        self.rs = rs
        self.t_start = time.perf_counter()
        self.rows: list[dict] = []
        self.table: dict[str, dict] = {}
        self.best_knobs: dict[int, tuple] = {}
        self.num_sms = torch.cuda.get_device_properties(0).multi_processor_count if torch else 132
        self.num_sms = rs.num_sms or self.num_sms
        self.first_compile = True

    def elapsed(self) -> float:
        return time.perf_counter() - self.t_start

    def record(self, s: Shape, impl: str, sec: float | None, note: str = "", err=None):
        row = dict(
            context=s.context,
            batch=s.batch,
            page_size=s.page_size,
            ragged=s.ragged,
            impl=impl,
            us=None if sec is None else sec * 1e6,
            tbps=None if sec is None else kv_bytes(s) / sec / 1e12,
            note=note,
            rel_err=err,
        )
        self.rows.append(row)
        us = "-" if sec is None else f"{sec * 1e6:9.1f} us {row['tbps']:5.2f} TB/s"
        print(f"  {impl:34s} {us} {note}" + ("" if err is None else f" err={err:.2e}"), flush=True)

    def ceilings(self):
        torch = self.torch
        s = Shape(0, 0, 0, "")
        n = 1 << 30  # 2 GiB of bf16
        if torch is not None:
            x = torch.randn(n, device="cuda", dtype=torch.bfloat16)
            y = torch.empty_like(x)
            t = time_torch(torch, lambda i: y.copy_(x), 2 * 2 * n / EST_BW, self.rs.max_calls)
            print(f"ceiling: torch D2D copy {4 * n / t / 1e12:.3f} TB/s (read+write, 2 GiB)")
            self.rows.append(dict(impl="ceiling: torch copy_", tbps=4 * n / t / 1e12, us=t * 1e6))
            t = time_torch(
                torch, lambda i: x.sum(dtype=torch.float32), 2 * n / EST_BW, self.rs.max_calls
            )
            print(f"ceiling: torch read-only sum {2 * n / t / 1e12:.3f} TB/s (2 GiB)")
            self.rows.append(dict(impl="ceiling: torch sum", tbps=2 * n / t / 1e12, us=t * 1e6))
            del x, y
            torch.cuda.empty_cache()
        xj = jax.random.normal(jax.random.key(9), (n // 4096, 4096), DTYPE)
        max_calls = self.rs.max_calls
        salts = [jnp.asarray(1.0 + i / max_calls, DTYPE) for i in range(max_calls)]
        t, _ = time_jax(
            lambda x, c: jnp.sum(x * c, dtype=jnp.float32),
            (xj,),
            lambda i: (salts[i],),
            2 * n / EST_BW,
            self.rs,
        )
        print(f"ceiling: XLA read-only sum {2 * n / t / 1e12:.3f} TB/s (2 GiB)")
        self.rows.append(dict(impl="ceiling: XLA sum", tbps=2 * n / t / 1e12, us=t * 1e6))
        del xj, s

    def time_pallas(self, s, data, cfg, t_est, ref, dispatch=False):
        qs, k_pages, v_pages, tables, lengths = data

        def impl(k, v, lens, q, table):
            return paged_decode_pallas(
                q, k, v, table, lens, sm_scale=SM_SCALE, config=cfg, interpret=self.rs.interpret
            )

        try:
            sec, (out, compile_s) = time_jax(
                impl,
                (k_pages, v_pages, lengths),
                lambda i: (qs[i % len(qs)], tables[i % len(tables)]),
                t_est,
                self.rs,
                dispatch=dispatch,
            )
        except Exception as e:  # a config that does not fit (smem) or fails to compile
            print(f"  pallas {config_str(cfg)} failed: {type(e).__name__}: {str(e)[:300]}")
            return None, None
        if self.first_compile:
            calls = n_calls(t_est, self.rs.max_calls_in_jit)
            print(f"  (compile of {calls} calls: {compile_s:.1f}s)")
            self.first_compile = False
        err = None if ref is None else rel_err(out, ref)
        return sec, err

    def search(self, s: Shape, data, ref, t_est):
        max_pages = s.context // s.page_size
        heur = heuristic_config(s.batch, K, max_pages, s.page_size)
        base_knobs = self.best_knobs.get(s.page_size) or KNOBS[s.page_size][0]
        results: dict[PagedDecodeConfig, tuple[float, float | None]] = {}

        def try_cfg(cfg):
            cfg = cfg.clamp(max_pages, s.page_size)
            if cfg in results:
                return
            sec, err = self.time_pallas(s, data, cfg, t_est, ref)
            if sec is not None:
                results[cfg] = (sec, err)
                print(
                    f"    {config_str(cfg):45s} {sec * 1e6:9.1f} us "
                    f"{kv_bytes(s) / sec / 1e12:5.2f} TB/s err={err}",
                    flush=True,
                )

        def knobs_cfg(knobs, splits):
            ppb, chunks, warps, stages = knobs
            return PagedDecodeConfig(ppb, chunks, splits, warps, stages)

        def blocks_of(knobs):  # key blocks of one sequence under (ppb, chunks, ...)
            return max(1, max_pages * knobs[1] // knobs[0])

        over = self.elapsed() > self.args.budget_s
        try_cfg(heur)
        if not over:
            cands = split_candidates(s, blocks_of(base_knobs), self.num_sms, True)
            if s.ragged:  # finer splits shorten the long row's programs
                cands = sorted(set(cands) | {c for c in (16, 32, 64) if c <= blocks_of(base_knobs)})
            for splits in cands:
                try_cfg(knobs_cfg(base_knobs, splits))
        if s.search == "full" and results and self.elapsed() < self.args.budget_s:
            best = min(results, key=lambda c: results[c][0])
            for knobs in KNOBS[s.page_size]:
                try_cfg(knobs_cfg(knobs, best.num_splits))
            best = min(results, key=lambda c: results[c][0])
            knobs = (best.pages_per_block, best.page_chunks, best.num_warps, best.num_stages)
            if knobs != base_knobs and self.elapsed() < self.args.budget_s:
                for splits in split_candidates(s, blocks_of(knobs), self.num_sms, True):
                    try_cfg(knobs_cfg(knobs, splits))
            if s.context == 65536:
                self.best_knobs[s.page_size] = knobs
        if not results:
            return None
        best = min(results, key=lambda c: results[c][0])
        return best, results

    def run_shape(self, s: Shape):
        print(
            f"\n== L={s.context} B={s.batch} N={s.page_size}"
            + (f" ragged {row_lengths(s)}" if s.ragged else "")
            + f" (t={self.elapsed():.0f}s)"
        )
        t_est = kv_bytes(s) / EST_BW
        data = make_cache(s, seed=s.context + s.batch + s.page_size)
        qs, k_pages, v_pages, tables, lengths = data

        # Reference first: its output (call 0: qs[0], tables[0]) checks every other impl.
        ref = None
        try:
            sec, (ref, _) = time_jax(
                lambda k, v, lens, q, table: paged_decode_reference(
                    q, k, v, table, lens, sm_scale=SM_SCALE
                ),
                (k_pages, v_pages, lengths),
                lambda i: (qs[i % len(qs)], tables[i % len(tables)]),
                t_est * 4,
                self.rs,
            )
            self.record(s, "jnp reference (XLA, paged gather)", sec)
        except Exception as e:
            print(f"  reference failed: {type(e).__name__}: {str(e)[:300]}")

        found = self.search(s, data, ref, t_est)
        if found is not None:
            best, results = found
            sec, err = results[best]
            self.record(s, "pallas triton (tuned)", sec, config_str(best), err)
            heur = heuristic_config(s.batch, K, s.context // s.page_size, s.page_size).clamp(
                s.context // s.page_size, s.page_size
            )
            if heur in results:
                self.record(s, "pallas triton (heuristic)", results[heur][0], config_str(heur))
            sec_d, _ = self.time_pallas(s, data, best, t_est, None, dispatch=True)
            if sec_d is not None:
                self.record(
                    s, "pallas triton (tuned), 1 jit/call", sec_d, "host dispatch each call"
                )
            key = shape_key(s.batch, H, K, s.context // s.page_size, s.page_size, D, DTYPE)
            if not s.ragged:  # no table entry from ragged rows: the key means uniform lengths
                self.table[key] = dict(
                    config=dataclasses.asdict(best),
                    us=round(sec * 1e6, 2),
                    tbps=round(kv_bytes(s) / sec / 1e12, 3),
                )

        if s.ragged:  # the contiguous peers below assume every row at the full length
            return

        # Contiguous baselines (first table set only; each still reads 2*B*L*K*D elements).
        kc = contiguous(k_pages, tables[0], s)
        vc = contiguous(v_pages, tables[0], s)
        n_sets_c = 1
        kcs, vcs = [kc], [vc]
        if kv_bytes(s) < L2_ROTATE_BYTES:  # rotate contiguous copies too
            n_sets_c = len(tables)
            kcs = [contiguous(k_pages, t, s) for t in tables]
            vcs = [contiguous(v_pages, t, s) for t in tables]
        try:
            sec, (out, _) = time_jax(
                xla_contiguous_attention,
                (),
                lambda i: (qs[i % len(qs)], kcs[i % n_sets_c], vcs[i % n_sets_c]),
                t_est,
                self.rs,
            )
            self.record(s, "XLA einsum (contiguous K/V)", sec, err=rel_err(out, ref))
        except Exception as e:
            print(f"  XLA contiguous failed: {type(e).__name__}: {str(e)[:300]}")
        try:
            kbl = [jnp.swapaxes(k_, 1, 2) for k_ in kcs]  # [B, L, K, D]
            vbl = [jnp.swapaxes(v_, 1, 2) for v_ in vcs]
            sec, (out, _) = time_jax(
                lambda q, k, v: jax.nn.dot_product_attention(
                    q[:, None], k, v, scale=SM_SCALE, implementation="cudnn"
                ),
                (),
                lambda i: (qs[i % len(qs)], kbl[i % n_sets_c], vbl[i % n_sets_c]),
                t_est,
                self.rs,
            )
            self.record(s, "cuDNN (jax.nn.dpa, [B,L,K,D])", sec, "", rel_err(out[:, 0], ref))
        except Exception as e:
            print(f"  cuDNN failed: {type(e).__name__}: {str(e)[:200]}")
        self.torch_sdpa(s, qs, kcs, vcs, ref, t_est, n_sets_c)
        gc.collect()

    def torch_sdpa(self, s, qs, kcs, vcs, ref, t_est, n_sets):
        torch = self.torch
        if torch is None:
            return
        from torch.nn.attention import SDPBackend, sdpa_kernel
        from torch.nn.functional import scaled_dot_product_attention as sdpa

        qts = [torch.from_dlpack(q_).unsqueeze(2) for q_ in qs]  # [B, H, 1, D]
        kts = [torch.from_dlpack(k_) for k_ in kcs]  # [B, K, L, D]
        vts = [torch.from_dlpack(v_) for v_ in vcs]
        out_ref = np.asarray(ref, np.float32) if ref is not None else None

        def call(i):
            j = i % n_sets
            return sdpa(qts[i % len(qts)], kts[j], vts[j], scale=SM_SCALE, enable_gqa=True)

        try:
            choice = torch._fused_sdp_choice(
                qts[0], kts[0], vts[0], scale=SM_SCALE, enable_gqa=True
            )
            names = {int(b.value): n for n, b in SDPBackend.__members__.items()}
            choice = names.get(int(choice), str(choice))
        except Exception as e:
            choice = f"? ({type(e).__name__})"
        try:
            sec = time_torch(torch, call, t_est, self.rs.max_calls)
            err = None
            if out_ref is not None:
                got = call(0)[:, :, 0].float().cpu().numpy()
                err = rel_err(got, out_ref)
            self.record(s, "torch SDPA (enable_gqa, default)", sec, f"backend={choice}", err)
        except Exception as e:
            print(f"  torch SDPA default failed: {type(e).__name__}: {str(e)[:200]}")
        for backend in (
            SDPBackend.FLASH_ATTENTION,
            SDPBackend.EFFICIENT_ATTENTION,
            SDPBackend.CUDNN_ATTENTION,
        ):
            try:
                with sdpa_kernel([backend]):
                    sec = time_torch(torch, call, t_est, self.rs.max_calls)
                self.record(s, f"torch SDPA (enable_gqa, {backend.name})", sec)
            except Exception as e:
                print(f"  torch SDPA {backend.name}: {type(e).__name__}: {str(e)[:120]}")
        torch.cuda.empty_cache()


def markdown(rows: list[dict]) -> str:
    lines = [
        "| L | B | N | implementation | time (us) | K/V TB/s | vs torch SDPA | note |",
        "|---:|---:|---:|---|---:|---:|---:|---|",
    ]
    sdpa = {
        (r["context"], r["batch"], r["page_size"]): r["us"]
        for r in rows
        if r.get("impl") == "torch SDPA (enable_gqa, default)" and r.get("us")
    }
    for r in rows:
        if "context" not in r:
            lines.append(f"| | | | {r['impl']} | {r['us']:.1f} | {r['tbps']:.3f} | | |")
            continue
        if r["us"] is None:
            continue
        base = sdpa.get((r["context"], r["batch"], r["page_size"]))
        speed = f"{base / r['us']:.2f}x" if base else ""
        note = r["note"] + ("" if r["rel_err"] is None else f" err {r['rel_err']:.1e}")
        note = ("ragged lengths; " if r.get("ragged") else "") + note
        lines.append(
            f"| {r['context'] // 1024}K | {r['batch']} | {r['page_size']} | {r['impl']} | "
            f"{r['us']:.1f} | {r['tbps']:.2f} | {speed} | {note.strip()} |"
        )
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--budget-s", type=float, default=300.0, help="stop tuning after this")
    parser.add_argument("--shapes", default="all", help="comma list of indices into SHAPES")
    parser.add_argument(
        "--smoke", action="store_true", help="CPU check of this script: tiny shapes, interpret"
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="only kernel-only device times from the JAX profiler for --shapes",
    )
    args = parser.parse_args()
    try:
        import torch

        if not torch.cuda.is_available():
            torch = None
    except ImportError:
        torch = None
    shapes = SHAPES if args.shapes == "all" else [SHAPES[int(i)] for i in args.shapes.split(",")]
    rs = SMOKE_SETTINGS if args.smoke else DEVICE_SETTINGS
    if args.smoke:
        shapes = [
            Shape(1024, 1, 128, "full"),
            Shape(512, 2, 64, "splits"),
            Shape(512, 3, 64, "splits", ragged=True),
        ]
    dev = jax.devices()[0]
    print(f"device: {dev.device_kind} ({_compat.device_kind()}), jax {jax.__version__}")
    if torch is not None:
        import triton

        print(f"torch {torch.__version__}, triton {triton.__version__}")
    bench = Bench(args, torch, rs)
    if args.profile:
        for s in shapes:
            profile_shape(s, args.out, rs)
        return
    if not args.smoke:
        bench.ceilings()
    for s in shapes:
        try:
            bench.run_shape(s)
        except Exception:
            traceback.print_exc()
        if torch is not None:
            torch.cuda.empty_cache()
        md = write_outputs(bench, args.out)  # after every shape, in case the run is cut off
    print(f"\ntotal {bench.elapsed():.0f}s\n")
    print(md)


def profile_shape(s: Shape, out_dir: str, rs: RunSettings, calls: int = 20) -> None:
    """Kernel-only device time per call (JAX profiler), without host dispatch or launch gaps.

    Times the table/heuristic config of ``paged_decode_attention`` and cuDNN through
    ``jax.nn.dot_product_attention`` (``calls`` dispatches each) and prints, per device event
    name, the summed duration / calls, and the device span / calls.
    """
    from benchmarks.profiling import device_kernel_times
    from pallas_kernels.paged_decode import get_config

    qs, k_pages, v_pages, tables, lengths = make_cache(s, seed=1)
    max_pages = s.context // s.page_size
    cfg = get_config(s.batch, H, K, max_pages, s.page_size, D, DTYPE, _compat.device_kind())
    pallas = jax.jit(
        lambda q, k_pages, v_pages, table: paged_decode_pallas(
            q,
            k_pages,
            v_pages,
            table,
            lengths,
            sm_scale=SM_SCALE,
            config=cfg,
            interpret=rs.interpret,
        )
    )
    kbl = jnp.swapaxes(contiguous(k_pages, tables[0], s), 1, 2)
    vbl = jnp.swapaxes(contiguous(v_pages, tables[0], s), 1, 2)
    # K/V as arguments: closed over, they become HLO constants (2 GiB at B=8: proto too big).
    cudnn = jax.jit(
        lambda q, kbl, vbl: jax.nn.dot_product_attention(
            q[:, None], kbl, vbl, scale=SM_SCALE, implementation="cudnn"
        )
    )
    runs = {
        "pallas": lambda i: pallas(qs[i % len(qs)], k_pages, v_pages, tables[i % len(tables)]),
        "cudnn": lambda i: cudnn(qs[i % len(qs)], kbl, vbl),
    }
    for name, run in runs.items():
        try:
            jax.block_until_ready(run(0))
        except Exception as e:
            print(f"profile {name} failed: {type(e).__name__}: {str(e)[:200]}")
            continue
        trace_dir = os.path.join(out_dir, f"trace_{name}_{s.context}_{s.batch}")
        try:
            span, _, per_name = device_kernel_times(run, calls, trace_dir)
        except RuntimeError as e:  # CPU smoke runs: the trace has no device events
            print(f"profile {name}: {e}")
            continue
        span *= calls  # device_kernel_times returns per-call figures
        print(
            f"profile L={s.context} B={s.batch} {name} {config_str(cfg)}: device span/call "
            f"{span / calls:.1f} us = {kv_bytes(s) / (span / calls * 1e-6) / 1e12:.2f} TB/s"
        )
        for kname, us in per_name.most_common(6):
            print(f"    {us:9.1f} us/call  {kname[:60]}")


def write_outputs(bench: Bench, out_dir: str) -> str:
    """Autotune table, raw rows and the markdown table under ``out_dir``; returns the table."""
    os.makedirs(out_dir, exist_ok=True)
    table = dict(
        device_kind=_compat.device_kind(),
        generated_by="benchmarks/bench_paged_decode.py",
        jax=jax.__version__,
        configs=bench.table,
    )
    with open(os.path.join(out_dir, "paged_decode.json"), "w") as f:
        json.dump(table, f, indent=1, sort_keys=True)
    with open(os.path.join(out_dir, "paged_decode_rows.json"), "w") as f:
        json.dump(bench.rows, f, indent=1)
    md = markdown(bench.rows)
    with open(os.path.join(out_dir, "paged_decode_table.md"), "w") as f:
        f.write(md + "\n")
    return md


if __name__ == "__main__":
    main()
