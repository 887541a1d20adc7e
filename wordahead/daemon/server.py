"""The daemon: one instance per home and socket; it starts, serves (connections.py answers
clients with methods.py, served.py says which adapter and phrases are served, supervisor.py
runs personalization) and shuts down cleanly."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import json
import logging
import os
import signal
import socket
import stat
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from wordahead import memory, paths
from wordahead.daemon import protocol as rpc
from wordahead.daemon.connections import Connections
from wordahead.paths import Home
from wordahead.predict.sources.typos import TypoSettings
from wordahead.types import KeyboardError

if TYPE_CHECKING:  # imported when the daemon loads: `serve` in the background stays light
    from wordahead.daemon.methods import RpcMethods
    from wordahead.daemon.supervisor import JobSupervisor
    from wordahead.daemon.typing_log_thread import TypingLogThread

log = logging.getLogger("wordahead.daemon.server")

SOCKET_PATH_MAX = 104  # sun_path is 104 bytes on macOS, 108 on Linux (with the NUL)
# Connections waiting to be accepted; a burst of editors and scripts beyond it would get
# EAGAIN (the kernel caps it at net.core.somaxconn, 4096 by default since Linux 5.4).
LISTEN_BACKLOG = 4096
RESTART_DELAY_S = (1.0, 60.0)  # a background task that fails is restarted after 1 s, 2 s, ...


class AlreadyRunning(KeyboardError):
    """Another daemon answers on the socket or holds the home's lock."""


@dataclass
class ServeConfig:
    """What one daemon serves, and where."""

    socket_path: Path
    model_dir: Path
    home: Home
    threads: int = 1  # ONNX Runtime intra-op threads per prediction
    workers: int = 0  # predictions run at once; 0: one per core (at most 4)
    typos: TypoSettings = field(default_factory=TypoSettings)  # typo correction, layout

    def inference_workers(self) -> int:
        if self.workers > 0:
            return self.workers
        return max(1, min(4, (os.cpu_count() or 1) // max(1, self.threads)))


# --- one instance per home and socket -----------------------------------------------------------
def _socket_answers(path: Path) -> bool:
    """True when this user's process accepts connections on `path`; False when nothing
    listens there. A listener of another user is an error, never "already running"."""
    from wordahead.daemon.client import check_peer

    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(2.0)
    try:
        probe.connect(str(path))
        check_peer(probe, path)
    except (ConnectionRefusedError, FileNotFoundError):
        return False
    except (TimeoutError, BlockingIOError):
        return True  # a full backlog: something is listening
    except PermissionError as exc:
        raise KeyboardError(f"cannot check the socket {path}: {exc.strerror}") from exc
    finally:
        probe.close()
    return True


def _claim_lock(lock_path: Path, socket_path: Path) -> int:
    """Hold the home's daemon lock (flock: released by the kernel if we die). Returns its fd."""
    fd = paths.open_no_follow(lock_path, os.O_RDWR | os.O_CREAT)
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
    _describe_holder(fd, socket_path)
    return fd


def _describe_holder(fd: int, socket_path: Path) -> None:
    """Write who holds a lock into it, for messages and `keyboard stop`. On a full disk it
    stays empty: the flock alone is the lock, and the daemon starts anyway."""
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "socket": str(socket_path)}).encode(), 0)
    except OSError as exc:
        log.warning("cannot write the lock file's holder: %s", exc)


def _hold_pid_file(path: Path, socket_path: Path) -> int:
    """Write and lock the pid file beside the socket for the daemon's lifetime (`keyboard
    stop` trusts it only while locked). Returns its fd."""
    fd = paths.open_no_follow(path, os.O_RDWR | os.O_CREAT)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise AlreadyRunning(f"keyboard is already running at {socket_path}") from None
        _describe_holder(fd, socket_path)
    except OSError:
        os.close(fd)
        raise
    return fd


