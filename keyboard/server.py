"""The daemon: serves predictions and collects typed text over a local Unix socket (JSON-RPC)."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import importlib.util
import json
import logging
import os
import signal
import socket
import sqlite3
import stat
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from keyboard import __version__, paths
from keyboard import protocol as rpc
from keyboard.protocol import Invalid, Request, RpcError
from keyboard.types import KeyboardError

log = logging.getLogger("keyboard.server")

MAX_CONNECTIONS = 512  # well under the usual 1024 open files
MAX_IN_FLIGHT_PER_CONNECTION = 64  # a pipelining client waits (is not read) beyond this
WORK_PER_CONNECTION = 4  # requests of one client queued for the worker threads at once
WRITE_TIMEOUT_S = 10.0  # a client that does not read its answers for this long is dropped
SHUTDOWN_GRACE_S = 10.0  # how long SIGTERM waits for requests in flight
JOB_ID_WAIT_S = 3.0  # how long `train` looks for the job's row in the typing log
ADAPTER_POLL_S = 5.0  # how often the daemon looks for a newly activated adapter
JOB_STOP_S = 10.0  # how long shutdown lets a personalization job stop before killing it
SOCKET_PATH_MAX = 104  # sun_path is 104 bytes on macOS, 108 on Linux (with the NUL)
LOCK_FILE = "daemon.lock"


class AlreadyRunning(KeyboardError):
    """Another daemon answers on the socket or holds the home's lock."""


@dataclass
class ServeConfig:
    """What one daemon serves, and where."""

    socket_path: Path
    model_dir: Path
    threads: int = 1  # ONNX Runtime intra-op threads per prediction
    workers: int = 0  # predictions run at once; 0: one per core (at most 4)

    def inference_workers(self) -> int:
        if self.workers > 0:
            return self.workers
        return max(1, min(4, (os.cpu_count() or 1) // max(1, self.threads)))


# --- one instance per home and socket -----------------------------------------------------------
def _socket_answers(path: Path) -> bool:
    """True when a process accepts connections on `path`; False when nothing listens there."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(2.0)
    try:
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        return False
    except TimeoutError:
        return True  # a full backlog: something is listening
    except PermissionError as exc:
        raise KeyboardError(f"cannot check the socket {path}: {exc.strerror}") from exc
    finally:
        probe.close()
    return True


def _claim_lock(lock_path: Path, socket_path: Path) -> int:
    """Hold the home's daemon lock (flock: released by the kernel if we die). Returns its fd."""
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        try:
            holder = json.loads(os.read(fd, 4096) or b"{}")
        except ValueError:
            holder = {}
        os.close(fd)
        raise AlreadyRunning(
            f"keyboard is already running for {lock_path.parent} (pid {holder.get('pid', '?')}, "
            f"socket {holder.get('socket', '?')}); stop it with `keyboard stop` first"
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps({"pid": os.getpid(), "socket": str(socket_path)}).encode())
    return fd


def _bind(path: Path) -> socket.socket:
    """A listening socket at `path`, 0600 from the start; a stale socket file is replaced."""
    if len(os.fsencode(path)) >= SOCKET_PATH_MAX:
        raise KeyboardError(
            f"the socket path {path} is {len(os.fsencode(path))} bytes; Unix sockets allow "
            f"{SOCKET_PATH_MAX - 1}: pass a shorter --socket or set KEYBOARD_SOCKET"
        )
    if not path.parent.exists():
        paths.private_dir(path.parent)  # an existing directory is the caller's choice
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(mode):
            raise KeyboardError(f"{path} exists and is not a socket; move it away or pick --socket")
        if _socket_answers(path):
            raise AlreadyRunning(f"keyboard is already running at {path}")
        log.info("replacing the stale socket %s (left by a daemon that stopped)", path)
        path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)  # the socket file is created 0600: no moment when others may connect
    try:
        sock.bind(str(path))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise AlreadyRunning(f"keyboard is already running at {path}") from exc
        raise KeyboardError(f"cannot create the socket {path}: {exc.strerror}") from exc
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    sock.listen(256)
    sock.setblocking(False)
    return sock


# --- connections --------------------------------------------------------------------------------
@dataclass(eq=False)
class _Connection:
    """One client: its writer, a lock so answers never interleave, its requests in flight."""

    writer: asyncio.StreamWriter
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    slots: asyncio.Semaphore = field(
        default_factory=lambda: asyncio.Semaphore(MAX_IN_FLIGHT_PER_CONNECTION)
    )
    # Fairness: the worker queues are first come, first served, so a client that sends
    # thousands of requests at once queues only a few at a time, and others' go in between.
    work: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(WORK_PER_CONNECTION))
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    closed: bool = False

    async def send(self, data: bytes) -> None:
        async with self.lock:
            if self.closed:
                return
            try:
                self.writer.write(data)
                if self.writer.transport.get_write_buffer_size() > 0:  # usually all sent already
                    await asyncio.wait_for(self.writer.drain(), WRITE_TIMEOUT_S)
            except (asyncio.TimeoutError, ConnectionError, OSError, RuntimeError):
                # A stalled or vanished reader: drop it rather than buffer without limit.
                self.abort()

    def abort(self) -> None:
        self.closed = True
        self.writer.transport.abort()


