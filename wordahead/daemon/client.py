"""A small synchronous client for the daemon's socket (used by the CLI and the LSP server)."""

from __future__ import annotations

import fcntl
import itertools
import json
import os
import signal
import socket
import struct
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from wordahead import paths
from wordahead.daemon import protocol as rpc
from wordahead.types import KeyboardError

DEFAULT_TIMEOUT_S = 30.0


class DaemonNotRunning(KeyboardError):
    """Nothing answers on the daemon's socket."""


class ForeignDaemon(DaemonNotRunning):
    """The socket is served by a process of another user: not this user's daemon, and never
    sent a byte."""


class NoAnswer(KeyboardError):
    """The daemon did not answer in time."""


class DaemonClient:
    """One connection to the daemon, opened on first use and reused; calls are serialised.

    `call("predict", context="I would like", k=3)` returns the result, raises RpcError for
    an error answer and DaemonNotRunning when nothing listens on the socket.
    """

    def __init__(
        self, socket_path: str | Path | None = None, timeout: float | None = DEFAULT_TIMEOUT_S
    ) -> None:
        self.socket_path = Path(socket_path) if socket_path else paths.socket_path()
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._buffer = b""
        self._ids = itertools.count(1)
        self._lock = threading.Lock()

    def __enter__(self) -> DaemonClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            self._close()

    def _close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
            self._buffer = b""

    def _connect(self) -> socket.socket:
        if self._sock is not None:
            return self._sock
        self._sock = connect(self.socket_path, self.timeout)
        return self._sock

    def is_running(self) -> bool:
        """True when a daemon answers `status`."""
        try:
            self.call("status")
        except DaemonNotRunning:
            return False
        return True

    def call(self, method: str, timeout: float | None | bool = False, **params: Any) -> Any:
        """Send one request and return its result. `timeout` (seconds, or None: no limit)
        overrides the client's for this call (`train` with wait=True can take minutes)."""
        with self._lock:
            request_id = next(self._ids)
            line = rpc.request_line(method, params, request_id)
            # A reused connection the daemon closed since the last call (it restarted) is
            # retried once on a fresh one; it never read the request, so nothing runs twice.
            for attempt in (1, 2):
                reused = self._sock is not None
                sock = self._connect()
                if timeout is not False:
                    sock.settimeout(timeout)
                try:
                    sock.sendall(line)
                    answer = self._read_answer(sock, request_id)
                except (BrokenPipeError, ConnectionResetError, _Closed):
                    self._close()
                    if attempt == 2 or not reused:
                        raise DaemonNotRunning(
                            f"the keyboard daemon at {self.socket_path} closed the connection"
                        ) from None
                    continue
                except TimeoutError:
                    self._close()
                    raise NoAnswer(
                        f"the keyboard daemon at {self.socket_path} did not answer {method} in time"
                    ) from None
                finally:
                    if self._sock is not None and timeout is not False:
                        self._sock.settimeout(self.timeout)
                break
        if "error" in answer:
            error = answer["error"] or {}
            raise rpc.RpcError(
                int(error.get("code", rpc.SERVER_ERROR)),
                str(error.get("message", "the daemon reported an error")),
                error.get("data"),
            )
        return answer.get("result")

    def notify(self, method: str, **params: Any) -> None:
        """Send a notification: no answer, errors included (fire and forget)."""
        with self._lock:
            sock = self._connect()
            try:
                sock.sendall(rpc.request_line(method, params, None))
            except OSError:
                self._close()
                raise DaemonNotRunning(
                    f"the keyboard daemon at {self.socket_path} closed the connection"
                ) from None

    def _read_answer(self, sock: socket.socket, request_id: int) -> dict[str, Any]:
        while True:
            newline = self._buffer.find(b"\n")
            while newline < 0:
                chunk = sock.recv(65536)
                if not chunk:
                    raise _Closed
                self._buffer += chunk
                newline = self._buffer.find(b"\n")
            line, self._buffer = self._buffer[:newline], self._buffer[newline + 1 :]
            try:
                answer = json.loads(line)
            except ValueError as exc:
                raise KeyboardError(f"the daemon sent something that is not JSON: {exc}") from exc
            if isinstance(answer, dict) and answer.get("id") == request_id:
                return answer
            if isinstance(answer, dict) and answer.get("id") is None and "error" in answer:
                return answer  # a connection-level error (too large, shutting down)
            # Anything else answers an earlier request that timed out: skip it.


class _Closed(Exception):
    """The daemon closed the connection before answering."""


