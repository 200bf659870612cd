"""Several processes: real 2-process `ftkit run` on the CPU (gloo), the sharded sampler, DeepSpeed
pass-through validation, and the estimator's per-device view of data parallelism."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner

from ftkit.cli import main
from ftkit.distributed import unshard
from ftkit.estimator import Settings, estimate
from ftkit.model_configs import resolve_shape
from tests.conftest import run_ftkit

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "recipes" / "tiny.toml"
STEPS = ["--set", "train.max_steps=40"]
BATCH = 8  # per process; the one-process reference trains at 2 x BATCH


def out_arg(path: Path) -> list[str]:
    return ["--set", f"output.dir={json.dumps(str(path))}"]


def files_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def average_loss(stdout: str) -> float:
    """The run's mean training loss, from `Trained N steps in X s (final loss F, average loss A)`."""
    (line,) = [line for line in stdout.splitlines() if line.startswith("Trained ")]
    return float(line.rsplit("average loss ", 1)[1].rstrip(")"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """The same training twice: 2 processes x batch 8, and 1 process x batch 16."""
    two_dir = tmp_path_factory.mktemp("two")
    two = run_ftkit("run", str(QUICKSTART), "--nproc", "2", *STEPS, "--set", f"train.batch_size={BATCH}",
                    *out_arg(two_dir / "run"))
    assert two.returncode == 0, two.stderr[-3000:]
    one_dir = tmp_path_factory.mktemp("one")
    one = run_ftkit("run", str(QUICKSTART), *STEPS, "--set", f"train.batch_size={2 * BATCH}", *out_arg(one_dir / "run"))
    assert one.returncode == 0, one.stderr[-3000:]
    return {"two": (two_dir, two), "one": (one_dir, one)}


def test_two_processes_write_one_run_folder_once(runs):
    folder, done = runs["two"]
    assert sorted(p.name for p in folder.iterdir()) == ["run"]  # no stray .partial, no second folder
    run = folder / "run"
    one = runs["one"][0] / "run"
    # Exactly the files of a one-process run: one report, one adapter, one TensorBoard log.
    tensorboard = [name for name in files_under(run) if name.startswith("tensorboard/")]
    assert len(tensorboard) == 1
    assert [n for n in files_under(run) if n not in tensorboard] == \
           [n for n in files_under(one) if not n.startswith("tensorboard/")]
    assert (run / "adapter" / "adapter_model.safetensors").is_file() and (run / "report.md").is_file()
    # Rank 0 alone prints: every line of the summary once.
    for start in ("Task emotion", "2 processes: effective batch 8 (batch_size) x 1 (grad_accum) x 2 = 16", "Data: ",
                  "Model: ", "majority baseline (", "zero-shot base model: accuracy = ",
                  "base model, random classifier head (not a baseline): accuracy = ", "Trained 40 steps", "fine-tuned: accuracy = ", "Run folder: "):
        assert sum(line.startswith(start) for line in done.stdout.splitlines()) == 1, (start, done.stdout)
    assert "Error" not in done.stderr and "Traceback" not in done.stderr and "Warning" not in done.stderr
    report = (run / "report.md").read_text(encoding="utf-8")
    assert "- 2 processes: effective batch 8 (batch_size) x 1 (grad_accum) x 2 = 16" in report


def test_two_processes_match_one_process_with_the_same_effective_batch(runs):
    two_run, two = runs["two"][0] / "run", runs["two"][1]
    one_run, one = runs["one"][0] / "run", runs["one"][1]
    metrics_two = json.loads((two_run / "metrics.json").read_text(encoding="utf-8"))
    metrics_one = json.loads((one_run / "metrics.json").read_text(encoding="utf-8"))
    # The sampler deals the same global batches in the same order, so each optimizer step sees the
    # same 16 examples; results differ only in float rounding (each rank pads its own micro-batch,
    # and DDP sums the two ranks' gradients in another order than one backward pass does), which
    # can flip a near-tie prediction. Hence a tolerance, not equality.
    assert metrics_two["test_examples"] == metrics_one["test_examples"] == 120  # gathered from both ranks
    assert metrics_two["steps"] == metrics_one["steps"] == 40
    assert abs(metrics_two["finetuned"]["accuracy"] - metrics_one["finetuned"]["accuracy"]) <= 0.1
    assert abs(metrics_two["random_head"]["accuracy"] - metrics_one["random_head"]["accuracy"]) <= 0.1
    assert abs(metrics_two["baselines"]["zero_shot"]["accuracy"] - metrics_one["baselines"]["zero_shot"]["accuracy"]) \
        <= 0.05
    assert average_loss(two.stdout) == pytest.approx(average_loss(one.stdout), rel=0.03)
    assert metrics_two["finetuned"]["accuracy"] > metrics_two["random_head"]["accuracy"]

    # The gathered predictions are back in test-split order: the base model (the same on both
    # sides) predicts the same label for (nearly) every example.
    def rows(run: Path) -> list[dict]:
        return [json.loads(line) for line in (run / "predictions.jsonl").read_text(encoding="utf-8").splitlines()]

    assert (two_run / "data" / "test.jsonl").read_bytes() == (one_run / "data" / "test.jsonl").read_bytes()
    same = sum(a["random_head_prediction"] == b["random_head_prediction"] for a, b in zip(rows(two_run), rows(one_run)))
    assert same >= 0.95 * 120


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_an_error_stops_every_rank_with_one_line_from_rank_0(tmp_path):
    """Under plain torchrun: rank 0 refuses an existing folder, rank 1 stops too (no hang)."""
    out = tmp_path / "exists"
    out.mkdir()
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
         "-m", "ftkit", "run", str(QUICKSTART), *out_arg(out)],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("Error: ")]
    assert errors == [f"Error: output.dir: {out} already exists; pass --overwrite or choose another dir"]
    assert list(tmp_path.iterdir()) == [out] and not list(out.iterdir())


