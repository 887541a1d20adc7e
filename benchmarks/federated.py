"""Federated learning on a population of writers: the community adapter, trained by hundreds
of simulated machines on Flower (SecAgg+, client clipping, central DP noise), typed by writers
who never federated.

The writers' files (default ../shared/corpus/committers: 230 people's commit messages) are the
clients; each client's history (the first 80% of its lines) is the typing log of a keyboard
home of its own. Held-out writers are never clients: `--heldout-dir DIR` (writers outside the
folder), `--heldout a,b,...`, or by default every 9th writer from the 5th (25 of 230). The
project's Flower app runs under Flower's simulation engine (`flower-superlink --simulation`
and `flwr run`, as tests/test_federated_deployment.py runs it); each round asks each client
with probability --clients-per-round / clients (Poisson sampling), and rounds go on while the
held-out writers' dev loss (on their history lines, computed by the server) improves
(--patience), up to --rounds. Their test lines (the last 20%, the first --max-test-lines) are
typed once, at the end, through the Predictor with the base model and with the community
adapter of the best round (`wordahead.evaluate.simulate.simulate`: KSR@3, next-word top-3).

Runs: the whole population without DP; `--population 10,50` also federates only the first N
clients (how the gain grows with the number of writers); `--noise 0.7,1.0` adds DP runs at
those noise multipliers (epsilon at delta = 1e-6 reported); `--pooled-steps N` trains one
adapter centrally on all clients' history pooled (a reference, not federated). Also reported:
bytes down and up per client per round, seconds per round, the server's and a client's peak
memory. A progress line per round on stderr; JSON on stdout (and --out).

    nice python benchmarks/federated.py [../shared/corpus/committers] [--heldout-dir DIR]
        [--population 10,50] [--noise 1.0] [--pooled-steps 600] [--work DIR] [--out F.json]

`--work DIR` keeps the run's files there: run the same command again after a stop and it
resumes (finished runs are read back, a federation continues from its last round).
`--dev` types the held-out writers' last history lines instead of their test lines (and
leaves those lines out of the dev loss): settings are chosen there.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
DEFAULT_USERS = REPO.parent / "shared" / "corpus" / "committers"
DEFAULT_MODEL = REPO / "models" / "starter"
HELDOUT_EVERY = 9  # without --heldout or --heldout-dir: every 9th writer, from the 5th (26 of 230)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def population(
    users_dir: Path, heldout: str = "", heldout_dir: Path | None = None
) -> tuple[list[Path], list[Path]]:
    """(clients, held-out writers). Held-out writers are never clients: the files of
    `heldout_dir` (writers outside `users_dir`), else the stems listed in `heldout`, else every
    HELDOUT_EVERY-th file of `users_dir` from the 5th (a fixed rule, set before any run)."""
    files = sorted(users_dir.glob("*.jsonl"))
    if heldout_dir is not None:
        held = sorted(heldout_dir.glob("*.jsonl"))
        names = {p.stem for p in held}
        clients = [p for p in files if p.stem not in names]
    elif heldout:
        names = set(heldout.split(","))
        held = [p for p in files if p.stem in names]
        if len(held) != len(names):
            raise SystemExit(f"held-out writers {sorted(names)} not all in {users_dir}")
        clients = [p for p in files if p.stem not in names]
    else:
        held = files[4::HELDOUT_EVERY]
        clients = [p for p in files if p not in held]
    if not held or len(clients) < 3:
        raise SystemExit(f"need held-out writers and at least 3 clients ({users_dir})")
    return clients, held


def population_arguments(parser: argparse.ArgumentParser) -> None:
    """The writers' folder, the model, and the held-out writers (see `population`)."""
    parser.add_argument("users_dir", nargs="?", type=Path, default=DEFAULT_USERS)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--heldout", default="", help="comma-separated writers left out")
    parser.add_argument("--heldout-dir", type=Path, help="held-out writers outside users_dir")


