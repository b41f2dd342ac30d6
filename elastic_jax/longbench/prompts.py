"""Prompt construction exactly as LongBench's pred.py: template -> middle truncation in tokens
-> chat template (except for few-shot and code tasks) -> token ids.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from .tasks import TaskSpec


class Tokenizer(Protocol):
    """The part of `elastic_jax` tokenizers the harness uses."""

    @property
    def eos_token_ids(self) -> list[int]: ...

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...

    def apply_chat_template(
        self,
        messages: list[dict],
        add_generation_prompt: bool = True,
        enable_thinking: bool | None = None,
    ) -> str: ...


@dataclasses.dataclass(frozen=True)
class BuiltPrompt:
    """A prompt ready for generate().

    Attributes:
      token_ids: [T] the ids fed to the model.
      raw_tokens: token count of the formatted prompt before truncation (with the tokenizer's
        default special tokens, as pred.py counts them).
      truncated: whether the middle was cut out.
      chat_template: whether the chat template was applied.
    """

    token_ids: list[int]
    raw_tokens: int
    truncated: bool
    chat_template: bool


def format_prompt(spec: TaskSpec, sample: Mapping[str, Any]) -> str:
    """pred.py: `prompt_format.format(**json_obj)` (templates use {context} and {input})."""
    return spec.prompt_template.format(**sample)


def truncate_middle(prompt: str, tokenizer: Tokenizer, max_length: int) -> tuple[str, int, bool]:
    """Cut the middle of `prompt` so that at most `max_length` tokens remain (pred.py).

    The prompt is tokenized with default special tokens and no truncation. If it has more than
    `max_length` tokens, the first and last `int(max_length / 2)` tokens are decoded separately
    with skip_special_tokens=True and concatenated without separator. For odd `max_length` this
    keeps `max_length - 1` tokens, as the official code does.

    Returns:
      (prompt, raw token count, truncated?)
    """
    if max_length < 2:
        # half == 0 would make pred.py's ids[-0:] keep the whole prompt.
        raise ValueError(f"max_length={max_length} must be >= 2")
    ids = tokenizer.encode(prompt, add_special_tokens=True)
    if len(ids) <= max_length:
        return prompt, len(ids), False
    half = int(max_length / 2)
    head = tokenizer.decode(ids[:half], skip_special_tokens=True)
    tail = tokenizer.decode(ids[-half:], skip_special_tokens=True)
    return head + tail, len(ids), True


def build_prompt(
    spec: TaskSpec,
    sample: Mapping[str, Any],
    tokenizer: Tokenizer,
    *,
    max_length: int,
    use_chat_template: bool = True,
    enable_thinking: bool | None = False,
) -> BuiltPrompt:
    """Format, truncate, wrap in the chat template when the task allows it, and tokenize.

    Args:
      max_length: prompt budget in tokens before the chat template (pred.py `model2maxlen`).
      use_chat_template: False for base (non-chat) models: every task is fed raw.
      enable_thinking: passed to the chat template (Qwen3: False = non-thinking mode).

    The truncation happens on the raw prompt, before the chat template, so the final prompt may
    exceed `max_length` by the template's few tokens (as in pred.py). The templated text already
    carries the model's special tokens (e.g. Llama-3's <|begin_of_text|>), so it is tokenized
    with add_special_tokens=False; raw prompts get the tokenizer's default special tokens, as
    pred.py's `tokenizer(prompt)` does.
    """
    prompt = format_prompt(spec, sample)
    prompt, raw_tokens, truncated = truncate_middle(prompt, tokenizer, max_length)
    templated = use_chat_template and not spec.skip_chat_template
    if templated:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}],
            add_generation_prompt=True,
            enable_thinking=enable_thinking,
        )
        ids = tokenizer.encode(text, add_special_tokens=False)
    else:
        ids = tokenizer.encode(prompt, add_special_tokens=True)
    return BuiltPrompt(
        token_ids=list(ids), raw_tokens=raw_tokens, truncated=truncated, chat_template=templated
    )


def stop_token_ids(spec: TaskSpec, tokenizer: Tokenizer) -> list[int]:
    """All eos ids; samsum also stops on the "\\n" token (pred.py `encode("\\n")[-1]`)."""
    stops = list(tokenizer.eos_token_ids)
    if spec.stop_on_newline:
        newline = tokenizer.encode("\n", add_special_tokens=False)
        if not newline:
            raise ValueError("tokenizer encodes '\\n' to no token; cannot build samsum's stop set")
        if newline[-1] not in stops:
            stops.append(newline[-1])
    return stops
