"""Using a finished run: `ftkit predict`, `eval`, `chat` and `merge` on real tiny-model runs.

Each run is trained once per module (real `ftkit run` subprocesses on CPU, a few steps each); the
commands then run in-process through Click (one torch import for the module), except where a real
terminal or stdin matters (chat), which runs as a subprocess.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from ftkit.cli import main
from tests.conftest import heavy_imports_after, run_ftkit

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "recipes" / "tiny.toml"
HUANHUAN = ROOT / "recipes" / "huanhuan-chat.toml"
FIXTURES = ROOT / "tests" / "fixtures"
TINY = ["--set", 'model.id="ftkit/tiny-qwen2"', "--set", 'model.source="builtin"']
QUICK = ["--set", "eval.baseline=false", "--set", "train.max_seq_len=64"]
LABELS = ["喜悅", "悲傷", "憤怒", "恐懼", "驚訝", "厭惡"]


def toml_str(path: Path) -> str:
    return json.dumps(str(path))  # a JSON string is a valid TOML basic string


def train(out: Path, recipe: Path, *overrides: str) -> Path:
    done = run_ftkit("run", str(recipe), *overrides, "--set", f"output.dir={toml_str(out)}")
    assert done.returncode == 0, done.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="module")
def classifier_run(runs_dir) -> Path:
    """Quickstart as shipped (classifier head, LoRA), shortened."""
    return train(runs_dir / "classifier", QUICKSTART, *QUICK, "--set", "train.max_steps=20",
                 "--set", "eval.max_examples=48")


@pytest.fixture(scope="module")
def causal_run(runs_dir) -> Path:
    """Quickstart with the generative-label head: label-restricted scoring."""
    return train(runs_dir / "causal", QUICKSTART, *QUICK, "--set", 'train.head="causal"', "--set", "train.max_steps=6",
                 "--set", "eval.max_examples=24")


@pytest.fixture(scope="module")
def chat_run(runs_dir) -> Path:
    """A generation task with a system prompt (huanhuan-chat) on the tiny model."""
    return train(runs_dir / "huanhuan", HUANHUAN, *TINY, "--set", 'method.name="lora"', "--set", "train.max_steps=3",
                 "--set", "train.grad_accum=1", "--set", "train.max_seq_len=128", "--set", "eval.max_new_tokens=8",
                 "--set", "eval.do_sample=false", "--set", "eval.baseline=false",
                 "--set", f"task.train_file={toml_str(FIXTURES / 'huanhuan.json')}")


@pytest.fixture(scope="module")
def qlora_run(runs_dir) -> Path:
    """bitsandbytes 4-bit NF4 base + LoRA, causal head."""
    return train(runs_dir / "qlora", QUICKSTART, *QUICK, "--set", 'method.name="qlora"', "--set", 'train.head="causal"',
                 "--set", "train.max_steps=3", "--set", "eval.max_examples=6")


def ftkit(*args: str):  # noqa: ANN201 - click's Result
    """``ftkit ARGS`` in this process: stdout and stderr apart, exceptions caught by the CLI as in real use."""
    return CliRunner().invoke(main, [str(a) for a in args])


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def assert_one_line_error(result, code: int, start: str) -> None:  # noqa: ANN001
    assert result.exit_code == code, result.output
    assert result.stderr.startswith(f"Error: {start}"), result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert result.stdout == ""


# -- commands exist and stay light ---------------------------------------------------------------

def test_commands_are_registered_without_importing_torch():
    listing = ftkit("--help").stdout
    for name in ("predict", "eval", "chat", "merge"):
        assert f"\n  {name} " in listing
    for name in ("predict", "eval", "chat", "merge"):
        assert heavy_imports_after([name, "--help"]) == []


# -- predict and eval ----------------------------------------------------------------------------

@pytest.mark.parametrize("fixture", ["classifier_run", "causal_run", "chat_run"])
def test_predict_output_scores_exactly_what_eval_reports(fixture, request, tmp_path):
    from ftkit.plugins import get_task

    run: Path = request.getfixturevalue(fixture)
    out = tmp_path / "predictions.jsonl"
    predicted = ftkit("predict", run, run / "data" / "test.jsonl", "-o", out)
    assert predicted.exit_code == 0, predicted.output
    evaluated = ftkit("eval", run, "--json")
    assert evaluated.exit_code == 0, evaluated.output
    report = json.loads(evaluated.stdout)

    rows = read_jsonl(out)
    split = read_jsonl(run / "data" / "test.jsonl")
    assert report["examples"] == len(rows) == len(split)
    assert [r["input"] for r in rows] == [s["input"] for s in split]
    assert [r["source"] for r in rows] == [f"{run / 'data' / 'test.jsonl'}:{i}" for i in range(1, len(rows) + 1)]
    task = get_task(json.loads((run / "metrics.json").read_text(encoding="utf-8"))["task"])
    scored = task.metrics([r["prediction"] for r in rows], [r["references"] for r in rows])
    recorded = json.loads((run / "metrics.json").read_text(encoding="utf-8"))["finetuned"]
    for key, value in scored.items():
        if isinstance(value, float):
            assert report["metrics"][key] == pytest.approx(value), key
            assert recorded[key] == pytest.approx(value), key  # eval reproduces the pipeline's own numbers
    if "confusion_matrix" in scored:
        assert report["metrics"]["confusion_matrix"] == scored["confusion_matrix"] == recorded["confusion_matrix"]
    if task.kind == "generation":
        assert report["metrics"]["perplexity"] == pytest.approx(recorded["perplexity"], rel=1e-4)


@pytest.mark.parametrize("fixture", ["classifier_run", "causal_run"])
def test_classification_predictions_carry_probabilities_summing_to_one(fixture, request, tmp_path):
    run: Path = request.getfixturevalue(fixture)
    out = tmp_path / "p.jsonl"
    assert ftkit("predict", run, run / "data" / "test.jsonl", "-o", out).exit_code == 0
    for row in read_jsonl(out):
        probabilities = row["probabilities"]
        assert list(probabilities) == LABELS
        assert sum(probabilities.values()) == pytest.approx(1.0, abs=1e-5)
        assert all(0.0 <= p <= 1.0 for p in probabilities.values())
        assert row["prediction"] == max(probabilities, key=probabilities.get)


def test_predict_reads_the_tasks_layouts_and_rows_without_a_target(causal_run, tmp_path):
    text = "今天終於收到錄取通知，開心得跳了起來。"
    data = tmp_path / "mixed.jsonl"
    data.write_text("\n".join(json.dumps(row, ensure_ascii=False) for row in [
        {"text": text, "emotion": "喜悅"},                   # the task's raw layout
        {"instruction": "x", "input": text, "output": "喜悅"},  # the Alpaca training layout
        {"input": text},                                     # no target: the run's instruction is used
    ]) + "\n", encoding="utf-8")
    out = tmp_path / "out" / "predictions.jsonl"
    result = ftkit("predict", causal_run, data, "-o", out)
    assert result.exit_code == 0, result.output
    assert result.stderr.endswith(f"Wrote 3 predictions to {out}\n")
    raw, alpaca, unlabelled = read_jsonl(out)
    assert raw["target"] == alpaca["target"] == "喜悅" and raw["references"] == ["喜悅"]
    assert "target" not in unlabelled and "references" not in unlabelled
    assert [r["source"] for r in (raw, alpaca, unlabelled)] == [f"{data}:1", f"{data}:2", f"{data}:3"]
    # The same text gets the same prompt (the task's instruction) whichever layout it came in.
    assert unlabelled["probabilities"] == pytest.approx(raw["probabilities"], abs=1e-6)
    assert alpaca["probabilities"] == pytest.approx(raw["probabilities"], abs=1e-6)
    assert not list(out.parent.glob(".*.tmp"))  # written through a temp file, renamed into place


def test_predict_to_stdout(classifier_run, tmp_path):
    data = tmp_path / "one.jsonl"
    data.write_text('{"input": "他把我的書撕了，我氣得發抖。"}\n', encoding="utf-8")
    result = ftkit("predict", classifier_run, data, "-o", "-")
    assert result.exit_code == 0, result.output
    (row,) = [json.loads(line) for line in result.stdout.splitlines()]
    assert row["prediction"] in LABELS and set(row) == {"source", "input", "prediction", "probabilities"}


def test_predict_into_a_pipe_closed_early_stops_quietly_and_says_what_it_loads(classifier_run, tmp_path):
    """`ftkit predict RUN FILE -o - | head -1`: exit 0 and no error text; status lines on stderr only."""
    import re
    import shlex

    # Each output line repeats its ~1 KB input: 200 of them overflow the pipe's 64 KiB buffer, so a
    # write after `head` has gone fails for certain (the model reads only the first 64 tokens).
    line = json.dumps({"input": "他把我的書撕了，我氣得發抖。" * 25}, ensure_ascii=False)
    data = tmp_path / "long.jsonl"
    data.write_text((line + "\n") * 200, encoding="utf-8")
    errors = tmp_path / "stderr.txt"
    predict = shlex.join([sys.executable, "-m", "ftkit", "predict", str(classifier_run), str(data), "-o", "-"])
    script = f'{predict} 2>{shlex.quote(str(errors))} | head -1; exit "${{PIPESTATUS[0]}}"'
    done = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=600, check=False)
    stderr = errors.read_text(encoding="utf-8")
    assert done.returncode == 0, stderr
    (row,) = [json.loads(line) for line in done.stdout.splitlines()]
    assert row["prediction"] in LABELS
    assert not re.search("Error|Exception|Traceback", stderr), stderr
    assert "Loading ftkit/tiny-qwen2 with the run's adapter on cpu ...\n" in stderr
    assert re.search(r"^Loaded in \d+\.\d s$", stderr, re.MULTILINE), stderr


def test_eval_on_another_file_in_the_tasks_layout(classifier_run, tmp_path):
    data = tmp_path / "labelled.jsonl"
    rows = [{"text": "地震來的時候我嚇得躲到桌子底下。", "emotion": "恐懼"},
            {"text": "收到禮物的那一刻我笑個不停。", "emotion": "喜悅"}]
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    result = ftkit("eval", classifier_run, "--data", data, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["data"] == str(data) and report["examples"] == 2
    assert set(report["metrics"]) >= {"accuracy", "macro_f1", "confusion_matrix"}
    table = ftkit("eval", classifier_run)
    assert table.exit_code == 0, table.output
    assert "accuracy (headline)" in table.stdout and "in metrics.json" in table.stdout


# -- merge ---------------------------------------------------------------------------------------

def _merged_matches_adapter(run: Path, merged_dir: Path, auto_class) -> None:  # noqa: ANN001
    import torch

    from ftkit import use

    assert (merged_dir / "model.safetensors").is_file() and (merged_dir / "config.json").is_file()
    assert (merged_dir / "tokenizer.json").is_file() and (merged_dir / "tokenizer_config.json").is_file()
    assert not [p for p in merged_dir.iterdir() if p.suffix in (".bin", ".pt", ".pth")]
    assert not (merged_dir / "adapter_config.json").exists()
    merged = auto_class.from_pretrained(merged_dir).eval()
    reference, tokenizer = use.load_model(use.open_run(run), quantized=False, device="cpu")
    batch = tokenizer(["今天終於放假了，好開心", "他竟然偷偷拿走了我的錢包，太過分了！"], return_tensors="pt", padding=True)
    with torch.inference_mode():
        expected = reference(**batch).logits
        got = merged(**batch).logits
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert not any("lora" in name for name, _ in merged.named_parameters())


def test_merged_causal_model_gives_the_adapters_logits(causal_run, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "merged"
    result = ftkit("merge", causal_run, "-o", out)
    assert result.exit_code == 0, result.output
    assert result.stdout == f"Merged model: {out}\n"
    _merged_matches_adapter(causal_run, out, AutoModelForCausalLM)
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]  # no temporary folder left behind


def test_merged_classifier_model_gives_the_adapters_logits(classifier_run, tmp_path):
    from transformers import AutoModelForSequenceClassification

    out = tmp_path / "merged"
    assert ftkit("merge", classifier_run, "-o", out).exit_code == 0
    _merged_matches_adapter(classifier_run, out, AutoModelForSequenceClassification)
    config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    assert list(config["id2label"].values()) == LABELS


def test_merge_refuses_an_existing_folder_and_overwrites_only_a_merged_model(causal_run, tmp_path):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("mine", encoding="utf-8")
    refused = ftkit("merge", causal_run, "-o", out)
    assert_one_line_error(refused, 2, f"{out}: already exists; pass --overwrite")
    not_ours = ftkit("merge", causal_run, "-o", out, "--overwrite")
    assert_one_line_error(not_ours, 2, f"-o: {out} is not a folder ftkit made (no ftkit manifest.json or "
                          "ftkit-merge.json); --overwrite replaces only those and removed nothing")
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text(encoding="utf-8") == "mine"
    with contextlib.chdir(out):
        assert_one_line_error(ftkit("merge", causal_run, "-o", tmp_path, "--overwrite"), 2,
                              f"-o: {tmp_path} holds the current folder; --overwrite never removes that")
    assert_one_line_error(ftkit("merge", causal_run, "-o", causal_run.parent, "--overwrite"), 2,
                          f"{causal_run.parent}: holds the run folder {causal_run}")
    (out / "keep.txt").unlink()
    out.rmdir()
    assert ftkit("merge", causal_run, "-o", out).exit_code == 0
    mark = json.loads((out / "ftkit-merge.json").read_text(encoding="utf-8"))
    assert mark["made_by"] == "ftkit" and mark["run"] == str(causal_run.resolve())
    (out / "extra.txt").write_text("left by someone", encoding="utf-8")
    replaced = ftkit("merge", causal_run, "-o", out, "--overwrite")
    assert replaced.exit_code == 0, replaced.output
    assert not (out / "extra.txt").exists() and (out / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]


def test_qlora_run_predicts_in_4bit_and_merges_dequantized(qlora_run, tmp_path):
    from transformers import AutoModelForCausalLM

    from ftkit import use

    run = use.open_run(qlora_run)
    assert run.method == "qlora"
    model, _ = use.load_model(run)
    assert any(type(m).__name__ == "Linear4bit" for m in model.modules())  # as trained: 4-bit NF4
    evaluated = ftkit("eval", qlora_run, "--json")
    assert evaluated.exit_code == 0, evaluated.output
    recorded = json.loads((qlora_run / "metrics.json").read_text(encoding="utf-8"))["finetuned"]
    assert json.loads(evaluated.stdout)["metrics"]["accuracy"] == pytest.approx(recorded["accuracy"])
    out = tmp_path / "merged"
    merged = ftkit("merge", qlora_run, "-o", out)
    assert merged.exit_code == 0, merged.output
    assert "merging into the base loaded unquantized (dequantized)" in merged.stderr
    config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    assert "quantization_config" not in config
    _merged_matches_adapter(qlora_run, out, AutoModelForCausalLM)


def test_a_full_fine_tuning_run_predicts_and_has_nothing_to_merge(runs_dir, tmp_path):
    # Mixed precision as on a GPU: fp32 master weights trained under bf16 autocast, evaluated as they are.
    run = train(runs_dir / "full", QUICKSTART, *QUICK, "--set", 'method.name="full"', "--set", "train.max_steps=2",
                "--set", "eval.max_examples=16", "--set", 'model.dtype="bfloat16"')
    assert (run / "model" / "model.safetensors").is_file() and not (run / "adapter").exists()
    assert json.loads((run / "model" / "config.json").read_text(encoding="utf-8"))["dtype"] == "float32"
    out = tmp_path / "p.jsonl"
    assert ftkit("predict", run, run / "data" / "test.jsonl", "-o", out).exit_code == 0
    evaluated = ftkit("eval", run, "--json")
    assert evaluated.exit_code == 0, evaluated.output
    recorded = json.loads((run / "metrics.json").read_text(encoding="utf-8"))["finetuned"]
    assert json.loads(evaluated.stdout)["metrics"]["accuracy"] == pytest.approx(recorded["accuracy"])
    assert all(sum(r["probabilities"].values()) == pytest.approx(1.0, abs=1e-5) for r in read_jsonl(out))
    assert_one_line_error(ftkit("merge", run, "-o", tmp_path / "m"), 2,
                          f"{run}: a full fine-tuning run; {run / 'model'} is already a standalone model")


# -- serving -------------------------------------------------------------------------------------

def test_causal_adapter_is_a_standard_lora_adapter_for_serving(causal_run):
    """What vLLM's LoRA loader and PeftModel.from_pretrained read: standard names, LoRA weights only."""
    from safetensors import safe_open

    config = json.loads((causal_run / "adapter" / "adapter_config.json").read_text(encoding="utf-8"))
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert config["r"] == 16 and config["lora_alpha"] == 32 and config["target_modules"]
    assert not config.get("modules_to_save")
    with safe_open(str(causal_run / "adapter" / "adapter_model.safetensors"), framework="pt") as weights:
        keys = list(weights.keys())
    assert keys and all(k.startswith("base_model.model.") and k.endswith((".lora_A.weight", ".lora_B.weight"))
                        for k in keys)
    assert (ROOT / "docs" / "serving.md").is_file()


