"""The evaluation harness around the typing simulation: users' files and their history/test
split, `keyboard eval` (before and after the nightly job, run in a throwaway home), tables and
plots."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from wordahead.evaluate.simulate import TypingReport, simulate
from wordahead.paths import Home
from wordahead.predict.sources.phrase_completion import PhraseSettings
from wordahead.types import KeyboardError


def read_messages(path: str | Path) -> list[str]:
    """One user's messages in time order from plain text (one message per non-empty line) or
    JSON Lines with {"ts", "text"} objects (sniffed from the first non-empty line, or `.jsonl`)."""
    path = Path(path)
    try:
        raw = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise KeyboardError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise KeyboardError(f"{path}: is a directory, expected a text or JSONL file") from None
    except UnicodeDecodeError as exc:
        raise KeyboardError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    lines = [line.rstrip("\r") for line in raw.split("\n")]
    first = next((line for line in lines if line.strip()), None)
    if first is None:
        return []
    if path.suffix.lower() == ".jsonl" or _looks_like_record(first):
        return _parse_jsonl(path, lines)
    return [line for line in lines if line.strip()]


def _looks_like_record(line: str) -> bool:
    if not line.lstrip().startswith("{"):
        return False
    try:
        record = json.loads(line)
    except ValueError:
        return False
    return isinstance(record, dict) and "text" in record


def _parse_jsonl(path: Path, lines: list[str]) -> list[str]:
    messages = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as exc:
            raise KeyboardError(f"{path}:{number}: not a JSON object ({exc})") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise KeyboardError(f'{path}:{number}: expected an object with a "text" string')
        messages.append(record["text"])
    return messages


def split_history(messages: Sequence[str]) -> tuple[list[str], list[str]]:
    """The corpus split rule: the first floor(0.8 * n) messages are history, the rest test."""
    n_hist = len(messages) * 4 // 5  # integer arithmetic: exactly floor(0.8 * n)
    return list(messages[:n_hist]), list(messages[n_hist:])


def history_and_typed(
    path: Path, dev: bool = False, max_lines: int | None = None
) -> tuple[list[str], list[str]]:
    """A user file's history and the lines typed after it: its test lines, or with `dev` the
    history split once more by the same rule (its last fifth typed, the rest history), for
    tuning without reading a test line. At most `max_lines` are typed (None: all)."""
    history, typed = split_history(read_messages(path))
    if dev:
        history, typed = split_history(history)
    return history, typed if max_lines is None else typed[:max_lines]


def plot_reports(
    rows: Mapping[str, Mapping[str, TypingReport]], path: str | Path, title: str = ""
) -> Path:
    """A PNG of top-1, top-3 and KSR@k per row (e.g. per user) and series (e.g. before/after)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise KeyboardError("plotting needs matplotlib: pip install matplotlib") from None
    labels = list(rows)
    series = list(dict.fromkeys(name for reports in rows.values() for name in reports))
    metrics = [("top1", "next-word top-1"), ("top3", "next-word top-3"), ("ksr", "KSR")]
    if len(labels) <= 3:  # side by side
        fig, grid = plt.subplots(1, 3, figsize=(max(9, 3.6 * len(labels)), 4), squeeze=False)
    else:  # one metric per row, so many users stay readable
        fig, grid = plt.subplots(3, 1, figsize=(max(8, 1.1 * len(labels)), 11), squeeze=False)
    axes = list(grid.flat)
    width = 0.8 / max(1, len(series))
    for ax, (key, name) in zip(axes, metrics, strict=True):
        for j, serie in enumerate(series):
            values = [
                100 * getattr(rows[lab][serie], key) if serie in rows[lab] else 0.0
                for lab in labels
            ]
            xs = [i + (j - (len(series) - 1) / 2) * width for i in range(len(labels))]
            ax.bar(xs, values, width, label=serie)
        if key == "ksr":
            ks = {r.k for reports in rows.values() for r in reports.values()}
            name = f"KSR@{ks.pop()}" if len(ks) == 1 else name
        ax.set_title(name)
        ax.set_ylabel("%")
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


@dataclass(frozen=True)
class ServedAdapter:
    """An adapter to type with: its version, its file and the user phrases stored with it
    (no file: the base model)."""

    version: str = "base"
    path: Path | None = None
    phrases: Path | None = None


