"""The nightly job's policy: its settings (`personalize.json`), when it runs (enough new
words, not on battery), how it behaves (lower priority, one job at a time) and the record of
why the last one failed. The daemon, its schedule and `keyboard train` share these rules."""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from wordahead import paths
from wordahead.paths import Home
from wordahead.types import KeyboardError

if TYPE_CHECKING:
    from wordahead.store.typing_log import TypingLog

log = logging.getLogger("wordahead.learn.policy")


@dataclass
class JobConfig:
    """Settings of the job, from the home's `personalize.json` (every key optional)."""

    at: str = "03:00"  # local time the daemon / timer runs the job
    min_new_words: int = 200  # fewer new words since the last job: skip
    time_budget_s: float = 600.0  # the whole job, evaluations included
    # The recipe, set on the users' history (docs/results.md): batch 4 keeps the job's peak
    # memory near 300 MB (the lm_head group's gradient is [tokens x vocabulary]); twice the
    # steps of batch 8 see the same text.
    max_steps: int = 800
    lr: float = 3e-3
    warmup: int = 10
    batch_size: int = 4
    eval_every: int = 50  # held-out loss every N steps: early stopping, best adapter kept
    patience: int = 3  # evaluations without improvement before stopping
    replay_fraction: float = 0.25  # older text replayed, as a fraction of the new entries
    holdout_fraction: float = 0.1  # the most recent slice of new text, kept from training
    # Once the gate promotes, passes over that slice (the newest text, the closest to what
    # comes next) at fold_in_lr, so the adapter served has learned it too; 0: never trained on.
    fold_in_epochs: float = 2.0
    fold_in_lr: float = 1e-3
    # Per job: the newest new text; older new text is consumed and replayed, not trained as new.
    max_new_words: int = 100_000
    max_eval_words: int = 1_000  # held-out words typed through the predictor for top-3
    min_loss_gain: float = 0.001  # held-out loss must fall by this fraction to promote
    train_on_battery: bool = False
    threads: int = 1
    nice: int = 10  # niceness the job lowers itself to
    keep_versions: int = 5
    phrases: bool = True  # count the user's word n-grams; false: the adapter alone is served
    # With a promoted adapter, the phrases' share of the blend is the one of
    # phrases.blend_weights that typed the held-out text best; false: the default share.
    choose_share: bool = True
    groups: str = ""  # adapter groups trained, e.g. "attention,mlp" ("": the model's choice)
    # Phrase completion (ghost text) the daemon offers: at most phrase_max_words words, only
    # above phrase_threshold (set on the users' dev lines, docs/results.md "Phrase
    # completion"; see wordahead.predict.sources.phrase_completion); false: no phrases.
    phrase_completion: bool = True
    phrase_max_words: int = 2
    phrase_threshold: float = 0.1

    @classmethod
    def load(cls, path: Path) -> JobConfig:
        """Defaults, overridden by the keys of the file at `path` (a home's `job_config`). An
        unknown key or a wrong type is an error that names the file, so a typo never silently
        leaves a default in place."""
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            return cls()
        except Exception as exc:  # noqa: BLE001 - unreadable, not JSON, nested too deep
            raise KeyboardError(f"cannot read {path}: {exc}") from exc
        if not isinstance(data, dict):
            raise KeyboardError(f"{path} must hold a JSON object of settings")
        known = {f.name: f for f in fields(cls)}
        config = cls()
        for key, value in data.items():
            if key not in known:
                raise KeyboardError(f"{path}: unknown setting {key!r} (known: {', '.join(known)})")
            expected = type(getattr(config, key))
            if expected is bool:
                ok = isinstance(value, bool)
            else:  # an int is fine where a float is expected; a bool is never a number
                numeric = (int, float) if expected is float else expected
                ok = isinstance(value, numeric) and not isinstance(value, bool)
            if not ok or (expected is float and not math.isfinite(value)):
                raise KeyboardError(f"{path}: {key} must be a {expected.__name__}, got {value!r}")
            setattr(config, key, expected(value))
        return config

    @classmethod
    def load_or_defaults(cls, path: Path) -> JobConfig:
        """The settings for what runs in the background (the daemon's schedule): a damaged
        file is logged and the defaults are used; `keyboard train` reports it instead."""
        try:
            return cls.load(path)
        except KeyboardError as exc:
            log.warning("%s; using the default settings", exc)
            return cls()

    @classmethod
    def update(cls, path: Path, **changes: Any) -> JobConfig:
        """Set some settings in the file, keeping the others as they are there (settings left
        out of the file follow the defaults of future versions)."""
        from wordahead.model.artifacts import write_atomic

        cls.load(path)  # refuse to rewrite a file that is broken: the user must fix it
        known = {f.name for f in fields(cls)}
        if unknown := set(changes) - known:
            raise KeyboardError(f"unknown setting(s): {', '.join(sorted(unknown))}")
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            data = {}
        data.update(changes)
        text = json.dumps(data, indent=2) + "\n"
        write_atomic(path, lambda f: f.write(text.encode()))
        return cls.load(path)


# --- why the last job failed ------------------------------------------------------------------
FAILURE_RECORD_BYTES = 4096


