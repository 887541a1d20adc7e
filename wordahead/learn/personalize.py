"""The nightly personalization job: fine-tune the LoRA adapter on new typed text, gate, promote."""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
import os
import resource
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from wordahead import memory
from wordahead.learn.progress import Progress
from wordahead.paths import Home
from wordahead.types import KeyboardError

if TYPE_CHECKING:
    from wordahead.learn.adapter_store import AdapterStore
    from wordahead.learn.job_log import TrainingText
    from wordahead.learn.trainer import FitResult, LoraTrainer
    from wordahead.model.artifacts import Adapter, ArtifactSet
    from wordahead.predict.sources.phrases import PhraseModel
    from wordahead.store.typing_log import TypingLog

log = logging.getLogger("wordahead.learn.personalize")

# Exit codes of `keyboard train`: a job that reached a decision (promoted, rejected, skipped)
# exits 0; EX_TEMPFAIL when another job holds the lock; 1 when it failed.
EXIT_BUSY = 75


@dataclass
class JobConfig:
    """Settings of the job, from the home's `personalize.json` (every key optional)."""

    at: str = "03:00"  # local time the daemon / timer runs the job
    min_new_words: int = 200  # fewer new words since the last job: skip
    time_budget_s: float = 600.0  # the whole job, evaluations included
    # The recipe, set on the users' history (docs/results.md): batch 4 keeps the job's peak
    # memory near 300 MB (the lm_head group's gradient is [tokens x vocabulary]); twice the
    # steps of batch 8 see the same text.
    max_steps: int = 800
    lr: float = 3e-3
    warmup: int = 10
    batch_size: int = 4
    eval_every: int = 50  # held-out loss every N steps: early stopping, best adapter kept
    patience: int = 3  # evaluations without improvement before stopping
    replay_fraction: float = 0.25  # older text replayed, as a fraction of the new entries
    holdout_fraction: float = 0.1  # the most recent slice of new text, kept from training
    # Once the gate promotes, passes over that slice (the newest text, the closest to what
    # comes next) at fold_in_lr, so the adapter served has learned it too; 0: never trained on.
    fold_in_epochs: float = 2.0
    fold_in_lr: float = 1e-3
    # Per job: the newest new text; older new text is consumed and replayed, not trained as new.
    max_new_words: int = 100_000
    max_eval_words: int = 1_000  # held-out words typed through the predictor for top-3
    min_loss_gain: float = 0.001  # held-out loss must fall by this fraction to promote
    train_on_battery: bool = False
    threads: int = 1
    nice: int = 10  # niceness the job lowers itself to
    keep_versions: int = 5
    phrases: bool = True  # count the user's word n-grams; false: the adapter alone is served
    # With a promoted adapter, the phrases' share of the blend is the one of
    # phrases.blend_weights that typed the held-out text best; false: the default share.
    choose_share: bool = True
    groups: str = ""  # adapter groups trained, e.g. "attention,mlp" ("": the model's choice)

    @classmethod
    def load(cls, path: Path) -> JobConfig:
        """Defaults, overridden by the keys of the file at `path` (a home's `job_config`). An
        unknown key or a wrong type is an error that names the file, so a typo never silently
        leaves a default in place."""
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            return cls()
        except Exception as exc:  # noqa: BLE001 - unreadable, not JSON, nested too deep
            raise KeyboardError(f"cannot read {path}: {exc}") from exc
        if not isinstance(data, dict):
            raise KeyboardError(f"{path} must hold a JSON object of settings")
        known = {f.name: f for f in fields(cls)}
        config = cls()
        for key, value in data.items():
            if key not in known:
                raise KeyboardError(f"{path}: unknown setting {key!r} (known: {', '.join(known)})")
            expected = type(getattr(config, key))
            if expected is bool:
                ok = isinstance(value, bool)
            else:  # an int is fine where a float is expected; a bool is never a number
                numeric = (int, float) if expected is float else expected
                ok = isinstance(value, numeric) and not isinstance(value, bool)
            if not ok or (expected is float and not math.isfinite(value)):
                raise KeyboardError(f"{path}: {key} must be a {expected.__name__}, got {value!r}")
            setattr(config, key, expected(value))
        return config

    @classmethod
    def load_or_defaults(cls, path: Path) -> JobConfig:
        """The settings for what runs in the background (the daemon's schedule): a damaged
        file is logged and the defaults are used; `keyboard train` reports it instead."""
        try:
            return cls.load(path)
        except KeyboardError as exc:
            log.warning("%s; using the default settings", exc)
            return cls()

    @classmethod
    def update(cls, path: Path, **changes: Any) -> JobConfig:
        """Set some settings in the file, keeping the others as they are there (settings left
        out of the file follow the defaults of future versions)."""
        from wordahead.model.artifacts import write_atomic

        cls.load(path)  # refuse to rewrite a file that is broken: the user must fix it
        known = {f.name for f in fields(cls)}
        if unknown := set(changes) - known:
            raise KeyboardError(f"unknown setting(s): {', '.join(sorted(unknown))}")
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            data = {}
        data.update(changes)
        text = json.dumps(data, indent=2) + "\n"
        write_atomic(path, lambda f: f.write(text.encode()))
        return cls.load(path)


