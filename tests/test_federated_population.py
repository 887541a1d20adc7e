"""A federation of many machines: Poisson-sampled rounds and the privacy they spend, rounds that
stop when the dev loss stops improving, and runs that continue where the last one stopped."""

from __future__ import annotations

import json
import math
from importlib.util import find_spec
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from wordahead.federated.privacy import epsilon, gaussian_epsilon

needs_flwr = pytest.mark.skipif(find_spec("flwr") is None, reason="needs the federated extra")


@pytest.mark.notorch
def test_epsilon_agrees_with_googles_accountant():
    """Reference values from Google's dp-accounting (RdpAccountant, PoissonSampledDpEvent of a
    GaussianDpEvent, delta 1e-6), which also searches fractional orders: ours may only be as
    tight or a little looser (integer orders), never smaller."""
    reference = [
        ((1.0, 1.0, 5), 13.37637916335795),
        ((1.0, 0.1, 30), 5.605807690388586),
        ((0.8, 0.1, 40), 9.72129083764662),
        ((1.5, 0.2, 20), 4.3652833792123324),
        ((0.7, 0.05, 100), 10.504792118827037),
    ]
    for (z, q, rounds), theirs in reference:
        ours = epsilon([(z, q)] * rounds)
        assert theirs * (1 - 1e-9) <= ours <= theirs * 1.05, (z, q, rounds, ours, theirs)
    assert gaussian_epsilon(1.0, 5) == epsilon([(1.0, 1.0)] * 5)


@pytest.mark.notorch
def test_sampling_is_credited_and_rounds_compose():
    assert epsilon([(1.0, 0.1)] * 10) < epsilon([(1.0, 0.5)] * 10) < epsilon([(1.0, 1.0)] * 10)
    mixed = [(1.0, 0.1)] * 5 + [(2.0, 1.0)] * 3
    assert epsilon(mixed) == epsilon(list(reversed(mixed)))
    assert epsilon(mixed) > max(epsilon(mixed[:5]), epsilon(mixed[5:]))
    assert math.isinf(epsilon([(1.0, 0.1), (0.0, 0.1)]))  # one release without noise
    assert epsilon([]) == 0.0


class _Machines:
    """A client manager of `n` machines, all available (what FedAvg asks of one)."""

    def __init__(self, n: int) -> None:
        self.proxies = [SimpleNamespace(node_id=i, cid=str(i)) for i in range(n)]

    def num_available(self) -> int:
        return len(self.proxies)

    def sample(self, num_clients, min_num_clients=None, criterion=None):
        return self.proxies[:num_clients]


def _strategy(tmp_path: Path, model: Path, **config):
    from wordahead.federated.community import CommunityStore
    from wordahead.federated.server_app import CheckedGrid, CommunityStrategy, ServerSettings
    from wordahead.model.artifacts import ArtifactSet

    settings = ServerSettings.from_run_config(
        {"min-clients": 3, "out-dir": str(tmp_path / "server"), **config}
    )
    community = CommunityStore(tmp_path / "server", ArtifactSet.open(model))
    start = community.current()
    initial = [start[n] for n in community.artifacts.lora_shapes]
    grid = CheckedGrid(None, None, 1.0)  # type: ignore[arg-type]
    return CommunityStrategy(settings, community, grid, initial), community


def _round(strategy, community, server_round: int, scale: float = 0.01, seed: int = 0):
    """Four machines' clipped updates of norm `scale`, aggregated as round `server_round`."""
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters

    rng = np.random.default_rng(seed)
    start = community.current()
    names = list(community.artifacts.lora_shapes)
    results = []
    for _ in range(4):
        d = [rng.standard_normal(start[n].shape) for n in names]
        norm = math.sqrt(sum(float(np.sum(x * x)) for x in d))
        update = [start[n] + scale * x / norm for n, x in zip(names, d)]
        results.append((None, FitRes(Status(Code.OK, ""), ndarrays_to_parameters(update), 1, {})))
    return strategy.aggregate_fit(server_round, results, [])


