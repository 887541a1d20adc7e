"""The newcomer's start: a held-out writer with little history, personalized by the nightly job
from the base model or from the community adapter, typed on their test lines.

Each held-out writer (the rule of benchmarks/federated.py's `population`: never a client of
the federation) gets, per history size N (--words), the first messages of their history (the
first 80% of the file's lines) that make N words, as a newcomer would have typed them (a writer
whose whole history is shorter is left out of that size). Two
throwaway keyboard homes (`wordahead.paths.Home`) per writer and size:

    base home       the messages in its typing log, then the nightly job as `keyboard eval
                    --personalize` runs it (`harness.personalize_in_throwaway_home`), from base
    community home  first `keyboard adapters import community.npz` and `adapters use` (their
                    functions, `adapter_diff.import_diff` and `AdapterStore.use`), then the same
                    messages and the same job, which trains on top of the active adapter

Then the writer's test lines (the last 20%, the first --max-test-lines) are typed through what
the daemon serves from each home (`wordahead.daemon.served.ServedModel.load_active`: the active
adapter and the user's phrases, the stored ones plus the logged text they did not count) with
`wordahead.evaluate.simulate.simulate` (KSR@3, next-word top-3), the recorded messages before
them as context. Four conditions per writer and size:

    base            base model, no job (the phrases of the logged messages, learned live)
    community       the community adapter imported, no job (likewise)
    base+job        the nightly job from base (what `keyboard eval --personalize` measures)
    community+job   the nightly job on top of the imported community adapter

"base" and "community" are the two homes with the active version switched back
(`adapters use base` / `adapters use <community>`) after the job typed its condition.
The test lines are only typed, never logged or trained on. JSON on stdout (per writer, means,
and per-writer gains with min/median/max), progress on stderr.

    nice -n 10 python benchmarks/federated_newcomer.py --community /tmp/community/community.npz
        [WRITERS_DIR] [--words 500,2000] [--max-test-lines 8] [--max-writers N] [--jobs 2]
        [--heldout STEMS | --heldout-dir DIR] [--model models/starter] [--out newcomer.json]
        [--markdown newcomer.md] [--resume]

With --out FILE each writer's row is also appended to FILE.writers.jsonl as it finishes;
--resume keeps the rows there of the same community adapter (by content) and settings and
runs only the writers left.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import TYPE_CHECKING, Any

from federated import log, population, population_arguments
from personalization import T95

if TYPE_CHECKING:
    from wordahead.evaluate.simulate import TypingReport
    from wordahead.paths import Home
    from wordahead.predict.predictor import Predictor

CONDITIONS = ("base", "community", "base+job", "community+job")
# (label, better, worse): the per-writer differences reported, in KSR@3 and top-3 points
GAINS = (
    ("community+job - base+job", "community+job", "base+job"),
    ("community - base", "community", "base"),
    ("base+job - base", "base+job", "base"),
    ("community+job - community", "community+job", "community"),
)


def first_words(history: list[str], words: int) -> list[str]:
    """The first messages of `history` that make at least `words` words (whole messages; all
    of them when the history is shorter)."""
    taken: list[str] = []
    count = 0
    for message in history:
        if count >= words:
            break
        taken.append(message)
        count += len(message.split())
    return taken


def import_community(home: Home, model: Path, community: Path) -> str:
    """`keyboard adapters import COMMUNITY` then `keyboard adapters use` it; its version."""
    from wordahead.learn.adapter_diff import import_diff
    from wordahead.learn.adapter_store import AdapterStore

    store = AdapterStore.in_home(home, model)
    return store.use(import_diff(store, community))


def use(home: Home, model: Path, version: str) -> None:
    """`keyboard adapters use VERSION` in `home`."""
    from wordahead.learn.adapter_store import AdapterStore

    AdapterStore.in_home(home, model).use(version)


def type_served(
    predictor: Predictor, home: Home, model: Path, test: list[str], context: list[str]
) -> tuple[TypingReport, str]:
    """Type `test` with what the daemon serves from `home` (its ServedModel, loaded as at
    start); returns the report and the adapter version served."""
    from concurrent.futures import ThreadPoolExecutor

    from wordahead.daemon.served import ServedModel
    from wordahead.daemon.typing_log_thread import TypingLogThread
    from wordahead.evaluate.simulate import simulate
    from wordahead.learn.adapter_store import AdapterStore

    with ThreadPoolExecutor(1) as pool:
        typing_log = TypingLogThread(home.typing_log, pool)
        if not typing_log.open():
            raise SystemExit(f"cannot open the typing log of {home.root}: {typing_log.problem}")
        try:
            store = AdapterStore.in_home(home, model)
            served = ServedModel(home, predictor, store, typing_log, pool)
            loaded = served.load_active()
            if not loaded["loaded"]:
                raise SystemExit(f"{home.root}: not served as stored: {loaded}")
            report = simulate(predictor, test, history=context, k=3)
        finally:
            typing_log.close()
    predictor.load_adapter(None)  # nothing of this home stays served
    return report, loaded["adapter"]


def job_summary(job: Any) -> dict[str, Any]:
    """What the job did, for the report."""
    metrics = job.metrics or {}
    return {
        "status": job.status,
        "reason": job.reason,
        "version": job.version,
        "adapter_trained": job.status == "promoted" and "phrases_only" not in metrics,
        "steps": metrics.get("steps"),
        "stopped": metrics.get("stopped"),
        "seconds": round(job.seconds, 1),
        "gate_before": metrics.get("before"),
        "gate_after": metrics.get("after"),
    }


def writer_run(
    path: Path, model: Path, community: Path, sizes: list[int], max_lines: int, verbose: bool
) -> dict:
    """Every history size of one writer: both homes, the jobs, the four conditions."""
    from wordahead.evaluate.harness import (
        personalize_in_throwaway_home,
        read_messages,
        split_history,
    )
    from wordahead.paths import Home
    from wordahead.predict.predictor import Predictor

    history, test = split_history(read_messages(path))
    test = test[:max_lines]
    if not history or not test:
        return {"writer": path.stem, "skipped": "too few lines for a history/test split"}
    predictor = Predictor(model, threads=1)
    out: dict[str, Any] = {
        "writer": path.stem,
        "history_words": sum(len(m.split()) for m in history),
        "test_lines": len(test),
        "sizes": {},
    }
    for size in sizes:
        if out["history_words"] < size:  # not a writer with `size` words of history
            out["sizes"][str(size)] = {"skipped": f"{out['history_words']} words of history"}
            continue
        messages = first_words(history, size)
        row: dict[str, Any] = {
            "messages": len(messages),
            "words": sum(len(m.split()) for m in messages),
            "conditions": {},
            "jobs": {},
        }
        with tempfile.TemporaryDirectory(prefix="keyboard-bench-newcomer-") as tmp:
            for start in ("base", "community"):
                home = Home.at(Path(tmp) / start)
                t0 = time.perf_counter()
                version = "base"
                if start == "community":
                    version = import_community(home, model, community)
                events = io.StringIO()  # the job's progress lines; kept only when it fails
                with contextlib.redirect_stderr(sys.stderr if verbose else events):
                    job = personalize_in_throwaway_home(messages, model, home.root)
                if job.status == "failed":
                    log(events.getvalue())
                    raise SystemExit(f"{path.stem}, {size} words, from {start}: {job.reason}")
                job_s = time.perf_counter() - t0
                row["jobs"][start] = {**job_summary(job), "wall_seconds": round(job_s, 1)}
                t0 = time.perf_counter()
                after, served = type_served(predictor, home, model, test, messages)
                row["conditions"][f"{start}+job"] = {**after.to_json(), "served": served}
                use(home, model, version)  # back to the start, the job's text still logged
                before, served = type_served(predictor, home, model, test, messages)
                row["conditions"][start] = {**before.to_json(), "served": served}
                row["jobs"][start]["typing_seconds"] = round(time.perf_counter() - t0, 1)
                log(
                    f"  {path.stem} {row['words']} words from {start}: job {job.status} "
                    f"({job_s:.0f} s), KSR@3 {100 * before.ksr:.2f} -> {100 * after.ksr:.2f} "
                    f"(typing {time.perf_counter() - t0:.0f} s)"
                )
        out["sizes"][str(size)] = row
    return out


def spread(values: list[float]) -> dict[str, Any]:
    """Mean with a 95% t interval, min, median, max (points) and how many are above and below
    zero."""
    mean = statistics.fmean(values)
    half = 0.0
    if len(values) > 1:
        df = len(values) - 1
        t = T95[max(d for d in T95 if d <= df)] if df <= 30 else 1.96  # conservative between
        half = t * statistics.stdev(values) / len(values) ** 0.5
    return {
        "mean": round(mean, 2),
        "ci95": [round(mean - half, 2), round(mean + half, 2)],
        "min": round(min(values), 2),
        "median": round(statistics.median(values), 2),
        "max": round(max(values), 2),
        "positive": sum(v > 0 for v in values),
        "negative": sum(v < 0 for v in values),
        "n": len(values),
    }


def summarise(writers: list[dict], sizes: list[int]) -> dict[str, Any]:
    """Per size: the mean of each condition, and each gain's spread over the writers."""
    out: dict[str, Any] = {}
    for size in sizes:
        rows = [w["sizes"][str(size)] for w in writers if "sizes" in w]
        short = sum("skipped" in r for r in rows)
        rows = [r for r in rows if "skipped" not in r]
        if not rows:
            continue
        means = {
            c: {m: round(100 * statistics.fmean(r["conditions"][c][m] for r in rows), 2)
                for m in ("ksr", "top3")}
            for c in CONDITIONS
        }  # fmt: skip
        gains = {
            label: {
                m: spread([100 * (r["conditions"][a][m] - r["conditions"][b][m]) for r in rows])
                for m in ("ksr", "top3")
            }
            for label, a, b in GAINS
        }
        out[str(size)] = {
            "writers": len(rows),
            "mean_words": round(statistics.fmean(r["words"] for r in rows)),
            "skipped_short_history": short,
            "mean_points": means,
            "gain_points": gains,
            "jobs_promoted": {
                s: sum(r["jobs"][s]["status"] == "promoted" for r in rows)
                for s in ("base", "community")
            },
            "adapters_trained": {
                s: sum(r["jobs"][s]["adapter_trained"] for r in rows) for s in ("base", "community")
            },
        }
    return out