def make_homes(users: list[Path], root: Path, model: Path, groups: str) -> int:
    """node-<i>/ per client: its history in a typing log, federation on, and the training
    graphs made once and linked into every home (a real machine makes its own). Returns the
    words of history."""
    from wordahead.evaluate.harness import read_messages, split_history
    from wordahead.federated.local import FederationSettings
    from wordahead.model.artifacts import ArtifactSet
    from wordahead.model.training_graphs import parse_groups, training_files
    from wordahead.paths import Home
    from wordahead.store.typing_log import TypingLog

    graphs = root / "training-graphs"
    artifacts = ArtifactSet.open(model)
    training_files(artifacts, parse_groups(artifacts, groups or None), graphs)
    words = 0
    for i, path in enumerate(users):
        home = Home.at(root / f"node-{i}")
        history, _ = split_history(read_messages(path))
        with TypingLog(home.typing_log) as typing_log:
            for line in history:
                if typing_log.record(line, source="corpus").stored:
                    words += len(line.split())
        FederationSettings(enabled=True, min_new_words=1).save(home.root)
        shutil.copytree(graphs, home.training_graphs, copy_function=os.link, dirs_exist_ok=True)
    return words


class PeakMemory(threading.Thread):
    """Peak RSS of the federation's processes, sampled every half second: the server app's
    and the largest of the simulated clients' (Ray workers train the clients)."""

    def __init__(self, root_pid: int) -> None:
        super().__init__(daemon=True)
        self.root_pid = root_pid
        self.server = 0
        self.client = 0
        self.done = threading.Event()

    def run(self) -> None:
        import psutil

        while not self.done.wait(0.5):
            try:
                procs = psutil.Process(self.root_pid).children(recursive=True)
            except psutil.Error:
                continue
            for proc in procs:
                try:
                    cmd = " ".join(proc.cmdline())
                    rss = proc.memory_info().rss
                except psutil.Error:
                    continue
                if "serverapp" in cmd or "flwr-simulation" in cmd:
                    self.server = max(self.server, rss)
                elif "ray::" in cmd or "default_worker" in cmd:
                    self.client = max(self.client, rss)
                    own_priority(proc)


def own_priority(proc: Any) -> None:
    """Ray lowers its workers' priority by 15; the clients train at the benchmark's own (a
    run beside other work measures the federation, not the scheduler)."""
    import psutil

    try:
        if proc.nice() > os.nice(0):
            proc.nice(os.nice(0))
    except psutil.Error:  # raising a priority back needs the right to
        pass


def federate(
    homes: Path, out: Path, model: Path, clients: int, args: argparse.Namespace, noise: float,
    dev_text: Path,
) -> tuple[list[dict[str, Any]], dict[str, float]]:  # fmt: skip
    """One federation under the simulation engine (continuing the rounds kept in `out`);
    returns the server's round records and the peak memory in MB."""
    work = out.parent
    flwr_home = work / "flwr"
    flwr_home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "bench"\n\n[superlink.bench]\naddress = "127.0.0.1:{port}"\n'
        f"insecure = true\n\n[superlink.bench.options]\nnum-supernodes = {clients}\n\n"
        "[superlink.bench.options.backend.client-resources]\nnum-cpus = 1\n"
    )
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    env.update(FLWR_HOME=str(flwr_home), RAY_DISABLE_USAGE_STATS="1")
    superlink = subprocess.Popen(
        [str(BIN / "flower-superlink"), "--insecure", "--simulation",
         "--disable-runtime-dependency-installation", "--host", "127.0.0.1", "--port", str(port)],
        stdout=open(work / "superlink.log", "ab"), stderr=subprocess.STDOUT, env=env,
        start_new_session=True,
    )  # fmt: skip
    memory = PeakMemory(superlink.pid)
    memory.start()
    run_config = (
        f"num-server-rounds={args.rounds} min-clients={clients} local-steps={args.local_steps} "
        f"lr={args.lr} batch-size={args.batch_size} groups='{args.groups}' "
        f"clipping-norm={args.clipping_norm} noise-multiplier={noise} "
        f"server-optimizer='{args.server_optimizer}' server-lr={args.server_lr} "
        f"server-momentum={args.server_momentum} server-tau={args.server_tau} "
        f"clients-per-round={args.clients_per_round} dev-text='{dev_text}' "
        f"patience={args.patience} out-dir='{out}' model='{model}' simulation-homes='{homes}' "
        "round-timeout=3600.0"
    )
    rounds_file = out / "rounds.jsonl"
    seen = len(rounds_file.read_text().splitlines()) if rounds_file.is_file() else 0
    try:
        time.sleep(2)
        run = subprocess.Popen(
            [str(BIN / "flwr"), "run", ".", "bench", "--stream", "--run-config", run_config],
            cwd=REPO, env=env, stdout=open(work / "run.log", "ab"), stderr=subprocess.STDOUT,
        )  # fmt: skip
        while run.poll() is None:
            time.sleep(2)
            seen = progress(rounds_file, seen, args.rounds)
        progress(rounds_file, seen, args.rounds)
    finally:
        memory.done.set()
        stop(superlink)
    if run.returncode != 0 or not rounds_file.is_file():
        tail = (work / "run.log").read_text(errors="replace")[-3000:]
        raise SystemExit(f"federation failed ({run.returncode}): {tail}")
    rounds = [json.loads(line) for line in rounds_file.read_text().splitlines()]
    peak = {"server_mb": round(memory.server / 2**20), "client_mb": round(memory.client / 2**20)}
    return rounds, peak


