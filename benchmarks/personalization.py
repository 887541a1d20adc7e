"""What personalization buys per user: `keyboard eval --personalize` over every corpus user file.

For each user file (JSON Lines, ../shared/corpus/users by default) the first 80% of the lines
are the user's history: the real personalization job (`keyboard.personalize.run_job`, as
`keyboard eval --personalize` runs it, in a throwaway keyboard home) trains on them, and the
last 20% (the first --max-test-lines of them) are typed through the Predictor before and
after, with the same typing simulation (`keyboard.evaluation.simulate`). The job's gate may
refuse the adapter: then "after" is the base model again, and the table says so.

Each user runs in its own process and the job in a child of it, so the job's peak RSS is its
own (VmHWM of the job process, read from /proc at its end; ru_maxrss would also count the
predictor). The model directory is copied first, so a model replaced during a long run cannot
mix two models in one table; the int8 choice the Predictor would make is taken once, there.
Prints a table on stderr and JSON on stdout.

    nice python benchmarks/personalization.py [USERS_DIR] [--model models/starter]
        [--max-test-lines 10] [--time-budget 120] [--users 'blogger_*'] [--jobs 1]
        [--out results.json] [--markdown table.md]
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


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def split(path: Path, max_test_lines: int | None) -> tuple[list[str], list[str]]:
    from keyboard.evaluation import read_messages, split_history

    history, test = split_history(read_messages(path))
    return history, test[:max_test_lines] if max_test_lines else test


# --- the job process: the personalization job alone, so its peak RSS is its own -------------
def job_main(path: Path, model: Path, home: Path, time_budget: float | None) -> int:
    from keyboard.evaluation import personalize_in_throwaway_home
    from keyboard.personalize import JobConfig, peak_rss_mb

    history, _ = split(path, None)
    if time_budget is not None:  # the job's own setting, in its home, as a user would set it
        JobConfig.update(home / "personalize.json", time_budget_s=time_budget)
    job = personalize_in_throwaway_home(history, model, home)
    print(json.dumps({"job": job.to_json(), "peak_rss_mb": round(peak_rss_mb(), 1)}))
    return 0


# --- the user process: simulate, run the job (child), simulate with its adapter --------------
def user_main(
    path: Path, model: Path, k: int, max_test_lines: int | None, time_budget: float | None
) -> int:
    from keyboard.evaluation import simulate
    from keyboard.personalize import peak_rss_mb
    from keyboard.predictor import Predictor

    history, test = split(path, max_test_lines)
    if not history or not test:
        raise SystemExit(f"{path}: too few lines for a history/test split")
    predictor = Predictor(model, threads=1)
    before = simulate(predictor, test, history=history, k=k)
    gc.collect()
    with tempfile.TemporaryDirectory(prefix="keyboard-bench-personalization-") as home:
        cmd = [sys.executable, __file__, "--job-process", str(path), "--model", str(model)]
        cmd += ["--home", home]
        if time_budget is not None:
            cmd += ["--time-budget", str(time_budget)]
        t0 = time.perf_counter()
        child = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if child.returncode != 0 or not child.stdout.strip():
            raise SystemExit(f"job process failed ({child.returncode}):\n{child.stderr[-3000:]}")
        out = json.loads(child.stdout.strip().splitlines()[-1])
        job = out["job"]
        after = before  # the gate kept the base model: the user keeps typing with it
        if job["status"] == "promoted":
            if not predictor.load_adapter(job["adapter_path"], phrases=job["phrases_path"]):
                raise SystemExit(f"cannot load the adapter {job['adapter_path']}")
            after = simulate(predictor, test, history=history, k=k)
    metrics = job.get("metrics", {})
    result = {
        "file": path.name,
        "history": len(history),
        "typed": len(test),
        "before": before.to_json(),
        "after": after.to_json(),
        "delta": {m: round(getattr(after, m) - getattr(before, m), 6) for m in METRICS},
        "job": {
            "status": job["status"],
            "reason": job["reason"],
            "promoted": job["status"] == "promoted",
            "seconds": job["seconds"],
            "process_seconds": round(wall, 1),  # with Python start-up and logging the history
            "peak_rss_mb": out["peak_rss_mb"],
            "steps": metrics.get("steps"),
            "stopped": metrics.get("stopped"),
            "gate_before": metrics.get("before"),
            "gate_after": metrics.get("after"),
            "data": metrics.get("data"),
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
    from keyboard.artifacts import ArtifactSet
    from keyboard.quantize import int8_by_default, int8_model

    copy = into / model.name
    shutil.copytree(model, copy)  # copy2 keeps mtimes: a cached int8 graph stays valid
    artifacts = ArtifactSet.open(copy)
    int8 = int8_by_default(artifacts)
    if int8:
        int8_model(artifacts)
    return copy, int8


def averages(results: list[dict[str, Any]]) -> dict[str, Any]:
    n = len(results)
    if not n:
        return {}
    mean = {
        f"{side}_{m}": round(sum(r[side][m] for r in results) / n, 6)
        for side in ("before", "after", "delta")
        for m in METRICS
    }
    mean["job_seconds"] = round(sum(r["job"]["seconds"] for r in results) / n, 1)
    mean["job_peak_rss_mb"] = round(sum(r["job"]["peak_rss_mb"] for r in results) / n, 1)
    mean["steps"] = round(sum(r["job"]["steps"] or 0 for r in results) / n, 1)
    mean["promoted"] = sum(r["job"]["promoted"] for r in results)
    mean["users"] = n
    return mean


def markdown(results: list[dict[str, Any]], k: int) -> str:
    """One row per user: before -> after (percent), the job's cost and its decision."""
    head = (
        f"| user file | typed words | top-1 before | top-1 after | top-3 before | top-3 after "
        f"| KSR@{k} before | KSR@{k} after | Δ KSR@{k} | job s | job peak RSS MB | steps "
        f"| adapter |"
    )
    lines = [head, "|---|" + "---:|" * 11 + "---|"]

    def pct(x: float) -> str:
        return f"{100 * x:.2f}"

    for r in results:
        b, a, j = r["before"], r["after"], r["job"]
        lines.append(
            f"| {r['file']} | {b['words']} | {pct(b['top1'])} | {pct(a['top1'])} "
            f"| {pct(b['top3'])} | {pct(a['top3'])} | {pct(b['ksr'])} | {pct(a['ksr'])} "
            f"| {100 * r['delta']['ksr']:+.2f} | {j['seconds']:.0f} | {j['peak_rss_mb']:.0f} "
            f"| {j['steps']} | {'promoted' if j['promoted'] else j['status']} |"
        )
    m = averages(results)
    if m:
        lines.append(
            f"| **mean** | | {pct(m['before_top1'])} | {pct(m['after_top1'])} "
            f"| {pct(m['before_top3'])} | {pct(m['after_top3'])} | {pct(m['before_ksr'])} "
            f"| {pct(m['after_ksr'])} | **{100 * m['delta_ksr']:+.2f}** | {m['job_seconds']:.0f} "
            f"| {m['job_peak_rss_mb']:.0f} | {m['steps']:.0f} "
            f"| {m['promoted']}/{m['users']} promoted |"
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
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    parser.add_argument("--markdown", type=Path, default=None, help="also write the table here")
    parser.add_argument("--plot", type=Path, default=None, help="also draw a PNG per user here")
    parser.add_argument("--job-process", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--user-process", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--home", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO))

    model = args.model.resolve()
    if args.job_process:
        return job_main(args.job_process, model, args.home, args.time_budget)
    if args.user_process:
        return user_main(args.user_process, model, args.k, args.max_test_lines, args.time_budget)

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
        cmd += ["--k", str(args.k)]
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
                b, a, j = result["before"], result["after"], result["job"]
                log(
                    f"{path.name}: KSR@{args.k} {100 * b['ksr']:.2f} -> {100 * a['ksr']:.2f}, "
                    f"top-3 {100 * b['top3']:.2f} -> {100 * a['top3']:.2f}, job {j['status']} "
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
        from keyboard.evaluation import TypingReport, plot_reports

        rows = {
            Path(r["file"]).stem: {
                "before": TypingReport(**r["before"]),
                "personalized": TypingReport(**r["after"]),
            }
            for r in final["results"]
        }
        plot_reports(rows, args.plot, title="keyboard eval --personalize, per user")
        log(f"plot: {args.plot}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
