"""What the daemon serves: the adapter store's active version (the base model when none), the
user's phrases (the stored ones with the text typed since they were counted learned live) and
phrase completion as the settings have it. The RPC methods and the job supervisor both go
through it."""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from wordahead.daemon import protocol as rpc
from wordahead.daemon.protocol import RpcError
from wordahead.daemon.typing_log_thread import TypingLogThread
from wordahead.learn.adapter_store import ACTIVE_FILE, AdapterStore, forget_phrases
from wordahead.learn.policy import JobConfig
from wordahead.paths import Home
from wordahead.predict.predictor import Predictor
from wordahead.predict.sources.live_phrases import LivePhrases
from wordahead.predict.sources.phrase_completion import PhraseCompleter, PhraseSettings
from wordahead.predict.sources.phrase_file import PhraseError
from wordahead.predict.sources.phrases import PhraseModel
from wordahead.types import KeyboardError

log = logging.getLogger("wordahead.daemon.server")


class ServedModel:
    """Which adapter and phrases `predictor` serves, and loading them when they change.

    Loads run on `pool` (adapter loads have a thread of their own, so predictions and the
    typing log never wait behind one). The phrases are read from `typing_log`, under its lock,
    so no observed entry is counted twice or never.
    """

    def __init__(
        self,
        home: Home,
        predictor: Predictor,
        adapter_store: AdapterStore,
        typing_log: TypingLogThread,
        pool: ThreadPoolExecutor,
    ) -> None:
        self.home = home
        self.predictor = predictor
        self.adapter_store = adapter_store
        self.typing_log = typing_log
        self.pool = pool
        self.metadata: dict[str, Any] = {}  # the served version's (empty: the base model)
        # The user phrases served, learning as the user types (None: phrases are off).
        self.live: LivePhrases | None = None
        self.completer: PhraseCompleter | None = None  # phrase completion (None: off)
        # (version, adapter file, phrase file, phrases on) served and what was wrong then
        self._served: tuple[Any, list[str]] = (None, [])
        self._pointer_seen: tuple[int, int] | None = None

    @property
    def version(self) -> str:
        """The adapter version served ("base": none)."""
        return self.predictor.adapter_version

    async def reload(self) -> dict[str, Any]:
        """`load_active` on the adapter thread; its failures as RPC errors."""
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self.pool, self.load_active)
        except RpcError:
            raise
        except Exception as exc:  # noqa: BLE001 - a reload must never take a caller down
            log.exception("reload failed")
            raise RpcError(rpc.MODEL_UNAVAILABLE, f"reload failed: {exc}") from exc

    def load_active(self) -> dict[str, Any]:
        """Serve the store's active adapter (the base model when there is none) and say
        exactly what is served: `adapter`, `loaded` (the active version with all its parts),
        and a `message` naming what was damaged and what serves instead."""
        self._pointer_seen = _pointer_key(self._pointer_path())  # before reading: no lost change
        store = self.adapter_store
        wanted = store.active_version
        skipped: list[str] = []
        problems: list[str] = []
        try:
            active = store.active(skipped)
        except Exception as exc:  # noqa: BLE001 - the store itself unreadable: serve the base
            log.error("the adapter store %s failed: %s", store.root, exc)
            problems.append(f"the adapter store failed ({exc}); serving the base model")
            active = None
        phrases: PhraseModel | None = None
        # The serving settings of personalize.json, read once per load: edits apply on reload.
        config = JobConfig.load_or_defaults(self.home.job_config)
        use_phrases = config.phrases
        self.completer = _phrase_completer(config, self.predictor)
        if not use_phrases:
            self.live = None
        if active is None:
            live = self._live(None, {}) if use_phrases else None
            self.predictor.load_adapter(None, version="base", phrases=live)
            self.metadata = {}
            self._served = (None, [])
        else:
            version, path, metadata = active
            if metadata.get("fallback"):
                problems.append(metadata["fallback"])
            phrases_path = store.phrases_path(version)
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
            self.metadata = metadata if self.predictor.adapter_version == version else {}
        if active is None and skipped:
            problems.append(f"{'; '.join(skipped)}; serving the base model")
        served = self.predictor.adapter_version
        log.info("serving adapter %s%s", served, f" ({'; '.join(problems)})" if problems else "")
        out: dict[str, Any] = {"adapter": served, "loaded": served == wanted and not problems}
        if problems:
            out["message"] = "; ".join(problems)
        return out

    def changed(self) -> bool:
        """True when the store's active pointer moved since the last load."""
        return _pointer_key(self._pointer_path()) != self._pointer_seen

    def learn(self, text: str) -> bool:
        """Count `text` (as stored: redacted) in the live phrases; False when phrases are off.
        Called under the typing log's lock, with the entry it was recorded as."""
        live = self.live
        if live is None:
            return False
        live.learn(text)
        return True

    def forget_phrases(self) -> None:
        """The user phrases are counts of logged text: none may outlive what was forgotten.
        The stored ones go (the next job counts them again from what the log still holds);
        the live ones are counted again now from what is left. On the typing log's thread."""
        forget_phrases(self.home)
        self._served = (None, [])
        self.load_active()

    def _live(self, stored: PhraseModel | None, metadata: dict[str, Any]) -> LivePhrases:
        """The phrases to serve: `stored` (the active version's) with the log's text after
        what they counted learned on top. Set as `self.live`."""
        # The stored phrases counted the log up to `phrases_through`; without them (the base
        # model, an imported adapter, phrases forgotten) the whole log is recent text.
        through = 0
        if stored is not None:  # versions from before `phrases_through`: their data range
            entries = (metadata.get("data") or {}).get("entries") or [0]
            through = int(metadata.get("phrases_through") or entries[-1] or 0)
        try:
            typing_log = self.typing_log.typing_log
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

    def _pointer_path(self) -> Path:
        return self.adapter_store.root / ACTIVE_FILE


def _phrase_completer(config: JobConfig, predictor: Predictor) -> PhraseCompleter | None:
    """Phrase completion as the settings have it; None: off. Settings out of range are logged
    and the defaults used."""
    if not config.phrase_completion:
        return None
    try:
        settings = PhraseSettings(config.phrase_max_words, config.phrase_threshold)
    except KeyboardError as exc:
        log.warning("%s; phrase completion uses its default settings", exc)
        settings = PhraseSettings()
    return PhraseCompleter(predictor, settings)


def _pointer_key(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns
