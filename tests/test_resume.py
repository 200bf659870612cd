"""Crashes lose nothing: determinism, SIGKILL then --resume, and Ctrl-C (real `ftkit run` processes)."""

from __future__ import annotations

import json
import os
import random
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import run_ftkit

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "recipes" / "tiny.toml")
SHORT = ["--set", "train.max_steps=60", "--set", "train.save_steps=10"]


def out_arg(path: Path) -> list[str]:
    return ["--set", f"output.dir={json.dumps(str(path))}"]


def adapter_tensors(run: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(run / "adapter" / "adapter_model.safetensors")


def assert_same_results(a: Path, b: Path) -> None:
    import torch

    metrics_a = json.loads((a / "metrics.json").read_text(encoding="utf-8"))
    metrics_b = json.loads((b / "metrics.json").read_text(encoding="utf-8"))
    for key in ("baselines", "random_head", "ci95", "verdict"):
        assert metrics_a[key] == metrics_b[key], key
    assert metrics_a["finetuned"] == metrics_b["finetuned"]
    tensors_a, tensors_b = adapter_tensors(a), adapter_tensors(b)
    assert tensors_a.keys() == tensors_b.keys()
    for name in tensors_a:
        assert torch.equal(tensors_a[name], tensors_b[name]), name


def start_run(out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "ftkit", "run", QUICKSTART, *SHORT, *out_arg(out), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_checkpoint(process: subprocess.Popen, checkpoint: Path, timeout: float = 300) -> None:
    """Block until ``checkpoint`` is complete (marked so, see ftkit.training.mark_complete)."""
    from ftkit.training import COMPLETE_MARK

    deadline = time.monotonic() + timeout
    while not (checkpoint / COMPLETE_MARK).is_file():
        assert process.poll() is None, f"the run ended before {checkpoint.name}: {process.communicate()[1][-2000:]}"
        assert time.monotonic() < deadline, f"no {checkpoint.name} after {timeout} s"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reference") / "run"
    done = run_ftkit("run", QUICKSTART, *SHORT, *out_arg(out))
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def test_two_runs_with_the_same_seed_are_identical(reference, tmp_path):
    again = tmp_path / "again"
    done = run_ftkit("run", QUICKSTART, *SHORT, *out_arg(again))
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_results(reference, again)


def test_sigkill_mid_training_then_resume_matches_an_uninterrupted_run(reference, tmp_path):
    out = tmp_path / "killed"
    kill_at = int(os.environ.get("FTKIT_TEST_KILL_AFTER", 0)) or random.Random().choice([10, 20, 30, 40, 50])
    print(f"killing after checkpoint-{kill_at}")
    process = start_run(out)
    wait_for_checkpoint(process, out.with_name("killed.partial") / "checkpoints" / f"checkpoint-{kill_at}")
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL
    assert not out.exists(), "a killed run must not look complete"
    assert (out.with_name("killed.partial") / "baseline.json").is_file()

    resumed = run_ftkit("run", QUICKSTART, *SHORT, *out_arg(out), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "baselines: evaluations kept from the interrupted run" in resumed.stdout
    assert "Resuming from " in resumed.stdout and "/checkpoints/checkpoint-" in resumed.stdout
    assert not out.with_name("killed.partial").exists()
    assert not (out / "checkpoints").exists() and not (out / "baseline.json").exists()
    assert_same_results(reference, out)


def test_ctrl_c_saves_a_checkpoint_where_it_stops_and_names_it(tmp_path):
    from ftkit.training import newest_checkpoint

    out = tmp_path / "interrupted"
    process = start_run(out)
    partial = out.with_name("interrupted.partial")
    wait_for_checkpoint(process, partial / "checkpoints" / "checkpoint-10")
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr[-2000:]
    assert "Traceback" not in stderr
    assert stderr.rstrip().endswith("Error: interrupted")
    checkpoint = newest_checkpoint(partial / "checkpoints")
    assert f"Checkpoint at step {checkpoint.name.rpartition('-')[2]} (stopping on SIGINT): {checkpoint}" in stdout
    command = shlex.join(["ftkit", "run", QUICKSTART, *SHORT, *out_arg(out), "--resume"])
    assert stdout.splitlines()[-1] == f"Interrupted; last checkpoint: {checkpoint}. Continue with: {command}"
    assert partial.is_dir() and not out.exists()


def test_resume_refuses_a_changed_recipe_and_a_missing_run(tmp_path):
    out = tmp_path / "run"
    missing = run_ftkit("run", QUICKSTART, *out_arg(out), "--resume")
    assert missing.returncode == 2
    assert missing.stderr == f"Error: --resume: no interrupted run in {out}.partial; run without --resume\n"
    partial = out.with_name("run.partial")
    partial.mkdir()
    (partial / "recipe.toml").write_text("[model]\nid = 'something else'\n", encoding="utf-8")
    changed = run_ftkit("run", QUICKSTART, *out_arg(out), "--resume")
    assert changed.returncode == 2
    assert "the recipe differs from the interrupted run's" in changed.stderr
    assert os.listdir(partial) == ["recipe.toml"]  # nothing of the interrupted run was touched
