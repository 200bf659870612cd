"""Metrics that work offline, on well-kept libraries.

``evaluate.load("accuracy")`` needs the hub, so ftkit uses the libraries the hub modules wrap:
scikit-learn (classification), sacrebleu (BLEU, chrF), rouge-score (ROUGE-L) and torchmetrics
(the official SQuAD v1.1 exact match / F1). Imports happen inside the functions.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

# rouge-score's default tokenizer drops every non-ASCII character, which would score all Chinese
# text as empty; ROUGE on Chinese is conventionally computed over characters.
_TOKEN = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]|[^\W_]+", re.UNICODE)


class _CjkTokenizer:
    """One token per CJK character, one per run of other letters/digits (lower-cased)."""

    def tokenize(self, text: str) -> list[str]:
        return _TOKEN.findall(text.lower())


def classification_metrics(
    predictions: Sequence[str], references: Sequence[Sequence[str]] | Sequence[str], labels: Sequence[str] | None = None
) -> dict:
    """Accuracy, macro-F1, per-class precision/recall/F1 and the confusion matrix.

    ``labels`` is the task's whole label set: it fixes the order of the per-class rows and the
    matrix, and macro-F1 averages over all of it, so a label the test split lacks, or that no model
    predicts, counts (F1 0) instead of vanishing from the mean. By default: the labels seen in
    references then predictions. A prediction outside ``labels`` counts as wrong.
    """
    from collections import Counter

    from sklearn.metrics import precision_recall_fscore_support

    refs = [r if isinstance(r, str) else r[0] for r in references]
    preds = list(predictions)
    if labels is None:
        labels = list(dict.fromkeys([*refs, *preds]))
    labels = list(labels)
    # One scikit-learn call: its input validation costs a few ms per call, a fifth of the whole
    # evaluation of a small test split. Macro-F1 is the plain mean of the per-class F1 over the
    # label set (what ``average="macro", labels=labels`` computes), and accuracy and the confusion
    # matrix are counts.
    precision, recall, f1, support = precision_recall_fscore_support(
        refs, preds, labels=labels, zero_division=0
    )
    pairs = Counter(zip(refs, preds))
    return {
        "accuracy": sum(r == p for r, p in zip(refs, preds)) / len(refs) if refs else 0.0,
        "macro_f1": float(sum(f1) / len(f1)) if len(f1) else 0.0,
        "per_class": {
            label: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
            for label, p, r, f, s in zip(labels, precision, recall, f1, support)
        },
        "confusion_matrix": {"labels": labels, "matrix": [[pairs[(t, p)] for p in labels] for t in labels]},
    }


def task_metrics(task, predictions: Sequence[str], references: Sequence[Sequence[str]],  # noqa: ANN001 - a Task
                 labels: Sequence[str] | None = None) -> dict:
    """The task's metrics; a classification task whose metrics take ``labels`` gets the run's label set.

    A recipe may override a task's labels, so only the run knows the whole set; plugins written
    before this keyword existed are called as before.
    """
    import inspect

    if labels and task.kind == "classification":
        try:
            accepts = "labels" in inspect.signature(task.metrics).parameters
        except (TypeError, ValueError):  # a builtin or C callable: no signature to read
            accepts = False
        if accepts:
            return task.metrics(predictions, references, labels=list(labels))
    return task.metrics(predictions, references)


def generation_metrics(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict:
    """Corpus BLEU (sacrebleu, ``zh`` tokenization: handles Chinese and Latin), corpus chrF and ROUGE-L F1.

    chrF scores character n-grams, so it needs no word segmentation and gives partial credit for a
    reply that is close but not word-for-word (BLEU is near zero on short replies).
    """
    import sacrebleu

    streams = bleu_streams(references)
    bleu = sacrebleu.corpus_bleu(list(predictions), streams, tokenize="zh")
    chrf = sacrebleu.corpus_chrf(list(predictions), streams)
    rouge = rouge_l_scores(predictions, references)
    return {"bleu": float(bleu.score), "chrf": float(chrf.score), "rougeL": sum(rouge) / max(len(rouge), 1)}


def bleu_streams(references: Sequence[Sequence[str]]) -> list[list[str]]:
    """sacrebleu's layout: one stream per reference position, missing ones padded with the first."""
    refs = [[r] if isinstance(r, str) else list(r) for r in references]
    depth = max(len(r) for r in refs) if refs else 1
    return [[r[i] if i < len(r) else r[0] for r in refs] for i in range(depth)]


def rouge_l_scores(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> list[float]:
    """Per-example ROUGE-L F1 (0–100) against the best-matching reference; their mean is ``rougeL``."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=_CjkTokenizer())
    return [100.0 * max(scorer.score(ref, pred)["rougeL"].fmeasure for ref in ([r] if isinstance(r, str) else r))
            for pred, r in zip(predictions, references)]


def squad_metrics(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict:
    """SQuAD v1.1 exact match and F1 (0–100), each prediction scored against all gold answers."""
    from torchmetrics.functional.text import squad

    preds = [{"prediction_text": p, "id": str(i)} for i, p in enumerate(predictions)]
    targets = [
        {"answers": {"text": list(r) if not isinstance(r, str) else [r], "answer_start": [0] * len(r)}, "id": str(i)}
        for i, r in enumerate(references)
    ]
    scores = squad(preds, targets)
    return {"exact_match": float(scores["exact_match"]), "f1": float(scores["f1"])}


def squad_scores(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> tuple[list[float], list[float]]:
    """Per-example SQuAD v1.1 exact match and F1 (0–100, best over the gold answers).

    The official script's normalization (lower case, no punctuation, no articles), as torchmetrics
    implements it; their means are :func:`squad_metrics`' numbers, which the bootstrap resamples.
    """
    import string
    from collections import Counter

    punctuation = set(string.punctuation)

    def normalize(text: str) -> str:
        text = "".join(ch for ch in text.lower() if ch not in punctuation)
        return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())

    def f1(prediction: str, truth: str) -> float:
        pred_tokens = normalize(prediction).split() if prediction else []
        true_tokens = normalize(truth).split() if truth else []
        if not pred_tokens or not true_tokens:
            return float(pred_tokens == true_tokens)
        same = sum((Counter(pred_tokens) & Counter(true_tokens)).values())
        if same == 0:
            return 0.0
        precision, recall = same / len(pred_tokens), same / len(true_tokens)
        return 2 * precision * recall / (precision + recall)

    exact, overlap = [], []
    for prediction, refs in zip(predictions, references):
        golds = [refs] if isinstance(refs, str) else list(refs)
        exact.append(100.0 * max(float(normalize(prediction) == normalize(g)) for g in golds))
        overlap.append(100.0 * max(f1(prediction, g) for g in golds))
    return exact, overlap