def stop(superlink: subprocess.Popen) -> None:
    """The SuperLink and everything it started (Ray's processes leave its process group)."""
    import psutil

    try:
        family = psutil.Process(superlink.pid).children(recursive=True)
    except psutil.Error:
        family = []
    if superlink.poll() is None:
        os.killpg(superlink.pid, signal.SIGKILL)
        superlink.wait()
    for proc in family:
        try:
            proc.kill()
        except psutil.Error:
            pass


def progress(rounds_file: Path, seen: int, total: int) -> int:
    """A line on stderr per round the server has finished since `seen`."""
    if not rounds_file.is_file():
        return seen
    lines = rounds_file.read_text().splitlines()
    for line in lines[seen:]:
        try:
            r = json.loads(line)
        except ValueError:
            return seen  # a line still being written
        eps = r.get("epsilon")
        log(
            f"  round {r['round']}/{total}: {r['clients']} clients, {r['seconds']:.0f} s"
            + (f", dev loss {r['dev_loss']:.4f}" if "dev_loss" in r else "")
            + (f", epsilon {eps:.2f}" if eps is not None else "")
            + (" (adapter kept)" if r.get("kept") else "")
        )
        seen += 1
    return seen


def typed_lines(path: Path, max_lines: int, dev: bool) -> tuple[list[str], list[str]]:
    """A held-out writer's (history, lines typed): the test lines typed after the history, or
    with `dev` the history's last lines (left out of the history, which is the dev text)."""
    from wordahead.evaluate.harness import read_messages, split_history

    history, test = split_history(read_messages(path))
    if dev:
        history, test = history[:-max_lines], history[-max_lines:]
    return history, test[:max_lines]


def evaluate(
    model: Path, adapter: dict | None, heldout: list[Path], args: argparse.Namespace
) -> dict[str, Any]:
    """KSR@3 and next-word top-3 of each held-out writer, their mean and spread."""
    from wordahead.evaluate.simulate import simulate
    from wordahead.predict.predictor import Predictor

    predictor = Predictor(model, threads=2)
    if adapter is not None and not predictor.load_adapter(adapter, "community"):
        raise SystemExit("the predictor could not load the community adapter")
    out: dict[str, Any] = {"writers": {}}
    for path in heldout:
        history, typed = typed_lines(path, args.max_test_lines, args.dev)
        report = simulate(predictor, typed, history=history, k=3)
        out["writers"][path.stem] = {"ksr": report.ksr, "top3": report.top3, "words": report.words}
    for m in ("ksr", "top3"):
        out[m] = statistics.fmean(v[m] for v in out["writers"].values())
    return out


