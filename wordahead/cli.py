"""The `keyboard` command line: parses arguments and hands off to the module that does the work."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from wordahead.federated.join import add_federate
from wordahead.paths import Home
from wordahead.types import KeyboardError

Handler = Callable[[argparse.Namespace], int]
PROGRESS_POLL_S = 1.0  # how often `train --via-daemon` asks the daemon how the job is doing
MODEL_HELP = "model directory (default: $KEYBOARD_MODEL, else the starter model)"


def _model_dir(args: argparse.Namespace) -> Path:
    """The model a command works on: --model, else $KEYBOARD_MODEL, else the starter model."""
    from wordahead import paths

    return Path(args.model).expanduser() if args.model else paths.default_model_dir()


# --- export ---------------------------------------------------------------------------------------
def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a causal LM with LoRA adapters to ORT artifacts")
    p.add_argument("--base-model", required=True, help="local Hugging Face model dir or hub id")
    p.add_argument("--out", required=True, help="output directory for the artifact set")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank (default %(default)s)")
    p.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha (default %(default)s)")
    p.add_argument(
        "--target-modules",
        default="auto",
        help="comma-separated module names to adapt instead of --groups (default: auto)",
    )
    p.add_argument(
        "--groups",
        default="attention,mlp,lm_head",
        help="adapter groups that get LoRA: attention, mlp (projections of every layer in "
        "--layers), lm_head (the output projection, tied to the embedding)",
    )
    p.add_argument(
        "--train-groups",
        default="mlp,lm_head",
        help="the groups the nightly job trains by default, of those exported (default: "
        "mlp,lm_head; '' for all; measure with benchmarks/adapter_groups.py)",
    )
    p.add_argument(
        "--layers",
        default="all",
        help="which layers carry adapters: all, top:N, or 0,2,5 (default %(default)s)",
    )
    p.add_argument(
        "--seq-len", type=int, default=64, help="training sequence length (default %(default)s)"
    )
    p.add_argument("--seed", type=int, default=0)

    def run(args: argparse.Namespace) -> int:
        from wordahead.model.export import ExportConfig, export_model

        config = ExportConfig(
            rank=args.rank,
            alpha=args.alpha,
            target_modules=args.target_modules,
            groups=args.groups,
            train_groups=args.train_groups,
            layers=args.layers,
            seq_len=args.seq_len,
            seed=args.seed,
        )
        manifest = export_model(args.base_model, args.out, config)
        print(f"exported {manifest['base_model']['id']} -> {args.out}")
        print(
            f"  {len(manifest['lora']['tensors'])} LoRA tensors, "
            f"{manifest['lora']['parameters']:,} trainable parameters; groups: "
            + ", ".join(f"{g} ({len(n)})" for g, n in manifest["lora"]["groups"].items())
        )
        return 0

    p.set_defaults(func=run)


# --- typing log -----------------------------------------------------------------------------------
def _add_log(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "log",
        help="store text in the typing log (redacted; from stdin if no TEXT)",
        description="Stores TEXT (or standard input) in the typing log, as an editor would: "
        "secrets are redacted first, and text from excluded sources or while logging is "
        "paused is not stored. What it holds: `keyboard stats`; erase: `keyboard forget`.",
    )
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

    p.set_defaults(func=run_log)

    p = sub.add_parser(
        "forget",
        help="erase logged text by time range, source, or all of it",
        description="Erases entries of the typing log (through the daemon when it runs) and "
        "vacuums the database, so the text is gone from disk; the phrases counted from it "
        "are deleted too (the next job counts them again from what is left). Say what: "
        "--since and/or --until, --source, or --all.",
    )
    p.add_argument("--since", help="from this ISO date/time (inclusive)")
    p.add_argument("--until", help="up to this ISO date/time (exclusive)")
    p.add_argument("--source", help="only this source (glob patterns allowed)")
    p.add_argument("--all", action="store_true", help="erase everything")

    def run_forget(args: argparse.Namespace) -> int:
        from wordahead.daemon.client import forget_via_daemon

        if not (args.all or args.since or args.until or args.source):
            raise KeyboardError(
                "say what to forget: --since and/or --until DATE, --source GLOB, or --all"
            )
        from wordahead.store.typing_log import TypingLog

        n = forget_via_daemon(args.since, args.until, args.source, args.all)  # daemon if running
        if n is None:
            from wordahead.learn.adapter_store import forget_phrases

            home = Home.from_env()
            with TypingLog(home.typing_log) as typing_log:
                n = typing_log.forget(args.since, args.until, args.source, everything=args.all)
            if n:
                forget_phrases(home)  # the daemon does the same when it does the forgetting
        print(f"forgot {n} entr{'y' if n == 1 else 'ies'}; database vacuumed")
        return 0

    p.set_defaults(func=run_forget)

    p = sub.add_parser("stats", help="what the typing log holds: counts, sources, size")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--show", type=int, default=0, metavar="N", help="also print the newest N")

    def run_stats(args: argparse.Namespace) -> int:
        import json

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
            f"logging     {'PAUSED' if stats['paused'] else 'on'}; "
            f"kept {stats['retention_days']} days"
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

    p.set_defaults(func=run_stats)

    def toggle(paused: bool) -> Handler:
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

    sub.add_parser("pause", help="stop storing typed text").set_defaults(func=toggle(True))
    sub.add_parser("resume", help="store typed text again").set_defaults(func=toggle(False))

    p = sub.add_parser(
        "privacy",
        help="show or change excluded sources and retention",
        description="Shows, or changes, what the typing log keeps: sources whose text is "
        "never stored (glob patterns such as *.env or *secret*), and how many days entries "
        "are kept. Changes apply to every editor at once.",
    )
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
                list(DEFAULT_EXCLUDED_SOURCES)
                if args.reset_excluded
                else typing_log.excluded_sources
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

    p.set_defaults(func=run_privacy)


# --- eval -----------------------------------------------------------------------------------------
def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="simulate typing a user's text: next-word accuracy, keystroke savings, latency",
        description="Types FILE through the Predictor the daemon uses and reports next-word "
        "top-1/top-3 accuracy, keystroke savings rate (KSR) with k suggestions and latency "
        "percentiles (definitions: docs/evaluation.md).",
    )
    p.add_argument(
        "file", metavar="FILE", help='plain text (a message per line) or JSONL {"ts", "text"}'
    )
    p.add_argument("--k", type=int, default=3, help="suggestions shown (default %(default)s)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--model", default=None, help=MODEL_HELP)
    p.add_argument(
        "--max-lines",
        type=int,
        default=None,
        metavar="N",
        help="type only the first N evaluated messages (faster; history stays whole)",
    )
    p.add_argument("--plot", default=None, metavar="FILE", help="write a PNG of the metrics")
    p.add_argument(
        "--personalize",
        action="store_true",
        help="train on the first 80%% of lines with the personalization job in a throwaway "
        "home, and report the last 20%% before and after",
    )
    p.add_argument("--threads", type=int, default=1, help="inference threads (default %(default)s)")
    p.add_argument(
        "--adapter",
        default=None,
        metavar="active|base|VERSION",
        help="the adapter to type with (default: active, the one the daemon serves; with "
        "--personalize, base)",
    )
    p.add_argument(
        "--phrases",
        action="store_true",
        help="also type with phrase completion (ghost text, the daemon's settings): KSR with "
        "phrases, trigger rate, precision",
    )

    def run(args: argparse.Namespace) -> int:
        import json
        from pathlib import Path

        from wordahead.evaluate import harness as evaluation

        model_dir = _model_dir(args)

        def progress(stage: str, done: int, total: int) -> None:
            if sys.stderr.isatty():
                end = "\n" if done == total else ""
                print(f"\r{stage}: {done}/{total} messages", end=end, file=sys.stderr, flush=True)

        choice = args.adapter or ("base" if args.personalize else "active")
        if args.personalize and choice != "base":
            raise KeyboardError("--personalize trains from the base model; leave out --adapter")
        result = evaluation.evaluate_file(
            args.file,
            model_dir,
            adapter=choice,
            home=Home.from_env(),
            k=args.k,
            max_lines=args.max_lines,
            personalize=args.personalize,
            threads=args.threads,
            progress=progress,
            phrases=_phrase_settings() if args.phrases else None,
        )
        rows = {result.served: result.before}
        if result.after is not None:
            rows["personalized"] = result.after
        if args.plot:
            evaluation.plot_reports(
                {Path(args.file).stem: rows}, args.plot, title=Path(args.file).name
            )
        if args.json:
            print(json.dumps(result.to_json(), indent=2))
            return 0
        print(
            f"{result.file}: {result.messages} messages; typed {result.evaluated}"
            + (f" after {result.history} of history" if result.history else "")
        )
        print(evaluation.report_table(rows))
        if result.phrases_before is not None:
            _print_phrases(result)
        if result.job_seconds is not None:
            print(
                f"personalization job: {result.job_status}; {result.job_seconds:.1f} s, "
                f"peak RSS {result.peak_rss_mb:.0f} MB (whole process)"
            )
        if args.plot:
            print(f"plot: {args.plot}")
        return 0

    p.set_defaults(func=run)


def _phrase_settings() -> Any:
    from wordahead.predict.sources.phrase_completion import PhraseSettings

    return PhraseSettings()


def _print_phrases(result: Any) -> None:
    from wordahead.evaluate.phrase_typist import phrase_table

    rows = {result.served: result.phrases_before}
    if result.phrases_after is not None:
        rows["personalized"] = result.phrases_after
    print("with phrases (ghost text; '1 word': words of a phrase taken one by one):")
    print(phrase_table(rows))


# --- daemon ---------------------------------------------------------------------------------------
def _add_serve(sub: argparse._SubParsersAction) -> None:
    socket_opt = argparse.ArgumentParser(add_help=False)
    socket_opt.add_argument(
        "--socket", default=None, help="the daemon's socket (default: KEYBOARD_SOCKET or standard)"
    )

    def socket_path(args: argparse.Namespace) -> Path:
        from wordahead import paths

        return Path(args.socket).expanduser() if args.socket else paths.socket_path()

    p = sub.add_parser(
        "serve",
        parents=[socket_opt],
        help="start the daemon: predictions and text collection over a local socket",
        description="Starts the daemon in the background and returns once it answers "
        "(--foreground: run in this terminal until Ctrl-C / SIGTERM). Protocol: docs/protocol.md.",
    )
    p.add_argument("--model", default=None, help=MODEL_HELP)
    p.add_argument(
        "--threads", type=int, default=1, help="inference threads per request (default %(default)s)"
    )
    p.add_argument("--foreground", action="store_true", help="stay attached; log to stderr")

    def run_serve(args: argparse.Namespace) -> int:
        from wordahead.daemon import server

        config = server.ServeConfig(
            socket_path(args), _model_dir(args), Home.from_env(), threads=args.threads
        )
        if args.foreground:
            return server.serve(config)
        status = server.start_background(config)
        print(
            f"keyboard is serving {status['model']['name']} at {status['socket']} "
            f"(pid {status['pid']}, ready in {status['ready_s']:.1f} s)"
        )
        from wordahead.install.session import command_name

        command = command_name()
        print(f"log: {status['log']}; stop it with `{command} stop`")
        print(f'ask it for the next word: {command} predict "Thank you for your "')
        problem = (status.get("typing_log") or {}).get("error")
        if problem:  # it predicts, but stores nothing until the log opens again
            print(f"keyboard: warning: nothing typed is stored for now: {problem}", file=sys.stderr)
        return 0

    p.set_defaults(func=run_serve)

    p = sub.add_parser("stop", parents=[socket_opt], help="stop the daemon (finishes requests)")

    def run_stop(args: argparse.Namespace) -> int:
        from wordahead.daemon.client import stop_daemon

        print(f"stopped keyboard (pid {stop_daemon(socket_path(args))})")
        return 0

    p.set_defaults(func=run_stop)

    p = sub.add_parser(
        "predict",
        parents=[socket_opt],
        help="ask the daemon for the next word after TEXT",
        description="Prints the daemon's suggestions for the text before the cursor, most "
        'likely first. A trailing space asks for the next word ("Thank you for your "); '
        'without one, the last word is completed ("Thank you for yo").',
    )
    p.add_argument(
        "text", metavar="TEXT", help="the text before the cursor (mind the trailing space)"
    )
    p.add_argument(
        "-k", "--k", type=int, default=3, help="how many suggestions (default %(default)s)"
    )
    p.add_argument("--json", action="store_true", help="print the JSON result")

    def run_predict(args: argparse.Namespace) -> int:
        import json

        from wordahead.daemon.client import DaemonClient
        from wordahead.predict.shown import score_label

        with DaemonClient(socket_path(args)) as client:
            result = client.call("predict", context=args.text, k=args.k)
        if args.json:
            print(json.dumps(result, ensure_ascii=False, indent=2))
            return 0
        for c in result["candidates"]:
            label = score_label(c["score"])
            print(f"{c['word']}\t{label}" if label else c["word"])
        print(f"({result['adapter']} adapter, {result['latency_ms']:.1f} ms)", file=sys.stderr)
        return 0

    p.set_defaults(func=run_predict)

    p = sub.add_parser("status", parents=[socket_opt], help="what the daemon serves and holds")
    p.add_argument("--json", action="store_true", help="print JSON")

    def run_status(args: argparse.Namespace) -> int:
        import json

        from wordahead.daemon.client import DaemonClient, describe_status
        from wordahead.federated.join import describe
        from wordahead.federated.local import FederationSettings

        with DaemonClient(socket_path(args)) as client:
            status = client.call("status")
        federation = FederationSettings.load(Home.from_env().root)
        status["federation"] = vars(federation)
        print(json.dumps(status, indent=2) if args.json else describe_status(status))
        if not args.json:
            print(describe(federation))
        return 0

    p.set_defaults(func=run_status)


def _train_via_daemon(args: argparse.Namespace) -> int:
    """`keyboard train --via-daemon`: the daemon runs the job and switches to its adapter;
    meanwhile its progress (from `status`) goes to stderr."""
    import json
    import threading

    from wordahead.daemon.client import DaemonClient, describe_progress

    outcome: dict[str, Any] = {}

    def wait_for_job() -> None:
        try:
            with DaemonClient(timeout=None) as client:
                outcome["done"] = client.call("train", wait=True, force=args.force)
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread
            outcome["error"] = exc

    waiter = threading.Thread(target=wait_for_job, name="keyboard-train-wait", daemon=True)
    waiter.start()
    shown: set[str] = set()
    wait_s = 0.2  # the first look soon: the job's start is news too
    with DaemonClient(timeout=10.0) as watcher:
        while waiter.is_alive():
            waiter.join(wait_s)
            wait_s = PROGRESS_POLL_S
            if not waiter.is_alive():
                break
            try:
                running = watcher.call("status")["personalization"].get("running")
            except KeyboardError:
                continue  # the answer will say what went wrong
            line = describe_progress(running)
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


# --- editors --------------------------------------------------------------------------------------
def _add_lsp(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "lsp",
        help="language server on stdio: the daemon's predictions as completions in editors",
        description="Speaks the Language Server Protocol on stdin/stdout for an editor "
        "(Neovim, VS Code, Emacs, Helix: see the README's Editors section). Needs a running "
        "daemon (`keyboard serve`).",
    )
    p.add_argument(
        "--socket", default=None, help="the daemon's socket (default: KEYBOARD_SOCKET or standard)"
    )
    p.add_argument("--verbose", action="store_true", help="log requests to stderr")

    def run(args: argparse.Namespace) -> int:
        from wordahead.editors.lsp import serve_stdio

        return serve_stdio(args.socket, verbose=args.verbose)

    p.set_defaults(func=run)


# --- personalization ------------------------------------------------------------------------------


def _add_train(sub: argparse._SubParsersAction) -> None:
    from wordahead.learn.policy import JobConfig

    defaults = JobConfig()  # what personalize.json leaves unset
    p = sub.add_parser(
        "train",
        help="run the personalization job now: fine-tune on new text, promote if better",
        description="Fine-tunes the active LoRA adapter on the text logged since the last job "
        "(plus a replay sample of older text), checks it on the most recent 10%, and promotes "
        "it only if held-out loss falls and next-word top-3 does not. Settings: "
        "<keyboard home>/personalize.json (README, Personalization); the defaults below are "
        "the file's settings when it does not set them.",
    )
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

    def run(args: argparse.Namespace) -> int:
        import errno
        import json
        import signal
        import traceback

        from wordahead.learn import personalize, policy
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
            result = personalize.run_job(
                home,
                _model_dir(args),
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

    p.set_defaults(func=run)


def _add_adapters(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("adapters", help="list, switch, roll back, export and import adapters")
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

    def run(args: argparse.Namespace) -> int:
        import json

        from wordahead.learn import adapter_diff
        from wordahead.learn.adapter_store import AdapterStore

        store = AdapterStore.in_home(Home.from_env(), _model_dir(args))
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

    p.set_defaults(func=run)


def _describe_version(meta: dict) -> str:
    if "error" in meta:
        return f"{meta.get('version', '?')}  {meta['error']}"
    try:
        return _version_line(meta)
    except (KeyError, TypeError, ValueError, AttributeError):  # odd metadata: still listed
        return f"{meta.get('version', '?')}  (its metadata is damaged)"


def _version_line(meta: dict) -> str:
    from wordahead.daemon.client import describe_metrics

    text = f"{meta['version']}  {meta.get('created', '')}  {meta.get('source', '')}"
    change = describe_metrics(meta.get("metrics"))
    if change:
        text += f"  {change}"
    if "steps" in meta:
        text += f"  {meta['steps']} steps"
    data = meta.get("data") or {}
    if data.get("new_words"):
        text += f"  {data['new_words']} new words"
    return text


def _add_schedule(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("schedule", help="run the personalization job nightly (systemd or cron)")
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

    def run(args: argparse.Namespace) -> int:
        import json

        from wordahead.learn import schedule

        if args.action == "show":
            shown = schedule.show(Home.from_env())
            print(json.dumps(shown, indent=2) if args.json else _describe_schedule(shown))
            return 0
        if args.action == "install":
            result = schedule.install(
                Home.from_env(), args.at, mode=args.mode, enable=not args.no_enable
            )
        else:
            result = schedule.remove(mode=args.mode)
        for f in result.files:
            print(f"{'wrote' if args.action == 'install' else 'removed'} {f}")
        for m in result.messages:
            print(m)
        if result.cron_line and not result.enabled:
            print(result.cron_line)
        if result.at:
            print(f"`keyboard train` runs daily at {result.at} local time")
        return 0

    p.set_defaults(func=run)


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


# --- installation ---------------------------------------------------------------------------------
def _add_install(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "link",
        help="put the `keyboard` command on PATH (a link in ~/.local/bin)",
        description="Links this installation's `keyboard` script (in its virtualenv) into a "
        "directory on PATH, so `keyboard ...` works in any shell and editor plugins find it.",
    )
    p.add_argument("--dir", type=Path, default=None, metavar="DIR",
                   help="where to put the link (default ~/.local/bin)")  # fmt: skip

    def run_link(args: argparse.Namespace) -> int:
        from wordahead.install import session as install

        _print_changes(install.link(args.dir))
        return 0

    p.set_defaults(func=run_link)

    p = sub.add_parser(
        "service",
        help="run the daemon as a systemd user service (install, remove)",
        description="Installs the daemon as a systemd user unit (keyboard.service) that starts "
        "at login and restarts if it fails; the nightly job has its own timer "
        "(`keyboard schedule install`).",
    )
    acts = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    q = acts.add_parser("install", help="write keyboard.service and start it")
    q.add_argument("--model", default=None, help=MODEL_HELP)
    q.add_argument("--no-enable", action="store_true",
                   help="only write the unit file; do not start it")  # fmt: skip
    acts.add_parser("remove", help="stop keyboard.service and delete it")

    def run_service(args: argparse.Namespace) -> int:
        from wordahead.install import session as install

        if args.action == "install":
            model = Path(args.model).expanduser().resolve() if args.model else None
            _print_changes(install.install_service(model, enable=not args.no_enable))
        else:
            changes = install.remove_service()
            _print_changes(changes)
            if not changes.done:
                print("keyboard.service was not installed")
        return 0

    p.set_defaults(func=run_service)

    p = sub.add_parser(
        "uninstall",
        help="remove the service, the nightly timer, the PATH link; the home if you confirm",
        description="Stops the daemon and removes what keyboard installed in your session: "
        "keyboard.service, the nightly timer or crontab line, the link on PATH. Then it asks "
        "whether to delete the keyboard home (your typing log, adapters and settings) too; "
        "nothing there is deleted without that confirmation. The program itself stays "
        "(delete its virtualenv to remove it).",
    )
    home_opt = p.add_mutually_exclusive_group()
    home_opt.add_argument("--delete-home", action="store_true",
                          help="delete the keyboard home too, without asking")  # fmt: skip
    home_opt.add_argument("--keep-home", action="store_true",
                          help="keep the keyboard home, without asking")  # fmt: skip
    p.add_argument("--link-dir", type=Path, default=None, metavar="DIR",
                   help="where `keyboard link` put the link (default ~/.local/bin)")  # fmt: skip

    def run_uninstall(args: argparse.Namespace) -> int:
        from wordahead.daemon.client import DaemonNotRunning, stop_daemon
        from wordahead.install import session as install
        from wordahead.learn import schedule

        home = Home.from_env()
        _print_changes(install.remove_service())
        try:
            print(f"stopped the daemon (pid {stop_daemon()})")
        except DaemonNotRunning:
            pass
        removed = schedule.remove(mode="auto")
        for f in removed.files:
            print(f"removed {f}")
        for m in removed.messages:
            if m != "nothing was scheduled":
                print(m)
        _print_changes(install.unlink(args.link_dir))
        delete = args.delete_home
        if not (args.delete_home or args.keep_home) and sys.stdin.isatty():
            answer = input(
                f"Delete {home.root} too: your typing log, adapters and settings? "
                "This cannot be undone. Type 'delete' to confirm: "
            )
            delete = answer.strip().lower() == "delete"
        if delete:
            _print_changes(install.delete_home(home))
        else:
            print(f"kept {home.root}; delete it with `keyboard uninstall --delete-home`")
        return 0

    p.set_defaults(func=run_uninstall)


def _print_changes(changes: Any) -> None:
    for line in [*changes.done, *changes.notes]:
        print(line)


# Each area adds its commands here; keep a section per module.
_SECTIONS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_export,
    _add_log,
    _add_eval,
    _add_serve,
    _add_lsp,
    _add_train,
    _add_adapters,
    _add_schedule,
    add_federate,
    _add_install,
]


def build_parser() -> argparse.ArgumentParser:
    from wordahead import __version__

    parser = argparse.ArgumentParser(
        prog="keyboard", description="Private, personalized next-word prediction."
    )
    parser.add_argument("--version", action="version", version=f"keyboard {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in _SECTIONS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Handler | None = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    try:
        return func(args)
    except KeyboardError as exc:
        print(f"keyboard: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
