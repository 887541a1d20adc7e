"""`keyboard link`, `service`, `schedule`, `uninstall`: keyboard in your session, and out of
it again."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from wordahead.cli.command import MODEL_HELP, Command, print_changes
from wordahead.daemon import client
from wordahead.install import session, timer
from wordahead.paths import Home


def _link_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dir", type=Path, default=None, metavar="DIR",
                   help="where to put the link (default ~/.local/bin)")  # fmt: skip


def run_link(args: argparse.Namespace) -> int:
    print_changes(session.link(args.dir))
    return 0


LINK = Command(
    "link",
    help="put the `keyboard` command on PATH (a link in ~/.local/bin)",
    description="Links this installation's `keyboard` script (in its virtualenv) into a "
    "directory on PATH, so `keyboard ...` works in any shell and editor plugins find it.",
    arguments=_link_arguments,
    run=run_link,
)


def _service_arguments(p: argparse.ArgumentParser) -> None:
    acts = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    q = acts.add_parser("install", help="write keyboard.service and start it")
    q.add_argument("--model", default=None, help=MODEL_HELP)
    q.add_argument("--no-enable", action="store_true",
                   help="only write the unit file; do not start it")  # fmt: skip
    acts.add_parser("remove", help="stop keyboard.service and delete it")


def run_service(args: argparse.Namespace) -> int:
    if args.action == "install":
        model = Path(args.model).expanduser().resolve() if args.model else None
        print_changes(session.install_service(model, enable=not args.no_enable))
    else:
        changes = session.remove_service()
        print_changes(changes)
        if not changes.done:
            print("keyboard.service was not installed")
    return 0


SERVICE = Command(
    "service",
    help="run the daemon as a systemd user service (install, remove)",
    description="Installs the daemon as a systemd user unit (keyboard.service) that starts "
    "at login and restarts if it fails; the nightly job has its own timer "
    "(`keyboard schedule install`).",
    arguments=_service_arguments,
    run=run_service,
)


def _schedule_arguments(p: argparse.ArgumentParser) -> None:
    acts = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    q = acts.add_parser("install", help="a systemd user timer (or a crontab line) for the job")
    q.add_argument("--at", default=None, metavar="HH:MM",
                   help="local time (default: `at` in personalize.json, else 03:00)")  # fmt: skip
    q.add_argument("--mode", choices=("auto", "systemd", "cron"), default="auto",
                   help="auto: systemd when a user manager answers, else cron (default)")  # fmt: skip
    q.add_argument("--no-enable", action="store_true",
                   help="only write the unit files / print the line; do not activate")  # fmt: skip
    q = acts.add_parser("remove", help="undo `schedule install`")
    q.add_argument("--mode", choices=("auto", "systemd", "cron"), default="auto",
                   help="what to remove (default: both)")  # fmt: skip
    q = acts.add_parser("show", help="what is scheduled and when it runs next")
    q.add_argument("--json", action="store_true", help="print JSON")


def run_schedule(args: argparse.Namespace) -> int:
    if args.action == "show":
        shown = timer.show(Home.from_env())
        print(json.dumps(shown, indent=2) if args.json else _describe_schedule(shown))
        return 0
    if args.action == "install":
        result = timer.install(Home.from_env(), args.at, mode=args.mode, enable=not args.no_enable)
    else:
        result = timer.remove(mode=args.mode)
    for f in result.files:
        print(f"{'wrote' if args.action == 'install' else 'removed'} {f}")
    for m in result.messages:
        print(m)
    if result.cron_line and not result.enabled:
        print(result.cron_line)
    if result.at:
        print(f"`keyboard train` runs daily at {result.at} local time")
    return 0


def _describe_schedule(shown: dict[str, Any]) -> str:
    """`schedule show` for a person to read."""
    units = shown.get("systemd_units") or []
    lines = [
        f"time         {shown['at']} local time (next run {shown['next_run']})",
        "systemd      " + (", ".join(units) if units else "no timer installed"),
        "cron         " + (shown.get("cron_line") or "no crontab line"),
    ]
    if not units and not shown.get("cron_line"):
        lines.append("the daemon still runs the job at that time while it is serving;")
        lines.append("without it, `keyboard schedule install` adds a timer")
    return "\n".join(lines)


SCHEDULE = Command(
    "schedule",
    help="run the personalization job nightly (systemd or cron)",
    arguments=_schedule_arguments,
    run=run_schedule,
)


def _uninstall_arguments(p: argparse.ArgumentParser) -> None:
    home_opt = p.add_mutually_exclusive_group()
    home_opt.add_argument("--delete-home", action="store_true",
                          help="delete the keyboard home too, without asking")  # fmt: skip
    home_opt.add_argument("--keep-home", action="store_true",
                          help="keep the keyboard home, without asking")  # fmt: skip
    p.add_argument("--link-dir", type=Path, default=None, metavar="DIR",
                   help="where `keyboard link` put the link (default ~/.local/bin)")  # fmt: skip


def run_uninstall(args: argparse.Namespace) -> int:
    home = Home.from_env()
    print_changes(session.remove_service())
    try:
        print(f"stopped the daemon (pid {client.stop_daemon()})")
    except client.DaemonNotRunning:
        pass
    removed = timer.remove(mode="auto")
    for f in removed.files:
        print(f"removed {f}")
    for m in removed.messages:
        if m != "nothing was scheduled":
            print(m)
    print_changes(session.unlink(args.link_dir))
    delete = args.delete_home
    if not (args.delete_home or args.keep_home) and sys.stdin.isatty():
        answer = input(
            f"Delete {home.root} too: your typing log, adapters and settings? "
            "This cannot be undone. Type 'delete' to confirm: "
        )
        delete = answer.strip().lower() == "delete"
    if delete:
        print_changes(session.delete_home(home))
    else:
        print(f"kept {home.root}; delete it with `keyboard uninstall --delete-home`")
    return 0


UNINSTALL = Command(
    "uninstall",
    help="remove the service, the nightly timer, the PATH link; the home if you confirm",
    description="Stops the daemon and removes what keyboard installed in your session: "
    "keyboard.service, the nightly timer or crontab line, the link on PATH. Then it asks "
    "whether to delete the keyboard home (your typing log, adapters and settings) too; "
    "nothing there is deleted without that confirmation. The program itself stays "
    "(delete its virtualenv to remove it).",
    arguments=_uninstall_arguments,
    run=run_uninstall,
)