async def supervise(name: str, task: Callable[[], Awaitable[None]]) -> None:
    """Run a background task for the daemon's lifetime: when it fails (or ends), log why and
    start it again after a delay that doubles up to a minute. It never dies silently."""
    delay = RESTART_DELAY_S[0]
    while True:
        started = time.monotonic()
        try:
            await task()
            log.error("the %s stopped; restarting it in %.0f s", name, delay)
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - logged with its traceback, then restarted
            log.exception("the %s failed; restarting it in %.0f s", name, delay)
        await asyncio.sleep(delay)
        ran = time.monotonic() - started
        delay = (
            RESTART_DELAY_S[0] if ran > RESTART_DELAY_S[1] else min(delay * 2, RESTART_DELAY_S[1])
        )


def _bind(path: Path) -> socket.socket:
    """A listening socket at `path`, 0600 from the start; a stale socket file is replaced."""
    if len(os.fsencode(path)) >= SOCKET_PATH_MAX:
        raise KeyboardError(
            f"the socket path {path} is {len(os.fsencode(path))} bytes; Unix sockets allow "
            f"{SOCKET_PATH_MAX - 1}: pass a shorter --socket or set KEYBOARD_SOCKET"
        )
    if not path.parent.exists():
        paths.private_dir(path.parent)
    # Only a directory nobody else can write: else they could replace the socket (and read
    # what is typed) or bind the path first. Bound where the directory really is.
    path = paths.check_socket_dir(path.parent) / path.name
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
    sock.listen(LISTEN_BACKLOG)
    sock.setblocking(False)
    return sock


