"""Data in every published layout ftkit reads: validated, split and run end to end on the tiny model.

The rows are invented (tests/fixtures/layouts/): a bank-intent set in JSONL, a JSON array, a JSON
object holding an array, CSV and TSV (its columns `utterance`/`topic`, so `columns` is needed), the
same rows written here as Parquet and as a ``Dataset.save_to_disk`` folder whose label column is a
ClassLabel; an emotion corpus in the Chinese emotion corpus's layout (``id``/``content``/``label``,
English label names and a seventh, ``like``); HC3 rows; SQuAD v1.1 JSON.

Runs and dry runs go through the real CLI in-process (CliRunner): one interpreter pays for
torch and transformers once, so each run takes seconds.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner

from ftkit.cli import main

LAYOUTS = Path(__file__).resolve().parent / "fixtures" / "layouts"
BANK_LABELS = ["balance", "card_lost", "refund"]
BANK_FLAGS = ["--columns", "text=utterance,label=topic"]
BANK_MAPPING = 'columns = { text = "utterance", label = "topic" }'
EMOTION_LABELS = ["喜悅", "悲傷", "憤怒", "恐懼", "驚訝", "厭惡"]
EMOTION_MAP = {"happiness": "喜悅", "sadness": "悲傷", "anger": "憤怒", "fear": "恐懼", "surprise": "驚訝",
               "disgust": "厭惡"}
EMOTION_FLAGS = ["--columns", "text=content", "--label-map", ",".join(f"{k}={v}" for k, v in EMOTION_MAP.items()),
                 "--drop-labels", "like"]
EMOTION_MAPPING = ('columns = { text = "content" }\nlabel_map = { '
                   + ", ".join(f'{k} = "{v}"' for k, v in EMOTION_MAP.items()) + ' }\ndrop_labels = ["like"]')


@dataclass(frozen=True)
class Layout:
    task: str
    file: str  # under tests/fixtures/layouts/, or written by the `layout_files` fixture
    flags: tuple[str, ...]  # the mapping as `ftkit data` flags ...
    mapping: str  # ... and as recipe keys
    records: int  # source records ...
    examples: int  # ... and the task's examples made from them
    labels: list[str] | None  # classification: the run's label set (labels.json)
    dropped: dict[str, int]


def bank(file: str) -> Layout:
    return Layout("bank-intent", file, tuple(BANK_FLAGS), BANK_MAPPING, 15, 15, BANK_LABELS, {})


CASES = {
    "jsonl": bank("bank.jsonl"),
    "json-array": bank("bank_array.json"),
    "json-object": bank("bank_object.json"),
    "csv": bank("bank.csv"),
    "tsv": bank("bank.tsv"),
    "parquet": bank("bank.parquet"),
    "save-to-disk": bank("bank_saved"),
    "emotion-zh": Layout("emotion", "emotion_zh.jsonl", tuple(EMOTION_FLAGS), EMOTION_MAPPING, 34, 30, EMOTION_LABELS,
                         {"label in task.drop_labels": 4}),
    "hc3": Layout("hc3", "hc3.jsonl", (), "", 8, 18, ["human", "chatgpt"], {}),
    "squad": Layout("squad-qa", "squad.json", (), "", 14, 14, None, {}),
}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.fixture(scope="module")
def layout_files(tmp_path_factory) -> Path:
    """The text fixtures plus Parquet and a save_to_disk folder written from bank.jsonl's rows."""
    import shutil

    import datasets

    folder = tmp_path_factory.mktemp("layouts")
    for path in LAYOUTS.iterdir():
        shutil.copy(path, folder / path.name)
    rows = read_jsonl(LAYOUTS / "bank.jsonl")
    datasets.Dataset.from_list(rows).to_parquet(str(folder / "bank.parquet"))
    # Not in sorted order: integer labels must map through these names, not through the label set.
    names = ["refund", "card_lost", "balance"]
    features = datasets.Features({"id": datasets.Value("string"), "utterance": datasets.Value("string"),
                                  "topic": datasets.ClassLabel(names=names)})
    saved = datasets.Dataset.from_dict({"id": [r["id"] for r in rows], "utterance": [r["utterance"] for r in rows],
                                        "topic": [names.index(r["topic"]) for r in rows]}, features=features)
    saved.save_to_disk(str(folder / "bank_saved"))
    return folder


