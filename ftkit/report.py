"""What a run leaves behind for people: metrics.json, report.md, plots, and a manifest."""

from __future__ import annotations

import json
import platform
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

SCALARS_FIRST = ("accuracy", "macro_f1", "exact_match", "f1", "bleu", "rougeL", "perplexity")
LOWER_IS_BETTER = {"perplexity"}


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


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


def comparison_rows(baseline: dict | None, finetuned: dict) -> list[tuple[str, str, str, str]]:
    rows = []
    for key, value in scalar_metrics(finetuned).items():
        base = None if baseline is None else scalar_metrics(baseline).get(key)
        delta = "" if base is None else f"{value - base:+.4f}"
        rows.append((key, "-" if base is None else f"{base:.4f}", f"{value:.4f}", delta))
    return rows


def plot_loss(log_history: list[dict], path: Path) -> bool:
    """Training (and evaluation) loss against step; False when nothing was logged."""
    points = [(h["step"], h["loss"]) for h in log_history if "loss" in h]
    if not points:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(*zip(*points), marker="o", markersize=3, label="train loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def plot_confusion(confusion: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import font_manager

    labels, matrix = confusion["labels"], confusion["matrix"]
    # Label names may be Chinese: use a CJK font when one is installed (else the glyphs are boxes).
    cjk = [f.name for f in font_manager.fontManager.ttflist if any(k in f.name for k in ("CJK", "Hei", "Noto Sans SC"))]
    index = list(range(len(labels)))
    tick_labels = labels if cjk or all(label.isascii() for label in labels) else [str(i) for i in index]
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * len(labels), 0.8 + 0.6 * len(labels)), dpi=100)
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(index, tick_labels, rotation=45, ha="right", fontfamily=cjk[:1] or None)
    ax.set_yticks(index, tick_labels, fontfamily=cjk[:1] or None)
    for i in index:
        for j in index:
            ax.text(j, i, matrix[i][j], ha="center", va="center", fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    if tick_labels is not labels:
        path.with_suffix(".labels.txt").write_text(
            "\n".join(f"{i}: {label}" for i, label in zip(index, labels)) + "\n", encoding="utf-8"
        )


def write_report(folder: Path, summary: dict[str, Any], log_history: list[dict]) -> None:
    """report.md with the comparison table, and the plots it links to."""
    baseline = summary["baseline"]["metrics"] if summary.get("baseline") else None
    finetuned = summary["finetuned"]["metrics"]
    headline = summary["headline_metric"]
    lines = [
        f"# {summary['task']} — {summary['model']} ({summary['method']})",
        "",
        f"Test split: {summary['test_examples']} examples, disjoint from the {summary['train_examples']} "
        "training examples. Same split for both models.",
        "",
        "| metric | base model | fine-tuned | change |",
        "|---|---|---|---|",
    ]
    for key, base, tuned, delta in comparison_rows(baseline, finetuned):
        marker = " **(headline)**" if key == headline else ""
        lines.append(f"| {key}{marker} | {base} | {tuned} | {delta} |")
    if baseline is not None and headline in finetuned and headline in baseline:
        better = finetuned[headline] < baseline[headline] if headline in LOWER_IS_BETTER \
            else finetuned[headline] > baseline[headline]
        verdict = "better than" if better else "NOT better than"
        lines += ["", f"The fine-tuned model is **{verdict}** the base model on `{headline}`."]
    lines += ["", "## Training", ""]
    lines += [f"- {note}" for note in summary.get("notes", [])]
    lines += [f"- trainable parameters: {summary['trainable_params']:,} of {summary['total_params']:,}",
              f"- optimizer steps: {summary['steps']}, time: {summary['train_seconds']:.1f} s on {summary['device']}"]
    if plot_loss(log_history, folder / "loss.png"):
        lines += ["", "![training loss](loss.png)"]
    if "confusion_matrix" in finetuned:
        plot_confusion(finetuned["confusion_matrix"], folder / "confusion_matrix.png", "fine-tuned")
        lines += ["", "## Confusion matrix (fine-tuned)", "", "![confusion matrix](confusion_matrix.png)"]
        per_class = finetuned.get("per_class", {})
        if per_class:
            lines += ["", "| label | precision | recall | F1 | support |", "|---|---|---|---|---|"]
            for label, row in per_class.items():
                lines.append(f"| {label} | {row['precision']:.3f} | {row['recall']:.3f} | {row['f1']:.3f} "
                             f"| {row['support']} |")
    lines += ["", f"Reproduce: `ftkit run {summary['recipe_path']}` (resolved recipe: `recipe.toml`).", ""]
    (folder / "report.md").write_text("\n".join(lines), encoding="utf-8")


def manifest(summary: dict[str, Any], data_hashes: dict[str, str]) -> dict[str, Any]:
    return {
        "versions": package_versions(),
        "platform": platform.platform(),
        "argv": sys.argv,
        "seed": summary["seed"],
        "data_sha256": data_hashes,
        "model": summary["model"],
        "model_path": summary["model_path"],
        "method": summary["method"],
        "device": summary["device"],
    }
