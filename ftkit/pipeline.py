"""``ftkit run``: one fine-tuning run, top to bottom.

    setup → load data → load model → baselines → train → evaluation → save (with the verdict)

Everything is written into ``<output.dir>.partial`` and renamed into place only at the end, so a
folder named like the run is always complete; a failure before training removes the partial
folder, a failure during training leaves it with its checkpoints, and ``--resume`` continues from
the newest complete one (the baseline evaluations are kept, not redone). Checkpoints are saved at
each epoch's end and every ``train.save_minutes`` (:mod:`ftkit.training`); SIGINT and SIGTERM
stop a run as Ctrl-C does (:mod:`ftkit.interrupts`); ``--overwrite`` replaces only a run folder
ftkit made (:mod:`ftkit.folders`).

Baselines (:mod:`ftkit.baselines`) are evaluated before training; what a finished run writes,
its intervals and verdict included, is :mod:`ftkit.results`.

Under torchrun or ``accelerate launch`` (see docs/distributed.md) every rank runs every step, but
only rank 0 prints and touches the run folder; :mod:`ftkit.distributed` says who does what.
"""

from __future__ import annotations

import importlib.util
import shutil
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from ftkit import distributed
from ftkit.baselines import BASELINES, evaluate_baselines
from ftkit.console import Console
from ftkit.errors import ConfigError, FtkitError, UsageError
from ftkit.folders import write_text_atomic
from ftkit.interrupts import Stopped, StopRequests, kill_point
from ftkit.recipe import Recipe
from ftkit.results import save
from ftkit.tasks import Task

T = TypeVar("T")


