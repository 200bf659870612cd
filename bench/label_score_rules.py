"""Label score rules compared on accuracy: which label each ``eval.label_score`` rule picks.

    $ python bench/label_score_rules.py [--model PATH] [--run RUN_FOLDER]

Zero-shot: the base model (the built-in SmolLM2-135M-Instruct unless ``--model`` names a local
Hugging Face folder of a causal LM) scores every row of the quickstart's bundled bank-intent data
(480 customer messages, 5 intents, prompted as the bank-intent task prompts them) with each rule,
raw and with contextual calibration. ``--run``: also a fine-tuned causal-head run folder's model on
its own test split (e.g. ``ftkit run recipes/quickstart.toml --set train.head=causal --set
output.dir=runs/qs-causal``). Accuracy against the rows' labels, the time each rule took, and how
often each label was picked.

``sum`` is the answer's log-likelihood, ``mean`` per answer token, ``constrained`` the probability
when decoding may only spell a label (see ``ftkit.evaluator.label_scores``).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from label_scoring import load_model  # noqa: E402 - a sibling script, after the offline switches
from train_throughput import quiet  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "plugins" / "data" / "bank_intent_quickstart.jsonl"
RULES = ("sum", "mean", "constrained")
BATCH_SIZE, MAX_SEQ_LEN = 32, 64  # the quickstart recipe's


def score_rows(model, tokenizer, examples, labels, calibrations):  # noqa: ANN001, ANN201 - table rows
    import torch

    from ftkit.evaluator import label_scores

    gold = torch.tensor([labels.index(e.target) for e in examples])
    rows = []
    for rule in RULES:
        for calibrate in calibrations:
            started = time.perf_counter()
            scores = label_scores(model, tokenizer, examples, labels, BATCH_SIZE, MAX_SEQ_LEN, "", score=rule,
                                  calibrate=calibrate)
            seconds = time.perf_counter() - started
            picked = scores.argmax(-1)
            rows.append((rule, calibrate, (picked == gold).float().mean().item(), seconds,
                         torch.bincount(picked, minlength=len(labels)).tolist()))
    return rows


def show(title: str, labels: list[str], n: int, rows) -> None:  # noqa: ANN001
    print(f"\n{title} ({n} examples; picks per label: {', '.join(labels)})")
    print(f"{'rule':>11} {'calibrated':>10} {'accuracy':>8} {'seconds':>8}  picks")
    for rule, calibrate, accuracy, seconds, picks in rows:
        print(f"{rule:>11} {'yes' if calibrate else 'no':>10} {accuracy:>8.3f} {seconds:>8.1f}  {picks}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a local Hugging Face folder of a causal LM; default: SmolLM2-135M-Instruct")
    parser.add_argument("--run", help="a fine-tuned causal-head run folder to score on its test split too")
    args = parser.parse_args()
    import torch

    from ftkit.gguf import SMOLLM2_ID, builtin_gguf_file, gguf_model_path
    from ftkit.plugins import get_task

    quiet()
    torch.set_num_threads(2)
    model, tokenizer = load_model(args.model or str(gguf_model_path(builtin_gguf_file(), model_id=SMOLLM2_ID)))
    task = get_task("bank-intent")
    records = [json.loads(line) for line in DATA.read_text(encoding="utf-8").splitlines() if line.strip()]
    labels = sorted({r["label"] for r in records})
    examples = [task.format({"text": r["text"], "label": r["label"]}) for r in records]
    show("zero-shot, base model", labels, len(examples), score_rows(model, tokenizer, examples, labels, (False, True)))
    if args.run:
        from ftkit.use import load_model as load_run_model
        from ftkit.use import open_run, read_inputs

        run = open_run(args.run)
        model, tokenizer = load_run_model(run, echo=lambda *_: None)
        examples = [row.example for row in read_inputs(run, Path(args.run) / "data" / "test.jsonl", need_target=True)]
        show(f"fine-tuned, {args.run}", run.labels, len(examples),
             score_rows(model, tokenizer, examples, run.labels, (False,)))


if __name__ == "__main__":
    main()
