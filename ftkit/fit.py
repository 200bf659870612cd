"""Will a recipe fit the GPU? The estimator applied to a recipe, and ``--auto-fit``.

Pure Python, so ``ftkit run --dry-run`` stays instant.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from ftkit.errors import ConfigError, ModelError, UsageError
from ftkit.estimator import DEFAULT_TARGETS, Estimate, Settings, estimate
from ftkit.model_configs import ModelShape, resolve_shape, shape_from_config
from ftkit.recipe import Recipe

RECIPE_DTYPES = {"auto": "bf16", "bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


def recipe_shape(recipe: Recipe, model_path: Path | None = None) -> ModelShape | None:
    """The model's shape, from its folder when known, else from the table or the local caches; None
    when the estimator does not model it (e.g. an encoder) or its config is not here yet."""
    try:
        if model_path is not None and (Path(model_path) / "config.json").is_file():
            return shape_from_config(Path(model_path) / "config.json", name=recipe.model.id)
        if recipe.model.source == "builtin" and recipe.model.id == "ftkit/tiny-qwen2":
            from ftkit.tiny import TINY_MODEL_VERSION, tiny_cache_root

            config = tiny_cache_root() / f"tiny-qwen2-{TINY_MODEL_VERSION}" / "config.json"
            return shape_from_config(config, name=recipe.model.id) if config.is_file() else None
        from ftkit.modeling import gguf_file_path, is_gguf_source

        if recipe.model.source == "builtin" or is_gguf_source(recipe):
            # The GGUF header has the shape: no need to dequantize (or even have the cache) first.
            from ftkit.gguf import builtin_gguf_file, shape_from_gguf

            gguf = builtin_gguf_file(recipe.model.id) if recipe.model.source == "builtin" else gguf_file_path(recipe)
            return shape_from_gguf(gguf, name=recipe.model.id)
        return resolve_shape(recipe.model.id)
    except (UsageError, ModelError):
        return None


def recipe_settings(recipe: Recipe, head: str, num_labels: int, gpus: int = 1, *, task_kind: str = "classification",
                    cuda_context: bool = True) -> Settings:
    """The estimator's settings for a recipe; ``gpus``: the data-parallel processes (per-device estimate).

    :param task_kind: the task's kind; with the head it decides what the evaluation runs.
    :param cuda_context: False when the budget is free memory read after CUDA started (it excludes the context).
    """
    method = recipe.method
    evaluation = "classifier" if head == "classifier" else "labels" if task_kind == "classification" else "generation"
    return Settings(
        seq=recipe.train.max_seq_len, batch=recipe.train.batch_size, method=method.name, lora_r=method.r,
        lora_dropout=method.dropout,
        target_modules=tuple(method.target_modules) or DEFAULT_TARGETS,
        dtype=RECIPE_DTYPES[recipe.model.dtype], optim=recipe.train.optim,
        activation_checkpointing=recipe.train.activation_checkpointing,
        head=head, num_labels=max(num_labels, 1), grad_accum=recipe.train.grad_accum, gpus=gpus,
        eval_kind=evaluation, eval_batch=recipe.eval.batch_size, max_new_tokens=recipe.eval.max_new_tokens,
        cuda_context=cuda_context,
    )


@dataclass
class FitPlan:
    settings: Settings
    estimate: Estimate
    changes: list[str]  # `train.key: old -> new`, empty when the recipe fits as written


def auto_fit(shape: ModelShape, settings: Settings, gpu_bytes: int) -> FitPlan | None:
    """The smallest change that fits ``gpu_bytes``, keeping the effective batch: first a smaller
    micro-batch with more accumulation, then activation checkpointing too. None if nothing fits."""
    first = estimate(shape, settings)
    if first.total <= gpu_bytes:
        return FitPlan(settings, first, [])
    effective = settings.batch * settings.grad_accum
    for checkpointing in sorted({settings.activation_checkpointing, True}):
        batch = settings.batch
        while batch >= 1:
            candidate = replace(settings, batch=batch, grad_accum=-(-effective // batch),
                                activation_checkpointing=checkpointing)
            result = estimate(shape, candidate)
            if result.total <= gpu_bytes:
                changes = [f"train.{key}: {old} -> {new}" for key, old, new in (
                    ("batch_size", settings.batch, candidate.batch),
                    ("grad_accum", settings.grad_accum, candidate.grad_accum),
                    ("activation_checkpointing", str(settings.activation_checkpointing).lower(),
                     str(candidate.activation_checkpointing).lower()),
                ) if old != new]
                return FitPlan(candidate, result, changes)
            batch //= 2
    return None


def check_fit(shape: ModelShape, settings: Settings, free: int, where: str, *, allow_changes: bool,
              recipe_path: str = "recipe") -> FitPlan:
    """The plan a run goes ahead with on a GPU with ``free`` bytes, or a one-line ConfigError.

    Without ``allow_changes`` (--auto-fit) a run that will not fit is refused, naming the changes
    --auto-fit would make.
    """
    plan = auto_fit(shape, settings, free)
    first = estimate(shape, settings)
    total = first.total / 1e9
    smallest = estimate(shape, replace(settings, batch=1, activation_checkpointing=True))
    if plan is None and smallest.phases["train"] <= free:  # training could fit: the evaluation does not
        raise ConfigError(recipe_path, [
            f"eval.batch_size: the evaluation's estimate ({first.phases['eval'] / 1e9:.2f} GB) exceeds {where}; "
            f"lower eval.batch_size (now {settings.eval_batch}) or train.max_seq_len"])
    if plan is None:
        raise ConfigError(recipe_path, [
            f"train.batch_size: the estimate ({total:.2f} GB) exceeds {where}, even at batch 1 with activation "
            'checkpointing; use method.name = "qlora", a shorter train.max_seq_len or a smaller model'])
    if plan.changes and not allow_changes:
        raise ConfigError(recipe_path, [
            f"train.batch_size: the estimate ({total:.2f} GB) exceeds {where}; rerun with --auto-fit to set "
            f"{'; '.join(plan.changes)}"])
    return plan


def describe(result: Estimate) -> str:
    """One line: the peak and every part of it at its phase of the step, adding up to the total.

    At the start of the backward pass the parts are weights, optimizer states, activations,
    logits/loss and the gradients already there; at the optimizer step, weights, states and the
    gradients with the update's buffers. Overhead (allocator slack, CUDA context, DDP buckets) is
    named, not hidden.
    """
    c = result.components
    if result.peak_phase.startswith("evaluation"):
        weights = c["total"] - c["overhead"] - c["evaluation"]  # autocast's copies are gone by then
        shown = " + ".join(f"{name} {value / 1e9:.2f}" for name, value in (
            ("weights", weights), ("evaluation", c["evaluation"]), ("overhead", c["overhead"])))
        train = f"; training {result.phases['train'] / 1e9:.2f}"
        return f"{c['total'] / 1e9:.2f} GB peak ({result.peak_phase}) = {shown} GB{train}"
    parts = [("weights", c["weights"]), ("optimizer states", c["optimizer_states"])]
    if result.peak_phase.startswith("backward"):
        parts += [("activations", c["activations_layers"] + c["activations_other"]), ("logits/loss", c["logits_loss"])]
        rest = "gradients"
    else:
        rest = "gradients and update buffers"
    parts.append((rest, c["total"] - c["overhead"] - sum(value for _, value in parts)))
    parts.append(("overhead", c["overhead"]))
    shown = " + ".join(f"{name} {value / 1e9:.2f}" for name, value in parts)
    evaluation = f"; evaluation {result.phases['eval'] / 1e9:.2f}" if result.phases.get("eval") else ""
    return f"{c['total'] / 1e9:.2f} GB peak ({result.peak_phase.split(' (')[0]}) = {shown} GB{evaluation}"
