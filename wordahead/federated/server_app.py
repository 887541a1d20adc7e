"""The ServerApp: the mean of the machines' community-adapter updates, clipped on the machines,
summed under SecAgg+, noised centrally, then applied by a server optimizer (FedAvg, FedAvgM or
FedAdam); every round's adapter saved as an importable artifact.

Run config (pyproject.toml, `[tool.flwr.app.config]`; `flwr run --run-config` overrides):
num-server-rounds, min-clients, local-steps, lr, batch-size, groups, clipping-norm,
noise-multiplier, server-optimizer, server-lr, server-momentum, server-beta2, server-tau,
secure-aggregation, round-timeout, out-dir, model, clients-per-round, dev-text, patience.

A run continues the one kept in out-dir: its rounds are numbered on from the last kept one, the
privacy spent there counts, and num-server-rounds is the total.
"""

from __future__ import annotations

import logging
import math
import random
import resource
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
from flwr.app import Context, Error, Message
from flwr.common import (
    Code,
    FitRes,
    Parameters,
    Scalar,
    bytes_to_ndarray,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.common.constant import ErrorCode
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.compat.common import recorddict_compat as compat
from flwr.server import LegacyContext, ServerConfig
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import DifferentialPrivacyClientSideFixedClipping, FedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.server.workflow.secure_aggregation.secaggplus_workflow import WorkflowState
from flwr.serverapp import Grid, ServerApp

from wordahead.federated.community import CommunityStore, UpdateRules, resolve_model
from wordahead.federated.dev_text import DevLoss
from wordahead.federated.privacy import DELTA, epsilon
from wordahead.federated.server_optimizer import ServerOptimizer
from wordahead.model.artifacts import ArtifactSet
from wordahead.model.training_graphs import groups_of, parse_groups

log = logging.getLogger("wordahead.federated")

MODULUS = 2**32  # SecAgg+ mask range (Flower's default)
QUANTIZATION = 2**22
NEIGHBOURS = 31  # SecAgg+ key shares per machine in a large round (odd, as the protocol wants)


@dataclass(frozen=True)
class ServerSettings:
    """The federation's settings, from the run config."""

    rounds: int = 3
    min_clients: int = 2
    local_steps: int = 20
    lr: float = 1e-3
    batch_size: int = 8
    groups: str = ""  # adapter groups the machines train ("": the model's default groups)
    clipping_norm: float = 1.0
    noise_multiplier: float = 1.0
    server_optimizer: str = "fedavg"  # or fedavgm, fedadam (wordahead.federated.server_optimizer)
    server_lr: float = 1.0
    server_momentum: float = 0.9
    server_beta2: float = 0.99
    server_tau: float = 1e-3
    secure_aggregation: bool = True
    round_timeout: float = 600.0  # a machine that has not answered by then is left out
    out_dir: str = "community"
    model: str = ""
    # Each round asks each available machine with probability clients-per-round / available
    # (Poisson sampling: the privacy accounting credits it); 0 asks every machine every round.
    clients_per_round: int = 0
    dev_text: str = ""  # the operator's dev text (a UTF-8 file, a message a line)
    patience: int = 0  # stop after this many rounds without a better dev loss (0: never)

    @classmethod
    def from_run_config(cls, config: dict[str, Any]) -> ServerSettings:
        keys = {
            "num-server-rounds": ("rounds", int),
            "min-clients": ("min_clients", int),
            "local-steps": ("local_steps", int),
            "lr": ("lr", float),
            "batch-size": ("batch_size", int),
            "groups": ("groups", str),
            "clipping-norm": ("clipping_norm", float),
            "noise-multiplier": ("noise_multiplier", float),
            "server-optimizer": ("server_optimizer", str),
            "server-lr": ("server_lr", float),
            "server-momentum": ("server_momentum", float),
            "server-beta2": ("server_beta2", float),
            "server-tau": ("server_tau", float),
            "secure-aggregation": ("secure_aggregation", bool),
            "round-timeout": ("round_timeout", float),
            "out-dir": ("out_dir", str),
            "model": ("model", str),
            "clients-per-round": ("clients_per_round", int),
            "dev-text": ("dev_text", str),
            "patience": ("patience", int),
        }
        values = {attr: kind(config[key]) for key, (attr, kind) in keys.items() if key in config}
        settings = cls(**values)
        if settings.min_clients < 2 or (settings.secure_aggregation and settings.min_clients < 3):
            raise ValueError("min-clients must be at least 2 (3 with secure aggregation)")
        settings.optimizer()  # fails here on a bad server-* value, before any round
        if settings.patience > 0 and not settings.dev_text:
            raise ValueError("patience needs dev-text: the loss that says when to stop")
        return settings

    def optimizer(self) -> ServerOptimizer:
        return ServerOptimizer(
            self.server_optimizer,
            lr=self.server_lr,
            momentum=self.server_momentum,
            beta2=self.server_beta2,
            tau=self.server_tau,
        )


@dataclass
class Traffic:
    """What crossed the wire in one round, per node: bytes and array shapes (never values)."""

    down: dict[int, int] = field(default_factory=dict)
    up: dict[int, int] = field(default_factory=dict)
    shapes: dict[int, list[list[int]]] = field(default_factory=dict)
    rejected: dict[int, str] = field(default_factory=dict)
    declined: dict[int, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "bytes_down": {str(k): v for k, v in self.down.items()},
            "bytes_up": {str(k): v for k, v in self.up.items()},
            "update_shapes": {str(k): v for k, v in self.shapes.items()},
            "rejected": {str(k): v for k, v in self.rejected.items()},
            "declined": {str(k): v for k, v in self.declined.items()},
        }


def _record_bytes(message: Message) -> int:
    """Bytes of a message's arrays and config values (its payload)."""
    content = message.content
    total = sum(len(a.data) for rec in content.array_records.values() for a in rec.values())
    for rec in content.config_records.values():
        for value in rec.values():
            items = value if isinstance(value, list) else [value]
            total += sum(len(v) if isinstance(v, bytes | str) else 8 for v in items)
    return total


class CheckedGrid:
    """The Grid the workflows talk through: every training reply is checked against the
    adapter's form before Flower sums it, and the traffic is counted.

    A malformed reply (NaN, wrong shape, oversized, or a masked vector out of range) becomes
    an error reply, which both workflows treat as a machine that dropped out: SecAgg+ then
    removes its masks with the other machines' key shares. Waits are bounded by a timeout,
    so a machine that died mid-round cannot hold the round.
    """

    def __init__(self, grid: Grid, rules: UpdateRules, timeout: float) -> None:
        self._grid = grid
        self.rules = rules
        self.timeout = timeout
        self.traffic = Traffic()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> list[Message]:
        messages = list(messages)
        for message in messages:
            node = message.metadata.dst_node_id
            self.traffic.down[node] = self.traffic.down.get(node, 0) + _record_bytes(message)
        replies = self._grid.send_and_receive(messages, timeout=timeout or self.timeout)
        return [self._check(reply) for reply in replies]

    def _check(self, reply: Message) -> Message:
        node = reply.metadata.src_node_id
        if reply.has_error():  # a machine that declined, or whose app failed
            self.traffic.declined[node] = str(reply.error.reason).strip().splitlines()[-1][:200]
            return reply
        self.traffic.up[node] = self.traffic.up.get(node, 0) + _record_bytes(reply)
        problem, arrays = None, None
        configs = reply.content.config_records.get(RECORD_KEY_CONFIGS)
        try:
            if configs is not None and Key.MASKED_PARAMETERS in configs:
                masked = cast(list[bytes], configs[Key.MASKED_PARAMETERS])
                arrays = [bytes_to_ndarray(b) for b in masked]
                problem = self.rules.masked_problem(arrays, MODULUS)
            elif reply.content.array_records:
                fitres = compat.recorddict_to_fitres(reply.content, keep_input=True)
                arrays = parameters_to_ndarrays(fitres.parameters)
                problem = self.rules.problem(arrays)
        except Exception as exc:  # unreadable bytes are one more malformed update
            problem = f"unreadable update ({type(exc).__name__}: {exc})"
        if arrays is not None:
            self.traffic.shapes[node] = [list(a.shape) for a in arrays]
        if problem is None:
            return reply
        log.warning("update from node %s rejected: %s", node, problem)
        self.traffic.rejected[node] = problem
        error = Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, f"rejected: {problem}")
        # The reply's own metadata (sender, round): the workflows see that machine drop out.
        return Message(error=error, metadata=reply.metadata)  # type: ignore[call-overload]


