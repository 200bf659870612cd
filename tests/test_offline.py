"""Hub models and datasets offline: a fast one-line error, caches left as they were, the model located up front.

The hub is made unreachable without relying on this machine's network: its endpoint points at a
closed local port (or at a local server that answers 404), and the caches are empty temporary
folders. Nothing here downloads anything.
"""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from ftkit import hub
from ftkit.cli import main
from ftkit.modeling import model_location
from ftkit.recipe import load_recipe
from tests.conftest import heavy_imports_after

ROOT = Path(__file__).resolve().parents[1]
EMOTION = ROOT / "recipes" / "emotion.toml"  # Qwen/Qwen2.5-1.5B-Instruct from ModelScope
CLOSED_PORT = "http://127.0.0.1:9"  # discard: nothing listens there, so connecting is refused at once
HF_MODEL = "HuggingFaceTB/SmolLM2-135M"
#: Loose: before ftkit checked the hub first, this took 12.6 s against a closed port (28 s where DNS
#: fails) in ModelScope's retries; now about 1.5 s.
SLOW_S = 10


def paths_under(folder: Path) -> set[Path]:
    return set(folder.rglob("*")) | ({folder} if folder.exists() else set())


def hub_recipe(tmp_path: Path, model_id: str, source: str) -> Path:
    recipe = tmp_path / f"{source}.toml"
    data = json.dumps(str(ROOT / "plugins" / "data" / "emotion_quickstart.jsonl"))
    recipe.write_text(f'[model]\nid = "{model_id}"\nsource = "{source}"\n[task]\nname = "emotion"\n'
                      f"train_file = {data}\n[output]\ndir = {json.dumps(str(tmp_path / 'run'))}\n", encoding="utf-8")
    return recipe


@pytest.fixture
def caches(tmp_path, monkeypatch) -> dict[str, Path]:
    """Empty ModelScope and Hugging Face caches (in this process and the ftkit processes it starts)."""
    folders = {"MODELSCOPE_CACHE": tmp_path / "modelscope", "MODELSCOPE_HOME": tmp_path / "modelscope-home",
               "HF_HOME": tmp_path / "huggingface"}
    for name, folder in folders.items():
        monkeypatch.setenv(name, str(folder))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    return folders


def online_env(**env: str) -> dict[str, str]:
    """This process's environment with the hub libraries allowed online (conftest turns them offline)."""
    return {k: v for k, v in os.environ.items() if not k.endswith("_OFFLINE")} | env


