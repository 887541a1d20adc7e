"""The daemon's clients: reading request lines, back-pressure, fair queuing, writing answers."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from wordahead.daemon import protocol as rpc
from wordahead.daemon.protocol import Invalid, Parsed, Request, RpcError

log = logging.getLogger("wordahead.daemon.server")

MAX_CONNECTIONS = 512  # well under the usual 1024 open files
MAX_IN_FLIGHT_PER_CONNECTION = 64  # a pipelining client waits (is not read) beyond this
WORK_PER_CONNECTION = 4  # requests of one client queued for the worker threads at once
WRITE_TIMEOUT_S = 10.0  # a client that does not read its answers for this long is dropped
SHUTDOWN_GRACE_S = 10.0  # how long SIGTERM waits for requests in flight

# Answers one request: (method, params) -> its result; raises RpcError.
Dispatch = Callable[[str, dict[str, Any] | list[Any]], Awaitable[Any]]


@dataclass(eq=False)
class Connection:
    """One client: its writer, a lock so answers never interleave, its requests in flight."""

    writer: asyncio.StreamWriter
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    slots: asyncio.Semaphore = field(
        default_factory=lambda: asyncio.Semaphore(MAX_IN_FLIGHT_PER_CONNECTION)
    )
    # Fairness: the worker queues are first come, first served, so a client that sends
    # thousands of requests at once queues only a few at a time, and others' go in between.
    work: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(WORK_PER_CONNECTION))
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    closed: bool = False

    async def send(self, data: bytes) -> None:
        async with self.lock:
            if self.closed:
                return
            try:
                self.writer.write(data)
                if self.writer.transport.get_write_buffer_size() > 0:  # usually all sent already
                    await asyncio.wait_for(self.writer.drain(), WRITE_TIMEOUT_S)
            except (asyncio.TimeoutError, ConnectionError, OSError, RuntimeError):
                # A stalled or vanished reader: drop it rather than buffer without limit.
                self.abort()

    def abort(self) -> None:
        self.closed = True
        self.writer.transport.abort()


class Connections:
    """Every client of one daemon. Each line is answered on its own task; a client with too
    many lines in flight is not read until some are answered (back-pressure), and only a few
    of its requests wait for the worker threads at once (fairness).

    `dispatch` answers one request; methods in `unqueued` (which wait on something other than
    the worker threads) skip the per-client work queue.
    """

    def __init__(self, dispatch: Dispatch, unqueued: frozenset[str] = frozenset()) -> None:
        self.dispatch = dispatch
        self.unqueued = unqueued
        self.stopping = False
        self.served = 0
        self.requests = 0  # requests being answered now (a batch line holds several)
        self._open: set[Connection] = set()
        self._handlers: set[asyncio.Task[None]] = set()
        self._in_flight: set[asyncio.Task[None]] = set()

    @property
    def count(self) -> int:
        """Clients connected now."""
        return len(self._open)

    @property
    def in_flight(self) -> int:
        """Request lines being answered now."""
        return len(self._in_flight)

    def status(self) -> dict[str, int]:
        """What `status` reports of the clients."""
        return {"connections": self.count, "in_flight": self.in_flight, "served": self.served}

    async def on_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """asyncio's client_connected_cb: serve one client until it or the daemon closes."""
        conn = Connection(writer)
        if self.stopping or len(self._open) >= MAX_CONNECTIONS:
            error = (
                RpcError(rpc.SHUTTING_DOWN, "the daemon is shutting down")
                if self.stopping
                else RpcError(
                    rpc.OVERLOADED,
                    f"the daemon has {MAX_CONNECTIONS} connections open; try again shortly",
                )
            )
            await conn.send(rpc.encode(rpc.error_response(None, error)))
            writer.close()
            return
        task = asyncio.current_task()
        assert task is not None
        self._open.add(conn)
        self._handlers.add(task)
        try:
            await self._read_requests(conn, reader)
            if conn.tasks:  # the client closed its side: answer what it sent before closing
                await asyncio.wait(set(conn.tasks))
        finally:
            self._open.discard(conn)
            self._handlers.discard(task)
            conn.closed = True
            writer.close()

    async def drain(self) -> None:
        """Shutdown: refuse new lines, let those in flight finish (for a while), close all."""
        self.stopping = True
        if self._in_flight:
            _, pending = await asyncio.wait(set(self._in_flight), timeout=SHUTDOWN_GRACE_S)
            if pending:
                log.warning("%d request(s) did not finish in time", len(pending))
        for conn in list(self._open):
            conn.closed = True
            conn.writer.close()  # flushes what is buffered, then closes
        if self._handlers:
            await asyncio.wait(set(self._handlers), timeout=2.0)

    async def _read_requests(self, conn: Connection, reader: asyncio.StreamReader) -> None:
        while not conn.closed:
            try:
                line = await reader.readuntil(b"\n")
            except asyncio.IncompleteReadError as exc:
                line = exc.partial  # end of input: a last line without a newline still counts
                if line.strip():
                    await self._accept_line(conn, line)
                return
            except asyncio.LimitOverrunError:
                error = RpcError(
                    rpc.REQUEST_TOO_LARGE,
                    f"a request line is limited to {rpc.MAX_LINE_BYTES:,} bytes; "
                    "this connection is closed",
                )
                await conn.send(rpc.encode(rpc.error_response(None, error)))
                return
            except (ConnectionError, OSError):
                return
            if self.stopping:
                await self._refuse(conn, line)
                return
            if line.strip():
                await self._accept_line(conn, line)

    async def _accept_line(self, conn: Connection, line: bytes) -> None:
        await conn.slots.acquire()  # back-pressure: stop reading while too many are in flight
        task = asyncio.create_task(self._answer_line(conn, line))
        conn.tasks.add(task)
        self._in_flight.add(task)
        task.add_done_callback(conn.tasks.discard)
        task.add_done_callback(self._in_flight.discard)

    async def _refuse(self, conn: Connection, line: bytes) -> None:
        parsed, batch = rpc.parse_line(line)
        error = RpcError(rpc.SHUTTING_DOWN, "the daemon is shutting down; retry when it is back")
        answers = [
            rpc.encode(rpc.error_response(p.id, error if isinstance(p, Request) else p.error))
            for p in parsed
            if not (isinstance(p, Request) and p.notification)
        ]
        if answers:
            await conn.send(_join(answers, batch))

    async def _answer_line(self, conn: Connection, line: bytes) -> None:
        parsed: list[Parsed] = []
        try:
            parsed, batch = rpc.parse_line(line)
            self.requests += len(parsed)
            if len(parsed) == 1:  # the common case, without gather's extra tasks
                answers = [await self._answer(conn, parsed[0])]
            else:
                answers = await asyncio.gather(*(self._answer(conn, p) for p in parsed))
            encoded = [a for a in answers if a is not None]
            if encoded:
                await conn.send(_join(encoded, batch))
        finally:
            self.requests -= len(parsed)
            conn.slots.release()

    async def _answer(self, conn: Connection, item: Request | Invalid) -> bytes | None:
        """The encoded response to one request (None for a notification)."""
        if isinstance(item, Invalid):
            return rpc.encode(rpc.error_response(item.id, item.error))
        try:
            if item.method in self.unqueued:
                result = await self.dispatch(item.method, item.params)
            else:
                async with conn.work:
                    result = await self.dispatch(item.method, item.params)
        except RpcError as exc:
            error = exc
        except Exception:  # noqa: BLE001 - one failing request must not take the daemon down
            log.exception("%s failed", item.method)
            error = RpcError(
                rpc.SERVER_ERROR,
                f"{item.method} failed inside the daemon; its log has the details",
            )
        else:
            self.served += 1
            return None if item.notification else _encode_answer(item.id, result)
        return None if item.notification else rpc.encode(rpc.error_response(item.id, error))


def _encode_answer(request_id: Any, result: Any) -> bytes:
    """The encoded answer; an unencodable result becomes an error, not a dropped reply."""
    try:
        return rpc.encode(rpc.result_response(request_id, result))
    except ValueError as exc:
        log.error("cannot encode a result: %s", exc)
        error = RpcError(rpc.SERVER_ERROR, "the daemon produced a result it cannot encode")
        return rpc.encode(rpc.error_response(request_id, error))


def _join(encoded: list[bytes], batch: bool) -> bytes:
    if not batch:
        return encoded[0]
    return b"[" + b",".join(e.rstrip(b"\n") for e in encoded) + b"]\n"
