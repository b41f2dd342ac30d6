"""LongBench end to end on CPU: the tiny PawQwen3 checkpoint through the real harness (scores are
meaningless on random weights; the pipeline must be whole: dense and elastic, resume, report)."""

from __future__ import annotations

import json
from pathlib import Path

from elastic_jax.longbench.runner import run_longbench

FIXTURES = Path(__file__).parent / "fixtures" / "longbench"
TASKS = "hotpotqa_e,trec_e,samsum_e,multifieldqa_zh,lcc_e"


def test_tiny_checkpoint_through_the_harness(tiny_paw_checkpoints, tmp_path):
    _, conv = tiny_paw_checkpoints(elastic={"retrieval_mode": "xattn", "toggle_type": "streaming"})
    kwargs = dict(
        attention_modes=["dense", "elastic"],
        limit=1,
        progress=False,
        model_options={"prefill_impl": "reference"},
    )
    first = run_longbench(conv, FIXTURES, TASKS, tmp_path, **kwargs)
    preds = {p: p.read_text() for p in sorted(tmp_path.glob("*/*.jsonl"))}
    assert len(preds) == 10  # 5 tasks x 2 modes
    for path, text in preds.items():
        rows = [json.loads(line) for line in text.splitlines()]
        assert len(rows) == 1 and isinstance(rows[0]["pred"], str)
        assert rows[0]["prefill_ms"] > 0
        if path.parent.name == "dense":
            assert rows[0]["sparsity"] == 0.0
        else:
            assert 0.0 <= rows[0]["sparsity"] < 1.0
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(json.dumps(results).split('"')) >= {"dense", "elastic"}
    # A second run resumes: nothing regenerated, files unchanged, same results.
    second = run_longbench(conv, FIXTURES, TASKS, tmp_path, **kwargs)
    assert {p: p.read_text() for p in sorted(tmp_path.glob("*/*.jsonl"))} == preds
    assert json.dumps(first, sort_keys=True, default=str) == json.dumps(
        second, sort_keys=True, default=str
    )


def test_engine_slots_match_the_static_path(tiny_paw_checkpoints, tmp_path):
    """--batch-size 3 (engine slots, completion order) writes the predictions the static batch-1
    path writes (greedy, fp32)."""
    from elastic_jax import generate_static

    _, conv = tiny_paw_checkpoints(elastic={"retrieval_mode": "xattn", "toggle_type": "streaming"})
    kwargs = dict(
        attention_modes="elastic",
        limit=2,
        progress=False,
        write_report=False,
        model_options={"prefill_impl": "reference"},
    )
    tasks = "hotpotqa_e,trec_e,samsum_e"
    run_longbench(conv, FIXTURES, tasks, tmp_path / "engine", batch_size=3, **kwargs)
    run_longbench(conv, FIXTURES, tasks, tmp_path / "static", generate_fn=generate_static, **kwargs)

    def preds(root: Path) -> dict:
        rows = [json.loads(x) for p in root.glob("*/*.jsonl") for x in p.read_text().splitlines()]
        return {r["_id"]: (r["pred"], r["new_tokens"]) for r in rows}

    engine, static = preds(tmp_path / "engine"), preds(tmp_path / "static")
    assert len(engine) == 6 and engine == static
