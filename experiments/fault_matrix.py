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
``flwr.simulation.run_simulation`` and kills a real server process.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch
from flwr.app import ArrayRecord, Context, Error, Message, MessageType, RecordDict

__all__ = ["LocalGrid", "Fault", "SCENARIOS", "run_scenario", "main", "SMALL_JOB"]

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
    "sim-budgets-mb": "12.5,13.7,18",
    "round-timeout": 30.0,
}

# fault(partition, server_round, message, reply) -> reply, None (no reply: a timeout or a
# dead node) or a list of replies (duplicates).
Fault = Callable[[int, int, Message, Message], Any]


@dataclass
class _Node:
    node_id: int
    partition: int
    context: Context


class LocalGrid:
    """Flower's Grid, answered in-process by the real ClientApp handlers, one Context per node.

    ``fault`` may change, drop or duplicate a train reply; ``membership(round)`` may
    return the partitions connected before that round (nodes leaving and joining).
    """

    def __init__(self, partitions: Iterable[int], num_partitions: int, *, node_config: Mapping | None = None,
                 fault: Fault | None = None, membership: Callable[[int], Iterable[int]] | None = None) -> None:
        self.num_partitions = num_partitions
        self.node_config = dict(node_config or {})
        self.fault = fault
        self.membership = membership
        self.nodes: dict[int, _Node] = {}
        self._next_round = 1
        # Messages are built outside a running app: give them the task identity an app would have.
        from flwr.supercore.task_identity import TaskIdentity

        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
        for partition in partitions:
            self.connect(partition)

    def connect(self, partition: int) -> int:
        node_id = 1000 + partition + 100 * len(self.nodes)  # a new id for every (re)connection
        config = {"partition-id": partition, "num-partitions": self.num_partitions, **self.node_config.get(partition, {})}
        self.nodes[node_id] = _Node(node_id, partition, Context(1, node_id, config, RecordDict(), {}))
        return node_id

    def disconnect(self, partition: int) -> None:
        for node_id in [n for n, node in self.nodes.items() if node.partition == partition]:
            del self.nodes[node_id]

    # -- the Grid methods DSparse uses ---------------------------------------------------------
    def get_node_ids(self) -> list[int]:
        if self.membership is not None:
            wanted = set(self.membership(self._next_round))
            for partition in {n.partition for n in self.nodes.values()} - wanted:
                self.disconnect(partition)
            for partition in wanted - {n.partition for n in self.nodes.values()}:
                self.connect(partition)
        return sorted(self.nodes)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        from client.app import query, train

        replies: list[Message] = []
        for message in messages:
            node = self.nodes.get(message.metadata.dst_node_id)
            if node is None:
                continue  # a node that is gone never answers
            handler = query if message.metadata.message_type == MessageType.QUERY else train
            try:
                reply = handler(message, node.context)
            except Exception as error:  # what Flower does with a raising ClientApp: an error reply
                reply = Message(Error(code=0, reason=f"ClientApp raised: {error!r}"), reply_to=message)
            if message.metadata.message_type == MessageType.TRAIN:
                server_round = int(message.metadata.group_id)
                self._next_round = server_round + 1
                if self.fault is not None:
                    reply = self.fault(node.partition, server_round, message, reply)
            if reply is None:
                continue
            replies.extend(reply if isinstance(reply, list) else [reply])
        return replies


# -- the faults -----------------------------------------------------------------------------------
def _train_reply(partition: int, server_round: int, target: tuple[int, int], change: Callable[[Message, Message], Any]) -> Fault:
    def fault(p: int, r: int, message: Message, reply: Message) -> Any:
        return change(message, reply) if (p, r) == target else reply

    return fault


def _raise(message: Message, reply: Message) -> Message:
    return Message(Error(code=0, reason="ClientApp raised: RuntimeError('injected fault')"), reply_to=message)


def _tensor_fault(kind: str) -> Callable[[Message, Message], Message]:
    def change(message: Message, reply: Message) -> Message:
        from flwr_dsparse.records import from_array_record, to_array_record

        tensors = from_array_record(reply.content["arrays"])
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
        reply.content["arrays"] = to_array_record(tensors)
        return reply

    return change


