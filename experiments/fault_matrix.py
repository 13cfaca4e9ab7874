"""The fault matrix: inject each fault into a short DSparse run and print what happened.

``python -m experiments.fault_matrix [--json PATH]`` prints one row per fault: the
outcome, the rounds lost (rounds of the run that were never applied; 0 unless the run
stops as documented) and the corrupt updates applied (rejected or faulty replies that
reached the global model: always 0).

The runs use :class:`LocalGrid`: Flower's ``Grid`` interface answered in this process by
the real ClientApp handlers (``client.app.query`` / ``client.app.train``) with one
``Context`` per node, the real strategy and the real ServerApp job (``server.app.run_job``).
It exists because Flower's simulation has a fixed node set (no node can join, leave or
die), and a Ray start per fault would take minutes on a small machine. What it does not
exercise is the transport: tests/test_faults.py also runs faults through
``flwr.simulation.run_simulation`` and kills a real server process, and
:func:`run_supernode_kill` (``--deployment``, about 2.5 min per transport) kills a real
SuperNode of a loopback deployment mid-round.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from flwr.app import Error, Message

from flwr_dsparse.protocol import ARRAYS, METRICS, NODE_PARTITION_ID, REPORT_ROUND_KEY
from flwr_dsparse.testing import Fault, LocalGrid

__all__ = ["LocalGrid", "Fault", "SCENARIOS", "run_scenario", "run_supernode_kill", "main", "SMALL_JOB"]

# Tiny model, 3 nodes, 4 rounds: seconds per scenario.
SMALL_JOB: dict[str, Any] = {
    "model": "tiny",
    "batch-size": 16,
    "local-steps": 2,
    "lr": 0.05,
    "momentum": 0.9,
    "train-examples": 480,
    "test-examples": 64,
    "num-server-rounds": 4,
    "min-nodes": 3,
    "sim-budgets-mb": "3.79,4.27,7.72",
    "round-timeout": 30.0,
    # The faults need these budgets' exact selections (device 2 trains units of its own); the
    # memory-only plan gives them deterministically (the balanced one depends on timed steps).
    "plan-objective": "criticality",
}


# -- the faults -----------------------------------------------------------------------------------
def _train_reply(
    partition: int, server_round: int, target: tuple[int, int], change: Callable[[Message, Message], Any]
) -> Fault:
    def fault(p: int, r: int, message: Message, reply: Message) -> Any:
        return change(message, reply) if (p, r) == target else reply

    return fault


def _raise(message: Message, reply: Message) -> Message:
    return Message(Error(code=0, reason="ClientApp raised: RuntimeError('injected fault')"), reply_to=message)


def _tensor_fault(kind: str) -> Callable[[Message, Message], Message]:
    def change(message: Message, reply: Message) -> Message:
        from flwr_dsparse.records import from_array_record, to_array_record

        tensors = from_array_record(reply.content[ARRAYS])
        name = next(n for n, t in tensors.items() if t.is_floating_point() and t.numel() > 1)
        if kind == "nan":
            tensors[name] = tensors[name].clone()
            tensors[name].view(-1)[0] = float("nan")
        elif kind == "inf":
            tensors[name] = torch.full_like(tensors[name], float("inf"))
        elif kind == "shape":
            tensors[name] = torch.zeros(tensors[name].numel() + 1)
        elif kind == "dtype":
            tensors[name] = tensors[name].half()  # smaller, so the dtype check (not the size check) fires
        elif kind == "oversize":
            tensors["padding"] = torch.zeros(1 << 20)  # 4 MiB outside the selection
        elif kind == "extra-key":
            tensors["features.0.0.weight"] = torch.zeros(1)
        reply.content[ARRAYS] = to_array_record(tensors)
        return reply

    return change


def _stale(message: Message, reply: Message) -> Message:
    reply.content[METRICS][REPORT_ROUND_KEY] = int(reply.content[METRICS][REPORT_ROUND_KEY]) - 1
    return reply


def _duplicate(message: Message, reply: Message) -> list[Message]:
    return [reply, Message(reply.content.copy() if hasattr(reply.content, "copy") else reply.content, reply_to=message)]


def _budget_drop(mb: float) -> Fault:
    def fault(p: int, r: int, message: Message, reply: Message) -> Message:
        if p == 2 and r >= 2 and not reply.has_error():
            reply.content[METRICS]["budget-mb"] = mb
        return reply

    return fault


@dataclass
class Scenario:
    name: str
    fault: Fault | None = None
    membership: Callable[[int], Iterable[int]] | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    expect_stop: str | None = None  # the documented message (a substring) when the run must stop
    corrupt_device_round: tuple[int, int] | None = None  # a reply that must never be applied


def _drop_round(target: tuple[int, int]) -> Fault:
    return _train_reply(*target, target=target, change=lambda message, reply: None)


SCENARIOS: list[Scenario] = [
    Scenario("none"),
    Scenario("node raises mid-round", _train_reply(1, 2, (1, 2), _raise), corrupt_device_round=(1, 2)),
    Scenario("node times out or dies mid-round", _drop_round((0, 2))),
    Scenario("node leaves between rounds", membership=lambda r: [0, 1, 2] if r < 3 else [0, 2]),
    Scenario(
        "node joins between rounds", membership=lambda r: [0, 1] if r < 3 else [0, 1, 2], overrides={"min-nodes": 2}
    ),
    Scenario("budget drops", _budget_drop(3.79)),
    Scenario("NaN in reply", _train_reply(2, 2, (2, 2), _tensor_fault("nan")), corrupt_device_round=(2, 2)),
    Scenario("Inf in reply", _train_reply(2, 3, (2, 3), _tensor_fault("inf")), corrupt_device_round=(2, 3)),
    Scenario("wrong shape", _train_reply(1, 2, (1, 2), _tensor_fault("shape")), corrupt_device_round=(1, 2)),
    Scenario("wrong dtype", _train_reply(1, 2, (1, 2), _tensor_fault("dtype")), corrupt_device_round=(1, 2)),
    Scenario("unexpected key", _train_reply(1, 2, (1, 2), _tensor_fault("extra-key")), corrupt_device_round=(1, 2)),
    Scenario("oversize payload", _train_reply(1, 2, (1, 2), _tensor_fault("oversize")), corrupt_device_round=(1, 2)),
    Scenario("stale-round reply", _train_reply(1, 2, (1, 2), _stale), corrupt_device_round=(1, 2)),
    Scenario("duplicate replies", _train_reply(1, 2, (1, 2), _duplicate), corrupt_device_round=(1, 2)),
    Scenario(
        "below min-replies, retry succeeds",
        lambda p, r, m, reply: None if (r == 2 and p != 0 and _first_attempt(p, r)) else reply,
        overrides={"min-replies": 3},
    ),
    Scenario(
        "below min-replies every attempt",
        lambda p, r, m, reply: None if (r == 3 and p == 1) else reply,
        overrides={"min-replies": 3, "round-retries": 1},
        expect_stop="fewer than min-replies=3",
    ),
]

_ATTEMPTS: dict[tuple[int, int], int] = {}


def _first_attempt(partition: int, server_round: int) -> bool:
    _ATTEMPTS[(partition, server_round)] = _ATTEMPTS.get((partition, server_round), 0) + 1
    return _ATTEMPTS[(partition, server_round)] == 1


def _grid_for(scenario: Scenario, job: Mapping[str, Any]) -> LocalGrid:
    count = len(str(job["sim-budgets-mb"]).split(","))
    partitions = list(scenario.membership(1)) if scenario.membership else list(range(count))
    from client.app import app

    return LocalGrid(app, partitions, count, fault=scenario.fault, membership=scenario.membership)


def run_scenario(scenario: Scenario, out_dir: Path, **extra: Any) -> dict[str, Any]:
    """Run one scenario through ``server.app.run_job``; return its row of the matrix."""
    from flwr_dsparse.config import load_config
    from server.app import run_job

    _ATTEMPTS.clear()
    job = {**SMALL_JOB, **scenario.overrides, **extra, "out-dir": str(out_dir)}
    config = load_config(job)
    grid = _grid_for(scenario, job)
    row: dict[str, Any] = {"fault": scenario.name}
    try:
        run_job(grid, config)  # type: ignore[arg-type]
        stopped = None
    except Exception as error:  # noqa: BLE001 - the documented stop is an outcome, anything else is a failure
        stopped = error
    metrics_path = out_dir / "metrics.json"
    rounds = json.loads(metrics_path.read_text())["rounds"] if metrics_path.is_file() and stopped is None else []
    if stopped is not None:
        from flwr_dsparse.checkpoint import CheckpointError, load_checkpoint

        try:
            history = load_checkpoint(out_dir / "checkpoint.pt")["history"]
        except CheckpointError:
            history = []
        done = len(history)
    else:
        history = [r for r in rounds if "devices" in r]
        done = len(history)
    expected_rounds = config.num_server_rounds
    row["stopped"] = str(stopped) if stopped is not None else ""
    row["ok"] = (stopped is None and scenario.expect_stop is None) or (
        stopped is not None and scenario.expect_stop is not None and scenario.expect_stop in str(stopped)
    )
    row["outcome"] = (
        f"stopped: {str(stopped)[:90]}" if stopped is not None else f"completed {done}/{expected_rounds} rounds"
    )
    row["rounds-lost"] = 0 if stopped is not None and scenario.expect_stop else expected_rounds - done
    corrupt = 0
    if scenario.corrupt_device_round is not None:
        device, server_round = scenario.corrupt_device_round
        entry = next((h for h in history if h["round"] == server_round), None)
        if entry is not None and device in entry["accepted"]:
            corrupt += 1
    final = out_dir / "final_model.pt"
    if final.is_file() and stopped is None:
        state = torch.load(final)
        corrupt += sum(1 for t in state.values() if t.is_floating_point() and not bool(torch.isfinite(t).all()))
    row["corrupt-applied"] = corrupt
    row["rejected"] = {k: v for h in history for k, v in h.get("rejected", {}).items()}
    row["missing"] = {h["round"]: h["missing"] for h in history if h.get("missing")}
    row["events"] = [e["event"] + ": " + e.get("reason", "")[:60] for h in history for e in h.get("events", [])]
    row["history"] = history
    return row


def run_restart_resume(work_dir: Path) -> dict[str, Any]:
    """The server stops after round 2 and a new one resumes: is the final model bit-identical?

    In-process (fresh node Contexts, as after a restart); the kill -9 of a real Ray
    simulation is ``tests/test_faults.py::test_kill_9_mid_run_then_resume_is_bit_identical``.
    """
    whole, part = Path(work_dir) / "whole", Path(work_dir) / "part"
    reference = run_scenario(Scenario("none"), whole)
    first = run_scenario(Scenario("none"), part, **{"num-server-rounds": 2})
    resumed = run_scenario(Scenario("none"), part, resume=True)
    a, b = torch.load(whole / "final_model.pt"), torch.load(part / "final_model.pt")
    differing = [name for name in a if not torch.equal(a[name], b[name])]
    rounds = [r["round"] for r in json.loads((part / "metrics.json").read_text())["rounds"]]
    ok = reference["ok"] and first["ok"] and resumed["ok"] and not differing and rounds == list(range(5))
    return {
        "fault": "server restarted, resume=true",
        "ok": ok,
        "outcome": "resumed at round 3; final model "
        + ("bit-identical" if not differing else f"{len(differing)} tensors differ"),
        "rounds-lost": 0 if rounds == list(range(5)) else 4,
        "corrupt-applied": len(differing),
    }


def run_corrupt_checkpoint(work_dir: Path) -> dict[str, Any]:
    """resume=true from a truncated checkpoint: refused before training, with a message."""
    run_scenario(Scenario("none"), Path(work_dir), **{"num-server-rounds": 1})
    checkpoint = Path(work_dir) / "checkpoint.pt"
    checkpoint.write_bytes(checkpoint.read_bytes()[:-100])
    row = run_scenario(Scenario("none", expect_stop="truncated or corrupt"), Path(work_dir), resume=True)
    outcome = "refused before training: truncated or corrupt" if row["ok"] else row["outcome"]
    return {
        "fault": "corrupt checkpoint, resume=true",
        "ok": row["ok"],
        "outcome": outcome,
        "stopped": row["stopped"],
        "rounds-lost": 0,
        "corrupt-applied": 0 if row["ok"] else 1,
    }


# -- the deployment case: a real SuperNode killed mid-round ----------------------------------------
# TinyNet at batch 16 (see tests/test_deployment.py): nested selections, and device 2 alone
# affords its earliest units, so a group of its own loses its only trainer.
KILL_BUDGETS_MB = (3.6, 3.79, 4.27)
KILL_JOB: dict[str, Any] = {
    "model": "tiny",
    "batch-size": 16,
    "local-steps": 100,
    "lr": 0.05,
    "train-examples": 600,
    "test-examples": 200,
    "method": "dsparse",
    "num-server-rounds": 3,
    "min-nodes": 3,
    "collective-timeout": 20.0,
    # The memory-only plan: the kill needs device 2 to train units of its own, which these budgets
    # give deterministically (the balanced plan's choice depends on timed steps).
    "plan-objective": "criticality",
    # Long enough for the SuperLink to declare the dead node offline (two missed 30 s
    # heartbeats), after which it answers the node's message with an error itself.
    "round-timeout": 150.0,
}


def _clientapps(record: Any) -> set[int]:
    """The ClientApp processes a SuperNode runs right now (one per message it is handling)."""
    import psutil

    try:
        children = psutil.Process(record.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return set()
    found = set()
    for child in children:
        try:
            if any("flwr-clientapp" in part for part in child.cmdline()):
                found.add(child.pid)
        except psutil.NoSuchProcess:
            pass
    return found


def _peer_connections(pids: set[int], node_port: int) -> int:
    """Established TCP connections of ``pids`` to anything but their SuperNode: the
    collective's store and its gloo pairs, once the ClientApp has joined the process groups."""
    import psutil

    count = 0
    for pid in pids:
        try:
            connections = psutil.Process(pid).net_connections(kind="tcp")
        except psutil.NoSuchProcess:
            continue
        count += sum(
            1 for c in connections if c.status == psutil.CONN_ESTABLISHED and c.raddr and c.raddr.port != node_port
        )
    return count


