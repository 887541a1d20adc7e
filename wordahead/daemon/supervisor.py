"""The daemon's personalization: the job as a child process, its schedule, the adapter watcher."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from wordahead.daemon import protocol as rpc
from wordahead.daemon.protocol import RpcError
from wordahead.daemon.served import ServedModel
from wordahead.daemon.typing_log_thread import TypingLogThread
from wordahead.learn import schedule
from wordahead.learn.job_log import JobLog
from wordahead.learn.policy import job_holder, last_failure, record_failure
from wordahead.paths import Home, keyboard_command

log = logging.getLogger("wordahead.daemon.server")

JOB_ID_WAIT_S = 3.0  # how long `train` looks for the job's row in the typing log
ADAPTER_POLL_S = 5.0  # how often the daemon looks for a newly activated adapter
JOB_STOP_S = 10.0  # how long shutdown lets a personalization job stop before killing it
STDERR_TAIL_LINES = 40  # of a job's stderr, kept to say why it died
SCHEDULE_RECHECK_S = 3600.0  # the schedule looks again at least hourly: clocks and sleeps drift


@dataclass
class Job:
    """The personalization job in progress (a child process)."""

    process: asyncio.subprocess.Process
    started: str
    reason: str
    job_id: int | None = None
    progress: dict[str, Any] | None = None  # its latest progress record (wordahead.learn.progress)
    done: asyncio.Task[dict[str, Any]] = field(init=False)  # its outcome, once it ended


class JobSupervisor:
    """Runs `keyboard train` as a child process (one at a time; serving goes on meanwhile),
    on request or when the schedule says, and serves a newly activated adapter however it
    got there."""

    def __init__(
        self, home: Home, model_dir: Path, typing_log: TypingLogThread, served: ServedModel
    ) -> None:
        self.home = home
        self.model_dir = model_dir
        self.log = typing_log
        self.served = served
        self.job: Job | None = None
        self.next_scheduled: datetime | None = None
        self.stopping = False
        self.last_failure: dict[str, Any] | None = None  # also kept in home.job_failure

    def status(self) -> dict[str, Any]:
        job = self.job
        recorded = last_failure(self.home)
        mine = self.last_failure
        running: dict[str, Any] | None = None
        if job is not None:
            running = {
                "job": job.job_id,
                "pid": job.process.pid,
                "started": job.started,
                "progress": job.progress,
            }
        elif (holder := job_holder(self.home)) is not None:
            # started by an earlier daemon (or `keyboard train`): it holds the home's job lock
            running = {"job": None, **holder, "progress": None}
        return {
            "running": running,
            "next_run": None if self.next_scheduled is None else self.next_scheduled.isoformat(),
            # why the last job failed, even when the typing log could not record it
            "last_failure": mine
            if mine and (not recorded or mine["time"] > recorded.get("time", ""))
            else recorded,
        }

    async def train(self, wait: bool, force: bool) -> dict[str, Any]:
        """The `train` method: start a job; with `wait`, its outcome once its adapter serves."""
        job = await self.start(reason="requested", force=force)
        if not wait:
            return {"started": True, "job": job.job_id, "pid": job.process.pid}
        result = await asyncio.shield(job.done)
        report = result.get("result") or {}
        if report.get("status") == "busy":  # a job started outside the daemon holds the lock
            raise RpcError(rpc.PERSONALIZATION_BUSY, str(report.get("reason") or "busy"))
        return result

    async def start(self, reason: str, force: bool = False) -> Job:
        """Start a personalization job in a child process."""
        if self.stopping:
            raise RpcError(rpc.SHUTTING_DOWN, "the daemon is shutting down")
        if self.job is not None:
            raise RpcError(
                rpc.PERSONALIZATION_BUSY,
                f"a personalization job is already running (pid {self.job.process.pid}, "
                f"started {self.job.started}); wait for it, see `keyboard status`",
            )
        # The child works on this daemon's home and model, whatever the shell had set.
        env = dict(os.environ, KEYBOARD_HOME=str(self.home.root))
        command = keyboard_command("train", "--json")
        command += ["--model", str(self.model_dir)] + (["--force"] if force else [])
        # Its own session: a Ctrl-C meant for the daemon's terminal does not kill the job
        # mid-write; shutdown stops it explicitly.
        process = await asyncio.create_subprocess_exec(
            *command,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,  # kept in memory too: daemon.log may be on a full disk
            env=env,
            start_new_session=True,
            limit=2**20,
        )
        started = datetime.now(timezone.utc).isoformat(timespec="seconds")
        job = Job(process, started, reason)
        job.done = asyncio.create_task(self._finish(job))
        self.job = job
        log.info("personalization job started (pid %d, %s)", process.pid, reason)
        job.job_id = await self._find_job_id(job)
        return job

    async def _find_job_id(self, job: Job) -> int | None:
        """The typing log's id for the job, which the child records when it starts."""
        deadline = time.monotonic() + JOB_ID_WAIT_S
        while time.monotonic() < deadline:
            try:
                rows = await self.log.run(JobLog(self.log.typing_log).recent, 5)
            except RpcError:
                return None
            for row in rows:
                if row.get("pid") == job.process.pid:
                    return int(row["id"])
            if job.done.done():
                break
            await asyncio.sleep(0.05)
        return None

    async def _finish(self, job: Job) -> dict[str, Any]:
        try:
            assert job.process.stdout is not None and job.process.stderr is not None
            tail: deque[str] = deque(maxlen=STDERR_TAIL_LINES)
            stdout, _ = await asyncio.gather(
                job.process.stdout.read(),
                _forward(job.process.stderr, tail, lambda record: setattr(job, "progress", record)),
            )
            code = await job.process.wait()
            lines = [ln for ln in stdout.decode("utf-8", "replace").splitlines() if ln.strip()]
            try:
                result = json.loads(lines[-1]) if lines else None
            except ValueError:
                result = None
            log.info("personalization job (pid %d) ended with exit code %s", job.process.pid, code)
            reported = isinstance(result, dict)  # a failed job records why itself
            if not isinstance(result, dict):  # it died before it could say why: its stderr does
                result = {"status": "failed", "reason": _death(code, tail)}
            if job.job_id is None:
                job.job_id = result.get("job_id")
            out: dict[str, Any] = {
                "job": job.job_id,
                "pid": job.process.pid,
                "exit_code": code,
                "result": result,
            }
            failed = result.get("status") == "failed" or code != 0
            if failed and result.get("status") != "busy" and not self.stopping:
                reason = str(result.get("reason") or _death(code, tail))
                out["reason"] = reason
                self.last_failure = {
                    "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    "job": job.job_id,
                    "reason": reason,
                }
                if not reported:
                    record_failure(self.home, reason, job.job_id)
            # The job is over once its adapter is served: `status` never shows a finished job
            # with the old adapter still in place.
            if code == 0 and not self.stopping:
                try:
                    out["reload"] = await self.served.reload()
                except RpcError as exc:
                    out["reload"] = {"error": exc.message}
            out["adapter"] = self.served.version
            return out
        finally:
            self.job = None

    async def stop(self) -> None:
        """Shutdown: no new jobs; a running one is asked to stop, then killed."""
        self.stopping = True
        job = self.job
        if job is None:
            return
        log.info("stopping the personalization job (pid %d)", job.process.pid)
        with contextlib.suppress(ProcessLookupError):
            job.process.terminate()
        try:
            await asyncio.wait_for(asyncio.shield(job.done), JOB_STOP_S)
        except asyncio.TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                job.process.kill()
            await job.process.wait()

    async def reload(self) -> None:
        """Serve the active adapter again, logging (not raising) a failure."""
        try:
            await self.served.reload()
        except RpcError as exc:
            log.error("reload failed: %s", exc.message)

    async def watch_adapters(self) -> None:
        """Serve a newly activated adapter however it got there: a job run outside the daemon
        (`keyboard train`, a systemd timer) or switching versions from the command line."""
        while True:
            await asyncio.sleep(ADAPTER_POLL_S)
            if self.served.changed():
                log.info("the active adapter changed; reloading")
                await self.reload()

    async def run_schedule(self) -> None:
        """Run a job at the configured time of day when there is enough new text."""
        while True:
            now = datetime.now(timezone.utc)
            try:
                self.next_scheduled = schedule.next_run(now, schedule.configured_at(self.home))
            except BaseException:
                self.next_scheduled = None
                raise  # the daemon's supervisor logs it and runs the schedule again
            delay = max(1.0, (self.next_scheduled - now).total_seconds())
            await asyncio.sleep(min(delay, SCHEDULE_RECHECK_S))
            if datetime.now(timezone.utc) < self.next_scheduled or self.job is not None:
                continue
            try:
                due = await self.log.run(schedule.should_run, self.log.typing_log, self.home)
                if due:
                    await self.start(reason="scheduled")
                else:
                    log.info("scheduled personalization skipped: %s", due.reason)
            except RpcError as exc:
                log.warning("scheduled personalization did not start: %s", exc.message)
            except Exception:  # noqa: BLE001
                log.exception("scheduled personalization failed to start")


