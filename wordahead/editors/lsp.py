"""The language server (`keyboard lsp`): next-word completions and ghost text from the daemon."""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lsprotocol import types as lsp
from pygls.exceptions import JsonRpcInvalidParams
from pygls.lsp.server import LanguageServer
from pygls.workspace import TextDocument

from wordahead import __version__
from wordahead.daemon.client import DaemonClient, DaemonNotRunning
from wordahead.daemon.protocol import RpcError
from wordahead.editors.corrections import correction_item, corrections
from wordahead.editors.editor_text import (
    Piece,
    TypedRun,
    context_before,
    finished_text,
    insertion,
    language_kind,
)
from wordahead.editors.lsp_wire import FastPositionCodec, KeyboardProtocol
from wordahead.predict.shown import ShownInWord, score_label
from wordahead.predict.words import split_prefix
from wordahead.store.redaction import excluded_by
from wordahead.types import MAX_K, KeyboardError

log = logging.getLogger("wordahead.editors.lsp")

ACCEPT_COMMAND = "keyboard.accept"  # a completion was taken: feedback to the daemon
PAUSE_COMMAND = "keyboard.pause"
RESUME_COMMAND = "keyboard.resume"
STATUS_COMMAND = "keyboard.status"
PRIVACY_TTL_S = 5.0  # how long the daemon's excluded sources / paused flag are trusted
FEEDBACK_CONTEXT_CHARS = 200  # the end of the line a suggestion was taken on, no more
DRAIN_S = 3.0  # at shutdown, how long unsent typed text may take to reach the daemon
PREDICT_TIMEOUT_S = 5.0  # a slower answer is useless to someone typing
LOG_TIMEOUT_S = 30.0
WORD_KEY_CHARS = 200  # text before a word that tells one word being typed from another
DUPLICATE_ACCEPT_S = 2.0  # the same acceptance reported again this soon is one acceptance


@dataclass(frozen=True)
class EditorConfig:
    """What the editor asked for in `initializationOptions` (every key optional)."""

    filetypes: frozenset[str] | None = None  # None: every language editor_text can read
    logging: bool = True  # send finished text and accepted suggestions to the typing log
    debounce_ms: int = 40  # a request newer than this supersedes the older one
    items: int = 5  # completion items
    inline_words: int = 8  # ghost text: at most this many of the daemon's phrase (0: none)
    context_chars: int = 2000  # how much text before the cursor the daemon sees
    corrections: bool = True  # offer the daemon's corrections of a mistyped word

    @classmethod
    def from_options(cls, options: Any) -> EditorConfig:
        """Check the options; raise KeyboardError naming the bad key (not a silent default)."""
        if options is None:
            return cls()
        if not isinstance(options, Mapping):
            raise KeyboardError("initializationOptions must be an object")
        known: dict[str, type | tuple[type, ...]] = {
            "filetypes": (list, type(None)),
            "logging": bool,
            "debounce_ms": int,
            "items": int,
            "inline_words": int,
            "context_chars": int,
            "corrections": bool,
        }
        values: dict[str, Any] = {}
        for key, value in options.items():
            if key not in known:
                raise KeyboardError(
                    f"unknown initializationOptions key {key!r}; known: {', '.join(known)}"
                )
            if not isinstance(value, known[key]) or (
                isinstance(value, bool) and known[key] is not bool
            ):
                raise KeyboardError(f"initializationOptions.{key} has the wrong type: {value!r}")
            values[key] = value
        filetypes = values.pop("filetypes", None)
        if filetypes is not None:
            if not all(isinstance(f, str) and f for f in filetypes):
                raise KeyboardError("initializationOptions.filetypes must be a list of names")
            values["filetypes"] = frozenset(f.lower() for f in filetypes)
        limits = {
            "debounce_ms": (0, 1000),
            "items": (1, 20),
            "inline_words": (0, 8),
            "context_chars": (16, 16000),
        }
        for key, (low, high) in limits.items():
            if key in values and not low <= values[key] <= high:
                raise KeyboardError(
                    f"initializationOptions.{key} must be between {low} and {high}, "
                    f"got {values[key]}"
                )
        return cls(**values)

    def kind(self, language_id: str) -> str | None:
        """How to read a language: "prose", "code" (comments only), or None (not served).
        A language the user listed that editor_text does not know is read as prose."""
        lang = language_id.lower()
        if self.filetypes is None:
            return language_kind(lang)
        if lang not in self.filetypes:
            return None
        return language_kind(lang) or "prose"