class Daemon:
    """The serving process: binds the socket, loads the model, the active adapter and the
    typing log, serves until asked to stop, then shuts down in order. Never imports torch.

    Its parts, made in `_load` once the model is open, each given what it needs: the typing
    log on its thread, `served` (which adapter and phrases the predictor serves),
    `supervisor` (the personalization job, its schedule, the adapter watcher), `methods`
    (what each request does); `connections` (clients, back-pressure) exists from the start.
    """

    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self.started = time.monotonic()
        self.ready_seconds: float | None = None
        self.connections = Connections(self._dispatch, unqueued=frozenset({"train"}))
        memory.limit_arenas()  # before its threads allocate: a few heaps, trimmed on swaps
        # Set once loaded (before the first client is served).
        self.typing_log: TypingLogThread | None = None
        self.methods: RpcMethods | None = None
        self.supervisor: JobSupervisor | None = None
        self._infer_pool = ThreadPoolExecutor(
            config.inference_workers(), thread_name_prefix="keyboard-predict"
        )
        self._log_pool = ThreadPoolExecutor(1, thread_name_prefix="keyboard-typing-log")
        self._adapter_pool = ThreadPoolExecutor(1, thread_name_prefix="keyboard-adapters")
        self._ahead_pool = ThreadPoolExecutor(1, thread_name_prefix="keyboard-ahead")
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock_fd: int | None = None
        self._pid_fd: int | None = None
        self._socket_inode: int | None = None

    @property
    def stopping(self) -> bool:
        """True from the moment shutdown begins."""
        return self.connections.stopping

    def stop(self) -> None:
        """Ask the daemon to shut down (from any thread)."""
        if self._loop is not None and self._stop is not None:
            with contextlib.suppress(RuntimeError):  # already stopped: its loop is closed
                self._loop.call_soon_threadsafe(self._stop.set)

    async def _dispatch(self, method: str, params: dict[str, Any] | list[Any]) -> Any:
        assert self.methods is not None, "clients are served only once the daemon has loaded"
        return await self.methods.call(method, params)

    # --- lifecycle ------------------------------------------------------------------------
    def _load(self) -> None:
        """Open the model, the active adapter and the typing log (before serving starts)."""
        from wordahead.daemon.methods import RpcMethods
        from wordahead.daemon.served import ServedModel
        from wordahead.daemon.supervisor import JobSupervisor
        from wordahead.daemon.typing_log_thread import TypingLogThread
        from wordahead.learn.adapter_store import AdapterStore
        from wordahead.learn.policy import reserve_failure_record
        from wordahead.predict.predictor import Predictor

        home, model_dir = self.config.home, self.config.model_dir
        if not (model_dir / "manifest.json").is_file():
            raise KeyboardError(
                f"no model at {model_dir}: pass --model DIR or set KEYBOARD_MODEL "
                "(an artifact set made by `keyboard export`)"
            )
        paths.make_private(home.root)  # whatever an older version or a loose umask left
        reserve_failure_record(home)  # while there is room: a job failing on a full disk says so
        typing_log = TypingLogThread(home.typing_log, self._log_pool)
        opened = self._log_pool.submit(typing_log.open)  # meanwhile, on its thread
        try:
            predictor = Predictor(model_dir, threads=self.config.threads, typos=self.config.typos)
            store = AdapterStore.in_home(home, predictor.artifacts)
        finally:
            opened.result()  # a log that will not open is reported; predictions are served
        served = ServedModel(home, predictor, store, typing_log, self._adapter_pool)
        served.load_active()
        supervisor = JobSupervisor(home, model_dir, typing_log, served)
        methods = RpcMethods(
            predictor, typing_log, served, supervisor, self.connections, self._infer_pool,
            self._ahead_pool, self.config.inference_workers(), about=self._about,
        )  # fmt: skip
        self.typing_log, self.methods, self.supervisor = typing_log, methods, supervisor

    def _about(self) -> dict[str, Any]:
        """What `status` says of the daemon itself."""
        return {
            "socket": str(self.config.socket_path),
            "uptime_s": round(time.monotonic() - self.started, 3),
            "ready_s": None if self.ready_seconds is None else round(self.ready_seconds, 3),
        }

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
        self._lock_fd = _claim_lock(self.config.home.daemon_lock, path)
        sock: socket.socket | None = None
        server: asyncio.AbstractServer | None = None
        try:
            sock = _bind(path)
            self._socket_inode = path.stat().st_ino
            self._pid_fd = _hold_pid_file(paths.pid_file(path), path)
            # Bound before the model loads: clients that connect meanwhile wait in the backlog
            # and a second daemon sees this one at once.
            server = await asyncio.start_unix_server(
                self.connections.on_connection,
                sock=sock,
                limit=rpc.MAX_LINE_BYTES,
                start_serving=False,
            )
            if install_signals:  # before loading: a SIGTERM meanwhile still shuts down cleanly
                for sig in (signal.SIGTERM, signal.SIGINT):
                    self._loop.add_signal_handler(sig, self._stop.set)
            await self._loop.run_in_executor(self._adapter_pool, self._load)
            assert self.supervisor is not None
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
            assert self.typing_log is not None
            background = [
                asyncio.create_task(supervise("schedule", self.supervisor.run_schedule)),
                asyncio.create_task(supervise("adapter watcher", self.supervisor.watch_adapters)),
                asyncio.create_task(supervise("typing log reopener", self.typing_log.keep_open)),
            ]
            await self._stop.wait()
            for task in background:
                task.cancel()
            log.info("stopping: finishing %d request(s) in flight", self.connections.in_flight)
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

    def _remove_socket(self) -> None:
        path = self.config.socket_path
        with contextlib.suppress(OSError):
            if self._socket_inode is not None and path.stat().st_ino == self._socket_inode:
                path.unlink()  # only our own: a successor may already have replaced it
                paths.pid_file(path).unlink()  # ours too: only we wrote it beside our socket

    async def _shutdown(self, server: asyncio.AbstractServer) -> None:
        self.connections.stopping = True
        server.close()  # no new connections
        self._remove_socket()
        if self.supervisor is not None:
            await self.supervisor.stop()  # first: a `train` waiting on it then gets its answer
        await self.connections.drain()

    def _close_resources(self) -> None:
        if self.typing_log is not None:
            try:
                self._log_pool.submit(self.typing_log.close).result(timeout=30)
            except Exception as exc:  # noqa: BLE001 - shutting down: report, keep going
                log.error("closing the typing log failed: %s", exc)
        for pool in (self._ahead_pool, self._infer_pool, self._log_pool, self._adapter_pool):
            pool.shutdown(wait=True, cancel_futures=True)
        for fd in (self._pid_fd, self._lock_fd):
            if fd is not None:
                os.close(fd)  # releases the flock
        self._pid_fd = self._lock_fd = None

    def _reload_soon(self) -> None:
        assert self.supervisor is not None
        asyncio.ensure_future(self.supervisor.reload())


