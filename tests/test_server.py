"""The daemon over its socket: every method and error code, load, fuzzing, permissions, shutdown."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import sqlite3
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.daemon_process import Served, daemon_env, short_dir, start_daemon, wait_ready
from wordahead.daemon import protocol as rpc
from wordahead.paths import Home

CONTEXTS = [
    "I would like to",
    "Thank you so much for your",
    "Could you please send me the rep",
    "The meeting has been moved to",
    "Happy birthday! I hope you have a wonderful",
    "Let me know when you arr",
    "We are going to the beach this",
    "",
]


# --- helpers ------------------------------------------------------------------------------------
@pytest.fixture
def root() -> Iterator[Path]:
    """A short temporary directory for a test's own daemon: socket, home, log."""
    path = short_dir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


class Conn:
    """A raw line-oriented connection, for tests that need to misbehave."""

    def __init__(self, path: Path, timeout: float = 30.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self.buffer = b""
        self.ids = iter(range(1, 10**9))

    def __enter__(self) -> Conn:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send_json(self, message: Any) -> None:
        self.send(json.dumps(message).encode() + b"\n")

    def read(self) -> Any:
        """The next answer line, decoded; None when the daemon closed the connection."""
        while b"\n" not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                return None
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return json.loads(line)

    def closed_by_peer(self) -> bool:
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True


def connect(path: Path, timeout: float = 30.0) -> Conn:
    return Conn(path, timeout)


def call(conn: Conn, method: str, params: Any = None, request_id: Any = None) -> dict[str, Any]:
    request_id = next(conn.ids) if request_id is None else request_id
    message: dict[str, Any] = {"jsonrpc": "2.0", "id": request_id, "method": method}
    if params is not None:
        message["params"] = params
    conn.send_json(message)
    answer = conn.read()
    assert answer is not None, f"connection closed instead of answering {method}"
    assert answer["id"] == request_id
    return answer


def error_code(answer: dict[str, Any]) -> int:
    assert "error" in answer, answer
    assert isinstance(answer["error"]["message"], str) and answer["error"]["message"]
    return int(answer["error"]["code"])


def assert_prediction(result: dict[str, Any], k: int) -> None:
    assert set(result) == {"prefix", "candidates", "adapter", "latency_ms"}
    assert isinstance(result["prefix"], str)
    assert 0 < len(result["candidates"]) <= k
    for c in result["candidates"]:
        assert isinstance(c["word"], str) and c["word"]
        assert isinstance(c["score"], float) and 0.0 <= c["score"] <= 1.0
    assert isinstance(result["latency_ms"], float)


# --- the shared daemon --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def daemon(tiny_llama: Path) -> Iterator[Served]:
    """One daemon for the read-mostly tests, started the default way (no --socket:
    $XDG_RUNTIME_DIR/keyboard/keyboard.sock) under a permissive umask."""
    root = short_dir()
    runtime = root / "run"
    runtime.mkdir()
    home = root / "home"
    served = start_daemon(tiny_llama, home, None, umask=0, wait=False, XDG_RUNTIME_DIR=str(runtime))
    served.socket = runtime / "keyboard" / "keyboard.sock"
    try:
        wait_ready(served)
        yield served
    finally:
        served.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def conn(daemon: Served) -> Iterator[Conn]:
    with connect(daemon.socket) as c:
        yield c


# --- methods ------------------------------------------------------------------------------------
def test_predict(conn: Conn) -> None:
    result = call(conn, "predict", {"context": "I would like to bo", "k": 2})["result"]
    assert_prediction(result, 2)
    assert result["prefix"] == "bo"
    assert result["adapter"] == "base"
    at_boundary = call(conn, "predict", {"context": "I would like to "})["result"]
    assert at_boundary["prefix"] == ""
    assert len(at_boundary["candidates"]) == 3  # k defaults to 3
    positional = call(conn, "predict", ["I would like to bo", 2])["result"]
    assert [c["word"] for c in positional["candidates"]] == [
        c["word"] for c in result["candidates"]
    ]


def test_observe_feedback_and_forget(conn: Conn, daemon: Served) -> None:
    before = call(conn, "status")["result"]["typing_log"]["entries"]
    stored = call(conn, "observe", {"text": "See you on Friday at the station.", "source": "t1"})
    assert stored["result"]["stored"] is True and isinstance(stored["result"]["id"], int)
    private = call(conn, "observe", {"text": "my secret diary", "private": True})["result"]
    assert private["stored"] is False and "id" not in private
    excluded = call(conn, "observe", {"text": "TOKEN=abc", "source": "/srv/app/.env"})["result"]
    assert excluded["stored"] is False
    feedback = call(conn, "feedback", {"context": "Thank you for your", "accepted": "help"})
    assert feedback["result"]["stored"] is True
    log = call(conn, "status")["result"]["typing_log"]
    assert log["entries"] == before + 2
    assert log["accepted"] >= 1
    # What was stored is in the database file, redacted rules applied, private text absent.
    with sqlite3.connect(daemon.home / "typing_log.db") as db:
        texts = [r[0] for r in db.execute("SELECT text FROM entries")]
    assert "See you on Friday at the station." in texts
    assert not any("secret diary" in t for t in texts)
    assert call(conn, "forget", {"source": "t1"})["result"] == {"deleted": 1}
    assert call(conn, "forget", {"source": "t1"})["result"] == {"deleted": 0}


def test_pause_and_resume_stop_and_restart_logging(conn: Conn) -> None:
    assert call(conn, "pause")["result"] == {"paused": True}
    dropped = call(conn, "observe", {"text": "typed while paused", "source": "t2"})["result"]
    assert dropped["stored"] is False
    assert call(conn, "status")["result"]["typing_log"]["paused"] is True
    assert call(conn, "resume")["result"] == {"paused": False}
    kept = call(conn, "observe", {"text": "typed after resuming", "source": "t2"})["result"]
    assert kept["stored"] is True
    assert call(conn, "forget", {"source": "t2"})["result"] == {"deleted": 1}


def test_status(conn: Conn, daemon: Served) -> None:
    status = call(conn, "status")["result"]
    assert status["pid"] == daemon.process.pid
    assert status["socket"] == str(daemon.socket)
    assert status["uptime_s"] > 0 and status["ready_s"] > 0
    assert status["model"]["dir"] and status["model"]["int8"] is False  # tiny models: no record
    assert status["adapter"]["version"] == "base"
    assert {"entries", "words", "paused", "by_source"} <= set(status["typing_log"])
    assert {"running", "last_job", "next_run"} <= set(status["personalization"])
    assert status["server"]["connections"] >= 1


def test_serving_process_never_imports_torch(conn: Conn, daemon: Served) -> None:
    call(conn, "predict", {"context": "Thank you so much for"})
    call(conn, "observe", {"text": "hello there"})
    assert call(conn, "status")["result"]["server"]["torch_loaded"] is False
    maps = Path(f"/proc/{daemon.process.pid}/maps")
    if maps.exists():
        assert "libtorch" not in maps.read_text()


def test_reload_serves_the_active_adapter(tiny_llama: Path, root: Path) -> None:
    import numpy as np

    from wordahead.learn.adapter_store import AdapterStore
    from wordahead.model.artifacts import ArtifactSet
    from wordahead.predict.sources.phrases import PhraseModel

    served = start_daemon(tiny_llama, root / "home", root / "s.sock")
    try:
        with connect(served.socket) as c:
            assert call(c, "reload")["result"] == {"adapter": "base", "loaded": True}
            base = call(c, "predict", {"context": "I would like to"})["result"]
            # A personalization job's outcome, promoted by another process.
            home = Home.at(served.home)
            artifacts = ArtifactSet.open(tiny_llama)
            # Random LoRA in the layers; lm_head's left at zero, where random values would
            # swamp every word the phrases below suggest.
            tensors = {
                name: t
                if ".lm_head." in name
                else np.random.default_rng(0).normal(0, 0.5, t.shape).astype(np.float32)
                for name, t in artifacts.initial_adapter().items()
            }
            version = AdapterStore.in_home(home, artifacts).promote(
                tensors, {"metrics": {"loss": 1}}
            )
            assert call(c, "reload")["result"] == {"adapter": version, "loaded": True}
            tuned = call(c, "predict", {"context": "I would like to"})["result"]
            assert tuned["adapter"] == version
            assert tuned["candidates"] != base["candidates"]
            status = call(c, "status")["result"]["adapter"]
            assert status["version"] == version and status["metrics"] == {"loss": 1}
            # A version with the user's phrases: served with them; `forget` deletes them.
            phrases = PhraseModel.from_texts(["I would like to dayrit"] * 3)
            store = AdapterStore.in_home(home, artifacts)
            counted = {"words": phrases.words, "ngrams": phrases.ngrams}
            with_phrases = store.promote(tensors, {"phrases": counted}, phrases.to_bytes())
            assert call(c, "reload")["result"] == {"adapter": with_phrases, "loaded": True}
            assert call(c, "status")["result"]["adapter"]["phrases"] == counted
            context = {"context": "I would like to "}
            assert call(c, "predict", context)["result"]["candidates"][0]["word"] == "dayrit"
            call(c, "observe", {"text": "I would like to dayrit", "source": "t3"})
            assert call(c, "forget", {"source": "t3"})["result"] == {"deleted": 1}
            assert store.phrases_path(with_phrases) is None
            words = [x["word"] for x in call(c, "predict", context)["result"]["candidates"]]
            assert "dayrit" not in words
    finally:
        assert served.stop() == 0


def test_train_runs_in_a_child_process_while_serving(tiny_llama: Path, root: Path) -> None:
    home = root / "home"
    home.mkdir(mode=0o700)
    # A few steps are enough to see the job run; the default is minutes.
    (home / "personalize.json").write_text(
        json.dumps({"max_steps": 4, "eval_every": 2, "time_budget_s": 60, "max_eval_words": 40})
    )
    served = start_daemon(tiny_llama, home, root / "s.sock")
    try:
        with connect(served.socket, timeout=120) as c:
            for i in range(40):
                call(c, "observe", {"text": f"{CONTEXTS[i % 7]} and then some more words {i}."})
            started = call(c, "train", {"force": True})["result"]
            assert started["started"] is True and started["pid"] != served.process.pid
            assert error_code(call(c, "train")) == rpc.PERSONALIZATION_BUSY
            running = call(c, "status")["result"]["personalization"]["running"]
            assert running is not None and running["pid"] == started["pid"]
            served_meanwhile = 0
            deadline = time.monotonic() + 120
            while call(c, "status")["result"]["personalization"]["running"] is not None:
                assert time.monotonic() < deadline, served.output()
                assert_prediction(call(c, "predict", {"context": "I would like"})["result"], 3)
                served_meanwhile += 1
            assert served_meanwhile > 0
            status = call(c, "status")["result"]
            last = status["personalization"]["last_job"]
            assert last["pid"] == started["pid"], last
            assert last["status"] in ("promoted", "rejected"), last
            # A promoted adapter is served as soon as the job ends.
            expected = last["adapter_version"] if last["status"] == "promoted" else "base"
            assert status["adapter"]["version"] == expected
            assert status["server"]["torch_loaded"] is False
    finally:
        assert served.stop() == 0


# --- error codes --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("line", "code"),
    [
        (b"not json", rpc.PARSE_ERROR),
        (b'{"jsonrpc": "2.0", "id": 1, "method": "status"', rpc.PARSE_ERROR),
        (b'{"jsonrpc":"2.0","id":1,"method":"predict","params":{"context":"\xff\xfe"}}', rpc.PARSE_ERROR),
        (b'{"jsonrpc":"2.0","id":1,"method":"predict","params":{"context":"a","k":NaN}}', rpc.PARSE_ERROR),
        (b"[]", rpc.INVALID_REQUEST),
        (b"42", rpc.INVALID_REQUEST),
        (b'{"id": 1, "method": "status"}', rpc.INVALID_REQUEST),
        (b'{"jsonrpc": "2.0", "id": 1}', rpc.INVALID_REQUEST),
        (b'{"jsonrpc": "2.0", "id": true, "method": "status"}', rpc.INVALID_REQUEST),
        (b'{"jsonrpc": "2.0", "id": 1, "method": "status", "params": 3}', rpc.INVALID_REQUEST),
        (b'{"jsonrpc": "2.0", "id": 1, "method": "shutdown"}', rpc.METHOD_NOT_FOUND),
        (b'{"jsonrpc": "2.0", "id": 1, "method": "predict"}', rpc.INVALID_PARAMS),
        (b'{"jsonrpc":"2.0","id":1,"method":"predict","params":{"context":"a","k":"3"}}', rpc.INVALID_PARAMS),
        (b'{"jsonrpc":"2.0","id":1,"method":"predict","params":{"context":"a","k":true}}', rpc.INVALID_PARAMS),
        (b'{"jsonrpc":"2.0","id":1,"method":"predict","params":{"context":"a","k":0}}', rpc.INVALID_PARAMS),
        (b'{"jsonrpc":"2.0","id":1,"method":"predict","params":{"context":"a","x":1}}', rpc.INVALID_PARAMS),
        (b'{"jsonrpc":"2.0","id":1,"method":"predict","params":["a",3,4]}', rpc.INVALID_PARAMS),
        (b'{"jsonrpc":"2.0","id":1,"method":"predict","params":{"context":"\\ud800"}}', rpc.INVALID_PARAMS),
        (b'{"jsonrpc":"2.0","id":1,"method":"observe","params":{"text":"   "}}', rpc.INVALID_PARAMS),
        (b'{"jsonrpc":"2.0","id":1,"method":"feedback","params":{"context":"a"}}', rpc.INVALID_PARAMS),
        (b'{"jsonrpc":"2.0","id":1,"method":"forget","params":{}}', rpc.INVALID_PARAMS),
        (b'{"jsonrpc":"2.0","id":1,"method":"forget","params":{"since":"yesterday"}}', rpc.INVALID_PARAMS),
        (b'{"jsonrpc":"2.0","id":1,"method":"train","params":{"wait":"yes"}}', rpc.INVALID_PARAMS),
        (b'{"jsonrpc":"2.0","id":1,"method":"status","params":{"verbose":true}}', rpc.INVALID_PARAMS),
    ],
)  # fmt: skip
def test_error_codes(conn: Conn, line: bytes, code: int) -> None:
    conn.send(line + b"\n")
    answer = conn.read()
    assert answer["jsonrpc"] == "2.0"
    assert error_code(answer) == code
    # The connection survives a bad request.
    assert_prediction(call(conn, "predict", {"context": "Thank you"})["result"], 3)


