"""The conformance kit for task plugins: the checks ``ftkit plugins check`` runs, as pytest-friendly functions.

Each ``check_*`` function raises ``AssertionError`` with a message that says what is wrong and
where, and returns what the next check needs, so a plugin's tests read as a chain::

    from ftkit import testing

    def test_conforms(tmp_path):
        task = testing.check_registers("my-task")
        rows = testing.check_loader(task)              # the task's sample_data, or pass a path
        examples = testing.check_format_roundtrip(task, rows)
        testing.check_metrics_max_on_gold(task, examples)
        testing.check_trains(task, None, tmp_path)     # a few steps of `ftkit run` on the tiny model

:func:`run_all` runs them all and returns one :class:`CheckResult` per check instead of raising.
Importing this module is cheap; only :func:`check_trains` starts torch (in a child process).
"""

from __future__ import annotations

import difflib
import json
import logging
import math
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ftkit.errors import FtkitError
from ftkit.tasks import Example, Task

#: The recipe values :func:`check_trains` uses: the built-in tiny model, a few LoRA steps.
TINY_MODEL = {"id": "ftkit/tiny-qwen2", "source": "builtin"}
#: Scores a metric's result may top out at: a fraction, or a percentage (BLEU, SQuAD F1).
MAXIMA = (1.0, 100.0)


@dataclass(frozen=True)
class CheckResult:
    """The outcome of one check: ``message`` says what was found, or what is wrong."""

    name: str
    ok: bool
    message: str


def check_registers(name: str) -> Task:
    """The task ``name``, after checking its plugin loaded and registered it without errors."""
    from ftkit.plugins import plugin_infos, registered_tasks

    tasks = registered_tasks()
    infos = {info.name: info for info in plugin_infos()}
    if name not in tasks:
        broken = [f"plugin {info.name!r}: {'; '.join(info.errors)}" for info in infos.values() if info.errors]
        close = difflib.get_close_matches(name, tasks, n=1)
        hint = (f"did you mean {close[0]!r}?" if close else
                "is its package installed (`pip install -e .`) and named in the `ftkit` entry-point group?")
        if broken:
            hint += " Broken plugins: " + " | ".join(broken)
        raise AssertionError(f"no task {name!r} is registered; {hint}")
    task, plugin = tasks[name]
    info = infos.get(plugin)
    if info is not None and info.errors:
        raise AssertionError(f"plugin {plugin!r} registered task {name!r} but reported: {'; '.join(info.errors)}")
    try:
        task.check()
    except FtkitError as error:
        raise AssertionError(str(error)) from None
    return task


def sample_path(task: Task, data_path: str | os.PathLike[str] | None = None) -> Path:
    """``data_path``, else the task's ``sample_data``; an AssertionError when there is neither."""
    path = data_path if data_path is not None else task.sample_data
    if path is None:
        raise AssertionError(f"task {task.name!r} declares no `sample_data`: pass a data file "
                             "(`ftkit plugins check NAME --data FILE`, or the `data_path` argument)")
    path = Path(path)
    if not path.is_file():
        raise AssertionError(f"{path}: no such data file" + ("" if data_path else f" (task {task.name!r}'s "
                                                              "`sample_data`; is it included as package data?)"))
    return path


def _load_options(task: Task) -> dict[str, Any]:
    """What `ftkit run` passes the loader: the label set, for classification tasks."""
    return {"labels": list(task.labels)} if task.kind == "classification" and task.labels else {}


