"""Device benchmark of the XAttention estimate + block selection (one run, one GPU).

In one process, on B=1, H=32, K=8, D=128, bf16 post-RoPE inputs:

1. correctness: Pallas kernel vs the jnp reference (8K, two sequences of different lengths),
   ours vs the official Triton estimate (vendored, torch+triton) at 32K, and the selection
   paths (Pallas, XLA threshold search, sort-based reference, official float64 torch code)
   on the same block sums;
2. a small search over scoring-kernel tilings at 64K (stride 16 and 8);
3. the table: S = 32K, 64K, 128K, stride 16 and 8: our estimate + selection (and each part),
   cuDNN dense causal attention (``jax.nn.dot_product_attention(implementation="cudnn",
   is_causal=True)``), their ratio, the official Triton estimate (``xattn_estimate`` with the
   chunk rule of ``Xattention_prefill_dim4``, K repeated to 32 heads beforehand, not timed) and
   the kept-block density of the estimate on the structured and the random inputs.

Timing: warm-up call (compile excluded), then N back-to-back calls between two syncs (N sized
to about 50 ms), median over 5 such samples; torch the same with ``torch.cuda.synchronize``.
Inputs: ``synthetic.structured_qk`` (timed; density reported) and i.i.d. N(0, 1) (density).

The official code is vendored (git-ignored) in ``benchmarks/vendor/elastic_xattention_estimate.py``;
without it, or without torch + triton + CUDA, its rows are recorded as errors and the rest runs.

Usage (device): PYTHONPATH=. python3 benchmarks/bench_xattn.py --out $OUT
CPU smoke test: PYTHONPATH=. python benchmarks/bench_xattn.py --smoke --out /tmp/xattn_smoke
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import functools  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from pallas_kernels import _compat  # noqa: E402
from pallas_kernels.xattn import Config, synthetic, xattn_select  # noqa: E402
from pallas_kernels.xattn import pallas_triton as pt  # noqa: E402
from pallas_kernels.xattn import reference as ref  # noqa: E402
from pallas_kernels.xattn import select as sel  # noqa: E402
from pallas_kernels.xattn.config import shape_key  # noqa: E402

D = 128
BS = 128
THRESHOLD = 0.9

SEARCH = (
    Config(block_m=128, block_n=128, block_k=64, num_warps=8, num_stages=3),
    Config(block_m=128, block_n=128, block_k=128, num_warps=8, num_stages=2),
    Config(block_m=128, block_n=128, block_k=64, num_warps=4, num_stages=3),
    Config(block_m=64, block_n=128, block_k=64, num_warps=4, num_stages=4),
    Config(block_m=128, block_n=64, block_k=64, num_warps=4, num_stages=4),
)


@dataclasses.dataclass(frozen=True)
class Settings:
    """Shapes and modes of one run (the CPU smoke run shrinks them); built once in main()."""

    q_heads: int = 32  # H
    kv_heads: int = 8  # K
    seqs: tuple[int, ...] = (32768, 65536, 131072)  # S of the table
    check_seq: int = 8192  # pallas vs reference
    official_seq: int = 32768  # ours vs the official estimate
    search_seq: int = 65536  # tiling search
    select_seq: int = 131072  # selection paths
    search_space: tuple[Config, ...] = SEARCH
    interpret: bool = False  # run the Pallas kernels in interpret mode (CPU)
    dense_impl: str = "cudnn"  # jax.nn.dot_product_attention implementation of the baseline
    target_s: float = 0.05  # length of one timing sample

    @property
    def group(self) -> int:  # G = H // K
        return self.q_heads // self.kv_heads


DEVICE_SETTINGS = Settings()
SMOKE_SETTINGS = Settings(
    q_heads=4,
    kv_heads=2,
    seqs=(2048,),
    check_seq=2048,
    official_seq=2048,
    search_seq=2048,
    select_seq=2048,
    search_space=SEARCH[:2],
    interpret=True,
    dense_impl="xla",
    target_s=0.0,
)


@dataclasses.dataclass
class Run:
    """One benchmark run: its settings, the results written to ``xattn_bench.json`` and the
    tiling the search picked per stride. Built in main() and passed to every section."""

    settings: Settings
    results: dict = dataclasses.field(default_factory=lambda: {"errors": []})
    best: dict[int, Config] = dataclasses.field(default_factory=dict)  # stride -> tiling

    def best_config(self, stride: int) -> Config:
        return self.best.get(stride, Config())


def log(*a):
    print(*a, flush=True)


def section(name):
    """Runs ``fn(run, ...)`` under a heading; an exception is logged and recorded in
    ``run.results["errors"]`` and the section returns None, so later sections still run."""

    def deco(fn):
        @functools.wraps(fn)
        def wrapper(run: Run, *a, **kw):
            log(f"\n=== {name} ===")
            t = time.perf_counter()
            try:
                return fn(run, *a, **kw)
            except Exception as e:  # keep going: later sections may still run
                run.results["errors"].append(f"{name}: {type(e).__name__}: {e}"[:2000])
                traceback.print_exc()
                return None
            finally:
                log(f"[{name}: {time.perf_counter() - t:.1f}s]")

        return wrapper

    return deco


def time_jax(fn, *args, target_s: float):
    jax.block_until_ready(fn(*args))
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    one = time.perf_counter() - t
    n = max(1, min(100, int(target_s / max(one, 1e-6))))
    samples = []
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(n):
            out = fn(*args)
        jax.block_until_ready(out)
        samples.append((time.perf_counter() - t) / n)
    return statistics.median(samples)


def time_torch(fn, target_s: float):
    import torch

    fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    one = time.perf_counter() - t
    n = max(1, min(50, int(target_s / max(one, 1e-6))))
    samples = []
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
        samples.append((time.perf_counter() - t) / n)
    return statistics.median(samples)


def inputs(st: Settings, seq, structured, seed=0, batch=1):
    """q: [batch, seq, H, D], k: [batch, seq, K, D] bf16 (structured or i.i.d. N(0, 1))."""
    key = jax.random.key(seed)
    if structured:
        q, k = jax.jit(
            functools.partial(
                synthetic.structured_qk,
                batch=batch,
                seq_len=seq,
                q_heads=st.q_heads,
                kv_heads=st.kv_heads,
                head_dim=D,
            )
        )(key)
    else:
        q, k = synthetic.random_qk(key, batch, seq, st.q_heads, st.kv_heads, D)
    return q, k


def score_fn(stride, config, interpret):
    """The jitted Pallas scoring pass (``pallas_triton.score_partials``) at norm 1."""
    return jax.jit(
        functools.partial(
            pt.score_partials,
            stride=stride,
            norm=1.0,
            block_size=BS,
            config=config,
            interpret=interpret,
        )
    )


def select_fn(stride, config, interpret, **kw):
    return jax.jit(
        functools.partial(
            xattn_select,
            stride=stride,
            threshold=THRESHOLD,
            block_size=BS,
            implementation="pallas_triton",
            interpret=interpret,
            config=config,
            **kw,
        )
    )


# ---------------------------------------------------------------------------------------------
@section("environment")
def environment(run: Run):
    dev = jax.devices()[0]
    info = {"device": dev.device_kind, "jax": jax.__version__, "device_kind": _compat.device_kind()}
    try:
        import torch
        import triton

        info.update(
            torch=torch.__version__,
            triton=triton.__version__,
            torch_device=torch.cuda.get_device_name(),
        )
    except Exception as e:  # torch/triton are optional for our part
        info["torch_error"] = repr(e)
    run.results["env"] = info
    log(json.dumps(info))


@section("correctness: pallas vs reference (8K, B=2, lengths 8192/5123)")
def check_vs_reference(run: Run):
    st = run.settings
    out = []
    q, k = inputs(st, st.check_seq, True, seed=1, batch=2)
    kv = jnp.asarray([st.check_seq, st.check_seq * 5 // 8 + 3], jnp.int32)
    for stride, sink_rule in ((16, "always"), (8, "official")):
        if True:
            kw = dict(
                kv_lengths=kv,
                stride=stride,
                threshold=THRESHOLD,
                block_size=BS,
                return_mask=True,
                return_scores=True,
                sink_rule=sink_rule,
            )
            r = jax.jit(functools.partial(xattn_select, implementation="reference", **kw))(q, k)
            p = select_fn(
                stride,
                None,
                st.interpret,
                kv_lengths=kv,
                return_mask=True,
                return_scores=True,
                sink_rule=sink_rule,
            )(q, k)
            ds = np.abs(np.asarray(r.scores, np.float32) - np.asarray(p.scores, np.float32))
            row = dict(
                stride=stride,
                sink_rule=sink_rule,
                mask_mismatch=int(np.sum(np.asarray(r.mask) != np.asarray(p.mask))),
                counts_equal=bool(np.array_equal(r.block_counts, p.block_counts)),
                indices_equal=bool(np.array_equal(r.block_indices, p.block_indices)),
                scores_max_abs_diff=float(ds.max()),
                scores_n_diff=int(np.sum(ds > 0)),
                density=synthetic.causal_density(p.mask, kv, BS),
            )
            out.append(row)
            log(row)
    run.results["check_vs_reference"] = out


def official_estimate(q, k, stride, group):
    """Returns a zero-arg callable running the vendored official estimate on q: [B, S, H, D],
    k: [B, S, K, D] (K heads repeated ``group`` times beforehand, not timed)."""
    import torch

    from benchmarks.vendor.elastic_xattention_estimate import official_prefill_estimate

    jax.block_until_ready((q, k))
    qt = torch.from_dlpack(q).transpose(1, 2).contiguous()
    kt = torch.from_dlpack(k).transpose(1, 2).repeat_interleave(group, dim=1).contiguous()
    fn = functools.partial(
        official_prefill_estimate, qt, kt, stride=stride, threshold=THRESHOLD, norm=1, block_size=BS
    )
    return fn


@section("correctness: ours vs the official Triton estimate (32K)")
def check_vs_official(run: Run):
    st = run.settings
    out = []
    seq = st.official_seq
    for structured in (True, False):
        q, k = inputs(st, seq, structured, seed=2)
        for stride in (16, 8):
            fn = official_estimate(q, k, stride, st.group)
            sums_o, mask_o = fn()
            nb = seq // BS
            mask_o = mask_o[:, :, :nb, :nb].cpu().numpy()
            sums_o = sums_o[:, :, :nb, :nb].float().cpu().numpy()
            row = dict(structured=structured, stride=stride)
            for rule in ("official", "always"):
                p = select_fn(
                    stride,
                    None,
                    st.interpret,
                    return_mask=True,
                    return_scores=True,
                    sink_rule=rule,
                )(q, k)
                row[f"mask_mismatch_{rule}"] = int(np.sum(np.asarray(p.mask) != mask_o))
            ds = np.abs(np.asarray(p.scores, np.float32) - sums_o)
            row.update(
                scores_n_diff=int(np.sum(ds > 0)),
                scores_max_abs_diff=float(ds.max()),
                n_blocks=int(mask_o.size),
                density_official=synthetic.causal_density(jnp.asarray(mask_o)),
                density_ours=synthetic.causal_density(p.mask),
            )
            out.append(row)
            log(row)
            del fn
    run.results["check_vs_official"] = out


def official_select_torch(sums, stride, seq):
    """The official float64 find_blocks_chunked, chunk by chunk, on our bf16 sums."""
    import torch

    from benchmarks.vendor.elastic_xattention_estimate import find_blocks_chunked

    t = torch.from_dlpack(sums)
    p2 = 1 << (seq - 1).bit_length()
    chunk = int(max(min(max(2048, p2), 128 * 1024 * 2048 // p2), 2048))
    bpc = chunk // BS
    masks = [
        find_blocks_chunked(
            t[:, :, c : c + bpc], c, THRESHOLD, None, decoding=False, mode="prefill", causal=True
        )
        for c in range(0, t.shape[2], bpc)
    ]
    m = torch.cat(masks, dim=-2)
    n = m.shape[-1]
    m &= ~torch.triu(torch.ones(n, n, dtype=torch.bool, device=m.device), diagonal=1)
    return m.cpu().numpy()


@section("correctness: selection paths on the same block sums (128K, stride 16)")
def check_selection(run: Run, stride=16):
    st = run.settings
    seq = st.select_seq
    q, k = inputs(st, seq, True, seed=3)
    cfg = dataclasses.replace(run.best_config(stride), select_impl="pallas")
    geom = pt.combine_geometry(seq, seq, stride=stride, block_size=BS, config=cfg)
    w, mt, lt = score_fn(stride, cfg, st.interpret)(
        q, k, jnp.asarray([seq], jnp.int32), jnp.ones((1, st.q_heads), bool)
    )
    sums = jax.jit(functools.partial(pt.combine_partials, stride=stride, **geom))(
        w, mt, lt, jnp.asarray([seq], jnp.int32), jnp.ones((1, st.q_heads), bool)
    )
    del w, mt, lt, q, k
    kv = jnp.asarray([seq], jnp.int32)
    act = jnp.ones((1, st.q_heads), bool)
    row = {}
    for rule in ("always", "official"):
        kw = dict(threshold=THRESHOLD, block_size=BS, q_block_offset=0, sink_rule=rule)
        _, _, m_pal = jax.jit(
            functools.partial(pt.select_pallas, config=cfg, interpret=st.interpret, **kw)
        )(sums, kv, act)
        _, _, m_xla = jax.jit(functools.partial(sel.select_xla, **kw))(sums, kv, act)
        m_ref = jax.jit(functools.partial(ref.select_mask_reference, **kw))(sums, kv)
        row[rule] = dict(
            pallas_vs_xla=int(jnp.sum(m_pal != m_xla)),
            pallas_vs_sort_reference=int(jnp.sum(m_pal != m_ref)),
        )
        if rule == "official" and not st.interpret:
            m_off = official_select_torch(sums, stride, seq)
            row[rule]["pallas_vs_official_float64"] = int(np.sum(np.asarray(m_pal) != m_off))
            row[rule]["rows_differing_vs_official"] = int(
                np.sum(np.any(np.asarray(m_pal) != m_off, axis=-1))
            )
    row["n_blocks"] = int(sums.size)
    run.results["check_selection"] = row
    log(row)


# ---------------------------------------------------------------------------------------------
@section("tiling search (64K)")
def search(run: Run):
    st = run.settings
    seq = st.search_seq
    q, k = inputs(st, seq, True, seed=4)
    kv = jnp.asarray([seq], jnp.int32)
    act = jnp.ones((1, st.q_heads), bool)
    rows = []
    for stride in (16, 8):
        best = None
        for cfg in st.search_space:
            try:
                f = score_fn(stride, cfg, st.interpret)
                t = time_jax(f, q, k, kv, act, target_s=st.target_s)
            except Exception as e:
                log(f"stride {stride} {cfg}: FAILED {type(e).__name__}: {str(e)[:300]}")
                rows.append(dict(stride=stride, config=dataclasses.asdict(cfg), error=str(e)[:300]))
                continue
            rows.append(dict(stride=stride, config=dataclasses.asdict(cfg), ms=t * 1e3))
            log(
                f"stride {stride} bm={cfg.block_m} bn={cfg.block_n} bk={cfg.block_k} "
                f"w={cfg.num_warps} st={cfg.num_stages}: {t * 1e3:.3f} ms"
            )
            if best is None or t < best[0]:
                best = (t, cfg)
        if best is not None:
            run.best[stride] = best[1]
    run.results["search"] = rows


def flops_estimate(seq, stride, heads):
    rows = seq // stride
    return 2.0 * (rows * rows / 2) * stride * D * heads


def attn_flops(seq, heads):
    return 4.0 * seq * seq / 2 * D * heads


@section("table")
def table(run: Run):
    st = run.settings
    rows = []
    for seq in st.seqs:
        q, k = inputs(st, seq, True, seed=5)
        v = jax.random.normal(jax.random.key(9), (1, seq, st.kv_heads, D), jnp.bfloat16)
        cudnn = jax.jit(
            functools.partial(
                jax.nn.dot_product_attention, is_causal=True, implementation=st.dense_impl
            )
        )
        t_cudnn = time_jax(cudnn, q, k, v, target_s=st.target_s)
        tflops = attn_flops(seq, st.q_heads) / t_cudnn / 1e12
        log(f"S={seq}: cudnn {t_cudnn * 1e3:.2f} ms ({tflops:.0f} TF/s)")
        del v
        qr, kr = inputs(st, seq, False, seed=6)
        kv = jnp.asarray([seq], jnp.int32)
        act = jnp.ones((1, st.q_heads), bool)
        for stride in (16, 8):
            cfg = run.best_config(stride)
            r = dict(seq=seq, stride=stride, config=dataclasses.asdict(cfg), cudnn_ms=t_cudnn * 1e3)
            score = score_fn(stride, cfg, st.interpret)
            geom = pt.combine_geometry(seq, seq, stride=stride, block_size=BS, config=cfg)
            combine = jax.jit(functools.partial(pt.combine_partials, stride=stride, **geom))
            kw = dict(threshold=THRESHOLD, block_size=BS, q_block_offset=0)
            sel_p = jax.jit(
                functools.partial(pt.select_pallas, config=cfg, interpret=st.interpret, **kw)
            )
            sel_x = jax.jit(functools.partial(sel.select_xla, **kw))
            r["score_ms"] = time_jax(score, q, k, kv, act, target_s=st.target_s) * 1e3
            r["score_tflops"] = flops_estimate(seq, stride, st.q_heads) / r["score_ms"] / 1e9
            parts = score(q, k, kv, act)
            r["combine_ms"] = time_jax(combine, *parts, kv, act, target_s=st.target_s) * 1e3
            sums = combine(*parts, kv, act)
            del parts
            r["select_pallas_ms"] = time_jax(sel_p, sums, kv, act, target_s=st.target_s) * 1e3
            r["select_xla_ms"] = time_jax(sel_x, sums, kv, act, target_s=st.target_s) * 1e3
            r["density_structured"] = synthetic.causal_density(sel_p(sums, kv, act)[2])
            del sums
            sums_r = combine(*score(qr, kr, kv, act), kv, act)
            r["density_random"] = synthetic.causal_density(sel_p(sums_r, kv, act)[2])
            del sums_r
            impl = "pallas" if r["select_pallas_ms"] <= r["select_xla_ms"] else "xla"
            r["select_impl"] = impl
            full = select_fn(stride, dataclasses.replace(cfg, select_impl=impl), st.interpret)
            r["ours_ms"] = time_jax(full, q, k, target_s=st.target_s) * 1e3
            r["ratio"] = r["ours_ms"] / r["cudnn_ms"]
            try:
                import torch

                off = official_estimate(q, k, stride, st.group)
                r["official_ms"] = time_torch(off, st.target_s) * 1e3
                r["official_ratio"] = r["official_ms"] / r["cudnn_ms"]
                m_off = off()[1]
                nb = seq // BS
                r["density_official_structured"] = synthetic.causal_density(
                    jnp.asarray(m_off[:, :, :nb, :nb].cpu().numpy())
                )
                del off, m_off
                torch.cuda.empty_cache()
            except Exception as e:
                run.results["errors"].append(f"official S={seq} stride={stride}: {e}"[:500])
                traceback.print_exc()
            rows.append(r)
            log({k_: (round(v_, 4) if isinstance(v_, float) else v_) for k_, v_ in r.items()})
        del q, k, qr, kr
        gc.collect()
    run.results["table"] = rows
    return rows


def markdown(rows, env):
    lines = [
        f"Device: {env.get('device')}; jax {env.get('jax')}, torch {env.get('torch')}, "
        f"triton {env.get('triton')}. B=1, Hq=32, Hkv=8, D=128, bf16, block 128, "
        f"threshold {THRESHOLD}. Timed on `synthetic.structured_qk` inputs.",
        "",
        "| S | stride | ours total ms | score ms (TF/s) | combine ms | select ms (pallas / xla) "
        "| cuDNN causal ms | ours / cuDNN | official Triton ms | official / cuDNN "
        "| density structured (official) | density random |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['seq'] // 1024}K | {r['stride']} | {r['ours_ms']:.2f} | "
            f"{r['score_ms']:.2f} ({r['score_tflops']:.0f}) | {r['combine_ms']:.2f} | "
            f"{r['select_pallas_ms']:.2f} / {r['select_xla_ms']:.2f} | {r['cudnn_ms']:.1f} | "
            f"{100 * r['ratio']:.1f}% | {r.get('official_ms', float('nan')):.1f} | "
            f"{100 * r.get('official_ratio', float('nan')):.1f}% | "
            f"{r['density_structured']:.3f} ({r.get('density_official_structured', float('nan')):.3f})"
            f" | {r['density_random']:.3f} |"
        )
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--skip-search", action="store_true")
    ap.add_argument("--skip-checks", action="store_true")
    ap.add_argument(
        "--smoke",
        action="store_true",
        help="CPU smoke run: tiny sizes, interpret mode, XLA attention, no torch",
    )
    args = ap.parse_args()
    run = Run(SMOKE_SETTINGS if args.smoke else DEVICE_SETTINGS)
    results = run.results
    environment(run)
    if not args.skip_checks:
        check_vs_reference(run)
        check_vs_official(run)
    if not args.skip_search:
        search(run)
    if not args.skip_checks:
        check_selection(run)
    rows = table(run) or []
    autotune = {}
    for stride, cfg in run.best.items():
        for seq in run.settings.seqs:
            autotune[
                shape_key(stride=stride, block_size=BS, head_dim=D, seq_len=seq, dtype="bfloat16")
            ] = dataclasses.asdict(cfg)
    for r in rows:  # record the faster selection path per shape
        key = shape_key(
            stride=r["stride"], block_size=BS, head_dim=D, seq_len=r["seq"], dtype="bfloat16"
        )
        if key in autotune:
            autotune[key]["select_impl"] = r["select_impl"]
    results["autotune"] = {results.get("env", {}).get("device_kind", "unknown"): autotune}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "xattn_bench.json"), "w") as f:
        json.dump(results, f, indent=1, default=str)
    md = markdown(rows, results.get("env", {})) if rows else "(no table)"
    with open(os.path.join(args.out, "xattn_table.md"), "w") as f:
        f.write(md + "\n")
    log("\n" + md)
    log("errors:", results["errors"])


if __name__ == "__main__":
    main()
