"""Validation during training: the best step, early stopping, and the best weights kept for the end.

With a validation set (``task.valid_file`` or ``train.valid_size``), :func:`validation_callback`
scores it every ``train.eval_steps`` optimizer steps (0: at each epoch's end) and at the last
step, through the fast paths only: the classifier head's logits or label scoring for a
classification task (its headline metric), the gold answers' perplexity for a generation task
(generating at every evaluation would cost more than the training).

A new best writes the trainable weights to ``best/step-N.safetensors`` in the run's work folder
(a temporary file renamed into place). The history and the best step are saved in every
checkpoint's ``trainer_state.json`` (the callback is an ``ExportableState``), so ``--resume``
continues with exactly what the checkpoint it resumes from had seen; a best file is kept while
the best step or a checkpoint names it. With ``train.keep = "best"`` the pipeline loads the
best step's weights back (:func:`load_trainable`) before the final evaluation and save. The
Trainer's own ``load_best_model_at_end`` is not used: it depends on which checkpoints its
retention keeps.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ftkit import distributed
from ftkit.errors import FtkitError

if TYPE_CHECKING:
    from ftkit.pipeline import FineTuneRun
    from ftkit.tasks import Example, Task

#: The folder of the run's work folder where the best weights are kept while training.
BEST_FOLDER = "best"
_BEST_FILE = re.compile(r"step-(\d+)\.safetensors")


def validation_metric(task: Task) -> tuple[str, bool]:
    """The metric a validation set is scored with, and whether higher is better."""
    if task.kind == "generation":
        return "perplexity", False
    return task.headline_metric, True


def validation_score(run: FineTuneRun, examples: list[Example]) -> float:
    """The validation metric of the run's model on ``examples``; every rank must call this."""
    from ftkit.evaluator import answer_nll, evaluate

    metric, _ = validation_metric(run.task)
    if run.task.kind != "generation":
        result = evaluate(run.model, run.tokenizer, run.task, examples, run.head, run.labels, run.recipe,
                          "validation set")
        return float(result["metrics"].get(metric, float("nan")))
    model, recipe = run.model, run.recipe
    was_training = model.training
    model.eval()
    try:
        mine = distributed.shard(examples)
        nll = distributed.together(lambda: answer_nll(model, run.tokenizer, mine, recipe.eval.batch_size,
                                                      recipe.train.max_seq_len, "evaluating validation set"))
    finally:
        model.train(was_training)
    total, count = (sum(values) for values in zip(*distributed.all_gather(nll)))
    mean = total / max(count, 1)
    return math.exp(mean) if mean < 700 else float("inf")


def trainable_state(model) -> dict[str, Any]:  # noqa: ANN001
    """A CPU copy of the weights training changes (LoRA adapters, a new head; everything for full)."""
    return {name: parameter.detach().to("cpu", copy=True).contiguous()
            for name, parameter in model.named_parameters() if parameter.requires_grad}


