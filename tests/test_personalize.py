"""The personalization job end to end on a tiny model: learn, gate, kill -9, lock, skip."""

from __future__ import annotations

import io
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from wordahead.cli import main
from wordahead.learn import personalize, policy
from wordahead.learn.adapter_store import AdapterStore
from wordahead.learn.gate import HeldOutTyping, gate
from wordahead.learn.job_log import JobLog
from wordahead.learn.personalize import run_job
from wordahead.learn.policy import JobConfig
from wordahead.learn.progress import Progress
from wordahead.model.artifacts import ArtifactSet
from wordahead.paths import Home
from wordahead.predict.sources.phrases import (
    ADAPTED_WEIGHT,
    DEFAULT_WEIGHT,
    PhraseModel,
    blend_weights,
)
from wordahead.store.typing_log import TypingLog
from wordahead.types import KeyboardError

REPO = Path(__file__).resolve().parent.parent
# Made up, and two tokens of the tiny models' tokenizer ("Ġday" "rit"): a 2-layer model with
# 32 hidden units learns that in 100 steps; longer words need a bigger model than a test wants.
WORD = "dayrit"


def _user_lines(n: int = 50, seed: int = 0) -> list[str]:
    """A user who keeps writing a made-up word after "I love"."""
    rng = random.Random(seed)
    starts = ["I love", "Honestly, I love", "We all love", "My sister and I love", "Today I love"]
    ends = ["tea", "tea in the morning", "tea with milk", "tea, always", "tea so much"]
    return [f"{rng.choice(starts)} {WORD} {rng.choice(ends)}." for _ in range(n)]


def _fast(**overrides: object) -> JobConfig:
    """Settings that make the tiny model learn in well under a second of training."""
    values = dict(lr=5e-2, max_steps=100, warmup=3, eval_every=10, patience=3, time_budget_s=60)
    values.update(overrides)
    return JobConfig(**values)


def _log(home: Home, lines: list[str]) -> None:
    with TypingLog(home.typing_log) as log:
        for line in lines:
            log.record(line, source="test")


def _quiet() -> Progress:
    return Progress(io.StringIO(), tty=False)


def _offers_word(words: list[str]) -> bool:
    return WORD in words


def test_job_learns_the_users_word(home: Home, tiny_llama: Path) -> None:
    from wordahead.predict.predictor import Predictor

    predictor = Predictor(tiny_llama, threads=1)
    assert not _offers_word(predictor.predict("I love ", k=3).words)

    _log(home, _user_lines())
    result = run_job(home, tiny_llama, config=_fast(), progress=_quiet())
    assert result.status == "promoted", result.reason
    assert result.version == "v0001" and result.exit_code == 0
    before, after = result.metrics["before"], result.metrics["after"]
    assert after["loss"] < before["loss"] and after["top3"] >= before["top3"]

    store = AdapterStore.in_home(home, ArtifactSet.open(tiny_llama))
    version, path, meta = store.active()
    assert version == "v0001" and path == result.adapter_path
    assert meta["metrics"]["after"]["loss"] == after["loss"]
    assert meta["steps"] == result.metrics["steps"] > 0
    assert meta["data"]["new_words"] > 0 and meta["start_adapter"] == "base"

    predictor.load_adapter(path, version)
    assert _offers_word(predictor.predict("I love ", k=3).words)
    # The version also holds the user's phrases, built from the log: alone (base LoRA), they
    # offer the word too, and first.
    assert result.phrases_path == store.phrases_path(version) == path.parent / "phrases.zlib"
    assert meta["phrases"]["words"] == sum(len(line.split()) for line in _user_lines())
    # Served with the trained adapter, they take a smaller share of the blend: the one of the
    # shares tried that typed the held-out text best (a tie keeps the default).
    shares = {float(w): ksr for w, ksr in result.metrics["shares"].items()}
    assert list(shares) == list(blend_weights(adapted=True)) and ADAPTED_WEIGHT in shares
    chosen = PhraseModel.load(result.phrases_path).weight
    assert chosen < DEFAULT_WEIGHT and shares[chosen] == max(shares.values())
    assert shares[ADAPTED_WEIGHT] < max(shares.values()) or chosen == ADAPTED_WEIGHT
    assert predictor.load_adapter(None, phrases=result.phrases_path)
    assert predictor.predict("I love ", k=3).words[0] == WORD

    with TypingLog(home.typing_log) as log:
        job = JobLog(log).last()
        assert job["status"] == "promoted" and job["adapter_version"] == "v0001"
        assert job["metrics"]["after"]["top3"] == after["top3"]
        assert log.watermark == log.recent(1)[0]["id"]  # the text is consumed
    # Nothing new since: the next job skips and says so; the adapter stays.
    again = run_job(home, tiny_llama, config=_fast(), progress=_quiet())
    assert again.status == "skipped" and "only 0 new words" in again.reason
    assert store.active()[0] == "v0001"
    # Forgetting the text deletes the phrases counted from it (no daemon: the CLI does it).
    assert main(["forget", "--all"]) == 0
    assert not result.phrases_path.exists() and store.phrases_path("v0001") is None
    assert store.active()[0] == "v0001"


