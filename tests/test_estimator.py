"""`ftkit estimate` and the estimator: the published formula, the breakdown, errors, and a measured check."""

from __future__ import annotations

import importlib.util
import json
from dataclasses import replace
from pathlib import Path

import pytest

from ftkit.errors import UsageError
from ftkit.estimator import Settings, estimate, largest_batch, megatron_layer_bytes
from ftkit.model_configs import KNOWN_MODELS, ModelShape, resolve_shape
from tests.conftest import heavy_imports_after, run_ftkit

ROOT = Path(__file__).resolve().parents[1]


def test_megatron_formula_as_published():
    # Korthikanti et al. 2022 §4, Qwen2.5-1.5B (h=1536, a=12, L=28) at s=256, b=4.
    assert megatron_layer_bytes(256, 4, 1536, 12) == 69_206_016
    done = run_ftkit("estimate", "--model", "1.5B", "--seq", "256", "--batch", "4", "--formula", "megatron", "--json")
    assert done.returncode == 0, done.stderr
    components = json.loads(done.stdout)["components"]
    assert components["activations_per_layer"] == 69_206_016
    assert components["activations_layers"] == 28 * 69_206_016  # 1.94 GB, not 3.9 GB
    text = run_ftkit("estimate", "--model", "1.5B", "--seq", "256", "--batch", "4", "--formula", "megatron")
    assert "69.2 MB" in text.stdout and "1.94 GB" in text.stdout


def test_breakdown_lists_every_component():
    done = run_ftkit("estimate", "--model", "1.5B", "--seq", "256", "--batch", "4", "--gpu-mem", "24GB")
    assert done.returncode == 0, done.stderr
    for row in ("weights (NF4, double quant)", "weights (embeddings, norms, biases: bf16)", "LoRA adapters (fp32)",
                "gradients", "optimizer states (adamw)", "activations per layer", "activations, 28 layers",
                "logits / loss", "framework overhead", "total (peak at"):
        assert row in done.stdout, row
    assert "1,089,536 trainable" in done.stdout  # r=8 on q_proj and v_proj: 28·8·((1536+1536)+(1536+256))
    assert "Fits in 24.0 GiB" in done.stdout


def test_json_is_stable_and_adds_up():
    done = run_ftkit("estimate", "--model", "7B", "--method", "lora", "--seq", "1024", "--gpu-mem", "24", "--json")
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    parts = data["components"]
    assert set(parts) == {"weights", "gradients", "optimizer_states", "activations_per_layer", "activations_layers",
                          "activations_other", "logits_loss", "overhead", "total"}
    assert parts["total"] >= parts["weights"] + parts["activations_layers"] + parts["logits_loss"]
    assert data["params"]["total"] == KNOWN_MODELS["Qwen/Qwen2.5-7B"].num_params
    assert data["gpu"]["bytes"] == 24 * 2**30 and isinstance(data["gpu"]["fits"], bool)
    assert all("formula" in term for term in data["detail"]["activations_per_layer"])


@pytest.mark.parametrize("settings", [Settings(seq=256, batch=4, method="qlora"),
                                      Settings(seq=64, batch=1, method="full", device="cuda"),
                                      Settings(seq=2048, batch=8, method="lora", gpus=2)],
                         ids=["qlora", "full: the optimizer step peaks", "lora on 2 GPUs"])
def test_the_one_line_memory_summary_shows_every_part_and_they_add_up(settings):
    import re

    from ftkit.fit import describe

    result = estimate(resolve_shape("1.5B"), settings)
    line = describe(result)
    total, phase, parts = re.fullmatch(r"([\d.]+) GB peak \((.+)\) = (.+) GB", line).groups()
    assert result.peak_phase.startswith(phase)
    shown = dict((name, float(value)) for name, value in re.findall(r"([a-z/ ]+?) ([\d.]+)(?: \+ |$)", parts))
    assert {"weights", "optimizer states", "overhead"} <= set(shown)
    assert ("activations" in shown) == phase.startswith("backward")
    assert float(total) == pytest.approx(sum(shown.values()), abs=0.006 * len(shown))  # each part rounded
    assert float(total) == round(result.total / 1e9, 2)


def test_explain_substitutes_the_numbers():
    done = run_ftkit("estimate", "--model", "0.5B", "--seq", "128", "--batch", "2", "--explain")
    assert done.returncode == 0, done.stderr
    assert "128·2·896 × 4 B" in done.stdout  # RMSNorm's fp32 copy of the layer input


