"""Load on the daemon: throughput and latency with 1/10/50 clients, 50 at human speed, memory.

    python benchmarks/serve_load.py                       # a personalized daemon on the starter
    python benchmarks/serve_load.py --plain               # ... serving the base model alone
    python benchmarks/serve_load.py --model DIR           # ... on another artifact set
    python benchmarks/serve_load.py --socket PATH         # load levels on a daemon already running

The daemon it starts serves what a user has after a personalization job: an adapter version
with the phrases of a user's whole history (`--user`, default Obama's: 147,720 words). The
adapter is the model's initial one with small random changes (same shapes, so the same cost
as a trained one; a job takes minutes), and a second such version is what it swaps to.

Each client keeps one connection and sends predict requests one after another, the way an
editor does while someone types: the context grows by a keystroke or two per request, so the
predictor's caches help as they would in use, and each client has its own text. At human
speed each client waits 0.1-0.3 s (5 keystrokes a second) between requests.

Prints JSON: ready time, RSS after load (adapter and phrases served), per level: clients,
requests, errors, throughput (requests/s), round-trip latency p50/p99 (ms) and the model's own
p50 (latency_ms in the answers), the daemon's CPU ms per request; 10 clients' throughput over
1 client's; memory after 100 and 10,000 predicts and after 1 and 20 adapter swaps; presage
(Debian database, a user model that learned the same history; benchmarks/peer_presage.py)
measured in the same run on the same keystrokes: its RSS and its latency, and the ratios.
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

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

DEFAULT_USER = REPO.parent / "shared" / "corpus" / "users" / "president_barack_obama.jsonl"
HUMAN_PAUSE_S = (0.1, 0.3)  # between one client's keystrokes: 5 a second on average

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
    path: str,
    texts: list[str],
    k: int,
    latencies: list[float],
    model_ms: list[float],
    pause: tuple[float, float] | None = None,
    seed: int = 0,
) -> int:
    rng = random.Random(seed)
    reader, writer = await asyncio.open_unix_connection(path)
    errors = 0
    try:
        for i, text in enumerate(texts):
            if pause is not None:
                await asyncio.sleep(rng.uniform(*pause))
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


def cpu_s(pid: int | None) -> float | None:
    """User + system CPU seconds of a process so far (/proc/PID/stat)."""
    if pid is None:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


async def level(
    path: str,
    clients: int,
    per_client: int,
    k: int,
    pause: tuple[float, float] | None = None,
    pid: int | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    latencies: list[float] = []
    model_ms: list[float] = []
    cpu0 = cpu_s(pid)
    started = time.perf_counter()
    errors = await asyncio.gather(
        *(
            client(path, contexts(per_client, seed=seed + n), k, latencies, model_ms, pause, n)
            for n in range(clients)
        )
    )
    wall = time.perf_counter() - started
    cpu1 = cpu_s(pid)
    out: dict[str, Any] = {
        "clients": clients,
        "requests": len(latencies),
        "errors": sum(errors),
        "seconds": round(wall, 3),
        "throughput_rps": round(len(latencies) / wall, 1),
        "p50_ms": round(percentile(latencies, 50), 3),
        "p99_ms": round(percentile(latencies, 99), 3),
        "model_p50_ms": round(percentile(model_ms, 50), 3),
    }
    if pause is not None:
        out["pause_s"] = list(pause)
    if cpu0 is not None and cpu1 is not None and latencies:
        out["daemon_cpu_ms_per_request"] = round((cpu1 - cpu0) * 1000 / len(latencies), 3)
    return out


def rpc(path: str, method: str, params: dict[str, Any] | None = None) -> Any:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(120)
        s.connect(path)
        request = {"jsonrpc": "2.0", "id": 1, "method": method, "params": params or {}}
        s.sendall(json.dumps(request).encode() + b"\n")
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


def rss_mb(pid: int) -> float:
    return round((vm_kb(pid, "VmRSS") or 0) / 1024, 1)


def user_history(user_file: Path) -> list[str]:
    from wordahead.evaluate.harness import read_messages, split_history

    return split_history(read_messages(user_file))[0]


def personalize_home(home_dir: Path, model: Path, history: list[str]) -> dict[str, Any]:
    """Two adapter versions, each with the phrases of `history`, in a fresh keyboard home;
    the first is active. Returns their names and the phrase counts."""
    import numpy as np

    from wordahead.learn.adapter_store import AdapterStore
    from wordahead.model.artifacts import ArtifactSet
    from wordahead.paths import Home
    from wordahead.predict.sources.phrases import PhraseModel

    home = Home.at(home_dir)
    home_dir.mkdir(parents=True, exist_ok=True)
    store = AdapterStore.in_home(home, ArtifactSet.open(model))
    phrases = PhraseModel.from_texts(history)
    raw = phrases.to_bytes()
    counts = {"words": phrases.words, "ngrams": phrases.ngrams}
    initial = store.artifacts.initial_adapter()
    versions = []
    for seed in (1, 2):
        rng = np.random.default_rng(seed)
        tensors = {
            n: (v + rng.normal(0, 0.01, v.shape)).astype(np.float32) for n, v in initial.items()
        }
        meta = {"source": "benchmarks/serve_load.py", "phrases": counts}
        versions.append(store.add(tensors, meta, raw))
    store.use(versions[0])
    return {"versions": versions, "phrases": counts, "phrase_file_bytes": len(raw)}


def start_daemon(
    model: Path, threads: int, root: Path, home: Path | None = None
) -> tuple[subprocess.Popen[bytes], str, float]:
    sock = str(root / "s.sock")
    home = home or root / "home"
    env = dict(os.environ, KEYBOARD_HOME=str(home), KEYBOARD_MODEL=str(model))
    started = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, "-m", "wordahead", "serve", "--foreground", "--socket", sock,
         "--threads", str(threads)],
        env=env, stdout=subprocess.DEVNULL, stderr=open(root / "daemon.log", "wb"), cwd=REPO,
    )  # fmt: skip
    while True:
        if process.poll() is not None:
            raise SystemExit((root / "daemon.log").read_text())
        try:
            rpc(sock, "status")
            return process, sock, time.perf_counter() - started
        except OSError:
            time.sleep(0.01)


def stop_daemon(process: subprocess.Popen[bytes]) -> None:
    process.send_signal(signal.SIGTERM)
    process.wait(60)


def settle_rss(pid: int) -> float:
    time.sleep(1.0)
    return rss_mb(pid)


def memory_under_use(sock: str, pid: int, versions: list[str], home: Path, model: Path) -> dict:
    """RSS after 100 and 10,000 predicts (one client typing), after 1 and 20 adapter swaps."""
    from wordahead.learn.adapter_store import AdapterStore
    from wordahead.model.artifacts import ArtifactSet
    from wordahead.paths import Home

    out: dict[str, Any] = {}
    texts = contexts(10_000, seed=10_000)
    asyncio.run(_replay(sock, texts[:100]))
    out["rss_after_100_predicts_mb"] = settle_rss(pid)
    asyncio.run(_replay(sock, texts[100:]))
    out["rss_after_10000_predicts_mb"] = settle_rss(pid)
    out["predicts_growth_mb"] = round(
        out["rss_after_10000_predicts_mb"] - out["rss_after_100_predicts_mb"], 1
    )
    store = AdapterStore.in_home(Home.at(home), ArtifactSet.open(model))
    swap_texts = contexts(20 * 30, seed=20_000)
    for swap in range(1, 21):
        store.use(versions[swap % 2])
        served = rpc(sock, "reload")
        assert served["adapter"] == versions[swap % 2], served
        asyncio.run(_replay(sock, swap_texts[(swap - 1) * 30 : swap * 30]))
        if swap == 1:
            out["rss_after_1_swap_mb"] = settle_rss(pid)
    out["rss_after_20_swaps_mb"] = settle_rss(pid)
    out["swaps_growth_mb"] = round(out["rss_after_20_swaps_mb"] - out["rss_after_1_swap_mb"], 1)
    return out


async def _replay(sock: str, texts: list[str]) -> None:
    latencies: list[float] = []
    errors = await client(sock, texts, 3, latencies, [])
    if errors:
        raise SystemExit(f"{errors} predict errors")


def presage_peer(history: list[str], texts: list[str], work: Path) -> dict[str, Any]:
    """presage (learned `history`) answering the same keystrokes one after another."""
    from peer_presage import learned_presage

    presage = learned_presage(history, work)
    try:
        latencies = []
        cpu0 = cpu_s(presage.pid)
        for text in texts:
            started = time.perf_counter()
            presage.predict(text, 3)
            latencies.append((time.perf_counter() - started) * 1000)
        cpu1 = cpu_s(presage.pid)
        return {
            "requests": len(texts),
            "p50_ms": round(percentile(latencies, 50), 3),
            "p99_ms": round(percentile(latencies, 99), 3),
            "cpu_ms_per_request": round(((cpu1 or 0) - (cpu0 or 0)) * 1000 / len(texts), 3),
            "rss_mb": rss_mb(presage.pid),
        }
    finally:
        presage.close()


def machine() -> dict[str, Any]:
    return {"cpus": os.cpu_count(), "load_average": [round(x, 2) for x in os.getloadavg()]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="artifact set (default: the starter model)")
    parser.add_argument("--socket", default=None, help="use this running daemon instead")
    parser.add_argument("--user", type=Path, default=DEFAULT_USER, help="whose phrases")
    parser.add_argument("--plain", action="store_true", help="serve the base model, no phrases")
    parser.add_argument("--clients", default="1,10,50", help="comma-separated levels")
    parser.add_argument("--requests", type=int, default=200, help="requests per client")
    parser.add_argument("--human-clients", type=int, default=50)
    parser.add_argument("--human-requests", type=int, default=40, help="per client")
    parser.add_argument("--no-memory", action="store_true", help="skip predicts/swaps RSS")
    parser.add_argument("--no-presage", action="store_true")
    parser.add_argument("--k", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="daemon inference threads")
    args = parser.parse_args()

    from wordahead import paths

    out: dict[str, Any] = {"machine_start": machine()}
    root = None
    process = None
    pid = None
    history = user_history(args.user)
    model = Path(args.model) if args.model else paths.default_model_dir()
    personal: dict[str, Any] | None = None
    if args.socket:
        sock = args.socket
    else:
        root = Path(tempfile.mkdtemp(prefix="kb-bench", dir="/tmp"))
        if not args.plain:
            personal = personalize_home(root / "home", model, history)
            out["phrases"] = personal["phrases"]
        process, sock, ready = start_daemon(model, args.threads, root)
        pid = process.pid
        out["ready_s"] = round(ready, 3)
        out["rss_after_load_mb"] = settle_rss(pid)
    try:
        status = rpc(sock, "status")
        out["model"] = status["model"]
        out["adapter"] = status["adapter"]["version"]
        out["phrases_served"] = status["adapter"]["phrases"]
        out["inference_workers"] = status["server"]["inference_workers"]
        asyncio.run(level(sock, 1, 20, args.k, seed=5000))  # warm-up
        levels = [
            asyncio.run(level(sock, int(n), args.requests, args.k, pid=pid))
            for n in args.clients.split(",")
        ]
        out["levels"] = levels
        by_clients = {lv["clients"]: lv for lv in levels}
        if 1 in by_clients and 10 in by_clients:
            out["throughput_10_vs_1_client"] = round(
                by_clients[10]["throughput_rps"] / by_clients[1]["throughput_rps"], 3
            )
        out["human_speed"] = asyncio.run(
            level(sock, args.human_clients, args.human_requests, args.k, HUMAN_PAUSE_S, pid, 900)
        )
        if process is not None and root is not None and personal and not args.no_memory:
            out["memory"] = memory_under_use(
                sock, process.pid, personal["versions"], root / "home", model
            )
        if process is not None:
            out["peak_rss_mb"] = round((vm_kb(process.pid, "VmHWM") or 0) / 1024, 1)
            out["torch_loaded"] = rpc(sock, "status")["server"]["torch_loaded"]
    finally:
        if process is not None:
            stop_daemon(process)
        if root is not None:
            shutil.rmtree(root, ignore_errors=True)
    if not args.no_presage:
        with tempfile.TemporaryDirectory(prefix="kb-presage", dir="/dev/shm") as work:
            one = contexts(args.requests, seed=0)
            peer = presage_peer(history, one, Path(work))
        out["presage"] = peer
        one_client = next((lv for lv in out["levels"] if lv["clients"] == 1), None)
        out["vs_presage"] = {
            "p50_ratio": one_client and round(one_client["p50_ms"] / peer["p50_ms"], 3),
            "p99_ratio": one_client and round(one_client["p99_ms"] / peer["p99_ms"], 3),
            "cpu_per_request_ratio": one_client
            and one_client.get("daemon_cpu_ms_per_request")
            and round(one_client["daemon_cpu_ms_per_request"] / peer["cpu_ms_per_request"], 3),
            "rss_ratio": out.get("rss_after_load_mb")
            and round(out["rss_after_load_mb"] / peer["rss_mb"], 3),
        }
    out["machine_end"] = machine()
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
