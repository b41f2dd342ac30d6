"""Synthetic LongBench-format data of chosen prompt lengths, for throughput runs.

The files have the official format and names (`<task>_e.jsonl` / `<task>.jsonl`), so the harness
runs on them unchanged; their contexts are seeded random filler with one "needle" fact in the
middle, so scores mean nothing -- they exist to time prefill/decode at 8K-32K tokens without the
real data. Prompt lengths are measured with the model's tokenizer when one is given (else in
whitespace words).
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Sequence
from pathlib import Path

from .prompts import Tokenizer
from .tasks import resolve_tasks

_WORDS = (
    "river mountain signal engine garden theory market window silver harbor paper circuit "
    "valley lantern forest number report meeting budget council station ocean island bridge "
    "voltage kernel matrix vector planet orbit harvest winter summer autumn spring desert "
    "canyon museum library archive letter history science nature family village city"
).split()
_TREC_CLASSES = ["abbreviation", "description", "entity", "human", "location", "number"]


def _sentence(rng: random.Random) -> str:
    words = [rng.choice(_WORDS) for _ in range(rng.randint(8, 16))]
    return " ".join(words).capitalize() + "."


def _count(text: str, tokenizer: Tokenizer | None) -> int:
    if tokenizer is None:
        return len(text.split())
    return len(tokenizer.encode(text, add_special_tokens=False))


def _sample(task: str, template: str, target: int, rng: random.Random, tok, sid: str) -> dict:
    """One sample whose formatted prompt has about `target` tokens (within 1% or a sentence)."""
    code = rng.randint(1000, 9999)
    needle = f"The secret code of {sid} is {code}."
    question = f"What is the secret code of {sid}?"
    answers, classes = [str(code)], None
    if task == "trec":
        question, answers, classes = "How many codes are there?", ["number"], _TREC_CLASSES
    elif task == "passage_retrieval_en":
        answers = ["Paragraph 1"]
    elif task == "passage_count":
        answers = ["1"]

    def build(n: int) -> str:
        body = [_sentence(random.Random(f"{sid}/{i}")) for i in range(n)]
        body.insert(n // 2, needle)
        return "Paragraph 1: " + " ".join(body)

    def prompt_len(n: int) -> int:
        return _count(template.format(context=build(n), input=question), tok)

    base = prompt_len(0)  # template + question + needle
    if base >= target:
        raise ValueError(f"length {target} is shorter than {task}'s prompt template + question")
    # prompt length ~ base + n * (tokens per sentence); refine the per-sentence estimate.
    n = max(1, (target - base) // 16)
    for _ in range(6):
        got = prompt_len(n)
        if abs(got - target) <= max(8, target // 100):
            break
        per = max((got - base) / n, 1e-3)
        new_n = max(1, round((target - base) / per))
        if new_n == n:
            break
        n = new_n
    context = build(n)
    return {
        "input": question,
        "context": context,
        "answers": answers,
        "length": len((question + " " + context).split()),
        "dataset": task,
        "language": "en",
        "all_classes": classes,
        "_id": sid,
    }


def make_synthetic_data(
    out_dir: str | os.PathLike,
    *,
    tasks: str | Sequence[str] = "e",
    lengths: Sequence[int] = (8192, 16384, 32768),
    per_length: int = 2,
    tokenizer: Tokenizer | None = None,
    seed: int = 0,
) -> list[Path]:
    """Write one jsonl per task with `per_length` samples at each prompt length.

    Args:
      tasks: task selection as in `resolve_tasks` ("e" -> the 13 `<task>_e.jsonl` files).
      lengths: target prompt lengths (tokens of the formatted prompt, before the chat template).
      tokenizer: measures lengths; None counts whitespace words instead.
    Returns:
      The files written.
    """
    if per_length < 1 or not lengths or min(lengths) < 64:
        raise ValueError(f"per_length={per_length} must be >= 1, lengths={list(lengths)} >= 64")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for run in resolve_tasks(tasks):
        rng = random.Random(f"{seed}/{run.key}")
        rows = [
            _sample(
                run.spec.name, run.spec.prompt_template, L, rng, tokenizer, f"{run.key}-{L}-{i}"
            )
            for L in lengths
            for i in range(per_length)
        ]
        path = out / f"{run.key}.jsonl"
        with path.open("w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        written.append(path)
    return written
