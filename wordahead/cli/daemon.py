"""`keyboard serve`, `stop`, `predict`, `status`, `lsp`: the daemon and what talks to it."""

from __future__ import annotations

import argparse
import json
import sys

from wordahead.cli.command import MODEL_HELP, Command, add_socket, model_dir, socket_path
from wordahead.daemon import client
from wordahead.paths import Home

# The daemon's server, the language server and the federation settings (numpy) are imported
# by the commands that use them, so `keyboard --help` stays fast.


def _serve_arguments(p: argparse.ArgumentParser) -> None:
    add_socket(p)
    p.add_argument("--model", default=None, help=MODEL_HELP)
    p.add_argument(
        "--threads", type=int, default=1, help="inference threads per request (default %(default)s)"
    )
    p.add_argument("--foreground", action="store_true", help="stay attached; log to stderr")


def run_serve(args: argparse.Namespace) -> int:
    from wordahead.daemon import server
    from wordahead.install.session import command_name
    from wordahead.predict.sources.typos import TypoSettings

    config = server.ServeConfig(
        socket_path(args),
        model_dir(args),
        Home.from_env(),
        threads=args.threads,
        typos=TypoSettings.from_env(),
    )
    if args.foreground:
        return server.serve(config)
    status = server.start_background(config)
    print(
        f"keyboard is serving {status['model']['name']} at {status['socket']} "
        f"(pid {status['pid']}, ready in {status['ready_s']:.1f} s)"
    )
    command = command_name()
    print(f"log: {status['log']}; stop it with `{command} stop`")
    print(f'ask it for the next word: {command} predict "Thank you for your "')
    problem = (status.get("typing_log") or {}).get("error")
    if problem:  # it predicts, but stores nothing until the log opens again
        print(f"keyboard: warning: nothing typed is stored for now: {problem}", file=sys.stderr)
    return 0


SERVE = Command(
    "serve",
    help="start the daemon: predictions and text collection over a local socket",
    description="Starts the daemon in the background and returns once it answers "
    "(--foreground: run in this terminal until Ctrl-C / SIGTERM). Protocol: docs/protocol.md.",
    arguments=_serve_arguments,
    run=run_serve,
)


def run_stop(args: argparse.Namespace) -> int:
    print(f"stopped keyboard (pid {client.stop_daemon(socket_path(args))})")
    return 0


STOP = Command(
    "stop", help="stop the daemon (finishes requests)", arguments=add_socket, run=run_stop
)


def _predict_arguments(p: argparse.ArgumentParser) -> None:
    add_socket(p)
    p.add_argument(
        "text", metavar="TEXT", help="the text before the cursor (mind the trailing space)"
    )
    p.add_argument(
        "-k", "--k", type=int, default=3, help="how many suggestions (default %(default)s)"
    )
    p.add_argument("--json", action="store_true", help="print the JSON result")


def run_predict(args: argparse.Namespace) -> int:
    from wordahead.predict.shown import score_label

    with client.DaemonClient(socket_path(args)) as daemon:
        result = daemon.call("predict", context=args.text, k=args.k)
    if args.json:
        print(json.dumps(result, ensure_ascii=False, indent=2))
        return 0
    for c in result["candidates"]:
        label = score_label(c["score"])
        if c.get("kind") == "correction":  # say what it replaces: the typed text is not its prefix
            typed = args.text[len(args.text) - c["replaces"] :]
            label = f"{label}  (correcting {typed!r})".strip()
        print(f"{c['word']}\t{label}" if label else c["word"])
    print(f"({result['adapter']} adapter, {result['latency_ms']:.1f} ms)", file=sys.stderr)
    return 0


PREDICT = Command(
    "predict",
    help="ask the daemon for the next word after TEXT",
    description="Prints the daemon's suggestions for the text before the cursor, most "
    'likely first. A trailing space asks for the next word ("Thank you for your "); '
    'without one, the last word is completed ("Thank you for yo").',
    arguments=_predict_arguments,
    run=run_predict,
)


def _status_arguments(p: argparse.ArgumentParser) -> None:
    add_socket(p)
    p.add_argument("--json", action="store_true", help="print JSON")


def run_status(args: argparse.Namespace) -> int:
    from wordahead.federated.join import describe
    from wordahead.federated.local import FederationSettings

    with client.DaemonClient(socket_path(args)) as daemon:
        status = daemon.call("status")
    federation = FederationSettings.load(Home.from_env().root)
    status["federation"] = vars(federation)
    print(json.dumps(status, indent=2) if args.json else client.describe_status(status))
    if not args.json:
        print(describe(federation))
    return 0


STATUS = Command(
    "status", help="what the daemon serves and holds", arguments=_status_arguments, run=run_status
)


def _lsp_arguments(p: argparse.ArgumentParser) -> None:
    add_socket(p)
    p.add_argument("--verbose", action="store_true", help="log requests to stderr")


def run_lsp(args: argparse.Namespace) -> int:
    from wordahead.editors.lsp import serve_stdio

    return serve_stdio(args.socket, verbose=args.verbose)


LSP = Command(
    "lsp",
    help="language server on stdio: the daemon's predictions as completions in editors",
    description="Speaks the Language Server Protocol on stdin/stdout for an editor "
    "(Neovim, VS Code, Emacs, Helix: see the README's Editors section). Needs a running "
    "daemon (`keyboard serve`).",
    arguments=_lsp_arguments,
    run=run_lsp,
)
