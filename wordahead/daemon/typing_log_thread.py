"""The daemon's typing log behind its one writer thread, with its failures as RPC errors."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from wordahead.daemon import protocol as rpc
from wordahead.daemon.protocol import RpcError
from wordahead.store.typing_log import InvalidText, TypingLog
from wordahead.types import KeyboardError

log = logging.getLogger("wordahead.daemon.server")

T = TypeVar("T")
REOPEN_S = 10.0  # how often an unavailable typing log is tried again


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
