"""Does ghost text delay the word list? Per-keystroke latency over the socket, word-only
against words + phrases, in one run on one daemon.

A personalized daemon (serve_load.py's home: an adapter and the phrases of the user's
history) is started; one client types the user's test text keystroke by keystroke at
--pause seconds a keystroke, as an editor does:

    words     `predict` per keystroke
    phrases   `predict`, and right after it `phrase` for the same text (an editor asks for
              the completion list and the ghost text at once); the next keystroke waits for
              both answers

The latency is the round trip of `predict` (the word list), the figure the phrase must not
slow down; the phrase's own round trip and how often one is shown are reported too. The two
modes alternate in blocks of --block keystrokes over the same text, so a change of load on
the machine hits both. Prints JSON; the target is p50(phrases) / p50(words) <= 1.2.

    nice python benchmarks/phrase_latency.py [--text FILE.jsonl] [--chars 600] [--pause 0.05]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from wordahead import paths  # noqa: E402
from wordahead.evaluate.harness import read_messages, split_history  # noqa: E402
from wordahead.evaluate.simulate import percentile  # noqa: E402

DEFAULT_TEXT = REPO.parent / "shared" / "corpus" / "users" / "president_barack_obama.jsonl"
HISTORY_CHARS = 1000


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


async def typist(
    sock: str, texts: list[str], phrases: bool, pause: float, out: dict[str, list[float]]
) -> int:
    """Type `texts` (one per keystroke): each keystroke waits for its word list only, as a
    person does; phrases arrive when they arrive. Returns the number of error answers."""
    reader, writer = await asyncio.open_unix_connection(sock)
    loop = asyncio.get_running_loop()
    pending: dict[int, tuple[str, float, asyncio.Future[None]]] = {}
    errors = 0

    async def read() -> None:
        nonlocal errors
        while pending or not writer.is_closing():
            line = await reader.readline()
            if not line:
                return
            answer = json.loads(line)
            method, started, done = pending.pop(answer.get("id"), ("", 0.0, None))
            if done is None or "result" not in answer:
                errors += 1
            else:
                out[f"{method}_ms"].append((time.perf_counter() - started) * 1000)
                if method == "phrase":
                    out["shown"].append(float(answer["result"]["phrase"] is not None))
            if done is not None:
                done.set_result(None)

    reading = asyncio.ensure_future(read())
    last: asyncio.Future[None] | None = None
    try:
        for n, text in enumerate(texts):
            await asyncio.sleep(pause)
            calls = [("predict", {"context": text, "k": 3})]
            if phrases:
                calls.append(("phrase", {"context": text}))
            started = time.perf_counter()
            words: asyncio.Future[None] | None = None
            for i, (method, params) in enumerate(calls):
                done = loop.create_future()
                request_id = 2 * n + i
                pending[request_id] = (method, started, done)
                words = words or done
                last = done
                line = {"jsonrpc": "2.0", "id": request_id, "method": method, "params": params}
                writer.write(json.dumps(line).encode() + b"\n")
            await writer.drain()
            assert words is not None
            await words
        if last is not None:
            await last
    finally:
        writer.close()
        reading.cancel()
    return errors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=paths.default_model_dir())
    parser.add_argument("--text", type=Path, default=DEFAULT_TEXT)
    parser.add_argument("--chars", type=int, default=600, help="keystrokes per mode")
    parser.add_argument("--block", type=int, default=50, help="keystrokes per alternation")
    parser.add_argument("--pause", type=float, default=0.05, help="s between keystrokes")
    args = parser.parse_args()

    import serve_load

    history, test = split_history(read_messages(args.text))
    lead = "\n".join(history)[-HISTORY_CHARS:] + "\n"
    typed = "\n".join(test)[: args.chars]
    texts = [lead + typed[:end] for end in range(1, len(typed) + 1)]
    results: dict[str, dict[str, list[float]]] = {
        mode: {"predict_ms": [], "phrase_ms": [], "shown": []} for mode in ("words", "phrases")
    }
    errors = 0
    root = Path(tempfile.mkdtemp(prefix="kb-phrase-latency", dir="/tmp"))
    try:
        serve_load.personalize_home(root / "home", args.model, history)
        process, sock, _ = serve_load.start_daemon(args.model, 1, root)
        try:
            asyncio.run(serve_load.level(sock, 1, 20, 3, seed=7000))  # warm-up
            # The modes alternate block by block (which goes first, too), over the same
            # keystrokes.
            for n, start in enumerate(range(0, len(texts), args.block)):
                block = texts[start : start + args.block]
                order = ("words", "phrases") if n % 2 == 0 else ("phrases", "words")
                for mode in order:
                    # The mode's name before the typed text: neither mode finds the other's
                    # answers in the daemon's caches.
                    fresh = [f"{lead}{mode}: {t[len(lead) :]}" for t in block]
                    errors += asyncio.run(
                        typist(sock, fresh, mode == "phrases", args.pause, results[mode])
                    )
            log(f"typed {len(texts)} keystrokes in each mode")
        finally:
            serve_load.stop_daemon(process)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    out: dict[str, Any] = {"text": str(args.text), "keystrokes": len(texts), "errors": errors,
                           "pause_s": args.pause}  # fmt: skip
    for mode, r in results.items():
        out[mode] = {
            "p50_ms": round(percentile(r["predict_ms"], 50), 3),
            "p95_ms": round(percentile(r["predict_ms"], 95), 3),
            "p99_ms": round(percentile(r["predict_ms"], 99), 3),
        }
        if r["phrase_ms"]:
            out[mode]["phrase_p50_ms"] = round(percentile(r["phrase_ms"], 50), 3)
            out[mode]["phrase_p95_ms"] = round(percentile(r["phrase_ms"], 95), 3)
            out[mode]["phrase_shown"] = round(sum(r["shown"]) / len(r["shown"]), 4)
    out["p50_ratio"] = round(out["phrases"]["p50_ms"] / out["words"]["p50_ms"], 3)
    out["p95_ratio"] = round(out["phrases"]["p95_ms"] / out["words"]["p95_ms"], 3)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
