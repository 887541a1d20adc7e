"""The typing log: schema, durability under kill -9, privacy (permissions, redaction, forget),
bad input, concurrency, training reads, jobs and the CLI."""

from __future__ import annotations

import io
import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from wordahead import cli
from wordahead.learn.job_log import JobLog
from wordahead.paths import Home
from wordahead.store.database import SCHEMA_VERSION
from wordahead.store.redaction import REDACTED
from wordahead.store.typing_log import (
    MAX_TEXT_BYTES,
    InvalidText,
    TextTooLarge,
    TypingLog,
)
from wordahead.types import KeyboardError

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def log(tmp_path: Path):
    with TypingLog(tmp_path / "log.db") as opened:
        yield opened


def _texts(path: Path) -> list[str]:
    with sqlite3.connect(path) as conn:
        return [r[0] for r in conn.execute("SELECT text FROM entries ORDER BY id")]


def _raw_bytes(directory: Path) -> bytes:
    """Every byte of every file next to the database (db, -wal, -shm, anything else)."""
    return b"".join(p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file())


def _child(script: str, *args: str, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(script), *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


# --- schema and setup -----------------------------------------------------------------------
def test_schema_version_tables_and_indexes(log: TypingLog) -> None:
    assert log.schema_version == SCHEMA_VERSION >= 1
    assert {"entries", "jobs", "settings"} <= set(log.db.table_names())
    indexes = {i.name for i in log.db["entries"].indexes}
    assert {"entries_ts", "entries_source"} <= indexes
    assert log.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert log.db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert log.db.execute("PRAGMA secure_delete").fetchone()[0] == 1


def test_reopening_keeps_data_and_a_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "log.db"
    with TypingLog(path) as log:
        entry = log.record("kept across opens").id
    with TypingLog(path) as log:
        assert log.recent(1)[0]["id"] == entry
        log.db.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    with pytest.raises(KeyboardError, match="newer"):
        TypingLog(path)


def test_not_a_database_gives_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "log.db"
    path.write_bytes(b"this is not sqlite" * 100)
    os.chmod(path, 0o600)
    with pytest.raises(KeyboardError, match="is damaged .*move it away"):
        TypingLog(path)


def test_home_and_permissions_from_the_first_byte(tmp_path: Path, monkeypatch) -> None:
    home = tmp_path / "home"
    monkeypatch.setenv("KEYBOARD_HOME", str(home))
    old = os.umask(0)  # the most permissive umask: nothing may rely on it
    try:
        with TypingLog(Home.from_env().typing_log) as log:
            assert log.path == home / "typing_log.db"
            log.record("private words")
            for p in (log.path, Path(f"{log.path}-wal"), Path(f"{log.path}-shm")):
                assert p.exists()
                assert os.stat(p).st_mode & 0o777 == 0o600, p
        assert os.stat(home).st_mode & 0o777 == 0o700
        # An explicit path in a missing directory: created 0700 too.
        with TypingLog(tmp_path / "new" / "dir" / "log.db") as log:
            log.record("more")
        assert os.stat(tmp_path / "new" / "dir").st_mode & 0o777 == 0o700
        assert os.stat(tmp_path / "new" / "dir" / "log.db").st_mode & 0o777 == 0o600
    finally:
        os.umask(old)


def test_loose_permissions_on_an_existing_file_are_tightened(tmp_path: Path) -> None:
    path = tmp_path / "log.db"
    TypingLog(path).close()
    os.chmod(path, 0o644)
    TypingLog(path).close()
    assert os.stat(path).st_mode & 0o777 == 0o600


# --- durability and concurrency ---------------------------------------------------------------
WRITER = """
    import sys
    from wordahead.store.typing_log import TypingLog
    log = TypingLog(sys.argv[1])
    limit = int(sys.argv[2])
    i = 0
    while limit < 0 or i < limit:
        entry = log.record(f"acknowledged sentence number {i}", source="kill-test").id
        print(entry, i, flush=True)  # the acknowledgement: only after add() returned
        i += 1
"""


def test_sigkill_loses_no_acknowledged_entry(tmp_path: Path) -> None:
    path = tmp_path / "log.db"
    child = _child(WRITER, str(path), "-1")
    acked: dict[int, int] = {}
    assert child.stdout is not None
    try:
        while len(acked) < 40:
            line = child.stdout.readline()
            assert line, child.stderr.read() if child.stderr else "writer died"
            entry, i = map(int, line.split())
            acked[entry] = i
    finally:
        os.kill(child.pid, signal.SIGKILL)  # mid-write, most likely
        child.wait()
    assert child.returncode == -signal.SIGKILL
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        rows = dict(conn.execute("SELECT id, text FROM entries"))
    for entry, i in acked.items():
        assert rows[entry] == f"acknowledged sentence number {i}"
    # No half-written rows: everything present is a complete sentence.
    assert all(t.startswith("acknowledged sentence number ") for t in rows.values())
    with TypingLog(path) as log:  # and the log opens and writes normally afterwards
        assert log.record("after the crash").id is not None


def test_concurrent_writer_process_and_reader(tmp_path: Path) -> None:
    path = tmp_path / "log.db"
    TypingLog(path).close()
    # A reader holding an open snapshot must not block the writer (WAL).
    snapshot = sqlite3.connect(path)
    snapshot.execute("BEGIN")
    assert snapshot.execute("SELECT count(*) FROM entries").fetchone()[0] == 0
    writer = _child(WRITER, str(path), "150")
    seen: list[int] = []
    with TypingLog(path) as reader:
        while writer.poll() is None:
            seen.append(reader.stats()["entries"])
            JobLog(reader).training_text()
            time.sleep(0.005)
        _, err = writer.communicate()
        assert writer.returncode == 0, err
        assert reader.stats()["entries"] == 150
    # The old snapshot still sees the database as it was when it started.
    assert snapshot.execute("SELECT count(*) FROM entries").fetchone()[0] == 0
    snapshot.close()
    assert seen and seen == sorted(seen)  # counts only grow, never a torn read


def test_threads_share_one_log(log: TypingLog) -> None:
    with ThreadPoolExecutor(max_workers=8) as pool:
        ids = list(pool.map(lambda i: log.record(f"thread text {i}", source="t").id, range(80)))
    assert len(set(ids)) == 80
    assert log.stats()["entries"] == 80


# --- privacy ------------------------------------------------------------------------------------
def test_text_is_redacted_before_it_is_stored(log: TypingLog) -> None:
    log.record("my password: hunter2 and card 4111 1111 1111 1111")
    log.add_feedback("the key is sk_live_4eC39HqLyjWDarjtT1zdp7dc and the wea", "weather")
    texts = _texts(log.path)
    assert texts == [
        f"my password: {REDACTED} and card {REDACTED}",
        f"the key is {REDACTED} and the weather",
    ]
    raw = _raw_bytes(log.path.parent)
    assert b"hunter2" not in raw and b"4eC39HqLyjWDarjtT1zdp7dc" not in raw


def test_excluded_sources_private_flag_and_pause(tmp_path: Path) -> None:
    path = tmp_path / "log.db"
    with TypingLog(path) as log, TypingLog(path) as other_process:
        assert log.record("API_TOKEN stuff", source="/app/.env").reason == "excluded source (*.env)"
        assert log.record("x", source=os.path.expanduser("~/.ssh/config")).id is None
        assert log.record("my diary", source="notes/secret-diary.md").id is None
        assert log.record("hidden", private=True).to_json() == {
            "stored": False,
            "reason": "private",
        }
        log.set_excluded_sources(["*.docx"])
        assert log.record("now allowed", source="/app/.env").id is not None
        assert log.record("report", source="/w/Report.DOCX").id is None
        # Pausing is visible to every process that has the log open.
        other_process.pause()
        assert log.paused
        assert log.record("while paused").to_json() == {"stored": False, "reason": "paused"}
        assert log.add_feedback("while paused ", "too") is None
        other_process.resume()
        result = log.record("after resume")
        assert result.to_json() == {"stored": True, "id": result.id}
    assert _texts(path) == ["now allowed", "after resume"]
    raw = _raw_bytes(tmp_path)
    for never in (b"my diary", b"hidden", b"while paused", b"report"):
        assert never not in raw


def test_retention_deletes_old_entries(log: TypingLog) -> None:
    now = datetime.now(timezone.utc)
    log.record("ancient history", ts=now - timedelta(days=120))
    log.record("last month", ts=now - timedelta(days=30))
    log.record("today")
    assert log.retention_days == 90
    assert log.apply_retention() == 1
    assert _texts(log.path) == ["last month", "today"]
    log.set_retention_days(7)
    assert log.apply_retention() == 1
    assert _texts(log.path) == ["today"]
    with pytest.raises(KeyboardError):
        log.set_retention_days(0)


def test_the_writer_applies_retention_by_itself(tmp_path: Path) -> None:
    path = tmp_path / "log.db"
    with TypingLog(path) as log:
        log.record("too old to keep", ts=datetime.now(timezone.utc) - timedelta(days=91))
    with TypingLog(path) as daemon:  # a fresh writer checks retention on its first write
        daemon.record("fresh")
    assert _texts(path) == ["fresh"]


SENTENCE = "the quokka borrowed my umbrella on a sunday"


def _fill(log: TypingLog, marker_source: str = "diary.md") -> None:
    base = datetime(2024, 5, 1, tzinfo=timezone.utc)
    for i in range(60):
        log.record(f"ordinary line {i} about nothing much", source="code.py", ts=base)
    for i in range(3):
        log.record(f"{SENTENCE} {i}", source=marker_source, ts=base + timedelta(days=1, hours=i))
    log.record("later text", source="code.py", ts=base + timedelta(days=5))


@pytest.mark.parametrize(
    "how",
    [
        {"source": "diary.md"},
        {"source": "dia*"},
        {"since": "2024-05-02", "until": "2024-05-03"},
        {"since": datetime(2024, 5, 2, tzinfo=timezone.utc)},
        {"everything": True},
    ],
)
def test_forget_leaves_no_trace_in_the_raw_bytes(tmp_path: Path, how: dict) -> None:
    path = tmp_path / "log.db"
    with TypingLog(path) as log, TypingLog(path) as idle_reader:
        _fill(log)
        idle_reader.stats()
        assert SENTENCE.encode() in _raw_bytes(tmp_path)
        deleted = log.forget(**how)
        assert deleted >= 3
        # The daemon's connection (and a reader's) are still open: the files must be clean now.
        assert SENTENCE.encode() not in _raw_bytes(tmp_path)
        remaining = _texts(path)
        assert not any(SENTENCE in t for t in remaining)
        if not how.get("everything"):
            assert "later text" in remaining or "since" in how
            assert "ordinary line 0 about nothing much" in remaining
        assert log.db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert SENTENCE.encode() not in _raw_bytes(tmp_path)


def test_forget_needs_a_criterion_and_rejects_bad_dates(log: TypingLog) -> None:
    with pytest.raises(KeyboardError, match="say what to forget"):
        log.forget()
    with pytest.raises(KeyboardError, match="ISO 8601"):
        log.forget(since="last tuesday")


# --- bad input --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (None, "expected text"),
        (42, "expected text"),
        (["a list"], "expected text"),
        (b"caf\xe9 au lait", "not valid UTF-8"),
        ("", "empty"),
        ("   \n\t  ", "empty"),
        ("\x00\x01\x02", "empty"),
        ("x" * (MAX_TEXT_BYTES + 1), "limit"),
        ("é" * (MAX_TEXT_BYTES // 2 + 1), "limit"),  # small in chars, too big in bytes
        (b"y" * (MAX_TEXT_BYTES + 1), "limit"),
    ],
)
def test_bad_input_is_refused_clearly_and_stores_nothing(log: TypingLog, bad, message) -> None:
    log.record("before")
    with pytest.raises(InvalidText, match=message):
        log.record(bad)
    assert log.stats()["entries"] == 1


def test_bad_source_or_timestamp_is_refused(log: TypingLog) -> None:
    with pytest.raises(InvalidText):
        log.record("text", source=123)  # type: ignore[arg-type]
    with pytest.raises(InvalidText):
        log.record("text", ts="yesterday")  # type: ignore[arg-type]
    with pytest.raises(TextTooLarge):
        log.record("z" * (MAX_TEXT_BYTES + 10))
    assert log.stats()["entries"] == 0


def test_odd_text_is_normalised(log: TypingLog) -> None:
    log.record("a\x00b\r\nc\rd\x1b[0m\ufeff")
    log.record("bad surrogate \ud800 gone")
    log.record("cafe\u0301".encode())  # decomposed é -> NFC
    log.record(b"max " + b"m" * (MAX_TEXT_BYTES - 4))  # exactly at the limit is fine
    texts = _texts(log.path)
    assert texts[:3] == ["ab\nc\nd[0m", "bad surrogate  gone", "caf\u00e9"]
    assert len(texts[3]) == MAX_TEXT_BYTES


def test_word_counts_and_stats(log: TypingLog) -> None:
    log.record("one two three", source="a.md", ts=datetime(2024, 1, 1, tzinfo=timezone.utc))
    log.record("don't stop", source="a.md")
    log.add_feedback("see you tomor", "tomorrow", source="chat")
    s = log.stats()
    assert s["entries"] == 3 and s["words"] == 3 + 2 + 3 and s["accepted"] == 1
    assert s["oldest"].startswith("2024-01-01T00:00:00")
    assert s["by_source"] == {
        "a.md": {"entries": 2, "words": 5},
        "chat": {"entries": 1, "words": 3},
    }
    assert s["db_bytes"] > 0 and s["paused"] is False and s["retention_days"] == 90
    assert log.recent(1)[0]["text"] == "see you tomorrow"


# --- training reads and jobs ----------------------------------------------------------------
def test_training_text_watermark_holdout_and_replay(log: TypingLog) -> None:
    assert JobLog(log).training_text().empty
    first = [log.record(f"first batch sentence {i} has six words").id for i in range(20)]
    tt = JobLog(log).training_text(holdout_fraction=0.1)
    assert tt.watermark == first[-1]
    assert tt.replay == []  # nothing consumed yet
    assert len(tt.heldout) == 2  # the newest 10% of the words
    assert tt.heldout == [
        "first batch sentence 18 has six words",
        "first batch sentence 19 has six words",
    ]
    assert tt.new[0] == "first batch sentence 0 has six words" and len(tt.new) == 18
    assert tt.new_words == 18 * 7
    # Nothing is consumed until the job says it succeeded.
    assert JobLog(log).training_text().watermark == first[-1] and log.watermark == 0
    log.set_watermark(tt.watermark)
    assert JobLog(log).training_text().empty

    for i in range(10):
        log.record(f"second batch {i}")
    tt2 = JobLog(log).training_text(replay_fraction=0.5, holdout_fraction=0.1, seed=3)
    assert len(tt2.new) == 9 and tt2.heldout == ["second batch 9"]
    assert len(tt2.replay) == round(0.5 * 9)
    assert all(t.startswith("first batch") for t in tt2.replay)
    assert tt2.replay == JobLog(log).training_text(replay_fraction=0.5, seed=3).replay  # seeded
    # A word budget takes the newest new text (it predicts what comes next best); the older new
    # text is consumed all the same (the watermark moves to the end) and joins the replay pool.
    capped = JobLog(log).training_text(max_new_words=9, holdout_fraction=0.0)
    assert capped.new == ["second batch 7", "second batch 8", "second batch 9"]
    assert capped.watermark == first[-1] + 10 and capped.passed_words == 7 * 3
    pool = JobLog(log).training_text(max_new_words=9, holdout_fraction=0.0, replay_fraction=100)
    assert len(pool.replay) == len(first) + 7  # every older entry: the first batch, the passed
    assert {t for t in pool.replay if t.startswith("second")} == {
        f"second batch {i}" for i in range(7)
    }
    one = JobLog(log).training_text(max_new_words=1, holdout_fraction=0.0)
    assert one.new == ["second batch 9"]  # one entry at least, even over the budget


def test_forgotten_text_never_reaches_training(log: TypingLog) -> None:
    log.record("keep this", source="a")
    log.record("forget this", source="b")
    log.forget(source="b")
    log.record("new after forget", source="a")
    tt = JobLog(log).training_text(holdout_fraction=0.0)
    assert tt.new == ["keep this", "new after forget"]


def test_jobs_are_recorded(log: TypingLog) -> None:
    assert JobLog(log).last() is None
    job = JobLog(log).start(watermark=5)
    assert JobLog(log).last()["status"] == "running"
    JobLog(log).finish(job, "succeeded", {"loss": 2.5, "top1": 0.3}, "v0001", reason="better")
    last = JobLog(log).last()
    assert last["id"] == job and last["status"] == "succeeded"
    assert last["metrics"] == {"loss": 2.5, "top1": 0.3} and last["adapter_version"] == "v0001"
    assert last["ended"] >= last["started"] and last["watermark"] == 5
    failed = JobLog(log).start()
    JobLog(log).finish(failed, "failed", {}, None, reason="out of memory")
    assert [j["status"] for j in JobLog(log).recent()] == ["failed", "succeeded"]
    with pytest.raises(KeyboardError):
        JobLog(log).finish(999, "succeeded", {}, None)


def test_a_job_left_running_by_a_dead_process_is_marked_interrupted(log: TypingLog) -> None:
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    job = JobLog(log).start()
    log.db.execute("UPDATE jobs SET pid = ? WHERE id = ?", [int(dead.stdout), job])
    JobLog(log).start()
    assert JobLog(log).recent()[1]["status"] == "interrupted"


# --- CLI ----------------------------------------------------------------------------------------
def test_cli_log_stats_pause_forget(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("KEYBOARD_HOME", str(tmp_path))
    assert cli.main(["log", "hello from the cli, password: hunter2", "--source", "notes.md"]) == 0
    assert "stored entry 1" in capsys.readouterr().out
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"piped text\n")))
    assert cli.main(["log"]) == 0
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"\xff\xfe bad")))
    assert cli.main(["log", "-"]) == 1
    assert "not valid UTF-8" in capsys.readouterr().err
    assert cli.main(["log", "x", "--source", "prod.env"]) == 0
    assert "not stored: excluded source" in capsys.readouterr().out

    assert cli.main(["pause"]) == 0
    assert cli.main(["log", "while paused"]) == 0
    assert "not stored: paused" in capsys.readouterr().out
    assert cli.main(["resume"]) == 0
    assert "logging resumed" in capsys.readouterr().out

    assert cli.main(["stats", "--json", "--show", "5"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["entries"] == 2 and stats["by_source"]["notes.md"]["entries"] == 1
    assert [e["text"] for e in stats["recent"]] == [
        "piped text\n",
        f"hello from the cli, password: {REDACTED}",
    ]
    assert cli.main(["stats"]) == 0
    assert "entries     2" in capsys.readouterr().out

    assert cli.main(["forget"]) == 1
    assert "say what to forget" in capsys.readouterr().err
    assert cli.main(["forget", "--source", "notes.md"]) == 0
    assert "forgot 1 entry" in capsys.readouterr().out
    assert cli.main(["privacy", "--exclude", "*.txt", "--retention-days", "30"]) == 0
    out = capsys.readouterr().out
    assert "*.txt" in out and "30 days" in out
    assert cli.main(["forget", "--all"]) == 0
    assert "forgot 1 entry" in capsys.readouterr().out
    assert cli.main(["stats", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["entries"] == 0


# --- failures that must tell the truth and lose nothing ------------------------------------------
def test_a_full_disk_is_named_and_nothing_advises_moving_the_log(monkeypatch) -> None:
    """Failure 2: on a full disk, an intact database was called "not a usable typing log ...
    move it away to start afresh". A real tmpfs where the runner may mount one (root)."""
    from tests.full_disk import fill, small_disk
    from wordahead.store.database import TypingLogError

    with small_disk() as disk:
        if disk is None:  # simulated ENOSPC: SQLite's report of a full disk, and statvfs's
            pytest.skip("cannot mount a tmpfs here; test_full_disk_simulated covers it")
        path = disk / "home" / "typing_log.db"
        with TypingLog(path) as log:
            for i in range(30):
                log.record(f"entry number {i} of what the user typed", source="notes")
        filler = fill(disk)
        with pytest.raises(TypingLogError) as opening:  # a restart on the full disk
            TypingLog(path)
        filler.unlink()
        with TypingLog(path) as log:
            filler = fill(disk)
            with pytest.raises(TypingLogError) as writing:
                for i in range(200):  # the WAL may have some room left in its pages
                    log.record(f"more text {i} " * 20, source="notes")
        for err in (writing, opening):
            message = str(err.value)
            assert "is full" in message and "is intact" in message, message
            assert "move it away" not in message and "typing_log.db" in message
        filler.unlink()
        with TypingLog(path) as log:
            assert log.stats()["entries"] >= 30


def test_full_disk_simulated(tmp_path: Path, monkeypatch) -> None:
    """The same without a mount: SQLite reports a full disk as SQLITE_FULL, or as a disk I/O
    error when its shared-memory file cannot grow; statvfs says no space is left."""
    from wordahead.store import database
    from wordahead.store.database import TypingLogError

    path = tmp_path / "typing_log.db"
    with TypingLog(path) as log:
        log.record("what the user typed", source="notes")
    real = os.statvfs(tmp_path)

    class Full:
        f_bavail, f_frsize = 0, real.f_frsize

    def no_room(*args: object) -> None:
        error = sqlite3.OperationalError("disk I/O error")
        error.sqlite_errorname = "SQLITE_IOERR_SHMSIZE"  # what a real full tmpfs gives
        raise error

    monkeypatch.setattr(database.os, "statvfs", lambda _: Full)
    monkeypatch.setattr(database, "_configure", no_room)
    with pytest.raises(TypingLogError, match="is full .*is intact") as err:
        TypingLog(path)
    assert "move it away" not in str(err.value)
    monkeypatch.undo()
    with TypingLog(path) as log:
        assert log.stats()["entries"] == 1


def _damage_pages(path: Path, pages: range) -> None:
    with open(path, "r+b") as f:
        for page in pages:
            f.seek(page * 4096)
            f.write(os.urandom(4096))


def test_stats_on_a_partly_corrupt_database_says_so_without_a_traceback(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    """Failure 3: `keyboard stats` printed a raw traceback."""
    monkeypatch.setenv("KEYBOARD_HOME", str(tmp_path))
    with TypingLog(tmp_path / "typing_log.db") as log:
        for i in range(400):
            log.record(f"entry {i}: " + "some words the user typed " * 10, source=f"s{i % 7}")
    path = tmp_path / "typing_log.db"
    assert path.stat().st_size > 20 * 4096
    _damage_pages(path, range(3, 12))
    assert cli.main(["stats"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("keyboard: ") and "Traceback" not in err
    assert "damaged" in err and ".recover" in err
    done = subprocess.run(
        [sys.executable, "-m", "wordahead", "stats"],
        env={**os.environ, "KEYBOARD_HOME": str(tmp_path)},
        capture_output=True,
        text=True,
    )
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr


def test_a_job_killed_with_sigkill_is_not_left_running(tmp_path: Path) -> None:
    """Failure 7: a job killed with -9 stayed `running` until the next job ran."""
    path = tmp_path / "log.db"
    TypingLog(path).close()
    child = _child(
        """
        import sys, time
        from wordahead.learn.job_log import JobLog
        from wordahead.store.typing_log import TypingLog
        log = TypingLog(sys.argv[1])
        print(JobLog(log).start(), flush=True)
        time.sleep(60)
        """,
        str(path),
    )
    job = int(child.stdout.readline())
    with TypingLog(path) as log:
        assert JobLog(log).last()["status"] == "running"
        child.kill()
        child.wait()
        last = JobLog(log).last()
        assert last["id"] == job and last["status"] == "interrupted"
        assert "killed" in last["reason"]
    with sqlite3.connect(path) as db:  # recorded, not just shown
        assert db.execute("SELECT status FROM jobs WHERE id = ?", [job]).fetchone()[0] == (
            "interrupted"
        )
