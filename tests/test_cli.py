"""The command line as a new user meets it: help, flags, human output, installing into the
session and uninstalling. Each test here failed on the command line before its fix."""

from __future__ import annotations

import os
import re
import shlex
import sys
from pathlib import Path
from typing import Any

import pytest

from wordahead.cli import main
from wordahead.daemon import client
from wordahead.paths import Home, keyboard_command

REPO = Path(__file__).resolve().parent.parent


def _help(capsys: pytest.CaptureFixture[str], *command: str) -> str:
    with pytest.raises(SystemExit) as done:
        main([*command, "--help"])
    assert done.value.code == 0
    return capsys.readouterr().out


# --- help and flags -----------------------------------------------------------------------
def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    from wordahead import __version__

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"keyboard {__version__}"


def test_help_texts_say_what_each_command_does(capsys: pytest.CaptureFixture[str]) -> None:
    assert "%%" not in _help(capsys, "train")  # argparse does not format descriptions
    for command in ("privacy", "forget", "log"):
        text = _help(capsys, command)
        description = text.split("\n\n")[1]  # after the usage block
        assert not description.startswith(("options:", "positional")), command
    assert "trailing space" in " ".join(_help(capsys, "predict").split())


def test_help_defaults_come_from_the_values(capsys: pytest.CaptureFixture[str]) -> None:
    from wordahead.learn.policy import JobConfig

    text = " ".join(_help(capsys, "train").split())
    assert f"default: time_budget_s, {JobConfig().time_budget_s:g}" in text
    assert f"default: max_steps, {JobConfig().max_steps}" in text
    assert "(default 3)" in " ".join(_help(capsys, "predict").split())


def test_forget_without_options_names_the_flags(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["forget"]) == 1
    err = capsys.readouterr().err
    assert "--all" in err and '"all": true' not in err


# --- human output -------------------------------------------------------------------------
class _FakeDaemon:
    """Answers `call` with canned results, as the daemon would."""

    answers: dict[str, Any] = {}

    def __init__(self, *args: object, **kwargs: object) -> None:
        pass

    def __enter__(self) -> _FakeDaemon:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def call(self, method: str, **params: Any) -> Any:
        return self.answers[method]


