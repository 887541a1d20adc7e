"""Peer benchmark: the typing simulation of wordahead.evaluate.harness, driving Debian's presage.

For every user file (../shared/corpus/users/*.jsonl) and the split rule of keyboard eval
(first floor(0.8 n) lines history, the rest typed), presage is measured twice: with an empty
user model ("no learning") and after presage has learned the history through its learning
API ("learned"). Two base n-gram databases: Debian's shipped English one and a "fair" one,
a 3-gram database that presage's own text2ngram builds from ../shared/corpus/base (the text
the starter model learns from), cached outside the repo. keyboard itself (base model, and
personalized by its nightly job) is typed on the same splits in the same run when the starter
model is there.

    python benchmarks/peer_presage.py [--max-lines 20] [--databases debian,fair] [--k 3]
        [--out results.json] [--markdown table.md]

Prints JSON on stdout and a Markdown table on stderr. Heavy: run it under `nice -n 10`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from wordahead.evaluate.harness import read_messages, split_history  # noqa: E402
from wordahead.evaluate.simulate import simulate  # noqa: E402
from wordahead.predict.words import partial_word  # noqa: E402
from wordahead.types import Candidate, KeyboardError, Prediction  # noqa: E402

SHIM_SOURCE = REPO / "benchmarks" / "presage_shim" / "presage_shim.cpp"
SETUP_SCRIPT = REPO / "benchmarks" / "setup_presage.sh"
DEBIAN_DB = Path("/usr/share/presage/database_en.db")
ABBREVIATIONS = Path("/usr/share/presage/abbreviations_en.txt")
CORPUS = REPO.parent / "shared" / "corpus"


def cache_dir() -> Path:
    override = os.environ.get("KEYBOARD_BENCH_CACHE")
    path = Path(override) if override else Path.home() / ".cache" / "keyboard-bench"
    path.mkdir(parents=True, exist_ok=True)
    return path


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --- presage installation, shim and databases ----------------------------------------------
def ensure_presage() -> None:
    """Install presage with benchmarks/setup_presage.sh when its pieces are missing."""
    needed = [Path("/usr/include/presage.h"), DEBIAN_DB]
    if all(p.exists() for p in needed) and shutil.which("text2ngram") and shutil.which("g++"):
        return
    log("presage is missing: running benchmarks/setup_presage.sh")
    subprocess.run(["bash", str(SETUP_SCRIPT)], check=True)


def build_shim() -> Path:
    """Compile the shim into the cache (once per version of its source)."""
    digest = hashlib.sha256(SHIM_SOURCE.read_bytes()).hexdigest()[:12]
    binary = cache_dir() / f"presage_shim-{digest}"
    if not binary.exists():
        log(f"compiling {SHIM_SOURCE.name} -> {binary}")
        tmp = binary.with_suffix(".tmp")
        subprocess.run(
            ["g++", "-O2", "-std=c++17", "-o", str(tmp), str(SHIM_SOURCE), "-lpresage"],
            check=True,
        )
        tmp.rename(binary)
    return binary


def capped_inputs(files: list[Path], max_mb: float | None, workdir: Path) -> list[Path]:
    """The base corpus files, or the same leading fraction of each (whole lines) when capped."""
    total = sum(f.stat().st_size for f in files)
    if max_mb is None or total <= max_mb * 1e6:
        return files
    fraction = max_mb * 1e6 / total
    capped = []
    for f in files:
        budget = int(f.stat().st_size * fraction)
        out = workdir / f.name
        with f.open("rb") as src, out.open("wb") as dst:
            for line in src:
                if budget <= 0:
                    break
                dst.write(line)
                budget -= len(line)
        capped.append(out)
    return capped


def fair_database(base_dir: Path, max_mb: float | None, lowercase: bool) -> tuple[Path, dict]:
    """The 3-gram database text2ngram builds from the base corpus; built once, then cached."""
    files = sorted(base_dir.glob("*.txt"))
    if not files:
        raise KeyboardError(f"no base corpus text in {base_dir}")
    key = json.dumps(
        {
            "files": [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files],
            "max_mb": max_mb,
            "lowercase": lowercase,
            "n": 3,
        },
        sort_keys=True,
    )
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    folder = cache_dir() / f"fair-3gram-{digest}"
    db, info_path = folder / "database.db", folder / "build.json"
    if db.exists() and info_path.exists():
        return db, json.loads(info_path.read_text())
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as work:
        inputs = capped_inputs(files, max_mb, Path(work))
        size = sum(f.stat().st_size for f in inputs)
        tmp_db = Path(work) / "database.db"
        log(f"building the fair database from {size / 1e6:.1f} MB of {base_dir} (a few minutes)")
        started = time.perf_counter()
        before = _children_peak_mb()
        for n in (1, 2, 3):  # text2ngram -n N fills only the N-gram table
            cmd = ["text2ngram", "-n", str(n), "-f", "sqlite", "-o", str(tmp_db)]
            cmd += (["-l"] if lowercase else []) + [str(f) for f in inputs]
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        # presage asks "... ORDER BY count DESC LIMIT n" for candidates and SUM(count) once
        # per prediction: indexes on count serve those without a sort (same rows, faster).
        with sqlite3.connect(tmp_db) as conn:
            conn.executescript(_COUNT_INDEXES)
        seconds = time.perf_counter() - started
        info = {
            "inputs": [f.name for f in files],
            "input_mb": round(size / 1e6, 2),
            "capped_at_mb": max_mb,
            "lowercase": lowercase,
            "n": 3,
            "count_indexes": True,
            "build_seconds": round(seconds, 1),
            "text2ngram_peak_rss_mb": round(max(before, _children_peak_mb()), 1),
            "database_mb": round(tmp_db.stat().st_size / 1e6, 1),
        }
        tmp_db.rename(db)
    info_path.write_text(json.dumps(info, indent=2))
    log(f"fair database: {db} ({info['database_mb']} MB, {info['build_seconds']} s)")
    return db, info


_COUNT_INDEXES = """
CREATE INDEX IF NOT EXISTS _1_gram_by_count ON _1_gram(count);
CREATE INDEX IF NOT EXISTS _2_gram_by_count ON _2_gram(word_1, count);
CREATE INDEX IF NOT EXISTS _3_gram_by_count ON _3_gram(word_2, word_1, count);
ANALYZE;
"""


def _children_peak_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def presage_config(base_db: Path, user_db: Path, k: int, lowercase: bool) -> str:
    """Debian's /etc/presage.xml predictors, with our databases, k suggestions, no learning
    while typing (the test text must not teach presage), and case kept unless `lowercase`."""
    yes_no = "yes" if lowercase else "no"
    return f"""<?xml version="1.0" encoding="UTF-8" standalone="no" ?>
