"""Baselines, intervals and verdicts: ftkit.stats on hand-made predictions, then one real run."""

from __future__ import annotations

import json
from math import comb
from pathlib import Path

import pytest

from ftkit import stats
from ftkit.metrics import classification_metrics, generation_metrics, squad_metrics
from tests.conftest import run_ftkit

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "recipes" / "tiny.toml"
EMOTION = ROOT / "plugins" / "data" / "emotion_quickstart.jsonl"
LABELS = ["a", "b", "c", "d"]


def predictions_with(right: list[bool], refs: list[str]) -> list[str]:
    """A prediction per reference: the reference where ``right``, else the next label (always wrong)."""
    return [r if ok else LABELS[(LABELS.index(r) + 1) % len(LABELS)] for ok, r in zip(right, refs)]


# -- McNemar -----------------------------------------------------------------------------------

def test_mcnemar_exact_p_value_matches_the_binomial_computed_by_hand():
    # 30 both right, 8 only the fine-tuned right, 2 only the baseline right, 10 both wrong.
    tuned = [True] * 30 + [True] * 8 + [False] * 2 + [False] * 10
    base = [True] * 30 + [False] * 8 + [True] * 2 + [False] * 10
    p, only_tuned, only_base = stats.mcnemar_exact(tuned, base)
    assert (only_tuned, only_base) == (8, 2)
    # Two-sided: twice P(X <= 2) for X ~ Binomial(10, 1/2) = 2 * (1 + 10 + 45) / 1024.
    assert p == pytest.approx(2 * sum(comb(10, k) for k in range(3)) / 2**10) == pytest.approx(0.109375)
    assert stats.mcnemar_exact([True, False], [True, False]) == (1.0, 0, 0)  # no discordant pair


def test_compare_uses_mcnemar_for_accuracy_and_names_the_better_model():
    refs = [LABELS[i % 4] for i in range(100)]
    tuned = predictions_with([i % 10 != 0 for i in range(100)], refs)  # 90 right
    zero_shot = predictions_with([i % 2 == 0 for i in range(100)], refs)  # 50 right
    result = stats.compare("accuracy", {"finetuned": tuned, "majority": ["a"] * 100, "zero_shot": zero_shot},
                           [(r,) for r in refs], baselines=["majority", "zero_shot"], labels=LABELS)
    verdict = result["verdict"]
    assert verdict["against"] == "zero_shot"  # 0.50 beats the majority's 0.25
    assert verdict["test"] == "McNemar exact" and verdict["result"] == "better"
    only_tuned, only_base = verdict["discordant"]
    assert (only_tuned, only_base) == (50, 10)  # odd rows: only the fine-tuned right; rows 0, 10, ...: only zero-shot
    assert verdict["p_value"] == pytest.approx(2 * sum(comb(60, k) for k in range(11)) / 2**60)
    assert set(result["ci95"]) == {"finetuned", "majority", "zero_shot"}
    worse = stats.compare("accuracy", {"finetuned": zero_shot, "zero_shot": tuned}, [(r,) for r in refs],
                          baselines=["zero_shot"])
    assert worse["verdict"]["result"] == "worse"


def test_the_same_predictions_are_no_significant_difference():
    refs = [(LABELS[i % 4],) for i in range(60)]
    same = [LABELS[(i * 7) % 4] for i in range(60)]
    for metric in ("accuracy", "macro_f1"):
        verdict = stats.compare(metric, {"finetuned": same, "zero_shot": list(same)}, refs,
                                baselines=["zero_shot"], labels=LABELS)["verdict"]
        assert verdict["result"] == "no significant difference" and verdict["p_value"] == 1.0


def test_fewer_than_20_examples_gives_no_p_value_but_says_why():
    refs = [(LABELS[i % 4],) for i in range(19)]
    result = stats.compare("accuracy", {"finetuned": [r[0] for r in refs], "majority": ["a"] * 19}, refs,
                           baselines=["majority"], labels=LABELS)
    verdict = result["verdict"]
    assert verdict["p_value"] is None and verdict["result"] == "too few examples"
    assert "19 examples" in verdict["reason"] and "20" in verdict["reason"]
    assert "No verdict against the majority baseline" in stats.verdict_sentence(verdict, {"majority": "majority baseline"})


# -- bootstrap ---------------------------------------------------------------------------------

def test_bootstrap_interval_contains_the_estimate_and_is_seeded():
    refs = [(LABELS[i % 4],) for i in range(200)]
    preds = predictions_with([(i * 37) % 10 < 7 for i in range(200)], [r[0] for r in refs])
    for metric in ("accuracy", "macro_f1"):
        values = stats.metric_values(metric, preds, refs, LABELS)
        estimate = classification_metrics(preds, refs, LABELS)[metric]
        low, high = stats.bootstrap_interval(values, len(refs), seed=3)
        assert low < estimate < high and high - low < 0.2
        assert stats.bootstrap_interval(values, len(refs), seed=3) == (low, high)
        assert stats.bootstrap_interval(values, len(refs), seed=4) != (low, high)


