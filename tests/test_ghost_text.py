"""Ghost text end to end: the daemon's `phrase` method over its socket, and a real LSP
exchange in which the editor gets the daemon's phrase and taking it is reported as feedback."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.daemon_process import Served, short_dir, start_daemon
from tests.test_lsp import LspProcess
from wordahead.daemon.client import DaemonClient
from wordahead.daemon.protocol import RpcError

# A tiny random model is never confident: a threshold this low shows its phrases.
SETTINGS = {"phrase_threshold": 1e-9, "phrase_max_words": 3}


def serve_phrases(model: Path) -> Iterator[Served]:
    """A daemon on `model` that shows its phrases however unsure (SETTINGS), for a fixture."""
    root = short_dir()
    home = root / "home"
    home.mkdir(mode=0o700)
    (home / "personalize.json").write_text(json.dumps(SETTINGS))
    daemon = start_daemon(model, home, root / "kb.sock")
    try:
        yield daemon
    finally:
        daemon.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def served(tiny_llama: Path) -> Iterator[Served]:
    yield from serve_phrases(tiny_llama)


def call(served: Served, method: str, **params: Any) -> Any:
    with DaemonClient(served.socket) as client:
        return client.call(method, **params)


def test_the_phrase_continues_the_top_word(served: Served) -> None:
    for context in ("I would like to ", "I would like to bo"):
        top = call(served, "predict", context=context, k=3)
        phrase = call(served, "phrase", context=context)["phrase"]
        assert phrase is not None, context
        words = phrase["words"]
        assert 2 <= len(words) <= SETTINGS["phrase_max_words"]
        assert words[0] == next(c["word"] for c in top["candidates"] if c["kind"] == "word")
        assert phrase["prefix"] == top["prefix"]
        # what accepting inserts after the cursor: the rest of the word, then the others
        assert phrase["prefix"] + phrase["text"] == " ".join(words)
        assert 0 < phrase["probability"] <= 1


def test_phrases_follow_the_settings_and_bad_input_is_refused(served: Served) -> None:
    config = served.home / "personalize.json"
    try:
        config.write_text(json.dumps({**SETTINGS, "phrase_completion": False}))
        call(served, "reload")
        assert call(served, "phrase", context="I would like to ") == {"phrase": None}
        config.write_text(json.dumps({**SETTINGS, "phrase_threshold": 1.0}))
        call(served, "reload")
        assert call(served, "phrase", context="I would like to ") == {"phrase": None}
    finally:
        config.write_text(json.dumps(SETTINGS))
        call(served, "reload")
    with pytest.raises(RpcError) as bad:
        call(served, "phrase", context=42)
    assert bad.value.code == -32602
    assert call(served, "phrase", context="I would like to ")["phrase"] is not None


def test_the_editor_shows_the_daemons_phrase_and_taking_it_is_feedback(
    served: Served, tmp_path: Path
) -> None:
    env = dict(os.environ, KEYBOARD_SOCKET=str(served.socket), KEYBOARD_HOME=str(served.home))
    editor = LspProcess(env, tmp_path / "lsp.log")
    try:
        editor.initialize({"debounce_ms": 0})
        uri = (tmp_path / "notes.md").as_uri()
        editor.open(uri, "markdown", "")
        editor.insert(uri, 2, 0, 0, "I would like to bo")
        expected = call(served, "phrase", context="I would like to bo")["phrase"]
        inline = editor.request(
            "textDocument/inlineCompletion",
            {**editor.at(uri, 0, 18), "context": {"triggerKind": 2}},
        )
        (ghost,) = inline["items"]
        # the typed prefix is replaced by the whole phrase: "bo" -> "bon p wit"
        assert ghost["insertText"] == " ".join(expected["words"])
        assert ghost["range"] == {
            "start": {"line": 0, "character": 16},
            "end": {"line": 0, "character": 18},
        }
        command = ghost["command"]
        assert command["command"] == "keyboard.accept"
        editor.request("workspace/executeCommand", {
            "command": command["command"], "arguments": command["arguments"]})  # fmt: skip
        accepted = " ".join(expected["words"])
        db = served.home / "typing_log.db"

        def stored() -> bool:
            with sqlite3.connect(db) as conn:
                rows = conn.execute("SELECT accepted FROM entries WHERE kind = 'accepted'")
                return (accepted,) in list(rows)

        deadline = time.monotonic() + 10
        while not stored() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert stored()
        assert editor.close() == 0
    finally:
        if editor.proc.poll() is None:
            editor.proc.kill()
        editor.proc.wait()
