"""The typing log: what the user types, redacted and stored privately in SQLite for training."""

from __future__ import annotations

import contextlib
import json
import math
import re
import sqlite3
import threading
import time
import unicodedata
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from wordahead.predict.words import partial_word, words
from wordahead.store.database import (
    TypingLogError,
    describe_database_error,
    guarded,
    open_database,
)
from wordahead.store.redaction import DEFAULT_EXCLUDED_SOURCES, excluded_by, redact
from wordahead.types import KeyboardError

MAX_TEXT_BYTES = 64 * 1024  # per call; a bigger paste is split by the caller or refused
MAX_SOURCE_CHARS = 512
DEFAULT_RETENTION_DAYS = 90
RETENTION_CHECK_SECONDS = 3600.0  # the writer re-applies retention at most this often
INTERRUPTED = "the process running it stopped (killed, or the machine went down)"

TS_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"  # UTC, fixed width: string order is time order
# C0/C1 controls except tab and newline, DEL, lone surrogates (unencodable), BOM.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\ud800-\udfff\ufeff]")


class InvalidText(KeyboardError):
    """Text the typing log refuses: not text, not UTF-8, empty, or too large."""


class TextTooLarge(InvalidText):
    """More than MAX_TEXT_BYTES in one call."""


@dataclass(frozen=True)
class Recorded:
    """The outcome of one `record` call: the new row id, or why nothing was stored."""

    id: int | None
    reason: str = ""  # "paused", "private", "excluded source (*.env)" when id is None
    text: str = field(default="", repr=False)  # what was stored (redacted); "" when nothing

    @property
    def stored(self) -> bool:
        return self.id is not None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"stored": self.stored}
        if self.id is not None:
            out["id"] = self.id
        else:
            out["reason"] = self.reason
        return out


def utc_iso(ts: datetime) -> str:
    """`ts` as the log's fixed-width UTC string; naive datetimes are taken as local time."""
    return ts.astimezone(timezone.utc).strftime(TS_FORMAT)


def parse_time(value: str | datetime) -> datetime:
    """A datetime from an ISO 8601 string ("2024-05-01", "2024-05-01T12:00Z") or a datetime."""
    if isinstance(value, datetime):
        return value
    try:
        return datetime.fromisoformat(value.strip())
    except (ValueError, AttributeError) as exc:
        raise KeyboardError(
            f"not an ISO 8601 date or time: {value!r} (try 2024-05-01 or 2024-05-01T13:30)"
        ) from exc


def clean_text(text: object) -> str:
    """Validate and normalise one input: UTF-8, NFC, controls removed, newlines as `\\n`.

    Raises InvalidText (with a message a person can act on) instead of storing anything odd.
    """
    if isinstance(text, (bytes, bytearray, memoryview)):
        raw = bytes(text)
        if len(raw) > MAX_TEXT_BYTES:
            raise TextTooLarge(_too_large(len(raw)))
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidText(
                f"text is not valid UTF-8 (bad byte at offset {exc.start}); nothing was stored"
            ) from None
    if not isinstance(text, str):
        raise InvalidText(f"expected text (str or UTF-8 bytes), got {type(text).__name__}")
    if len(text) > MAX_TEXT_BYTES:  # every char is >= 1 byte: refuse before any work
        raise TextTooLarge(_too_large(len(text)))
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = unicodedata.normalize("NFC", _CONTROL.sub("", text))
    size = len(text.encode("utf-8"))
    if size > MAX_TEXT_BYTES:
        raise TextTooLarge(_too_large(size))
    if not text.strip():
        raise InvalidText("text is empty or only whitespace; nothing to store")
    return text


def _too_large(size: int) -> str:
    return (
        f"text is {size:,} bytes; the limit is {MAX_TEXT_BYTES:,} bytes per call "
        "(split it into smaller pieces)"
    )


def _clean_source(source: object) -> str:
    if source is None:
        return ""
    if not isinstance(source, str):
        raise InvalidText(f"source must be a string, got {type(source).__name__}")
    return _CONTROL.sub("", source).strip()[:MAX_SOURCE_CHARS]