def reserve_failure_record(home: Home) -> None:
    """Allocate the failure record now, while there is room: a job that fails because the
    disk is full can then still say so, in place, where the typing log and daemon.log
    cannot."""
    try:
        fd = os.open(home.job_failure, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    except OSError:
        return
    try:
        size = os.fstat(fd).st_size
        if size < FAILURE_RECORD_BYTES:
            os.pwrite(fd, b" " * (FAILURE_RECORD_BYTES - size), size)
            os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def record_failure(home: Home, reason: str, job_id: int | None = None) -> bool:
    """Keep why a job failed (the reason cut to fit the record); False when even that failed."""
    record: dict[str, Any] = {
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "job": job_id,
        "reason": reason,
    }
    data = json.dumps(record).encode()
    while len(data) > FAILURE_RECORD_BYTES:
        record["reason"] = record["reason"][: len(record["reason"]) * 3 // 4] + "..."
        data = json.dumps(record).encode()
    try:
        fd = os.open(home.job_failure, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        try:
            os.pwrite(fd, data.ljust(FAILURE_RECORD_BYTES), 0)  # over the reserved bytes
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        log.warning("cannot record why the job failed (%s): %s", exc, reason)
        return False
    return True


def last_failure(home: Home) -> dict[str, Any] | None:
    """The last recorded job failure: {time, job, reason}; None when none (or unreadable)."""
    try:
        with open(home.job_failure, "rb") as f:
            record = json.loads(f.read(FAILURE_RECORD_BYTES).strip() or b"null")
    except (OSError, ValueError, RecursionError):
        return None
    return record if isinstance(record, dict) and "reason" in record else None


# --- good manners -----------------------------------------------------------------------------
POWER_SUPPLY = Path("/sys/class/power_supply")


def on_battery(power_supply: Path | None = None) -> bool:
    """True when a battery is discharging and no AC adapter is online (Linux sysfs). False
    when it cannot be told (no sysfs, a desktop): the job then runs."""
    power_supply = power_supply or POWER_SUPPLY
    try:
        supplies = list(power_supply.iterdir())
    except OSError:
        return False
    discharging, mains_online = False, False
    for supply in supplies:
        try:
            kind = (supply / "type").read_text().strip()
            if kind == "Battery":
                status = (supply / "status").read_text().strip()
                discharging = discharging or status == "Discharging"
            elif kind in ("Mains", "USB", "USB_C", "USB_PD"):
                mains_online = mains_online or (supply / "online").read_text().strip() == "1"
        except OSError:
            continue
    return discharging and not mains_online


def lower_priority(niceness: int) -> None:
    """Raise this process's niceness to `niceness` (never lower it: cron may have done so)."""
    with contextlib.suppress(OSError):
        current = os.nice(0)
        if niceness > current:
            os.nice(niceness - current)
    # Idle I/O class where the platform has it, so reading the log never stalls the desktop.
    if hasattr(os, "sched_setscheduler") and hasattr(os, "SCHED_BATCH"):
        with contextlib.suppress(OSError):
            os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))


class JobBusy(KeyboardError):
    """Another personalization job holds the lock."""


@contextlib.contextmanager
def job_lock(home: Home) -> Iterator[None]:
    """Hold the home's job lock, or raise JobBusy. flock: the kernel releases it when the
    holder exits or is killed, so a crashed job never leaves it stuck."""
    fd = paths.open_no_follow(home.job_lock, os.O_RDWR | os.O_CREAT)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise JobBusy(f"another personalization job is running ({_holder(fd)})") from None
        stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
        with contextlib.suppress(OSError):  # who holds it is for messages; the flock is the lock
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps({"pid": os.getpid(), "started": stamp}).encode(), 0)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def _holder(fd: int) -> str:
    info = _holder_record(fd)
    return f"pid {info['pid']}, started {info['started']}" if info else "pid unknown"


def _holder_record(fd: int) -> dict[str, Any] | None:
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return {"pid": int(info["pid"]), "started": str(info["started"])}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def job_running(home: Home) -> str | None:
    """Who holds the home's job lock ("pid N, started T"), or None when no job is running."""
    holder = job_holder(home)
    if holder is None:
        return None
    return f"pid {holder['pid']}, started {holder['started']}" if holder["pid"] else "pid unknown"


def job_holder(home: Home) -> dict[str, Any] | None:
    """The running job's {pid, started} (0 and "" when it did not say), or None when no job
    holds the home's lock: how a daemon started after the job finds it."""
    try:
        fd = os.open(home.job_lock, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None  # none there (or a link planted there, which no job would hold)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _holder_record(fd) or {"pid": 0, "started": ""}
        return None
    finally:
        os.close(fd)


def words_since_last_job(typing_log: TypingLog) -> int:
    """Words logged after the text the last completed job consumed (the watermark)."""
    return sum(row[2] for row in typing_log.iter_text(after=typing_log.watermark))


def skip_reason(config: JobConfig, new_words: int, force: bool = False) -> str | None:
    """Why the job should not train now, or None. The one rule, for the job itself and for
    the daemon's schedule: too few new words since the last job, or running on battery
    (unless `train_on_battery`). `force` overrides both."""
    if force:
        return None
    if new_words < config.min_new_words:
        return f"only {new_words} new words since the last job; waiting for {config.min_new_words}"
    if not config.train_on_battery and on_battery():
        return "on battery power (plug in, or set train_on_battery / use --force)"
    return None
