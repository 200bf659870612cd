"""From a task's rows to tokenized training features: split, leakage check, prompts, masking."""

from __future__ import annotations

import hashlib
import math
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ftkit.errors import DataError
from ftkit.tasks import Example, Task

IGNORE_INDEX = -100  # labels the loss skips: the prompt tokens of causal SFT


@dataclass
class Splits:
    """Train and test examples, and what happened on the way (for the report and manifest)."""

    train: list[Example]
    test: list[Example]
    labels: list[str] | None
    leaked_removed: int = 0
    notes: list[str] = field(default_factory=list)


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _load(task: Task, path: str, options: dict[str, Any]) -> list[Example]:
    examples = [task.format(row) for row in task.load(path or None, **options)]
    if not examples:
        raise DataError(f"{path or task.hub_dataset}: no examples; the file is empty or every row was dropped")
    return examples


def _stratified_sample(examples: list[Example], n: int, seed: int, by_label: bool) -> list[Example]:
    """At most ``n`` examples, keeping the class proportions (seeded)."""
    if n <= 0 or n >= len(examples):
        return examples
    if not by_label:
        return random.Random(seed).sample(examples, n)
    from sklearn.model_selection import train_test_split

    kept, _ = train_test_split(examples, train_size=n, random_state=seed, stratify=[e.target for e in examples])
    return kept


def load_splits(task: Task, recipe) -> Splits:  # noqa: ANN001 - a Recipe
    """Load train (and test) through the task plugin; split off a stratified test set if needed."""
    section = recipe.task
    options = dict(section.options)
    labels = list(section.labels) or (list(task.labels) if task.labels else None)
    if labels:
        options["labels"] = labels
    classify = task.kind == "classification"
    seed = recipe.train.seed
    train = _stratified_sample(_load(task, section.train_file, options), section.max_examples, seed, classify)
    if classify:
        missing = [label for label in labels if label not in {e.target for e in train}]
        if missing:
            raise DataError(f"no training examples of label(s) {', '.join(missing)}; add data or set task.labels")
    notes: list[str] = []
    if section.test_file:
        test = _load(task, section.test_file, options)
    else:
        train, test = _split(train, section.test_size, seed, classify)
        notes.append(f"test split: {len(test)} examples ({section.test_size:.0%}, stratified, seed {seed})")
    # Leakage: a test text seen in training inflates the fine-tuned score; drop it from train.
    test_inputs = {e.input for e in test}
    kept = [e for e in train if e.input not in test_inputs]
    leaked = len(train) - len(kept)
    if leaked:
        notes.append(f"removed {leaked} training examples whose text is also in the test split")
    if not kept:
        raise DataError("every training example also appears in the test split; use different files")
    if classify:
        missing = sorted(set(labels) - {e.target for e in kept})
        if missing:
            raise DataError(f"no training examples of label(s) {', '.join(missing)}; add data or set task.labels")
    return Splits(train=kept, test=test, labels=labels, leaked_removed=leaked, notes=notes)


def _split(examples: list[Example], test_size: float, seed: int, stratify: bool) -> tuple[list, list]:
    from sklearn.model_selection import train_test_split

    if stratify:
        counts = Counter(e.target for e in examples)
        rare = sorted(label for label, n in counts.items() if n < 2)
        if rare:
            raise DataError(
                f"label(s) {', '.join(rare)} have fewer than 2 examples: a stratified split would leave "
                "them out of train or test; add examples or give task.test_file"
            )
    if stratify:
        classes, n_test = len({e.target for e in examples}), math.ceil(test_size * len(examples))
        if n_test < classes or len(examples) - n_test < classes:
            raise DataError(
                f"task.test_size: a {test_size:.0%} split of {len(examples)} examples gives {n_test} test and "
                f"{len(examples) - n_test} train examples; each needs at least one of the {classes} classes, "
                "so change test_size or add data"
            )
    try:
        train, test = train_test_split(
            examples, test_size=test_size, random_state=seed,
            stratify=[e.target for e in examples] if stratify else None,
        )
    except ValueError as error:  # too few examples for a split of that size
        raise DataError(f"task.test_size: cannot split {len(examples)} examples: {error}") from error
    return train, test


def prompt_messages(example: Example) -> list[dict[str, str]]:
    user = f"{example.instruction}\n{example.input}" if example.instruction else example.input
    messages = [{"role": "system", "content": example.system}] if example.system else []
    return [*messages, {"role": "user", "content": user}]


def render_prompt(tokenizer, example: Example) -> str:  # noqa: ANN001
    """The text the model sees before its answer: the chat template where there is one."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(prompt_messages(example), tokenize=False, add_generation_prompt=True)
    parts = [example.system or "", example.instruction or "", example.input]
    return "\n\n".join(p for p in parts if p) + "\n\nAnswer: "


def render_answer(tokenizer, example: Example, answer: str) -> str:  # noqa: ANN001
    """What follows the prompt when the model gives ``answer``, end-of-turn marker included."""
    if getattr(tokenizer, "chat_template", None):
        messages = [*prompt_messages(example), {"role": "assistant", "content": answer}]
        full = tokenizer.apply_chat_template(messages, tokenize=False)
        prompt = render_prompt(tokenizer, example)
        if full.startswith(prompt):
            return full[len(prompt):]
    return answer + (tokenizer.eos_token or "")


def encode_causal(tokenizer, example: Example, max_len: int, answer: str | None = None) -> dict[str, list[int]]:  # noqa: ANN001
    """input_ids = prompt + answer; labels mask the prompt with -100 so only the answer is learned.

    Prompt and answer are tokenized apart so the boundary never merges into one token. Too long:
    the prompt loses its first tokens, keeping the text nearest the answer (the input and the
    assistant header); the answer keeps at most half of ``max_len``.
    """
    prompt_ids = tokenizer(render_prompt(tokenizer, example), add_special_tokens=False)["input_ids"]
    answer_text = render_answer(tokenizer, example, example.target if answer is None else answer)
    answer_ids = tokenizer(answer_text, add_special_tokens=False)["input_ids"][: max_len // 2]
    prompt_ids = prompt_ids[max(0, len(prompt_ids) - (max_len - len(answer_ids))):]
    ids = prompt_ids + answer_ids
    return {"input_ids": ids, "attention_mask": [1] * len(ids),
            "labels": [IGNORE_INDEX] * len(prompt_ids) + answer_ids}


def encode_classifier(tokenizer, example: Example, max_len: int, label_ids: dict[str, int]) -> dict:  # noqa: ANN001
    encoded = tokenizer(example.input, truncation=True, max_length=max_len)
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"],
            "labels": label_ids[example.target]}