def check_loader(task: Task, path: str | os.PathLike[str] | None = None, *, min_rows: int = 2) -> list[dict[str, Any]]:
    """Rows the loader reads from ``path`` (default: ``sample_data``): mappings, all with the same keys.

    The loader is called as ``ftkit run`` calls it (a ``str`` path, ``labels=`` for classification).
    When the task has a ``parse`` function, reading records and parsing each must give the same rows,
    since ``ftkit data validate`` and ``ftkit data split`` go through ``parse``.
    """
    from ftkit.data import read_records

    path = sample_path(task, path)
    options = _load_options(task)
    try:
        rows = list(task.load(str(path), **options))
    except FtkitError as error:
        raise AssertionError(f"task {task.name!r}: the loader refused {path}: {error}") from None
    if len(rows) < min_rows:
        raise AssertionError(f"task {task.name!r}: the loader yielded {len(rows)} row(s) from {path}; "
                             f"expected at least {min_rows}")
    for index, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise AssertionError(f"task {task.name!r}: row {index} from the loader is a {type(row).__name__}, "
                                 "expected a mapping (a dict)")
    shapes = Counter(tuple(sorted(row)) for row in rows)
    if len(shapes) > 1:
        (common, _), *_ = shapes.most_common()
        odd = next(i for i, row in enumerate(rows) if tuple(sorted(row)) != common)
        raise AssertionError(f"task {task.name!r}: rows have different keys: row {odd} has "
                             f"{sorted(rows[odd])}, most have {list(common)}")
    if task.parse is not None:
        reader = task.read or read_records
        # The loader has just logged any row it dropped; once is enough.
        ftkit_log = logging.getLogger("ftkit")
        was_disabled, ftkit_log.disabled = ftkit_log.disabled, True
        try:
            parsed = [dict(r) for where, record in reader(path) for r in task.parse(record, where, **options)]
        except FtkitError as error:
            raise AssertionError(f"task {task.name!r}: `parse` refused a record the loader accepts: {error}") from None
        finally:
            ftkit_log.disabled = was_disabled
        if parsed != [dict(r) for r in rows]:
            raise AssertionError(f"task {task.name!r}: `parse` over the file's records gives {len(parsed)} rows that "
                                 f"differ from the loader's {len(rows)}; `ftkit data validate` would check other rows "
                                 "than `ftkit run` trains on")
    return [dict(row) for row in rows]


def _as_json_line(example: Example) -> dict[str, Any]:
    """The example as the run folder stores it (``data/test.jsonl``)."""
    return {"input": example.input, "target": example.target, "references": list(example.references),
            "instruction": example.instruction, "system": example.system}  \
        | ({"pair": example.pair} if example.pair else {}) \
        | ({"messages": list(example.messages)} if example.messages else {})


def check_format_roundtrip(task: Task, rows: Sequence[Mapping[str, Any]]) -> list[Example]:
    """One :class:`~ftkit.Example` per row, formatted purely, that survives the run folder's JSON and back.

    Also: ``input`` and ``target`` are non-empty text, ``target`` is among ``references`` (gold
    predictions must score as correct), and a classification target is one of the task's labels.
    """
    import copy

    examples: list[Example] = []
    for index, row in enumerate(rows):
        where = f"task {task.name!r}, row {index}"
        before = copy.deepcopy(row)
        example = task.format(row)
        if not isinstance(example, Example):
            raise AssertionError(f"{where}: `format` returned a {type(example).__name__}, expected an ftkit.Example")
        if row != before:
            raise AssertionError(f"{where}: `format` changed the row it was given; it must not mutate its input")
        if task.format(copy.deepcopy(before)) != example:
            raise AssertionError(f"{where}: `format` gave a different Example for the same row; it must be pure")
        for attr in ("input", "target"):
            value = getattr(example, attr)
            if not isinstance(value, str) or not value.strip():
                raise AssertionError(f"{where}: Example.{attr} must be non-empty text, got {value!r}")
        for attr in ("instruction", "system"):
            if getattr(example, attr) is not None and not isinstance(getattr(example, attr), str):
                raise AssertionError(f"{where}: Example.{attr} must be text or None")
        if not all(isinstance(r, str) and r.strip() for r in example.references):
            raise AssertionError(f"{where}: Example.references must be non-empty texts, got {example.references!r}")
        if example.target not in example.references:
            raise AssertionError(f"{where}: the target {example.target!r} is not among the references "
                                 f"{example.references!r}; a gold prediction would score as wrong")
        if task.kind == "classification" and task.labels and example.target not in task.labels:
            raise AssertionError(f"{where}: target {example.target!r} is not one of the labels "
                                 f"{', '.join(task.labels or ())}")
        line = json.loads(json.dumps(_as_json_line(example), ensure_ascii=False))
        back = Example(input=line["input"], target=line["target"], references=tuple(line["references"]),
                       instruction=line["instruction"], system=line["system"], pair=line.get("pair"),
                       messages=tuple(line["messages"]) if "messages" in line else None)
        if back != example:
            raise AssertionError(f"{where}: the Example does not survive a JSON round trip: {example!r} came back "
                                 f"as {back!r}")
        examples.append(example)
    if not examples:
        raise AssertionError(f"task {task.name!r}: no rows to format")
    return examples


