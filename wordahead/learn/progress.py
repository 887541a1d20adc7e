"""Progress of a long job: a one-line bar on a terminal, JSON log lines anywhere else."""

from __future__ import annotations

import json
import sys
import time
from typing import Any, TextIO

BAR_WIDTH = 24
LOG_EVERY_S = 10.0  # JSON step lines at most this often (plus the first and the last)


def _clock(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 60}:{seconds % 60:02d}"


class Progress:
    """Reports stages (`event`) and training steps (`step`) of a job.

    On a terminal: stages as plain lines and steps as a bar redrawn in place (steps, loss,
    ETA). Otherwise (a log file, the journal, a daemon's pipe): one JSON object per line,
    `{"event": ..., ...}`, steps throttled to one per LOG_EVERY_S.
    """

    def __init__(self, stream: TextIO | None = None, tty: bool | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self._bar_open = False
        self._last_log = -float("inf")
        self._budget_s: float | None = None

    def _write(self, text: str) -> None:
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):  # a closed pipe must not fail the job
            pass

    def _end_bar(self) -> None:
        if self._bar_open:
            self._write("\n")
            self._bar_open = False

    def event(self, event: str, message: str = "", **fields: Any) -> None:
        """A stage of the job: "start", "evaluate", "promoted", ..."""
        if self.tty:
            self._end_bar()
            if message:
                self._write(f"{message}\n")
        else:
            record = {"ts": round(time.time(), 3), "event": event, **fields}
            if message:
                record["message"] = message
            self._write(json.dumps(record, default=str) + "\n")

    def start_training(self, budget_s: float | None) -> None:
        self._budget_s = budget_s

    def step(self, record: dict[str, Any]) -> None:
        """One training step, as LoraTrainer.fit's on_step reports it."""
        step, total = int(record["step"]), int(record.get("max_steps") or 0)
        elapsed = float(record.get("elapsed", 0.0))
        eta = None
        if step and total:
            eta = (total - step) * elapsed / step
            if self._budget_s is not None:
                eta = min(eta, max(0.0, self._budget_s - elapsed))
        if self.tty:
            done = int(BAR_WIDTH * step / total) if total else 0
            bar = "#" * done + "-" * (BAR_WIDTH - done)
            text = f"\rtraining [{bar}] {step}/{total} loss {record['loss']:.3f}"
            if record.get("eval_loss") is not None:
                text += f" held-out {record['eval_loss']:.3f}"
            text += f" {_clock(elapsed)}" + (f" ETA {_clock(eta)}" if eta is not None else "")
            self._write(text + "\033[K")
            self._bar_open = True
            return
        now = time.monotonic()
        if (
            step == 1
            or step == total
            or "eval_loss" in record
            or now - self._last_log >= LOG_EVERY_S
        ):
            self._last_log = now
            fields = {k: v for k, v in record.items() if k != "max_steps"}
            if eta is not None:
                fields["eta_s"] = round(eta, 1)
            fields = {k: round(v, 4) if isinstance(v, float) else v for k, v in fields.items()}
            self.event("step", **fields, max_steps=total)

    def close(self) -> None:
        self._end_bar()
