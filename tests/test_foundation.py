"""The package skeleton: entry-point discovery, the task registry, the CLI's start and its errors."""

from __future__ import annotations

import json
from pathlib import Path
from importlib.metadata import entry_points

import pytest
from click.testing import CliRunner

import ftkit
from ftkit.cli import main
from ftkit.plugins import registered_tasks
from tests.conftest import heavy_imports_after, run_ftkit

BUILTIN = {"emotion", "bank-intent", "hc3", "huanhuan-chat", "squad-qa", "classify", "sft"}

BROKEN_ON_IMPORT = """
raise RuntimeError("boom: this plugin is broken")
"""

DUPLICATE_EMOTION = """
import ftkit
from ftkit_plugins.emotion import TASK
import dataclasses

@ftkit.hookimpl
def register_tasks(register):
    register(dataclasses.replace(TASK, description="an impostor"))
    register(dataclasses.replace(TASK, name="second-task", description="registered after the refusal?"))
"""

WITH_COMMAND = """
import click
import ftkit
from ftkit.errors import FtkitError

@ftkit.hookimpl
def register_commands(cli):
    @cli.command()
    def hello():
        "Say hello from a plugin."
        click.echo("hello from a plugin")

    @cli.command()
    def fail():
        raise FtkitError("the widget is missing: pass --widget")

    @cli.command()
    def crash():
        raise ValueError("unexpected")
"""


def test_builtin_tasks_are_entry_points_in_group_ftkit():
    found = {ep.name: ep for ep in entry_points(group="ftkit")}
    assert BUILTIN <= set(found)
    assert all(found[name].dist.name == "ftkit" for name in BUILTIN)


def test_registry_holds_the_five_builtin_tasks_with_their_metadata():
    tasks = registered_tasks()
    assert BUILTIN <= set(tasks)
    emotion, owner = tasks["emotion"]
    assert owner == "emotion"
    assert emotion.labels == ("喜悅", "悲傷", "憤怒", "恐懼", "驚訝", "厭惡")
    assert tasks["bank-intent"][0].labels is None  # every bank's own intents: labels from the data
    assert [f.name for f in tasks["bank-intent"][0].fields] == ["text", "label"]
    assert tasks["hc3"][0].group_by == "question" and tasks["squad-qa"][0].group_by == "context"
    assert tasks["hc3"][0].hub_dataset == "modelscope:simpleai/HC3-Chinese"
    assert {tasks[n][0].kind for n in ("huanhuan-chat", "squad-qa")} == {"generation"}


def test_version():
    result = CliRunner().invoke(main, ["--version"])
    assert result.exit_code == 0
    assert result.output == f"ftkit, version {ftkit.__version__}\n"


def test_help_teaches_with_examples():
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    for expected in ("$ ftkit tasks", "FTKIT_LOAD_PLUGINS", "tasks", "plugins", "--debug"):
        assert expected in result.output


@pytest.mark.parametrize("args", [["--help"], ["--version"], ["run", "--help"], ["tasks"]])
def test_a_reader_gone_before_any_output_is_a_quiet_success(args):
    """`ftkit --help | true`: the pipe's reader exits first; the CLI stops quietly with status 0."""
    import os
    import subprocess
    import sys

    read_end, write_end = os.pipe()
    os.close(read_end)  # every write into the pipe now fails with EPIPE, as after `true` exits
    try:
        done = subprocess.run([sys.executable, "-m", "ftkit", *args], stdout=write_end, stderr=subprocess.PIPE,
                              text=True, timeout=60, check=False)
    finally:
        os.close(write_end)
    assert (done.returncode, done.stderr) == (0, "")


