"""What personalization buys per user, part by part: base, phrases only, LoRA only,
LoRA + phrases, and continuous use, over every corpus user file.

For each user file (JSON Lines, ../shared/corpus/users by default) the first 80% of the lines
are the user's history: the real personalization job (`wordahead.learn.personalize.run_job`, as
`keyboard eval --personalize` runs it, in a throwaway keyboard home) trains on them, and the
last 20% (the first --max-test-lines of them) are typed through the Predictor with the same
typing simulation (`wordahead.evaluate.simulate.simulate`) under each condition:

    base          the shipped model, no phrases
    phrases       the base model with the job's phrases (the user's word n-grams)
    lora          the job's adapter alone
    lora+phrases  what the daemon serves after the job ("after")
    continuous    lora+phrases, and each test message is learned (wordahead.predict.sources.live_phrases)
                  right after it is typed, as the daemon's observe does

The job's gate may refuse the adapter (then "lora" is the base model: what the user gets) or
keep the old adapter with new phrases; the table says so. Means come with a paired 95%
confidence interval over the users (t distribution) and the number of files that gained.

Each user runs in its own process and the job in a child of it, so the job's peak RSS is its
own (VmHWM of the job process, read from /proc at its end; ru_maxrss would also count the
predictor). The model directory is copied first, so a model replaced during a long run cannot
mix two models in one table; the int8 choice the Predictor would make is taken once, there.
Prints a table on stderr and JSON on stdout.

    nice python benchmarks/personalization.py [USERS_DIR] [--model models/starter]
        [--max-test-lines 10] [--time-budget 120] [--users 'blogger_*'] [--jobs 1]
        [--conditions base,phrases,lora,lora+phrases,continuous]
        [--job-config '{"groups": "mlp,lm_head", "lr": 0.002}']
        [--dev] [--out results.json] [--markdown table.md]
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DEFAULT_USERS = REPO.parent / "shared" / "corpus" / "users"
DEFAULT_MODEL = REPO / "models" / "starter"
METRICS = ("top1", "top3", "ksr")
CONDITIONS = ("base", "phrases", "lora", "lora+phrases", "continuous")
# Two-sided 95% t quantiles by degrees of freedom (paired CIs over a handful of users).
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
       9: 2.262, 10: 2.228, 15: 2.131, 20: 2.086, 30: 2.042}  # fmt: skip


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --- the job process: the personalization job alone, so its peak RSS is its own -------------
def job_main(
    path: Path,
    model: Path,
    home: Path,
    time_budget: float | None,
    job_config: dict[str, Any],
    dev: bool,
) -> int:
    from wordahead.evaluate.harness import history_and_typed, personalize_in_throwaway_home
    from wordahead.learn.policy import JobConfig
    from wordahead.memory import peak_rss_mb

    history, _ = history_and_typed(path, dev)
    settings = dict(job_config)
    if time_budget is not None:
        settings["time_budget_s"] = time_budget
    if settings:  # the job's own settings, in its home, as a user would set them
        home.mkdir(mode=0o700, exist_ok=True)
        JobConfig.update(home / "personalize.json", **settings)
    job = personalize_in_throwaway_home(history, model, home)
    print(json.dumps({"job": job.to_json(), "peak_rss_mb": round(peak_rss_mb(), 1)}))
    return 0


# --- the user process: simulate, run the job (child), simulate with its adapter --------------
def user_main(
    path: Path,
    model: Path,
    k: int,
    max_test_lines: int | None,
    time_budget: float | None,
    job_config: str,
    conditions: list[str],
    dev: bool,
    phrase_weights: list[float],
) -> int:
    from wordahead.evaluate.harness import history_and_typed
    from wordahead.evaluate.simulate import simulate
    from wordahead.memory import peak_rss_mb
    from wordahead.predict.predictor import Predictor
    from wordahead.predict.sources.live_phrases import LivePhrases
    from wordahead.predict.sources.phrases import PhraseModel, blend_weight

    history, test = history_and_typed(path, dev, max_test_lines or None)
    if not history or not test:
        raise SystemExit(f"{path}: too few lines for a history/test split")
    predictor = Predictor(model, threads=1)
    reports: dict[str, Any] = {}
    if "base" in conditions:
        reports["base"] = simulate(predictor, test, history=history, k=k)
    gc.collect()
    with tempfile.TemporaryDirectory(prefix="keyboard-bench-personalization-") as home:
        cmd = [sys.executable, __file__, "--job-process", str(path), "--model", str(model)]
        cmd += ["--home", home, "--job-config", job_config] + (["--dev"] if dev else [])
        if time_budget is not None:
            cmd += ["--time-budget", str(time_budget)]
        t0 = time.perf_counter()
        child = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if child.returncode != 0 or not child.stdout.strip():
            raise SystemExit(f"job process failed ({child.returncode}):\n{child.stderr[-3000:]}")
        out = json.loads(child.stdout.strip().splitlines()[-1])
        job = out["job"]
        metrics = job.get("metrics", {})
        promoted = job["status"] == "promoted"
        # The adapter the user gets: the job's, unless the gate kept the old one (the base).
        adapter = job["adapter_path"] if promoted and "phrases_only" not in metrics else None
        stored = PhraseModel.load(job["phrases_path"]) if job.get("phrases_path") else None
        alone = None  # the phrases on the base model: their share as the job gives it there
        if stored is not None:
            alone = PhraseModel.load(job["phrases_path"])
            alone.weight = blend_weight(adapted=False)
        served = {
            "phrases": (None, alone),
            "lora": (adapter, None),
            "lora+phrases": (adapter, stored),
        }
        for condition in ("phrases", "lora", "lora+phrases", "continuous"):
            if condition not in conditions:
                continue
            learn = None
            if condition == "continuous":
                live = LivePhrases(stored)
                ok = predictor.load_adapter(adapter, phrases=live)

                def learn(message: str, live: LivePhrases = live) -> None:
                    live.learn(message)
                    predictor.user_phrases_changed()
            else:
                tensors, phrases = served[condition]
                ok = predictor.load_adapter(tensors, phrases=phrases)
            if not ok:
                raise SystemExit(f"cannot load the job's adapter/phrases for {condition}")
            reports[condition] = simulate(
                predictor, test, history=history, k=k, after_message=learn
            )
            gc.collect()
        # Tuning the phrase model's share of the blend: lora+phrases again at other weights.
        for weight in phrase_weights if stored is not None else ():
            tuned = PhraseModel.load(job["phrases_path"])
            tuned.weight = weight
            if not predictor.load_adapter(adapter, phrases=tuned):
                raise SystemExit("cannot load the job's adapter/phrases")
            reports[f"lora+phrases@{weight:g}"] = simulate(predictor, test, history=history, k=k)
    result = {
        "file": path.name,
        "history": len(history),
        "typed": len(test),
        "conditions": {c: r.to_json() for c, r in reports.items()},
        "job": {
            "status": job["status"],
            "reason": job["reason"],
            "promoted": promoted,
            "adapter_trained": adapter is not None,
            "seconds": job["seconds"],
            "process_seconds": round(wall, 1),  # with Python start-up and logging the history
            "peak_rss_mb": out["peak_rss_mb"],
            "steps": metrics.get("steps"),
            "stopped": metrics.get("stopped"),
            "train_seconds": metrics.get("train_seconds"),
            "gate_before": metrics.get("before"),
            "gate_after": metrics.get("after"),
            "data": metrics.get("data"),
            "fold_in": metrics.get("fold_in"),  # steps on the held-out slice after the gate
            "shares": metrics.get("shares"),  # held-out KSR@3 per phrase share tried
            "phrase_share": None if stored is None else stored.weight,
        },
        "predictor_peak_rss_mb": round(peak_rss_mb(), 1),
    }
    print(json.dumps(result))
    return 0


# --- the driver ---------------------------------------------------------------------------
def model_info(model: Path) -> dict[str, Any]:
    manifest = model / "manifest.json"
    data = json.loads(manifest.read_text())
    head = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    return {
        "dir": str(model),
        "name": data.get("name") or Path(str(data["base_model"].get("id", model))).name,
        "manifest_sha256": hashlib.sha256(manifest.read_bytes()).hexdigest(),
        "base_model_sha256": data["base_model"].get("sha256"),
        "parameters": data["base_model"].get("parameters"),
        "manifest_mtime": time.strftime(
            "%Y-%m-%dT%H:%M:%SZ", time.gmtime(manifest.stat().st_mtime)
        ),
        "repo_commit": head,
        "model_commit": subprocess.run(
            ["git", "-C", str(REPO), "log", "-1", "--format=%h %cI", "--", str(model)],
            capture_output=True,
            text=True,
        ).stdout.strip(),
    }


def snapshot(model: Path, into: Path) -> tuple[Path, bool]:
    """A private copy of the artifact set, and whether the Predictor serves it as int8 (the
    int8 graph is made here, once, so parallel users never quantize at the same time)."""
    from wordahead.model.artifacts import ArtifactSet
    from wordahead.model.quantize import int8_by_default, int8_model

    copy = into / model.name
    shutil.copytree(model, copy)  # copy2 keeps mtimes: a cached int8 graph stays valid
    artifacts = ArtifactSet.open(copy)
    int8 = int8_by_default(artifacts)
    if int8:
        int8_model(artifacts)
    return copy, int8


def paired(results: list[dict[str, Any]], a: str, b: str, metric: str = "ksr") -> dict[str, Any]:
    """Mean over users of (a - b) in points, a 95% confidence interval (paired t), and the
    number of users where a > b."""
    diffs = [
        100 * (r["conditions"][a][metric] - r["conditions"][b][metric])
        for r in results
        if a in r["conditions"] and b in r["conditions"]
    ]
    n = len(diffs)
    if not n:
        return {}
    mean = sum(diffs) / n
    half = 0.0
    if n > 1:
        sd = (sum((d - mean) ** 2 for d in diffs) / (n - 1)) ** 0.5
        df = n - 1
        t = T95.get(df) or T95[max(d for d in T95 if d <= df)] if df <= 30 else 1.96
        half = t * sd / n**0.5
    return {
        "mean": round(mean, 3),
        "ci95": [round(mean - half, 3), round(mean + half, 3)],
        "positive": sum(d > 0 for d in diffs),
        "n": n,
    }


COMPARISONS = (  # (a, b): the gains the targets are stated in
    ("phrases", "base"),
    ("lora", "base"),
    ("lora+phrases", "base"),
    ("lora+phrases", "phrases"),
    ("continuous", "base"),
    ("continuous", "lora+phrases"),
)


def averages(results: list[dict[str, Any]]) -> dict[str, Any]:
    n = len(results)
    if not n:
        return {}
    present = [c for c in CONDITIONS if all(c in r["conditions"] for r in results)]
    mean: dict[str, Any] = {
        f"{c}_{m}": round(sum(r["conditions"][c][m] for r in results) / n, 6)
        for c in present
        for m in METRICS
    }
    mean["gains_ksr_points"] = {
        f"{a} - {b}": paired(results, a, b) for a, b in COMPARISONS if a in present and b in present
    }
    mean["job_seconds"] = round(sum(r["job"]["seconds"] for r in results) / n, 1)
    mean["job_peak_rss_mb"] = round(sum(r["job"]["peak_rss_mb"] for r in results) / n, 1)
    mean["steps"] = round(sum(r["job"]["steps"] or 0 for r in results) / n, 1)
    mean["promoted"] = sum(r["job"]["promoted"] for r in results)
    mean["adapter_trained"] = sum(r["job"]["adapter_trained"] for r in results)
    mean["users"] = n
    return mean


def markdown(results: list[dict[str, Any]], k: int) -> str:
    """KSR@k per user and condition, the gains, and the job's cost and decision."""
    present = [c for c in CONDITIONS if results and all(c in r["conditions"] for r in results)]
    head = "| user file | typed words | " + " | ".join(f"KSR@{k} {c}" for c in present)
    head += " | job s | job peak RSS MB | steps | adapter |"
    lines = [head, "|---|" + "---:|" * (len(present) + 4) + "---|"]
    for r in results:
        c, j = r["conditions"], r["job"]
        words = next(iter(c.values()))["words"] if c else 0
        decision = "promoted" if j["adapter_trained"] else (
            "phrases only" if j["promoted"] else j["status"]
        )  # fmt: skip
        if j.get("phrase_share") is not None:
            decision += f", share {j['phrase_share']:g}"
        lines.append(
            f"| {r['file']} | {words} | "
            + " | ".join(f"{100 * c[x]['ksr']:.2f}" for x in present)
            + f" | {j['seconds']:.0f} | {j['peak_rss_mb']:.0f} | {j['steps']} | {decision} |"
        )
    m = averages(results)
    if m:
        lines.append(
            "| **mean** | | "
            + " | ".join(f"{100 * m[f'{x}_ksr']:.2f}" for x in present)
            + f" | {m['job_seconds']:.0f} | {m['job_peak_rss_mb']:.0f} | {m['steps']:.0f} "
            f"| {m['adapter_trained']}/{m['users']} adapters |"
        )
        lines += ["", f"| KSR@{k} gain (points) | mean | 95% CI (paired) | files gaining |"]
        lines.append("|---|---:|---|---:|")
        for name, g in m["gains_ksr_points"].items():
            lines.append(
                f"| {name} | {g['mean']:+.2f} | [{g['ci95'][0]:+.2f}, {g['ci95'][1]:+.2f}] "
                f"| {g['positive']}/{g['n']} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("users_dir", nargs="?", type=Path, default=DEFAULT_USERS)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--k", type=int, default=3)
    parser.add_argument("--max-test-lines", type=int, default=None, metavar="N",
                        help="type only the first N test lines (the history stays whole)")  # fmt: skip
    parser.add_argument("--time-budget", type=float, default=None, metavar="S",
                        help="the job's time budget in seconds (default: the job's own, 600)")  # fmt: skip
    parser.add_argument("--users", default="*.jsonl", help="glob of user files in USERS_DIR")
    parser.add_argument("--jobs", type=int, default=1, help="users evaluated at a time")
    parser.add_argument(
        "--conditions",
        default=",".join(CONDITIONS),
        help=f"what to type the test lines with (default: all of {CONDITIONS})",
    )
    parser.add_argument("--job-config", default="{}",
                        help="personalize.json settings for the job, as JSON (groups, lr, ...)")  # fmt: skip
    parser.add_argument("--dev", action="store_true",
                        help="tune: train on the first 80%% of each history, type its last 20%%")  # fmt: skip
    parser.add_argument("--phrase-weights", default="", metavar="W,W",
                        help="also type lora+phrases with these phrase weights (tuning, with --dev)")  # fmt: skip
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    parser.add_argument("--markdown", type=Path, default=None, help="also write the table here")
    parser.add_argument("--plot", type=Path, default=None, help="also draw a PNG per user here")
    parser.add_argument("--job-process", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--user-process", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--home", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO))

    model = args.model.resolve()
    conditions = [c.strip() for c in args.conditions.split(",") if c.strip()]
    if unknown := set(conditions) - set(CONDITIONS):
        parser.error(f"unknown conditions {sorted(unknown)}; known: {', '.join(CONDITIONS)}")
    job_config = json.loads(args.job_config)
    weights = [float(w) for w in args.phrase_weights.split(",") if w.strip()]
    if args.job_process:
        return job_main(args.job_process, model, args.home, args.time_budget, job_config, args.dev)
    if args.user_process:
        return user_main(
            args.user_process, model, args.k, args.max_test_lines, args.time_budget,
            args.job_config, conditions, args.dev, weights,
        )  # fmt: skip

    if not (model / "manifest.json").is_file():
        parser.error(f"no model at {model}")
    files = sorted(p for p in args.users_dir.glob(args.users) if p.is_file())
    if not files:
        parser.error(f"no user files match {args.users!r} in {args.users_dir}")
    settings = {
        "users_dir": str(args.users_dir),
        "users": args.users,
        "k": args.k,
        "max_test_lines": args.max_test_lines,
        "time_budget_s": args.time_budget,
        "jobs": args.jobs,
        "conditions": conditions,
        "job_config": job_config,
        "dev": args.dev,
        "phrase_weights": weights,
    }
    info = model_info(model)
    workdir = Path(tempfile.mkdtemp(prefix="keyboard-bench-model-"))
    try:
        private, info["int8"] = snapshot(model, workdir)
        return drive(args, files, settings, info, private)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def drive(
    args: argparse.Namespace,
    files: list[Path],
    settings: dict[str, Any],
    info: dict[str, Any],
    model: Path,
) -> int:
    log(f"model {info['dir']} ({info['model_commit'] or 'not committed'}; manifest sha256 "
        f"{info['manifest_sha256'][:12]}; int8 {info['int8']}), {len(files)} users, {settings}")  # fmt: skip
    started = time.perf_counter()
    results: dict[str, dict[str, Any]] = {}
    failures: dict[str, str] = {}

    def report(complete: bool) -> dict[str, Any]:
        done = [results[f.name] for f in files if f.name in results]
        return {
            "benchmark": "personalization",
            "complete": complete,
            "settings": settings,
            "model": info,
            "seconds": round(time.perf_counter() - started, 1),
            "results": done,
            "failures": failures,
            "mean": averages(done),
        }

    def run_user(path: Path) -> tuple[Path, dict[str, Any] | str, float]:
        cmd = [sys.executable, __file__, "--user-process", str(path), "--model", str(model)]
        cmd += ["--k", str(args.k), "--conditions", args.conditions]
        cmd += ["--job-config", args.job_config] + (["--dev"] if args.dev else [])
        cmd += ["--phrase-weights", args.phrase_weights]
        if args.max_test_lines:
            cmd += ["--max-test-lines", str(args.max_test_lines)]
        if args.time_budget is not None:
            cmd += ["--time-budget", str(args.time_budget)]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        seconds = time.perf_counter() - t0
        if proc.returncode != 0 or not proc.stdout.strip():
            return path, (proc.stderr.strip() or f"exit {proc.returncode}")[-2000:], seconds
        return path, json.loads(proc.stdout.strip().splitlines()[-1]), seconds

    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        # Threads are enough: each user's work happens in its own processes.
        for path, result, seconds in pool.map(run_user, files):
            if isinstance(result, str):
                failures[path.name] = result
                log(f"{path.name}: FAILED ({seconds:.0f} s)\n{result}")
            else:
                results[path.name] = result
                j = result["job"]
                ksr = ", ".join(
                    f"{c} {100 * r['ksr']:.2f}" for c, r in result["conditions"].items()
                )
                log(
                    f"{path.name}: KSR@{args.k} {ksr}; job {j['status']} "
                    f"({j['steps']} steps, {j['seconds']:.0f} s, {j['peak_rss_mb']:.0f} MB); "
                    f"{seconds:.0f} s"
                )
            if args.out:  # partial results survive an interrupted run
                args.out.write_text(json.dumps(report(False), indent=2) + "\n")

    final = report(True)
    text = json.dumps(final, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    table = markdown(final["results"], args.k)
    log("\n" + table)
    if args.markdown:
        args.markdown.write_text(table + "\n")
    if args.plot and final["results"]:
        from wordahead.evaluate.harness import plot_reports
        from wordahead.evaluate.simulate import TypingReport

        rows = {
            Path(r["file"]).stem: {c: TypingReport(**v) for c, v in r["conditions"].items()}
            for r in final["results"]
        }
        plot_reports(rows, args.plot, title="benchmarks/personalization.py, per user")
        log(f"plot: {args.plot}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
