"""Third-party task plugins: `ftkit new-task`, the kit `ftkit.testing`, `ftkit plugins check`, docs/plugins.md.

The acceptance tests scaffold a plugin, pip-install it into this environment (a real install,
removed afterwards even on failure), and drive it through the real CLI in subprocesses.
"""

from __future__ import annotations

import inspect
import json
import re
import subprocess
import sys
import types
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from ftkit import hookspecs, testing
from ftkit.cli import main
from ftkit.plugins import register_plugin, register_plugin_commands, unregister_plugin
from ftkit.tasks import Example, Task
from tests.conftest import heavy_imports_after, run_ftkit

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
DOC = ROOT / "docs" / "plugins.md"
NAME = "kit-sentiment"  # unlikely to clash with a task another test or engineer installs
DIST = f"ftkit-task-{NAME}"
PACKAGE = DIST.replace("-", "_")
SCAFFOLD_FILES = ["pyproject.toml", "README.md", "recipe.toml", ".gitignore", f"src/{PACKAGE}/__init__.py",
                  f"src/{PACKAGE}/sample.jsonl", "tests/test_task.py"]


def pip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True, timeout=300,
                          check=False)


# -- ftkit new-task ------------------------------------------------------------------------------


def test_new_task_writes_a_complete_package(tmp_path):
    target = tmp_path / "pkg"
    result = CliRunner().invoke(main, ["new-task", NAME, "--dir", str(target)])
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"Created {target} (distribution {DIST}, package {PACKAGE}, task {NAME}):\n")
    written = sorted(str(p.relative_to(target)) for p in target.rglob("*") if p.is_file())
    assert written == sorted(SCAFFOLD_FILES)
    pyproject = (target / "pyproject.toml").read_text(encoding="utf-8")
    assert f'[project.entry-points.ftkit]\n{NAME} = "{PACKAGE}"' in pyproject
    assert "[tool.pytest.ini_options]" in pyproject
    recipe = (target / "recipe.toml").read_text(encoding="utf-8")
    assert 'id = "ftkit/tiny-qwen2"' in recipe and 'head = "classifier"' in recipe
    assert f'train_file = "src/{PACKAGE}/sample.jsonl"' in recipe
    rows = [json.loads(line) for line in (target / "src" / PACKAGE / "sample.jsonl").read_text().splitlines()]
    assert len(rows) == 40 and {r["label"] for r in rows} == {"positive", "negative"}
    assert "{{" not in "".join(p.read_text(encoding="utf-8") for p in target.rglob("*") if p.is_file())


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["new-task", "My_Task"],
         "Error: task name 'My_Task': use lower-case letters, digits and single dashes, e.g. `my-task`\n"),
        (["new-task", "bad--name"],
         "Error: task name 'bad--name': use lower-case letters, digits and single dashes, e.g. `my-task`\n"),
        (["new-task", "emotion"],
         "Error: task name 'emotion': plugin 'emotion' already registers a task of that name; choose another\n"),
    ],
)
def test_new_task_refuses_bad_and_taken_names(tmp_path, args, message):
    result = CliRunner().invoke(main, [*args, "--dir", str(tmp_path / "pkg")])
    assert (result.exit_code, result.output) == (2, message)
    assert not (tmp_path / "pkg").exists()


