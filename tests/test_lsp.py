"""The language server: buffer reading and typed-text tracking, then real LSP conversations
over stdio with `python -m wordahead lsp` against a real daemon serving a tiny model."""

from __future__ import annotations

import itertools
import json
import os
import re
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.daemon_process import Served, serve
from wordahead.daemon.client import DaemonClient
from wordahead.editors.editor_text import (
    MAX_TYPED_CHANGE,
    TypedRun,
    context_before,
    finished_text,
    insertion,
    language_kind,
)
from wordahead.editors.lsp import EditorConfig
from wordahead.types import KeyboardError

# --- reading a buffer ---------------------------------------------------------------------------


def test_language_kinds() -> None:
    assert language_kind("markdown") == language_kind("gitcommit") == "prose"
    assert language_kind("plaintext") == language_kind("git-commit") == "prose"
    assert language_kind("python") == language_kind("typescript") == "code"
    assert language_kind("json") is None
    config = EditorConfig.from_options({"filetypes": ["markdown", "norg", "python"]})
    assert config.kind("markdown") == "prose" and config.kind("python") == "code"
    assert config.kind("norg") == "prose"  # listed by the user, unknown here: read as prose
    assert config.kind("text") is None  # not listed


def test_context_prose_and_commit_messages() -> None:
    assert context_before(["Dear Ann,", "I would like to"], "markdown", "prose") == (
        "Dear Ann,\nI would like to"
    )
    assert (
        context_before(["x" * 50, "tail"], "text", "prose", max_chars=20)
        == (("x" * 50 + "\ntail")[-20:])
    )
    commit = ["Fix the parser", "# Please enter the commit message", "It now reads"]
    assert context_before(commit, "gitcommit", "prose") == "Fix the parser\nIt now reads"
    assert context_before(["# Changes to be committed"], "gitcommit", "prose") is None


def test_context_code_is_comments_only() -> None:
    assert context_before(["x = compute()  # the quick br"], "python", "code") == "the quick br"
    assert context_before(["x = compute(the"], "python", "code") is None
    lines = ["// Parse the header,", "//", "// then read the", "// body and"]
    assert context_before(lines, "typescript", "code") == "then read the body and"
    assert context_before(["-- a lua comment"], "lua", "code") == "a lua comment"
    assert context_before(["#   "], "python", "code") == ""
    assert context_before(['{"a": 1'], "json", None) is None


def test_insertion_spacing() -> None:
    assert insertion("I would like to ", "", "go") == "go"
    assert insertion("I would like to g", "g", "go") == "go"
    assert insertion("Dear Ann,", "", "I") == " I"
    assert insertion("Dear Ann", "", ",") == ","
    assert insertion("(", "", "see") == "see"
    assert insertion("", "", "Hello") == "Hello"


def test_editor_config_validation() -> None:
    assert EditorConfig.from_options(None) == EditorConfig()
    config = EditorConfig.from_options({"logging": False, "debounce_ms": 0, "items": 3})
    assert (config.logging, config.debounce_ms, config.items) == (False, 0, 3)
    for bad in ({"debounce": 10}, {"items": "5"}, {"items": 0}, {"logging": 1}, [1]):
        with pytest.raises(KeyboardError):
            EditorConfig.from_options(bad)


# --- text typed into a document -----------------------------------------------------------------


class Buffer:
    """A document that edits itself and feeds a TypedRun, the way the server does."""

    def __init__(self, text: str = "") -> None:
        self.lines = text.split("\n")
        self.run = TypedRun()
        self.pieces: list[tuple[str, str]] = []

    def _edit(self, start: tuple[int, int], end: tuple[int, int], text: str) -> None:
        before = self.lines[start[0]][: start[1]]
        after = self.lines[end[0]][end[1] :]
        self.lines[start[0] : end[0] + 1] = (before + text + after).split("\n")
        for p in self.run.change(start, end, text, lambda ln, ch: self.lines[ln][:ch]):
            self.pieces.append((p.head, p.text))

    def type(self, text: str, at: tuple[int, int] | None = None) -> None:
        pos = at or self.run.end or (len(self.lines) - 1, len(self.lines[-1]))
        for ch in text:
            self._edit(pos, pos, ch)
            pos = (pos[0] + 1, 0) if ch == "\n" else (pos[0], pos[1] + 1)

    def backspace(self, n: int = 1) -> None:
        for _ in range(n):
            line, col = self.run.end
            start = (line, col - 1) if col else (line - 1, len(self.lines[line - 1]))
            self._edit(start, (line, col), "")

    def replace(self, start: tuple[int, int], end: tuple[int, int], text: str) -> None:
        self._edit(start, end, text)

    @property
    def texts(self) -> list[str]:
        return [text for _, text in self.pieces]


