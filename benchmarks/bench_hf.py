"""Baseline: Hugging Face transformers (torch, SDPA attention) on the same Qwen3 shapes, random
bf16 weights, on the GPU. Run in its own process (JAX and torch do not share the GPU well).

    PYTHONPATH=. python3 benchmarks/bench_hf.py --shape 8b --prefill 32768,65536,131072 \
        --decode-context 65536 --decode-batch 1,8 --out $OUT/qwen3_8b_hf.json

Prefill: ``model(input_ids, use_cache=True, logits_to_keep=1)`` (what ``generate`` runs for the
prompt), median of ``--reps`` after a warm-up, peak memory from torch.cuda. Decode: median time of
one-token forwards against a cache holding ``--decode-context`` tokens (mean over the steps); a
batch's cache is one row's prefill repeated (``DynamicCache.batch_repeat_interleave``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from benchmarks.shapes import SHAPES, hf_config_kwargs


def build(shape: str, device: str = "cuda"):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    s = SHAPES[shape]
    cfg = Qwen3Config(
        **hf_config_kwargs(s),
        max_position_embeddings=262144,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6},
        attn_implementation="sdpa",
    )
    with torch.device("meta"):
        model = Qwen3ForCausalLM(cfg)
    model = model.to_empty(device=device).to(torch.bfloat16)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0.0, p.shape[-1] ** -0.5)
    model.model.rotary_emb.inv_freq = 1.0 / (
        1e6 ** (torch.arange(0, s["head_dim"], 2, device=device).float() / s["head_dim"])
    )
    return model.eval()


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _median_ms(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        _sync()
        t0 = time.perf_counter()
        fn()
        _sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


@torch.no_grad()
def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="8b", choices=sorted(SHAPES))
    p.add_argument("--prefill", default="32768")
    p.add_argument("--decode-context", type=int, default=0)
    p.add_argument("--decode-batch", default="1")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--decode-steps", type=int, default=20)
    p.add_argument("--out", default=None)
    p.add_argument("--device", default="cuda")
    p.add_argument(
        "--stop-after-oom",
        action="store_true",
        help="after a prefill runs out of memory, do not try the longer ones (rows say why)",
    )
    args = p.parse_args(argv)
    import transformers

    dev = args.device
    cuda = dev.startswith("cuda")
    model = build(args.shape, dev)
    V = SHAPES[args.shape]["vocab_size"]
    rows = []
    oom_at = None  # --stop-after-oom: longer prompts are not tried after this length ran out
    for T in [int(x) for x in args.prefill.split(",") if x]:
        if oom_at is not None:
            rows.append({"what": "prefill", "tokens": T, "batch": 1, "ms": None,
                         "not_run": f"out of memory at {oom_at} tokens"})  # fmt: skip
            print(rows[-1], flush=True)
            continue
        ids = torch.randint(0, V, (1, T), device=dev)
        try:
            model(ids, use_cache=True, logits_to_keep=1)  # warm-up
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            ms = _median_ms(lambda ids=ids: model(ids, use_cache=True, logits_to_keep=1), args.reps)
            peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
            rows.append({"what": "prefill", "tokens": T, "batch": 1, "ms": ms, "peak_gib": peak})
        except torch.OutOfMemoryError:
            rows.append({"what": "prefill", "tokens": T, "batch": 1, "ms": None, "oom": True})
            oom_at = T if args.stop_after_oom else None
        if cuda:
            torch.cuda.empty_cache()
        print(rows[-1], flush=True)
    if args.decode_context:
        for B in [int(x) for x in args.decode_batch.split(",") if x]:
            # One row's prefill, its cache repeated B times: a B x context prefill needs a
            # B x context MLP activation (out of memory at 4B, 32K, B=8 on an H100), and decode
            # time does not depend on what the rows hold.
            ids = torch.randint(0, V, (1, args.decode_context), device=dev)
            out = model(ids, use_cache=True, logits_to_keep=1)
            cache = out.past_key_values
            if B > 1:
                cache.batch_repeat_interleave(B)
            tok = torch.randint(0, V, (B, 1), device=dev)

            model(tok, past_key_values=cache, use_cache=True)  # warm-up
            # The cache grows by one token per step; over 20 steps that is < 0.1% of the context.
            _sync()
            t0 = time.perf_counter()
            for _ in range(args.decode_steps):
                model(tok, past_key_values=cache, use_cache=True)
            _sync()
            ms = (time.perf_counter() - t0) * 1e3 / args.decode_steps
            rows.append(
                {
                    "what": "decode",
                    "tokens": args.decode_context,
                    "batch": B,
                    "ms": ms,
                    "tok_per_s": B / (ms / 1e3),
                }
            )
            print(rows[-1], flush=True)
            del cache, out
    meta = {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "shape": args.shape,
        "attn": "sdpa",
        "dtype": "bfloat16",
    }
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
