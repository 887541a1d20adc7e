"""The nightly personalization job: fine-tune the LoRA adapter on new typed text, gate, promote."""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from wordahead import memory
from wordahead.learn.gate import (
    HeldOutTyping,
    accuracy,
    describe,
    gate,
    held_out_slice,
    paired_change,
    phrases_gate,
    type_held_out,
)
from wordahead.learn.policy import JobBusy, JobConfig, job_lock, skip_reason
from wordahead.learn.progress import Progress
from wordahead.paths import Home
from wordahead.types import KeyboardError

if TYPE_CHECKING:
    from wordahead.learn.adapter_store import AdapterStore
    from wordahead.learn.job_log import TrainingText
    from wordahead.learn.trainer import FitResult, LoraTrainer
    from wordahead.model.artifacts import Adapter, ArtifactSet
    from wordahead.predict.sources.phrases import PhraseModel

log = logging.getLogger("wordahead.learn.personalize")

# Exit codes of `keyboard train`: a job that reached a decision (promoted, rejected, skipped)
# exits 0; EX_TEMPFAIL when another job holds the lock; 1 when it failed.
EXIT_BUSY = 75
FORGOTTEN = (
    "text was forgotten while the job ran: nothing promoted (the next job trains on what is left)"
)


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
    result.peak_rss_mb = memory.peak_rss_mb()
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
        # Read before the text: a forget that deletes any of it from now on changes it.
        forgets = typing_log.forgets
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
            result = _train_and_gate(
                run, text, data, phrase_texts, lambda: typing_log.no_forget_meanwhile(forgets)
            )
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
    run: JobRun,
    text: TrainingText,
    data: dict[str, Any],
    phrase_texts: tuple[list[str], list[str]],
    no_forget_meanwhile: Callable[[], AbstractContextManager[bool]],
) -> JobResult:
    """Measure the active adapter, train a candidate, measure it, decide, promote (only if
    `no_forget_meanwhile` says no text was forgotten since the job read its own)."""
    from wordahead.predict.sources.phrases import PhraseModel, blend_weight

    start = _starting_point(run)
    run.progress.event(
        "start",
        f"personalizing {start.artifacts.name} from adapter {start.version}: {text.new_words} "
        f"new words, {text.replay_words} replayed, {text.heldout_words} held out",
        model=start.artifacts.name, adapter=start.version, **data,
    )  # fmt: skip
    typed = held_out_slice(text.heldout, run.config.max_eval_words)
    history = text.new[-20:]  # context before the first held-out message

    def measure(
        tensors: Adapter | None, version: str, phrases: PhraseModel | None
    ) -> HeldOutTyping:
        return type_held_out(
            run.model_dir, run.config.threads, tensors, version, typed, history, phrases
        )

    # The predictor and the trainer are never alive together: that halves the peak memory.
    measured_at = time.monotonic()
    ranks_before = measure(start.served, start.version, start.phrases)
    start.phrases = None  # not needed again: free it before the trainer loads
    trained = _train(run, start, text, measured_at, accuracy(ranks_before))
    before = {"loss": trained.loss_before, **accuracy(ranks_before)}

    gate_phrases = (
        PhraseModel.from_texts(phrase_texts[0], weight=blend_weight(adapted=True))
        if run.config.phrases
        else None
    )
    ranks_after = measure(trained.candidate, "candidate", gate_phrases)
    after = {
        "loss": trained.loss_after,
        **accuracy(ranks_after),
        **paired_change(ranks_before, ranks_after),
    }
    run.progress.event("evaluated", f"after: {describe(after)}", stage="after", **after)
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
        kept = {**accuracy(ranks_kept), **paired_change(ranks_before, ranks_kept)}
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
    result = _promote(
        run, start.store, candidate, meta, phrase_texts[1], weight, no_forget_meanwhile
    )
    if result.status == "promoted":
        result.reason = f"{result.version} replaces {start.version}: {why}"
    result.metrics = metrics
    return result


def _starting_point(run: JobRun) -> _Start:
    """The active adapter (and its phrases) the job measures and trains from."""
    from wordahead.learn.adapter_store import AdapterStore
    from wordahead.model.artifacts import ArtifactSet
    from wordahead.predict.sources.phrase_file import PhraseError
    from wordahead.predict.sources.phrases import PhraseModel

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
    run.progress.event("evaluated", f"before: {describe(before)}", stage="before", **before)
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
    measure: Callable[[PhraseModel], HeldOutTyping], phrases: PhraseModel, ksr_default: float
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
    no_forget_meanwhile: Callable[[], AbstractContextManager[bool]],
) -> JobResult:
    """Store `tensors` with the phrases of all the text (their share of the blend: `weight`)
    as the new active version (the last, atomic step of the job) and prune old versions.

    A forget wins over the job: the version is stored while the typing log's write lock is
    held, so no forget runs meanwhile, and only if none deleted text since the job read it;
    else nothing is promoted (the text left is trained on by the next job, the watermark
    stays). A forget after the promotion deletes the new version's phrases, as any other's."""
    from wordahead.predict.sources.phrases import PhraseModel

    counted = b""
    if run.config.phrases:  # off: no n-gram of the user's text is stored
        phrases = PhraseModel.from_texts(phrase_texts, weight=weight)
        meta["phrases"] = {"words": phrases.words, "ngrams": phrases.ngrams}
        counted = phrases.to_bytes()
        del phrases
    with no_forget_meanwhile() as unchanged:
        if not unchanged:
            run.progress.event("forgotten", FORGOTTEN)
            return JobResult("skipped", FORGOTTEN)
        version = store.promote(tensors, meta, counted)
    with contextlib.suppress(KeyboardError, OSError):
        store.prune(run.config.keep_versions)
    return JobResult(
        "promoted",
        version=version,
        adapter_path=store.get(version).path,
        phrases_path=store.phrases_path(version),
    )
