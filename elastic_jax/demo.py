"""End-to-end demo on a tiny random checkpoint: build it with transformers, convert it, generate.

    python -m elastic_jax.demo [--out DIR] [--elastic]

Nothing is downloaded: the checkpoint's weights are random (the text is gibberish), but every step
is the one a real Qwen3 / PawQwen3 checkpoint goes through.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from convert.hf_to_jax import convert
from elastic_jax.generate import generate
from elastic_jax.loader import load_model
from elastic_jax.testing.tiny import make_tiny_qwen3
from elastic_jax.testing.tiny_elastic import make_tiny_pawqwen3


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m elastic_jax.demo", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--out", default=None, help="keep the checkpoints here (default: a temp dir)")
    p.add_argument("--elastic", action="store_true", help="a tiny PawQwen3 (router) checkpoint")
    args = p.parse_args(argv)

    root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="elastic_jax_demo_"))
    hf_dir, conv_dir = root / "hf_tiny", root / "converted"
    for d in (hf_dir, conv_dir):
        shutil.rmtree(d, ignore_errors=True)
    if args.elastic:
        make_tiny_pawqwen3(hf_dir)
    else:
        make_tiny_qwen3(hf_dir, dtype="bfloat16")
    print(f"1. tiny random HF checkpoint: {hf_dir}")
    convert(hf_dir, conv_dir, dtype="bf16", verify=True)
    print(f"2. converted (orbax) checkpoint: {conv_dir}")
    model = load_model(conv_dir)
    prompts = ["The long context", "Elastic attention picks a mode for every head"]
    res = generate(
        model,
        prompts,
        max_new_tokens=24,
        return_info=True,
        chat_template=True,
        enable_thinking=False,
    )
    print("3. generated:")
    for prompt, text, t, info in zip(prompts, res.texts, res.timings, res.prefill_info):
        print(f"   prompt: {prompt!r}")
        print(f"   output: {text!r}")
        print(
            f"   {t.prompt_tokens} prompt tokens, prefill {t.prefill_ms:.1f} ms (incl. compile), "
            f"{t.new_tokens} tokens at {t.decode_tokens_per_s:.1f} tok/s, "
            f"prefill sparsity {info['sparsity']:.3f}"
        )
    if not args.out:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
