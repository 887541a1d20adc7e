"""The typing log's SQLite file: its schema and migrations, a private file from the first byte,
the pragmas that make an acknowledged write durable, and the messages a person can act on when
the database fails (a full disk, damage, a lock held elsewhere)."""

from __future__ import annotations

import errno
import functools
import inspect
import os
import sqlite3
from pathlib import Path
from typing import Any

import sqlite_utils

from wordahead import paths
from wordahead.types import KeyboardError

BUSY_TIMEOUT_MS = 10_000


class TypingLogError(KeyboardError):
    """The database failed: a full disk, an I/O error, damage, a lock held elsewhere. The
    message says which, and what to do; it advises moving the file only when it is damaged."""


# --- schema ---------------------------------------------------------------------------------
# Migration N takes the database from user_version N-1 to N. Append, never edit a shipped one.
_MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE entries (
        id INTEGER PRIMARY KEY AUTOINCREMENT,  -- AUTOINCREMENT: ids never reused after forget,
        ts TEXT NOT NULL,                      -- so a watermark never skips new text
        source TEXT NOT NULL DEFAULT '',
        kind TEXT NOT NULL DEFAULT 'typed' CHECK (kind IN ('typed', 'accepted')),
        text TEXT NOT NULL,
        words INTEGER NOT NULL,
        accepted TEXT                          -- the accepted suggestion, for kind 'accepted'
    );
    CREATE INDEX entries_ts ON entries(ts);
    CREATE INDEX entries_source ON entries(source);
    CREATE TABLE jobs (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        started TEXT NOT NULL,
        ended TEXT,
        status TEXT NOT NULL,
        metrics TEXT NOT NULL DEFAULT '{}',
        adapter_version TEXT,
        reason TEXT NOT NULL DEFAULT '',
        watermark INTEGER,
        pid INTEGER
    );
    CREATE INDEX jobs_started ON jobs(started);
    CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    """,
)
SCHEMA_VERSION = len(_MIGRATIONS)


def _create_private_file(path: Path) -> None:
    """Create `path` 0600 from the first byte (O_EXCL: never follow or reuse someone's file)."""
    if not path.parent.exists():  # an existing directory is the caller's choice
        paths.private_dir(path.parent)  # (a home is made 0700 by paths.Home.at)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        pass
    else:
        os.close(fd)
    for p in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
        try:
            if p.stat().st_mode & 0o077:
                os.chmod(p, 0o600)
        except FileNotFoundError:
            pass


FULL_DISK_BYTES = 1 << 20  # below this much free space, an I/O error is a full disk
_DAMAGED = {"SQLITE_CORRUPT", "SQLITE_NOTADB", "SQLITE_CORRUPT_INDEX", "SQLITE_CORRUPT_SEQUENCE"}
_LOCKED = ("SQLITE_BUSY", "SQLITE_LOCKED")
_NO_ACCESS = ("SQLITE_READONLY", "SQLITE_CANTOPEN", "SQLITE_PERM", "SQLITE_AUTH")


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def _human(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def full_disk_message(path: Path) -> str | None:
    """What to tell a person when `path`'s disk has (almost) no space left: how much is free
    and keyboard's own files in that directory, largest first; None when there is room."""
    directory = path if path.is_dir() else path.parent
    try:
        st = os.statvfs(directory)
    except OSError:
        return None
    free = st.f_bavail * st.f_frsize
    if free >= FULL_DISK_BYTES:
        return None
    own: list[tuple[int, str]] = []
    try:
        for entry in directory.iterdir():
            try:
                own.append((_size(entry), entry.name))
            except OSError:
                continue
    except OSError:
        pass
    own.sort(reverse=True)
    listed = ", ".join(f"{name} {_human(size)}" for size, name in own[:5] if size)
    return (
        f"the disk holding {directory} is full ({_human(free)} free). The typing log is "
        "intact: free some space on that disk, then retry"
        + (
            f" (keyboard's largest files there: {listed}; daemon.log and old adapter "
            "versions can go, typing_log.db holds your text)"
            if listed
            else ""
        )
    )


def describe_database_error(exc: BaseException, path: Path) -> str:
    """A message a person can act on for a failure of the SQLite file at `path`. SQLite reports
    a full disk as SQLITE_FULL or, when the shared-memory file cannot grow, as a plain
    "disk I/O error": the free space decides."""
    name = str(getattr(exc, "sqlite_errorname", "") or "")
    io_error = name.startswith("SQLITE_IOERR") or isinstance(exc, OSError)
    if name == "SQLITE_FULL" or getattr(exc, "errno", None) == errno.ENOSPC or io_error:
        full = full_disk_message(path)
        if full or not io_error:
            return f"the typing log {path} cannot be written: " + (
                full or "the disk is full. The typing log is intact: free some space, then retry"
            )
    if name in _DAMAGED or "malformed" in str(exc) or "not a database" in str(exc):
        return (
            f"{path} is damaged ({exc}). Keep a copy of it; `sqlite3 {path} .recover` may "
            "save its text. To start afresh, move it away (keyboard then creates a new one)"
        )
    if name.startswith(_LOCKED):
        return f"the typing log {path} is locked by another process ({exc}); close it and retry"
    if name.startswith(_NO_ACCESS) or isinstance(exc, PermissionError):
        return f"cannot open or write the typing log {path} ({exc}): check its owner and mode"
    if io_error:
        return (
            f"reading or writing the typing log {path} failed ({exc}): an I/O error of the "
            "disk or file system. The file was left as it is"
        )
    return f"the typing log {path} failed: {exc}"


def guarded(method: Any) -> Any:
    """Database failures of a TypingLog method become TypingLogError with a clear message."""
    if inspect.isgeneratorfunction(method):

        @functools.wraps(method)
        def generator(self: Any, *args: Any, **kwargs: Any) -> Any:
            try:
                yield from method(self, *args, **kwargs)
            except (sqlite3.Error, OSError) as exc:
                raise TypingLogError(describe_database_error(exc, self.path)) from exc

        return generator

    @functools.wraps(method)
    def call(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except (sqlite3.Error, OSError) as exc:
            raise TypingLogError(describe_database_error(exc, self.path)) from exc

    return call


def open_database(path: Path) -> sqlite_utils.Database:
    """The typing log's database at `path`: created 0600, configured, migrated to this
    version's schema."""
    try:
        _create_private_file(path)
        conn = sqlite3.connect(str(path), timeout=BUSY_TIMEOUT_MS / 1000, check_same_thread=False)
    except (sqlite3.Error, OSError) as exc:
        raise TypingLogError(describe_database_error(exc, path)) from exc
    try:
        db = sqlite_utils.Database(conn, execute_plugins=False)
        _configure(db)
        _migrate(db, path)
    except (sqlite3.Error, OSError) as exc:
        conn.close()
        raise TypingLogError(describe_database_error(exc, path)) from exc
    except BaseException:
        conn.close()
        raise
    return db


def _configure(db: sqlite_utils.Database) -> None:
    db.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    db.enable_wal()
    # FULL: every commit fsyncs the WAL before `record` returns. NORMAL+WAL would already
    # survive kill -9 (the written WAL pages live in the OS page cache), but not a power
    # cut or kernel crash; text arrives at typing speed, so one fsync per call is cheap
    # and "acknowledged" can mean "on disk".
    db.execute("PRAGMA synchronous=FULL")
    # Deleted text is overwritten with zeros, not just unlinked from the b-tree.
    db.execute("PRAGMA secure_delete=ON")
    # VACUUM and sorts stay in memory: no temporary copy of the text in /tmp.
    db.execute("PRAGMA temp_store=MEMORY")
    db.execute("PRAGMA foreign_keys=ON")


def _migrate(db: sqlite_utils.Database, path: Path) -> None:
    version = db.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise KeyboardError(
            f"the typing log {path} has schema version {version}, newer than this "
            f"keyboard understands ({SCHEMA_VERSION}); upgrade keyboard"
        )
    if version == SCHEMA_VERSION:
        return
    # IMMEDIATE: two processes opening a fresh log at once must not both migrate.
    db.execute("BEGIN IMMEDIATE")
    try:
        version = db.execute("PRAGMA user_version").fetchone()[0]
        for number in range(version + 1, SCHEMA_VERSION + 1):
            db.executescript(_MIGRATIONS[number - 1])
            db.execute(f"PRAGMA user_version={number}")
        db.execute("COMMIT")
    except BaseException:
        db.rollback()
        raise
