"""Train the shipped starter model: a byte-level BPE tokenizer and a small Llama-style causal LM.

Runs on CPU from the base corpus (a directory of UTF-8 text files, one paragraph per line, blank
lines between documents), holds out 1% of every source, trains for a fixed number of steps
(deterministic for a given seed, device and thread count), evaluates on the held-out text and
exports the result with `keyboard export` into the shipped artifact set.

    python scripts/train_starter.py --corpus ../shared/corpus/base --max-steps 900
    python scripts/train_starter.py ... --resume       # continue an interrupted run

Speed: matrix products in bfloat16 autocast (fp32 master weights and optimizer state) where the
CPU has native bf16 (AVX-512 BF16, AMX) or on a GPU, a fused AdamW, and the loss step compiled
with `torch.compile` (`benchmarks/starter_throughput.py` measures each against the fp32 eager
recipe). A GPU is used when present; nothing requires one.

Distillation: with --teacher DIR (a larger model trained by this script on the same tokens, e.g.
on a GPU), the loss mixes the next token's cross-entropy with the KL divergence from the
teacher's next-token distribution (--distill-weight), so the small model learns from the
teacher's whole distribution rather than from one observed token: on a corpus of a few million
tokens that is more signal per token than another pass over the same text.
--data DIR trains from a prepared token cache (tokenizer.json, train-*.npy, heldout-*.npy, as
this script writes under WORK) without the corpus, so a run can go to another machine.

Resumable: every --checkpoint-minutes the whole run state (weights, optimizer, data order, step)
is written atomically to WORK/run/state.pt; `--resume` continues from it and reaches the same
weights as an uninterrupted run. The learning rate follows warm-up, a constant stage and a final
linear decay over the last --decay-steps ("WSD"), so a run can be extended (a larger
--max-steps on resume) at any point before its decay starts.

Hold-out rule: in every source file, line i (0-based, blank lines counted) is held out when
(i // 10) % 100 == 99, i.e. one block of 10 consecutive lines in every 1,000 — 1% of each
file, spread evenly over it, in contiguous blocks so held-out text keeps some context.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

EOT = "<|endoftext|>"
MODEL_NAME = "keyboard-starter"
HOLDOUT_BLOCK = 10  # lines per block
HOLDOUT_EVERY = 100  # one block in this many is held out -> 1%
# Sampling weight per source (relative; sources not listed get 1.0). Conversational and
# contemporary text is up-weighted against the (large, old-fashioned) Gutenberg prose, but not so
# far that a run of 3 passes shows the small MASC more than about 8 times.
DEFAULT_WEIGHTS = "gutenberg=0.42,speeches=0.25,dialogue=0.25,masc=0.08"


@dataclass
class TrainConfig:
    """Everything that decides the trained weights (recorded next to the model)."""

    vocab_size: int = 8192
    hidden_size: int = 192
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 512
    seq_len: int = 128
    batch_size: int = 32
    max_steps: int = 900
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    schedule: str = "wsd"  # "wsd" (warm-up, constant, linear decay) or "cosine"
    decay_steps: int = 0  # wsd: length of the final decay (0: a fifth of max_steps)
    precision: str = "bf16"  # matmuls under bf16 autocast, or "fp32"
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    threads: int = 2
    tokenizer_sample_bytes: int = 4_000_000
    weights: dict[str, float] = field(default_factory=dict)
    distill_weight: float = 0.0  # the teacher's share of the loss (with --teacher)


# --- data --------------------------------------------------------------------------------------
def is_heldout(line_index: int) -> bool:
    """The deterministic 1% hold-out rule (see module docstring)."""
    return (line_index // HOLDOUT_BLOCK) % HOLDOUT_EVERY == HOLDOUT_EVERY - 1


def split_documents(lines: list[str]) -> list[list[str]]:
    """Group paragraph lines into documents at blank lines."""
    docs: list[list[str]] = []
    current: list[str] = []
    for line in lines:
        if line.strip():
            current.append(line.rstrip("\n"))
        elif current:
            docs.append(current)
            current = []
    if current:
        docs.append(current)
    return docs


def read_source(path: Path) -> tuple[list[list[str]], list[list[str]]]:
    """(training documents, held-out documents) of one source file.

    A document cut by a held-out block becomes two documents, so no held-out line is ever
    trained on and no training line is ever evaluated on.
    """
    train_lines: list[str] = []
    held_lines: list[str] = []
    with path.open(encoding="utf-8") as f:
        for i, line in enumerate(f):
            held = is_heldout(i)
            (held_lines if held else train_lines).append(line)
            if held != is_heldout(i + 1):  # the stream switches: end the current document
                (held_lines if held else train_lines).append("\n")
    return split_documents(train_lines), split_documents(held_lines)


def source_files(corpus: Path) -> list[Path]:
    files = sorted(p for p in corpus.glob("*.txt") if p.is_file())
    if not files:
        sys.exit(f"no *.txt files in {corpus}: pass --corpus DIR (e.g. ../shared/corpus/base)")
    return files


def parse_weights(spec: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, value = part.partition("=")
        out[name.strip()] = float(value)
    return out


# --- tokenizer ---------------------------------------------------------------------------------
def tokenizer_sample(sources: dict[str, list[list[str]]], budget: int) -> list[str]:
    """Every k-th training paragraph of each source, about `budget` bytes in all, in equal shares."""
    share = budget // max(1, len(sources))
    sample: list[str] = []
    for docs in sources.values():
        lines = [line for doc in docs for line in doc]
        total = sum(len(line) for line in lines) or 1
        step = max(1, total // share)
        sample.extend(lines[::step])
    return sample


def train_tokenizer(texts: list[str], vocab_size: int):
    """A GPT-2 style byte-level BPE (spaces attach to the following word: 'Ġword')."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def wrap_tokenizer(tok):
    """The tokenizer as a transformers PreTrainedTokenizerFast (EOT as bos/eos/pad/unk)."""
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=EOT, eos_token=EOT, pad_token=EOT, unk_token=EOT
    )
    fast.model_max_length = 256
    return fast