def test_tasks_table_lists_builtin_tasks():
    result = CliRunner().invoke(main, ["tasks"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split() == ["NAME", "KIND", "LABELS", "METRIC", "PLUGIN", "DESCRIPTION"]
    names = {line.split()[0] for line in lines[1:]}
    assert BUILTIN <= names


def test_tasks_json_is_stable():
    result = CliRunner().invoke(main, ["tasks", "--json"])
    assert result.exit_code == 0
    data = {t["name"]: t for t in json.loads(result.stdout)}
    assert BUILTIN <= set(data)
    assert data["emotion"]["labels"] == ["喜悅", "悲傷", "憤怒", "恐懼", "驚訝", "厭惡"]
    assert data["bank-intent"]["headline_metric"] == "macro_f1"
    assert set(data["squad-qa"]) == {
        "name", "kind", "description", "labels", "headline_metric", "default_head",
        "hub_dataset", "data_format", "options", "fields", "group_by", "plugin",
    }
    assert data["squad-qa"]["group_by"] == "context"
    assert [f["name"] for f in data["emotion"]["fields"]] == ["text", "label"]
    assert data["emotion"]["fields"][1]["aliases"] == ["emotion", "output"]


def test_tasks_show_and_unknown_task():
    runner = CliRunner()
    shown = runner.invoke(main, ["tasks", "show", "hc3"])
    assert shown.exit_code == 0
    assert "labels:          human, chatgpt" in shown.output
    unknown = runner.invoke(main, ["tasks", "show", "emotin"])
    assert unknown.exit_code == 2
    assert unknown.output == (
        "Error: unknown task 'emotin': did you mean 'emotion'? `ftkit tasks` lists the installed ones\n"
    )


def test_plugins_json_lists_builtin_plugins_with_hooks():
    result = CliRunner().invoke(main, ["plugins", "--json"])
    assert result.exit_code == 0
    data = {p["name"]: p for p in json.loads(result.stdout)}
    assert BUILTIN <= set(data)
    assert data["emotion"]["distribution"] == "ftkit"
    assert data["emotion"]["version"] == ftkit.__version__
    assert data["emotion"]["hooks"] == ["register_tasks"]
    assert data["emotion"]["ok"] is True


@pytest.mark.parametrize("args", [["--help"], ["tasks"], ["tasks", "--json"], ["plugins"], ["tasks", "show", "emotion"]])
def test_light_commands_import_no_heavy_package(args):
    assert heavy_imports_after(args) == []


def test_a_plugin_that_raises_on_import_is_reported_and_skipped(plugin_path):
    env = plugin_path("ftkit-broken", {"broken": BROKEN_ON_IMPORT})
    listed = run_ftkit("tasks", env=env)
    assert listed.returncode == 0, listed.stderr
    assert BUILTIN <= {line.split()[0] for line in listed.stdout.splitlines()[1:]}
    assert "Warning: plugin 'broken' is broken and was skipped: failed to load: RuntimeError: boom" in listed.stderr

    report = run_ftkit("plugins", "--json", env=env)
    assert report.returncode == 0
    data = {p["name"]: p for p in json.loads(report.stdout)}
    assert data["broken"]["ok"] is False
    assert data["broken"]["distribution"] == "ftkit-broken"
    assert data["broken"]["version"] == "1.2.3"
    assert data["broken"]["errors"] == ["failed to load: RuntimeError: boom: this plugin is broken"]
    assert all(data[name]["ok"] for name in BUILTIN)

    table = run_ftkit("plugins", env=env)
    assert "BROKEN: failed to load: RuntimeError: boom" in table.stdout


def test_duplicate_task_name_is_refused_naming_both_plugins(plugin_path):
    env = plugin_path("ftkit-dupe", {"dupe": DUPLICATE_EMOTION})
    report = run_ftkit("plugins", "--json", env=env)
    data = {p["name"]: p for p in json.loads(report.stdout)}
    assert data["dupe"]["errors"] == [
        "register_tasks: task 'emotion' from plugin 'dupe' refused: "
        "plugin 'emotion' already registers a task of that name"
    ]
    listed = json.loads(run_ftkit("tasks", "--json", env=env).stdout)
    emotion = next(t for t in listed if t["name"] == "emotion")
    assert emotion["plugin"] == "emotion"
    assert "an impostor" not in json.dumps(listed)


def test_FTKIT_LOAD_PLUGINS_narrows_what_loads(plugin_path):
    env = plugin_path("ftkit-broken", {"broken": BROKEN_ON_IMPORT})
    only = run_ftkit("tasks", "--json", env={**env, "FTKIT_LOAD_PLUGINS": "emotion,hc3"})
    assert [t["name"] for t in json.loads(only.stdout)] == ["emotion", "hc3"]
    assert only.stderr == ""  # the broken plugin was not even imported
    by_distribution = run_ftkit("plugins", "--json", env={**env, "FTKIT_LOAD_PLUGINS": "ftkit-broken"})
    assert [p["name"] for p in json.loads(by_distribution.stdout)] == ["broken"]
    none = run_ftkit("tasks", env={"FTKIT_LOAD_PLUGINS": ""})
    assert none.stdout.startswith("No tasks installed.")


def test_plugin_commands_and_one_line_errors(plugin_path):
    env = plugin_path("ftkit-cmds", {"cmds": WITH_COMMAND})
    hello = run_ftkit("hello", env=env)
    assert (hello.returncode, hello.stdout) == (0, "hello from a plugin\n")
    assert "hello" in run_ftkit("--help", env=env).stdout

    fail = run_ftkit("fail", env=env)
    assert (fail.returncode, fail.stdout, fail.stderr) == (1, "", "Error: the widget is missing: pass --widget\n")

    crash = run_ftkit("crash", env=env)
    assert crash.returncode == 1
    assert crash.stderr.startswith("Error: internal error: ValueError: unexpected (run again with `ftkit --debug")
    assert "Traceback" not in crash.stderr

    debug = run_ftkit("--debug", "fail", env=env)
    assert debug.returncode == 1
    assert "Traceback (most recent call last)" in debug.stderr
    assert "FtkitError: the widget is missing" in debug.stderr


def test_task_contract_rejects_malformed_tasks():
    import dataclasses

    from ftkit_plugins.emotion import TASK

    from ftkit.errors import PluginError

    with pytest.raises(PluginError) as raised:
        dataclasses.replace(TASK, name="Bad Name", labels=("only-one",), metrics=None).check()
    message = str(raised.value)
    assert "`name` 'Bad Name' must be lower-case" in message
    assert "two or more distinct names" in message
    assert "`metrics` must be callable" in message


@pytest.mark.parametrize("args", [["run", "recipes/tiny.toml", "--dry-run"],
                                  ["data", "validate", "emotion", "plugins/data/emotion_quickstart.jsonl"]])
def test_data_commands_read_through_datasets_without_torch(args):
    """A dry run loads and checks the data (through datasets) but loads no model library."""
    root = Path(__file__).resolve().parents[1]
    assert heavy_imports_after([str(root / a) if a.endswith((".toml", ".jsonl")) else a for a in args]) == ["datasets"]