@dataclass
class OpenDocument:
    """One document the editor has open, and the text typed into it since."""

    uri: str
    language_id: str
    source: str  # what the typing log records: "markdown:/home/u/notes.md"
    run: TypedRun = field(default_factory=TypedRun)


class DaemonLink:
    """The server's two connections to the daemon: one for predictions, one for the typing
    log, so a slow write never holds up a suggestion. Blocking calls run in threads."""

    def __init__(self, socket_path: str | Path | None = None) -> None:
        self.predictions = DaemonClient(socket_path, timeout=PREDICT_TIMEOUT_S)
        self.logging = DaemonClient(socket_path, timeout=LOG_TIMEOUT_S)
        self._privacy: tuple[float, list[str], bool] | None = None

    async def predict(self, context: str, k: int) -> dict[str, Any]:
        return await asyncio.to_thread(self.predictions.call, "predict", context=context, k=k)

    async def phrase(self, context: str) -> dict[str, Any]:
        return await asyncio.to_thread(self.predictions.call, "phrase", context=context)

    async def call(self, method: str, **params: Any) -> Any:
        return await asyncio.to_thread(self.logging.call, method, **params)

    async def may_log(self, source: str) -> bool:
        """Whether text from `source` may go to the daemon: logging is not paused and the
        source matches none of the typing log's excluded globs (its own rules, read from
        the daemon's status). False when that cannot be checked."""
        now = time.monotonic()
        if self._privacy is None or now - self._privacy[0] > PRIVACY_TTL_S:
            status = await self.call("status")
            typing_log = status.get("typing_log") or {}
            self._privacy = (
                now,
                list(typing_log.get("excluded_sources") or []),
                bool(typing_log.get("paused", False)),
            )
        _, patterns, paused = self._privacy
        return not paused and excluded_by(source, patterns) is None

    def forget_privacy(self) -> None:
        self._privacy = None

    def close(self) -> None:
        self.predictions.close()
        self.logging.close()