def served_adapter(home: Home | None, model_dir: Path, choice: str) -> ServedAdapter:
    """The adapter `choice` names: "base", "active" (what the daemon serves) or a stored
    version of this model's adapters in `home`."""
    from wordahead.learn.adapter_store import BASE, AdapterStore, version_name

    active = choice.strip().lower() == "active"
    version = BASE if active else version_name(choice)
    if version == BASE and not active:
        return ServedAdapter()
    if home is None:
        raise KeyboardError(f"adapter {choice}: no keyboard home to find it in")
    store = AdapterStore.in_home(home, model_dir)
    if active:
        current = store.active()
        if current is None:
            return ServedAdapter()
        version = current[0]
    else:
        store.load(version)  # a missing or damaged version: its own clear error
    return ServedAdapter(version, store.get(version).path, store.phrases_path(version))


@dataclass
class FileEvaluation:
    """`keyboard eval` on one file: the typing report, and before/after personalization."""

    file: str
    messages: int  # messages in the file
    history: int  # messages typed before the evaluated ones (context; the job's input)
    evaluated: int  # messages typed through the predictor
    before: TypingReport
    after: TypingReport | None = None  # with the adapter the personalization job trained
    job_status: str | None = None  # "promoted", or why the job kept the base model
    job_seconds: float | None = None
    peak_rss_mb: float | None = None  # this process's peak, which includes the predictor
    adapter: str | None = None  # the adapter the job promoted ("after")
    served: str = "base"  # the adapter typed with for `before`
    phrases_before: dict[str, Any] | None = None  # with phrases (wordahead.evaluate.phrase_typist)
    phrases_after: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        data = {key: value for key, value in asdict(self).items() if value is not None}
        data["before"] = self.before.to_json()
        if self.after is not None:
            data["after"] = self.after.to_json()
            data["delta"] = {
                key: round(getattr(self.after, key) - getattr(self.before, key), 6)
                for key in ("top1", "top3", "ksr")
            }
        for key in ("job_seconds", "peak_rss_mb"):
            if key in data:
                data[key] = round(data[key], 3)
        return data


def personalize_in_throwaway_home(history: Sequence[str], model_dir: Path, home: Path) -> Any:
    """Record `history` in a fresh typing log in `home` and run the nightly job there.

    Returns the job's `JobResult` (`adapter_path` is set when it promoted an adapter). Nothing
    reads or writes the user's own home.
    """
    from wordahead.learn.personalize import run_job
    from wordahead.paths import Home
    from wordahead.store.typing_log import MAX_TEXT_BYTES, TypingLog

    throwaway = Home.at(home)
    with TypingLog(throwaway.typing_log) as typing_log:
        for message in history:
            for piece in _pieces(message, MAX_TEXT_BYTES):
                typing_log.record(piece, source="keyboard-eval")
    # force: the history is all there is, so skip the new-words minimum and battery check
    return run_job(throwaway, model_dir, force=True)


def _pieces(text: str, max_bytes: int) -> list[str]:
    """`text` cut at spaces into pieces of at most `max_bytes` UTF-8 bytes (the log's limit)."""
    if len(text.encode("utf-8")) <= max_bytes:
        return [text]
    pieces: list[str] = []
    current: list[str] = []
    size = 0
    for token in re.split(r"(?<=\s)", text):
        n = len(token.encode("utf-8"))
        if current and size + n > max_bytes:
            pieces.append("".join(current))
            current, size = [], 0
        while n > max_bytes:  # one enormous token: cut it on character boundaries
            head = token.encode("utf-8")[:max_bytes].decode("utf-8", "ignore")
            pieces.append(head)
            token = token[len(head) :]
            n = len(token.encode("utf-8"))
        current.append(token)
        size += n
    if current:
        pieces.append("".join(current))
    return pieces


