"""Tiny random HF-format Qwen3 and Llama-3.x checkpoints, built on CPU with transformers (no
download).

These are real Hugging Face checkpoints (``config.json``, ``model.safetensors``, tokenizer files), so
the converter and the parity tests exercise exactly the code path a real Qwen3 / Llama checkpoint
takes. Building them needs the ``dev`` extra (torch + transformers).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

# Qwen3's special tokens; the chat template below follows Qwen3's format (im_start/im_end turns,
# optional empty think block when thinking is disabled).
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>")

CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
)

# Llama-3.x special tokens and a chat template with the Llama-3.1-Instruct layout for plain
# (tool-free) conversations: BOS, a system turn carrying the knowledge-cutoff and date lines, then
# header-delimited turns closed by <|eot_id|>.
LLAMA_SPECIAL_TOKENS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
)
LLAMA31_CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if not date_string is defined %}{%- set date_string = '26 Jul 2024' %}{%- endif %}"
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set system_message = messages[0]['content'] | trim %}"
    "{%- set messages = messages[1:] %}"
    "{%- else %}{%- set system_message = '' %}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\n\n' }}"
    "{{- 'Cutting Knowledge Date: December 2023\n' }}"
    "{{- 'Today Date: ' + date_string + '\n\n' }}"
    "{{- system_message }}{{- '<|eot_id|>' }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{%- endif %}"
)

TINY_QWEN3: dict[str, Any] = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=4096,
    rms_norm_eps=1e-6,
    rope_theta=1_000_000.0,
    tie_word_embeddings=True,
)

# Llama-3.1-8B in miniature: untied, GQA, theta 5e5. No head_dim key (derived, as in Llama-3.1's
# config.json); llama3 rope scaling is added per test (``TINY_LLAMA3_SCALING``).
TINY_LLAMA: dict[str, Any] = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=4096,
    rms_norm_eps=1e-5,
    rope_theta=500_000.0,
    tie_word_embeddings=False,
)
# Scaled down so a 200-token prompt spans all three llama3 bands at head_dim 16 (wavelengths 6,
# 32, 166, ... against 64 / low_freq_factor and 64 / high_freq_factor).
TINY_LLAMA3_SCALING: dict[str, Any] = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}

_SYLLABLES = (
    "ka",
    "lo",
    "mi",
    "ne",
    "ru",
    "ta",
    "shi",
    "en",
    "an",
    "or",
    "the",
    "ing",
    "qu",
    "st",
    "pr",
    "el",
    "as",
    "tic",
    "at",
    "ten",
    "tion",
    "long",
    "con",
    "text",
    "block",
    "head",
    "sparse",
)


def _corpus(num_words: int = 4000, seed: int = 0) -> list[str]:
    """Deterministic pseudo-text with enough variety for a few hundred BPE merges."""
    rng = random.Random(seed)
    words = [
        "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 3))) for _ in range(num_words)
    ]
    return [" ".join(words[i : i + 12]) + "." for i in range(0, num_words, 12)]


def build_tokenizer(vocab_size: int, family: str = "qwen3"):
    """A byte-level BPE ``PreTrainedTokenizerFast`` of exactly ``vocab_size`` tokens with the
    family's special tokens and chat template ("qwen3": ChatML; "llama": Llama-3.1 headers, BOS
    prepended by the post-processor as in Llama-3's tokenizer.json)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 300:
        raise ValueError(
            f"vocab_size={vocab_size} too small for a byte-level tokenizer (need >= 300)"
        )
    if family not in ("qwen3", "llama"):
        raise ValueError(f"family={family!r}; allowed: 'qwen3', 'llama'")
    specials = SPECIAL_TOKENS if family == "qwen3" else LLAMA_SPECIAL_TOKENS
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    # Pad with unused tokens so every model output id decodes to something.
    missing = vocab_size - tok.get_vocab_size()
    if missing > 0:
        tok.add_tokens([f"<|extra_{i}|>" for i in range(missing)])
    if family == "qwen3":
        fast = PreTrainedTokenizerFast(
            tokenizer_object=tok,
            eos_token="<|im_end|>",
            pad_token="<|endoftext|>",
            bos_token=None,
            unk_token=None,
        )
        fast.chat_template = CHAT_TEMPLATE
        return fast
    bos = "<|begin_of_text|>"
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=bos, eos_token="<|eot_id|>", unk_token=None
    )
    fast.chat_template = LLAMA31_CHAT_TEMPLATE
    return fast


def hf_config_dict(**overrides: Any) -> dict[str, Any]:
    cfg = dict(TINY_QWEN3)
    cfg.update(overrides)
    return cfg


