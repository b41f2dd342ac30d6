"""Tokenizer: HF ``tokenizer.json`` through the ``tokenizers`` library, chat templates through jinja2
(rendered the way transformers renders them), without depending on transformers at run time."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any


class Tokenizer:
    """encode/decode plus ``apply_chat_template``; ``eos_token_ids`` from the checkpoint."""

    def __init__(self, path: str | Path):
        from tokenizers import Tokenizer as HFTokenizer

        path = Path(path)
        tok_file = path / "tokenizer.json"
        if not tok_file.exists():
            raise FileNotFoundError(f"{tok_file} not found (a fast tokenizer file is required)")
        self._tok = HFTokenizer.from_file(str(tok_file))
        self.config: dict[str, Any] = _read_json(path / "tokenizer_config.json")
        self.chat_template: str | None = self.config.get("chat_template")
        if (path / "chat_template.jinja").exists():
            self.chat_template = (path / "chat_template.jinja").read_text()
        elif (path / "chat_template.json").exists():
            self.chat_template = _read_json(path / "chat_template.json").get("chat_template")
        if isinstance(self.chat_template, list):  # named templates: use "default"
            named = {t["name"]: t["template"] for t in self.chat_template}
            self.chat_template = named.get("default")
        self.eos_token_ids = _eos_ids(path, self.config, self._tok)
        self._template = None

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def _special(self, key: str) -> str | None:
        value = self.config.get(key)
        return value.get("content") if isinstance(value, dict) else value

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        enable_thinking: bool | None = None,
        **kwargs: Any,
    ) -> str:
        """Render ``messages`` to the prompt text (tokenize it with ``encode``)."""
        if not self.chat_template:
            raise ValueError(
                "this tokenizer has no chat template (tokenizer_config.json / "
                "chat_template.jinja); pass plain prompts instead"
            )
        if self._template is None:
            self._template = _compile(self.chat_template)
        if enable_thinking is not None:
            kwargs["enable_thinking"] = enable_thinking
        specials = {
            k: self._special(k) for k in ("bos_token", "eos_token", "pad_token", "unk_token")
        }
        return self._template.render(
            messages=messages, add_generation_prompt=add_generation_prompt, **specials, **kwargs
        )


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.exists() else {}


def _eos_ids(path: Path, tok_cfg: dict[str, Any], tok) -> list[int]:
    """Union of generation_config.json's eos ids, config.json's, and the tokenizer's eos token."""
    ids: list[int] = []
    for cfg_file in ("generation_config.json", "hf_config.json", "config.json"):
        eos = _read_json(path / cfg_file).get("eos_token_id")
        for e in eos if isinstance(eos, list) else [eos]:
            if e is not None and int(e) not in ids:
                ids.append(int(e))
    eos_tok = tok_cfg.get("eos_token")
    eos_tok = eos_tok.get("content") if isinstance(eos_tok, dict) else eos_tok
    if eos_tok is not None and tok.token_to_id(eos_tok) is not None:
        tid = tok.token_to_id(eos_tok)
        if tid not in ids:
            ids.append(tid)
    return ids


def _compile(template: str):
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # transformers overrides jinja's tojson, which would HTML-escape characters.
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)