class SecAggPlus(SecAggPlusWorkflow):
    """Flower's SecAgg+ workflow, with a machine that never answered the setup stage (it went
    away between rounds) left out of the round altogether: it holds no key shares, so
    counting it as a dropout would make unmasking fail for want of its shares.

    In a round of at most NEIGHBOURS machines each holds a share of every other's keys; in a
    larger one each shares with NEIGHBOURS others (SecAgg+'s neighbourhoods: Bell et al. 2020
    show that O(log n) neighbours keep the sum secure), so a machine's cost grows with
    NEIGHBOURS, not with the round (Shamir sharing to all 204 machines of a round took minutes
    of pure-Python arithmetic per machine)."""

    def sampled(self, machines: int) -> None:
        """Size the neighbourhoods for a round of `machines` (called once they are sampled)."""
        self.num_shares = 1.0 if machines <= NEIGHBOURS else NEIGHBOURS

    def setup_stage(self, grid: Grid, context: LegacyContext, state: WorkflowState) -> bool:
        ok = super().setup_stage(grid, context, state)
        answered = set(state.active_node_ids)
        state.sampled_node_ids = answered
        state.nid_to_neighbours = {
            nid: neighbours & answered
            for nid, neighbours in state.nid_to_neighbours.items()
            if nid in answered
        }
        return ok and self._check_threshold(state)


