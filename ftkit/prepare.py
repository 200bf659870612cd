"""From a task's rows to tokenized training features: split, leakage check, prompts, masking."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ftkit.errors import DataError
from ftkit.tasks import Example, Task

IGNORE_INDEX = -100  # labels the loss skips: the prompt tokens of causal SFT


@dataclass
class SplitData:
    """Train and test rows as canonical tables (no Python objects per row yet), and what happened."""

    train: Any  # ftkit.sources.TaskData
    test: Any
    labels: list[str] | None
    leaked_removed: int = 0
    notes: list[str] = field(default_factory=list)
    dropped: dict[str, int] = field(default_factory=dict)
    valid: Any = None  # a TaskData when the recipe has a validation set

    def summary(self) -> dict[str, Any]:
        """What ``ftkit run --dry-run --json`` reports under ``data`` (``valid_examples`` with a validation set)."""
        valid = {"valid_examples": len(self.valid)} if self.valid is not None else {}
        return {"train_examples": len(self.train)} | valid | {"test_examples": len(self.test), "labels": self.labels,
                                                               "dropped": dict(self.dropped)}


@dataclass
class Splits:
    """Train and test examples, and what happened on the way (for the report and manifest)."""

    train: list[Example]
    test: list[Example]
    labels: list[str] | None
    leaked_removed: int = 0
    notes: list[str] = field(default_factory=list)
    dropped: dict[str, int] = field(default_factory=dict)
    valid: list[Example] = field(default_factory=list)  # empty: no validation set


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file, or of a folder's files (a saved dataset) with their relative names."""
    digest = hashlib.sha256()
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if path.is_dir():
            digest.update(file.relative_to(path).as_posix().encode() + b"\0")
        with open(file, "rb") as handle:
            for chunk in iter(lambda h=handle: h.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def split_data(task: Task, recipe) -> SplitData:  # noqa: ANN001 - a Recipe
    """Load train (and test) with the recipe's mapping; split off a test set if there is no test file.

    The split is :func:`ftkit.splitting.split_indices`, the same as ``ftkit data split``'s. A
    validation set (``task.valid_file``, or ``train.valid_size`` carved by the same split from what
    the test split left) never shares a text with the test split or the training examples.
    """
    from ftkit.sources import DataMapping, load_task_data, unseen_labels
    from ftkit.splitting import sample_indices, split_indices

    section = recipe.task
    mapping = DataMapping.from_section(section)
    classify = task.kind == "classification"
    seed = recipe.train.seed
    train = load_task_data(task, section.train_file or None, mapping)
    dropped = dict(train.dropped)
    if section.max_examples:
        train = train.take(sample_indices(train, section.max_examples, seed, stratify=classify))
    notes: list[str] = []
    if dropped:
        notes.append("dropped from the training data: " + ", ".join(f"{n} ({why})" for why, n in dropped.items()))
    if section.test_file:
        test = load_task_data(task, section.test_file, mapping, role="test")
        for why, n in test.dropped.items():
            dropped[f"test: {why}"] = n
    else:
        train_rows, test_rows = split_indices(train, section.test_size, seed, stratify=classify)
        train, test = train.take(train_rows), train.take(test_rows)
        grouped = " by " + (section.group_by or task.group_by) if (section.group_by or task.group_by) else ""
        notes.append(f"test split: {len(test)} examples ({section.test_size:.0%}, "
                     f"{'stratified, ' if classify else ''}grouped{grouped or ' by source record'}, seed {seed})")
    # Leakage: a test text seen in training inflates the fine-tuned score; drop it from train.
    leaked = _remove_shared_texts(train, test, "training", "test split", notes)
    train, valid = _validation_split(task, recipe, train, test, mapping, notes, dropped)
    labels = None
    if classify:
        labels = list(section.labels) or (list(task.labels) if task.labels else train.labels)
        missing = sorted(set(labels) - set(train.labels or ()))
        if missing:
            raise DataError(f"no training examples of label(s) {', '.join(missing)}; add data or set task.labels")
        unseen = unseen_labels(train, test)
        if unseen:
            raise DataError(f"{test.source}: test label(s) {', '.join(map(repr, unseen[:10]))} never occur in the "
                            "training data, so the model cannot learn them; add training rows, map them with "
                            "task.label_map, or skip them with task.drop_labels")
        unseen = unseen_labels(train, valid) if valid is not None else []
        if unseen:
            raise DataError(f"{valid.source}: validation label(s) {', '.join(map(repr, unseen[:10]))} never occur in "
                            "the training data; add training rows, map them with task.label_map, or skip them with "
                            "task.drop_labels")
    return SplitData(train=train, test=test, labels=labels, leaked_removed=leaked, notes=notes, dropped=dropped,
                     valid=valid)


def _validation_split(task: Task, recipe, train, test, mapping, notes: list[str],  # noqa: ANN001
                      dropped: dict[str, int]) -> tuple[Any, Any]:
    """(train, validation or None): ``task.valid_file`` read, or ``train.valid_size`` carved from ``train``.

    Texts are never shared: a validation text also in the test split leaves the validation set (it
    would let the test data pick the best step), a training text also in validation leaves training.
    """
    from ftkit.sources import load_task_data
    from ftkit.splitting import split_indices

    section, seed = recipe.task, recipe.train.seed
    if section.valid_file:
        valid = load_task_data(task, section.valid_file, mapping, role="valid")
        for why, n in valid.dropped.items():
            dropped[f"valid: {why}"] = n
        _remove_shared_texts(valid, test, "validation", "test split", notes, source=valid.source)
        notes.append(f"validation set: {len(valid)} examples from {section.valid_file}")
    elif recipe.train.valid_size:
        classify = task.kind == "classification"
        train_rows, valid_rows = split_indices(train, recipe.train.valid_size, seed, stratify=classify,
                                               what="train.valid_size")
        train, valid = train.take(train_rows), train.take(valid_rows)
        group = section.group_by or task.group_by
        notes.append(f"validation split: {len(valid)} examples ({recipe.train.valid_size:.0%} of the training data, "
                     f"{'stratified, ' if classify else ''}grouped{' by ' + group if group else ' by source record'}, "
                     f"seed {seed})")
    else:
        return train, None
    _remove_shared_texts(train, valid, "training", "validation set", notes)
    return train, valid


def _remove_shared_texts(data, other, name: str, other_name: str, notes: list[str], source: str = "") -> int:  # noqa: ANN001
    """Remove ``data``'s rows whose text is also in ``other`` (one split leaking into another); how many went.

    ``name`` and ``other_name`` say which splits they are in the note, and in the error when
    nothing is left (prefixed with ``source``, the file, where there is one).
    """
    import pyarrow.compute as pc

    shared = pc.is_in(data.keys(), value_set=pc.unique(other.keys()))
    count = int(pc.sum(shared).as_py() or 0)
    if count:
        data.table = data.table.filter(pc.invert(shared))
        notes.append(f"removed {count} {name} examples whose text is also in the {other_name}")
        if not len(data):
            raise DataError(f"{source + ': ' if source else ''}every {name} example also appears in the "
                            f"{other_name}; use different files")
    return count


def load_splits(task: Task, recipe) -> Splits:  # noqa: ANN001 - a Recipe
    """:func:`split_data`, then the examples the trainer and evaluator need."""
    data = split_data(task, recipe)
    return Splits(train=data.train.examples(task), test=data.test.examples(task), labels=data.labels,
                  leaked_removed=data.leaked_removed, notes=data.notes, dropped=data.dropped,
                  valid=data.valid.examples(task) if data.valid is not None else [])


def prompt_messages(example: Example) -> list[dict[str, str]]:
    """The turns before the answer: a conversation's history, else system + one user turn."""
    if example.messages:
        return [dict(m) for m in example.messages[:-1]]
    user = f"{example.instruction}\n{example.input}" if example.instruction else example.input
    if example.pair:  # a causal model has no pair encoding: the second text follows the first
        user = f"{user}\n{example.pair}"
    messages = [{"role": "system", "content": example.system}] if example.system else []
    return [*messages, {"role": "user", "content": user}]


def render_conversation(tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:  # noqa: ANN001
    """``messages`` as the model reads them: the chat template, else ftkit's plain layout.

    The plain layout is ``ftkit chat``'s (and :func:`render_prompt`'s for one turn): the system
    prompt, each user turn followed by ``Answer: ``, each reply followed by EOS, blank lines between.
    """
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    parts = []
    for message in messages:
        if message["role"] == "assistant":
            parts.append(message["content"] + (tokenizer.eos_token or "") + "\n\n")
        else:
            parts.append(message["content"] + ("\n\n" if message["role"] == "system" else "\n\nAnswer: "))
    return "".join(parts)


def render_prompt(tokenizer, example: Example) -> str:  # noqa: ANN001
    """The text the model sees before its answer: the chat template where there is one."""
    if example.messages or getattr(tokenizer, "chat_template", None):
        return render_conversation(tokenizer, prompt_messages(example), add_generation_prompt=True)
    parts = [example.system or "", example.instruction or "", example.input]
    if example.pair:
        parts.append(example.pair)
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


def scored_answer(tokenizer, example: Example, label: str) -> str:  # noqa: ANN001
    """What label scoring scores after the prompt: the label and the end-of-turn marker.

    :func:`render_answer` without the whitespace some chat templates put after the end-of-turn
    marker (SmolLM2's and Qwen's ``<|im_end|>\n``): it follows the end of the answer, so it says
    nothing about the label, and it would cost one more token per label. A template whose only end
    marker is whitespace keeps it.
    """
    text = render_answer(tokenizer, example, label)
    at = text.rfind(label)
    return text.rstrip() if at >= 0 and text[at + len(label):].strip() else text


def encode_causal(tokenizer, example: Example, max_len: int, answer: str | None = None,  # noqa: ANN001
                  reserve: int = 0) -> dict[str, list[int]]:
    """input_ids = prompt + answer; labels mask the prompt with -100 so only the answer is learned.

    Prompt and answer are tokenized apart so the boundary never merges into one token. Too long:
    the prompt loses its first tokens, keeping the text nearest the answer (the input and the
    assistant header); the answer keeps at most half of ``max_len``. ``reserve`` keeps room for an
    answer that long instead (label scoring: every label is scored after the same cut of the
    prompt, the one the longest label leaves). ``answer``: a label to score instead of the target
    (see :func:`scored_answer`). A conversation (``example.messages``) is encoded by
    :func:`encode_conversation` instead.
    """
    if example.messages:
        messages = [dict(m) for m in example.messages]
        if answer is not None:
            messages[-1] = {"role": "assistant", "content": answer}
        return encode_conversation(tokenizer, messages, max_len)
    prompt_ids = tokenizer(render_prompt(tokenizer, example), add_special_tokens=False)["input_ids"]
    answer_text = (render_answer(tokenizer, example, example.target) if answer is None
                   else scored_answer(tokenizer, example, answer))
    answer_ids = tokenizer(answer_text, add_special_tokens=False)["input_ids"][: max_len // 2]
    room = max_len - max(len(answer_ids), min(reserve, max_len // 2))
    prompt_ids = prompt_ids[max(0, len(prompt_ids) - room):]
    return _features([(prompt_ids, False), (answer_ids, True)])


def _features(pieces: list[tuple[list[int], bool]]) -> dict[str, list[int]]:
    ids = [i for piece, _ in pieces for i in piece]
    labels = [i if learned else IGNORE_INDEX for piece, learned in pieces for i in piece]
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}


def encode_conversation(tokenizer, messages: list[dict[str, str]], max_len: int) -> dict[str, list[int]]:  # noqa: ANN001
    """A whole conversation, with every assistant turn (and its end-of-turn marker) learned, nothing else.

    Too long for ``max_len``: the oldest exchanges (up to and including the first reply) go first,
    the system prompt stays; a single exchange still too long is cut as :func:`encode_causal` cuts one.
    """
    system = messages[:1] if messages and messages[0]["role"] == "system" else []
    turns = messages[len(system):]
    while True:
        pieces = [(tokenizer(text, add_special_tokens=False)["input_ids"], learned)
                  for text, learned in conversation_segments(tokenizer, system + turns)]
        total = sum(len(ids) for ids, _ in pieces)
        replies = [i for i, m in enumerate(turns) if m["role"] == "assistant"]
        if total <= max_len or len(replies) < 2:
            break
        turns = turns[replies[0] + 1:]
    if total > max_len:  # one exchange left: keep the end of the prompt and at most half for the reply
        prompt = [i for ids, learned in pieces[:-1] for i in ids]
        reply = pieces[-1][0][: max_len // 2]
        pieces = [(prompt[max(0, len(prompt) - (max_len - len(reply))):], False), (reply, True)]
    return _features(pieces)


def conversation_segments(tokenizer, messages: list[dict[str, str]]) -> list[tuple[str, bool]]:  # noqa: ANN001
    """The rendered conversation as ``(text, learned)`` pieces; the learned ones are the assistant turns.

    Rendered incrementally: the prefix up to each assistant turn with the generation prompt, then
    the prefix including the turn; what the turn adds is learned up to its end-of-turn marker (the
    template's glue after it, such as a newline, is not). A template that renders a conversation's
    beginning differently from the conversation alone (some hide earlier turns' reasoning) falls
    back to finding each reply in the full rendering.
    """
    pieces: list[tuple[str, bool]] = []
    done = ""
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = render_conversation(tokenizer, messages[:index], add_generation_prompt=True)
        full = render_conversation(tokenizer, messages[: index + 1], add_generation_prompt=False)
        if not prompt.startswith(done) or not full.startswith(prompt):
            return _segments_by_search(tokenizer, messages)
        reply = _through_end_of_turn(tokenizer, full[len(prompt):])
        pieces += [(prompt[len(done):], False), (reply, True)]
        done = prompt + reply
    return [(text, learned) for text, learned in pieces if text]


def _through_end_of_turn(tokenizer, text: str) -> str:  # noqa: ANN001
    """``text`` up to and including its last EOS marker; without one, without trailing whitespace."""
    eos = tokenizer.eos_token or ""
    end = text.rfind(eos) if eos else -1
    return text[: end + len(eos)] if end >= 0 else text.rstrip()


def _segments_by_search(tokenizer, messages: list[dict[str, str]]) -> list[tuple[str, bool]]:  # noqa: ANN001
    full = render_conversation(tokenizer, messages, add_generation_prompt=False)
    eos = tokenizer.eos_token or ""
    pieces: list[tuple[str, bool]] = []
    at = 0
    for message in messages:
        if message["role"] != "assistant":
            continue
        start = full.find(message["content"], at)
        if start < 0:
            raise DataError("the chat template leaves out an assistant turn's text; cannot tell which tokens to "
                            f"learn: {message['content'][:60]!r}")
        end = start + len(message["content"])
        if eos and full.startswith(eos, end):
            end += len(eos)
        pieces += [(full[at:start], False), (full[start:end], True)]
        at = end
    return [(text, learned) for text, learned in pieces if text]


def encode_classifier(tokenizer, example: Example, max_len: int, label_ids: dict[str, int]) -> dict:  # noqa: ANN001
    # A text pair is encoded as one (the tokenizer's own separators; truncation shortens the longer text).
    encoded = tokenizer(example.input, example.pair, truncation=True, max_length=max_len)
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"],
            "labels": label_ids[example.target]}