async def _forward(
    stream: asyncio.StreamReader,
    tail: deque[str],
    on_progress: Callable[[dict[str, Any]], None],
) -> None:
    """Copy a job's stderr to the daemon's (its log) line by line, keeping the last lines;
    its progress records (wordahead.learn.progress: JSON with an "event") go to `on_progress`, which
    is how `status`, and so `train --via-daemon`, shows a running job's progress."""
    while True:
        try:
            line = await stream.readline()
        except ValueError:  # a line over the limit: take it in pieces
            line = await stream.read(65536)
        if not line:
            return
        text = line.decode("utf-8", "replace").rstrip()
        if text and not text.startswith("{"):  # progress events are JSON; reasons are not
            tail.append(text)
        elif text:
            with contextlib.suppress(ValueError):
                record = json.loads(text)
                if isinstance(record, dict) and "event" in record:
                    on_progress(record)
        with contextlib.suppress(OSError, ValueError):  # a full disk must not stop the job
            sys.stderr.write(line.decode("utf-8", "replace"))
            sys.stderr.flush()


def _death(code: int | None, tail: deque[str]) -> str:
    """Why a job that reported nothing ended: its last stderr line, or how it was stopped."""
    how = (
        f"killed by {signal.Signals(-code).name}"
        if code is not None and code < 0
        else f"exit code {code}"
    )
    return f"the job ended ({how}) without a report" + (f": {tail[-1]}" if tail else "")
