"""Federated learning, piece by piece: which text a round may use, the ORT update, the update
rules the server applies, the privacy accounting."""

from __future__ import annotations

import math
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import pytest

from wordahead.federated.community import UpdateRules
from wordahead.federated.local import (
    Declined,
    FederationSettings,
    RoundConfig,
    check_tensors,
    contributed,
    round_text,
    train_round,
)
from wordahead.federated.privacy import gaussian_epsilon
from wordahead.federated.server_optimizer import ServerOptimizer
from wordahead.store.typing_log import TypingLog
from wordahead.types import KeyboardError


def _home(tmp_path: Path, lines: int = 30, **settings) -> Path:
    home = tmp_path / "home"
    with TypingLog(home / "typing_log.db") as log:
        for i in range(lines):
            log.record(f"line {i} of what I wrote to my friends today", source="mail")
    FederationSettings(enabled=True, min_new_words=50, **settings).save(home)
    return home


@pytest.mark.notorch
def test_round_text_follows_the_typing_log_rules(tmp_path: Path, monkeypatch):
    home = _home(tmp_path)
    with TypingLog(home / "typing_log.db") as log:
        log.record("diary words never shared", source="/home/me/diary/today.txt")
    texts, last = round_text(home, run_id=1)
    assert len(texts) == 31 and last == 31
    # A source excluded after the text was logged is not trained on either.
    with TypingLog(home / "typing_log.db") as log:
        log.set_excluded_sources([*log.excluded_sources, "*/diary/*"])
    texts, _ = round_text(home, run_id=1)
    assert not any("diary" in t for t in texts) and len(texts) == 30
    with TypingLog(home / "typing_log.db") as log:
        log.pause()
    with pytest.raises(Declined, match="paused"):
        round_text(home, run_id=1)
    with TypingLog(home / "typing_log.db") as log:
        log.resume()
    monkeypatch.setattr("wordahead.learn.policy.on_battery", lambda: True)
    with pytest.raises(Declined, match="battery"):
        round_text(home, run_id=1)


@pytest.mark.notorch
def test_a_run_trains_on_text_new_since_the_last_run(tmp_path: Path):
    home = _home(tmp_path)
    texts, last = round_text(home, run_id=7)
    contributed(home, 7, last)
    assert round_text(home, run_id=7)[0] == texts  # every round of a run: the same text
    with pytest.raises(Declined, match="too little new text"):
        round_text(home, run_id=8)  # nothing new since run 7
    with TypingLog(home / "typing_log.db") as log:
        for i in range(10):
            log.record(f"new message {i} with enough words in it to count", source="mail")
    texts, _ = round_text(home, run_id=8)
    assert len(texts) == 10 and all(t.startswith("new message") for t in texts)
    settings = FederationSettings.load(home)
    assert settings.rounds == 1 and settings.watermark == last


@pytest.mark.notorch
def test_server_round_config_is_bounded():
    config = RoundConfig.from_server({"local-steps": 10**6, "lr": 5.0, "batch-size": 0})
    assert (config.steps, config.lr, config.batch_size) == (500, 0.1, 1)
    assert config.groups == ""  # the model's default groups
    assert RoundConfig.from_server({"groups": "mlp,lm_head"}).groups == "mlp,lm_head"


def test_a_round_asking_for_unknown_groups_is_declined(tiny_llama):
    from wordahead.model.artifacts import ArtifactSet

    start = ArtifactSet.open(tiny_llama).initial_adapter()
    with pytest.raises(Declined, match="groups"):
        train_round(tiny_llama, list(start.values()), ["some text"] * 20, RoundConfig(groups="x"))