def _encode_answer(request_id: Any, result: Any) -> bytes:
    """The encoded answer; an unencodable result becomes an error, not a dropped reply."""
    try:
        return rpc.encode(rpc.result_response(request_id, result))
    except ValueError as exc:
        log.error("cannot encode a result: %s", exc)
        error = RpcError(rpc.SERVER_ERROR, "the daemon produced a result it cannot encode")
        return rpc.encode(rpc.error_response(request_id, error))


@dataclass
class _Job:
    """The personalization job in progress (a child process)."""

    process: asyncio.subprocess.Process
    started: str
    reason: str
    job_id: int | None = None
    done: asyncio.Future[dict[str, Any]] | None = None


class Daemon:
    """The serving process: a predictor, the typing log (one writer thread), personalization
    jobs as child processes. Never imports torch."""

    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self.started = time.monotonic()
        self.predictor: Any = None
        self.typing_log: Any = None
        self.adapter_store: Any = None
        self.adapter_metadata: dict[str, Any] = {}
        self._infer_pool = ThreadPoolExecutor(
            config.inference_workers(), thread_name_prefix="keyboard-predict"
        )
        self._log_pool = ThreadPoolExecutor(1, thread_name_prefix="keyboard-typing-log")
        self._misc_pool = ThreadPoolExecutor(1, thread_name_prefix="keyboard-adapters")
        self._connections: set[_Connection] = set()
        self._handlers: set[asyncio.Task[None]] = set()
        self._in_flight: set[asyncio.Task[None]] = set()
        self._job: _Job | None = None
        self._stopping = False
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock_fd: int | None = None
        self._socket_inode: int | None = None
        self._next_scheduled: datetime | None = None
        self._pointer_seen: tuple[int, int] | None = None
        self.served = 0
        self.ready_seconds: float | None = None

    # --- lifecycle ------------------------------------------------------------------------
    def _load(self) -> None:
        """Open the model, the active adapter and the typing log (before serving starts)."""
        from keyboard.predictor import Predictor
        from keyboard.typing_log import TypingLog

        model_dir = self.config.model_dir
        if not (model_dir / "manifest.json").is_file():
            raise KeyboardError(
                f"no model at {model_dir}: pass --model DIR or set KEYBOARD_MODEL "
                "(an artifact set made by `keyboard export`)"
            )
        opened = self._log_pool.submit(TypingLog)  # meanwhile, on its own thread
        try:
            self.predictor = Predictor(model_dir, threads=self.config.threads)
            if importlib.util.find_spec("keyboard.adapter_store") is not None:
                from keyboard.adapter_store import AdapterStore

                self.adapter_store = AdapterStore(artifacts=self.predictor.artifacts)
                self._reload_adapter()
        finally:
            self.typing_log = opened.result()

    def _reload_adapter(self) -> dict[str, Any]:
        """Serve the store's active adapter (the base model when there is none)."""
        if self.adapter_store is None:
            raise RpcError(
                rpc.PERSONALIZATION_UNAVAILABLE,
                "personalization is not installed (keyboard.adapter_store is missing)",
            )
        self._pointer_seen = _pointer_key(self._pointer_path())  # before reading: no lost change
        active = self.adapter_store.active()
        if active is None:
            ok = self.predictor.load_adapter(None, version="base")
            self.adapter_metadata = {}
        else:
            version, path, metadata = active
            phrases = self.adapter_store.phrases_path(version)
            ok = self.predictor.load_adapter(path, version=version, phrases=phrases)
            self.adapter_metadata = metadata if ok else {}
        wanted = "base" if active is None else active[0]
        log.info(
            "serving adapter %s%s",
            self.predictor.adapter_version,
            "" if ok else f" ({wanted} would not load)",
        )
        out = {"adapter": self.predictor.adapter_version, "loaded": bool(ok)}
        if not ok:
            out["message"] = f"adapter {wanted} could not be loaded; serving the base model"
        return out

    async def run(
        self,
        *,
        install_signals: bool = True,
        on_ready: Callable[[Daemon], None] | None = None,
    ) -> None:
        """Serve until SIGTERM/SIGINT (or `stop()`), then shut down cleanly."""
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        path = self.config.socket_path
        if path.is_socket() and _socket_answers(path):  # the clearest message first
            raise AlreadyRunning(f"keyboard is already running at {path}")
        self._lock_fd = _claim_lock(paths.home() / LOCK_FILE, path)
        sock: socket.socket | None = None
        server: asyncio.AbstractServer | None = None
        try:
            sock = _bind(path)
            self._socket_inode = path.stat().st_ino
            # Bound before the model loads: clients that connect meanwhile wait in the backlog
            # and a second daemon sees this one at once.
            server = await asyncio.start_unix_server(
                self._on_connection, sock=sock, limit=rpc.MAX_LINE_BYTES, start_serving=False
            )
            if install_signals:  # before loading: a SIGTERM meanwhile still shuts down cleanly
                for sig in (signal.SIGTERM, signal.SIGINT):
                    self._loop.add_signal_handler(sig, self._stop.set)
            await self._loop.run_in_executor(self._misc_pool, self._load)
            if install_signals:
                self._loop.add_signal_handler(signal.SIGHUP, self._reload_soon)
            await server.start_serving()
            self.ready_seconds = time.monotonic() - self.started
            log.info(
                "serving %s at %s (pid %d, ready in %.2f s)",
                self.config.model_dir,
                path,
                os.getpid(),
                self.ready_seconds,
            )
            if on_ready is not None:
                on_ready(self)
            background = [
                asyncio.create_task(self._scheduler()),
                asyncio.create_task(self._watch_adapters()),
            ]
            await self._stop.wait()
            for task in background:
                task.cancel()
            log.info("stopping: finishing %d request(s) in flight", len(self._in_flight))
            await self._shutdown(server)
        finally:
            if server is not None:
                server.close()
            elif sock is not None:
                sock.close()
            self._remove_socket()
            self._close_resources()
            if install_signals:
                for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                    self._loop.remove_signal_handler(sig)
            log.info("stopped")

    @property
    def stopping(self) -> bool:
        """True from the moment shutdown begins."""
        return self._stopping

    @property
    def connections(self) -> int:
        """Clients connected now."""
        return len(self._connections)

    @property
    def in_flight(self) -> int:
        """Request lines being answered now."""
        return len(self._in_flight)

    def stop(self) -> None:
        """Ask the daemon to shut down (from any thread)."""
        if self._loop is not None and self._stop is not None:
            with contextlib.suppress(RuntimeError):  # already stopped: its loop is closed
                self._loop.call_soon_threadsafe(self._stop.set)

    def _remove_socket(self) -> None:
        path = self.config.socket_path
        with contextlib.suppress(OSError):
            if self._socket_inode is not None and path.stat().st_ino == self._socket_inode:
                path.unlink()  # only our own: a successor may already have replaced it

    async def _shutdown(self, server: asyncio.AbstractServer) -> None:
        self._stopping = True
        server.close()  # no new connections
        self._remove_socket()
        await self._stop_job()  # first: a `train` waiting on it then gets its answer
        if self._in_flight:
            _, pending = await asyncio.wait(set(self._in_flight), timeout=SHUTDOWN_GRACE_S)
            if pending:
                log.warning("%d request(s) did not finish in time", len(pending))
        for conn in list(self._connections):
            conn.closed = True
            conn.writer.close()  # flushes what is buffered, then closes
        if self._handlers:
            await asyncio.wait(set(self._handlers), timeout=2.0)

    def _close_resources(self) -> None:
        if self.typing_log is not None:
            log_ = self.typing_log
            self.typing_log = None
            try:
                self._log_pool.submit(log_.close).result(timeout=30)
            except Exception as exc:  # noqa: BLE001 - shutting down: report, keep going
                log.error("closing the typing log failed: %s", exc)
        for pool in (self._infer_pool, self._log_pool, self._misc_pool):
            pool.shutdown(wait=True, cancel_futures=True)
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None

    def _reload_soon(self) -> None:
        async def reload() -> None:
            try:
                await self._rpc_reload()
            except RpcError as exc:
                log.error("reload failed: %s", exc.message)

        asyncio.ensure_future(reload())

    # --- connections ----------------------------------------------------------------------
    async def _on_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        conn = _Connection(writer)
        if self._stopping or len(self._connections) >= MAX_CONNECTIONS:
            error = (
                RpcError(rpc.SHUTTING_DOWN, "the daemon is shutting down")
                if self._stopping
                else RpcError(
                    rpc.OVERLOADED,
                    f"the daemon has {MAX_CONNECTIONS} connections open; try again shortly",
                )
            )
            await conn.send(rpc.encode(rpc.error_response(None, error)))
            writer.close()
            return
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(conn)
        self._handlers.add(task)
        try:
            await self._read_requests(conn, reader)
            if conn.tasks:  # the client closed its side: answer what it sent before closing
                await asyncio.wait(set(conn.tasks))
        finally:
            self._connections.discard(conn)
            self._handlers.discard(task)
            conn.closed = True
            writer.close()

    async def _read_requests(self, conn: _Connection, reader: asyncio.StreamReader) -> None:
        while not conn.closed:
            try:
                line = await reader.readuntil(b"\n")
            except asyncio.IncompleteReadError as exc:
                line = exc.partial  # end of input: a last line without a newline still counts
                if line.strip():
                    await self._accept_line(conn, line)
                return
            except asyncio.LimitOverrunError:
                error = RpcError(
                    rpc.REQUEST_TOO_LARGE,
                    f"a request line is limited to {rpc.MAX_LINE_BYTES:,} bytes; "
                    "this connection is closed",
                )
                await conn.send(rpc.encode(rpc.error_response(None, error)))
                return
            except (ConnectionError, OSError):
                return
            if self._stopping:
                await self._refuse(conn, line)
                return
            if line.strip():
                await self._accept_line(conn, line)

    async def _accept_line(self, conn: _Connection, line: bytes) -> None:
        await conn.slots.acquire()  # back-pressure: stop reading while too many are in flight
        task = asyncio.create_task(self._answer_line(conn, line))
        conn.tasks.add(task)
        self._in_flight.add(task)
        task.add_done_callback(conn.tasks.discard)
        task.add_done_callback(self._in_flight.discard)

    async def _refuse(self, conn: _Connection, line: bytes) -> None:
        parsed, batch = rpc.parse_line(line)
        error = RpcError(rpc.SHUTTING_DOWN, "the daemon is shutting down; retry when it is back")
        answers = [
            rpc.encode(rpc.error_response(p.id, error if isinstance(p, Request) else p.error))
            for p in parsed
            if not (isinstance(p, Request) and p.notification)
        ]
        if answers:
            await conn.send(_join(answers, batch))

    async def _answer_line(self, conn: _Connection, line: bytes) -> None:
        try:
            parsed, batch = rpc.parse_line(line)
            if len(parsed) == 1:  # the common case, without gather's extra tasks
                answers = [await self._answer(conn, parsed[0])]
            else:
                answers = await asyncio.gather(*(self._answer(conn, p) for p in parsed))
            encoded = [a for a in answers if a is not None]
            if encoded:
                await conn.send(_join(encoded, batch))
        finally:
            conn.slots.release()

    async def _answer(self, conn: _Connection, item: Request | Invalid) -> bytes | None:
        """The encoded response to one request (None for a notification)."""
        if isinstance(item, Invalid):
            return rpc.encode(rpc.error_response(item.id, item.error))
        try:
            result = await self._call(conn, item.method, item.params)
        except RpcError as exc:
            error = exc
        except Exception:  # noqa: BLE001 - one failing request must not take the daemon down
            log.exception("%s failed", item.method)
            error = RpcError(
                rpc.SERVER_ERROR,
                f"{item.method} failed inside the daemon; its log has the details",
            )
        else:
            self.served += 1
            return None if item.notification else _encode_answer(item.id, result)
        return None if item.notification else rpc.encode(rpc.error_response(item.id, error))

    async def _call(
        self, conn: _Connection, method: str, params: dict[str, Any] | list[Any]
    ) -> Any:
        bound = rpc.bind_params(method, params)
        handler: Callable[..., Awaitable[Any]] = getattr(self, f"_rpc_{method}")
        if method == "train":  # waits on a child process, not on the worker threads
            return await handler(**bound)
        async with conn.work:
            return await handler(**bound)

    def _in(self, pool: ThreadPoolExecutor, fn: Callable[..., Any], *args: Any) -> Awaitable[Any]:
        assert self._loop is not None
        return self._loop.run_in_executor(pool, fn, *args)

    async def _logged(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run a typing-log call on its one writer thread, with its errors as RPC errors."""
        from keyboard.typing_log import InvalidText

        try:
            return await self._in(self._log_pool, fn, *args)
        except InvalidText as exc:
            raise RpcError(rpc.INVALID_PARAMS, str(exc)) from exc
        except (KeyboardError, sqlite3.Error, OSError) as exc:
            log.error("typing log: %s", exc)
            raise RpcError(rpc.TYPING_LOG_ERROR, f"the typing log failed: {exc}") from exc

    # --- methods --------------------------------------------------------------------------
    async def _rpc_predict(self, context: str, k: int) -> dict[str, Any]:
        rpc.check_predict({"context": context, "k": k})
        return await self._in(self._infer_pool, self._predict, context, k)

    def _predict(self, context: str, k: int) -> dict[str, Any]:
        try:
            return self.predictor.predict(context, k=k).to_json()
        except KeyboardError as exc:
            raise RpcError(rpc.INVALID_PARAMS, f"predict: {exc}") from exc
        except Exception as exc:  # noqa: BLE001 - ONNX Runtime raises plain RuntimeErrors
            log.exception("prediction failed")
            raise RpcError(rpc.MODEL_UNAVAILABLE, f"the model failed to predict: {exc}") from exc

    async def _rpc_observe(self, text: str, source: str, private: bool) -> dict[str, Any]:
        recorded = await self._logged(self._record, text, source, private)
        return recorded.to_json()

    def _record(self, text: str, source: str, private: bool) -> Any:
        return self.typing_log.record(text, source=source, private=private)

    async def _rpc_feedback(self, context: str, accepted: str) -> dict[str, Any]:
        entry = await self._logged(self.typing_log.add_feedback, context, accepted)
        return {"stored": entry is not None, **({"id": entry} if entry is not None else {})}

    async def _rpc_forget(
        self, since: str | None, until: str | None, source: str | None, all: bool
    ) -> dict[str, int]:
        from keyboard.typing_log import parse_time

        if not (all or since or until or source):
            raise RpcError(
                rpc.INVALID_PARAMS,
                "forget: say what to forget: since and/or until (ISO 8601 dates), a source, "
                'or "all": true',
            )
        for name, value in (("since", since), ("until", until)):
            if value is not None:
                try:
                    parse_time(value)
                except KeyboardError as exc:
                    raise RpcError(rpc.INVALID_PARAMS, f"forget: {name}: {exc}") from exc
        deleted = await self._logged(self._forget, since, until, source, all)
        return {"deleted": deleted}

    def _forget(self, since: str | None, until: str | None, source: str | None, all: bool) -> int:
        deleted = self.typing_log.forget(since, until, source, everything=all)
        if deleted:
            from keyboard.adapter_store import forget_phrases

            # The user phrases are counts of logged text: none may outlive what was forgotten.
            # The next job rebuilds them from what the log still holds.
            if forget_phrases() and self.adapter_store is not None:
                self._reload_adapter()
        return deleted

    async def _rpc_pause(self) -> dict[str, bool]:
        """Stop storing typed text (kept in the database, so it survives restarts)."""
        await self._logged(self.typing_log.pause)
        return {"paused": True}

    async def _rpc_resume(self) -> dict[str, bool]:
        await self._logged(self.typing_log.resume)
        return {"paused": False}

    async def _rpc_status(self) -> dict[str, Any]:
        stats, last_job = await self._logged(self._log_status)
        predictor = self.predictor
        manifest = getattr(predictor.artifacts, "manifest", {}) or {}
        job = self._job
        return {
            "version": __version__,
            "pid": os.getpid(),
            "socket": str(self.config.socket_path),
            "uptime_s": round(time.monotonic() - self.started, 3),
            "ready_s": None if self.ready_seconds is None else round(self.ready_seconds, 3),
            "model": {
                "name": getattr(predictor.artifacts, "name", None),
                "base_model": (manifest.get("base_model") or {}).get("id"),
                "dir": str(self.config.model_dir),
            },
            "adapter": {
                "version": predictor.adapter_version,
                "metrics": self.adapter_metadata.get("metrics"),
                "created": self.adapter_metadata.get("created"),
                # the user's phrases served with it: words and n-grams counted (None: none)
                "phrases": self.adapter_metadata.get("phrases") if predictor.phrases else None,
            },
            "typing_log": stats,
            "personalization": {
                "installed": _personalization_installed(),
                "running": None
                if job is None
                else {"job": job.job_id, "pid": job.process.pid, "started": job.started},
                "last_job": last_job,
                "next_run": None
                if self._next_scheduled is None
                else self._next_scheduled.isoformat(),
            },
            "server": {
                "connections": self.connections,
                "in_flight": self.in_flight,
                "served": self.served,
                "inference_workers": self.config.inference_workers(),
                "rss_mb": _rss_mb(),
                "torch_loaded": "torch" in sys.modules,
            },
        }

    def _log_status(self) -> tuple[dict[str, Any], dict[str, Any] | None]:
        return self.typing_log.stats(), self.typing_log.last_job()

    async def _rpc_reload(self) -> dict[str, Any]:
        try:
            return await self._in(self._misc_pool, self._reload_adapter)
        except RpcError:
            raise
        except KeyboardError as exc:
            raise RpcError(rpc.MODEL_UNAVAILABLE, f"reload failed: {exc}") from exc

    # --- personalization --------------------------------------------------------------------
    async def _rpc_train(self, wait: bool, force: bool) -> dict[str, Any]:
        job = await self.start_job(reason="requested", force=force)
        if not wait:
            return {"started": True, "job": job.job_id, "pid": job.process.pid}
        assert job.done is not None
        result = await asyncio.shield(job.done)
        report = result.get("result") or {}
        if report.get("status") == "busy":  # a job started outside the daemon holds the lock
            raise RpcError(rpc.PERSONALIZATION_BUSY, str(report.get("reason") or "busy"))
        return result

    async def start_job(self, reason: str, force: bool = False) -> _Job:
        """Start a personalization job in a child process (serving goes on meanwhile)."""
        if not _personalization_installed():
            raise RpcError(
                rpc.PERSONALIZATION_UNAVAILABLE,
                "personalization is not installed (keyboard.personalize is missing)",
            )
        if self._stopping:
            raise RpcError(rpc.SHUTTING_DOWN, "the daemon is shutting down")
        if self._job is not None:
            raise RpcError(
                rpc.PERSONALIZATION_BUSY,
                f"a personalization job is already running (pid {self._job.process.pid}, "
                f"started {self._job.started}); wait for it, see `keyboard status`",
            )
        env = dict(os.environ, KEYBOARD_MODEL=str(self.config.model_dir))
        # Its own session: a Ctrl-C meant for the daemon's terminal does not kill the job
        # mid-write; shutdown stops it explicitly.
        command = [sys.executable, "-m", "keyboard", "train", "--json"]
        command += ["--model", str(self.config.model_dir)] + (["--force"] if force else [])
        process = await asyncio.create_subprocess_exec(
            *command,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            env=env,
            start_new_session=True,
        )  # fmt: skip
        job = _Job(process, datetime.now(timezone.utc).isoformat(timespec="seconds"), reason)
        job.done = asyncio.ensure_future(self._finish_job(job))
        self._job = job
        log.info("personalization job started (pid %d, %s)", process.pid, reason)
        job.job_id = await self._find_job_id(job)
        return job

    async def _find_job_id(self, job: _Job) -> int | None:
        """The typing log's id for the job, which the child records when it starts."""
        deadline = time.monotonic() + JOB_ID_WAIT_S
        while time.monotonic() < deadline:
            try:
                rows = await self._logged(self.typing_log.jobs, 5)
            except RpcError:
                return None
            for row in rows:
                if row.get("pid") == job.process.pid:
                    return int(row["id"])
            assert job.done is not None
            if job.done.done():
                break
            await asyncio.sleep(0.05)
        return None

    async def _finish_job(self, job: _Job) -> dict[str, Any]:
        try:
            stdout, _ = await job.process.communicate()
            code = job.process.returncode
            lines = [ln for ln in stdout.decode("utf-8", "replace").splitlines() if ln.strip()]
            try:
                result = json.loads(lines[-1]) if lines else None
            except ValueError:
                result = None
            log.info("personalization job (pid %d) ended with exit code %s", job.process.pid, code)
            if job.job_id is None and isinstance(result, dict):
                job.job_id = result.get("job_id")
            out: dict[str, Any] = {
                "job": job.job_id,
                "pid": job.process.pid,
                "exit_code": code,
                "result": result,
            }
            # The job is over once its adapter is served: `status` never shows a finished job
            # with the old adapter still in place.
            if code == 0 and self.adapter_store is not None and not self._stopping:
                try:
                    out["reload"] = await self._rpc_reload()
                except RpcError as exc:
                    out["reload"] = {"error": exc.message}
            out["adapter"] = self.predictor.adapter_version
            return out
        finally:
            self._job = None

    async def _stop_job(self) -> None:
        job = self._job
        if job is None:
            return
        log.info("stopping the personalization job (pid %d)", job.process.pid)
        with contextlib.suppress(ProcessLookupError):
            job.process.terminate()
        assert job.done is not None
        try:
            await asyncio.wait_for(asyncio.shield(job.done), JOB_STOP_S)
        except asyncio.TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                job.process.kill()
            await job.process.wait()

    async def _watch_adapters(self) -> None:
        """Serve a newly activated adapter however it got there: a job run outside the daemon
        (`keyboard train`, a systemd timer) or switching versions from the command line."""
        if self.adapter_store is None:
            return
        while True:
            await asyncio.sleep(ADAPTER_POLL_S)
            if _pointer_key(self._pointer_path()) != self._pointer_seen:
                log.info("the active adapter changed; reloading")
                try:
                    await self._rpc_reload()
                except RpcError as exc:
                    log.error("reload failed: %s", exc.message)

    def _pointer_path(self) -> Path:
        from keyboard.adapter_store import ACTIVE_FILE

        return Path(self.adapter_store.root) / ACTIVE_FILE

    async def _scheduler(self) -> None:
        """HOOK (personalization's nightly schedule): runs a job when `keyboard.schedule` says.

        `keyboard.schedule.next_run(now) -> datetime` names the next time to look; at that time
        `keyboard.schedule.should_run(typing_log)` (truthy, with a `.reason`) says whether there
        is enough new text. Without that module the daemon never trains on its own.
        """
        if importlib.util.find_spec("keyboard.schedule") is None:
            return
        from keyboard import schedule

        while True:
            now = datetime.now(timezone.utc)
            try:
                self._next_scheduled = schedule.next_run(now)
            except Exception:  # noqa: BLE001 - a broken schedule must not stop serving
                log.exception("the personalization schedule failed; not training on a timer")
                self._next_scheduled = None
                return
            delay = max(1.0, (self._next_scheduled - now).total_seconds())
            await asyncio.sleep(min(delay, 3600.0))  # re-check hourly: clocks and sleeps drift
            if datetime.now(timezone.utc) < self._next_scheduled or self._job is not None:
                continue
            try:
                due = await self._logged(schedule.should_run, self.typing_log)
                if due:
                    await self.start_job(reason="scheduled")
                else:
                    log.info("scheduled personalization skipped: %s", getattr(due, "reason", ""))
            except RpcError as exc:
                log.warning("scheduled personalization did not start: %s", exc.message)
            except Exception:  # noqa: BLE001
                log.exception("scheduled personalization failed to start")


def _pointer_key(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns


def _join(encoded: list[bytes], batch: bool) -> bytes:
    if not batch:
        return encoded[0]
    return b"[" + b",".join(e.rstrip(b"\n") for e in encoded) + b"]\n"


def _personalization_installed() -> bool:
    return importlib.util.find_spec("keyboard.personalize") is not None


def _rss_mb() -> float | None:
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return round(pages * os.sysconf("SC_PAGE_SIZE") / 2**20, 1)
    except (OSError, ValueError, IndexError):
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # bytes on macOS
        return round(peak / 2**20, 1) if sys.platform == "darwin" else None


def serve(
    socket_path: str | Path | None = None,
    model_dir: str | Path | None = None,
    threads: int = 1,
    workers: int = 0,
) -> int:
    """Run the daemon in this process until SIGTERM/SIGINT. Returns the exit status."""
    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=logging.INFO,
            format="%(asctime)s keyboard[%(process)d] %(levelname)s %(message)s",
            stream=sys.stderr,
        )
    config = ServeConfig(
        socket_path=Path(socket_path) if socket_path else paths.socket_path(),
        model_dir=Path(model_dir) if model_dir else paths.starter_model_dir(),
        threads=threads,
        workers=workers,
    )
    asyncio.run(Daemon(config).run())
    return 0


def run_in_thread(config: ServeConfig) -> tuple[Daemon, threading.Thread]:
    """Start a daemon on its own thread (no signal handlers) and return once it serves."""
    daemon = Daemon(config)
    ready = threading.Event()
    failure: list[BaseException] = []

    def main() -> None:
        try:
            asyncio.run(daemon.run(install_signals=False, on_ready=lambda _: ready.set()))
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            failure.append(exc)
            ready.set()

    thread = threading.Thread(target=main, name="keyboard-daemon", daemon=True)
    thread.start()
    ready.wait()
    if failure:
        raise failure[0]
    return daemon, thread


def start_background(
    socket_path: Path,
    model_dir: Path,
    threads: int = 1,
    log_path: Path | None = None,
    timeout: float = 60.0,
) -> dict[str, Any]:
    """Start the daemon as a detached process and return its `status` once it answers."""
    import subprocess

    from keyboard.client import DaemonClient, DaemonNotRunning

    probe = DaemonClient(socket_path, timeout=5.0)
    if probe.is_running():
        raise AlreadyRunning(f"keyboard is already running at {socket_path}")
    log_path = log_path or paths.home() / "daemon.log"
    with contextlib.suppress(FileNotFoundError):
        if log_path.stat().st_size > 4 * 2**20:  # keep one old log, not an ever-growing one
            log_path.replace(log_path.with_name(log_path.name + ".1"))
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    start = os.lseek(fd, 0, os.SEEK_END)
    command = [sys.executable, "-m", "keyboard", "serve", "--foreground"]
    command += ["--socket", str(socket_path), "--model", str(model_dir), "--threads", str(threads)]
    # glibc gives each thread its own malloc arena; the daemon's few threads then hold on to
    # freed memory. Two arenas keep the resident size down at no measurable cost in speed.
    env = {"MALLOC_ARENA_MAX": "2", **os.environ}
    try:
        process = subprocess.Popen(
            command,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=fd,
            stderr=fd,
            start_new_session=True,  # survives the terminal that started it
            close_fds=True,
        )
    finally:
        os.close(fd)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            with open(log_path, "rb") as f:
                f.seek(start)
                lines = f.read().decode("utf-8", "replace").strip().splitlines()
            # The command's own error line says why; else whatever the log ends with.
            errors = [ln.removeprefix("keyboard: ") for ln in lines if ln.startswith("keyboard: ")]
            reason = "\n  ".join(errors or lines[-5:]) or "no output"
            raise KeyboardError(f"the daemon did not start (see {log_path}):\n  {reason}")
        try:
            status = probe.call("status")
        except DaemonNotRunning:
            probe.close()
            time.sleep(0.05)
            continue
        if status.get("pid") == process.pid:
            status["log"] = str(log_path)
            return status
    raise KeyboardError(f"the daemon did not answer within {timeout:.0f} s; see {log_path}")
