"""Loading a large CSV: ftkit's load, map, check and split vs ``datasets.load_dataset("csv")`` alone.

    $ python bench/data_loading.py [--rows 200000] [--repeats 3]

A seeded generator writes a CSV in BANKING77's published layout (``text,category``, 77 intents,
English customer messages of varying length built from templates and word lists; nothing comes
from the real dataset) plus a few rows of a label the mapping drops. Each variant then runs in a
fresh process with its own empty ``HF_DATASETS_CACHE``, so nothing is reused between runs:

- bare: ``datasets.load_dataset("csv", data_files=..., split="train")``;
- ftkit: ``load_task_data`` with ``columns = {text = "text", label = "category"}`` and
  ``drop_labels`` (read through datasets, map, check, labels from the data), then
  ``split_indices`` and the two ``take``\\ s: what ``ftkit run --dry-run`` and ``ftkit data split``
  do before writing anything.

Only the work is timed: the interpreter start and the imports are not (the import time is shown
on its own; ftkit's includes ftkit, its task registry and scikit-learn's model_selection on top of
datasets). Peak RSS is ``ru_maxrss`` at the end; growth is that minus the peak right after the
imports, i.e. what the data cost. Medians over the repeats, variants interleaved.
Goals (reported, not asserted): ftkit's time <= 1.5x the bare load, RSS growth <= 2x the file size.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from train_throughput import OtherLoad  # a sibling script, as bench/label_scoring.py does

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

GOALS = {"time_ratio": 1.5, "growth_per_file": 2.0}
DROPPED_LABEL = "not_banking"
DROPPED_ROWS = 40
TEST_SIZE = 0.2
SEED = 0

# -- a BANKING77-layout CSV, generated ------------------------------------------------------------

# 11 things a customer asks about x 7 kinds of problem = 77 intents, named topic_problem.
TOPICS = {
    "card": ["my card", "the card", "my debit card", "my new card"],
    "virtual_card": ["my virtual card", "the virtual card", "the disposable card"],
    "transfer": ["my transfer", "the bank transfer", "the payment I sent", "a transfer to my landlord"],
    "top_up": ["my top-up", "the top up", "topping up by card", "the money I added"],
    "cash": ["the cash withdrawal", "taking out cash", "the ATM withdrawal"],
    "card_payment": ["a card payment", "the payment at the shop", "my online purchase"],
    "direct_debit": ["the direct debit", "a standing order", "my monthly direct debit"],
    "exchange": ["the exchange rate", "exchanging currency", "converting euros", "the currency exchange"],
    "refund": ["my refund", "the refund from the merchant", "money I should get back"],
    "account": ["my account", "the joint account", "my savings account"],
    "pin": ["my PIN", "the PIN code", "the PIN for my card"],
}
PROBLEMS = {
    "not_working": ["{thing} isn't working", "{thing} does not work at all", "something is wrong with {thing}",
                    "I can't get {thing} to work"],
    "pending": ["{thing} is still pending", "{thing} has been pending for days", "why is {thing} not showing yet",
                "{thing} hasn't gone through"],
    "fee": ["I was charged a fee for {thing}", "why is there a charge on {thing}", "what does {thing} cost",
            "is there a fee for {thing}"],
    "cancel": ["I want to cancel {thing}", "please stop {thing}", "can I undo {thing}", "how do I cancel {thing}"],
    "limit": ["is there a limit on {thing}", "what's the maximum for {thing}", "I hit a limit with {thing}",
              "can you raise the limit on {thing}"],
    "how_to": ["how do I set up {thing}", "where can I find {thing} in the app", "can you explain {thing} to me",
               "what do I need for {thing}"],
    "declined": ["{thing} was declined", "{thing} got rejected", "why was {thing} refused",
                 "{thing} failed again"],
}
OPENERS = ["", "", "", "Hi, ", "Hello, ", "Hey, ", "Good morning. ", "Excuse me, ", "Hi there! ", "Quick question: "]
DETAILS = ["I tried it twice yesterday.", "This is the third time this week.", "I'm abroad right now.",
           "It happened on {day}.", "The amount was {amount}.", "I need the money for rent.",
           "The app just shows an error.", "My friend had the same problem.", "I already restarted my phone.",
           "It worked fine last month.", "I'm really worried about this.", "I have been waiting since {day}."]
CLOSERS = ["", "", "Thanks.", "Thank you!", "Please help.", "Can you sort this out asap?", "Cheers",
           "What should I do?", "Any ideas?"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday", "the 3rd", "the 21st"]
OFF_TOPIC = ["what's the weather like tomorrow", "tell me a joke", "who won the match last night",
             "can you recommend a good pizza place"]


def intents() -> list[tuple[str, str]]:
    """(topic, problem) for each of the 77 intents; the label is ``topic_problem``."""
    return [(topic, problem) for topic in TOPICS for problem in PROBLEMS]


def message(rng: random.Random, topic: str, problem: str) -> str:
    body = rng.choice(PROBLEMS[problem]).format(thing=rng.choice(TOPICS[topic]))
    opener = rng.choice(OPENERS)
    if not opener.endswith(", ") and rng.random() < 0.75:  # some people never use capitals
        body = body[0].upper() + body[1:]
    text = opener + body + ("?" if body.lower().startswith(("how", "why", "what", "where", "can", "is")) else ".")
    for detail in rng.sample(DETAILS, rng.choice((0, 0, 0, 1, 1, 2, 3))):
        text += " " + detail.format(day=rng.choice(DAYS), amount=f"£{rng.randint(2, 900)}.{rng.randint(0, 99):02d}")
    closer = rng.choice(CLOSERS)
    return f"{text} {closer}" if closer else text


def write_csv(path: Path, rows: int, seed: int = SEED) -> None:
    """``rows`` intent rows over 77 intents, then ``DROPPED_ROWS`` off-topic rows spread among them."""
    rng = random.Random(seed)
    names = intents()
    weights = [rng.uniform(0.5, 1.5) for _ in names]  # BANKING77's classes are not balanced either
    labels = rng.choices(range(len(names)), weights=weights, k=rows)
    off_topic = set(rng.sample(range(rows), DROPPED_ROWS))
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "category"])
        for index, label in enumerate(labels):
            topic, problem = names[label]
            writer.writerow([message(rng, topic, problem), f"{topic}_{problem}"])
            if index in off_topic:
                writer.writerow([rng.choice(OFF_TOPIC).capitalize() + "?", DROPPED_LABEL])


# -- one measurement, in a fresh process -------------------------------------------------------------

def worker(variant: str, path: str) -> None:
    """Import, then do the variant's work once; print one JSON line."""
    start = time.perf_counter()
    import datasets

    datasets.disable_progress_bars()
    if variant == "ftkit":
        import sklearn.model_selection  # noqa: F401 - split_indices imports it: an import, not work

        from ftkit.plugins import get_task, registered_tasks
        from ftkit.sources import DataMapping, load_task_data
        from ftkit.splitting import split_indices

        task = get_task("classify" if "classify" in registered_tasks() else "bank-intent")
        mapping = DataMapping(columns={"text": "text", "label": "category"}, drop_labels=(DROPPED_LABEL,))
    imported = time.perf_counter()
    rss_after_import = _peak_rss_mb()

    extra: dict = {}
    if variant == "bare":
        dataset = datasets.load_dataset("csv", data_files=path, split="train")
        rows = dataset.num_rows
    else:
        data = load_task_data(task, path, mapping)
        extra["load_s"] = time.perf_counter() - imported
        train_rows, test_rows = split_indices(data, TEST_SIZE, SEED, stratify=True)
        rows = len(train_rows) + len(test_rows)
        assert data.dropped.get("label in task.drop_labels") == DROPPED_ROWS, data.dropped
        extra["task"] = task.name
    done = time.perf_counter()
    result = {"variant": variant, "import_s": imported - start, "work_s": done - imported, "rows": rows,
              "rss_after_import_mb": rss_after_import, "peak_rss_mb": _peak_rss_mb(), **extra}
    if variant == "ftkit":  # then the two tables `ftkit run` and `ftkit data split` go on with
        splits = data.take(train_rows), data.take(test_rows)
        assert sum(len(split) for split in splits) == rows
        result["take_s"] = time.perf_counter() - done
        result["take_peak_rss_mb"] = _peak_rss_mb()
    print(json.dumps(result))


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def measure(variant: str, path: Path) -> dict:
    cache = tempfile.mkdtemp(prefix="ftkit-bench-hf-cache-")
    try:
        env = {**os.environ, "HF_DATASETS_CACHE": cache}
        done = subprocess.run([sys.executable, __file__, "--worker", variant, str(path)], env=env, check=False,
                              capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent)
        if done.returncode != 0:
            raise SystemExit(f"{variant} failed:\n{done.stderr}")
        return json.loads(done.stdout.strip().splitlines()[-1])
    finally:
        shutil.rmtree(cache, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--worker", nargs=2, metavar=("VARIANT", "FILE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(*args.worker)
        return

    import datasets

    with tempfile.TemporaryDirectory(prefix="ftkit-bench-data-") as folder:
        path = Path(folder) / "banking77_layout.csv"
        write_csv(path, args.rows)
        size_mb = path.stat().st_size / 2**20
        file_rows = args.rows + DROPPED_ROWS
        print(f"{path.name}: {file_rows:,} rows ({args.rows:,} in 77 intents + {DROPPED_ROWS} {DROPPED_LABEL}), "
              f"{size_mb:.1f} MiB; Python {sys.version.split()[0]}, datasets {datasets.__version__}, "
              f"{os.cpu_count()} CPUs")
        load = OtherLoad()
        runs: dict[str, list[dict]] = {"bare": [], "ftkit": []}
        for _ in range(args.repeats):
            for variant, measured in runs.items():
                measured.append(measure(variant, path))
        note = load.note()

    def median(variant: str, value: str | Callable[[dict], float]) -> float:
        return statistics.median(value(run) if callable(value) else run[value] for run in runs[variant])

    rows = {  # label: (variant, seconds of one run, peak RSS of one run)
        "datasets.load_dataset(\"csv\")": ("bare", lambda r: r["work_s"], lambda r: r["peak_rss_mb"]),
        "ftkit load_task_data + split_indices": ("ftkit", lambda r: r["work_s"], lambda r: r["peak_rss_mb"]),
        "ftkit, then take train and test": ("ftkit", lambda r: r["work_s"] + r["take_s"],
                                            lambda r: r["take_peak_rss_mb"]),
    }
    print("\n| variant | import s | seconds | rows/s | peak RSS MB | RSS growth MB | growth / file | x bare time |")
    print("|---|---|---|---|---|---|---|---|")
    bare_seconds = median("bare", "work_s")
    summary = {}
    for label, (variant, seconds_of, peak_of) in rows.items():
        seconds = median(variant, seconds_of)
        growth = median(variant, lambda r, peak_of=peak_of: peak_of(r) - r["rss_after_import_mb"])
        summary[label] = (seconds / bare_seconds, growth / size_mb)
        print(f"| {label} | {median(variant, 'import_s'):.2f} | {seconds:.2f} | {file_rows / seconds:,.0f} | "
              f"{median(variant, peak_of):.0f} | {growth:.0f} | {growth / size_mb:.2f} | {seconds / bare_seconds:.2f} |")
    print(f"\nfile: {size_mb:.1f} MiB. Goals: ftkit <= {GOALS['time_ratio']}x the bare load's time, RSS growth <= "
          f"{GOALS['growth_per_file']}x the file.")
    for label, (ratio, growth) in list(summary.items())[1:]:
        met = [ratio <= GOALS["time_ratio"], growth <= GOALS["growth_per_file"]]
        print(f"{label}: {ratio:.2f}x the time ({'met' if met[0] else 'MISSED'}), growth {growth:.2f}x the file "
              f"({'met' if met[1] else 'MISSED'})")
    print(f"ftkit stages (median s): read+map+check+labels {median('ftkit', 'load_s'):.2f}, split_indices "
          f"{median('ftkit', lambda r: r['work_s'] - r['load_s']):.2f}, take {median('ftkit', 'take_s'):.2f}; "
          f"task {runs['ftkit'][0]['task']}; {runs['ftkit'][0]['rows']:,} rows kept")
    print("every run, seconds: " + "; ".join(f"{v} " + ", ".join(f"{r['work_s']:.2f}" for r in rs)
                                           for v, rs in runs.items()))
    print(note)


if __name__ == "__main__":
    main()