class CommunityStrategy(DifferentialPrivacyClientSideFixedClipping):
    """Flower's client-side fixed-clipping DP wrapper around FedAvg, followed by the server
    optimizer; keeps each round's adapter, its epsilon at delta = 1e-6 and the round's traffic.

    The wrapper releases the mean of the clipped updates plus noise (its inner strategy is
    plain FedAvg, so that is what the noise is calibrated to); the optimizer then steps on
    that release, which is post-processing: epsilon does not depend on it. Tensors of groups
    the federation does not train keep their value (their noise is dropped, also
    post-processing).

    Two changes to the wrapper: machines that dropped out, declined or were rejected are
    left out instead of cancelling the round (SecAgg+ has already removed them from the sum),
    and the noise is scaled to the machines actually averaged, so a smaller round is noised
    as much as its mean needs.
    """

    def __init__(
        self,
        settings: ServerSettings,
        community: CommunityStore,
        grid: CheckedGrid,
        initial: list[np.ndarray],
    ) -> None:
        inner = FedAvg(
            fraction_fit=1.0,
            fraction_evaluate=0.0,
            min_fit_clients=settings.min_clients,
            min_evaluate_clients=0,
            min_available_clients=settings.min_clients,
            initial_parameters=ndarrays_to_parameters(initial),
            on_fit_config_fn=self._fit_config,
            accept_failures=True,
        )
        super().__init__(
            inner, settings.noise_multiplier, settings.clipping_norm, settings.min_clients
        )
        self.settings = settings
        self.community = community
        self.grid = grid
        self.names = list(community.artifacts.lora_shapes)
        members = groups_of(community.artifacts)
        groups = parse_groups(community.artifacts, settings.groups)
        trained = {n for g in groups for n in members[g]}
        self.frozen = [n not in trained for n in self.names]
        self.optimizer = settings.optimizer()
        self.round_started = time.monotonic()
        self.floor = 3 if settings.secure_aggregation else 2  # SecAgg+ needs three
        self.sampler = random.SystemRandom()  # which machines a round asks is kept secret
        self.sample_rate = 1.0
        self.on_sampled: Callable[[int], None] | None = None  # SecAgg+ sizes its shares
        self.stopped = False
        # A run continues the rounds kept in out-dir: numbering, privacy spent, best dev loss.
        kept = community.rounds()
        self.offset = int(kept[-1]["round"]) if kept else 0
        self.releases = [
            (float(r["noise_multiplier"]), float(r.get("sample_rate", 1.0)))
            for r in kept
            if not r.get("kept")
        ]
        self.dev = None
        if settings.dev_text:
            self.dev = DevLoss(community.artifacts, Path(settings.dev_text), settings.patience)
            for r in kept:  # the last observation says whether the run had stopped
                if "dev_loss" in r:
                    self.stopped = self.dev.observe(int(r["round"]), float(r["dev_loss"]))

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: Any
    ) -> list[tuple[ClientProxy, Any]]:
        """Every available machine (clients-per-round 0), or each with probability
        clients-per-round / available; nothing once the dev loss has stopped improving."""
        if self.stopped:
            return []
        instructions = super().configure_fit(server_round, parameters, client_manager)
        wanted = self.settings.clients_per_round
        chosen = instructions
        self.sample_rate = 1.0
        if 0 < wanted < len(instructions):
            self.sample_rate = wanted / len(instructions)
            chosen = [i for i in instructions if self.sampler.random() < self.sample_rate]
        if len(chosen) < self.floor:  # nothing is released, so nothing is spent
            log.warning("round %s: %d machines sampled; round skipped", server_round, len(chosen))
            return []
        if self.on_sampled is not None:
            self.on_sampled(len(chosen))
        return chosen

    def _fit_config(self, server_round: int) -> dict[str, Scalar]:
        self.round_started = time.monotonic()
        return {
            "server-round": server_round,
            "num-server-rounds": self.settings.rounds,
            "local-steps": self.settings.local_steps,
            "lr": self.settings.lr,
            "batch-size": self.settings.batch_size,
            "groups": self.settings.groups,
        }

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        traffic, self.grid.traffic = self.grid.traffic, Traffic()
        results = [(p, r) for p, r in results if r.status.code == Code.OK]
        number = self.offset + server_round
        record: dict[str, Any] = {
            "clients": len(results),
            "sample_rate": round(self.sample_rate, 6),
            "failures": len(failures),
            "seconds": round(time.monotonic() - self.round_started, 3),
            "noise_multiplier": self.noise_multiplier,
            "clipping_norm": self.clipping_norm,
            "secure_aggregation": self.settings.secure_aggregation,
            **traffic.to_json(),
        }
        if len(results) < 2:
            log.warning("round %s: %d usable updates; adapter kept", server_round, len(results))
            self.community.save_round(number, self._current(), {**record, "kept": True})
            return None, {}
        self.num_sampled_clients = len(results)  # noise for the mean of those averaged
        parameters, metrics = super().aggregate_fit(server_round, results, [])
        if parameters is None:
            return None, {}
        released = parameters_to_ndarrays(parameters)  # the noised mean (SecAgg+: float64)
        problem = UpdateRules.for_model(self.community.artifacts).problem(released)
        if problem is not None:  # e.g. overflow in the secure sum: never publish it
            log.warning("round %s: aggregate rejected (%s); adapter kept", server_round, problem)
            self.community.save_round(number, self._current(), {**record, "kept": True})
            return None, {}
        previous = self.community.current()
        # float32, as the machines train it
        arrays = self.optimizer.step([previous[n] for n in self.names], released, self.frozen)
        parameters = ndarrays_to_parameters(arrays)
        self.releases.append((self.noise_multiplier, self.sample_rate))
        spent: float | None = epsilon(self.releases, DELTA)
        if spent == math.inf:
            spent = None  # a round without noise: no DP guarantee at all
        record.update(epsilon=spent, delta=DELTA, server_optimizer=self.optimizer.kind)
        tensors = dict(zip(self.names, arrays))
        change = sum(float(np.sum((tensors[n] - previous[n]) ** 2)) for n in self.names)
        record["update_norm"] = round(change**0.5, 6)  # the round's step, noise included
        dev = ""
        if self.dev is not None:
            record["dev_loss"] = round(self.dev.loss(tensors), 5)
            self.stopped = self.dev.observe(number, record["dev_loss"])
            dev = f", dev loss {record['dev_loss']:.4f} (best {self.dev.best:.4f})"
        record["server_peak_rss_mb"] = round(
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        )
        path = self.community.save_round(number, tensors, record)
        privacy = "no DP noise" if spent is None else f"epsilon {spent:.3f} at delta {DELTA:g}"
        log.info(
            "round %s: %d machines, %s, %s%s, %.0f s",
            number, len(results), path.name, privacy, dev, record["seconds"],
        )  # fmt: skip
        if self.stopped and self.dev is not None:
            log.info("dev loss has not improved for %d rounds: stopping", self.dev.stale)
        return parameters, metrics if spent is None else {**metrics, "epsilon": spent}

    def finish(self) -> None:
        """Publish the round with the best dev loss as community.npz (the newest otherwise)."""
        if self.dev is not None and self.dev.best_round:
            self.community.publish(self.dev.best_round)
            log.info("community.npz: round %d (dev loss %.4f)", self.dev.best_round, self.dev.best)

    def _current(self) -> dict[str, np.ndarray]:
        return self.community.current()


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the federation's rounds on the connected SuperNodes."""
    settings = ServerSettings.from_run_config(dict(context.run_config))
    artifacts = ArtifactSet.open(resolve_model(settings.model))
    community = CommunityStore(Path(settings.out_dir).expanduser(), artifacts)
    start = community.current()
    checked = CheckedGrid(grid, UpdateRules.for_model(artifacts), settings.round_timeout)
    initial = [start[n] for n in artifacts.lora_shapes]
    strategy = CommunityStrategy(settings, community, checked, initial)
    remaining = settings.rounds - strategy.offset
    if strategy.offset:
        log.info(
            "continuing from round %d of %d in %s", strategy.offset, settings.rounds, community.out
        )
    if remaining <= 0 or strategy.stopped:
        strategy.finish()
        return
    legacy = LegacyContext(
        context=context,
        config=ServerConfig(num_rounds=remaining, round_timeout=settings.round_timeout),
        strategy=strategy,
    )
    fit_workflow = None
    if settings.secure_aggregation:
        fit_workflow = SecAggPlus(
            num_shares=1.0,  # every machine holds a share of every other's keys
            reconstruction_threshold=0.5,  # half of them recover a machine that dropped out
            max_weight=1.0,  # every machine weighs the same (and sizes stay secret)
            clipping_range=8.0,
            quantization_range=QUANTIZATION,
            modulus_range=MODULUS,
            timeout=settings.round_timeout,
        )
        strategy.on_sampled = fit_workflow.sampled
    DefaultWorkflow(fit_workflow=fit_workflow)(checked, legacy)  # type: ignore[arg-type]
    strategy.finish()
