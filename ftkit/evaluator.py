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
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

from ftkit import distributed
from ftkit.metrics import task_metrics
from ftkit.prepare import IGNORE_INDEX, encode_causal, render_prompt, scored_answer
from ftkit.recipe import LABEL_SCORES
from ftkit.tasks import Example, Task


PROGRESS_EVERY_S = 10.0  # without a terminal: one progress line at most this often

#: Whether evaluations show progress. A run with ``--quiet`` or ``--json-logs`` turns it off for
#: its own evaluations (``FineTuneRun.run``); a context variable, so no signature in between
#: carries a flag that only the console cares about.
show_progress: ContextVar[bool] = ContextVar("ftkit_evaluation_progress", default=True)


def _batches(items: Sequence[Any], size: int, key: Callable[[Any], int], desc: str):  # noqa: ANN202
    """Yield (indices, items) batches, longest first, with progress (rank 0's only).

    A progress bar on a terminal; otherwise (CI logs, ``nohup``, a pipe) a plain line every
    ``PROGRESS_EVERY_S`` seconds with done/total and the rate, so a long evaluation is never silent.
    """
    import sys
    import time

    from tqdm.auto import tqdm

    order = sorted(range(len(items)), key=lambda i: -key(items[i]))
    starts = range(0, len(order), size)
    main = distributed.is_main() and show_progress.get()
    if not main or sys.stderr.isatty():
        for start in tqdm(starts, desc=desc, unit="batch", disable=None if main else True, leave=False):
            chunk = order[start:start + size]
            yield chunk, [items[i] for i in chunk]
        return
    began = last = time.perf_counter()
    for start in starts:
        chunk = order[start:start + size]
        yield chunk, [items[i] for i in chunk]
        now, done = time.perf_counter(), min(start + size, len(order))
        if now - last >= PROGRESS_EVERY_S and done < len(order):
            last = now
            print(f"{desc}: {done}/{len(order)} ({done / len(order):.0%}), {done / (now - began):.1f}/s",
                  file=sys.stderr, flush=True)


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


#: Positions whose vocabulary logits one chunk of :func:`_sequence_nll` computes: 256 x 152k
#: vocabulary x (2 + 4 + 4) bytes is about 0.4 GB, whatever the eval batch and sequence length.
NLL_POSITIONS = 256

#: Config attributes of models whose LM head does more than a linear map (soft-capping, scaling):
#: their logits come from the model's own forward.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def _sequence_nll(model, batch: dict, allowed=None):  # noqa: ANN001, ANN202
    """Summed negative log-likelihood of the labelled tokens of each sequence, and their count.

    Vocabulary logits only at the labelled positions, ``NLL_POSITIONS`` at a time: the model's own
    forward makes them at every position (with an fp32 copy for the loss), about 12 GB at eval
    batch 16 and sequence 512 for a 152k vocabulary, which ran out of memory where training fit.
    ``allowed``: one row of token ids (-1 padding) per labelled position, in row-major order: each
    token's probability is then normalised over those tokens instead of the vocabulary.
    """
    import torch

    targets = batch["labels"][:, 1:]
    scored = targets != IGNORE_INDEX
    rows, columns = scored.nonzero(as_tuple=True)
    gold = targets[rows, columns]  # position t predicts token t + 1
    decoder, head = _decoder_and_head(model)
    if decoder is None:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        states, head = logits[rows, columns], torch.nn.Identity()
        del logits
    else:
        hidden = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         use_cache=False).last_hidden_state
        states = hidden[rows, columns]
        del hidden
    nll = -_node_logprobs(head, states, torch.arange(len(gold), device=gold.device), gold, allowed)
    total = torch.zeros(targets.size(0), device=nll.device, dtype=torch.float32).index_add_(0, rows, nll)
    return total, scored.sum(-1)


def _node_logprobs(head, states, nodes, tokens, allowed=None):  # noqa: ANN001, ANN202
    """fp32 log-probabilities of ``tokens[e]`` under the LM ``head`` at ``states[nodes[e]]``.

    A state's vocabulary logits are computed once however many tokens are scored there (a label
    trie's branching node scores every child), ``NLL_POSITIONS`` states at a time. ``allowed``
    (one row of token ids per state, -1 padding): normalise over those tokens only, not the
    vocabulary (label scoring constrained to the label set).
    """
    import torch

    out = torch.zeros(len(tokens), dtype=torch.float32, device=states.device)
    for start in range(0, len(states), NLL_POSITIONS):
        logits = head(states[start:start + NLL_POSITIONS]).float()
        if allowed is None:
            norm = logits.logsumexp(-1)
        else:
            ids = allowed[start:start + NLL_POSITIONS]
            norm = logits.gather(-1, ids.clamp(min=0)).masked_fill(ids < 0, -math.inf).logsumexp(-1)
        here = (nodes >= start) & (nodes < start + len(logits))
        local = nodes[here] - start
        out[here] = logits[local, tokens[here]] - norm[local]
    return out


def _decoder_and_head(model):  # noqa: ANN001, ANN202
    """The model's decoder stack and LM head, to compute logits only where needed; (None, None) when
    the model has no such split or transforms its logits beyond the head."""
    config = model.config
    if any(getattr(config, name, None) not in (None, 1, 1.0) for name in _LOGIT_TRANSFORMS):
        return None, None
    try:
        decoder, head = model.get_decoder(), model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return None, None
    if decoder is None or head is None or decoder is model:
        return None, None
    return decoder, head


@contextmanager
def _without_cache(model):  # noqa: ANN001, ANN202
    """``model.config.use_cache`` off for a forward that reads no KV cache (decoders make one by default)."""
    config = model.config
    before = getattr(config, "use_cache", None)
    if before:
        config.use_cache = False
    try:
        yield
    finally:
        if before:
            config.use_cache = before