def test_predict_shows_no_meaningless_scores(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    candidates = [
        {"word": "time", "score": 0.4213, "kind": "word"},
        {"word": "timely", "score": 0.0, "kind": "word"},  # completed as typed: no estimate
        {"word": "timer", "score": 0.0004, "kind": "word"},
    ]
    _FakeDaemon.answers = {
        "predict": {"prefix": "tim", "candidates": candidates, "adapter": "base", "latency_ms": 2}
    }
    monkeypatch.setattr(client, "DaemonClient", _FakeDaemon)
    assert main(["predict", "some tim"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == ["time\t42%", "timely", "timer"]


def test_predict_says_what_a_correction_replaces(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    candidates = [
        {"word": "receive", "score": 0.31, "kind": "correction", "replaces": 7},
        {"word": "recieve", "score": 0.0, "kind": "word"},
    ]
    _FakeDaemon.answers = {
        "predict": {"prefix": "recieve", "candidates": candidates, "adapter": "base",
                    "latency_ms": 2}
    }  # fmt: skip
    monkeypatch.setattr(client, "DaemonClient", _FakeDaemon)
    assert main(["predict", "I will recieve"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == ["receive\t31%  (correcting 'recieve')", "recieve"]


def test_status_reads_as_sentences_not_json() -> None:
    status = {
        "pid": 7,
        "uptime_s": 30,
        "socket": "/run/user/1000/keyboard/keyboard.sock",
        "model": {"name": "keyboard-starter", "base_model": "data/cache/starter/keyboard-starter",
                  "dir": "/opt/keyboard/models/starter"},
        "adapter": {"version": "v0002", "metrics": {
            "before": {"loss": 4.2, "top1": 0.1, "top3": 0.25, "words": 80},
            "after": {"loss": 4.0, "top1": 0.12, "top3": 0.3, "words": 80}}},
        "typing_log": {"entries": 3, "words": 40},
        "personalization": {"next_run": "2030-01-02T03:00:00+00:00"},
        "server": {"connections": 1, "served": 9, "rss_mb": 80.0},
    }  # fmt: skip
    text = client.describe_status(status)
    assert "{" not in text and "data/cache" not in text
    assert "held-out loss 4.200 -> 4.000" in text and "top-3 25.0% -> 30.0%" in text


def test_schedule_show_is_human_unless_json(
    home: Home, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.setenv("PATH", str(tmp_path))  # no crontab, no systemctl
    assert main(["schedule", "show"]) == 0
    out = capsys.readouterr().out
    assert "{" not in out and "03:00" in out
    assert main(["schedule", "show", "--json"]) == 0
    assert '"at": "03:00"' in capsys.readouterr().out


# --- the command on PATH, the service, uninstall --------------------------------------------
def test_link_puts_the_command_on_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from wordahead.install import session

    monkeypatch.setenv("PATH", "/usr/bin")
    bin_dir = tmp_path / "bin"
    assert main(["link", "--dir", str(bin_dir)]) == 0
    out = capsys.readouterr().out
    assert (bin_dir / "keyboard").resolve() == (Path(sys.executable).parent / "keyboard").resolve()
    assert "not on your PATH" in out and "export PATH" in out
    assert session.command_name() == str(session.installed_command())  # not on PATH yet
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}/usr/bin")
    assert session.command_name() == "keyboard"
    assert main(["link", "--dir", str(bin_dir)]) == 0  # again: nothing changes
    assert "already points" in capsys.readouterr().out


def test_service_install_and_remove(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    unit = tmp_path / "config" / "systemd" / "user" / "keyboard.service"
    assert main(["service", "install", "--no-enable", "--model", str(tmp_path / "m")]) == 0
    text = unit.read_text()
    serve = shlex.join(keyboard_command("serve", "--foreground", "--model"))
    assert f"ExecStart={serve} " in text
    assert f"Environment=KEYBOARD_HOME={tmp_path / 'kbhome'}" in text
    assert "Restart=on-failure" in text and "WantedBy=default.target" in text
    monkeypatch.setenv("PATH", str(tmp_path))  # no systemctl: only the file goes
    assert main(["service", "remove"]) == 0
    assert not unit.exists()


def test_uninstall_removes_what_was_installed_and_asks_about_the_home(
    home: Home, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from wordahead.store.typing_log import TypingLog

    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    units = tmp_path / "config" / "systemd" / "user"
    with TypingLog(home.typing_log) as typing_log:
        typing_log.record("something worth keeping")
    assert main(["service", "install", "--no-enable"]) == 0
    assert main(["schedule", "install", "--mode", "systemd", "--no-enable"]) == 0
    assert main(["link"]) == 0
    link = tmp_path / "user" / ".local" / "bin" / "keyboard"
    assert link.is_symlink() and len(list(units.iterdir())) == 3
    monkeypatch.setenv("PATH", str(tmp_path))  # no systemctl, no crontab, no daemon to stop

    # Asked, and not confirmed: everything but the home goes.
    monkeypatch.setattr(sys.stdin, "isatty", lambda: True)
    monkeypatch.setattr("builtins.input", lambda prompt: "no")
    assert main(["uninstall"]) == 0
    assert not list(units.iterdir()) and not link.exists() and home.typing_log.exists()
    assert "kept" in capsys.readouterr().out
    # Confirmed: the home goes too.
    monkeypatch.setattr("builtins.input", lambda prompt: "delete")
    assert main(["uninstall"]) == 0
    assert not home.root.exists()


def test_uninstall_never_deletes_a_home_with_foreign_files(
    home: Home, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path
) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    monkeypatch.setenv("PATH", str(tmp_path))
    (home.root / "thesis.tex").write_text("not keyboard's")
    assert main(["uninstall", "--delete-home"]) == 1
    assert "not deleting" in capsys.readouterr().err
    assert (home.root / "thesis.tex").exists()


# --- packaging, docs, the build -------------------------------------------------------------
def test_pyproject_license_is_an_spdx_string() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["license"] == "Apache-2.0"


def test_readme_shows_the_plugins_default_filetypes() -> None:
    lua = (REPO / "editors" / "nvim" / "lua" / "keyboard" / "init.lua").read_text()
    default = re.search(r"^  filetypes = (\{[^}]*\}),", lua, re.M)
    assert default is not None
    readme = (REPO / "README.md").read_text()
    assert f"filetypes = {default.group(1)},  -- the default" in readme


def test_make_test_installs_no_system_packages() -> None:
    makefile = (REPO / "Makefile").read_text()
    assert "apt-get install" not in makefile
