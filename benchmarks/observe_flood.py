"""Learning as you type under a flood of messages: `observe` stays as fast at 20,000 messages
since the last job as at none, and another client's predictions are not slowed by it.

A daemon on a fresh home (no job has run: every message is recent text, learned by the live
phrases) gets --messages `observe` calls back to back from one client (the users' history
lines, all users, in turn; no test line is read), while a second client asks for a prediction
every --predict-every-ms. Reported: observe p50 and p90 of the same --window probe messages
(history lines of 5 to 30 words) sent with 0, 2,000 and --messages messages before them; the
other client's predict p50 before the flood and during it (their ratio); the daemon's RSS
before and after. In the same run, in-process, the median cost of learning one probe message
at each point, as LivePhrases does it now and as it did before (the recent phrase model
rebuilt on every message: `PhraseModel.thaw` + `learn` + `freeze`).

    nice python benchmarks/observe_flood.py [--model models/starter] [--messages 20000]
        [--learn-only]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DEFAULT_USERS = REPO.parent / "shared" / "corpus" / "users"


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def history_lines(users_dir: Path) -> list[str]:
    from wordahead.evaluate.harness import history_and_typed

    lines: list[str] = []
    for path in sorted(users_dir.glob("*.jsonl")):
        lines += [line for line in history_and_typed(path)[0] if line.strip()]
    return lines


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


def learn_costs(
    lines: list[str], probes: list[str], points: list[int], samples: int
) -> dict[str, Any]:
    """Milliseconds to learn one message with `points` messages already learned: now
    (incremental counts) and before (the recent PhraseModel rebuilt), medians of `samples`."""
    from wordahead.predict.sources.live_phrases import MAX_RECENT_NGRAMS, LivePhrases
    from wordahead.predict.sources.phrases import PhraseModel

    out: dict[str, Any] = {}
    live = LivePhrases(None)
    learned = 0
    for point in points:
        while learned < point:
            live.learn(lines[learned % len(lines)])
            learned += 1
        now, before = [], []
        gc.collect()  # timed apart: a collection of the rebuilt model's objects is its own
        for i in range(samples):
            started = time.perf_counter()
            live.learn(probes[i % len(probes)])
            now.append(time.perf_counter() - started)
            learned += 1
        rebuilt = PhraseModel.from_texts(
            (lines[i % len(lines)] for i in range(point)), max_ngrams=MAX_RECENT_NGRAMS
        )
        for i in range(samples):
            started = time.perf_counter()
            counts = rebuilt.thaw()
            counts.learn(probes[i % len(probes)])
            rebuilt = counts.freeze(rebuilt.weight)
            before.append(time.perf_counter() - started)
        del rebuilt, counts
        out[str(point)] = {
            "now_ms": ms(statistics.median(now)),
            "rebuilt_ms": ms(statistics.median(before)),
        }
        log(f"learn at {point:>6} messages: {out[str(point)]}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=REPO / "models" / "starter")
    parser.add_argument("--users", type=Path, default=DEFAULT_USERS)
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--window", type=int, default=200, help="observe calls per p50")
    parser.add_argument("--predict-every-ms", type=float, default=50.0)
    parser.add_argument("--learn-samples", type=int, default=5)
    parser.add_argument("--learn-only", action="store_true", help="no daemon: learn costs only")
    args = parser.parse_args(argv)

    from wordahead.daemon.client import DaemonClient

    lines = history_lines(args.users)
    points = [0, 2_000, args.messages] if args.messages > 2_000 else [0, args.messages]
    # The same messages are timed at each point (message lengths vary a hundredfold).
    probes = [line for line in lines if 5 <= len(line.split()) <= 30][: args.window]
    learn = learn_costs(lines, probes, points, args.learn_samples)
    if args.learn_only:
        print(json.dumps({"messages": args.messages, "learn_one_message": learn}, indent=2))
        return 0

    root = Path(tempfile.mkdtemp(prefix="kbflood", dir="/tmp"))
    socket = root / "s.sock"
    daemon = start_daemon(args.model, root, socket)
    try:
        with DaemonClient(socket, timeout=60) as client:
            rss_before = client.call("status")["server"]["rss_mb"]
            # Each context asked once (an answer remembered would be no measurement), and
            # after an `observe` (which empties the daemon's remembered answers) as in the flood.
            contexts = [" ".join(line.split()[:8]) + " " for line in lines[-3000:]]
            predict_idle = []
            for context in contexts[:100]:
                client.call("observe", text=probes[0], source="idle")
                predict_idle.append(time_predict(client, context))
            during: list[float] = []
            stop = threading.Event()

            def predicting() -> None:
                with DaemonClient(socket, timeout=60) as other:
                    i = 0
                    while not stop.is_set():
                        during.append(time_predict(other, contexts[100 + i % 2900]))
                        i += 1
                        stop.wait(args.predict_every_ms / 1000)

            other = threading.Thread(target=predicting, daemon=True)
            other.start()
            observe_at: dict[str, dict[str, float]] = {}
            sent, started = 0, time.monotonic()
            for point in points:
                while sent < point:
                    client.call("observe", text=lines[sent % len(lines)], source="flood")
                    sent += 1
                    if sent % 2000 == 0:
                        log(f"{sent} observed")
                timed = []
                for text in probes:  # the same messages timed at each point
                    t0 = time.perf_counter()
                    client.call("observe", text=text, source="flood")
                    timed.append(time.perf_counter() - t0)
                sent += len(probes)
                observe_at[str(point)] = {
                    "p50_ms": ms(percentile(timed, 0.5)),
                    "p90_ms": ms(percentile(timed, 0.9)),
                    "messages_before": sent - len(probes),
                }
                log(f"observe at {point}: {observe_at[str(point)]}")
            flood_s = time.monotonic() - started
            stop.set()
            other.join(timeout=60)
            rss_after = client.call("status")["server"]["rss_mb"]
    finally:
        daemon.terminate()
        daemon.wait(timeout=60)
        shutil.rmtree(root, ignore_errors=True)

    first, last = observe_at[str(points[0])]["p50_ms"], observe_at[str(points[-1])]["p50_ms"]
    idle_p50, during_p50 = percentile(predict_idle, 0.5), percentile(during, 0.5)
    result = {
        "model": str(args.model),
        "messages": sent,
        "flood_seconds": round(flood_s, 1),
        "observe": observe_at,
        "observe_p50_ratio_last_to_first": round(last / first, 2),
        "predict_other_client": {
            "idle_p50_ms": ms(idle_p50),
            "during_p50_ms": ms(during_p50),
            "during_p90_ms": ms(percentile(during, 0.9)),
            "ratio": round(during_p50 / idle_p50, 2),
            "calls": len(during),
        },
        "rss_mb": {"before": rss_before, "after": rss_after},
        "learn_one_message": learn,
    }
    print(json.dumps(result, indent=2))
    return 0


def start_daemon(model: Path, root: Path, socket: Path) -> subprocess.Popen[bytes]:
    """`keyboard serve --foreground` on a fresh home (its own process: its RSS is its own)."""
    from wordahead.daemon.client import DaemonClient
    from wordahead.types import KeyboardError

    env = {**os.environ, "KEYBOARD_HOME": str(root / "home"), "MALLOC_ARENA_MAX": "2"}
    command = [sys.executable, "-m", "wordahead", "serve", "--foreground"]
    command += ["--socket", str(socket), "--model", str(model)]
    with open(root / "daemon.log", "wb") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit((root / "daemon.log").read_text())
        try:
            with DaemonClient(socket, timeout=5) as client:
                client.call("status")
                return process
        except (KeyboardError, OSError):  # not listening yet, or still loading the model
            time.sleep(0.1)
    process.kill()
    raise SystemExit("the daemon did not answer in 120 s")


def time_predict(client: Any, context: str) -> float:
    started = time.perf_counter()
    client.call("predict", context=context, k=3)
    return time.perf_counter() - started


if __name__ == "__main__":
    sys.exit(main())
