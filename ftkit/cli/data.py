"""``ftkit data``: synthesize, format, validate and split data, for every task through its plugin."""

from __future__ import annotations

from pathlib import Path

import click

from ftkit.cli.output import display_width, print_json, warn

TASK = click.argument("task_name", metavar="TASK")
LABELS = click.option("--labels", help="Comma-separated label set (classification), instead of the task's default.")


def _options(labels: str | None) -> dict:
    return {"labels": [label.strip() for label in labels.split(",") if label.strip()]} if labels else {}


def _task(name: str):  # noqa: ANN202
    from ftkit.plugins import get_task

    return get_task(name)


@click.group(epilog="""\b
Examples:
  $ ftkit data synth emotion -n 600 -o emotion.jsonl
  $ ftkit data validate emotion emotion.jsonl --seq 256
  $ ftkit data split emotion emotion.jsonl -o data/ --test-size 0.2
  $ ftkit data format emotion emotion.jsonl -o emotion_alpaca.jsonl
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
@LABELS
def format_command(task_name: str, path: Path, output: Path, labels: str | None) -> None:
    """Convert PATH from the task's raw layout to training form (Alpaca instruction/input/output)."""
    from ftkit.datatools import format_file

    written = format_file(_task(task_name), path, output, _options(labels))
    click.echo(f"Wrote {written} rows to {output}")


@data.command()
@TASK
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--seq", type=click.IntRange(min=1), default=256, show_default=True,
              help="Sequence length to measure truncation against.")
@click.option("--tokenizer", help="Model folder (or tokenizer.json) to count tokens with; default: the built-in tiny model's.")
@click.option("--max-ratio", type=click.FloatRange(min=1), default=3.0, show_default=True,
              help="Warn when the largest class is this many times the smallest.")
@LABELS
@click.option("--json", "as_json", is_flag=True, help="Print the findings as JSON.")
def validate(task_name: str, path: Path, seq: int, tokenizer: str | None, max_ratio: float, labels: str | None,
             as_json: bool) -> None:
    """Check every row of PATH: bad rows with file:line, duplicates, class balance, token lengths.

    Exits 1 when any row is bad, so it can gate a pipeline.
    """
    from dataclasses import asdict

    from ftkit.datatools import validate_file

    report = validate_file(_task(task_name), path, _options(labels), seq=seq, max_ratio=max_ratio, tokenizer=tokenizer)
    if as_json:
        print_json(asdict(report) | {"ok": report.ok})
    else:
        _print_validation(report, max_ratio)
    if not report.ok:
        raise SystemExit(1)


def _print_validation(report, max_ratio: float) -> None:  # noqa: ANN001
    click.secho(f"{report.path}: {report.records} records, {report.examples} examples ({report.task})", bold=True)
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
    click.secho("  ok" if report.ok else f"  {len(report.errors)} problem(s)", fg="green" if report.ok else "red")


@data.command()
@TASK
@click.argument("path", type=click.Path(path_type=Path))
@click.option("-o", "--output", "out_dir", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Folder for train.jsonl and test.jsonl.")
@click.option("--test-size", type=float, default=0.2, show_default=True)
@click.option("--seed", type=int, default=42, show_default=True)
@LABELS
@click.option("--json", "as_json", is_flag=True)
def split(task_name: str, path: Path, out_dir: Path, test_size: float, seed: int, labels: str | None,
          as_json: bool) -> None:
    """Split PATH into train/test, stratified by label with a fixed seed; report overlap."""
    from ftkit.datatools import split_file

    result = split_file(_task(task_name), path, out_dir, _options(labels), test_size=test_size, seed=seed)
    if as_json:
        print_json(result)
        return
    how = "stratified by label" if result["stratified"] else "random"
    click.echo(f"train: {result['train']}  test: {result['test']}  ({how}, seed {seed}) -> {out_dir}")
    if result["test_classes"]:
        click.echo("test classes: " + ", ".join(f"{k} {v}" for k, v in sorted(result["test_classes"].items())))
    if result["overlap"]:
        warn(f"{result['overlap']} text(s) appear in both train and test, e.g. {result['overlap_examples'][0][:40]!r}; "
             "deduplicate the file first")
    else:
        click.echo("overlap: none (no test text appears in train)")
