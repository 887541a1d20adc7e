"""Federated learning for real: a SuperLink and five SuperNodes on loopback (each with its own
keyboard home and typing log) run the Flower app with `flwr run`; then the same app under
Flower's simulation engine."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.skipif(
    find_spec("flwr") is None, reason="needs the federated extra (pip install -e '.[federated]')"
)

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
FAULTS = Path(__file__).resolve().parent / "federated_faults"
SECRET = "zq{}marmalade"  # a word only node i ever typed


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_home(home: Path, i: int) -> None:
    """A keyboard home that opted in, with a typing log of its own (and one excluded file)."""
    from tests.tiny_models import corpus_lines
    from wordahead.federated.local import FederationSettings
    from wordahead.store.typing_log import TypingLog

    with TypingLog(home / "typing_log.db") as log:
        for line in corpus_lines()[i * 5 : i * 5 + 60]:
            log.record(f"{line} {SECRET.format(i)} said so.", source="notes.md")
        log.record("zzexcluded text that stays home", source="/home/me/.ssh/config")
    FederationSettings(enabled=True, min_new_words=100).save(home)


def _env(flwr_home: Path, **extra: str) -> dict[str, str]:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", **extra}
    env["FLWR_HOME"] = str(flwr_home)
    env.pop("KEYBOARD_HOME", None)  # each node is given its home explicitly
    return env


def _start(cmd: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        cmd, stdout=open(log, "wb"), stderr=subprocess.STDOUT, env=env, start_new_session=True
    )


def _stop(proc: subprocess.Popen) -> None:
    """Kill the process's whole group (its helpers too), also when the leader already exited:
    a failing test must not leave a SuperLink or SuperNodes behind."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:  # no such group: a process started in ours (flwr run)
        proc.kill()  # a no-op once it has exited
    proc.wait(10)


def _wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.3)


def _server_side_bytes(*roots: Path) -> bytes:
    out = b""
    for root in roots:
        files = [root] if root.is_file() else [p for p in root.rglob("*") if p.is_file()]
        out += b"".join(p.read_bytes() for p in files)
    return out


