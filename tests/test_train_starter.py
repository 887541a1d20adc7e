"""The starter-model training script end to end on a tiny made-up corpus (tiny config, few steps)."""

from __future__ import annotations

import importlib.util
import json
import random
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.torch
pytest.importorskip("torch")
pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parent.parent


def _load_script():
    spec = importlib.util.spec_from_file_location(
        "train_starter", ROOT / "scripts" / "train_starter.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["train_starter"] = module
    spec.loader.exec_module(module)
    return module


ts = _load_script()

_WORDS = (
    "the a cat dog sat on mat ran to house and then we will see you there tomorrow "
    "I would like to book a table for two people at seven please thank you very much"
).split()


def _corpus(root: Path, seed: int = 1) -> Path:
    """Two sources of made-up paragraphs (blank lines between documents)."""
    rng = random.Random(seed)
    corpus = root / "corpus"
    corpus.mkdir()
    for name, n_lines in (("alpha", 2100), ("beta", 1200)):
        lines = []
        for i in range(n_lines):
            if i % 7 == 6:
                lines.append("")
            else:
                words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 14))]
                lines.append(" ".join(words).capitalize() + ".")
        (corpus / f"{name}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return corpus


def _args(corpus: Path, work: Path, *extra: str):
    return ts.parser().parse_args(
        [
            "--corpus", str(corpus), "--work", str(work), "--out", "", "--no-export",
            "--vocab-size", "300", "--hidden-size", "32", "--layers", "1", "--heads", "2",
            "--intermediate-size", "64", "--seq-len", "16", "--batch-size", "4",
            "--max-steps", "4", "--warmup-steps", "1", "--log-every", "2",
            "--checkpoint-every", "2", "--tokenizer-sample-bytes", "20000", "--seed", "3",
            *extra,
        ]
    )  # fmt: skip


def test_holdout_is_one_percent_and_disjoint(tmp_path):
    corpus = _corpus(tmp_path)
    path = corpus / "alpha.txt"
    lines = path.read_text(encoding="utf-8").split("\n")[:-1]
    train_docs, held_docs = ts.read_source(path)
    held = [line for doc in held_docs for line in doc]
    train = [line for doc in train_docs for line in doc]
    expected_held = [line for i, line in enumerate(lines) if ts.is_heldout(i) and line]
    assert held == expected_held
    assert len(train) + len(held) == sum(1 for line in lines if line)
    assert 0.005 < len(held) / len(lines) <= 0.011
    # Held-out lines 990..999 form their own documents: none is glued to training text.
    assert all(line in expected_held for doc in held_docs for line in doc)


def test_train_end_to_end_is_deterministic(tmp_path):
    corpus = _corpus(tmp_path)
    first = ts.run(_args(corpus, tmp_path / "w1"))
    second = ts.run(_args(corpus, tmp_path / "w2"))
    assert first["train"]["loss"] == second["train"]["loss"]
    assert first["heldout"]["all"]["loss"] == second["heldout"]["all"]["loss"]
    assert first["heldout"]["all"]["tokens"] > 0
    assert set(first["heldout"]) == {"alpha", "beta", "all"}

    # The checkpoint is a self-contained HF model dir the exporter and AutoTokenizer can load.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = tmp_path / "w1" / ts.MODEL_NAME
    tok = AutoTokenizer.from_pretrained(hf)
    model = AutoModelForCausalLM.from_pretrained(hf)
    assert model.config.tie_word_embeddings
    assert tok.eos_token == ts.EOT == tok.bos_token == tok.pad_token
    ids = tok("The cat sat", add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == "The cat sat"
    # GPT-2 style: a space starts the next word's first token ("Ġcat"), never ends a token.
    pieces = tok.convert_ids_to_tokens(tok(" the cat", add_special_tokens=False)["input_ids"])
    assert pieces[0].startswith("\u0120")
    assert all(p == "\u0120" or not p.endswith("\u0120") for p in pieces)
    assert tok.decode(ids) == "The cat sat"
    info = json.loads((hf / "training.json").read_text())
    assert info["step"] == 4 and info["config"]["seed"] == 3


def test_resume_reaches_the_weights_of_an_uninterrupted_run(tmp_path):
    """Stopped at step 3 and resumed, a run ends with the same weights as one that never stopped."""
    import torch

    corpus = _corpus(tmp_path)
    extra = ("--max-steps", "6", "--decay-steps", "2", "--compile", "off", "--precision", "fp32")
    straight = ts.run(_args(corpus, tmp_path / "a", *extra))
    stopped = ts.run(_args(corpus, tmp_path / "b", *extra, "--stop-at-step", "3"))
    assert stopped["stopped_at"] == 3
    state = torch.load(tmp_path / "b" / "run" / ts.STATE_FILE, weights_only=False)
    assert state["progress"]["step"] == 3
    # A milestone branch cools down a copy of the state; the run it came from is untouched.
    before = (tmp_path / "b" / "run" / ts.STATE_FILE).read_bytes()
    branch = ts.run(_args(corpus, tmp_path / "c", *extra, "--branch-from", str(tmp_path / "b"),
                          "--decay-now", "1"))  # fmt: skip
    assert branch["train"]["step"] == 4 and branch["heldout"]["all"]["tokens"] > 0
    assert branch["train"]["lr"] == pytest.approx(3e-3 * 0.1)  # the end of the decay
    assert (tmp_path / "b" / "run" / ts.STATE_FILE).read_bytes() == before
    resumed = ts.run(_args(corpus, tmp_path / "b", *extra, "--resume"))
    assert resumed["heldout"]["all"]["loss"] == straight["heldout"]["all"]["loss"]
    a = torch.load(tmp_path / "a" / "run" / ts.STATE_FILE, weights_only=False)["model"]
    b = torch.load(tmp_path / "b" / "run" / ts.STATE_FILE, weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    # Settings that decide the weights may not change under --resume.
    with pytest.raises(SystemExit, match="other settings"):
        ts.run(_args(corpus, tmp_path / "b", *extra, "--resume", "--lr", "0.5"))


def test_wsd_schedule_is_constant_then_decays_linearly():
    cfg = ts.TrainConfig(lr=1e-3, warmup_steps=10, max_steps=100, decay_steps=20)
    lrs = [ts.lr_at(s, cfg) for s in range(100)]
    assert lrs[9] == lrs[50] == lrs[79] == pytest.approx(1e-3)
    assert lrs[80] < lrs[79] and lrs[-1] == pytest.approx(1e-4)
    # Extending a run before its decay leaves the steps taken so far unchanged.
    longer = ts.TrainConfig(lr=1e-3, warmup_steps=10, max_steps=200, decay_steps=20)
    assert [ts.lr_at(s, longer) for s in range(80)] == lrs[:80]


def test_lr_schedule_warms_up_then_decays():
    cfg = ts.TrainConfig(
        lr=1e-3, warmup_steps=10, max_steps=100, min_lr_ratio=0.1, schedule="cosine"
    )
    lrs = [ts.lr_at(s, cfg) for s in range(100)]
    assert lrs[0] < lrs[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False))
    assert lrs[-1] >= 1e-4 - 1e-12


def test_prepared_data_and_distillation(tmp_path):
    """A run from a prepared token cache trains as one from the corpus; a teacher's KL pulls a
    student towards it, and the student's KL to a teacher identical to itself is zero."""
    import torch

    corpus = _corpus(tmp_path)
    extra = ("--compile", "off", "--precision", "fp32")
    from_corpus = ts.run(_args(corpus, tmp_path / "a", *extra))
    (cache,) = (tmp_path / "a").glob("data-*")
    from_cache = ts.run(_args(tmp_path / "missing", tmp_path / "b", *extra, "--data", str(cache)))
    assert from_cache["heldout"]["all"]["loss"] == from_corpus["heldout"]["all"]["loss"]

    teacher = tmp_path / "a" / ts.MODEL_NAME
    model = ts.load_teacher(teacher, 300, "cpu")
    inputs = torch.randint(0, 300, (2, 8))
    targets = torch.randint(0, 300, (2, 8))
    plain = ts.make_loss_fn(model, "fp32", "cpu", False)(inputs, targets)
    self_taught = ts.make_loss_fn(model, "fp32", "cpu", False, model, 0.25)(inputs, targets)
    assert float(self_taught) == pytest.approx(0.75 * float(plain), rel=1e-5)

    # Distilled (all KL) for a few steps from a fresh start, the student moves towards the
    # teacher: its KL to the teacher falls below an untaught student's.
    distil = ("--max-steps", "12", "--teacher", str(teacher), "--distill-weight", "1.0")
    taught = ts.run(_args(corpus, tmp_path / "c", *extra, *distil))
    untaught = ts.run(_args(corpus, tmp_path / "d", *extra, "--max-steps", "12"))
    stream = np.concatenate([np.load(f) for f in sorted(cache.glob("heldout-*.npy"))])
    batch = torch.from_numpy(stream[:129].astype(np.int64))[None]

    def kl_to_teacher(work):
        student = ts.load_teacher(work / ts.MODEL_NAME, 300, "cpu")
        with torch.no_grad():
            s = torch.log_softmax(student(input_ids=batch).logits, -1)
            t = torch.log_softmax(model(input_ids=batch).logits, -1)
        return float((t.exp() * (t - s)).sum(-1).mean())

    assert taught["train"]["step"] == untaught["train"]["step"] == 12
    assert kl_to_teacher(tmp_path / "c") < kl_to_teacher(tmp_path / "d")
    info = json.loads((tmp_path / "c" / ts.MODEL_NAME / "training.json").read_text())
    assert info["config"]["distill_weight"] == 1.0


def test_lexicon_takes_in_the_dictionaries(tmp_path):
    """The lexicon: the corpus's training words seen twice, and every word of the word lists
    (not their lines that are no word); the corpus alone without them."""
    from wordahead.predict.lexicon import Lexicon

    corpus = _corpus(tmp_path)
    words = tmp_path / "words"
    words.write_text("Downloading\ntheorem\nnot a word\n\n--\n", encoding="utf-8")
    alone = ts.write_lexicon(corpus, tmp_path / "a.txt.gz")
    both = ts.write_lexicon(corpus, tmp_path / "b.txt.gz", dictionaries=[words])
    assert both == alone + 2
    lex = Lexicon.load(tmp_path / "b.txt.gz")
    assert "downloading" in lex and "theorem" in lex and "not a word" not in lex
    assert "theorem" not in Lexicon.load(tmp_path / "a.txt.gz")
    missing = ts.parser().parse_args(["--dictionary", str(tmp_path / "none")])
    with pytest.raises(SystemExit, match="word list not found"):
        ts.dictionaries(missing)