def run_online(*args: str, **env: str) -> tuple[subprocess.CompletedProcess, float]:
    """``ftkit ARGS`` with the hub libraries allowed online, and its time."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "ftkit", *args], capture_output=True, text=True,
                          env=online_env(**env), timeout=300, check=False)
    return done, time.perf_counter() - started


def assert_one_line_error(done: subprocess.CompletedProcess, start: str) -> None:
    assert done.returncode == 1, done.stderr
    error = done.stderr.strip().splitlines()[-1]
    assert error.startswith(f"Error: {start}"), done.stderr
    assert done.stderr.count("Error:") == 1 and "WARNING" not in done.stderr and "Traceback" not in done.stderr


# -- an unreachable hub ---------------------------------------------------------------------------

def test_offline_modelscope_run_fails_in_seconds_and_leaves_the_caches_as_they_were(caches, tmp_path):
    before = {folder: paths_under(folder) for folder in caches.values()}
    done, seconds = run_online("run", str(EMOTION), "--set", f"output.dir={json.dumps(str(tmp_path / 'run'))}",
                               MODELSCOPE_ENDPOINT=CLOSED_PORT)
    print(f"offline ModelScope run failed after {seconds:.1f} s")
    assert_one_line_error(done, "model.id: 'Qwen/Qwen2.5-1.5B-Instruct' is not in the ModelScope cache and "
                                "127.0.0.1:9 cannot be reached (Connection refused); offline? download it")
    assert seconds < SLOW_S
    assert {folder: paths_under(folder) for folder in caches.values()} == before
    assert not (tmp_path / "run").exists() and not (tmp_path / "run.partial").exists()


def test_offline_hugging_face_run_fails_in_seconds_and_leaves_the_cache_as_it_was(caches, tmp_path):
    recipe = hub_recipe(tmp_path, HF_MODEL, "huggingface")
    done, seconds = run_online("run", str(recipe), HF_ENDPOINT=CLOSED_PORT)
    print(f"offline Hugging Face run failed after {seconds:.1f} s")
    assert_one_line_error(done, f"model.id: {HF_MODEL!r} is not in the Hugging Face cache and 127.0.0.1:9 "
                                "cannot be reached (Connection refused); download it first")
    assert seconds < SLOW_S
    assert not caches["HF_HOME"].exists()


@pytest.fixture
def not_found_server():
    """A hub that is there but answers 404 to everything: the download starts, then fails."""

    class NotFound(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_error(404)

        do_HEAD = do_POST = do_GET

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotFound)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_a_failed_modelscope_download_removes_only_what_it_created(caches, not_found_server, tmp_path):
    # Someone else's cached model and credentials: they must survive the cleanup.
    other = caches["MODELSCOPE_CACHE"] / "models" / "Org--Other" / "snapshots" / "master" / "config.json"
    other.parent.mkdir(parents=True)
    other.write_text("{}", encoding="utf-8")
    (caches["MODELSCOPE_HOME"] / "credentials").mkdir(parents=True)
    (caches["MODELSCOPE_HOME"] / "credentials" / "git_token").write_text("x", encoding="utf-8")
    before = {folder: paths_under(folder) for folder in caches.values()}
    done, _ = run_online("run", str(EMOTION), "--set", f"output.dir={json.dumps(str(tmp_path / 'run'))}",
                         MODELSCOPE_ENDPOINT=not_found_server)
    assert_one_line_error(done, "model.id: could not download 'Qwen/Qwen2.5-1.5B-Instruct' from ModelScope")
    # ModelScope had made models/Qwen--Qwen2.5-1.5B-Instruct/snapshots/master/ and credentials/session.
    assert {folder: paths_under(folder) for folder in caches.values()} == before


def test_removed_on_failure_keeps_what_was_there_and_what_names_another_model(tmp_path):
    cache = tmp_path / "cache"
    (cache / "models").mkdir(parents=True)
    (cache / "models" / "kept.txt").write_text("old", encoding="utf-8")
    with pytest.raises(OSError, match="network down"), hub.removed_on_failure(cache, ("Qwen2.5-0.5B",)):
        (cache / "models" / "Qwen--Qwen2.5-0.5B" / "snapshots" / "master").mkdir(parents=True)
        (cache / ".locks" / "Qwen--Qwen2.5-0.5B").mkdir(parents=True)
        (cache / "models" / "Org--Other").mkdir()  # another process's download, meanwhile
        raise OSError("network down")
    assert paths_under(cache) == {cache, cache / "models", cache / "models" / "kept.txt",
                                  cache / "models" / "Org--Other"}
    with hub.removed_on_failure(tmp_path / "new"):  # a download that succeeds keeps everything
        (tmp_path / "new" / "model").mkdir(parents=True)
    assert (tmp_path / "new" / "model").is_dir()


# -- where the model is, without the network ------------------------------------------------------

MS_LAYOUTS = [  # where modelscope 1.40 looks for Qwen/Qwen2.5-0.5B offline
    "models/Qwen--Qwen2.5-0.5B/snapshots/master",
    "models/Qwen--Qwen2.5-0.5B/snapshots/v1.0",  # the only snapshot
    "models/Qwen/Qwen2___5-0___5B",
    "hub/models/Qwen/Qwen2___5-0___5B",
    "Qwen/Qwen2.5-0.5B",
    "hub/Qwen/Qwen2___5-0___5B",
]


@pytest.mark.parametrize("layout", MS_LAYOUTS)
def test_modelscope_cache_lookup_finds_what_modelscope_itself_finds(caches, layout):
    from modelscope import snapshot_download

    folder = caches["MODELSCOPE_CACHE"] / layout
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}", encoding="utf-8")
    assert hub.modelscope_cached_model("Qwen/Qwen2.5-0.5B") == folder
    # cache_dir: modelscope reads $MODELSCOPE_CACHE once per process
    theirs = snapshot_download("Qwen/Qwen2.5-0.5B", local_files_only=True, cache_dir=caches["MODELSCOPE_CACHE"])
    assert Path(theirs) == folder


def test_hugging_face_cache_lookup_finds_what_huggingface_hub_finds(caches):
    from huggingface_hub import snapshot_download

    repo = caches["HF_HOME"] / "hub" / f"models--{HF_MODEL.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123abcd", encoding="utf-8")
    (repo / "snapshots" / "0123abcd").mkdir(parents=True)
    (repo / "snapshots" / "0123abcd" / "config.json").write_text("{}", encoding="utf-8")
    assert hub.huggingface_cached_model(HF_MODEL) == repo / "snapshots" / "0123abcd"
    assert hub.huggingface_cached_model(HF_MODEL, "0123abcd") == repo / "snapshots" / "0123abcd"
    assert hub.huggingface_cached_model(HF_MODEL, "v2") is None
    theirs = snapshot_download(HF_MODEL, local_files_only=True, cache_dir=repo.parent)  # $HF_HOME read at import
    assert Path(theirs) == repo / "snapshots" / "0123abcd"


def test_model_location_names_builtin_local_cached_and_download(caches, tmp_path):
    emotion = load_recipe(EMOTION)
    assert model_location(emotion).startswith(
        f"needs a download from ModelScope (not in its cache {caches['MODELSCOPE_CACHE']}")
    snapshot = caches["MODELSCOPE_CACHE"] / "models" / "Qwen--Qwen2.5-1.5B-Instruct" / "snapshots" / "master"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}", encoding="utf-8")
    assert model_location(emotion) == f"cached: {snapshot}"
    hf = load_recipe(hub_recipe(tmp_path, HF_MODEL, "huggingface"))
    assert model_location(hf).startswith("needs a download from the Hugging Face hub")
    local = load_recipe(EMOTION, ['model.source="local"', f"model.id={json.dumps(str(snapshot))}"])
    assert model_location(local) == f"local folder {snapshot}"
    assert model_location(load_recipe(ROOT / "recipes" / "tiny.toml")).startswith("built in")


def test_validate_and_dry_run_say_where_the_model_is_without_importing_torch(caches):
    validated = CliRunner().invoke(main, ["validate", str(EMOTION)])
    assert validated.exit_code == 0, validated.output
    assert validated.output.splitlines()[1] == (
        f"model: needs a download from ModelScope (not in its cache {caches['MODELSCOPE_CACHE']})")
    dry = CliRunner().invoke(main, ["run", str(EMOTION), "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert "# model (modelscope Qwen/Qwen2.5-1.5B-Instruct): needs a download from ModelScope" in dry.output
    as_json = CliRunner().invoke(main, ["run", str(EMOTION), "--dry-run", "--json"])
    assert as_json.exit_code == 0, as_json.output
    assert json.loads(as_json.stdout)["model_location"].startswith("needs a download from ModelScope")
    assert heavy_imports_after(["validate", str(EMOTION)]) == []
    assert heavy_imports_after(["run", str(EMOTION), "--dry-run"]) == ["datasets"]


# -- hub datasets ---------------------------------------------------------------------------------

SQUAD = ROOT / "recipes" / "squad-qa.toml"  # with no train_file: huggingface:rajpurkar/squad
HC3 = ROOT / "recipes" / "hc3.toml"  # modelscope:simpleai/HC3-Chinese


def test_an_unreachable_hub_dataset_fails_in_seconds_with_one_line(caches):
    done, seconds = run_online("run", str(SQUAD), "--set", 'task.train_file=""', "--dry-run",
                               HF_ENDPOINT=CLOSED_PORT)
    print(f"offline hub dataset failed after {seconds:.1f} s")  # 24.7 s of retries before ftkit checked
    assert_one_line_error(done, "huggingface:rajpurkar/squad (subset None, split 'train') is not in the datasets "
                                "cache and 127.0.0.1:9 cannot be reached (Connection refused); download the data")
    assert "Retrying" not in done.stderr
    assert seconds < SLOW_S


def test_a_hub_dataset_in_offline_mode_says_so(tmp_path, monkeypatch):
    """conftest sets HF_HUB_OFFLINE, as a user working offline would: no connection is tried."""
    from ftkit.errors import DataError

    monkeypatch.setattr("datasets.config.HF_DATASETS_CACHE", str(tmp_path))
    with pytest.raises(DataError) as raised:
        hub.load_hub_rows("huggingface:someone/nothing-here", split="test")
    assert str(raised.value) == (
        "huggingface:someone/nothing-here (subset None, split 'test') is not in the datasets cache and offline "
        "mode is on (HF_HUB_OFFLINE or HF_DATASETS_OFFLINE); download the data on a connected machine and set "
        "task.train_file to the file")


CACHE_A_HUB_DATASET = """
import glob, json, os, shutil, sys
import datasets
cache, rows = sys.argv[1], os.path.join(sys.argv[1], "rows.jsonl")
os.makedirs(cache)
with open(rows, "w") as handle:
    handle.write(json.dumps({"id": "1", "title": "T", "context": "Paris is the capital of France.",
                             "question": "What is the capital of France?",
                             "answers": {"text": ["Paris"], "answer_start": [0]}}) + "\\n")
