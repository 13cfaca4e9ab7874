"""The DSparse strategy for Flower's Message API.

``DSparse`` runs one synchronous round as the Plan says:

* **round 0, the query:** every node reports its memory budget, batch size and
  example count; a plan function turns the reports into a :class:`~flwr_dsparse.plan.Plan`;
* **configure_train (Broadcast side):** each node gets its own ``Message`` with its
  selection (when it changed), the hyper-parameters, and only the tensors its replica
  lacks (versioned delta sync, :class:`~flwr_dsparse.exchange.TensorVersions`);
* **aggregate_train (AllReduce side):** each reply is checked, and each Plan group's
  tensors become the example-weighted mean over the members whose replies were
  accepted (:func:`~flwr_dsparse.exchange.aggregate_groups`). Everything else stays
  bit-identical, and the full global model is returned, because ``start()`` replaces it.

Device ids in the Plan are partition ids (stable across runs); Flower node ids are
random per run, so the strategy keeps a node id to device id map.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from logging import INFO, WARNING
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.serverapp.strategy.result import Result
from flwr.supercore import log

from .exchange import (
    REJECTION_KINDS,
    ReplyRejected,
    TensorVersions,
    Update,
    aggregate_groups,
    check_update,
    tensor_specs,
)
from .plan import Plan
from .records import from_array_record, record_nbytes, tensor_nbytes, to_array_record

__all__ = ["DSparse", "DeviceReport", "PlanFn", "device_tensors", "format_plan_table", "read_device_report"]

ARRAYS_KEY = "arrays"
CONFIG_KEY = "config"
METRICS_KEY = "metrics"


@dataclass(frozen=True)
class DeviceReport:
    """One node's answer to the round-0 query."""

    node_id: int
    device: int
    budget_mb: float
    batch_size: int
    num_examples: int
    budget_source: str = ""


PlanFn = Callable[[Sequence[DeviceReport]], Plan]


def read_device_report(message: Message) -> DeviceReport:
    """Parse a query reply; raise ``ValueError`` naming the node if it is malformed or an error."""
    node = message.metadata.src_node_id
    if message.has_error():
        raise ValueError(f"node {node} could not answer the memory query: {message.error.reason}")
    try:
        metrics = message.content[METRICS_KEY]
        config = message.content.config_records.get(CONFIG_KEY, ConfigRecord())
        return DeviceReport(
            node_id=node,
            device=int(metrics["partition-id"]),
            budget_mb=float(metrics["budget-mb"]),
            batch_size=int(metrics["batch-size"]),
            num_examples=int(metrics["num-examples"]),
            budget_source=str(config.get("budget-source", "")),
        )
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"node {node} sent a malformed query reply ({error!r})") from error


def device_tensors(plan: Plan, device: int) -> list[str]:
    """Parameters and buffers that ``device`` trains (BatchNorm statistics travel with their unit)."""
    return [name for group in plan.groups_of(device) for name in group.tensors]


def format_plan_table(plan: Plan, sources: Mapping[int, str] | None = None) -> str:
    """The ``dsparse plan`` table: one row per device, then the groups.

    ``sources`` maps a device id to where its budget came from (``node-config memory-mb``,
    ``sim-budgets-mb``, ``psutil …``); without it the column shows ``-``.
    """
    sources = sources or {}
    lines = [
        f"dsparse plan {plan.digest()[:12]}: {len(plan.devices)} devices, {len(plan.groups)} groups, "
        f"{len(plan.frozen_units)} units frozen for all",
        f"{'device':>6} {'budget MB':>10} {'pred MB':>8} {'batch':>5} {'units':>5}  {'budget source':<24} selection",
    ]
    for device in plan.devices:
        predicted = f"{device.predicted_mb.total:.1f}" if device.predicted_mb else "-"
        selection = ",".join(name.replace("features.", "f") for name in device.units) or "(inference only)"
        source = sources.get(device.id) or "-"
        lines.append(
            f"{device.id:>6} {device.budget_mb:>10.1f} {predicted:>8} {device.batch_size:>5} "
            f"{len(device.units):>5}  {source:<24} {selection}"
        )
    for index, group in enumerate(plan.groups):
        lines.append(
            f"group {index}: members {list(group.members)} units {list(group.units)} "
            f"fused {group.allreduce.bytes / 2**20:.2f} MiB"
        )
    return "\n".join(lines)