class FineTuneRun:
    """A recipe run: each step a short method, called in order by :meth:`run`."""

    def __init__(self, recipe: Recipe, *, overwrite: bool = False, resume: bool = False, auto_fit: bool = False,
                 echo: Console | Callable[[str], None] = print) -> None:
        """``echo``: a :class:`~ftkit.console.Console` (quiet, JSON), or where to print each line."""
        from ftkit.plugins import get_task

        self.recipe = recipe
        self.overwrite = overwrite
        self.resume = resume
        self.auto_fit = auto_fit
        # Called with a plain line, or .event() for the lines scripts want as numbers too.
        self.echo = (echo if isinstance(echo, Console) else Console(write=echo)) if distributed.is_main() \
            else Console(write=_silent, live=False)
        self.world_size = distributed.world_size()
        self.task: Task = get_task(recipe.task.name)
        self.head = recipe.train.head if recipe.train.head != "auto" else self.task.default_head
        self.output = Path(recipe.output.dir)
        self.work = self.output.with_name(self.output.name + ".partial")
        self.notes: list[str] = []
        self.summary: dict[str, Any] = {}
        self.validation = None  # the validation callback (ftkit.validation), with a validation set
        self.stops = StopRequests()
        self.made_work = False  # whether this run made (or started over) the partial folder

    def run(self) -> Path:
        """The steps in order; SIGINT and SIGTERM stop the run as :mod:`ftkit.interrupts` says."""
        from ftkit.evaluator import show_progress

        token = show_progress.set(not (self.echo.quiet or self.echo.json))
        try:
            with self.stops.installed():
                return self._steps()
        finally:
            show_progress.reset(token)

    def _steps(self) -> Path:
        distributed.init()
        _quiet_libraries()
        training = False
        try:
            distributed.on_main(self.setup)
            distributed.main_first(self.find_model)
            self.gpu_free = _least_free_gpu_memory()
            distributed.together(self.check_memory)
            distributed.main_first(self.load_data)
            distributed.together(self.check_test_split)
            distributed.together(self.load_model)
            self.baselines = evaluate_baselines(self)
            training = True
            self.train()
            self.finetuned = self.evaluate("finetuned")
            kill_point("final-eval")
            self.finetuned["showcase"] = self.answer_showcase(self.model, self.head)
            distributed.on_main(lambda: save(self))
        except BaseException as error:
            if distributed.is_main() and not training and self.made_work:
                shutil.rmtree(self.work, ignore_errors=True)
            elif training:
                self._explain_stop(error)
            if not training:
                # Every rank has learnt of the failure (the steps before training settle together):
                # leave the group cleanly, or gloo's threads can abort the exit ("terminate called
                # without an active exception"). A rank failing mid-training may have peers inside a
                # collective, so there the launcher stops them instead.
                distributed.shutdown()
            raise
        output = distributed.on_main(self.finish)
        distributed.shutdown()
        return output or self.output

    def _explain_stop(self, error: BaseException) -> None:
        from ftkit.training import newest_checkpoint

        checkpoint = newest_checkpoint(self.work / "checkpoints")
        where = f"last checkpoint: {checkpoint}" if checkpoint else \
            "no checkpoint was saved yet (one is saved at each epoch's end and every train.save_minutes)"
        what = "Interrupted" if isinstance(error, KeyboardInterrupt) else "Run stopped"
        if isinstance(error, Stopped) and error.signum != signal.SIGINT:
            what = f"Stopped by {signal.Signals(error.signum).name}"
        same = f" (with the same {self.world_size} processes)" if self.world_size > 1 else ""
        self.echo.event("stopped", f"{what}; {where}. Continue with: {self._resume_command()}{same}", level="warning",
                        checkpoint=str(checkpoint) if checkpoint else None)

    def _resume_command(self) -> str:
        """The command that started this run (its --set values included) with --resume, without --overwrite."""
        import shlex
        import sys

        args = sys.argv[1:]
        if "run" not in args:  # not started by the command line (a library call, a test runner)
            return f"ftkit run {self.recipe.path or 'RECIPE'} --resume"
        return shlex.join(["ftkit", *(arg for arg in args if arg not in ("--overwrite", "--resume")), "--resume"])

    # -- steps -------------------------------------------------------------------------------

    def setup(self) -> None:
        """Check the run folders and create ``.partial`` (rank 0 only: the others never make folders)."""
        if self.recipe.train.deepspeed and importlib.util.find_spec("deepspeed") is None:
            raise ConfigError(str(self.recipe.path or "recipe"), [(
                "train.deepspeed: the deepspeed package is not installed here; `pip install deepspeed`, "
                "or remove train.deepspeed")])
        from ftkit.folders import check_replaceable, refuse_kept

        if self.output.exists() and not self.overwrite:
            raise UsageError(f"output.dir: {self.output} already exists; pass --overwrite or choose another dir")
        if self.overwrite and (self.output.exists() or self.output.is_symlink()):
            check_replaceable(self.output, "output.dir", self._kept_folders())
        recipe_text = self.recipe.to_toml()
        if self.resume:
            saved = self.work / "recipe.toml"
            if not saved.is_file():
                raise UsageError(f"--resume: no interrupted run in {self.work}; run without --resume")
            saved_text = saved.read_text(encoding="utf-8")
            for leftover in self.work.glob(".*.tmp"):  # a file the crash stopped writing (ftkit.folders)
                leftover.unlink()
            fitted = _with_fitted_settings(self.recipe, saved_text)
            if self.auto_fit:  # train with what the interrupted run's --auto-fit chose (check_memory shares it)
                self.recipe.train, recipe_text = fitted.train, fitted.to_toml()
            if saved_text != recipe_text:
                hint = " (its batch settings came from --auto-fit: resume with --auto-fit)" \
                    if fitted.to_toml() == saved_text else ""
                raise UsageError(f"--resume: the recipe differs from the interrupted run's ({saved}){hint}; "
                                 "resume with the same recipe and --set values, or start over with --overwrite")
        elif self.work.exists() or self.work.is_symlink():
            if not self.overwrite:
                raise UsageError(f"{self.work} holds an interrupted run: continue it with --resume, "
                                 "or pass --overwrite to start over")
            refuse_kept(self.work, "output.dir", self._kept_folders())
            if self.work.is_symlink() or not self.work.is_dir() or \
                    (any(self.work.iterdir()) and not (self.work / "recipe.toml").is_file()):
                raise UsageError(f"output.dir: {self.work} is not an interrupted ftkit run (no recipe.toml); "
                                 "--overwrite removed nothing: remove it yourself or choose another dir")
            shutil.rmtree(self.work)
        if not self.resume:
            self.work.mkdir(parents=True, exist_ok=True)
            self.made_work = True
            write_text_atomic(self.work / "recipe.toml", recipe_text)
        self.echo.event("task", f"Task {self.task.name} ({self.task.kind}, {self.head} head), method "
                        f"{self.recipe.method.name}", task=self.task.name, kind=self.task.kind, head=self.head,
                        method=self.recipe.method.name)

    def _kept_folders(self) -> list[tuple[str, Path]]:
        """Folders --overwrite never removes besides the current and home folders (ftkit.folders)."""
        return [("the recipe's folder", self.recipe.path.resolve().parent)] if self.recipe.path else []

    def find_model(self) -> None:
        """Resolve the model folder first: a missing model should fail before any data work."""
        from ftkit.modeling import resolve_model_path

        self.model_path = resolve_model_path(self.recipe, self.echo)

    def check_memory(self) -> None:
        """Estimate the peak GPU memory; refuse a run that will not fit, or shrink it with --auto-fit.

        With several processes the estimate is per device (DDP adds its gradient buckets) and is
        checked against the GPU with the least free memory, so every rank makes the same choice.
        The changes are written into the run folder's recipe.toml: it records the settings used. A
        resumed run keeps the interrupted run's (read back by setup): its checkpoints were made with them.
        """
        import torch

        from ftkit import fit

        if self.resume and self.auto_fit:
            self.recipe.train = distributed.broadcast(self.recipe.train)
        shape = fit.recipe_shape(self.recipe, self.model_path)
        if shape is None:
            self.echo("Memory: no estimate for this architecture (the estimator models Llama-style decoders)")
            return
        settings = fit.recipe_settings(self.recipe, self.head, len(self.task.labels or ()) or 2,
                                       gpus=self.world_size, task_kind=self.task.kind,
                                       cuda_context=self.gpu_free is None)  # mem_get_info's free excludes it
        result = fit.estimate(shape, settings)
        per = " per device" if self.world_size > 1 else ""
        if self.gpu_free is None:
            self.echo(f"Memory for a CUDA GPU with these settings{per} (this run is on the CPU): {fit.describe(result)}")
            return
        free = self.gpu_free
        where = (f"the {free / 2**30:.1f} GiB free on GPU {torch.cuda.current_device()}" if self.world_size == 1
                 else f"the {free / 2**30:.1f} GiB free on the fullest of the {self.world_size} GPUs")
        plan = fit.check_fit(shape, settings, free, where, allow_changes=self.auto_fit and not self.resume,
                             recipe_path=str(self.recipe.path or "recipe"))
        if not plan.changes:
            self.echo(f"Memory{per}: {fit.describe(result)}; fits {where}")
            return
        train = self.recipe.train
        train.batch_size, train.grad_accum = plan.settings.batch, plan.settings.grad_accum
        train.activation_checkpointing = plan.settings.activation_checkpointing
        if distributed.is_main():
            write_text_atomic(self.work / "recipe.toml", self.recipe.to_toml())
        note = f"--auto-fit: {'; '.join(plan.changes)} (estimate {plan.estimate.total / 1e9:.2f} GB)"
        self.echo(note)
        self.notes.append(note)

    def load_data(self) -> None:
        from ftkit.prepare import load_splits
        from ftkit.stats import representative_sample

        self.splits = load_splits(self.task, self.recipe)
        kill_point("data")
        self.labels = self.splits.labels
        self.test = self.splits.test
        if self.recipe.eval.max_examples:
            self.test = representative_sample(self.test, self.recipe.eval.max_examples, self.recipe.train.seed,
                                              (lambda e: e.target) if self.labels else None)
        self.notes += self.splits.notes
        valid = {"valid_examples": len(self.splits.valid)} if self.splits.valid else {}
        shown = f"{len(self.splits.valid)} validation / " if valid else ""
        self.echo.event("data", f"Data: {len(self.splits.train)} train / {shown}{len(self.test)} test examples",
                        train_examples=len(self.splits.train), **valid, test_examples=len(self.test))

    def check_test_split(self) -> None:
        """Say so when the test split cannot speak for every label (missing, or under 5 examples)."""
        from ftkit.stats import label_coverage

        self.test_warnings = label_coverage([e.target for e in self.test], self.labels) if self.labels else []
        for warning in self.test_warnings:
            self.echo(f"Warning: {warning}")

    def load_model(self) -> None:
        from transformers import set_seed

        from ftkit.modeling import LoadedModel, count_parameters, load_model, load_tokenizer

        # Seed before the model exists: a new classifier head and the LoRA weights are initialized
        # at load time, long before the Trainer seeds anything.
        set_seed(self.recipe.train.seed)

        if self.recipe.model.trust_remote_code:
            self.echo("Warning: model.trust_remote_code = true runs Python code shipped with the model")

        def load() -> LoadedModel:
            self.tokenizer = load_tokenizer(self.model_path, self.recipe)
            return load_model(self.model_path, self.recipe, self.head, self.labels, self.tokenizer)

        self.loaded, seconds = self._load(str(self.model_path), load)
        for notice in self.loaded.notices:
            self.echo(f"Notice: {notice}")
        self.notes += self.loaded.notices
        self.model = self.loaded.model
        self.trainable, self.total = count_parameters(self.model)
        numerics = f"fp32 weights, {self.loaded.dtype} compute" if self.loaded.method == "full" and self.loaded.amp \
            else self.loaded.dtype
        self.echo.event("model", f"Model: {self.model_path} on {self.loaded.device} ({numerics}), "
                                 f"{self.trainable:,} trainable of {self.total:,} parameters; loaded in {seconds:.1f} s",
                        model=str(self.model_path), device=self.loaded.device, dtype=self.loaded.dtype,
                        method=self.loaded.method, trainable_params=self.trainable, total_params=self.total,
                        load_seconds=round(seconds, 2))

    def _load(self, what: str, load: Callable[[], T]) -> tuple[T, float]:
        """``load()`` after a line saying what loads where, without the library's progress bars: (result, seconds).

        transformers draws a "Loading weights" bar per model (a wall of carriage returns in a log);
        the line before and the time after say the same in ftkit's voice.
        """
        import torch
        from transformers.utils import logging as hf_logging

        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.echo.event("loading", f"Loading {what} on {device} …", model=str(self.model_path), device=device)
        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
        start = time.perf_counter()
        try:
            return load(), time.perf_counter() - start
        finally:
            if bars:
                hf_logging.enable_progress_bar()

    def evaluate(self, model: str) -> dict[str, Any]:
        """Every rank predicts its share of the test split; all get the gathered result.

        :param model: which model this is, a key of :data:`ftkit.report.MODEL_NAMES` (``finetuned``, ...).
        """
        from ftkit.evaluator import evaluate
        from ftkit.report import MODEL_NAMES

        result = evaluate(self.model, self.tokenizer, self.task, self.test, self.head, self.labels, self.recipe,
                          MODEL_NAMES[model])
        self.say_score(model, result["metrics"])
        return result

    def say_score(self, model: str, metrics: dict[str, Any], name: str | None = None, **fields: Any) -> None:
        """``name: accuracy = 0.8167``; the fine-tuned model's is a result (shown by ``--quiet`` too)."""
        from ftkit.report import MODEL_NAMES

        headline = self.task.headline_metric
        value = metrics.get(headline, float("nan"))
        self.echo.event("evaluation", f"{name or MODEL_NAMES[model]}: {headline} = {value:.4f}",
                        level="result" if model == "finetuned" else "info", model=model, metric=headline,
                        value=value, **fields)

    def answer_showcase(self, model, head: str) -> list[str]:  # noqa: ANN001
        """The model's answers to the recipe's hand-written ``eval.showcase`` inputs (not scored)."""
        from ftkit.evaluator import answer
        from ftkit.tasks import Example

        texts = self.recipe.eval.showcase
        if not texts:
            return []
        like = self.splits.train[0]  # the task's own instruction and system prompt
        examples = [Example(input=text, target=like.target, instruction=like.instruction, system=like.system)
                    for text in texts]
        return answer(model, self.tokenizer, self.task, examples, head, self.labels, self.recipe)

    def train(self) -> None:
        from ftkit.training import build_trainer

        if self.world_size > 1:
            train = self.recipe.train
            note = (f"{self.world_size} processes: effective batch {train.batch_size} (batch_size) x "
                    f"{train.grad_accum} (grad_accum) x {self.world_size} = "
                    f"{train.batch_size * train.grad_accum * self.world_size}")
            self.echo(note)
            self.notes.append(note)
        trainer = distributed.together(lambda: build_trainer(self))
        if self.splits.valid:
            from ftkit.validation import validation_callback

            self.validation = validation_callback(self)
            trainer.add_callback(self.validation)
        checkpoint = distributed.from_main(self._checkpoint_to_resume) if self.resume else None
        if self.resume:
            self.echo(f"Resuming from {checkpoint}" if checkpoint else "No complete checkpoint: training from the start")
        start = time.perf_counter()
        self.stops.in_training = True  # a signal now stops at the step's end, with a checkpoint
        try:
            result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
        finally:
            self.stops.in_training = False
            self.echo.live("")  # an error's line must not land after the live status line
        if self.stops.signum:
            raise Stopped(self.stops.signum)
        self.train_seconds = time.perf_counter() - start
        self.steps = result.global_step
        self.log_history = trainer.state.log_history
        _release_training_state(trainer, self.model)
        resumed_at = int(checkpoint.name.rpartition("-")[2]) if checkpoint else 0
        self.say_trained(result.training_loss if self.steps > resumed_at else None, resumed=checkpoint is not None)
        if self.validation is not None:
            self.keep_weights()

    def _checkpoint_to_resume(self) -> Path | None:
        """The newest complete checkpoint, once those a crash cut short are removed (rank 0)."""
        from ftkit.training import newest_checkpoint, remove_incomplete_checkpoints

        for path in remove_incomplete_checkpoints(self.work / "checkpoints"):
            self.echo(f"Notice: removed {path}: the run stopped while writing it")
        return newest_checkpoint(self.work / "checkpoints")

    def say_trained(self, average: float | None, resumed: bool) -> None:
        """``Trained N steps in X s (final loss L, average loss A)``: the last logged loss, and the run's mean.

        The Trainer's ``training_loss`` is the mean over the steps this process ran (since the resume);
        None when a resumed run had no step left.
        """
        from ftkit.console import short_number

        final = next((entry["loss"] for entry in reversed(self.log_history) if "loss" in entry), None)
        losses = ([f"final loss {short_number(final)}"] if final is not None else []) + \
            ([f"average loss {short_number(average)}" + (" since the resume" if resumed else "")] if average is not None
             else ["no step left to train after the resume"])
        stopped = self.validation.stopped_at if self.validation is not None else None
        early = "; stopped early: the validation metric stopped improving" if stopped else ""
        self.echo.event("trained", f"Trained {self.steps} steps in {self.train_seconds:.1f} s ({', '.join(losses)})"
                        + early, level="result", steps=self.steps, seconds=round(self.train_seconds, 2),
                        final_loss=final, average_loss=average, **({"stopped_early": True} if stopped else {}))

    def keep_weights(self) -> None:
        """``train.keep``: load the validation-best step's weights back (unless the last is kept, or is the best)."""
        from ftkit.validation import best_file, load_trainable

        tracker, metric = self.validation, self.validation.summary()["metric"]
        self.kept = "last" if self.recipe.train.keep == "last" or tracker.best_step is None else "best"
        if tracker.best_step is None and self.recipe.train.keep != "last":
            self.echo(f"Warning: no validation {metric} was a number; keeping the last step's weights")
        if self.kept == "last" or tracker.best_step == self.steps:
            return
        load_trainable(self.model, best_file(self.work, tracker.best_step))
        self.echo.event("kept", f"Kept the weights of step {tracker.best_step} (best validation {metric} "
                        f"{tracker.best_value:.4f}), not the last step's ({self.steps})", step=tracker.best_step,
                        metric=metric, value=tracker.best_value)

    def finish(self) -> Path:
        """Move the complete run folder into place (replacing the old one only now, if asked)."""
        from ftkit.folders import check_replaceable

        if self.output.exists() or self.output.is_symlink():
            if not self.overwrite:
                raise FtkitError(f"{self.output} appeared during the run; results left in {self.work}")
            try:  # checked again: the folder may have changed during the run
                check_replaceable(self.output, "output.dir", self._kept_folders())
            except UsageError as error:
                raise UsageError(f"{error}; results left in {self.work}") from None
            shutil.rmtree(self.output)
        from ftkit.datatools import usual_permissions

        usual_permissions(self.work)  # safetensors writes owner-only files
        self.work.rename(self.output)
        weights = "adapter/" if (self.output / "adapter").is_dir() else "model/"
        headline = self.task.headline_metric
        models = {name: self.baselines[name] for name in (*BASELINES, "random_head")} | {"finetuned": self.finetuned}
        scores = {name: result["metrics"].get(headline) for name, result in models.items() if result}
        self.echo.event("done", f"Run folder: {self.output} (report.md, metrics.json, {weights})", level="result",
                        run_folder=str(self.output), metric=headline, scores=scores, ci95=self.summary["ci95"],
                        verdict=self.summary["verdict"])
        return self.output


