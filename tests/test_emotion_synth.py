"""The emotion task's synthesizer: offline seed samples, and the Anthropic/OpenAI modes against a
fake API server on 127.0.0.1 (no other network is touched)."""

from __future__ import annotations

import importlib.util
import json
import logging
import re
import sys
import threading
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from ftkit_plugins import emotion
from ftkit_plugins.emotion_synth import DEFAULT_MODELS, LABELS, extract_objects, synthesize

from ftkit.errors import DataError, UsageError

ROOT = Path(__file__).resolve().parent.parent
KEY = "sk-test-DO-NOT-LEAK-0123456789"
FIELDS = ("text", "emotion", "intensity", "trigger")


def assert_valid(rows: list[dict], labels=LABELS) -> None:
    for row in rows:
        assert tuple(row) == FIELDS
        assert isinstance(row["text"], str) and row["text"].strip()
        assert row["emotion"] in labels
        assert isinstance(row["intensity"], int) and 1 <= row["intensity"] <= 5
        assert isinstance(row["trigger"], str) and row["trigger"].strip()
    assert len({row["text"] for row in rows}) == len(rows), "duplicate texts"


def load_back(rows: list[dict], tmp_path: Path) -> list[dict]:
    """The rows written to JSONL and read by the emotion task's own loader."""
    path = tmp_path / "synth.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return list(emotion.load(path))


# -- offline -------------------------------------------------------------------------------------

def test_offline_rows_are_balanced_valid_and_load(tmp_path: Path) -> None:
    rows = list(synthesize(60, seed=1))
    assert len(rows) == 60
    assert Counter(r["emotion"] for r in rows) == {label: 10 for label in LABELS}
    assert_valid(rows)
    loaded = load_back(rows, tmp_path)
    assert [(r["text"], r["label"]) for r in loaded] == [(r["text"], r["emotion"]) for r in rows]


def test_offline_is_deterministic_per_seed() -> None:
    assert list(synthesize(30, seed=7)) == list(synthesize(30, seed=7))
    assert list(synthesize(30, seed=7)) != list(synthesize(30, seed=8))


def test_offline_uneven_count_and_label_subset() -> None:
    assert Counter(r["emotion"] for r in synthesize(8)) == {"喜悅": 2, "悲傷": 2, "憤怒": 1, "恐懼": 1,
                                                           "驚訝": 1, "厭惡": 1}
    rows = list(synthesize(9, labels=("恐懼", "厭惡")))
    assert Counter(r["emotion"] for r in rows) == {"恐懼": 5, "厭惡": 4}
    assert list(synthesize(0)) == []


def test_offline_refuses_labels_it_has_no_samples_for() -> None:
    with pytest.raises(UsageError, match="offline mode has seed samples only for .*not 平靜"):
        synthesize(6, labels=("喜悅", "平靜"))


def test_offline_stops_when_its_seed_samples_are_spent(monkeypatch: pytest.MonkeyPatch) -> None:
    from ftkit_plugins import emotion_synth

    monkeypatch.setattr(emotion_synth, "compose", lambda rng, label: {"text": "同一句", "emotion": label})
    with pytest.raises(UsageError, match="ran out of distinct 喜悅 sentences after 1"):
        synthesize(12)


def test_bad_arguments_are_usage_errors() -> None:
    with pytest.raises(UsageError, match="unknown --mode 'gemini'"):
        synthesize(6, mode="gemini")
    with pytest.raises(UsageError, match="batch_size >= 1"):
        synthesize(6, mode="openai", batch_size=0)


def test_bench_script_rewrites_the_bundled_file_byte_for_byte(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("make_emotion_quickstart", ROOT / "bench" / "make_emotion_quickstart.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "quickstart.jsonl"
    module.main(["--out", str(out)])
    assert out.read_bytes() == (ROOT / "plugins" / "data" / "emotion_quickstart.jsonl").read_bytes()


def test_task_wires_synthesize_without_importing_sdks() -> None:
    import subprocess

    assert emotion.TASK.synthesize is synthesize
    assert emotion.LABELS == LABELS
    code = "import sys, ftkit_plugins.emotion; print(sorted({'anthropic', 'openai'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert result.stdout.strip() == "[]"


def test_extract_objects_is_forgiving() -> None:
    row = {"text": "t", "emotion": "喜悅", "intensity": 3, "trigger": "x"}
    fenced = "好的！\n```json\n" + json.dumps([row], ensure_ascii=False) + "\n```\n希望有幫助。"
    assert extract_objects(fenced) == [row]
    assert extract_objects(json.dumps({"rows": [row, row]})) == [row, row]
    truncated = json.dumps([row, row], ensure_ascii=False)[:-20]  # cut off at the token limit
    assert extract_objects(truncated) == [row]
    assert extract_objects("抱歉，我無法完成這個請求。") == []


# -- a fake Anthropic + OpenAI API on 127.0.0.1 ----------------------------------------------------

Respond = Callable[[str, dict[str, str], dict[str, Any]], tuple[int, dict[str, str], Any]]


class FakeAPI:
    """Serves ``POST /v1/messages`` and ``POST /v1/chat/completions`` with ``respond``'s replies."""

    def __init__(self, respond: Respond) -> None:
        self.requests: list[tuple[str, dict[str, str], dict[str, Any]]] = []
        api = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))) or b"{}")
                headers = {k.lower(): v for k, v in self.headers.items()}
                api.requests.append((self.path, headers, body))
                if self.path not in ("/v1/messages", "/v1/chat/completions"):
                    status, extra, payload = 404, {}, {"error": {"message": "no such path"}}
                else:
                    status, extra, payload = respond(self.path, headers, body)
                data = json.dumps(payload, ensure_ascii=False).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                for name, value in extra.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass  # keep test output clean

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def base_url(self, mode: str) -> str:
        root = f"http://127.0.0.1:{self.server.server_address[1]}"
        return root if mode == "anthropic" else root + "/v1"  # each SDK's own base-URL convention

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def fake_api() -> Iterator[Callable[[Respond], FakeAPI]]:
    servers: list[FakeAPI] = []

    def start(respond: Respond) -> FakeAPI:
        servers.append(FakeAPI(respond))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


