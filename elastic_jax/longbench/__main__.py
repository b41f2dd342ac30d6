"""`python -m elastic_jax.longbench {run,report,tasks,synthetic}`: LongBench from the shell.

run        generate predictions for a model (one or several attention modes), write the report
report     (re)score an output dir; optionally put the numbers beside the paper's
tasks      print the task table (category, metric, generation length, chat template)
synthetic  write LongBench-format files with prompts of chosen token lengths (throughput runs)
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from elastic_jax.tokenizer import Tokenizer

from .report import DEFAULT_ELASTIC_PAPER_ROW, render_markdown, write_report
from .runner import ATTENTION_MODES, run_longbench
from .synthetic import make_synthetic_data
from .tasks import ALL_TASKS, LONGBENCH_E_TASKS, TASKS


def _model_option(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--model-option {text!r}: expected KEY=VALUE")
    key, value = text.split("=", 1)
    try:
        return key, json.loads(value)  # numbers, booleans, null, lists
    except json.JSONDecodeError:
        return key, value


def _modes(values: list[str] | None) -> list[str]:
    modes = [m.strip() for v in (values or ["elastic"]) for m in v.split(",") if m.strip()]
    return modes


def _add_paper_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--compare-paper",
        metavar="MODEL",
        help="put our numbers beside the paper's for MODEL (Qwen3-4B, Qwen3-8B, "
        "Llama-3.1-8B-Instruct)",
    )
    p.add_argument(
        "--paper-elastic-row",
        default=DEFAULT_ELASTIC_PAPER_ROW,
        help="paper row our 'elastic' mode is compared with (default: %(default)s; also "
        "'EA (FA-XA)', 'EA (XA-SSA)')",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m elastic_jax.longbench",
        description="LongBench / LongBench-E evaluation (official THUDM/LongBench protocol)",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="generate predictions and write the report")
    run.add_argument("--model", required=True, help="converted checkpoint dir (load_model path)")
    run.add_argument("--data-dir", required=True, help="folder with the LongBench *.jsonl files")
    run.add_argument(
        "--tasks",
        default="e",
        help="'all' (21 LongBench tasks), 'e' (13 LongBench-E tasks, files <task>_e.jsonl; "
        "default), or a comma list such as 'hotpotqa,qasper_e'",
    )
    run.add_argument("--out-dir", required=True, help="predictions go to OUT/<mode>/<task>.jsonl")
    run.add_argument(
        "--max-length",
        type=int,
        default=None,
        help="prompt budget in tokens before the chat template (middle truncation); default: "
        "the model's max_position_embeddings - 1024 (Llama-3.1: at most 120000, LongBench's "
        "model2maxlen)",
    )
    run.add_argument(
        "--attention-mode",
        action="append",
        metavar="MODE[,MODE]",
        help=f"one of {', '.join(ATTENTION_MODES)}; repeat or comma-separate to compare "
        "(e.g. dense,elastic); default elastic",
    )
    run.add_argument(
        "--batch-size",
        type=int,
        default=1,
        help="decode slots of the serving engine (requests decoded together)",
    )
    run.add_argument("--limit", type=int, default=None, help="first N samples of each task")
    run.add_argument(
        "--no-chat-template",
        action="store_true",
        help="feed every prompt raw (for base models)",
    )
    run.add_argument(
        "--thinking",
        action="store_true",
        help="Qwen3 thinking mode in the chat template (default: non-thinking)",
    )
    run.add_argument(
        "--model-option",
        type=_model_option,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra load_model option (VALUE parsed as JSON when possible); repeatable",
    )
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_paper_args(run)

    rep = sub.add_parser("report", help="score an output dir and print the tables")
    rep.add_argument("out_dir", help="the --out-dir of a run")
    _add_paper_args(rep)

    sub.add_parser("tasks", help="print the task table")

    syn = sub.add_parser(
        "synthetic", help="write LongBench-format files with prompts of chosen token lengths"
    )
    syn.add_argument("--out-dir", required=True, help="data dir to write <task>_e.jsonl into")
    syn.add_argument("--tasks", default="e", help="as for run (default: e)")
    syn.add_argument(
        "--lengths",
        default="8192,16384,32768",
        help="comma list of prompt lengths in tokens (default: %(default)s)",
    )
    syn.add_argument("--per-length", type=int, default=2, help="samples per task and length")
    syn.add_argument(
        "--tokenizer",
        metavar="CKPT_DIR",
        help="checkpoint dir whose tokenizer.json measures lengths (default: whitespace words)",
    )
    syn.add_argument("--seed", type=int, default=0)
    return parser


def _synthetic(args: argparse.Namespace) -> int:
    try:
        lengths = [int(x) for x in args.lengths.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--lengths {args.lengths!r}: expected a comma list of ints") from None
    tokenizer = None
    if args.tokenizer:
        tokenizer = Tokenizer(args.tokenizer)
    paths = make_synthetic_data(
        args.out_dir,
        tasks=args.tasks,
        lengths=lengths,
        per_length=args.per_length,
        tokenizer=tokenizer,
        seed=args.seed,
    )
    print(f"wrote {len(paths)} files to {args.out_dir}")
    return 0


def _print_tasks() -> None:
    print("| Task | Category | Lang | Metric | Max new tokens | Chat template | LongBench-E |")
    print("|---|---|---|---|---|---|---|")
    for name in ALL_TASKS:
        t = TASKS[name]
        print(
            f"| {name} | {t.category} | {t.language} | {t.metric} | {t.max_new_tokens} | "
            f"{'no' if t.skip_chat_template else 'yes'} | "
            f"{'yes' if name in LONGBENCH_E_TASKS else 'no'} |"
        )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "tasks":
            _print_tasks()
            return 0
        if args.command == "synthetic":
            return _synthetic(args)
        if args.command == "run":
            results = run_longbench(
                args.model,
                args.data_dir,
                args.tasks,
                args.out_dir,
                attention_modes=_modes(args.attention_mode),
                max_length=args.max_length,
                batch_size=args.batch_size,
                limit=args.limit,
                use_chat_template=not args.no_chat_template,
                enable_thinking=True if args.thinking else False,
                model_options=dict(args.model_option),
                progress=not args.no_progress,
                compare_paper=args.compare_paper,
                paper_elastic_row=args.paper_elastic_row,
            )
        else:
            results = write_report(
                args.out_dir,
                compare_paper=args.compare_paper,
                elastic_row=args.paper_elastic_row,
            )
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(render_markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