def _checkpoint_round(path: Path) -> int:
    from flwr_dsparse.checkpoint import CheckpointError, load_checkpoint

    try:
        return int(load_checkpoint(path)["round"]) if path.is_file() else 0
    except CheckpointError:
        return 0


def run_supernode_kill(
    work_dir: Path, *, transport: str = "collective", victim: int = 2, deployment: Any = None, timeout: float = 540.0
) -> dict[str, Any]:
    """kill -9 one SuperNode (and its ClientApp) during round 2 of a 3-node loopback deployment.

    Starts a SuperLink and three SuperNodes with :data:`KILL_BUDGETS_MB` (unless
    ``deployment`` is given: then the caller owns it), runs :data:`KILL_JOB` with
    ``transport``, waits for round 1's checkpoint and for the victim's round-2 ClientApp,
    kills the victim's whole process tree with SIGKILL, and lets the run finish. Returns
    the matrix row plus ``history`` (metrics.json's rounds), ``plan`` and ``before`` (the
    global model after round 1).

    ``corrupt-applied`` counts tensors that only the victim trains but that changed after
    round 1 (it was dead, so nothing may have moved them) and non-finite final tensors.
    """
    import shutil
    import threading

    from flwr_dsparse.checkpoint import load_checkpoint
    from flwr_dsparse.deploy import run_app, start_deployment, stop_deployment, stop_processes
    from flwr_dsparse.plan import Plan

    repo = Path(__file__).resolve().parents[1]
    work_dir = Path(work_dir)
    out = work_dir / f"kill-{transport}"
    owned = deployment is None
    if owned:
        deployment = start_deployment(
            len(KILL_BUDGETS_MB),
            memory_mb=list(KILL_BUDGETS_MB),
            port=None,
            home=work_dir / "flwr-home",
            state_dir=work_dir / f"state-{transport}",
            timeout=120.0,
        )
    row: dict[str, Any] = {"fault": f"SuperNode killed mid-round ({transport})"}
    try:
        record = next(node for node in deployment.supernodes if node.node_config[NODE_PARTITION_ID] == victim)
        run_config = {**KILL_JOB, "transport": transport, "out-dir": str(out)}
        finished: dict[str, Any] = {}
        runner = threading.Thread(
            daemon=True,
            target=lambda: finished.update(
                result=run_app(deployment, repo, run_config, timeout=timeout, log=work_dir / f"kill-{transport}.log")
            ),
        )
        runner.start()

        # Round 1 complete (its checkpoint is written), then the victim's round-2 ClientApp appears.
        checkpoint, after_round_1 = out / "checkpoint.pt", work_dir / f"after-round-1-{transport}.pt"
        deadline = time.monotonic() + timeout
        while _checkpoint_round(checkpoint) < 1:
            if not runner.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"round 1 never completed; see {work_dir / f'kill-{transport}.log'}")
            time.sleep(0.1)
        shutil.copy(checkpoint, after_round_1)
        stale = _clientapps(record)  # round 1's ClientApp, maybe still exiting
        while not (current := _clientapps(record) - stale):
            if not runner.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the victim never got its round-2 message")
            time.sleep(0.05)
        if transport == "collective":
            # Mid-collective: wait until it is connected to the store and both peers.
            while _peer_connections(current, record.port) < len(KILL_BUDGETS_MB):
                if not runner.is_alive() or time.monotonic() > deadline:
                    raise RuntimeError("the victim never joined the round-2 collective")
                time.sleep(0.02)
        else:
            time.sleep(3.0)  # into the round (imports, then the local steps)
        if _checkpoint_round(checkpoint) != 1 or _checkpoint_round(after_round_1) != 1:
            raise RuntimeError("round 2 ended before the victim was killed; raise local-steps")
        stop_processes([record], hard=True)
        row["killed-during-round"] = 2

        runner.join(timeout=timeout)
        if runner.is_alive():
            raise RuntimeError(f"the run hung after SuperNode {victim} was killed")
        result = finished["result"]
        row["returncode"] = result.returncode
        row["output-tail"] = (result.stdout + result.stderr)[-3000:]
    finally:
        if owned:
            stop_deployment(deployment)

    metrics_path = out / "metrics.json"
    history = json.loads(metrics_path.read_text())["rounds"] if metrics_path.is_file() else []
    history = [r for r in history if "devices" in r]
    saved = load_checkpoint(after_round_1)
    plan = Plan.from_json(saved["plan"])
    before = saved["global"]
    only_victim = [n for group in plan.groups if list(group.members) == [victim] for n in group.tensors]
    corrupt = 0
    final_path = out / "final_model.pt"
    if final_path.is_file():
        final = torch.load(final_path)
        corrupt += sum(1 for n in only_victim if not torch.equal(final[n], before[n]))
        corrupt += sum(1 for t in final.values() if t.is_floating_point() and not bool(torch.isfinite(t).all()))
        row["final"] = final
    done = len(history)
    row["ok"] = result.returncode == 0 and done == KILL_JOB["num-server-rounds"]
    row["outcome"] = (
        f"completed {done}/{KILL_JOB['num-server-rounds']} rounds, missing {history[1]['missing']} in round 2"
        if done >= 2
        else f"failed: exit {result.returncode}"
    )
    row["rounds-lost"] = KILL_JOB["num-server-rounds"] - done
    row["corrupt-applied"] = corrupt
    row.update(history=history, plan=plan, before=before, only_victim=only_victim)
    return row


