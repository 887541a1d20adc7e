"""The daemon's JSON-RPC methods over the predictor, the typing log and the adapter store."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
import sys
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from wordahead import __version__, memory
from wordahead.daemon import protocol as rpc
from wordahead.daemon.ghost_text import GhostText
from wordahead.daemon.protocol import RpcError
from wordahead.learn.adapter_store import AdapterStore, forget_phrases
from wordahead.learn.job_log import JobLog
from wordahead.learn.policy import JobConfig
from wordahead.paths import Home
from wordahead.predict.predictor import Predictor
from wordahead.predict.sources.live_phrases import LivePhrases
from wordahead.predict.sources.phrases import PhraseError, PhraseModel
from wordahead.store.typing_log import InvalidText, TypingLog, parse_time
from wordahead.types import KeyboardError

log = logging.getLogger("wordahead.daemon.server")

T = TypeVar("T")
REOPEN_S = 10.0  # how often an unavailable typing log is tried again
AHEAD_SHARE = 0.1  # of one core, at most, for computing ahead (averaged over AHEAD_BURST_S)
AHEAD_BURST_S = 1.0
IDLE_TRIM_S = 0.5  # without a prediction for this long, freed memory goes back to the system
AHEAD_DELAY_S = 0.02  # a pause this long after a keystroke starts computing the next one ahead


class AheadBudget:
    """The CPU time computing ahead may spend: it refills at `share` seconds per second, up
    to `burst` seconds. One person typing needs a few percent of it; many clients at once
    find it spent, and their keystrokes are answered, not guessed."""

    def __init__(
        self,
        share: float = AHEAD_SHARE,
        burst: float = AHEAD_BURST_S * AHEAD_SHARE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.share = share
        self.burst = burst
        self.left = burst
        self.clock = clock
        self._at = clock()

    def allows(self) -> bool:
        now = self.clock()
        self.left = min(self.burst, self.left + (now - self._at) * self.share)
        self._at = now
        return self.left > 0

    def spend(self, seconds: float) -> None:
        self.left -= seconds


class TypingLogThread:
    """The typing log behind its one writer thread, with its failures as RPC errors.

    A log that cannot be opened (a full disk, a damaged file) does not stop the daemon: it
    serves predictions, answers typing-log calls with the reason, and tries to open the log
    again every REOPEN_S (`keep_open`), so freeing the disk is enough.
    """

    def __init__(self, path: Path, pool: ThreadPoolExecutor) -> None:
        self.path = path
        self.pool = pool
        self._typing_log: TypingLog | None = None
        self.problem: str | None = None

    def open(self) -> bool:
        """Open the log (on its thread); False, with `problem` set and logged, if it fails."""
        try:
            self._typing_log = TypingLog(self.path)
        except KeyboardError as exc:
            if str(exc) != self.problem:
                log.error("the typing log is unavailable, nothing is stored: %s", exc)
            self.problem = str(exc)
            return False
        if self.problem is not None:
            log.info("the typing log %s is open again", self.path)
        self.problem = None
        return True

    @property
    def typing_log(self) -> TypingLog:
        if self._typing_log is None:
            raise RpcError(rpc.TYPING_LOG_ERROR, f"the typing log is unavailable: {self.problem}")
        return self._typing_log

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` on the typing log's thread."""
        try:
            return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)
        except RpcError:
            raise
        except InvalidText as exc:
            raise RpcError(rpc.INVALID_PARAMS, str(exc)) from exc
        except (KeyboardError, sqlite3.Error, OSError) as exc:
            log.error("typing log: %s", exc)
            raise RpcError(rpc.TYPING_LOG_ERROR, f"the typing log failed: {exc}") from exc

    async def keep_open(self) -> None:
        """While the log is unavailable, try to open it again every REOPEN_S."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(REOPEN_S)
            if self._typing_log is None:
                await loop.run_in_executor(self.pool, self.open)

    def close(self) -> None:
        if self._typing_log is not None:
            self._typing_log.close()


class RpcMethods:
    """One method per entry of `protocol.METHODS`, each with the parameters it names there.

    Predictions run on the inference pool, typing-log calls on the log's one thread, adapter
    loads on their own thread, so none of them waits behind another kind. Computing ahead
    (the next keystroke's answer, guessed) has a thread of its own, runs only while no
    prediction is asked, gives up as soon as one is, and spends at most its `AheadBudget`.
    """

    def __init__(
        self,
        home: Home,
        predictor: Predictor,
        typing_log: TypingLogThread,
        adapter_store: AdapterStore,
        infer_pool: ThreadPoolExecutor,
        adapter_pool: ThreadPoolExecutor,
        ahead_pool: ThreadPoolExecutor | None = None,
    ) -> None:
        self.home = home
        self.predictor = predictor
        self.log = typing_log
        self.adapter_store = adapter_store
        self.adapter_metadata: dict[str, Any] = {}
        self._infer_pool = infer_pool
        self._adapter_pool = adapter_pool
        self._ahead_pool = ahead_pool or infer_pool
        self.ahead_budget = AheadBudget()
        self._pointer_seen: tuple[int, int] | None = None
        self._predicting = 0  # predict requests in flight
        self._last_asked = 0.0  # when the last prediction was asked (loop time)
        self._asks = 0  # predictions asked so far
        self._idle_trim: asyncio.TimerHandle | None = None
        self._prefetching: asyncio.Future[float] | None = None  # the next keystroke, ahead
        # (version, adapter file, phrase file) served and what was wrong with them then
        self._served: tuple[Any, list[str]] = (None, [])
        # The user phrases served, learning as the user types (None: phrases are off).
        self.live: LivePhrases | None = None
        self.ghost = GhostText(home, predictor, infer_pool, lambda: self._asks)
        # Set by the daemon once the other parts exist: what `train` and `status` report on,
        # and whether the request being answered is the only one (else False: never known).
        self.train: Callable[[bool, bool], Awaitable[dict[str, Any]]] | None = None
        self.extra_status: Callable[[], dict[str, Any]] = dict
        self.alone: Callable[[], bool] = bool
        self.table: dict[str, Callable[..., Awaitable[Any]]] = {
            "predict": self.predict,
            "phrase": self.ghost.phrase,
            "observe": self.observe,
            "feedback": self.feedback,
            "status": self.status,
            "train": self._train,
            "forget": self.forget,
            "reload": self.reload,
            "pause": self.pause,
            "resume": self.resume,
        }
        assert set(self.table) == set(rpc.METHODS), "every protocol method has one handler"

    @property
    def typing_log(self) -> TypingLog:
        return self.log.typing_log

    async def call(self, method: str, params: dict[str, Any] | list[Any]) -> Any:
        """Answer one request: its parameters checked against the protocol, then its method."""
        bound = rpc.bind_params(method, params)
        return await self.table[method](**bound)

    # --- predictions ----------------------------------------------------------------------
    async def predict(self, context: str, k: int) -> dict[str, Any]:
        rpc.check_predict({"context": context, "k": k})
        loop = asyncio.get_running_loop()
        self._last_asked = loop.time()
        if self._idle_trim is None:
            self._idle_trim = loop.call_later(IDLE_TRIM_S, self._trim_when_idle)
        self._asks += 1
        asks = self._asks
        # Known already (computed ahead while the user typed): answered here, without the
        # two thread switches of the pool, which cost milliseconds on a busy machine.
        result = self._predict_cached(context, k)
        if result is None:
            self._predicting += 1
            try:
                if self._predicting == 1 and self.alone():
                    # Nothing else to answer: computed here too; the pool's two thread
                    # switches would only add to this answer's wait.
                    result = self._predict(context, k)
                else:
                    result = await loop.run_in_executor(self._infer_pool, self._predict, context, k)
            finally:
                self._predicting -= 1
        # Once the user pauses (no prediction asked for AHEAD_DELAY_S after this answer):
        # the next keystroke's answer, computed ahead. Keystrokes that come faster (a fast
        # typist's burst, many clients at once) would only find the CPU busy with guesses.
        loop.call_later(AHEAD_DELAY_S, self._prefetch_when_idle, context, k, asks)
        return result

    def _trim_when_idle(self) -> None:
        """Once predictions stop (the user paused): the memory their work freed goes back."""
        loop = asyncio.get_running_loop()
        wait = self._last_asked + IDLE_TRIM_S - loop.time()
        if wait > 0 or self._predicting or self._prefetching is not None:
            self._idle_trim = loop.call_later(max(wait, 0.05), self._trim_when_idle)
            return
        self._idle_trim = None
        with contextlib.suppress(RuntimeError):  # the daemon is shutting down
            loop.run_in_executor(self._ahead_pool, memory.trim, False)

    def _predict_cached(self, context: str, k: int) -> dict[str, Any] | None:
        try:
            known = self.predictor.predict_cached(context, k)
        except KeyboardError as exc:
            raise RpcError(rpc.INVALID_PARAMS, f"predict: {exc}") from exc
        return None if known is None else known.to_json()

    def _prefetch_when_idle(self, context: str, k: int, asks: int) -> None:
        if asks != self._asks or self._predicting or self._prefetching is not None:
            return  # another prediction was asked since: not a pause
        if not self.ahead_budget.allows():
            return
        loop = asyncio.get_running_loop()
        self._prefetching = loop.run_in_executor(self._ahead_pool, self._prefetch, context, k)
        self._prefetching.add_done_callback(self._prefetched)

    def _prefetched(self, done: asyncio.Future[float]) -> None:
        self._prefetching = None
        if not done.cancelled():  # cancelled: the daemon is shutting down
            self.ahead_budget.spend(done.result())

    def _prefetch(self, context: str, k: int) -> float:
        """Compute ahead after `context` until a prediction is asked; returns the CPU seconds
        it took."""
        started = time.thread_time()
        try:
            self.predictor.prefetch(context, k, stop=self._asked)
        except Exception:  # noqa: BLE001 - only a guess; the real request will say what is wrong
            log.debug("prefetch failed", exc_info=True)
        return time.thread_time() - started

    def _asked(self) -> bool:
        """Whether a prediction waits for the inference pool (read from the thread ahead)."""
        return self._predicting > 0

    def _predict(self, context: str, k: int) -> dict[str, Any]:
        try:
            return self.predictor.predict(context, k=k).to_json()
        except KeyboardError as exc:
            raise RpcError(rpc.INVALID_PARAMS, f"predict: {exc}") from exc
        except Exception as exc:  # noqa: BLE001 - ONNX Runtime raises plain RuntimeErrors
            log.exception("prediction failed")
            raise RpcError(rpc.MODEL_UNAVAILABLE, f"the model failed to predict: {exc}") from exc

    # --- the typing log -------------------------------------------------------------------
    async def observe(self, text: str, source: str, private: bool) -> dict[str, Any]:
        recorded = await self.log.run(self._record, text, source, private)
        return recorded.to_json()

    def _record(self, text: str, source: str, private: bool) -> Any:
        typing_log = self.typing_log
        # Under the log's lock: a rebuild of the live phrases from the log (reload, forget)
        # sees this entry either in the log or through `learn`, never neither or both.
        with typing_log.lock:
            recorded = typing_log.record(text, source=source, private=private)
            live = self.live
            if recorded.stored and live is not None:
                live.learn(recorded.text)  # as stored: redacted; private text never gets here
        if recorded.stored and live is not None:
            self.predictor.user_phrases_changed()
        return recorded

    async def feedback(self, context: str, accepted: str) -> dict[str, Any]:
        entry = await self.log.run(self.typing_log.add_feedback, context, accepted)
        return {"stored": entry is not None, **({"id": entry} if entry is not None else {})}

    async def forget(
        self, since: str | None, until: str | None, source: str | None, all: bool
    ) -> dict[str, int]:
        if not (all or since or until or source):
            raise RpcError(
                rpc.INVALID_PARAMS,
                "forget: say what to forget: since and/or until (ISO 8601 dates), a source, "
                'or "all": true',
            )
        for name, value in (("since", since), ("until", until)):
            if value is not None:
                try:
                    parse_time(value)
                except KeyboardError as exc:
                    raise RpcError(rpc.INVALID_PARAMS, f"forget: {name}: {exc}") from exc
        deleted = await self.log.run(self._forget, since, until, source, all)
        return {"deleted": deleted}

    def _forget(self, since: str | None, until: str | None, source: str | None, all: bool) -> int:
        deleted = self.typing_log.forget(since, until, source, everything=all)
        # The user phrases are counts of logged text: none may outlive what was forgotten.
        # The stored ones go (the next job counts them again from what the log still holds);
        # the live ones are counted again now from what is left.
        if deleted:
            forget_phrases(self.home)
            self._served = (None, [])
            self.reload_adapter()
        return deleted

    async def pause(self) -> dict[str, bool]:
        """Stop storing typed text (kept in the database, so it survives restarts)."""
        await self.log.run(self.typing_log.pause)
        return {"paused": True}

    async def resume(self) -> dict[str, bool]:
        await self.log.run(self.typing_log.resume)
        return {"paused": False}

    # --- adapters ---------------------------------------------------------------------------
    async def reload(self) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._adapter_pool, self.reload_adapter)
        except RpcError:
            raise
        except Exception as exc:  # noqa: BLE001 - a reload must never take a caller down
            log.exception("reload failed")
            raise RpcError(rpc.MODEL_UNAVAILABLE, f"reload failed: {exc}") from exc

    def reload_adapter(self) -> dict[str, Any]:
        """Serve the store's active adapter (the base model when there is none) and say
        exactly what is served: `adapter`, `loaded` (the active version with all its parts),
        and a `message` naming what was damaged and what serves instead."""
        self._pointer_seen = _pointer_key(self._pointer_path())  # before reading: no lost change
        wanted = self.adapter_store.active_version
        skipped: list[str] = []
        problems: list[str] = []
        try:
            active = self.adapter_store.active(skipped)
        except Exception as exc:  # noqa: BLE001 - the store itself unreadable: serve the base
            log.error("the adapter store %s failed: %s", self.adapter_store.root, exc)
            problems.append(f"the adapter store failed ({exc}); serving the base model")
            active = None
        phrases: PhraseModel | None = None
        use_phrases = JobConfig.load_or_defaults(self.home.job_config).phrases
        self.ghost.settings_changed()
        if active is None:
            self.predictor.load_adapter(None, version="base", phrases=self._live(None, {}))
            self.adapter_metadata = {}
            self._served = (None, [])
        else:
            version, path, metadata = active
            if metadata.get("fallback"):
                problems.append(metadata["fallback"])
            phrases_path = self.adapter_store.phrases_path(version)
            phrases_key = phrases_path and _pointer_key(phrases_path)
            files = (version, _pointer_key(path), phrases_key, use_phrases)
            if files == self._served[0] and self.predictor.adapter_version == version:
                problems += self._served[1]  # already served, as it is on disk: no rebuild
            else:
                part: list[str] = []
                if phrases_path is not None and use_phrases:
                    try:
                        phrases = PhraseModel.load(phrases_path)
                    except PhraseError as exc:
                        log.warning("user phrases left out: %s", exc)
                        part.append(f"its phrases are damaged ({exc}); served without them")
                live = self._live(phrases, metadata) if use_phrases else None
                if not self.predictor.load_adapter(path, version=version, phrases=live):
                    part.append(f"adapter {version} could not be loaded; serving the base model")
                problems += part
                served_ok = self.predictor.adapter_version == version
                self._served = (files if served_ok else None, part)
            self.adapter_metadata = metadata if self.predictor.adapter_version == version else {}
        if active is None and skipped:
            problems.append(f"{'; '.join(skipped)}; serving the base model")
        served = self.predictor.adapter_version
        log.info("serving adapter %s%s", served, f" ({'; '.join(problems)})" if problems else "")
        out: dict[str, Any] = {"adapter": served, "loaded": served == wanted and not problems}
        if problems:
            out["message"] = "; ".join(problems)
        return out

    def _live(self, stored: PhraseModel | None, metadata: dict[str, Any]) -> LivePhrases | None:
        """The phrases to serve: `stored` (the active version's) with the log's text after
        what they counted learned on top; None when phrases are off. Set as `self.live`."""
        if not JobConfig.load_or_defaults(self.home.job_config).phrases:
            self.live = None
            return None
        # The stored phrases counted the log up to `phrases_through`; without them (the base
        # model, an imported adapter, phrases forgotten) the whole log is recent text.
        through = 0
        if stored is not None:  # versions from before `phrases_through`: their data range
            entries = (metadata.get("data") or {}).get("entries") or [0]
            through = int(metadata.get("phrases_through") or entries[-1] or 0)
        try:
            typing_log = self.typing_log
        except RpcError:  # the log is unavailable: serve what is stored, learn nothing now
            self.live = LivePhrases(stored)
            return self.live
        with typing_log.lock:  # no observed entry slips between the read and the swap
            try:
                texts = [t for _, t, _ in typing_log.iter_text(after=through)]
            except KeyboardError as exc:
                log.warning("typed text since the last job is left out of the phrases: %s", exc)
                texts = []
            self.live = LivePhrases(stored, texts=texts)
        return self.live

    def adapter_changed(self) -> bool:
        """True when the store's active pointer moved since the last reload."""
        return _pointer_key(self._pointer_path()) != self._pointer_seen

    def _pointer_path(self) -> Path:
        from wordahead.learn.adapter_store import ACTIVE_FILE

        return self.adapter_store.root / ACTIVE_FILE

    # --- the job and the daemon -------------------------------------------------------------
    async def _train(self, wait: bool, force: bool) -> dict[str, Any]:
        assert self.train is not None, "the daemon sets train once the supervisor exists"
        return await self.train(wait, force)

    async def status(self) -> dict[str, Any]:
        try:
            stats, last_job = await self.log.run(self._log_status)
        except RpcError as exc:  # a damaged or unavailable log: the rest of status still counts
            stats, last_job = {"path": str(self.log.path), "error": exc.message}, None
        predictor = self.predictor
        manifest = predictor.artifacts.manifest
        extra = self.extra_status()
        return {
            "version": __version__,
            "pid": os.getpid(),
            **extra.get("daemon", {}),
            "model": {
                "name": predictor.artifacts.name,
                "base_model": (manifest.get("base_model") or {}).get("id"),
                "dir": str(predictor.artifacts.root),
                "int8": predictor.quantized,  # the int8 graph (quantization.json allowed it)
            },
            "adapter": {
                "version": predictor.adapter_version,
                "metrics": self.adapter_metadata.get("metrics"),
                "created": self.adapter_metadata.get("created"),
                # the user's phrases served with it: words and n-grams counted (None: none)
                "phrases": self.adapter_metadata.get("phrases") if predictor.phrases else None,
            },
            "typing_log": stats,
            "personalization": {"last_job": last_job, **extra.get("personalization", {})},
            "server": {
                **extra.get("server", {}),
                "rss_mb": _rss_mb(),
                "torch_loaded": "torch" in sys.modules,
            },
        }

    def _log_status(self) -> tuple[dict[str, Any], dict[str, Any] | None]:
        return self.typing_log.stats(), JobLog(self.typing_log).last()


def _pointer_key(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns


def _rss_mb() -> float | None:
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return round(pages * os.sysconf("SC_PAGE_SIZE") / 2**20, 1)
    except (OSError, ValueError, IndexError):
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # bytes on macOS
        return round(peak / 2**20, 1) if sys.platform == "darwin" else None
