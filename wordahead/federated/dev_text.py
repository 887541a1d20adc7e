"""The server's own dev text: the community adapter's loss on it after each round, and when to
stop (rounds go on while it improves)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from wordahead.model.artifacts import Adapter, ArtifactSet
from wordahead.types import KeyboardError

if TYPE_CHECKING:
    from wordahead.learn.trainer import Batch, LoraTrainer


def read_dev_text(path: Path) -> list[str]:
    """One message per non-empty line of a UTF-8 text file the server's operator holds (never
    a machine's text: in a simulation, the held-out writers' history)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise KeyboardError(f"dev text {path}: {exc}") from None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        raise KeyboardError(f"dev text {path}: no text")
    return lines


@dataclass
class DevLoss:
    """Mean next-token loss of an adapter on the dev text (at most `max_batches` batches), and
    the early-stopping rule: stop after `patience` rounds without a new best (0: never)."""

    artifacts: ArtifactSet
    path: Path
    patience: int = 0
    max_batches: int = 64
    best: float = float("inf")
    best_round: int = 0
    stale: int = 0
    _trainer: LoraTrainer | None = field(default=None, repr=False)
    _batches: list[Batch] = field(default_factory=list, repr=False)

    def loss(self, adapter: Adapter) -> float:
        from wordahead.learn.trainer import LoraTrainer

        if self._trainer is None:
            trainer = LoraTrainer(self.artifacts, threads=1)
            batches = trainer.batches(read_dev_text(self.path), self.artifacts.seq_len, 8)
            step = max(1, len(batches) // self.max_batches)  # spread over all of the text
            self._trainer, self._batches = trainer, batches[::step][: self.max_batches]
        self._trainer.set_adapter(adapter)
        return float(self._trainer.evaluate(self._batches))

    def observe(self, server_round: int, loss: float) -> bool:
        """Record round `server_round`'s loss; True when the federation should stop."""
        if loss < self.best:
            self.best, self.best_round, self.stale = loss, server_round, 0
        else:
            self.stale += 1
        return self.patience > 0 and self.stale >= self.patience
