"""The LongBench v1 / LongBench-E task table and task-list resolution.

Everything here follows THUDM/LongBench at commit 2e00731f (`LongBench/pred.py`, `eval.py`,
`config/*.json`); the prompt templates and generation lengths are read from the vendored JSON
files in `data/` (see data/README.md), never re-typed.
"""

from __future__ import annotations

import dataclasses
import json
import types
from collections.abc import Mapping
from importlib import resources

# Official LongBench category names (LongBench/README.md), and the paper's short labels
# (Elastic Attention, Tables 1/7/8) for the same groups.
CATEGORIES: tuple[str, ...] = (
    "Single-Document QA",
    "Multi-Document QA",
    "Summarization",
    "Few-shot Learning",
    "Synthetic Task",
    "Code Completion",
)
PAPER_CATEGORY_LABELS: Mapping[str, str] = types.MappingProxyType(
    {
        "Single-Document QA": "S-Doc",
        "Multi-Document QA": "M-Doc",
        "Summarization": "Summ",
        "Few-shot Learning": "In-Ctx",
        "Synthetic Task": "Synth",
        "Code Completion": "Code",
    }
)

METRIC_NAMES: tuple[str, ...] = (
    "qa_f1",
    "qa_f1_zh",
    "rouge",
    "rouge_zh",
    "classification",
    "retrieval",
    "retrieval_zh",
    "count",
    "code_sim",
)


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """One LongBench task and everything the official protocol does differently for it.

    Attributes:
      name: dataset key, e.g. "hotpotqa" (the LongBench-E file is `<name>_e.jsonl`).
      category: one of CATEGORIES.
      language: "en", "zh" or "code".
      metric: one of METRIC_NAMES (eval.py `dataset2metric`).
      max_new_tokens: generation length (config/dataset2maxlen.json).
      prompt_template: `str.format` template with {context} / {input} (config/dataset2prompt.json).
      skip_chat_template: pred.py feeds these prompts raw ("chat models are better off without
        build prompts on these tasks"): few-shot and code tasks.
      first_line_only: eval.py keeps only the first line (after stripping leading "\\n") before
        scoring: trec, triviaqa, samsum, lsht.
      stop_on_newline: pred.py adds the "\\n" token to the stop set for samsum (and forces at
        least one new token, `min_new_tokens=1`).
      in_longbench_e: one of the 13 tasks with a LongBench-E file (pred.py `--e` list).
      paper_label: column name in the Elastic Attention paper's Table 7 (None if not reported).
    """

    name: str
    category: str
    language: str
    metric: str
    max_new_tokens: int
    prompt_template: str
    skip_chat_template: bool
    first_line_only: bool
    stop_on_newline: bool
    in_longbench_e: bool
    paper_label: str | None

    @property
    def min_new_tokens(self) -> int:
        # pred.py: samsum uses min_length=context_length+1, i.e. at least one new token.
        return 1 if self.stop_on_newline else 0


# (name, category, language, metric, paper label or None). Order = pred.py's v1 list.
_TABLE: tuple[tuple[str, str, str, str, str | None], ...] = (
    ("narrativeqa", "Single-Document QA", "en", "qa_f1", None),
    ("qasper", "Single-Document QA", "en", "qa_f1", "Qasper"),
    ("multifieldqa_en", "Single-Document QA", "en", "qa_f1", "MF-en"),
    ("multifieldqa_zh", "Single-Document QA", "zh", "qa_f1_zh", None),
    ("hotpotqa", "Multi-Document QA", "en", "qa_f1", "HotpotQA"),
    ("2wikimqa", "Multi-Document QA", "en", "qa_f1", "2WikiMQA"),
    ("musique", "Multi-Document QA", "en", "qa_f1", None),
    ("dureader", "Multi-Document QA", "zh", "rouge_zh", None),
    ("gov_report", "Summarization", "en", "rouge", "GovReport"),
    ("qmsum", "Summarization", "en", "rouge", None),
    ("multi_news", "Summarization", "en", "rouge", "MultiNews"),
    ("vcsum", "Summarization", "zh", "rouge_zh", None),
    ("trec", "Few-shot Learning", "en", "classification", "TREC"),
    ("triviaqa", "Few-shot Learning", "en", "qa_f1", "TriviaQA"),
    ("samsum", "Few-shot Learning", "en", "rouge", "SAMSum"),
    ("lsht", "Few-shot Learning", "zh", "classification", None),
    ("passage_count", "Synthetic Task", "en", "count", "PCount"),
    ("passage_retrieval_en", "Synthetic Task", "en", "retrieval", "PRe"),
    ("passage_retrieval_zh", "Synthetic Task", "zh", "retrieval_zh", None),
    ("lcc", "Code Completion", "code", "code_sim", "Lcc"),
    ("repobench-p", "Code Completion", "code", "code_sim", "RB-P"),
)

# pred.py: `if dataset not in [...]: prompt = build_chat(...)`.
_SKIP_CHAT = frozenset({"trec", "triviaqa", "samsum", "lsht", "lcc", "repobench-p"})
# eval.py: `if dataset in [...]: prediction = prediction.lstrip('\n').split('\n')[0]`.
_FIRST_LINE = frozenset({"trec", "triviaqa", "samsum", "lsht"})

