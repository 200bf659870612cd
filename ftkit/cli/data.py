"""``ftkit data``: synthesize, format, validate and split data, for every task through its plugin."""

from __future__ import annotations

from pathlib import Path

import click

from ftkit.cli.output import display_width, print_json, warn
from ftkit.errors import UsageError

TASK = click.argument("task_name", metavar="TASK")


def mapping_options(command):  # noqa: ANN001, ANN201 - a click command
    """The recipe's data-mapping keys as flags, or ``--recipe FILE`` to take them from a recipe."""
    options = [
        click.option("--recipe", "recipe_path", type=click.Path(dir_okay=False),
                     help="Take columns, label_map, drop_labels, group_by, labels and options from this "
                          "recipe's [task] (flags given too override it)."),
        click.option("--columns", metavar="FIELD=COLUMN,...",
                     help="Map the task's fields onto your columns, e.g. --columns text=content,label=category."),
        click.option("--label-map", metavar="SOURCE=LABEL,...",
                     help="Rename your labels to the task's, e.g. --label-map happiness=喜悅,sadness=悲傷."),
        click.option("--drop-labels", metavar="LABEL,...", help="Skip rows with these labels (as in your data)."),
        click.option("--group-by", metavar="COLUMN", help="Rows sharing this column stay in one split."),
        click.option("--labels", help="Comma-separated label set (classification), instead of the task's or the data's."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _pairs(text: str | None, flag: str) -> dict[str, str]:
    pairs = {}
    for item in (text or "").split(","):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise UsageError(f"{flag}: expected KEY=VALUE pairs separated by commas, got {item.strip()!r}")
        pairs[key.strip()] = value.strip()
    return pairs


def _items(text: str | None) -> tuple[str, ...]:
    return tuple(item.strip() for item in (text or "").split(",") if item.strip())


def _mapping(task, recipe_path: str | None, columns: str | None, label_map: str | None,  # noqa: ANN001, ANN202
             drop_labels: str | None, group_by: str | None, labels: str | None):
    """The DataMapping from ``--recipe`` and the flags, checked against the task like a recipe is."""
    from ftkit.sources import DataMapping, mapping_errors

    base = DataMapping()
    if recipe_path:
        from ftkit.recipe import load_recipe

        recipe = load_recipe(recipe_path)
        if recipe.task.name != task.name:
            raise UsageError(f"--recipe: {recipe_path} is for task {recipe.task.name!r}, not {task.name!r}")
        base = DataMapping.from_section(recipe.task)
    mapping = DataMapping(
        columns=_pairs(columns, "--columns") or base.columns,
        label_map=_pairs(label_map, "--label-map") or base.label_map,
        drop_labels=_items(drop_labels) or base.drop_labels,
        group_by=group_by or base.group_by,
        labels=_items(labels) or base.labels,
        options=base.options,
    )
    errors = mapping_errors(task, mapping, prefix="--")
    if errors:
        raise UsageError("; ".join(e.replace("--columns.", "--columns ").replace("--label_map.", "--label-map ")
                                   .replace("--drop_labels", "--drop-labels") for e in errors))
    return mapping


def _task(name: str):  # noqa: ANN202
    from ftkit.plugins import get_task

    return get_task(name)


@click.group(epilog="""\b
Examples:
  $ ftkit data synth emotion -n 600 -o emotion.jsonl
  $ ftkit data validate emotion emotion.jsonl --seq 256
  $ ftkit data validate bank-intent banking77.csv --columns label=category --test test.csv
  $ ftkit data validate emotion corpus.jsonl --columns text=content --label-map happiness=喜悅 --drop-labels like
  $ ftkit data validate emotion corpus.jsonl --recipe my_emotion.toml
  $ ftkit data split hc3 hc3.jsonl -o data/ --test-size 0.2        # grouped by question
  $ ftkit data format emotion emotion.jsonl -o emotion_alpaca.jsonl

Files: JSONL, JSON (an array, or an object holding one), CSV, TSV, Parquet, or a folder written
by Dataset.save_to_disk.
""")
def data() -> None:
    """Make, check, convert and split a task's data files."""


@data.command()
@TASK
@click.option("-n", "count", type=click.IntRange(min=1), default=600, show_default=True, help="Rows to make.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--mode", help="How to synthesize: offline (seed samples, no key) or the task's API modes.")
@click.option("--model", help="API mode: the model to ask.")
@click.option("--base-url", help="API mode: the API's base URL (a proxy or a compatible server).")
def synth(task_name: str, count: int, output: Path, seed: int, mode: str | None, model: str | None,
          base_url: str | None) -> None:
    """Synthesize raw rows for TASK (tasks that can, e.g. emotion).

    API modes read the key from the provider's environment variable (ANTHROPIC_API_KEY,
    OPENAI_API_KEY); it is never printed or written anywhere.
    """
    from ftkit.datatools import synthesize

    written = synthesize(_task(task_name), output, count, seed, mode=mode, model=model, base_url=base_url)
    click.echo(f"Wrote {written} rows to {output}")


@data.command("format")
@TASK
@click.argument("path", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True)
@mapping_options
def format_command(task_name: str, path: Path, output: Path, recipe_path: str | None, columns: str | None,
                   label_map: str | None, drop_labels: str | None, group_by: str | None, labels: str | None) -> None:
    """Convert PATH from the task's raw layout to training form (Alpaca instruction/input/output)."""
    from ftkit.datatools import format_file

    task = _task(task_name)
    mapping = _mapping(task, recipe_path, columns, label_map, drop_labels, group_by, labels)
    written = format_file(task, path, output, mapping)
    click.echo(f"Wrote {written} rows to {output}")


@data.command()
@TASK
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--seq", type=click.IntRange(min=1), default=256, show_default=True,
              help="Sequence length to measure truncation against.")
@click.option("--tokenizer", help="Model folder (or tokenizer.json) to count tokens with; default: the built-in tiny model's.")
@click.option("--max-ratio", type=click.FloatRange(min=1), default=3.0, show_default=True,
              help="Warn when the largest class is this many times the smallest.")
@click.option("--test", "test_path", type=click.Path(path_type=Path),
              help="A test file: report exact and near-duplicate overlap with PATH, and unseen labels.")
@mapping_options
@click.option("--json", "as_json", is_flag=True, help="Print the findings as JSON.")
def validate(task_name: str, path: Path, seq: int, tokenizer: str | None, max_ratio: float, test_path: Path | None,
             recipe_path: str | None, columns: str | None, label_map: str | None, drop_labels: str | None,
             group_by: str | None, labels: str | None, as_json: bool) -> None:
    """Check every row of PATH: bad rows with file:line, duplicates, class balance, token lengths.

    With --test, also how many test texts appear in PATH exactly or nearly (same text after
    normalizing case, width, spaces and punctuation). Exits 1 when any row is bad, so it can gate
    a pipeline.
    """
    from dataclasses import asdict

    from ftkit.datatools import validate_file

    task = _task(task_name)
    mapping = _mapping(task, recipe_path, columns, label_map, drop_labels, group_by, labels)
    report = validate_file(task, path, mapping, seq=seq, max_ratio=max_ratio, tokenizer=tokenizer,
                           test_path=test_path)
    if as_json:
        print_json(asdict(report) | {"ok": report.ok})
    else:
        _print_validation(report, max_ratio)
    if not report.ok:
        raise SystemExit(1)


def _print_validation(report, max_ratio: float) -> None:  # noqa: ANN001
    click.secho(f"{report.path}: {report.records} records, {report.examples} examples ({report.task})", bold=True)
    if report.dropped:
        click.echo("  dropped: " + ", ".join(f"{n} ({why})" for why, n in report.dropped.items()))
    for error in report.errors[:50]:
        click.secho(f"  error: {error}", fg="red")
    if len(report.errors) > 50:
        click.secho(f"  ... and {len(report.errors) - 50} more errors", fg="red")
    if report.duplicates:
        click.echo(f"  duplicate texts: {len(report.duplicates)}")
        for text, wheres in list(report.duplicates.items())[:5]:
            click.echo(f"    {', '.join(wheres)}: {text[:40]!r}")
    if report.classes:
        click.echo("  classes:")
        width = max(display_width(label) for label in report.classes)
        top = max(report.classes.values()) or 1
        for label, n in report.classes.items():
            bar = "█" * max(0, round(30 * n / top))
            click.echo(f"    {label}{' ' * (width - display_width(label))}  {n:>6}  {bar}")
        if report.imbalance is not None:
            line = f"  max/min class ratio: {report.imbalance:.2f}"
            if report.imbalance_warning:
                warn(f"{report.path}: classes are imbalanced (ratio {report.imbalance:.2f} > {max_ratio:g}); "
                     "consider resampling or more data for the small classes")
            click.echo(line)
    if report.tokens:
        t = report.tokens
        click.echo(f"  tokens ({t['tokenizer']} tokenizer): p50 {t['p50']}, p95 {t['p95']}, max {t['max']}; "
                   f"{t['truncated']} ({t['truncated_rate']:.1%}) longer than --seq {t['seq']}")
    if report.test:
        t = report.test
        click.echo(f"  test {t['path']}: {t['examples']} examples; {t['exact_overlap']} also in training, "
                   f"{t['near_overlap']} nearly (case, width, spaces, punctuation)")
        for text in t["overlap_examples"]:
            click.echo(f"    {text[:60]!r}")
        if t["exact_overlap"] or t["near_overlap"]:
            warn(f"{t['path']}: {t['exact_overlap'] + t['near_overlap']} test text(s) also appear in training; "
                 "remove them from one side (ftkit run drops exact copies from training)")
    click.secho("  ok" if report.ok else f"  {len(report.errors)} problem(s)", fg="green" if report.ok else "red")


@data.command()
@TASK
@click.argument("path", type=click.Path(path_type=Path))
@click.option("-o", "--output", "out_dir", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Folder for train.jsonl and test.jsonl.")
@click.option("--test-size", type=float, default=0.2, show_default=True)
@click.option("--seed", type=int, default=42, show_default=True,
              help="The same seed (train.seed in a recipe) gives the same split as `ftkit run`.")
@mapping_options
@click.option("--json", "as_json", is_flag=True)
def split(task_name: str, path: Path, out_dir: Path, test_size: float, seed: int, recipe_path: str | None,
          columns: str | None, label_map: str | None, drop_labels: str | None, group_by: str | None,
          labels: str | None, as_json: bool) -> None:
    """Split PATH into train.jsonl/test.jsonl: stratified by label, grouped, seeded; report overlap.

    The split is the one `ftkit run` makes from the same file and seed. Rows sharing --group-by
    (by default the task's: HC3's question, SQuAD's paragraph) stay on one side. Each row is
    written with its own source fields.
    """
    from ftkit.datatools import split_file

    task = _task(task_name)
    mapping = _mapping(task, recipe_path, columns, label_map, drop_labels, group_by, labels)
    result = split_file(task, path, out_dir, mapping, test_size=test_size, seed=seed)
    if as_json:
        print_json(result)
        return
    how = ("stratified by label" if result["stratified"] else "random") + (
        f", grouped by {result['grouped_by']}" if result["grouped_by"] else "")
    click.echo(f"train: {result['train']}  test: {result['test']}  ({how}, seed {seed}) -> {out_dir}")
    if result["dropped"]:
        click.echo("dropped: " + ", ".join(f"{n} ({why})" for why, n in result["dropped"].items()))
    if result["test_classes"]:
        click.echo("test classes: " + ", ".join(f"{k} {v}" for k, v in sorted(result["test_classes"].items())))
    if result["overlap"]:
        warn(f"{result['overlap']} text(s) appear in both train and test, e.g. {result['overlap_examples'][0][:40]!r}; "
             "deduplicate the file first")
    else:
        click.echo("overlap: none (no test text appears in train)")
