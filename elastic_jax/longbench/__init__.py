"""LongBench v1 / LongBench-E evaluation harness (official THUDM/LongBench protocol).

    from elastic_jax.longbench import run_longbench
    run_longbench("ckpt/", "LongBench/data", "e", "runs/lb", attention_modes=("dense", "elastic"))

CLI: `python -m elastic_jax.longbench run|report|tasks --help`; see docs/longbench.md.
"""

from .metrics import METRICS, score_sample
from .prompts import build_prompt, truncate_middle
from .report import build_results, collect_results, render_markdown, write_report
from .runner import ATTENTION_MODES, run_longbench
from .tasks import ALL_TASKS, LONGBENCH_E_TASKS, TASKS, TaskSpec, resolve_tasks

__all__ = [
    "ALL_TASKS",
    "ATTENTION_MODES",
    "LONGBENCH_E_TASKS",
    "METRICS",
    "TASKS",
    "TaskSpec",
    "build_prompt",
    "build_results",
    "collect_results",
    "render_markdown",
    "resolve_tasks",
    "run_longbench",
    "score_sample",
    "truncate_middle",
    "write_report",
]