def test_resampled_statistics_reproduce_every_headline_metric():
    """The bootstrap's per-example statistics give exactly the reported metric on the full sample."""
    import numpy as np

    refs = [(LABELS[i % 4],) for i in range(40)]
    preds = predictions_with([i % 3 != 0 for i in range(40)], [r[0] for r in refs])
    preds[5] = "off-label"
    ones = np.ones((1, 40))
    for metric, value in classification_metrics(preds, refs, [*LABELS, "never-seen"]).items():
        if metric in ("accuracy", "macro_f1"):
            got = stats.metric_values(metric, preds, refs, [*LABELS, "never-seen"])(ones)[0]
            assert got == pytest.approx(value)
    replies = ["the cat sat on it", "a dog", "hello there world", "今天天气很好", ""] * 8
    golds = [("the cat sat on the mat", "a cat"), ("dog",), ("hello world there",), ("今天天气不错",), ("x",)] * 8
    expected = generation_metrics(replies, golds) | squad_metrics(replies, golds)
    for metric in ("bleu", "rougeL", "exact_match", "f1"):
        assert stats.metric_values(metric, replies, golds)(ones)[0] == pytest.approx(expected[metric], abs=1e-4)


def test_paired_bootstrap_finds_a_clear_gain_in_macro_f1():
    refs = [(LABELS[i % 4],) for i in range(200)]
    tuned = predictions_with([i % 10 != 0 for i in range(200)], [r[0] for r in refs])
    base = predictions_with([i % 2 == 0 for i in range(200)], [r[0] for r in refs])
    verdict = stats.compare("macro_f1", {"finetuned": tuned, "zero_shot": base}, refs, baselines=["zero_shot"],
                            labels=LABELS, seed=1)["verdict"]
    assert verdict["test"].startswith("paired bootstrap") and verdict["result"] == "better"
    assert verdict["p_value"] == pytest.approx(2 / 1001)  # no resample reverses it: the smallest p of 1000


# -- baselines and samples -----------------------------------------------------------------------

def test_majority_baseline_is_the_most_frequent_training_label():
    assert stats.majority_label(["b", "c", "b", "a", "c", "b"], LABELS) == "b"
    assert stats.majority_label(["c", "b"], LABELS) == "b"  # a tie: the first in the label set
    assert stats.majority_label([], LABELS) == "a"


def test_a_sample_of_a_file_sorted_by_label_covers_every_label_in_proportion():
    items = [("a", i) for i in range(500)] + [("b", i) for i in range(300)] + [("c", i) for i in range(150)] \
        + [("d", i) for i in range(50)]
    sample = stats.representative_sample(items, 100, seed=42, key=lambda item: item[0])
    counts = {label: sum(1 for item in sample if item[0] == label) for label in LABELS}
    assert counts == {"a": 50, "b": 30, "c": 15, "d": 5}
    assert sample == sorted(sample, key=items.index)  # the file's order is kept
    assert stats.representative_sample(items, 100, seed=42, key=lambda item: item[0]) == sample
    assert stats.representative_sample(items, 100, seed=7, key=lambda item: item[0]) != sample
    few = stats.representative_sample(items, 4, seed=0, key=lambda item: item[0])
    assert {item[0] for item in few} == set(LABELS)  # every label, even at one example each
    assert len(stats.representative_sample(items, 10, seed=0)) == 10  # generation: a plain seeded sample


def test_label_coverage_flags_missing_and_rare_labels():
    warnings = stats.label_coverage(["a"] * 10 + ["b"] * 4 + ["c"] * 5, LABELS)
    assert warnings == [
        "the test split has no examples of 1 of 4 labels: d; nothing is measured for them",
        "the test split has fewer than 5 examples of 1 labels: b (4); their per-class numbers are noise",
    ]
    assert stats.label_coverage(["a", "b", "c", "d"] * 5, LABELS) == []


def test_a_77_label_confusion_matrix_stays_legible(tmp_path):
    from matplotlib.image import imread

    from ftkit.report import most_confused, plot_confusion

    labels = [f"intent_{i}" for i in range(77)]
    matrix = [[10 if i == j else (3 if j == (i + 1) % 77 and i < 5 else 0) for j in range(77)] for i in range(77)]
    confusion = {"labels": labels, "matrix": matrix}
    plot_confusion([("fine-tuned", confusion)], tmp_path / "cm.png")
    height, width = imread(tmp_path / "cm.png").shape[:2]
    assert width <= 1200 and height <= 1200
    figure = plot_confusion([("majority baseline", confusion), ("fine-tuned", confusion)], tmp_path / "two.png")
    height, width = imread(tmp_path / "two.png").shape[:2]
    assert width <= 1700 and height <= 1200
    assert [ax.get_title() for ax in figure.axes[:2]] == ["majority baseline", "fine-tuned"]
    assert not figure.axes[0].get_xticklabels()  # 77 names would overlap: report.md lists the pairs
    pairs = most_confused({"labels": labels, "matrix": matrix}, limit=3)
    assert pairs[0] == ("intent_0", "intent_1", 3, 3 / 13) and len(pairs) == 3