class KeyboardServer(LanguageServer):
    """The LSP server: documents, settings, the daemon link and the queue of text to log."""

    def __init__(self, socket_path: str | Path | None = None) -> None:
        super().__init__("keyboard", __version__, protocol_cls=KeyboardProtocol)
        self.config = EditorConfig()
        self.documents: dict[str, OpenDocument] = {}
        self.daemon = DaemonLink(socket_path)
        self.paused = False  # paused from this editor (keyboard.pause)
        self._latest: dict[tuple[str, str], int] = {}  # (uri, method) -> newest request number
        self._outbox: asyncio.Queue[tuple[str, dict[str, Any]]] | None = None
        self._sender: asyncio.Task[None] | None = None
        self._daemon_down = False  # told the user once; reset when the daemon answers
        self.last_accept: tuple[tuple[str, str, str], float] | None = None
        self.shown: dict[str, ShownInWord] = {}  # uri -> words shown for the word being typed

    # --- the daemon ---------------------------------------------------------------------
    def daemon_unreachable(self, exc: KeyboardError) -> None:
        log.warning("%s", exc)
        if not self._daemon_down:
            self._daemon_down = True
            self.window_show_message(
                lsp.ShowMessageParams(type=lsp.MessageType.Warning, message=f"keyboard: {exc}")
            )

    async def phrase(self, context: str) -> dict[str, Any] | None:
        """The daemon's phrase for `context` (None: none, or the daemon cannot say)."""
        try:
            result = await self.daemon.phrase(context)
        except DaemonNotRunning as exc:
            self.daemon_unreachable(exc)
            return None
        except KeyboardError as exc:
            log.warning("phrase failed: %s", exc)
            return None
        self._daemon_down = False
        phrase = result.get("phrase") if isinstance(result, dict) else None
        return phrase if isinstance(phrase, dict) and phrase.get("words") else None

    async def predict(self, context: str, k: int | None = None) -> dict[str, Any] | None:
        try:
            result = await self.daemon.predict(context, k or self.config.items)
        except DaemonNotRunning as exc:
            self.daemon_unreachable(exc)
            return None
        except KeyboardError as exc:  # an error answer or a timeout: no suggestion this time
            log.warning("predict failed: %s", exc)
            return None
        self._daemon_down = False
        return result

    # --- logging typed text -------------------------------------------------------------
    def send_later(self, method: str, params: dict[str, Any]) -> None:
        """Queue an observe/feedback for the daemon; sent in order, off the request path."""
        if not self.config.logging or self.paused:
            return
        if self._outbox is None:
            self._outbox = asyncio.Queue()
            self._sender = asyncio.ensure_future(self._send_loop(self._outbox))
        self._outbox.put_nowait((method, params))

    async def _send_loop(self, outbox: asyncio.Queue[tuple[str, dict[str, Any]]]) -> None:
        while True:
            method, params = await outbox.get()
            try:
                await self._send(method, params)
            except Exception:  # keep the sender alive: one bad answer must not stop logging
                log.exception("%s failed", method)
            finally:
                outbox.task_done()

    async def _send(self, method: str, params: dict[str, Any]) -> None:
        source = params.pop("source")
        try:
            # Checked here, not only in the daemon: feedback carries no source, and text from
            # an excluded file should not even cross the socket.
            if self.paused or not await self.daemon.may_log(source):
                return
            if method == "observe":
                await self.daemon.call("observe", text=params["text"], source=source)
            else:
                await self.daemon.call("feedback", **params)
        except DaemonNotRunning as exc:
            self.daemon_unreachable(exc)  # the text is dropped: nothing is kept on the side
        except KeyboardError as exc:
            log.warning("%s failed: %s", method, exc)

    def observe_pieces(self, doc: OpenDocument, pieces: list[Piece]) -> None:
        kind = self.config.kind(doc.language_id)
        for piece in pieces:
            text = finished_text(piece.head, piece.text, doc.language_id, kind)
            if text:
                self.send_later("observe", {"text": text, "source": doc.source})

    async def drain(self) -> None:
        """Send what is queued (at shutdown), waiting at most DRAIN_S."""
        for doc in self.documents.values():
            self.observe_pieces(doc, doc.run.flush())
        if self._outbox is not None:
            try:
                await asyncio.wait_for(self._outbox.join(), DRAIN_S)
            except asyncio.TimeoutError:
                log.warning("shutting down with typed text not yet sent")

    # --- requests -----------------------------------------------------------------------
    async def settled(self, uri: str, method: str, version: int | None) -> bool:
        """Wait out the debounce; False when a newer request or an edit superseded this one."""
        key = (uri, method)
        number = self._latest[key] = self._latest.get(key, 0) + 1
        if self.config.debounce_ms:
            await asyncio.sleep(self.config.debounce_ms / 1000)
        if self._latest.get(key) != number:
            return False
        doc = self.workspace.get_text_document(uri)
        return version is None or doc.version is None or doc.version == version

    def context_at(self, uri: str, position: lsp.Position) -> tuple[OpenDocument, str] | None:
        """The document and the text the daemon should read, or None where nothing is offered
        (a language not served, code outside a line comment)."""
        doc = self.documents.get(uri)
        if doc is None:
            return None
        kind = self.config.kind(doc.language_id)
        if kind is None:
            return None
        text_doc = self.workspace.get_text_document(uri)
        lines = _lines_before(text_doc, position, self.config.context_chars)
        context = context_before(lines, doc.language_id, kind, self.config.context_chars)
        return None if context is None else (doc, context)

    def accept_command(self, doc: OpenDocument, context: str, word: str) -> lsp.Command:
        line = context[context.rfind("\n") + 1 :][-FEEDBACK_CONTEXT_CHARS:]
        return lsp.Command(
            title="keyboard: suggestion taken",
            command=ACCEPT_COMMAND,
            arguments=[{"source": doc.source, "context": line, "accepted": word}],
        )


