"""Wall time and peak RSS of one personalization job (`keyboard train`) on N words of text.

Logs the first N words of a user's history (default: the first 80% of
../shared/corpus/users/president_barack_obama.jsonl, public speeches) into a throwaway
keyboard home, runs `python -m wordahead train --json --force` there as a child process,
and prints JSON: wall time, the child's peak RSS, steps, stop reason, metrics before/after.

    python benchmarks/personalize_job.py [--model models/starter] [--words 10000]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_TEXT = REPO.parent / "shared" / "corpus" / "users" / "president_barack_obama.jsonl"


def history_words(path: Path, n_words: int) -> list[str]:
    """The user's messages from the history part (first 80%), until `n_words` words."""
    sys.path.insert(0, str(REPO))
    from wordahead.evaluate.harness import read_messages, split_history
    from wordahead.predict.words import words

    history, _ = split_history(read_messages(path))
    out, count = [], 0
    for message in history:
        n = len(words(message))
        if count + n > n_words:
            break
        out.append(message)
        count += n
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(REPO / "models" / "starter"))
    parser.add_argument("--text", default=str(DEFAULT_TEXT), help="JSONL or plain text")
    parser.add_argument("--words", type=int, default=10_000)
    parser.add_argument("--time-budget", type=float, default=None, help="seconds (default 600)")
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    from wordahead.store.typing_log import TypingLog

    messages = history_words(Path(args.text), args.words)
    with tempfile.TemporaryDirectory(prefix="keyboard-bench-") as home:
        env = dict(os.environ, KEYBOARD_HOME=home, KEYBOARD_MODEL=str(Path(args.model).resolve()))
        with TypingLog(Path(home) / "typing_log.db") as log:
            for message in messages:
                log.record(message[:60_000], source="benchmark")
            logged_words = log.stats()["words"]
        command = [sys.executable, "-m", "wordahead", "train", "--json", "--force"]
        command += ["--threads", str(args.threads)]
        if args.time_budget is not None:
            command += ["--time-budget", str(args.time_budget)]
        if args.max_steps is not None:
            command += ["--max-steps", str(args.max_steps)]
        started = time.perf_counter()
        done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=REPO)
        wall = time.perf_counter() - started
    if done.returncode not in (0,):
        sys.stderr.write(done.stderr[-4000:])
    lines = [ln for ln in done.stdout.splitlines() if ln.strip()]
    result = json.loads(lines[-1]) if lines else {}
    metrics = result.get("metrics", {})
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    print(
        json.dumps(
            {
                "model": args.model,
                "text": args.text,
                "messages": len(messages),
                "words_logged": logged_words,
                "threads": args.threads,
                "exit_code": done.returncode,
                "status": result.get("status"),
                "reason": result.get("reason"),
                "wall_s": round(wall, 2),
                "job_s": result.get("seconds"),
                "peak_rss_mb": round(peak_kib / 1024, 1),  # any child: graph making too
                "job_peak_rss_mb": result.get("peak_rss_mb"),  # the job process (VmHWM)
                "steps": metrics.get("steps"),
                "stopped": metrics.get("stopped"),
                "train_s": metrics.get("train_seconds"),
                "fold_in": metrics.get("fold_in"),
                "shares": metrics.get("shares"),
                "data": metrics.get("data"),
                "before": metrics.get("before"),
                "after": metrics.get("after"),
            },
            indent=2,
        )
    )
    return 0 if done.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