def _stale(message: Message, reply: Message) -> Message:
    reply.content["metrics"]["server-round"] = int(reply.content["metrics"]["server-round"]) - 1
    return reply


def _duplicate(message: Message, reply: Message) -> list[Message]:
    return [reply, Message(reply.content.copy() if hasattr(reply.content, "copy") else reply.content, reply_to=message)]


def _budget_drop(mb: float) -> Fault:
    def fault(p: int, r: int, message: Message, reply: Message) -> Message:
        if p == 2 and r >= 2 and not reply.has_error():
            reply.content["metrics"]["budget-mb"] = mb
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
    Scenario("node joins between rounds", membership=lambda r: [0, 1] if r < 3 else [0, 1, 2],
             overrides={"min-nodes": 2}),
    Scenario("budget drops", _budget_drop(12.5)),
    Scenario("NaN in reply", _train_reply(2, 2, (2, 2), _tensor_fault("nan")), corrupt_device_round=(2, 2)),
    Scenario("Inf in reply", _train_reply(2, 3, (2, 3), _tensor_fault("inf")), corrupt_device_round=(2, 3)),
    Scenario("wrong shape", _train_reply(1, 2, (1, 2), _tensor_fault("shape")), corrupt_device_round=(1, 2)),
    Scenario("wrong dtype", _train_reply(1, 2, (1, 2), _tensor_fault("dtype")), corrupt_device_round=(1, 2)),
    Scenario("unexpected key", _train_reply(1, 2, (1, 2), _tensor_fault("extra-key")), corrupt_device_round=(1, 2)),
    Scenario("oversize payload", _train_reply(1, 2, (1, 2), _tensor_fault("oversize")), corrupt_device_round=(1, 2)),
    Scenario("stale-round reply", _train_reply(1, 2, (1, 2), _stale), corrupt_device_round=(1, 2)),
    Scenario("duplicate replies", _train_reply(1, 2, (1, 2), _duplicate), corrupt_device_round=(1, 2)),
    Scenario("below min-replies, retry succeeds",
             lambda p, r, m, reply: None if (r == 2 and p != 0 and _first_attempt(p, r)) else reply,
             overrides={"min-replies": 3}),
    Scenario("below min-replies every attempt", lambda p, r, m, reply: None if (r == 3 and p == 1) else reply,
             overrides={"min-replies": 3, "round-retries": 1}, expect_stop="fewer than min-replies=3"),
]

_ATTEMPTS: dict[tuple[int, int], int] = {}


def _first_attempt(partition: int, server_round: int) -> bool:
    _ATTEMPTS[(partition, server_round)] = _ATTEMPTS.get((partition, server_round), 0) + 1
    return _ATTEMPTS[(partition, server_round)] == 1


def _grid_for(scenario: Scenario, job: Mapping[str, Any]) -> LocalGrid:
    count = len(str(job["sim-budgets-mb"]).split(","))
    partitions = list(scenario.membership(1)) if scenario.membership else list(range(count))
    return LocalGrid(partitions, count, fault=scenario.fault, membership=scenario.membership)


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
    row["outcome"] = (f"stopped: {str(stopped)[:90]}" if stopped is not None else
                      f"completed {done}/{expected_rounds} rounds")
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


def format_matrix(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'fault':<36} {'outcome':<44} {'rounds lost':>11} {'corrupt applied':>15}"]
    for row in rows:
        lines.append(f"{row['fault']:<36} {row['outcome'][:44]:<44} {row['rounds-lost']:>11} {row['corrupt-applied']:>15}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="also write the rows as JSON")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for index, scenario in enumerate(SCENARIOS):
            rows.append(run_scenario(scenario, Path(tmp) / str(index)))
    print(format_matrix(rows))
    if args.json:
        args.json.write_text(json.dumps([{k: v for k, v in r.items() if k != "history"} for r in rows], indent=2, default=str))
    return 0 if all(row["ok"] and row["corrupt-applied"] == 0 for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
