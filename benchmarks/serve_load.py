"""Load on the daemon: predict throughput and p50/p99 latency over the socket with 1/10/50 clients.

    python benchmarks/serve_load.py                       # starts a daemon on the starter model
    python benchmarks/serve_load.py --model DIR           # ... on another artifact set
    python benchmarks/serve_load.py --socket PATH         # measures a daemon already running

Each client keeps one connection and sends predict requests one after another, the way an
editor does while someone types: the context grows by a keystroke or two per request, so the
predictor's key/value cache helps as it would in use, and each client has its own text.

Prints JSON: ready time (start to first answer), idle RSS (after start, and after the load)
and peak RSS of a daemon it started; then per level: clients, requests, errors, throughput
(requests/s), latency p50/p99 (ms, round trip measured by the client) and the model's own p50
(latency_ms in the answers).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

SENTENCES = [
    "Thank you so much for your help with the project, I really appreciate it.",
    "Could you please send me the report by Friday afternoon?",
    "I would like to book a table for two at the restaurant tonight.",
    "The meeting has been moved to Tuesday morning at ten o'clock.",
    "Let me know when you arrive at the station, and I will pick you up.",
    "We are going to the beach this weekend if the weather is nice.",
    "Happy birthday! I hope you have a wonderful day with your family.",
    "Don't forget to water the plants while I'm away on holiday.",
    "My favourite programming language is Python, and I write it every day.",
    "I am sorry for the late reply, I was travelling all of last week.",
]


def contexts(n: int, seed: int) -> list[str]:
    """What one user sends while typing: the text before the cursor after every keystroke or
    two, through sentences in a random order, after a preamble of its own (so clients do not
    share cached results)."""
    rng = random.Random(seed)
    typed = f"Note {seed}: "
    out: list[str] = []
    while len(out) < n:
        sentence = rng.choice(SENTENCES) + " "
        at = 0
        while at < len(sentence) and len(out) < n:
            at += rng.randint(1, 2)
            out.append(typed + sentence[:at])
        typed += sentence
    return out


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


async def client(
    path: str, texts: list[str], k: int, latencies: list[float], model_ms: list[float]
) -> int:
    reader, writer = await asyncio.open_unix_connection(path)
    errors = 0
    try:
        for i, text in enumerate(texts):
            request = {"jsonrpc": "2.0", "id": i, "method": "predict",
                       "params": {"context": text, "k": k}}  # fmt: skip
            started = time.perf_counter()
            writer.write(json.dumps(request).encode() + b"\n")
            await writer.drain()
            answer = json.loads(await reader.readline())
            latencies.append((time.perf_counter() - started) * 1000)
            if answer.get("id") != i or "result" not in answer:
                errors += 1
            else:
                model_ms.append(answer["result"]["latency_ms"])
    finally:
        writer.close()
    return errors


async def level(path: str, clients: int, per_client: int, k: int) -> dict[str, Any]:
    latencies: list[float] = []
    model_ms: list[float] = []
    started = time.perf_counter()
    errors = await asyncio.gather(
        *(
            client(path, contexts(per_client, seed=n), k, latencies, model_ms)
            for n in range(clients)
        )
    )
    wall = time.perf_counter() - started
    return {
        "clients": clients,
        "requests": len(latencies),
        "errors": sum(errors),
        "seconds": round(wall, 3),
        "throughput_rps": round(len(latencies) / wall, 1),
        "p50_ms": round(percentile(latencies, 50), 3),
        "p99_ms": round(percentile(latencies, 99), 3),
        "model_p50_ms": round(percentile(model_ms, 50), 3),
    }


def rpc(path: str, method: str) -> Any:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(30)
        s.connect(path)
        s.sendall(json.dumps({"jsonrpc": "2.0", "id": 1, "method": method}).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                raise ConnectionError("the daemon closed the connection")
            data += chunk
    return json.loads(data)["result"]


def vm_kb(pid: int, field: str) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return float(line.split()[1])
    except OSError:
        pass
    return None


def start_daemon(
    model: Path, threads: int, root: Path
) -> tuple[subprocess.Popen[bytes], str, float]:
    sock = str(root / "s.sock")
    env = dict(os.environ, KEYBOARD_HOME=str(root / "home"), KEYBOARD_MODEL=str(model))
    started = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, "-m", "keyboard", "serve", "--foreground", "--socket", sock,
         "--threads", str(threads)],
        env=env, stdout=subprocess.DEVNULL, stderr=open(root / "daemon.log", "wb"),
    )  # fmt: skip
    while True:
        if process.poll() is not None:
            raise SystemExit((root / "daemon.log").read_text())
        try:
            rpc(sock, "status")
            return process, sock, time.perf_counter() - started
        except OSError:
            time.sleep(0.01)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="artifact set (default: the starter model)")
    parser.add_argument("--socket", default=None, help="use this running daemon instead")
    parser.add_argument("--clients", default="1,10,50", help="comma-separated levels")
    parser.add_argument("--requests", type=int, default=200, help="requests per client")
    parser.add_argument("--k", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="daemon inference threads")
    args = parser.parse_args()

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from keyboard import paths

    out: dict[str, Any] = {"cpu_count": os.cpu_count()}
    root = None
    process = None
    if args.socket:
        sock = args.socket
    else:
        model = Path(args.model) if args.model else paths.default_model_dir()
        root = Path(tempfile.mkdtemp(prefix="kb-bench", dir="/tmp"))
        process, sock, ready = start_daemon(model, args.threads, root)
        out["ready_s"] = round(ready, 3)
        time.sleep(1.0)
        out["idle_rss_mb"] = round((vm_kb(process.pid, "VmRSS") or 0) / 1024, 1)
    try:
        status = rpc(sock, "status")
        out["model"] = status["model"]
        out["adapter"] = status["adapter"]["version"]
        out["inference_workers"] = status["server"]["inference_workers"]
        asyncio.run(level(sock, 1, 20, args.k))  # warm-up
        out["levels"] = [
            asyncio.run(level(sock, int(n), args.requests, args.k)) for n in args.clients.split(",")
        ]
        if process is not None:
            time.sleep(2.0)
            out["rss_after_load_mb"] = round((vm_kb(process.pid, "VmRSS") or 0) / 1024, 1)
            out["peak_rss_mb"] = round((vm_kb(process.pid, "VmHWM") or 0) / 1024, 1)
            out["torch_loaded"] = rpc(sock, "status")["server"]["torch_loaded"]
    finally:
        if process is not None:
            process.send_signal(signal.SIGTERM)
            process.wait(30)
        if root is not None:
            shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