def test_typed_sentences_and_lines_are_finished() -> None:
    buf = Buffer()
    buf.type("Hello there. How are")
    assert buf.texts == ["Hello there. "]
    buf.type(" you?\nFine")
    assert buf.texts == ["Hello there. ", "How are you?\n"]
    assert buf.run.flush()[0].text == "Fine"


def test_backspace_and_completion_edit_the_run() -> None:
    buf = Buffer()
    buf.type("I would lkie")
    buf.backspace(3)
    buf.type("ike to gi")
    line, col = buf.run.end
    buf.replace((line, col - 2), (line, col), "give")  # a completion replaces the prefix
    buf.type(" it back. ")
    assert buf.texts == ["I would like to give it back. "]


def test_only_typed_text_counts_and_edits_elsewhere_end_a_run() -> None:
    buf = Buffer("Existing text that was in the file.\n")
    buf.type("New words", at=(1, 0))
    buf.type("X", at=(0, 0))  # jumped elsewhere: the first run is finished
    assert buf.texts == ["New words"]
    assert buf.pieces[0][0] == ""  # nothing stood before it on its line
    buf.replace((0, 1), (0, 1), "p" * (MAX_TYPED_CHANGE + 1))  # a paste is not typing
    assert buf.texts == ["New words", "X"]
    assert buf.run.start is None