def encode_documents(tok, docs: list[list[str]]) -> np.ndarray:
    """Token ids of the documents: lines joined by '\\n', documents separated by EOT."""
    eot = tok.token_to_id(EOT)
    newline = tok.encode("\n").ids
    flat = [line for doc in docs for line in doc]
    encoded = tok.encode_batch(flat, add_special_tokens=False)
    out: list[int] = []
    k = 0
    for doc in docs:
        for j in range(len(doc)):
            if j:
                out.extend(newline)
            out.extend(encoded[k].ids)
            k += 1
        out.append(eot)
    return np.asarray(out, dtype=np.int32)


LEXICON_MIN_COUNT = 2  # a word seen once is as often a run-together typo ("toforeign") as a word
# Word lists that complete the corpus's words: the training text is old-fashioned in part and
# lacks everyday words ("downloading", "archive", "theorem"), which the model can spell but the
# lexicon would not let it offer. SCOWL's large lists (Debian wamerican-large, wbritish-large).
DICTIONARIES = (
    Path("/usr/share/dict/american-english-large"),
    Path("/usr/share/dict/british-english-large"),
)


def write_lexicon(
    corpus: Path,
    path: Path,
    min_count: int = LEXICON_MIN_COUNT,
    dictionaries: Sequence[Path] = (),
) -> int:
    """The model's lexicon (wordahead.predict.lexicon): the training split's words seen at least
    `min_count` times, lower-cased, and every word of the `dictionaries` (one per line).
    Held-out lines are left out like everywhere else. Returns the number of words."""
    from collections import Counter

    from wordahead.predict.lexicon import Lexicon
    from wordahead.predict.words import WORD_RE

    counts: Counter[str] = Counter()
    for source in source_files(corpus):
        train_docs, _ = read_source(source)
        for doc in train_docs:
            for line in doc:
                counts.update(w.lower() for w in WORD_RE.findall(line))
    words = {w for w, n in counts.items() if n >= min_count}
    for dictionary in dictionaries:
        with open(dictionary, encoding="utf-8") as f:
            words.update(w for w in (line.strip() for line in f) if WORD_RE.fullmatch(w))
    return Lexicon.save(path, words)


# --- model -------------------------------------------------------------------------------------
def build_model(cfg: TrainConfig, eot_id: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=eot_id,
        eos_token_id=eot_id,
        pad_token_id=eot_id,
        initializer_range=0.02,
        use_cache=True,
    )
    return LlamaForCausalLM(config)


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