def test_train_round_returns_the_trainable_buffer_as_named_tensors(tmp_path: Path, tiny_llama):
    from wordahead.learn.trainer import LoraTrainer
    from wordahead.model.artifacts import ArtifactSet

    artifacts = ArtifactSet.open(tiny_llama)
    start = artifacts.initial_adapter()
    community = [start[n] for n in artifacts.lora_shapes]
    texts = ["I would like to book a table for two tonight."] * 40
    arrays, metrics = train_round(tiny_llama, community, texts, RoundConfig(steps=5, lr=0.05))
    assert [a.shape for a in arrays] == list(artifacts.lora_shapes.values())
    assert metrics["steps"] == 5
    assert any(not np.allclose(a, b) for a, b in zip(arrays, community))
    # The buffer and the named tensors agree: loading one gives back the other.
    trainer = LoraTrainer(artifacts)
    trainer.set_adapter(dict(zip(artifacts.lora_shapes, arrays)))
    order = trainer.trainable_names()
    flat = trainer.trainable_buffer()
    assert flat.size == trainer.module.get_parameters_size(trainable_only=True)
    named = dict(zip(artifacts.lora_shapes, arrays))
    assert np.array_equal(flat, np.concatenate([named[n].ravel() for n in order]))
    trainer.load_trainable_buffer(np.zeros_like(flat))
    after = trainer.adapter()
    assert all(not after[n].any() for n in order)
    # The groups a round does not train (the model's default leaves some out) stay as given.
    assert set(order) < set(named)
    assert all(np.array_equal(after[n], named[n]) for n in set(named) - set(order))
    with pytest.raises(ValueError):
        trainer.load_trainable_buffer(flat[:-1])


def test_incoming_community_adapter_is_checked(tiny_llama):
    from wordahead.model.artifacts import ArtifactSet

    artifacts = ArtifactSet.open(tiny_llama)
    good = [v for v in artifacts.initial_adapter().values()]
    assert len(check_tensors(artifacts, good)) == len(good)
    with pytest.raises(KeyboardError, match="expected"):
        check_tensors(artifacts, good[:-1])
    bad = [a.copy() for a in good]
    bad[0][0, 0] = np.nan
    with pytest.raises(KeyboardError, match="NaN"):
        check_tensors(artifacts, bad)
    with pytest.raises(KeyboardError, match="shape"):
        check_tensors(artifacts, [good[0].T, *good[1:]])


@pytest.mark.notorch
def test_update_rules_reject_malformed_updates():
    rules = UpdateRules(((4, 8), (8, 4)))
    ok = [np.zeros((4, 8), np.float32), np.zeros((8, 4), np.float32)]
    assert rules.problem(ok) is None
    assert "NaN" in rules.problem([np.full((4, 8), np.nan), ok[1]])
    assert "shape" in rules.problem([ok[0], np.zeros((4, 8))])
    assert "arrays" in rules.problem(ok[:1])
    huge = [np.zeros((4, 8), np.float32), np.zeros((8, 4 * 1000), np.float32)]
    assert "oversized" in rules.problem(huge)
    masked = [np.array([7]), np.ones((4, 8), np.int64), np.ones((8, 4), np.int64)]
    assert rules.masked_problem(masked, 2**32) is None
    assert "outside" in rules.masked_problem([masked[0], masked[1] - 2, masked[2]], 2**32)
    assert "NaN" in rules.masked_problem([masked[0], np.full((4, 8), np.nan), masked[2]], 2**32)


@pytest.mark.notorch
def test_epsilon_grows_with_rounds_and_falls_with_noise():
    assert gaussian_epsilon(1.0, 0) == 0.0
    assert gaussian_epsilon(0.0, 3) == math.inf
    assert gaussian_epsilon(1.0, 1) < gaussian_epsilon(1.0, 4) < gaussian_epsilon(0.5, 4)
    for z, t in ((0.8, 1), (1.0, 5), (3.0, 50)):
        eps = gaussian_epsilon(z, t)
        # Never looser than the classic RDP conversion eps <= rdp(a) + log(1/delta) / (a - 1)
        classic = min(t * a / (2 * z * z) + math.log(1e6) / (a - 1) for a in range(2, 512))
        assert 0 < eps <= classic
    # One Gaussian release with sigma = 1 (the analytic calibration gives ~4.9 at 1e-6).
    assert 4.5 < gaussian_epsilon(1.0, 1) < 5.6


