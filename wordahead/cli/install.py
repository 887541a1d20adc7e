"""`keyboard link`, `service`, `uninstall`: keyboard in your session, and out of it again."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from wordahead.cli.command import MODEL_HELP, Command, print_changes
from wordahead.daemon import client
from wordahead.install import session
from wordahead.learn import schedule
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
    removed = schedule.remove(mode="auto")
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