def save_trainable(model, path: Path) -> None:  # noqa: ANN001
    """:func:`trainable_state` as safetensors, written to a temporary file and renamed into place."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".tmp")
    save_file(trainable_state(model), str(partial))
    os.replace(partial, path)


def load_trainable(model, path: Path) -> None:  # noqa: ANN001
    """Copy the weights saved by :func:`save_trainable` back into ``model``."""
    import torch
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    parameters = dict(model.named_parameters())
    unknown = sorted(set(tensors) - set(parameters))
    if unknown:
        raise FtkitError(f"{path}: weights this model does not have ({', '.join(unknown[:3])}); start the run over "
                         "with --overwrite")
    with torch.no_grad():
        for name, tensor in tensors.items():
            parameters[name].copy_(tensor)


def best_file(work: Path, step: int) -> Path:
    return work / BEST_FOLDER / f"step-{step}.safetensors"


def _steps_named_by_checkpoints(checkpoints: Path, name: str) -> set[int]:
    """The best steps the checkpoints record: their best files must stay (a checkpoint cut short
    counts too; keeping a file too many is harmless, deleting one a resume needs is not)."""
    steps = set()
    for state_file in checkpoints.glob("checkpoint-*/trainer_state.json"):
        try:
            saved = json.loads(state_file.read_text(encoding="utf-8"))["stateful_callbacks"][name]
            step = saved["attributes"]["best_step"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if isinstance(step, int):
            steps.add(step)
    return steps


def validation_callback(run: FineTuneRun):  # noqa: ANN201 - a transformers.TrainerCallback
    """The callback that validates, keeps the best weights and stops early (see the module's docstring)."""
    from transformers import TrainerCallback
    from transformers.trainer_callback import ExportableState

    train = run.recipe.train
    metric, higher = validation_metric(run.task)
    every, patience = train.eval_steps, train.early_stopping_patience
    examples = run.splits.valid

    class ValidationCallback(TrainerCallback, ExportableState):
        def __init__(self) -> None:
            self.history: list[dict[str, Any]] = []
            self.best_step: int | None = None
            self.best_value: float | None = None
            self.stopped_at: int | None = None

        def state(self) -> dict:
            """What a checkpoint records (JSON in trainer_state.json), restored in :meth:`on_train_begin`."""
            return {"args": {}, "attributes": {"history": self.history, "best_step": self.best_step,
                                               "best_value": self.best_value, "stopped_at": self.stopped_at}}

        def summary(self) -> dict[str, Any]:
            """metrics.json's ``validation``."""
            return {"metric": metric, "higher_is_better": higher, "examples": len(examples),
                    "eval_steps": every, "history": self.history, "best_step": self.best_step,
                    "best_value": self.best_value, "stopped_early_at": self.stopped_at}

        def on_train_begin(self, args, state, control, **kwargs) -> None:  # noqa: ANN001, ANN003
            # A resumed Trainer state is the checkpoint's (fresh: this callback's own empty state).
            saved = (state.stateful_callbacks or {}).get(type(self).__name__)
            attributes = saved.get("attributes", {}) if isinstance(saved, dict) else {}
            self.history = [dict(entry) for entry in attributes.get("history") or []]
            self.best_step, self.best_value = attributes.get("best_step"), attributes.get("best_value")
            self.stopped_at = attributes.get("stopped_at")  # resumed from the checkpoint of an early stop
            if self.best_step is not None:
                found = distributed.from_main(lambda: best_file(run.work, self.best_step).is_file())
                if not found:
                    raise FtkitError(f"--resume: {best_file(run.work, self.best_step)} (the best weights so far) is "
                                     "missing; start the run over with --overwrite")
                run.echo(f"Validation: {len(self.history)} evaluation(s) kept from the interrupted run; best "
                         f"{metric} {self.best_value:.4f} at step {self.best_step}")
            distributed.on_main(self.prune)

        def on_step_end(self, args, state, control, **kwargs) -> None:  # noqa: ANN001, ANN003
            step = state.global_step
            at_epoch_end = state.epoch is not None and state.epoch > 0 and state.epoch == int(state.epoch)
            due = (step % every == 0 if every else at_epoch_end) or step >= state.max_steps
            if not due or (self.history and self.history[-1]["step"] >= step):
                return
            run.echo.live("")
            value = validation_score(run, examples)
            self.history.append({"step": step, metric: value})
            improved = not math.isnan(value) and (
                self.best_value is None or (value > self.best_value if higher else value < self.best_value))
            if improved:
                self.best_step, self.best_value = step, value
                # Rank 0 writes while the others wait: at the end, every rank may read the file at once.
                distributed.on_main(lambda: (save_trainable(run.model, best_file(run.work, step)), self.prune()))
            best = f"best {self.best_value:.4f} at step {self.best_step}" if self.best_step is not None else "no best"
            run.echo.event("validation", f"validation step {step}: {metric} = {value:.4f} "
                           f"({'new best' if improved else best})", step=step, metric=metric, value=value,
                           best_step=self.best_step, best_value=self.best_value)
            since = len([entry for entry in self.history if entry["step"] > (self.best_step or 0)])
            if patience and since >= patience and step < state.max_steps:
                self.stopped_at = step
                control.should_training_stop = True
                control.should_log = True  # the stopping step's loss is the final loss (on every rank)
                run.echo.event("early_stop", f"Early stopping at step {step}: {metric} has not improved in "
                               f"{since} evaluation(s) ({best})", step=step, metric=metric,
                               best_step=self.best_step, best_value=self.best_value)

        def on_save(self, args, state, control, **kwargs) -> None:  # noqa: ANN001, ANN003
            if state.is_world_process_zero:
                self.prune()

        def prune(self) -> None:
            """Remove the best files that neither the best step nor a checkpoint names (rank 0)."""
            folder = run.work / BEST_FOLDER
            if not folder.is_dir():
                return
            keep = _steps_named_by_checkpoints(run.work / "checkpoints", type(self).__name__) | {self.best_step}
            for path in folder.iterdir():
                match = _BEST_FILE.fullmatch(path.name)
                if not match or int(match.group(1)) not in keep:
                    path.unlink(missing_ok=True)

    return ValidationCallback()
