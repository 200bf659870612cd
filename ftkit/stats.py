"""How sure are we? Bootstrap intervals, a paired test against the best baseline, honest samples.

Every metric ftkit reports as a headline is a sum over examples of per-example statistics, put
through a small formula: accuracy is the mean of "correct", macro-F1 comes from per-label counts
of true positives, predictions and references, BLEU from n-gram match counts. So a bootstrap
resample is a vector of example counts (a multinomial draw), and one matrix product gives the
statistics of all resamples at once. Both models of a paired test are resampled with the same
counts. A metric this module has no statistics for falls back to the task's own metrics function,
called once per resample.

- :func:`compare`: the 95% interval of every model and the verdict (``better``, ``no significant
  difference`` or ``worse``) of the fine-tuned model against the best baseline: McNemar's exact
  test when the headline metric is accuracy, a paired bootstrap otherwise.
- :func:`representative_sample`: at most N test examples, stratified by label and seeded.
- :func:`label_coverage`: what a test split says too little about (missing or rare labels).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    import numpy as np

T = TypeVar("T")

RESAMPLES = 1000
SIGNIFICANCE = 0.05
MIN_EXAMPLES = 20  # below this a p-value says more about the split than about the models
RARE_LABEL = 5  # fewer test examples of a label than this: its per-class numbers are noise
LOWER_IS_BETTER = frozenset({"perplexity"})

Values = Callable[["np.ndarray"], "np.ndarray"]
"""``values(weights)``: (resamples × examples) example counts -> each resample's metric value."""

MetricsFn = Callable[[Sequence[str], Sequence[Sequence[str]]], dict]


# -- per-example statistics ------------------------------------------------------------------------

def _first(reference: Sequence[str] | str) -> str:
    return reference if isinstance(reference, str) else reference[0]


def _from_sums(stats: np.ndarray, reduce: Callable[[np.ndarray], np.ndarray]) -> Values:
    return lambda weights: reduce(weights @ stats)


