"""``ftkit predict``, ``eval``, ``chat`` and ``merge``: using a finished run folder."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import click

from ftkit.cli.output import print_json, print_table

RUN = click.argument("run_dir", metavar="RUN", type=click.Path(path_type=Path))
BATCH = click.option("--batch-size", type=click.IntRange(min=1),
                     help="Examples per batch; default: the recipe's eval.batch_size.")


def _status(message: str) -> None:
    """Progress lines go to stderr, so stdout stays the result (a chat answer, JSON)."""
    click.echo(message, err=True)


@click.command(
    epilog="""\b
Examples:
  $ ftkit predict runs/quickstart texts.jsonl -o predictions.jsonl
  $ ftkit predict runs/quickstart runs/quickstart/data/test.jsonl -o test_predictions.jsonl
  $ echo '{"input": "今天終於放假了，好開心"}' > one.jsonl && ftkit predict runs/quickstart one.jsonl -o -

\b
INPUT rows: the task's own layout (as in training; see `ftkit tasks show TASK`), or ftkit's
example layout {"input": ...} with optional "instruction", "system", "target", "references"
(the layout of RUN/data/test.jsonl). Rows need no target; a missing instruction or system
prompt is the one the run trained with.
""",
)
@RUN
@click.argument("input_path", metavar="INPUT", type=click.Path(path_type=Path))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, allow_dash=True, path_type=Path),
              help="JSONL file to write (atomically); - for stdout.")
@BATCH
def predict(run_dir: Path, input_path: Path, output: Path, batch_size: int | None) -> None:
    """Predict on INPUT with RUN's fine-tuned model: one JSON line per example.

    Classification: the label and every label's probability (softmax over the classifier head,
    or over each label's log-likelihood as the answer for a causal head). Generation: the reply,
    decoded with the recipe's [eval] settings. Targets, when rows have them, are copied along.
    """
    import json

    from ftkit import use
    from ftkit.datatools import write_jsonl

    run = use.open_run(run_dir)
    rows = use.read_inputs(run, input_path)  # bad rows fail before the model loads
    _status(f"Run {run.path}: {run.task.name}, {run.head} head, {run.method}")
    model, tokenizer = use.load_model(run, echo=_status)
    results = use.predict(model, tokenizer, run, rows, batch_size)
    if str(output) == "-":
        for result in results:
            click.echo(json.dumps(result, ensure_ascii=False))
        return
    written = write_jsonl(output, results)
    _status(f"Wrote {written} predictions to {output}")


@click.command(
    "eval",
    epilog="""\b
Examples:
  $ ftkit eval runs/quickstart                      # the run's own test split (reproduces metrics.json)
  $ ftkit eval runs/quickstart --data new_test.jsonl --json
""",
)
@RUN
@click.option("--data", "data_path", type=click.Path(path_type=Path),
              help="Labelled file in the task's layout (or RUN/data/test.jsonl's); default: the run's test split.")
@BATCH
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def eval_command(run_dir: Path, data_path: Path | None, batch_size: int | None, as_json: bool) -> None:
    """Evaluate RUN's fine-tuned model with the task's metrics, through the pipeline's evaluator."""
    from ftkit import use
    from ftkit.data import read_json
    from ftkit.errors import UsageError
    from ftkit.report import scalar_metrics

    run = use.open_run(run_dir)
    own_split = data_path is None
    if own_split and not run.test_split.is_file():
        raise UsageError(f"{run.path}: no data/test.jsonl in this run folder; give a labelled file with --data")
    data_path = run.test_split if own_split else data_path
    rows = use.read_inputs(run, data_path, need_target=True)
    _status(f"Run {run.path}: {run.task.name}, {run.head} head, {run.method}")
    model, tokenizer = use.load_model(run, echo=_status)
    metrics = use.evaluate(model, tokenizer, run, rows, batch_size)["metrics"]
    if as_json:
        print_json({"run": str(run.path), "data": str(data_path), "examples": len(rows),
                    "headline_metric": run.task.headline_metric, "metrics": metrics})
        return
    recorded = (read_json(run.path / "metrics.json").get("finetuned") or {}) if own_split else {}
    click.echo(f"{run.path} on {data_path} ({len(rows)} examples):")
    headers = ["metric", "value"] + (["in metrics.json"] if recorded else [])
    table = []
    for key, value in scalar_metrics(metrics).items():
        name = f"{key} (headline)" if key == run.task.headline_metric else key
        table.append([name, f"{value:.4f}"] + ([f"{recorded[key]:.4f}" if key in recorded else "-"] if recorded else []))
    print_table(headers, table)


