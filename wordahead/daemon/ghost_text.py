"""The `phrase` method: phrase completion (ghost text) as the home's settings have it."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from wordahead.daemon import protocol as rpc
from wordahead.daemon.protocol import RpcError
from wordahead.learn.policy import JobConfig
from wordahead.paths import Home
from wordahead.predict.sources.phrase_completion import (
    Phrase,
    PhraseCompleter,
    PhraseSettings,
    WordPredictor,
)
from wordahead.types import KeyboardError

log = logging.getLogger("wordahead.daemon.server")


def phrase_completer(home: Home, predictor: WordPredictor) -> PhraseCompleter | None:
    """Phrase completion as the home's settings (`personalize.json`) have it; None: off.
    Settings out of range are logged and the defaults used."""
    config = JobConfig.load_or_defaults(home.job_config)
    if not config.phrase_completion:
        return None
    try:
        settings = PhraseSettings(config.phrase_max_words, config.phrase_threshold)
    except KeyboardError as exc:
        log.warning("%s; phrase completion uses its default settings", exc)
        settings = PhraseSettings()
    return PhraseCompleter(predictor, settings)


class GhostText:
    """Answers `phrase`: on the inference pool, after the words asked before it (their
    answers are the phrase's first step, from the cache), and given up (null) as soon as a
    later prediction is asked, since the user has typed on. `asks()` counts the predictions
    asked so far."""

    def __init__(
        self,
        home: Home,
        predictor: WordPredictor,
        pool: ThreadPoolExecutor,
        asks: Callable[[], int],
    ) -> None:
        self.home = home
        self.predictor = predictor
        self.pool = pool
        self.asks = asks
        self.completer = phrase_completer(home, predictor)

    def settings_changed(self) -> None:
        """Read the settings again (on `reload`)."""
        self.completer = phrase_completer(self.home, self.predictor)

    async def phrase(self, context: str) -> dict[str, Any]:
        rpc.check_predict({"context": context, "k": 1})
        completer = self.completer
        if completer is None:
            return {"phrase": None}
        asked = self.asks()
        loop = asyncio.get_running_loop()
        found = await loop.run_in_executor(self.pool, self._complete, completer, context, asked)
        return {"phrase": None if found is None else found.to_json()}

    def _complete(self, completer: PhraseCompleter, context: str, asked: int) -> Phrase | None:
        try:
            return completer.complete(context, stop=lambda: self.asks() != asked)
        except KeyboardError as exc:
            raise RpcError(rpc.INVALID_PARAMS, f"phrase: {exc}") from exc
        except Exception as exc:  # noqa: BLE001 - ONNX Runtime raises plain RuntimeErrors
            log.exception("phrase failed")
            raise RpcError(rpc.MODEL_UNAVAILABLE, f"the model failed to predict: {exc}") from exc