def _accuracy(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> Values:
    import numpy as np

    correct = np.array([[p == _first(r)] for p, r in zip(predictions, references)], dtype=float)
    return _from_sums(correct, lambda sums: sums[:, 0] / max(len(correct), 1))


def _macro_f1(predictions: Sequence[str], references: Sequence[Sequence[str]], labels: Sequence[str]) -> Values:
    """Per-label F1 = 2·TP / (predicted + actual), averaged over the whole label set (absent labels score 0)."""
    import numpy as np

    index = {label: i for i, label in enumerate(labels)}
    k = len(labels)
    stats = np.zeros((len(predictions), 3 * k))
    for row, (p, r) in enumerate(zip(predictions, references)):
        r = _first(r)
        if p in index:
            stats[row, k + index[p]] = 1
        if r in index:
            stats[row, 2 * k + index[r]] = 1
            if p == r:
                stats[row, index[r]] = 1

    def reduce(sums: np.ndarray) -> np.ndarray:
        tp, predicted, actual = sums[:, :k], sums[:, k:2 * k], sums[:, 2 * k:]
        both = predicted + actual
        f1 = np.divide(2 * tp, both, out=np.zeros_like(tp), where=both > 0)
        return f1.mean(axis=1)

    return _from_sums(stats, reduce)


def _mean_of(scores: Sequence[float]) -> Values:
    import numpy as np

    column = np.asarray(scores, dtype=float).reshape(-1, 1)
    return _from_sums(column, lambda sums: sums[:, 0] / max(len(column), 1))


def _bleu(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> Values:
    """Corpus BLEU from sacrebleu's per-sentence n-gram statistics (the same settings as generation_metrics)."""
    import numpy as np
    from sacrebleu.metrics import BLEU

    from ftkit.metrics import bleu_streams

    bleu = BLEU(tokenize="zh")
    stats = np.asarray(bleu._extract_corpus_statistics(list(predictions), bleu_streams(references)), dtype=float)

    def reduce(sums: np.ndarray) -> np.ndarray:
        return np.array([bleu._compute_score_from_stats([round(v) for v in row]).score for row in sums])

    return _from_sums(stats, reduce)


def _task_metric(metric: str, metrics_fn: MetricsFn, predictions: Sequence[str],
                 references: Sequence[Sequence[str]]) -> Values:
    """The slow path: the task's metrics on each resample, for a metric with no statistics here."""
    import numpy as np

    def values(weights: np.ndarray) -> np.ndarray:
        out = []
        for counts in weights.astype(int):
            picked = np.repeat(np.arange(len(counts)), counts)
            out.append(float(metrics_fn([predictions[i] for i in picked], [references[i] for i in picked])[metric]))
        return np.array(out)

    return values


def metric_values(metric: str, predictions: Sequence[str], references: Sequence[Sequence[str]],
                  labels: Sequence[str] | None = None, metrics_fn: MetricsFn | None = None) -> Values:
    """The function giving ``metric`` on resampled test sets of these predictions.

    :param metric: a metrics key: accuracy, macro_f1, exact_match, f1, rougeL, bleu, or any other key
        of ``metrics_fn``'s result (resampled through ``metrics_fn``, slowly).
    :param labels: the run's label set, for macro-F1 (default: every label seen).
    :param metrics_fn: the task's metrics, for metrics not known here.
    """
    from ftkit import metrics

    if metric == "accuracy":
        return _accuracy(predictions, references)
    if metric == "macro_f1":
        seen = [*map(_first, references), *predictions]
        return _macro_f1(predictions, references, list(labels) if labels else list(dict.fromkeys(seen)))
    if metric in ("exact_match", "f1"):
        exact, f1 = metrics.squad_scores(predictions, references)
        return _mean_of(exact if metric == "exact_match" else f1)
    if metric == "rougeL":
        return _mean_of(metrics.rouge_l_scores(predictions, references))
    if metric == "bleu":
        return _bleu(predictions, references)
    if metrics_fn is None:
        raise ValueError(f"no per-example statistics for metric {metric!r}; pass the task's metrics_fn")
    return _task_metric(metric, metrics_fn, predictions, references)


# -- resampling and tests --------------------------------------------------------------------------

def resample_weights(n: int, resamples: int = RESAMPLES, seed: int = 0) -> np.ndarray:
    """(resamples × n) counts: how often each example is drawn into each bootstrap resample."""
    import numpy as np

    rng = np.random.default_rng(seed)
    return rng.multinomial(n, np.full(n, 1.0 / n), size=resamples).astype(float)


def bootstrap_interval(values: Values, n: int, resamples: int = RESAMPLES, seed: int = 0,
                       level: float = 0.95) -> tuple[float, float]:
    """The percentile bootstrap interval of a metric over ``n`` examples (seeded: same seed, same interval)."""
    import numpy as np

    draws = values(resample_weights(n, resamples, seed))
    tail = (1 - level) / 2
    low, high = np.quantile(draws, [tail, 1 - tail])
    return float(low), float(high)


def mcnemar_exact(correct_a: Sequence[bool], correct_b: Sequence[bool]) -> tuple[float, int, int]:
    """McNemar's exact test on paired right/wrong answers: (two-sided p, only-A-right, only-B-right).

    Under "no difference" each discordant example is as likely to favour A as B, so the number
    favouring A is Binomial(discordant, 1/2).
    """
    from scipy.stats import binomtest

    only_a = sum(1 for a, b in zip(correct_a, correct_b) if a and not b)
    only_b = sum(1 for a, b in zip(correct_a, correct_b) if b and not a)
    if only_a + only_b == 0:
        return 1.0, 0, 0
    return float(binomtest(only_a, only_a + only_b, 0.5).pvalue), only_a, only_b


def paired_bootstrap(values_a: Values, values_b: Values, n: int, resamples: int = RESAMPLES,
                     seed: int = 0) -> float:
    """Two-sided p-value that A and B score the same, from the same resamples of both.

    p = 2 · (share of resamples where the difference A - B falls on the other side of zero), with
    one added to numerator and denominator so a finite number of resamples never claims p = 0.
    """
    import numpy as np

    weights = resample_weights(n, resamples, seed)
    delta = values_a(weights) - values_b(weights)
    other_side = min(int(np.sum(delta <= 0)), int(np.sum(delta >= 0)))
    return float(min(1.0, 2 * (other_side + 1) / (resamples + 1)))


def majority_label(train_targets: Sequence[str], labels: Sequence[str]) -> str:
    """The most frequent training label (ties: the first in the label set)."""
    counts = Counter(train_targets)
    return max(labels, key=lambda label: (counts[label], -list(labels).index(label)))


def compare(headline: str, predictions: dict[str, list[str] | None], references: Sequence[Sequence[str]], *,
            baselines: Sequence[str], labels: Sequence[str] | None = None, metrics_fn: MetricsFn | None = None,
            scores: dict[str, float] | None = None, finetuned: str = "finetuned", resamples: int = RESAMPLES,
            seed: int = 0) -> dict[str, Any]:
    """The 95% interval of every model's ``headline`` and the fine-tuned model's verdict.

    :param predictions: model name -> its predictions on the test split (None: the model did not run).
    :param baselines: the names in ``predictions`` the fine-tuned model may be compared with; the
        best of them (by ``scores``) is the comparison.
    :param scores: model name -> its headline value (computed here when missing).
    :returns: ``{"ci95": {model: [low, high] | None}, "verdict": {...} | None}``; the verdict holds
        ``against``, ``test``, ``p_value`` (None below 20 examples), ``result`` (``better``, ``no
        significant difference``, ``worse`` or ``too few examples``), ``delta`` and ``examples``.
    """
    n = len(references)
    ran = {name: p for name, p in predictions.items() if p is not None}
    values = {name: metric_values(headline, p, references, labels, metrics_fn) for name, p in ran.items()}
    point = {name: float(v(_ones(n))[0]) for name, v in values.items()} | (scores or {})
    ci95 = {name: (list(bootstrap_interval(v, n, resamples, seed)) if n else None) for name, v in values.items()}
    candidates = [name for name in baselines if name in ran]
    if finetuned not in ran or not candidates:
        return {"ci95": ci95, "verdict": None}
    lower = headline in LOWER_IS_BETTER
    best = (min if lower else max)(candidates, key=lambda name: point[name])
    delta = point[finetuned] - point[best]
    verdict: dict[str, Any] = {"against": best, "metric": headline, "examples": n, "delta": delta}
    if n < MIN_EXAMPLES:
        return {"ci95": ci95, "verdict": verdict | {
            "test": None, "p_value": None, "result": "too few examples",
            "reason": f"the test split has {n} examples; a verdict needs at least {MIN_EXAMPLES}"}}
    if headline == "accuracy":
        refs = [_first(r) for r in references]
        p_value, only_tuned, only_base = mcnemar_exact([p == r for p, r in zip(ran[finetuned], refs)],
                                                       [p == r for p, r in zip(ran[best], refs)])
        verdict |= {"test": "McNemar exact", "p_value": p_value, "discordant": [only_tuned, only_base]}
        ahead = only_tuned > only_base
    else:
        p_value = paired_bootstrap(values[finetuned], values[best], n, resamples, seed)
        verdict |= {"test": f"paired bootstrap ({resamples} resamples)", "p_value": p_value}
        ahead = delta < 0 if lower else delta > 0
    if p_value >= SIGNIFICANCE:
        verdict["result"] = "no significant difference"
    else:
        verdict["result"] = "better" if ahead else "worse"
    return {"ci95": ci95, "verdict": verdict}


def _ones(n: int) -> np.ndarray:
    import numpy as np

    return np.ones((1, n))


def verdict_sentence(verdict: dict[str, Any] | None, names: dict[str, str] | None = None) -> str:
    """One sentence for people: what the fine-tuned model is against the best baseline, and how sure."""
    if verdict is None:
        return "No baseline ran, so there is no verdict."
    against = (names or {}).get(verdict["against"], verdict["against"])
    metric = verdict["metric"]
    if verdict["p_value"] is None:
        return f"No verdict against the {against} on `{metric}`: {verdict['reason']}."
    how = {"better": "**better than**", "worse": "**worse than**",
           "no significant difference": "**not significantly different from**"}[verdict["result"]]
    return (f"The fine-tuned model is {how} the {against} on `{metric}` ({verdict['delta']:+.4f}; "
            f"{verdict['test']}, p = {verdict['p_value']:.3g}, n = {verdict['examples']}).")


# -- what the test split can show ------------------------------------------------------------------

def representative_sample(items: Sequence[T], n: int, seed: int, key: Callable[[T], str] | None = None) -> list[T]:
    """At most ``n`` of ``items``, in their original order: stratified by ``key`` when given, seeded.

    Each label gets its share of ``n`` in proportion to its count (largest remainders), and at least
    one example when ``n`` allows it, so a file sorted by label is sampled like a shuffled one.
    """
    import random

    if n <= 0 or n >= len(items):
        return list(items)
    rng = random.Random(seed)
    if key is None:
        return [items[i] for i in sorted(rng.sample(range(len(items)), n))]
    groups: dict[str, list[int]] = {}
    for index, item in enumerate(items):
        groups.setdefault(key(item), []).append(index)
    for members in groups.values():
        rng.shuffle(members)
    names = sorted(groups, key=lambda label: (-len(groups[label]), label))
    if n < len(names):  # too few to cover every label: one each from the most frequent
        return [items[i] for i in sorted(groups[label][0] for label in names[:n])]
    # Largest remainders: each label's share of n, rounded so the shares sum to n exactly.
    quota = {label: n * len(groups[label]) / len(items) for label in names}
    take = {label: int(quota[label]) for label in names}
    for label in sorted(names, key=lambda label: int(quota[label]) - quota[label])[:n - sum(take.values())]:
        take[label] += 1
    # A label too rare for its share still gets one example, taken from the largest share.
    for label in names:
        if take[label] == 0:
            take[max(names, key=lambda other: take[other])] -= 1
            take[label] = 1
    return [items[i] for i in sorted(i for label in names for i in groups[label][:take[label]])]


def label_coverage(targets: Sequence[str], labels: Sequence[str], minimum: int = RARE_LABEL) -> list[str]:
    """Warnings about a test split: labels it lacks, and labels with fewer than ``minimum`` examples."""
    counts = Counter(targets)
    missing = [label for label in labels if counts[label] == 0]
    rare = [f"{label} ({counts[label]})" for label in labels if 0 < counts[label] < minimum]
    warnings = []
    if missing:
        warnings.append(f"the test split has no examples of {len(missing)} of {len(labels)} labels: "
                        f"{', '.join(missing)}; nothing is measured for them")
    if rare:
        warnings.append(f"the test split has fewer than {minimum} examples of {len(rare)} labels: "
                        f"{', '.join(rare)}; their per-class numbers are noise")
    return warnings
