"""Crash consistency and signals: real `ftkit run` processes killed at named points, then resumed.

Each kill comes from inside the run (``FTKIT_TEST_KILL_AT``, see ftkit/interrupts.py ``kill_point``),
so it lands at the same place every time; tests/test_resume.py kills runs from outside.
"""

from __future__ import annotations

import json
import signal
import subprocess
import tomllib
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.conftest import run_ftkit
from tests.test_resume import assert_same_results, out_arg

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "recipes" / "tiny.toml")
# 30 steps per epoch: a checkpoint at step 30 (the epoch's end) and at 45, where max_steps ends the
# second epoch early; no train.save_steps, as in every shipped recipe.
SHORT = ["--set", "train.max_steps=45"]


def run_until_killed(out: Path, point: str, *extra: str, signal_name: str = "KILL") -> subprocess.CompletedProcess:
    return run_ftkit("run", TINY, *SHORT, *out_arg(out), *extra,
                     env={"FTKIT_TEST_KILL_AT": point, "FTKIT_TEST_KILL_SIGNAL": signal_name})


def assert_nothing_half_written(out: Path, recipe_text: str) -> None:
    """What a resume reads is whole: recipe.toml, baseline.json, and every checkpoint it would use."""
    from ftkit.baselines import read_saved as _read_baselines
    from ftkit.training import COMPLETE_MARK, checkpoint_mark

    partial = out.with_name(out.name + ".partial")
    assert not out.exists(), "a killed run must not look complete"
    assert (partial / "recipe.toml").read_text(encoding="utf-8") == recipe_text
    if (partial / "baseline.json").exists():
        kept, problem = _read_baselines(partial / "baseline.json", 120)
        assert kept is not None, problem
    for checkpoint in (partial / "checkpoints").glob("checkpoint-*"):
        if (checkpoint / COMPLETE_MARK).exists():
            assert checkpoint_mark(checkpoint) is not None, f"{checkpoint} is marked complete but is not"


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reference") / "run"
    done = run_ftkit("run", TINY, *SHORT, *out_arg(out))
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def test_sigkill_at_every_point_then_resume_gives_the_uninterrupted_result(reference, tmp_path):
    out = tmp_path / "run"
    partial = tmp_path / "run.partial"
    recipe_text = None
    # (kill point, what the next --resume must say)
    stages = [
        ("data", "majority baseline (喜悅): accuracy = "),  # the data loaded again, the baselines evaluated
        ("baselines", "No complete checkpoint: training from the start"),
        ("training@35", f"Resuming from {partial}/checkpoints/checkpoint-30"),
        # The resumed run saves step 45 next and is killed before marking it complete.
        ("checkpoint-write", f"Notice: removed {partial}/checkpoints/checkpoint-45: the run stopped while writing it"),
        ("final-eval", f"Resuming from {partial}/checkpoints/checkpoint-45"),
        ("save", f"Resuming from {partial}/checkpoints/checkpoint-45"),
    ]
    for index, (point, then) in enumerate(stages):
        killed = run_until_killed(out, point, *(["--resume"] if index else []))
        assert killed.returncode == -signal.SIGKILL, (point, killed.stderr[-3000:])
        recipe_text = recipe_text or (partial / "recipe.toml").read_text(encoding="utf-8")
        assert_nothing_half_written(out, recipe_text)
        stages[index] = (point, then, killed)
    stdouts = [killed.stdout for _, _, killed in stages[1:]]
    done = run_ftkit("run", TINY, *SHORT, *out_arg(out), "--resume")
    assert done.returncode == 0, done.stderr[-3000:]
    stdouts.append(done.stdout)
    for (point, then, _), stdout in zip(stages, stdouts, strict=True):
        assert then in stdout, f"after the kill at {point}:\n{stdout[-3000:]}"
    assert "Trained 45 steps in" in done.stdout and "no step left to train after the resume" in done.stdout
    assert not partial.exists()
    assert not (out / "checkpoints").exists() and not (out / "baseline.json").exists()
    assert not list(out.rglob("*.tmp"))
    assert_same_results(reference, out)
    assert (out / "metrics.json").read_bytes() == (reference / "metrics.json").read_bytes()