@needs_flwr
def test_rounds_ask_a_poisson_sample_and_account_for_it(tmp_path: Path, tiny_llama):
    from flwr.common import ndarrays_to_parameters

    strategy, community = _strategy(
        tmp_path, tiny_llama, **{"clients-per-round": 10, "noise-multiplier": 1.0}
    )
    machines = _Machines(100)
    params = ndarrays_to_parameters([])
    sizes = [len(strategy.configure_fit(r, params, machines)) for r in range(1, 41)]
    assert strategy.sample_rate == pytest.approx(0.1)
    assert 8 <= np.mean(sizes) <= 12 and len(set(sizes)) > 3  # random, about 10 a round
    asked = {p.node_id for p, _ in strategy.configure_fit(1, params, machines)}
    assert len(asked) >= 3 and asked <= set(range(100))
    _round(strategy, community, 1)
    record = json.loads((tmp_path / "server" / "rounds.jsonl").read_text().splitlines()[-1])
    assert record["sample_rate"] == pytest.approx(0.1)
    assert record["epsilon"] == pytest.approx(epsilon([(1.0, 0.1)]))
    # every machine every round: no credit
    everyone, _ = _strategy(tmp_path / "all", tiny_llama, **{"noise-multiplier": 1.0})
    assert len(everyone.configure_fit(1, params, machines)) == 100
    assert everyone.sample_rate == 1.0


@needs_flwr
def test_a_run_continues_the_rounds_and_the_privacy_kept(tmp_path: Path, tiny_llama):
    first, community = _strategy(tmp_path, tiny_llama, **{"noise-multiplier": 1.0})
    _round(first, community, 1)
    _round(first, community, 2, seed=1)
    again, community = _strategy(
        tmp_path, tiny_llama, **{"noise-multiplier": 2.0, "num-server-rounds": 5}
    )
    assert again.offset == 2
    _round(again, community, 1, seed=2)  # the new run's first round is round 3
    records = community.rounds()
    assert [r["round"] for r in records] == [1, 2, 3]
    assert (tmp_path / "server" / "community-r0003.npz").is_file()
    assert records[-1]["epsilon"] == pytest.approx(epsilon([(1.0, 1.0)] * 2 + [(2.0, 1.0)]))
    assert records[-1]["epsilon"] > records[1]["epsilon"]


@needs_flwr
def test_rounds_stop_when_the_dev_loss_stops_improving(tmp_path: Path, tiny_llama):
    from flwr.common import ndarrays_to_parameters

    dev = tmp_path / "dev.txt"
    dev.write_text("\n".join(f"the commit {i} fixes the tests of the parser" for i in range(40)))
    with pytest.raises(ValueError, match="dev-text"):
        _strategy(tmp_path / "x", tiny_llama, patience=1)
    strategy, community = _strategy(
        tmp_path, tiny_llama, **{"dev-text": str(dev), "patience": 1, "noise-multiplier": 0.0}
    )
    _round(strategy, community, 1, scale=1e-4)
    assert not strategy.stopped
    _round(strategy, community, 2, scale=50.0)  # a huge random step: the dev loss rises
    records = community.rounds()
    assert records[1]["dev_loss"] > records[0]["dev_loss"] and strategy.stopped
    assert strategy.configure_fit(3, ndarrays_to_parameters([]), _Machines(10)) == []
    strategy.finish()  # community.npz is round 1's, the best
    out = tmp_path / "server"
    assert (out / "community.npz").read_bytes() == (out / "community-r0001.npz").read_bytes()
    # a run started again sees that it is done
    again, _ = _strategy(tmp_path, tiny_llama, **{"dev-text": str(dev), "patience": 1})
    assert again.stopped and again.dev is not None and again.dev.best_round == 1


@needs_flwr
def test_secure_aggregation_shares_with_neighbours_in_a_large_round(tmp_path: Path, tiny_llama):
    """Every machine shares its keys with every other in a small round; in a large one with
    NEIGHBOURS others, so a machine's cost does not grow with the round."""
    from flwr.common import ndarrays_to_parameters

    from wordahead.federated.server_app import MODULUS, NEIGHBOURS, QUANTIZATION, SecAggPlus

    workflow = SecAggPlus(
        num_shares=1.0,
        reconstruction_threshold=0.5,
        quantization_range=QUANTIZATION,
        modulus_range=MODULUS,
    )
    strategy, _ = _strategy(tmp_path, tiny_llama)
    strategy.on_sampled = workflow.sampled
    params = ndarrays_to_parameters([])
    assert len(strategy.configure_fit(1, params, _Machines(NEIGHBOURS))) == NEIGHBOURS
    assert workflow.num_shares == 1.0
    assert len(strategy.configure_fit(2, params, _Machines(200))) == 200
    assert workflow.num_shares == NEIGHBOURS and NEIGHBOURS % 2 == 1
    assert strategy.configure_fit(3, params, _Machines(2)) == []  # SecAgg+ needs three