<Presage>
  <PredictorRegistry>
    <LOGGER>ERROR</LOGGER>
    <PREDICTORS>DefaultAbbreviationExpansionPredictor DefaultSmoothedNgramPredictor UserSmoothedNgramPredictor DefaultRecencyPredictor</PREDICTORS>
  </PredictorRegistry>
  <ContextTracker>
    <LOGGER>ERROR</LOGGER>
    <SLIDING_WINDOW_SIZE>80</SLIDING_WINDOW_SIZE>
    <LOWERCASE_MODE>{yes_no}</LOWERCASE_MODE>
    <ONLINE_LEARNING>no</ONLINE_LEARNING>
  </ContextTracker>
  <Selector>
    <LOGGER>ERROR</LOGGER>
    <SUGGESTIONS>{k}</SUGGESTIONS>
    <REPEAT_SUGGESTIONS>no</REPEAT_SUGGESTIONS>
    <GREEDY_SUGGESTION_THRESHOLD>0</GREEDY_SUGGESTION_THRESHOLD>
  </Selector>
  <PredictorActivator>
    <LOGGER>ERROR</LOGGER>
    <PREDICT_TIME>1000</PREDICT_TIME>
    <MAX_PARTIAL_PREDICTION_SIZE>60</MAX_PARTIAL_PREDICTION_SIZE>
    <COMBINATION_POLICY>Meritocracy</COMBINATION_POLICY>
  </PredictorActivator>
  <ProfileManager>
    <LOGGER>ERROR</LOGGER>
    <AUTOPERSIST>false</AUTOPERSIST>
  </ProfileManager>
  <Predictors>
    <DefaultSmoothedNgramPredictor>
      <PREDICTOR>SmoothedNgramPredictor</PREDICTOR>
      <LOGGER>ERROR</LOGGER>
      <DBFILENAME>{base_db}</DBFILENAME>
      <DELTAS>0.01 0.1 0.89</DELTAS>
      <LEARN>false</LEARN>
      <DatabaseConnector><LOGGER>ERROR</LOGGER></DatabaseConnector>
    </DefaultSmoothedNgramPredictor>
    <UserSmoothedNgramPredictor>
      <PREDICTOR>SmoothedNgramPredictor</PREDICTOR>
      <LOGGER>ERROR</LOGGER>
      <DBFILENAME>{user_db}</DBFILENAME>
      <DELTAS>0.01 0.1 0.89</DELTAS>
      <LEARN>true</LEARN>
      <DatabaseConnector><LOGGER>ERROR</LOGGER></DatabaseConnector>
    </UserSmoothedNgramPredictor>
    <DefaultRecencyPredictor>
      <PREDICTOR>RecencyPredictor</PREDICTOR>
      <LOGGER>ERROR</LOGGER>
      <LAMBDA>1</LAMBDA>
      <N_0>1</N_0>
      <CUTOFF_THRESHOLD>20</CUTOFF_THRESHOLD>
    </DefaultRecencyPredictor>
    <DefaultAbbreviationExpansionPredictor>
      <PREDICTOR>AbbreviationExpansionPredictor</PREDICTOR>
      <LOGGER>ERROR</LOGGER>
      <ABBREVIATIONS>{ABBREVIATIONS}</ABBREVIATIONS>
    </DefaultAbbreviationExpansionPredictor>
  </Predictors>