class SequenceSampler:
    """Random fixed-length windows from each source's token stream, sources drawn by weight.

    Each source is cut into non-overlapping windows (seq_len + 1 tokens) at a random offset;
    windows are visited in a seeded random order and reshuffled when a source is used up.
    """

    def __init__(
        self, streams: dict[str, np.ndarray], weights: dict[str, float], seq_len: int, seed: int
    ) -> None:
        self.rng = np.random.default_rng(seed)
        self.names = [n for n in streams if len(streams[n]) > seq_len + 1]
        if not self.names:
            raise ValueError("no source has enough tokens for one training sequence")
        self.streams = streams
        self.seq_len = seq_len
        w = np.array([weights.get(n, 1.0) for n in self.names], dtype=np.float64)
        self.probs = w / w.sum()
        self.order: dict[str, np.ndarray] = {}
        self.pos: dict[str, int] = {}
        self.epochs: dict[str, int] = dict.fromkeys(self.names, 0)
        for n in self.names:
            self._reshuffle(n)

    def _reshuffle(self, name: str) -> None:
        n = len(self.streams[name])
        span = self.seq_len + 1
        offset = int(self.rng.integers(0, max(1, n % span + 1)))
        starts = np.arange(offset, n - span + 1, span)
        self.order[name] = self.rng.permutation(starts)
        self.pos[name] = 0

    def state(self) -> dict:
        """Everything that decides the next batches (for resuming)."""
        return {
            "rng": self.rng.bit_generator.state,
            "order": {n: o.copy() for n, o in self.order.items()},
            "pos": dict(self.pos),
            "epochs": dict(self.epochs),
        }

    def load_state(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]
        self.order = {n: np.asarray(o) for n, o in state["order"].items()}
        self.pos = dict(state["pos"])
        self.epochs = dict(state["epochs"])

    def batch(self, size: int) -> np.ndarray:
        picks = self.rng.choice(len(self.names), size=size, p=self.probs)
        rows = []
        for i in picks:
            name = self.names[i]
            if self.pos[name] >= len(self.order[name]):
                self.epochs[name] += 1
                self._reshuffle(name)
            start = int(self.order[name][self.pos[name]])
            self.pos[name] += 1
            rows.append(self.streams[name][start : start + self.seq_len + 1])
        return np.stack(rows)


def decay_start(cfg: TrainConfig) -> int:
    """The first step of the wsd decay stage."""
    decay = cfg.decay_steps or max(1, cfg.max_steps // 5)
    return max(cfg.warmup_steps, cfg.max_steps - decay)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay, or (wsd) constant then linear decay, to min_lr_ratio * lr."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "wsd":
        start = decay_start(cfg)
        if step < start:
            return cfg.lr
        frac = min(1.0, (step + 1 - start) / max(1, cfg.max_steps - start))
        return cfg.lr * (1 - (1 - cfg.min_lr_ratio) * frac)
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine)


def save_checkpoint(model, tokenizer, out: Path, cfg: TrainConfig, info: dict) -> None:
    """An HF model dir + tokenizer, written to a temp dir and renamed so it is never half-written."""
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "training.json").write_text(
        json.dumps({"config": asdict(cfg), **info}, indent=2) + "\n", encoding="utf-8"
    )
    if out.exists():
        old = out.with_name(out.name + ".old")
        if old.exists():
            _rmtree(old)
        out.rename(old)
        tmp.rename(out)
        _rmtree(old)
    else:
        tmp.rename(out)


def _rmtree(path: Path) -> None:
    shutil.rmtree(path)


def pick_device(spec: str) -> str:
    """`auto` is a CUDA GPU when one is present, else the CPU."""
    import torch

    if spec == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return spec


def cpu_has_bf16() -> bool:
    """Native bf16 matrix instructions (AVX-512 BF16 or AMX): without them bf16 autocast is slower."""
    from wordahead.model.runtime import cpu_flags

    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})


def make_optimizer(model, cfg: TrainConfig):
    """AdamW (weight decay on matrices only), its fused kernel (CPU and GPU have one)."""
    import torch

    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8, fused=True)


def make_loss_fn(
    model, precision: str, device: str, compile_: bool, teacher=None, distill_weight: float = 0.0
):
    """(inputs, targets) -> mean next-token cross-entropy, under bf16 autocast when asked.

    With a teacher: (1 - w) * cross-entropy + w * KL(teacher || model) per token.
    """
    import contextlib

    import torch
    import torch.nn.functional as F

    def loss_fn(inputs, targets):
        ctx = (
            torch.autocast(device, dtype=torch.bfloat16)
            if precision == "bf16"
            else contextlib.nullcontext()
        )
        with ctx:
            logits = model(input_ids=inputs).logits
        logits = logits.float().reshape(-1, logits.size(-1))
        loss = F.cross_entropy(logits, targets.reshape(-1))
        if teacher is None or not distill_weight:
            return loss
        with torch.no_grad(), ctx:
            soft = teacher(input_ids=inputs).logits
        soft = F.log_softmax(soft.float().reshape(-1, soft.size(-1)), dim=-1)
        kl = F.kl_div(F.log_softmax(logits, dim=-1), soft, log_target=True, reduction="batchmean")
        return (1 - distill_weight) * loss + distill_weight * kl

    # dynamic=False: every step has the same shapes, so one specialised graph serves them all.
    return torch.compile(loss_fn, dynamic=False) if compile_ else loss_fn


