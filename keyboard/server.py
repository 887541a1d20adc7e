"""The daemon: one instance per home and socket; it starts, serves (connections.py answers
clients with rpc_methods.py, supervisor.py runs personalization) and shuts down cleanly."""

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
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from keyboard import paths
from keyboard import protocol as rpc
from keyboard.connections import Connections
from keyboard.paths import Home
from keyboard.types import KeyboardError

if TYPE_CHECKING:  # imported when the daemon loads: `serve` in the background stays light
    from keyboard.rpc_methods import RpcMethods
    from keyboard.supervisor import JobSupervisor

log = logging.getLogger("keyboard.server")

SOCKET_PATH_MAX = 104  # sun_path is 104 bytes on macOS, 108 on Linux (with the NUL)


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


class Daemon:
    """The serving process: binds the socket, loads the model, the active adapter and the
    typing log, serves until asked to stop, then shuts down in order. Never imports torch.

    Its parts: `connections` (clients, back-pressure), `methods` (what each request does),
    `supervisor` (the personalization job, its schedule, the adapter watcher).
    """

    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self.started = time.monotonic()
        self.ready_seconds: float | None = None
        self.connections = Connections(self._dispatch, unqueued=frozenset({"train"}))
        # Set once loaded (before the first client is served).
        self.methods: RpcMethods | None = None
        self.supervisor: JobSupervisor | None = None
        self._infer_pool = ThreadPoolExecutor(
            config.inference_workers(), thread_name_prefix="keyboard-predict"
        )
        self._log_pool = ThreadPoolExecutor(1, thread_name_prefix="keyboard-typing-log")
        self._adapter_pool = ThreadPoolExecutor(1, thread_name_prefix="keyboard-adapters")
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock_fd: int | None = None
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
        from keyboard.adapter_store import AdapterStore
        from keyboard.predictor import Predictor
        from keyboard.rpc_methods import RpcMethods, TypingLogThread
        from keyboard.supervisor import JobSupervisor
        from keyboard.typing_log import TypingLog

        home, model_dir = self.config.home, self.config.model_dir
        if not (model_dir / "manifest.json").is_file():
            raise KeyboardError(
                f"no model at {model_dir}: pass --model DIR or set KEYBOARD_MODEL "
                "(an artifact set made by `keyboard export`)"
            )
        opened = self._log_pool.submit(TypingLog, home.typing_log)  # meanwhile, on its thread
        try:
            predictor = Predictor(model_dir, threads=self.config.threads)
            store = AdapterStore.in_home(home, predictor.artifacts)
        finally:
            typing_log = TypingLogThread(opened.result(), self._log_pool)
        methods = RpcMethods(
            home, predictor, typing_log, store, self._infer_pool, self._adapter_pool
        )
        methods.reload_adapter()
        supervisor = JobSupervisor(methods, model_dir)
        methods.train = supervisor.train
        methods.extra_status = self._status
        self.methods, self.supervisor = methods, supervisor

    def _status(self) -> dict[str, Any]:
        """What `status` reports beyond the model, the adapter and the typing log."""
        assert self.supervisor is not None
        return {
            "daemon": {
                "socket": str(self.config.socket_path),
                "uptime_s": round(time.monotonic() - self.started, 3),
                "ready_s": None if self.ready_seconds is None else round(self.ready_seconds, 3),
            },
            "personalization": self.supervisor.status(),
            "server": {
                "connections": self.connections.count,
                "in_flight": self.connections.in_flight,
                "served": self.connections.served,
                "inference_workers": self.config.inference_workers(),
            },
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
            background = [
                asyncio.create_task(self.supervisor.run_schedule()),
                asyncio.create_task(self.supervisor.watch_adapters()),
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

    async def _shutdown(self, server: asyncio.AbstractServer) -> None:
        self.connections.stopping = True
        server.close()  # no new connections
        self._remove_socket()
        if self.supervisor is not None:
            await self.supervisor.stop()  # first: a `train` waiting on it then gets its answer
        await self.connections.drain()

    def _close_resources(self) -> None:
        if self.methods is not None:
            typing_log = self.methods.typing_log
            try:
                self._log_pool.submit(typing_log.close).result(timeout=30)
            except Exception as exc:  # noqa: BLE001 - shutting down: report, keep going
                log.error("closing the typing log failed: %s", exc)
        for pool in (self._infer_pool, self._log_pool, self._adapter_pool):
            pool.shutdown(wait=True, cancel_futures=True)
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None

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
    """Start the daemon as a detached process and return its `status` once it answers."""
    import subprocess

    from keyboard.client import DaemonClient, DaemonNotRunning

    socket_path = config.socket_path
    probe = DaemonClient(socket_path, timeout=5.0)
    if probe.is_running():
        raise AlreadyRunning(f"keyboard is already running at {socket_path}")
    log_path = log_path or config.home.daemon_log
    with contextlib.suppress(FileNotFoundError):
        if log_path.stat().st_size > 4 * 2**20:  # keep one old log, not an ever-growing one
            log_path.replace(log_path.with_name(log_path.name + ".1"))
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    start = os.lseek(fd, 0, os.SEEK_END)
    command = [sys.executable, "-m", "keyboard", "serve", "--foreground"]
    command += ["--socket", str(socket_path), "--model", str(config.model_dir)]
    command += ["--threads", str(config.threads)]
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
