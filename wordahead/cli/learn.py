"""`keyboard train` and `adapters`: the personalization job and the adapters it makes."""

from __future__ import annotations

import argparse
import errno
import json
import signal
import sys
import threading
import traceback
from typing import Any

from wordahead.cli.command import MODEL_HELP, Command, model_dir
from wordahead.daemon import client
from wordahead.learn import policy
from wordahead.paths import Home
from wordahead.types import KeyboardError

# The job itself, the typing log and the adapter store (numpy, ONNX Runtime) are imported by
# the commands that run them, so `keyboard --help` stays fast.

PROGRESS_POLL_S = 1.0  # how often `train --via-daemon` asks the daemon how the job is doing


def _train_arguments(p: argparse.ArgumentParser) -> None:
    defaults = policy.JobConfig()  # what personalize.json leaves unset
    p.add_argument("--model", default=None, help=MODEL_HELP)
    p.add_argument("--time-budget", type=float, default=None, metavar="S",
                   help=f"seconds for the whole job (default: time_budget_s, {defaults.time_budget_s:g})")  # fmt: skip
    p.add_argument("--max-steps", type=int, default=None, metavar="N",
                   help=f"training steps (default: max_steps, {defaults.max_steps})")  # fmt: skip
    p.add_argument("--lr", type=float, default=None,
                   help=f"peak learning rate (default: lr, {defaults.lr:g})")  # fmt: skip
    p.add_argument("--threads", type=int, default=None,
                   help=f"threads (default: threads, {defaults.threads})")  # fmt: skip
    p.add_argument("--force", action="store_true",
                   help="train even with few new words or on battery (the gate still applies)")  # fmt: skip
    p.add_argument("--json", action="store_true", help="print the result as one JSON line")
    p.add_argument("--via-daemon", action="store_true",
                   help="ask the running daemon to run the job (it serves the result at once)")  # fmt: skip


def run_train(args: argparse.Namespace) -> int:
    from wordahead.learn.personalize import run_job
    from wordahead.store.database import full_disk_message

    if args.via_daemon:
        return _train_via_daemon(args)

    def stop(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)  # unwinds: the job is recorded as interrupted

    signal.signal(signal.SIGTERM, stop)
    home: Home | None = None
    try:
        home = Home.from_env()
        policy.reserve_failure_record(home)  # while there is room for it
        config = policy.JobConfig.load(home.job_config)
        if args.threads is not None:
            config.threads = max(1, args.threads)
        policy.lower_priority(config.nice)
        result = run_job(
            home,
            model_dir(args),
            config=config,
            time_budget_s=args.time_budget,
            max_steps=args.max_steps,
            lr=args.lr,
            force=args.force,
        )
    except Exception as exc:  # noqa: BLE001 - whatever it was, the caller learns why
        if isinstance(exc, KeyboardError):
            reason = str(exc)
        elif isinstance(exc, OSError) and exc.errno == errno.ENOSPC and home is not None:
            reason = f"the job could not write {exc.filename or home.root}: " + (
                full_disk_message(home.root) or "the disk is full; free some space, then retry"
            )
        else:
            traceback.print_exc()
            reason = f"{type(exc).__name__}: {exc}"
        if home is not None:
            policy.record_failure(home, reason)
        if not args.json:
            raise
        print(json.dumps({"status": "failed", "reason": reason}))
        return 1
    if result.status == "failed":
        policy.record_failure(home, result.reason, result.job_id)
    if args.json:
        print(json.dumps(result.to_json()))
    else:
        print(f"{result.status}: {result.reason}" if result.reason else result.status)
    return result.exit_code


def _train_via_daemon(args: argparse.Namespace) -> int:
    """`keyboard train --via-daemon`: the daemon runs the job and switches to its adapter;
    meanwhile its progress (from `status`) goes to stderr."""
    outcome: dict[str, Any] = {}

    def wait_for_job() -> None:
        try:
            with client.DaemonClient(timeout=None) as daemon:
                outcome["done"] = daemon.call("train", wait=True, force=args.force)
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread
            outcome["error"] = exc

    waiter = threading.Thread(target=wait_for_job, name="keyboard-train-wait", daemon=True)
    waiter.start()
    shown: set[str] = set()
    wait_s = 0.2  # the first look soon: the job's start is news too
    with client.DaemonClient(timeout=10.0) as watcher:
        while waiter.is_alive():
            waiter.join(wait_s)
            wait_s = PROGRESS_POLL_S
            if not waiter.is_alive():
                break
            try:
                running = watcher.call("status")["personalization"].get("running")
            except KeyboardError:
                continue  # the answer will say what went wrong
            line = client.describe_progress(running)
            if line and line not in shown:
                shown.add(line)
                print(line, file=sys.stderr, flush=True)
    if "error" in outcome:
        raise outcome["error"]
    done = outcome["done"]
    report = done.get("result") or {}
    if args.json:
        print(json.dumps(done))
    else:
        status = report.get("status", f"exit code {done.get('exit_code')}")
        print(f"{status}: {report['reason']}" if report.get("reason") else status)
        print(f"serving adapter {done.get('adapter')}")
    return 0 if done.get("exit_code") == 0 else 1