def _lines_before(doc: TextDocument, position: lsp.Position, max_chars: int) -> list[str]:
    """The document's lines up to the cursor (the last cut at it), about `max_chars` in all."""
    lines = doc.lines
    if not lines:
        return [""]
    at = doc.position_from_client_units(lsp.Position(position.line, position.character))
    # Each line cut to what is left of the window first: a 20 MB line costs a slice.
    if at.line >= len(lines):
        out, size, row = [""], 0, len(lines) - 1
    else:
        current = lines[at.line][max(0, at.character - max_chars) : at.character]
        current = current.rstrip("\r\n")
        out, size, row = [current], len(current), at.line - 1
    while row >= 0 and size < max_chars:
        line = lines[row][-(max_chars - size) - 2 :].rstrip("\r\n")
        out.append(line)
        size += len(line) + 1
        row -= 1
    out.reverse()
    return out


def _prefix_start(
    doc: TextDocument, position: lsp.Position, context: str, prefix: str
) -> lsp.Position:
    """Where the partial word the daemon completes begins (it ends at the cursor)."""
    if not prefix or not context.endswith(prefix):
        return position
    units = doc.position_codec.client_num_units(prefix)
    return lsp.Position(position.line, max(0, position.character - units))


def _words(prediction: dict[str, Any]) -> list[dict[str, Any]]:
    return [c for c in prediction.get("candidates") or [] if c.get("kind", "word") == "word"]


# --- handlers: plain functions, registered in build_server ----------------------------------------
def initialize(ls: KeyboardServer, params: lsp.InitializeParams) -> None:
    try:
        ls.config = EditorConfig.from_options(params.initialization_options)
    except KeyboardError as exc:
        raise JsonRpcInvalidParams(f"keyboard: {exc}") from exc
    # The same positions as pygls's codec, without its Python loop over a line's characters
    # (the documents opened from now on take the workspace's).
    ls.workspace._position_codec = FastPositionCodec(ls.workspace.position_encoding)


async def shutdown(ls: KeyboardServer, *args: Any) -> None:
    await ls.drain()
    ls.daemon.close()


def did_open(ls: KeyboardServer, params: lsp.DidOpenTextDocumentParams) -> None:
    item = params.text_document
    text_doc = ls.workspace.get_text_document(item.uri)
    units = text_doc.position_codec.client_num_units
    ls.documents[item.uri] = OpenDocument(
        uri=item.uri,
        language_id=item.language_id,
        source=f"{item.language_id}:{text_doc.path or item.uri}",
        run=TypedRun(units=units),
    )


def did_change(ls: KeyboardServer, params: lsp.DidChangeTextDocumentParams) -> None:
    doc = ls.documents.get(params.text_document.uri)
    if doc is None or ls.config.kind(doc.language_id) is None:
        return
    text_doc = ls.workspace.get_text_document(doc.uri)

    def head_at(line: int, character: int) -> str:
        lines = text_doc.lines
        if line >= len(lines):
            return ""
        at = text_doc.position_from_client_units(lsp.Position(line, character))
        return lines[line][max(0, at.character - ls.config.context_chars) : at.character]

    pieces = []
    for change in params.content_changes:
        if isinstance(change, lsp.TextDocumentContentChangePartial):
            r = change.range
            pieces += doc.run.change(
                (r.start.line, r.start.character),
                (r.end.line, r.end.character),
                change.text,
                head_at,
            )
        else:  # the whole text replaced: not typing
            pieces += doc.run.flush()
    ls.observe_pieces(doc, pieces)