CONNECT_RETRY_S = 3.0  # how long a burst that fills the daemon's backlog is retried


def connect(path: Path, timeout: float | None = DEFAULT_TIMEOUT_S) -> socket.socket:
    """A connection to the daemon at `path`, checked to be served by this user.

    A full listen backlog (EAGAIN, a burst of clients) is retried for a few seconds. A socket
    served by another user's process is refused before anything is sent (ForeignDaemon):
    whoever can write to the socket's directory could otherwise listen in on what is typed.
    """
    deadline = time.monotonic() + CONNECT_RETRY_S
    delay = 0.005
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
            raise DaemonNotRunning(
                f"the keyboard daemon is not running (nothing at {path}); "
                "start it with `keyboard serve`"
            ) from None
        except BlockingIOError:  # EAGAIN: the backlog is full, the daemon is busy accepting
            sock.close()
            if time.monotonic() + delay > deadline:
                raise DaemonNotRunning(
                    f"the keyboard daemon at {path} accepts no connections (its backlog stayed "
                    f"full for {CONNECT_RETRY_S:.0f} s); try again shortly"
                ) from None
            time.sleep(delay)
            delay = min(delay * 2, 0.2)
            continue
        except OSError as exc:
            sock.close()
            raise DaemonNotRunning(
                f"cannot reach the keyboard daemon at {path}: {exc.strerror or exc}"
            ) from None
        break
    try:
        check_peer(sock, path)
    except BaseException:
        sock.close()
        raise
    return sock


def peer_uid(sock: socket.socket) -> int | None:
    """The uid of the process at the other end of a connected Unix socket (None where the
    platform has no SO_PEERCRED)."""
    if not hasattr(socket, "SO_PEERCRED"):
        return None
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[1]


def check_peer(sock: socket.socket, path: Path) -> None:
    """Raise ForeignDaemon unless this user's process serves `sock`."""
    uid = peer_uid(sock)
    if uid is None:  # no SO_PEERCRED (macOS): the socket file's owner is the next best witness
        uid = os.stat(path).st_uid
    if uid != os.geteuid():
        raise ForeignDaemon(
            f"the socket {path} is served by another user (uid {uid}), not by your keyboard "
            "daemon, so nothing was sent to it. Whoever can write to its directory could read "
            "what you type: use a socket in a directory only you can write (the default, "
            "--socket or KEYBOARD_SOCKET), and start your daemon there with `keyboard serve`"
        )


def stop_daemon(socket_path: str | Path | None = None, timeout: float = 30.0) -> int:
    """Ask the daemon to shut down (SIGTERM: it finishes requests in flight); its pid.

    The pid comes from the pid file beside the socket, which the daemon holds locked while
    it runs, so `stop` works even when `status` cannot answer (a damaged typing log, a hung
    model); a daemon of an older version without one is asked through `status`.
    """
    path = Path(socket_path) if socket_path else paths.socket_path()
    pid = running_pid(path)
    if pid is None:
        with DaemonClient(path, timeout=5.0) as client:
            pid = int(client.call("status")["pid"])
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return pid
        time.sleep(0.05)
    raise KeyboardError(f"the daemon (pid {pid}) is still running after {timeout:.0f} s")