def gains(scores: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    """Mean gain in points over base, and the spread of the per-writer gains."""
    per = sorted(
        100 * (scores["writers"][w]["ksr"] - base["writers"][w]["ksr"]) for w in base["writers"]
    )
    return {
        "ksr_gain": round(100 * (scores["ksr"] - base["ksr"]), 2),
        "top3_gain": round(100 * (scores["top3"] - base["top3"]), 2),
        "ksr_gain_spread": {
            "min": round(per[0], 2),
            "median": round(statistics.median(per), 2),
            "max": round(per[-1], 2),
            "writers_gaining": sum(g > 0 for g in per),
        },
    }


def pooled_adapter(model: Path, users: list[Path], args: argparse.Namespace) -> dict:
    """The adapter one trainer makes from all the clients' history pooled in one place (no
    federation, no clipping, no noise): a reference for what this text can buy the held-out
    writers at all, whatever the federated recipe."""
    from wordahead.evaluate.harness import read_messages, split_history
    from wordahead.learn.trainer import LoraTrainer
    from wordahead.model.artifacts import ArtifactSet

    artifacts = ArtifactSet.open(model)
    trainer = LoraTrainer(artifacts, threads=2, groups=args.groups or None)
    batches = []
    for path in users:
        history, _ = split_history(read_messages(path))
        batches += trainer.batches(history, artifacts.seq_len, args.batch_size)
    steps = args.pooled_steps
    trainer.fit(batches, max_steps=steps, lr=args.lr, warmup=max(1, steps // 10), seed=0)
    return trainer.adapter()


def summarise(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    def per_client(key: str) -> float:
        values = [v for r in rounds for v in r[key].values()]
        return sum(values) / len(values) if values else 0.0

    dev = [(r["dev_loss"], r["round"]) for r in rounds if "dev_loss" in r]
    return {
        "rounds": len(rounds),
        "best_round": min(dev)[1] if dev else rounds[-1]["round"],
        "dev_loss": [r.get("dev_loss") for r in rounds],
        "clients_per_round": [r["clients"] for r in rounds],
        "seconds_per_round": round(statistics.fmean(r["seconds"] for r in rounds), 2),
        "bytes_down_per_client_round": round(per_client("bytes_down")),
        "bytes_up_per_client_round": round(per_client("bytes_up")),
        "update_norms": [r.get("update_norm") for r in rounds],
        "epsilon": rounds[-1].get("epsilon"),
        "server_peak_rss_mb_in_round": max(r.get("server_peak_rss_mb", 0) for r in rounds),
    }


def run_federation(
    name: str, clients: list[Path], noise: float, heldout: list[Path], base: dict[str, Any],
    work: Path, model: Path, args: argparse.Namespace,
) -> dict[str, Any]:  # fmt: skip
    """One federation (resumed if its rounds are kept in `work`), typed at the end."""
    from wordahead.federated.community import CommunityStore
    from wordahead.model.artifacts import ArtifactSet

    done = work / "result.json"
    if done.is_file():
        log(f"{name}: finished before, read back")
        return json.loads(done.read_text())
    homes = work / "homes"
    shutil.rmtree(homes, ignore_errors=True)  # each run trains on its clients' whole history
    log(f"{name}: {len(clients)} clients, noise multiplier {noise}: making their homes ...")
    words = make_homes(clients, homes, model, args.groups)
    asked = args.clients_per_round or "all the"
    log(f"{name}: federating ({asked} clients a round on average) ...")
    t0 = time.perf_counter()
    rounds, peak = federate(homes, work / "community", model, len(clients), args, noise,
                            work.parent / "dev.txt")  # fmt: skip
    wall = time.perf_counter() - t0
    shutil.rmtree(homes, ignore_errors=True)
    summary = summarise(rounds)  # typed: the best round's adapter (community.npz holds it)
    best = next(r for r in rounds if r["round"] == summary["best_round"])
    store = CommunityStore(work / "community", ArtifactSet.open(model))
    scores = evaluate(model, store.store.load(best["version"]), heldout, args)
    result = {
        "clients": len(clients),
        "training_words": words,
        "noise_multiplier": noise,
        **summary,
        "wall_seconds": round(wall, 1),
        "peak_memory": peak,
        "heldout": scores,
        **gains(scores, base),
    }
    done.write_text(json.dumps(result, indent=2) + "\n")
    log(
        f"{name}: KSR@3 {100 * scores['ksr']:.2f} ({result['ksr_gain']:+.2f}), best round "
        f"{result['best_round']}, epsilon {result['epsilon']}, {wall:.0f} s"
    )
    return result


def dp(args: argparse.Namespace, noise: float) -> argparse.Namespace:
    """The settings of a run at noise multiplier `noise`: --dp-settings ("name=value ...",
    e.g. "clients-per-round=0 rounds=5") override the others in the runs with noise."""
    if noise <= 0 or not args.dp_settings:
        return args
    values = dict(vars(args))
    for item in args.dp_settings.split():
        name, _, value = item.partition("=")
        key = name.replace("-", "_")
        if key not in values or not value:
            raise SystemExit(f"--dp-settings: unknown setting {item!r}")
        values[key] = type(values[key])(value)
    return argparse.Namespace(**values)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    population_arguments(parser)
    parser.add_argument("--population", default="", help="also federate only the first N, ...")
    parser.add_argument("--clients-per-round", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=30, help="at most")
    parser.add_argument("--patience", type=int, default=3)
    parser.add_argument("--local-steps", type=int, default=20)
    parser.add_argument("--lr", type=float, default=0.003)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--groups", default="", help="adapter groups trained (default: model's)")
    parser.add_argument("--clipping-norm", type=float, default=10.0)
    parser.add_argument("--server-optimizer", default="fedavg", help="fedavg, fedavgm, fedadam")
    parser.add_argument("--server-lr", type=float, default=1.0)
    parser.add_argument("--server-momentum", type=float, default=0.9)
    parser.add_argument("--server-tau", type=float, default=1e-3)
    parser.add_argument("--noise", default="", help="DP runs at these noise multipliers")
    parser.add_argument(
        "--dp-settings",
        default="clients-per-round=0 rounds=5 local-steps=10 clipping-norm=3.0 patience=0",
        help="settings of the DP runs that differ (every client every round: more clients "
        "per round is what lowers the noise on their mean)",
    )
    parser.add_argument("--max-test-lines", type=int, default=8)
    parser.add_argument(
        "--dev",
        action="store_true",
        help="type the held-out writers' last history lines instead (for choosing settings)",
    )
    parser.add_argument(
        "--pooled-steps",
        type=int,
        default=0,
        help="also train one adapter on the clients' pooled history (a reference)",
    )
    parser.add_argument("--work", type=Path, help="keep the run here (rerun to resume)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    # `kill` stops a run as Ctrl-C does: the simulation is torn down, the rounds kept resume.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    from wordahead.federated.privacy import DELTA

    model = args.model.resolve()
    clients, heldout = population(args.users_dir, args.heldout, args.heldout_dir)
    result: dict[str, Any] = {
        "model": str(model),
        "clients": len(clients),
        "heldout_writers": [p.stem for p in heldout],
        "settings": {k: str(v) for k, v in vars(args).items() if k != "out"},
        "delta": DELTA,
    }
    scratch = None
    if args.work is None:
        scratch = tempfile.TemporaryDirectory(prefix="keyboard-bench-federated-")
        args.work = Path(scratch.name)
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    dev_text = [line for p in heldout for line in typed_lines(p, args.max_test_lines, args.dev)[0]]
    (work / "dev.txt").write_text("\n".join(line.replace("\n", " ") for line in dev_text))
    base_file = work / "base.json"
    if base_file.is_file():
        base = json.loads(base_file.read_text())
    else:
        log(f"base model on {len(heldout)} held-out writers ...")
        t0 = time.perf_counter()
        base = evaluate(model, None, heldout, args)
        base_file.write_text(json.dumps(base))
        log(f"  KSR@3 {100 * base['ksr']:.2f} ({time.perf_counter() - t0:.0f} s)")
    result["base"] = base
    pooled_file = work / "pooled.json"
    if pooled_file.is_file():
        result["pooled"] = json.loads(pooled_file.read_text())
    elif args.pooled_steps:
        log(f"pooled history, one trainer, {args.pooled_steps} steps ...")
        scores = evaluate(model, pooled_adapter(model, clients, args), heldout, args)
        result["pooled"] = {"steps": args.pooled_steps, "heldout": scores, **gains(scores, base)}
        pooled_file.write_text(json.dumps(result["pooled"]))
        log(f"  KSR@3 {100 * scores['ksr']:.2f} ({result['pooled']['ksr_gain']:+.2f})")
    plan = [("all", clients, 0.0)]
    plan += [(f"noise-{z}", clients, z) for z in map(float, filter(None, args.noise.split(",")))]
    plan += [
        (f"first-{n}", clients[:n], 0.0) for n in map(int, filter(None, args.population.split(",")))
    ]
    result["runs"] = {
        name: run_federation(name, group, z, heldout, base, work / name, model, dp(args, z))
        for name, group, z in plan
    }
    text = json.dumps(result, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)
    if scratch is not None:
        scratch.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
