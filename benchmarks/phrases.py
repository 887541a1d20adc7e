"""What phrase completion (ghost text) saves, and how often a shown phrase is right.

For each user file, the phrase-aware simulated user (`wordahead.evaluate.phrase_typist`) types
the first --max-lines lines after the user's history (`--split test`: the test lines, the
last 20%; `--split dev`: the last fifth of the history, for tuning) with the base model and
with the user's personalized model (the nightly job's adapter and phrases, read from
`--homes DIR/USER/job.json`, as benchmarks/trained_homes.py prepares them by running the job: `dev` homes on the
history without its last fifth, `test` homes on the whole history). One typing pass per user
and model records the phrase search's chains (cached in --traces); every phrase setting is
then scored from them:

    report   the word-only KSR@k and with phrases (accept the whole phrase; and the
             accept-one-word variant), trigger rate, precision, KSR points from phrases,
             per user and the means, for the settings given (default: the daemon's)
    tune     (dev only) the grid of settings: for each, the mean precision, trigger rate and
             KSR gain over the users; the chosen one is the largest mean gain among those
             whose mean precision reaches --target-precision and that shows a phrase at
             --min-trigger of the word starts or more (none does: the most precise of those)

Prints JSON on stdout (a summary table on stderr).

    nice python benchmarks/phrases.py --split dev --homes /tmp/trained-homes/dev --tune \
        [--max-lines 40] [--max-chars N] [--traces ~/.cache/keyboard-bench/phrases]
    nice python benchmarks/phrases.py --split test --homes /tmp/trained-homes/test \
        [--threshold T --max-words N --normalised --user-weight W]
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DEFAULT_USERS = REPO.parent / "shared" / "corpus" / "users"
DEFAULT_MODEL = REPO / "models" / "starter"
DEFAULT_TRACES = Path.home() / ".cache" / "keyboard-bench" / "phrases"
MODELS = ("base", "personalized")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def load_predictor(model: Path, kind: str, job_path: Path | None) -> Any:
    from wordahead.predict.predictor import Predictor
    from wordahead.predict.sources.phrases import PhraseModel

    predictor = Predictor(model)
    if kind == "personalized":
        if job_path is None or not job_path.is_file():
            raise SystemExit(f"personalized needs the job's result: {job_path} is missing")
        job = json.loads(job_path.read_text())
        promoted = job["status"] == "promoted" and "phrases_only" not in job.get("metrics", {})
        adapter = job["adapter_path"] if promoted else None
        phrases = PhraseModel.load(job["phrases_path"]) if job.get("phrases_path") else None
        predictor.load_adapter(adapter, phrases=phrases)
    return predictor


def user_trace(args: argparse.Namespace, user: Path, kind: str) -> Any:
    """The typing pass of one user and model, from the cache when it was recorded already."""
    from wordahead.evaluate.harness import history_and_typed
    from wordahead.evaluate.phrase_typist import PhraseTrace, trace

    job = args.homes / user.stem / "job.json" if args.homes else None
    key = json.dumps(
        [user.stem, kind, args.split, args.max_lines, args.max_chars, args.k,
         job.read_text() if job and job.is_file() and kind != "base" else None],
    )  # fmt: skip
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    path = args.traces / f"{user.stem}-{kind}-{args.split}-{digest}.json"
    if path.is_file():
        return PhraseTrace.from_json(json.loads(path.read_text()))
    history, typed = history_and_typed(user, dev=args.split == "dev", max_lines=args.max_lines)
    typed = first_chars(typed, args.max_chars)
    predictor = load_predictor(args.model, kind, job)
    log(f"{user.stem} {kind}: typing {len(typed)} lines")
    traced = trace(predictor, typed, history=history, k=args.k)
    args.traces.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(traced.to_json()))
    log(f"{user.stem} {kind}: {traced.report.seconds:.0f} s, KSR {100 * traced.report.ksr:.2f}")
    return traced


def first_chars(lines: list[str], max_chars: int | None) -> list[str]:
    """The first lines, up to the one that brings them to `max_chars` characters (all: None)."""
    if max_chars is None:
        return lines
    out: list[str] = []
    for line in lines:
        if sum(map(len, out)) >= max_chars:
            break
        out.append(line)
    return out


def settings_grid() -> list[Any]:
    from wordahead.predict.sources.phrase_completion import PhraseSettings

    grid = []
    for normalised, words, weight in itertools.product(
        (False, True), (2, 3, 4, 5), (0.0, 0.3, 0.6)
    ):
        thresholds = (
            (0.5, 0.6, 0.7, 0.8, 0.9) if normalised else (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8)
        )
        for threshold in thresholds:
            grid.append(PhraseSettings(words, threshold, normalised, weight))
    return grid


def score(traces: dict[str, dict[str, Any]], settings: Any, accept_words: bool = False) -> dict:
    from wordahead.evaluate.phrase_typist import replay

    rows: dict[str, dict[str, Any]] = {}
    for kind, by_user in traces.items():
        rows[kind] = {u: replay(t, settings, accept_words).to_json() for u, t in by_user.items()}
    return rows


def means(rows: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Per model, the mean over users (precision: over the users shown a phrase at all, and
    pooled over every phrase shown), and how many files typed cheaper with phrases."""
    out: dict[str, Any] = {}
    for kind, by_user in rows.items():
        n = len(by_user)
        if not n:
            continue
        out[kind] = {
            key: round(sum(r[key] for r in by_user.values()) / n, 6)
            for key in ("ksr_words", "ksr_phrases", "phrase_ksr", "trigger_rate")
        }
        shown = [r for r in by_user.values() if r["shown"]]
        out[kind]["precision"] = (
            round(sum(r["precision"] for r in shown) / len(shown), 6) if shown else 0.0
        )
        out[kind]["precision_users"] = len(shown)
        total = sum(r["shown"] for r in by_user.values())
        out[kind]["precision_pooled"] = (
            round(sum(r["right"] for r in by_user.values()) / total, 6) if total else 0.0
        )
        out[kind]["files_higher"] = sum(r["ksr_phrases"] > r["ksr_words"] for r in by_user.values())
        out[kind]["files"] = n
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("users_dir", nargs="?", type=Path, default=DEFAULT_USERS)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--split", choices=("dev", "test"), default="dev")
    parser.add_argument(
        "--homes",
        type=Path,
        default=None,
        help="DIR/USER/job.json: the nightly job run for each user (personalized)",
    )
    parser.add_argument("--models", default="base,personalized")
    parser.add_argument("--users", default="*.jsonl", help="glob of user files in USERS_DIR")
    parser.add_argument("--max-lines", type=int, default=40)
    parser.add_argument(
        "--max-chars",
        type=int,
        default=None,
        help="of those lines, only the first ones up to this many characters (a slow machine)",
    )
    parser.add_argument("--k", type=int, default=3)
    parser.add_argument("--traces", type=Path, default=DEFAULT_TRACES)
    parser.add_argument("--tune", action="store_true", help="score the grid of settings (dev)")
    parser.add_argument("--target-precision", type=float, default=0.5)
    parser.add_argument(
        "--min-trigger",
        type=float,
        default=0.01,
        help="no setting reaches the target: the most precise one that shows "
        "a phrase at least at this share of word starts",
    )
    parser.add_argument("--threshold", type=float, default=None)
    parser.add_argument("--max-words", type=int, default=None)
    parser.add_argument("--normalised", action="store_true", default=None)
    parser.add_argument("--user-weight", type=float, default=None)
    parser.add_argument("--record-only", action="store_true", help="only type and cache traces")
    args = parser.parse_args()  # fmt: skip

    from wordahead.predict.sources.phrase_completion import PhraseSettings

    if args.tune and args.split != "dev":
        raise SystemExit("--tune reads the dev lines only (--split dev): never tune on test")
    kinds = [k for k in args.models.split(",") if k]
    if bad := set(kinds) - set(MODELS):
        raise SystemExit(f"unknown models {sorted(bad)}: {', '.join(MODELS)}")
    users = sorted(args.users_dir.glob(args.users))
    if not users:
        raise SystemExit(f"no user files {args.users} in {args.users_dir}")
    traces = {kind: {u.stem: user_trace(args, u, kind) for u in users} for kind in kinds}
    if args.record_only:
        return
    base = PhraseSettings()
    settings = PhraseSettings(
        args.max_words or base.max_words,
        args.threshold if args.threshold is not None else base.threshold,
        args.normalised if args.normalised is not None else base.normalised,
        args.user_weight if args.user_weight is not None else base.user_weight,
    )
    out: dict[str, Any] = {
        "split": args.split,
        "max_lines": args.max_lines,
        "max_chars": args.max_chars,
        "k": args.k,
    }
    if args.tune:
        grid = []
        for s in settings_grid():
            grid.append({"settings": asdict(s), "means": means(score(traces, s))})
        out["grid"] = grid
        # A precision is only measured where phrases are shown: at least --min-trigger of
        # the word starts, for every model.
        shows = [g for g in grid if all(
            m["trigger_rate"] >= args.min_trigger for m in g["means"].values())]  # fmt: skip
        ok = [g for g in shows if all(
            m["precision"] >= args.target_precision for m in g["means"].values())]  # fmt: skip
        best = max(ok, key=lambda g: sum(m["phrase_ksr"] for m in g["means"].values()),
                   default=None)  # fmt: skip
        out["target_reached"] = best is not None
        if best is None:
            # No setting is that precise on the dev lines: the most precise one that still
            # shows a phrase at --min-trigger of the word starts (a ghost that is rarely
            # there but mostly right beats one that is often there and mostly wrong).
            best = max(shows, key=lambda g: min(m["precision"] for m in g["means"].values()),
                       default=None)  # fmt: skip
        out["chosen"] = best
        # For the record: what the most keystrokes would cost in precision.
        out["most_saved"] = max(
            grid, key=lambda g: sum(m["phrase_ksr"] for m in g["means"].values())
        )
        if best is not None:
            settings = PhraseSettings(**best["settings"])
    rows = score(traces, settings)
    out["settings"] = asdict(settings)
    out["users"] = rows
    out["means"] = means(rows)
    out["accept_one_word"] = {"means": means(score(traces, settings, accept_words=True))}
    out["word_only_reports"] = {
        kind: {u: t.report.to_json() for u, t in by_user.items()}
        for kind, by_user in traces.items()
    }
    for kind, m in out["means"].items():
        log(
            f"{kind:13s} KSR words {100 * m['ksr_words']:.2f} phrases {100 * m['ksr_phrases']:.2f} "
            f"(+{100 * m['phrase_ksr']:.2f}, {m['files_higher']}/{m['files']} higher) "
            f"trigger {100 * m['trigger_rate']:.1f}% precision {100 * m['precision']:.1f}%"
        )
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
