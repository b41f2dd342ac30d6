"""The LongBench evaluation loop: prompts -> the serving engine -> one jsonl of predictions per task.

By default every task's prompts go through one ``elastic_jax.serving.Engine`` per attention mode
with ``batch_size`` decode slots (continuous batching: a finished sample's slot takes the next
prompt at once). With a custom ``generate_fn`` the prompts go to it in batches of ``batch_size``.
Predictions are appended to `<out_dir>/<mode>/<task>.jsonl` as they are produced (flushed and
fsync'ed per record, in completion order), so an interrupted run loses at most the samples in
flight; a restart skips the `_id`s already in the file. The model is only touched through `load_model`-like and
`generate`-like callables (the Protocols below), so tests can drive the loop with a fake model.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import math
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from elastic_jax.loader import load_model
from elastic_jax.serving import Engine

from . import report
from .dataset import load_task_data, read_predictions
from .model_rules import official_max_length
from .prompts import Tokenizer, build_prompt, stop_token_ids
from .tasks import TaskRun, resolve_tasks

ATTENTION_MODES: tuple[str, ...] = ("elastic", "dense", "streaming", "xattn")
RUN_CONFIG_FILE = "run_config.json"
# Keys of run_config.json that must match for a restart to append to existing predictions.
_RESUME_KEYS = ("max_length", "use_chat_template", "enable_thinking", "attention_mode")


class Model(Protocol):
    """What `elastic_jax.load_model` returns, as far as the harness is concerned."""

    @property
    def tokenizer(self) -> Tokenizer: ...

    @property
    def config(self) -> Any: ...


class GenerateFn(Protocol):
    """Signature of `elastic_jax.generate`.

    The result has `.texts: list[str]`, `.token_ids: list[list[int]]` (new tokens only),
    `.timings: list` of objects with `.prefill_ms`, `.decode_ms`, `.decode_tokens_per_s`,
    `.prompt_tokens`, `.new_tokens`, and `.prefill_info: list[dict] | None` (per request, with
    "sparsity" = fraction of causal attention blocks skipped).
    """

    def __call__(
        self,
        model: Model,
        prompts: list[list[int]],
        *,
        max_new_tokens: int,
        stop_token_ids: list[int] | None,
        greedy: bool,
        min_new_tokens: int,
        return_info: bool,
    ) -> Any: ...


LoadFn = Callable[..., Model]


def _default_load_fn() -> LoadFn:
    return load_model


def _check_args(modes: Sequence[str], batch_size: int, limit: int | None, max_length: int | None):
    if not modes:
        raise ValueError("attention_modes is empty; allowed: " + ", ".join(ATTENTION_MODES))
    for mode in modes:
        if mode not in ATTENTION_MODES:
            raise ValueError(
                f"attention mode {mode!r} unknown; allowed: {', '.join(ATTENTION_MODES)}"
            )
    if len(set(modes)) != len(modes):
        raise ValueError(f"attention_modes={list(modes)} lists a mode twice")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be an int >= 1")
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit={limit!r} must be None or an int >= 1")
    if max_length is not None and (not isinstance(max_length, int) or max_length < 2):
        raise ValueError(f"max_length={max_length!r} must be None or an int >= 2")


def default_max_length(model: Model) -> int:
    """Prompt budget when none is given: the model's context window minus 1024 tokens of room
    for the chat template and the longest generation (512), like LongBench's model2maxlen, and
    at most LongBench's own value for the family (Llama-3.1: 120000; ``model_rules``)."""
    window = getattr(model.config, "max_position_embeddings", None)
    if not isinstance(window, int) or window <= 2048:
        raise ValueError(
            "max_length not given and the model config has no usable max_position_embeddings "
            f"({window!r}); pass max_length explicitly"
        )
    return official_max_length(model.config, window)


@dataclasses.dataclass(frozen=True)
class _Options:
    batch_size: int
    use_chat_template: bool
    enable_thinking: bool | None