def cli(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def write_recipe(path: Path, task: str, train_file: Path, mapping: str, out: Path, extra: str = "") -> Path:
    path.write_text(
        f'[model]\nid = "ftkit/tiny-qwen2"\nsource = "builtin"\n'
        f"[task]\nname = {json.dumps(task)}\ntrain_file = {json.dumps(str(train_file))}\ntest_size = 0.2\n{mapping}\n"
        f"[method]\nname = \"lora\"\n"
        f"[train]\nmax_steps = 2\nbatch_size = 8\nmax_seq_len = 64\nlogging_steps = 1\nseed = 7\n"
        f"[eval]\nbaseline = false\nbatch_size = 16\nmax_new_tokens = 4\n{extra}"
        f"[output]\ndir = {json.dumps(str(out))}\n",
        encoding="utf-8",
    )
    return path


def test_the_text_fixtures_are_what_the_cases_say():
    squad = json.loads((LAYOUTS / "squad.json").read_text(encoding="utf-8"))
    paragraphs = [p for article in squad["data"] for p in article["paragraphs"]]
    assert len(paragraphs) == 6 and all(len(p["qas"]) >= 2 for p in paragraphs)  # several questions a paragraph
    for p in paragraphs:
        for qa in p["qas"]:
            answer = qa["answers"][0]
            assert p["context"][answer["answer_start"]:].startswith(answer["text"]), qa["id"]
    emotion = read_jsonl(LAYOUTS / "emotion_zh.jsonl")
    assert set(emotion[0]) == {"id", "content", "label"}
    assert {r["label"] for r in emotion} == {*EMOTION_MAP, "like"} and sum(r["label"] == "like" for r in emotion) == 4
    rows = read_jsonl(LAYOUTS / "bank.jsonl")
    assert json.loads((LAYOUTS / "bank_array.json").read_text(encoding="utf-8")) == rows
    assert json.loads((LAYOUTS / "bank_object.json").read_text(encoding="utf-8"))["rows"] == rows
    for name, delimiter in (("bank.csv", ","), ("bank.tsv", "\t")):
        text = (LAYOUTS / name).read_text(encoding="utf-8")
        assert list(csv.DictReader(io.StringIO(text), delimiter=delimiter)) == rows


@pytest.mark.parametrize("layout", CASES.values(), ids=CASES.keys())
def test_every_layout_validates(layout_files, layout):
    result = cli("data", "validate", layout.task, layout_files / layout.file, *layout.flags, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["errors"] == [] and report["ok"]
    assert (report["records"], report["examples"], report["dropped"]) == (layout.records, layout.examples,
                                                                          layout.dropped)
    if layout.task == "bank-intent":
        assert report["classes"] == dict.fromkeys(BANK_LABELS, 5)
    elif layout.task == "emotion":
        assert report["classes"] == dict.fromkeys(EMOTION_LABELS, 5)


def split_examples(layout: Layout, split_test: Path) -> list[tuple[str, str]]:
    """(input, target) the model gets from each row `ftkit data split` put in test.jsonl (its source rows)."""
    from ftkit.plugins import get_task
    from ftkit.sources import DataMapping, load_task_data

    task = get_task(layout.task)
    columns = dict(pair.split("=") for pair in layout.flags[1].split(",")) if layout.flags else {}
    mapping = DataMapping(columns=columns, label_map=EMOTION_MAP if layout.task == "emotion" else {})
    examples = (task.format(row) for row in load_task_data(task, split_test, mapping).rows())
    return sorted((example.input, example.target) for example in examples)


@pytest.mark.slow
@pytest.mark.parametrize("layout", CASES.values(), ids=CASES.keys())
def test_every_layout_runs_end_to_end_and_run_splits_as_data_split_does(layout_files, tmp_path, layout):
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.toml", layout.task, layout_files / layout.file, layout.mapping, out)
    result = cli("run", recipe)
    assert result.exit_code == 0, result.output[-3000:]
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["steps"] == 2 and metrics["baselines"]["zero_shot"] is None  # eval.baseline = false
    assert metrics["train_examples"] + metrics["test_examples"] <= layout.examples
    labels = json.loads((out / "labels.json").read_text(encoding="utf-8"))
    assert labels["labels"] == layout.labels
    # The same seed and test size give `ftkit data split` the very test rows the run held out.
    split = cli("data", "split", layout.task, layout_files / layout.file, "-o", tmp_path / "split", "--seed", "7",
                "--test-size", "0.2", *layout.flags, "--json")
    assert split.exit_code == 0, split.output
    run_test = sorted((row["input"], row["target"]) for row in read_jsonl(out / "data" / "test.jsonl"))
    assert run_test == split_examples(layout, tmp_path / "split" / "test.jsonl")
    assert len(run_test) == metrics["test_examples"] == json.loads(split.stdout)["test"]
    if layout.task == "bank-intent":  # each text keeps its own label, ClassLabel integers included
        truth = {row["utterance"]: row["topic"] for row in read_jsonl(LAYOUTS / "bank.jsonl")}
        assert all(truth[text] == label for text, label in run_test)


def test_dry_run_json_reads_77_intents_from_a_csv_given_only_columns(tmp_path):
    intents = [f"intent_{k:02d}" for k in range(77)]
    lines = ["text,category"] + [f"customer message {i} about {intent.replace('_', ' ')}" + f",{intent}"
                                 for intent in intents for i in range(4)]
    (tmp_path / "banking.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    recipe = write_recipe(tmp_path / "r.toml", "bank-intent", tmp_path / "banking.csv",
                          'columns = { text = "text", label = "category" }', tmp_path / "run")
    # 308 rows; a 20% test split would be 62 rows, fewer than the 77 classes: hold out a quarter.
    result = cli("run", recipe, "--set", "task.test_size=0.25", "--dry-run", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["data"] == {"train_examples": 231, "test_examples": 77, "labels": intents,
                                                 "dropped": {}}
    assert not (tmp_path / "run").exists()


def test_dry_run_json_maps_and_drops_chinese_emotion_labels(tmp_path):
    recipe = write_recipe(tmp_path / "r.toml", "emotion", LAYOUTS / "emotion_zh.jsonl", EMOTION_MAPPING,
                          tmp_path / "run")
    result = cli("run", recipe, "--dry-run", "--json")
    assert result.exit_code == 0, result.output
    # 34 rows, 4 of them `like` (dropped); 30 left, 6 per class held out (20%, stratified).
    assert json.loads(result.stdout)["data"] == {"train_examples": 24, "test_examples": 6, "labels": EMOTION_LABELS,
                                                 "dropped": {"label in task.drop_labels": 4}}


@pytest.mark.parametrize(("task", "file", "group"), [("hc3", "hc3.jsonl", "question"),
                                                     ("squad-qa", "squad.json", "context")])
def test_data_split_keeps_each_question_or_paragraph_on_one_side(tmp_path, task, file, group):
    result = cli("data", "split", task, LAYOUTS / file, "-o", tmp_path, "--test-size", "0.3", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["grouped_by"] == group
    train, test = read_jsonl(tmp_path / "train.jsonl"), read_jsonl(tmp_path / "test.jsonl")
    assert train and test
    assert not {row[group] for row in train} & {row[group] for row in test}
    if task == "hc3":  # rows as published, every one on exactly one side
        source = read_jsonl(LAYOUTS / file)
        assert sorted(train + test, key=lambda r: r["id"]) == source
    else:  # a nested SQuAD question keeps its own fields and gains its paragraph's context
        squad = json.loads((LAYOUTS / file).read_text(encoding="utf-8"))
        source = [{**qa, "context": p["context"]} for a in squad["data"] for p in a["paragraphs"] for qa in p["qas"]]
        assert sorted(train + test, key=lambda r: r["id"]) == source


def test_validate_with_a_test_file_counts_exact_and_near_duplicates(tmp_path):
    test = tmp_path / "test.jsonl"
    rows = [{"utterance": "Show me my savings balance please", "topic": "balance"},  # exact copy
            {"utterance": "how long does a REFUND take to show up", "topic": "refund"},  # case, punctuation
            {"utterance": "My new card never came in the post", "topic": "card_lost"},
            {"utterance": "Is my overdraft counted in the balance?", "topic": "balance"}]
    test.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    result = cli("data", "validate", "bank-intent", LAYOUTS / "bank.jsonl", "--test", test, *BANK_FLAGS, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["test"] == {
        "path": str(test), "examples": 4, "exact_overlap": 1, "near_overlap": 1,
        "overlap_examples": [rows[0]["utterance"], rows[1]["utterance"]], "unseen_labels": []}


def test_data_work_allocates_through_malloc_and_gives_arrow_its_pool_back(tmp_path):
    import numpy as np
    import pyarrow as pa

    from ftkit.errors import DataError
    from ftkit.plugins import get_task
    from ftkit.sources import DataMapping, load_task_data

    default = pa.default_memory_pool().backend_name
    if default == "system":
        pytest.skip("ARROW_DEFAULT_MEMORY_POOL chose the system allocator already")
    task, mapping = get_task("bank-intent"), DataMapping(columns={"text": "utterance", "label": "topic"})
    data = load_task_data(task, LAYOUTS / "bank.csv", mapping)
    assert pa.default_memory_pool().backend_name == default
    # A split's table is a copy of the kept rows: malloc holds it, for as long as it lives.
    system = pa.system_memory_pool()
    held = system.bytes_allocated()
    train = data.take(np.arange(len(data)))
    assert system.bytes_allocated() > held
    assert pa.default_memory_pool().backend_name == default
    del train
    # The pool comes back when loading fails too.
    empty = tmp_path / "empty.csv"
    empty.write_text("utterance,topic\n", encoding="utf-8")
    with pytest.raises(DataError, match="the file is empty"):
        load_task_data(task, empty, mapping)
    assert pa.default_memory_pool().backend_name == default


def test_taking_rows_batch_by_batch_gives_arrows_rows_in_order():
    import numpy as np
    import pyarrow as pa

    from ftkit.sources import _take_rows

    # Three record batches, and a dictionary column as labels are kept.
    batches = [pa.record_batch({"text": pa.array([f"row {i}" for i in range(start, start + n)], pa.large_string()),
                                "label": pa.array(["a", "b"] * (n // 2)).dictionary_encode()})
               for start, n in ((0, 4), (4, 6), (10, 2))]
    table = pa.Table.from_batches(batches)
    for rows in ([0, 3, 4, 9, 10, 11], [5], list(range(12)), [], [11, 2, 7]):  # the last one unsorted
        taken = _take_rows(table, np.array(rows, dtype=np.int64))
        assert taken.to_pylist() == table.take(pa.array(rows, pa.int64())).to_pylist()
        assert taken.column("text").to_pylist() == [f"row {i}" for i in rows]
    assert _take_rows(table, range(0, 12, 5)).column("text").to_pylist() == ["row 0", "row 5", "row 10"]
    with pytest.raises(IndexError):
        _take_rows(table, np.array([3, 12]))