def test_confusion_matrices_show_label_names_and_both_models_side_by_side(tmp_path):
    from matplotlib.image import imread

    from ftkit.report import plot_confusion

    labels = ["refund", "balance", "card_lost"]
    base = {"labels": labels, "matrix": [[5, 0, 0], [5, 0, 0], [5, 0, 0]]}
    tuned = {"labels": labels, "matrix": [[5, 0, 0], [0, 4, 1], [0, 0, 5]]}
    figure = plot_confusion([("majority baseline", base), ("fine-tuned", tuned)], tmp_path / "cm.png")
    left, right = figure.axes[:2]
    assert (left.get_title(), right.get_title()) == ("majority baseline", "fine-tuned")
    for ax in (left, right):
        assert [t.get_text() for t in ax.get_xticklabels()] == labels
    assert [t.get_text() for t in left.get_yticklabels()] == labels
    # Digits: white on dark cells, black on light ones.
    colors = {t.get_text(): t.get_color() for t in right.texts}
    assert colors["1.00"] == "white" and colors["0.20"] == "black"
    height, width = imread(tmp_path / "cm.png").shape[:2]
    assert width > 1.5 * height  # two matrices side by side
    with pytest.raises(ValueError, match="other labels"):
        plot_confusion([("a", base), ("b", {"labels": labels[::-1], "matrix": tuned["matrix"]})], tmp_path / "x.png")


# -- a real run --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sorted_test_run(tmp_path_factory) -> tuple[Path, object, list[str]]:
    """A classifier-head run whose test file is sorted by label and lacks one label, sampled to 25 rows."""
    folder = tmp_path_factory.mktemp("verdict")
    rows = [json.loads(line) for line in EMOTION.read_text(encoding="utf-8").splitlines()]
    test = sorted((r for i, r in enumerate(rows) if i % 4 == 0 and r["emotion"] != "厭惡"), key=lambda r: r["emotion"])
    train = [r for i, r in enumerate(rows) if i % 4 != 0]
    for name, part in (("train.jsonl", train), ("test.jsonl", test)):
        (folder / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in part), encoding="utf-8")
    out = folder / "run"
    done = run_ftkit("run", str(QUICKSTART), "--set", f"task.train_file={json.dumps(str(folder / 'train.jsonl'))}",
                     "--set", f"task.test_file={json.dumps(str(folder / 'test.jsonl'))}",
                     "--set", "eval.max_examples=25", "--set", "train.max_steps=30",
                     "--set", f"output.dir={json.dumps(str(out))}")
    assert done.returncode == 0, done.stderr[-3000:]
    return out, done, sorted({r["emotion"] for r in test})


def test_metrics_json_carries_the_verdict_contract(sorted_test_run):
    out, _, _ = sorted_test_run
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["headline_metric"] == "accuracy"
    assert set(metrics["baselines"]) == {"majority", "zero_shot"}
    assert "accuracy" in metrics["baselines"]["majority"] and "accuracy" in metrics["baselines"]["zero_shot"]
    assert "accuracy" in metrics["finetuned"]
    assert set(metrics["ci95"]) == {"majority", "zero_shot", "random_head", "finetuned"}
    for low, high in metrics["ci95"].values():
        assert 0.0 <= low <= high <= 1.0
    verdict = metrics["verdict"]
    assert isinstance(verdict["p_value"], float) and 0.0 <= verdict["p_value"] <= 1.0
    assert verdict["result"] in ("better", "no significant difference", "worse")
    report = (out / "report.md").read_text(encoding="utf-8")
    for row in ("| majority baseline (always `", "| zero-shot base model |",
                "| base model, random classifier head (not a baseline) |", "| **fine-tuned** |"):
        assert row in report, row
    assert f"p = {verdict['p_value']:.3g}, n = 25)." in report


def test_a_classifier_head_run_is_judged_against_a_real_baseline_never_the_random_head(sorted_test_run):
    out, _, _ = sorted_test_run
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["head"] == "classifier"
    assert metrics["verdict"]["against"] in ("majority", "zero_shot")
    best = max(("majority", "zero_shot"), key=lambda name: metrics["baselines"][name]["accuracy"])
    assert metrics["baselines"][metrics["verdict"]["against"]]["accuracy"] == metrics["baselines"][best]["accuracy"]


def test_max_examples_on_a_test_file_sorted_by_label_evaluates_every_label(sorted_test_run):
    out, done, present = sorted_test_run
    evaluated = [json.loads(line)["target"] for line in (out / "data" / "test.jsonl").read_text(
        encoding="utf-8").splitlines()]
    assert len(evaluated) == 25 and sorted(set(evaluated)) == present
    assert min(evaluated.count(label) for label in present) >= 3  # in proportion: about 5 each
    # The label the test file lacks is flagged, and still counts in macro-F1 (the whole label set).
    warning = "the test split has no examples of 1 of 6 labels: 厭惡; nothing is measured for them"
    assert f"Warning: {warning}" in done.stdout
    assert f"> **Warning:** {warning}" in (out / "report.md").read_text(encoding="utf-8")
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert "厭惡" in metrics["finetuned"]["per_class"] and metrics["test_warnings"][0] == warning