def test_new_task_refuses_a_non_empty_folder_but_fills_an_empty_one(tmp_path):
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine", encoding="utf-8")
    refused = CliRunner().invoke(main, ["new-task", NAME, "--dir", str(full)])
    assert (refused.exit_code, refused.output) == (
        2, f"Error: {full}: already exists and is not an empty folder; choose another --dir\n")
    assert [p.name for p in full.iterdir()] == ["keep.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert CliRunner().invoke(main, ["new-task", NAME, "--dir", str(empty)]).exit_code == 0


def test_new_task_help_has_examples_and_imports_no_heavy_package(tmp_path):
    help_text = CliRunner().invoke(main, ["new-task", "--help"]).output
    assert "$ ftkit new-task movie-sentiment" in help_text and "--dir PATH" in help_text
    assert heavy_imports_after(["new-task", NAME, "--dir", str(tmp_path / "pkg")]) == []
    assert (tmp_path / "pkg" / "pyproject.toml").is_file()


# -- the scaffold, installed for real ------------------------------------------------------------


@pytest.fixture(scope="module")
def installed_scaffold(tmp_path_factory):
    """The scaffolded package, pip-installed (not editable) into this environment; uninstalled after."""
    pip("uninstall", "-y", DIST)  # a run killed before its finalizer would block the name
    folder = tmp_path_factory.mktemp("scaffold") / DIST
    made = run_ftkit("new-task", NAME, "--dir", str(folder))
    assert made.returncode == 0, made.stderr
    try:
        done = pip("install", "--no-build-isolation", "--no-deps", "--no-index", "-q", str(folder))
        assert done.returncode == 0, done.stderr[-3000:]
        yield folder
    finally:
        pip("uninstall", "-y", DIST)


@pytest.mark.slow
def test_installed_scaffold_is_listed_passes_the_checks_and_trains(installed_scaffold, tmp_path):
    listed = run_ftkit("tasks", "--json")
    assert listed.returncode == 0, listed.stderr
    task = next(t for t in json.loads(listed.stdout) if t["name"] == NAME)
    assert task["plugin"] == NAME and task["labels"] == ["positive", "negative"]

    checked = run_ftkit("plugins", "check", NAME)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    lines = checked.stdout.splitlines()
    assert [line.split()[:2] for line in lines[:-1]] == [
        ["✓", "registers"], ["✓", "data"], ["✓", "loader"], ["✓", "format"], ["✓", "metrics"], ["✓", "trains"]]
    assert f"task '{NAME}' (classification) from plugin '{NAME}', {DIST} 0.1.0" in lines[0]
    assert lines[-1] == f"{NAME}: all 6 checks passed"

    out = tmp_path / "run"
    run = run_ftkit("run", str(installed_scaffold / "recipe.toml"), "--set", f"output.dir={json.dumps(str(out))}")
    assert run.returncode == 0, run.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert (metrics["task"], metrics["model"], metrics["head"], metrics["steps"]) == (
        NAME, "ftkit/tiny-qwen2", "classifier", 6)
    assert metrics["train_examples"] == 30 and metrics["test_examples"] == 10
    assert 0.0 <= metrics["finetuned"]["macro_f1"] <= 1.0


@pytest.mark.slow
def test_the_scaffolds_own_tests_pass_in_its_folder(installed_scaffold):
    done = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q"], cwd=installed_scaffold,
                          capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert re.search(r"\b6 passed\b", done.stdout), done.stdout[-2000:]


# -- the kit and `ftkit plugins check` on real tasks ---------------------------------------------


@pytest.mark.parametrize(
    ("name", "data"),
    [("bank-intent", FIXTURES / "bank_intent.jsonl"), ("hc3", FIXTURES / "hc3_sample.jsonl"),
     ("huanhuan-chat", FIXTURES / "huanhuan.json"), ("squad-qa", FIXTURES / "squad_v1.json")],
)
def test_the_builtin_tasks_pass_the_kit(name, data):
    results = testing.run_all(name, data, train=False)
    assert [(r.name, r.ok) for r in results] == [
        ("registers", True), ("data", True), ("loader", True), ("format", True), ("metrics", True)], results


def test_plugins_check_json_and_its_exit_code():
    passed = CliRunner().invoke(main, ["plugins", "check", "hc3", "--data", str(FIXTURES / "hc3_sample.jsonl"),
                                       "--no-train", "--json"])
    assert passed.exit_code == 0, passed.output
    report = json.loads(passed.stdout)
    assert report["task"] == "hc3" and report["ok"] is True
    assert report["checks"][2] == {"name": "loader", "ok": True, "message": "12 rows from hc3_sample.jsonl, keys "
                                   "answer, label, question"}
    failed = CliRunner().invoke(main, ["plugins", "check", "sft", "--no-train"])
    assert failed.exit_code == 1
    assert failed.output.splitlines()[1:] == [
        ("✗ data       task 'sft' declares no `sample_data`: pass a data file "
         "(`ftkit plugins check NAME --data FILE`, or the `data_path` argument)"),
        "sft: 1 check failed",
    ]
    sampled = CliRunner().invoke(main, ["plugins", "check", "emotion", "--no-train"])
    assert sampled.exit_code == 0, sampled.output  # the bundled quickstart data is its sample
    unknown = CliRunner().invoke(main, ["plugins", "check", "emotin", "--no-train"])
    assert unknown.exit_code == 1
    assert "✗ registers  no task 'emotin' is registered; did you mean 'emotion'?" in unknown.output


def _rows_loader(rows):
    def load(path=None, **options):
        return [dict(r) for r in rows]

    return load


def _task(**changes) -> Task:
    fields = {"name": "kit-broken", "description": "a task that breaks one rule", "kind": "classification",
              "labels": ("yes", "no"), "headline_metric": "accuracy", "default_head": "classifier",
              "load": _rows_loader([{"text": "a", "label": "yes"}, {"text": "b", "label": "no"}]),
              "format": lambda row: Example(input=row["text"], target=row["label"]),
              "metrics": lambda p, r: {"accuracy": sum(x == y[0] for x, y in zip(p, r)) / len(p)}}
    return Task(**{**fields, **changes})


def test_kit_failures_say_what_is_wrong(tmp_path):
    data = tmp_path / "rows.jsonl"
    data.write_text("{}\n", encoding="utf-8")  # the tasks below load from memory; the path must only exist
    with pytest.raises(AssertionError, match=r"row 1 has \['label', 'txt'\], most have \['label', 'text'\]"):
        testing.check_loader(_task(load=_rows_loader([{"text": "a", "label": "yes"}, {"txt": "b", "label": "no"}])),
                             data)
    with pytest.raises(AssertionError, match="loader yielded 0 row"):
        testing.check_loader(_task(load=_rows_loader([])), data)

    def mutating(row):
        row["seen"] = True
        return Example(input=row["text"], target=row["label"])

    rows = [{"text": "a", "label": "yes"}, {"text": "b", "label": "no"}]
    with pytest.raises(AssertionError, match="`format` changed the row it was given"):
        testing.check_format_roundtrip(_task(format=mutating), rows)
    with pytest.raises(AssertionError, match="target 'maybe' is not one of the labels yes, no"):
        testing.check_format_roundtrip(_task(), [{"text": "a", "label": "maybe"}])
    with pytest.raises(AssertionError, match=r"the target 'x' is not among the references \('y',\)"):
        testing.check_format_roundtrip(_task(format=lambda r: Example(input="a", target="x", references=("y",))),
                                       rows)

    examples = [Example(input="a", target="yes"), Example(input="b", target="no")]
    with pytest.raises(AssertionError, match=r"accuracy on gold predictions is 0.5, expected the maximum \(1 or 100\)"):
        testing.check_metrics_max_on_gold(_task(metrics=lambda p, r: {"accuracy": 0.5}), examples)
    with pytest.raises(AssertionError, match="metrics\\(\\) has no 'accuracy' \\(the headline_metric\\); got f1"):
        testing.check_metrics_max_on_gold(_task(metrics=lambda p, r: {"f1": 1.0}), examples)
    with pytest.raises(AssertionError, match="accuracy on wrong predictions is 1.0, not below its 1.0 on gold"):
        testing.check_metrics_max_on_gold(_task(metrics=lambda p, r: {"accuracy": 1.0}), examples)
    assert testing.check_metrics_max_on_gold(_task(), examples) == (1.0, 0.0)


def test_run_all_reports_a_plugin_registered_in_process_and_stops_at_the_first_failure():
    module = types.ModuleType("kit_broken_plugin")
    exec(  # noqa: S102 - a real plugin module, built here so the test needs no installed package
        "import ftkit\n"
        "@ftkit.hookimpl\n"
        "def register_tasks(register):\n"
        "    register(TASK)\n",
        module.__dict__,
    )
    module.TASK = _task(metrics=lambda p, r: {"accuracy": 0.5})
    register_plugin(module, "kit-broken")
    try:
        results = testing.run_all("kit-broken", FIXTURES / "bank_intent.jsonl", train=False)
    finally:
        unregister_plugin("kit-broken")
    assert [(r.name, r.ok) for r in results] == [
        ("registers", True), ("data", True), ("loader", True), ("format", True), ("metrics", False)]
    assert results[-1].message == ("task 'kit-broken': accuracy on gold predictions is 0.5, expected the maximum "
                                   "(1 or 100)")


# -- docs/plugins.md -----------------------------------------------------------------------------


def hook_specs() -> dict[str, object]:
    return {name: fn for name, fn in inspect.getmembers(hookspecs, inspect.isfunction) if hasattr(fn, "ftkit_spec")}


def spec_signature(fn) -> str:  # noqa: ANN001
    """``name(arg: Type, ...) -> Type`` as written in hookspecs.py (annotations are strings there)."""
    signature = inspect.signature(fn)
    params = ", ".join(f"{p.name}: {p.annotation}" for p in signature.parameters.values())
    return f"{fn.__name__}({params}) -> {signature.return_annotation}"


def python_block(text: str, needle: str) -> str:
    """The first ```python block of the doc that contains ``needle``."""
    return next(block for block in re.findall(r"```python\n(.*?)```", text, re.DOTALL) if needle in block)


def test_every_hook_is_documented_with_its_signature():
    text = DOC.read_text(encoding="utf-8")
    specs = hook_specs()
    assert {"register_tasks", "register_commands"} <= set(specs)
    for name, fn in specs.items():
        assert f"### `{name}`" in text, f"docs/plugins.md has no section for the hook {name}"
        assert spec_signature(fn) in text, f"docs/plugins.md lacks the signature {spec_signature(fn)}"
        assert f"def {name}(" in text, f"docs/plugins.md has no example implementing {name}"


def test_every_task_field_and_kit_function_is_documented():
    import dataclasses

    text = DOC.read_text(encoding="utf-8")
    for field in dataclasses.fields(Task):
        assert f"| `{field.name}` |" in text, f"the Task field {field.name} is not in the contract table"
    for name in ("check_registers", "check_loader", "check_format_roundtrip", "check_metrics_max_on_gold",
                 "check_trains", "run_all"):
        assert f"`{name}(" in text, f"ftkit.testing.{name} is not documented"
    assert "ftkit new-task NAME [--dir PATH]" in text and "ftkit plugins check" in text


def test_the_documented_hook_examples_run(tmp_path):
    text = DOC.read_text(encoding="utf-8")
    tasks_module = types.ModuleType("doc_spam_plugin")
    exec(python_block(text, "def register_tasks("), tasks_module.__dict__)  # noqa: S102 - the doc's own code
    commands_module = types.ModuleType("doc_hello_plugin")
    exec(python_block(text, "def register_commands("), commands_module.__dict__)  # noqa: S102
    data = tmp_path / "spam.jsonl"
    data.write_text('{"text": "WIN A PRIZE", "label": "spam"}\n{"text": "lunch at 1?", "label": "ham"}\n',
                    encoding="utf-8")
    register_plugin(tasks_module, "doc-spam")
    register_plugin(commands_module, "doc-hello")
    try:
        results = testing.run_all("spam", data, train=False)
        assert all(r.ok for r in results), results
        group = click.Group("ftkit")
        register_plugin_commands(group)
        hello = CliRunner().invoke(group, ["hello", "world"])
        assert (hello.exit_code, hello.output) == (0, "hello, world\n")
    finally:
        unregister_plugin("doc-spam")
        unregister_plugin("doc-hello")