def format_matrix(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'fault':<40} {'outcome':<48} {'rounds lost':>11} {'corrupt applied':>15}"]
    for row in rows:
        lines.append(
            f"{row['fault']:<40} {row['outcome'][:48]:<48} {row['rounds-lost']:>11} {row['corrupt-applied']:>15}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="also write the rows as JSON")
    parser.add_argument(
        "--deployment",
        action="store_true",
        help="also kill a real SuperNode mid-round in a loopback deployment, per transport (~2.5 min each)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for index, scenario in enumerate(SCENARIOS):
            rows.append(run_scenario(scenario, Path(tmp) / str(index)))
        rows.append(run_restart_resume(Path(tmp) / "restart"))
        rows.append(run_corrupt_checkpoint(Path(tmp) / "corrupt"))
        if args.deployment:
            for transport in ("server", "collective"):
                rows.append(run_supernode_kill(Path(tmp) / f"deploy-{transport}", transport=transport))
    print(format_matrix(rows))
    if args.json:
        kept = ("fault", "outcome", "ok", "rounds-lost", "corrupt-applied", "stopped", "rejected", "missing", "events")
        args.json.write_text(json.dumps([{k: r[k] for k in kept if k in r} for r in rows], indent=2, default=str))
    return 0 if all(row["ok"] and row["corrupt-applied"] == 0 for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