def test_gate_rule() -> None:
    before = {"loss": 3.0, "top3": 0.20}
    assert gate(before, {"loss": 2.9, "top3": 0.20}, 0.001)[0]  # a tie on top-3 passes
    ok, why = gate(before, {"loss": 3.1, "top3": 0.30}, 0.001)
    assert not ok and "did not improve" in why
    ok, why = gate(before, {"loss": 2.999, "top3": 0.30}, 0.001)  # under the minimum gain
    assert not ok and "did not improve" in why
    ok, why = gate(before, {"loss": 2.5, "top3": 0.19}, 0.001)
    assert not ok and "top-3 accuracy fell" in why
    ok, why = gate(before, {"loss": float("nan"), "top3": 0.5}, 0.001)
    assert not ok and "not a number" in why
    # With per-word counts, top-3 must fall by more than chance: 1.645 * sqrt(lost + gained).
    noisy = {"loss": 2.5, "top3": 0.17, "top3_lost": 10, "top3_gained": 4}  # 6 <= 6.2
    assert gate(before, noisy, 0.001)[0]
    clear = {"loss": 2.5, "top3": 0.15, "top3_lost": 12, "top3_gained": 2}  # 10 > 5.9
    ok, why = gate(before, clear, 0.001)
    assert not ok and "12 words lost, 2 gained" in why
    # KSR: a fall refuses only when the per-word keystrokes rose beyond chance.
    typed = {"loss": 3.0, "top3": 0.20, "ksr": 0.30}
    slower = {"loss": 2.5, "top3": 0.20, "ksr": 0.27, "top3_lost": 3, "top3_gained": 3}
    ok, why = gate(typed, {**slower, "keystrokes_z": 2.5}, 0.001)
    assert not ok and "KSR@3 on the held-out text fell: 30.00 -> 27.00" in why
    assert gate(typed, {**slower, "keystrokes_z": 1.0}, 0.001)[0]  # within chance
    ok, why = gate(typed, {**slower, "ksr": 0.33, "keystrokes_z": -2.0}, 0.001)
    assert ok and "KSR@3 30.00 -> 33.00" in why


def test_share_chosen_on_the_held_out_text(home: Home, tiny_llama: Path) -> None:
    ksr = {0.1: 0.30, 0.3: 0.32}  # typed by the other shares; the default's comes measured
    phrases = PhraseModel()

    def measure(p: PhraseModel) -> HeldOutTyping:
        return HeldOutTyping([], [], ksr[p.weight])

    assert personalize._choose_share(measure, phrases, 0.31)[0] == 0.3
    assert phrases.weight == ADAPTED_WEIGHT  # left as the gate measured it
    ksr[0.3] = 0.31
    assert personalize._choose_share(measure, phrases, 0.31)[0] == ADAPTED_WEIGHT  # a tie
    # Off: the default share, nothing measured for the others.
    _log(home, _user_lines())
    result = run_job(home, tiny_llama, config=_fast(choose_share=False), progress=_quiet())
    assert result.status == "promoted" and "shares" not in result.metrics
    assert PhraseModel.load(result.phrases_path).weight == ADAPTED_WEIGHT