def make_tiny_qwen3(
    out_dir: str | Path,
    *,
    seed: int = 0,
    dtype: str = "float32",
    legacy_rope_format: bool = True,
    max_shard_size: str | None = None,
    **config_overrides: Any,
) -> Path:
    """Write a tiny random Qwen3ForCausalLM checkpoint (safetensors + tokenizer) to ``out_dir``.

    Args:
      out_dir: directory to create (must not exist or be empty).
      seed: torch seed for the random weights.
      dtype: "float32" or "bfloat16" weights on disk.
      legacy_rope_format: write ``rope_theta`` / ``rope_scaling`` at the top level of config.json as
        released Qwen3 checkpoints do (transformers >= 5 writes ``rope_parameters`` instead).
      max_shard_size: e.g. "20KB" to force several shards with an index json.
      **config_overrides: Qwen3Config fields, e.g. ``num_key_value_heads=1``,
        ``tie_word_embeddings=False``, ``rope_scaling={"rope_type": "yarn", "factor": 4.0,
        "original_max_position_embeddings": 1024}``.
    Returns:
      The checkpoint directory.
    """
    return _make_tiny(
        "qwen3", out_dir, seed, dtype, legacy_rope_format, max_shard_size, config_overrides
    )


def make_tiny_llama(
    out_dir: str | Path,
    *,
    seed: int = 0,
    dtype: str = "float32",
    legacy_rope_format: bool = True,
    max_shard_size: str | None = None,
    **config_overrides: Any,
) -> Path:
    """Write a tiny random LlamaForCausalLM checkpoint (Llama-3.1 layout: untied, GQA, eos ids
    [<|end_of_text|>, <|eom_id|>, <|eot_id|>], Llama-3.1 chat template) to ``out_dir``.

    Same arguments as ``make_tiny_qwen3``; ``config_overrides`` are LlamaConfig fields, e.g.
    ``rope_scaling=TINY_LLAMA3_SCALING``, ``tie_word_embeddings=True``, ``attention_bias=True``,
    ``mlp_bias=True``, ``head_dim=32``.
    """
    return _make_tiny(
        "llama", out_dir, seed, dtype, legacy_rope_format, max_shard_size, config_overrides
    )


def _make_tiny(
    family: str,
    out_dir: str | Path,
    seed: int,
    dtype: str,
    legacy_rope_format: bool,
    max_shard_size: str | None,
    config_overrides: dict[str, Any],
) -> Path:
    import torch

    if family == "qwen3":
        from transformers import Qwen3Config as Config
        from transformers import Qwen3ForCausalLM as ForCausalLM

        defaults = TINY_QWEN3
    else:
        from transformers import LlamaConfig as Config
        from transformers import LlamaForCausalLM as ForCausalLM

        defaults = TINY_LLAMA

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg_dict = {**defaults, **config_overrides}
    rope_scaling = cfg_dict.pop("rope_scaling", None)
    rope_theta = cfg_dict.pop("rope_theta")
    rope_parameters = {"rope_type": "default", "rope_theta": rope_theta}
    if rope_scaling is not None:
        rope_parameters = {**rope_scaling, "rope_theta": rope_theta}
        rope_parameters.setdefault("rope_type", rope_parameters.pop("type", "default"))
    config = Config(
        **cfg_dict,
        rope_parameters=rope_parameters,
        eos_token_id=None,
        pad_token_id=None,
        bos_token_id=None,
    )
    tokenizer = build_tokenizer(config.vocab_size, family)
    ids = tokenizer.convert_tokens_to_ids
    if family == "qwen3":
        config.eos_token_id = ids("<|im_end|>")
        config.pad_token_id = ids("<|endoftext|>")
    else:
        config.bos_token_id = ids("<|begin_of_text|>")
        config.eos_token_id = [ids("<|end_of_text|>"), ids("<|eom_id|>"), ids("<|eot_id|>")]
    torch.manual_seed(seed)
    model = ForCausalLM(config).eval()
    # Default init is N(0, 0.02): tiny logits. Scale up so greedy decoding is decisive and
    # parity tests compare meaningful numbers.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.normal_(0.0, 0.1)
            else:
                p.normal_(0.0, 0.2 if "embed" in name else 1.0 / (p.shape[-1] ** 0.5))
    model = model.to(getattr(torch, dtype))
    save_kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(out, safe_serialization=True, **save_kwargs)
    tokenizer.save_pretrained(out)
    if legacy_rope_format:
        _write_legacy_rope(out / "config.json", rope_theta, rope_scaling)
    return out


def _write_legacy_rope(path: Path, rope_theta: float, rope_scaling: dict | None) -> None:
    """Rewrite config.json's RoPE fields the way released Qwen3 checkpoints store them."""
    cfg = json.loads(path.read_text())
    cfg.pop("rope_parameters", None)
    cfg["rope_theta"] = rope_theta
    cfg["rope_scaling"] = rope_scaling
    path.write_text(json.dumps(cfg, indent=2))
