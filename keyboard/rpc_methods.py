"""The daemon's JSON-RPC methods over the predictor, the typing log and the adapter store."""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import sys
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from keyboard import __version__
from keyboard import protocol as rpc
from keyboard.adapter_store import AdapterStore, forget_phrases
from keyboard.job_log import JobLog
from keyboard.paths import Home
from keyboard.predictor import Predictor
from keyboard.protocol import RpcError
from keyboard.types import KeyboardError
from keyboard.typing_log import InvalidText, TypingLog, parse_time

log = logging.getLogger("keyboard.server")

T = TypeVar("T")


class TypingLogThread:
    """The typing log behind its one writer thread, with its failures as RPC errors."""

    def __init__(self, typing_log: TypingLog, pool: ThreadPoolExecutor) -> None:
        self.typing_log = typing_log
        self.pool = pool

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


class RpcMethods:
    """One method per entry of `protocol.METHODS`, each with the parameters it names there.

    Predictions run on the inference pool, typing-log calls on the log's one thread, adapter
    loads on their own thread, so none of them waits behind another kind.
    """

    def __init__(
        self,
        home: Home,
        predictor: Predictor,
        typing_log: TypingLogThread,
        adapter_store: AdapterStore,
        infer_pool: ThreadPoolExecutor,
        adapter_pool: ThreadPoolExecutor,
    ) -> None:
        self.home = home
        self.predictor = predictor
        self.log = typing_log
        self.adapter_store = adapter_store
        self.adapter_metadata: dict[str, Any] = {}
        self._infer_pool = infer_pool
        self._adapter_pool = adapter_pool
        self._pointer_seen: tuple[int, int] | None = None
        # Set by the daemon once the other parts exist: what `train` and `status` report on.
        self.train: Callable[[bool, bool], Awaitable[dict[str, Any]]] | None = None
        self.extra_status: Callable[[], dict[str, Any]] = dict
        self.table: dict[str, Callable[..., Awaitable[Any]]] = {
            "predict": self.predict,
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
        return await loop.run_in_executor(self._infer_pool, self._predict, context, k)

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
        return self.typing_log.record(text, source=source, private=private)

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
        # The next job rebuilds them from what the log still holds.
        if deleted and forget_phrases(self.home):
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
        except KeyboardError as exc:
            raise RpcError(rpc.MODEL_UNAVAILABLE, f"reload failed: {exc}") from exc

    def reload_adapter(self) -> dict[str, Any]:
        """Serve the store's active adapter (the base model when there is none)."""
        self._pointer_seen = _pointer_key(self._pointer_path())  # before reading: no lost change
        active = self.adapter_store.active()
        if active is None:
            ok = self.predictor.load_adapter(None, version="base")
            self.adapter_metadata = {}
        else:
            version, path, metadata = active
            phrases = self.adapter_store.phrases_path(version)
            ok = self.predictor.load_adapter(path, version=version, phrases=phrases)
            self.adapter_metadata = metadata if ok else {}
        wanted = "base" if active is None else active[0]
        log.info(
            "serving adapter %s%s",
            self.predictor.adapter_version,
            "" if ok else f" ({wanted} would not load)",
        )
        out: dict[str, Any] = {"adapter": self.predictor.adapter_version, "loaded": bool(ok)}
        if not ok:
            out["message"] = f"adapter {wanted} could not be loaded; serving the base model"
        return out

    def adapter_changed(self) -> bool:
        """True when the store's active pointer moved since the last reload."""
        return _pointer_key(self._pointer_path()) != self._pointer_seen

    def _pointer_path(self) -> Path:
        from keyboard.adapter_store import ACTIVE_FILE

        return self.adapter_store.root / ACTIVE_FILE

    # --- the job and the daemon -------------------------------------------------------------
    async def _train(self, wait: bool, force: bool) -> dict[str, Any]:
        assert self.train is not None, "the daemon sets train once the supervisor exists"
        return await self.train(wait, force)

    async def status(self) -> dict[str, Any]:
        stats, last_job = await self.log.run(self._log_status)
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