def classifier_scores(model, tokenizer, examples: list[Example], batch_size: int, max_len: int,  # noqa: ANN001, ANN201
                      desc: str):
    """An (examples × labels) tensor of the classifier head's logits (fp32, on the CPU)."""
    import torch

    scores = torch.zeros((len(examples), model.config.num_labels))
    encoded = [tokenizer(e.input, e.pair, truncation=True, max_length=max_len)["input_ids"] for e in examples]
    with torch.inference_mode():
        for chunk, ids in _batches(encoded, batch_size, len, desc):
            batch = _pad(tokenizer, [{"input_ids": i} for i in ids], _device(model))
            with _without_cache(model):  # a decoder would fill a KV cache nobody reads
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            scores[chunk] = logits.float().cpu()
    return scores


def predict_classifier(model, tokenizer, examples: list[Example], labels: list[str], batch_size: int,  # noqa: ANN001
                       max_len: int, desc: str) -> list[str]:
    scores = classifier_scores(model, tokenizer, examples, batch_size, max_len, desc)
    return [labels[j] for j in scores.argmax(-1).tolist()]


#: Zhao et al. 2021's content-free input: the labels' scores after it are the model's prior for them.
CONTENT_FREE_INPUT = "N/A"
#: Answer tokens (label trie nodes) per prompt in one continuation forward. Each prompt's labels'
#: trie runs after one copy of its KV cache, and each node needs vocabulary logits: at 64 nodes
#: a batch of 16 holds 1,024 positions' logits, a quarter of what one brute-force batch at
#: ``max_seq_len`` 256 holds, while keeping the forwards large enough to be efficient on a CPU.
ANSWER_TOKENS_PER_FORWARD = 64


def label_scores(model, tokenizer, examples: list[Example], labels: list[str], batch_size: int,  # noqa: ANN001, ANN201
                 max_len: int, desc: str, *, score: str = "sum", calibrate: bool = False):
    """An (examples × labels) tensor: how strongly the model gives each label as the answer.

    ``score="sum"``: the answer's log-likelihood after the prompt; ``"mean"``: per answer token, so
    a label is not penalised for having more tokens; ``"constrained"``: the label's probability
    when decoding may only spell a label: each token's probability is renormalised over the tokens
    that continue some label from there (the labels' prefix trie), so a token every remaining label
    agrees on costs nothing. ``calibrate``: minus the labels' log-probs after a content-free input
    (contextual calibration, Zhao et al. 2021). The prompt runs once per example and its KV cache
    serves every label; see :func:`answer_logprobs`.
    """
    return _label_scores(answer_logprobs, model, tokenizer, examples, labels, batch_size, max_len, desc,
                         score, calibrate)


def label_scores_brute_force(model, tokenizer, examples: list[Example], labels: list[str], batch_size: int,  # noqa: ANN001, ANN201
                             max_len: int, desc: str, *, score: str = "sum", calibrate: bool = False):
    """:func:`label_scores` the slow way, one full prompt + answer forward per (example, label): the reference."""
    return _label_scores(answer_logprobs_brute_force, model, tokenizer, examples, labels, batch_size, max_len,
                         desc, score, calibrate)


def _label_scores(logprobs, model, tokenizer, examples: list[Example], labels: list[str], batch_size: int,  # noqa: ANN001, ANN202
                  max_len: int, desc: str, score: str, calibrate: bool):
    if score not in LABEL_SCORES:
        raise ValueError(f"`score` must be one of {', '.join(LABEL_SCORES)}, got {score!r}")
    constrained = score == "constrained"
    total, count = logprobs(model, tokenizer, examples, labels, batch_size, max_len, desc, constrained=constrained)
    scores = reduce_answer_logprobs(total, count, score)
    if not calibrate:
        return scores
    # Content-free copies of the examples: same system prompt and instruction, input "N/A".
    blanks: dict[Example, int] = {}
    rows = [blanks.setdefault(replace(e, input=CONTENT_FREE_INPUT, target="", references=("",)), len(blanks))
            for e in examples]
    blank_total, blank_count = logprobs(model, tokenizer, list(blanks), labels, batch_size, max_len, desc,
                                        constrained=constrained)
    return calibrate_scores(scores, reduce_answer_logprobs(blank_total, blank_count, score)[rows])


def reduce_answer_logprobs(total, count, score: str):  # noqa: ANN001, ANN201
    """A label's score from its answer tokens' summed log-prob and their number: the sum (also the
    constrained log-prob's), or the mean."""
    if score in ("sum", "constrained"):
        return total
    if score == "mean":
        return total / count.clamp(min=1)
    raise ValueError(f"`score` must be one of {', '.join(LABEL_SCORES)}, got {score!r}")


def calibrate_scores(scores, content_free):  # noqa: ANN001, ANN201
    """Contextual calibration: subtract each label's log-prob (over the labels) after a content-free input.

    ``content_free`` holds the label scores after the content-free input, one row of ``scores``
    each. A softmax over the result equals Zhao et al.'s diag(p_cf)^-1 p, renormalized.
    """
    return scores - content_free.log_softmax(-1)


def _answer_trie(answers: list[list[int]]) -> dict[tuple[int, ...], list[int]]:
    """Each prefix of the answers (the empty one too) → the tokens that follow it in some answer.

    Constrained scoring normalises a token's probability over its prefix's followers only.
    """
    followers: dict[tuple[int, ...], dict[int, None]] = {}
    for answer in answers:
        for n, token in enumerate(answer):
            followers.setdefault(tuple(answer[:n]), {})[token] = None
    return {prefix: list(tokens) for prefix, tokens in followers.items()}


def _scored_depths(answer: list[int], trie: dict[tuple[int, ...], list[int]], constrained: bool) -> list[int]:
    """The depths n >= 1 whose token ``answer[n]`` must be scored after ``answer[:n]``.

    Every one for the log-likelihood; constrained, only where the prefix has other followers: a
    token no other label could take there has probability 1, and costs no forward.
    """
    return [n for n in range(1, len(answer)) if not constrained or len(trie[tuple(answer[:n])]) > 1]