</Presage>
"""


# --- the adapter: presage behind keyboard's predict(context, k) -> Prediction --------------
_ESCAPES = {"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r", "\b": "\\b"}
_UNESCAPES = {"t": "\t", "n": "\n", "r": "\r", "b": "\b"}


def escape(text: str) -> str:
    return "".join(_ESCAPES.get(ch, ch) for ch in text)


def unescape(field: str) -> str:
    out, chars = [], iter(field)
    for ch in chars:
        if ch == "\\":
            nxt = next(chars, "\\")
            out.append(_UNESCAPES.get(nxt, nxt))
        else:
            out.append(ch)
    return "".join(out)


def apply_completion(typed: str, completion: str) -> str:
    """The word a presage client produces: it appends the completion to the typed part
    (backspaces first erase characters, as abbreviation expansions do); presage's trailing
    space is dropped because the metric counts spaces as typed."""
    erase = completion.count("\b")
    rest = completion[completion.rfind("\b") + 1 :] if erase else completion
    kept = typed[: max(0, len(typed) - erase)]
    return (kept + rest).rstrip()


@dataclass
class PresagePredictor:
    """presage in a shim process, answering like keyboard's Predictor."""

    shim: Path
    config: Path
    name: str = "presage"

    def __post_init__(self) -> None:
        self._stderr = tempfile.TemporaryFile()
        self._proc = subprocess.Popen(
            [str(self.shim), str(self.config)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
            encoding="utf-8",
            errors="replace",
            bufsize=1,
        )
        self._k = int(self._ask("G", "Presage.Selector.SUGGESTIONS")[0])

    def _ask(self, *fields: str) -> list[str]:
        assert self._proc.stdin is not None and self._proc.stdout is not None
        try:
            self._proc.stdin.write("\t".join(escape(f) for f in fields) + "\n")
            self._proc.stdin.flush()
            line = self._proc.stdout.readline()
        except BrokenPipeError:
            line = ""
        if not line:
            self._stderr.seek(0)
            err = self._stderr.read().decode("utf-8", "replace").strip()
            raise KeyboardError(f"presage shim stopped: {err or 'no message'}")
        parts = line.rstrip("\n").split("\t")
        if parts[0] != "OK":
            raise KeyboardError(f"presage: {unescape(parts[-1])}")
        return [unescape(p) for p in parts[1:]]

    def predict(self, context: str, k: int = 3) -> Prediction:
        if k != self._k:
            self._ask("S", "Presage.Selector.SUGGESTIONS", str(k))
            self._k = k
        started = time.perf_counter()
        fields = self._ask("P", context)
        typed = partial_word(context)
        candidates = [
            Candidate(apply_completion(typed, fields[i + 1]), float(fields[i + 2]))
            for i in range(1, len(fields) - 2, 3)
        ]
        return Prediction(
            prefix=typed,
            candidates=candidates[:k],
            adapter=self.name,
            latency_ms=(time.perf_counter() - started) * 1000,
        )

    def learn(self, text: str) -> None:
        self._ask("L", text)

    @property
    def pid(self) -> int:
        return self._proc.pid

    def close(self) -> None:
        if self._proc.stdin:
            self._proc.stdin.close()
        self._proc.wait(timeout=60)
        self._stderr.close()


# --- the benchmark -------------------------------------------------------------------------
def run_presage(
    shim: Path,
    base_db: Path,
    lowercase: bool,
    history: list[str],
    test: list[str],
    k: int,
    learn: bool,
) -> dict[str, Any]:
    """presage typing one split, with a fresh user model: empty, or after learning the history."""
    # presage commits every learned n-gram on its own: keep its user database in memory.
    shm = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    with tempfile.TemporaryDirectory(prefix="peer-presage-", dir=shm) as work:
        config = Path(work) / "presage.xml"
        config.write_text(presage_config(base_db, Path(work) / "user.db", k, lowercase))
        presage = PresagePredictor(shim, config, name="presage+learned" if learn else "presage")
        try:
            started = time.perf_counter()
            if learn:
                for message in history:
                    presage.learn(message)
            learn_seconds = time.perf_counter() - started
            # presage offers words only and hides what it showed for the word itself
            # (REPEAT_SUGGESTIONS=no): the simulated client shows its answers as they come.
            report = simulate(presage, test, history=history, k=k, client_filter=False)
        finally:
            presage.close()
        user_db = Path(work) / "user.db"
        user_db_mb = user_db.stat().st_size / 1e6 if user_db.exists() else 0.0
    result = report.to_json()
    if learn:
        result["learn_seconds"] = round(learn_seconds, 2)
        result["user_db_mb"] = round(user_db_mb, 2)
    return result


def learned_presage(history: list[str], work: Path, k: int = 3) -> PresagePredictor:
    """presage on Debian's database (no build needed) with a user model that learned
    `history`, kept in `work`: the peer the serving benchmarks time against keyboard."""
    ensure_presage()
    config = work / "presage.xml"
    config.write_text(presage_config(DEBIAN_DB, work / "user.db", k, lowercase=True))
    presage = PresagePredictor(build_shim(), config, name="presage+learned")
    for message in history:
        presage.learn(message)
    return presage


def keyboard_available(model_dir: Path) -> str | None:
    """Why keyboard cannot be typed in this run, or None when it can."""
    if not model_dir.is_dir():
        return f"no starter model at {model_dir}"
    return None


def run_keyboard(path: Path, model_dir: Path, k: int, max_lines: int | None) -> dict[str, Any]:
    """keyboard on the same split: the base model, and personalized by the nightly job."""
    from wordahead.evaluate.harness import evaluate_file

    result = evaluate_file(path, model_dir, k=k, max_lines=max_lines, personalize=True)
    assert result.after is not None
    return {
        "base": result.before.to_json(),
        "personalized": result.after.to_json(),
        "job_seconds": round(result.job_seconds or 0.0, 1),
    }


COLUMNS = [
    ("debian", "no_learning", "presage Debian db"),
    ("debian", "learned", "presage Debian db + learned"),
    ("fair", "no_learning", "presage fair db"),
    ("fair", "learned", "presage fair db + learned"),
    ("keyboard", "base", "keyboard base"),
    ("keyboard", "personalized", "keyboard personalized"),
]


def markdown(results: list[dict[str, Any]], k: int) -> str:
    """KSR@k, top-1 and top-3 (percent) per user file and system, with the mean."""
    columns = [
        c for c in COLUMNS if any((r.get(c[0]) or {}).get(c[1]) is not None for r in results)
    ]
    out = []
    for metric, title in (("ksr", f"KSR@{k}"), ("top1", "top-1"), ("top3", "top-3")):
        out.append(f"**{title}** (%)\n")
        out.append("| user file | " + " | ".join(c[2] for c in columns) + " |")
        out.append("|---|" + "---:|" * len(columns))
        sums = [0.0] * len(columns)
        for r in results:
            cells = []
            for j, (system, run, _) in enumerate(columns):
                report = (r.get(system) or {}).get(run)
                value = 100 * report[metric] if report else float("nan")
                sums[j] += value
                cells.append(f"{value:.2f}")
            out.append(f"| {r['file']} | " + " | ".join(cells) + " |")
        means = [f"**{s / len(results):.2f}**" for s in sums]
        out.append("| mean | " + " | ".join(means) + " |\n")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=Path, default=CORPUS / "users")
    parser.add_argument("--base", type=Path, default=CORPUS / "base")
    parser.add_argument("--files", default="", help="comma-separated file names (default all)")
    parser.add_argument("--k", type=int, default=3)
    parser.add_argument("--max-lines", type=int, default=None, help="type the first N test lines")
    parser.add_argument("--databases", default="debian,fair", help="debian, fair or both")
    parser.add_argument(
        "--fair-max-mb", type=float, default=None, help="cap the text2ngram input (MB)"
    )
    parser.add_argument(
        "--fair-lowercase",
        action="store_true",
        help="build the fair database lower-cased and run presage in lowercase mode",
    )
    parser.add_argument("--jobs", type=int, default=1, help="presage processes at a time")
    parser.add_argument(
        "--learning",
        choices=("both", "learned", "none"),
        default="both",
        help="presage with an empty user model, after learning the history, or both",
    )
    parser.add_argument("--no-keyboard", action="store_true", help="presage only")
    parser.add_argument("--model", type=Path, default=None, help="keyboard model directory")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    parser.add_argument("--markdown", type=Path, default=None, help="also write the tables here")
    args = parser.parse_args(argv)

    from wordahead import paths

    ensure_presage()
    shim = build_shim()
    databases: dict[str, tuple[Path, bool]] = {}
    fair_info = None
    for name in [d.strip() for d in args.databases.split(",") if d.strip()]:
        if name == "debian":
            databases["debian"] = (DEBIAN_DB, True)  # Debian's database is lower-cased
        elif name == "fair":
            db, fair_info = fair_database(args.base, args.fair_max_mb, args.fair_lowercase)
            databases["fair"] = (db, args.fair_lowercase)
        else:
            parser.error(f"unknown database {name!r} (debian, fair)")

    files = sorted(args.users.glob("*.jsonl"))
    if args.files:
        wanted = {f.strip() for f in args.files.split(",")}
        files = [f for f in files if f.name in wanted]
    if not files:
        parser.error(f"no user files in {args.users}")
    model_dir = args.model or paths.default_model_dir()
    why_not = "--no-keyboard" if args.no_keyboard else keyboard_available(model_dir)

    started = time.perf_counter()
    rows: dict[str, dict[str, Any]] = {}
    tasks = []
    for path in files:
        history, test = split_history(read_messages(path))
        test = test[: args.max_lines] if args.max_lines else test
        rows[path.name] = {"file": path.name, "history": len(history), "typed": len(test)}
        size = sum(len(m) for m in test)
        for name, (db, lowercase) in databases.items():
            rows[path.name][name] = {}
            modes = {"both": (False, True), "learned": (True,), "none": (False,)}[args.learning]
            for learn in modes:
                tasks.append((size, path.name, name, db, lowercase, history, test, learn))
    tasks.sort(key=lambda t: t[0])  # smallest files first: complete rows early in a long run

    def run_task(task: tuple) -> tuple[str, str, bool, dict[str, Any], float]:
        _, file, name, db, lowercase, history, test, learn = task
        t0 = time.perf_counter()
        result = run_presage(shim, db, lowercase, history, test, args.k, learn)
        return file, name, learn, result, time.perf_counter() - t0

    def report_json(complete: bool) -> dict[str, Any]:
        return {
            "benchmark": "peer_presage",
            "complete": complete,
            "k": args.k,
            "max_lines": args.max_lines,
            "databases": {
                name: {"path": str(db), "lowercase_mode": lc}
                for name, (db, lc) in databases.items()
            },
            "fair_database": fair_info,
            "keyboard": "typed" if why_not is None else f"skipped: {why_not}",
            "seconds": round(time.perf_counter() - started, 1),
            "results": list(rows.values()),
        }

    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        # Threads are enough: each task's work happens in its own presage process.
        for done, (file, name, learn, result, seconds) in enumerate(
            pool.map(run_task, tasks), start=1
        ):
            rows[file][name]["learned" if learn else "no_learning"] = result
            log(
                f"[{done}/{len(tasks)}] {file} {name} {'learned' if learn else 'no learning'}: "
                f"KSR@{args.k} {100 * result['ksr']:.2f}, top-1 {100 * result['top1']:.2f}, "
                f"top-3 {100 * result['top3']:.2f} ({seconds:.0f} s)"
            )
            if args.out:  # partial results survive an interrupted run
                args.out.write_text(json.dumps(report_json(False), indent=2) + "\n")
    if why_not is None:
        for path in files:
            rows[path.name]["keyboard"] = run_keyboard(path, model_dir, args.k, args.max_lines)
    results = list(rows.values())

    report = report_json(True)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    table = markdown(results, args.k)
    log("\n" + table)
    if args.markdown:
        args.markdown.write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
