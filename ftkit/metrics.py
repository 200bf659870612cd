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

    ``labels`` fixes the order of the per-class rows and the matrix; by default the labels seen in
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
    # labels present in the references (what ``average="macro"`` computes), and accuracy and the
    # confusion matrix are counts.
    precision, recall, f1, support = precision_recall_fscore_support(
        refs, preds, labels=labels, zero_division=0
    )
    present = set(refs)
    scored = [f for label, f in zip(labels, f1) if label in present] or list(f1)
    pairs = Counter(zip(refs, preds))
    return {
        "accuracy": sum(r == p for r, p in zip(refs, preds)) / len(refs) if refs else 0.0,
        "macro_f1": float(sum(scored) / len(scored)) if scored else 0.0,
        "per_class": {
            label: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
            for label, p, r, f, s in zip(labels, precision, recall, f1, support)
        },
        "confusion_matrix": {"labels": labels, "matrix": [[pairs[(t, p)] for p in labels] for t in labels]},
    }


def generation_metrics(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict:
    """Corpus BLEU (sacrebleu, ``zh`` tokenization: handles Chinese and Latin), corpus chrF and ROUGE-L F1.

    chrF scores character n-grams, so it needs no word segmentation and gives partial credit for a
    reply that is close but not word-for-word (BLEU is near zero on short replies).
    """
    import sacrebleu
    from rouge_score import rouge_scorer

    refs = [[r] if isinstance(r, str) else list(r) for r in references]
    depth = max(len(r) for r in refs) if refs else 1
    # sacrebleu wants one stream per reference position; pad missing ones with the first.
    streams = [[r[i] if i < len(r) else r[0] for r in refs] for i in range(depth)]
    bleu = sacrebleu.corpus_bleu(list(predictions), streams, tokenize="zh")
    chrf = sacrebleu.corpus_chrf(list(predictions), streams)
    scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=_CjkTokenizer())
    rouge = [
        max(scorer.score(ref, pred)["rougeL"].fmeasure for ref in ref_list)
        for pred, ref_list in zip(predictions, refs)
    ]
    return {"bleu": float(bleu.score), "chrf": float(chrf.score), "rougeL": 100.0 * sum(rouge) / max(len(rouge), 1)}


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
