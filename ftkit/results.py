"""What a finished run writes: weights, labels, metrics.json (with every model's interval and the
verdict), report.md, the exact test split with every model's predictions, and manifest.json."""

from __future__ import annotations

import shutil
from typing import TYPE_CHECKING, Any

from ftkit.baselines import BASELINES
from ftkit.interrupts import kill_point

if TYPE_CHECKING:
    from ftkit.pipeline import FineTuneRun


def validation_record(run: FineTuneRun) -> dict[str, Any]:
    """metrics.json's ``best_step`` and ``validation`` (its history: ``[{step, METRIC}]``); {} without one."""
    if run.validation is None:
        return {}
    return {"best_step": run.validation.best_step,
            "validation": run.validation.summary() | {"kept": run.kept}}


def save(run: FineTuneRun) -> None:
    from ftkit.hub import model_revision
    from ftkit.prepare import file_sha256
    from ftkit.report import manifest, write_json, write_report

    weights = run.work / ("adapter" if run.loaded.method in ("lora", "qlora") else "model")
    run.model.save_pretrained(weights, safe_serialization=True)
    run.tokenizer.save_pretrained(weights)
    kill_point("save")
    labels = {"head": run.head, "labels": run.labels,
              "id2label": dict(enumerate(run.labels)) if run.labels else None}
    write_json(run.work / "labels.json", labels)
    judged = judge(run)
    _save_test_split(run, judged["verdict"])
    summary = {
        "task": run.task.name, "model": run.recipe.model.id, "model_path": str(run.model_path),
        "method": run.loaded.method, "head": run.head, "device": run.loaded.device,
        "headline_metric": run.task.headline_metric, "seed": run.recipe.train.seed,
        "train_examples": len(run.splits.train), "test_examples": len(run.test),
        "trainable_params": run.trainable, "total_params": run.total, "steps": run.steps,
        "train_seconds": run.train_seconds, "notes": run.notes,
        "recipe_path": str(run.recipe.path) if run.recipe.path else "recipe.toml",
        "baselines": {name: run.baselines[name] for name in BASELINES}, "labels": run.labels,
        "random_head": run.baselines["random_head"], "finetuned": run.finetuned,
        "ci95": judged["ci95"], "verdict": judged["verdict"], "test_warnings": run.test_warnings,
        "showcase": list(run.recipe.eval.showcase),
    } | validation_record(run)
    run.summary = summary
    metrics_of = lambda result: result["metrics"] if result else None  # noqa: E731
    write_json(run.work / "metrics.json", {
        k: summary[k] for k in ("task", "model", "method", "head", "headline_metric", "train_examples",
                                "test_examples", "steps", "seed")
    } | {"baselines": {name: metrics_of(run.baselines[name]) for name in BASELINES},
         "random_head": metrics_of(run.baselines["random_head"]),
         "finetuned": run.finetuned["metrics"], "ci95": judged["ci95"], "verdict": judged["verdict"],
         "test_warnings": run.test_warnings} | validation_record(run))
    write_report(run.work, summary, run.log_history)
    hashes = {name: file_sha256(path) for name, path in
              (("train_file", run.recipe.task.train_file), ("test_file", run.recipe.task.test_file),
               ("valid_file", run.recipe.task.valid_file)) if path}
    hashes["test_split"] = file_sha256(run.work / "data" / "test.jsonl")
    write_json(run.work / "manifest.json", manifest(summary, hashes, recipe=run.recipe.to_dict(),
                                                     model_revision=model_revision(run.model_path)))
    shutil.rmtree(run.work / "checkpoints", ignore_errors=True)
    shutil.rmtree(run.work / "best", ignore_errors=True)
    (run.work / "baseline.json").unlink(missing_ok=True)


def judge(run: FineTuneRun) -> dict[str, Any]:
    """Every model's 95% interval and the fine-tuned model's verdict against the best baseline."""
    from ftkit.metrics import task_metrics
    from ftkit.stats import compare

    predictions = {name: result["predictions"] if result else None
                   for name, result in run.baselines.items() if name != "notes"}
    predictions["finetuned"] = run.finetuned["predictions"]
    scores = {name: result["metrics"][run.task.headline_metric]
              for name, result in [*run.baselines.items(), ("finetuned", run.finetuned)]
              if name != "notes" and result and run.task.headline_metric in result["metrics"]}
    return compare(run.task.headline_metric, predictions, [e.references for e in run.test],
                   baselines=BASELINES, labels=run.labels, scores=scores, seed=run.recipe.train.seed,
                   metrics_fn=lambda p, r: task_metrics(run.task, p, r, run.labels))


def _save_test_split(run: FineTuneRun, verdict: dict[str, Any] | None) -> None:
    """The exact test examples (to re-evaluate the adapter later) and every model's predictions.

    ``baseline_prediction`` is the prediction of the baseline the verdict compares with.
    """
    import jsonlines

    (run.work / "data").mkdir(exist_ok=True)
    examples = [{"input": e.input, "target": e.target, "references": list(e.references),
                 "instruction": e.instruction, "system": e.system}
                | ({"pair": e.pair} if e.pair else {}) | ({"messages": list(e.messages)} if e.messages else {})
                for e in run.test]
    with jsonlines.open(run.work / "data" / "test.jsonl", "w") as writer:
        writer.write_all(examples)
    against = run.baselines[verdict["against"]] if verdict else None
    columns = {"baseline_prediction": against["predictions"] if against else [None] * len(run.test)}
    for name in ("zero_shot", "random_head"):
        if run.baselines.get(name):
            columns[f"{name}_prediction"] = run.baselines[name]["predictions"]
    with jsonlines.open(run.work / "predictions.jsonl", "w") as writer:
        writer.write_all({"target": e.target, "prediction": p} | {k: v[i] for k, v in columns.items()}
                         for i, (e, p) in enumerate(zip(run.test, run.finetuned["predictions"])))
