"""What the label search runs: trie nodes, prefixes run and decoder tokens per example.

    $ python bench/label_search_nodes.py [--model PATH] [--run RUN_FOLDER] [--examples 16] [--examples-listed 4]

``ftkit.evaluator.best_labels`` (an evaluation's label predictions under ``sum``) on the examples of
``bench/label_scoring.py``: the base model (SmolLM2-135M-Instruct unless ``--model``) zero-shot with
BANKING77's 77 intents, prompted as the bank-intent task does (``task``) and with the labels listed
(``listed``); ``--run``: a fine-tuned causal-head run's model on its test split, over its labels plus
BANKING77's as words. Counted by wrapping the function that runs the search's columns: the prefixes
run (real columns) and the columns with padding, per example; and every token the decoder ran
(prompts included), against the trie path's (``label_scores``, every label scored).
"""

from __future__ import annotations

import argparse
import os
from functools import partial

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from label_scoring import BANKING77_LABELS, BATCH_SIZE, MAX_SEQ_LEN, load_examples, load_model, load_run  # noqa: E402
from train_throughput import quiet  # noqa: E402


def decoder_tokens(model, score) -> int:  # noqa: ANN001
    """Tokens the decoder ran during ``score()``."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    widths = []
    hook = base.get_decoder().register_forward_pre_hook(
        lambda module, args, kwargs: widths.append(kwargs["input_ids"].numel()), with_kwargs=True)
    try:
        score()
    finally:
        hook.remove()
    return sum(widths)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a local Hugging Face folder of a causal LM; default: SmolLM2-135M-Instruct")
    parser.add_argument("--run", help="a fine-tuned causal-head run folder")
    parser.add_argument("--examples", type=int, default=16, help="examples with the task's prompt, and of the run")
    parser.add_argument("--examples-listed", type=int, default=4, help="examples with the labels listed")
    args = parser.parse_args()
    import torch

    from ftkit import evaluator
    from ftkit.gguf import SMOLLM2_ID, builtin_gguf_file, gguf_model_path

    quiet()
    torch.set_num_threads(2)
    model, tokenizer = load_model(args.model or str(gguf_model_path(builtin_gguf_file(), model_id=SMOLLM2_ID)))
    cases = [(f"zero-shot, {prompt}", model, tokenizer, load_examples(n, BANKING77_LABELS, prompt), BANKING77_LABELS)
             for prompt, n in (("task", args.examples), ("listed", args.examples_listed))]
    if args.run:
        cases.append(("fine-tuned run", *load_run(args.run, args.examples)))
    columns = []
    runs_columns = evaluator._columns_logprobs

    def counted(model, arguments, keeps_logits, rows, cols, *rest):  # noqa: ANN001, ANN202
        columns.append((len(rows), arguments["input_ids"].numel()))
        return runs_columns(model, arguments, keeps_logits, rows, cols, *rest)

    evaluator._columns_logprobs = counted
    print(f"{'model, prompt':>18} {'examples':>8} {'trie nodes':>10} {'prefixes run':>12} {'with padding':>12} "
          f"{'decoder tokens':>14} {'trie path':>9}  (per example, but decoder tokens)")
    for name, case_model, case_tokenizer, examples, labels in cases:
        columns.clear()
        search = decoder_tokens(case_model, partial(evaluator.best_labels, case_model, case_tokenizer, examples,
                                                    labels, BATCH_SIZE, MAX_SEQ_LEN, ""))
        run, padded = (sum(column) / len(examples) for column in zip(*columns)) if columns else (0, 0)
        trie = decoder_tokens(case_model, partial(evaluator.label_scores, case_model, case_tokenizer, examples, labels,
                                                  BATCH_SIZE, MAX_SEQ_LEN, ""))
        _, answers = evaluator._label_prompts(case_tokenizer, examples, labels, MAX_SEQ_LEN)
        nodes = sum(evaluator._trie_columns(row, evaluator._answer_trie(row), constrained=False)
                    for row in answers) / len(examples)
        print(f"{name:>18} {len(examples):>8} {nodes:>10.0f} {run:>12.0f} {padded:>12.0f} {search:>14,} {trie:>9,}")


if __name__ == "__main__":
    main()