@pytest.fixture
def in_thread(tiny_llama: Path, root: Path) -> Iterator[Any]:
    """A daemon on a thread of this process, for failures that need reaching inside."""
    from wordahead.daemon import server

    config = server.ServeConfig(root / "s.sock", tiny_llama, Home.at(root / "home"))
    daemon, thread = server.run_in_thread(config)
    try:
        yield daemon
    finally:
        daemon.stop()
        thread.join(timeout=30)
        assert not thread.is_alive()


def test_server_error_codes(in_thread: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The server range: each failure gets its documented code, and serving goes on."""
    from wordahead.daemon import connections

    sock = in_thread.config.socket_path
    with connect(sock) as c:
        # -32001: the model itself fails (ONNX Runtime raises plain exceptions).
        def broken(context: str, k: int = 3) -> Any:
            raise RuntimeError("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION")

        with monkeypatch.context() as m:
            m.setattr(in_thread.methods.predictor, "predict", broken)
            assert error_code(call(c, "predict", {"context": "a"})) == rpc.MODEL_UNAVAILABLE
        # -32000: an unexpected failure inside the daemon.
        with monkeypatch.context() as m:
            m.setattr(in_thread.methods.typing_log, "stats", lambda: {}["missing"])
            answer = call(c, "status")
            assert error_code(answer) == rpc.SERVER_ERROR
            assert "log" in answer["error"]["message"]
        # -32002: the typing log cannot write (another process holds SQLite's write lock).
        with monkeypatch.context() as m:
            blocker = sqlite3.connect(in_thread.methods.typing_log.path, timeout=0)
            blocker.execute("BEGIN IMMEDIATE")
            in_thread.methods.typing_log.db.execute("PRAGMA busy_timeout=50")
            try:
                answer = call(c, "observe", {"text": "blocked by another writer"})
                assert error_code(answer) == rpc.TYPING_LOG_ERROR
                assert "locked" in answer["error"]["message"]
            finally:
                blocker.rollback()
                blocker.close()
                in_thread.methods.typing_log.db.execute("PRAGMA busy_timeout=10000")
        assert call(c, "observe", {"text": "written once the lock is gone"})["result"]["stored"]
        assert_prediction(call(c, "predict", {"context": "still serving"})["result"], 3)
    # -32007: more connections than the daemon takes.
    deadline = time.monotonic() + 10
    while in_thread.connections.count:  # the one above is closed: wait until the daemon saw it
        assert time.monotonic() < deadline
        time.sleep(0.01)
    monkeypatch.setattr(connections, "MAX_CONNECTIONS", 2)
    with connect(sock) as a, connect(sock) as b, connect(sock) as extra:
        call(a, "status")
        call(b, "status")
        answer = extra.read()
        assert answer["id"] is None and error_code(answer) == rpc.OVERLOADED
        assert extra.closed_by_peer()
        assert call(a, "status")["result"]["server"]["connections"] == 2


def test_requests_after_shutdown_began_are_refused(in_thread: Any) -> None:
    """-32005: lines read once SIGTERM arrived get an answer saying so; in-flight ones finish."""
    sock = in_thread.config.socket_path
    with connect(sock, timeout=60) as c:
        batch = [
            {"jsonrpc": "2.0", "id": i, "method": "predict",
             "params": {"context": f"{CONTEXTS[i % 7]} {i}"}}
            for i in range(200)
        ]  # fmt: skip
        c.send_json(batch)
        deadline = time.monotonic() + 10
        while in_thread.connections.in_flight == 0:
            assert time.monotonic() < deadline
            time.sleep(0.001)
        in_thread.stop()
        while not in_thread.stopping:
            assert time.monotonic() < deadline
            time.sleep(0.001)
        c.send(rpc.request_line("status", None, "late"))
        answers = [c.read(), c.read()]
        by_kind = {isinstance(a, list): a for a in answers}
        assert {a["id"] for a in by_kind[True]} == set(range(200))
        assert error_code(by_kind[False]) == rpc.SHUTTING_DOWN
        assert c.read() is None


def test_observe_too_large_is_refused_not_cut(conn: Conn) -> None:
    answer = call(conn, "observe", {"text": "word " * 20_000})
    assert error_code(answer) == rpc.INVALID_PARAMS
    assert "limit" in answer["error"]["message"]


def test_batches_notifications_and_pipelining(conn: Conn) -> None:
    batch = [
        {"jsonrpc": "2.0", "id": "a", "method": "predict", "params": {"context": "Thank you"}},
        {"jsonrpc": "2.0", "method": "observe", "params": {"text": "a notification"}},
        {"id": "b", "method": "status"},
        {"jsonrpc": "2.0", "id": "c", "method": "nope"},
        5,
    ]
    conn.send_json(batch)
    answers = {a["id"]: a for a in conn.read()}
    assert set(answers) == {"a", "b", "c", None}
    assert_prediction(answers["a"]["result"], 3)
    assert error_code(answers["b"]) == rpc.INVALID_REQUEST
    assert error_code(answers["c"]) == rpc.METHOD_NOT_FOUND
    assert error_code(answers[None]) == rpc.INVALID_REQUEST
    # A notification is never answered, even when it fails; the next request is.
    conn.send(b'{"jsonrpc":"2.0","method":"nope"}\n{"jsonrpc":"2.0","method":"predict"}\n')
    assert call(conn, "status", request_id="after")["id"] == "after"
    # 300 requests in one write: every one answered once, matched by id.
    lines = [
        rpc.request_line("predict", {"context": CONTEXTS[i % len(CONTEXTS)], "k": 1}, i)
        for i in range(300)
    ]
    conn.send(b"".join(lines))
    seen = [conn.read()["id"] for _ in range(300)]
    assert sorted(seen) == list(range(300))


def test_line_limit(daemon: Served) -> None:
    padding = " " * (rpc.MAX_LINE_BYTES - 200)
    with connect(daemon.socket) as big, connect(daemon.socket) as other:
        # Just under the limit: answered.
        big.send(b'{"jsonrpc":"2.0","id":1,' + padding.encode() + b'"method":"status"}\n')
        assert big.read()["id"] == 1
        # Over it: refused with -32006 and closed, without waiting for the newline.
        big.send(b'{"jsonrpc":"2.0","id":2,"method":"observe","params":{"text":"')
        try:
            big.send(b"x" * (rpc.MAX_LINE_BYTES + 10))
        except (BrokenPipeError, ConnectionResetError):
            pass
        answer = big.read()
        assert answer["id"] is None and error_code(answer) == rpc.REQUEST_TOO_LARGE
        assert big.closed_by_peer()
        assert_prediction(call(other, "predict", {"context": "Could you"})["result"], 3)


def test_stalled_clients_do_not_block_others(daemon: Served) -> None:
    with (
        connect(daemon.socket) as half,
        connect(daemon.socket) as greedy,
        connect(daemon.socket) as fine,
    ):
        half.send(b'{"jsonrpc":"2.0","id":1,"method":"pre')  # and never finishes the line
        # Pipelines thousands of requests and never reads an answer.
        flood = b"".join(rpc.request_line("status", None, i) for i in range(5000))
        greedy.sock.setblocking(False)
        try:
            greedy.sock.send(flood)
        except BlockingIOError:
            pass
        for context in CONTEXTS:
            assert_prediction(call(fine, "predict", {"context": context})["result"], 3)


def test_a_flooding_client_does_not_hold_up_others(daemon: Served) -> None:
    with connect(daemon.socket, timeout=120) as flood, connect(daemon.socket) as other:
        flood.send_json(
            [
                {"jsonrpc": "2.0", "id": i, "method": "predict",
                 "params": {"context": f"Flood number {i} says"}}
                for i in range(500)
            ]
        )  # fmt: skip
        while call(other, "status")["result"]["server"]["in_flight"] < 2:
            pass  # until the flood is being answered
        assert_prediction(call(other, "predict", {"context": "Let me know"})["result"], 3)
        flood.sock.setblocking(False)
        with pytest.raises(BlockingIOError):  # answered while the flood is still going
            flood.sock.recv(1)
        flood.sock.setblocking(True)
        assert len(flood.read()) == 500


def test_fifty_clients_two_hundred_requests_each(daemon: Served) -> None:
    with connect(daemon.socket) as c:
        expected = {
            ctx: call(c, "predict", {"context": ctx, "k": 3})["result"]["candidates"]
            for ctx in CONTEXTS
        }
    failures: list[str] = []
    answered = [0] * 50

    def client(n: int) -> None:
        try:
            with connect(daemon.socket, timeout=120) as c:
                for i in range(200):
                    ctx = CONTEXTS[(n + i) % len(CONTEXTS)]
                    got = call(c, "predict", {"context": ctx, "k": 3})["result"]["candidates"]
                    want = expected[ctx]
                    if [g["word"] for g in got] != [w["word"] for w in want] or any(
                        abs(g["score"] - w["score"]) > 1e-3 for g, w in zip(got, want)
                    ):
                        failures.append(f"client {n} request {i}: {got} != {want}")
                    answered[n] += 1
        except Exception as exc:  # noqa: BLE001 - reported below
            failures.append(f"client {n}: {exc!r}")

    threads = [threading.Thread(target=client, args=(n,)) for n in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not failures, failures[:5]
    assert sum(answered) == 50 * 200


# --- fuzzing ------------------------------------------------------------------------------------
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)
near_requests = st.fixed_dictionaries(
    {"jsonrpc": st.sampled_from(["2.0", "2.0", "1.0"]), "method": st.sampled_from(
        ["predict", "observe", "feedback", "status", "forget", "reload", "nope"]
    )},
    optional={
        "id": st.none() | st.integers() | st.text(max_size=8) | st.booleans(),
        "params": st.dictionaries(
            st.sampled_from(["context", "k", "text", "source", "private", "accepted", "since",
                             "until", "all", "x"]),
            json_values,
            max_size=4,
        ) | st.lists(json_values, max_size=3) | json_values,
    },
)  # fmt: skip
VALID_CODES = {
    rpc.PARSE_ERROR,
    rpc.INVALID_REQUEST,
    rpc.METHOD_NOT_FOUND,
    rpc.INVALID_PARAMS,
    rpc.TYPING_LOG_ERROR,
}


def _send_then_check(daemon: Served, garbage: bytes) -> None:
    """Send `garbage`, then a good request, then end the input: the daemon answers every
    line (all well-formed JSON-RPC, documented codes only), the good request included, and
    keeps serving everyone."""
    with connect(daemon.socket) as c:
        c.send(garbage + b"\n" + rpc.request_line("predict", {"context": "I would"}, "good"))
        c.sock.shutdown(socket.SHUT_WR)
        answered = False
        while (answer := c.read()) is not None:
            for a in answer if isinstance(answer, list) else [answer]:
                assert a["jsonrpc"] == "2.0" and "id" in a
                assert ("result" in a) != ("error" in a)
                if "error" in a:
                    assert a["error"]["code"] in VALID_CODES, a
                if a["id"] == "good":
                    assert_prediction(a["result"], 3)
                    answered = True
        assert answered
    assert daemon.process.poll() is None
    with connect(daemon.socket) as fresh:
        assert_prediction(call(fresh, "predict", {"context": "Thank you"})["result"], 3)


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.binary(max_size=400))
def test_fuzz_random_bytes(daemon: Served, data: bytes) -> None:
    _send_then_check(daemon, data)


@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(message=json_values | near_requests | st.lists(near_requests, max_size=4))
def test_fuzz_random_json(daemon: Served, message: Any) -> None:
    _send_then_check(daemon, rpc.encode(message).rstrip(b"\n"))


# --- files, permissions, lifecycle --------------------------------------------------------------
def test_socket_and_database_permissions(daemon: Served) -> None:
    """The shared daemon was started with umask 000: permissions come from the daemon itself."""
    mode = daemon.socket.lstat().st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
    assert stat.S_IMODE(daemon.socket.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(daemon.home.stat().st_mode) == 0o700
    for name in ("typing_log.db", "daemon.lock"):
        assert stat.S_IMODE((daemon.home / name).stat().st_mode) == 0o600, name


def test_graceful_shutdown_with_requests_in_flight(tiny_llama: Path, root: Path) -> None:
    served = start_daemon(tiny_llama, root / "home", root / "s.sock")
    with connect(served.socket, timeout=60) as c:
        batch = [
            {"jsonrpc": "2.0", "id": i, "method": "predict",
             "params": {"context": f"{CONTEXTS[i % 7]} {i}", "k": 3}}
            for i in range(300)
        ] + [{"jsonrpc": "2.0", "id": "obs", "method": "observe",
              "params": {"text": "written just before shutdown"}}]  # fmt: skip
        c.send_json(batch)
        with connect(served.socket) as watcher:  # SIGTERM once the batch is being answered
            deadline = time.monotonic() + 30
            while (server := call(watcher, "status")["result"]["server"])["in_flight"] < 2:
                assert time.monotonic() < deadline, server
            served.process.send_signal(signal.SIGTERM)
        answers = c.read()
        assert answers is not None, served.output()
        assert {a["id"] for a in answers} == set(range(300)) | {"obs"}
        assert all("result" in a for a in answers)
        assert c.read() is None  # then the daemon closes the connection
    assert served.process.wait(timeout=30) == 0, served.output()
    assert "request(s) in flight" in served.output()
    assert "finishing 0 request(s)" not in served.output()
    assert not served.socket.exists()
    # The database was closed cleanly: WAL checkpointed away, the entry there, intact.
    db_path = served.home / "typing_log.db"
    assert not Path(f"{db_path}-wal").exists()
    with sqlite3.connect(db_path) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert db.execute("SELECT count(*) FROM entries WHERE text LIKE 'written just%'").fetchone()[0] == 1  # fmt: skip


def test_stale_socket_is_replaced_but_a_live_daemon_is_not(tiny_llama: Path, root: Path) -> None:
    sock = root / "s.sock"
    first = start_daemon(tiny_llama, root / "home", sock)
    first.stop(signal.SIGKILL)  # a crash: the socket file stays behind
    assert sock.exists()
    second = start_daemon(tiny_llama, root / "home", sock)
    try:
        assert "replacing the stale socket" in second.output()
        # Another `keyboard serve` on the same socket (another home), and on the same home.
        for home, path in ((root / "other", sock), (root / "home", root / "t.sock")):
            third = start_daemon(tiny_llama, home, path, wait=False)
            assert third.process.wait(timeout=60) == 1
            assert "keyboard is already running" in third.output()
        with connect(sock) as c:
            assert call(c, "status")["result"]["pid"] == second.process.pid
        # Something that is not a socket is never removed.
        not_a_socket = root / "file.sock"
        not_a_socket.write_text("keep me")
        fourth = start_daemon(tiny_llama, root / "h4", not_a_socket, wait=False)
        assert fourth.process.wait(timeout=60) == 1
        assert "is not a socket" in fourth.output()
        assert not_a_socket.read_text() == "keep me"
    finally:
        assert second.stop() == 0


def test_cli_client(tiny_llama: Path, root: Path) -> None:
    sock = root / "s.sock"
    env = daemon_env(root / "home", tiny_llama, KEYBOARD_SOCKET=str(sock))

    def keyboard(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "wordahead", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )

    down = keyboard("predict", "Thank you")
    assert down.returncode == 1 and "not running" in down.stderr
    assert "keyboard serve" in down.stderr
    started = keyboard("serve")
    assert started.returncode == 0, started.stderr
    assert "keyboard is serving" in started.stdout
    try:
        again = keyboard("serve")
        assert again.returncode == 1 and "already running" in again.stderr
        predicted = keyboard("predict", "I would like to", "-k", "2")
        assert predicted.returncode == 0, predicted.stderr
        assert len(predicted.stdout.strip().splitlines()) == 2
        status = keyboard("status")
        assert status.returncode == 0 and "adapter      base" in status.stdout
        # forget goes through the daemon (the typing log's one writer) while it runs.
        with connect(sock) as c:
            call(c, "observe", {"text": "from the diary", "source": "diary"})
        forgot = keyboard("forget", "--source", "diary")
        assert forgot.returncode == 0 and "forgot 1 entry" in forgot.stdout
        vague = keyboard("forget")  # the daemon's own message about what is missing
        assert vague.returncode == 1 and "say what to forget" in vague.stderr
        trained = keyboard("train", "--via-daemon", "--json")
        assert json.loads(trained.stdout)["pid"] > 0, trained.stderr
    finally:
        stopped = keyboard("stop")
    assert stopped.returncode == 0, stopped.stderr
    assert not sock.exists()
    assert keyboard("status").returncode == 1
    assert "not running" in keyboard("train", "--via-daemon").stderr
    # Without a daemon, forget works on the database directly.
    from wordahead.store.typing_log import TypingLog

    with TypingLog(Home.at(env["KEYBOARD_HOME"]).typing_log) as log:
        log.record("written while the daemon was down", source="diary")
    forgot = keyboard("forget", "--source", "diary")
    assert forgot.returncode == 0 and "forgot 1 entry" in forgot.stdout


def test_work_ahead_keeps_to_its_share_of_the_cpu():
    from wordahead.daemon.methods import AheadBudget

    now = [100.0]
    budget = AheadBudget(share=0.25, burst=0.25, clock=lambda: now[0])
    assert budget.allows()
    budget.spend(0.3)  # one long guess overdraws it: nothing more until it is paid back
    assert not budget.allows()
    now[0] += 0.1  # a quarter of 0.1 s back: still 0.025 s short
    assert not budget.allows()
    now[0] += 0.2
    assert budget.allows()
    now[0] += 3600.0  # an idle hour refills no more than the burst
    assert budget.allows()
    budget.spend(0.25)
    assert not budget.allows()


def test_a_lone_prediction_is_computed_without_the_pool(
    in_thread: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Alone, a prediction is computed on the daemon's own thread (no two thread switches);
    # with others being answered (a batch), on the inference pool, so they run side by side.
    predictor = in_thread.methods.predictor
    ran_on: list[str] = []
    predict = predictor.predict

    def recorded(context: str, k: int = 3) -> Any:
        ran_on.append(threading.current_thread().name)
        return predict(context, k)

    monkeypatch.setattr(predictor, "predict", recorded)
    with connect(in_thread.config.socket_path) as c:
        alone = call(c, "predict", {"context": "Thank you so much for your"})["result"]
        assert ran_on == ["keyboard-daemon"]
        c.send_json(
            [{"jsonrpc": "2.0", "id": i, "method": "predict",
              "params": {"context": f"{CONTEXTS[i]} and"}} for i in range(3)]
        )  # fmt: skip
        assert sorted(a["id"] for a in c.read()) == [0, 1, 2]
        assert all(name.startswith("keyboard-predict") for name in ran_on[1:])
        assert len(ran_on) == 4
        again = call(c, "predict", {"context": "Thank you so much for your"})["result"]
    assert again["candidates"] == alone["candidates"]  # the same answer, cached now


def test_work_ahead_waits_for_a_pause(in_thread: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    # Keystrokes closer together than AHEAD_DELAY_S compute nothing ahead; a pause after
    # the last one computes the keystroke after it.
    from wordahead.daemon import methods

    monkeypatch.setattr(methods, "AHEAD_DELAY_S", 0.5)
    predictor = in_thread.methods.predictor
    ahead: list[str] = []
    monkeypatch.setattr(predictor, "prefetch", lambda context, k, stop: ahead.append(context))
    with connect(in_thread.config.socket_path) as c:
        started = time.monotonic()
        for context in ("Could you please se", "Could you please sen", "Could you please send"):
            assert "result" in call(c, "predict", {"context": context})
        if time.monotonic() - started >= 0.5:
            pytest.skip("the machine is too slow to type faster than the pause")
        assert ahead == []
        deadline = time.monotonic() + 10
        while not ahead and time.monotonic() < deadline:
            time.sleep(0.05)
    assert ahead == ["Could you please send"]
