"""The daemon's JSON-RPC methods over the predictor, the typing log, what is served and the job."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from wordahead import __version__, memory
from wordahead.daemon import protocol as rpc
from wordahead.daemon.connections import Connections
from wordahead.daemon.ghost_text import GhostText
from wordahead.daemon.protocol import RpcError
from wordahead.daemon.served import ServedModel
from wordahead.daemon.supervisor import JobSupervisor
from wordahead.daemon.typing_log_thread import TypingLogThread
from wordahead.learn.job_log import JobLog
from wordahead.predict.predictor import Predictor
from wordahead.store.typing_log import TypingLog, parse_time
from wordahead.types import KeyboardError

log = logging.getLogger("wordahead.daemon.server")

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


class RpcMethods:
    """One method per entry of `protocol.METHODS`, each with the parameters it names there.

    Predictions run on the inference pool, typing-log calls on the log's one thread, adapter
    loads on their own thread (`served`), so none of them waits behind another kind. Computing
    ahead (the next keystroke's answer, guessed) has a thread of its own, runs only while no
    prediction is asked, gives up as soon as one is, and spends at most its `AheadBudget`.

    `connections` tells whether the request being answered is the only one and what
    `status` reports of the clients; `about` is what the daemon says of itself there (its
    socket, uptime, ...).
    """

    def __init__(
        self,
        predictor: Predictor,
        typing_log: TypingLogThread,
        served: ServedModel,
        supervisor: JobSupervisor,
        connections: Connections,
        infer_pool: ThreadPoolExecutor,
        ahead_pool: ThreadPoolExecutor | None = None,
        inference_workers: int = 1,
        about: Callable[[], dict[str, Any]] = dict,
    ) -> None:
        self.predictor = predictor
        self.log = typing_log
        self.served = served
        self.supervisor = supervisor
        self.connections = connections
        self.inference_workers = inference_workers
        self.about = about
        self._infer_pool = infer_pool
        self._ahead_pool = ahead_pool or infer_pool
        self.ahead_budget = AheadBudget()
        self._predicting = 0  # predict requests in flight
        self._last_asked = 0.0  # when the last prediction was asked (loop time)
        self._asks = 0  # predictions asked so far
        self._idle_trim: asyncio.TimerHandle | None = None
        self._prefetching: asyncio.Future[float] | None = None  # the next keystroke, ahead
        self.ghost = GhostText(served, infer_pool, lambda: self._asks)
        self.table: dict[str, Callable[..., Awaitable[Any]]] = {
            "predict": self.predict,
            "phrase": self.ghost.phrase,
            "observe": self.observe,
            "feedback": self.feedback,
            "status": self.status,
            "train": self.supervisor.train,
            "forget": self.forget,
            "reload": self.served.reload,
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
                if self._predicting == 1 and self.connections.requests <= 1:
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
            # as stored: redacted; private text never gets here
            learned = recorded.stored and self.served.learn(recorded.text)
        if learned:
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
        if deleted:
            self.served.forget_phrases()
        return deleted

    async def pause(self) -> dict[str, bool]:
        """Stop storing typed text (kept in the database, so it survives restarts)."""
        await self.log.run(self.typing_log.pause)
        return {"paused": True}

    async def resume(self) -> dict[str, bool]:
        await self.log.run(self.typing_log.resume)
        return {"paused": False}

    # --- the daemon ---------------------------------------------------------------------------
    async def status(self) -> dict[str, Any]:
        try:
            stats, last_job = await self.log.run(self._log_status)
        except RpcError as exc:  # a damaged or unavailable log: the rest of status still counts
            stats, last_job = {"path": str(self.log.path), "error": exc.message}, None
        predictor = self.predictor
        manifest = predictor.artifacts.manifest
        metadata = self.served.metadata
        return {
            "version": __version__,
            "pid": os.getpid(),
            **self.about(),
            "model": {
                "name": predictor.artifacts.name,
                "base_model": (manifest.get("base_model") or {}).get("id"),
                "dir": str(predictor.artifacts.root),
                "int8": predictor.quantized,  # the int8 graph (quantization.json allowed it)
            },
            "adapter": {
                "version": predictor.adapter_version,
                "metrics": metadata.get("metrics"),
                "created": metadata.get("created"),
                # the user's phrases served with it: words and n-grams counted (None: none)
                "phrases": metadata.get("phrases") if predictor.phrases else None,
            },
            "typing_log": stats,
            "personalization": {"last_job": last_job, **self.supervisor.status()},
            "server": {
                **self.connections.status(),
                "inference_workers": self.inference_workers,
                "rss_mb": _rss_mb(),
                "torch_loaded": "torch" in sys.modules,
            },
        }

    def _log_status(self) -> tuple[dict[str, Any], dict[str, Any] | None]:
        return self.typing_log.stats(), JobLog(self.typing_log).last()


def _rss_mb() -> float | None:
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return round(pages * os.sysconf("SC_PAGE_SIZE") / 2**20, 1)
    except (OSError, ValueError, IndexError):
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # bytes on macOS
        return round(peak / 2**20, 1) if sys.platform == "darwin" else None