def test_sigterm_during_training_saves_a_checkpoint_and_the_resume_finishes_the_same(reference, tmp_path):
    out = tmp_path / "run"
    partial = tmp_path / "run.partial"
    stopped = run_until_killed(out, "training@12", signal_name="TERM")
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    assert stopped.stderr == "Error: stopped by SIGTERM\n"
    checkpoint = partial / "checkpoints" / "checkpoint-12"
    assert f"Checkpoint at step 12 (stopping on SIGTERM): {checkpoint}" in stdout_lines(stopped)
    command = f"ftkit run {TINY} --set train.max_steps=45 --set 'output.dir=\"{out}\"' --resume"
    assert stdout_lines(stopped)[-1] == f"Stopped by SIGTERM; last checkpoint: {checkpoint}. Continue with: {command}"
    assert not out.exists()
    resumed = run_ftkit("run", TINY, *SHORT, *out_arg(out), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Resuming from {checkpoint}" in resumed.stdout
    assert_same_results(reference, out)


@pytest.mark.parametrize(("point", "signal_name", "code", "message"), [
    ("baselines", "TERM", 143, "stopped by SIGTERM"),
    ("data", "INT", 130, "interrupted"),
])
def test_a_signal_before_training_leaves_no_partial_folder(tmp_path, point, signal_name, code, message):
    out = tmp_path / "run"
    stopped = run_until_killed(out, point, signal_name=signal_name)
    assert stopped.returncode == code, stopped.stderr[-3000:]
    assert stopped.stderr == f"Error: {message}\n"
    assert list(tmp_path.iterdir()) == []


def test_a_resume_reevaluates_a_damaged_baseline_file(tmp_path):
    from ftkit.baselines import read_saved as _read_baselines

    path = tmp_path / "baseline.json"
    assert _read_baselines(path, 3) == (None, None)
    whole = {"majority": {"metrics": {"accuracy": 0.5}, "predictions": ["a", "b", "a"]}, "zero_shot": None,
             "random_head": None, "notes": []}
    path.write_text(json.dumps(whole), encoding="utf-8")
    assert _read_baselines(path, 3) == (whole, None)
    assert _read_baselines(path, 4) == (None, "does not hold a baseline result for each test example")
    path.write_text(json.dumps(whole)[:40], encoding="utf-8")
    assert _read_baselines(path, 3) == (None, "is unreadable (JSONDecodeError)")


def stdout_lines(done: subprocess.CompletedProcess) -> list[str]:
    return done.stdout.splitlines()


# -- when checkpoints are saved ------------------------------------------------------------------

def checkpoints_for(save_minutes: float, save_steps: int = 0):  # noqa: ANN201
    """The checkpoint callback on a stand-in run, with a clock the test moves."""
    from ftkit.interrupts import StopRequests
    from ftkit.training import checkpoint_callback

    now = [0.0]
    events = []
    run = SimpleNamespace(recipe=SimpleNamespace(train=SimpleNamespace(save_minutes=save_minutes,
                                                                       save_steps=save_steps)),
                          stops=StopRequests(),
                          echo=SimpleNamespace(event=lambda kind, message, **fields: events.append(message)))
    return checkpoint_callback(run, clock=lambda: now[0]), run, now, events


def step(callback, state, folder: Path, *, epoch_end: bool = False) -> list[int]:  # noqa: ANN001
    """One optimizer step (and the epoch's end) as the Trainer calls the callback: the steps saved."""
    saved = []

    def save_if_asked(control) -> None:  # noqa: ANN001
        if control.should_save:
            control.should_save = False
            checkpoint = folder / f"checkpoint-{state.global_step}"
            checkpoint.mkdir()
            (checkpoint / "trainer_state.json").write_text("{}", encoding="utf-8")
            callback.on_save(SimpleNamespace(output_dir=str(folder)), state, control)
            saved.append(state.global_step)

    control = SimpleNamespace(should_save=False, should_training_stop=False)
    state.global_step += 1
    callback.on_step_end(None, state, control)
    save_if_asked(control)
    if epoch_end:
        state.epoch = round(state.epoch + 1)
        callback.on_epoch_end(None, state, control)
        save_if_asked(control)
    return saved


def train_steps(folder: Path, steps: int, epoch_ends: tuple[int, ...]) -> tuple[list[int], list[str]]:
    """``steps`` of a 100-step run at 1.5 minutes a step, saving every 10 minutes: (steps saved, lines said)."""
    callback, _, now, events = checkpoints_for(save_minutes=10)
    state = SimpleNamespace(global_step=0, max_steps=100, epoch=0.0)
    callback.on_train_begin(None, state, SimpleNamespace())
    saved = []
    for _ in range(steps):
        now[0] += 90
        saved += step(callback, state, folder, epoch_end=state.global_step + 1 in epoch_ends)
    return saved, events


def test_checkpoints_every_save_minutes_and_at_each_epochs_end(tmp_path):
    saved, events = train_steps(tmp_path, 100, epoch_ends=(49, 100))  # a checkpoint every 7 steps by time
    assert saved == [7, 14, 21, 28, 35, 42, 49, 56, 63, 70, 77, 84, 91, 98, 100]  # 49: both, saved once
    assert events[6:8] == [f"Checkpoint at step 49 (every 10 min): {tmp_path}/checkpoint-49",
                           f"Checkpoint at step 56 (every 10 min): {tmp_path}/checkpoint-56"]
    assert events[-1] == f"Checkpoint at step 100 (last step): {tmp_path}/checkpoint-100"

    from ftkit.training import checkpoint_mark, newest_checkpoint

    assert checkpoint_mark(tmp_path / "checkpoint-100") == {"final": True, "files": {"trainer_state.json": 2}}
    assert checkpoint_mark(tmp_path / "checkpoint-98")["final"] is False
    (tmp_path / "checkpoint-100" / "trainer_state.json").write_text("{}\n", encoding="utf-8")  # changed since
    assert newest_checkpoint(tmp_path) == tmp_path / "checkpoint-98"


def test_an_epochs_end_saves_and_restarts_the_clock(tmp_path):
    saved, events = train_steps(tmp_path, 12, epoch_ends=(5,))
    assert saved == [5, 12]
    assert events[0] == f"Checkpoint at step 5 (end of epoch 1): {tmp_path}/checkpoint-5"


def test_save_minutes_zero_saves_at_epoch_ends_only_and_a_signal_saves_then_stops():
    callback, run, now, _ = checkpoints_for(save_minutes=0)
    state = SimpleNamespace(global_step=0, max_steps=100, epoch=0.0)
    callback.on_train_begin(None, state, SimpleNamespace())
    now[0] = 1e6
    assert not any(step(callback, state, Path("/nonexistent")) for _ in range(10))
    run.stops.signum = signal.SIGTERM
    control = SimpleNamespace(should_save=False, should_training_stop=False)
    callback.on_step_end(None, state, control)
    assert control.should_save and control.should_training_stop


def test_the_save_keys_are_documented_and_shipped_recipes_set_neither():
    from ftkit.recipe import TrainSection

    helps = {field.name: field.metadata["help"] for field in TrainSection.__dataclass_fields__.values()}
    assert "only at the end" not in helps["save_steps"]
    assert "each epoch's end" in helps["save_minutes"] and TrainSection().save_minutes == 10.0
    for recipe in (ROOT / "recipes").glob("*.toml"):
        train = tomllib.loads(recipe.read_text(encoding="utf-8")).get("train", {})
        assert "save_steps" not in train and "save_minutes" not in train, recipe.name


# -- the run folder records what ran -------------------------------------------------------------

def test_auto_fit_changes_are_written_to_recipe_toml_and_a_resume_keeps_them(tmp_path, monkeypatch):
    from dataclasses import replace

    import torch

    from ftkit import fit
    from ftkit.pipeline import FineTuneRun
    from ftkit.recipe import load_recipe
    from ftkit.tiny import tiny_model_path

    overrides = (f"output.dir={json.dumps(str(tmp_path / 'run'))}", "train.max_seq_len=256",
                 "eval.batch_size=4")  # the training phase is the peak
    recipe = load_recipe(TINY, overrides)
    first = FineTuneRun(recipe, auto_fit=True, echo=lambda line: None)
    first.setup()
    first.model_path = tiny_model_path()
    shape = fit.recipe_shape(recipe, first.model_path)
    # What the run checks against free memory read after CUDA started: without the CUDA context.
    settings = fit.recipe_settings(recipe, first.head, 6, cuda_context=False)
    first.gpu_free = fit.estimate(shape, replace(settings, batch=8, grad_accum=2)).total  # batch 16 does not fit
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    first.check_memory()
    saved = tomllib.loads((tmp_path / "run.partial" / "recipe.toml").read_text(encoding="utf-8"))["train"]
    assert (saved["batch_size"], saved["grad_accum"]) == (8, 2) and first.notes[0].startswith("--auto-fit: ")

    resumed = FineTuneRun(load_recipe(TINY, overrides), resume=True, auto_fit=True, echo=lambda line: None)
    resumed.setup()  # the same recipe as given: accepted, with the interrupted run's batch settings
    resumed.model_path, resumed.gpu_free = first.model_path, first.gpu_free
    resumed.check_memory()
    assert (resumed.recipe.train.batch_size, resumed.recipe.train.grad_accum) == (8, 2)