@pytest.fixture(autouse=True)
def no_provider_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing from the real environment may point the SDKs elsewhere or supply a key."""
    for name in ("ANTHROPIC_API_KEY", "ANTHROPIC_AUTH_TOKEN", "ANTHROPIC_BASE_URL", "ANTHROPIC_PROFILE",
                 "ANTHROPIC_CUSTOM_HEADERS", "ANTHROPIC_LOG", "OPENAI_API_KEY", "OPENAI_BASE_URL", "OPENAI_LOG",
                 "OPENAI_ORG_ID", "OPENAI_PROJECT_ID", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY",
                 "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")


def prompt_of(path: str, body: dict[str, Any]) -> str:
    return body["messages"][-1]["content"]


def reply(path: str, text: str) -> tuple[int, dict[str, str], Any]:
    """``text`` wrapped as the provider's successful response."""
    if path == "/v1/messages":
        return 200, {}, {
            "id": "msg_1", "type": "message", "role": "assistant", "model": "fake",
            "content": [{"type": "text", "text": text}], "stop_reason": "end_turn", "stop_sequence": None,
            "usage": {"input_tokens": 10, "output_tokens": 10},
        }
    return 200, {}, {
        "id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": "fake",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 10, "completion_tokens": 10, "total_tokens": 20},
    }


class ScriptedModel:
    """A model that answers its first request with prose, then fenced JSON rows with some bad ones."""

    def __init__(self) -> None:
        self.calls = 0
        self.lock = threading.Lock()

    def __call__(self, path: str, headers: dict[str, str], body: dict[str, Any]) -> tuple[int, dict[str, str], Any]:
        with self.lock:
            self.calls += 1
            call = self.calls
        if call == 1:
            return reply(path, "抱歉，我現在無法產生資料。")
        prompt = prompt_of(path, body)
        label = re.search(r"「(.+?)」", prompt).group(1)
        count = int(re.search(r"請寫 (\d+) 句", prompt).group(1))
        rows = [{"text": f"{label}：第{call}批第{i}句，事情就這樣發生了。", "emotion": label, "intensity": 1 + i % 5,
                 "trigger": f"情境{i}"} for i in range(count)]
        bad = [
            rows[0],  # a duplicate
            {"text": "別的情緒", "emotion": "平靜", "intensity": 3, "trigger": "x"},  # label not asked for
            {"text": "  ", "emotion": label, "intensity": 3, "trigger": "x"},  # empty text
            {"text": "太強了", "emotion": label, "intensity": 9, "trigger": "x"},  # intensity out of range
            {"text": "沒有觸發", "emotion": label, "intensity": 2},  # missing field
            "not an object",
        ]
        return reply(path, "```json\n" + json.dumps(rows + bad, ensure_ascii=False) + "\n```")


@pytest.mark.parametrize("mode", ["anthropic", "openai"])
def test_api_mode_retries_a_malformed_reply_and_validates_rows(mode: str, fake_api, tmp_path: Path) -> None:
    model = ScriptedModel()
    server = fake_api(model)
    labels = ("喜悅", "悲傷", "憤怒")
    rows = list(synthesize(14, seed=3, mode=mode, base_url=server.base_url(mode), api_key=KEY, labels=labels,
                           batch_size=3, backoff=0, timeout=5))
    assert len(rows) == 14
    assert Counter(r["emotion"] for r in rows) == {"喜悅": 5, "悲傷": 5, "憤怒": 4}
    assert_valid(rows, labels)
    assert not any(r["text"] in ("別的情緒", "太強了", "沒有觸發") for r in rows)
    assert len(load_back(rows, tmp_path)) == 14
    # 1 malformed reply + ceil(5/3) + ceil(5/3) + ceil(4/3) batches
    assert len(server.requests) == 1 + 2 + 2 + 2
    path, headers, body = server.requests[0]
    assert path == ("/v1/messages" if mode == "anthropic" else "/v1/chat/completions")
    assert body["model"] == DEFAULT_MODELS[mode]
    # Anthropic SDKs have sent the key as `x-api-key` and, lately, as a bearer token.
    assert headers.get("authorization") == f"Bearer {KEY}" or headers.get("x-api-key") == KEY