def test_parameter_counts_match_the_published_sizes():
    published = {"0.5B": 0.49, "1.5B": 1.54, "3B": 3.09, "7B": 7.62, "14B": 14.77, "32B": 32.76, "72B": 72.71}
    for size, billions in published.items():
        assert round(resolve_shape(size).num_params / 1e9, 2) == billions


def test_what_changes_the_estimate_moves_it_the_right_way():
    shape = resolve_shape("1.5B")
    base = Settings(seq=512, batch=4, method="lora")

    def total(**changes):  # noqa: ANN003, ANN202
        return estimate(shape, replace(base, **changes)).total

    assert total(activation_checkpointing=True) < total()
    assert total(attn="eager") > total()  # the s×s scores
    assert total(method="full") > total()
    assert total(batch=8) > total()
    assert estimate(shape, replace(base, method="qlora")).weights_bytes < estimate(shape, base).weights_bytes
    assert total(head="classifier") < total()  # no vocabulary-wide logits


def test_largest_batch_is_the_boundary():
    shape, settings = resolve_shape("1.5B"), Settings(seq=512, method="qlora")
    gpu = 24 * 2**30
    best = largest_batch(shape, settings, gpu)
    assert best >= 1
    assert estimate(shape, replace(settings, batch=best)).total <= gpu
    assert estimate(shape, replace(settings, batch=best + 1)).total > gpu
    assert largest_batch(resolve_shape("72B"), replace(settings, method="full"), gpu) == 0


