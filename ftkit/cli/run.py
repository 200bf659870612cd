"""``ftkit run`` and ``ftkit validate``: recipes in, a trustworthy run folder out."""

from __future__ import annotations

import click

from ftkit.cli.output import print_json
from ftkit.errors import UsageError

SET_HELP = "Override a recipe value, e.g. --set train.lr=2e-5 (repeatable)."


@click.command(
    epilog="""\b
Examples:
  $ ftkit run recipes/quickstart.toml                 # SmolLM2-135M, CPU, offline, a few minutes
  $ ftkit run recipes/emotion.toml --set train.lr=2e-5 --set train.epochs=1
  $ ftkit run recipes/emotion.toml --dry-run          # resolved recipe + memory estimate, no training
  $ ftkit run recipes/emotion.toml --set train.valid_size=0.1 --set train.early_stopping_patience=3  # best step kept
  $ ftkit run recipes/emotion.toml --overwrite        # replace an existing run folder
  $ ftkit run recipes/emotion.toml --set train.save_minutes=5   # a checkpoint every 5 minutes
  $ ftkit run recipes/emotion.toml --resume           # continue after a crash, Ctrl-C or SIGTERM
  $ ftkit run recipes/tiny.toml --quiet               # warnings, errors and the final results only
  $ ftkit run recipes/tiny.toml --json-logs | jq -c 'select(.event == "step") | [.step, .loss]'
  $ ftkit run recipes/emotion.toml --nproc 4          # 4 processes (GPUs), DDP; see docs/distributed.md
  $ torchrun --nproc_per_node 4 -m ftkit run recipes/emotion.toml   # the same, launched by hand
""",
)
@click.pass_context
@click.argument("recipe_path", metavar="RECIPE", type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=SET_HELP)
@click.option("--dry-run", is_flag=True,
              help="Check everything but the model: print the resolved recipe, load and check the data with the "
                   "mapping (counts per split, labels, what was dropped), and the memory estimate.")
@click.option("--json", "as_json", is_flag=True, help="With --dry-run: print it all as one JSON object.")
@click.option("--overwrite", is_flag=True,
              help="Replace output.dir if it exists, only once the new run is complete, and only if it is a run "
                   "folder ftkit made (anything else is refused, untouched).")
@click.option("--resume", is_flag=True,
              help="Continue an interrupted run (a crash, kill -9, Ctrl-C, SIGTERM) from its newest complete "
                   "checkpoint; one is saved at each epoch's end and every train.save_minutes.")
@click.option("--auto-fit", is_flag=True,
              help="When the estimate exceeds the GPU's free memory: lower the batch (raising gradient "
                   "accumulation to keep the effective batch), then turn on activation checkpointing.")
@click.option("--nproc", type=click.IntRange(min=1), metavar="N",
              help="Train with N processes on this machine (data parallel, one GPU each; gloo on the CPU): "
                   "re-launches this command under torchrun. Effective batch = batch_size x grad_accum x N.")
@click.option("-q", "--quiet", is_flag=True,
              help="Print only warnings, errors and the final results (losses, fine-tuned score, run folder).")
@click.option("--json-logs", is_flag=True,
              help="Print every event as one JSON object per line on stdout, for scripts and CI: its `event` and "
                   "`message`, and the numbers: training steps (step, total, loss, lr, steps_per_s, eta_s), "
                   "evaluations (model, metric, value), the final summary (run_folder, scores, verdict), errors.")
def run(ctx: click.Context, recipe_path: str, overrides: tuple[str, ...], dry_run: bool, as_json: bool,
        overwrite: bool, resume: bool, auto_fit: bool, nproc: int | None, quiet: bool, json_logs: bool) -> None:
    """Fine-tune as RECIPE says; evaluate base and fine-tuned models on the same test split.

    Leaves in output.dir: the adapter (safetensors) and tokenizer, labels.json, recipe.toml,
    metrics.json (baselines, fine-tuned, 95% intervals, verdict), report.md with plots, TensorBoard logs,
    manifest.json.

    Under torchrun or `accelerate launch` every process runs this command; rank 0 alone prints and
    writes the run folder.
    """
    from ftkit import distributed
    from ftkit.recipe import load_recipe

    recipe = load_recipe(recipe_path, overrides)
    if nproc is not None and distributed.world_size() > 1:
        raise UsageError(f"--nproc: this is already one of {distributed.world_size()} processes started by a "
                         "launcher; drop --nproc")
    if as_json and not dry_run:
        raise UsageError("--json: only with --dry-run (a run prints JSON with --json-logs; its results are in "
                         "metrics.json)")
    for flag, on in (("--quiet", quiet), ("--json-logs", json_logs)):
        if on and dry_run:
            raise UsageError(f"{flag}: not with --dry-run, whose output is what it checked (--json prints it as JSON)")
    if dry_run:
        _dry_run(recipe, recipe_path, auto_fit, nproc or distributed.world_size(), as_json)
        return
    if nproc is not None and nproc > 1:
        _check_gpu_count(nproc)
        args = ["--debug"] if ctx.find_root().params.get("debug") else []
        args += ["run", recipe_path, *(part for value in overrides for part in ("--set", value))]
        args += [flag for flag, on in (("--overwrite", overwrite), ("--resume", resume), ("--auto-fit", auto_fit),
                                       ("--quiet", quiet), ("--json-logs", json_logs)) if on]
        ctx.exit(distributed.launch(nproc, args))
    from ftkit.console import Console
    from ftkit.pipeline import FineTuneRun

    console = Console(quiet=quiet, json=json_logs, write=click.echo)
    try:
        FineTuneRun(recipe, overwrite=overwrite, resume=resume, auto_fit=auto_fit, echo=console).run()
    except BaseException as error:
        # The one-line error still goes to stderr (ftkit.cli); a script reading the JSON sees it too.
        if json_logs and distributed.is_main():
            message = str(error) or "interrupted"
            console.event("error", message, level="error", type=type(error).__name__)
        raise