datasets.load_dataset("json", data_files=rows, split="train")
(built,) = [p for p in glob.glob(os.path.join(cache, "json", "*", "*", "*")) if os.path.isdir(p)]
home = os.path.join(cache, "rajpurkar___squad", "default", "0.0.0", os.path.basename(built))
shutil.move(built, home)  # where the hub's copy would be cached, under its name
for name in glob.glob(os.path.join(home, "json-*")):
    os.rename(name, name.replace("json-", "squad-"))
"""


def test_a_cached_hub_dataset_loads_with_the_hub_unreachable(caches, tmp_path):
    """What `datasets` cached on a connected machine still loads offline, without its retries."""
    cache = tmp_path / "datasets"
    subprocess.run([sys.executable, "-c", CACHE_A_HUB_DATASET, str(cache)],
                   env={**os.environ, "HF_DATASETS_CACHE": str(cache)}, check=True, capture_output=True, timeout=120)
    read = "from ftkit.hub import load_hub_rows; print(load_hub_rows('huggingface:rajpurkar/squad')[0]['question'])"
    online = online_env(HF_DATASETS_CACHE=str(cache), HF_ENDPOINT=CLOSED_PORT)
    done = subprocess.run([sys.executable, "-c", read], env=online, capture_output=True, text=True, timeout=120,
                          check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "What is the capital of France?\n"
    assert "Retrying" not in done.stderr


def test_a_modelscope_dataset_names_what_is_missing_or_unreachable(caches):
    done, seconds = run_online("run", str(HC3), "--dry-run", MODELSCOPE_ENDPOINT=CLOSED_PORT)
    where = "modelscope:simpleai/HC3-Chinese (subset 'baike', split 'train')"
    try:
        import modelscope.msdatasets  # noqa: F401 - whether this machine has ModelScope's dataset packages
    except ImportError as error:
        assert_one_line_error(done, f"reading {where} needs ModelScope's dataset packages (missing: {error.name})")
    else:
        assert_one_line_error(done, f"could not load {where}: 127.0.0.1:9 cannot be reached (Connection refused)")
    assert seconds < SLOW_S
