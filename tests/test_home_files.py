"""The keyboard home under a careful user and a hostile file: uninstall knows every file
keyboard makes, links planted in the home are never written through, unit files keep a `%`,
damaged federation settings do not stop `status`, and `status` sees a job an earlier daemon
started. Each test here failed before its fix (issue 28, failures 5, 6 and 7)."""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.daemon_process import short_dir
from wordahead.cli import main
from wordahead.daemon import server
from wordahead.daemon.client import DaemonClient
from wordahead.federated.local import FederationSettings
from wordahead.install import session
from wordahead.learn import policy
from wordahead.learn.adapter_store import AdapterStore
from wordahead.paths import Home, open_no_follow
from wordahead.predict.sources.phrases import PhraseModel
from wordahead.store.typing_log import TypingLog
from wordahead.types import KeyboardError


@pytest.fixture
def root() -> Iterator[Path]:
    path = short_dir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _used_home(home: Home, model: Path) -> AdapterStore:
    """A home as a few weeks of use leave it: every kind of file keyboard makes."""
    from wordahead.learn.trainer import LoraTrainer
    from wordahead.model import quantize

    with TypingLog(home.typing_log) as log:
        log.record("see you at dayrit tomorrow", source="test")
    store = AdapterStore.in_home(home, model)
    initial = store.artifacts.initial_adapter()
    phrases = PhraseModel.from_texts(["see you at dayrit tomorrow"]).to_bytes()
    for delta in (0.01, 0.02, 0.03):
        store.promote({n: v + delta for n, v in initial.items()}, {"source": "test"}, phrases)
    store.prune(keep=2)
    policy.reserve_failure_record(home)
    policy.record_failure(home, "the disk is full")
    with policy.job_lock(home):
        pass
    policy.JobConfig.update(home.job_config, at="04:00")
    FederationSettings(min_new_words=50).save(home.root)
    LoraTrainer(store.artifacts, groups="lm_head", cache_dir=home.training_graphs)
    graphs = next(p for p in home.training_graphs.iterdir() if not p.name.startswith("."))
    shutil.copytree(graphs, graphs.with_name(graphs.name + ".damaged"))  # one set aside
    cached = home.root / "models" / ("0" * 16)
    cached.mkdir(parents=True)
    for name in (quantize.INT8_FILE, quantize.INT8_FILE + ".sha256"):
        (cached / name).write_bytes(b"int8")
    for name in ("daemon.log", "daemon.log.1", "daemon.lock", "keyboard.pid"):
        (home.root / name).write_text("{}")
    return store


def test_uninstall_deletes_a_used_home_and_refuses_foreign_files_at_any_depth(
    tiny_llama: Path, root: Path
) -> None:
    """Before: every used home was refused ("cache, job-failure.json", both keyboard's own),
    while a foreign file inside adapters/ was deleted (only the top level was checked)."""
    home = Home.at(root / "home")
    store = _used_home(home, tiny_llama)
    assert session.foreign_entries(home.root) == []
    planted = [
        store.root / "v0002" / "notes.txt",
        home.root / "cache" / "thesis.tex",
        home.root / "models" / "photos" / "cat.jpg",
    ]
    for path in planted:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("not keyboard's")
    (home.root / "adapters" / "link").symlink_to(root)
    with pytest.raises(KeyboardError) as refused:
        session.delete_home(home)
    listed = str(refused.value)
    relative = store.root.relative_to(home.root).as_posix()
    for entry in (f"{relative}/v0002/notes.txt", "cache/thesis.tex", "models/photos/", "link"):
        assert entry in listed, listed
    assert all(path.exists() for path in planted)
    for path in planted:
        path.unlink()
    (home.root / "models" / "photos").rmdir()
    (home.root / "adapters" / "link").unlink()
    assert session.delete_home(home).done and not home.root.exists() and root.exists()


