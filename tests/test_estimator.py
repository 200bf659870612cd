"""`ftkit estimate` and the estimator: the published formula, the breakdown, errors, and a measured check."""

from __future__ import annotations

import importlib.util
import json
from dataclasses import replace
from pathlib import Path

import pytest

from ftkit.errors import UsageError
from ftkit.estimator import Settings, estimate, largest_batch, megatron_layer_bytes
from ftkit.fit import recipe_settings
from ftkit.model_configs import KNOWN_MODELS, SIZES, ModelShape, resolve_shape
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
                          "activations_other", "logits_loss", "evaluation", "overhead", "total"}
    assert set(data["phases"]) == {"train", "eval"} and parts["total"] == max(data["phases"].values())
    assert data["peak_phase"].startswith("backward")  # a 7B LoRA run at seq 1024 peaks in training
    assert parts["total"] >= parts["weights"] + parts["activations_layers"] + parts["logits_loss"]
    assert data["params"]["total"] == KNOWN_MODELS["Qwen/Qwen2.5-7B"].num_params
    assert data["gpu"]["bytes"] == 24 * 2**30 and isinstance(data["gpu"]["fits"], bool)
    assert all("formula" in term for term in data["detail"]["activations_per_layer"])


@pytest.mark.parametrize("settings", [Settings(seq=256, batch=4, method="qlora"),
                                      Settings(seq=64, batch=1, method="full", device="cuda"),
                                      Settings(seq=2048, batch=8, method="lora", gpus=2),
                                      Settings(seq=512, batch=1, method="qlora", activation_checkpointing=True,
                                               eval_kind="labels", eval_batch=64)],
                         ids=["qlora", "full: the optimizer step peaks", "lora on 2 GPUs", "the evaluation peaks"])
def test_the_one_line_memory_summary_shows_every_part_and_they_add_up(settings):
    import re

    from ftkit.fit import describe

    result = estimate(resolve_shape("1.5B"), settings)
    line = describe(result)
    total, phase, parts, other, other_total = re.fullmatch(
        r"([\d.]+) GB peak \((.+?)\) = (.+) GB; (training|evaluation) ([\d.]+)", line).groups()
    assert result.peak_phase.startswith(phase)
    shown = dict((name, float(value)) for name, value in re.findall(r"([a-z/ ]+?) ([\d.]+)(?: \+ |$)", parts))
    assert {"weights", "overhead"} <= set(shown)
    assert ("activations" in shown) == phase.startswith("backward")
    assert ("evaluation" in shown) == phase.startswith("evaluation") == (other == "training")
    # The other phase's peak is named too, and is the smaller one.
    assert float(other_total) == round(result.phases["train" if other == "training" else "eval"] / 1e9, 2)
    assert float(other_total) <= float(total)
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


def test_settings_refuse_an_unknown_device():
    """A typo would otherwise estimate as a CPU run (dropout masks, autocast) without a word."""
    with pytest.raises(UsageError, match=r"^--device: 'gpu' is not one of cuda, cpu$"):
        Settings(seq=8, device="gpu")
    assert Settings(seq=8, device="cpu").device == "cpu"


def test_unsupported_architecture_is_one_line(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "bert", "hidden_size": 768}', encoding="utf-8")
    with pytest.raises(UsageError, match="model_type 'bert' is not modelled"):
        resolve_shape(str(tmp_path))


def test_estimate_imports_no_heavy_package():
    assert heavy_imports_after(["estimate", "--model", "7B", "--gpu-mem", "24GB", "--explain"]) == []
    # A dry run reads and checks the data (through datasets) but loads no model library.
    assert heavy_imports_after(["run", str(ROOT / "recipes" / "emotion.toml"), "--dry-run"]) == ["datasets"]


