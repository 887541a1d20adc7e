"""The nightly job without the daemon: a systemd user timer, or a crontab line, that runs
`keyboard train` at the configured time (`keyboard schedule install/remove/show`)."""

from __future__ import annotations

import shlex
import shutil
import subprocess
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from wordahead.install.systemd import (
    captured_environment,
    cron_escape,
    environment_lines,
    exec_start,
    systemctl,
    unit_dir,
    user_manager_available,
)
from wordahead.learn import policy
from wordahead.learn.schedule import configured_at, next_run, parse_at
from wordahead.paths import Home, keyboard_command
from wordahead.types import KeyboardError

UNIT = "keyboard-train"  # keyboard-train.service + keyboard-train.timer
CRON_MARK = "# keyboard-train (added by `keyboard schedule install`)"


def job_command() -> list[str]:
    """The command a timer runs: this Python, so the venv needs no activation."""
    return keyboard_command("train")


def service_text(on_ac_only: bool = True) -> str:
    env = environment_lines(captured_environment())
    condition = "ConditionACPower=true\n" if on_ac_only else ""
    return (
        "[Unit]\n"
        "Description=keyboard: nightly personalization (fine-tune the LoRA adapter)\n"
        f"{condition}"
        "\n[Service]\n"
        "Type=oneshot\n"
        f"{exec_start(job_command())}"
        f"{env}"
        "Nice=10\n"
        "IOSchedulingClass=idle\n"
        "CPUSchedulingPolicy=batch\n"
    )


def timer_text(at: str) -> str:
    t = parse_at(at)
    return (
        "[Unit]\n"
        "Description=keyboard: run the personalization job nightly\n"
        "\n[Timer]\n"
        f"OnCalendar=*-*-* {t.hour:02d}:{t.minute:02d}:00\n"
        "Persistent=true\n"  # a laptop asleep at that time runs it when it wakes
        "RandomizedDelaySec=5min\n"
        "\n[Install]\n"
        "WantedBy=timers.target\n"
    )


def cron_line(at: str) -> str:
    t = parse_at(at)
    env = " ".join(shlex.quote(f"{k}={v}") for k, v in sorted(captured_environment().items()))
    command = shlex.join(job_command())
    command = cron_escape(f"{env + ' ' if env else ''}nice -n 10 {command}")
    return f"{t.minute} {t.hour} * * * {command} {CRON_MARK}"


def crontab_with(current: str, line: str | None) -> str:
    """`current` crontab text without keyboard's line, plus `line` (None: just remove it)."""
    kept = [ln for ln in current.splitlines() if not ln.rstrip().endswith(CRON_MARK)]
    if line is not None:
        kept.append(line)
    return "".join(f"{ln}\n" for ln in kept)


def _crontab_read() -> str:
    done = subprocess.run(["crontab", "-l"], capture_output=True, text=True)
    return done.stdout if done.returncode == 0 else ""  # "no crontab for user" is empty


def _crontab_write(text: str) -> None:
    done = subprocess.run(["crontab", "-"], input=text, capture_output=True, text=True)
    if done.returncode != 0:
        raise KeyboardError(f"crontab refused the new table: {done.stderr.strip()}")


@dataclass
class ScheduleResult:
    """What install/remove did, for a person to read."""

    mode: str  # "systemd" or "cron"
    at: str | None = None
    files: list[str] = field(default_factory=list)
    enabled: bool = False  # the timer/cron line is live (not just written)
    cron_line: str | None = None
    messages: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def install(
    home: Home,
    at: str | None = None,
    mode: str = "auto",
    enable: bool = True,
    train_on_battery: bool | None = None,
) -> ScheduleResult:
    """Schedule `keyboard train` daily at `at` (default: the configured time).

    mode "systemd": write keyboard-train.{service,timer} into the user unit dir and, with
    `enable`, start the timer; "cron": add one marked line to the user's crontab (printed
    when there is no `crontab` command); "auto": systemd when a user manager answers.
    """
    config = policy.JobConfig.load(home.job_config)
    at = at or config.at
    parse_at(at)
    if at != config.at:
        policy.JobConfig.update(
            home.job_config, at=at
        )  # the daemon's own schedule follows the same setting
    battery_ok = config.train_on_battery if train_on_battery is None else train_on_battery
    if mode == "auto":
        mode = "systemd" if user_manager_available() else "cron"
    result = ScheduleResult(mode=mode, at=at)
    if mode == "systemd":
        directory = unit_dir()
        directory.mkdir(parents=True, exist_ok=True)
        service, timer = directory / f"{UNIT}.service", directory / f"{UNIT}.timer"
        service.write_text(service_text(on_ac_only=not battery_ok))
        timer.write_text(timer_text(at))
        result.files = [str(service), str(timer)]
        if enable:
            systemctl("daemon-reload")
            systemctl("enable", "--now", f"{UNIT}.timer")
            result.enabled = True
            result.messages.append(f"timer enabled: see `systemctl --user list-timers {UNIT}*`")
        else:
            result.messages.append(
                f"unit files written; enable with `systemctl --user enable --now {UNIT}.timer`"
            )
    elif mode == "cron":
        line = cron_line(at)
        result.cron_line = line
        if enable and shutil.which("crontab"):
            _crontab_write(crontab_with(_crontab_read(), line))
            result.enabled = True
            result.messages.append("added to your crontab (see `crontab -l`)")
        else:
            result.messages.append("no systemd user manager or crontab here; add this line:")
    else:
        raise KeyboardError(f"unknown schedule mode {mode!r} (auto, systemd or cron)")
    return result


def remove(mode: str = "auto", enable: bool = True) -> ScheduleResult:
    """Undo `install`: stop and delete the timer and service, and keyboard's crontab line."""
    result = ScheduleResult(mode=mode)
    directory = unit_dir()
    units = [directory / f"{UNIT}.timer", directory / f"{UNIT}.service"]
    if mode in ("auto", "systemd"):
        if enable and any(u.exists() for u in units) and user_manager_available():
            try:
                systemctl("disable", "--now", f"{UNIT}.timer")
            except KeyboardError as exc:
                result.messages.append(str(exc))
        for unit in units:
            if unit.exists():
                unit.unlink()
                result.files.append(str(unit))
        if result.files and enable and user_manager_available():
            systemctl("daemon-reload")
    if mode in ("auto", "cron") and enable and shutil.which("crontab"):
        current = _crontab_read()
        if CRON_MARK in current:
            _crontab_write(crontab_with(current, None))
            result.messages.append("removed keyboard's line from your crontab")
    if not result.files and not result.messages:
        result.messages.append("nothing was scheduled")
    return result


def show(home: Home) -> dict[str, Any]:
    """What is scheduled: unit files, crontab line, the configured time and the next run."""
    directory = unit_dir()
    at = configured_at(home)
    out: dict[str, Any] = {
        "at": at,
        "next_run": next_run(datetime.now().astimezone(), at).isoformat(timespec="minutes"),
        "systemd_units": [
            str(p)
            for p in (directory / f"{UNIT}.service", directory / f"{UNIT}.timer")
            if p.exists()
        ],
        "cron_line": None,
    }
    if shutil.which("crontab"):
        out["cron_line"] = next(
            (ln for ln in _crontab_read().splitlines() if ln.endswith(CRON_MARK)), None
        )
    return out
