"""Batched evaluation: never one example at a time.

Examples are sorted by length before batching (less padding), and results put back in order.
- classifier head: argmax over the head's logits;
- causal head on a classification task: label-restricted decoding, i.e. each label's answer is
  scored by its log-likelihood after the prompt and the best one wins (the model can only answer
  with a label);
- generation: batched ``generate`` with left padding, plus perplexity of the gold answers.

With several processes (torchrun) each rank evaluates every world_size-th example; the predictions
(and perplexity sums) are gathered from all ranks and put back in order before the metrics.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from ftkit import distributed
from ftkit.metrics import task_metrics
from ftkit.prepare import IGNORE_INDEX, encode_causal, render_prompt
from ftkit.tasks import Example, Task


def _batches(items: Sequence[Any], size: int, key: Callable[[Any], int], desc: str):  # noqa: ANN202
    """Yield (indices, items) batches, longest first; a progress bar on a terminal (rank 0's only)."""
    from tqdm.auto import tqdm

    order = sorted(range(len(items)), key=lambda i: -key(items[i]))
    starts = range(0, len(order), size)
    for start in tqdm(starts, desc=desc, unit="batch", disable=None if distributed.is_main() else True, leave=False):
        chunk = order[start:start + size]
        yield chunk, [items[i] for i in chunk]


def _device(model):  # noqa: ANN001, ANN202
    return next(model.parameters()).device


def _pad(tokenizer, features: list[dict], device, side: str = "right") -> dict:  # noqa: ANN001
    import torch

    width = max(len(f["input_ids"]) for f in features)
    out: dict[str, list] = {"input_ids": [], "attention_mask": [], "labels": []}
    for f in features:
        gap = width - len(f["input_ids"])
        ids, mask = f["input_ids"], [1] * len(f["input_ids"])
        labels = f.get("labels", [IGNORE_INDEX] * len(ids))
        if side == "left":
            out["input_ids"].append([tokenizer.pad_token_id] * gap + ids)
            out["attention_mask"].append([0] * gap + mask)
            out["labels"].append([IGNORE_INDEX] * gap + labels)
        else:
            out["input_ids"].append(ids + [tokenizer.pad_token_id] * gap)
            out["attention_mask"].append(mask + [0] * gap)
            out["labels"].append(labels + [IGNORE_INDEX] * gap)
    return {k: torch.tensor(v, device=device) for k, v in out.items()}


def _sequence_nll(model, batch: dict):  # noqa: ANN001, ANN202
    """Summed negative log-likelihood of the labelled tokens of each sequence, and their count."""
    import torch.nn.functional as F

    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    targets = batch["labels"][:, 1:]
    nll = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1),
                          ignore_index=IGNORE_INDEX, reduction="none").view(targets.shape)
    return nll.sum(-1), (targets != IGNORE_INDEX).sum(-1)


def classifier_scores(model, tokenizer, examples: list[Example], batch_size: int, max_len: int,  # noqa: ANN001, ANN201
                      desc: str):
    """An (examples × labels) tensor of the classifier head's logits (fp32, on the CPU)."""
    import torch

    scores = torch.zeros((len(examples), model.config.num_labels))
    encoded = [tokenizer(e.input, truncation=True, max_length=max_len)["input_ids"] for e in examples]
    with torch.inference_mode():
        for chunk, ids in _batches(encoded, batch_size, len, desc):
            batch = _pad(tokenizer, [{"input_ids": i} for i in ids], _device(model))
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            scores[chunk] = logits.float().cpu()
    return scores


def predict_classifier(model, tokenizer, examples: list[Example], labels: list[str], batch_size: int,  # noqa: ANN001
                       max_len: int, desc: str) -> list[str]:
    scores = classifier_scores(model, tokenizer, examples, batch_size, max_len, desc)
    return [labels[j] for j in scores.argmax(-1).tolist()]


def label_scores(model, tokenizer, examples: list[Example], labels: list[str], batch_size: int,  # noqa: ANN001, ANN201
                 max_len: int, desc: str):
    """An (examples × labels) tensor: the log-likelihood of each label as the answer to each prompt."""
    import torch

    pairs = [(i, j) for i in range(len(examples)) for j in range(len(labels))]
    features = [encode_causal(tokenizer, examples[i], max_len, answer=labels[j]) for i, j in pairs]
    scores = torch.full((len(examples), len(labels)), -math.inf)
    with torch.inference_mode():
        for chunk, feats in _batches(features, batch_size, lambda f: len(f["input_ids"]), desc):
            nll, _ = _sequence_nll(model, _pad(tokenizer, feats, _device(model)))
            for k, value in zip(chunk, nll.tolist()):
                i, j = pairs[k]
                scores[i, j] = -value
    return scores