def test_nproc_reports_a_data_error_as_one_line_and_removes_the_partial_folder(tmp_path):
    data = tmp_path / "emotion.jsonl"
    data.write_text('{"text": "今天很開心", "emotion": "喜悅"}\n{"text": "oops"\n', encoding="utf-8")
    out = tmp_path / "run"
    done = run_ftkit("run", str(QUICKSTART), "--nproc", "2", "--set", f"task.train_file={json.dumps(str(data))}",
                     *out_arg(out))
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        f"Error: {data}:2: not valid JSON (column 17: Expecting ',' delimiter); fix or remove the line"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["emotion.jsonl"]


def test_nproc_under_a_launcher_is_refused_and_dry_run_estimates_per_device():
    refused = CliRunner().invoke(main, ["run", str(QUICKSTART), "--nproc", "2"], env={"WORLD_SIZE": "2"})
    assert refused.exit_code == 2
    assert refused.output == ("Error: --nproc: this is already one of 2 processes started by a launcher; "
                              "drop --nproc\n")
    dry = CliRunner().invoke(main, ["run", str(QUICKSTART), "--nproc", "2", "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert "per device of 2, effective batch 32)" in dry.output


def test_sharded_sampler_deals_the_one_process_batches_in_a_seed_and_epoch_order():
    """accelerate's own sharding of ftkit's sampler: rank 0 and rank 1 together take exactly the
    batches one process takes at twice the batch size, and the order depends on (seed, epoch) only."""
    from accelerate.data_loader import prepare_data_loader
    from torch.utils.data import DataLoader

    from ftkit.training import seeded_length_grouped_sampler

    lengths = [(i * 37) % 61 + 3 for i in range(96)]
    per_rank, world, seed = 4, 2, 42

    def one_process(epoch: int) -> list[list[int]]:
        sampler = seeded_length_grouped_sampler(lengths, per_rank * world, seed)
        sampler.set_epoch(epoch)
        return [batch.tolist() for batch in DataLoader(range(96), batch_size=per_rank * world, sampler=sampler)]

    def rank_batches(rank: int, epoch: int) -> list[list[int]]:
        loader = DataLoader(range(96), batch_size=per_rank,
                            sampler=seeded_length_grouped_sampler(lengths, per_rank * world, seed))
        shard = prepare_data_loader(loader, num_processes=world, process_index=rank, put_on_device=False)
        shard.set_epoch(epoch)  # what the Trainer calls at each epoch, through accelerate
        return [batch.tolist() for batch in shard]

    for epoch in (0, 1):
        ranks = [rank_batches(rank, epoch) for rank in range(world)]
        assert [a + b for a, b in zip(*ranks)] == one_process(epoch)
        assert ranks == [rank_batches(rank, epoch) for rank in range(world)]  # a fresh sampler: the same order
    assert one_process(0) != one_process(1)


def test_unshard_restores_the_order_of_strided_shards():
    items = list(range(11))
    parts = [items[rank::3] for rank in range(3)]
    assert unshard(parts) == items


def ds_recipe(tmp_path: Path, deepspeed: str) -> Path:
    text = QUICKSTART.read_text(encoding="utf-8").replace(
        'train_file = "../plugins/data/emotion_quickstart.jsonl"',
        f'train_file = {json.dumps(str(ROOT / "plugins" / "data" / "emotion_quickstart.jsonl"))}',
    ).replace("[train]\n", f"[train]\ndeepspeed = {json.dumps(deepspeed)}\n")
    recipe = tmp_path / "recipes" / "ds.toml"
    recipe.parent.mkdir()
    recipe.write_text(text, encoding="utf-8")
    return recipe


def test_deepspeed_config_is_resolved_against_the_recipe_and_validated(tmp_path):
    recipe = ds_recipe(tmp_path, "ds_zero2.json")
    config = tmp_path / "recipes" / "ds_zero2.json"
    config.write_text('{"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": "auto"}',
                      encoding="utf-8")
    ok = CliRunner().invoke(main, ["validate", str(recipe), "--json"])
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.output)["train"]["deepspeed"] == str(config)

    config.unlink()
    missing = CliRunner().invoke(main, ["validate", str(recipe)])
    assert missing.exit_code == 2
    assert missing.output == (f"Error: {recipe}: train.deepspeed: {config} does not exist; give the DeepSpeed "
                              "JSON config's path, relative to the recipe\n")

    config.write_text('{"zero_optimization": {"stage": 3}}', encoding="utf-8")
    stage3 = CliRunner().invoke(main, ["validate", str(recipe)])
    assert stage3.exit_code == 2
    assert stage3.output.startswith(f"Error: {recipe}: train.deepspeed: {config} uses ZeRO stage 3")
    assert len(stage3.output.splitlines()) == 1