# Re-tokenizing the two decoded halves of a truncated prompt can merge or split a few tokens at
# the cut, so a truncated prompt may come out slightly longer than max_length.
_RETOKENIZE_MARGIN = 16


def _check_model(
    model: Model, max_length: int, runs: Sequence[TaskRun], opts: _Options
) -> int | None:
    """Fail before generating if the model cannot take the longest prompt + generation; returns
    the tokens one sample may need (None when the model states no capacity)."""
    tok = getattr(model, "tokenizer", None)
    if tok is None:
        raise ValueError("the model has no tokenizer (tokenizer.json); LongBench needs one")
    capacity = getattr(model, "max_tokens", None) or getattr(
        model.config, "max_position_embeddings", None
    )
    if not isinstance(capacity, int):
        return None
    overhead = len(tok.encode("", add_special_tokens=True))
    if opts.use_chat_template and any(not r.spec.skip_chat_template for r in runs):
        empty = tok.apply_chat_template(
            [{"role": "user", "content": ""}],
            add_generation_prompt=True,
            enable_thinking=opts.enable_thinking,
        )
        overhead = max(overhead, len(tok.encode(empty, add_special_tokens=False)))
    longest = max(r.spec.max_new_tokens for r in runs)
    need = max_length + longest + overhead + _RETOKENIZE_MARGIN
    if need > capacity:
        raise ValueError(
            f"max_length={max_length} + max_new_tokens={longest} + {overhead} template tokens + "
            f"{_RETOKENIZE_MARGIN} margin = {need} exceeds the model's capacity of {capacity} "
            "tokens; pass a smaller max_length or raise the capacity (e.g. the load_model "
            "option max_cache_tokens)"
        )
    return need


def _mode_dir(out_dir: Path, mode: str) -> Path:
    return out_dir / mode