# pred.py `--e` list, in its order (also the paper's 13 LongBench-E tasks).
LONGBENCH_E_TASKS: tuple[str, ...] = (
    "qasper",
    "multifieldqa_en",
    "hotpotqa",
    "2wikimqa",
    "gov_report",
    "multi_news",
    "trec",
    "triviaqa",
    "samsum",
    "passage_count",
    "passage_retrieval_en",
    "lcc",
    "repobench-p",
)
# Column order of the paper's Table 7.
PAPER_TASK_ORDER: tuple[str, ...] = (
    "multifieldqa_en",
    "qasper",
    "hotpotqa",
    "2wikimqa",
    "gov_report",
    "multi_news",
    "trec",
    "triviaqa",
    "samsum",
    "passage_count",
    "passage_retrieval_en",
    "lcc",
    "repobench-p",
)


def _load_json(name: str) -> dict:
    with (
        resources.files(__package__)
        .joinpath("data")
        .joinpath(name)
        .open("r", encoding="utf-8") as f
    ):
        return json.load(f)


def _build_tasks() -> Mapping[str, TaskSpec]:
    prompts = _load_json("dataset2prompt.json")
    maxlen = _load_json("dataset2maxlen.json")
    names = [row[0] for row in _TABLE]
    if set(prompts) != set(names) or set(maxlen) != set(names):
        raise RuntimeError(
            "vendored LongBench config does not match the task table: "
            f"prompts={sorted(prompts)}, maxlen={sorted(maxlen)}, table={sorted(names)}"
        )
    tasks = {}
    for name, category, language, metric, label in _TABLE:
        tasks[name] = TaskSpec(
            name=name,
            category=category,
            language=language,
            metric=metric,
            max_new_tokens=int(maxlen[name]),
            prompt_template=prompts[name],
            skip_chat_template=name in _SKIP_CHAT,
            first_line_only=name in _FIRST_LINE,
            stop_on_newline=name == "samsum",
            in_longbench_e=name in LONGBENCH_E_TASKS,
            paper_label=label,
        )
    return types.MappingProxyType(tasks)


TASKS: Mapping[str, TaskSpec] = _build_tasks()
ALL_TASKS: tuple[str, ...] = tuple(TASKS)


@dataclasses.dataclass(frozen=True)
class TaskRun:
    """One data file to evaluate: a task and whether it is its LongBench-E variant.

    `key` names both the data file (`<data_dir>/<key>.jsonl`) and the prediction file
    (`<out_dir>/<mode>/<key>.jsonl`): "hotpotqa" or "hotpotqa_e".
    """

    spec: TaskSpec
    longbench_e: bool

    @property
    def key(self) -> str:
        return f"{self.spec.name}_e" if self.longbench_e else self.spec.name

    @property
    def suite(self) -> str:
        return "LongBench-E" if self.longbench_e else "LongBench"


def task_from_key(key: str) -> TaskRun:
    """ "hotpotqa" -> LongBench v1 hotpotqa; "hotpotqa_e" -> its LongBench-E file."""
    if key in TASKS:
        return TaskRun(TASKS[key], longbench_e=False)
    if key.endswith("_e") and key[:-2] in TASKS:
        spec = TASKS[key[:-2]]
        if not spec.in_longbench_e:
            raise ValueError(
                f"task {key!r}: LongBench-E has no file for {spec.name!r}; "
                f"LongBench-E tasks are {', '.join(LONGBENCH_E_TASKS)}"
            )
        return TaskRun(spec, longbench_e=True)
    raise ValueError(
        f"unknown task {key!r}; allowed: 'all' (21 LongBench tasks), 'e' (13 LongBench-E tasks), "
        f"or a comma list of task names, each optionally with the suffix '_e' for its "
        f"LongBench-E file. Task names: {', '.join(ALL_TASKS)}"
    )


def resolve_tasks(tasks: str | list[str] | tuple[str, ...]) -> list[TaskRun]:
    """Turn a task selection into an ordered, duplicate-free list of TaskRun.

    Args:
      tasks: "all" (21 v1 tasks, files `<task>.jsonl`), "e" (the 13 LongBench-E tasks, files
        `<task>_e.jsonl`), a comma-separated string, or a list of task keys ("qasper",
        "qasper_e", ...). "all" and "e" may also appear inside a list.
    """
    if isinstance(tasks, str):
        items = [t.strip() for t in tasks.split(",")]
    else:
        items = [str(t).strip() for t in tasks]
    items = [t for t in items if t]
    if not items:
        raise ValueError(f"tasks={tasks!r} selects no task; use 'all', 'e' or a comma list")
    runs: list[TaskRun] = []
    for item in items:
        if item == "all":
            runs.extend(TaskRun(TASKS[n], longbench_e=False) for n in ALL_TASKS)
        elif item == "e":
            runs.extend(TaskRun(TASKS[n], longbench_e=True) for n in LONGBENCH_E_TASKS)
        else:
            runs.append(task_from_key(item))
    seen: set[str] = set()
    unique = []
    for run in runs:
        if run.key not in seen:
            seen.add(run.key)
            unique.append(run)
    return unique
