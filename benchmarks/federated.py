"""What federated learning buys a newcomer: the community adapter, trained by six users' machines
on Flower (SecAgg+, client clipping, central DP noise), typed by two users it never saw.

The public user files (../shared/corpus/users) are the clients. Each user's history (the
first 80% of the lines) goes into the typing log of a keyboard home of its own; two users
are held out. The other six train the community adapter with the project's Flower app under
Flower's simulation engine (`flower-superlink --simulation` and `flwr run`, as
tests/test_federated_deployment.py runs it), once without DP noise and once per noise
multiplier. Then the held-out users' test lines (the last 20%, the first --max-test-lines)
are typed through the Predictor with the base model and with each community adapter
(`wordahead.evaluate.simulate.simulate`, KSR@3 and next-word top-3). Also reported: epsilon at
delta = 1e-6, bytes down and up per client per round, seconds per round (the server's own
rounds.jsonl). Prints JSON on stdout, progress on stderr.

    nice python benchmarks/federated.py [--heldout blogger_739687,president_ronald_reagan]
        [--rounds 5] [--local-steps 30] [--lr 0.002] [--clipping-norm 2.0]
        [--noise 0.05,0.5] [--max-test-lines 40] [--dev] [--out federated.json]
        [--server-optimizer fedadam --server-lr 0.003] [--groups mlp,lm_head]
        [--pooled-steps 1500]

`--pooled-steps N` also trains one adapter for N steps on the six users' history pooled in
one place (no federation, clipping or noise) and types it the same way: a reference for what
the six users' text can buy the held-out users at all, whatever the federated recipe.

`--dev` types the held-out users' last history lines instead of their test lines: settings
are chosen there, the test lines are typed once with the chosen ones.
"""

from __future__ import annotations

import argparse
import json
import os
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
BIN = Path(sys.executable).parent
DEFAULT_USERS = REPO.parent / "shared" / "corpus" / "committers"
DEFAULT_MODEL = REPO / "models" / "starter"
HELDOUT_EVERY = 9  # without --heldout or --heldout-dir: every 9th writer, from the 5th (25 of 230)


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


def make_homes(users: list[Path], root: Path) -> int:
    """node-<i>/ per training user: its history in a typing log, federation on. Returns words."""
    from wordahead.evaluate.harness import read_messages, split_history
    from wordahead.federated.local import FederationSettings
    from wordahead.paths import Home
    from wordahead.store.typing_log import TypingLog

    words = 0
    for i, path in enumerate(users):
        home = Home.at(root / f"node-{i}")
        history, _ = split_history(read_messages(path))
        with TypingLog(home.typing_log) as typing_log:
            for line in history:
                if typing_log.record(line, source="corpus").stored:
                    words += len(line.split())
        FederationSettings(enabled=True, min_new_words=1).save(home.root)
    return words


def federate(
    homes: Path, out: Path, model: Path, clients: int, args: argparse.Namespace, noise: float
) -> list[dict[str, Any]]:
    """One federation run under the simulation engine; returns the server's round records."""
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
        stdout=open(work / "superlink.log", "wb"), stderr=subprocess.STDOUT, env=env,
        start_new_session=True,
    )  # fmt: skip
    run_config = (
        f"num-server-rounds={args.rounds} min-clients={clients} local-steps={args.local_steps} "
        f"lr={args.lr} batch-size={args.batch_size} groups='{args.groups}' "
        f"clipping-norm={args.clipping_norm} noise-multiplier={noise} "
        f"server-optimizer='{args.server_optimizer}' server-lr={args.server_lr} "
        f"server-momentum={args.server_momentum} server-tau={args.server_tau} "
        f"out-dir='{out}' model='{model}' simulation-homes='{homes}' round-timeout=3600.0"
    )
    try:
        time.sleep(2)
        run = subprocess.run(
            [str(BIN / "flwr"), "run", ".", "bench", "--stream", "--run-config", run_config],
            cwd=REPO, env=env, capture_output=True, text=True,
        )  # fmt: skip
    finally:
        if superlink.poll() is None:
            os.killpg(superlink.pid, signal.SIGKILL)
            superlink.wait()
    (work / "run.log").write_text(run.stdout + run.stderr)
    rounds_file = out / "rounds.jsonl"
    if run.returncode != 0 or not rounds_file.is_file():
        raise SystemExit(
            f"federation failed ({run.returncode}): {(run.stdout + run.stderr)[-3000:]}"
        )
    return [json.loads(line) for line in rounds_file.read_text().splitlines()]


