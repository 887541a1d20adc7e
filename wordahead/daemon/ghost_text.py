"""The `phrase` method: phrase completion (ghost text) as the home's settings have it."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from wordahead.daemon import protocol as rpc
from wordahead.daemon.protocol import RpcError
from wordahead.daemon.served import ServedModel
from wordahead.predict.sources.phrase_completion import Phrase, PhraseCompleter
from wordahead.types import KeyboardError

log = logging.getLogger("wordahead.daemon.server")


class GhostText:
    """Answers `phrase`: on the inference pool, after the words asked before it (their
    answers are the phrase's first step, from the cache), and given up (null) as soon as a
    later prediction is asked, since the user has typed on. `asks()` counts the predictions
    asked so far; `served` says how phrases are completed (its settings, read on `reload`)."""

    def __init__(
        self, served: ServedModel, pool: ThreadPoolExecutor, asks: Callable[[], int]
    ) -> None:
        self.served = served
        self.pool = pool
        self.asks = asks

    async def phrase(self, context: str) -> dict[str, Any]:
        rpc.check_predict({"context": context, "k": 1})
        completer = self.served.completer
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
