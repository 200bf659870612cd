"""The Hugging Face Trainer, set up for ftkit runs (transformers 5.x arguments)."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ftkit.console import Console
    from ftkit.pipeline import FineTuneRun


#: ``train.optim`` -> the Trainer's optimizer name. The 8-bit ones are bitsandbytes' (block-wise
#: quantized states: 2 bytes per parameter instead of AdamW's 8); paged pages its states out to CPU
#: memory under pressure (on CUDA; bitsandbytes runs it unpaged on the CPU).
OPTIMIZERS = {"adamw": "adamw_torch", "adamw_8bit": "adamw_bnb_8bit", "paged_adamw_8bit": "paged_adamw_8bit"}

#: Written into a checkpoint folder once every rank has written its files: the folder is complete.
COMPLETE_MARK = "ftkit-complete.json"


def mark_complete(checkpoint: Path, *, final: bool) -> None:
    """Mark ``checkpoint`` complete, listing its files' sizes (checked again before a resume uses it).

    :param final: the checkpoint of the last step (training over; max_steps or early stopping): a
        run resumed from it trains no further.
    """
    from ftkit.folders import write_text_atomic

    files = {str(path.relative_to(checkpoint)): path.stat().st_size
             for path in sorted(checkpoint.rglob("*")) if path.is_file() and path.name != COMPLETE_MARK}
    write_text_atomic(checkpoint / COMPLETE_MARK, json.dumps({"final": final, "files": files}, indent=1))


def checkpoint_mark(checkpoint: Path) -> dict | None:
    """The mark of a complete checkpoint (``{"final": bool, "files": {name: size}}``), or None.

    Complete: marked, and every file listed is there with its size. A checkpoint a crash cut short
    (SIGKILL while the Trainer wrote it) has no mark, and is never resumed from.
    """
    try:
        mark = json.loads((checkpoint / COMPLETE_MARK).read_text(encoding="utf-8"))
        if all((checkpoint / name).stat().st_size == size for name, size in mark["files"].items()):
            return mark
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    return None


def _checkpoints(folder: Path) -> list[tuple[int, Path]]:
    found = [(re.fullmatch(r"checkpoint-(\d+)", path.name), path) for path in folder.iterdir()] \
        if folder.is_dir() else []
    return sorted((int(match.group(1)), path) for match, path in found if match and path.is_dir())


def newest_checkpoint(folder: Path) -> Path | None:
    """The newest complete ``checkpoint-N`` folder in ``folder`` (see :func:`checkpoint_mark`), or None."""
    complete = [path for _, path in _checkpoints(folder) if checkpoint_mark(path) is not None]
    return complete[-1] if complete else None


def remove_incomplete_checkpoints(folder: Path) -> list[Path]:
    """Remove the checkpoints a crash cut short (before a resume: the Trainer would write into them again)."""
    import shutil

    removed = [path for _, path in _checkpoints(folder) if checkpoint_mark(path) is None]
    for path in removed:
        shutil.rmtree(path)
    return removed


def seeded_length_grouped_sampler(lengths: list[int], batch_size: int, seed: int):  # noqa: ANN201
    """A ``LengthGroupedSampler`` whose order depends only on (seed, epoch).

    transformers' own train sampler draws its permutation from the global torch RNG when an epoch
    starts. A run resumed mid-epoch restores that RNG only after the skipped batches, so the resumed
    epoch got a different order and the final weights differed from an uninterrupted run's. The
    Trainer calls ``set_epoch`` on the sampler every epoch (through accelerate), so seeding from the
    epoch makes every epoch's order reproducible, resumed or not.

    With several processes accelerate deals the sampler's batches out to the ranks in turn
    (``BatchSamplerShard``); ``batch_size`` is then the global batch (per-device batch x gradient
    accumulation x world size), so one optimizer step takes the same examples as one process
    with a world-size-times larger batch, and every rank derives the same order from (seed, epoch).
    """
    import torch
    from transformers.trainer_pt_utils import LengthGroupedSampler

    class SeededLengthGroupedSampler(LengthGroupedSampler):
        def __init__(self) -> None:
            super().__init__(batch_size, lengths=lengths)
            self.epoch = 0

        def set_epoch(self, epoch: int) -> None:
            self.epoch = epoch

        def __iter__(self):  # noqa: ANN204
            self.generator = torch.Generator().manual_seed(seed * 1_000_003 + self.epoch)
            return super().__iter__()

    return SeededLengthGroupedSampler()


def build_features(run: FineTuneRun) -> list[dict]:
    """Tokenized training features; unpadded (the collator pads each batch to its longest)."""
    from ftkit.prepare import encode_causal, encode_classifier

    max_len = run.recipe.train.max_seq_len
    if run.head == "classifier":
        label_ids = {label: i for i, label in enumerate(run.labels)}
        return [encode_classifier(run.tokenizer, e, max_len, label_ids) for e in run.splits.train]
    return [encode_causal(run.tokenizer, e, max_len) for e in run.splits.train]


def progress_callback(console: Console):  # noqa: ANN201 - a transformers.TrainerCallback
    """ftkit's training lines, in place of the Trainer's printed dicts and progress bar.

    One line per logging step (``step 40/240 · loss 0.41 · lr 1.9e-4 · 7.8 it/s · eta 0:21``); in
    between, a live status line on a terminal, or without one (CI logs, pipes) a plain line every
    ``PROGRESS_EVERY_S`` seconds. The last step is always logged, so the final loss is the last
    step's, not that of the logging step before it.
    """
    import time

    from transformers import TrainerCallback

    from ftkit.console import duration_text, rate_text, scientific, short_number
    from ftkit.evaluator import PROGRESS_EVERY_S

    def line(numbers: dict, loss: float | None = None, lr: float | None = None) -> str:
        parts = [f"step {numbers['step']}/{numbers['total']}"]
        parts += [f"loss {short_number(loss)}"] if loss is not None else []
        parts += [f"lr {scientific(lr)}"] if lr is not None else []
        parts += [rate_text(numbers["steps_per_s"])] if numbers["steps_per_s"] > 0 else []
        parts += [f"eta {duration_text(numbers['eta_s'])}"] if numbers["step"] < numbers["total"] \
            and numbers["eta_s"] is not None else []
        return " · ".join(parts)

    class ProgressLines(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs) -> None:  # noqa: ANN001, ANN003
            self.began = self.shown = time.perf_counter()
            self.first_step = state.global_step  # past 0 in a resumed run

        def numbers(self, state) -> dict:  # noqa: ANN001
            seconds = time.perf_counter() - self.began
            rate = (state.global_step - self.first_step) / seconds if seconds > 0 else 0.0
            eta = (state.max_steps - state.global_step) / rate if rate > 0 else None
            return {"step": state.global_step, "total": state.max_steps, "steps_per_s": round(rate, 3),
                    "eta_s": None if eta is None else round(eta, 1)}

        def on_step_end(self, args, state, control, **kwargs) -> None:  # noqa: ANN001, ANN003
            if state.global_step >= state.max_steps:
                control.should_log = True  # on every rank: logging gathers the loss from all of them
            if not state.is_world_process_zero:
                return
            if console.on_terminal:
                console.live(line(self.numbers(state)))
            elif time.perf_counter() - self.shown >= PROGRESS_EVERY_S and not control.should_log:
                self.shown = time.perf_counter()
                numbers = self.numbers(state)
                console.event("progress", line(numbers), level="progress", **numbers)

        def on_log(self, args, state, control, logs=None, **kwargs) -> None:  # noqa: ANN001, ANN003
            if not state.is_world_process_zero or "loss" not in (logs or {}):
                return  # the Trainer's closing speed metrics: the pipeline says how training went
            self.shown = time.perf_counter()
            numbers = self.numbers(state)
            lr = logs.get("learning_rate")
            console.event("step", line(numbers, logs["loss"], lr), loss=logs["loss"], lr=lr,
                          grad_norm=logs.get("grad_norm"), epoch=logs.get("epoch"), **numbers)

        def on_train_end(self, args, state, control, **kwargs) -> None:  # noqa: ANN001, ANN003
            console.live("")

    return ProgressLines()


def checkpoint_callback(run: FineTuneRun, clock: Callable[[], float] = time.monotonic):  # noqa: ANN201
    """When to save checkpoints besides ``train.save_steps`` (the Trainer's own), and marking each complete.

    A checkpoint is saved at each epoch's end (so also where training ends: max_steps, early
    stopping), every ``train.save_minutes`` of training, and when a stop signal was noted
    (:mod:`ftkit.interrupts`: save, then stop). With several processes the time is rank 0's and a
    signal any rank's, shared at each step, so every rank saves at the same step. Once every rank
    has written its files, rank 0 marks the folder complete (:func:`mark_complete`).
    """
    import signal

    from transformers import TrainerCallback

    from ftkit import distributed
    from ftkit.interrupts import kill_point

    minutes, steps = run.recipe.train.save_minutes, run.recipe.train.save_steps
    stops = run.stops

    class Checkpoints(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs) -> None:  # noqa: ANN001, ANN003
            self.saved_at = clock()
            self.saved_step = state.global_step  # a resumed run's checkpoint is there already
            self.why = ""

        def on_step_end(self, args, state, control, **kwargs) -> None:  # noqa: ANN001, ANN003
            kill_point("training")
            due = bool(minutes) and clock() - self.saved_at >= minutes * 60
            signum = stops.signum or 0
            if distributed.world_size() > 1:
                votes = distributed.all_gather((due, signum))
                due, signum = votes[0][0], next((vote for _, vote in votes if vote), 0)
            if signum:
                stops.signum = signum
                control.should_save = control.should_training_stop = True
                self.why = f"stopping on {signal.Signals(signum).name}"
            elif due:
                control.should_save = True
                self.why = f"every {minutes:g} min"
            elif control.should_save:
                self.why = "last step" if state.global_step >= state.max_steps else f"every {steps} steps"

        def on_epoch_end(self, args, state, control, **kwargs) -> None:  # noqa: ANN001, ANN003
            if state.global_step != self.saved_step:
                control.should_save = True
                self.why = "last step" if control.should_training_stop or state.global_step >= state.max_steps \
                    else f"end of epoch {round(state.epoch)}"

        def on_save(self, args, state, control, **kwargs) -> None:  # noqa: ANN001, ANN003
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            final = (control.should_training_stop or state.global_step >= state.max_steps) and not stops.signum
            kill_point("checkpoint-write")
            distributed.all_gather(None)  # every rank has written its part (its RNG state, say)
            distributed.on_main(lambda: mark_complete(folder, final=final))
            self.saved_step, self.saved_at = state.global_step, clock()
            run.echo.event("checkpoint", f"Checkpoint at step {state.global_step} ({self.why}): {folder}",
                           step=state.global_step, path=str(folder), reason=self.why)

    return Checkpoints()


def build_trainer(run: FineTuneRun):  # noqa: ANN201 - a transformers.Trainer
    import torch
    from torch.utils.tensorboard import SummaryWriter
    from transformers import DataCollatorForSeq2Seq, DataCollatorWithPadding, Trainer, TrainingArguments
    from transformers.integrations import TensorBoardCallback
    from transformers.trainer_callback import PrinterCallback

    from ftkit import distributed

    train = run.recipe.train
    cuda = torch.cuda.is_available()
    several = distributed.world_size() > 1
    args = TrainingArguments(
        output_dir=str(run.work / "checkpoints"),
        num_train_epochs=train.epochs,
        max_steps=train.max_steps,
        per_device_train_batch_size=train.batch_size,
        gradient_accumulation_steps=train.grad_accum,
        learning_rate=train.lr,
        warmup_steps=train.warmup if train.warmup < 1 else int(train.warmup),
        lr_scheduler_type=train.scheduler,
        weight_decay=train.weight_decay,
        activation_checkpointing=train.activation_checkpointing,
        # Length-grouped batches + per-batch dynamic padding: no padding to max length.
        train_sampling_strategy="group_by_length",
        logging_steps=train.logging_steps,
        logging_first_step=True,
        save_strategy="steps" if train.save_steps else "no",
        save_steps=train.save_steps or 500,
        save_total_limit=2,  # the newest two; checkpoint_callback adds epoch ends, save_minutes, stops
        seed=train.seed,
        data_seed=train.seed,
        # LoRA and QLoRA train the 16-bit base as loaded, without autocast (peft keeps adapters in
        # fp32 and casts their inputs); fp16 keeps AMP for its loss scaling. Full fine-tuning
        # keeps fp32 master weights and computes in 16 bit under autocast (modeling.mixed_precision).
        bf16=run.loaded.amp == "bf16",
        fp16=run.loaded.amp == "fp16",
        optim=OPTIMIZERS[train.optim],
        use_cpu=not cuda,
        dataloader_pin_memory=cuda,
        report_to="none",  # TensorBoard is added below with the folder we choose
        disable_tqdm=True,  # ftkit's progress lines instead (progress_callback)
        # Several processes: gloo on the CPU (accelerate would pick MPI where torch has it); on
        # CUDA accelerate picks NCCL. Every LoRA/full parameter takes part in every step, so DDP
        # need not search for unused ones (and warn that it found none).
        ddp_backend="gloo" if several and not cuda else None,
        ddp_find_unused_parameters=False if several else None,
        log_level_replica="error",
        deepspeed=train.deepspeed or None,
    )
    if run.head == "classifier":
        collator = DataCollatorWithPadding(run.tokenizer, pad_to_multiple_of=8 if cuda else None)
    else:
        collator = DataCollatorForSeq2Seq(run.tokenizer, padding=True, label_pad_token_id=-100,
                                          pad_to_multiple_of=8 if cuda else None)
    # Rank 0 alone writes TensorBoard logs (a writer creates its folder at once).
    callbacks = [TensorBoardCallback(tb_writer=SummaryWriter(log_dir=str(run.work / "tensorboard")))] \
        if distributed.is_main() else []
    callbacks += [progress_callback(run.echo), checkpoint_callback(run)]
    features = build_features(run)

    class FtkitTrainer(Trainer):
        def __init__(self, **kwargs) -> None:  # noqa: ANN003
            super().__init__(**kwargs)
            if run.head == "classifier":
                # Sequence-classification models take **kwargs but ignore `num_items_in_batch`: their
                # loss is already a mean per micro-batch. Left on, the Trainer would skip dividing it
                # by grad_accum and multiply it by the world size (both meant for token-summed losses),
                # so the loss and gradients came out grad_accum x world size too large.
                self.model_accepts_loss_kwargs = False

        def _run_epoch(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            # Resumed from the last step's checkpoint (killed during the final evaluation or the
            # save): nothing is left to train. The Trainer would otherwise take one more step when
            # max_steps ends mid-epoch, or go on training after an early stop.
            checkpoint = kwargs.get("resume_from_checkpoint")
            if self.state.global_step >= self.state.max_steps or \
                    (checkpoint and (checkpoint_mark(Path(checkpoint)) or {}).get("final")):
                return None
            return super()._run_epoch(*args, **kwargs)

        def _get_train_sampler(self, train_dataset=None):  # noqa: ANN001, ANN202
            return seeded_length_grouped_sampler(
                [len(f["input_ids"]) for f in features],
                self.args.train_batch_size * self.args.gradient_accumulation_steps * self.args.world_size,
                train.seed,
            )

    trainer = FtkitTrainer(
        model=run.model,
        args=args,
        train_dataset=features,
        data_collator=collator,
        processing_class=run.tokenizer,
        callbacks=callbacks,
    )
    trainer.remove_callback(PrinterCallback)  # what disable_tqdm puts in the bar's place: raw dicts
    return trainer
