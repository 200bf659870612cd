"""`ftkit run` end to end on the built-in tiny model: real CLI subprocesses, real training on CPU."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from ftkit.cli import main
from tests.conftest import run_ftkit

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.toml"))
FIXTURES = ROOT / "tests" / "fixtures"
QUICKSTART = ROOT / "recipes" / "tiny.toml"
TINY = ["--set", 'model.id="ftkit/tiny-qwen2"', "--set", 'model.source="builtin"']


def toml_str(path: Path) -> str:
    return json.dumps(str(path))  # a JSON string is a valid TOML basic string


@pytest.fixture(scope="module")
def quickstart_run(tmp_path_factory) -> tuple[Path, object]:
    """The whole offline quickstart, once for this module (about half a minute on 2 CPU cores)."""
    out = tmp_path_factory.mktemp("runs") / "quickstart"
    done = run_ftkit("run", str(QUICKSTART), "--set", f"output.dir={toml_str(out)}")
    assert done.returncode == 0, done.stderr[-3000:]
    return out, done


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_every_shipped_recipe_validates(recipe):
    result = CliRunner().invoke(main, ["validate", str(recipe)])
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"{recipe}: ok (task ")


def test_validate_reports_every_error_at_once(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text(
        '[model]\nid = "x"\nsorce = "local"\n[task]\nname = "emotin"\n[train]\nlr = "fast"\nbatch_size = -1\n'
        "[trian]\n[output]\ndir = 'runs/x'\n",
        encoding="utf-8",
    )
    result = CliRunner().invoke(main, ["validate", str(bad)])
    assert result.exit_code == 2
    assert result.output.splitlines() == [
        f"Error: {bad}: 5 errors",
        "  trian: unknown section; did you mean `train`?",
        "  model.sorce: unknown key; did you mean `source`?",
        "  train.lr: expected a number, got a string 'fast'",
        "  train.batch_size: must be at least 1, got -1",
        "  task.name: unknown task 'emotin'; did you mean `emotion`?",
    ]


def test_set_overrides_and_dry_run_prints_the_resolved_recipe():
    result = CliRunner().invoke(main, ["run", str(QUICKSTART), "--dry-run", "--set", "train.lr=2e-5",
                                       "--set", 'method.name="qlora"'])
    assert result.exit_code == 0, result.output
    assert "lr = 2e-05" in result.output
    assert 'name = "qlora"' in result.output
    assert f'train_file = "{ROOT / "plugins" / "data" / "emotion_quickstart.jsonl"}"' in result.output
    bad = CliRunner().invoke(main, ["run", str(QUICKSTART), "--dry-run", "--set", "lr=1"])
    assert bad.exit_code == 2
    assert "expected SECTION.KEY=VALUE" in bad.output


def test_quickstart_beats_the_base_model_and_leaves_a_complete_run_folder(quickstart_run):
    out, done = quickstart_run
    assert not out.with_name(out.name + ".partial").exists()
    for name in ("adapter/adapter_model.safetensors", "adapter/adapter_config.json", "adapter/tokenizer.json",
                 "labels.json", "recipe.toml", "metrics.json", "report.md", "loss.png", "confusion_matrix.png",
                 "manifest.json", "data/test.jsonl", "predictions.jsonl"):
        assert (out / name).is_file(), name
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert not list(out.rglob("*.bin")) and not list(out.rglob("*.pt"))  # safetensors only
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["test_examples"] == 120 and metrics["train_examples"] == 480
    assert metrics["random_head"]["accuracy"] < 0.35  # six classes: the untrained head is near chance
    best = max(metrics["baselines"][name]["accuracy"] for name in ("majority", "zero_shot"))
    assert metrics["finetuned"]["accuracy"] >= best + 0.3
    assert metrics["verdict"]["result"] == "better" and metrics["verdict"]["p_value"] < 0.05
    report = (out / "report.md").read_text(encoding="utf-8")
    assert "| accuracy **(headline)** |" in report
    against = {"majority": "majority baseline", "zero_shot": "zero-shot base model"}[metrics["verdict"]["against"]]
    assert f"The fine-tuned model is **better than** the {against} on `accuracy`" in report
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["seed"] == 42 and manifest["versions"]["transformers"]
    assert set(manifest["data_sha256"]) == {"train_file", "test_split"}
    assert "fine-tuned: accuracy = " in done.stdout


def test_saved_adapter_reloads_and_reproduces_the_reported_metrics(quickstart_run):
    import torch
    from ftkit_plugins.emotion import TASK
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from ftkit.evaluator import predict_classifier
    from ftkit.tasks import Example
    from ftkit.tiny import tiny_model_path

    out, _ = quickstart_run
    labels = json.loads((out / "labels.json").read_text(encoding="utf-8"))["labels"]
    base = AutoModelForSequenceClassification.from_pretrained(
        tiny_model_path(), num_labels=len(labels), dtype=torch.float32
    )
    model = PeftModel.from_pretrained(base, out / "adapter").eval()
    tokenizer = AutoTokenizer.from_pretrained(out / "adapter")
    base.config.pad_token_id = tokenizer.pad_token_id
    rows = [json.loads(line) for line in (out / "data" / "test.jsonl").read_text(encoding="utf-8").splitlines()]
    examples = [Example(input=r["input"], target=r["target"]) for r in rows]
    predictions = predict_classifier(model, tokenizer, examples, labels, 32, 64, "check")
    reproduced = TASK.metrics(predictions, [e.references for e in examples])
    reported = json.loads((out / "metrics.json").read_text(encoding="utf-8"))["finetuned"]
    assert reproduced["accuracy"] == pytest.approx(reported["accuracy"])
    assert reproduced["macro_f1"] == pytest.approx(reported["macro_f1"])


def test_an_existing_run_folder_is_not_overwritten(quickstart_run):
    out, _ = quickstart_run
    before = (out / "metrics.json").read_bytes()
    again = run_ftkit("run", str(QUICKSTART), "--set", f"output.dir={toml_str(out)}")
    assert again.returncode == 2
    assert again.stderr == f"Error: output.dir: {out} already exists; pass --overwrite or choose another dir\n"
    assert (out / "metrics.json").read_bytes() == before


def test_the_manifest_records_what_the_run_was_made_from(quickstart_run):
    import tomllib

    out, _ = quickstart_run
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["made_by"] == "ftkit"
    assert {"ftkit", "torch", "transformers", "peft", "bitsandbytes"} <= set(manifest["versions"])
    assert manifest["model_revision"]["fingerprint"].startswith("sha256:")  # a built-in model: no hub commit
    assert manifest["recipe"] == tomllib.loads((out / "recipe.toml").read_text(encoding="utf-8"))
    assert manifest["recipe"]["train"]["seed"] == manifest["seed"] == 42


def test_quickstart_killed_mid_training_resumes_to_the_uninterrupted_result(quickstart_run, tmp_path):
    """The acceptance test of issue 18: the recipe as shipped (no train.save_steps), kill -9, --resume."""
    import signal
    import subprocess
    import sys

    from tests.test_resume import assert_same_results, wait_for_checkpoint

    reference, _ = quickstart_run
    out = tmp_path / "quickstart"
    partial = tmp_path / "quickstart.partial"
    command = [sys.executable, "-m", "ftkit", "run", str(QUICKSTART), "--set", f"output.dir={toml_str(out)}"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_checkpoint(process, partial / "checkpoints" / "checkpoint-60")  # the second epoch's end
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    resumed = run_ftkit("run", str(QUICKSTART), "--set", f"output.dir={toml_str(out)}", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert re.search(rf"^Resuming from {re.escape(str(partial))}/checkpoints/checkpoint-(60|90|120)$",
                     resumed.stdout, re.MULTILINE), resumed.stdout[-3000:]
    assert (out / "metrics.json").read_bytes() == (reference / "metrics.json").read_bytes()
    assert_same_results(reference, out)


def test_overwrite_replaces_a_run_folder_ftkit_made(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "manifest.json").write_text('{"made_by": "ftkit", "versions": {"ftkit": "0.1.0"}}', encoding="utf-8")
    (out / "old.txt").write_text("from the run before", encoding="utf-8")
    done = run_ftkit("run", str(QUICKSTART), "--set", "train.max_steps=3", "--set", "eval.baseline=false",
                     "--set", "eval.max_examples=12", "--set", f"output.dir={toml_str(out)}", "--overwrite")
    assert done.returncode == 0, done.stderr[-3000:]
    assert not (out / "old.txt").exists() and (out / "metrics.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_bad_data_fails_with_file_and_line_and_leaves_no_run_folder(tmp_path):
    data = tmp_path / "emotion.jsonl"
    data.write_text('{"text": "今天很開心", "emotion": "喜悅"}\n{"text": "oops"\n', encoding="utf-8")
    out = tmp_path / "run"
    done = run_ftkit("run", str(QUICKSTART), "--set", f"task.train_file={toml_str(data)}",
                     "--set", f"output.dir={toml_str(out)}")
    assert done.returncode == 1
    assert done.stderr.startswith(f"Error: {data}:2: not valid JSON")
    assert "Traceback" not in done.stderr
    assert not out.exists() and not (tmp_path / "run.partial").exists()


def test_qlora_4bit_trains_on_cpu_with_a_generative_label(tmp_path):
    """The real QLoRA path: bitsandbytes NF4 on CPU, LoRA, label-restricted decoding."""
    out = tmp_path / "qlora"
    done = run_ftkit("run", str(QUICKSTART), "--set", 'method.name="qlora"', "--set", 'train.head="causal"',
                     "--set", "train.max_steps=3", "--set", "train.max_seq_len=128", "--set", "eval.max_examples=12",
                     "--set", f"output.dir={toml_str(out)}")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Notice: QLoRA on CPU: bitsandbytes 4-bit NF4 runs here" in done.stdout
    config = json.loads((out / "adapter" / "adapter_config.json").read_text(encoding="utf-8"))
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["method"] == "qlora" and metrics["head"] == "causal" and metrics["steps"] == 3
    labels = {"喜悅", "悲傷", "憤怒", "恐懼", "驚訝", "厭惡"}
    predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(predictions) == 12 and {p["prediction"] for p in predictions} <= labels


def test_qlora_that_cannot_load_on_cuda_is_an_error_not_a_silent_switch_to_lora(monkeypatch):
    """On CUDA another method means another memory use than the one checked: a failed 4-bit load stops the run.

    No GPU here: CUDA is reported present, and the real 4-bit load onto device 0 fails as it does
    where bitsandbytes and CUDA do not match.
    """
    import torch

    from ftkit.errors import ModelError
    from ftkit.modeling import load_model, load_tokenizer, quantization_config
    from ftkit.recipe import load_recipe
    from ftkit.tiny import tiny_model_path

    recipe = load_recipe(QUICKSTART, overrides=['method.name="qlora"', 'model.dtype="float32"'])
    tokenizer = load_tokenizer(tiny_model_path(), recipe)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(ModelError, match=r'method.name = "qlora": 4-bit loading failed on CUDA \(.+\); check that '
                                         r'bitsandbytes matches this CUDA .+ or set method.name = "lora"'):
        load_model(tiny_model_path(), recipe, "causal", None, tokenizer)
    # The one 4-bit config (training, reloading a run, the benches): NF4 with double quantization,
    # what the estimator's NF4_BYTES_PER_PARAM counts.
    quant = quantization_config(torch.bfloat16)
    assert (quant.load_in_4bit, quant.bnb_4bit_quant_type, quant.bnb_4bit_use_double_quant) == (True, "nf4", True)
    assert quant.bnb_4bit_compute_dtype == torch.bfloat16


@pytest.mark.parametrize(
    ("task", "data", "expected"),
    [
        ("huanhuan-chat", FIXTURES / "huanhuan.json", {"bleu", "rougeL", "perplexity"}),
        ("squad-qa", FIXTURES / "squad_v1.json", {"exact_match", "f1", "perplexity"}),
    ],
)
def test_generation_tasks_train_with_masked_prompts_and_report_their_metrics(tmp_path, task, data, expected):
    out = tmp_path / task
    recipe = ROOT / "recipes" / f"{task}.toml"
    done = run_ftkit("run", str(recipe), *TINY, "--set", 'method.name="lora"', "--set", "train.max_steps=4",
                     "--set", "train.max_seq_len=128", "--set", "eval.max_new_tokens=8",
                     "--set", f"task.train_file={toml_str(data)}", "--set", f"output.dir={toml_str(out)}")
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert expected <= set(metrics["finetuned"]) and expected <= set(metrics["baselines"]["zero_shot"])
    assert metrics["baselines"]["majority"] is None and metrics["verdict"]["against"] == "zero_shot"
    assert metrics["finetuned"]["perplexity"] > 1.0


def test_classifier_head_task_with_dropped_labels_runs(tmp_path):
    out = tmp_path / "bank"
    done = run_ftkit("run", str(ROOT / "recipes" / "bank-intent.toml"), *TINY, "--set", "train.max_steps=4",
                     "--set", 'method.target_modules=["q_proj","v_proj"]', "--set", 'task.drop_labels=["investments"]',
                     "--set", f"output.dir={toml_str(out)}")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "WARNING" not in done.stderr  # dropped on purpose: counted, not warned row by row
    labels = json.loads((out / "labels.json").read_text(encoding="utf-8"))["labels"]
    assert labels == ["balance", "card_lost", "fraud_risk", "other", "refund"]  # the data's own, sorted
    assert "dropped from the training data: 1 (label in task.drop_labels)" in (out / "report.md").read_text(encoding="utf-8")
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["headline_metric"] == "macro_f1" and 0.0 <= metrics["finetuned"]["macro_f1"] <= 1.0


def test_hc3_runs_end_to_end_from_its_public_layout(tmp_path):
    out = tmp_path / "hc3"
    done = run_ftkit("run", str(ROOT / "recipes" / "hc3.toml"), *TINY, "--set", "train.max_steps=4",
                     "--set", "train.max_seq_len=96", "--set", "task.test_size=0.3",
                     "--set", f"task.train_file={toml_str(FIXTURES / 'hc3_sample.jsonl')}",
                     "--set", f"output.dir={toml_str(out)}")
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["headline_metric"] == "accuracy" and metrics["steps"] == 4
    labels = json.loads((out / "labels.json").read_text(encoding="utf-8"))
    assert labels["head"] == "classifier" and labels["labels"] == ["human", "chatgpt"]
    assert 0.0 <= metrics["finetuned"]["accuracy"] <= 1.0 and "accuracy" in metrics["random_head"]
    assert metrics["verdict"]["against"] in ("majority", "zero_shot")


def test_run_folder_files_get_the_usual_permissions(quickstart_run):
    out, done = quickstart_run
    umask = os.umask(0)
    os.umask(umask)
    # safetensors and temp folders write owner-only files; a server's user must be able to read them.
    for path in (out / "adapter" / "adapter_model.safetensors", out / "metrics.json"):
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask, path
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask
    assert done.stdout.rstrip().endswith(f"Run folder: {out} (report.md, metrics.json, adapter/)")