def test_deployment_rounds_with_a_dead_and_a_malformed_node(tmp_path: Path, tiny_llama: Path):
    from wordahead.federated.local import FederationSettings
    from wordahead.model.artifacts import ArtifactSet

    artifacts = ArtifactSet.open(tiny_llama)
    server = tmp_path / "server"
    (server / "flwr").mkdir(parents=True)
    port = _free_port()
    (server / "flwr" / "config.toml").write_text(
        f'[superlink]\ndefault = "test"\n\n[superlink.test]\n'
        f'address = "127.0.0.1:{port}"\ninsecure = true\n'
    )
    superlink = _start(
        [str(BIN / "flower-superlink"), "--insecure", "--disable-runtime-dependency-installation",
         "--host", "127.0.0.1", "--port", str(port), "--database", str(server / "state.db")],
        server / "superlink.log", _env(server / "flwr"),
    )  # fmt: skip
    procs = [superlink]
    marker = tmp_path / "hung"
    faults = ["", "", "", "hang", "corrupt"]
    try:
        for i, fault in enumerate(faults):
            home = tmp_path / f"node-{i}"
            make_home(home, i)
            extra = {}
            if fault:
                extra = {
                    "PYTHONPATH": str(FAULTS),
                    "KEYBOARD_TEST_FAULT": fault,
                    "KEYBOARD_TEST_MARKER": str(marker),
                }
            node_config = f"keyboard-home='{home}' model='{tiny_llama}'"
            procs.append(
                _start(
                    [
                        str(BIN / "flower-supernode"),
                        "--insecure",
                        "--superlink",
                        f"127.0.0.1:{port}",
                        "--port",
                        str(_free_port()),
                        "--node-config",
                        node_config,
                    ],
                    tmp_path / f"node-{i}.log",
                    _env(tmp_path / f"flwr-{i}", **extra),
                )  # fmt: skip
            )
        log = server / "superlink.log"
        _wait_for(
            lambda: log.read_text(errors="replace").count("Activated node_id=") >= len(faults),
            90,
            "all SuperNodes to connect",
        )
        out = server / "community"
        run_config = (
            f"num-server-rounds=2 min-clients=4 local-steps=4 lr=0.05 round-timeout=25.0 "
            f"noise-multiplier=0.01 clipping-norm=1.0 out-dir='{out}' model='{tiny_llama}'"
        )
        run = subprocess.Popen(
            [str(BIN / "flwr"), "run", ".", "test", "--stream", "--run-config", run_config],
            cwd=REPO, env=_env(server / "flwr"),
            stdout=open(server / "run.log", "wb"), stderr=subprocess.STDOUT,
        )  # fmt: skip
        procs.append(run)
        _wait_for(marker.exists, 120, "node 3 to start training")
        _stop(procs[1 + faults.index("hang")])  # killed mid-round
        run.wait(400)
        assert run.returncode == 0, (server / "run.log").read_text(errors="replace")[-3000:]
    finally:
        for proc in reversed(procs):
            _stop(proc)

    rounds = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2]
    # The community adapter changed, and each round's artifact imports into a daemon's store.
    from wordahead.learn.adapter_diff import import_diff
    from wordahead.learn.adapter_store import AdapterStore

    store = AdapterStore(root=tmp_path / "user-adapters", artifacts=artifacts)
    initial = artifacts.initial_adapter()
    for r in rounds:
        assert not r.get("kept"), r
        assert r["clients"] == 3, r  # the three healthy nodes; the dead and the bad left out
        version = import_diff(store, out / f"community-r{r['round']:04d}.npz")
        tensors = store.load(version)
        assert any(not np.allclose(tensors[n], initial[n]) for n in initial)
        assert r["epsilon"] > 0
    # Only arrays of the adapter's shapes crossed from a healthy node (after SecAgg+'s factor).
    shapes = [[1]] + [list(s) for s in artifacts.lora_shapes.values()]
    healthy = [n for n, s in rounds[0]["update_shapes"].items() if n not in rounds[0]["rejected"]]
    assert len(healthy) == 3
    for r in rounds:
        for node in healthy:
            assert r["update_shapes"][node] == shapes
    # The malformed node was rejected in both rounds, for what it sent.
    reasons = [next(iter(r["rejected"].values())) for r in rounds]
    assert all(len(r["rejected"]) == 1 for r in rounds)
    assert "NaN" in reasons[0]
    assert "shape" in reasons[1]
    # No node's text reached anything the server side stored or logged.
    seen = _server_side_bytes(server, out)
    for i in range(len(faults)):
        assert SECRET.format(i).encode() not in seen
    assert b"marmalade" not in seen and b"zzexcluded" not in seen
    # The healthy nodes recorded their contribution and move their watermark on.
    settings = FederationSettings.load(tmp_path / "node-0")
    assert settings.rounds == 2 and settings.watermark > 0


def test_simulation_engine_runs_the_same_app(tmp_path: Path, tiny_llama: Path):
    """`flwr run` against a SuperLink in simulation mode (Ray backend), three virtual nodes."""
    homes = tmp_path / "homes"
    for i in range(3):
        make_home(homes / f"node-{i}", i)
    flwr_home = tmp_path / "flwr"
    flwr_home.mkdir()
    port = _free_port()
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "sim"\n\n[superlink.sim]\naddress = "127.0.0.1:{port}"\n'
        "insecure = true\n\n[superlink.sim.options]\nnum-supernodes = 3\n\n"
        "[superlink.sim.options.backend.client-resources]\nnum-cpus = 1\n"
    )
    env = _env(flwr_home, RAY_DISABLE_USAGE_STATS="1")
    superlink = _start(
        [str(BIN / "flower-superlink"), "--insecure", "--simulation",
         "--disable-runtime-dependency-installation", "--host", "127.0.0.1", "--port", str(port),
         "--database", str(tmp_path / "state.db")],
        tmp_path / "superlink.log", env,
    )  # fmt: skip
    out = tmp_path / "community"
    try:
        run_config = (
            f"num-server-rounds=2 min-clients=3 local-steps=3 lr=0.05 noise-multiplier=0.01 "
            f"clipping-norm=1.0 out-dir='{out}' model='{tiny_llama}' simulation-homes='{homes}'"
        )
        time.sleep(2)
        run = subprocess.run(
            [str(BIN / "flwr"), "run", ".", "sim", "--stream", "--run-config", run_config],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=400,
        )  # fmt: skip
    finally:
        _stop(superlink)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    rounds = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    assert [(r["round"], r["clients"]) for r in rounds] == [(1, 3), (2, 3)]
    assert (out / "community.npz").is_file()