@click.command(
    epilog="""\b
Examples:
  $ ftkit chat runs/huanhuan-chat                   # a conversation in the terminal
  $ echo "你是谁？" | ftkit chat runs/huanhuan-chat    # one answer to stdin, then exit
  $ ftkit chat runs/huanhuan-chat --temperature 0.3 --max-new-tokens 256
  $ ftkit chat runs/huanhuan-chat --system ""       # without the run's system prompt
  $ ftkit chat runs/huanhuan-chat --sample --seed 0 # reproducible sampling

\b
In a terminal: `> ` prompts a turn; /reset clears the history, /exit or Ctrl-D quits.
When stdin is not a terminal, all of it is one prompt: the answer is printed and chat exits.
Decoding defaults to the recipe's [eval] settings; --temperature, --top-p or --top-k turn
sampling on unless --greedy is given.
""",
)
@RUN
@click.option("--system", help="System prompt; default: the one the run trained with (empty: none).")
@click.option("--max-new-tokens", type=click.IntRange(min=1), help="Longest answer, in tokens.")
@click.option("--temperature", type=click.FloatRange(min=0, min_open=True), help="Sampling temperature.")
@click.option("--top-p", type=click.FloatRange(min=0, max=1, min_open=True), help="Nucleus sampling mass.")
@click.option("--top-k", type=click.IntRange(min=0), help="Sample among the top k tokens.")
@click.option("--repetition-penalty", type=click.FloatRange(min=0, min_open=True), help="> 1 discourages repeats.")
@click.option("--sample/--greedy", "do_sample", default=None, help="Sample, or decode greedily.")
@click.option("--seed", type=click.IntRange(min=0), help="Seed for sampling: the same seed gives the same answers.")
def chat(run_dir: Path, system: str | None, max_new_tokens: int | None, temperature: float | None,
         top_p: float | None, top_k: int | None, repetition_penalty: float | None, do_sample: bool | None,
         seed: int | None) -> None:
    """Chat with RUN's fine-tuned model (base + adapter) through the tokenizer's chat template."""
    from ftkit import use
    from ftkit.errors import UsageError

    run = use.open_run(run_dir)
    if run.head == "classifier":
        raise UsageError(f"{run.path}: a classifier-head run answers with labels, not text; "
                         "use `ftkit predict` (or train with train.head = \"causal\")")
    if do_sample is None and any(v is not None for v in (temperature, top_p, top_k)):
        do_sample = True
    settings = use.GenerationSettings.from_recipe(
        run.recipe, max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature, top_p=top_p,
        top_k=top_k, repetition_penalty=repetition_penalty,
    )
    prompt = None
    if not sys.stdin.isatty():
        prompt = sys.stdin.read().strip()
        if not prompt:
            raise UsageError("chat: stdin is empty; pipe a prompt (echo 你好 | ftkit chat RUN) or run it in a terminal")
    _status(f"Run {run.path}: {run.task.name}, {run.method}")
    model, tokenizer = use.load_model(run, echo=_status)
    if seed is not None:
        from transformers import set_seed

        set_seed(seed)
    session = use.ChatSession(model, tokenizer, settings,
                              system=use.default_system_prompt(run) if system is None else system or None)
    if prompt is not None:
        answer = session.reply(prompt)
        click.echo(answer)
        if not answer:
            _status("Notice: the model ended its turn without any text")
        return
    _status("Type a message; /reset clears the history, /exit or Ctrl-D quits.")
    with contextlib.suppress(ImportError):  # line editing and history where the platform has readline;
        import readline  # noqa: F401 - it also makes input() write its prompt to stdout, not stderr
    while True:
        try:
            line = input("> ").strip()
        except (EOFError, KeyboardInterrupt):  # Ctrl-D or Ctrl-C at the prompt: leave quietly
            click.echo()
            return
        if line == "/exit":
            return
        if line == "/reset":
            session.reset()
            click.echo("(history cleared)")
        elif line:
            try:
                session.reply(line, stream=True)
            except KeyboardInterrupt:  # Ctrl-C while answering drops this turn, not the conversation
                click.echo("\n(answer interrupted)")


@click.command(
    epilog="""\b
Examples:
  $ ftkit merge runs/emotion -o merged/emotion
  $ ftkit merge runs/huanhuan-chat -o merged/huanhuan --dtype bfloat16 --overwrite
""",
)
@RUN
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path), help="Folder to create.")
@click.option("--overwrite", is_flag=True,
              help="Replace the folder if it exists, only once the new one is complete, and only if it is a merged "
                   "model ftkit made (anything else is refused, untouched).")
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default="auto",
              show_default=True, help="Weight dtype; auto: the run's compute dtype.")
def merge(run_dir: Path, output: Path, overwrite: bool, dtype: str) -> None:
    """Merge RUN's LoRA adapter into its base model: a standalone model folder (safetensors + tokenizer).

    QLoRA runs are merged into the base loaded unquantized (dequantized) in the compute dtype.
    The result loads with AutoModelForCausalLM (or AutoModelForSequenceClassification for a
    classifier-head run) and serves with vLLM like any model folder.
    """
    from ftkit import use

    run = use.open_run(run_dir)
    out = use.merge(run, output, overwrite=overwrite, dtype=dtype, echo=_status)
    click.echo(f"Merged model: {out}")
