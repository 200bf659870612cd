"""bench/gpu_memory.py runs end to end before it ever meets a GPU: ``--smoke`` takes its whole code
path (ftkit's load_model, the training steps, ftkit's evaluator, the estimator's phases, the table)
on the CPU with a tiny shape. Device time is scarce; a crash there would waste it."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "gpu_memory.py"


@pytest.mark.slow
def test_smoke_run_prints_a_row_for_every_method_and_phase(tmp_path: Path) -> None:
    rows_file = tmp_path / "rows.json"
    done = subprocess.run([sys.executable, str(BENCH), "--smoke", "--json", str(rows_file)], capture_output=True,
                          text=True, timeout=300, check=False, env=os.environ | {"CUDA_VISIBLE_DEVICES": ""})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert "| model | method | ckpt | phase | estimate GB | max allocated GB | max reserved GB | error vs reserved |" \
        in lines
    for method in ("lora", "qlora", "full"):
        for ckpt in ("off", "on"):
            for phase in ("train", "eval"):
                row = next((line for line in lines if line.startswith(f"| smoke | {method} | {ckpt} | {phase} |")), None)
                assert row is not None, f"no row for {method} ckpt {ckpt} {phase}:\n{done.stdout}"
                cells = [cell.strip() for cell in row.strip("|").split("|")]
                estimate, allocated, reserved, error = cells[4:]
                assert float(estimate) >= 0, row  # the estimator's phase, in GB
                assert (allocated, reserved, error) == ("n/a", "n/a", "n/a"), row  # nothing measured on the CPU
    assert "Goal: not checked" in done.stdout
    rows = json.loads(rows_file.read_text(encoding="utf-8"))["rows"]
    assert len(rows) == 12 and all(row["estimate"] > 0 and row["status"] == "ok" for row in rows), rows
    assert "failed" not in done.stdout
    # Generation ran to max_new_tokens, from prompts cut to the whole sequence: the KV cache the
    # estimate assumes.
    assert "generate prompt+new tokens per batch: 32+8, 32+8" in done.stdout


def test_without_cuda_it_says_so_in_one_line() -> None:
    done = subprocess.run([sys.executable, str(BENCH)], capture_output=True, text=True, timeout=120, check=False,
                          env=os.environ | {"CUDA_VISIBLE_DEVICES": ""})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines() == [
        "No CUDA device: nothing measured (bench/gpu_memory.py --smoke checks the script on the CPU)."]


def bench_module():
    spec = importlib.util.spec_from_file_location("gpu_memory_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_the_table_and_the_verdict_on_measured_rows() -> None:
    bench = bench_module()
    rows = [bench.Row("0.5B", "lora", False, "train", 10_500_000_000, 9_800_000_000, 10_000_000_000),
            bench.Row("0.5B", "lora", False, "eval", 2_160_000_000, 2_000_000_000, 2_400_000_000)]
    table = bench.table(rows).splitlines()
    assert table[2] == "| 0.5B | lora | off | train | 10.50 | 9.80 | 10.00 | +5.0% |"
    assert table[3] == "| 0.5B | lora | off | eval | 2.16 | 2.00 | 2.40 | -10.0% |"
    assert bench.verdict(rows).startswith("Goal (every case within ±10% of the reserved peak): MET; worst -10.0%")
    rows[1].estimate = 2_100_000_000
    assert "NOT MET; worst -12.5% (0.5B lora ckpt off eval)" in bench.verdict(rows)
    rows.append(bench.Row("1.5B", "full", True, "train", 30_000_000_000, status="failed: OutOfMemoryError"))
    assert bench.table(rows).splitlines()[-1] == "| 1.5B | full | on | train | 30.00 | n/a | n/a | failed: OutOfMemoryError |"
    rows[1].estimate = 2_160_000_000
    assert "NOT MET" in bench.verdict(rows) and "1 of 3 rows not measured" in bench.verdict(rows)