def evaluate(
    model: Path, adapter: dict | None, heldout: list[Path], max_lines: int, dev: bool = False
) -> dict[str, Any]:
    from wordahead.evaluate.harness import read_messages, split_history
    from wordahead.evaluate.simulate import simulate
    from wordahead.predict.predictor import Predictor

    predictor = Predictor(model, threads=1)
    if adapter is not None and not predictor.load_adapter(adapter, "community"):
        raise SystemExit("the predictor could not load the community adapter")
    out = {}
    for path in heldout:
        history, test = split_history(read_messages(path))
        if dev:  # tuning: the last lines of the history stand in for the test lines
            history, test = history[:-max_lines], history[-max_lines:]
        report = simulate(predictor, test[:max_lines], history=history, k=3)
        out[path.stem] = {"ksr": report.ksr, "top3": report.top3, "words": report.words}
    out["mean"] = {m: sum(v[m] for v in out.values()) / len(heldout) for m in ("ksr", "top3")}
    return out


def pooled_adapter(model: Path, users: list[Path], args: argparse.Namespace) -> dict:
    """The adapter one trainer makes from all the training users' history pooled in one place
    (no federation, no clipping, no noise): a reference for what this text can buy the
    held-out users at all, whatever the federated recipe."""
    from wordahead.evaluate.harness import read_messages, split_history
    from wordahead.learn.trainer import LoraTrainer
    from wordahead.model.artifacts import ArtifactSet

    artifacts = ArtifactSet.open(model)
    trainer = LoraTrainer(artifacts, threads=1, groups=args.groups or None)
    seq_len = artifacts.seq_len
    batches = []
    for path in users:
        history, _ = split_history(read_messages(path))
        batches += trainer.batches(history, seq_len, args.batch_size)
    steps = args.pooled_steps
    trainer.fit(batches, max_steps=steps, lr=args.lr, warmup=max(1, steps // 10), seed=0)
    return trainer.adapter()


def summarise(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    def per_client(key: str) -> float:
        values = [v for r in rounds for v in r[key].values()]
        return sum(values) / len(values) if values else 0.0

    return {
        "rounds": len(rounds),
        "clients_per_round": [r["clients"] for r in rounds],
        "seconds_per_round": round(sum(r["seconds"] for r in rounds) / len(rounds), 2),
        "bytes_down_per_client_round": round(per_client("bytes_down")),
        "bytes_up_per_client_round": round(per_client("bytes_up")),
        "update_norms": [r.get("update_norm") for r in rounds],
        "epsilon": rounds[-1].get("epsilon"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("users_dir", nargs="?", type=Path, default=DEFAULT_USERS)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--heldout", default=DEFAULT_HELDOUT, help="comma-separated user stems")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--local-steps", type=int, default=30)
    parser.add_argument("--lr", type=float, default=0.002)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--groups", default="", help="adapter groups trained (default: model's)")
    parser.add_argument("--clipping-norm", type=float, default=2.0)
    parser.add_argument("--server-optimizer", default="fedavg", help="fedavg, fedavgm, fedadam")
    parser.add_argument("--server-lr", type=float, default=1.0)
    parser.add_argument("--server-momentum", type=float, default=0.9)
    parser.add_argument("--server-tau", type=float, default=1e-3)
    parser.add_argument("--noise", default="0.05,0.5", help="noise multipliers besides none")
    parser.add_argument("--max-test-lines", type=int, default=40)
    parser.add_argument(
        "--dev",
        action="store_true",
        help="type the held-out users' last history lines instead (for choosing settings)",
    )
    parser.add_argument(
        "--pooled-steps",
        type=int,
        default=0,
        help="also train one adapter on the training users' pooled history (a reference)",
    )
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)

    from wordahead.federated.community import CommunityStore
    from wordahead.federated.privacy import DELTA
    from wordahead.model.artifacts import ArtifactSet

    model = args.model.resolve()
    files = sorted(args.users_dir.glob("*.jsonl"))
    held = set(args.heldout.split(","))
    heldout = [p for p in files if p.stem in held]
    training = [p for p in files if p.stem not in held]
    if len(heldout) != len(held) or len(training) < 3:
        raise SystemExit(f"held-out users {sorted(held)} not all in {args.users_dir}")
    result: dict[str, Any] = {
        "model": str(model),
        "training_users": [p.stem for p in training],
        "heldout_users": [p.stem for p in heldout],
        "settings": {k: v for k, v in vars(args).items() if k not in ("users_dir", "out")},
        "delta": DELTA,
    }
    result["settings"]["model"] = str(model)
    log(f"base model on {', '.join(p.stem for p in heldout)} ...")
    t0 = time.perf_counter()
    base = evaluate(model, None, heldout, args.max_test_lines, args.dev)
    result["base"] = base
    log(f"  KSR@3 {100 * base['mean']['ksr']:.2f} ({time.perf_counter() - t0:.0f} s)")
    if args.pooled_steps:
        log(f"pooled history, one trainer, {args.pooled_steps} steps ...")
        scores = evaluate(
            model, pooled_adapter(model, training, args), heldout, args.max_test_lines, args.dev
        )
        result["pooled"] = {
            "steps": args.pooled_steps,
            "heldout": scores,
            "ksr_gain": round(100 * (scores["mean"]["ksr"] - base["mean"]["ksr"]), 2),
            "top3_gain": round(100 * (scores["mean"]["top3"] - base["mean"]["top3"]), 2),
        }
        log(f"  KSR@3 {100 * scores['mean']['ksr']:.2f} ({result['pooled']['ksr_gain']:+.2f})")
    with tempfile.TemporaryDirectory(prefix="keyboard-bench-federated-") as tmp:
        template = Path(tmp) / "homes"
        result["training_words"] = make_homes(training, template)
        runs = []
        for noise in [0.0] + [float(z) for z in args.noise.split(",") if z]:
            work = Path(tmp) / f"noise-{noise}"
            homes = work / "homes"
            shutil.copytree(template, homes)  # fresh logs: each run's text is new
            log(f"federation: {len(training)} clients, noise multiplier {noise} ...")
            t0 = time.perf_counter()
            rounds = federate(homes, work / "community", model, len(training), args, noise)
            wall = time.perf_counter() - t0
            community = CommunityStore(work / "community", ArtifactSet.open(model)).current()
            scores = evaluate(model, community, heldout, args.max_test_lines, args.dev)
            run = {
                "noise_multiplier": noise,
                **summarise(rounds),
                "wall_seconds": round(wall, 1),
                "heldout": scores,
                "ksr_gain": round(100 * (scores["mean"]["ksr"] - base["mean"]["ksr"]), 2),
                "top3_gain": round(100 * (scores["mean"]["top3"] - base["mean"]["top3"]), 2),
            }
            runs.append(run)
            log(
                f"  KSR@3 {100 * scores['mean']['ksr']:.2f} ({run['ksr_gain']:+.2f}), "
                f"epsilon {run['epsilon']}, {run['seconds_per_round']} s/round, {wall:.0f} s"
            )
        result["runs"] = runs
    text = json.dumps(result, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