class DSparse(Strategy):
    """DSparse: each device trains the units that fit its memory; each tensor is averaged
    only over the devices that trained it.

    Parameters
    ----------
    plan_fn : PlanFn
        Builds the Plan from the nodes' query answers (``Sequence[DeviceReport]``),
        e.g. :func:`flwr_dsparse.planner.make_plan` behind a cost model.
    train_config : Mapping[str, Any], optional
        Hyper-parameters sent with every train message (``lr``, ``momentum``,
        ``local-steps`` …); the ``config`` argument of ``start()`` is merged on top.
    query_config : Mapping[str, Any], optional
        Sent with the round-0 query (what a node needs to answer: data, batch size,
        simulated budgets).
    min_nodes : int (default: 2)
        Nodes to wait for before the query.
    settle_s : float (default: 1.0)
        After ``min_nodes`` connected, wait until the node count is stable this long,
        so that nodes which connect together all get a plan.
    """

    def __init__(
        self,
        *,
        plan_fn: PlanFn,
        train_config: Mapping[str, Any] | None = None,
        query_config: Mapping[str, Any] | None = None,
        min_nodes: int = 2,
        settle_s: float = 1.0,
    ) -> None:
        if min_nodes < 1:
            raise ValueError(f"min_nodes must be >= 1, got {min_nodes}")
        self.plan_fn = plan_fn
        self.train_config = dict(train_config or {})
        self.query_config = dict(query_config or {})
        self.min_nodes = min_nodes
        self.settle_s = settle_s
        self.plan: Plan | None = None
        self.reports: list[DeviceReport] = []
        self.node_to_device: dict[int, int] = {}
        self.versions: TensorVersions | None = None
        self.history: list[dict[str, Any]] = []
        self.rejections: Counter[str] = Counter()
        self._global: dict[str, torch.Tensor] = {}
        self._sent_selection: dict[int, tuple[str, ...]] = {}
        self._round: dict[str, Any] = {}

    # -- plan ----------------------------------------------------------------------------------------
    def summary(self) -> None:
        """Log the strategy's configuration and its plan."""
        log(INFO, "\t├──> DSparse: synchronous grouped aggregation, versioned delta sync")
        log(INFO, "\t│\t├── Train config: %s", self.train_config or "(empty)")
        log(INFO, "\t│\t└── Minimum nodes: %d", self.min_nodes)
        if self.plan is None:
            log(INFO, "\t└──> Plan: not built yet (round-0 query pending)")
            return
        log(INFO, "\t└──> Plan %s: %d devices, %d groups", self.plan.digest()[:12], len(self.plan.devices), len(self.plan.groups))

    def set_plan(self, plan: Plan, node_to_device: Mapping[int, int]) -> None:
        """Use ``plan`` from the next round; ``node_to_device`` maps Flower node ids to plan device ids."""
        unknown = sorted(set(node_to_device.values()) - set(plan.device_ids))
        if unknown:
            raise ValueError(f"devices {unknown} have nodes but are not in the plan (plan devices: {list(plan.device_ids)})")
        if len(set(node_to_device.values())) != len(node_to_device):
            raise ValueError(f"two nodes claim the same device id: {dict(node_to_device)}")
        self.plan = plan
        self.node_to_device = dict(node_to_device)

    def wait_for_nodes(self, grid: Grid, timeout: float) -> list[int]:
        """Node ids once ``min_nodes`` are connected and the count has settled."""
        deadline = time.monotonic() + timeout
        while len(nodes := sorted(grid.get_node_ids())) < self.min_nodes:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"only {len(nodes)} of the {self.min_nodes} nodes (min-nodes) connected within {timeout:.0f} s; "
                    "start more SuperNodes or lower min-nodes"
                )
            time.sleep(0.2)
        stable_since = time.monotonic()
        while time.monotonic() - stable_since < self.settle_s:
            time.sleep(0.1)
            now = sorted(grid.get_node_ids())
            if now != nodes:
                nodes, stable_since = now, time.monotonic()
        return nodes

    def query(self, grid: Grid, timeout: float = 600.0) -> Plan:
        """Round 0: ask every node for its budget, build the Plan, and log the ``dsparse plan`` table."""
        nodes = self.wait_for_nodes(grid, timeout)
        content = RecordDict({CONFIG_KEY: ConfigRecord(dict(self.query_config))})
        messages = [Message(content, dst_node_id=node, message_type=MessageType.QUERY, group_id="0") for node in nodes]
        replies = list(grid.send_and_receive(messages, timeout=timeout))
        answered = {reply.metadata.src_node_id for reply in replies}
        if not answered >= set(nodes):
            raise TimeoutError(f"nodes {sorted(set(nodes) - answered)} did not answer the memory query within {timeout:.0f} s")
        # An unanswerable query (no budget) stops the run: training without a plan is meaningless.
        reports = sorted((read_device_report(reply) for reply in replies), key=lambda r: r.device)
        self.reports = reports
        plan = self.plan_fn(reports)
        self.set_plan(plan, {report.node_id: report.device for report in reports})
        for line in format_plan_table(plan, {r.device: r.budget_source for r in reports}).splitlines():
            log(INFO, "%s", line)
        return plan

    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
    ) -> Result:
        """Run the round-0 query (unless a plan was set), then Flower's round loop."""
        if self.plan is None:
            self.query(grid, timeout=timeout)
        return super().start(
            grid,
            initial_arrays,
            num_rounds=num_rounds,
            timeout=timeout,
            train_config=train_config,
            evaluate_config=evaluate_config,
            evaluate_fn=evaluate_fn,
        )

    # -- train ---------------------------------------------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        """One message per planned node: its selection if changed, hyper-parameters, missing tensors."""
        if self.plan is None:
            raise RuntimeError("DSparse has no plan: call start() (which runs the query) or set_plan() first")
        started = time.perf_counter()
        self._global = from_array_record(arrays)
        if self.versions is None:
            self.versions = TensorVersions(self._global)
        elif list(self._global) != self.versions.names:
            raise ValueError("the global model's tensors changed between rounds; DSparse needs one fixed model")
        messages = []
        bytes_down: dict[int, int] = {}
        for node, device in sorted(self.node_to_device.items(), key=lambda item: item[1]):
            plan_device = self.plan.device(device)
            send = self.versions.missing(device)
            payload = {name: self._global[name] for name in send}
            train_config = ConfigRecord({**self.train_config, **dict(config), "server-round": server_round, "method": "dsparse"})
            if self._sent_selection.get(device) != plan_device.units:
                train_config["selection"] = ",".join(plan_device.units)
            content = RecordDict({ARRAYS_KEY: to_array_record(payload), CONFIG_KEY: train_config})
            messages.append(Message(content, dst_node_id=node, message_type=MessageType.TRAIN, group_id=str(server_round)))
            # Optimistic: assume delivery. A node that fails is forgotten in aggregate_train.
            self.versions.mark_held(device, send)
            self._sent_selection[device] = plan_device.units
            bytes_down[device] = tensor_nbytes(payload)
        self._round = {"round": server_round, "started": started, "bytes-down": bytes_down, "sent": set(bytes_down)}
        log(INFO, "configure_train: %d nodes, %.2f MiB down in total", len(messages), sum(bytes_down.values()) / 2**20)
        return messages

    def _accept(self, server_round: int, message: Message, device: int) -> tuple[Update, dict[str, float]]:
        """Check one reply and return its update and metrics, or raise ReplyRejected."""
        group_id = message.metadata.group_id
        if group_id and group_id != str(server_round):
            raise ReplyRejected("stale-round", f"device {device} replied for round {group_id} during round {server_round}")
        content = message.content
        if set(content.array_records) != {ARRAYS_KEY} or METRICS_KEY not in content.metric_records:
            raise ReplyRejected(
                "malformed",
                f"device {device} replied with records {sorted(content.keys())}; expected '{ARRAYS_KEY}' and '{METRICS_KEY}'",
            )
        metrics = {key: value for key, value in content[METRICS_KEY].items()}
        if metrics.get("server-round") != server_round:
            raise ReplyRejected(
                "stale-round", f"device {device} reported server-round {metrics.get('server-round')!r} during round {server_round}"
            )
        assert self.plan is not None
        expected = tensor_specs({name: self._global[name] for name in device_tensors(self.plan, device)})
        try:
            tensors = from_array_record(content[ARRAYS_KEY])
        except Exception as error:  # an undecodable payload is a bad reply, not a crash
            raise ReplyRejected("malformed", f"device {device} sent arrays that do not decode ({error!r})") from error
        update = check_update(device, tensors, metrics.get("num-examples"), expected)
        return update, metrics

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Grouped example-weighted mean over accepted replies; returns the full global model."""
        if self.plan is None or self.versions is None:
            raise RuntimeError("aggregate_train before configure_train")
        replies = list(replies)
        # Sort by device id so sums and logs do not depend on arrival order.
        replies.sort(key=lambda m: (self.node_to_device.get(m.metadata.src_node_id, 1 << 62), m.metadata.src_node_id))
        per_node = Counter(m.metadata.src_node_id for m in replies)
        updates: dict[int, Update] = {}
        devices: dict[int, dict[str, Any]] = {}
        rejected: Counter[str] = Counter()
        failed: set[int] = set()
        replied: set[int] = set()
        for message in replies:
            node = message.metadata.src_node_id
            device = self.node_to_device.get(node)
            if device is None:
                rejected["unknown-node"] += 1
                log(WARNING, "aggregate_train: rejected a reply from node %d, which is not in the plan", node)
                continue
            row = devices.setdefault(device, {"status": "ok"})
            if message.has_error():
                failed.add(device)
                row["status"] = "missing"
                row["error"] = message.error.reason
                log(WARNING, "aggregate_train: device %d failed: %s", device, message.error.reason)
                continue
            replied.add(device)
            row["bytes-up"] = row.get("bytes-up", 0) + _safe_nbytes(message)
            try:
                if per_node[node] > 1:
                    # Which of two replies is genuine cannot be told, so neither is applied.
                    raise ReplyRejected("duplicate", f"device {device} sent {per_node[node]} replies in round {server_round}")
                update, metrics = self._accept(server_round, message, device)
            except ReplyRejected as rejection:
                rejected[rejection.kind] += 1
                row["status"] = f"rejected:{rejection.kind}"
                updates.pop(device, None)
                log(WARNING, "aggregate_train: rejected reply: %s", rejection)
                continue
            updates[device] = update
            row.update({key: float(value) for key, value in metrics.items() if isinstance(value, (int, float))})

        agg_started = time.perf_counter()
        new = aggregate_groups(self.plan.groups, updates)
        self._global.update(new)
        self.versions.bump(new, server_round)
        aggregation_s = time.perf_counter() - agg_started
        self._update_held(updates, replied, failed)
        self.rejections.update(rejected)

        sent = self._round.get("sent", set()) if self._round.get("round") == server_round else set()
        for device in sent:
            if device not in devices:
                devices[device] = {"status": "missing", "error": "no reply before the timeout"}
        bytes_down = self._round.get("bytes-down", {}) if self._round.get("round") == server_round else {}
        for device, row in devices.items():
            row["bytes-down"] = bytes_down.get(device, 0)
            row.setdefault("bytes-up", 0)
        examples = sum(u.examples for u in updates.values())
        train_loss = (
            sum(devices[d].get("train-loss", 0.0) * u.examples for d, u in updates.items()) / examples if examples else float("nan")
        )
        started = self._round.get("started", agg_started)
        entry = {
            "round": server_round,
            "train-loss": train_loss,
            "num-examples": examples,
            "accepted": sorted(updates),
            "missing": sorted(d for d, r in devices.items() if r["status"] == "missing"),
            "rejected": dict(rejected),
            "updated-tensors": len(new),
            "aggregation-seconds": aggregation_s,
            "round-seconds": time.perf_counter() - started,
            "bytes-up": sum(r["bytes-up"] for r in devices.values()),
            "bytes-down": sum(r["bytes-down"] for r in devices.values()),
            "devices": {str(d): devices[d] for d in sorted(devices)},
        }
        self.history.append(entry)
        log(
            INFO,
            "aggregate_train: %d accepted, %d missing, %d rejected; %d tensors updated in %.3f s",
            len(updates),
            len(entry["missing"]),
            sum(rejected.values()),
            len(new),
            aggregation_s,
        )
        metrics = MetricRecord(
            {
                "train-loss": train_loss if examples else 0.0,
                "num-examples": examples,
                "num-accepted": len(updates),
                "num-missing": len(entry["missing"]),
                "num-rejected": sum(rejected.values()),
                "bytes-up": entry["bytes-up"],
                "bytes-down": entry["bytes-down"],
                "aggregation-seconds": aggregation_s,
                **{f"rejected-{kind}": rejected[kind] for kind in REJECTION_KINDS if rejected[kind]},
            }
        )
        return to_array_record(self._global), metrics

    def _update_held(self, updates: Mapping[int, Update], replied: set[int], failed: set[int]) -> None:
        """What each replica holds after the round.

        A device that trained has its own local values for its selection, which match no
        global version, unless it was the only accepted member of a group: then the
        group mean is exactly its values. A device that failed may have lost its replica
        (a restarted node), so it is sent everything next time.
        """
        assert self.plan is not None and self.versions is not None
        for device in failed:
            self.versions.forget(device)
        for device in replied - failed:
            self.versions.mark_diverged(device, device_tensors(self.plan, device))
        for group in self.plan.groups:
            members = [d for d in group.members if d in updates]
            if len(members) == 1:
                self.versions.mark_held(members[0], group.tensors)
        for device in self._round.get("sent", set()) - replied - failed:
            self.versions.forget(device)  # no answer at all: its state is unknown

    # -- evaluate: centralized only (evaluate_fn) ------------------------------------------------------
    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        """No federated evaluation: DSparse evaluates centrally through ``evaluate_fn``."""
        return []

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Nothing to aggregate (see :meth:`configure_evaluate`)."""
        return None

    @property
    def global_tensors(self) -> dict[str, torch.Tensor]:
        """The global model after the last aggregation."""
        return dict(self._global)


def _safe_nbytes(message: Message) -> int:
    try:
        return sum(record_nbytes(record) for record in message.content.array_records.values())
    except Exception:  # a payload that does not decode still arrived; count what can be counted
        return 0
