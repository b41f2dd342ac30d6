"""Device-side kernel times from a JAX profiler trace (GPU), for benchmark breakdowns.

``device_kernel_times(fn, calls, trace_dir)`` runs ``fn(i)`` for ``i < calls`` under
``jax.profiler.trace`` and returns the device span per call and the summed duration per kernel
name per call (microseconds), read from the Perfetto trace JAX writes. Host dispatch and launch
gaps show up as the difference between the span and the sum of kernel times.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
from collections.abc import Callable

import jax


def _load_events(trace_dir: str) -> list[dict]:
    paths = glob.glob(f"{trace_dir}/**/perfetto_trace.json.gz", recursive=True)
    if not paths:
        raise FileNotFoundError(f"no perfetto_trace.json.gz under {trace_dir}")
    with gzip.open(max(paths, key=os.path.getmtime)) as f:
        events = json.load(f)
    return events["traceEvents"] if isinstance(events, dict) else events


def device_kernel_times(
    fn: Callable[[int], object], calls: int, trace_dir: str
) -> tuple[float, float, collections.Counter]:
    """Profile ``calls`` calls of ``fn`` (already compiled and warmed up by the caller).

    Returns (device span per call, summed kernel time per call, Counter kernel name -> us per
    call). Kernel names are cut to 80 characters.
    """
    span, ksum, per_name, _ = device_kernel_stats(fn, calls, trace_dir)
    return span, ksum, per_name


def device_kernel_stats(
    fn: Callable[[int], object], calls: int, trace_dir: str
) -> tuple[float, float, collections.Counter, collections.Counter]:
    """``device_kernel_times`` plus a Counter kernel name -> launches per call."""
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
        out = None
        for i in range(calls):
            out = fn(i)
        jax.block_until_ready(out)
    events = _load_events(trace_dir)
    pids = {
        e["pid"]: e["args"]["name"]
        for e in events
        if e.get("ph") == "M" and e.get("name") == "process_name"
    }
    kernels = [
        e
        for e in events
        if e.get("ph") == "X" and "GPU" in str(pids.get(e["pid"], "")) and e.get("dur")
    ]
    if not kernels:
        raise RuntimeError(f"no device events in the trace under {trace_dir}")
    per_name: collections.Counter = collections.Counter()
    launches: collections.Counter = collections.Counter()
    for e in kernels:
        per_name[e["name"][:80]] += e["dur"] / calls
        launches[e["name"][:80]] += 1 / calls
    span = max(e["ts"] + e["dur"] for e in kernels) - min(e["ts"] for e in kernels)
    return span / calls, sum(per_name.values()), per_name, launches