TRAIN = Command(
    "train",
    help="run the personalization job now: fine-tune on new text, promote if better",
    description="Fine-tunes the active LoRA adapter on the text logged since the last job "
    "(plus a replay sample of older text), checks it on the most recent 10%, and promotes "
    "it only if held-out loss falls and next-word top-3 does not. Settings: "
    "<keyboard home>/personalize.json (README, Personalization); the defaults below are "
    "the file's settings when it does not set them.",
    arguments=_train_arguments,
    run=run_train,
)


def _adapters_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help=MODEL_HELP)
    acts = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    q = acts.add_parser("list", help="the stored versions, their data and metrics")
    q.add_argument("--json", action="store_true", help="print JSON")
    q = acts.add_parser("use", help="serve VERSION (or 'base') from now on")
    q.add_argument("version", metavar="VERSION")
    acts.add_parser("rollback", help="go back to the adapter active before this one")
    q = acts.add_parser("export", help="write VERSION as a difference to another version")
    q.add_argument("version", metavar="VERSION")
    q.add_argument("--out", required=True, metavar="FILE", help="the .npz file to write")
    q.add_argument("--base", default=None, metavar="VERSION",
                   help="difference to this version (default: the model's initial adapter)")  # fmt: skip
    q = acts.add_parser("import", help="add an exported difference as a new version")
    q.add_argument("file", metavar="FILE")


def run_adapters(args: argparse.Namespace) -> int:
    from wordahead.learn import adapter_diff
    from wordahead.learn.adapter_store import AdapterStore

    store = AdapterStore.in_home(Home.from_env(), model_dir(args))
    if args.action == "list":
        active = store.active_version
        entries = store.versions()
        if args.json:
            rows = [{**e.metadata, "version": e.version, "active": e.version == active}
                    for e in entries]  # fmt: skip
            print(json.dumps({"active": active, "root": str(store.root), "versions": rows},
                             indent=2))  # fmt: skip
            return 0
        print(f"{store.root}\n{'*' if active == 'base' else ' '} base (the model alone)")
        for e in entries:
            print(("*" if e.version == active else " ") + " " + _describe_version(e.metadata))
        return 0
    if args.action == "use":
        print(f"active adapter: {store.use(args.version)}")
    elif args.action == "rollback":
        print(f"rolled back; active adapter: {store.rollback()}")
    elif args.action == "export":
        header = adapter_diff.export_diff(store, args.version, args.out, args.base)
        print(f"wrote {header['version']} - {header['base']['version']} to {args.out}")
    elif args.action == "import":
        version = adapter_diff.import_diff(store, args.file)
        print(f"imported as {version}; serve it with `keyboard adapters use {version}`")
    return 0


def _describe_version(meta: dict) -> str:
    if "error" in meta:
        return f"{meta.get('version', '?')}  {meta['error']}"
    try:
        return _version_line(meta)
    except (KeyError, TypeError, ValueError, AttributeError):  # odd metadata: still listed
        return f"{meta.get('version', '?')}  (its metadata is damaged)"


def _version_line(meta: dict) -> str:
    text = f"{meta['version']}  {meta.get('created', '')}  {meta.get('source', '')}"
    change = client.describe_metrics(meta.get("metrics"))
    if change:
        text += f"  {change}"
    if "steps" in meta:
        text += f"  {meta['steps']} steps"
    data = meta.get("data") or {}
    if data.get("new_words"):
        text += f"  {data['new_words']} new words"
    return text


ADAPTERS = Command(
    "adapters",
    help="list, switch, roll back, export and import adapters",
    arguments=_adapters_arguments,
    run=run_adapters,
)