def predict_label_scores(model, tokenizer, examples: list[Example], labels: list[str], batch_size: int,  # noqa: ANN001
                         max_len: int, desc: str) -> list[str]:
    """Label-restricted decoding: the label whose answer has the highest log-likelihood."""
    scores = label_scores(model, tokenizer, examples, labels, batch_size, max_len, desc)
    return [labels[j] for j in scores.argmax(-1).tolist()]


def answer_nll(model, tokenizer, examples: list[Example], batch_size: int, max_len: int,  # noqa: ANN001
               desc: str) -> tuple[float, int]:
    """Summed NLL of the gold answers after their prompts, and their token count."""
    import torch

    features = [encode_causal(tokenizer, e, max_len) for e in examples]
    total, count = 0.0, 0
    with torch.inference_mode():
        for _, feats in _batches(features, batch_size, lambda f: len(f["input_ids"]), desc):
            nll, n = _sequence_nll(model, _pad(tokenizer, feats, _device(model)))
            total, count = total + nll.sum().item(), count + int(n.sum().item())
    return total, count


def perplexity(model, tokenizer, examples: list[Example], batch_size: int, max_len: int, desc: str) -> float:  # noqa: ANN001
    """exp(mean NLL per answer token) of the gold answers after their prompts."""
    total, count = answer_nll(model, tokenizer, examples, batch_size, max_len, desc)
    return math.exp(total / max(count, 1))


def generate(model, tokenizer, examples: list[Example], settings, batch_size: int, max_len: int,  # noqa: ANN001
             desc: str) -> list[str]:
    """Batched generation with left padding; returns the decoded replies (new tokens only)."""
    import torch

    prompts = [tokenizer(render_prompt(tokenizer, e), add_special_tokens=False)["input_ids"][-max_len:]
               for e in examples]
    replies: list[str | None] = [None] * len(examples)
    end_ids = [tokenizer.eos_token_id]
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>") if "<|im_end|>" in tokenizer.get_vocab() else None
    if im_end is not None:
        end_ids.append(im_end)
    options = {"max_new_tokens": settings.max_new_tokens, "do_sample": settings.do_sample,
               "repetition_penalty": settings.repetition_penalty, "eos_token_id": end_ids,
               "pad_token_id": tokenizer.pad_token_id}
    if settings.do_sample:
        options.update(temperature=settings.temperature, top_p=settings.top_p, top_k=settings.top_k)
    with torch.inference_mode():
        for chunk, ids in _batches(prompts, batch_size, len, desc):
            batch = _pad(tokenizer, [{"input_ids": i} for i in ids], _device(model), side="left")
            out = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **options)
            new = out[:, batch["input_ids"].shape[1]:]
            for index, text in zip(chunk, tokenizer.batch_decode(new, skip_special_tokens=True)):
                replies[index] = text.strip()
    return replies


def evaluate(model, tokenizer, task: Task, examples: list[Example], head: str, labels: list[str] | None,  # noqa: ANN001
             recipe, name: str) -> dict[str, Any]:
    """Predictions and the task's metrics (plus perplexity for generation) on ``examples``.

    Under several processes every rank must call this: each predicts its shard, all are gathered.
    """
    was_training = model.training
    model.eval()
    batch, max_len = recipe.eval.batch_size, recipe.train.max_seq_len
    desc = f"evaluating {name}"
    mine = distributed.shard(examples)

    def predict() -> tuple[list[str], tuple[float, int] | None]:
        if head == "classifier":
            predictions = predict_classifier(model, tokenizer, mine, labels, batch, max_len, desc)
        elif task.kind == "classification":
            predictions = predict_label_scores(model, tokenizer, mine, labels, batch, max_len, desc)
        else:
            if recipe.eval.do_sample:
                # Sampling seeded with train.seed: `ftkit eval RUN` draws the same replies again.
                import torch

                torch.manual_seed(recipe.train.seed + distributed.rank())
            predictions = generate(model, tokenizer, mine, recipe.eval, batch, max_len, desc)
        nll = answer_nll(model, tokenizer, mine, batch, max_len, desc) if task.kind == "generation" else None
        return predictions, nll

    try:
        shards = distributed.all_gather(distributed.together(predict))
    finally:
        model.train(was_training)
    predictions = distributed.unshard([shard for shard, _ in shards])
    metrics = distributed.together(
        lambda: task_metrics(task, predictions, [e.references for e in examples], labels))
    if task.kind == "generation":
        total, count = (sum(values) for values in zip(*(nll for _, nll in shards)))
        metrics["perplexity"] = math.exp(total / max(count, 1))
    return {"metrics": metrics, "predictions": predictions}