def running_pid(socket_path: Path) -> int | None:
    """The pid of the daemon serving `socket_path`, from its pid file: only while the daemon
    holds the file's lock (so a pid left by a dead daemon, maybe reused since, is never
    signalled), and only a file of this user's. None when no daemon holds it."""
    path = paths.pid_file(socket_path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        if os.fstat(fd).st_uid != os.geteuid():
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:  # held: a live daemon wrote it
            data = json.loads(os.read(fd, 4096) or b"{}")
            pid = int(data["pid"])
            return pid if pid > 0 else None
        return None  # nobody holds it: left by a daemon that died
    except (OSError, ValueError, KeyError, TypeError):
        return None
    finally:
        os.close(fd)


def describe_status(status: dict[str, Any]) -> str:
    """`status` for a person to read."""
    model = status.get("model") or {}
    adapter = status.get("adapter") or {}
    typing_log = status.get("typing_log") or {}
    person = status.get("personalization") or {}
    server = status.get("server") or {}
    lines = [
        f"daemon       pid {status.get('pid')}, up {_duration(status.get('uptime_s') or 0)}, "
        f"socket {status.get('socket')}",
        f"model        {model.get('name')} from {model.get('dir')}",
    ]
    change = describe_metrics(adapter.get("metrics"))
    lines.append(f"adapter      {adapter.get('version')}" + (f"  ({change})" if change else ""))
    phrases = adapter.get("phrases")
    lines.append(
        "phrases      "
        + (
            f"{phrases.get('words', 0):,} words, {phrases.get('ngrams', 0):,} word pairs/triples"
            if phrases
            else "none (the nightly job counts them)"
        )
    )
    if typing_log.get("error"):
        lines.append(f"typing log   UNAVAILABLE: {typing_log['error']}")
    else:
        lines.append(
            f"typing log   {typing_log.get('entries', 0):,} entries, "
            f"{typing_log.get('words', 0):,} words"
            + (" (PAUSED)" if typing_log.get("paused") else "")
        )
    running = person.get("running")
    last = person.get("last_job")
    if running:
        lines.append(f"training     job running since {running.get('started')}")
    lines.append(
        "last job     "
        + (f"#{last.get('id')} {last.get('status')} {last.get('started')}" if last else "none")
        + (f": {last.get('reason')}" if last and last.get("status") == "failed" else "")
    )
    failure = person.get("last_failure")
    if failure and _newer_failure(failure, last):
        lines.append(f"last failure {failure.get('time')}: {failure.get('reason')}")
    lines.append(f"next job     {_local_time(person.get('next_run')) or 'not scheduled'}")
    lines.append(
        f"server       {server.get('connections')} connection(s), {server.get('served')} "
        f"requests served, RSS {server.get('rss_mb')} MB"
    )
    return "\n".join(lines)


def _newer_failure(failure: dict[str, Any], last: dict[str, Any] | None) -> bool:
    """A recorded job failure worth showing: not already the last job's own line, and not
    older than the last job (a later job that ran makes it history)."""
    if not last:
        return True
    if failure.get("job") is not None and failure.get("job") == last.get("id"):
        return last.get("status") != "failed"  # the log could not record why it failed
    try:
        failed = datetime.fromisoformat(str(failure.get("time")).replace("Z", "+00:00"))
        started = datetime.fromisoformat(str(last.get("started")).replace("Z", "+00:00"))
        return failed >= started
    except ValueError:
        return True


def describe_progress(running: Any) -> str:
    """A running job's latest progress (`status` → personalization.running) as one line."""
    if not isinstance(running, dict):
        return ""
    record = running.get("progress")
    if not isinstance(record, dict):
        return f"personalization job started (pid {running.get('pid')}); reading the text"
    if record.get("event") in ("promoted", "rejected", "skipped", "busy", "failed"):
        return ""  # the outcome: the command prints it once the job has ended
    if record.get("event") == "step":
        line = f"training: step {record.get('step')}/{record.get('max_steps')}"
        if isinstance(record.get("loss"), (int, float)):
            line += f", loss {record['loss']:.3f}"
        if isinstance(record.get("eta_s"), (int, float)):
            line += f", about {record['eta_s']:.0f} s left"
        return line
    return str(record.get("message") or record.get("event") or "")


def describe_metrics(metrics: Any) -> str:
    """What training changed, from an adapter's recorded metrics ({"before": {...}, "after":
    {...}}: held-out loss and next-word top-3), for a person; "" when they do not say."""
    if not isinstance(metrics, dict):
        return ""
    before, after = metrics.get("before"), metrics.get("after")
    if not isinstance(before, dict) or not isinstance(after, dict):
        return ""
    parts = []
    if isinstance(before.get("loss"), (int, float)) and isinstance(after.get("loss"), (int, float)):
        parts.append(f"held-out loss {before['loss']:.3f} -> {after['loss']:.3f}")
    if isinstance(before.get("top3"), (int, float)) and isinstance(after.get("top3"), (int, float)):
        parts.append(f"next-word top-3 {100 * before['top3']:.1f}% -> {100 * after['top3']:.1f}%")
    return ", ".join(parts)


def _local_time(stamp: Any) -> str:
    """An ISO 8601 time as the local "YYYY-MM-DD HH:MM"; "" for none."""
    from datetime import datetime

    if not stamp:
        return ""
    try:
        return datetime.fromisoformat(str(stamp)).astimezone().strftime("%Y-%m-%d %H:%M")
    except ValueError:
        return str(stamp)


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"


def forget_via_daemon(
    since: str | None, until: str | None, source: str | None, everything: bool
) -> int | None:
    """`forget` through the running daemon (the typing log's one writer); None when no daemon
    runs, so the caller erases from the database itself."""
    try:
        with DaemonClient(timeout=None) as client:
            result = client.call("forget", since=since, until=until, source=source, all=everything)
    except DaemonNotRunning:
        return None
    return int(result["deleted"])
