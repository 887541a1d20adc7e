"""The daemon under damage, a full disk and strangers: it starts, serves, tells the truth, and
never talks to a socket another user serves. Each test reproduces a failure found by probing
keyboard as an attacker and a clumsy user would (the numbers are that report's)."""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.daemon_process import daemon_env, short_dir, start_daemon
from tests.damage import mutate
from tests.full_disk import fill, small_disk
from wordahead.daemon import server
from wordahead.daemon.client import DaemonClient, DaemonNotRunning, ForeignDaemon
from wordahead.daemon.protocol import RpcError
from wordahead.learn.adapter_store import PHRASES_FILE, AdapterStore
from wordahead.learn.job_log import JobLog
from wordahead.model.artifacts import ArtifactSet
from wordahead.paths import Home
from wordahead.predict.sources.phrases import PhraseModel
from wordahead.store.typing_log import TypingLog

REPO = Path(__file__).resolve().parent.parent
NOBODY = 65534


@pytest.fixture
def root() -> Iterator[Path]:
    path = short_dir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def disk() -> Iterator[Path]:
    """A small tmpfs to fill up; skipped where the runner may not mount one (not root):
    tests/test_typing_log.py then covers the full-disk message with a simulated ENOSPC."""
    with small_disk() as mounted:
        if mounted is None:
            pytest.skip("cannot mount a tmpfs here (not root)")
        yield mounted