@pytest.mark.notorch
def test_server_optimizers_step_on_the_released_mean():
    current = [np.zeros((3, 4)), np.ones((2,))]
    delta = [np.full((3, 4), 0.5), np.full((2,), 0.25)]
    released = [c + d for c, d in zip(current, delta)]
    # FedAvg at lr 1 publishes the released mean; a frozen tensor keeps its value.
    new = ServerOptimizer("fedavg").step(current, released, [False, True])
    assert np.allclose(new[0], 0.5) and np.array_equal(new[1], current[1])
    assert all(a.dtype == np.float32 for a in new)
    # FedAvgM: the second step with the same delta moves (1 + momentum) times as far.
    opt = ServerOptimizer("fedavgm", lr=0.5, momentum=0.9)
    first = opt.step(current, released)
    second = opt.step(first, [f + d for f, d in zip(first, delta)])
    assert np.allclose(second[0] - first[0], 0.5 * 1.9 * 0.5)
    # FedAdam: the first step moves every coordinate by about lr whatever the delta's scale,
    # and with momentum it keeps moving when a round brings nothing new.
    opt = ServerOptimizer("fedadam", lr=0.01, momentum=0.9, beta2=0.99, tau=1e-9)
    first = opt.step(current, [c + 1e-4 * np.sign(d) for c, d in zip(current, delta)])
    assert np.allclose(first[0], 0.01, rtol=1e-4) and np.allclose(first[1] - 1, 0.01, rtol=1e-4)
    still = opt.step(first, first)
    assert (still[0] > first[0]).all()
    with pytest.raises(ValueError, match="fedadam"):
        ServerOptimizer("adam")
    with pytest.raises(ValueError):
        ServerOptimizer("fedadam", momentum=1.0)


@pytest.mark.skipif(find_spec("flwr") is None, reason="needs the federated extra")
def test_dp_noise_is_added_to_the_mean_before_the_server_optimizer(tmp_path: Path, tiny_llama):
    """The release is the clipped updates' mean plus noise of std z C / n, and FedAdam steps
    on it (post-processing: the same epsilon as FedAvg). Were the noise added after Adam (as
    Flower's wrapper does to whatever its inner strategy returns), the published adapter
    would move by the noise (0.25 here), not by at most the server lr (1e-3)."""
    import json

    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters

    from wordahead.federated.community import CommunityStore
    from wordahead.federated.server_app import (
        CheckedGrid,
        CommunityStrategy,
        ServerSettings,
    )
    from wordahead.model.artifacts import ArtifactSet
    from wordahead.model.training_graphs import default_groups, groups_of

    with pytest.raises(ValueError, match="server-optimizer"):
        ServerSettings.from_run_config({"min-clients": 4, "server-optimizer": "sgd"})
    settings = ServerSettings.from_run_config(
        {
            "min-clients": 4,
            "clipping-norm": 1.0,
            "noise-multiplier": 1.0,
            "server-optimizer": "fedadam",
            "server-lr": 1e-3,
            "server-tau": 1e-9,
        }
    )
    artifacts = ArtifactSet.open(tiny_llama)
    community = CommunityStore(tmp_path / "server", artifacts)
    start = community.current()
    names = list(artifacts.lora_shapes)
    strategy = CommunityStrategy(
        settings,
        community,
        CheckedGrid(None, None, 1.0),  # type: ignore[arg-type]
        [start[n] for n in names],
    )
    released: list[list[np.ndarray]] = []
    step = strategy.optimizer.step
    strategy.optimizer.step = lambda cur, rel, frozen: (
        released.append(rel) or step(cur, rel, frozen)
    )
    rng = np.random.default_rng(0)
    updates = []
    for _ in range(4):  # clipped updates (norm 1 at most), as fixedclipping_mod sends them
        d = [rng.standard_normal(start[n].shape) for n in names]
        norm = math.sqrt(sum(float(np.sum(x * x)) for x in d))
        updates.append([start[n] + x / norm for n, x in zip(names, d)])
    results = [
        (None, FitRes(Status(Code.OK, ""), ndarrays_to_parameters(u), 1, {})) for u in updates
    ]
    parameters, metrics = strategy.aggregate_fit(1, results, [])  # type: ignore[arg-type]
    assert parameters is not None
    trained = {n for g in default_groups(artifacts) for n in groups_of(artifacts)[g]}
    mean = [np.mean([u[i] for u in updates], axis=0) for i in range(len(names))]
    noise = np.concatenate([(r - m).ravel() for r, m in zip(released[0], mean)])
    assert noise.std() == pytest.approx(1.0 * 1.0 / 4, rel=0.1)  # z C / n
    published = community.current()
    for name in names:
        move = np.abs(published[name] - start[name])
        if name in trained:
            assert 0 < move.max() <= 1e-3 * 1.01  # an Adam step, no noise after it
        else:  # a group the federation does not train: its noise is dropped
            assert move.max() == 0
    record = json.loads((tmp_path / "server" / "rounds.jsonl").read_text().splitlines()[-1])
    assert record["server_optimizer"] == "fedadam"
    assert record["epsilon"] == pytest.approx(gaussian_epsilon(1.0, 1)) == metrics["epsilon"]


