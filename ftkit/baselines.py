"""The baselines a fine-tuned model is judged against, evaluated before training.

Classification: ``majority`` (always the most frequent training label) and ``zero_shot`` (the base
model choosing a label through its LM head, also when the recipe trains a classifier head). A
classifier-head run also evaluates its base model with the newly initialized head, reported as
``random_head`` and never the comparison. Generation: the base model's zero-shot replies. The
results are saved in the run folder (``baseline.json``), so a resumed run does not evaluate them
again.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ftkit import distributed
from ftkit.folders import write_text_atomic
from ftkit.interrupts import kill_point

if TYPE_CHECKING:
    from ftkit.pipeline import FineTuneRun

#: The models a fine-tuned model is judged against (the best of those that ran); never the random head.
BASELINES = ("majority", "zero_shot")


def evaluate_baselines(run: FineTuneRun) -> dict[str, Any]:
    """The baselines' results, saved so a resumed run does not evaluate them again.

    ``{"majority": result | None, "zero_shot": result | None, "random_head": result | None,
    "notes": [...]}``, each result ``{"metrics", "predictions"}``.
    """
    saved = run.work / "baseline.json"
    if run.resume:
        kept, problem = distributed.from_main(lambda: read_saved(saved, len(run.test)))
        if kept is not None:
            run.echo("baselines: evaluations kept from the interrupted run")
            run.notes += kept["notes"]
            return kept
        if problem:
            run.echo(f"Notice: {saved} {problem}; evaluating the baselines again")
    notes: list[str] = []
    result: dict[str, Any] = {"majority": _majority(run), "zero_shot": None, "random_head": None}
    kill_point("baselines")
    if not run.recipe.eval.baseline:
        notes.append("eval.baseline = false: the base model was not evaluated (no zero-shot baseline)")
    elif run.head == "classifier":
        result["random_head"] = run.evaluate("random_head")
        result["zero_shot"] = _zero_shot_lm(run, notes)
    else:
        # The LoRA adapters start as the identity: this is the base model answering zero-shot.
        result["zero_shot"] = run.evaluate("zero_shot")
        result["zero_shot"]["showcase"] = run.answer_showcase(run.model, "causal")
    for note in notes:
        run.echo(f"Notice: {note}")
    run.notes += notes
    result["notes"] = notes
    distributed.on_main(lambda: write_text_atomic(saved, json.dumps(result, ensure_ascii=False)))
    return result

def _majority(run: FineTuneRun) -> dict[str, Any] | None:
    """Always the most frequent training label: what any real model must beat (classification only)."""
    from ftkit.metrics import task_metrics
    from ftkit.stats import majority_label

    if not run.labels:
        return None
    label = majority_label([e.target for e in run.splits.train], run.labels)
    predictions = [label] * len(run.test)
    metrics = task_metrics(run.task, predictions, [e.references for e in run.test], run.labels)
    run.say_score("majority", metrics, f"majority baseline ({label})", label=label)
    return {"metrics": metrics, "predictions": predictions, "label": label,
            "showcase": [label] * len(run.recipe.eval.showcase)}

def _zero_shot_lm(run: FineTuneRun, notes: list[str]) -> dict[str, Any] | None:
    """A classifier-head run's zero-shot baseline: the same base weights as a causal LM, scoring labels.

    Skipped with a note when the model has no LM head, or cannot be loaded or run that way.
    """
    from dataclasses import replace

    from ftkit.evaluator import evaluate
    from ftkit.modeling import load_model

    architectures = getattr(run.model.config, "architectures", None) or []
    if architectures and not any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures):
        notes.append(f"zero-shot baseline skipped: {run.model_path} has no causal LM head "
                     f"({', '.join(architectures)}); the majority baseline is the comparison")
        return None
    # The base weights without adapters (they would start as the identity anyway), unquantized.
    recipe = replace(run.recipe, method=replace(run.recipe.method, name="full"))

    def load() -> tuple[Any, str | None]:
        try:
            return load_model(run.model_path, recipe, "causal", run.labels, run.tokenizer).model, None
        except Exception as error:  # noqa: BLE001 - a base that cannot load as an LM: no baseline, still a run
            return None, f"{type(error).__name__}: {error}"

    (causal, error), seconds = run._load(f"{run.model_path} with its LM head (zero-shot baseline)",
                                          lambda: distributed.together(load))
    if error is None:
        run.echo.event("loaded", f"Loaded in {seconds:.1f} s", load_seconds=round(seconds, 2))
    # Every rank skips if any could not load: the evaluation below is collective.
    error = next((e for e in distributed.all_gather(error) if e), None)
    result = None
    if error is None:
        try:
            result = evaluate(causal, run.tokenizer, run.task, run.test, "causal", run.labels, run.recipe,
                              "zero-shot base model (LM head)")
            result["showcase"] = run.answer_showcase(causal, "causal")
        except Exception as failure:  # noqa: BLE001 - e.g. out of memory; every rank raises it together
            error = f"{type(failure).__name__}: {failure}"
    del causal
    _free_gpu_cache()
    if result is None:
        notes.append(f"zero-shot baseline skipped: the base model could not score the labels as a causal LM "
                     f"({error})")
        return None
    run.say_score("zero_shot", result["metrics"])
    return result


def read_saved(path: Path, test_examples: int) -> tuple[dict[str, Any] | None, str | None]:
    """An interrupted run's baseline.json: (the results, None) if whole and for this test split, else (None, why)."""
    if not path.is_file():
        return None, None
    try:
        kept = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        return None, f"is unreadable ({type(error).__name__})"
    results = [kept.get(name) for name in (*BASELINES, "random_head")] if isinstance(kept, dict) else None
    whole = results is not None and isinstance(kept.get("notes"), list) and all(
        result is None or (isinstance(result, dict) and isinstance(result.get("metrics"), dict)
                           and len(result.get("predictions") or ()) == test_examples) for result in results)
    return (kept, None) if whole else (None, "does not hold a baseline result for each test example")


def _free_gpu_cache() -> None:
    """Hand a dropped model's GPU memory back before training needs it."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
