"""Every registered task honours the contract; the built-in loaders read the real public layouts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from ftkit.cli import main
from ftkit.errors import DataError
from ftkit.plugins import registered_tasks

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
SAMPLES = {
    "emotion": ROOT / "plugins" / "data" / "emotion_quickstart.jsonl",
    "bank-intent": FIXTURES / "bank_intent.jsonl",
    "hc3": FIXTURES / "hc3_sample.jsonl",
    "huanhuan-chat": FIXTURES / "huanhuan.json",
    "squad-qa": FIXTURES / "squad_v1.json",
    "sft": FIXTURES / "sft_mixed.jsonl",
}
MAXIMUM = {"accuracy": 1.0, "macro_f1": 1.0, "f1": 100.0, "exact_match": 100.0, "rougeL": 100.0, "bleu": 100.0}


@pytest.mark.parametrize("name", sorted(registered_tasks()))
def test_task_contract(name):
    task = registered_tasks()[name][0]
    task.check()
    if name not in SAMPLES:
        pytest.skip(f"no sample data for third-party task {name}; its own ftkit.testing checks cover it")
    rows = list(task.load(SAMPLES[name]))
    assert rows, "the loader yields rows"
    examples = [task.format(row) for row in rows]
    assert all(e.input.strip() and e.target.strip() for e in examples)
    if task.kind == "classification" and task.labels:
        assert {e.target for e in examples} <= set(task.labels)
    references = [e.references for e in examples]
    gold = task.metrics([e.target for e in examples], references)
    assert gold[task.headline_metric] == pytest.approx(MAXIMUM[task.headline_metric])
    if task.kind == "classification":
        labels = list(task.labels or sorted({e.target for e in examples}))
        wrong = [labels[(labels.index(e.target) + 1) % len(labels)] for e in examples]
    else:
        wrong = ["zzz qqq" for _ in examples]
    assert task.metrics(wrong, references)[task.headline_metric] < gold[task.headline_metric]


def test_hc3_yields_one_example_per_answer_and_needs_no_id():
    from ftkit_plugins.hc3 import TASK

    rows = list(TASK.load(FIXTURES / "hc3_sample.jsonl"))
    assert len(rows) == 12  # 6 questions x (1 human + 1 chatgpt)
    assert sorted({r["label"] for r in rows}) == ["chatgpt", "human"]
    assert "问题：什么是光合作用？\n回答：" in TASK.format(rows[0]).input


def test_squad_reads_nested_v11_json_and_flat_jsonl(tmp_path):
    from ftkit_plugins.squad_qa import TASK

    nested = list(TASK.load(FIXTURES / "squad_v1.json"))
    assert len(nested) == 8
    assert nested[0]["answers"] == ["France", "a region in France"]
    flat = tmp_path / "squad.jsonl"
    flat.write_text(json.dumps({"id": "x1", "context": "Paris is in France.", "question": "Where is Paris?",
                                "answers": {"text": ["France", "in France"], "answer_start": [12, 9]}}) + "\n",
                    encoding="utf-8")
    (row,) = TASK.load(flat)
    example = TASK.format(row)
    assert example.target == "France" and example.references == ("France", "in France")
    assert TASK.metrics(["in France"], [example.references])["exact_match"] == 100.0


def test_emotion_accepts_alpaca_rows_and_huanhuan_a_json_array(tmp_path):
    from ftkit_plugins.emotion import TASK as EMOTION
    from ftkit_plugins.huanhuan_chat import TASK as HUANHUAN

    alpaca = tmp_path / "alpaca.jsonl"
    alpaca.write_text(json.dumps({"instruction": "判斷情緒", "input": "好開心", "output": "喜悅"},
                                 ensure_ascii=False) + "\n", encoding="utf-8")
    assert list(EMOTION.load(alpaca)) == [{"text": "好開心", "label": "喜悅"}]
    rows = list(HUANHUAN.load(FIXTURES / "huanhuan.json", system_prompt="你是甄嬛"))
    assert len(rows) == 10 and HUANHUAN.format(rows[0]).system == "你是甄嬛"


@pytest.mark.parametrize(
    ("task", "content", "suffix", "message"),
    [
        ("emotion", '{"text": "好", "emotion": "喜悅"}\n{"text": \n', ".jsonl", "{path}:2: not valid JSON"),
        ("emotion", '{"text": "好", "emotion": "開心"}\n', ".jsonl",
         "{path}:1: 1 row(s) have labels outside emotion's label set (喜悅, 悲傷, 憤怒, 恐懼, 驚訝, 厭惡): '開心' (1); "
         "map them with task.label_map or skip them with task.drop_labels"),
        ("bank-intent", '\n\n{"text": "hi", "label": "refund"}\n{"label": "refund"}\n', ".jsonl",
         "{path}:4: missing field 'text'"),
        ("bank-intent", '\n\n{"label": "refund"}\n', ".jsonl",
         "{path}: no column for the field 'text' (looked for 'text'); its columns: label; name it with task.columns"),
        ("hc3", '{"question": "q", "human_answers": "not a list", "chatgpt_answers": []}\n', ".jsonl",
         "{path}:1: field 'human_answers' must be a list of strings"),
        ("huanhuan-chat", '[{"instruction": "hi", "output": 3}]', ".json", "{path}[0]: field 'output' must be a string, got int"),
        ("squad-qa", '{"version": "1.1", "data": [{"paragraphs": [{"context": "c", "qas": [{"id": "1", '
                     '"question": "q", "answers": []}]}]}]}', ".json",
         "{path}:data[0].paragraphs[0].qas[0]: 'answers' must hold at least one non-empty answer text"),
    ],
)
def test_loaders_name_file_and_line_on_malformed_input(tmp_path, task, content, suffix, message):
    path = tmp_path / f"data{suffix}"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError) as raised:
        list(registered_tasks()[task][0].load(path))
    assert str(raised.value).startswith(message.format(path=path))


def test_data_validate_reports_every_bad_row(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        '\ufeff{"text": "今天很開心", "emotion": "喜悅"}\n{"text": "oops"\n{"text": "好可怕", "emotion": "怕"}\n'
        '{"text": "今天很開心", "emotion": "喜悅"}\n{"emotion": "悲傷"}\n',
        encoding="utf-8",
    )
    result = CliRunner().invoke(main, ["data", "validate", "emotion", str(bad), "--labels", "喜悅,悲傷", "--json"])
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    assert report["errors"] == [
        f"{bad}:2: not valid JSON (column 17: Expecting ',' delimiter); fix or remove the line",
        f"{bad}:5: missing field 'text'",
        f"{bad}:3: 1 row(s) have labels outside emotion's label set (喜悅, 悲傷): '怕' (1); map them with "
        "task.label_map or skip them with task.drop_labels",
        f"{bad}: no examples of label '悲傷'; a model cannot learn it",
    ]
    assert report["duplicates"] == {"今天很開心": [f"{bad}:1", f"{bad}:4"]}
    assert report["classes"] == {"喜悅": 2, "悲傷": 0}
    assert report["records"] == 4 and report["examples"] == 2


def test_data_validate_on_good_data_shows_classes_and_token_lengths():
    result = CliRunner().invoke(main, ["data", "validate", "emotion", str(SAMPLES["emotion"]), "--seq", "64"])
    assert result.exit_code == 0, result.output
    assert "600 records, 600 examples (emotion)" in result.output
    assert "    喜悅     100  " + "█" * 30 in result.output
    assert "max/min class ratio: 1.00" in result.output
    assert "longer than --seq 64" in result.output
    assert result.output.rstrip().endswith("ok")


def test_data_validate_warns_on_imbalance(tmp_path):
    path = tmp_path / "skewed.jsonl"
    rows = [{"text": f"good {i}", "label": "refund"} for i in range(8)] + [{"text": "bal", "label": "balance"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    result = CliRunner().invoke(main, ["data", "validate", "bank-intent", str(path), "--labels", "refund,balance"])
    assert result.exit_code == 0
    assert "Warning: " in result.output and "classes are imbalanced (ratio 8.00 > 3)" in result.output


def test_data_split_is_stratified_seeded_and_refuses_to_drop_a_class(tmp_path):
    runner = CliRunner()
    args = ["data", "split", "emotion", str(SAMPLES["emotion"]), "--test-size", "0.2", "--json"]
    first = json.loads(runner.invoke(main, [*args, "-o", str(tmp_path / "a")]).stdout)
    second = json.loads(runner.invoke(main, [*args, "-o", str(tmp_path / "b")]).stdout)
    assert first["stratified"] and first["train"] == 480 and first["test"] == 120 and first["overlap"] == 0
    assert set(first["test_classes"].values()) == {20}
    assert {k: v for k, v in second.items() if k != "files"} == {k: v for k, v in first.items() if k != "files"}
    assert (tmp_path / "a" / "test.jsonl").read_bytes() == (tmp_path / "b" / "test.jsonl").read_bytes()
    train_texts = {json.loads(line)["text"] for line in (tmp_path / "a" / "train.jsonl").open(encoding="utf-8")}
    test_texts = {json.loads(line)["text"] for line in (tmp_path / "a" / "test.jsonl").open(encoding="utf-8")}
    assert len(train_texts) == 480 and not train_texts & test_texts

    refused = runner.invoke(main, ["data", "split", "bank-intent", str(SAMPLES["bank-intent"]), "--test-size", "0.05",
                                   "--drop-labels", "investments", "-o", str(tmp_path / "c")])
    assert refused.exit_code == 1
    assert ("--test-size: a 5% split of 30 examples gives 2 test and 28 train examples; each needs at least one "
            "of the 5 classes, so change test_size or add data") in refused.output
    assert not (tmp_path / "c").exists()


def test_data_format_writes_alpaca_rows(tmp_path):
    out = tmp_path / "alpaca.jsonl"
    result = CliRunner().invoke(main, ["data", "format", "squad-qa", str(SAMPLES["squad-qa"]), "-o", str(out)])
    assert result.exit_code == 0 and result.output == f"Wrote 8 rows to {out}\n"
    first = json.loads(out.read_text(encoding="utf-8").splitlines()[0])
    assert first["output"] == "France" and first["references"] == ["France", "a region in France"]
    assert first["input"].startswith("Context: The Normans")


def test_data_synth_refuses_tasks_that_cannot_synthesize(tmp_path):
    result = CliRunner().invoke(main, ["data", "synth", "hc3", "-o", str(tmp_path / "x.jsonl")])
    assert result.exit_code == 2
    assert result.output == "Error: task 'hc3' cannot synthesize data; give it a data file instead\n"


@pytest.mark.parametrize("labels", [["a", "b", "c", "d"], None, ["a", "b", "c", "d", "never-seen"]])
def test_classification_metrics_agree_with_scikit_learn(labels):
    """ftkit counts accuracy and the matrix itself (one scikit-learn call is cheaper): same numbers."""
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score

    from ftkit.metrics import classification_metrics

    refs = list("aabbbcccca" "dddabcabca")
    preds = list("abbbaccdca") + ["off-label"] + list("ddabcbbcb")
    got = classification_metrics(preds, [[r] for r in refs], labels)
    order = labels or list(dict.fromkeys([*refs, *preds]))
    assert got["accuracy"] == pytest.approx(accuracy_score(refs, preds))
    # Macro-F1 over the whole label set: a label absent from the test split counts (F1 0).
    assert got["macro_f1"] == pytest.approx(f1_score(refs, preds, labels=order, average="macro", zero_division=0))
    assert got["confusion_matrix"] == {"labels": order,
                                       "matrix": confusion_matrix(refs, preds, labels=order).tolist()}
    assert got["per_class"]["a"]["support"] == refs.count("a")
    if labels and "never-seen" in labels:
        assert got["per_class"]["never-seen"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