def _trie_columns(answers: list[list[int]], trie: dict[tuple[int, ...], list[int]], constrained: bool) -> int:
    """How many trie nodes :func:`answer_logprobs` runs after a prompt to score these answers (``trie``:
    their :func:`_answer_trie`)."""
    return len({tuple(answer[:n]) for answer in answers
                for n in range(1, max(_scored_depths(answer, trie, constrained), default=0) + 1)})


def _allowed(rows: list[list[int]], device):  # noqa: ANN001, ANN202
    """Rows of token ids as one tensor, padded with -1 (see :func:`_node_logprobs`)."""
    import torch

    width = max((len(row) for row in rows), default=0)
    return torch.tensor([row + [-1] * (width - len(row)) for row in rows], dtype=torch.long, device=device)


def answer_logprobs_brute_force(model, tokenizer, examples: list[Example], labels: list[str], batch_size: int,  # noqa: ANN001, ANN201
                                max_len: int, desc: str, *, constrained: bool = False):
    """(examples × labels) summed log-probs of each label's answer tokens, and their counts, one full
    forward of prompt + answer per pair (vocabulary logits at every answer position).

    ``constrained``: each token's log-prob normalised over the tokens that follow its prefix in some
    label's answer (the labels' trie, per example) instead of the vocabulary.
    """
    import torch

    pairs = [(i, j) for i in range(len(examples)) for j in range(len(labels))]
    # Every label is scored after the same cut of a too-long prompt: the one its longest label leaves.
    reserve = [max(len(ids) for ids in tokenizer([scored_answer(tokenizer, e, label) for label in labels],
                                                 add_special_tokens=False)["input_ids"]) for e in examples]
    features = [encode_causal(tokenizer, examples[i], max_len, answer=labels[j], reserve=reserve[i]) for i, j in pairs]
    answers = [[t for t in f["labels"] if t != IGNORE_INDEX] for f in features]
    tries = [_answer_trie(answers[i * len(labels):(i + 1) * len(labels)]) for i in range(len(examples))]
    total = torch.zeros((len(examples), len(labels)))
    count = torch.zeros((len(examples), len(labels)), dtype=torch.long)
    with torch.inference_mode():
        for chunk, feats in _batches(features, batch_size, lambda f: len(f["input_ids"]), desc):
            allowed = None
            if constrained:  # the followers of each answer token's prefix, in the order _sequence_nll scores them
                allowed = _allowed([tries[pairs[k][0]][tuple(answers[k][:n])] for k in chunk
                                    for n in range(len(answers[k]))], _device(model))
            nll, n = _sequence_nll(model, _pad(tokenizer, feats, _device(model)), allowed)
            for k, value, tokens in zip(chunk, nll.tolist(), n.tolist()):
                i, j = pairs[k]
                total[i, j], count[i, j] = -value, tokens
    return total, count


@dataclass
class _Prompt:
    """One prompt to run once (its example's index and token ids); every label is scored after it."""

    example: int
    ids: list[int]


