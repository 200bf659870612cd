"""What a run leaves behind for people: metrics.json, report.md, plots, and a manifest."""

from __future__ import annotations

import json
import platform
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

SCALARS_FIRST = ("accuracy", "macro_f1", "exact_match", "f1", "bleu", "rougeL", "perplexity")


def write_json(path: Path, data: Any) -> None:
    """``data`` as indented JSON, written whole or not at all (a temporary file renamed into place)."""
    from ftkit.folders import write_text_atomic

    write_text_atomic(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def package_versions() -> dict[str, str | None]:
    found = {}
    for name in ("ftkit", "torch", "transformers", "peft", "bitsandbytes", "accelerate", "datasets", "tokenizers"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    found["python"] = platform.python_version()
    return found


def scalar_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    keys = [k for k in SCALARS_FIRST if k in metrics] + sorted(
        k for k, v in metrics.items() if isinstance(v, (int, float)) and k not in SCALARS_FIRST
    )
    return {k: float(metrics[k]) for k in keys}


MODEL_NAMES = {
    "majority": "majority baseline",
    "zero_shot": "zero-shot base model",
    "random_head": "base model, random classifier head (not a baseline)",
    "finetuned": "fine-tuned",
}


def comparison_rows(baseline: dict | None, finetuned: dict) -> list[tuple[str, str, str, str]]:
    rows = []
    for key, value in scalar_metrics(finetuned).items():
        base = None if baseline is None else scalar_metrics(baseline).get(key)
        delta = "" if base is None else f"{value - base:+.4f}"
        rows.append((key, "-" if base is None else f"{base:.4f}", f"{value:.4f}", delta))
    return rows


def most_confused(confusion: dict, limit: int = 10) -> list[tuple[str, str, int, float]]:
    """The largest off-diagonal cells: (true, predicted, count, share of the true label's examples)."""
    labels, matrix = confusion["labels"], confusion["matrix"]
    cells = [(labels[i], labels[j], count, count / max(sum(row), 1))
             for i, row in enumerate(matrix) for j, count in enumerate(row) if i != j and count]
    return sorted(cells, key=lambda cell: (-cell[2], -cell[3], cell[0], cell[1]))[:limit]


def plot_loss(log_history: list[dict], path: Path, validation: dict | None = None) -> bool:
    """Training loss against step, and the validation metric (right axis, best step marked) when there
    is one (metrics.json's ``validation``); False when nothing was logged."""
    points = [(h["step"], h["loss"]) for h in log_history if "loss" in h]
    if not points:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    lines = ax.plot(*zip(*points), marker="o", markersize=3, label="train loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    if validation and validation.get("history"):
        metric = validation["metric"]
        right = ax.twinx()
        steps = [entry["step"] for entry in validation["history"]]
        lines += right.plot(steps, [entry[metric] for entry in validation["history"]], marker="s", markersize=3,
                            color="tab:orange", label=f"validation {metric}")
        right.set_ylabel(f"validation {metric}")
        if validation.get("best_step") is not None:
            lines.append(ax.axvline(validation["best_step"], color="tab:green", linestyle="--",
                                    label=f"best step ({validation['best_step']})"))
        # Above the plot: inside, the right axis's curve would be drawn over it.
        ax.legend(handles=lines, fontsize=8, loc="lower left", bbox_to_anchor=(0, 1.0), ncol=3, frameon=False)
    else:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


#: Up to this many labels the confusion matrix names them on its axes; beyond, report.md lists the pairs.
TICK_LABELS_UP_TO = 30
#: Up to this many labels each cell also prints its share.
CELL_TEXT_UP_TO = 12
FIGURE_INCHES = (4.0, 11.0)  # one matrix's side, smallest and largest (100 dpi: at most 1100 px)
FIGURE_WIDTH_INCHES = 16.0  # all the matrices side by side, colour bar included


def plot_confusion(panels: list[tuple[str, dict]], path: Path):  # noqa: ANN201 - a matplotlib Figure
    """Confusion matrices side by side (the best baseline, then the fine-tuned model), normalized by
    true label (each row sums to 1), legible up to 100 labels; returns the (closed) figure.

    The figure's size is capped; beyond 30 labels the axes carry no names (report.md lists the most
    confused pairs instead), beyond 12 the cells carry no numbers. Cell numbers are white on dark
    cells. Label names that need a CJK font the machine lacks become numbers, listed in
    ``<path>.labels.txt``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib import font_manager

    labels = panels[0][1]["labels"]
    k, n = len(labels), len(panels)
    side = min(max(FIGURE_INCHES[0], 1.5 + 0.35 * k), FIGURE_INCHES[1], (FIGURE_WIDTH_INCHES - 1.0) / n)
    fig, axes = plt.subplots(1, n, figsize=(side * n + 1.0, side), dpi=100, squeeze=False)
    index = list(range(k))
    tick_labels, font = None, None
    if k <= TICK_LABELS_UP_TO:
        # Label names may be Chinese: use a CJK font when one is installed (else the glyphs are boxes).
        cjk = [f.name for f in font_manager.fontManager.ttflist
               if any(key in f.name for key in ("CJK", "Hei", "Noto Sans SC"))]
        tick_labels = labels if cjk or all(label.isascii() for label in labels) else [str(i) for i in index]
        font = cjk[:1] or None
    for column, (ax, (title, confusion)) in enumerate(zip(axes[0], panels)):
        if confusion["labels"] != labels:
            raise ValueError(f"{title}: its confusion matrix has other labels than {panels[0][0]}'s")
        counts = np.asarray(confusion["matrix"], dtype=float).reshape(k, k)
        shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
        image = ax.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
        if tick_labels is not None:
            size = 9 if k <= 15 else 6
            ax.set_xticks(index, tick_labels, rotation=45 if k <= 15 else 90, ha="right" if k <= 15 else "center",
                          fontsize=size, fontfamily=font)
            ax.set_yticks(index, tick_labels if column == 0 else [""] * k, fontsize=size, fontfamily=font)
        else:
            ax.set_xticks([])
            ax.set_yticks([])
        if k <= CELL_TEXT_UP_TO:
            for i in index:
                for j in index:
                    if counts[i, j]:
                        ax.text(j, i, f"{shares[i, j]:.2f}", ha="center", va="center", fontsize=8,
                                color="white" if shares[i, j] > 0.6 else "black")
        ax.set_xlabel("predicted")
        if column == 0:
            ax.set_ylabel("true")
        ax.set_title(title)
    fig.colorbar(image, ax=list(axes[0]), fraction=0.046 / n, pad=0.02, label="share of the true label's examples")
    fig.suptitle(f"{k} labels, rows normalized")
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    if tick_labels is not None and tick_labels is not labels:
        path.with_suffix(".labels.txt").write_text(
            "\n".join(f"{i}: {label}" for i, label in zip(index, labels)) + "\n", encoding="utf-8"
        )
    return fig


def _interval(ci: list[float] | None) -> str:
    return f"{ci[0]:.4f} – {ci[1]:.4f}" if ci else "-"


def write_report(folder: Path, summary: dict[str, Any], log_history: list[dict]) -> None:
    """report.md: every model with its interval, the verdict, the plots, and the per-class changes."""
    from ftkit.stats import verdict_sentence

    headline = summary["headline_metric"]
    finetuned = summary["finetuned"]["metrics"]
    baselines = summary["baselines"]
    verdict = summary.get("verdict")
    ci95 = summary.get("ci95", {})
    notes = summary.get("notes", [])
    lines = [
        f"# {summary['task']} — {summary['model']} ({summary['method']})",
        "",
        (f"Test split: {summary['test_examples']} examples, disjoint from the {summary['train_examples']} "
         "training examples. Every model is evaluated on the same examples."),
        "",
    ]
    lines += [f"> **Warning:** {warning}" for warning in summary.get("test_warnings", [])]
    if summary.get("test_warnings"):
        lines.append("")
    lines += [f"| model | {headline} | 95% interval |", "|---|---|---|"]
    rows = [(name, baselines.get(name)) for name in ("majority", "zero_shot")]
    rows += [("random_head", summary.get("random_head")), ("finetuned", summary["finetuned"])]
    for name, result in rows:
        if result is None:
            if name == "zero_shot":
                lines.append(f"| {MODEL_NAMES[name]} | skipped (see notes) | - |")
            continue
        label = MODEL_NAMES[name] + (f" (always `{result['label']}`)" if result.get("label") else "")
        value = result["metrics"].get(headline)
        shown = "-" if value is None else f"{value:.4f}"
        if name == "finetuned":
            label, shown = f"**{label}**", f"**{shown}**"
        lines.append(f"| {label} | {shown} | {_interval(ci95.get(name))} |")
    lines += ["", verdict_sentence(verdict, MODEL_NAMES)]
    if summary.get("random_head") is not None:
        lines += ["", ("The random-head row is the base model before training with its newly initialized "
                       "classifier head: near chance by construction, shown for reference, never the comparison.")]
    against = baselines.get(verdict["against"]) if verdict else None
    if against is not None:
        lines += ["", f"### All metrics: fine-tuned against the {MODEL_NAMES[verdict['against']]}", "",
                  "| metric | baseline | fine-tuned | change |", "|---|---|---|---|"]
        for key, base, tuned, delta in comparison_rows(against["metrics"], finetuned):
            marker = " **(headline)**" if key == headline else ""
            lines.append(f"| {key}{marker} | {base} | {tuned} | {delta} |")
    lines += ["", "## Training", ""]
    lines += [f"- {note}" for note in notes]
    lines += [f"- trainable parameters: {summary['trainable_params']:,} of {summary['total_params']:,}",
              f"- optimizer steps: {summary['steps']}, time: {summary['train_seconds']:.1f} s on {summary['device']}"]
    validation = summary.get("validation")
    lines += _validation_lines(validation) if validation else []
    if plot_loss(log_history, folder / "loss.png", validation):
        lines += ["", f"![training loss{' and validation ' + validation['metric'] if validation else ''}](loss.png)"]
    if "confusion_matrix" in finetuned:
        lines += _confusion_section(folder, finetuned, against, verdict)
    lines += _showcase_section(summary)
    lines += ["", f"Reproduce: `ftkit run {summary['recipe_path']}` (resolved recipe: `recipe.toml`).", ""]
    (folder / "report.md").write_text("\n".join(lines), encoding="utf-8")


def _validation_lines(validation: dict) -> list[str]:
    """The Training section's lines on the validation set: how often, the best step, which weights were saved."""
    metric, history, best = validation["metric"], validation["history"], validation["best_step"]
    when = f"every {validation['eval_steps']} steps" if validation["eval_steps"] else "at each epoch's end"
    better = "higher" if validation["higher_is_better"] else "lower"
    lines = [f"- validation: {validation['examples']} examples, {metric} ({better} is better) {when}; "
             + f"{len(history)} evaluations"]
    if best is not None:
        lines.append(f"- best validation {metric}: {validation['best_value']:.4f} at step {best}")
    if validation.get("stopped_early_at"):
        lines.append(f"- stopped early at step {validation['stopped_early_at']} (train.early_stopping_patience)")
    kept = "the best step's" if validation.get("kept") == "best" else "the last step's"
    lines.append(f"- saved weights: {kept} (train.keep)")
    return lines


def _showcase_section(summary: dict) -> list[str]:
    """The recipe's hand-written inputs and what each model answers to them (``eval.showcase``)."""
    texts = summary.get("showcase") or []
    if not texts:
        return []
    columns = [(name, result) for name, result in (("majority", summary["baselines"].get("majority")),
                                                   ("zero_shot", summary["baselines"].get("zero_shot")),
                                                   ("finetuned", summary["finetuned"]))
               if result and len(result.get("showcase") or []) == len(texts)]
    lines = ["", "## Hand-written examples", "",
             "Sentences written for this recipe (`eval.showcase`), outside the data; not scored.", "",
             "| input | " + " | ".join(MODEL_NAMES[name] for name, _ in columns) + " |",
             "|---" * (len(columns) + 1) + "|"]
    cell = lambda text: " ".join(str(text).split()).replace("|", "\\|")  # noqa: E731
    for i, text in enumerate(texts):
        lines.append(f"| {cell(text)} | " + " | ".join(cell(result["showcase"][i]) for _, result in columns) + " |")
    return lines


def _confusion_section(folder: Path, finetuned: dict, against: dict | None, verdict: dict | None) -> list[str]:
    """The normalized matrix, the most confused pairs, and each class's F1 against the best baseline."""
    confusion = finetuned["confusion_matrix"]
    panels = [("fine-tuned", confusion)]
    base_confusion = (against or {}).get("metrics", {}).get("confusion_matrix")
    if base_confusion and verdict and base_confusion["labels"] == confusion["labels"]:
        panels.insert(0, (MODEL_NAMES[verdict["against"]], base_confusion))
    plot_confusion(panels, folder / "confusion_matrix.png")
    shown = " and ".join(title for title, _ in panels)
    lines = ["", f"## Confusion matrix ({shown})", "", "![confusion matrix](confusion_matrix.png)"]
    pairs = most_confused(confusion)
    if pairs:
        lines += ["", "Most confused pairs:", "", "| true | predicted | examples | share of true |", "|---|---|---|---|"]
        lines += [f"| {t} | {p} | {n} | {share:.0%} |" for t, p, n, share in pairs]
    per_class = finetuned.get("per_class", {})
    if not per_class:
        return lines
    base = (against or {}).get("metrics", {}).get("per_class", {})
    name = MODEL_NAMES[verdict["against"]] if base and verdict else None
    lines += ["", "## Per class" + (f" (change in F1 from the {name})" if name else ""), ""]
    if name:
        lines += ["| label | precision | recall | F1 | baseline F1 | change | support |", "|---|---|---|---|---|---|---|"]
    else:
        lines += ["| label | precision | recall | F1 | support |", "|---|---|---|---|---|"]
    for label, row in per_class.items():
        cells = f"| {label} | {row['precision']:.3f} | {row['recall']:.3f} | {row['f1']:.3f} "
        if name:
            before = base.get(label, {}).get("f1")
            cells += ("| - | - " if before is None else f"| {before:.3f} | {row['f1'] - before:+.3f} ")
        lines.append(cells + f"| {row['support']} |")
    return lines


def manifest(summary: dict[str, Any], data_hashes: dict[str, str], *, recipe: dict[str, Any] | None = None,
             model_revision: dict[str, str] | None = None) -> dict[str, Any]:
    """What a run was made from: versions, seed, data hashes, the model's revision and the recipe as run.

    ``made_by`` marks the folder as ftkit's: ``--overwrite`` replaces no other (ftkit.folders).
    ``recipe`` is the resolved recipe with ``--set`` values and ``--auto-fit`` changes, as in recipe.toml.
    """
    return {
        "made_by": "ftkit",
        "versions": package_versions(),
        "platform": platform.platform(),
        "argv": sys.argv,
        "seed": summary["seed"],
        "data_sha256": data_hashes,
        "model": summary["model"],
        "model_path": summary["model_path"],
        "model_revision": model_revision,
        "method": summary["method"],
        "device": summary["device"],
        "recipe": recipe,
    }