#: The train keys --auto-fit may change (ftkit.fit): a resumed run takes them from the interrupted run's recipe.toml.
FITTED_KEYS = ("batch_size", "grad_accum", "activation_checkpointing")


def _with_fitted_settings(recipe: Recipe, saved_text: str) -> Recipe:
    """``recipe`` with the --auto-fit keys of a run folder's recipe.toml (``saved_text``), as a copy."""
    import tomllib
    from dataclasses import replace

    try:
        saved = tomllib.loads(saved_text).get("train")
    except tomllib.TOMLDecodeError:
        return recipe
    if not isinstance(saved, dict):
        return recipe
    kinds = {"batch_size": int, "grad_accum": int, "activation_checkpointing": bool}
    fitted = {key: saved[key] for key in FITTED_KEYS if type(saved.get(key)) is kinds[key]}
    return replace(recipe, train=replace(recipe.train, **fitted))


def _release_training_state(trainer, model) -> None:  # noqa: ANN001
    """Free what only training needs before the evaluation: optimizer states, gradients, and the
    autocast wrapper accelerate leaves on ``model.forward`` after mixed-precision training.

    The estimator's evaluation phase counts the weights and the evaluation's own tensors only;
    left alone, a full fine-tuning run's fp32 AdamW states (8 bytes per parameter) would stay
    allocated through the evaluation. Without the wrapper, the final evaluation runs the fp32
    master weights as the baseline evaluation and ``ftkit eval`` do.
    """
    import gc

    import torch
    from accelerate.utils import extract_model_from_parallel

    model.zero_grad(set_to_none=True)
    extract_model_from_parallel(model, keep_fp32_wrapper=False)  # restores the forward in place
    trainer.optimizer = trainer.lr_scheduler = None
    trainer.accelerator.free_memory()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _silent(_: str) -> None:
    """The echo of ranks other than 0."""


def _least_free_gpu_memory() -> int | None:
    """The free memory of the fullest GPU over all ranks (each uses its own); None without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return None
    free = distributed.together(lambda: torch.cuda.mem_get_info()[0])
    return min(distributed.all_gather(free))


def _quiet_libraries() -> None:
    """Keep the console to ftkit's own lines and progress bars: library chatter goes to ERROR.

    transformers prints a load report for every newly initialized head (expected here: the
    classifier head is new by design) and deprecation warnings about its own internals;
    bitsandbytes warns on every CPU with AVX512-BF16 that an optional kernel package is missing.
    """
    import logging
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"transformers\..*")
    warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.utils\.checkpoint")