@pytest.mark.skipif(find_spec("flwr") is None, reason="needs the federated extra")
@pytest.mark.notorch
def test_a_machine_that_did_not_opt_in_declines(tmp_path: Path):
    from wordahead.federated.client_app import CommunityClient

    home = tmp_path / "home"  # has a typing log, but never ran `keyboard federate`
    with TypingLog(home / "typing_log.db") as log:
        log.record("some text " * 100, source="mail")
    client = CommunityClient(home, Path("unused"), run_id=1)
    with pytest.raises(Declined, match="off"):
        client.fit([], {})


@pytest.mark.notorch
def test_federate_is_off_until_joined_and_off_again(tmp_path: Path, capsys, monkeypatch):
    from wordahead.cli import federate, main
    from wordahead.federated import join

    home = tmp_path / "kbhome"
    assert main(["federate"]) == 0
    assert "federation  off" in capsys.readouterr().out
    assert not FederationSettings.load(home).enabled
    started: list[list[str]] = []
    monkeypatch.setattr(federate.os, "execve", lambda exe, cmd, env: started.append(cmd))
    monkeypatch.setattr(join.shutil, "which", lambda name: "/usr/bin/" + name)
    assert main(["federate", "--superlink", "fl.example.org:9092", "--min-new-words", "500"]) == 1
    settings = FederationSettings.load(home)
    assert settings.enabled and settings.superlink == "fl.example.org:9092"
    assert settings.min_new_words == 500 and not settings.insecure
    cmd = started[0]
    assert cmd[cmd.index("--superlink") + 1] == "fl.example.org:9092" and "--insecure" not in cmd
    assert f'keyboard-home="{home}"' in cmd[cmd.index("--node-config") + 1]
    assert main(["federate", "--off"]) == 0
    assert not FederationSettings.load(home).enabled
    assert "off" in join.describe(FederationSettings.load(home))


def test_nightly_job_trains_on_top_of_the_community_adapter(tmp_path: Path, tiny_llama):
    """Server side: a round's adapter saved as an artifact. User side: imported, made active,
    and the personal adapter the nightly job trains starts from it."""
    import io

    from tests.tiny_models import corpus_lines
    from wordahead.federated.community import CommunityStore
    from wordahead.learn.adapter_diff import import_diff
    from wordahead.learn.adapter_store import AdapterStore
    from wordahead.learn.personalize import run_job
    from wordahead.learn.policy import JobConfig
    from wordahead.learn.progress import Progress
    from wordahead.model.artifacts import ArtifactSet
    from wordahead.paths import Home

    artifacts = ArtifactSet.open(tiny_llama)
    rng = np.random.default_rng(0)
    community = {
        n: (a + 0.01 * rng.standard_normal(a.shape)).astype(np.float32)
        for n, a in artifacts.initial_adapter().items()
    }
    server = CommunityStore(tmp_path / "server", artifacts)
    artifact = server.save_round(1, community, {"clients": 3})
    assert artifact.name == "community-r0001.npz" and (tmp_path / "server/community.npz").is_file()
    assert all(np.array_equal(server.current()[n], community[n]) for n in community)

    home = Home.at(tmp_path / "user")
    store = AdapterStore.in_home(home, artifacts)
    version = import_diff(store, tmp_path / "server" / "community.npz")
    store.use(version)
    with TypingLog(home.typing_log) as log:
        for line in corpus_lines()[:80]:
            log.record(line, source="notes")
    config = JobConfig(lr=5e-2, max_steps=30, warmup=3, eval_every=10, time_budget_s=60)
    result = run_job(home, tiny_llama, config=config, progress=Progress(io.StringIO(), tty=False))
    assert result.status in ("promoted", "rejected"), result.reason
    if result.status == "promoted":
        assert store.get(result.version).metadata["start_adapter"] == version
    else:
        assert result.version == version  # the community adapter stays what is served