@dataclass
class Progress:
    """Where a run is: the next step to take, tokens seen and training seconds so far."""

    step: int = 0
    tokens_seen: int = 0
    train_seconds: float = 0.0


def train(
    model,
    sampler: SequenceSampler,
    cfg: TrainConfig,
    log,
    *,
    opt=None,
    progress: Progress | None = None,
    device: str = "cpu",
    compile_: bool = False,
    checkpoint=None,
    checkpoint_every: int = 0,
    checkpoint_minutes: float = 0.0,
    log_every: int = 50,
    stop_at: int = 0,
    teacher=None,
    distill_weight: float = 0.0,
) -> dict:
    """Run AdamW steps from progress.step to cfg.max_steps (or stop_at); returns the last stats.

    `checkpoint(progress, stats)` is called every `checkpoint_every` steps, every
    `checkpoint_minutes` of training, and at the end.
    """
    import torch

    opt = opt or make_optimizer(model, cfg)
    progress = progress or Progress()
    loss_fn = make_loss_fn(model, cfg.precision, device, compile_, teacher, distill_weight)
    model.train()
    t0 = time.perf_counter()
    seconds_before = progress.train_seconds
    window_t, window_tokens, window_loss, window_n = t0, 0, 0.0, 0
    last_checkpoint = t0
    stats: dict = {}
    end = min(cfg.max_steps, stop_at) if stop_at else cfg.max_steps
    while progress.step < end:
        step = progress.step
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        batch = torch.from_numpy(sampler.batch(cfg.batch_size).astype(np.int64)).to(device)
        inputs, targets = batch[:, :-1], batch[:, 1:]
        loss = loss_fn(inputs, targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip, foreach=True)
        opt.step()
        n_tok = inputs.numel()
        progress.step += 1
        progress.tokens_seen += n_tok
        window_tokens += n_tok
        window_loss += loss.item()
        window_n += 1
        now = time.perf_counter()
        progress.train_seconds = seconds_before + (now - t0)
        last = progress.step == end
        if progress.step % log_every == 0 or last:
            stats = {
                "step": progress.step,
                "loss": round(window_loss / window_n, 4),
                "lr": round(lr_at(step, cfg), 6),
                "tokens_per_s": round(window_tokens / max(1e-9, now - window_t), 1),
                "tokens_seen": progress.tokens_seen,
                "elapsed_s": round(progress.train_seconds, 1),
            }
            log(json.dumps(stats))
            window_t, window_tokens, window_loss, window_n = now, 0, 0.0, 0
        due = (checkpoint_every and progress.step % checkpoint_every == 0) or (
            checkpoint_minutes and now - last_checkpoint >= 60 * checkpoint_minutes
        )
        if checkpoint and (due or last):
            checkpoint(progress, stats)
            last_checkpoint = time.perf_counter()
    stats["train_time_s"] = round(progress.train_seconds, 1)
    stats["sampler_epochs"] = dict(sampler.epochs)
    return stats


# --- resumable state ---------------------------------------------------------------------------
STATE_FILE = "state.pt"
# Settings that may differ on resume: they change the schedule's end, not what was trained.
RESUMABLE_CHANGES = ("max_steps", "decay_steps", "threads")


def save_state(path: Path, model, opt, sampler: SequenceSampler, progress: Progress, cfg) -> None:
    """The whole run state, written to a temp file, fsynced and renamed (never half-written)."""
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(
        {
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            "sampler": sampler.state(),
            "progress": asdict(progress),
            "config": asdict(cfg),
        },
        tmp,
    )
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_state(path: Path, model, opt, sampler: SequenceSampler, cfg: TrainConfig) -> Progress:
    """Restore a run saved by save_state; refuses one whose settings decide other weights."""
    import torch

    state = torch.load(path, map_location="cpu", weights_only=False)
    saved = state["config"]
    differ = {
        k: (saved.get(k), v)
        for k, v in asdict(cfg).items()
        if k not in RESUMABLE_CHANGES and saved.get(k) != v
    }
    if differ:
        raise SystemExit(
            f"--resume: {path} was trained with other settings {differ} "
            "(saved, now); use the same settings or another --work"
        )
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    sampler.load_state(state["sampler"])
    return Progress(**state["progress"])


