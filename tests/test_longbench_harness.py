"""LongBench harness without the real model: tasks, prompts/truncation, the evaluation loop with a
fake model (resume after a crash, bad inputs), the report and the CLI.

The fake tokenizer is character level (one token per character, BOS=1 added with
add_special_tokens, EOS=2), so token counts are exact and easy to check by hand. The fake
generate() answers each sample with a canned prediction found through the "[<_id>]" marker the
fixture contexts carry, honouring stop tokens, min_new_tokens and max_new_tokens.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from elastic_jax.longbench import report as R
from elastic_jax.longbench.__main__ import main
from elastic_jax.longbench.dataset import load_task_data, read_predictions
from elastic_jax.longbench.prompts import build_prompt, stop_token_ids, truncate_middle
from elastic_jax.longbench.runner import run_longbench
from elastic_jax.longbench.synthetic import make_synthetic_data
from elastic_jax.longbench.tasks import (
    ALL_TASKS,
    LONGBENCH_E_TASKS,
    TASKS,
    resolve_tasks,
    task_from_key,
)

FIXTURES = Path(__file__).parent / "fixtures" / "longbench"


def _metrics_test_module():
    # The hand-computed cases live in test_longbench_metrics.py; load it by path so this works
    # whether or not tests/ is a package.
    path = Path(__file__).with_name("test_longbench_metrics.py")
    spec = importlib.util.spec_from_file_location("_longbench_metric_cases", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_cases = _metrics_test_module()
CASES, TASK_SCORES = _cases.CASES, _cases.TASK_SCORES
DATA = Path(R.__file__).parent / "data"
BOS, EOS, OFFSET = 1, 2, 10
CHAT_PREFIX = "<|im_start|>user\n"
CHAT_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n"
NO_THINK = "<think>\n\n</think>\n\n"


class CharTokenizer:
    """One token per character (id = ord + OFFSET); BOS/EOS are the only special tokens."""

    eos_token_ids = [EOS]

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return ([BOS] if add_special_tokens else []) + [ord(c) + OFFSET for c in text]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        out = []
        for i in ids:
            if i < OFFSET:
                if not skip_special_tokens:
                    out.append({BOS: "<s>", EOS: "</s>"}[i])
            else:
                out.append(chr(i - OFFSET))
        return "".join(out)

    def apply_chat_template(self, messages, add_generation_prompt=True, enable_thinking=None):
        assert len(messages) == 1 and messages[0]["role"] == "user" and add_generation_prompt
        think = NO_THINK if enable_thinking is False else ""
        return CHAT_PREFIX + messages[0]["content"] + CHAT_SUFFIX + think


class FakeModel:
    def __init__(self, attention_mode: str = "elastic", window: int = 4096):
        self.tokenizer = CharTokenizer()
        self.config = SimpleNamespace(max_position_embeddings=window)
        self.attention_mode = attention_mode


PREDICTIONS = {sid: pred for _, sid, pred, _ in CASES}


class FakeGenerate:
    """Canned answers per sample; "elastic" gets hq0 wrong. Raises after `fail_after` calls."""

    def __init__(self, fail_after: int | None = None, extra: dict[str, str] | None = None):
        self.fail_after = fail_after
        self.answers = {**PREDICTIONS, **(extra or {})}
        self.calls: list[dict] = []

    def __call__(self, model, prompts, *, max_new_tokens, stop_token_ids, greedy,
                 min_new_tokens, return_info):  # fmt: skip
        if self.fail_after is not None and len(self.calls) >= self.fail_after:
            raise RuntimeError("simulated crash")
        tok = model.tokenizer
        ids_out, texts, timings, infos = [], [], [], []
        for prompt in prompts:
            sid = re.search(r"\[(\w+)\]", tok.decode(prompt)).group(1)
            self.calls.append({"id": sid, "max_new_tokens": max_new_tokens,
                               "stop": list(stop_token_ids), "min_new_tokens": min_new_tokens,
                               "greedy": greedy, "prompt": list(prompt)})  # fmt: skip
            answer = self.answers[sid]
            if model.attention_mode == "elastic" and sid == "hq0":
                answer = "London"
            new = []
            for t in tok.encode(answer, add_special_tokens=False) + [EOS]:
                if len(new) == max_new_tokens:
                    break
                new.append(t)
                if t in stop_token_ids and len(new) > min_new_tokens:
                    break
            ids_out.append(new)
            texts.append(tok.decode(new, skip_special_tokens=True))
            sparse = model.attention_mode != "dense"
            timings.append(SimpleNamespace(
                prefill_ms=len(prompt) / (2.0 if sparse else 1.0), decode_ms=float(len(new)),
                decode_tokens_per_s=1000.0, prompt_tokens=len(prompt), new_tokens=len(new)))  # fmt: skip
            infos.append({"sparsity": 0.5 if sparse else 0.0, "modes": [[0, 1], [1, 1]],
                          "sparse_head_fraction": 0.25 if sparse else 0.0})  # fmt: skip
        return SimpleNamespace(token_ids=ids_out, texts=texts, timings=timings,
                               prefill_info=infos if return_info else None)  # fmt: skip


def fake_load(path, attention_mode, window=4096):
    assert Path(path).is_dir()
    return FakeModel(attention_mode, window)


def never_load(path, **options):
    raise AssertionError("the model must not be loaded when the inputs are invalid")


@pytest.fixture
def model_dir(tmp_path):
    d = tmp_path / "ckpt"
    d.mkdir()
    return d


def run(model_dir, out, tasks="e", gen=None, **kw):
    kw.setdefault("progress", False)
    return run_longbench(model_dir, FIXTURES, tasks, out, load_fn=fake_load,
                         generate_fn=gen or FakeGenerate(), **kw)  # fmt: skip


def strip_wall(path: Path) -> list[dict]:
    """Records without wall_ms, the only field measured with a real clock."""
    return [{k: v for k, v in r.items() if k != "wall_ms"} for r in read_predictions(path)]


# ------------------------------------------------------------------------------------ tasks


def test_vendored_config_is_byte_identical_to_longbench_2e00731f():
    blobs = {  # git blob ids in THUDM/LongBench at 2e00731f (see data/README.md)
        "dataset2prompt.json": "1c85f6bc0f0df4e42131aa49a867797ee7043ecf",
        "dataset2maxlen.json": "79d0d9990e5799c845ebcf839c1ee1a4ff14873e",
    }
    for name, blob in blobs.items():
        data = (DATA / name).read_bytes()
        assert hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest() == blob, name


def test_task_table():
    assert len(ALL_TASKS) == 21 and len(LONGBENCH_E_TASKS) == 13
    assert TASKS["gov_report"].max_new_tokens == 512
    assert TASKS["hotpotqa"].max_new_tokens == 32
    assert "asconcisely" in TASKS["narrativeqa"].prompt_template  # upstream typo kept
    skip = {n for n, t in TASKS.items() if t.skip_chat_template}
    assert skip == {"trec", "triviaqa", "samsum", "lsht", "lcc", "repobench-p"}
    assert [n for n, t in TASKS.items() if t.stop_on_newline] == ["samsum"]
    assert TASKS["samsum"].min_new_tokens == 1 and TASKS["trec"].min_new_tokens == 0
    assert {t.language for t in TASKS.values()} == {"en", "zh", "code"}


def test_resolve_tasks():
    assert [r.key for r in resolve_tasks("all")] == list(ALL_TASKS)
    assert [r.key for r in resolve_tasks("e")] == [f"{t}_e" for t in LONGBENCH_E_TASKS]
    runs = resolve_tasks("hotpotqa, qasper_e,hotpotqa")
    assert [(r.key, r.longbench_e, r.suite) for r in runs] == [
        ("hotpotqa", False, "LongBench"),
        ("qasper_e", True, "LongBench-E"),
    ]
    with pytest.raises(ValueError, match=r"unknown task 'hotpot'.*'all'.*'e'.*narrativeqa"):
        resolve_tasks("hotpot")
    with pytest.raises(ValueError, match=r"LongBench-E has no file for 'narrativeqa'"):
        resolve_tasks(["narrativeqa_e"])
    with pytest.raises(ValueError, match="selects no task"):
        resolve_tasks(" , ")


# ---------------------------------------------------------------------------------- prompts


def test_truncation_keeps_head_and_tail_with_exact_token_counts():
    tok = CharTokenizer()
    prompt = "HEAD" + "m" * 100 + "TAIL"  # 108 chars -> 109 tokens with BOS
    # half = 10: head = decode([BOS] + 9 chars) (BOS counts but is skipped), tail = last 10.
    text, raw, truncated = truncate_middle(prompt, tok, 20)
    assert (raw, truncated) == (109, True)
    assert text == "HEADmmmmm" + "mmmmmmTAIL"
    assert len(tok.encode(text)) == 20
    # odd budget: int(21 / 2) = 10 per side -> 20 tokens, one under the budget (as upstream)
    assert truncate_middle(prompt, tok, 21)[0] == text
    # at the budget nothing happens
    assert truncate_middle(prompt, tok, 109) == (prompt, 109, False)
    assert truncate_middle(prompt, tok, 108)[2] is True
    with pytest.raises(ValueError, match="max_length=1 must be >= 2"):
        truncate_middle(prompt, tok, 1)


def test_truncation_happens_before_the_chat_template():
    tok = CharTokenizer()
    sample = {"_id": "x", "context": "C" * 500, "input": "What?", "answers": ["a"]}
    spec = TASKS["hotpotqa"]
    full = spec.prompt_template.format(**sample)
    p = build_prompt(spec, sample, tok, max_length=100, use_chat_template=True)
    text = tok.decode(p.token_ids)
    assert p.truncated and p.raw_tokens == len(full) + 1 and p.chat_template
    body = full[:49] + full[-50:]  # 50 tokens each side, BOS among the first 50
    assert text == CHAT_PREFIX + body + CHAT_SUFFIX + NO_THINK
    # templated text is tokenized without adding BOS again
    assert len(p.token_ids) == len(CHAT_PREFIX + body + CHAT_SUFFIX + NO_THINK)
    assert body.startswith("Answer the question") and body.endswith("Question: What?\nAnswer:")


@pytest.mark.parametrize("name", ALL_TASKS)
def test_chat_template_skip_rule(name):
    tok = CharTokenizer()
    sample = {"_id": "x", "context": "ctx", "input": "q", "answers": ["a"]}
    spec = TASKS[name]
    raw = spec.prompt_template.format(**sample)
    on = build_prompt(spec, sample, tok, max_length=10_000, use_chat_template=True)
    off = build_prompt(spec, sample, tok, max_length=10_000, use_chat_template=False)
    skip = name in {"trec", "triviaqa", "samsum", "lsht", "lcc", "repobench-p"}
    assert on.chat_template is (not skip)
    if skip:
        assert on.token_ids == [BOS] + tok.encode(raw, add_special_tokens=False)
    else:
        assert tok.decode(on.token_ids) == CHAT_PREFIX + raw + CHAT_SUFFIX + NO_THINK
    assert off.token_ids == tok.encode(raw) and not off.chat_template


def test_thinking_switch_reaches_the_template():
    tok = CharTokenizer()
    sample = {"_id": "x", "context": "c", "input": "q", "answers": ["a"]}
    p = build_prompt(TASKS["qasper"], sample, tok, max_length=9999, enable_thinking=None)
    assert not tok.decode(p.token_ids).endswith(NO_THINK)


def test_stop_tokens():
    tok = CharTokenizer()
    assert stop_token_ids(TASKS["samsum"], tok) == [EOS, ord("\n") + OFFSET]
    assert stop_token_ids(TASKS["trec"], tok) == [EOS]


# ------------------------------------------------------------------------------ data errors


def write(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def good_line(sid: str, **over) -> str:
    d = {"input": "q", "context": "c", "answers": ["a"], "length": 5, "dataset": "hotpotqa",
         "language": "en", "all_classes": None, "_id": sid, **over}  # fmt: skip
    return json.dumps(d)


@pytest.mark.parametrize(
    "lines,match",
    [
        ([good_line("a"), good_line("b"), '{"input": "q", '], r"hotpotqa\.jsonl:3: malformed JSON"),
        ([good_line("a"), "[1, 2]"], r"hotpotqa\.jsonl:2: expected a JSON object"),
        ([json.dumps({"_id": "a"})], r"hotpotqa\.jsonl:1: missing field 'input'"),
        ([good_line("a", answers=[])], r"hotpotqa\.jsonl:1: field 'answers' must be a non-empty"),
        ([good_line("a", length="9")], r"hotpotqa\.jsonl:1: field 'length' must be an int"),
        ([good_line("a"), "", good_line("a")], r"hotpotqa\.jsonl:3: duplicate _id 'a' .*line 1"),
        ([], r"hotpotqa\.jsonl: no samples"),
    ],
)
def test_bad_data_files_name_file_and_line(tmp_path, model_dir, lines, match):
    write(tmp_path / "data" / "hotpotqa.jsonl", lines)
    with pytest.raises(ValueError, match=match):
        run_longbench(model_dir, tmp_path / "data", "hotpotqa", tmp_path / "out",
                      load_fn=never_load, generate_fn=FakeGenerate())  # fmt: skip


def test_classification_needs_all_classes(tmp_path):
    write(tmp_path / "trec.jsonl", [good_line("a")])
    with pytest.raises(ValueError, match=r"trec\.jsonl:1: .*non-empty 'all_classes'"):
        load_task_data(tmp_path, task_from_key("trec"))


def test_bad_arguments_fail_before_loading_the_model(tmp_path, model_dir):
    def go(**kw):
        args = dict(model_or_path=model_dir, data_dir=FIXTURES, tasks="e", out_dir=tmp_path / "o")
        args.update(kw)
        run_longbench(**args, load_fn=never_load, generate_fn=FakeGenerate(), progress=False)

    with pytest.raises(FileNotFoundError, match=r"narrativeqa\.jsonl not found.*THUDM/LongBench"):
        go(tasks="narrativeqa")
    with pytest.raises(ValueError, match=r"unknown task 'bogus'"):
        go(tasks="qasper_e,bogus")
    with pytest.raises(ValueError, match=r"attention mode 'sparse' unknown; allowed: elastic"):
        go(attention_modes=["dense", "sparse"])
    with pytest.raises(ValueError, match="lists a mode twice"):
        go(attention_modes=["dense", "dense"])
    with pytest.raises(ValueError, match="batch_size=0"):
        go(batch_size=0)
    with pytest.raises(ValueError, match="limit=0"):
        go(limit=0)
    with pytest.raises(ValueError, match="max_length=1"):
        go(max_length=1)
    with pytest.raises(FileNotFoundError, match="model path .*nope does not exist"):
        go(model_or_path=tmp_path / "nope")
    with pytest.raises(ValueError, match=r"compare_paper='GPT-5' unknown.*Qwen3-4B"):
        go(compare_paper="GPT-5")
    with pytest.raises(ValueError, match="needs a model path"):
        go(model_or_path=FakeModel(), attention_modes=["dense", "elastic"])
    # a corrupt prediction file is reported before the model loads
    write(
        tmp_path / "o" / "elastic" / "qasper_e.jsonl",
        ['{"_id": "qs0", "pred": "x"}', "{oops", "{}"],
    )
    with pytest.raises(ValueError, match=r"qasper_e\.jsonl:2: malformed JSON line"):
        go()


# ----------------------------------------------------------------------------------- runner


def test_end_to_end_on_fixtures_with_fake_model(tmp_path, model_dir):
    gen = FakeGenerate()
    tasks = "e,multifieldqa_zh,dureader,vcsum,lsht,passage_retrieval_zh"
    results = run(
        model_dir, tmp_path / "out", tasks, gen, max_length=3000, compare_paper="qwen3-4b"
    )
    scores = {
        k: t["score"] for s in results["modes"]["elastic"].values() for k, t in s["tasks"].items()
    }
    expected = dict(TASK_SCORES, hotpotqa_e=39.68)  # elastic answers hq0 wrong: (0+6/7+1/3)/3
    assert scores == expected
    # generation settings per task
    by_id = {c["id"]: c for c in gen.calls}
    assert len(gen.calls) == sum(1 for _ in CASES)
    assert by_id["ss0"]["stop"] == [EOS, ord("\n") + OFFSET] and by_id["ss0"]["min_new_tokens"] == 1
    assert by_id["hq0"]["stop"] == [EOS] and by_id["hq0"]["min_new_tokens"] == 0
    assert by_id["gr0"]["max_new_tokens"] == 512 and by_id["tq0"]["max_new_tokens"] == 32
    assert all(c["greedy"] for c in gen.calls)
    assert CharTokenizer().decode(by_id["hq0"]["prompt"]).startswith(CHAT_PREFIX)
    assert by_id["tr0"]["prompt"][0] == BOS  # trec: raw prompt, tokenizer's BOS
    # samsum stopped at "\n" (kept, like HF generate) but not at the leading one (min 1 token)
    recs = {r["_id"]: r for r in read_predictions(tmp_path / "out" / "elastic" / "samsum_e.jsonl")}
    assert recs["ss0"]["pred"] == "Anna will bring the cake.\n"
    assert recs["ss1"]["pred"] == "\nTom is late"
    rec = read_predictions(tmp_path / "out" / "elastic" / "hotpotqa_e.jsonl")[0]
    # scalars of prefill_info are kept, per-head tables dropped
    assert rec["sparsity"] == 0.5
    assert rec["prefill_info"] == {"sparsity": 0.5, "sparse_head_fraction": 0.25}
    assert rec["prefill_ms"] == rec["prompt_tokens"] / 2 and not rec["truncated"]
    assert set(rec) >= {"_id", "pred", "answers", "all_classes", "length", "decode_ms", "wall_ms"}
    cfg = json.loads((tmp_path / "out" / "elastic" / "run_config.json").read_text())
    assert cfg["max_length"] == 3000 and cfg["attention_mode"] == "elastic"
    # report files
    assert (tmp_path / "out" / "results.json").exists()
    md = (tmp_path / "out" / "results.md").read_text()
    assert "## elastic — LongBench-E" in md and "## elastic — LongBench" in md
    assert "Ours vs paper (Qwen3-4B, LongBench-E)" in md


def test_resume_after_crash_gives_the_same_file_without_duplicates(tmp_path, model_dir):
    tasks = "hotpotqa_e,trec_e,lcc_e"
    run(model_dir, tmp_path / "ref", tasks, batch_size=2)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(model_dir, tmp_path / "out", tasks, FakeGenerate(fail_after=4), batch_size=2)
    done = tmp_path / "out" / "elastic"
    # hotpotqa (3 samples) finished, trec got its first batch of 2 before the crash
    assert [r["_id"] for r in read_predictions(done / "trec_e.jsonl")] == ["tr0", "tr1"]
    assert not (done / "lcc_e.jsonl").exists()
    # a torn last write (process killed mid-line) is dropped and regenerated
    with (done / "trec_e.jsonl").open("a") as f:
        f.write('{"_id": "tr2", "pred": "oth')
    gen = FakeGenerate()
    with pytest.warns(RuntimeWarning, match="incomplete last line"):
        run(model_dir, tmp_path / "out", tasks, gen, batch_size=2)
    assert [c["id"] for c in gen.calls] == ["tr2", "lc0", "lc1", "lc2"]
    for key in ("hotpotqa_e", "trec_e", "lcc_e"):
        assert strip_wall(done / f"{key}.jsonl") == strip_wall(
            tmp_path / "ref" / "elastic" / f"{key}.jsonl"
        )
    ref = json.loads((tmp_path / "ref" / "results.json").read_text())
    out = json.loads((tmp_path / "out" / "results.json").read_text())
    assert scores(out) == scores(ref)
    assert {k: v[0] for k, v in scores(out).items()} == {
        "hotpotqa_e": 39.68,
        "trec_e": 66.67,
        "lcc_e": 44.33,
    }
    totals = {k: v[1] for k, v in scores(out).items()}
    assert totals == pytest.approx({"hotpotqa_e": 6 / 7 + 1 / 3, "trec_e": 2.0, "lcc_e": 1.33})
    # a third run has nothing left to do
    gen = FakeGenerate()
    run(model_dir, tmp_path / "out", tasks, gen)
    assert gen.calls == []


def scores(results: dict) -> dict:
    """task -> (score, unrounded total) of the elastic mode, timing fields left out."""
    suite = results["modes"]["elastic"]["LongBench-E"]["tasks"]
    return {k: (t["score"], t["total"]) for k, t in suite.items()}


def test_resume_refuses_changed_settings(tmp_path, model_dir):
    run(model_dir, tmp_path / "out", "qasper_e", max_length=3000)
    with pytest.raises(
        ValueError, match=r"made with max_length=3000, this run has max_length=2000"
    ):
        run(model_dir, tmp_path / "out", "qasper_e", max_length=2000)
    with pytest.raises(
        ValueError, match=r"use_chat_template=True, this run has use_chat_template=False"
    ):
        run(model_dir, tmp_path / "out", "qasper_e", max_length=3000, use_chat_template=False)


def test_resume_refuses_predictions_for_other_data(tmp_path, model_dir):
    write(tmp_path / "out" / "elastic" / "qasper_e.jsonl", ['{"_id": "zz9", "pred": "x"}'])
    with pytest.raises(ValueError, match="_id 'zz9' which is not in the data file"):
        run(model_dir, tmp_path / "out", "qasper_e")


def test_limit_and_default_max_length(tmp_path, model_dir):
    gen = FakeGenerate()
    run(model_dir, tmp_path / "out", "hotpotqa_e,passage_count_e", gen, limit=2)
    assert [c["id"] for c in gen.calls] == ["hq0", "hq1", "pc0", "pc1"]
    cfg = json.loads((tmp_path / "out" / "elastic" / "run_config.json").read_text())
    assert cfg["max_length"] == 4096 - 1024  # from the model's max_position_embeddings
    # raising the limit continues where the first run stopped
    gen = FakeGenerate()
    run(model_dir, tmp_path / "out", "hotpotqa_e,passage_count_e", gen)
    assert [c["id"] for c in gen.calls] == ["hq2", "pc2"]


def test_prompts_are_truncated_to_max_length(tmp_path, model_dir):
    context = "[x1] " + "y = 0\n" * 50  # the lcc template puts 39 chars before the context
    write(tmp_path / "data" / "lcc.jsonl", [good_line("x1", context=context, answers=["y = 1"])])
    gen = FakeGenerate(extra={"x1": "y = 1"})
    run_longbench(model_dir, tmp_path / "data", "lcc", tmp_path / "out", max_length=100,
                  load_fn=fake_load, generate_fn=gen, progress=False)  # fmt: skip
    (rec,) = read_predictions(tmp_path / "out" / "elastic" / "lcc.jsonl")
    raw = TASKS["lcc"].prompt_template.format(context=context, input="")
    # raw prompt (lcc skips the chat template): BOS + 49 head chars + 50 tail chars
    assert rec["truncated"] and rec["raw_prompt_tokens"] == len(raw) + 1
    assert rec["prompt_tokens"] == 100 and len(gen.calls[0]["prompt"]) == 100
    assert CharTokenizer().decode(gen.calls[0]["prompt"]) == raw[:49] + raw[-50:]
    assert rec["pred"] == "y = 1"


def test_loaded_model_object_and_progress_output(tmp_path, capsys):
    gen = FakeGenerate()
    run_longbench(FakeModel("dense"), FIXTURES, "passage_count_e", tmp_path / "out",
                  attention_modes="dense", generate_fn=gen, progress=True)  # fmt: skip
    err = capsys.readouterr().err
    assert "[dense] passage_count_e: 50.00 (3 samples)" in err
    assert (tmp_path / "out" / "dense" / "passage_count_e.jsonl").exists()


def test_model_capacity_tokenizer_and_nan_timings(tmp_path, model_dir):
    # FakeModel holds 4096 tokens: 4000 + gov_report's 512 new tokens do not fit
    # chat template of an empty turn: 17 + 33 + 19 = 69 chars (+ 16 margin)
    msg = r"max_length=3500 \+ max_new_tokens=512 \+ 69 template tokens \+ 16 margin = 4097"
    with pytest.raises(ValueError, match=msg + r" exceeds the model's capacity of 4096"):
        run(model_dir, tmp_path / "o", "qasper_e,gov_report_e", max_length=3500)
    opts = {"window": 4097}
    run(model_dir, tmp_path / "ok", "qasper_e,gov_report_e", max_length=3500, model_options=opts)
    with pytest.raises(ValueError, match=r"max_length=4000 \+ max_new_tokens=512 .* exceeds"):
        run(model_dir, tmp_path / "o", "qasper_e,gov_report_e", max_length=4000)
    assert not (tmp_path / "o" / "elastic" / "qasper_e.jsonl").exists()
    no_tok = FakeModel()
    no_tok.tokenizer = None
    with pytest.raises(ValueError, match="no tokenizer"):
        run_longbench(no_tok, FIXTURES, "qasper_e", tmp_path / "o2", generate_fn=FakeGenerate(),
                      progress=False)  # fmt: skip

    class NanGenerate(FakeGenerate):
        def __call__(self, *args, **kwargs):
            res = super().__call__(*args, **kwargs)
            res.timings = [SimpleNamespace(**{**vars(t), "decode_tokens_per_s": float("nan")})
                           for t in res.timings]  # fmt: skip
            return res

    run(model_dir, tmp_path / "o3", "qasper_e", NanGenerate())
    text = (tmp_path / "o3" / "elastic" / "qasper_e.jsonl").read_text()
    recs = [json.loads(line, parse_constant=pytest.fail) for line in text.splitlines()]
    assert [r["decode_tokens_per_s"] for r in recs] == [None, None]


# ----------------------------------------------------------------------------------- report


def test_dense_vs_elastic_report(tmp_path, model_dir):
    results = run(model_dir, tmp_path / "out", "e", attention_modes=["elastic", "dense"],
                  max_length=3000, compare_paper="Qwen3-4B")  # fmt: skip
    assert list(results["modes"]) == ["dense", "elastic"]
    dense = results["modes"]["dense"]["LongBench-E"]
    # 13-task macro mean of the hand-computed scores: 768.06 / 13 = 59.0815
    assert dense["complete"] and dense["macro_mean"] == 59.08
    # sample-weighted: 28 samples, sum of per-sample scores 16.46333331 -> 58.797619
    assert dense["n_samples"] == 28 and dense["sample_weighted_mean"] == 58.8
    assert dense["categories"]["Single-Document QA"] == round((50.0 + 66.67) / 2, 2)
    assert dense["categories"]["Few-shot Learning"] == round((66.67 + 83.33 + 78.57) / 3, 2)
    cmp = results["comparison"]["suites"]["LongBench-E"]["elastic"]
    assert results["comparison"]["baseline"] == "dense"
    assert cmp["tasks"]["hotpotqa_e"] == pytest.approx(
        {"baseline": 73.02, "score": 39.68, "delta": -33.34, "sparsity": 0.5, "prefill_speedup": 2.0,
         "samples_per_min": cmp["tasks"]["hotpotqa_e"]["samples_per_min"],
         "baseline_samples_per_min": cmp["tasks"]["hotpotqa_e"]["baseline_samples_per_min"]})  # fmt: skip
    assert cmp["tasks"]["qasper_e"]["delta"] == 0.0
    # elastic: (768.06 - 73.02 + 39.68) / 13 = 56.517 -> 56.52; 56.52 - 59.08
    assert cmp["macro_mean"] == 56.52 and cmp["delta_macro_mean"] == -2.56
    paper = results["paper"]
    assert paper["rows"] == {"dense": "dense", "elastic": "EA (FA-SSA)"}
    assert paper["tasks"]["qasper"] == {"label": "Qasper", "ours": {"dense": 50.0, "elastic": 50.0},
                                        "paper": {"dense": 35.21, "elastic": 35.27}}  # fmt: skip
    assert paper["categories"]["S-Doc"]["paper_msr"]["elastic"] == 0.66
    assert paper["categories"]["S-Doc"]["ours_msr"] == {"dense": 0.0, "elastic": 0.25}
    assert paper["avg"]["dense"]["paper"] == 48.45
    md = (tmp_path / "out" / "results.md").read_text()
    assert "## elastic vs dense — LongBench-E" in md
    assert "| hotpotqa_e | 73.02 | 39.68 | -33.34 | 0.500 | 2.00 |" in md
    assert "| Qasper | 50.00 | 35.21 | 14.79 | 50.00 | 35.27 | 14.73 |" in md
    assert "| 2wikimqa_e | Multi-Document QA | 1 | 57.14 | — | — | 57.14 |" in md
    assert "Mean over the 13 tasks: **59.08**" in md
    assert "| Category | ours dense | paper dense | Δ |" in md
    assert "| S-Doc | 0.00 / 0.00 / — | 0.50 / 0.25 / 0.66 |" in md


def test_report_on_partial_results_and_paper_rows(tmp_path, model_dir):
    run(model_dir, tmp_path / "out", "qasper_e,trec_e", attention_modes="elastic")
    res = R.write_report(
        tmp_path / "out", compare_paper="Llama-3.1-8B-Instruct", elastic_row="EA (FA-XA)"
    )
    s = res["modes"]["elastic"]["LongBench-E"]
    assert not s["complete"] and s["n_tasks"] == 2 and "hotpotqa" in s["missing"]
    assert s["macro_mean"] == round((50.0 + 66.67) / 2, 2)
    assert res["paper"]["tasks"]["trec"]["paper"] == {"elastic": 71.67}
    assert res["paper"]["tasks"]["hotpotqa"]["ours"] == {"elastic": None}
    md = (tmp_path / "out" / "results.md").read_text()
    assert "Mean over 2 of 13 tasks (missing: multifieldqa_en, hotpotqa" in md
    with pytest.raises(ValueError, match="elastic_row='EA' unknown"):
        R.write_report(tmp_path / "out", compare_paper="Qwen3-8B", elastic_row="EA")


def test_report_needs_predictions(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        R.write_report(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no prediction files"):
        R.write_report(tmp_path / "empty")


def test_paper_numbers_are_internally_consistent():
    paper = json.loads((DATA / "paper_results.json").read_text())
    # category Perf. = mean of its Table 7 tasks, up to the paper's rounding; the rows the
    # paper itself gets wrong are listed in the file's notes.
    known = {("Qwen3-4B", "MoBA", "S-Doc"), ("Qwen3-4B", "NSA", "S-Doc")}
    for model, t in paper["models"].items():
        assert list(t["tasks"]) == list(t["categories"]) == list(t["avg"])
        for method, tasks in t["tasks"].items():
            assert list(tasks) == paper["task_columns"] == [
                "multifieldqa_en", "qasper", "hotpotqa", "2wikimqa", "gov_report", "multi_news",
                "trec", "triviaqa", "samsum", "passage_count", "passage_retrieval_en", "lcc",
                "repobench-p"]  # fmt: skip
            for cat, members in paper["categories"].items():
                mean = sum(tasks[m] for m in members) / len(members)
                if (model, method, cat) not in known:
                    assert abs(mean - t["categories"][method][cat]) <= 0.021, (model, method, cat)
            # the paper's Avg. sits 0.05-0.5 above the 13-task mean in every row
            assert 0.05 <= t["avg"][method] - sum(tasks.values()) / 13 <= 0.5, (model, method)
    assert paper["models"]["Qwen3-4B"]["tasks"]["dense"]["multifieldqa_en"] == 52.16
    assert paper["models"]["Llama-3.1-8B-Instruct"]["tasks"]["EA (FA-SSA)"]["triviaqa"] == 91.7


# -------------------------------------------------------------------------------------- CLI


def test_cli(tmp_path, model_dir, capsys):
    assert main(["tasks"]) == 0
    assert (
        "| repobench-p | Code Completion | code | code_sim | 64 | no | yes |"
        in capsys.readouterr().out
    )
    code = main(["run", "--model", str(model_dir), "--data-dir", str(FIXTURES), "--tasks", "bogus",
                 "--out-dir", str(tmp_path / "o")])  # fmt: skip
    assert code == 2 and "error: unknown task 'bogus'" in capsys.readouterr().err
    code = main(["run", "--model", str(model_dir), "--data-dir", str(tmp_path), "--tasks", "qasper_e",
                 "--out-dir", str(tmp_path / "o"), "--attention-mode", "dense,elastic"])  # fmt: skip
    assert code == 2 and "qasper_e.jsonl not found" in capsys.readouterr().err
    run(model_dir, tmp_path / "out", "passage_count_e", attention_modes=["dense", "elastic"])
    assert main(["report", str(tmp_path / "out"), "--compare-paper", "Qwen3-8B"]) == 0
    out = capsys.readouterr().out
    assert "## elastic vs dense — LongBench-E" in out and "Ours vs paper (Qwen3-8B" in out
    assert "| PCount | 50.00 | 2.00 | 48.00 | 50.00 | 0.00 | 50.00 |" in out


def test_cli_parses_modes_and_model_options(tmp_path, monkeypatch, model_dir):
    seen = {}

    def fake_run(*args, **kwargs):
        seen.update(kwargs, args=args)
        return {"modes": {}}

    monkeypatch.setattr("elastic_jax.longbench.__main__.run_longbench", fake_run)
    assert main(["run", "--model", "m", "--data-dir", "d", "--out-dir", "o", "--attention-mode",
                 "dense,elastic", "--attention-mode", "xattn", "--model-option", "dtype=bfloat16",
                 "--model-option", "page_size=128", "--limit", "5", "--thinking"]) == 0  # fmt: skip
    assert seen["args"] == ("m", "d", "e", "o")
    assert seen["attention_modes"] == ["dense", "elastic", "xattn"]
    assert seen["model_options"] == {"dtype": "bfloat16", "page_size": 128}
    assert seen["limit"] == 5 and seen["enable_thinking"] is True and seen["max_length"] is None


def test_synthetic_long_context_data(tmp_path, capsys):
    tok = CharTokenizer()
    paths = make_synthetic_data(tmp_path / "syn", tasks="e", lengths=(2000, 5000), per_length=2,
                                tokenizer=tok)  # fmt: skip
    assert sorted(p.name for p in paths) == sorted(f"{t}_e.jsonl" for t in LONGBENCH_E_TASKS)
    for run_ in resolve_tasks("e"):
        samples = load_task_data(tmp_path / "syn", run_)  # official format, validated
        assert len(samples) == 4
        for s, target in zip(samples, (2000, 2000, 5000, 5000)):
            n = len(tok.encode(run_.spec.prompt_template.format(**s), add_special_tokens=False))
            # within 1% or half a filler sentence (up to ~16 words of ~8 chars)
            assert abs(n - target) <= max(target // 100, 70), (run_.key, n, target)
    # deterministic for a seed
    (again,) = make_synthetic_data(tmp_path / "syn2", tasks="trec_e", lengths=(2000, 5000),
                                   per_length=2, tokenizer=tok)  # fmt: skip
    assert again.read_text() == (tmp_path / "syn" / "trec_e.jsonl").read_text()
    # CLI, lengths in whitespace words without a tokenizer
    assert main(["synthetic", "--out-dir", str(tmp_path / "w"), "--tasks", "qasper_e",
                 "--lengths", "200,400", "--per-length", "1"]) == 0  # fmt: skip
    assert "wrote 1 files" in capsys.readouterr().out
    samples = load_task_data(tmp_path / "w", task_from_key("qasper_e"))
    words = [len(TASKS["qasper"].prompt_template.format(**s).split()) for s in samples]
    assert abs(words[0] - 200) <= 8 and abs(words[1] - 400) <= 8
    with pytest.raises(ValueError, match="lengths"):
        make_synthetic_data(tmp_path / "bad", lengths=(10,))
    with pytest.raises(ValueError, match="shorter than qasper's prompt template"):
        make_synthetic_data(tmp_path / "bad", tasks="qasper_e", lengths=(100,), tokenizer=tok)