@pytest.mark.parametrize("mode", ["anthropic", "openai"])
def test_api_mode_key_from_env_and_model_override(mode: str, fake_api, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(f"{mode.upper()}_API_KEY", KEY)
    server = fake_api(ScriptedModel())
    rows = list(synthesize(2, mode=mode, model="tiny-model", base_url=server.base_url(mode), labels=("驚訝", "厭惡"),
                           backoff=0, timeout=5))
    assert [r["emotion"] for r in rows] == ["驚訝", "厭惡"]
    assert all(body["model"] == "tiny-model" for _, _, body in server.requests)
    assert KEY in json.dumps(server.requests[-1][1])  # the key went to the server, and only there


@pytest.mark.parametrize("mode", ["anthropic", "openai"])
def test_missing_key_names_the_env_var(mode: str) -> None:
    with pytest.raises(UsageError, match=f"set {mode.upper()}_API_KEY"):
        synthesize(6, mode=mode, base_url="http://127.0.0.1:9")


def test_missing_sdk_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "anthropic", None)  # makes `import anthropic` fail
    with pytest.raises(UsageError, match=re.escape("pip install 'ftkit[synth]'")):
        synthesize(6, mode="anthropic", api_key=KEY, base_url="http://127.0.0.1:9")


def leaky_error(status: int) -> Respond:
    """An error reply whose body echoes the request headers, the key among them (the worst case)."""

    def respond(path: str, headers: dict[str, str], body: dict[str, Any]) -> tuple[int, dict[str, str], Any]:
        message = f"something broke; you sent {headers}"
        # retry-after-ms: the SDK honours it, so its retries take milliseconds here.
        return status, {"retry-after-ms": "1"}, {"type": "error", "error": {"type": "api_error", "message": message}}

    return respond


def assert_no_key(error: BaseException, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture) -> None:
    assert KEY not in str(error) and KEY not in repr(error)
    assert KEY not in "".join(traceback.format_exception(error))
    captured = capsys.readouterr()
    assert KEY not in captured.out and KEY not in captured.err
    assert caplog.records, "expected the SDK's debug logs to be captured"
    assert KEY not in caplog.text


@pytest.mark.parametrize("mode", ["anthropic", "openai"])
def test_server_errors_give_a_clear_error_after_retries_without_the_key(
        mode: str, fake_api, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    server = fake_api(leaky_error(500))
    with pytest.raises(DataError, match=f"the {mode} API answered HTTP 500 after 2 retries") as info:
        list(synthesize(6, mode=mode, base_url=server.base_url(mode), api_key=KEY, max_retries=2, backoff=0,
                        timeout=5))
    assert len(server.requests) == 3  # the first try and the SDK's two retries
    assert "something broke" in str(info.value)
    assert_no_key(info.value, caplog, capsys)


@pytest.mark.parametrize("mode", ["anthropic", "openai"])
def test_a_refused_key_is_a_usage_error_without_the_key(
        mode: str, fake_api, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    server = fake_api(leaky_error(401))
    with pytest.raises(UsageError, match=f"refused the key \\(HTTP 401\\): check {mode.upper()}_API_KEY") as info:
        list(synthesize(6, mode=mode, base_url=server.base_url(mode), api_key=KEY, backoff=0, timeout=5))
    assert len(server.requests) == 1  # a 401 is not retried
    assert_no_key(info.value, caplog, capsys)


@pytest.mark.parametrize("mode", ["anthropic", "openai"])
def test_always_malformed_replies_fail_after_max_retries(
        mode: str, fake_api, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    server = fake_api(lambda path, headers, body: reply(path, "我只想聊天，不想給 JSON。"))
    with pytest.raises(DataError, match="no usable new 喜悅 rows in 3 tries") as info:
        list(synthesize(6, mode=mode, base_url=server.base_url(mode), api_key=KEY, max_retries=2, backoff=0,
                        timeout=5))
    assert len(server.requests) == 3
    assert_no_key(info.value, caplog, capsys)


def test_unreachable_server_is_a_clear_error(caplog: pytest.LogCaptureFixture,
                                             capsys: pytest.CaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    import socket

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(DataError, match="could not be reached after 0 retries") as info:
        list(synthesize(6, mode="openai", base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0,
                        timeout=5))
    assert_no_key(info.value, caplog, capsys)
