"""LongBench with a Llama backbone: LongBench's prompt budget for Llama-3.1 (model2maxlen 120000),
the Llama-3.1 chat template from the checkpoint's tokenizer files (BOS once, headers), raw few-shot
prompts with the tokenizer's BOS, and the tiny PawLlama through the real harness."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from elastic_jax import generate, load_model
from elastic_jax.config import config_from_hf
from elastic_jax.longbench.prompts import build_prompt
from elastic_jax.longbench.runner import default_max_length, run_longbench
from elastic_jax.longbench.tasks import TASKS
from elastic_jax.testing.tiny import TINY_LLAMA3_SCALING

FIXTURES = Path(__file__).parent / "fixtures" / "longbench"


@dataclasses.dataclass
class _FakeModel:
    config: object


def _cfg(arch: str, window: int):
    hf = dict(
        architectures=[arch],
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        rms_norm_eps=1e-5,
        max_position_embeddings=window,
    )
    if arch.startswith("Paw"):
        hf.update(pooling_mode="ctx_q", use_softmax=True, enable_ada_sparsity=True)
    return config_from_hf(hf)


@pytest.mark.parametrize(
    "arch, window, expected",
    [
        ("LlamaForCausalLM", 131072, 120000),  # Llama-3.1-8B-Instruct: LongBench's value
        ("PawLlamaForCausalLM", 131072, 120000),
        ("LlamaForCausalLM", 4096, 3072),  # a shorter window still leaves generation room
        ("Qwen3ForCausalLM", 40960, 39936),  # no official entry: window - 1024
    ],
)
def test_default_max_length_per_family(arch, window, expected):
    assert default_max_length(_FakeModel(_cfg(arch, window))) == expected


def test_llama_prompts_chat_and_raw(tiny_checkpoints):
    _, conv = tiny_checkpoints(family="llama")
    tok = load_model(conv).tokenizer
    bos = tok.token_to_id("<|begin_of_text|>")
    sample = {"context": "ka lo mi ne " * 300, "input": "what is ru?"}
    chat = build_prompt(TASKS["hotpotqa"], sample, tok, max_length=200)
    assert chat.chat_template and chat.truncated
    assert chat.token_ids.count(bos) == 1 and chat.token_ids[0] == bos
    text = tok.decode(chat.token_ids, skip_special_tokens=False)
    assert "<|start_header_id|>user<|end_header_id|>" in text
    assert text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    raw = build_prompt(TASKS["trec"], sample, tok, max_length=200)
    assert not raw.chat_template and raw.token_ids[0] == bos
    assert "<|start_header_id|>" not in tok.decode(raw.token_ids, skip_special_tokens=False)


def test_tiny_pawllama_through_the_harness(tiny_paw_checkpoints, tmp_path):
    _, conv = tiny_paw_checkpoints(
        elastic={"retrieval_mode": "xattn", "toggle_type": "streaming"},
        family="llama",
        rope_scaling=TINY_LLAMA3_SCALING,
    )
    seen: list[list[int]] = []

    def recording_generate(model, prompts, **kwargs):
        seen.extend(list(p) for p in prompts)
        return generate(model, prompts, **kwargs)

    run_longbench(
        conv,
        FIXTURES,
        "hotpotqa_e,trec_e",
        tmp_path,
        attention_modes=["dense", "elastic"],
        limit=1,
        progress=False,
        model_options={"prefill_impl": "reference"},
        generate_fn=recording_generate,
    )
    rows = {
        p.relative_to(tmp_path).as_posix(): json.loads(p.read_text().splitlines()[0])
        for p in tmp_path.glob("*/*.jsonl")
    }
    assert set(rows) == {
        f"{m}/{t}.jsonl" for m in ("dense", "elastic") for t in ("hotpotqa_e", "trec_e")
    }
    assert all(isinstance(r["pred"], str) for r in rows.values())
    assert rows["dense/hotpotqa_e.jsonl"]["sparsity"] == 0.0
    tok = load_model(conv).tokenizer
    bos = tok.token_to_id("<|begin_of_text|>")
    header = tok.token_to_id("<|start_header_id|>")
    assert len(seen) == 4 and all(p[0] == bos and p.count(bos) == 1 for p in seen)
    assert sum(header in p for p in seen) == 2  # hotpotqa templated, trec raw, in both modes
