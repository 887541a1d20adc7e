"""`keyboard log`, `forget`, `stats`, `pause`, `resume`, `privacy`: the typing log."""

from __future__ import annotations

import argparse
import json
import sys

from wordahead.cli.command import Command, Handler
from wordahead.daemon import client
from wordahead.paths import Home
from wordahead.types import KeyboardError

# The typing log's module imports numpy (through the job log): it is imported by the
# commands that open the log, so `keyboard --help` stays fast.


def _log_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("text", nargs="?", help="the text; omit or '-' to read stdin")
    p.add_argument("--source", default="", help="where it came from: file, app or file type")
    p.add_argument("--private", action="store_true", help="do not store this text")


def run_log(args: argparse.Namespace) -> int:
    from wordahead.store.typing_log import MAX_TEXT_BYTES, TypingLog

    text: str | bytes = args.text
    if text is None or text == "-":
        text = sys.stdin.buffer.read(MAX_TEXT_BYTES + 1)  # one byte over: refused, not cut
    with TypingLog(Home.from_env().typing_log) as typing_log:
        result = typing_log.record(text, source=args.source, private=args.private)
    print(f"stored entry {result.id}" if result.stored else f"not stored: {result.reason}")
    return 0


LOG = Command(
    "log",
    help="store text in the typing log (redacted; from stdin if no TEXT)",
    description="Stores TEXT (or standard input) in the typing log, as an editor would: "
    "secrets are redacted first, and text from excluded sources or while logging is "
    "paused is not stored. What it holds: `keyboard stats`; erase: `keyboard forget`.",
    arguments=_log_arguments,
    run=run_log,
)


def _forget_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--since", help="from this ISO date/time (inclusive)")
    p.add_argument("--until", help="up to this ISO date/time (exclusive)")
    p.add_argument("--source", help="only this source (glob patterns allowed)")
    p.add_argument("--all", action="store_true", help="erase everything")


def run_forget(args: argparse.Namespace) -> int:
    if not (args.all or args.since or args.until or args.source):
        raise KeyboardError(
            "say what to forget: --since and/or --until DATE, --source GLOB, or --all"
        )
    n = client.forget_via_daemon(args.since, args.until, args.source, args.all)  # daemon if running
    if n is None:
        from wordahead.learn.adapter_store import forget_phrases
        from wordahead.store.typing_log import TypingLog

        home = Home.from_env()
        with TypingLog(home.typing_log) as typing_log:
            n = typing_log.forget(args.since, args.until, args.source, everything=args.all)
        if n:
            forget_phrases(home)  # the daemon does the same when it does the forgetting
    print(f"forgot {n} entr{'y' if n == 1 else 'ies'}; database vacuumed")
    return 0


FORGET = Command(
    "forget",
    help="erase logged text by time range, source, or all of it",
    description="Erases entries of the typing log (through the daemon when it runs) and "
    "vacuums the database, so the text is gone from disk; the phrases counted from it "
    "are deleted too (the next job counts them again from what is left). Say what: "
    "--since and/or --until, --source, or --all.",
    arguments=_forget_arguments,
    run=run_forget,
)


def _stats_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--show", type=int, default=0, metavar="N", help="also print the newest N")


def run_stats(args: argparse.Namespace) -> int:
    from wordahead.learn.job_log import JobLog
    from wordahead.store.typing_log import TypingLog

    with TypingLog(Home.from_env().typing_log) as typing_log:
        stats = typing_log.stats()
        recent = typing_log.recent(args.show) if args.show > 0 else []
        job = JobLog(typing_log).last()
    if args.json:
        print(json.dumps({**stats, "recent": recent, "last_job": job}, indent=2))
        return 0
    print(f"typing log  {stats['path']} ({stats['db_bytes']:,} bytes)")
    print(
        f"logging     {'PAUSED' if stats['paused'] else 'on'}; kept {stats['retention_days']} days"
    )
    print(
        f"entries     {stats['entries']:,} ({stats['words']:,} words, "
        f"{stats['accepted']:,} accepted suggestions)"
    )
    print(f"oldest      {stats['oldest'] or '-'}\nnewest      {stats['newest'] or '-'}")
    for source, s in stats["by_source"].items():
        print(f"  {source or '(no source)'}: {s['entries']:,} entries, {s['words']:,} words")
    print(f"excluded    {', '.join(stats['excluded_sources']) or '(none)'}")
    if job:
        print(f"last job    #{job['id']} {job['status']} {job['started']}")
    for e in recent:
        print(f"[{e['id']}] {e['ts']} {e['source'] or '-'}: {e['text']}")
    return 0


STATS = Command(
    "stats",
    help="what the typing log holds: counts, sources, size",
    arguments=_stats_arguments,
    run=run_stats,
)


def _logging(paused: bool) -> Handler:
    def run(args: argparse.Namespace) -> int:
        from wordahead.store.typing_log import TypingLog

        with TypingLog(Home.from_env().typing_log) as typing_log:
            if paused:
                typing_log.pause()
            else:
                typing_log.resume()
        print("logging paused: nothing is stored" if paused else "logging resumed")
        return 0

    return run


PAUSE = Command("pause", help="stop storing typed text", run=_logging(paused=True))
RESUME = Command("resume", help="store typed text again", run=_logging(paused=False))


def _privacy_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--exclude",
        action="append",
        default=[],
        metavar="GLOB",
        help="never store text from sources matching GLOB (repeatable)",
    )
    p.add_argument(
        "--allow",
        action="append",
        default=[],
        metavar="GLOB",
        help="remove GLOB from the excluded sources (repeatable)",
    )
    p.add_argument("--reset-excluded", action="store_true", help="back to the default globs")
    p.add_argument("--retention-days", type=int, help="delete entries older than this")


def run_privacy(args: argparse.Namespace) -> int:
    from wordahead.store.redaction import DEFAULT_EXCLUDED_SOURCES
    from wordahead.store.typing_log import TypingLog

    with TypingLog(Home.from_env().typing_log) as typing_log:
        patterns = (
            list(DEFAULT_EXCLUDED_SOURCES) if args.reset_excluded else typing_log.excluded_sources
        )
        patterns = [g for g in patterns if g not in args.allow]
        patterns += [g for g in args.exclude if g not in patterns]
        if args.reset_excluded or args.exclude or args.allow:
            typing_log.set_excluded_sources(patterns)
        if args.retention_days is not None:
            typing_log.set_retention_days(args.retention_days)
            typing_log.apply_retention()
        print(f"logging: {'paused' if typing_log.paused else 'on'}")
        print(f"retention: {typing_log.retention_days} days")
        print("excluded sources: " + (", ".join(typing_log.excluded_sources) or "(none)"))
    return 0


PRIVACY = Command(
    "privacy",
    help="show or change excluded sources and retention",
    description="Shows, or changes, what the typing log keeps: sources whose text is "
    "never stored (glob patterns such as *.env or *secret*), and how many days entries "
    "are kept. Changes apply to every editor at once.",
    arguments=_privacy_arguments,
    run=run_privacy,
)
