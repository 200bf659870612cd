"""A corpus of bad inputs: each gives one line naming the file and line (or recipe key) and what to
do, a non-zero exit, no traceback, and leaves no run folder behind.

Each case writes its files into a temporary folder and runs ``ftkit run`` (or ``validate`` /
``data validate``) in-process. ``{d}`` in a case stands for that folder.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from ftkit.cli import main
from ftkit.folders import MERGE_MARK, RUN_MARK

ROOT = Path(__file__).resolve().parents[1]
GOOD_ROW = '{"text": "今天收到禮物，好開心", "emotion": "喜悅"}\n'
LABELS = ("喜悅", "悲傷", "憤怒", "恐懼", "驚訝", "厭惡")


def emotion_rows(per_label: int, labels: tuple[str, ...] = LABELS) -> str:
    return "".join(json.dumps({"text": f"第{i}句：{label}的句子", "emotion": label}, ensure_ascii=False) + "\n"
                   for i in range(per_label) for label in labels)


GOOD_EMOTION = emotion_rows(4)
CSV_FILE = ["--set", 'task.train_file="data.csv"']


def emotion_task(mapping: str) -> str:
    """The default [task] section plus mapping keys (columns, label_map, drop_labels)."""
    return f'name = "emotion"\ntrain_file = "data.jsonl"\n{mapping}'


def recipe(**sections: str) -> str:
    """A valid quickstart-like recipe; a section given here replaces the default one."""
    base = {
        "model": 'id = "ftkit/tiny-qwen2"\nsource = "builtin"',
        "task": 'name = "emotion"\ntrain_file = "data.jsonl"',
        "output": 'dir = "out"',
    }
    base.update(sections)
    return "".join(f"[{name}]\n{body}\n" for name, body in base.items() if body is not None)


# (id, files {name: text or bytes}, extra CLI args, expected message)
CASES = [
    # --- data files -------------------------------------------------------------------------
    ("malformed-jsonl", {"data.jsonl": GOOD_ROW + '{"text": "壞掉的行"\n'}, [],
     "{d}/data.jsonl:2: not valid JSON (column 17: Expecting ',' delimiter); fix or remove the line"),
    ("truncated-json-object", {"data.jsonl": '{"text": "好", "emotion": "喜\n'}, [],
     "{d}/data.jsonl:1: not valid JSON (column 28: Invalid control character); fix or remove the line"),
    ("empty-file", {"data.jsonl": ""}, [], "{d}/data.jsonl: the file is empty; it holds no rows"),
    ("blank-lines-only", {"data.jsonl": "\n\n  \n"}, [], "{d}/data.jsonl: the file is empty; it holds no rows"),
    ("not-utf8", {"data.jsonl": GOOD_ROW.encode() + '{"text": "caf\xe9", "emotion": "x"}\n'.encode("latin-1")}, [],
     "{d}/data.jsonl:2: not UTF-8 text (invalid continuation byte); re-save the file as UTF-8"),
    ("utf16-file", {"data.jsonl": GOOD_ROW.encode("utf-16")}, [],
     "{d}/data.jsonl:1: not UTF-8 text (invalid start byte); re-save the file as UTF-8"),
    ("missing-field", {"data.jsonl": GOOD_ROW + '{"emotion": "悲傷"}\n'}, [],
     "{d}/data.jsonl:2: missing field 'text'"),
    # A column no row has is a file-level problem: named once, with the columns there are and the fix.
    ("missing-label-field", {"data.jsonl": '{"text": "沒有標籤"}\n'}, [],
     ("{d}/data.jsonl: no column for the field 'label' (looked for 'label' or 'emotion' or 'output'); its "
      'columns: text; name it with task.columns, e.g. columns = {{ label = "COLUMN" }}')),
    ("wrong-type-text", {"data.jsonl": '{"text": 42, "emotion": "喜悅"}\n'}, [],
     "{d}/data.jsonl:1: field 'text' must be a string, got int"),
    ("wrong-type-label", {"data.jsonl": '{"text": "好", "emotion": ["喜悅"]}\n'}, [],
     "{d}/data.jsonl:1: field 'label' (column 'emotion') must be a string, got list"),
    ("empty-text", {"data.jsonl": '{"text": "   ", "emotion": "喜悅"}\n'}, [],
     "{d}/data.jsonl:1: field 'text' is empty"),
    ("label-outside-set", {"data.jsonl": GOOD_ROW + '{"text": "好開心", "emotion": "開心"}\n'}, [],
     ("{d}/data.jsonl:2: 1 row(s) have labels outside emotion's label set (喜悅, 悲傷, 憤怒, 恐懼, 驚訝, 厭惡): "
      "'開心' (1); map them with task.label_map or skip them with task.drop_labels")),
    ("row-not-an-object", {"data.jsonl": '["今天", "喜悅"]\n'}, [],
     "{d}/data.jsonl:1: expected a JSON object, got list"),
    # datasets reads a 4 MB line like any other (no line limit any more); one row still cannot be split.
    ("huge-line", {"data.jsonl": '{"text": "' + "長" * 1_333_334 + '", "emotion": "喜悅"}\n'}, [],
     "{d}/data.jsonl: 1 usable example(s); a split needs at least 2"),
    # Enough rows that the split itself is possible, so the missing class is what is reported.
    ("class-missing-from-data", {"data.jsonl": emotion_rows(8, LABELS[:5])}, [],
     "no training examples of label(s) 厭惡; add data or set task.labels"),
    ("single-example-class", {"data.jsonl": GOOD_EMOTION.replace('"厭惡"', '"喜悅"', 3)}, [],
     ("label(s) 厭惡 have fewer than 2 examples: a stratified split would leave them out of train or test; "
      "add examples or give task.test_file")),
    ("too-few-for-split", {"data.jsonl": GOOD_EMOTION}, ["--set", "task.test_size=0.05"],
     ("task.test_size: a 5% split of 24 examples gives 2 test and 22 train examples; each needs at least one "
      "of the 6 classes, so change test_size or add data")),
    ("test-equals-train", {"data.jsonl": GOOD_EMOTION}, ["--set", 'task.test_file="data.jsonl"'],
     "every training example also appears in the test split; use different files"),
    ("train-file-missing", {}, [], "{d}/data.jsonl: no such file; check the path"),
    ("train-file-is-folder", {"data.jsonl/x": "x"}, [], "{d}/data.jsonl: is a folder, expected a data file"),
    ("path-through-a-file", {"data.jsonl": GOOD_EMOTION}, ["--set", 'task.train_file="data.jsonl/more.jsonl"'],
     "{d}/data.jsonl/more.jsonl: a part of this path is a file, not a folder; check the path"),
    ("json-array-not-objects", {"data.json": '["a", "b"]'}, ["--set", 'task.train_file="data.json"'],
     "{d}/data.json[0]: expected a JSON object, got str"),
    ("json-object-not-array", {"data.json": '{"text": "x"}'}, ["--set", 'task.train_file="data.json"'],
     ("{d}/data.json: expected a JSON array of objects, or an object holding one array; this object holds 0 "
      "arrays (none)")),
    ("broken-json-file", {"data.json": '[{"text": "x",\n  "emotion": }]'}, ["--set", 'task.train_file="data.json"'],
     "{d}/data.json:2: not valid JSON (Expecting value)"),
    # --- data mapping and layouts (issue 15) ------------------------------------------------
    ("empty-csv", {"data.csv": ""}, CSV_FILE, "{d}/data.csv: the file is empty; it holds no header and no rows"),
    ("header-only-csv", {"data.csv": "text,label\n"}, CSV_FILE, "{d}/data.csv: the file is empty; it holds no rows"),
    ("mapped-column-missing", {"data.jsonl": GOOD_EMOTION, "r.toml": recipe(task=emotion_task('columns = { text = "content" }'))}, [],
     "{d}/data.jsonl: task.columns.text names column 'content', which the file does not have; its columns: text, emotion"),
    ("unknown-columns-key", {"data.jsonl": GOOD_EMOTION, "r.toml": recipe(task=emotion_task('columns = { txt = "content" }'))}, [],
     "{d}/r.toml: task.columns.txt: unknown field for emotion; did you mean `text`?"),
    ("label-map-target-outside", {"data.jsonl": GOOD_EMOTION,
                                  "r.toml": recipe(task=emotion_task('label_map = { happiness = "開心" }'))}, [],
     "{d}/r.toml: task.label_map.happiness: '開心' is not one of the labels (喜悅, 悲傷, 憤怒, 恐懼, 驚訝, 厭惡)"),
    ("every-row-dropped", {"data.jsonl": GOOD_EMOTION, "r.toml": recipe(task=emotion_task(f"drop_labels = {list(LABELS)}"))}, [],
     "{d}/data.jsonl: no examples; every row was dropped (24 label in task.drop_labels)"),
    ("mixed-label-types", {"data.jsonl": '{"content": "今天好開心", "label": 1}\n{"content": "好難過", "label": "happiness"}\n',
                           "r.toml": recipe(task=emotion_task('columns = { text = "content" }'))}, [],
     ("{d}/data.jsonl:2: column 'label' mixes types (str here, int at {d}/data.jsonl:1); make every value of a "
      "column the same type")),
    ("csv-with-semicolons", {"data.csv": "text;label\n今天好開心;喜悅\n好難過;悲傷\n"}, CSV_FILE,
     ("{d}/data.csv: no column for the field 'text' (looked for 'text' or 'input'); its columns: text;label; the "
      "header looks separated by semicolons, not by commas: save it with commas (or with tabs, as .tsv)")),
    ("csv-with-tabs", {"data.csv": "text\tlabel\n今天好開心\t喜悅\n好難過\t悲傷\n"}, CSV_FILE,
     ("{d}/data.csv: no column for the field 'text' (looked for 'text' or 'input'); its columns: text\tlabel; the "
      "header looks separated by tabs, not by commas: name the file .tsv")),
    ("tsv-with-commas", {"data.tsv": "text,label\n今天好開心,喜悅\n好難過,悲傷\n"}, ["--set", 'task.train_file="data.tsv"'],
     ("{d}/data.tsv: no column for the field 'text' (looked for 'text' or 'input'); its columns: text,label; the "
      "header looks separated by commas, not by tabs: name the file .csv")),
    # --- validation and early stopping (issue 18) --------------------------------------------
    ("valid-size-too-big", {"r.toml": recipe(train="valid_size = 0.7")}, [],
     "{d}/r.toml: train.valid_size: must be at most 0.5, got 0.7"),
    ("valid-size-negative", {"r.toml": recipe(train="valid_size = -0.1")}, [],
     "{d}/r.toml: train.valid_size: must be at least 0, got -0.1"),
    ("valid-size-too-few-per-class", {"data.jsonl": emotion_rows(10)}, ["--set", "train.valid_size=0.1"],
     ("train.valid_size: a 10% split of 48 examples gives 5 validation and 43 train examples; each needs at least "
      "one of the 6 classes, so change valid_size or add data")),
    ("valid-file-missing", {"data.jsonl": emotion_rows(10)}, ["--set", 'task.valid_file="valid.jsonl"'],
     "{d}/valid.jsonl: no such file; check the path"),
    ("valid-file-is-test-file", {"r.toml": recipe(task=emotion_task('test_file = "t.jsonl"\nvalid_file = "t.jsonl"'))},
     [], ("{d}/r.toml: task.valid_file: the same file as task.test_file; validation needs examples of its own (or "
          "use train.valid_size to carve them from the training data)")),
    ("valid-file-copies-train", {"data.jsonl": emotion_rows(10), "valid.jsonl": emotion_rows(10)},
     ["--set", 'task.valid_file="valid.jsonl"'],
     "every training example also appears in the validation set; use different files"),
    ("valid-file-copies-test", {"data.jsonl": emotion_rows(10), "t.jsonl": emotion_rows(3), "v.jsonl": emotion_rows(3)},
     ["--set", 'task.test_file="t.jsonl"', "--set", 'task.valid_file="v.jsonl"'],
     "{d}/v.jsonl: every validation example also appears in the test split; use different files"),
    ("valid-file-and-valid-size", {"r.toml": recipe(task=emotion_task('valid_file = "v.jsonl"'),
                                                    train="valid_size = 0.1")}, [],
     "{d}/r.toml: train.valid_size: give task.valid_file or train.valid_size, not both"),
    ("keep-best-without-validation", {"r.toml": recipe(train='keep = "best"')}, [],
     '{d}/r.toml: train.keep: "best" needs a validation set; set task.valid_file or train.valid_size'),
    ("keep-unknown", {"r.toml": recipe(train='keep = "first"')}, [],
     "{d}/r.toml: train.keep: 'first' is not one of auto, best, last"),
    ("patience-without-validation", {"r.toml": recipe(train="early_stopping_patience = 3")}, [],
     ("{d}/r.toml: train.early_stopping_patience: early stopping needs a validation set; set task.valid_file or "
      "train.valid_size")),
    ("patience-not-an-integer", {"r.toml": recipe(train='early_stopping_patience = "2"')}, [],
     "{d}/r.toml: train.early_stopping_patience: expected an integer, got a string '2'"),
    ("eval-steps-negative", {"r.toml": recipe(train="eval_steps = -5")}, [],
     "{d}/r.toml: train.eval_steps: must be at least 0, got -5"),
    ("eval-steps-without-validation", {"data.jsonl": GOOD_EMOTION}, ["--set", "train.eval_steps=10"],
     ("{d}/r.toml: train.eval_steps: evaluating during training needs a validation set; set task.valid_file or "
      "train.valid_size")),
    # --- recipes ----------------------------------------------------------------------------
    ("unknown-key", {"data.jsonl": GOOD_EMOTION, "r.toml": recipe(train="epoch = 3")}, [],
     "{d}/r.toml: train.epoch: unknown key; did you mean `epochs`?"),
    ("unknown-section", {"data.jsonl": GOOD_EMOTION, "r.toml": recipe(trainer="epochs = 3")}, [],
     "{d}/r.toml: trainer: unknown section; did you mean `train`?"),
    ("wrong-type-lr", {"data.jsonl": GOOD_EMOTION, "r.toml": recipe(train='lr = "fast"')}, [],
     "{d}/r.toml: train.lr: expected a number, got a string 'fast'"),
    ("wrong-type-bool", {"data.jsonl": GOOD_EMOTION, "r.toml": recipe(model='id = "x"\nsource = "local"\n'
                                                                       'trust_remote_code = "yes"')}, [],
     "{d}/r.toml: model.trust_remote_code: expected a boolean, got a string 'yes'"),
    ("missing-model-section", {"r.toml": recipe(model=None)}, [], "{d}/r.toml: model: missing section [model]"),
    ("missing-output-section", {"r.toml": recipe(output=None)}, [], "{d}/r.toml: output: missing section [output]"),
    ("missing-model-id", {"r.toml": recipe(model='source = "builtin"')}, [],
     "{d}/r.toml: model.id: missing; model id on the hub (`Qwen/Qwen2.5-1.5B-Instruct`), a local folder, a "
     "`.gguf` file (relative to the recipe), or a builtin: `ftkit/tiny-qwen2`, `ftkit/smollm2-135m-instruct`"),
    ("seq-zero", {"r.toml": recipe(train="max_seq_len = 0")}, [], "{d}/r.toml: train.max_seq_len: must be at least 8, got 0"),
    ("batch-negative", {"r.toml": recipe(train="batch_size = -1")}, [], "{d}/r.toml: train.batch_size: must be at least 1, got -1"),
    ("epochs-zero", {"r.toml": recipe(train="epochs = 0")}, [], "{d}/r.toml: train.epochs: must be greater than 0, got 0.0"),
    ("seq-not-int", {"r.toml": recipe(train="max_seq_len = 25.6")}, [],
     "{d}/r.toml: train.max_seq_len: expected an integer, got a number 25.6"),
    ("test-size-too-big", {"r.toml": recipe(task='name = "emotion"\ntrain_file = "d.jsonl"\ntest_size = 1.5')}, [],
     "{d}/r.toml: task.test_size: must be at most 0.9, got 1.5"),
    ("unknown-method", {"r.toml": recipe(method='name = "qlora4"')}, [],
     "{d}/r.toml: method.name: 'qlora4' is not one of qlora, lora, full"),
    ("unknown-task", {"r.toml": recipe(task='name = "emotions"\ntrain_file = "d.jsonl"')}, [],
     "{d}/r.toml: task.name: unknown task 'emotions'; did you mean `emotion`?"),
    ("unknown-task-option", {"r.toml": recipe(task='name = "hc3"\noptions = { subsett = "baike" }')}, [],
     "{d}/r.toml: task.options.subsett: unknown option for hc3; did you mean `subset`?"),
    ("labels-on-generation-task", {"r.toml": recipe(task='name = "squad-qa"\ntrain_file = "d.json"\nlabels = ["a", "b"]')}, [],
     "{d}/r.toml: task.labels: squad-qa is a generation task; labels are for classification"),
    ("classifier-on-generation-task", {"r.toml": recipe(task='name = "squad-qa"\ntrain_file = "d.json"',
                                                        train='head = "classifier"')}, [],
     "{d}/r.toml: train.head: classifier needs a classification task; squad-qa is generation"),
    ("labels-not-strings", {"r.toml": recipe(task='name = "emotion"\ntrain_file = "d.jsonl"\nlabels = [1, 2]')}, [],
     "{d}/r.toml: task.labels: expected a list of strings, got [1, 2]"),
    ("target-modules-with-full", {"r.toml": recipe(method='name = "full"\ntarget_modules = ["q_proj"]')}, [],
     "{d}/r.toml: method.target_modules: only for lora and qlora; full fine-tuning trains every weight"),
    ("no-data-and-no-hub", {"r.toml": recipe(task='name = "emotion"')}, [],
     "{d}/r.toml: task.train_file: missing; emotion has no hub dataset, so name a data file"),
    ("invalid-toml", {"r.toml": '[model]\nid = "x\n'}, [], "{d}/r.toml: not valid TOML: "),
    ("recipe-missing", {}, [], "{d}/r.toml: no such recipe file (see recipes/ for examples)"),
    ("recipe-is-folder", {"r.toml/x": ""}, [], "Invalid value for 'RECIPE': File '{d}/r.toml' is a directory."),
    ("recipe-not-utf8", {"r.toml": b"[model]\nid = \"caf\xe9\"\n"}, [], "{d}/r.toml: not UTF-8 text"),
    ("set-malformed", {"data.jsonl": GOOD_EMOTION}, ["--set", "lr"],
     "--set 'lr': expected SECTION.KEY=VALUE, e.g. --set train.lr=2e-5"),
    ("set-unknown-key", {"data.jsonl": GOOD_EMOTION}, ["--set", "train.lrate=1e-4"],
     "{d}/r.toml: train.lrate: unknown key; did you mean `lr`?"),
    ("set-bad-value", {"data.jsonl": GOOD_EMOTION}, ["--set", "train.batch_size=0"],
     "{d}/r.toml: train.batch_size: must be at least 1, got 0"),
    ("builtin-other-id", {"r.toml": recipe(model='id = "tiny"\nsource = "builtin"')}, [],
     "{d}/r.toml: model.id: 'tiny' is not a builtin model; known: ftkit/tiny-qwen2, ftkit/smollm2-135m-instruct"),
    ("missing-model-path", {"data.jsonl": GOOD_EMOTION, "r.toml": recipe(model='id = "no/such/model"\nsource = "local"')}, [],
     "model.id: {d}/no/such/model is not a model folder (no config.json); check the path"),
    ("output-dir-exists", {"data.jsonl": GOOD_EMOTION, "out/keep.txt": "a previous run"}, [],
     "output.dir: {d}/out already exists; pass --overwrite or choose another dir"),
    ("interrupted-run-present", {"data.jsonl": GOOD_EMOTION, "out.partial/recipe.toml": "x"}, [],
     "{d}/out.partial holds an interrupted run: continue it with --resume, or pass --overwrite to start over"),
    # --- checkpoints, --overwrite and --resume (issue 18): refused before anything is touched --
    ("save-minutes-negative", {"r.toml": recipe(train="save_minutes = -1")}, [],
     "{d}/r.toml: train.save_minutes: must be at least 0, got -1.0"),
    ("save-minutes-not-a-number", {"r.toml": recipe(train='save_minutes = "10m"')}, [],
     "{d}/r.toml: train.save_minutes: expected a number, got a string '10m'"),
    ("save-steps-negative", {"r.toml": recipe(train="save_steps = -10")}, [],
     "{d}/r.toml: train.save_steps: must be at least 0, got -10"),
    ("overwrite-a-users-folder", {"data.jsonl": GOOD_EMOTION, "out/notes.txt": "mine"}, ["--overwrite"],
     (f"output.dir: {{d}}/out is not a folder ftkit made (no ftkit {RUN_MARK} or {MERGE_MARK}); --overwrite replaces "
      "only those and removed nothing: choose another folder or remove it yourself")),
    ("overwrite-another-tools-manifest", {"data.jsonl": GOOD_EMOTION, "out/manifest.json": '{"name": "my web app"}'},
     ["--overwrite"], "output.dir: {d}/out is not a folder ftkit made"),
    ("overwrite-a-file", {"data.jsonl": GOOD_EMOTION, "out": "a file"}, ["--overwrite"],
     ("output.dir: {d}/out is a file, not a folder ftkit made; --overwrite removed nothing, choose another folder or "
      "remove it yourself")),
    ("overwrite-the-recipes-folder", {"data.jsonl": GOOD_EMOTION}, ["--overwrite", "--set", 'output.dir="."'],
     "output.dir: {d} is the recipe's folder; --overwrite never removes that, choose another folder"),
    ("overwrite-a-folder-holding-the-recipe", {"data.jsonl": GOOD_EMOTION}, ["--overwrite", "--set", 'output.dir=".."'],
     "output.dir: {d.parent} holds the recipe's folder; --overwrite never removes that, choose another folder"),
    ("overwrite-a-partial-not-ftkits", {"data.jsonl": GOOD_EMOTION, "out.partial/mine.txt": "x"}, ["--overwrite"],
     ("output.dir: {d}/out.partial is not an interrupted ftkit run (no recipe.toml); --overwrite removed nothing: "
      "remove it yourself or choose another dir")),
    ("resume-without-a-run", {"data.jsonl": GOOD_EMOTION}, ["--resume"],
     "--resume: no interrupted run in {d}/out.partial; run without --resume"),
    ("resume-a-changed-recipe", {"data.jsonl": GOOD_EMOTION, "out.partial/recipe.toml": "x"}, ["--resume"],
     ("--resume: the recipe differs from the interrupted run's ({d}/out.partial/recipe.toml); resume with the same "
      "recipe and --set values, or start over with --overwrite")),
]


def write_files(folder: Path, files: dict[str, str | bytes]) -> None:
    for name, content in files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")


@pytest.mark.parametrize(("files", "args", "message"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_gives_one_clear_line(tmp_path, files, args, message):
    files = dict(files)
    if "r.toml" not in files and "r.toml/x" not in files and message != "{d}/r.toml: no such recipe file (see recipes/ for examples)":
        files["r.toml"] = recipe()
    write_files(tmp_path, files)
    before = {p for p in tmp_path.rglob("*")}
    result = CliRunner().invoke(main, ["run", str(tmp_path / "r.toml"), *args])
    expected = message.format(d=tmp_path)
    assert result.exit_code in (1, 2), result.output
    lines = result.output.splitlines()
    assert len(lines) == 1 or not lines[0].startswith("Error"), result.output
    error_line = next(line for line in lines if line.startswith("Error: "))
    assert expected in error_line, f"\nexpected: {expected}\n     got: {error_line}"
    assert "Traceback" not in result.output
    created = {p for p in tmp_path.rglob("*")} - before
    assert not created, f"left behind: {sorted(map(str, created))}"


def test_the_corpus_is_large():
    assert len(CASES) >= 80


def test_bom_prefixed_files_are_accepted(tmp_path):
    data = tmp_path / "bom.jsonl"
    data.write_bytes(b"\xef\xbb\xbf" + GOOD_EMOTION.encode())
    result = CliRunner().invoke(main, ["data", "validate", "emotion", str(data), "--json"])
    assert json.loads(result.stdout)["examples"] == 24


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_unreadable_file(tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text(GOOD_EMOTION, encoding="utf-8")
    data.chmod(0)
    (tmp_path / "r.toml").write_text(recipe(), encoding="utf-8")
    result = CliRunner().invoke(main, ["run", str(tmp_path / "r.toml")])
    assert result.exit_code == 1
    assert f"Error: {data}: permission denied; check the file's permissions" in result.output


@pytest.mark.parametrize("which", ["home", "above-home", "current"])
def test_overwrite_never_removes_the_home_or_current_folder(tmp_path, monkeypatch, which):
    home, current = tmp_path / "home" / "me", tmp_path / "work"
    for folder in (home, current, tmp_path / "recipes"):
        folder.mkdir(parents=True)
    (home / RUN_MARK).write_text('{"made_by": "ftkit"}', encoding="utf-8")  # even one that looks like a run
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(current)
    target = {"home": home, "above-home": home.parent, "current": current}[which]
    write_files(tmp_path / "recipes", {"data.jsonl": GOOD_EMOTION,
                                       "r.toml": recipe(output=f"dir = {json.dumps(str(target))}")})
    before = sorted(tmp_path.rglob("*"))
    result = CliRunner().invoke(main, ["run", str(tmp_path / "recipes" / "r.toml"), "--overwrite"])
    what = {"home": "is your home folder", "above-home": "holds your home folder", "current": "is the current folder"}
    assert result.exit_code == 2, result.output
    assert result.output == (f"Error: output.dir: {target} {what[which]}; --overwrite never removes that, choose "
                             "another folder\n")
    assert sorted(tmp_path.rglob("*")) == before


def test_a_resume_without_the_auto_fit_the_run_used_is_told_to_add_it(tmp_path):
    from ftkit.recipe import load_recipe

    write_files(tmp_path, {"data.jsonl": GOOD_EMOTION, "r.toml": recipe()})
    fitted = load_recipe(tmp_path / "r.toml")
    fitted.train.batch_size, fitted.train.grad_accum = 2, 2  # what --auto-fit chose, in the run's recipe.toml
    write_files(tmp_path, {"out.partial/recipe.toml": fitted.to_toml()})
    result = CliRunner().invoke(main, ["run", str(tmp_path / "r.toml"), "--resume"])
    assert result.exit_code == 2, result.output
    assert "(its batch settings came from --auto-fit: resume with --auto-fit)" in result.output
    assert os.listdir(tmp_path / "out.partial") == ["recipe.toml"]
