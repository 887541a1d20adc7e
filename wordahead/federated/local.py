"""This machine's part of a federated round: which text may train, and the ORT training itself.

No Flower and no torch here: the ClientApp hands in the community adapter and gets back the
trained adapter tensors (or a reason to sit the round out); text never leaves this module.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from wordahead.model.artifacts import Adapter, ArtifactSet, check_adapter, write_atomic
from wordahead.paths import Home
from wordahead.types import KeyboardError

SETTINGS_FILE = "federated.json"
log = logging.getLogger(__name__)


class Declined(KeyboardError):
    """This machine sits the round out; the message says why (it is all the server learns)."""


@dataclass
class FederationSettings:
    """`<keyboard home>/federated.json`: whether this machine takes part, and its progress.

    Off by default: nothing joins a federation until `keyboard federate` turns it on."""

    enabled: bool = False
    superlink: str = ""  # host:port of the SuperLink's Fleet API
    insecure: bool = False  # plain gRPC (tests, loopback); TLS otherwise
    root_certificates: str = ""  # CA bundle that signs the SuperLink's certificate
    min_new_words: int = 200  # fewer words logged since the last federated run: decline
    train_on_battery: bool = False
    watermark: int = 0  # last typing-log entry a finished federated run trained on
    run_id: int = 0  # the run in progress and the entries it trains on (after run_start)
    run_start: int = 0
    rounds: int = 0  # rounds this machine contributed to, ever
    last_round: str = ""  # UTC time of the last contribution

    @staticmethod
    def path(home: Path) -> Path:
        return home / SETTINGS_FILE

    @classmethod
    def load(cls, home: Path) -> FederationSettings:
        """The settings in `home`; a damaged file is logged and read as the defaults (off:
        nothing joins until `keyboard federate` writes the file again, which repairs it)."""
        path = cls.path(home)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            return cls()
        except (OSError, ValueError, RecursionError) as exc:
            problem: str | None = str(exc)
        else:
            problem = cls._problem(data)
            if problem is None:
                return cls(**data)
        log.warning(
            "%s is damaged (%s); federated learning is off until `keyboard federate --off` "
            "(or `keyboard federate --superlink ...`) writes it again",
            path,
            problem,
        )
        return cls()

    @classmethod
    def _problem(cls, data: object) -> str | None:
        """What is wrong with settings read as `data` (None: nothing)."""
        if not isinstance(data, dict):
            return "not a JSON object"
        defaults = {f.name: getattr(cls(), f.name) for f in fields(cls)}
        if unknown := sorted(set(data) - set(defaults)):
            return f"unknown settings {unknown}"
        for name, value in data.items():
            expected = type(defaults[name])
            if type(value) is not expected and not (expected is float and type(value) is int):
                return f"{name} is not a {expected.__name__}"
        return None

    def save(self, home: Path) -> None:
        text = json.dumps(asdict(self), indent=2) + "\n"
        write_atomic(self.path(home), lambda f: f.write(text.encode()))


@dataclass(frozen=True)
class RoundConfig:
    """How one round trains locally (sent by the server, bounded here)."""

    steps: int = 20
    lr: float = 1e-3
    batch_size: int = 8
    seed: int = 0
    threads: int = 1
    max_entries: int = 20_000  # the newest entries of the run's text: a round stays short
    groups: str = ""  # the adapter groups trained ("": the model's default groups)

    @classmethod
    def from_server(cls, config: dict[str, Any]) -> RoundConfig:
        """Take the server's values, clamped: a server cannot make a laptop train for hours."""
        return cls(
            steps=max(1, min(int(config.get("local-steps", cls.steps)), 500)),
            lr=min(float(config.get("lr", cls.lr)), 1e-1),
            batch_size=max(1, min(int(config.get("batch-size", cls.batch_size)), 32)),
            seed=int(config.get("seed", 0)) + int(config.get("server-round", 0)),
            groups=str(config.get("groups", "")),
        )