# --- why the last job failed ------------------------------------------------------------------
FAILURE_RECORD_BYTES = 4096


def reserve_failure_record(home: Home) -> None:
    """Allocate the failure record now, while there is room: a job that fails because the
    disk is full can then still say so, in place, where the typing log and daemon.log
    cannot."""
    try:
        fd = os.open(home.job_failure, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    except OSError:
        return
    try:
        size = os.fstat(fd).st_size
        if size < FAILURE_RECORD_BYTES:
            os.pwrite(fd, b" " * (FAILURE_RECORD_BYTES - size), size)
            os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def record_failure(home: Home, reason: str, job_id: int | None = None) -> bool:
    """Keep why a job failed (the reason cut to fit the record); False when even that failed."""
    record: dict[str, Any] = {
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "job": job_id,
        "reason": reason,
    }
    data = json.dumps(record).encode()
    while len(data) > FAILURE_RECORD_BYTES:
        record["reason"] = record["reason"][: len(record["reason"]) * 3 // 4] + "..."
        data = json.dumps(record).encode()
    try:
        fd = os.open(home.job_failure, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        try:
            os.pwrite(fd, data.ljust(FAILURE_RECORD_BYTES), 0)  # over the reserved bytes
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        log.warning("cannot record why the job failed (%s): %s", exc, reason)
        return False
    return True


def last_failure(home: Home) -> dict[str, Any] | None:
    """The last recorded job failure: {time, job, reason}; None when none (or unreadable)."""
    try:
        with open(home.job_failure, "rb") as f:
            record = json.loads(f.read(FAILURE_RECORD_BYTES).strip() or b"null")
    except (OSError, ValueError, RecursionError):
        return None
    return record if isinstance(record, dict) and "reason" in record else None


# --- good manners -----------------------------------------------------------------------------
POWER_SUPPLY = Path("/sys/class/power_supply")


def on_battery(power_supply: Path | None = None) -> bool:
    """True when a battery is discharging and no AC adapter is online (Linux sysfs). False
    when it cannot be told (no sysfs, a desktop): the job then runs."""
    power_supply = power_supply or POWER_SUPPLY
    try:
        supplies = list(power_supply.iterdir())
    except OSError:
        return False
    discharging, mains_online = False, False
    for supply in supplies:
        try:
            kind = (supply / "type").read_text().strip()
            if kind == "Battery":
                status = (supply / "status").read_text().strip()
                discharging = discharging or status == "Discharging"
            elif kind in ("Mains", "USB", "USB_C", "USB_PD"):
                mains_online = mains_online or (supply / "online").read_text().strip() == "1"
        except OSError:
            continue
    return discharging and not mains_online


def lower_priority(niceness: int) -> None:
    """Raise this process's niceness to `niceness` (never lower it: cron may have done so)."""
    with contextlib.suppress(OSError):
        current = os.nice(0)
        if niceness > current:
            os.nice(niceness - current)
    # Idle I/O class where the platform has it, so reading the log never stalls the desktop.
    if hasattr(os, "sched_setscheduler") and hasattr(os, "SCHED_BATCH"):
        with contextlib.suppress(OSError):
            os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))


class JobBusy(KeyboardError):
    """Another personalization job holds the lock."""


@contextlib.contextmanager
def job_lock(home: Home) -> Iterator[None]:
    """Hold the home's job lock, or raise JobBusy. flock: the kernel releases it when the
    holder exits or is killed, so a crashed job never leaves it stuck."""
    fd = os.open(home.job_lock, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise JobBusy(f"another personalization job is running ({_holder(fd)})") from None
        stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
        with contextlib.suppress(OSError):  # who holds it is for messages; the flock is the lock
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps({"pid": os.getpid(), "started": stamp}).encode(), 0)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def _holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return f"pid {info['pid']}, started {info['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "pid unknown"


def job_running(home: Home) -> str | None:
    """Who holds the home's job lock ("pid N, started T"), or None when no job is running."""
    path = home.job_lock
    if not path.exists():
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _holder(fd)
        return None
    finally:
        os.close(fd)


def words_since_last_job(typing_log: TypingLog) -> int:
    """Words logged after the text the last completed job consumed (the watermark)."""
    return sum(row[2] for row in typing_log.iter_text(after=typing_log.watermark))


def skip_reason(config: JobConfig, new_words: int, force: bool = False) -> str | None:
    """Why the job should not train now, or None. The one rule, for the job itself and for
    the daemon's schedule: too few new words since the last job, or running on battery
    (unless `train_on_battery`). `force` overrides both."""
    if force:
        return None
    if new_words < config.min_new_words:
        return f"only {new_words} new words since the last job; waiting for {config.min_new_words}"
    if not config.train_on_battery and on_battery():
        return "on battery power (plug in, or set train_on_battery / use --force)"
    return None


# --- the gate ---------------------------------------------------------------------------------
GATE_Z = 1.645  # one-sided 95%: how sure the gate must be that top-3 got worse to refuse


def _costlier(after: dict[str, Any]) -> bool:
    """Whether typing the held-out words got significantly costlier: the per-word keystroke
    increase is beyond GATE_Z standard errors (z None: every word got costlier)."""
    z = after.get("keystrokes_z", 0.0)
    return z is None or z > GATE_Z


def gate(before: dict[str, Any], after: dict[str, Any], min_loss_gain: float) -> tuple[bool, str]:
    """The promotion rule: the held-out loss falls by at least `min_loss_gain` (a fraction),
    next-word top-3 accuracy on the held-out words does not get worse, AND typing them does
    not get costlier (KSR@3, what the user feels).

    Loss is the sensitive signal (every token counts); top-3 and KSR guard what the user sees.
    On a few hundred words they move by chance, so "worse" is a paired test over the same
    words: refused when the words the old adapter had in its top 3 and the new one lost
    outnumber the words it gained by more than GATE_Z standard deviations (lost - gained >
    1.645 * sqrt(lost + gained)), or when the per-word keystrokes rose by more than GATE_Z
    standard errors. Without those counts, any fall refuses.
    """
    lb, la = before.get("loss"), after.get("loss")
    if la is None or lb is None or not math.isfinite(la) or not math.isfinite(lb):
        return False, f"held-out loss is not a number (before {lb}, after {la})"
    needed = lb * (1.0 - min_loss_gain)
    if la > needed:
        return False, (
            f"held-out loss did not improve enough: {lb:.4f} -> {la:.4f} (needs <= {needed:.4f})"
        )
    tb, ta = before.get("top3", 0.0), after.get("top3", 0.0)
    lost, gained = after.get("top3_lost"), after.get("top3_gained")
    if lost is not None and gained is not None:
        worse = lost - gained > GATE_Z * math.sqrt(lost + gained)
        detail = f" ({lost} words lost, {gained} gained)"
    else:
        worse, detail = ta < tb, ""
    if worse:
        return False, f"next-word top-3 accuracy fell: {100 * tb:.2f}% -> {100 * ta:.2f}%{detail}"
    kb, ka = before.get("ksr"), after.get("ksr")
    ksr = ""
    if kb is not None and ka is not None:
        if ka < kb and _costlier(after):
            return False, f"KSR@3 on the held-out text fell: {100 * kb:.2f} -> {100 * ka:.2f}"
        ksr = f", KSR@3 {100 * kb:.2f} -> {100 * ka:.2f}"
    return True, (
        f"held-out loss {lb:.4f} -> {la:.4f}, next-word top-3 {100 * tb:.2f}% -> "
        f"{100 * ta:.2f}%{detail}{ksr}"
    )


def phrases_gate(before: dict[str, Any], after: dict[str, Any]) -> tuple[bool, str]:
    """The rule for new phrases with the adapter kept (the loss cannot tell: the model is the
    same): held-out next-word top-3 gained more words than it lost."""
    lost, gained = after.get("top3_lost", 0), after.get("top3_gained", 0)
    change = (
        f"next-word top-3 {100 * before.get('top3', 0.0):.2f}% -> "
        f"{100 * after.get('top3', 0.0):.2f}% ({lost} words lost, {gained} gained)"
    )
    if gained > lost and not _costlier(after):
        return True, change
    return False, f"new phrases did not help either: {change}"


# --- the job ----------------------------------------------------------------------------------
@dataclass
class JobResult:
    """What one run of the job did; `to_json()` is the last stdout line of `train --json`."""

    status: str  # "promoted", "rejected", "skipped", "busy", "failed", "interrupted"
    reason: str = ""
    job_id: int | None = None
    version: str | None = None  # the adapter active after the job ("base": none)
    adapter_path: Path | None = None  # the promoted adapter (None unless promoted)
    phrases_path: Path | None = (
        None  # the promoted version's user phrases (wordahead.predict.sources.phrases)
    )
    metrics: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    peak_rss_mb: float = 0.0

    @property
    def exit_code(self) -> int:
        return {"busy": EXIT_BUSY, "failed": 1, "interrupted": 130}.get(self.status, 0)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["adapter_path"] = None if self.adapter_path is None else str(self.adapter_path)
        out["phrases_path"] = None if self.phrases_path is None else str(self.phrases_path)
        out["seconds"] = round(self.seconds, 3)
        out["peak_rss_mb"] = round(self.peak_rss_mb, 1)
        return out


def peak_rss_mb() -> float:
    """This process's peak resident set size in MB.

    VmHWM where /proc has it: `ru_maxrss` survives exec, so a job started by the daemon (or a
    benchmark) would report its parent's peak when that was higher.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def _accuracy(typed: _Typed) -> dict[str, Any]:
    ranks = typed.ranks
    n = len(ranks)
    return {
        "top1": sum(r == 0 for r in ranks) / n if n else 0.0,
        "top3": sum(0 <= r < 3 for r in ranks) / n if n else 0.0,
        "ksr": typed.ksr,
        "words": n,
    }


def _eval_slice(texts: list[str], max_words: int) -> list[str]:
    """The first held-out messages, up to about `max_words` words (predicting is the slow part)."""
    from wordahead.predict.words import words

    out: list[str] = []
    n = 0
    for text in texts:
        if out and n >= max_words:
            break
        out.append(text)
        n += len(words(text))
    return out


@dataclass
class JobRun:
    """One run of the job: where, on what model, with which settings (the configured ones
    with this run's overrides)."""

    home: Home
    model_dir: Path
    config: JobConfig
    budget_s: float  # the whole job, evaluations included
    max_steps: int
    lr: float
    force: bool = False
    seed: int = 0
    progress: Progress = field(default_factory=Progress)
    started: float = field(default_factory=time.monotonic)  # the budget counts from here
    after_training: Callable[[Adapter], Adapter] | None = None


def run_job(
    home: Home,
    model_dir: str | Path,
    *,
    config: JobConfig | None = None,
    time_budget_s: float | None = None,
    max_steps: int | None = None,
    lr: float | None = None,
    force: bool = False,
    seed: int = 0,
    progress: Progress | None = None,
    after_training: Callable[[Adapter], Adapter] | None = None,
) -> JobResult:
    """Run the personalization job once in `home` on the model at `model_dir`.

    Takes the job lock, reads the text logged since the last job (plus replay, minus the
    held-out slice), fine-tunes the active adapter within the time budget, measures held-out
    loss and next-word top-3 before and after, and promotes the new adapter only if the gate
    passes. `force` ignores the minimum of new words and the battery check (not the gate).
    Promotion is the last, atomic step: a kill at any moment leaves the old adapter active.
    `after_training` transforms the trained adapter before it is measured (the tests hand
    the gate a deliberately damaged candidate through it).
    """
    config = config or JobConfig.load(home.job_config)
    run = JobRun(
        home,
        Path(model_dir),
        config,
        budget_s=time_budget_s if time_budget_s is not None else config.time_budget_s,
        max_steps=max_steps if max_steps is not None else config.max_steps,
        lr=lr if lr is not None else config.lr,
        force=force,
        seed=seed,
        progress=progress or Progress(),
        after_training=after_training,
    )
    try:
        with job_lock(home):
            result = _locked_job(run)
    except JobBusy as exc:
        result = JobResult("busy", str(exc))
    finally:
        run.progress.close()
    result.seconds = time.monotonic() - run.started
    result.peak_rss_mb = peak_rss_mb()
    if not run.progress.tty:  # on a terminal the caller shows the result itself
        run.progress.event(
            result.status,
            result.reason,
            **{k: v for k, v in result.to_json().items() if k in ("version", "job_id", "seconds")},
        )
    return result


def _locked_job(run: JobRun) -> JobResult:
    """The job once it holds the lock: read the text, skip or train, record the outcome."""
    from wordahead.learn.job_log import JobLog
    from wordahead.store.typing_log import TypingLog

    config = run.config
    with TypingLog(run.home.typing_log) as typing_log:
        jobs = JobLog(typing_log)
        text = jobs.training_text(
            replay_fraction=config.replay_fraction,
            holdout_fraction=config.holdout_fraction,
            seed=run.seed + typing_log.watermark,  # a different replay sample each job
            max_new_words=config.max_new_words,
        )
        job_id = jobs.start(watermark=text.watermark)
        total_new = text.new_words + text.heldout_words
        data = {
            "new_words": text.new_words,
            "replay_words": text.replay_words,
            "heldout_words": text.heldout_words,
            "passed_words": text.passed_words,
            "entries": [min(text.entry_ids), max(text.entry_ids)] if text.entry_ids else [],
        }
        skip = skip_reason(config, total_new, run.force)
        if skip is None and (not text.new or not text.heldout):
            skip = (
                f"not enough text to train and check ({len(text.new)} training and "
                f"{len(text.heldout)} held-out entries; need at least one of each)"
            )
        if skip:
            jobs.finish(job_id, "skipped", {"data": data}, reason=skip)
            return JobResult("skipped", skip, job_id, metrics={"data": data})
        # The user's phrases come from all the text the log holds up to this job's last entry
        # (not just the new text): for the gate without the held-out slice, as it will be
        # typed; the promoted version with it, since the newest text predicts best.
        held = set(text.entry_ids[len(text.entry_ids) - len(text.heldout) :])
        logged = (
            [(i, t) for i, t, _ in typing_log.iter_text() if i <= text.watermark]
            if config.phrases
            else []
        )
        phrase_texts = ([t for i, t in logged if i not in held], [t for _, t in logged])
        del logged
        try:
            result = _train_and_gate(run, text, data, phrase_texts)
        except KeyboardError as exc:
            jobs.finish(job_id, "failed", {"data": data}, reason=str(exc))
            return JobResult("failed", str(exc), job_id, metrics={"data": data})
        except Exception as exc:
            log.exception("personalization job failed")
            reason = f"{type(exc).__name__}: {exc}"
            jobs.finish(job_id, "failed", {"data": data}, reason=reason)
            return JobResult("failed", reason, job_id, metrics={"data": data})
        except BaseException:  # Ctrl-C, SIGTERM from the daemon: record it, then go
            jobs.finish(job_id, "interrupted", {"data": data}, reason="stopped")
            raise
        result.job_id = job_id
        if result.status in ("promoted", "rejected"):
            # Both consume the text: rejected text is not retried as new (that could repeat
            # forever) but stays in the log, where later jobs sample it as replay.
            typing_log.set_watermark(text.watermark)
        jobs.finish(
            job_id, result.status, result.metrics, adapter_version=result.version,
            reason=result.reason,
        )  # fmt: skip
        return result


@dataclass
class _Start:
    """What the job starts from: the model, its adapter store and the active version."""

    artifacts: ArtifactSet
    store: AdapterStore
    version: str  # "base" when no adapter is active
    tensors: Adapter  # the active version's (the initial adapter for "base")
    served: Adapter | None  # what a predictor loads for it (None: the base model)
    phrases: PhraseModel | None  # the active version's user phrases


@dataclass
class _Trained:
    """The candidate adapter and what training it measured."""

    candidate: Adapter
    fit: FitResult
    loss_before: float
    loss_after: float


def _train_and_gate(
    run: JobRun, text: TrainingText, data: dict[str, Any], phrase_texts: tuple[list[str], list[str]]
) -> JobResult:
    """Measure the active adapter, train a candidate, measure it, decide, promote."""
    from wordahead.predict.sources.phrases import PhraseModel, blend_weight

    start = _starting_point(run)
    run.progress.event(
        "start",
        f"personalizing {start.artifacts.name} from adapter {start.version}: {text.new_words} "
        f"new words, {text.replay_words} replayed, {text.heldout_words} held out",
        model=start.artifacts.name, adapter=start.version, **data,
    )  # fmt: skip
    typed = _eval_slice(text.heldout, run.config.max_eval_words)
    history = text.new[-20:]  # context before the first held-out message

    def measure(tensors: Adapter | None, version: str, phrases: PhraseModel | None) -> _Typed:
        return _typed(run.model_dir, run.config.threads, tensors, version, typed, history, phrases)

    # The predictor and the trainer are never alive together: that halves the peak memory.
    measured_at = time.monotonic()
    ranks_before = measure(start.served, start.version, start.phrases)
    start.phrases = None  # not needed again: free it before the trainer loads
    trained = _train(run, start, text, measured_at, _accuracy(ranks_before))
    before = {"loss": trained.loss_before, **_accuracy(ranks_before)}

    gate_phrases = (
        PhraseModel.from_texts(phrase_texts[0], weight=blend_weight(adapted=True))
        if run.config.phrases
        else None
    )
    ranks_after = measure(trained.candidate, "candidate", gate_phrases)
    after = {
        "loss": trained.loss_after,
        **_accuracy(ranks_after),
        **_paired(ranks_before, ranks_after),
    }
    run.progress.event("evaluated", f"after: {_describe(after)}", stage="after", **after)
    metrics = {
        "before": before,
        "after": after,
        "steps": trained.fit.steps,
        "tokens": trained.fit.tokens,
        "stopped": trained.fit.stopped,
        "train_seconds": round(trained.fit.seconds, 3),
        "train_loss": trained.fit.train_loss,
        "lr": run.lr,
        "data": data,
        "phrases": (
            {"words": gate_phrases.words, "ngrams": gate_phrases.ngrams} if gate_phrases else None
        ),
    }

    adapter_ok, why = gate(before, after, run.config.min_loss_gain)
    candidate = trained.candidate
    weight = blend_weight(adapted=True)
    if adapter_ok and gate_phrases is not None and run.config.choose_share:
        weight, metrics["shares"] = _choose_share(
            lambda phrases: measure(candidate, "candidate", phrases), gate_phrases, ranks_after.ksr
        )
    if not adapter_ok and gate_phrases is None:
        reason = f"kept adapter {start.version}: {why}"
        return JobResult("rejected", reason, version=start.version, metrics=metrics)
    if not adapter_ok:
        # The new adapter failed; the user's new phrases may still help on their own (they
        # carry most of what a job gains: docs/results.md). Without this, someone whose
        # adapter stopped improving would never get the phrases of their newer text.
        assert gate_phrases is not None  # without phrases the job returned above
        weight = gate_phrases.weight = blend_weight(adapted=start.served is not None)
        ranks_kept = measure(start.served, start.version, gate_phrases)
        kept = {**_accuracy(ranks_kept), **_paired(ranks_before, ranks_kept)}
        metrics["phrases_only"] = kept
        better, why_phrases = phrases_gate(before, kept)
        if not better:
            reason = f"kept adapter {start.version}: {why}; {why_phrases}"
            return JobResult("rejected", reason, version=start.version, metrics=metrics)
        candidate, after = start.tensors, {"loss": before["loss"], **kept}
        why = f"adapter {start.version} kept ({why}), new phrases: {why_phrases}"
    del gate_phrases  # one phrase model in memory at a time
    if adapter_ok:
        candidate, metrics["fold_in"] = _fold_in(run, start, candidate, text.heldout)
    meta = {
        "source": "job",
        "trained": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "data": data,
        "steps": trained.fit.steps,
        "stopped": trained.fit.stopped,
        "fold_in": metrics.get("fold_in"),
        "metrics": {"before": before, "after": after},
        "start_adapter": start.version,
        "adapter_trained": adapter_ok,  # False: the start adapter's tensors, with new phrases
    }
    meta["phrases_through"] = text.watermark  # the live phrases count the entries after it
    result = _promote(run, start.store, candidate, meta, phrase_texts[1], weight)
    result.reason = f"{result.version} replaces {start.version}: {why}"
    result.metrics = metrics
    return result


def _starting_point(run: JobRun) -> _Start:
    """The active adapter (and its phrases) the job measures and trains from."""
    from wordahead.learn.adapter_store import AdapterStore
    from wordahead.model.artifacts import ArtifactSet
    from wordahead.predict.sources.phrases import PhraseError, PhraseModel

    artifacts = ArtifactSet.open(run.model_dir)
    store = AdapterStore.in_home(run.home, artifacts)
    active = store.active()
    version = "base" if active is None else active[0]
    tensors = store.load(version)
    phrases = None
    if run.config.phrases and (phrases_file := store.phrases_path(version)) is not None:
        try:
            phrases = PhraseModel.load(phrases_file)
        except PhraseError as exc:
            log.warning("the active version's phrases are left out: %s", exc)
    served = None if active is None else tensors
    return _Start(artifacts, store, version, tensors, served, phrases)


def _trainer(run: JobRun, start: _Start, adapter: Adapter) -> LoraTrainer:
    """The job's trainer of `adapter`: its groups, threads and cached training graphs."""
    from wordahead.learn.trainer import LoraTrainer

    return LoraTrainer(
        start.artifacts,
        adapter=adapter,
        threads=run.config.threads,
        groups=run.config.groups or None,
        cache_dir=run.home.training_graphs,
    )


def _train(
    run: JobRun,
    start: _Start,
    text: TrainingText,
    measured_at: float,
    accuracy_before: dict[str, Any],
) -> _Trained:
    """Fine-tune the start adapter on the new text and replay, within what is left of the
    budget (the first measurement began at `measured_at`); held-out loss before and after
    (the best adapter on it is kept)."""
    config = run.config
    trainer = _trainer(run, start, start.tensors)
    seq_len = start.artifacts.seq_len
    train_batches = trainer.batches(text.new + text.replay, seq_len, config.batch_size)
    heldout_batches = trainer.batches(text.heldout, seq_len, config.batch_size)
    loss_before = trainer.evaluate(heldout_batches)
    eval_s = time.monotonic() - measured_at
    before = {"loss": loss_before, **accuracy_before}
    run.progress.event("evaluated", f"before: {_describe(before)}", stage="before", **before)
    # What is left of the budget, minus a second evaluation as long as the first.
    fit_budget = max(1.0, run.budget_s - (time.monotonic() - run.started) - eval_s)
    run.progress.start_training(fit_budget)
    fit = trainer.fit(
        train_batches,
        heldout_batches,
        max_steps=run.max_steps,
        lr=run.lr,
        warmup=min(config.warmup, max(1, run.max_steps // 10)),
        time_budget_s=fit_budget,
        eval_every=config.eval_every,
        patience=config.patience,
        seed=run.seed,
        on_step=run.progress.step,
    )
    run.progress.close()
    candidate = trainer.adapter()  # fit restored the best adapter on held-out loss
    if run.after_training is not None:
        candidate = run.after_training(candidate)
        trainer.set_adapter(candidate)
    loss_after = trainer.evaluate(heldout_batches)
    del trainer, train_batches, heldout_batches
    memory.trim()  # the phases take turns: the peak is the largest one's, not their sum
    return _Trained(candidate, fit, loss_before, loss_after)


def _choose_share(
    measure: Callable[[PhraseModel], _Typed], phrases: PhraseModel, ksr_default: float
) -> tuple[float, dict[str, float]]:
    """The phrases' share that typed the held-out text best with the candidate (the default's
    KSR is `ksr_default`, measured by the gate); a tie keeps the default. Leaves `phrases` at
    the default share."""
    from wordahead.predict.sources.phrases import blend_weights

    default, *others = blend_weights(adapted=True)
    ksr = {default: ksr_default}
    for share in others:
        phrases.weight = share
        ksr[share] = measure(phrases).ksr
    phrases.weight = default
    best = max(ksr, key=lambda w: (ksr[w], w == default))
    return best, {f"{w:g}": round(100 * k, 3) for w, k in ksr.items()}


def _fold_in(
    run: JobRun, start: _Start, candidate: Adapter, heldout: list[str]
) -> tuple[Adapter, dict[str, Any] | None]:
    """The promoted candidate trained on the held-out slice too (`fold_in_epochs` passes at
    `fold_in_lr`, within what is left of the budget), and what that did. Nothing is left to
    check it against, so it stays short and gentle; a loss that is not a number keeps the
    candidate as the gate passed it."""
    import numpy as np

    config = run.config
    left = run.budget_s - (time.monotonic() - run.started)
    if config.fold_in_epochs <= 0 or config.fold_in_lr <= 0 or left <= 1.0:
        return candidate, None
    trainer = _trainer(run, start, candidate)
    fit = trainer.fold_in(
        heldout,
        epochs=config.fold_in_epochs,
        lr=config.fold_in_lr,
        seq_len=start.artifacts.seq_len,
        batch_size=config.batch_size,
        seed=run.seed + 1,
        time_budget_s=left,
    )
    folded = trainer.adapter()
    del trainer
    memory.trim()
    done = {"steps": fit.steps, "seconds": round(fit.seconds, 3), "train_loss": fit.train_loss}
    if not math.isfinite(fit.train_loss) or not all(np.isfinite(v).all() for v in folded.values()):
        log.warning("the fold-in of the held-out text diverged; the gated adapter is kept")
        return candidate, {**done, "kept": "gated"}
    run.progress.event(
        "folded", f"held-out text folded in: {fit.steps} steps, {fit.seconds:.1f} s", **done
    )
    return folded, done


def _promote(
    run: JobRun,
    store: AdapterStore,
    tensors: Adapter,
    meta: dict[str, Any],
    phrase_texts: list[str],
    weight: float,
) -> JobResult:
    """Store `tensors` with the phrases of all the text (their share of the blend: `weight`)
    as the new active version (the last, atomic step of the job) and prune old versions."""
    from wordahead.predict.sources.phrases import PhraseModel

    counted = b""
    if run.config.phrases:  # off: no n-gram of the user's text is stored
        phrases = PhraseModel.from_texts(phrase_texts, weight=weight)
        meta["phrases"] = {"words": phrases.words, "ngrams": phrases.ngrams}
        counted = phrases.to_bytes()
        del phrases
    version = store.promote(tensors, meta, counted)
    with contextlib.suppress(KeyboardError, OSError):
        store.prune(run.config.keep_versions)
    return JobResult(
        "promoted",
        version=version,
        adapter_path=store.get(version).path,
        phrases_path=store.phrases_path(version),
    )


@dataclass
class _Typed:
    """The held-out text typed through a predictor: per word, its next-word rank (-1: not in
    the top 3) and the keystrokes it cost; and the KSR@3 of the whole."""

    ranks: list[int]
    costs: list[int]
    ksr: float


def _typed(
    model_dir: Path,
    threads: int,
    tensors: Adapter | None,
    version: str,
    typed: list[str],
    history: list[str],
    phrases: PhraseModel | None = None,
) -> _Typed:
    """`typed` typed (wordahead.evaluate.simulate.simulate) with a predictor that serves `tensors`
    (None: the base model) and the user's `phrases`."""
    from wordahead.evaluate.simulate import simulate
    from wordahead.predict.predictor import Predictor

    predictor = Predictor(model_dir, threads=threads)
    if (tensors is not None or phrases is not None) and not predictor.load_adapter(
        tensors, version, phrases
    ):
        raise KeyboardError(f"the predictor could not load adapter {version}")
    per_word: list[tuple[int, int]] = []
    report = simulate(predictor, typed, history=history, k=3, per_word=per_word)
    del predictor
    memory.trim()
    return _Typed([r for r, _ in per_word], [c for _, c in per_word], report.ksr)


def _paired(before: _Typed, after: _Typed) -> dict[str, Any]:
    """Words that left / entered the top 3 between two measurements of the same words, and
    how sure it is that typing them got costlier (z of the mean per-word keystroke change)."""
    pairs = list(zip(before.ranks, after.ranks, strict=True))
    diffs = [a - b for b, a in zip(before.costs, after.costs, strict=True)]
    n = len(diffs)
    mean = sum(diffs) / n if n else 0.0
    var = sum((d - mean) ** 2 for d in diffs) / (n - 1) if n > 1 else 0.0
    z = mean / math.sqrt(var / n) if var > 0 else (math.inf if mean > 0 else 0.0)
    return {
        "top3_lost": sum(b >= 0 and a < 0 for b, a in pairs),
        "top3_gained": sum(b < 0 and a >= 0 for b, a in pairs),
        "keystrokes_z": round(z, 3) if math.isfinite(z) else None,
    }


def _describe(m: dict[str, Any]) -> str:
    return (
        f"held-out loss {m['loss']:.4f}, next-word top-1 {100 * m['top1']:.1f}%, "
        f"top-3 {100 * m['top3']:.1f}%, KSR@3 {100 * m.get('ksr', 0.0):.1f} "
        f"({m['words']} words)"
    )