def test_estimator_adds_ddp_gradient_buckets_per_device():
    shape = resolve_shape("1.5B")
    for method, grad_bytes in (("lora", 4), ("full", 4)):  # full: fp32 master weights, fp32 gradients
        single = estimate(shape, Settings(seq=256, batch=4, method=method))
        ddp = estimate(shape, replace(single.settings, gpus=4))
        buckets = [t for t in ddp.overhead if t.name == "DDP gradient buckets"]
        assert [t.bytes for t in buckets] == [single.params_trainable * grad_bytes]
        assert ddp.total - single.total == buckets[0].bytes  # the rest is the same per device
        assert ddp.settings.effective_batch == 16 and single.settings.effective_batch == 4
    with pytest.raises(Exception, match="--gpus: 0 is not a positive whole number"):
        Settings(seq=256, gpus=0)


def test_estimate_cli_gpus_shows_per_device_and_the_effective_batch():
    done = run_ftkit("estimate", "--model", "1.5B", "--seq", "256", "--batch", "4", "--grad-accum", "2",
                     "--gpus", "4", "--method", "lora", "--json")
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert data["settings"]["gpus"] == 4 and data["effective_batch"] == 32 and data["per_device"] is True
    assert any(t["name"] == "DDP gradient buckets" for t in data["detail"]["overhead"])
    text = run_ftkit("estimate", "--model", "1.5B", "--seq", "256", "--batch", "4", "--grad-accum", "2", "--gpus", "4")
    assert "seq 256 × batch 4 per device × accum 2" in text.stdout
    assert "Effective batch: 32 = batch 4 × accum 2 × 4 GPUs (DDP); memory below is per device" in text.stdout
    assert "MEMORY PER DEVICE" in text.stdout
    bad = run_ftkit("estimate", "--model", "1.5B", "--gpus", "0")
    assert bad.returncode == 2 and bad.stderr == "Error: --gpus: 0 must be at least 1\n"


EXIT_SCRIPT = """
import atexit, sys
from ftkit import distributed

class Teardown:
    def __del__(self):
        print("torn down", flush=True)  # only the interpreter's teardown frees this global

keep = Teardown()
atexit.register(lambda: print("atexit ran"))
sys.stdout.write("written, not flushed; ")
{end}
"""


@pytest.mark.parametrize("end, torn_down", [("distributed.exit_process(3)", False), ("sys.exit(3)", True)])
def test_a_rank_exits_with_its_code_after_atexit_but_without_the_interpreters_teardown(end, torn_down):
    """A rank's last step (ftkit.distributed.exit_process): DDP leaves gloo's threads running, and
    the interpreter's teardown can abort on them; atexit handlers and buffered output still count."""
    done = subprocess.run([sys.executable, "-c", EXIT_SCRIPT.format(end=end)], capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 3, done.stderr
    assert done.stdout.startswith("written, not flushed; atexit ran\n")
    assert ("torn down" in done.stdout) is torn_down  # sys.exit: the control that shows the difference
