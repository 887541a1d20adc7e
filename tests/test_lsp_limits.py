"""The language server under hostile input (issue 28, failure 7): invalid params get a
JSON-RPC error instead of silence, and a very long line is cut to the context window before
anything reads it (one 20 MB line blocked every document for 46 s, 2.6 s per edit)."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
from lsprotocol import types as lsp
from pygls.workspace import TextDocument
from pygls.workspace.position_codec import PositionCodec, ServerTextPosition, UnitCounter

from tests.test_lsp import LspProcess
from wordahead.editors.lsp import _lines_before
from wordahead.editors.lsp_wire import FastPositionCodec

ENCODINGS = [
    lsp.PositionEncodingKind.Utf16,
    lsp.PositionEncodingKind.Utf8,
    lsp.PositionEncodingKind.Utf32,
]


@pytest.mark.notorch
@pytest.mark.parametrize("encoding", ENCODINGS)
def test_positions_are_pyglss_own(encoding: lsp.PositionEncodingKind) -> None:
    rng = random.Random(0)
    alphabet = ["a", "b", " ", "é", "😋", "中", "\r\n", "\n"]
    slow, fast = PositionCodec(encoding), FastPositionCodec(encoding)
    for _ in range(2000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12)))
        lines = text.splitlines(True)
        line, units, index = rng.randint(0, len(lines) + 1), rng.randint(0, 30), rng.randint(0, 15)
        a = slow.position_from_client_units(lines, lsp.Position(line, units))
        b = fast.position_from_client_units(lines, lsp.Position(line, units))
        assert (a.line, a.character) == (b.line, b.character), (text, line, units)
        server = ServerTextPosition(line, index)
        assert slow.position_to_client_units(lines, server) == fast.position_to_client_units(
            lines, server
        )
        assert slow.client_num_units(text) == fast.client_num_units(text)


@pytest.mark.notorch
def test_a_long_line_is_cut_to_the_window_before_anything_reads_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No loop over the line's characters (pygls's codec had one, per edit and per request);
    what reaches the context reader is the window, not the line."""
    long = "é" + "word " * 4_000_000  # 20 MB
    doc = TextDocument(
        "file:///long.md",
        long + "\nI would like to ",
        position_codec=FastPositionCodec(lsp.PositionEncodingKind.Utf16),
    )

    def per_character(*args: object) -> int:
        raise AssertionError("a Python loop over the line")

    monkeypatch.setattr(UnitCounter, "num_units", per_character)
    monkeypatch.setattr(UnitCounter, "code_units_for_char", per_character)
    end = len(long)  # UTF-16 units: every character of it is in the BMP
    at_end = lsp.Position(0, end)
    doc.apply_change(
        lsp.TextDocumentContentChangePartial(range=lsp.Range(at_end, at_end), text="Dear")
    )
    assert doc.lines[0].endswith("word Dear\n")
    lines = _lines_before(doc, lsp.Position(0, end + 4), 2000)
    assert lines == [("word " * 400 + "Dear")[-2000:]]
    lines = _lines_before(doc, lsp.Position(1, 16), 2000)
    assert lines[-1] == "I would like to " and sum(len(line) + 1 for line in lines) <= 2010


def test_invalid_params_are_answered_with_a_json_rpc_error(tmp_path: Path) -> None:
    env = dict(os.environ, KEYBOARD_SOCKET=str(tmp_path / "none.sock"))
    editor = LspProcess(env, tmp_path / "lsp.log")
    try:
        editor.initialize({"debounce_ms": 0})
        uri = (tmp_path / "notes.md").as_uri()
        editor.open(uri, "markdown", "I would like to ")
        for params in (
            editor.at(uri, 0, -1),  # a negative character
            {"textDocument": {"uri": uri}},  # no position
            {"textDocument": {"uri": uri}, "position": {"line": 0}},  # no character
        ):
            answer = editor.wait(editor.start("textDocument/completion", params))
            assert answer["error"]["code"] == -32602, answer
            assert "textDocument/completion: invalid params" in answer["error"]["message"]
        assert "position" in answer["error"]["message"]
        # Still serving: a valid request is answered (no daemon: nothing to offer).
        valid = editor.wait(editor.start("textDocument/completion", editor.at(uri, 0, 16)))
        assert "error" not in valid
        assert editor.close() == 0
    finally:
        if editor.proc.poll() is None:
            editor.proc.kill()
        editor.proc.wait()
