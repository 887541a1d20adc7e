"""When the nightly personalization job runs: the daemon's hook, a systemd user timer or cron."""

from __future__ import annotations

import logging
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta
from typing import TYPE_CHECKING, Any

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
from wordahead.paths import Home, keyboard_command
from wordahead.types import KeyboardError

if TYPE_CHECKING:
    from wordahead.store.typing_log import TypingLog

UNIT = "keyboard-train"  # keyboard-train.service + keyboard-train.timer
log = logging.getLogger("wordahead.learn.schedule")
CRON_MARK = "# keyboard-train (added by `keyboard schedule install`)"
_TIME_RE = re.compile(r"^([01]?\d|2[0-3]):([0-5]\d)$")


def parse_at(at: str) -> time:
    """A local time of day from "HH:MM" (24-hour clock)."""
    m = _TIME_RE.match(str(at).strip())
    if not m:
        raise KeyboardError(f"not a time of day: {at!r} (use 24-hour HH:MM, e.g. 03:00)")
    return time(int(m.group(1)), int(m.group(2)))


def configured_at(home: Home) -> str:
    """The configured time of the nightly job (`at` in personalize.json; default 03:00; a bad
    value is logged and the default used, so the daemon's schedule never stops)."""
    at = policy.JobConfig.load_or_defaults(home.job_config).at
    try:
        parse_at(at)
    except KeyboardError as exc:
        log.warning("%s: %s; the job runs at %s", home.job_config, exc, policy.JobConfig.at)
        return policy.JobConfig.at
    return at


def next_run(now: datetime, at: str) -> datetime:
    """The first moment strictly after `now` when the local clock shows `at` (HH:MM). An
    aware `now` gives an aware answer (in local time), a naive one a naive local answer.
    Across a DST change the wall-clock time is kept."""
    wanted = parse_at(at)
    aware = now.tzinfo is not None
    local = now.astimezone().replace(tzinfo=None) if aware else now
    day: date = local.date()
    candidate = datetime.combine(day, wanted)
    if candidate <= local:
        candidate = datetime.combine(day + timedelta(days=1), wanted)
    if not aware:
        return candidate
    result = candidate.astimezone()  # a naive datetime is read as local time (DST included)
    if result <= now:  # 03:00 repeated when clocks go back: the later one is already past
        result = datetime.combine(day + timedelta(days=1), wanted).astimezone()
    return result


@dataclass(frozen=True)
class Decision:
    """Whether the scheduled job should run now, and why (truthy when it should)."""

    run: bool
    reason: str

    def __bool__(self) -> bool:
        return self.run

    def __iter__(self):  # `run, reason = should_run(typing_log, home)`
        return iter((self.run, self.reason))


def should_run(typing_log: TypingLog, home: Home) -> Decision:
    """The daemon's check at the scheduled time: the job's own skip rule (enough new text, not
    on battery unless configured) and no job running. `typing_log` is `home`'s, open."""
    config = policy.JobConfig.load_or_defaults(home.job_config)
    words = policy.words_since_last_job(typing_log)
    reason = policy.skip_reason(config, words)
    if reason is not None:
        return Decision(False, reason)
    holder = policy.job_running(home)
    if holder is not None:
        return Decision(False, f"a personalization job is already running ({holder})")
    return Decision(True, f"{words} new words since the last job")


# --- systemd user timer / cron ------------------------------------------------------------------
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