def did_save(ls: KeyboardServer, params: lsp.DidSaveTextDocumentParams) -> None:
    doc = ls.documents.get(params.text_document.uri)
    if doc is not None:
        ls.observe_pieces(doc, doc.run.flush())


def did_close(ls: KeyboardServer, params: lsp.DidCloseTextDocumentParams) -> None:
    doc = ls.documents.pop(params.text_document.uri, None)
    ls.shown.pop(params.text_document.uri, None)
    if doc is not None:
        ls.observe_pieces(doc, doc.run.flush())


async def completion(ls: KeyboardServer, params: lsp.CompletionParams) -> lsp.CompletionList | None:
    uri, position = params.text_document.uri, params.position
    found = ls.context_at(uri, position)
    if found is None:
        return None
    doc, context = found
    version = ls.workspace.get_text_document(uri).version
    if not await ls.settled(uri, "completion", version):
        return lsp.CompletionList(is_incomplete=True, items=[])
    # Words the user typed past in this word are not offered again (docs/evaluation.md).
    before, typed = split_prefix(context)
    shown = ls.shown.setdefault(uri, ShownInWord())
    ask = shown.ask(before[-WORD_KEY_CHARS:], typed, ls.config.items, MAX_K)
    prediction = await ls.predict(context, ask)
    if prediction is None:
        return lsp.CompletionList(is_incomplete=True, items=[])
    prefix = prediction.get("prefix") or ""
    start = _prefix_start(ls.workspace.get_text_document(uri), position, context, prefix)
    replace = lsp.Range(start=start, end=position)
    offered = _words(prediction) + (corrections(prediction) if ls.config.corrections else [])
    offered.sort(key=lambda c: -c.get("score", 0.0))
    candidates: dict[str, dict[str, Any]] = {}
    for cand in offered:
        candidates.setdefault(cand["word"], cand)  # in order of score; a word once
    items = []
    text_doc = ls.workspace.get_text_document(uri)
    for rank, word in enumerate(shown.show(list(candidates), ls.config.items)):
        cand = candidates[word]
        if cand.get("kind") == "correction":
            command = ls.accept_command(doc, context, word)
            items.append(correction_item(text_doc, position, context, cand, rank, command))
            continue
        text = insertion(context, prefix if start != position else "", word)
        items.append(
            lsp.CompletionItem(
                label=word,
                kind=lsp.CompletionItemKind.Text,
                detail=f"{score_label(cand.get('score', 0.0))} keyboard".lstrip(),
                sort_text=f"{rank:03d}",
                filter_text=word,
                preselect=rank == 0,
                text_edit=lsp.TextEdit(range=replace, new_text=text),
                command=ls.accept_command(doc, context, word),
            )
        )
    # Incomplete: the next keystroke changes the prediction, so the editor asks again.
    return lsp.CompletionList(is_incomplete=True, items=items)


async def inline_completion(
    ls: KeyboardServer, params: lsp.InlineCompletionParams
) -> lsp.InlineCompletionList | None:
    """Ghost text: the daemon's phrase (wordahead.predict.sources.phrase_completion), shown
    only when it is confident; taking it is reported as feedback, like a word."""
    uri, position = params.text_document.uri, params.position
    found = ls.context_at(uri, position)
    if found is None or ls.config.inline_words == 0:
        return None
    doc, context = found
    version = ls.workspace.get_text_document(uri).version
    if not await ls.settled(uri, "inline", version):
        return lsp.InlineCompletionList(items=[])
    phrase = await ls.phrase(context)
    if phrase is None:
        return lsp.InlineCompletionList(items=[])
    words = phrase["words"][: ls.config.inline_words]
    prefix = phrase.get("prefix") or ""
    start = _prefix_start(ls.workspace.get_text_document(uri), position, context, prefix)
    ghost = insertion(context, prefix if start != position else "", " ".join(words))
    item = lsp.InlineCompletionItem(
        insert_text=ghost,
        range=lsp.Range(start=start, end=position),
        command=ls.accept_command(doc, context, " ".join(words)),
    )
    return lsp.InlineCompletionList(items=[item])