def _check_gpu_count(nproc: int) -> None:
    """One process per GPU where there are GPUs (through NVML: no torch import for the check)."""
    from ftkit.probe import probe_cuda

    devices, _ = probe_cuda()
    if devices and nproc > len(devices):
        raise UsageError(f"--nproc: {nproc} processes but {len(devices)} GPU(s) here; use at most {len(devices)}")


def _dry_run(recipe, recipe_path: str, auto_fit: bool, gpus: int, as_json: bool) -> None:  # noqa: ANN001
    """The resolved recipe, the data as the run would load it, and the memory estimate; no model."""
    from ftkit.modeling import model_location
    from ftkit.plugins import get_task
    from ftkit.prepare import split_data

    task = get_task(recipe.task.name)
    data = split_data(task, recipe)
    summary = data.summary()
    if as_json:
        estimate = _estimate(recipe, task, len(data.labels or ()) or 2, gpus)
        print_json({"recipe": recipe.to_dict(), "model_location": model_location(recipe), "data": summary,
                    "estimate": None if estimate is None else estimate.to_dict()})
        return
    click.echo(f"# resolved recipe: {recipe_path}")
    click.echo(recipe.to_toml())
    click.echo(f"# model ({recipe.model.source} {recipe.model.id}): {model_location(recipe)}")
    source = recipe.task.train_file or task.hub_dataset
    valid = f"{summary['valid_examples']} validation / " if "valid_examples" in summary else ""
    click.echo(f"# data ({source}): {summary['train_examples']} train / {valid}{summary['test_examples']} test "
               "examples")
    if data.labels:
        shown = ", ".join(data.labels[:20]) + (f", ... ({len(data.labels)} in all)" if len(data.labels) > 20 else "")
        origin = ("task.labels" if recipe.task.labels else f"{task.name}'s label set" if task.labels
                  else "the training data")
        click.echo(f"# labels ({len(data.labels)}, from {origin}): {shown}")
    for why, n in summary["dropped"].items():
        click.echo(f"# dropped: {n} rows ({why})")
    for note in data.notes:
        click.echo(f"# {note}")
    _print_dry_run_estimate(recipe, auto_fit, gpus, len(data.labels or ()) or 2)


def _estimate(recipe, task, num_labels: int, gpus: int):  # noqa: ANN001, ANN202
    from ftkit import fit

    head = recipe.train.head if recipe.train.head != "auto" else task.default_head
    shape = fit.recipe_shape(recipe)
    if shape is None:
        return None
    return fit.estimate(shape, fit.recipe_settings(recipe, head, num_labels, gpus=gpus, task_kind=task.kind))


def _print_dry_run_estimate(recipe, auto_fit: bool, gpus: int = 1, num_labels: int = 2) -> None:  # noqa: ANN001
    """The memory estimate per device, as TOML comments after the resolved recipe (no torch import)."""
    from ftkit import fit
    from ftkit.plugins import get_task
    from ftkit.probe import probe_cuda

    task = get_task(recipe.task.name)
    head = recipe.train.head if recipe.train.head != "auto" else task.default_head
    shape = fit.recipe_shape(recipe)
    if shape is None:
        click.echo(f"# memory estimate: not available for {recipe.model.id} (not a Llama-style decoder whose "
                   "config is known or cached here)")
        return
    settings = fit.recipe_settings(recipe, head, num_labels, gpus=gpus, task_kind=task.kind)
    result = fit.estimate(shape, settings)
    per = f", per device of {gpus}, effective batch {settings.effective_batch}" if gpus > 1 else ""
    click.echo(f"# memory estimate ({shape.name}, for a CUDA GPU{per}): {fit.describe(result)}")
    devices, _ = probe_cuda()
    if not devices:
        click.echo("# no CUDA GPU here: `ftkit estimate` with --gpu-mem checks the fit on a card")
        return
    free = max(d.free_bytes for d in devices)
    plan = fit.auto_fit(shape, settings, free)
    if plan is not None and not plan.changes:
        click.echo(f"# fits in the {free / 2**30:.1f} GiB free on this GPU")
    elif plan is not None:
        click.echo(f"# does not fit the {free / 2**30:.1f} GiB free; --auto-fit would set: {'; '.join(plan.changes)}")
    else:
        click.echo(f"# does not fit the {free / 2**30:.1f} GiB free, even at batch 1 with activation checkpointing")


@click.command(
    epilog="""\b
Examples:
  $ ftkit validate recipes/emotion.toml
  $ ftkit validate recipes/emotion.toml --set train.batch_size=8 --json
""",
)
@click.argument("recipe_path", metavar="RECIPE", type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=SET_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print the resolved recipe as JSON.")
def validate(recipe_path: str, overrides: tuple[str, ...], as_json: bool) -> None:
    """Check RECIPE: every problem reported at once, one `section.key: message` per line."""
    from ftkit.modeling import model_location
    from ftkit.recipe import load_recipe

    recipe = load_recipe(recipe_path, overrides)
    if as_json:
        print_json(recipe.to_dict())
    else:
        click.echo(f"{recipe_path}: ok (task {recipe.task.name}, model {recipe.model.id}, method {recipe.method.name})")
        click.echo(f"model: {model_location(recipe)}")  # a download needs the network