def test_uninstall_deletes_a_home_reached_through_a_symlink(
    tiny_llama: Path, root: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """Before: a KEYBOARD_HOME that is a symlink gave a traceback."""
    real = Home.at(root / "real")
    with TypingLog(real.typing_log) as log:
        log.record("something", source="test")
    (root / "link").symlink_to(real.root)
    monkeypatch.setenv("KEYBOARD_HOME", str(root / "link"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(root / "config"))
    monkeypatch.setenv("HOME", str(root / "user"))
    monkeypatch.setenv("PATH", str(root))  # no systemctl, no crontab, no daemon to stop
    assert main(["uninstall", "--delete-home"]) == 0
    assert not real.root.exists() and not (root / "link").is_symlink()


def _planted(root: Path, name: str) -> tuple[Path, Path]:
    """A file of the user's, and a link to it where the home keeps `name`."""
    target = root / "precious.txt"
    target.write_text("the user's own file\n")
    home = Home.at(root / "home")
    (home.root / name).symlink_to(target)
    return home.root / name, target


@pytest.mark.parametrize("name", ["daemon.lock", "personalize.lock", "keyboard.pid"])
def test_a_link_planted_as_a_lock_or_pid_file_is_refused_not_written_through(
    root: Path, name: str
) -> None:
    """Before: a daemon.lock planted as a link had its target overwritten with {"pid": ...};
    keyboard.pid refused with a traceback (ELOOP)."""
    path, target = _planted(root, name)
    home = Home(path.parent)
    with pytest.raises(KeyboardError, match="is a symbolic link.*rm "):
        if name == "daemon.lock":
            server._claim_lock(path, root / "kb.sock")
        elif name == "personalize.lock":
            with policy.job_lock(home):
                pass
        else:
            server._hold_pid_file(path, root / "kb.sock")
    assert target.read_text() == "the user's own file\n"
    assert policy.job_holder(home) is None  # and no job is taken to hold it


def test_the_daemon_log_is_never_appended_through_a_link(
    tiny_llama: Path, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: `keyboard serve` appended the daemon's output to the link's target."""
    path, target = _planted(root, "daemon.log")
    monkeypatch.setenv("KEYBOARD_HOME", str(path.parent))
    config = server.ServeConfig(root / "kb.sock", tiny_llama, Home(path.parent))
    with pytest.raises(KeyboardError, match="daemon.log is a symbolic link"):
        server.start_background(config)
    assert target.read_text() == "the user's own file\n"
    fd = open_no_follow(root / "plain.log", os.O_WRONLY | os.O_CREAT)  # a plain file: opened
    os.close(fd)
    assert (root / "plain.log").stat().st_mode & 0o777 == 0o600


def test_a_percent_in_paths_reaches_units_escaped(
    home: Home, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: a `%` in the virtualenv path reached the units as is (systemd expands `%h`)
    and the crontab line (cron turns `%` into a newline)."""
    from wordahead.install import timer

    python = tmp_path / "venv%h" / "bin" / "python"
    monkeypatch.setattr(sys, "executable", str(python))
    monkeypatch.setenv("KEYBOARD_HOME", str(tmp_path / "50%home"))
    for unit in (session.service_text(), timer.service_text()):
        lines = [line for line in unit.splitlines() if line.startswith(("ExecStart", "Env"))]
        assert any("venv%%h" in line for line in lines)
        assert any("50%%home" in line for line in lines)
        for line in lines:  # every `%` is doubled: no specifier left for systemd to expand
            assert "%" not in line.replace("%%", ""), line
    cron = timer.cron_line("03:00")
    assert "venv\\%h" in cron and "50\\%home" in cron and "%" not in cron.replace("\\%", "")


@pytest.mark.parametrize(
    "content", [b"{", b"[]", b'{"enabled": "yes"}', b'{"nope": 1}', b"[" * 100_000, b"\xff"]
)
def test_damaged_federation_settings_read_as_off_and_federate_off_repairs_them(
    home: Home, content: bytes, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture
) -> None:
    """Before: a damaged federated.json made `keyboard status` exit 1 and `keyboard federate
    --off` could not repair it."""
    path = FederationSettings.path(home.root)
    path.write_bytes(content)
    settings = FederationSettings.load(home.root)
    assert not settings.enabled and "federated.json is damaged" in caplog.text
    assert "federate --off" in caplog.text
    assert main(["federate", "--off"]) == 0
    assert json.loads(path.read_text())["enabled"] is False
    caplog.clear()
    assert not FederationSettings.load(home.root).enabled and "damaged" not in caplog.text


def test_status_shows_a_job_started_before_the_daemon(
    tiny_llama: Path, root: Path, capsys: pytest.CaptureFixture
) -> None:
    """Before: after a daemon restart mid-job, `status` said no job ran while one did."""
    from wordahead.daemon.client import describe_status

    home = Home.at(root / "home")
    daemon, thread = server.run_in_thread(server.ServeConfig(root / "s.sock", tiny_llama, home))
    try:
        with DaemonClient(root / "s.sock", timeout=30) as client:
            assert client.call("status")["personalization"]["running"] is None
            with policy.job_lock(home):  # a job the daemon did not start
                status = client.call("status")
                running = status["personalization"]["running"]
                assert running["pid"] == os.getpid() and running["started"]
                assert "job running since" in describe_status(status)
            assert client.call("status")["personalization"]["running"] is None
    finally:
        daemon.stop()
        thread.join(timeout=30)


def test_set_aside_and_cached_files_count_as_keyboards() -> None:
    assert session.keyboard_made("models/0123456789abcdef/inference.int8-7bit.onnx.sha256")
    assert session.keyboard_made("cache/training/mlp+lm_head-0123456789abcdef.damaged/checkpoint")
    assert not session.keyboard_made("models/0123456789abcdef/inference.onnx")
    assert not session.keyboard_made("adapters/starter-0123/v0001/adapter.npz.bak")