def accept(ls: KeyboardServer, *arguments: Any) -> None:
    for arg in arguments:
        if not (
            isinstance(arg, dict)
            and isinstance(arg.get("context"), str)
            and isinstance(arg.get("accepted"), str)
            and isinstance(arg.get("source"), str)
        ):
            raise JsonRpcInvalidParams(
                f"{ACCEPT_COMMAND} takes objects {{source, context, accepted}}, got {arg!r}"
            )
        # An editor that runs the item's command and a plugin that reports CompleteDone
        # may both tell us about one acceptance: count it once.
        key = (arg["source"], arg["context"], arg["accepted"])
        now = time.monotonic()
        if ls.last_accept is not None and ls.last_accept[0] == key:
            if now - ls.last_accept[1] < DUPLICATE_ACCEPT_S:
                continue
        ls.last_accept = (key, now)
        params = {"context": arg["context"], "accepted": arg["accepted"]}
        ls.send_later("feedback", {**params, "source": arg["source"]})


async def _toggle(ls: KeyboardServer, paused: bool) -> dict[str, Any]:
    # This editor stops sending at once; the daemon's flag pauses every other writer too.
    ls.paused = paused
    ls.daemon.forget_privacy()
    method = "pause" if paused else "resume"
    try:
        await ls.daemon.call(method)
    except RpcError as exc:
        return {"paused": paused, "daemon": f"not changed: {exc.message}"}
    except KeyboardError as exc:
        return {"paused": paused, "daemon": f"not changed: {exc}"}
    return {"paused": paused, "daemon": "paused" if paused else "resumed"}


async def pause(ls: KeyboardServer, *arguments: Any) -> dict[str, Any]:
    return await _toggle(ls, True)


async def resume(ls: KeyboardServer, *arguments: Any) -> dict[str, Any]:
    return await _toggle(ls, False)


async def status(ls: KeyboardServer, *arguments: Any) -> Any:
    try:
        result = await ls.daemon.call("status")
    except KeyboardError as exc:
        raise JsonRpcInvalidParams(f"keyboard: {exc}") from exc
    return {**result, "editor": {"paused": ls.paused, "logging": ls.config.logging}}


def build_server(socket_path: str | Path | None = None) -> KeyboardServer:
    """The server with every feature registered; `start_io()` runs it on stdio."""
    server = KeyboardServer(socket_path)
    server.feature(lsp.INITIALIZE)(initialize)
    server.feature(lsp.SHUTDOWN)(shutdown)
    server.feature(lsp.TEXT_DOCUMENT_DID_OPEN)(did_open)
    server.feature(lsp.TEXT_DOCUMENT_DID_CHANGE)(did_change)
    server.feature(lsp.TEXT_DOCUMENT_DID_SAVE)(did_save)
    server.feature(lsp.TEXT_DOCUMENT_DID_CLOSE)(did_close)
    server.feature(
        lsp.TEXT_DOCUMENT_COMPLETION,
        lsp.CompletionOptions(trigger_characters=[" "], resolve_provider=False),
    )(completion)
    server.feature(lsp.TEXT_DOCUMENT_INLINE_COMPLETION, lsp.InlineCompletionOptions())(
        inline_completion
    )
    server.command(ACCEPT_COMMAND)(accept)
    server.command(PAUSE_COMMAND)(pause)
    server.command(RESUME_COMMAND)(resume)
    server.command(STATUS_COMMAND)(status)
    return server


def serve_stdio(socket_path: str | Path | None = None, verbose: bool = False) -> int:
    """Run the language server on stdin/stdout until the editor says exit."""
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="keyboard-lsp %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    build_server(socket_path).start_io()
    return 0