def test_models_from_a_folder_and_the_hub_cache(tmp_path, monkeypatch):
    config = {"model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
              "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151936, "tie_word_embeddings": True}
    folder = tmp_path / "my-model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
    known = KNOWN_MODELS["Qwen/Qwen2.5-0.5B"]
    assert replace(resolve_shape(str(folder)), name=known.name) == known
    assert replace(resolve_shape(str(folder / "config.json")), name=known.name) == known

    # The Hugging Face cache as huggingface_hub leaves it: refs/main names the snapshot's commit.
    repo = tmp_path / "hub" / "models--someone--their-model"
    (repo / "snapshots" / "0123abc").mkdir(parents=True)
    (repo / "snapshots" / "0123abc" / "config.json").write_text(json.dumps(config), encoding="utf-8")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abc", encoding="utf-8")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert resolve_shape("someone/their-model").hidden_size == 896
    # And ModelScope's (modelscope 1.40: models/OWNER--NAME/snapshots/master).
    snapshot = tmp_path / "ms" / "models" / "someone--other-model" / "snapshots" / "master"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(json.dumps({**config, "hidden_size": 1536}), encoding="utf-8")
    monkeypatch.setenv("MODELSCOPE_CACHE", str(tmp_path / "ms"))
    assert resolve_shape("someone/other-model").hidden_size == 1536


@pytest.mark.parametrize(("args", "message"), [
    (["--model", "13B"], "Error: --model: unknown model '13B'; did you mean 3B?"),
    (["--model", "nobody/no-such-model"], "Error: --model: unknown model 'nobody/no-such-model';"),
    (["--model", "1.5B", "--seq", "0"], "Error: --seq: 0 must be at least 1"),
    (["--model", "1.5B", "--batch", "-1"], "Error: --batch: -1 must be at least 1"),
    (["--model", "1.5B", "--seq", "256.5"], "Error: --seq: '256.5' is not a whole number; e.g. --seq 256"),
    (["--model", "1.5B", "--seq", "long"], "Error: --seq: 'long' is not a whole number; e.g. --seq 256"),
    (["--model", "1.5B", "--gpu-mem", "lots"], "Error: --gpu-mem 'lots': expected a memory size"),
    (["--model", "1.5B", "--target-modules", "qproj"], "Error: --target-modules: qproj; choose from"),
    (["--seq", "256"], "Error: --model is required"),
])
def test_bad_input_is_one_line(args, message):
    done = run_ftkit("estimate", *args)
    assert done.returncode == 2
    assert done.stderr.startswith(message), done.stderr
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr


def test_unsupported_architecture_is_one_line(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "bert", "hidden_size": 768}', encoding="utf-8")
    with pytest.raises(UsageError, match="model_type 'bert' is not modelled"):
        resolve_shape(str(tmp_path))


def test_estimate_imports_no_heavy_package():
    assert heavy_imports_after(["estimate", "--model", "7B", "--gpu-mem", "24GB", "--explain"]) == []
    # A dry run reads and checks the data (through datasets) but loads no model library.
    assert heavy_imports_after(["run", str(ROOT / "recipes" / "emotion.toml"), "--dry-run"]) == ["datasets"]


def _bench():  # noqa: ANN202
    spec = importlib.util.spec_from_file_location("estimator_accuracy", ROOT / "bench" / "estimator_accuracy.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SMALL = ModelShape("small", hidden_size=256, intermediate_size=768, num_layers=2, num_heads=4, num_kv_heads=2,
                   vocab_size=8192, tie_embeddings=True)


@pytest.mark.parametrize("settings", [
    Settings(seq=64, batch=2, method="lora", attn="sdpa"),
    Settings(seq=64, batch=2, method="full", attn="eager"),
    Settings(seq=64, batch=2, method="qlora", attn="sdpa"),
    Settings(seq=64, batch=2, method="lora", attn="eager", activation_checkpointing=True),
], ids=["lora-sdpa", "full-eager", "qlora-sdpa", "lora-eager-ckpt"])
def test_estimate_is_close_to_the_saved_tensors_measured_on_cpu(settings):
    # The bench measures real shapes over a grid and reports the exact errors (BENCHMARKS.md);
    # this checks a few small cases with a loose bound so a regression in either side shows.
    bench = _bench()
    truth = bench.measure(SMALL, settings)
    guess = bench.estimated(SMALL, settings)
    if settings.activation_checkpointing:
        truth["total_2_layers"] += bench.measure(SMALL, replace(settings, activation_checkpointing=False))["per_layer"]
    for key in ("per_layer", "total_2_layers"):
        assert guess[key] == pytest.approx(truth[key], rel=0.10), key


def test_auto_fit_keeps_the_effective_batch():
    from ftkit.fit import auto_fit

    shape, gpu = resolve_shape("7B"), 24 * 2**30
    settings = Settings(seq=1024, batch=8, method="qlora")
    assert estimate(shape, settings).total > gpu
    plan = auto_fit(shape, settings, gpu)
    assert plan is not None and plan.changes
    assert plan.estimate.total <= gpu
    assert plan.settings.batch * plan.settings.grad_accum >= 8
    assert plan.changes[0].startswith("train.batch_size: 8 -> ")
    fits_already = auto_fit(shape, replace(settings, batch=1), 80 * 2**30)
    assert fits_already is not None and fits_already.changes == []
    assert auto_fit(resolve_shape("72B"), replace(settings, method="full"), gpu) is None


def test_dry_run_prints_the_memory_estimate():
    done = run_ftkit("run", str(ROOT / "recipes" / "emotion.toml"), "--dry-run", "--set", "train.batch_size=8")
    assert done.returncode == 0, done.stderr
    assert "batch_size = 8" in done.stdout
    line = next(x for x in done.stdout.splitlines() if x.startswith("# memory estimate"))
    expected = estimate(resolve_shape("Qwen/Qwen2.5-1.5B-Instruct"), Settings(seq=256, batch=8, method="qlora", grad_accum=4)).total
    assert line.startswith(f"# memory estimate (Qwen/Qwen2.5-1.5B-Instruct, for a CUDA GPU): {expected / 1e9:.2f} GB peak")


def test_a_run_that_will_not_fit_is_refused_in_one_line_or_auto_fitted():
    from ftkit.errors import ConfigError
    from ftkit.fit import check_fit

    shape, gpu, where = resolve_shape("7B"), 24 * 2**30, "the 24.0 GiB free on GPU 0"
    settings = Settings(seq=1024, batch=8, method="qlora")
    with pytest.raises(ConfigError) as refused:
        check_fit(shape, settings, gpu, where, allow_changes=False, recipe_path="r.toml")
    message = str(refused.value)
    assert "\n" not in message and message.startswith("r.toml: train.batch_size: the estimate (")
    assert f"exceeds {where}; rerun with --auto-fit to set train.batch_size: 8 -> " in message
    plan = check_fit(shape, settings, gpu, where, allow_changes=True)
    assert plan.changes and plan.estimate.total <= gpu
    with pytest.raises(ConfigError, match="even at batch 1 with activation checkpointing"):
        check_fit(resolve_shape("72B"), replace(settings, method="full"), gpu, where, allow_changes=True)