def _label_prompts(tokenizer, examples: list[Example], labels: list[str], max_len: int):  # noqa: ANN001, ANN202
    """Prompts and answer ids, cut exactly as :func:`encode_causal` cuts them for the brute force.

    A too-long prompt is cut once per example, leaving room for its longest label: every label is
    scored after the same context (and the prompt runs once).
    """
    prompts: list[_Prompt] = []
    answers: list[list[list[int]]] = []
    for i, example in enumerate(examples):
        prompt = tokenizer(render_prompt(tokenizer, example), add_special_tokens=False)["input_ids"]
        texts = [scored_answer(tokenizer, example, label) for label in labels]
        ids = [a[: max_len // 2] for a in tokenizer(texts, add_special_tokens=False)["input_ids"]]
        answers.append(ids)
        longest = max((len(answer) for answer in ids), default=0)
        prompts.append(_Prompt(i, prompt[max(0, len(prompt) - (max_len - longest)):]))
    return prompts, answers


def answer_logprobs(model, tokenizer, examples: list[Example], labels: list[str], batch_size: int,  # noqa: ANN001, ANN201
                    max_len: int, desc: str, *, constrained: bool = False):
    """(examples × labels) summed log-probs of each label's answer tokens, and their counts.

    Same numbers as :func:`answer_logprobs_brute_force`, fast:
    - the tokens every prompt starts with (chat template, system prompt, instruction: often most
      of a classification prompt) run once for the whole evaluation, and their KV cache starts
      every batch;
    - each batch of prompts runs its own remaining tokens once (left-padded after the shared part,
      so every prompt ends in the last column), whose next-token logits score every label's first
      answer token;
    - the labels' remaining tokens run after the prompt's KV cache as a prefix trie, in one
      sequence per prompt: a prefix that several labels share runs once, and the attention mask
      lets each trie node see the prompt and its own ancestors only (:func:`_trie_logprobs`).
      Constrained, only the nodes up to a label's last branching point run: after it, the label's
      remaining tokens are forced and cost nothing (at 77 BANKING77 intents, 47 tokens per example
      instead of 481).
    Vocabulary logits are computed only at the positions scored (``logits_to_keep``). A model whose
    attention takes no custom mask (flash attention) is scored by the brute force instead.
    """
    if not _takes_label_masks(model):
        return answer_logprobs_brute_force(model, tokenizer, examples, labels, batch_size, max_len, desc,
                                           constrained=constrained)
    prompts, answers = _label_prompts(tokenizer, examples, labels, max_len)
    return _prompts_answer_logprobs(model, tokenizer, prompts, answers, [_answer_trie(row) for row in answers],
                                    len(labels), batch_size, desc, constrained)


def _prompts_answer_logprobs(model, tokenizer, prompts: list[_Prompt], answers: list[list[list[int]]], tries,  # noqa: ANN001, ANN202
                             labels: int, batch_size: int, desc: str, constrained: bool):
    """:func:`answer_logprobs` of prompts and answers already tokenized (:func:`_label_prompts`), with
    the answers' tries."""
    import torch

    total = torch.zeros((len(prompts), labels))
    count = torch.zeros((len(prompts), labels), dtype=torch.long)
    cache_name, keeps_logits = _forward_arguments(model)
    with torch.inference_mode():
        for batch, last_logits, cache, mask, positions in _prompt_batches(model, tokenizer, prompts, batch_size,
                                                                          desc):
            rows = [p.example for p in batch]
            total[rows], count[rows] = _batch_answer_logprobs(
                model, [answers[i] for i in rows], [tries[i] for i in rows], last_logits, cache, mask,
                positions[:, -1], constrained, tokenizer.pad_token_id, cache_name, keeps_logits)
    return total, count


def _batch_answer_logprobs(model, answers: list[list[list[int]]], tries, last_logits, cache, prompt_mask,  # noqa: ANN001, ANN202, PLR0913
                           last_positions, constrained: bool, pad_id: int, cache_name: str, keeps_logits: bool):
    """(prompts × labels) summed log-probs of a batch of prompts' answers, and their counts, after the
    prompts ran (:func:`_prompt_batches`); ``answers[b]``: prompt ``b``'s labels' answer tokens,
    ``tries[b]`` their :func:`_answer_trie`."""
    import torch

    device, labels = prompt_mask.device, len(answers[0])
    total = torch.zeros((len(answers), labels))
    count = torch.zeros((len(answers), labels), dtype=torch.long)
    rows = [(b, j) for b, row in enumerate(answers) for j in range(labels) if row[j]]
    b, j = (torch.tensor(column) for column in zip(*rows))
    # The prompts' last states score every label's first token (constrained: over the labels' first tokens).
    total[b, j] = _node_logprobs(
        torch.nn.Identity(), last_logits, b.to(device),
        torch.tensor([answers[r][c][0] for r, c in rows], device=device),
        _allowed([trie[()] for trie in tries], device) if constrained else None).cpu()
    count[b, j] = torch.tensor([len(answers[r][c]) for r, c in rows])
    # The labels' later tokens, as tries of about ANSWER_TOKENS_PER_FORWARD nodes per prompt.
    depths = [{j: _scored_depths(row[j], trie, constrained) for j in range(labels)}
              for row, trie in zip(answers, tries)]
    longer = [j for j in range(labels) if any(d[j] for d in depths)]
    # Sorted by their tokens, labels that share a prefix land in the same trie.
    longer.sort(key=lambda j: answers[0][j])
    paths = [[row[j][:max(d[j], default=0)] for j in range(labels)] for row, d in zip(answers, depths)]
    for group in _trie_groups(longer, paths):
        total[:, group] += _trie_logprobs(model, cache, prompt_mask, last_positions,
                                          [[(row[j], d[j]) for j in group] for row, d in zip(answers, depths)],
                                          [trie if constrained else None for trie in tries], pad_id, cache_name,
                                          keeps_logits)
    return total, count


def _takes_label_masks(model) -> bool:  # noqa: ANN001
    """Whether the model's attention takes the custom (4-D) masks the labels' tries need (not flash attention)."""
    return getattr(model.config, "_attn_implementation", "sdpa") in ("sdpa", "eager")


def _prompt_batches(model, tokenizer, prompts: list[_Prompt], batch_size: int, desc: str):  # noqa: ANN001, ANN202
    """Each batch of prompts run once: ``(batch, last logits, KV cache, attention mask, positions)``.

    The tokens every prompt starts with (chat template, system prompt, instruction: often most of a
    classification prompt) run once for all batches, and their KV cache starts every batch. Each
    batch's own tokens are left-padded after the shared part, so every prompt ends in the last
    column, whose next-token logits score the labels' first tokens.
    """
    import torch

    device, (cache_name, keeps_logits) = _device(model), _forward_arguments(model)
    keep = {"logits_to_keep": 1} if keeps_logits else {}
    shared = _shared_prefix([p.ids for p in prompts])
    shared_cache = None
    if shared:
        shared_cache = getattr(model(input_ids=torch.tensor([shared], device=device), use_cache=True, **keep),
                               cache_name)
    for _, batch in _batches(prompts, batch_size, lambda p: len(p.ids), desc):
        padded = _pad(tokenizer, [{"input_ids": p.ids[len(shared):]} for p in batch], device, side="left")
        own = padded["attention_mask"]
        # Left padding: positions must count real tokens only, as in the brute force's right-padded rows.
        positions = len(shared) + (own.cumsum(-1) - 1).clamp(min=0)
        mask = torch.cat([own.new_ones((len(batch), len(shared))), own], dim=-1)
        cache = {} if shared_cache is None else {
            cache_name: _cache_rows(shared_cache, torch.zeros(len(batch), dtype=torch.long, device=device))}
        out = model(input_ids=padded["input_ids"], attention_mask=mask, position_ids=positions, use_cache=True,
                    **cache, **keep)
        yield batch, out.logits[:, -1], getattr(out, cache_name), mask, positions


def _keep_columns(cache, start: int, kept: list[list[int]]) -> None:  # noqa: ANN001
    """Keep, in each row ``r`` of ``cache``, its first ``start`` columns and then the columns ``start +
    kept[r][i]`` (every row the same number), in place."""
    import torch

    for layer in cache.layers:
        index = torch.tensor(kept, device=layer.keys.device)[:, None, :, None]
        index = index.expand(-1, layer.keys.shape[1], -1, layer.keys.shape[-1])
        layer.keys = torch.cat([layer.keys[:, :, :start], layer.keys[:, :, start:].gather(2, index)], dim=2)
        layer.values = torch.cat([layer.values[:, :, :start], layer.values[:, :, start:].gather(2, index)], dim=2)


def _trie_groups(items: list[int], paths: list[list[list[int]]]) -> list[list[int]]:
    """``items`` (labels) in consecutive groups whose tries hold at most ANSWER_TOKENS_PER_FORWARD
    nodes in every row (at least one item each).

    ``paths[b][item]``: the tokens row ``b`` runs for ``item``; a prefix several items share is one
    node of their group's trie.
    """
    groups: list[list[int]] = []
    nodes: list[set[tuple[int, ...]]] = []
    for item in items:
        added = [{tuple(row[item][:n]) for n in range(1, len(row[item]) + 1)} for row in paths]
        if not groups or any(len(have | new) > ANSWER_TOKENS_PER_FORWARD for have, new in zip(nodes, added)):
            groups.append([])
            nodes = [set() for _ in paths]
        groups[-1].append(item)
        for have, new in zip(nodes, added):
            have |= new
    return groups


def _shared_prefix(prompts: list[list[int]]) -> list[int]:
    """The token ids every prompt starts with, leaving each prompt at least one token of its own.

    Its own last token is what scores the labels' first tokens; a single prompt shares nothing.
    """
    if len(prompts) < 2:
        return []
    first, shortest = prompts[0], min(len(p) for p in prompts)
    n = 0
    while n < shortest - 1 and all(p[n] == first[n] for p in prompts):
        n += 1
    return first[:n]


def _cache_rows(cache, rows=None):  # noqa: ANN001, ANN202
    """A copy of ``cache`` (holding its batch rows ``rows``, repeats allowed); ``cache`` is left as it was.

    Shallow copies whose layers get new tensors (a forward appends by concatenating): the original
    keeps serving later batches and label groups.
    """
    import copy

    rows_cache = copy.copy(cache)
    rows_cache.layers = [copy.copy(layer) for layer in cache.layers]
    if rows is not None:
        rows_cache.batch_select_indices(rows)
    return rows_cache


def _trie_logprobs(model, cache, prompt_mask, last_positions, answers, tries, pad_id: int,  # noqa: ANN001, ANN202
                   cache_name: str, keeps_logits: bool):
    """(prompts × answers) summed log-probs of each answer's tokens at its scored depths.

    ``answers[b]``: prompt ``b``'s answers, each with the depths n whose token ``answer[n]`` is
    scored after ``answer[:n]``. The prefixes up to the deepest run as one trie per row after a
    copy of the prompt's cache: one column per distinct prefix (its last token), at the position
    that follows the prompt by its length. The attention mask (4-D) lets a column see the prompt's
    real tokens and its own prefix's columns, nothing else: each answer is scored as if it ran
    alone after the prompt. ``tries[b]``: normalise over the prefix's followers there (constrained
    scoring), or over the vocabulary when None.
    """
    import torch

    device = prompt_mask.device
    columns: list[dict[tuple[int, ...], int]] = []
    entries = []  # (row, column, scored token, answer)
    for b, row in enumerate(answers):
        at: dict[tuple[int, ...], int] = {}
        for n, (answer, depths) in enumerate(row):
            for depth in range(1, max(depths, default=0) + 1):
                at.setdefault(tuple(answer[:depth]), len(at))
            entries += [(b, at[tuple(answer[:depth])], answer[depth], n) for depth in depths]
        columns.append(at)
    width = max(len(at) for at in columns)
    inputs = torch.full((len(answers), width), pad_id, dtype=torch.long)
    depth = torch.zeros((len(answers), width), dtype=torch.long)
    sees_own = torch.zeros((len(answers), width, width), dtype=torch.bool)
    for b, at in enumerate(columns):
        for prefix, column in at.items():
            inputs[b, column], depth[b, column] = prefix[-1], len(prefix)
            sees_own[b, column, [at[prefix[:n]] for n in range(1, len(prefix) + 1)]] = True
    inputs, depth, sees_own = inputs.to(device), depth.to(device), sees_own.to(device)
    sees = torch.cat([prompt_mask.bool()[:, None, :].expand(-1, width, -1), sees_own], dim=-1)
    arguments = {"input_ids": inputs, "attention_mask": _attention_mask(model, sees),
                 "position_ids": last_positions[:, None] + depth, "use_cache": True, cache_name: _cache_rows(cache)}
    # One state per real column; an entry scores one token at one of them.
    starts = torch.tensor([0] + [len(at) for at in columns]).cumsum(0).tolist()
    rows = torch.tensor([b for b, at in enumerate(columns) for _ in at], device=device)
    cols = torch.tensor([c for at in columns for c in range(len(at))], device=device)  # columns in insertion order
    node = torch.tensor([starts[b] + c for b, c, _, _ in entries], dtype=torch.long, device=device)
    token = torch.tensor([t for _, _, t, _ in entries], dtype=torch.long, device=device)
    allowed = None
    if tries[0] is not None:
        allowed = _allowed([tries[b][prefix] for b, at in enumerate(columns) for prefix in at], device)
    logprob = _columns_logprobs(model, arguments, keeps_logits, rows, cols, node, token, allowed)
    sums = torch.zeros((len(answers), max(len(row) for row in answers)), device=device)
    if entries:
        sums.index_put_((torch.tensor([b for b, *_ in entries], device=device),
                         torch.tensor([n for *_, n in entries], device=device)), logprob, accumulate=True)
    return sums.cpu()


def _attention_mask(model, sees):  # noqa: ANN001, ANN202
    """The 4-D attention mask the model's attention takes for ``sees`` (rows × queries × keys, True:
    may attend)."""
    import torch

    sees = sees[:, None]
    if model.config._attn_implementation == "eager":  # eager adds the mask to the scores
        return torch.zeros(sees.shape, device=sees.device).masked_fill(~sees, torch.finfo(torch.float32).min)
    return sees  # SDPA takes a boolean mask whatever the compute dtype


def _columns_logprobs(model, arguments: dict, keeps_logits: bool, rows, cols, node, token, allowed=None):  # noqa: ANN001, ANN202
    """Run ``arguments`` (new columns after a KV cache) and score ``token[e]`` at column
    ``(rows, cols)[node[e]]`` (see :func:`_node_logprobs`); vocabulary logits only at those columns."""
    import torch

    width = arguments["input_ids"].shape[1]
    decoder, head = _decoder_and_head(model)
    if decoder is None:
        logits = model(**arguments, **({"logits_to_keep": 0} if keeps_logits else {})).logits[:, -width:]
        return _node_logprobs(torch.nn.Identity(), logits[rows, cols], node, token, allowed)
    # Vocabulary logits for NLL_POSITIONS states at a time, not the whole batch's at once.
    return _node_logprobs(head, decoder(**arguments).last_hidden_state[:, -width:][rows, cols], node, token, allowed)


def _forward_arguments(model) -> tuple[str, bool]:  # noqa: ANN001
    """The name of the forward's KV-cache argument and output, and whether it takes ``logits_to_keep``.

    transformers renamed ``past_key_values`` to ``cache`` during 5.x; ftkit supports both. A peft
    wrapper passes both arguments on to its base model, so the base model's signature decides.
    """
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    parameters = inspect.signature(base.forward).parameters
    return ("cache" if "cache" in parameters else "past_key_values"), "logits_to_keep" in parameters


def predict_label_scores(model, tokenizer, examples: list[Example], labels: list[str], batch_size: int,  # noqa: ANN001
                         max_len: int, desc: str, *, score: str = "sum", calibrate: bool = False) -> list[str]:
    """Label-restricted decoding: the label with the highest score (see :func:`label_scores`).

    Under ``sum`` and ``constrained`` (uncalibrated) a best-first search finds it without scoring
    every label (:func:`best_labels`); ``mean`` and calibrated scores can rise along a label, so
    they score every label.
    """
    if score in ("sum", "constrained") and not calibrate:
        best = best_labels(model, tokenizer, examples, labels, batch_size, max_len, desc,
                           constrained=score == "constrained")
        return [labels[j] for j in best]
    scores = label_scores(model, tokenizer, examples, labels, batch_size, max_len, desc, score=score,
                          calibrate=calibrate)
    return [labels[j] for j in scores.argmax(-1).tolist()]


#: The search's rounds (:func:`best_labels`): a round is as wide as the most prefixes any prompt has
#: within ``SEARCH_MARGIN`` nats of its most promising one, at most this many. Simulated on SmolLM2
#: zero-shot with BANKING77's 77 intents (382 trie nodes per example): 32 and 4 take ~10 rounds and
#: run ~176 prefixes, as many as one at a time would; a wider margin runs more, a narrower one needs
#: more rounds.
SEARCH_PREFIXES_PER_ROUND = 32
SEARCH_MARGIN = 4.0
#: Columns (prefixes run, with padding) a prompt's KV cache may hold after the prompt during the
#: search (the estimator counts this bound). When full, the cache keeps only the columns the
#: prefixes still to run descend from; should those not fit, the batch scores every label instead
#: (:func:`_batch_answer_logprobs`), having spent the search for nothing.
SEARCH_COLUMNS = 256


def best_labels(model, tokenizer, examples: list[Example], labels: list[str], batch_size: int,  # noqa: ANN001
                max_len: int, desc: str, *, constrained: bool = False) -> list[int]:
    """Each example's best label (its index) under the log-likelihood (``constrained``: the
    constrained log-prob), found by a best-first search over the labels' trie: the argmax of
    :func:`label_scores`, without scoring every label.

    A token's log-probability is at most 0, so a prefix's score bounds the score of every label
    that starts with it. Once a label scores at least as much as every prefix not yet run, no other
    label can beat it; the prefixes below it never run. A confident model runs little more than
    its answer's tokens; an unsure one runs more (SmolLM2 zero-shot at BANKING77's 77 intents:
    ~176 of the trie's 382 nodes per example). Each prompt's KV cache keeps the prefixes run in
    earlier rounds, as the later ones' ancestors (:func:`_best_first`). Ties at the last float bit
    may go either way, as between the fast path and the brute force.
    """
    return [label for label, _ in _best_labels_and_scores(model, tokenizer, examples, labels, batch_size, max_len,
                                                          desc, constrained)]


def _best_labels_and_scores(model, tokenizer, examples: list[Example], labels: list[str], batch_size: int,  # noqa: ANN001
                            max_len: int, desc: str, constrained: bool) -> list[tuple[int, float]]:
    """:func:`best_labels`, each with its score."""
    import torch

    if not examples:
        return []
    if not _takes_label_masks(model):
        scores, _ = answer_logprobs_brute_force(model, tokenizer, examples, labels, batch_size, max_len, desc,
                                                constrained=constrained)
        return list(zip(scores.argmax(-1).tolist(), scores.max(-1).values.tolist()))
    prompts, answers = _label_prompts(tokenizer, examples, labels, max_len)
    tries = [_answer_trie(row) for row in answers]
    if max(_trie_columns(row, trie, constrained) for row, trie in zip(answers, tries)) <= ANSWER_TOKENS_PER_FORWARD:
        # A trie that runs in one forward per batch: the search's rounds cannot take less. (Under
        # `sum` and `constrained` a label's score is its summed log-prob.)
        scores, _ = _prompts_answer_logprobs(model, tokenizer, prompts, answers, tries, len(labels), batch_size, desc,
                                             constrained)
        return list(zip(scores.argmax(-1).tolist(), scores.max(-1).values.tolist()))
    best: list[tuple[int, float]] = [(0, 0.0)] * len(examples)
    cache_name, keeps_logits = _forward_arguments(model)
    with torch.inference_mode():
        for batch, last_logits, cache, mask, positions in _prompt_batches(model, tokenizer, prompts, batch_size,
                                                                          desc):
            found = _best_first(model, cache, mask, positions[:, -1], last_logits, [answers[p.example] for p in batch],
                                [tries[p.example] for p in batch], constrained, tokenizer.pad_token_id, cache_name,
                                keeps_logits)
            for p, pick in zip(batch, found):
                best[p.example] = pick
    return best


def _best_first(model, cache, prompt_mask, last_positions, first_logits, answers: list[list[list[int]]], tries,  # noqa: ANN001, PLR0913
                constrained: bool, pad_id: int, cache_name: str, keeps_logits: bool) -> list[tuple[int, float]]:
    """The best label of each prompt (a row of ``answers``, with its :func:`_answer_trie` in ``tries``)
    and its score, by best-first search (see :func:`best_labels`).

    ``first_logits``: each prompt's next-token logits, which score the labels' first tokens. A
    prefix's column (input: its last token, at the prompt's end plus its length) attends to the
    prompt and to its ancestors' columns, run in earlier rounds and kept in the KV cache; its logits
    score the tokens that follow it in some label.
    """
    import torch

    device, rows = prompt_mask.device, len(answers)
    complete: list[dict[tuple[int, ...], int]] = []  # a label's whole answer → the label (the first of equals)
    single: list[dict[tuple[int, ...], int]] = []  # a prefix of one label's answer only → that label
    for row in answers:
        complete.append({})
        below: dict[tuple[int, ...], set[tuple[int, ...]]] = {}
        for j, answer in enumerate(row):
            complete[-1].setdefault(tuple(answer), j)
            for n in range(len(answer) + 1):
                below.setdefault(tuple(answer[:n]), set()).add(tuple(answer))
        single.append({prefix: complete[-1][next(iter(ends))] for prefix, ends in below.items() if len(ends) == 1})
    best = [(-math.inf, -1)] * rows
    frontier: list[dict[tuple[int, ...], float]] = [{} for _ in range(rows)]  # prefixes to run → their scores

    def reach(b: int, prefix: tuple[int, ...], score: float) -> None:
        ends = single[b].get(prefix) if constrained else None
        label = complete[b].get(prefix) if ends is None else ends
        if label is not None and (score, -label) > (best[b][0], -best[b][1]):
            best[b] = (score, label)
        # Constrained, the tokens after a prefix of one label only are forced: probability 1, nothing to run.
        if ends is None and prefix in tries[b]:
            frontier[b][prefix] = score

    def grow(expanded: list[tuple[int, tuple[int, ...], float]], states_logprobs) -> None:  # noqa: ANN001
        """Reach the followers of each expanded ``(row, prefix, score)``, scored by
        ``states_logprobs(nodes, tokens, allowed)``."""
        entries = [(n, b, prefix + (token,), score) for n, (b, prefix, score) in enumerate(expanded)
                   for token in tries[b][prefix]]
        node = torch.tensor([n for n, *_ in entries], dtype=torch.long, device=device)
        token = torch.tensor([child[-1] for _, _, child, _ in entries], dtype=torch.long, device=device)
        allowed = _allowed([tries[b][prefix] for b, prefix, _ in expanded], device) if constrained else None
        for (_, b, child, score), logprob in zip(entries, states_logprobs(node, token, allowed).tolist()):
            reach(b, child, score + logprob)

    for b in range(rows):
        reach(b, (), 0.0)  # a label with no answer tokens scores 0
    roots = [(b, (), 0.0) for b in range(rows) if () in frontier[b]]
    grow(roots, lambda node, token, allowed: _node_logprobs(
        torch.nn.Identity(), first_logits[[b for b, _, _ in roots]], node, token, allowed))
    for b, _, _ in roots:
        del frontier[b][()]
    columns: list[dict[tuple[int, ...], int]] = [{} for _ in range(rows)]  # a prefix run → its column
    run = 0  # columns after the prompt so far, in every row (padding included)
    grown, live = _cache_rows(cache), list(range(rows))  # the prompts still searching: grown's rows
    live_mask, live_positions = prompt_mask, last_positions
    while True:
        chosen, ranked = {}, {}
        for b in live:
            # A prefix scoring no more than the best label so far can never lead to a better one.
            frontier[b] = {prefix: score for prefix, score in frontier[b].items() if score > best[b][0]}
            ranked[b] = sorted(((score, prefix) for prefix, score in frontier[b].items()), reverse=True)
            # The prefixes near the top run; how many sets the round's width.
            near = sum(score >= ranked[b][0][0] - SEARCH_MARGIN for score, _ in ranked[b])
            if near:
                chosen[b] = [prefix for _, prefix in ranked[b][:min(near, SEARCH_PREFIXES_PER_ROUND)]]
        if not chosen:
            return [(label, score) for score, label in best]
        width = max(len(prefixes) for prefixes in chosen.values())
        # A row with fewer runs its next prefixes in its spare columns, which would run padding: at
        # 77 intents (SmolLM2 zero-shot, 16 examples) 4,617 -> 3,565 tokens, 176 -> 177 prefixes run.
        for b, prefixes in chosen.items():
            prefixes[len(prefixes):] = [prefix for _, prefix in ranked[b][len(prefixes):width]]
        if len(chosen) < len(live):  # done prompts leave the batch: no padding columns run for them
            keep = [r for r, b in enumerate(live) if b in chosen]
            grown.batch_select_indices(torch.tensor(keep, device=device))
            live_mask, live_positions = live_mask[keep], live_positions[keep]
            live = [live[r] for r in keep]
        if run + width > SEARCH_COLUMNS:
            # The KV cache holds at most SEARCH_COLUMNS columns after the prompts (the estimator's bound):
            # it keeps only the columns the prefixes still to run descend from (not those of prefixes
            # below the best label, nor padding).
            needed = [sorted({columns[b][prefix[:n]] for prefix in frontier[b] for n in range(1, len(prefix))})
                      for b in live]
            run = max(map(len, needed))
            if run + width <= SEARCH_COLUMNS:
                _keep_columns(grown, live_mask.shape[1], [kept + kept[-1:] * (run - len(kept)) if kept else [0] * run
                                                          for kept in needed])
                for b, kept in zip(live, needed):
                    at = {column: n for n, column in enumerate(kept)}
                    columns[b] = {prefix: at[column] for prefix, column in columns[b].items() if column in at}
        if run + width > SEARCH_COLUMNS:
            # Still too many: the batch scores every label instead, after its prompts' cache (no copy
            # of it but the trie's).
            grown = arguments = None  # frees the search's columns
            total, _ = _batch_answer_logprobs(model, answers, tries, first_logits, cache, prompt_mask, last_positions,
                                              constrained, pad_id, cache_name, keeps_logits)
            return list(zip(total.argmax(-1).tolist(), total.max(-1).values.tolist()))
        inputs = torch.full((len(live), width), pad_id, dtype=torch.long)
        depth = torch.zeros((len(live), width), dtype=torch.long)
        sees_run = torch.zeros((len(live), width, run + width), dtype=torch.bool)
        for r, b in enumerate(live):
            for c, prefix in enumerate(chosen[b]):
                inputs[r, c], depth[r, c] = prefix[-1], len(prefix)
                sees_run[r, c, [columns[b][prefix[:n]] for n in range(1, len(prefix))] + [run + c]] = True
        sees = torch.cat([live_mask.bool()[:, None, :].expand(-1, width, -1), sees_run.to(device)], dim=-1)
        arguments = {"input_ids": inputs.to(device), "attention_mask": _attention_mask(model, sees),
                     "position_ids": live_positions[:, None] + depth.to(device), "use_cache": True,
                     cache_name: grown}  # the forward appends this round's columns to grown
        expanded = [(b, prefix, frontier[b].pop(prefix)) for b in live for prefix in chosen[b]]
        at_rows = torch.tensor([r for r, b in enumerate(live) for _ in chosen[b]], device=device)
        at_cols = torch.tensor([c for b in live for c in range(len(chosen[b]))], device=device)
        grow(expanded, partial(_columns_logprobs, model, arguments, keeps_logits, at_rows, at_cols))
        for b in live:
            columns[b].update((prefix, run + c) for c, prefix in enumerate(chosen[b]))
        run += width


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


def generation_options(tokenizer, settings) -> dict[str, Any]:  # noqa: ANN001 - a tokenizer, eval settings
    """``generate`` keyword arguments, the one place they are made (run, eval, predict and chat).

    Greedy unless ``settings.do_sample``; the turn ends at EOS or at ``<|im_end|>`` (Qwen-style
    chat templates end a turn there, not at EOS).
    """
    end_ids = [tokenizer.eos_token_id]
    if "<|im_end|>" in tokenizer.get_vocab():
        end_ids.append(tokenizer.convert_tokens_to_ids("<|im_end|>"))
    options: dict[str, Any] = {"max_new_tokens": settings.max_new_tokens, "do_sample": settings.do_sample,
                               "repetition_penalty": settings.repetition_penalty, "eos_token_id": end_ids,
                               "pad_token_id": tokenizer.pad_token_id}
    if settings.do_sample:
        options.update(temperature=settings.temperature, top_p=settings.top_p, top_k=settings.top_k)
    return options


def generate(model, tokenizer, examples: list[Example], settings, batch_size: int, max_len: int,  # noqa: ANN001
             desc: str) -> list[str]:
    """Batched generation with left padding; returns the decoded replies (new tokens only)."""
    import torch

    prompts = [tokenizer(render_prompt(tokenizer, e), add_special_tokens=False)["input_ids"][-max_len:]
               for e in examples]
    replies: list[str | None] = [None] * len(examples)
    options = generation_options(tokenizer, settings)
    with torch.inference_mode():
        for chunk, ids in _batches(prompts, batch_size, len, desc):
            batch = _pad(tokenizer, [{"input_ids": i} for i in ids], _device(model), side="left")
            out = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **options)
            new = out[:, batch["input_ids"].shape[1]:]
            for index, text in zip(chunk, tokenizer.batch_decode(new, skip_special_tokens=True)):
                replies[index] = text.strip()
    return replies


def _answers(model, tokenizer, task: Task, examples: list[Example], head: str, labels: list[str] | None,  # noqa: ANN001
             recipe, desc: str) -> list[str]:
    """What the model answers: the classifier's label, the best-scoring label, or the generated reply."""
    batch, max_len = recipe.eval.batch_size, recipe.train.max_seq_len
    if head == "classifier":
        return predict_classifier(model, tokenizer, examples, labels, batch, max_len, desc)
    if task.kind == "classification":
        return predict_label_scores(model, tokenizer, examples, labels, batch, max_len, desc,
                                    score=recipe.eval.label_score, calibrate=recipe.eval.calibrate)
    if recipe.eval.do_sample:
        # Sampling seeded with train.seed: `ftkit eval RUN` draws the same replies again.
        import torch

        torch.manual_seed(recipe.train.seed + distributed.rank())
    return generate(model, tokenizer, examples, recipe.eval, batch, max_len, desc)


def answer(model, tokenizer, task: Task, examples: list[Example], head: str, labels: list[str] | None,  # noqa: ANN001
           recipe) -> list[str]:
    """The model's answers to a few examples (the report's hand-written sentences), in eval mode."""
    if not examples:
        return []
    was_training = model.training
    model.eval()
    try:
        return _answers(model, tokenizer, task, examples, head, labels, recipe, "answering")
    finally:
        model.train(was_training)


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
        predictions = _answers(model, tokenizer, task, mine, head, labels, recipe, desc)
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