def until(condition: Any, what: str, timeout: float = 20.0) -> None:
    """Wait for `condition()` to hold, polling."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting: {what}"
        time.sleep(0.05)


def _versions(home: Home, model: Path) -> tuple[AdapterStore, str, str]:
    """A store with a good v0001 and an active v0002 (with phrases)."""
    store = AdapterStore.in_home(home, ArtifactSet.open(model))
    initial = store.artifacts.initial_adapter()
    good = store.promote({n: v + 0.01 for n, v in initial.items()})
    phrases = PhraseModel.from_texts(["see you at dayrit tomorrow"] * 5).to_bytes()
    newest = store.promote({n: v + 0.02 for n, v in initial.items()}, phrases=phrases)
    return store, good, newest


class InThread:
    """A daemon on a thread of this process, with a client."""

    def __init__(self, model: Path, home: Home, socket_path: Path) -> None:
        self.daemon, self.thread = server.run_in_thread(
            server.ServeConfig(socket_path, model, home)
        )
        self.client = DaemonClient(socket_path, timeout=30)

    def call(self, method: str, **params: Any) -> Any:
        return self.client.call(method, **params)

    def close(self) -> None:
        self.client.close()
        self.daemon.stop()
        self.thread.join(timeout=30)
        assert not self.thread.is_alive()


# --- 1. a corrupt adapter ---------------------------------------------------------------------------
def test_daemon_starts_and_serves_with_a_corrupt_active_adapter(
    tiny_llama: Path, root: Path
) -> None:
    """Failure 1: damage to the zip or array header of the active adapter.npz raised out of
    load_adapter and the daemon exited on every start (a crash loop under a service manager).
    Damaged starts fall back to the previous good version; then 500 more corruptions through
    `reload`, each answered (never -32000) and followed by a prediction."""
    home = Home.at(root / "home")
    store, good, damaged = _versions(home, tiny_llama)
    path = store.root / damaged / "adapter.npz"
    original = path.read_bytes()
    rng = random.Random(1)
    # Starts: the header damage that escaped before (NotImplementedError: a fortran_order
    # that is not a bool; tokenize.TokenError / SyntaxError: a cut header dict; RuntimeError:
    # a bad zip), then random ones.
    header = original.index(b"{'descr'")
    starts = [
        original.replace(b"'fortran_order': False", b"'fortran_order': 0x1e", 1),
        original[: header + 20] + b"\x00" * 40 + original[header + 60 :],
        original[:30] + b"\xff" * 8 + original[38:],
        *(mutate(original, rng) for _ in range(3)),
    ]
    for data in starts:
        path.write_bytes(data)
        served = InThread(tiny_llama, home, root / "s.sock")
        try:
            status = served.call("status")
            assert status["adapter"]["version"] in (good, damaged)
            assert served.call("predict", context="Thank you for your ")["candidates"]
        finally:
            served.close()
    served = InThread(tiny_llama, home, root / "s.sock")
    try:
        versions = {good: 0, damaged: 0}
        for _ in range(500):
            path.write_bytes(mutate(original, rng))
            answer = served.call("reload")  # an RpcError (-32000 before) fails the test
            versions[answer["adapter"]] += 1
            if answer["adapter"] == good:
                assert not answer["loaded"] and damaged in answer["message"]
                assert "base model" not in answer["message"]
            result = served.call("predict", context="I would like to ")
            assert result["candidates"] and result["adapter"] == answer["adapter"]
        assert versions[good] > 400, versions
        path.write_bytes(original)
        answer = served.call("reload")
        assert answer == {"adapter": damaged, "loaded": True}
    finally:
        served.close()


def test_the_adapter_watcher_survives_a_failure_and_picks_up_a_switch(
    tiny_llama: Path, root: Path, monkeypatch: pytest.MonkeyPatch, caplog: Any
) -> None:
    """Failure 1: the adapter watcher died silently, so a later `keyboard adapters use
    v0001` was never picked up. Now a supervisor logs the failure and restarts it."""
    from wordahead.daemon import supervisor
    from wordahead.daemon.served import ServedModel

    monkeypatch.setattr(supervisor, "ADAPTER_POLL_S", 0.05)
    monkeypatch.setattr(server, "RESTART_DELAY_S", (0.05, 0.5))
    home = Home.at(root / "home")
    store, good, newest = _versions(home, tiny_llama)
    served = InThread(tiny_llama, home, root / "s.sock")
    try:
        assert served.call("status")["adapter"]["version"] == newest
        real = ServedModel.load_active
        calls = []

        def broken_once(self: Any) -> Any:
            calls.append(1)
            if len(calls) == 1:
                raise NotImplementedError("what numpy raised for a damaged header")
            return real(self)

        monkeypatch.setattr(ServedModel, "load_active", broken_once)
        monkeypatch.setattr("wordahead.daemon.served.log", logging.getLogger("keyboard.test.quiet"))
        with caplog.at_level(logging.ERROR, logger="wordahead.daemon.server"):
            store.use(good)  # first noticed by a watcher whose reload raises
            until(lambda: served.call("status")["adapter"]["version"] == good, "switch seen")
        assert len(calls) >= 2
        assert "reload failed" in caplog.text or "adapter watcher failed" in caplog.text
        store.use(newest)  # and the watcher still runs afterwards
        until(lambda: served.call("status")["adapter"]["version"] == newest, "switch back")
    finally:
        served.close()


def test_a_background_task_that_fails_is_logged_and_restarted(
    monkeypatch: pytest.MonkeyPatch, caplog: Any
) -> None:
    import asyncio

    monkeypatch.setattr(server, "RESTART_DELAY_S", (0.01, 0.1))
    runs: list[int] = []

    async def flaky() -> None:
        runs.append(1)
        if len(runs) < 3:
            raise RuntimeError(f"failure {len(runs)}")
        await asyncio.sleep(10)

    async def main() -> None:
        task = asyncio.create_task(server.supervise("test task", flaky))
        while len(runs) < 3:
            await asyncio.sleep(0.01)
        task.cancel()

    with caplog.at_level(logging.ERROR, logger="wordahead.daemon.server"):
        asyncio.run(main())
    assert len(runs) == 3
    assert caplog.text.count("the test task failed; restarting it") == 2
    assert "RuntimeError: failure 2" in caplog.text


def test_reload_says_the_adapter_is_served_without_its_damaged_phrases(
    tiny_llama: Path, root: Path
) -> None:
    """Failure 7: a truncated phrase file made `reload` say "serving the base model" while
    the adapter was still served, without its phrases."""
    home = Home.at(root / "home")
    store, _, newest = _versions(home, tiny_llama)
    phrases = store.root / newest / PHRASES_FILE
    phrases.write_bytes(phrases.read_bytes()[:20])
    served = InThread(tiny_llama, home, root / "s.sock")
    try:
        answer = served.call("reload")
        assert answer["adapter"] == newest and answer["loaded"] is False
        assert "phrases" in answer["message"] and "base model" not in answer["message"]
        status = served.call("status")
        assert status["adapter"]["version"] == newest and status["adapter"]["phrases"] is None
    finally:
        served.close()


# --- 2. a full disk ----------------------------------------------------------------------------------
def _observe_words(home: Home, n: int) -> None:
    with TypingLog(home.typing_log) as log:
        for i in range(n):
            log.record(f"message {i}: thank you so much for your help with the project", "t")


def test_a_daemon_on_a_full_disk_serves_names_it_and_recovers(
    tiny_llama: Path, root: Path, disk: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Failure 2: restarting on a full disk called the intact database "not a usable typing
    log ... move it away". Now the daemon starts, predicts, says the disk is full, and opens
    the log again by itself once there is room."""
    from wordahead.daemon import typing_log_thread

    monkeypatch.setattr(typing_log_thread, "REOPEN_S", 0.1)
    home = Home.at(disk / "home")
    _observe_words(home, 20)
    filler = fill(disk)
    served = InThread(tiny_llama, home, root / "s.sock")
    try:
        assert served.call("predict", context="Thank you for your ")["candidates"]
        with pytest.raises(RpcError) as err:
            served.call("observe", text="hello there", source="t")
        assert err.value.code == -32002
        assert "is full" in err.value.message and "move it away" not in err.value.message
        log_status = served.call("status")["typing_log"]
        assert "is full" in log_status["error"]
        filler.unlink()
        until(lambda: "error" not in served.call("status")["typing_log"], "log reopened")
        assert served.call("observe", text="hello again", source="t")["stored"]
        assert served.call("status")["typing_log"]["entries"] == 21
    finally:
        served.close()


