"""Fine-tune the LoRA adapter of an artifact set on plain text with the ONNX Runtime training API."""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from wordahead.model import runtime, training_graphs
from wordahead.model.artifacts import Adapter, ArtifactSet

IGNORE = -100  # label value the loss skips (padding)


@dataclass(frozen=True)
class Batch:
    """Token windows ready for the training graph: labels are input_ids shifted left by one."""

    input_ids: np.ndarray  # [B, T] int64
    attention_mask: np.ndarray  # [B, T] int64
    labels: np.ndarray  # [B, T] int64, IGNORE where there is no next token

    @property
    def tokens(self) -> int:
        return int((self.labels != IGNORE).sum())


def token_stream(texts: Iterable[str], tokenizer, eos_id: int) -> list[int]:
    """Tokenize texts and join them with EOS (each text is a document: no context crosses it)."""
    stream: list[int] = []
    for encoding in tokenizer.encode_batch([t for t in texts if t.strip()]):
        stream.append(eos_id)
        stream.extend(encoding.ids)
    if stream:
        stream.append(eos_id)
    return stream


def make_batches(stream: Sequence[int], seq_len: int, batch_size: int) -> list[Batch]:
    """Pack a token stream into [batch_size, seq_len] windows; the tail is padded and masked."""
    ids = np.asarray(stream, dtype=np.int64)
    windows: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    for start in range(0, max(len(ids) - 1, 0), seq_len):
        chunk = ids[start : start + seq_len + 1]
        n = len(chunk) - 1
        x = np.zeros(seq_len, dtype=np.int64)
        y = np.full(seq_len, IGNORE, dtype=np.int64)
        m = np.zeros(seq_len, dtype=np.int64)
        x[:n], y[:n], m[:n] = chunk[:-1], chunk[1:], 1
        windows.append((x, m, y))
    batches = []
    for i in range(0, len(windows), batch_size):
        group = windows[i : i + batch_size]
        batches.append(
            Batch(
                input_ids=np.stack([w[0] for w in group]),
                attention_mask=np.stack([w[1] for w in group]),
                labels=np.stack([w[2] for w in group]),
            )
        )
    return batches


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warmup, then cosine decay to 10% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


@dataclass
class FitResult:
    """What a fine-tuning run did."""

    steps: int
    tokens: int
    seconds: float
    train_loss: float
    eval_loss: float | None
    stopped: str  # "steps", "time budget", "early stopping"
    history: list[dict] = field(default_factory=list)