def _bench():  # noqa: ANN202
    import sys

    spec = importlib.util.spec_from_file_location("estimator_accuracy", ROOT / "bench" / "estimator_accuracy.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, module)  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


SMALL = ModelShape("small", hidden_size=256, intermediate_size=768, num_layers=2, num_heads=4, num_kv_heads=2,
                   vocab_size=8192, tie_embeddings=True)


@pytest.mark.parametrize("number", range(6))
def test_estimate_is_close_to_the_saved_tensors_measured_on_cpu(number):
    # The bench draws configurations at random and reports every error (BENCHMARKS.md); this checks
    # its --quick draws (small models: full/LoRA/QLoRA, fp32/bf16/fp16, SDPA/eager, checkpointing,
    # padding, GQA, classifier heads) with the bench's bound, so a regression on either side shows.
    bench = _bench()
    case = bench.sample_cases(bench.DEFAULT_SEED, bench.QUICK_COUNT, small=True)[number]
    truth, guess = bench.measure(case), bench.estimated(case)
    for key in ("per_layer", "total_2_layers"):
        error = (guess[key] - truth[key]) / truth[key]
        assert -0.01 <= error <= 0.03, (key, case.describe(), guess[key], truth[key])


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


@pytest.mark.parametrize(("size", "seq", "batch"), [("1.5B", 256, 4), ("7B", 1024, 1)])
def test_qlora_needs_less_memory_than_lora(size, seq, batch):
    # The acceptance check, through the CLI as a user runs it.
    totals = {}
    for method in ("qlora", "lora"):
        done = run_ftkit("estimate", "--model", size, "--seq", str(seq), "--batch", str(batch), "--method", method,
                         "--json")
        assert done.returncode == 0, done.stderr
        totals[method] = json.loads(done.stdout)["components"]["total"]
    assert totals["qlora"] < totals["lora"]


@pytest.mark.parametrize("size", SIZES)
def test_qlora_saves_the_weight_bytes_at_every_size(size):
    # QLoRA computes in bf16 like LoRA (no fp32 residual stream): its activations are LoRA's, and
    # what it saves is the 4-bit weights' bytes.
    shape = resolve_shape(size)
    lora, qlora = (estimate(shape, Settings(seq=512, batch=2, method=method)) for method in ("lora", "qlora"))
    assert qlora.activation_layers.bytes == lora.activation_layers.bytes
    assert qlora.logits_bytes == lora.logits_bytes
    saved = lora.weights_bytes - qlora.weights_bytes
    assert saved > 0.6 * shape.layer_linear_params * shape.num_layers * 2 / 2  # most of the linear weights' bf16 bytes
    assert lora.total - qlora.total == pytest.approx(saved, rel=0.01)


def test_full_fine_tuning_keeps_fp32_master_weights_and_the_optimizer_key_counts():
    shape = resolve_shape("0.5B")
    full = estimate(shape, Settings(seq=256, batch=1, method="full", dtype="bf16"))
    names = {t.name: t.bytes for t in full.weights}
    assert names["weights (fp32 master)"] == shape.num_params * 4
    assert "autocast bf16 weight copies" in names
    assert full.gradients.bytes == shape.num_params * 4 and full.optimizer.bytes == shape.num_params * 8
    for optim in ("adamw_8bit", "paged_adamw_8bit"):
        assert estimate(shape, Settings(seq=256, method="full", optim=optim)).optimizer.bytes == shape.num_params * 2
    recipe = load_recipe_text('[model]\nid = "Qwen/Qwen2.5-0.5B"\n[method]\nname = "full"\n'
                              '[train]\noptim = "adamw_8bit"\n')
    assert recipe_settings(recipe, "causal", 6).optim == "adamw_8bit"


def test_the_cuda_context_is_counted_once():
    # torch.cuda.mem_get_info, read after CUDA started, already leaves the context out: the run's
    # check against it must not add the context again; a card's total size (--gpu-mem) still needs it.
    from ftkit.estimator import CUDA_CONTEXT_BYTES

    recipe = load_recipe_text('[model]\nid = "Qwen/Qwen2.5-1.5B"\n')
    card, free = (estimate(resolve_shape("1.5B"), recipe_settings(recipe, "causal", 6, cuda_context=context))
                  for context in (True, False))
    assert "CUDA context" not in {t.name for t in free.overhead}
    assert card.total - free.total == pytest.approx(CUDA_CONTEXT_BYTES, rel=0.01)


def test_squad_qa_at_seq_512_and_eval_batch_16_has_a_generation_eval_phase():
    done = run_ftkit("run", str(ROOT / "recipes" / "squad-qa.toml"), "--dry-run", "--json",
                     "--set", "train.max_seq_len=512", "--set", "eval.batch_size=16")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)["estimate"]
    assert set(result["phases"]) == {"train", "eval"} and result["peak_phase"]
    assert result["settings"]["eval_kind"] == "generation" and result["settings"]["eval_batch"] == 16
    terms = {t["name"]: t["bytes"] for t in result["detail"]["evaluation"]}
    cache = next(value for name, value in terms.items() if name.startswith("KV cache (16 × 512 + "))
    shape = KNOWN_MODELS["Qwen/Qwen2.5-1.5B-Instruct"]
    new_tokens = result["settings"]["max_new_tokens"]
    assert cache == 2 * shape.num_layers * 16 * (512 + new_tokens) * shape.kv_width * 2
    # No full-vocabulary logits at every position: the evaluation is far below the ~12 GB they took.
    assert result["components"]["evaluation"] < 2e9