def test_train_on_a_full_disk_says_why_in_the_answer_and_in_status(
    tiny_llama: Path, root: Path, disk: Path
) -> None:
    """Failure 2: `train` on a full disk answered {exit_code: 1, result: null}; the reason went
    to daemon.log, on the same full disk, and was lost."""
    from wordahead.daemon.client import describe_status
    from wordahead.learn.policy import last_failure

    home = Home.at(disk / "home")
    _observe_words(home, 40)
    served = InThread(tiny_llama, home, root / "s.sock")
    try:
        filler = fill(disk)
        done = served.call("train", wait=True, force=True, timeout=None)
        assert done["exit_code"] == 1 and done["result"]["status"] == "failed"
        assert "full" in done["reason"], done
        status = served.call("status")
        assert "full" in status["personalization"]["last_failure"]["reason"]
        assert "full" in describe_status(status)
        recorded = last_failure(home)  # written in place on the full disk
        assert recorded is not None and "full" in recorded["reason"]
        filler.unlink()
    finally:
        served.close()
    assert "full" in last_failure(home)["reason"]  # survives the daemon


def test_a_job_that_dies_says_how(
    tiny_llama: Path, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A job killed before it can report (kill -9, a crash in native code): the `train`
    answer and `status` still say what happened, from its exit status and stderr."""
    from wordahead.learn.policy import last_failure

    home = Home.at(root / "home")
    _observe_words(home, 40)
    served = InThread(tiny_llama, home, root / "s.sock")
    try:
        started = served.call("train", force=True)
        os.kill(started["pid"], signal.SIGKILL)
        until(lambda: not served.call("status")["personalization"]["running"], "job over")
        status = served.call("status")
        assert "SIGKILL" in status["personalization"]["last_failure"]["reason"]
        assert "SIGKILL" in last_failure(home)["reason"]
        assert status["personalization"]["last_job"]["status"] != "running"
    finally:
        served.close()


# --- 3. a partly corrupt database --------------------------------------------------------------------
def test_serve_and_stop_with_a_partly_corrupt_database(tiny_llama: Path, root: Path) -> None:
    """Failure 3: `keyboard serve` returned 1 but left a daemon running, and `keyboard stop`
    could not stop it (it asked `status` for the pid, and status failed)."""
    home = root / "home"
    _observe_words(Home.at(home), 400)
    with open(home / "typing_log.db", "r+b") as f:
        for page in range(3, 12):
            f.seek(page * 4096)
            f.write(os.urandom(4096))
    sock = root / "kb.sock"
    env = daemon_env(home, tiny_llama)

    def keyboard(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "wordahead", *args, "--socket", str(sock)],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )

    started = keyboard("serve")
    assert started.returncode == 0, started.stderr
    assert "Traceback" not in started.stderr + started.stdout
    status = keyboard("status")
    assert status.returncode == 0 and "damaged" in status.stdout, status.stdout
    pid = json.loads((sock.parent / "kb.pid").read_text())["pid"]
    sock.unlink()  # now nothing answers `status` at all: stop still finds the daemon
    stopped = keyboard("stop")
    assert stopped.returncode == 0, stopped.stderr
    assert f"pid {pid}" in stopped.stdout
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_serve_that_fails_leaves_no_daemon_behind(tiny_llama: Path, root: Path) -> None:
    config = server.ServeConfig(root / "s.sock", tiny_llama, Home.at(root / "home"))
    before = set(_children())
    with pytest.raises(Exception, match="did not answer within"):
        server.start_background(config, timeout=0.2)  # gives up before the model loads
    time.sleep(0.2)
    assert set(_children()) <= before, "a daemon was left running"


def _children() -> list[int]:
    """Live processes whose parent is this one (from /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == os.getpid() and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return found


# --- 4. trust only what is the user's own ------------------------------------------------------------
def test_a_socket_in_a_world_writable_directory_is_refused(tiny_llama: Path, root: Path) -> None:
    """Failure 4: with --socket (or KEYBOARD_SOCKET, XDG_RUNTIME_DIR) in a directory others
    can write, another user replaced the live socket and received the victim's text."""
    shared = root / "shared"
    shared.mkdir()
    os.chmod(shared, 0o1777)  # like /tmp
    link = root / "link"
    link.symlink_to(shared)
    for sock in (shared / "kb.sock", link / "kb.sock"):
        done = subprocess.run(
            [sys.executable, "-m", "wordahead", "serve", "--foreground", "--socket", str(sock)],
            env=daemon_env(root / "home", tiny_llama),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 1
        assert "Traceback" not in done.stderr
        assert f"{shared}" in done.stderr and "can be written by other users" in done.stderr
        assert "--socket" in done.stderr  # the fix
        assert not (shared / "kb.sock").exists()


def _as_nobody() -> None:
    os.setgid(NOBODY)
    os.setuid(NOBODY)


needs_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="switching to another uid needs root (the test plays two users)"
)


def _fake_server(path: Path, uid: int, idle_s: float) -> tuple[int, int]:
    """A listener at `path` run by `uid` (a forked child): it reports, on the returned pipe,
    how many bytes each connection sent it. Returns (pid, read end of the pipe)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the stranger: nothing here may raise back into pytest
        try:
            os.close(read_end)
            os.setgid(uid)
            os.setuid(uid)
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            listener.bind(str(path))
            listener.listen(8)
            os.write(write_end, b"ready\n")
            while True:
                conn, _ = listener.accept()
                conn.settimeout(idle_s)
                received = 0
                try:
                    while chunk := conn.recv(65536):
                        received += len(chunk)
                except OSError:
                    pass
                os.write(write_end, f"received {received}\n".encode())
        finally:
            os._exit(0)
    os.close(write_end)
    return pid, read_end


@needs_root
def test_a_server_run_by_another_user_is_refused_and_gets_nothing(
    tiny_llama: Path, root: Path
) -> None:
    """Failure 4: a stranger listening at the path first made the victim's daemon say
    "already running", and the victim's client sent its text to the stranger."""
    theirs = root / "theirs"
    theirs.mkdir()
    os.chown(theirs, NOBODY, NOBODY)
    os.chmod(root, 0o755)
    sock = theirs / "kb.sock"
    pid, reports = _fake_server(sock, NOBODY, idle_s=1.0)
    report = os.fdopen(reports)
    try:
        assert report.readline().strip() == "ready"
        with pytest.raises(ForeignDaemon, match=f"another user \\(uid {NOBODY}\\)"):
            DaemonClient(sock).call("observe", text="my password is hunter2")
        with pytest.raises(ForeignDaemon):
            DaemonClient(sock).call("predict", context="Dear diary, ")
        # the CLI: a clear message, no traceback; `serve` does not call it "already running"
        env = daemon_env(root / "home", tiny_llama)
        for args in (["predict", "Dear diary, "], ["serve", "--foreground"]):
            done = subprocess.run(
                [sys.executable, "-m", "wordahead", *args, "--socket", str(sock)],
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
            assert "already running" not in done.stderr
            assert "another user" in done.stderr or "belongs to another user" in done.stderr
        time.sleep(1.5)  # the last connection's read times out
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    lines = report.read().splitlines()
    received = [int(line.split()[1]) for line in lines if line.startswith("received")]
    assert len(received) >= 3 and set(received) == {0}, lines  # not one byte reached them


@needs_root
def test_a_home_or_socket_directory_of_another_user_gives_a_clear_message(
    tiny_llama: Path, root: Path
) -> None:
    """Failure 4: a socket or home directory pre-created by another user gave a raw
    PermissionError traceback."""
    os.chmod(root, 0o755)
    foreign = root / "foreign"
    foreign.mkdir(mode=0o700)
    os.chown(foreign, NOBODY, NOBODY)
    cases = [
        (daemon_env(foreign, tiny_llama), ["stats"]),
        (daemon_env(root / "home", tiny_llama, XDG_RUNTIME_DIR=str(root)), ["status"]),
        (daemon_env(root / "home", tiny_llama), ["serve", "--socket", str(foreign / "k.sock")]),
    ]
    (root / "keyboard").mkdir(mode=0o700)
    os.chown(root / "keyboard", NOBODY, NOBODY)  # $XDG_RUNTIME_DIR/keyboard, pre-created

    def as_nobody_owned_check(done: subprocess.CompletedProcess[str]) -> None:
        assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
        assert "belongs to another user" in done.stderr
        assert "uid 65534" in done.stderr

    for env, args in cases:
        done = subprocess.run(
            [sys.executable, "-m", "wordahead", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            preexec_fn=None,
        )
        as_nobody_owned_check(done)


def test_the_client_retries_a_full_backlog(root: Path) -> None:
    """Failure 7: bursts of connections got "resource temporarily unavailable" and the
    client did not retry. A server that accepts late, with a backlog of 1."""
    path = root / "busy.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)
    stop = threading.Event()

    def serve_late() -> None:
        time.sleep(0.5)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                line = conn.makefile("rb").readline()
                request = json.loads(line)
                answer = {"jsonrpc": "2.0", "id": request["id"], "result": {"ok": True}}
                conn.sendall(json.dumps(answer).encode() + b"\n")

    thread = threading.Thread(target=serve_late, daemon=True)
    thread.start()
    results: list[Any] = []

    def client() -> None:
        try:
            results.append(DaemonClient(path, timeout=10).call("status"))
        except DaemonNotRunning as exc:
            results.append(exc)

    clients = [threading.Thread(target=client) for _ in range(30)]
    for c in clients:
        c.start()
    for c in clients:
        c.join(timeout=30)
    stop.set()
    listener.close()
    assert results == [{"ok": True}] * 30


def test_the_daemon_listens_with_a_deep_backlog(root: Path) -> None:
    sock = server._bind(root / "b.sock")
    try:
        if shutil.which("ss") is None:
            pytest.skip("ss is not installed")
        out = subprocess.run(["ss", "-xlH"], capture_output=True, text=True).stdout
        line = next(ln for ln in out.splitlines() if str(root / "b.sock") in ln)
        cap = int(Path("/proc/sys/net/core/somaxconn").read_text())  # the kernel's ceiling
        assert int(line.split()[3]) >= min(1024, cap), line  # Send-Q of a listener: backlog
    finally:
        sock.close()


# --- 5. file modes -----------------------------------------------------------------------------------
def test_a_daemon_under_umask_000_keeps_every_file_private(tiny_llama: Path, root: Path) -> None:
    """Failure 5: adapter.npz, meta.json and phrases.zlib were 0644 (0666 under umask 000);
    an older home's loose files are tightened when the daemon starts."""
    home = Home.at(root / "home")
    _, _, newest = _versions(home, tiny_llama)
    loose = home.root / "adapters"
    for p in loose.rglob("*"):
        os.chmod(p, 0o755 if p.is_dir() else 0o644)
    served = start_daemon(tiny_llama, home.root, root / "kb.sock", umask=0)
    try:
        with DaemonClient(root / "kb.sock") as client:
            client.call("observe", text="hello from a loose umask", source="t")
            assert client.call("status")["adapter"]["version"] == newest
        for p in [home.root, *home.root.rglob("*")]:
            mode = p.stat().st_mode & 0o777
            assert mode == (0o700 if p.is_dir() else 0o600), f"{p} is {mode:o}"
    finally:
        served.stop()


# --- 6. python -m wordahead from the checkout's parent ------------------------------------------------
def test_serve_from_the_checkouts_parent_directory(tiny_llama: Path, root: Path) -> None:
    """Failure 6: `keyboard serve` run from ~/src (the checkout at ~/src/wordahead) died with
    ImportError: the child's `python -m wordahead` imported the checkout folder."""
    parent = root / "src"
    parent.mkdir()
    (parent / "wordahead").symlink_to(REPO)
    env = daemon_env(root / "home", tiny_llama)
    env.pop("PYTHONPATH", None)
    sock = root / "kb.sock"
    try:
        for command in (
            [str(Path(sys.executable).parent / "keyboard"), "serve", "--socket", str(sock)],
            [sys.executable, "-m", "wordahead", "status", "--json", "--socket", str(sock)],
        ):
            done = subprocess.run(
                command, cwd=parent, env=env, capture_output=True, text=True, timeout=120
            )
            assert done.returncode == 0, done.stderr
            assert "ImportError" not in done.stderr
        assert json.loads(done.stdout)["model"]["dir"] == str(tiny_llama)
    finally:
        subprocess.run(
            [sys.executable, "-m", "wordahead", "stop", "--socket", str(sock)],
            env=env,
            capture_output=True,
            timeout=60,
        )


def test_a_killed_job_is_not_shown_running(tiny_llama: Path, root: Path) -> None:
    """Failure 7: a job killed with -9 stayed `running` in the jobs table until the next job
    ran. Seen through the daemon: `status` shows it interrupted at once."""
    home = Home.at(root / "home")
    with TypingLog(home.typing_log) as log:
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        job = JobLog(log).start()
        log.db.execute("UPDATE jobs SET pid = ? WHERE id = ?", [child.pid, job])
    served = InThread(tiny_llama, home, root / "s.sock")
    try:
        assert served.call("status")["personalization"]["last_job"]["status"] == "running"
        child.kill()
        child.wait()
        last = served.call("status")["personalization"]["last_job"]
        assert last["status"] == "interrupted" and last["id"] == job
    finally:
        served.close()


def test_status_shows_a_job_failure_until_a_later_job_runs() -> None:
    from wordahead.daemon.client import describe_status

    failure = {"time": "2026-11-29T16:58:09+00:00", "job": None, "reason": "the disk is full"}

    def shown(last: dict[str, Any] | None) -> bool:
        person = {"last_failure": failure, "last_job": last}
        return "the disk is full" in describe_status({"personalization": person})

    assert shown(None)
    assert shown({"id": 3, "status": "promoted", "started": "2026-11-29T16:50:00.000000Z"})
    assert not shown({"id": 4, "status": "promoted", "started": "2026-11-29T17:00:00.000000Z"})
    failure["job"] = 4  # the log recorded the start, but not why it failed (full disk)
    assert shown({"id": 4, "status": "interrupted", "started": "2026-11-29T17:00:00.000000Z"})