def evaluate(model, stream: np.ndarray, seq_len: int, max_tokens: int = 0) -> dict:
    """Token-level loss, perplexity and top-1/top-3 on a held-out stream (non-overlapping
    windows of seq_len+1 tokens; each window is scored from its own start)."""
    import torch

    span = seq_len + 1
    if max_tokens:
        stream = stream[:max_tokens]
    n = (len(stream) - 1) // seq_len
    if n < 1:
        return {"tokens": 0}
    model.eval()
    device = next(model.parameters()).device
    total_loss, top1, top3, count = 0.0, 0, 0, 0
    with torch.no_grad():
        windows = [stream[i * seq_len : i * seq_len + span] for i in range(n)]
        for b in range(0, n, 32):
            batch = torch.from_numpy(np.stack(windows[b : b + 32]).astype(np.int64))
            inputs, targets = batch[:, :-1].to(device), batch[:, 1:].to(device)
            logits = model(input_ids=inputs).logits.float()
            loss = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="sum"
            )
            best = logits.topk(3, dim=-1).indices
            hit = best == targets.unsqueeze(-1)
            top1 += int(hit[..., 0].sum())
            top3 += int(hit.any(-1).sum())
            total_loss += float(loss)
            count += targets.numel()
    model.train()
    mean = total_loss / count
    return {
        "tokens": count,
        "loss": round(mean, 4),
        "perplexity": round(math.exp(mean), 2),
        "token_top1": round(top1 / count, 4),
        "token_top3": round(top3 / count, 4),
    }


def evaluate_heldout(
    model, streams: dict[str, np.ndarray], seq_len: int, max_tokens: int = 0
) -> dict[str, dict]:
    """`evaluate` on each held-out source, and "all": their token-weighted mean."""
    out: dict[str, dict] = {}
    all_loss, all_tokens, all_top1, all_top3 = 0.0, 0, 0.0, 0.0
    for name, stream in streams.items():
        m = out[name] = evaluate(model, stream, seq_len, max_tokens)
        if m["tokens"]:
            all_loss += m["loss"] * m["tokens"]
            all_top1 += m["token_top1"] * m["tokens"]
            all_top3 += m["token_top3"] * m["tokens"]
            all_tokens += m["tokens"]
    if all_tokens:
        out["all"] = {
            "tokens": all_tokens,
            "loss": round(all_loss / all_tokens, 4),
            "perplexity": round(math.exp(all_loss / all_tokens), 2),
            "token_top1": round(all_top1 / all_tokens, 4),
            "token_top3": round(all_top3 / all_tokens, 4),
        }
    return out