class LoraTrainer:
    """ORT Module + Optimizer over an artifact set; only LoRA tensors are trainable: those of
    the chosen adapter `groups` (default: the model's, wordahead.model.training_graphs). The other
    LoRA tensors keep the values they are given (`adapter`), frozen."""

    def __init__(
        self,
        artifacts: ArtifactSet,
        adapter: Adapter | None = None,
        threads: int = 1,
        groups: str | list[str] | None = None,
        cache_dir: Path | None = None,
    ) -> None:
        api = runtime.training_api()
        self.artifacts = artifacts
        self.groups = training_graphs.parse_groups(artifacts, groups)
        self._scratch = None
        if cache_dir is None:  # nowhere to keep them: made for this trainer, then deleted
            self._scratch = tempfile.TemporaryDirectory(prefix="keyboard-graphs-")
            cache_dir = Path(self._scratch.name)
        training = training_graphs.training_files(artifacts, self.groups, cache_dir)
        self.state = api.CheckpointState.load_checkpoint(str(training / "checkpoint"))
        options = runtime.session_options(threads)
        self.module = api.Module(
            str(training / "training_model.onnx"),
            self.state,
            str(training / "eval_model.onnx"),
            session_options=options,
        )
        self.optimizer = api.Optimizer(str(training / "optimizer_model.onnx"), self.module)
        members = training_graphs.groups_of(artifacts)
        # the trained tensors, and all of them (the frozen groups are read and set alike)
        self.lora_names = [n for g in self.groups for n in members[g]]
        self.all_lora_names = list(artifacts.lora_shapes)
        self._buffer_names: list[str] | None = None
        if adapter is not None:
            self.set_adapter(adapter)

    def set_adapter(self, adapter: Adapter) -> None:
        for name in self.all_lora_names:
            self.state.parameters[name] = np.ascontiguousarray(adapter[name], dtype=np.float32)

    def adapter(self) -> Adapter:
        """The current LoRA tensors, all groups (copies)."""
        return {n: np.array(self.state.parameters[n].data, copy=True) for n in self.all_lora_names}

    def trainable_names(self) -> list[str]:
        """The LoRA tensor names in the order of the session's contiguous trainable buffer.

        Found once by loading distinct values per tensor and reading the buffer back, so the
        layout is what ORT does, not what the manifest happens to list."""
        if self._buffer_names is None:
            saved = self.adapter()
            marked = dict(saved)
            for i, name in enumerate(self.lora_names):
                marked[name] = np.full(saved[name].shape, i + 1, np.float32)
            self.set_adapter(marked)
            flat = self.module.get_contiguous_parameters(trainable_only=True).numpy()
            order: list[str] = []
            offset = 0
            while offset < flat.size:
                name = self.lora_names[int(flat[offset]) - 1]
                order.append(name)
                offset += int(np.prod(saved[name].shape))
            self.set_adapter(saved)
            if sorted(order) != sorted(self.lora_names) or offset != flat.size:
                raise RuntimeError("the trainable buffer is not made of the LoRA tensors")
            self._buffer_names = order
        return self._buffer_names

    def trainable_buffer(self) -> np.ndarray:
        """All LoRA tensors as one float32 vector (a copy), in `trainable_names()` order.

        `trainable_only` is spelled out on both sides: ORT reads every weight of the model by
        default (trainable_only=False) but writes only the trainable ones (True)."""
        return np.array(self.module.get_contiguous_parameters(trainable_only=True).numpy())

    def load_trainable_buffer(self, flat: np.ndarray) -> None:
        """Write a vector from `trainable_buffer()` (or of its layout) into the LoRA tensors."""
        flat = np.ascontiguousarray(flat, dtype=np.float32).reshape(-1)
        size = self.module.get_parameters_size(trainable_only=True)
        if flat.size != size:
            raise ValueError(f"the LoRA buffer holds {size} values, not {flat.size}")
        value = runtime.onnxruntime().OrtValue.ortvalue_from_numpy(flat)
        # The 1.19 wrapper hands its argument to the C module as is, which wants the C value.
        self.module.copy_buffer_to_parameters(value._ortvalue, trainable_only=True)

    def batches(self, texts: Iterable[str], seq_len: int = 64, batch_size: int = 8) -> list[Batch]:
        tokenizer = self.artifacts.tokenizer()
        return make_batches(
            token_stream(texts, tokenizer, self.artifacts.eos_id), seq_len, batch_size
        )

    def train_step(self, batch: Batch, lr: float) -> float:
        self.module.train()
        self.optimizer.set_learning_rate(lr)
        loss = self.module(batch.input_ids, batch.attention_mask, batch.labels)
        self.optimizer.step()
        self.module.lazy_reset_grad()
        return float(loss)

    def evaluate(self, batches: Sequence[Batch]) -> float:
        """Mean loss per predicted token over `batches` (nan when there is nothing to score)."""
        self.module.eval()
        total, count = 0.0, 0
        for batch in batches:
            n = batch.tokens
            if n:
                total += float(self.module(batch.input_ids, batch.attention_mask, batch.labels)) * n
                count += n
        return total / count if count else float("nan")

    def fold_in(
        self,
        texts: Sequence[str],
        *,
        epochs: float,
        lr: float,
        seq_len: int = 64,
        batch_size: int = 8,
        seed: int = 0,
        time_budget_s: float | None = None,
    ) -> FitResult:
        """Train on `texts` for `epochs` passes (rounded up to whole steps) at a peak of `lr`,
        with nothing held out to stop on: a short, gentle pass over text that was kept for
        measuring, once it has been measured."""
        batches = self.batches(texts, seq_len, batch_size)
        steps = max(1, math.ceil(epochs * len(batches)))
        return self.fit(
            batches, max_steps=steps, lr=lr, warmup=1, time_budget_s=time_budget_s, seed=seed
        )

    def fit(
        self,
        train: Sequence[Batch],
        heldout: Sequence[Batch] = (),
        *,
        max_steps: int = 200,
        lr: float = 1e-3,
        warmup: int = 10,
        time_budget_s: float | None = None,
        eval_every: int = 25,
        patience: int = 3,
        seed: int = 0,
        on_step: Callable[[dict], None] | None = None,
    ) -> FitResult:
        """Train for up to `max_steps` (cycling over shuffled batches) within a time budget.

        With held-out batches, evaluates every `eval_every` steps, keeps the best adapter and stops
        after `patience` evaluations without improvement.
        """
        if not train:
            raise ValueError("no training batches")
        rng = np.random.default_rng(seed)
        start = time.monotonic()
        best_loss = self.evaluate(heldout) if heldout else None
        best_adapter = self.adapter() if heldout else None
        bad_evals, tokens, step, stopped = 0, 0, 0, "steps"
        history: list[dict] = []
        recent: list[float] = []
        order: list[int] = []
        while step < max_steps:
            if not order:
                order = list(rng.permutation(len(train)))
            batch = train[order.pop()]
            loss = self.train_step(batch, lr_at(step, max_steps, lr, warmup))
            step += 1
            tokens += batch.tokens
            recent = (recent + [loss])[-20:]
            record = {"step": step, "loss": loss, "elapsed": time.monotonic() - start}
            if heldout and (step % eval_every == 0 or step == max_steps):
                eval_loss = self.evaluate(heldout)
                record["eval_loss"] = eval_loss
                if best_loss is None or eval_loss < best_loss - 1e-4:
                    best_loss, best_adapter, bad_evals = eval_loss, self.adapter(), 0
                else:
                    bad_evals += 1
            history.append(record)
            if on_step:
                on_step({**record, "max_steps": max_steps})
            if heldout and bad_evals >= patience:
                stopped = "early stopping"
                break
            if time_budget_s is not None and time.monotonic() - start > time_budget_s:
                stopped = "time budget"
                break
        if best_adapter is not None:
            self.set_adapter(best_adapter)
        return FitResult(
            steps=step,
            tokens=tokens,
            seconds=time.monotonic() - start,
            train_loss=float(np.mean(recent)) if recent else float("nan"),
            eval_loss=best_loss,
            stopped=stopped,
            history=history,
        )