def previous_rows(partial: Path, key: dict[str, Any]) -> dict[str, dict]:
    """The writers' rows an earlier run with the same `key` wrote to `partial`, by writer."""
    if not partial.is_file():
        return {}
    rows = {}
    for line in partial.read_text().splitlines():
        with contextlib.suppress(ValueError, KeyError, TypeError):  # a line cut short
            record = json.loads(line)
            if record["key"] == key:
                rows[record["row"]["writer"]] = record["row"]
    return rows


def markdown(summary: dict[str, Any]) -> str:
    """The summary as docs/results.md tables: the conditions' means, then the gains' spread."""
    lines = [
        "| history | writers | mean words | " + " | ".join(f"{c} KSR@3" for c in CONDITIONS)
        + " | " + " | ".join(f"{c} top-3" for c in CONDITIONS) + " |",
        "|---" * (3 + 2 * len(CONDITIONS)) + "|",
    ]  # fmt: skip
    for size, s in summary.items():
        means = s["mean_points"]
        cells = [f"{means[c]['ksr']:.2f}" for c in CONDITIONS]
        cells += [f"{means[c]['top3']:.2f}" for c in CONDITIONS]
        lines.append(f"| {size} | {s['writers']} | {s['mean_words']} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "| history | gain (KSR@3 points) | mean | 95% CI | min | median | max | writers up / down |",
        "|---|---|---:|---|---:|---:|---:|---|",
    ]
    for size, s in summary.items():
        for label, g in s["gain_points"].items():
            g = g["ksr"]
            lines.append(
                f"| {size} | {label} | {g['mean']:+.2f} | {g['ci95'][0]:+.2f} to {g['ci95'][1]:+.2f} "
                f"| {g['min']:+.2f} | {g['median']:+.2f} "
                f"| {g['max']:+.2f} | {g['positive']} / {g['negative']} of {g['n']} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    population_arguments(parser)
    parser.add_argument("--community", type=Path, required=True,
                        help="the community adapter (a federation's community.npz)")  # fmt: skip
    parser.add_argument("--words", default="500,2000", help="history sizes, in words")
    parser.add_argument("--max-test-lines", type=int, default=8)
    parser.add_argument("--max-writers", type=int, default=0, help="the first N held-out only")
    parser.add_argument("--jobs", type=int, default=2, help="writers run in parallel (processes)")
    parser.add_argument("--verbose", action="store_true", help="the jobs' progress lines too")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--resume", action="store_true",
                        help="keep the writers an earlier run with --out FILE finished "
                        "(FILE.writers.jsonl, same adapter and settings)")  # fmt: skip
    parser.add_argument("--markdown", type=Path, help="also write the summary tables here")
    args = parser.parse_args(argv)
    if args.resume and not args.out:
        parser.error("--resume needs --out")

    model = args.model.resolve()
    community = args.community.resolve()
    if not community.is_file():
        raise SystemExit(f"no community adapter at {community}")
    sizes = [int(w) for w in args.words.split(",") if w]
    _, heldout = population(args.users_dir, args.heldout, args.heldout_dir)
    if args.max_writers:
        heldout = heldout[: args.max_writers]
    log(f"{len(heldout)} held-out writers, {sizes} words, community adapter {community}")
    started = time.perf_counter()
    key = {  # what a finished writer's row depends on: a rerun keeps rows of the same key
        "community_sha256": hashlib.sha256(community.read_bytes()).hexdigest(),
        "model": str(model),
        "words": sizes,
        "max_test_lines": args.max_test_lines,
    }
    partial = args.out.with_name(args.out.name + ".writers.jsonl") if args.out else None
    done = previous_rows(partial, key) if partial and args.resume else {}
    if done:
        log(f"{len(done)} writers kept from {partial}")
    if partial and not args.resume:
        partial.unlink(missing_ok=True)
    todo = [p for p in heldout if p.stem not in done]
    args_of = (model, community, sizes, args.max_test_lines, args.verbose)
    with ProcessPoolExecutor(max(1, args.jobs)) as pool:
        futures = [pool.submit(writer_run, path, *args_of) for path in todo]
        for future in as_completed(futures):
            row = future.result()
            done[row["writer"]] = row
            if partial:  # each writer as it finishes: a run cut short keeps its rows
                with partial.open("a") as f:
                    f.write(json.dumps({"key": key, "row": row}) + "\n")
    writers = [done[p.stem] for p in heldout]
    result = {
        "model": str(model),
        "community": str(community),
        "writers_dir": str(args.users_dir.resolve()),
        "settings": {"words": sizes, "max_test_lines": args.max_test_lines, "k": 3},
        "heldout": [p.stem for p in heldout],
        "summary": summarise(writers, sizes),
        "writers": writers,
        "seconds": round(time.perf_counter() - started, 1),
    }
    for size, s in result["summary"].items():
        gain = s["gain_points"]["community+job - base+job"]["ksr"]
        log(
            f"{size} words: KSR@3 "
            + ", ".join(f"{c} {s['mean_points'][c]['ksr']:.2f}" for c in CONDITIONS)  # fmt: skip
            + f"; community+job - base+job {gain['mean']:+.2f} (min {gain['min']:+.2f}, "
            f"median {gain['median']:+.2f}, max {gain['max']:+.2f}, {gain['positive']}/{gain['n']}"
            " writers gain)"
        )
    if args.markdown:
        args.markdown.write_text(markdown(result["summary"]))
    text = json.dumps(result, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