def evaluate_file(
    path: str | Path,
    model_dir: str | Path,
    *,
    k: int = 3,
    max_lines: int | None = None,
    personalize: bool = False,
    threads: int = 1,
    progress: Callable[[str, int, int], None] | None = None,
    adapter: str = "base",
    home: Home | None = None,
    phrases: PhraseSettings | None = None,
) -> FileEvaluation:
    """Type a user's file through the Predictor the daemon uses and report the metrics.

    Without `personalize` every message is typed (the first `max_lines` only, when given).
    With it, the first 80% are the user's history: the personalization job trains on them in
    a throwaway home, and the last 20% (the first `max_lines` of them) are typed before and
    after, with the history as preceding context both times. `adapter` is typed with:
    "base", "active" or a stored version in `home` (personalization starts from the base).
    With `phrases`, the phrase-aware typist's reports come too (wordahead.evaluate.phrase_typist).
    """
    import tempfile

    messages = read_messages(path)
    if not messages:
        raise KeyboardError(f"{path}: no messages to evaluate")
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise KeyboardError(f"no model at {model_dir} (pass --model DIR or set KEYBOARD_MODEL)")
    if personalize:
        history, test = split_history(messages)
        if not history:
            raise KeyboardError(f"{path}: --personalize needs at least 2 messages")
    else:
        history, test = [], list(messages)
    if max_lines is not None:
        if max_lines < 1:
            raise KeyboardError(f"--max-lines must be at least 1 (got {max_lines})")
        test = test[:max_lines]

    from wordahead.predict.predictor import Predictor

    def report(stage: str) -> Callable[[int, int], None] | None:
        return None if progress is None else (lambda done, total: progress(stage, done, total))

    predictor = Predictor(model_dir, threads=threads)
    served = served_adapter(home, model_dir, adapter)
    if served.path is not None and not predictor.load_adapter(
        served.path, served.version, served.phrases
    ):
        raise KeyboardError(f"adapter {served.version} could not be loaded ({served.path})")

    def typed(stage: str) -> tuple[TypingReport, dict[str, Any] | None]:
        if phrases is None:
            return simulate(predictor, test, history=history, k=k, progress=report(stage)), None
        from wordahead.evaluate.phrase_typist import type_with_phrases

        return type_with_phrases(
            predictor, test, phrases, history=history, k=k, progress=report(stage)
        )

    before, phrases_before = typed("base")
    result = FileEvaluation(
        file=str(path),
        messages=len(messages),
        history=len(history),
        evaluated=len(test),
        before=before,
        served=served.version,
        phrases_before=phrases_before,
    )
    if personalize:
        with tempfile.TemporaryDirectory(prefix="keyboard-eval-") as throwaway:
            job = personalize_in_throwaway_home(history, model_dir, Path(throwaway))
            result.job_status = job.status + (f": {job.reason}" if job.reason else "")
            result.job_seconds = job.seconds
            if job.status == "failed":
                raise KeyboardError(f"the personalization job failed: {job.reason}")
            if job.adapter_path is None:
                # Not promoted (the job's gate kept the base model): the user keeps typing
                # with the base model, so "after" is "before".
                result.after, result.phrases_after = before, phrases_before
            else:
                result.adapter = job.version or Path(job.adapter_path).name
                if not predictor.load_adapter(job.adapter_path, phrases=job.phrases_path):
                    raise KeyboardError(f"cannot load the adapter {job.adapter_path}")
                result.after, result.phrases_after = typed("personalized")
        from wordahead.memory import peak_rss_mb

        result.peak_rss_mb = peak_rss_mb()  # VmHWM: the job and both typings ran in here
    return result


def report_table(rows: Mapping[str, TypingReport]) -> str:
    """A plain-text table of reports, one row per label."""
    ks = {r.k for r in rows.values()}
    ksr = f"KSR@{ks.pop()}" if len(ks) == 1 else "KSR"
    width = max([len(label) for label in rows] + [8])
    lines = [
        f"{'':<{width}}  {'top-1':>6}  {'top-3':>6}  {ksr:>6}  {'words':>7}  "
        f"{'p50 ms':>7}  {'p95 ms':>7}  {'p99 ms':>7}"
    ]
    for label, r in rows.items():
        lines.append(
            f"{label:<{width}}  {100 * r.top1:6.2f}  {100 * r.top3:6.2f}  {100 * r.ksr:6.2f}  "
            f"{r.words:7d}  {r.latency_p50_ms:7.2f}  {r.latency_p95_ms:7.2f}  "
            f"{r.latency_p99_ms:7.2f}"
        )
    return "\n".join(lines)
