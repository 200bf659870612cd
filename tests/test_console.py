"""What `ftkit run` prints: ftkit's own lines (no raw Trainer dicts), --quiet, --json-logs, live progress."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
from click.testing import CliRunner

from ftkit.cli import main
from ftkit.console import Console, duration_text, rate_text, scientific, short_number
from tests.conftest import run_ftkit

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "recipes" / "tiny.toml")
# 12 steps with logging_steps = 10: logged at 1 and 10, and at 12 only because ftkit logs the last step.
FAST = ["--set", "train.max_steps=12", "--set", "eval.baseline=false", "--set", "eval.max_examples=12"]
STEP_LINE = re.compile(r"step (\d+)/12 · loss (\S+) · lr (\S+) · [\d.]+ (it/s|s/it)( · eta \d+:\d\d)?")


def out_arg(path: Path) -> list[str]:
    return ["--set", f"output.dir={json.dumps(str(path))}"]


def tensorboard_scalars(run: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    return [(event.step, event.value) for event in events.Scalars(tag)]


def test_a_run_without_a_terminal_prints_step_lines_and_calls_the_last_logged_loss_final(tmp_path):
    out = tmp_path / "run"
    done = run_ftkit("run", TINY, *FAST, *out_arg(out))
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert "{'" not in done.stdout + done.stderr  # no raw Trainer dicts
    assert done.stderr == ""  # no bars ("Loading weights", the Trainer's), no library warnings

    steps = [STEP_LINE.fullmatch(line) for line in lines if line.startswith("step ")]
    assert all(steps), [line for line in lines if line.startswith("step ")]
    assert [int(step.group(1)) for step in steps] == [1, 10, 12]

    (loading,) = [line for line in lines if line.startswith("Loading ")]
    assert re.fullmatch(r"Loading \S+tiny-qwen2\S* on cpu …", loading)
    (model,) = [line for line in lines if line.startswith("Model: ")]
    assert re.search(r"; loaded in \d+\.\d s$", model)

    (trained,) = [line for line in lines if line.startswith("Trained ")]
    found = re.fullmatch(r"Trained 12 steps in [\d.]+ s \(final loss (\S+), average loss (\S+)\)", trained)
    assert found, trained
    final, average = float(found.group(1)), float(found.group(2))
    # The run folder's own record: TensorBoard's logged losses (float32) and the Trainer's mean.
    logged = tensorboard_scalars(out, "train/loss")
    assert [step for step, _ in logged] == [1, 10, 12]
    assert final == pytest.approx(logged[-1][1], rel=1e-3)
    assert found.group(1) == steps[-1].group(2)  # the same number as the last step line
    assert average == pytest.approx(tensorboard_scalars(out, "train/train_loss")[-1][1], rel=1e-3)
    # Each logged loss is the mean of its window (1, 9 and 2 steps): their weighted mean is the average.
    assert average == pytest.approx((logged[0][1] + 9 * logged[1][1] + 2 * logged[2][1]) / 12, rel=1e-3)
    assert lines[-2].startswith("fine-tuned: accuracy = ")
    assert lines[-1] == f"Run folder: {out} (report.md, metrics.json, adapter/)"


def test_json_logs_print_one_json_object_per_event(tmp_path):
    out = tmp_path / "run"
    done = run_ftkit("run", TINY, *FAST, *out_arg(out), "--json-logs")
    assert done.returncode == 0, done.stderr[-3000:]
    events = [json.loads(line) for line in done.stdout.splitlines()]  # every line parses
    assert all({"event", "level", "message"} <= set(event) for event in events)
    kinds = [event["event"] for event in events]
    for kind in ("task", "data", "loading", "model", "evaluation", "step", "trained", "done"):
        assert kind in kinds, kind
    assert kinds[-3:] == ["trained", "evaluation", "done"]

    steps = [event for event in events if event["event"] == "step"]
    assert [event["step"] for event in steps] == [1, 10, 12]
    for event in steps:
        assert {"total", "loss", "lr", "steps_per_s", "eta_s", "epoch"} <= set(event)
        assert event["total"] == 12 and isinstance(event["loss"], float) and event["steps_per_s"] > 0
        assert STEP_LINE.fullmatch(event["message"])
    (trained,) = [event for event in events if event["event"] == "trained"]
    assert trained["final_loss"] == steps[-1]["loss"] and trained["steps"] == 12
    assert trained["average_loss"] != trained["final_loss"]

    evaluations = {event["model"]: event for event in events if event["event"] == "evaluation"}
    assert set(evaluations) == {"majority", "finetuned"}  # eval.baseline = false: no base-model evaluation
    assert evaluations["finetuned"]["metric"] == "accuracy" and evaluations["finetuned"]["level"] == "result"
    done_event = events[-1]
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert done_event["run_folder"] == str(out)
    assert done_event["scores"]["finetuned"] == metrics["finetuned"]["accuracy"] == evaluations["finetuned"]["value"]
    assert done_event["verdict"] == metrics["verdict"]
    warnings = [event for event in events if event["event"] == "warning"]
    assert warnings and all(event["message"].startswith("Warning: ") for event in warnings)


def test_quiet_prints_only_warnings_and_the_final_results(tmp_path):
    out = tmp_path / "run"
    done = run_ftkit("run", TINY, *FAST, *out_arg(out), "--quiet")
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    # eval.max_examples = 12 leaves 2 test examples per label: the test split's warning is kept.
    assert lines[0].startswith("Warning: the test split has fewer than 5 examples of 6 labels")
    assert re.fullmatch(r"Trained 12 steps in [\d.]+ s \(final loss \S+, average loss \S+\)", lines[1])
    assert lines[2].startswith("fine-tuned: accuracy = ")
    assert lines[3:] == [f"Run folder: {out} (report.md, metrics.json, adapter/)"]
    assert done.stderr == ""


@pytest.mark.parametrize("flag", ["--quiet", "--json-logs", None])
def test_quiet_and_json_logs_runs_evaluate_without_progress_lines(tmp_path, monkeypatch, flag):
    """Evaluation progress (a line per batch here, instead of every 10 s) is for people watching."""
    from ftkit import evaluator

    monkeypatch.setattr(evaluator, "PROGRESS_EVERY_S", 0.0)
    args = ["run", TINY, *FAST, "--set", "eval.batch_size=2", *out_arg(tmp_path / "run"), *([flag] if flag else [])]
    done = CliRunner().invoke(main, args)
    assert done.exit_code == 0, done.output
    assert "evaluating" not in done.stdout
    assert ("evaluating fine-tuned: 2/12 (17%)" in done.stderr) is (flag is None)  # the control: shown by default
    assert evaluator.show_progress.get()  # the run's setting ends with the run


def test_json_logs_end_with_an_error_event_and_the_error_line_on_stderr(tmp_path):
    out = tmp_path / "exists"
    out.mkdir()
    done = run_ftkit("run", TINY, *out_arg(out), "--json-logs")
    assert done.returncode == 2
    message = f"output.dir: {out} already exists; pass --overwrite or choose another dir"
    assert done.stderr == f"Error: {message}\n"
    assert [json.loads(line) for line in done.stdout.splitlines()] == [
        {"event": "error", "level": "error", "message": message, "type": "UsageError"}]


def test_quiet_and_json_logs_are_refused_with_dry_run_and_taught_in_help():
    for flag in ("--quiet", "--json-logs"):
        refused = CliRunner().invoke(main, ["run", TINY, "--dry-run", flag])
        assert refused.exit_code == 2
        assert refused.output.startswith(f"Error: {flag}: not with --dry-run")
    shown = CliRunner().invoke(main, ["run", "--help"])
    assert "$ ftkit run recipes/tiny.toml --quiet" in shown.output
    assert "$ ftkit run recipes/tiny.toml --json-logs" in shown.output


# -- the console and the training callback, in-process --------------------------------------------------


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_console_modes():
    lines: list[str] = []
    console = Console(write=lines.append, live=False)
    console("Data: 3 train / 1 test examples")
    console("Warning: few examples")
    console.event("step", "step 1/2 · loss 1.5", loss=1.5)
    assert lines == ["Data: 3 train / 1 test examples", "Warning: few examples", "step 1/2 · loss 1.5"]

    lines.clear()
    quiet = Console(quiet=True, write=lines.append, status=FakeTerminal())
    quiet("Data: 3 train / 1 test examples")
    quiet.event("step", "step 1/2", level="info")
    quiet.event("progress", "step 1/2", level="progress")
    quiet("Warning: few examples")
    quiet.event("done", "Run folder: x", level="result")
    assert lines == ["Warning: few examples", "Run folder: x"]
    assert not quiet.on_terminal  # quiet: no live line either

    lines.clear()
    as_json = Console(json=True, write=lines.append, status=FakeTerminal())
    as_json("Warning: few examples")
    as_json.event("trained", "Trained", level="result", final_loss=float("nan"), kind="classification")
    assert [json.loads(line) for line in lines] == [
        {"event": "warning", "level": "warning", "message": "Warning: few examples"},
        {"event": "trained", "level": "result", "message": "Trained", "final_loss": None, "kind": "classification"}]
    assert not as_json.on_terminal


def test_the_live_line_is_cleared_before_each_lasting_line_and_drawn_again():
    lines: list[str] = []
    terminal = FakeTerminal()
    console = Console(write=lines.append, status=terminal)
    assert console.on_terminal
    console.live("step 3/10 · 2.0 it/s · eta 0:04")
    console("step 3/10 · loss 1.2")
    console.live("")
    assert terminal.getvalue() == ("step 3/10 · 2.0 it/s · eta 0:04" "\r\x1b[K" "step 3/10 · 2.0 it/s · eta 0:04"
                                   "\r\x1b[K")
    assert lines == ["step 3/10 · loss 1.2"]
    assert not Console(status=io.StringIO()).on_terminal  # a pipe or file: no live line
    assert not Console(live=False, status=FakeTerminal()).on_terminal


def test_numbers_are_short():
    assert [short_number(v) for v in (1.78312, 0.0051234, 0.41)] == ["1.783", "0.005123", "0.41"]
    assert [scientific(v) for v in (0.00019, 2e-5, 0.0, 0.002365)] == ["1.9e-4", "2e-5", "0", "2.4e-3"]
    assert [rate_text(v) for v in (7.81, 0.5)] == ["7.8 it/s", "2.0 s/it"]
    assert [duration_text(v) for v in (21, 725, 3723)] == ["0:21", "12:05", "1:02:03"]


def fake_state(step: int, total: int = 30) -> SimpleNamespace:
    return SimpleNamespace(global_step=step, max_steps=total, is_world_process_zero=True)


def test_without_a_terminal_training_prints_a_plain_progress_line_between_logging_steps(monkeypatch):
    from transformers import TrainerControl

    from ftkit import evaluator
    from ftkit.training import progress_callback

    monkeypatch.setattr(evaluator, "PROGRESS_EVERY_S", 0.0)  # every step, instead of every 10 s
    lines: list[str] = []
    callback = progress_callback(Console(write=lines.append, status=io.StringIO()))
    control = TrainerControl()
    callback.on_train_begin(None, fake_state(0), control)
    callback.on_step_end(None, fake_state(1), control)
    control.should_log = True  # a logging step: its step line follows, no progress line before it
    callback.on_step_end(None, fake_state(2), control)
    callback.on_log(None, fake_state(2), control, logs={"loss": 1.25, "learning_rate": 2e-4, "epoch": 0.1})
    control.should_log = False
    callback.on_step_end(None, fake_state(30), control)
    assert control.should_log  # the last step is always logged: its loss is the final loss
    callback.on_log(None, fake_state(30), control, logs={"train_loss": 1.0, "train_runtime": 3.0})  # ignored
    assert len(lines) == 2
    assert re.fullmatch(r"step 1/30 · [\d.]+ (it/s|s/it) · eta \d+:\d\d", lines[0])
    assert re.fullmatch(r"step 2/30 · loss 1.25 · lr 2e-4 · [\d.]+ (it/s|s/it) · eta \d+:\d\d", lines[1])


def test_training_progress_lines_are_rate_limited():
    from transformers import TrainerControl

    from ftkit.training import progress_callback

    lines: list[str] = []
    callback = progress_callback(Console(write=lines.append, status=io.StringIO()))
    control = TrainerControl()
    callback.on_train_begin(None, fake_state(0), control)
    for step in range(1, 20):
        callback.on_step_end(None, fake_state(step), control)
    assert lines == []  # fast steps print nothing in between
