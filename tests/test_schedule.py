"""The nightly schedule: next run time, the daemon's should_run, timer/crontab install and remove."""

from __future__ import annotations

import shlex
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest

from wordahead.cli import main
from wordahead.install import timer
from wordahead.learn import policy, schedule
from wordahead.paths import Home, keyboard_command
from wordahead.store.typing_log import TypingLog
from wordahead.types import KeyboardError


@pytest.fixture
def berlin(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("TZ", "Europe/Berlin")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def test_next_run_naive_local_time() -> None:
    assert schedule.next_run(datetime(2024, 5, 1, 2, 59), "03:00") == datetime(2024, 5, 1, 3, 0)
    assert schedule.next_run(datetime(2024, 5, 1, 3, 0), "03:00") == datetime(2024, 5, 2, 3, 0)
    assert schedule.next_run(datetime(2024, 12, 31, 23, 0), "3:05") == datetime(2025, 1, 1, 3, 5)


def test_next_run_aware_follows_local_clock_across_dst(berlin: None) -> None:
    utc = timezone.utc
    # Clocks go forward on 2024-03-31: 03:00 CEST that morning is 01:00 UTC, the day before
    # 03:00 CET was 02:00 UTC.
    assert schedule.next_run(datetime(2024, 3, 30, 12, 0, tzinfo=utc), "03:00") == datetime(
        2024, 3, 31, 1, 0, tzinfo=utc
    )
    assert schedule.next_run(datetime(2024, 3, 29, 12, 0, tzinfo=utc), "03:00") == datetime(
        2024, 3, 30, 2, 0, tzinfo=utc
    )
    nxt = schedule.next_run(datetime(2024, 7, 1, 0, 30, tzinfo=utc), "03:00")
    assert nxt.tzinfo is not None and nxt > datetime(2024, 7, 1, 0, 30, tzinfo=utc)
    assert nxt.astimezone(utc) == datetime(2024, 7, 1, 1, 0, tzinfo=utc)


def test_next_run_uses_the_configured_time(home: Home) -> None:
    policy.JobConfig.update(home.job_config, at="04:30")
    at = schedule.configured_at(home)
    assert schedule.next_run(datetime(2024, 5, 1, 12, 0), at) == datetime(2024, 5, 2, 4, 30)


@pytest.mark.parametrize("bad", ["3", "24:00", "03:60", "3pm", "", "03:00:00"])
def test_bad_times_are_refused(bad: str) -> None:
    with pytest.raises(KeyboardError, match="HH:MM"):
        schedule.parse_at(bad)


def test_should_run_needs_enough_new_words_and_a_free_lock(home: Home) -> None:
    with TypingLog(home.typing_log) as log:
        log.record("just a few words today")
        decision = schedule.should_run(log, home)
        assert not decision and "waiting for 200" in decision.reason
        log.record(" ".join(["hello there my friend"] * 60))
        run, reason = schedule.should_run(log, home)
        assert run and "new words" in reason
        with policy.job_lock(home):
            decision = schedule.should_run(log, home)
            assert not decision and "already running" in decision.reason
        assert schedule.should_run(log, home)
        log.set_watermark(log.recent(1)[0]["id"])  # a job consumed it all
        assert not schedule.should_run(log, home)


def _supply(root: Path, name: str, **files: str) -> None:
    (root / name).mkdir(parents=True)
    for key, value in files.items():
        (root / name / key).write_text(value + "\n")


def test_on_battery_reads_sysfs(tmp_path: Path) -> None:
    assert not policy.on_battery(tmp_path / "missing")
    _supply(tmp_path, "BAT0", type="Battery", status="Discharging")
    _supply(tmp_path, "AC", type="Mains", online="0")
    assert policy.on_battery(tmp_path)
    (tmp_path / "AC" / "online").write_text("1\n")
    assert not policy.on_battery(tmp_path)
    (tmp_path / "AC" / "online").write_text("0\n")
    (tmp_path / "BAT0" / "status").write_text("Charging\n")
    assert not policy.on_battery(tmp_path)


def test_systemd_install_remove_round_trip(
    home: Home, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    units = tmp_path / "config" / "systemd" / "user"
    # --no-enable: write the units without calling systemctl (tests never touch the user's
    # real systemd manager).
    assert main(["schedule", "install", "--mode", "systemd", "--no-enable", "--at", "05:15"]) == 0
    service = (units / "keyboard-train.service").read_text()
    timer_unit = (units / "keyboard-train.timer").read_text()
    assert f"ExecStart={shlex.join(keyboard_command('train'))}" in service
    assert f"Environment=KEYBOARD_HOME={tmp_path / 'kbhome'}" in service
    assert "Type=oneshot" in service and "Nice=10" in service
    assert "ConditionACPower=true" in service  # train_on_battery is off by default
    assert "OnCalendar=*-*-* 05:15:00" in timer_unit and "Persistent=true" in timer_unit
    assert policy.JobConfig.load(home.job_config).at == "05:15"  # the daemon follows the same time
    assert "05:15" in capsys.readouterr().out
    # Installing again replaces, never duplicates.
    timer.install(home, "06:00", mode="systemd", enable=False, train_on_battery=True)
    assert "OnCalendar=*-*-* 06:00:00" in (units / "keyboard-train.timer").read_text()
    assert "ConditionACPower" not in (units / "keyboard-train.service").read_text()
    assert timer.show(home)["systemd_units"] == [
        str(units / "keyboard-train.service"),
        str(units / "keyboard-train.timer"),
    ]
    assert main(["schedule", "remove", "--mode", "systemd"]) == 0
    assert not list(units.iterdir())
    assert timer.remove(mode="systemd", enable=False).messages == ["nothing was scheduled"]


def test_cron_line_and_crontab_edit(home: Home) -> None:
    line = timer.cron_line("03:07")
    assert line.startswith("7 3 * * * ")
    assert f"nice -n 10 {shlex.join(keyboard_command('train'))}" in line
    assert line.endswith(timer.CRON_MARK)
    mine = "0 1 * * * backup.sh\n"
    added = timer.crontab_with(mine, line)
    assert added == mine + line + "\n"
    assert timer.crontab_with(added, timer.cron_line("04:00")).count(timer.CRON_MARK) == 1
    assert timer.crontab_with(added, None) == mine
    result = timer.install(home, "03:07", mode="cron", enable=False)
    assert result.cron_line == line and not result.enabled