def _load_bench(name: str):  # noqa: ANN202
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_recipe_text(text: str):  # noqa: ANN201
    import tomllib

    from ftkit.recipe import recipe_from_dict

    base = '[task]\nname = "emotion"\ntrain_file = "train.jsonl"\n[output]\ndir = "runs"\n'
    return recipe_from_dict(tomllib.loads(base + text), "r.toml", base_dir=ROOT)


def _eval_model(attn: str, classifier: bool = False):
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM, Qwen2ForSequenceClassification

    from ftkit.tiny import tiny_model_path

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path())
    shape = replace(SMALL, vocab_size=len(tokenizer))
    config = Qwen2Config(hidden_size=shape.hidden_size, intermediate_size=shape.intermediate_size,
                         num_hidden_layers=shape.num_layers, num_attention_heads=shape.num_heads,
                         num_key_value_heads=shape.num_kv_heads, vocab_size=shape.vocab_size, tie_word_embeddings=True,
                         attn_implementation=attn, num_labels=3, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = (Qwen2ForSequenceClassification if classifier else Qwen2ForCausalLM)(config).eval()
    return model, tokenizer, shape


@pytest.mark.parametrize(("kind", "attn"), [("generation", "sdpa"), ("generation", "eager"), ("labels", "sdpa"),
                                            ("label search", "sdpa"), ("classifier", "eager")])
def test_an_evaluation_stays_within_its_estimated_phase(kind, attn, monkeypatch):
    # Live tensor bytes on the CPU (what max_memory_allocated counts on a GPU) while ftkit's
    # evaluator runs, against the eval phase's working memory: never more, and not far less.
    import random
    from types import SimpleNamespace

    from ftkit import evaluator
    from ftkit.tasks import Example

    live_memory = _load_bench("live_memory")
    model, tokenizer, shape = _eval_model(attn, classifier=kind == "classifier")
    seq, batch = 192, 8
    rng = random.Random(0)
    words = "the cat sat on a mat while rain fell over quiet hills and rivers".split()
    examples = [Example(input=" ".join(rng.choices(words, k=rng.randint(150, 300))),
                        target=" ".join(rng.choices(words, k=rng.randint(80, 120)))) for _ in range(2 * batch)]
    settings = SimpleNamespace(max_new_tokens=16, do_sample=False, repetition_penalty=1.0)
    runs = {
        "generation": lambda: (evaluator.generate(model, tokenizer, examples, settings, batch, seq, "g"),
                               evaluator.answer_nll(model, tokenizer, examples, batch, seq, "p")),
        "labels": lambda: evaluator.label_scores(model, tokenizer, examples, ["cat", "rain fell", "quiet hills"],
                                                 batch, seq, "l"),
        "classifier": lambda: evaluator.classifier_scores(model, tokenizer, examples, batch, seq, "c"),
        # 200 labels of 3-6 words: a trie too big for one forward, so the evaluation's predictions search it;
        # every prefix in reach runs (no margin), so the search's columns fill the cache to its bound.
        "label search": lambda: evaluator.predict_label_scores(
            model, tokenizer, examples, [" ".join(rng.choices(words, k=rng.randint(3, 6))) for _ in range(200)],
            batch, seq, "s"),
    }
    monkeypatch.setattr(evaluator, "SEARCH_MARGIN", float("inf"))
    with live_memory.PeakLiveBytes(existing=model) as peak:
        runs[kind]()
    eval_kind = "labels" if kind == "label search" else kind
    result = estimate(shape, Settings(seq=seq, method="full", dtype="fp32", attn=attn, head="classifier" if kind ==
                                      "classifier" else "causal", num_labels=3, eval_kind=eval_kind, eval_batch=batch,
                                      max_new_tokens=16, device="cpu"))
    assert peak.peak <= result.evaluation_bytes
    assert peak.peak >= 0.75 * result.evaluation_bytes, (peak.peak, result.evaluation_bytes)


def test_the_evaluation_phase_uses_the_evaluators_own_chunk_sizes():
    from ftkit import estimator, evaluator

    assert estimator.LABEL_TOKENS_PER_ROW == evaluator.ANSWER_TOKENS_PER_FORWARD
    assert estimator.LABEL_SEARCH_COLUMNS == evaluator.SEARCH_COLUMNS
    assert estimator.LABEL_SEARCH_QUERIES == evaluator.SEARCH_PREFIXES_PER_ROUND
    assert estimator.NLL_POSITIONS == evaluator.NLL_POSITIONS
