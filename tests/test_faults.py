"""The fault matrix: every fault of issue 7, injected into a short DSparse run.

Most faults run through :class:`flwr_dsparse.testing.LocalGrid` (the real ClientApp
handlers, strategy and ServerApp job, in-process; Flower's simulation cannot make nodes
join, leave or die). The kill -9 + resume test and one fault run use the real Ray
simulation (``flwr.simulation.run_simulation``) in subprocesses.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from client.app import app
from experiments.fault_matrix import SCENARIOS, SMALL_JOB, run_scenario
from flwr_dsparse.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from flwr_dsparse.config import load_config
from flwr_dsparse.replica_store import REPLICA_STORE_ENV
from flwr_dsparse.testing import LocalGrid

pytestmark = [pytest.mark.faults, pytest.mark.usefixtures("one_torch_thread")]
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(params=["context-state", "replica-store"])
def durable_copy(request, tmp_path, monkeypatch) -> str:
    """Where the nodes keep their durable replica: ``context.state`` (Flower's way) or the node's replica store."""
    if request.param == "replica-store":
        monkeypatch.setenv(REPLICA_STORE_ENV, str(tmp_path / "replica-store"))
    else:
        monkeypatch.delenv(REPLICA_STORE_ENV, raising=False)
    return request.param


def _final(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / "final_model.pt")


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.name for s in SCENARIOS])
def test_fault_matrix(scenario, tmp_path, durable_copy):
    row = run_scenario(scenario, tmp_path)
    assert row["ok"], row["outcome"] + " " + row["stopped"]
    assert row["corrupt-applied"] == 0
    assert row["rounds-lost"] == 0
    history = row["history"]
    if scenario.expect_stop:
        # Stopped as documented: rounds 1..2 complete and checkpointed, round 3 never applied.
        assert [h["round"] for h in history] == [1, 2]
        assert "resume=true" in row["stopped"]
        return
    assert [h["round"] for h in history] == [1, 2, 3, 4]
    final = _final(tmp_path)
    assert all(torch.isfinite(t).all() for t in final.values() if t.is_floating_point())
    if scenario.corrupt_device_round:
        device, server_round = scenario.corrupt_device_round
        entry = history[server_round - 1]
        assert device not in entry["accepted"]
        status = entry["devices"][str(device)]["status"]
        assert status.startswith("rejected:") or status == "missing", status
        assert entry["num-examples"] > 0  # the others' replies were applied
    name = scenario.name
    if name in ("node raises mid-round", "node times out or dies mid-round"):
        device = 1 if "raises" in name else 0
        assert history[1]["missing"] == [device] and device not in history[1]["accepted"]
    if name == "node leaves between rounds":
        assert history[2]["events"][0]["event"] == "replan" and "devices [1] left" in history[2]["events"][0]["reason"]
        assert sorted(history[2]["devices"]) == ["0", "2"] and history[3]["accepted"] == [0, 2]
    if name == "node joins between rounds":
        assert history[1]["accepted"] == [0, 1] and history[2]["accepted"] == [0, 1, 2]
        assert "device 2 joined" in history[2]["events"][0]["reason"]
    if name == "budget drops":
        event = history[2]["events"][0]
        assert "device 2 budget fell to 3.8 MB" in event["reason"]  # 3.79, as the reason rounds it
        before, after = event["changed"]["2"]["from"], event["changed"]["2"]["to"]
        assert len(after) < len(before), (before, after)  # a smaller selection from the next round
        assert history[2]["plan"] != history[1]["plan"]
    if name == "below min-replies, retry succeeds":
        assert history[1]["attempts"] == 2 and history[1]["accepted"] == [0, 1, 2]
        assert history[1]["events"][0]["event"] == "retry"


def test_a_rejected_round_leaves_the_model_as_a_run_without_that_reply(tmp_path):
    """'No rejected update applied', exactly: a NaN reply gives the model of a run where it never arrived."""
    nan = next(s for s in SCENARIOS if s.name == "NaN in reply")
    dropped = next(s for s in SCENARIOS if s.name == "node times out or dies mid-round")
    from experiments.fault_matrix import Scenario

    def drop_device_2_round_2(partition, server_round, message, reply):  # a flwr_dsparse.testing.Fault
        return None if (partition, server_round) == (2, 2) else reply

    run_scenario(nan, tmp_path / "nan")
    run_scenario(Scenario("drop", drop_device_2_round_2), tmp_path / "drop")
    a, b = _final(tmp_path / "nan"), _final(tmp_path / "drop")
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert dropped  # (the matrix has the plain drop too)


def test_resume_in_process_is_bit_identical(tmp_path):
    from experiments.fault_matrix import run_restart_resume

    # Stops after round 2, then fresh nodes (new Contexts, nothing in context.state), as
    # after a server restart, resume to round 4; compared with an uninterrupted run.
    row = run_restart_resume(tmp_path)
    assert row["ok"], row
    assert row["outcome"] == "resumed at round 3; final model bit-identical"
    assert row["corrupt-applied"] == 0 and row["rounds-lost"] == 0


def test_corrupt_or_truncated_checkpoint_is_refused(tmp_path):
    path = save_checkpoint(tmp_path / "checkpoint.pt", {"round": 1, "global": {"w": torch.ones(3)}})
    assert load_checkpoint(path)["round"] == 1
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt.*refusing to resume"):
        load_checkpoint(path)
    flipped = bytearray(data)
    flipped[-10] ^= 0xFF
    path.write_bytes(bytes(flipped))
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(path)
    path.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="not a DSparse checkpoint"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        load_checkpoint(tmp_path / "none.pt")
    assert not list(tmp_path.glob(".checkpoint.pt.tmp-*"))  # the temp file was renamed away


def test_resume_from_a_corrupt_checkpoint_stops_before_training(tmp_path):
    from experiments.fault_matrix import Scenario, run_corrupt_checkpoint

    row = run_corrupt_checkpoint(tmp_path)
    assert row["ok"] and "truncated or corrupt" in row["stopped"] and "refusing to resume" in row["stopped"], row
    other = run_scenario(Scenario("none"), tmp_path / "b", **{"num-server-rounds": 1})
    assert other["ok"]
    row = run_scenario(Scenario("none"), tmp_path / "b", resume=True, lr=0.01)
    assert "another job: lr=0.05 there, 0.01 here" in row["stopped"]


class _NoTraining:
    """A grid that fails the test if anything reaches the nodes."""

    def get_node_ids(self):
        raise AssertionError("a bad config reached the nodes")

    send_and_receive = get_node_ids


@pytest.mark.parametrize(
    "key, value, words",
    [
        ("model", "resnet", ["model", "tiny"]),
        ("dataset", "mnist", ["dataset", "synthetic"]),
        ("batch-size", 0, ["batch-size", "> 0"]),
        ("lr", 0.0, ["lr", "> 0"]),
        ("sim-budgets-mb", "12,x", ["sim-budgets-mb", "'x'"]),
        ("min-replies", 0, ["min-replies", "> 0"]),
        ("transport", "mpi", ["transport", "server, collective"]),
        ("round-retries", -1, ["round-retries", ">= 0"]),
        ("collective-port", 70000, ["collective-port", "1..65535"]),
    ],
)
def test_config_errors_name_the_key_before_training(key, value, words):
    with pytest.raises(ValueError) as info:
        load_config({**SMALL_JOB, key: value})
    assert all(word in str(info.value) for word in words), str(info.value)


def test_missing_cifar_folder_and_budget_below_minimum_stop_before_training(tmp_path):
    from server.app import run_job

    config = load_config(
        {**SMALL_JOB, "dataset": "cifar10", "data-root": str(tmp_path / "nowhere"), "out-dir": str(tmp_path)}
    )
    with pytest.raises(FileNotFoundError, match="data-root"):
        run_job(_NoTraining(), config)  # type: ignore[arg-type]
    # A budget below the smallest selection: the planner stops the run at the query, before round 1.
    config = load_config({**SMALL_JOB, "sim-budgets-mb": "3.79,4.27,2", "out-dir": str(tmp_path / "b")})
    grid = LocalGrid(app, range(3), 3, fault=lambda *a: pytest.fail("training started"))
    with pytest.raises(ValueError, match="budget 2 MB for device 2 is below.*lower batch-size or raise memory-mb"):
        run_job(grid, config)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- real simulation

_SIM = """
import json, sys
from flwr.simulation import run_simulation
from client.app import app
from server.app import make_server_app
run_simulation(make_server_app(json.loads(sys.argv[1])), app, num_supernodes=3, backend_config={
    "client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": {"num_cpus": 3, "include_dashboard": False}})
"""


def _simulation(overrides: dict, log: Path) -> subprocess.Popen:
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "RAY_DEDUP_LOGS": "0"}
    return subprocess.Popen(
        [sys.executable, "-c", _SIM, json.dumps(overrides)],
        cwd=REPO,
        env=env,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def _kill_tree(process: subprocess.Popen) -> None:
    import psutil

    try:
        tree = [process.pid] + [child.pid for child in psutil.Process(process.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        tree = [process.pid]
    for pid in tree:  # kill -9, by pid: the server first, then what it started (Ray)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    process.wait(timeout=30)


# Two Ray simulations share the machine: a generous timeout for the nodes to start.
# checkpoint-every=1: a kill after any round resumes bit-identically only if that round's
# checkpoint holds the nodes' momentum (with N > 1 the rounds between hold older momentum).
SIM_JOB = {**SMALL_JOB, "num-server-rounds": 5, "local-steps": 3, "round-timeout": 240.0, "checkpoint-every": 1}


# The uninterrupted run's final model, from whichever durable copy ran first: both give the same
# model bit for bit (tests/test_node_state.py), and one reference run fewer saves a minute of CI.
_UNINTERRUPTED: dict[str, torch.Tensor] = {}


@pytest.mark.slow
def test_kill_9_mid_run_then_resume_is_bit_identical(tmp_path, durable_copy):
    whole, part = tmp_path / "whole", tmp_path / "part"
    reference = None if _UNINTERRUPTED else _simulation({**SIM_JOB, "out-dir": str(whole)}, tmp_path / "whole.log")
    victim = _simulation({**SIM_JOB, "out-dir": str(part)}, tmp_path / "part.log")
    try:
        deadline = time.monotonic() + 300
        killed_after = None
        while time.monotonic() < deadline and victim.poll() is None:
            checkpoint = part / "checkpoint.pt"
            if checkpoint.is_file():
                try:
                    done = load_checkpoint(checkpoint)["round"]
                except CheckpointError:
                    done = 0  # being replaced right now; the rename makes this impossible, but be safe
                if done >= 2:
                    _kill_tree(victim)
                    killed_after = done
                    break
            time.sleep(0.05)
        assert killed_after is not None and killed_after < SIM_JOB["num-server-rounds"], (
            tmp_path / "part.log"
        ).read_text()[-3000:]
        assert not (part / "final_model.pt").exists()
        if reference is not None:
            assert reference.wait(timeout=300) == 0, (tmp_path / "whole.log").read_text()[-3000:]
            _UNINTERRUPTED.update(_final(whole))
    finally:
        for process in (reference, victim):
            if process is not None and process.poll() is None:
                _kill_tree(process)
    resumed = _simulation({**SIM_JOB, "out-dir": str(part), "resume": True}, tmp_path / "resume.log")
    try:
        assert resumed.wait(timeout=300) == 0, (tmp_path / "resume.log").read_text()[-3000:]
    finally:
        if resumed.poll() is None:
            _kill_tree(resumed)
    assert "resumed from" in (tmp_path / "resume.log").read_text()
    a, b = _UNINTERRUPTED, _final(part)
    assert a and all(torch.equal(a[n], b[n]) for n in a), [n for n in a if not torch.equal(a[n], b[n])]
    rounds = json.loads((part / "metrics.json").read_text())["rounds"]
    assert [r["round"] for r in rounds] == list(range(SIM_JOB["num-server-rounds"] + 1))