def serve(config: ServeConfig) -> int:
    """Run the daemon in this process until SIGTERM/SIGINT. Returns the exit status."""
    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=logging.INFO,
            format="%(asctime)s keyboard[%(process)d] %(levelname)s %(message)s",
            stream=sys.stderr,
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
    config: ServeConfig, log_path: Path | None = None, timeout: float = 60.0
) -> dict[str, Any]:
    """Start the daemon as a detached process and return its `status` once it answers.

    Whatever goes wrong after the process started (it does not answer in time, answers with
    an error, the caller is interrupted), it is stopped before this raises: a failed
    `keyboard serve` never leaves a daemon behind.
    """
    import subprocess

    from wordahead.daemon.client import DaemonClient, ForeignDaemon

    socket_path = config.socket_path
    probe = DaemonClient(socket_path, timeout=5.0)
    try:
        running = probe.is_running()
    except ForeignDaemon:
        running = False  # the daemon's own checks refuse that socket, with the fix
    if running:
        raise AlreadyRunning(f"keyboard is already running at {socket_path}")
    log_path = log_path or config.home.daemon_log
    with contextlib.suppress(FileNotFoundError):
        if log_path.stat().st_size > 4 * 2**20:  # keep one old log, not an ever-growing one
            log_path.replace(log_path.with_name(log_path.name + ".1"))
    fd = paths.open_no_follow(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    start = os.lseek(fd, 0, os.SEEK_END)
    command = paths.keyboard_command("serve", "--foreground", "--socket", str(socket_path))
    command += ["--model", str(config.model_dir.resolve()), "--threads", str(config.threads)]
    # glibc gives each thread its own malloc arena; the daemon's few threads then hold on to
    # freed memory. Two arenas keep the resident size down at no measurable cost in speed.
    env = {"MALLOC_ARENA_MAX": "2", **os.environ, "KEYBOARD_HOME": str(config.home.root)}
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
    try:
        status = _await_ready(process, probe, log_path, start, timeout)
    except BaseException:
        _stop_child(process)
        raise
    finally:
        probe.close()
    status["log"] = str(log_path)
    return status


def _await_ready(
    process: Any, probe: Any, log_path: Path, start: int, timeout: float
) -> dict[str, Any]:
    """The started daemon's `status`, once it answers."""
    from wordahead.daemon.client import DaemonNotRunning, NoAnswer

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
        try:  # while the model loads, the request waits in the backlog: never past the deadline
            status = probe.call("status", timeout=max(0.05, deadline - time.monotonic()))
        except (DaemonNotRunning, NoAnswer):
            probe.close()
            time.sleep(0.05)
            continue
        except rpc.RpcError as exc:
            raise KeyboardError(
                f"the daemon started but its status failed ({exc.message}); it was stopped, "
                f"see {log_path}"
            ) from None
        if status.get("pid") == process.pid:
            return status
        time.sleep(0.05)
    raise KeyboardError(
        f"the daemon did not answer within {timeout:.0f} s, so it was stopped; see {log_path}"
    )


def _stop_child(process: Any) -> None:
    """SIGTERM a daemon that did not come up, then SIGKILL if it does not go."""
    with contextlib.suppress(ProcessLookupError):
        process.terminate()
    try:
        process.wait(timeout=10)
    except Exception:  # noqa: BLE001 - TimeoutExpired, or interrupted again
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        process.wait()