def _check_resume_config(mode_dir: Path, config: Mapping[str, Any]) -> None:
    path = mode_dir / RUN_CONFIG_FILE
    if not path.exists():
        return
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(
            f"{path}: malformed JSON ({e.msg}); delete it or use a new out_dir"
        ) from None
    for key in _RESUME_KEYS:
        if key in config and key in old and old[key] != config[key]:
            raise ValueError(
                f"{path}: existing predictions were made with {key}={old[key]!r}, this run has "
                f"{key}={config[key]!r}; use another out_dir or delete {mode_dir}"
            )


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    text = json.dumps(obj, indent=2, ensure_ascii=False, default=str)  # default: odd options
    tmp.write_text(text + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _finished_ids(pred_path: Path, samples: list[dict], *, repair: bool) -> set[str]:
    records = read_predictions(pred_path, repair=repair)
    known = {s["_id"] for s in samples}
    for rec in records:
        if rec["_id"] not in known:
            raise ValueError(
                f"{pred_path}: prediction for _id {rec['_id']!r} which is not in the data file; "
                "the data changed since these predictions were made -- use another out_dir"
            )
    return {rec["_id"] for rec in records}


def _scalar_info(info: Mapping[str, Any] | None) -> dict[str, float]:
    """Numeric scalars of a prefill_info dict (e.g. "sparsity"); per-head tables are dropped."""
    if not info:
        return {}
    out = {}
    for k, v in info.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[k] = float(v)
        elif hasattr(v, "item") and getattr(v, "ndim", None) == 0:  # numpy / jax scalar
            out[k] = float(v.item())
    return out


def _record(
    sample: dict, text: str, new_ids: Sequence[int], prompt, timing, info, wall_ms: float
) -> dict:
    def t(name):
        v = getattr(timing, name, None) if timing is not None else None
        # e.g. decode_tokens_per_s is NaN when decoding took no time; JSON has no NaN
        return None if v is None or not math.isfinite(float(v)) else float(v)

    scalars = _scalar_info(info)
    return {
        # The official pred.py fields first, so LongBench's own eval.py can read our files.
        "_id": sample["_id"],
        "pred": text,
        "answers": sample["answers"],
        "all_classes": sample["all_classes"],
        "length": sample["length"],
        "prompt_tokens": len(prompt.token_ids),
        "raw_prompt_tokens": prompt.raw_tokens,
        "truncated": prompt.truncated,
        "chat_template": prompt.chat_template,
        "new_tokens": len(new_ids),
        "prefill_ms": t("prefill_ms"),
        "decode_ms": t("decode_ms"),
        "decode_tokens_per_s": t("decode_tokens_per_s"),
        "wall_ms": wall_ms,
        "queue_ms": t("queue_ms"),
        "sparsity": scalars.get("sparsity"),
        "prefill_info": scalars,
    }


def _pending(run: TaskRun, samples: list[dict], pred_path: Path, limit: int | None) -> list[dict]:
    """Samples (first `limit` in file order) with no prediction yet; repairs a torn last line."""
    done = _finished_ids(pred_path, samples, repair=True)
    todo = samples[:limit] if limit else samples
    return [s for s in todo if s["_id"] not in done]


def _prompt(run: TaskRun, sample: dict, tok, max_length: int, opts: _Options):
    """The sample's prompt under the run's template and truncation options."""
    return build_prompt(
        run.spec,
        sample,
        tok,
        max_length=max_length,
        use_chat_template=opts.use_chat_template,
        enable_thinking=opts.enable_thinking,
    )


def _append(f, rec: dict) -> None:
    """One prediction record, on disk before the next sample starts (resume after a crash)."""
    f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    f.flush()
    os.fsync(f.fileno())


def _run_task(
    model: Model,
    generate_fn: GenerateFn,
    run: TaskRun,
    pending: list[dict],
    pred_path: Path,
    opts: _Options,
    max_length: int,
    bar,
) -> None:
    """Generate the pending samples of one task, appending each record as it is produced."""
    if not pending:
        return
    tok = model.tokenizer
    stops = stop_token_ids(run.spec, tok)
    with pred_path.open("a", encoding="utf-8") as f:
        for start in range(0, len(pending), opts.batch_size):
            batch = pending[start : start + opts.batch_size]
            prompts = [_prompt(run, s, tok, max_length, opts) for s in batch]
            t0 = time.perf_counter()
            res = generate_fn(
                model,
                [p.token_ids for p in prompts],
                max_new_tokens=run.spec.max_new_tokens,
                stop_token_ids=stops,
                greedy=True,
                min_new_tokens=run.spec.min_new_tokens,
                return_info=True,
            )
            wall_ms = (time.perf_counter() - t0) * 1e3 / len(batch)
            texts = list(res.texts)
            if len(texts) != len(batch):
                raise RuntimeError(f"generate returned {len(texts)} texts for {len(batch)} prompts")
            timings = list(getattr(res, "timings", None) or [None] * len(batch))
            infos = list(getattr(res, "prefill_info", None) or [None] * len(batch))
            token_ids = list(getattr(res, "token_ids", None) or [[]] * len(batch))
            for i, sample in enumerate(batch):
                rec = _record(
                    sample, texts[i], token_ids[i], prompts[i], timings[i], infos[i], wall_ms
                )
                _append(f, rec)
            bar.update(len(batch))


def _make_engine(model: Model, batch_size: int, need: int | None, runs: Sequence[TaskRun]):
    """One serving engine for a mode: ``batch_size`` slots, each able to hold the longest sample
    (``need`` tokens; the pool holds ``batch_size`` of them)."""
    cap = model.max_tokens if need is None else min(model.max_tokens, need)
    stops = max(len(stop_token_ids(r.spec, model.tokenizer)) for r in runs)
    return Engine(model, batch_size, max_request_tokens=cap, max_stop_ids=max(8, stops))


def _run_task_engine(
    engine,
    model: Model,
    run: TaskRun,
    pending: list[dict],
    pred_path: Path,
    opts: _Options,
    max_length: int,
    bar,
) -> None:
    """Generate the pending samples of one task through ``engine`` (prompts built lazily, a
    queue of at most ``batch_size`` waiting), appending each record as its sample finishes.
    ``wall_ms`` of a record is the time since the previous record, so the task's wall time is
    their sum (what samples/min in the report needs)."""
    if not pending:
        return
    tok = model.tokenizer
    stops = stop_token_ids(run.spec, tok)
    todo = iter(pending)
    inflight: dict[int, tuple[dict, Any]] = {}
    last = time.perf_counter()

    def refill() -> None:
        while engine.num_queued < opts.batch_size:
            sample = next(todo, None)
            if sample is None:
                return
            prompt = _prompt(run, sample, tok, max_length, opts)
            rid = engine.submit(
                prompt.token_ids,
                run.spec.max_new_tokens,
                stop_token_ids=stops,
                min_new_tokens=run.spec.min_new_tokens,
            )
            inflight[rid] = (sample, prompt)

    with pred_path.open("a", encoding="utf-8") as f:
        refill()
        while not engine.idle:
            for res in engine.step():
                sample, prompt = inflight.pop(res.request_id)
                now = time.perf_counter()
                text = tok.decode(res.token_ids, skip_special_tokens=True)
                rec = _record(
                    sample, text, res.token_ids, prompt, res.timing, res.prefill_info,
                    (now - last) * 1e3,
                )  # fmt: skip
                last = now
                _append(f, rec)
                bar.update(1)
            refill()
    engine.pop_results()


def run_longbench(
    model_or_path: str | os.PathLike | Model,
    data_dir: str | os.PathLike,
    tasks: str | Sequence[str],
    out_dir: str | os.PathLike,
    *,
    attention_modes: str | Sequence[str] = "elastic",
    max_length: int | None = None,
    batch_size: int = 1,
    limit: int | None = None,
    use_chat_template: bool = True,
    enable_thinking: bool | None = False,
    model_options: Mapping[str, Any] | None = None,
    load_fn: LoadFn | None = None,
    generate_fn: GenerateFn | None = None,
    progress: bool = True,
    write_report: bool = True,
    compare_paper: str | None = None,
    paper_elastic_row: str | None = None,
) -> dict:
    """Evaluate a model on LongBench / LongBench-E and write predictions and a report.

    Args:
      model_or_path: a converted checkpoint dir (loaded once per attention mode with
        `load_fn(path, attention_mode=mode, **model_options)`), or an already loaded model
        (then exactly one attention mode, used as the output folder name).
      data_dir: folder with the official `<task>.jsonl` / `<task>_e.jsonl` files.
      tasks: "all", "e", a comma list or a list of task keys (see `tasks.resolve_tasks`).
      out_dir: predictions go to `<out_dir>/<mode>/<task>.jsonl`, the report to
        `<out_dir>/results.{json,md}`.
      attention_modes: one mode or several (e.g. ("dense", "elastic") for the comparison);
        modes run one after the other, each with its own model instance.
      max_length: prompt budget in tokens before the chat template; None = the model's
        max_position_embeddings - 1024.
      batch_size: decode slots of the serving engine (requests decoded together, continuous
        batching); with a custom `generate_fn`, prompts per call.
      limit: evaluate only the first `limit` samples of each task file.
      use_chat_template / enable_thinking: chat-template use (skipped anyway for few-shot and
        code tasks) and Qwen3's thinking switch (False = non-thinking, our default).
      load_fn: default `elastic_jax.load_model`. generate_fn: None (default) runs the serving
        engine; a `generate`-like callable (e.g. `elastic_jax.generate_static` or a fake in
        tests) gets the prompts in batches of `batch_size` instead.
      compare_paper: model name in data/paper_results.json to put beside our numbers.
      paper_elastic_row: the paper row our "elastic" mode is compared with (default
        "EA (FA-SSA)").

    Returns:
      The results dict written to `<out_dir>/results.json` (see `report.build_results`), or {}
      when write_report is False.

    Everything that can be checked without the model (modes, tasks, data files, existing
    prediction files and their run config) is checked before any model is loaded.
    """
    from tqdm.auto import tqdm

    modes = [attention_modes] if isinstance(attention_modes, str) else list(attention_modes)
    _check_args(modes, batch_size, limit, max_length)
    is_path = isinstance(model_or_path, (str, os.PathLike))
    if is_path and not Path(model_or_path).exists():
        raise FileNotFoundError(f"model path {model_or_path} does not exist")
    if not is_path and len(modes) != 1:
        raise ValueError(
            f"attention_modes={modes} needs a model path (each mode is loaded separately); "
            "got an already loaded model, which supports one mode"
        )
    if compare_paper is not None:  # raises on an unknown model name or row
        report.paper_comparison(
            {}, compare_paper, paper_elastic_row or report.DEFAULT_ELASTIC_PAPER_ROW
        )
    runs = resolve_tasks(tasks)
    data = {run.key: load_task_data(data_dir, run) for run in runs}
    out = Path(out_dir)
    opts = _Options(batch_size, use_chat_template, enable_thinking)
    base_config = {
        "model": str(model_or_path) if is_path else type(model_or_path).__name__,
        "data_dir": str(data_dir),
        "use_chat_template": use_chat_template,
        "enable_thinking": enable_thinking,
        "model_options": dict(model_options or {}),
    }
    for mode in modes:  # fail now on a corrupt file or a changed setting, not after loading
        mode_dir = _mode_dir(out, mode)
        _check_resume_config(mode_dir, {**base_config, "attention_mode": mode, **_ml(max_length)})
        for run in runs:
            _finished_ids(mode_dir / f"{run.key}.jsonl", data[run.key], repair=False)

    load = load_fn or (_default_load_fn() if is_path else None)
    for mode in modes:
        model = None
        gc.collect()  # drop the previous mode's model before loading the next
        if is_path:
            model = load(model_or_path, attention_mode=mode, **dict(model_options or {}))
        else:
            model = model_or_path
        resolved = max_length if max_length is not None else default_max_length(model)
        need = _check_model(model, resolved, runs, opts)
        engine = None if generate_fn is not None else _make_engine(model, batch_size, need, runs)
        mode_dir = _mode_dir(out, mode)
        config = {**base_config, "attention_mode": mode, "max_length": resolved}
        _check_resume_config(mode_dir, config)
        mode_dir.mkdir(parents=True, exist_ok=True)
        _write_json_atomic(mode_dir / RUN_CONFIG_FILE, config)
        pending = {
            r.key: _pending(r, data[r.key], mode_dir / f"{r.key}.jsonl", limit) for r in runs
        }
        total = sum(len(p) for p in pending.values())
        with tqdm(total=total, desc=mode, unit="sample", disable=not progress) as bar:
            for run in runs:
                bar.set_postfix_str(run.key)
                pred_path = mode_dir / f"{run.key}.jsonl"
                if engine is not None:
                    _run_task_engine(
                        engine, model, run, pending[run.key], pred_path, opts, resolved, bar
                    )
                else:
                    _run_task(
                        model, generate_fn, run, pending[run.key], pred_path, opts, resolved, bar
                    )
                if progress and pred_path.exists():
                    res = report.score_prediction_file(pred_path, run)
                    msg = f"[{mode}] {run.key}: {res.score:.2f} ({res.n} samples)"
                    tqdm.write(msg, file=sys.stderr)
        model = engine = None
    gc.collect()
    if not write_report:
        return {}
    row = paper_elastic_row or report.DEFAULT_ELASTIC_PAPER_ROW
    return report.write_report(out, compare_paper=compare_paper, elastic_row=row)


def _ml(max_length: int | None) -> dict:
    return {} if max_length is None else {"max_length": max_length}