# --- pipeline ----------------------------------------------------------------------------------
def prepare_data(corpus: Path, work: Path, cfg: TrainConfig, log):
    """Tokenizer + token streams (train and held-out, per source), cached in `work`."""
    from tokenizers import Tokenizer

    sources_train: dict[str, list[list[str]]] = {}
    sources_held: dict[str, list[list[str]]] = {}
    for path in source_files(corpus):
        sources_train[path.stem], sources_held[path.stem] = read_source(path)
    sample = tokenizer_sample(sources_train, cfg.tokenizer_sample_bytes)
    digest = hashlib.sha256()
    for path in source_files(corpus):
        st = path.stat()
        digest.update(f"{path.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    digest.update(f"{cfg.vocab_size}:{cfg.tokenizer_sample_bytes}:{HOLDOUT_BLOCK}".encode())
    cache = work / f"data-{digest.hexdigest()[:12]}"
    tok_path = cache / "tokenizer.json"
    if tok_path.exists():
        tok = Tokenizer.from_file(str(tok_path))
        log(f"tokenizer: cached {tok_path}")
    else:
        t = time.perf_counter()
        tok = train_tokenizer(sample, cfg.vocab_size)
        cache.mkdir(parents=True, exist_ok=True)
        log(
            f"tokenizer: trained on {sum(map(len, sample)):,} bytes in "
            f"{time.perf_counter() - t:.1f}s, vocab {tok.get_vocab_size()}"
        )
    streams: dict[str, dict[str, np.ndarray]] = {"train": {}, "heldout": {}}
    for split, sources in (("train", sources_train), ("heldout", sources_held)):
        for name, docs in sources.items():
            f = cache / f"{split}-{name}.npy"
            if f.exists():
                streams[split][name] = np.load(f)
                continue
            t = time.perf_counter()
            ids = encode_documents(tok, docs)
            np.save(f, ids)
            streams[split][name] = ids
            n_bytes = sum(len(line.encode()) + 1 for doc in docs for line in doc)
            log(
                f"encoded {split}/{name}: {len(docs):,} docs, {n_bytes:,} bytes -> "
                f"{len(ids):,} tokens ({n_bytes / max(1, len(ids)):.2f} bytes/token) "
                f"in {time.perf_counter() - t:.1f}s"
            )
    if not tok_path.exists():
        tok.save(str(tok_path))  # last, so a cache with a tokenizer is complete
    return tok, streams


def load_prepared(data: Path, log):
    """Tokenizer + token streams from a prepared cache directory (what prepare_data writes)."""
    from tokenizers import Tokenizer

    tok_path = data / "tokenizer.json"
    if not tok_path.exists():
        sys.exit(f"--data {data}: no tokenizer.json (a prepared cache has it and *.npy streams)")
    streams: dict[str, dict[str, np.ndarray]] = {"train": {}, "heldout": {}}
    for split in streams:
        for f in sorted(data.glob(f"{split}-*.npy")):
            streams[split][f.stem.split("-", 1)[1]] = np.load(f)
    if not streams["train"]:
        sys.exit(f"--data {data}: no train-*.npy streams")
    log(f"data: {data} ({sum(map(len, streams['train'].values())):,} training tokens)")
    return Tokenizer.from_file(str(tok_path)), streams


def load_teacher(path: Path, vocab_size: int, device: str):
    """A trained model to distil from, frozen, in bf16 on a GPU (its matmuls run so anyway)."""
    import torch
    from transformers import LlamaForCausalLM

    teacher = LlamaForCausalLM.from_pretrained(path)
    if teacher.config.vocab_size != vocab_size:
        sys.exit(f"--teacher {path}: vocabulary {teacher.config.vocab_size}, not {vocab_size}")
    if device == "cuda":
        teacher = teacher.to(torch.bfloat16)
    return teacher.to(device).eval().requires_grad_(False)


def dictionaries(args: argparse.Namespace) -> list[Path]:
    """The word lists the lexicon takes in: --dictionary, else the default lists (which must
    be installed: a lexicon that silently lost them would offer fewer words)."""
    if args.no_dictionary:
        return []
    chosen = [Path(d) for d in args.dictionary] if args.dictionary else list(DICTIONARIES)
    if missing := [str(d) for d in chosen if not d.is_file()]:
        raise SystemExit(
            f"word list not found: {', '.join(missing)} (apt-get install wamerican-large "
            "wbritish-large, pass --dictionary FILE, or --no-dictionary)"
        )
    return chosen


def export_starter(
    work: Path, out: Path, corpus: Path, seed: int, log, dictionaries: Sequence[Path] = ()
) -> None:
    """WORK's HF checkpoint -> the shipped artifact set in `out`, with the corpus's lexicon."""
    from wordahead.model.export import ExportConfig, export_model
    from wordahead.predict.lexicon import FILE as LEXICON_FILE

    out = out.resolve()
    # LoRA where the exporter puts it by default (every adapter group), rank 8.
    config = ExportConfig(rank=8, alpha=16, layers="all", seq_len=64, seed=seed)
    here = Path.cwd()
    os.chdir(work)  # the manifest records the model as "keyboard-starter": no machine's path
    try:
        export_model(MODEL_NAME, out, config)
    finally:
        os.chdir(here)
    n_words = write_lexicon(corpus.resolve(), out / LEXICON_FILE, dictionaries=dictionaries)
    log(f"exported -> {out} (lexicon: {n_words:,} words)")


def run(args: argparse.Namespace) -> dict:
    import torch

    cfg = TrainConfig(
        vocab_size=args.vocab_size,
        hidden_size=args.hidden_size,
        num_layers=args.layers,
        num_heads=args.heads,
        intermediate_size=args.intermediate_size,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        max_steps=args.max_steps,
        lr=args.lr,
        warmup_steps=min(args.warmup_steps, max(1, args.max_steps // 10)),
        schedule=args.schedule,
        decay_steps=args.decay_steps,
        precision=args.precision,
        seed=args.seed,
        threads=args.threads,
        tokenizer_sample_bytes=args.tokenizer_sample_bytes,
        weights=parse_weights(args.weights),
        distill_weight=args.distill_weight if args.teacher else 0.0,
    )
    device = pick_device(args.device)
    if cfg.precision == "auto":
        cfg.precision = "bf16" if device == "cuda" or cpu_has_bf16() else "fp32"
    if args.compile == "auto":  # on the CPU, inductor builds C++
        has_cxx = shutil.which(os.environ.get("CXX", "g++")) is not None
        compile_ = device == "cuda" or (device == "cpu" and has_cxx)
    else:
        compile_ = args.compile == "on"
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    exporting = bool(args.out) and (args.export_only or not args.no_export)
    # Checked before training, not after it: a missing word list must not cost a finished run.
    word_lists = dictionaries(args) if exporting else []

    def log(msg: str) -> None:
        print(msg, flush=True)

    if args.export_only:
        export_starter(work, Path(args.out), Path(args.corpus), cfg.seed, log, word_lists)
        return {}

    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    t_start = time.perf_counter()
    if args.data:
        tok, streams = load_prepared(Path(args.data), log)
    else:
        tok, streams = prepare_data(Path(args.corpus), work, cfg, log)
    tokenizer = wrap_tokenizer(tok)
    eot_id = tok.token_to_id(EOT)
    model = build_model(cfg, eot_id).to(device)
    n_params = count_parameters(model)
    log(
        json.dumps(
            {"parameters": n_params, "device": device, "compile": compile_, "config": asdict(cfg)}
        )
    )
    teacher = load_teacher(Path(args.teacher), cfg.vocab_size, device) if args.teacher else None
    if teacher is not None:
        held = evaluate_heldout(teacher, streams["heldout"], cfg.seq_len, args.eval_max_tokens)
        log(f"teacher {args.teacher}: held-out {json.dumps(held)}")
    sampler = SequenceSampler(streams["train"], cfg.weights, cfg.seq_len, cfg.seed)
    opt = make_optimizer(model, cfg)
    state_path = work / "run" / STATE_FILE
    if args.branch_from and not state_path.exists():
        # A milestone: cool down a copy of a running run's state; the run itself goes on.
        state_path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(Path(args.branch_from) / "run" / STATE_FILE, state_path)
        args.resume = True
    progress = Progress()
    if args.resume and state_path.exists():
        progress = load_state(state_path, model, opt, sampler, cfg)
        log(f"resumed: step {progress.step} of {cfg.max_steps}, {progress.tokens_seen:,} tokens")
        if args.decay_now and progress.step < decay_start(cfg):
            cfg.max_steps, cfg.decay_steps = progress.step + args.decay_now, args.decay_now
            log(f"decaying now: the learning rate falls over steps {progress.step}-{cfg.max_steps}")
    elif args.resume:
        log(f"--resume: no state at {state_path} yet, starting afresh")
    # The exported manifest names the model after this directory (ArtifactSet.name).
    hf_dir = work / MODEL_NAME
    train_tokens = {k: int(len(v)) for k, v in streams["train"].items()}
    held_tokens = {k: int(len(v)) for k, v in streams["heldout"].items()}

    def checkpoint(progress: Progress, stats: dict) -> None:
        save_state(state_path, model, opt, sampler, progress, cfg)
        save_checkpoint(
            model,
            tokenizer,
            hf_dir,
            cfg,
            {
                "step": progress.step,
                "tokens_seen": progress.tokens_seen,
                "last": stats,
                "parameters": n_params,
                "train_tokens_per_source": train_tokens,
                "heldout_tokens_per_source": held_tokens,
            },
        )
        log(f"checkpoint: step {progress.step} -> {state_path}, {hf_dir}")

    stats = train(
        model,
        sampler,
        cfg,
        log,
        opt=opt,
        progress=progress,
        device=device,
        compile_=compile_,
        checkpoint=checkpoint if not args.no_checkpoint else None,
        checkpoint_every=args.checkpoint_every,
        checkpoint_minutes=args.checkpoint_minutes,
        log_every=args.log_every,
        stop_at=args.stop_at_step,
        teacher=teacher,
        distill_weight=cfg.distill_weight,
    )
    if progress.step < cfg.max_steps:
        log(f"stopped at step {progress.step} of {cfg.max_steps}: continue with --resume")
        return {"parameters": n_params, "train": stats, "stopped_at": progress.step}
    result: dict = {"parameters": n_params, "train": stats}
    t = time.perf_counter()
    result["heldout"] = evaluate_heldout(
        model, streams["heldout"], cfg.seq_len, args.eval_max_tokens
    )
    result["eval_time_s"] = round(time.perf_counter() - t, 1)
    result["wall_time_s"] = round(time.perf_counter() - t_start, 1)
    result["train_tokens_per_source"] = train_tokens
    result["heldout_tokens_per_source"] = held_tokens
    log("heldout: " + json.dumps(result["heldout"]))
    if not args.no_checkpoint:
        (hf_dir / "training_result.json").write_text(json.dumps(result, indent=2) + "\n")
    if exporting:
        try:
            export_starter(work, Path(args.out), Path(args.corpus), cfg.seed, log, word_lists)
        except ImportError as exc:
            log(f"export skipped ({exc}); run this script with --export-only later")
    log("result: " + json.dumps(result))
    return result


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    root = Path(__file__).resolve().parent.parent
    p.add_argument("--corpus", default=str(root.parent / "shared" / "corpus" / "base"))
    p.add_argument(
        "--work",
        default=str(root / "data" / "cache" / "starter"),
        help="cache + HF checkpoint (WORK/keyboard-starter); gitignored",
    )
    p.add_argument(
        "--out",
        default=str(root / "models" / "starter"),
        help="exported artifact set ('' to skip export)",
    )
    p.add_argument("--no-export", action="store_true")
    p.add_argument(
        "--export-only",
        action="store_true",
        help="export WORK's trained checkpoint to --out (with the lexicon) and stop",
    )
    p.add_argument(
        "--lexicon-only",
        action="store_true",
        help="write --out's lexicon (corpus words and the dictionaries) and stop",
    )
    p.add_argument(
        "--dictionary",
        action="append",
        metavar="FILE",
        help="a word list (one word per line) the lexicon takes in besides the corpus's words; "
        "repeatable (default: SCOWL's large American and British lists in /usr/share/dict)",
    )
    p.add_argument("--no-dictionary", action="store_true", help="the corpus's words only")
    p.add_argument(
        "--data",
        metavar="DIR",
        help="a prepared token cache (tokenizer.json, train-*.npy, heldout-*.npy) instead of --corpus",
    )
    p.add_argument("--teacher", metavar="DIR", help="an HF checkpoint to distil from")
    p.add_argument(
        "--distill-weight",
        type=float,
        default=0.5,
        help="the teacher's share of the loss, with --teacher (0: plain cross-entropy)",
    )
    p.add_argument("--no-checkpoint", action="store_true", help="(throughput measurements)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-steps", type=int, default=900)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup-steps", type=int, default=100)
    p.add_argument("--schedule", choices=("wsd", "cosine"), default="wsd")
    p.add_argument(
        "--decay-steps", type=int, default=0, help="wsd decay length (0: a fifth of the steps)"
    )
    p.add_argument(
        "--precision",
        choices=("auto", "bf16", "fp32"),
        default="auto",
        help="auto: bf16 autocast on a GPU or a CPU with native bf16, else fp32",
    )
    p.add_argument("--device", default="auto", help="auto (a GPU when present), cpu or cuda")
    p.add_argument(
        "--compile",
        choices=("auto", "on", "off"),
        default="auto",
        help="torch.compile the loss step (auto: on where a C++ compiler or GPU is present)",
    )
    p.add_argument("--resume", action="store_true", help="continue from WORK/run/state.pt")
    p.add_argument(
        "--branch-from",
        metavar="WORK",
        help="start from a copy of another run's state (with --decay-now: a milestone model)",
    )
    p.add_argument(
        "--decay-now",
        type=int,
        default=0,
        metavar="N",
        help="on resume, end the run with the wsd decay over the next N steps",
    )
    p.add_argument("--checkpoint-minutes", type=float, default=5.0)
    p.add_argument(
        "--stop-at-step", type=int, default=0, help="checkpoint and exit there (resume later)"
    )
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--hidden-size", type=int, default=192)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--intermediate-size", type=int, default=512)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--weights", default=DEFAULT_WEIGHTS, help="source sampling weights")
    p.add_argument("--tokenizer-sample-bytes", type=int, default=4_000_000)
    p.add_argument("--checkpoint-every", type=int, default=0, help="also every N steps")
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--eval-max-tokens", type=int, default=0, help="cap per source (0: all)")
    return p


# glibc returns every large (> 32 MB) block to the kernel with munmap, so the logits and their
# gradients (tens of MB each) are page-faulted and zeroed again every step. Keeping them in the
# heap cut the kernel's share of a training step from ~11% to ~4% in our measurement.
MALLOC_TUNABLES = "glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=4294967296"


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if argv is None and "GLIBC_TUNABLES" not in os.environ and sys.platform == "linux":
        # Passive OpenMP waits: on a shared, oversubscribed CPU spinning threads only steal time.
        env = {**os.environ, "GLIBC_TUNABLES": MALLOC_TUNABLES, "OMP_WAIT_POLICY": "PASSIVE"}
        os.execve(sys.executable, [sys.executable, *sys.argv], env)
    args = parser().parse_args(argv)
    if args.lexicon_only:
        from wordahead.predict.lexicon import FILE as LEXICON_FILE

        n_words = write_lexicon(
            Path(args.corpus).resolve(),
            Path(args.out) / LEXICON_FILE,
            dictionaries=dictionaries(args),
        )
        print(f"lexicon: {n_words:,} words -> {Path(args.out) / LEXICON_FILE}", file=sys.stderr)
        return 0
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
