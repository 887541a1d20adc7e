"""When the nightly personalization job runs: the configured time, the next run, and the
daemon's check at that time. The systemd timer or crontab line that runs it without the daemon
is installed by wordahead.install.timer."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from typing import TYPE_CHECKING

from wordahead.learn import policy
from wordahead.paths import Home
from wordahead.types import KeyboardError

if TYPE_CHECKING:
    from wordahead.store.typing_log import TypingLog

log = logging.getLogger("wordahead.learn.schedule")
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