def round_text(home: Path, run_id: int) -> tuple[list[str], int]:
    """The text this machine may train on in run `run_id`, and the newest entry id in it.

    The typing log's rules apply: nothing while logging is paused, nothing from a source the
    user has excluded since (private text was never stored), nothing on battery unless
    allowed. Only text logged since the last federated run counts; too little declines.
    Every round of one run trains on the same text.
    """
    from wordahead.learn.policy import on_battery
    from wordahead.store.redaction import excluded_by
    from wordahead.store.typing_log import TypingLog

    settings = FederationSettings.load(home)
    if not settings.train_on_battery and on_battery():
        raise Declined("on battery power")
    if settings.run_id != run_id:
        settings.run_id, settings.run_start = run_id, settings.watermark
        settings.save(home)
    with TypingLog(Home(home).typing_log) as typing_log:
        if typing_log.paused:
            raise Declined("logging is paused")
        patterns = typing_log.excluded_sources
        entries = [
            (i, text, n)
            for i, source, text, n in typing_log.iter_entries(after=settings.run_start)
            if excluded_by(source, patterns) is None
        ]
    words = sum(n for _, _, n in entries)
    if words < settings.min_new_words:
        raise Declined(f"too little new text ({words} words; needs {settings.min_new_words})")
    return [t for _, t, _ in entries], max(i for i, _, _ in entries)


def contributed(home: Path, run_id: int, last_entry: int) -> None:
    """Record that this machine sent an update in run `run_id` trained up to `last_entry`:
    the next run counts only text logged after it as new."""
    settings = FederationSettings.load(home)
    if settings.run_id == run_id:
        settings.watermark = max(settings.watermark, last_entry)
    settings.rounds += 1
    settings.last_round = datetime.now(timezone.utc).isoformat(timespec="seconds")
    settings.save(home)


def check_tensors(artifacts: ArtifactSet, arrays: list[np.ndarray]) -> Adapter:
    """Arrays in manifest order -> the named adapter, or KeyboardError if they do not fit."""
    if len(arrays) != len(artifacts.lora_shapes):
        raise KeyboardError(
            f"expected {len(artifacts.lora_shapes)} LoRA tensors, got {len(arrays)}"
        )
    return check_adapter(dict(zip(artifacts.lora_shapes, arrays)), artifacts, "community adapter")


def train_round(
    model_dir: Path,
    community: list[np.ndarray],
    texts: list[str],
    config: RoundConfig,
    cache_dir: Path | None = None,
) -> tuple[list[np.ndarray], dict[str, float]]:
    """Train the community adapter on `texts` with the ORT trainer; return the new adapter
    tensors (manifest order, read from the session's trainable buffer) and a few numbers.

    Raises Declined when the result is not finite: such an update would poison the secure
    sum, where the server can no longer single it out.
    """
    from wordahead.learn.trainer import LoraTrainer
    from wordahead.model.training_graphs import GroupError

    artifacts = ArtifactSet.open(model_dir)
    start = check_tensors(artifacts, community)
    # The groups the server names (the model's default ones unless it names others): every
    # machine trains the same tensors, so updates add up.
    try:
        trainer = LoraTrainer(
            artifacts,
            adapter=start,
            threads=config.threads,
            groups=config.groups or None,
            cache_dir=cache_dir,
        )
    except GroupError as exc:
        raise Declined(f"cannot train the groups asked for: {exc}") from None
    seq_len = artifacts.seq_len
    batches = trainer.batches(texts[-config.max_entries :], seq_len, config.batch_size)
    if not batches:
        raise Declined("no text to train on")
    fit = trainer.fit(
        batches,
        max_steps=config.steps,
        lr=config.lr,
        warmup=max(1, config.steps // 10),
        seed=config.seed,
    )
    flat = trainer.trainable_buffer()
    if not np.isfinite(flat).all():
        raise Declined("local training diverged (non-finite adapter)")
    tensors, offset = trainer.adapter(), 0  # the groups left out of training as they came
    for name in trainer.trainable_names():
        shape = artifacts.lora_shapes[name]
        size = int(np.prod(shape))
        tensors[name] = flat[offset : offset + size].reshape(shape)
        offset += size
    metrics = {"steps": fit.steps, "tokens": fit.tokens, "train_loss": fit.train_loss}
    return [tensors[n] for n in artifacts.lora_shapes], metrics