def _wrong_predictions(task: Task, examples: Sequence[Example]) -> list[str]:
    if task.kind == "classification":
        labels = list(task.labels or sorted({e.target for e in examples}))  # None: the data's labels
        return [labels[(labels.index(e.target) + 1) % len(labels)] for e in examples]
    return ["zzz qqq" for _ in examples]


def check_metrics_max_on_gold(task: Task, examples: Sequence[Example], *, maximum: float | None = None,
                              wrong: Sequence[str] | None = None) -> tuple[float, float]:
    """The headline metric is at its maximum on gold predictions and lower on wrong ones.

    :param maximum: The best possible headline score; by default 1.0 or 100.0 is accepted.
    :param wrong: Wrong predictions to score; by default the next label (classification) or
        a nonsense reply (generation).
    :returns: ``(gold score, wrong score)``.
    """
    headline = task.headline_metric
    references = [e.references for e in examples]
    gold = task.metrics([e.target for e in examples], references)
    if not isinstance(gold, Mapping) or headline not in gold:
        keys = ", ".join(gold) if isinstance(gold, Mapping) else type(gold).__name__
        raise AssertionError(f"task {task.name!r}: metrics() has no {headline!r} (the headline_metric); got {keys}")
    try:
        json.dumps(gold)
    except (TypeError, ValueError) as error:
        raise AssertionError(f"task {task.name!r}: metrics() must return JSON-serializable values "
                             f"(metrics.json stores them): {error}") from None
    gold_score = gold[headline]
    if not isinstance(gold_score, int | float) or isinstance(gold_score, bool) or not math.isfinite(gold_score):
        raise AssertionError(f"task {task.name!r}: {headline} must be a finite number, got {gold_score!r}")
    best = (maximum,) if maximum is not None else MAXIMA
    if not any(math.isclose(gold_score, m, rel_tol=1e-6) for m in best):
        raise AssertionError(f"task {task.name!r}: {headline} on gold predictions is {gold_score}, expected the "
                             f"maximum ({' or '.join(f'{m:g}' for m in best)})")
    wrong = list(wrong) if wrong is not None else _wrong_predictions(task, examples)
    wrong_score = task.metrics(wrong, references)[headline]
    if not wrong_score < gold_score:
        raise AssertionError(f"task {task.name!r}: {headline} on wrong predictions is {wrong_score}, not below "
                             f"its {gold_score} on gold ones")
    return float(gold_score), float(wrong_score)


def check_trains(task: Task, data_path: str | os.PathLike[str] | None, tmp_dir: str | os.PathLike[str], *,
                 steps: int = 4, timeout: float = 600) -> dict[str, Any]:
    """A few steps of ``ftkit run`` on the built-in tiny model (a child process, CPU is fine).

    Writes ``recipe.toml`` and the run folder ``run/`` under ``tmp_dir``. The child process finds
    plugins through entry points, so the plugin must be installed (``pip install -e .``).
    :returns: The run's ``metrics.json``.
    """
    import tomli_w

    path = sample_path(task, data_path).resolve()
    tmp = Path(tmp_dir)
    tmp.mkdir(parents=True, exist_ok=True)
    out = tmp / "run"
    recipe = {
        "model": TINY_MODEL,
        "task": {"name": task.name, "train_file": str(path), "test_size": 0.25},
        "method": {"name": "lora", "r": 8, "alpha": 16, "dropout": 0.0},
        "train": {"head": task.default_head, "max_steps": steps, "lr": 3e-3, "batch_size": 8,
                  "max_seq_len": 128, "logging_steps": 1, "warmup": 0.0},
        "eval": {"baseline": False, "max_examples": 16, "batch_size": 16, "max_new_tokens": 8},
        "output": {"dir": str(out)},
    }
    recipe_path = tmp / "recipe.toml"
    recipe_path.write_text(tomli_w.dumps(recipe), encoding="utf-8")
    # The tiny model is built locally; offline flags stop the libraries' hub look-ups from waiting on a network.
    env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", **os.environ}
    start = time.perf_counter()
    try:
        done = subprocess.run([sys.executable, "-m", "ftkit", "run", str(recipe_path)], capture_output=True,
                              text=True, env=env, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"task {task.name!r}: `ftkit run {recipe_path}` took over {timeout:g} s") from None
    if done.returncode != 0:
        errors = [line for line in done.stderr.splitlines() if line.startswith("Error:")]
        detail = errors[-1] if errors else "\n".join(done.stderr.splitlines()[-15:])
        hint = (" (the child process sees installed plugins only: `pip install -e .` the plugin's package)"
                if "unknown task" in detail else "")
        raise AssertionError(f"task {task.name!r}: `ftkit run {recipe_path}` exited {done.returncode}: "
                             f"{detail}{hint}")
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    metrics["seconds"] = round(time.perf_counter() - start, 1)
    if metrics.get("steps") != steps:
        raise AssertionError(f"task {task.name!r}: trained {metrics.get('steps')} steps, expected {steps}")
    score = metrics["finetuned"].get(task.headline_metric)
    if not isinstance(score, int | float) or not math.isfinite(score):
        raise AssertionError(f"task {task.name!r}: the run reports {task.headline_metric} = {score!r}")
    return metrics