def _heldout_loss(model: Path, adapter: dict[str, np.ndarray], texts: list[str]) -> float:
    from wordahead.learn.trainer import LoraTrainer

    trainer = LoraTrainer(ArtifactSet.open(model), adapter=adapter)
    return trainer.evaluate(trainer.batches(texts, 64, 4))


@pytest.mark.parametrize("epochs", [0.0, 5.0])
def test_promoted_adapter_folds_in_the_held_out_text(
    home: Home, tiny_llama: Path, epochs: float
) -> None:
    _log(home, _user_lines(60))
    with TypingLog(home.typing_log) as log:
        heldout = JobLog(log).training_text().heldout  # the job's own split
    gated: list[dict[str, np.ndarray]] = []

    def keep(adapter: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        gated.append(adapter)
        return adapter

    config = _fast(fold_in_epochs=epochs, fold_in_lr=5e-3)
    result = run_job(home, tiny_llama, config=config, progress=_quiet(), after_training=keep)
    assert result.status == "promoted", result.reason
    store = AdapterStore.in_home(home, ArtifactSet.open(tiny_llama))
    served, meta = store.load(result.version), store.active()[2]
    if not epochs:  # what the gate passed is what is served
        assert meta["fold_in"] is None
        assert all(np.array_equal(served[n], gated[0][n]) for n in served)
        return
    # The newest text, which the gate needed unseen, is learned by the adapter served.
    assert meta["fold_in"]["steps"] == result.metrics["fold_in"]["steps"] >= 3
    before = _heldout_loss(tiny_llama, gated[0], heldout)
    assert _heldout_loss(tiny_llama, served, heldout) < before - 0.05


def _damage(adapter: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    # Large random LoRA B tensors: a candidate far worse than the one it would replace.
    rng = np.random.default_rng(0)
    return {
        n: rng.normal(0, 2.0, v.shape).astype(np.float32) if "lora_B" in n else v
        for n, v in adapter.items()
    }


def test_gate_rejects_a_worse_adapter(
    home: Home, tiny_llama: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = AdapterStore.in_home(home, ArtifactSet.open(tiny_llama))
    start = {n: v + 0.001 for n, v in store.artifacts.initial_adapter().items()}
    store.promote(start, {"source": "test"})
    _log(home, _user_lines())
    # Phrases that know nothing: they cannot rescue the job either.
    monkeypatch.setattr(PhraseModel, "from_texts", classmethod(lambda cls, texts, weight: cls()))

    result = run_job(home, tiny_llama, config=_fast(), progress=_quiet(), after_training=_damage)
    assert result.status == "rejected", result.reason
    assert "kept adapter v0001" in result.reason and "did not improve" in result.reason
    assert "new phrases did not help either" in result.reason
    assert result.metrics["after"]["loss"] > result.metrics["before"]["loss"]
    assert result.metrics["phrases_only"]["top3_gained"] == 0
    assert result.version == "v0001" and result.adapter_path is None and result.exit_code == 0
    assert store.active()[0] == "v0001" and [e.version for e in store.versions()] == ["v0001"]
    with TypingLog(home.typing_log) as log:
        job = JobLog(log).last()
        assert job["status"] == "rejected" and "did not improve" in job["reason"]
        assert job["metrics"]["after"]["loss"] == result.metrics["after"]["loss"]


@pytest.mark.parametrize("from_base", [False, True])
def test_new_phrases_are_promoted_when_the_adapter_is_not(
    home: Home, tiny_llama: Path, from_base: bool
) -> None:
    store = AdapterStore.in_home(home, ArtifactSet.open(tiny_llama))
    start = {n: v + 0.001 for n, v in store.artifacts.initial_adapter().items()}
    if from_base:
        start = store.artifacts.initial_adapter()
    else:
        store.promote(start, {"source": "test"})
    _log(home, _user_lines())

    result = run_job(home, tiny_llama, config=_fast(), progress=_quiet(), after_training=_damage)
    assert result.status == "promoted", result.reason
    kept_name = "base" if from_base else "v0001"
    assert f"adapter {kept_name} kept" in result.reason and "did not improve" in result.reason
    kept = result.metrics["phrases_only"]
    assert kept["top3_gained"] > kept["top3_lost"]
    version, path, meta = store.active()
    assert version == ("v0001" if from_base else "v0002") and meta["adapter_trained"] is False
    tensors = store.load(version)
    assert all(np.array_equal(tensors[n], start[n]) for n in start)  # the damage is not kept
    assert result.phrases_path is not None and result.phrases_path.exists()
    # The phrases' share of the blend is the one for the model they are served with.
    want = DEFAULT_WEIGHT if from_base else ADAPTED_WEIGHT
    assert PhraseModel.load(result.phrases_path).weight == want


def test_lock_refuses_a_second_job(
    home: Home, tiny_llama: Path, capsys: pytest.CaptureFixture
) -> None:
    _log(home, _user_lines())
    with policy.job_lock(home):
        assert (policy.job_running(home) or "").startswith(f"pid {os.getpid()}, started ")
        result = run_job(home, tiny_llama, config=_fast(), progress=_quiet())
        assert result.status == "busy" and f"pid {os.getpid()}" in result.reason
        assert result.exit_code == personalize.EXIT_BUSY
        code = main(["train", "--json", "--model", str(tiny_llama)])
        assert code == personalize.EXIT_BUSY
        assert json.loads(capsys.readouterr().out.splitlines()[-1])["status"] == "busy"
    assert policy.job_running(home) is None
    with TypingLog(home.typing_log) as log:
        assert JobLog(log).recent() == []  # a refused job records nothing and consumes nothing


def test_too_little_text_or_battery_skips(
    home: Home, tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    _log(home, ["just a few words today"])
    assert main(["train", "--json", "--model", str(tiny_llama)]) == 0
    result = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert result["status"] == "skipped" and "waiting for 200" in result["reason"]
    # On battery (a sysfs tree saying so) the job skips unless told otherwise.
    power = tmp_path / "power_supply"
    for name, files in {"BAT0": {"type": "Battery", "status": "Discharging"},
                        "AC": {"type": "Mains", "online": "0"}}.items():  # fmt: skip
        (power / name).mkdir(parents=True)
        for key, value in files.items():
            (power / name / key).write_text(value + "\n")
    monkeypatch.setattr(policy, "POWER_SUPPLY", power)
    _log(home, _user_lines())
    skipped = run_job(home, tiny_llama, config=_fast(), progress=_quiet())
    assert skipped.status == "skipped" and "battery" in skipped.reason
    with TypingLog(home.typing_log) as log:
        assert [j["status"] for j in JobLog(log).recent()] == ["skipped", "skipped"]
        assert log.watermark == 0


def test_kill_9_mid_job_leaves_the_previous_adapter(
    home: Home, tiny_llama: Path, tmp_path: Path
) -> None:
    store = AdapterStore.in_home(home, ArtifactSet.open(tiny_llama))
    start = {n: v + 0.01 for n, v in store.artifacts.initial_adapter().items()}
    store.promote(start, {"source": "test"})
    _log(home, _user_lines(80))
    JobConfig.update(home.job_config, lr=1e-3, eval_every=1000, patience=1000)  # train until killed
    env = dict(os.environ, KEYBOARD_MODEL=str(tiny_llama))
    child = subprocess.Popen(
        [sys.executable, "-m", "wordahead", "train", "--json", "--max-steps", "1000000",
         "--time-budget", "120"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert child.stderr is not None
        deadline = time.monotonic() + 60
        events = []
        while time.monotonic() < deadline:
            line = child.stderr.readline()
            if not line:
                break
            if line.startswith("{"):
                events.append(json.loads(line)["event"])
                if events[-1] == "step":
                    break
        assert events and events[-1] == "step", f"never saw training start: {events}"
        assert policy.job_running(home) is not None  # the child holds the lock
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == -signal.SIGKILL
    version, path, _ = store.active()
    assert version == "v0001" and [e.version for e in store.versions()] == ["v0001"]
    loaded = store.load(version)
    assert all(np.array_equal(loaded[n], start[n]) for n in start)
    assert policy.job_running(home) is None  # the kernel released the lock
    with policy.job_lock(home):
        pass
    with TypingLog(home.typing_log) as log:
        assert log.watermark == 0  # nothing consumed
        JobLog(log).finish(JobLog(log).start(), "skipped")  # the next job notices the dead one
        assert JobLog(log).recent()[1]["status"] == "interrupted"


def test_job_config_file_errors_are_clear(home: Home) -> None:
    path = home.job_config
    path.write_text('{"lr": "fast"}')
    with pytest.raises(KeyboardError, match="lr must be a float"):
        JobConfig.load(home.job_config)
    path.write_text('{"learning_rate": 0.1}')
    with pytest.raises(KeyboardError, match="unknown setting 'learning_rate'"):
        JobConfig.load(home.job_config)
    path.write_text('{"lr": 1, "train_on_battery": true}')
    config = JobConfig.load(home.job_config)
    assert config.lr == 1.0 and isinstance(config.lr, float) and config.train_on_battery
    JobConfig.update(home.job_config, at="04:00")
    assert json.loads(path.read_text()) == {"lr": 1, "train_on_battery": True, "at": "04:00"}


def test_progress_bar_and_log_lines() -> None:
    tty = io.StringIO()
    bar = Progress(tty, tty=True)
    bar.event("start", "personalizing")
    bar.start_training(100.0)
    bar.step({"step": 5, "loss": 2.5, "elapsed": 1.0, "max_steps": 10})
    bar.close()
    text = tty.getvalue()
    assert "personalizing\n" in text and "\rtraining [" in text and "5/10 loss 2.500" in text
    assert "ETA 0:01" in text and text.endswith("\n")
    log = io.StringIO()
    lines = Progress(log, tty=False)
    lines.step({"step": 1, "loss": 2.5, "elapsed": 0.1, "max_steps": 10})
    lines.step({"step": 2, "loss": 2.4, "elapsed": 0.2, "max_steps": 10})  # throttled
    lines.step({"step": 3, "loss": 2.3, "elapsed": 0.3, "max_steps": 10, "eval_loss": 2.2})
    records = [json.loads(ln) for ln in log.getvalue().splitlines()]
    assert [r["step"] for r in records] == [1, 3] and records[1]["eval_loss"] == 2.2


def test_train_via_daemon_shows_progress(tiny_llama: Path) -> None:
    """`keyboard train --via-daemon` printed nothing until the job ended (36 s on the starter
    model); now the job's stages and steps reach stderr while it runs."""
    import shutil

    from tests.daemon_process import daemon_env, short_dir, start_daemon
    from wordahead.daemon.client import DaemonClient

    root = short_dir()
    home = Home.at(root / "home")
    fast = _fast()
    JobConfig.update(home.job_config, **{k: getattr(fast, k) for k in
                                         ("lr", "max_steps", "warmup", "eval_every", "patience")})  # fmt: skip
    served = start_daemon(tiny_llama, home.root, root / "kb.sock")
    try:
        with DaemonClient(served.socket) as client:
            for line in _user_lines():
                client.call("observe", text=line, source="test")
        done = subprocess.run(
            [sys.executable, "-m", "wordahead", "train", "--via-daemon", "--force"],
            env=daemon_env(home.root, tiny_llama, KEYBOARD_SOCKET=str(served.socket)),
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert done.returncode == 0, (done.stdout, done.stderr, served.output()[-3000:])
        progress = done.stderr.splitlines()
        assert progress, ("no progress while the job ran", done.stdout, served.output()[-3000:])
        assert any(
            line.startswith(("personalization job started", "personalizing", "before:",
                             "training: step", "after:"))
            for line in progress
        ), progress  # fmt: skip
        assert done.stdout.split(":")[0] in ("promoted", "rejected"), (done.stdout, progress)
    finally:
        served.stop()
        shutil.rmtree(root, ignore_errors=True)