def word_count(text: str) -> int:
    return len(words(text))


def join_accepted(context: str, accepted: str) -> str:
    """The text the user ended up with: `context` whose partial last word `accepted` completes."""
    prefix = partial_word(context)
    if prefix and accepted.lower().startswith(prefix.lower()):
        return context[: len(context) - len(prefix)] + accepted
    return context + accepted


def _forget_filter(
    since: str | datetime | None, until: str | datetime | None, source: str | None, everything: bool
) -> tuple[str, list[Any]]:
    """The SQL condition (empty: every entry) and its parameters for what `forget` names."""
    if everything:
        return "", []
    if since is None and until is None and not source:
        raise KeyboardError(
            "say what to forget: a time range (since/until), a source, or everything"
        )
    where: list[str] = []
    params: list[Any] = []
    if since is not None:
        where.append("ts >= ?")
        params.append(utc_iso(parse_time(since)))
    if until is not None:
        where.append("ts < ?")
        params.append(utc_iso(parse_time(until)))
    if source:
        where.append("source GLOB ?" if any(c in source for c in "*?[") else "source = ?")
        params.append(source)
    return " AND ".join(where), params


class TypingLog:
    """The user's typed text, redacted, in a private SQLite file (WAL; one writer, many readers).

    One instance may be shared by threads (calls are serialised by `lock`). Other processes
    open their own instance: the daemon writes, the trainer reads and records its jobs
    (wordahead.learn.job_log), the CLI pauses and forgets.
    """

    def __init__(self, path: Path | str) -> None:
        """Open (or create) the log at `path`: a home's `Home.typing_log`."""
        self.path = Path(path)
        self.lock = threading.RLock()
        self._retention_checked = -math.inf
        self.db = open_database(self.path)

    # --- lifecycle ------------------------------------------------------------------------
    def close(self) -> None:
        with self.lock:
            self.db.close()

    def __enter__(self) -> TypingLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def schema_version(self) -> int:
        with self.lock:
            return int(self.db.execute("PRAGMA user_version").fetchone()[0])

    # --- settings -------------------------------------------------------------------------
    @guarded
    def _settings(self) -> dict[str, Any]:
        return {r["key"]: json.loads(r["value"]) for r in self.db.query("SELECT * FROM settings")}

    @guarded
    def _set(self, key: str, value: Any) -> None:
        with self.lock, self.db.atomic():
            self.db.table("settings").upsert({"key": key, "value": json.dumps(value)}, pk="key")

    @guarded
    def _get(self, key: str, default: Any) -> Any:
        with self.lock:
            row = self.db.execute("SELECT value FROM settings WHERE key = ?", [key]).fetchone()
        return default if row is None else json.loads(row[0])

    @property
    def paused(self) -> bool:
        return bool(self._get("paused", False))

    def pause(self) -> None:
        """Stop storing text (every process sees it: the flag lives in the database)."""
        self._set("paused", True)

    def resume(self) -> None:
        self._set("paused", False)

    @property
    def excluded_sources(self) -> list[str]:
        return list(self._get("excluded_sources", list(DEFAULT_EXCLUDED_SOURCES)))

    def set_excluded_sources(self, patterns: Iterable[str]) -> None:
        cleaned = [p.strip() for p in patterns if isinstance(p, str) and p.strip()]
        self._set("excluded_sources", cleaned)

    @property
    def retention_days(self) -> int:
        return int(self._get("retention_days", DEFAULT_RETENTION_DAYS))

    def set_retention_days(self, days: int) -> None:
        if not isinstance(days, int) or days < 1:
            raise KeyboardError(f"retention must be a whole number of days >= 1, got {days!r}")
        self._set("retention_days", days)

    @property
    def watermark(self) -> int:
        """The highest entry id a successful personalization job has consumed."""
        return int(self._get("watermark", 0))

    def set_watermark(self, entry_id: int) -> None:
        if not isinstance(entry_id, int) or entry_id < 0:
            raise KeyboardError(f"watermark must be an entry id >= 0, got {entry_id!r}")
        self._set("watermark", entry_id)

    @property
    def forgets(self) -> int:
        """How many `forget` calls have deleted text: a job reads it with its text, and
        promotes only if it is unchanged (`no_forget_meanwhile`)."""
        return int(self._get("forgets", 0))

    @contextlib.contextmanager
    def no_forget_meanwhile(self, forgets: int) -> Iterator[bool]:
        """Hold the log's write lock for a step that must not interleave with a forget (a job
        promoting what it learned), and yield whether no forget deleted text since `forgets`
        was read. A forget asked meanwhile waits for the step (up to the busy timeout), then
        runs, and so still finds whatever the step stored."""
        with self.lock:
            try:
                self.db.execute("BEGIN IMMEDIATE")
                unchanged = self.forgets == forgets
            except sqlite3.Error as exc:
                raise TypingLogError(describe_database_error(exc, self.path)) from exc
            try:
                yield unchanged
            finally:
                with contextlib.suppress(sqlite3.Error):
                    self.db.execute("ROLLBACK")  # nothing was written under it

    # --- writing --------------------------------------------------------------------------
    @guarded
    def record(
        self,
        text: str | bytes,
        source: str = "",
        private: bool = False,
        ts: datetime | None = None,
        *,
        accepted: str | None = None,
    ) -> Recorded:
        """Store `text` (redacted) unless paused, private or from an excluded source.

        Bad input raises InvalidText before anything is written; a stored row is complete
        and on disk when this returns.
        """
        if ts is not None and not isinstance(ts, datetime):
            raise InvalidText(f"ts must be a datetime, got {type(ts).__name__}")
        source = _clean_source(source)
        if private:
            return Recorded(None, "private")  # dropped before even looking at the text
        clean = clean_text(text)
        stamp = utc_iso(ts or datetime.now(timezone.utc))
        with self.lock:
            settings = self._settings()
            if settings.get("paused", False):
                return Recorded(None, "paused")
            patterns = settings.get("excluded_sources", DEFAULT_EXCLUDED_SOURCES)
            pattern = excluded_by(source, patterns)
            if pattern is not None:
                return Recorded(None, f"excluded source ({pattern})")
            self._retention_if_due(settings)
            stored = redact(clean)
            row = {
                "ts": stamp,
                "source": source,
                "kind": "typed" if accepted is None else "accepted",
                "text": stored,
                "words": word_count(stored),
                "accepted": None if accepted is None else redact(accepted),
            }
            with self.db.atomic():
                table = self.db.table("entries")
                table.insert(row)
                rowid = table.last_rowid
            assert rowid is not None
            return Recorded(int(rowid), text=stored)

    def add_feedback(
        self, context: str, accepted: str, source: str = "", ts: datetime | None = None
    ) -> int | None:
        """Store a suggestion the user accepted, as the text it produced (redacted like any
        entry). None when logging is paused or the source is excluded."""
        context = "" if context is None else context
        if not isinstance(context, str) or not isinstance(accepted, str):
            raise InvalidText("context and accepted must be strings")
        word = clean_text(accepted).strip()
        tail = context[-MAX_TEXT_BYTES // 4 :]  # keep the end: that is what predicted the word
        tail = _CONTROL.sub("", tail)
        return self.record(join_accepted(tail, word), source=source, ts=ts, accepted=word).id

    # --- deleting -------------------------------------------------------------------------
    @guarded
    def forget(
        self,
        since: str | datetime | None = None,
        until: str | datetime | None = None,
        source: str | None = None,
        everything: bool = False,
    ) -> int:
        """Delete entries in [since, until) and/or from `source` (a glob when it has * ? [),
        or all of them; then VACUUM and truncate the WAL so the text is gone from the files.
        Returns the number of entries deleted."""
        where, params = _forget_filter(since, until, source, everything)
        sql = "DELETE FROM entries" + (" WHERE " + where if where else "")
        with self.lock:
            with self.db.atomic():
                deleted = self.db.execute(sql, params).rowcount
                if deleted:  # a job that read the deleted text must not promote it
                    self._set("forgets", self.forgets + 1)
            self._scrub()
        return int(deleted)

    @guarded
    def apply_retention(self, days: int | None = None) -> int:
        """Delete entries older than `days` (default: the retention setting, 90)."""
        with self.lock:
            days = self.retention_days if days is None else days
            cutoff = utc_iso(datetime.now(timezone.utc) - timedelta(days=days))
            with self.db.atomic():
                deleted = self.db.execute("DELETE FROM entries WHERE ts < ?", [cutoff]).rowcount
            self._retention_checked = time.monotonic()
            if deleted:
                self._scrub()
        return int(deleted)

    def _retention_if_due(self, settings: dict[str, Any]) -> None:
        if time.monotonic() - self._retention_checked >= RETENTION_CHECK_SECONDS:
            self.apply_retention(int(settings.get("retention_days", DEFAULT_RETENTION_DAYS)))

    def _scrub(self) -> None:
        """Rewrite the file without deleted rows and empty the WAL, which still holds old
        page images. Readers mid-transaction delay the truncation; the busy timeout waits."""
        self.db.vacuum()
        for _ in range(5):
            busy = self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
            if not busy:
                return
            time.sleep(0.2)
        raise KeyboardError(
            "the entries were deleted, but another process kept the database busy, so old "
            "copies may remain in the write-ahead log until it closes; run forget again"
        )

    # --- reading --------------------------------------------------------------------------
    @guarded
    def stats(self) -> dict[str, Any]:
        """Counts and sizes for a person to inspect: nothing here contains the text itself."""
        with self.lock:
            total = next(
                self.db.query(
                    "SELECT count(*) AS entries, coalesce(sum(words), 0) AS words, "
                    "sum(kind = 'accepted') AS accepted, min(ts) AS oldest, max(ts) AS newest "
                    "FROM entries"
                )
            )
            by_source = {
                r["source"]: {"entries": r["n"], "words": r["w"]}
                for r in self.db.query(
                    "SELECT source, count(*) AS n, coalesce(sum(words), 0) AS w FROM entries "
                    "GROUP BY source ORDER BY n DESC"
                )
            }
            settings = self._settings()
        size = sum(p.stat().st_size for p in (self.path, Path(f"{self.path}-wal")) if p.exists())
        return {
            "path": str(self.path),
            "entries": total["entries"],
            "words": total["words"],
            "accepted": total["accepted"] or 0,
            "oldest": total["oldest"],
            "newest": total["newest"],
            "by_source": by_source,
            "db_bytes": size,
            "paused": bool(settings.get("paused", False)),
            "retention_days": int(settings.get("retention_days", DEFAULT_RETENTION_DAYS)),
            "excluded_sources": list(settings.get("excluded_sources", DEFAULT_EXCLUDED_SOURCES)),
            "watermark": int(settings.get("watermark", 0)),
        }

    @guarded
    def recent(self, limit: int = 20) -> list[dict[str, Any]]:
        """The newest entries, newest first, as stored (what the user can inspect)."""
        with self.lock:
            return list(
                self.db.query(
                    "SELECT id, ts, source, kind, words, text FROM entries "
                    "ORDER BY id DESC LIMIT ?",
                    [limit],
                )
            )

    def iter_text(self, after: int = 0) -> Iterator[tuple[int, str, int]]:
        """(id, text, words) of entries with id > `after`, oldest first, fetched in pages."""
        for entry_id, _, text, count in self.iter_entries(after):
            yield entry_id, text, count

    @guarded
    def iter_entries(self, after: int = 0) -> Iterator[tuple[int, str, str, int]]:
        """(id, source, text, words) of entries with id > `after`, oldest first, in pages."""
        last = after
        while True:
            with self.lock:
                page = self.db.execute(
                    "SELECT id, source, text, words FROM entries WHERE id > ? ORDER BY id LIMIT 500",
                    [last],
                ).fetchall()
            if not page:
                return
            yield from page
            last = page[-1][0]