def run_all(name: str, data_path: str | os.PathLike[str] | None = None, *, train: bool = True,
            tmp_dir: str | os.PathLike[str] | None = None) -> list[CheckResult]:
    """Run every check on task ``name``; a result per check that ran (a failed check stops the rest).

    :param data_path: Data for the loader and training; default: the task's ``sample_data``.
    :param train: Also train a few steps on the tiny model (seconds, but it starts torch).
    :param tmp_dir: Where the training check writes; default: a temporary folder, removed after.
    """
    results: list[CheckResult] = []

    def attempt(check: str, run, describe) -> Any:  # noqa: ANN001 - two small callables
        try:
            value = run()
        except AssertionError as error:
            results.append(CheckResult(check, False, str(error)))
            raise _Stop from None
        except Exception as error:  # noqa: BLE001 - plugin code may raise anything; report it as the check's failure
            results.append(CheckResult(check, False, f"{type(error).__name__}: {error}"))
            raise _Stop from None
        results.append(CheckResult(check, True, describe(value)))
        return value

    try:
        task = attempt("registers", lambda: check_registers(name), lambda t: _describe_task(name, t))
        path = attempt("data", lambda: sample_path(task, data_path), str)
        rows = attempt("loader", lambda: check_loader(task, path), lambda r: f"{len(r)} rows from {path.name}, "
                       f"keys {', '.join(sorted(r[0]))}")
        examples = attempt("format", lambda: check_format_roundtrip(task, rows), lambda e: _describe_examples(task, e))
        attempt("metrics", lambda: check_metrics_max_on_gold(task, examples),
                lambda s: f"{task.headline_metric} {s[0]:g} on gold predictions, {s[1]:g} on wrong ones")
        if train:
            with tempfile.TemporaryDirectory(prefix="ftkit-check-") as scratch:
                attempt("trains", lambda: check_trains(task, path, tmp_dir or scratch),
                        lambda m: f"{m['steps']} steps on {TINY_MODEL['id']} ({m['head']} head) in {m['seconds']:g} s; "
                                  f"{task.headline_metric} {m['finetuned'][task.headline_metric]:.3g}")
    except _Stop:
        pass
    return results


class _Stop(Exception):
    """A check failed; the ones after it depend on it."""


def _describe_task(name: str, task: Task) -> str:
    from ftkit.plugins import plugin_infos, registered_tasks

    plugin = registered_tasks()[name][1]
    info = next((i for i in plugin_infos() if i.name == plugin), None)
    where = f", {info.distribution} {info.version}" if info and info.distribution else ""
    return f"task {name!r} ({task.kind}) from plugin {plugin!r}{where}"


def _describe_examples(task: Task, examples: Sequence[Example]) -> str:
    if task.kind != "classification":
        return f"{len(examples)} examples"
    counts = Counter(e.target for e in examples)
    return f"{len(examples)} examples ({', '.join(f'{label} {counts[label]}' for label in task.labels or sorted(counts))})"
