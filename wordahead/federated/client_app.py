"""The ClientApp: trains the community adapter on this machine's typing log with ORT and sends
back only the adapter tensors, clipped (fixedclipping_mod) and masked (secaggplus_mod).

Node config (`flower-supernode --node-config`, written by `keyboard federate`):
keyboard-home (required), model (default: the starter model), allow-plain-updates (false:
refuse a server that does not ask for secure aggregation). Under the simulation engine the
home is `<simulation-homes>/node-<partition-id>` (run config).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Context, Error, Message, MessageType
from flwr.client import NumPyClient
from flwr.client.mod import fixedclipping_mod, secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.constant import ErrorCode
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

from wordahead.federated.community import resolve_model
from wordahead.federated.local import (
    Declined,
    FederationSettings,
    RoundConfig,
    contributed,
    round_text,
    train_round,
)
from wordahead.paths import Home

log = logging.getLogger("wordahead.federated")


class CommunityClient(NumPyClient):
    """One machine: its keyboard home (typing log, federation settings) and model."""

    def __init__(self, home: Path, model_dir: Path, run_id: int) -> None:
        self.home = home
        self.model_dir = model_dir
        self.run_id = run_id

    def fit(
        self, parameters: list[np.ndarray], config: dict[str, Any]
    ) -> tuple[list[np.ndarray], int, dict[str, Any]]:
        """Train on the local text; raise Declined (an error reply: this machine drops out of
        the round) when the typing log's rules or the amount of new text say no."""
        if not FederationSettings.load(self.home).enabled:
            raise Declined("federated learning is off on this machine (keyboard federate)")
        try:
            texts, last_entry = round_text(self.home, self.run_id)
            arrays, metrics = train_round(
                self.model_dir,
                parameters,
                texts,
                RoundConfig.from_server(config),
                cache_dir=Home.at(self.home).training_graphs,
            )
        except Declined as exc:
            log.info("round %s declined: %s", config.get("server-round"), exc)
            raise Declined(str(exc).split(" (")[0]) from None  # no counts leave the machine
        contributed(self.home, self.run_id, last_entry)
        log.info("round %s: trained %s steps", config.get("server-round"), metrics["steps"])
        # Weight 1: every machine counts the same, and how much it typed stays here.
        return arrays, 1, {}


def client_fn(context: Context) -> Any:
    node = context.node_config
    if "keyboard-home" in node:
        home = Path(str(node["keyboard-home"])).expanduser()
    elif "partition-id" in node and "simulation-homes" in context.run_config:
        home = Path(str(context.run_config["simulation-homes"])) / f"node-{node['partition-id']}"
    else:
        raise Declined("no keyboard home configured (node config keyboard-home)")
    model = resolve_model(str(node.get("model", "") or context.run_config.get("model", "")))
    return CommunityClient(home, model, context.run_id).to_client()


def require_secure_aggregation(
    msg: Message, ctxt: Context, call_next: ClientAppCallable
) -> Message:
    """Refuse a training request that does not come with SecAgg+ (its update would reach the
    server on its own) unless the node config allows plain updates."""
    if msg.metadata.message_type != MessageType.TRAIN:
        return call_next(msg, ctxt)
    if RECORD_KEY_CONFIGS in msg.content.config_records:
        return secaggplus_mod(msg, ctxt, call_next)
    if bool(ctxt.node_config.get("allow-plain-updates", False)):
        return call_next(msg, ctxt)
    reason = "this machine sends only securely aggregated updates (SecAgg+)"
    return Message(error=Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason), reply_to=msg)


app = ClientApp(client_fn=client_fn, mods=[require_secure_aggregation, fixedclipping_mod])
