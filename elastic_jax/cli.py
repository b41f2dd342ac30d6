"""Command line generation: ``python -m elastic_jax MODEL_DIR --prompt "..."``."""

from __future__ import annotations

import argparse
import sys

from elastic_jax.config import ATTENTION_MODES, DECODE_IMPLS, PREFILL_IMPLS
from elastic_jax.generate import generate, stream_text
from elastic_jax.loader import load_model


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m elastic_jax", description="Generate text from a converted checkpoint."
    )
    p.add_argument("model_dir", help="directory written by `python -m convert`")
    p.add_argument(
        "--prompt", action="append", required=True, help="prompt text (repeat for a batch)"
    )
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chat", action="store_true", help="wrap prompts in the chat template")
    p.add_argument("--attention-mode", default="elastic", choices=ATTENTION_MODES)
    p.add_argument("--prefill-impl", default="auto", choices=PREFILL_IMPLS)
    p.add_argument("--decode-impl", default="auto", choices=DECODE_IMPLS)
    p.add_argument("--stream", action="store_true", help="print tokens as they arrive (batch 1)")
    p.add_argument(
        "--model-parallel",
        type=int,
        default=1,
        help="shard heads / MLP / KV cache over this many devices (docs/multi_gpu.md)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    model = load_model(
        args.model_dir,
        attention_mode=args.attention_mode,
        prefill_impl=args.prefill_impl,
        decode_impl=args.decode_impl,
    )
    kwargs = dict(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        chat_template=args.chat,
    )
    if args.stream and len(args.prompt) == 1:
        for piece in stream_text(model, args.prompt[0], **kwargs):
            print(piece, end="", flush=True)
        print()
        return 0
    res = generate(model, args.prompt, return_info=True, **kwargs)
    for i, (text, t, info) in enumerate(zip(res.texts, res.timings, res.prefill_info)):
        print(f"[{i}] {text!r}")
        print(
            f"    prompt {t.prompt_tokens} tok, prefill {t.prefill_ms:.1f} ms, "
            f"{t.new_tokens} new tok at {t.decode_tokens_per_s:.1f} tok/s, "
            f"prefill sparsity {info['sparsity']:.3f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