# -- chat ----------------------------------------------------------------------------------------

def test_chat_answers_a_piped_prompt(chat_run):
    command = [sys.executable, "-m", "ftkit", "chat", str(chat_run), "--sample", "--seed", "0", "--max-new-tokens", "16"]
    done = subprocess.run(command, input="姐姐近来可好？\n", capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() and done.stdout.endswith("\n")
    assert "Traceback" not in done.stderr


def test_chat_uses_the_runs_system_prompt_and_generation_settings(chat_run):
    from ftkit import use

    run = use.open_run(chat_run)
    assert use.default_system_prompt(run) == "现在你要扮演皇帝身边的女人--甄嬛"
    settings = use.GenerationSettings.from_recipe(run.recipe, temperature=0.3, max_new_tokens=None)
    assert settings.temperature == 0.3 and settings.max_new_tokens == 8  # recipe value, overridden one
    assert settings.repetition_penalty == 1.1 and settings.top_k == 50  # from huanhuan-chat.toml's [eval]
    model, tokenizer = use.load_model(run)
    session = use.ChatSession(model, tokenizer, settings, system=use.default_system_prompt(run))
    session.reply("你是谁？")
    session.reply("再说一遍")
    assert [m["role"] for m in session.history] == ["user", "assistant", "user", "assistant"]
    prompt = use.chat_prompt(tokenizer, [{"role": "system", "content": session.system}, *session.history])
    assert prompt.startswith("<|im_start|>system\n现在你要扮演皇帝身边的女人--甄嬛<|im_end|>")
    session.reset()
    assert session.history == []


def test_chat_in_a_terminal_reads_turns_until_exit(chat_run):
    import pty

    leader, follower = pty.openpty()
    process = subprocess.Popen([sys.executable, "-m", "ftkit", "chat", str(chat_run), "--max-new-tokens", "4"],
                               stdin=follower, stdout=follower, stderr=subprocess.PIPE, close_fds=True)
    os.close(follower)
    os.write(leader, "你好\n/reset\n再见\n/exit\n".encode())
    seen = b""
    while True:
        ready, _, _ = select.select([leader], [], [], 120)
        if not ready:
            break
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        seen += chunk
    os.close(leader)
    assert process.wait(timeout=60) == 0, process.stderr.read().decode()
    text = seen.decode(errors="replace")
    assert text.count("> ") >= 4 and "(history cleared)" in text


# -- one-line errors -----------------------------------------------------------------------------

def test_a_missing_or_unfinished_run_folder_is_a_one_line_error(tmp_path):
    inputs = tmp_path / "in.jsonl"
    inputs.write_text('{"input": "x"}\n', encoding="utf-8")
    missing = tmp_path / "nope"
    assert_one_line_error(ftkit("predict", missing, inputs, "-o", tmp_path / "o.jsonl"), 2,
                          f"{missing}: no such run folder; give the output.dir of a finished `ftkit run`")
    unfinished = tmp_path / "run.partial"
    (unfinished / "checkpoints").mkdir(parents=True)
    assert_one_line_error(ftkit("eval", unfinished), 2, f"{unfinished}: an unfinished run")
    assert_one_line_error(ftkit("predict", tmp_path / "run", inputs, "-o", tmp_path / "o.jsonl"), 2,
                          f"{tmp_path / 'run'}: no such run folder ({unfinished} holds an unfinished run)")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_one_line_error(ftkit("chat", empty), 2,
                          f"{empty}: not a complete run folder (missing recipe.toml, labels.json, metrics.json, "
                          "manifest.json, adapter/adapter_config.json, adapter/adapter_model.safetensors)")
    assert_one_line_error(ftkit("merge", inputs, "-o", tmp_path / "m"), 2, f"{inputs}: not a folder")
    assert not (tmp_path / "o.jsonl").exists() and not (tmp_path / "m").exists()


def test_bad_input_lines_are_one_line_errors_naming_file_and_line(classifier_run, tmp_path):
    out = tmp_path / "out.jsonl"
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"input": "好開心"}\n{"input": "oops"\n', encoding="utf-8")
    assert_one_line_error(ftkit("predict", classifier_run, bad_json, "-o", out), 1, f"{bad_json}:2: not valid JSON")
    bad_field = tmp_path / "field.jsonl"
    bad_field.write_text('{"input": "好開心"}\n{"input": "ok"}\n{"sentence": "no input"}\n', encoding="utf-8")
    assert_one_line_error(ftkit("predict", classifier_run, bad_field, "-o", out), 1,
                          f"{bad_field}:3: missing field 'text'")
    bad_label = tmp_path / "label.jsonl"
    bad_label.write_text('{"text": "好開心", "emotion": "開心"}\n', encoding="utf-8")
    assert_one_line_error(ftkit("predict", classifier_run, bad_label, "-o", out), 1,
                          f"{bad_label}:1: label '開心' is not one of")
    unlabelled = tmp_path / "unlabelled.jsonl"
    unlabelled.write_text('{"text": "好開心", "emotion": "喜悅"}\n{"input": "沒有標籤"}\n', encoding="utf-8")
    assert_one_line_error(ftkit("eval", classifier_run, "--data", unlabelled), 1,
                          f"{unlabelled}:2: no target; evaluation needs labelled rows")
    assert_one_line_error(ftkit("predict", classifier_run, tmp_path / "absent.jsonl", "-o", out), 1,
                          f"{tmp_path / 'absent.jsonl'}: no such file")
    assert not out.exists()


def test_commands_refuse_what_they_cannot_do(classifier_run):
    assert_one_line_error(ftkit("chat", classifier_run), 2, f"{classifier_run}: a classifier-head run answers with labels")
    for target in (classifier_run, classifier_run.parent):
        assert_one_line_error(ftkit("merge", classifier_run, "-o", target, "--overwrite"), 2,
                              f"{target}: holds the run folder {classifier_run}; write the merged model somewhere else")
    assert (classifier_run / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("sample", [False, True])
def test_eval_reproduces_a_generation_runs_metrics_byte_for_byte(runs_dir, sample):
    """Greedy decoding for metrics, and any sampling seeded: `ftkit eval RUN` gives metrics.json's numbers exactly."""
    run = train(runs_dir / f"huanhuan-sample-{sample}", HUANHUAN, *TINY, "--set", "train.max_steps=2",
                "--set", "train.max_seq_len=96", "--set", "eval.max_new_tokens=6", "--set", "eval.baseline=false",
                "--set", f"eval.do_sample={str(sample).lower()}",
                "--set", f"task.train_file={toml_str(FIXTURES / 'huanhuan.json')}")
    evaluated = ftkit("eval", run, "--json")
    assert evaluated.exit_code == 0, evaluated.output
    recorded = json.loads((run / "metrics.json").read_text(encoding="utf-8"))["finetuned"]
    again = json.loads(evaluated.stdout)["metrics"]
    # Perplexity too: a QLoRA run reloaded on a CPU with AVX512-BF16 must run the same 4-bit kernel
    # as the run did, or its 7th significant digit differs.
    assert json.dumps(again, sort_keys=True) == json.dumps(recorded, sort_keys=True)
