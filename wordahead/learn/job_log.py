"""What the personalization job reads from the typing log (its training text) and records
there (its runs: started, ended, outcome)."""

from __future__ import annotations

import json
import os
import random
import sqlite3
from dataclasses import asdict, dataclass, field, is_dataclass
from datetime import datetime, timezone
from typing import Any

from wordahead.store.database import guarded
from wordahead.store.typing_log import INTERRUPTED, TS_FORMAT, TypingLog, utc_iso
from wordahead.types import KeyboardError


@dataclass
class TrainingText:
    """What one personalization job reads: new text, a replay sample, and held-out text."""

    new: list[str]  # the newest entries after the watermark, oldest first, minus the held-out slice
    replay: list[str]  # a random sample of older entries: consumed by earlier jobs or passed over
    heldout: list[str]  # the most recent new entries, for evaluation only
    new_words: int
    watermark: int  # max entry id covered; pass to set_watermark() once the job succeeded
    replay_words: int = 0
    heldout_words: int = 0
    # New text older than the newest max_new_words: consumed and replayed, not trained as new.
    passed_words: int = 0
    entry_ids: list[int] = field(default_factory=list, repr=False)

    @property
    def empty(self) -> bool:
        return not self.new and not self.heldout


class JobLog:
    """The job's view of a TypingLog: the text for a run, and the `jobs` table. Shares the
    log's connection and lock; `path` names the database in error messages."""

    def __init__(self, typing_log: TypingLog) -> None:
        self.typing_log = typing_log
        self.path = typing_log.path

    @guarded
    def training_text(
        self,
        replay_fraction: float = 0.25,
        holdout_fraction: float = 0.1,
        seed: int = 0,
        max_new_words: int | None = None,
    ) -> TrainingText:
        """Text for one personalization job.

        `new`: the newest entries after the watermark, up to `max_new_words`, oldest first;
        `heldout`: the most recent `holdout_fraction` of those (by words), never trained on
        by this job; `replay`: `replay_fraction` x len(new) entries sampled (with `seed`) from
        text earlier jobs consumed, against forgetting. With more new text than `max_new_words`
        (a first job over an imported history, a long pause), the newest is what the job trains
        on, since it predicts what comes next best; the older new text is passed over: consumed
        like the earlier jobs' text, counted by the phrases, and in the replay's pool. Call the
        log's `set_watermark(result.watermark)` only after the job succeeded.
        """
        if not 0.0 <= holdout_fraction < 1.0 or replay_fraction < 0.0:
            raise KeyboardError("holdout_fraction must be in [0, 1) and replay_fraction >= 0")
        mark = self.typing_log.watermark
        rows = list(self.typing_log.iter_text(after=mark))
        if not rows:
            return TrainingText([], [], [], 0, mark)
        first, words = len(rows), 0  # the newest rows within the word budget (at least one)
        while first > 0 and (
            max_new_words is None
            or first == len(rows)
            or words + rows[first - 1][2] <= max_new_words
        ):
            first -= 1
            words += rows[first][2]
        passed, rows = rows[:first], rows[first:]
        held = 0
        if holdout_fraction > 0 and len(rows) >= 2:
            target, held_words = holdout_fraction * words, 0
            while held < len(rows) - 1 and (held == 0 or held_words < target):
                held += 1
                held_words += rows[-held][2]
        train, heldout = rows[: len(rows) - held], rows[len(rows) - held :]
        with self.typing_log.lock:
            old_ids = [
                r[0]
                for r in self.typing_log.db.execute("SELECT id FROM entries WHERE id <= ?", [mark])
            ] + [r[0] for r in passed]
        k = min(len(old_ids), round(replay_fraction * len(train)))
        replay: list[tuple[str, int]] = []
        if k:
            chosen = sorted(random.Random(seed).sample(old_ids, k))
            with self.typing_log.lock:
                for start in range(0, len(chosen), 500):
                    part = chosen[start : start + 500]
                    marks = ",".join("?" * len(part))
                    replay += self.typing_log.db.execute(
                        f"SELECT text, words FROM entries WHERE id IN ({marks}) ORDER BY id", part
                    ).fetchall()
        return TrainingText(
            new=[r[1] for r in train],
            replay=[r[0] for r in replay],
            heldout=[r[1] for r in heldout],
            new_words=sum(r[2] for r in train),
            watermark=rows[-1][0],
            replay_words=sum(r[1] for r in replay),
            heldout_words=sum(r[2] for r in heldout),
            passed_words=sum(r[2] for r in passed),
            entry_ids=[r[0] for r in rows],
        )

    @guarded
    def start(self, watermark: int | None = None) -> int:
        """Record a job as running; jobs left running by a dead process become 'interrupted'."""
        now = utc_iso(datetime.now(timezone.utc))
        with self.typing_log.lock, self.typing_log.db.atomic():
            self._mark_interrupted(self._dead(), now)
            table = self.typing_log.db.table("jobs")
            table.insert(
                {
                    "started": now,
                    "status": "running",
                    "metrics": "{}",
                    "watermark": watermark,
                    "pid": os.getpid(),
                }
            )
            assert table.last_rowid is not None
            return int(table.last_rowid)

    @guarded
    def finish(
        self,
        job_id: int,
        status: str,
        metrics: dict[str, Any] | None = None,
        adapter_version: str | None = None,
        reason: str = "",
    ) -> None:
        """Record how a job ended: status ('succeeded', 'failed', 'rejected', ...), metrics."""
        if not isinstance(status, str) or not status.strip():
            raise KeyboardError("a job status is a non-empty string, e.g. 'succeeded'")
        encoded = json.dumps(metrics or {}, default=_jsonable, sort_keys=True)
        with self.typing_log.lock, self.typing_log.db.atomic():
            updated = self.typing_log.db.execute(
                "UPDATE jobs SET ended = ?, status = ?, metrics = ?, adapter_version = ?, "
                "reason = ? WHERE id = ?",
                [
                    utc_iso(datetime.now(timezone.utc)),
                    status.strip(),
                    encoded,
                    adapter_version,
                    reason,
                    job_id,
                ],
            ).rowcount
        if not updated:
            raise KeyboardError(f"no personalization job with id {job_id}")

    @guarded
    def recent(self, limit: int = 10) -> list[dict[str, Any]]:
        """The newest jobs first, metrics decoded. A job whose process died (kill -9, power
        cut) is 'interrupted', not 'running', even when the log cannot be written."""
        with self.typing_log.lock:
            dead = self._dead()
            if dead:
                try:
                    with self.typing_log.db.atomic():
                        self._mark_interrupted(dead, utc_iso(datetime.now(timezone.utc)))
                except sqlite3.Error:
                    pass  # a full disk or a read-only log: reported as interrupted below
            rows = list(
                self.typing_log.db.query("SELECT * FROM jobs ORDER BY id DESC LIMIT ?", [limit])
            )
        for row in rows:
            try:
                row["metrics"] = json.loads(row["metrics"])
            except (TypeError, ValueError, RecursionError):
                row["metrics"] = {}
            if row["id"] in dead and row["status"] == "running":
                row.update(status="interrupted", reason=INTERRUPTED)
        return rows

    def _dead(self) -> list[int]:
        """Jobs recorded as running whose process is gone."""
        rows = self.typing_log.db.query(
            "SELECT id, pid, started FROM jobs WHERE status = 'running'"
        )
        return [r["id"] for r in rows if not _alive(r["pid"], r["started"])]

    def _mark_interrupted(self, job_ids: list[int], now: str) -> None:
        for job_id in job_ids:
            self.typing_log.db.execute(
                "UPDATE jobs SET status = 'interrupted', ended = ?, reason = ? "
                "WHERE id = ? AND status = 'running'",
                [now, INTERRUPTED, job_id],
            )

    def last(self) -> dict[str, Any] | None:
        """The newest job, or None."""
        found = self.recent(limit=1)
        return found[0] if found else None


def _alive(pid: int | None, started: str | None = None) -> bool:
    """Whether process `pid` still runs and (where /proc tells) began before `started`: a
    pid reused by a later process, after a reboot say, is not the job's."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    if started:
        begun = _process_start(pid)
        try:
            recorded = datetime.strptime(started, TS_FORMAT).replace(tzinfo=timezone.utc)
        except ValueError:
            return True
        if begun is not None and begun > recorded.timestamp() + 5.0:  # clock-tick slack
            return False
    return True


def _process_start(pid: int) -> float | None:
    """When `pid` started (Unix time), from /proc; None where that cannot be read."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/stat") as f:
            boot = next(int(ln.split()[1]) for ln in f if ln.startswith("btime "))
    except (OSError, ValueError, IndexError, StopIteration):
        return None
    return boot + ticks / os.sysconf("SC_CLK_TCK")


def _jsonable(value: Any) -> Any:
    if is_dataclass(value) and not isinstance(value, type):
        return asdict(value)
    return str(value)