def test_positions_in_utf16_units() -> None:
    run = TypedRun(units=lambda s: len(s.encode("utf-16-le")) // 2)
    heads = lambda ln, ch: ""  # noqa: E731
    run.change((0, 0), (0, 0), "ok 😀", heads)
    assert run.end == (0, 5)  # the emoji is two UTF-16 units
    run.change((0, 3), (0, 5), "", heads)  # backspace over it
    pieces = run.change((0, 3), (0, 3), "fine. ", heads)
    assert [p.text for p in pieces] == ["ok fine. "]
    assert run.end == (0, 9) and run.text == ""


def test_finished_text_filters() -> None:
    assert finished_text("", "Fix the bug.\n# Please enter\nDone", "gitcommit", "prose") == (
        "Fix the bug.\nDone"
    )
    assert finished_text("x = 1  ", "# compute the mean\ny = 2\n", "python", "code") == (
        "compute the mean"
    )
    # Typed after the marker that was already there: only the typed words.
    assert finished_text("x = 1  # note: ", "retry later\n", "python", "code") == "retry later"
    assert finished_text("", "return x\n", "python", "code") == ""
    assert finished_text("", "anything", "json", None) == ""


# --- a real conversation --------------------------------------------------------------------------


class LspProcess:
    """`python -m wordahead lsp` on pipes, spoken to as an editor does (Content-Length frames)."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.log = log
        with open(log, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "wordahead", "lsp"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                env=env,
            )
        self.ids = itertools.count(1)
        self.responses: dict[int, dict[str, Any]] = {}
        self.notifications: list[dict[str, Any]] = []
        self.cond = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        out = self.proc.stdout
        assert out is not None
        while True:
            length = None
            while True:
                header = out.readline()
                if not header:
                    return
                if header in (b"\r\n", b"\n"):
                    break
                name, _, value = header.decode().partition(":")
                if name.lower() == "content-length":
                    length = int(value)
            assert length is not None
            message = json.loads(out.read(length))
            with self.cond:
                if "id" in message and "method" in message:  # a request from the server
                    self.send({"jsonrpc": "2.0", "id": message["id"], "result": None})
                elif "id" in message:
                    self.responses[message["id"]] = message
                else:
                    self.notifications.append(message)
                self.cond.notify_all()

    def send(self, message: dict[str, Any]) -> None:
        body = json.dumps(message).encode()
        assert self.proc.stdin is not None
        self.proc.stdin.write(b"Content-Length: %d\r\n\r\n" % len(body) + body)
        self.proc.stdin.flush()

    def start(self, method: str, params: Any) -> int:
        request_id = next(self.ids)
        self.send({"jsonrpc": "2.0", "id": request_id, "method": method, "params": params})
        return request_id

    def wait(self, request_id: int, timeout: float = 20.0) -> dict[str, Any]:
        with self.cond:
            ok = self.cond.wait_for(lambda: request_id in self.responses, timeout)
        assert ok, f"no answer to request {request_id}; server log:\n{self.log.read_text()}"
        return self.responses.pop(request_id)

    def request(self, method: str, params: Any) -> Any:
        answer = self.wait(self.start(method, params))
        assert "error" not in answer, answer
        return answer["result"]

    def notify(self, method: str, params: Any) -> None:
        self.send({"jsonrpc": "2.0", "method": method, "params": params})

    def initialize(self, options: dict[str, Any]) -> dict[str, Any]:
        result = self.request(
            "initialize",
            {
                "processId": os.getpid(),
                "rootUri": None,
                "capabilities": {"general": {"positionEncodings": ["utf-16"]}},
                "initializationOptions": options,
            },
        )
        self.notify("initialized", {})
        return result

    def open(self, uri: str, language: str, text: str = "") -> None:
        doc = {"uri": uri, "languageId": language, "version": 1, "text": text}
        self.notify("textDocument/didOpen", {"textDocument": doc})

    def insert(self, uri: str, version: int, line: int, character: int, text: str) -> None:
        pos = {"line": line, "character": character}
        change = {"range": {"start": pos, "end": pos}, "text": text}
        self.notify(
            "textDocument/didChange",
            {"textDocument": {"uri": uri, "version": version}, "contentChanges": [change]},
        )

    def at(self, uri: str, line: int, character: int) -> dict[str, Any]:
        return {"textDocument": {"uri": uri}, "position": {"line": line, "character": character}}

    def close(self) -> int:
        if self.proc.poll() is None:
            self.request("shutdown", None)
            self.notify("exit", None)
        return self.proc.wait(timeout=20)


@pytest.fixture(scope="module")
def served(tiny_llama: Path) -> Iterator[Served]:
    yield from serve(tiny_llama)


@pytest.fixture
def editor(served: Served, tmp_path: Path) -> Iterator[LspProcess]:
    env = dict(os.environ, KEYBOARD_SOCKET=str(served.socket), KEYBOARD_HOME=str(served.home))
    client = LspProcess(env, tmp_path / "lsp.log")
    try:
        yield client
    finally:
        if client.proc.poll() is None:
            client.proc.kill()
        client.proc.wait()


def entries(served: Served) -> list[tuple[str, str, str]]:
    """(source, kind, text) of every typing log entry, read from the database file."""
    with sqlite3.connect(served.home / "typing_log.db") as db:
        return list(db.execute("SELECT source, kind, text FROM entries ORDER BY id"))


def wait_for(predicate: Any, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def labels(completion: dict[str, Any]) -> list[str]:
    return [item["label"] for item in completion["items"]]


def daemon_predict(served: Served, context: str, k: int = 5) -> dict[str, Any]:
    with DaemonClient(served.socket) as client:
        return client.call("predict", context=context, k=k)


def test_conversation(editor: LspProcess, served: Served, tmp_path: Path) -> None:
    init = editor.initialize({"debounce_ms": 100, "items": 5})
    caps = init["capabilities"]
    assert caps["textDocumentSync"]["change"] == 2  # incremental
    assert caps["completionProvider"]["triggerCharacters"] == [" "]
    assert "inlineCompletionProvider" in caps
    assert "keyboard.accept" in caps["executeCommandProvider"]["commands"]
    assert init["serverInfo"]["name"] == "keyboard"

    uri = (tmp_path / "notes.md").as_uri()
    editor.open(uri, "markdown", "")
    editor.insert(uri, 2, 0, 0, "I would like to ")

    # Next words at a word boundary: the daemon's words, ranked, inserted at the cursor.
    items = editor.request("textDocument/completion", editor.at(uri, 0, 16))
    # At a word start the LSP asks for 4 more than it shows, room for punctuation it skips.
    expected = daemon_predict(served, "I would like to ", k=5 + 4)
    words = [c["word"] for c in expected["candidates"] if c["kind"] == "word"][:5]
    assert items["isIncomplete"] is True
    assert [i["label"] for i in items["items"]] == words and words
    first = items["items"][0]
    assert first["kind"] == 1 and first["sortText"] == "000"
    assert re.fullmatch(r"([1-9]\d*% )?keyboard", first["detail"])  # never "0%"
    assert first["textEdit"]["range"]["start"] == {"line": 0, "character": 16}
    assert first["textEdit"]["newText"] == words[0]
    assert first["command"]["command"] == "keyboard.accept"

    # Asked again at the same point, the editor gets the same words.
    again = editor.request("textDocument/completion", editor.at(uri, 0, 16))
    assert [i["label"] for i in again["items"]] == words

    # Completing the word at the cursor: the edit replaces the typed prefix. Words shown at
    # the word start and typed past are not offered again: the next ones take their places.
    editor.insert(uri, 3, 0, 16, "bo")
    items = editor.request("textDocument/completion", editor.at(uri, 0, 18))
    passed = [w for w in words if w.startswith("bo")]
    expected = daemon_predict(served, "I would like to bo", k=5 + len(passed))
    assert expected["prefix"] == "bo"
    offered = [c["word"] for c in expected["candidates"] if c["kind"] == "word"]
    assert [i["label"] for i in items["items"]] == [w for w in offered if w not in passed][:5]
    for item in items["items"]:
        assert item["textEdit"]["range"]["start"] == {"line": 0, "character": 16}
        assert item["textEdit"]["newText"] == item["label"]

    # Ghost text: the daemon's phrase, only when it is confident (never, for a tiny random
    # model at the default threshold; tests/test_ghost_text.py shows one).
    inline = editor.request(
        "textDocument/inlineCompletion",
        {**editor.at(uri, 0, 18), "context": {"triggerKind": 2}},
    )
    with DaemonClient(served.socket) as client:
        assert client.call("phrase", context="I would like to bo") == {"phrase": None}
    assert inline["items"] == []

    # Cancellation: the request is cancelled during its debounce and answers RequestCancelled.
    request_id = editor.start("textDocument/completion", editor.at(uri, 0, 18))
    editor.notify("$/cancelRequest", {"id": request_id})
    answer = editor.wait(request_id)
    assert answer["error"]["code"] == -32800, answer

    # Debounce: of two quick requests, the older one comes back empty, the newer one full.
    older = editor.start("textDocument/completion", editor.at(uri, 0, 18))
    newer = editor.start("textDocument/completion", editor.at(uri, 0, 18))
    assert editor.wait(older)["result"]["items"] == []
    assert editor.wait(newer)["result"]["items"]

    # A word typed past is not offered again in the same word, though the daemon still
    # ranks it among the first: the editor shows the next ones instead.
    editor.insert(uri, 4, 0, 18, " ")  # "I would like to bo |"
    at_start = labels(editor.request("textDocument/completion", editor.at(uri, 0, 19)))
    first = at_start[0]
    editor.insert(uri, 5, 0, 19, first[0])
    after = labels(editor.request("textDocument/completion", editor.at(uri, 0, 20)))
    daemon = daemon_predict(served, "I would like to bo " + first[0])["candidates"]
    assert first in [c["word"] for c in daemon]
    assert after and not set(after) & set(at_start)
    assert editor.close() == 0


def test_typed_text_and_accepted_words_reach_the_typing_log(
    editor: LspProcess, served: Served, tmp_path: Path
) -> None:
    editor.initialize({"debounce_ms": 0})
    uri = (tmp_path / "letter.txt").as_uri()
    editor.open(uri, "text", "Old text is not sent again.\n")
    column = 0
    for version, ch in enumerate("See you at noon. Bring the map", start=2):
        editor.insert(uri, version, 1, column, ch)
        column += 1
    source = f"text:{tmp_path / 'letter.txt'}"
    assert wait_for(lambda: (source, "typed", "See you at noon.") in entries(served))
    assert not any("Old text" in e[2] for e in entries(served))

    items = editor.request("textDocument/completion", editor.at(uri, 1, column))
    command = items["items"][0]["command"]
    editor.request("workspace/executeCommand", command)
    editor.request("workspace/executeCommand", command)  # reported twice: counted once
    accepted = items["items"][0]["label"]
    assert wait_for(lambda: any(e[1] == "accepted" and accepted in e[2] for e in entries(served)))

    # A comment in code is read and logged; the code around it is not.
    py = (tmp_path / "tool.py").as_uri()
    editor.open(py, "python", "")
    editor.insert(py, 2, 0, 0, "total = 0  # count the open ")
    assert editor.request("textDocument/completion", editor.at(py, 0, 28))["items"]
    editor.insert(py, 3, 0, 28, "files\nreturn total")
    assert editor.request("textDocument/completion", editor.at(py, 1, 12)) is None
    py_source = f"python:{tmp_path / 'tool.py'}"
    assert wait_for(lambda: (py_source, "typed", "count the open files") in entries(served))
    assert [e[1] for e in entries(served)].count("accepted") == 1

    # What is still being typed is sent when the editor shuts down.
    editor.insert(uri, 100, 1, column, " tomorrow")
    assert editor.close() == 0
    assert (source, "typed", "Bring the map tomorrow") in entries(served)
    assert not any("return total" in e[2] for e in entries(served))


def test_excluded_files_paused_logging_and_a_missing_daemon(
    editor: LspProcess, served: Served, tmp_path: Path
) -> None:
    editor.initialize({"debounce_ms": 0})
    before = entries(served)
    secret = (tmp_path / "prod.env").as_uri()  # matches the default exclusion "*.env"
    editor.open(secret, "text", "")
    editor.insert(secret, 2, 0, 0, "The password is swordfish. ")
    items = editor.request("textDocument/completion", editor.at(secret, 0, 27))
    assert items["items"]  # predictions still work; nothing is stored
    accept = items["items"][0]["command"]
    assert accept["arguments"][0]["source"].endswith("prod.env")
    editor.request("workspace/executeCommand", accept)  # feedback has no source: checked here

    paused = editor.request("workspace/executeCommand", {"command": "keyboard.pause"})
    assert paused == {"paused": True, "daemon": "paused"}  # every writer pauses, not just this one
    uri = (tmp_path / "diary.md").as_uri()
    editor.open(uri, "markdown", "")
    editor.insert(uri, 2, 0, 0, "Dear diary. ")
    status = editor.request("workspace/executeCommand", {"command": "keyboard.status"})
    assert status["editor"]["paused"] is True and status["typing_log"]["paused"] is True
    resumed = editor.request("workspace/executeCommand", {"command": "keyboard.resume"})
    assert resumed == {"paused": False, "daemon": "resumed"}
    editor.insert(uri, 3, 0, 12, "Today. ")
    source = f"markdown:{tmp_path / 'diary.md'}"
    assert wait_for(lambda: (source, "typed", "Today.") in entries(served))
    after = entries(served)
    assert not any("swordfish" in e[2] or "diary." in e[2].lower() for e in after)
    assert [e for e in after if e not in before] == [(source, "typed", "Today.")]
    assert editor.close() == 0


def test_without_a_daemon_the_editor_is_told_once(tmp_path: Path) -> None:
    env = dict(os.environ, KEYBOARD_SOCKET=str(tmp_path / "nobody.sock"))
    editor = LspProcess(env, tmp_path / "lsp.log")
    try:
        refused = editor.wait(
            editor.start(
                "initialize",
                {
                    "processId": None,
                    "rootUri": None,
                    "capabilities": {},
                    "initializationOptions": {"debounce_ms": "soon"},
                },
            )
        )
        assert "debounce_ms" in refused["error"]["message"]
        editor.initialize({"debounce_ms": 0})
        uri = (tmp_path / "a.txt").as_uri()
        editor.open(uri, "text", "Hello ")
        for _ in range(2):
            items = editor.request("textDocument/completion", editor.at(uri, 0, 6))
            assert items == {"isIncomplete": True, "items": []}
        shown = [n for n in editor.notifications if n["method"] == "window/showMessage"]
        assert len(shown) == 1 and "keyboard serve" in shown[0]["params"]["message"]
        bad = editor.wait(
            editor.start(
                "workspace/executeCommand", {"command": "keyboard.accept", "arguments": ["x"]}
            )
        )
        assert bad["error"]["code"] == -32602
        assert editor.close() == 0
    finally:
        if editor.proc.poll() is None:
            editor.proc.kill()
