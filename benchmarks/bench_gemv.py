"""Decode GEMV sweep (issue 16): ``pallas_kernels.gemv.stacked_gemv`` configs against XLA's dot on
the same stacked weight, and the autotune table it leaves for this GPU.

    PYTHONPATH=. python3 benchmarks/bench_gemv.py --out $OUT/gemv_h100.json \
        [--table pallas_kernels/autotune/<device_kind>/gemv.json]

For each (rows B, K, N): a stacked [L, K, N] bf16 weight (L = --layers, 36), one jitted call doing
x @ w[l] for --cycle (4) layers spread over the stack (84 MB or more: past the 50 MB L2), timed as
the median of --reps calls and divided by the layers. Rows: XLA (``x @ w[l]``: the model's decode path, which
may copy each slice first), each Pallas config of the sweep (block_n x block_k x splits x warps),
the best config. Rate = weight bytes / time, beside the copy bandwidth measured in the run.
At B = 1 the sweep adds the CUDA-core configs (``tensor_cores=False``: no 16-row padding of x;
``--cuda-core-block-k``). The timed call pads its one x once for all layers; in the model each
layer's pad is fused into the op that produces x. Last per shape: the best tensor-core config
again with ``rows_in_kernel`` (no pad at all, only real rows stored).
Default shapes: the out-projection and down-projection of the Qwen3 4B and 8B shapes at B = 1,
8, 16. ``--table`` writes the best config per shape in the format ``stacked_gemv`` reads
(commit it under ``pallas_kernels/autotune/<device_kind>/``). Time (estimated, not measured):
16 configs x 12 shapes (+16 at each B = 1 shape), each a compile of 4 kernels plus 10 timed
calls, ~6-9 min on an H100;
``--max-seconds`` (540) stops the sweep early and says so in the JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import time

import jax
import jax.numpy as jnp

from benchmarks.bench_decode import copy_bandwidth, median_seconds
from pallas_kernels import _compat
from pallas_kernels.gemv import GemvConfig, default_config, shape_key, stacked_gemv

DEFAULT_SHAPES = "4096x2560,4096x4096,9728x2560,12288x4096"  # K x N: wo 4B/8B, w_down 4B/8B


def sweep_configs(
    K: int, N: int, block_ns, block_ks, splits, warps, B: int = 1, cuda_core_block_ks=()
) -> list[GemvConfig]:
    """Tensor-core configs, then (one row only) the CUDA-core ones, whose [block_k, block_n]
    product tile lives in registers, hence their own (smaller) block_k list."""
    out = []
    for bn, bk, s, w in itertools.product(block_ns, block_ks, splits, warps):
        if N % bn == 0 and K % (s * bk) == 0:
            out.append(GemvConfig(block_n=bn, block_k=bk, splits=s, num_warps=w, num_stages=3))
    if B == 1:
        for bn, bk, s, w in itertools.product(block_ns, cuda_core_block_ks, splits, warps):
            if N % bn == 0 and K % (s * bk) == 0:
                out.append(
                    GemvConfig(
                        block_n=bn, block_k=bk, splits=s, num_warps=w, num_stages=3,
                        tensor_cores=False,
                    )
                )  # fmt: skip
    return out


def then_rows_in_kernel(cfgs: list[GemvConfig], rows: list[dict], B: int, K: int, N: int):
    """``cfgs``, then the fastest tensor-core config timed for (B, K, N) so far (read from
    ``rows`` once the others have run) again with ``rows_in_kernel``."""
    yield from cfgs
    timed = [
        r for r in rows
        if (r["B"], r["K"], r["N"]) == (B, K, N) and r.get("config", {}).get("tensor_cores")
    ]  # fmt: skip
    if timed:
        won = GemvConfig(**min(timed, key=lambda r: r["us"])["config"])
        yield dataclasses.replace(won, rows_in_kernel=True)


def time_stacked(fn, x, w, reps: int, cycle: int) -> float:
    """Seconds per product of one jitted call that runs ``fn(x, w, l)`` for ``cycle`` layers
    spread over the stack (each a different weight, so the L2 does not serve them; the layer is
    static, so each is its own Pallas kernel: few of them keep the sweep's compile time down)."""
    L = w.shape[0]
    layers = sorted({round(i * L / cycle) % L for i in range(cycle)})
    f = jax.jit(lambda x, w: [fn(x, w, i) for i in layers])
    return median_seconds(f, reps, x, w) / len(layers)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default=DEFAULT_SHAPES, help="comma list of KxN")
    p.add_argument("--batches", default="1,8,16")
    p.add_argument("--layers", type=int, default=36)
    p.add_argument("--cycle", type=int, default=4, help="layers timed per call (L2 > 1 weight)")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--block-n", default="64,128")
    p.add_argument("--block-k", default="128,256")
    p.add_argument(
        "--cuda-core-block-k", default="32,64", help="block_k of the B=1 tensor_cores=False configs"
    )
    p.add_argument("--splits", default="2,4,8,16")
    p.add_argument("--warps", default="4")
    p.add_argument("--max-seconds", type=float, default=540, help="stop sweeping after this")
    p.add_argument("--out", default=None)
    p.add_argument("--table", default=None, help="write the best configs here (autotune table)")
    args = p.parse_args(argv)
    ints = lambda s: [int(v) for v in s.split(",") if v]  # noqa: E731
    t0 = time.perf_counter()
    dev = jax.devices()[0]
    copy_bw = copy_bandwidth(0.25 if dev.platform == "cpu" else 4.0)["copy"]
    interpret = _compat.default_interpret()
    rows, best, cut = [], {}, False
    for shape in args.shapes.split(","):
        K, N = (int(v) for v in shape.lower().split("x"))
        w = jax.random.normal(jax.random.PRNGKey(0), (args.layers, K, N), jnp.bfloat16)
        for B in ints(args.batches):
            x = jax.random.normal(jax.random.PRNGKey(1), (B, K), jnp.bfloat16)
            nbytes = K * N * 2

            def row(name, sec, cfg=None, B=B, K=K, N=N, nbytes=nbytes):
                r = {"B": B, "K": K, "N": N, "impl": name, "us": sec * 1e6}
                r.update(tb_s=nbytes / sec / 1e12, of_copy_bw=nbytes / sec / copy_bw)
                if cfg is not None:
                    r["config"] = cfg.__dict__
                rows.append(r)
                return r

            row("xla", time_stacked(lambda x, w, i: x @ w[i], x, w, args.reps, args.cycle))
            cfgs = sweep_configs(
                K, N, ints(args.block_n), ints(args.block_k), ints(args.splits), ints(args.warps),
                B=B, cuda_core_block_ks=ints(args.cuda_core_block_k),
            )  # fmt: skip
            default = default_config(K, N)
            cfgs = [default] + [c for c in cfgs if c != default]
            key = shape_key(B, K, N, jnp.bfloat16)
            for cfg in then_rows_in_kernel(cfgs, rows, B, K, N):
                if time.perf_counter() - t0 > args.max_seconds:
                    cut = True
                    break
                name = "pallas default" if cfg == default else "pallas"
                try:
                    sec = time_stacked(
                        lambda x, w, i, cfg=cfg: stacked_gemv(
                            x, w, i, config=cfg, interpret=interpret
                        ),
                        x,
                        w,
                        args.reps,
                        args.cycle,
                    )
                except Exception as e:  # noqa: BLE001 - a config the compiler rejects is skipped
                    rows.append({"B": B, "K": K, "N": N, "impl": name, "error": str(e)[:200]})
                    continue
                r = row(name, sec, cfg)
                if key not in best or r["us"] < best[key]["us"]:
                    best[key] = {"config": cfg.__dict__, "us": r["us"], "tb_s": r["tb_s"]}
            xla = next(
                r for r in rows if r["impl"] == "xla" and (r["B"], r["K"], r["N"]) == (B, K, N)
            )
            b = best.get(shape_key(B, K, N, jnp.bfloat16))
            print(
                f"B={B:<3} K={K:<6} N={N:<6} xla {xla['us']:8.1f} us {xla['tb_s']:5.2f} TB/s"
                + (
                    f" | best pallas {b['us']:8.1f} us {b['tb_s']:5.2f} TB/s {b['config']}"
                    if b
                    else ""
                ),
                flush=True,
            )
    meta = {
        "device": dev.device_kind,
        "device_kind": _compat.device_kind(),
        "jax": jax.__version__,
        "copy_bw_tb_s": copy_bw / 1e12,
        "layers": args.layers,
        "interpret": interpret,
        "cut_at_max_seconds": cut,
        "generated_by": "benchmarks/bench_gemv.py",
    }
    result = {"meta": meta, "rows": rows, "best": best}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    if args.table:
        with open(args.table, "w") as f:
            json.dump({**meta, "configs": best}, f, indent=2)
    return result


if __name__ == "__main__":
    main()
