"""Validation and early stopping: the validation curve, the best step's weights kept, early stopping,
and all of it across a SIGKILL and --resume (real `ftkit run` processes on the built-in tiny model)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from ftkit.cli import main
from tests.conftest import run_ftkit

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "recipes" / "tiny.toml")
EMOTION = ROOT / "plugins" / "data" / "emotion_quickstart.jsonl"
# lr 3e-2, constant: the validation accuracy climbs and falls back, so the best step is not the last.
BEST = ["--set", "train.max_steps=40", "--set", "train.eval_steps=5", "--set", "train.lr=3e-2",
        "--set", 'train.scheduler="constant"', "--set", "train.save_steps=10"]


def toml_str(path: Path) -> str:
    return json.dumps(str(path))


def out_arg(path: Path) -> list[str]:
    return ["--set", f"output.dir={toml_str(path)}"]


def read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """The emotion sample as a training file and a 60-example validation file (disjoint texts)."""
    folder = tmp_path_factory.mktemp("data")
    lines = EMOTION.read_text(encoding="utf-8").splitlines(keepends=True)
    (folder / "valid.jsonl").write_text("".join(lines[:60]), encoding="utf-8")
    (folder / "train.jsonl").write_text("".join(lines[60:]), encoding="utf-8")
    return {"train": folder / "train.jsonl", "valid": folder / "valid.jsonl"}


def data_args(files: dict[str, Path]) -> list[str]:
    return ["--set", f"task.train_file={toml_str(files['train'])}",
            "--set", f"task.valid_file={toml_str(files['valid'])}"]


@pytest.fixture(scope="module")
def best_run(files, tmp_path_factory) -> tuple[Path, list[dict]]:
    """A run with a validation file, evaluated every 5 of 40 steps; its folder and its JSON events."""
    out = tmp_path_factory.mktemp("runs") / "best"
    done = run_ftkit("run", TINY, *data_args(files), *BEST, *out_arg(out), "--json-logs")
    assert done.returncode == 0, done.stderr[-3000:]
    return out, [json.loads(line) for line in done.stdout.splitlines()]


def adapter_tensors(run: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(run / "adapter" / "adapter_model.safetensors")


@pytest.mark.slow
def test_a_validation_set_gives_a_curve_and_a_best_step(best_run):
    out, events = best_run
    metrics = read_json(out / "metrics.json")
    validation = metrics["validation"]
    history = validation["history"]
    assert [entry["step"] for entry in history] == list(range(5, 41, 5))
    assert validation["metric"] == "accuracy" and validation["higher_is_better"] and validation["examples"] == 60
    best = max(history, key=lambda entry: entry["accuracy"])  # the first of equals: a tie is no improvement
    assert metrics["best_step"] == validation["best_step"] == best["step"]
    assert validation["best_value"] == best["accuracy"] and validation["kept"] == "best"
    assert validation["stopped_early_at"] is None and metrics["steps"] == 40

    (data,) = [event for event in events if event["event"] == "data"]
    assert data["valid_examples"] == 60 and data["message"].startswith("Data: ")
    assert " / 60 validation / " in data["message"]
    seen = [(event["step"], event["value"]) for event in events if event["event"] == "validation"]
    assert seen == [(entry["step"], entry["accuracy"]) for entry in history]
    (kept,) = [event for event in events if event["event"] == "kept"]
    assert kept["step"] == best["step"]
    assert [event["event"] for event in events][-4:] == ["trained", "kept", "evaluation", "done"]

    report = (out / "report.md").read_text(encoding="utf-8")
    assert f"- best validation accuracy: {best['accuracy']:.4f} at step {best['step']}" in report
    assert "- saved weights: the best step's (train.keep)" in report
    assert "![training loss and validation accuracy](loss.png)" in report
    assert (out / "loss.png").is_file()
    assert not (out / "best").exists() and not (out / "checkpoints").exists()


@pytest.mark.slow
def test_keep_best_saves_the_best_steps_weights_not_the_last(best_run, files):
    out, _ = best_run
    validation = read_json(out / "metrics.json")["validation"]
    last = validation["history"][-1]
    assert last["step"] != validation["best_step"] and last["accuracy"] != validation["best_value"], \
        "this recipe must peak before its last step for the test to tell best from last"
    # The saved adapter, evaluated on the validation file, scores what the best step scored.
    done = run_ftkit("eval", str(out), "--data", str(files["valid"]), "--json")
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    assert result["examples"] == 60
    assert result["metrics"]["accuracy"] == pytest.approx(validation["best_value"], abs=1e-9)


@pytest.mark.slow
def test_early_stopping_stops_when_the_metric_cannot_improve(files, tmp_path):
    out = tmp_path / "stopped"
    # A learning rate of 1e-9 changes no prediction: every evaluation after the first ties with it.
    done = run_ftkit("run", TINY, *data_args(files), *out_arg(out), "--set", "train.max_steps=40",
                     "--set", "train.eval_steps=2", "--set", "train.early_stopping_patience=2",
                     "--set", "train.lr=1e-9", "--set", 'train.scheduler="constant"', "--set", "train.warmup=0",
                     "--set", 'train.keep="last"')
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = read_json(out / "metrics.json")
    assert metrics["steps"] == 6  # of max_steps 40
    validation = metrics["validation"]
    assert [entry["step"] for entry in validation["history"]] == [2, 4, 6]
    assert validation["stopped_early_at"] == 6 and metrics["best_step"] == 2
    assert validation["kept"] == "last" and "Kept the weights" not in done.stdout
    assert "Early stopping at step 6: accuracy has not improved in 2 evaluation(s)" in done.stdout
    assert "Trained 6 steps in " in done.stdout and "stopped early" in done.stdout
    report = (out / "report.md").read_text(encoding="utf-8")
    assert "- stopped early at step 6 (train.early_stopping_patience)" in report


@pytest.mark.slow
def test_sigkill_then_resume_restores_the_history_and_the_best_weights(best_run, files, tmp_path):
    reference, _ = best_run
    out = tmp_path / "killed"
    partial = out.with_name("killed.partial")
    process = subprocess.Popen([sys.executable, "-m", "ftkit", "run", TINY, *data_args(files), *BEST, *out_arg(out)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    checkpoint = partial / "checkpoints" / "checkpoint-20"
    deadline = time.monotonic() + 300
    while not (checkpoint / "trainer_state.json").is_file():
        assert process.poll() is None, process.communicate()[1][-2000:]
        assert time.monotonic() < deadline, "no checkpoint-20 after 300 s"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    # The checkpoint records the validation history so far and its best step, whose weights are kept.
    saved = read_json(checkpoint / "trainer_state.json")["stateful_callbacks"]["ValidationCallback"]["attributes"]
    assert [entry["step"] for entry in saved["history"]] == [5, 10, 15, 20]
    assert (partial / "best" / f"step-{saved['best_step']}.safetensors").is_file()

    resumed = run_ftkit("run", TINY, *data_args(files), *BEST, *out_arg(out), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "evaluation(s) kept from the interrupted run; best accuracy" in resumed.stdout
    metrics, expected = read_json(out / "metrics.json"), read_json(reference / "metrics.json")
    for key in ("validation", "best_step", "finetuned", "steps"):
        assert metrics[key] == expected[key], key
    import torch

    tensors, reference_tensors = adapter_tensors(out), adapter_tensors(reference)
    assert tensors.keys() == reference_tensors.keys()
    assert all(torch.equal(tensors[name], reference_tensors[name]) for name in tensors)


@pytest.mark.slow
def test_a_generation_task_validates_by_perplexity(tmp_path):
    out = tmp_path / "sft"
    done = run_ftkit("run", str(ROOT / "recipes" / "sft.toml"), "--set", 'model.id="ftkit/tiny-qwen2"',
                     "--set", 'model.source="builtin"', "--set", "train.max_steps=3", "--set", "train.batch_size=4",
                     "--set", "train.lr=1e-3", "--set", "train.max_seq_len=256", "--set", "eval.max_new_tokens=8",
                     "--set", "train.valid_size=0.25", "--set", "train.eval_steps=1", "--set", "eval.baseline=false",
                     *out_arg(out))
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = read_json(out / "metrics.json")
    validation = metrics["validation"]
    assert validation["metric"] == "perplexity" and not validation["higher_is_better"]
    assert [entry["step"] for entry in validation["history"]] == [1, 2, 3]
    best = min(validation["history"], key=lambda entry: entry["perplexity"])
    assert metrics["best_step"] == best["step"]
    assert metrics["train_examples"] == 6 and validation["examples"] == 2 and metrics["test_examples"] == 2


def test_dry_run_shows_the_validation_split():
    result = CliRunner().invoke(main, ["run", TINY, "--dry-run", "--set", "train.valid_size=0.2"])
    assert result.exit_code == 0, result.output
    assert " 384 train / 96 validation / 120 test examples" in result.output
    assert ("# validation split: 96 examples (20% of the training data, stratified, grouped by source record, "
            "seed 42)") in result.output
    as_json = CliRunner().invoke(main, ["run", TINY, "--dry-run", "--json", "--set", "train.valid_size=0.2"])
    assert json.loads(as_json.output)["data"]["valid_examples"] == 96
