"""Who takes part: the round-0 query, nodes that join or leave, budgets that drop, re-planning.

Device ids in the Plan are partition ids (stable across runs); Flower node ids are random
per run, so :class:`Membership` keeps the node id to device id map beside the Plan.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from logging import INFO, WARNING
from typing import Any

import torch
from flwr.app import Message, MessageType
from flwr.serverapp import Grid
from flwr.supercore import log

from ..plan import Plan, format_plan
from ..protocol import DeviceReport, query_content, read_device_report
from .replies import reply_node, sent_message_ids

__all__ = ["Membership", "PlanFn", "RoundFailed"]

#: ``plan_fn(reports, global_tensors)``: the Plan for the nodes' query answers, scored on the
#: global model as it is now (the starting model in round 0, the trained one when re-scoring).
PlanFn = Callable[[Sequence[DeviceReport], Mapping[str, torch.Tensor]], Plan]


class RoundFailed(RuntimeError):
    """The run cannot go on (too few replies in every attempt, or no node left); it stops."""


class Membership:
    """The Plan, the nodes behind it, and how both change between rounds.

    Parameters
    ----------
    plan_fn : PlanFn
        Builds the Plan from the nodes' query answers.
    query_config : Mapping[str, Any]
        Sent with the query (what a node needs to answer).
    min_nodes : int
        Nodes to wait for before the query.
    settle_s : float
        After ``min_nodes`` connected, wait until the node count is stable this long.
    min_replies : int
        A plan with fewer devices than this cannot run a round (:class:`RoundFailed`).
    global_tensors : Callable[[], Mapping[str, torch.Tensor]]
        The global model as it is when a plan is made (handed to ``plan_fn``).
    """

    def __init__(
        self,
        plan_fn: PlanFn,
        query_config: Mapping[str, Any],
        *,
        min_nodes: int,
        settle_s: float,
        min_replies: int,
        global_tensors: Callable[[], Mapping[str, torch.Tensor]],
    ) -> None:
        self.plan_fn = plan_fn
        self.global_tensors = global_tensors
        self.query_config = dict(query_config)
        self.min_nodes = min_nodes
        self.settle_s = settle_s
        self.min_replies = min_replies
        self.plan: Plan | None = None
        self.reports: list[DeviceReport] = []
        self.node_to_device: dict[int, int] = {}
        self.budget_drops: dict[int, float] = {}

    def set_plan(self, plan: Plan, node_to_device: Mapping[int, int]) -> None:
        """Use ``plan`` from the next round; ``node_to_device`` maps Flower node ids to plan device ids."""
        unknown = sorted(set(node_to_device.values()) - set(plan.device_ids))
        if unknown:
            raise ValueError(
                f"devices {unknown} have nodes but are not in the plan (plan devices: {list(plan.device_ids)})"
            )
        if len(set(node_to_device.values())) != len(node_to_device):
            raise ValueError(f"two nodes claim the same device id: {dict(node_to_device)}")
        self.plan = plan
        self.node_to_device = dict(node_to_device)

    def log_plan(self, plan: Plan) -> None:
        for line in format_plan(plan, {r.device: r.budget_source for r in self.reports}).splitlines():
            log(INFO, "%s", line)

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

    def ask(self, grid: Grid, nodes: Sequence[int], timeout: float, *, strict: bool = True) -> list[DeviceReport]:
        """Send the memory query to ``nodes``; their reports, sorted by device.

        ``strict``: every node must answer well (round 0). Otherwise (a node joining
        later) a node that does not answer, or answers badly, is left out and logged.
        """
        content = query_content(self.query_config)
        messages = [Message(content, dst_node_id=node, message_type=MessageType.QUERY, group_id="0") for node in nodes]
        replies = list(grid.send_and_receive(messages, timeout=timeout))
        sent = sent_message_ids(messages)
        answered = {reply_node(reply, sent) for reply in replies}
        if strict and not answered >= set(nodes):
            raise TimeoutError(
                f"nodes {sorted(set(nodes) - answered)} did not answer the memory query within {timeout:.0f} s"
            )
        reports = []
        for reply in replies:
            try:
                reports.append(read_device_report(reply, reply_node(reply, sent)))
            except ValueError as error:
                if strict:
                    raise  # an unanswerable query (no budget) stops the run: training without a plan is meaningless
                log(WARNING, "membership: %s; the node is left out", error)
        return sorted(reports, key=lambda r: r.device)

    def make_plan(self, reports: Sequence[DeviceReport]) -> Plan:
        plan = self.plan_fn(reports, self.global_tensors())
        if len(plan.devices) < self.min_replies:
            raise RoundFailed(
                f"only {len(plan.devices)} devices can be planned (devices {list(plan.device_ids)}), below "
                f"min-replies={self.min_replies}; start more nodes or lower min-replies"
            )
        return plan

    def query(self, grid: Grid, timeout: float) -> Plan:
        """Round 0: ask every node for its budget, build the Plan, and log the ``dsparse plan`` table."""
        self.reports = self.ask(grid, self.wait_for_nodes(grid, timeout), timeout)
        plan = self.make_plan(self.reports)
        self.set_plan(plan, {report.node_id: report.device for report in self.reports})
        self.log_plan(plan)
        return plan

    def replan(self, reason: str, server_round: int) -> tuple[dict[str, Any], list[int]]:
        """Plan again from the current reports; returns the event and the devices that left the plan."""
        old = self.plan
        plan = self.make_plan(self.reports)
        self.set_plan(plan, {report.node_id: report.device for report in self.reports})
        dropped = sorted(set(old.device_ids if old else ()) - set(plan.device_ids))
        changes = {}
        for device in plan.devices:
            before = tuple(old.device(device.id).units) if old and device.id in old.device_ids else None
            if before != tuple(device.units):
                changes[str(device.id)] = {
                    "from": list(before) if before is not None else None,
                    "to": list(device.units),
                }
        event = {
            "round": server_round,
            "event": "replan",
            "reason": reason,
            "plan": plan.digest()[:12],
            "devices": list(plan.device_ids),
            "changed": changes,
        }
        log(
            WARNING,
            "re-plan before round %d (%s): devices %s, %d selection(s) changed",
            server_round,
            reason,
            list(plan.device_ids),
            len(changes),
        )
        self.log_plan(plan)
        return event, dropped

    def changes(self, grid: Grid, server_round: int, timeout: float) -> list[str]:
        """Compare the connected nodes with the plan and query newcomers; the reasons to re-plan."""
        nodes = set(grid.get_node_ids())
        left = sorted(node for node in self.node_to_device if node not in nodes)
        joined = sorted(node for node in nodes if node not in self.node_to_device)
        reasons = []
        if left:
            gone = sorted(self.node_to_device[node] for node in left)
            self.reports = [r for r in self.reports if r.node_id not in left]
            reasons.append(f"devices {gone} left")
        if joined:
            by_device = {r.device: r for r in self.reports}
            for report in self.ask(grid, joined, timeout, strict=False):
                if report.device in by_device:
                    log(
                        WARNING,
                        "membership: node %d claims device %d, which node %d holds; ignored",
                        report.node_id,
                        report.device,
                        by_device[report.device].node_id,
                    )
                    continue
                by_device[report.device] = report
                reasons.append(f"device {report.device} joined")
            self.reports = sorted(by_device.values(), key=lambda r: r.device)
        if self.budget_drops:
            drops = dict(self.budget_drops)
            self.budget_drops.clear()
            self.reports = [
                DeviceReport(r.node_id, r.device, drops[r.device], r.batch_size, r.num_examples, r.budget_source)
                if r.device in drops
                else r
                for r in self.reports
            ]
            reasons.extend(f"device {d} budget fell to {mb:.1f} MB" for d, mb in sorted(drops.items()))
        if reasons and not self.reports:
            raise RoundFailed(f"no nodes left before round {server_round} ({'; '.join(reasons)}); start SuperNodes")
        return reasons

    def note_budget(self, device: int, metrics: Mapping[str, Any]) -> None:
        """A reported budget below what the device's selection needs re-plans it next round."""
        budget = metrics.get("budget-mb")
        if not isinstance(budget, (int, float)) or isinstance(budget, bool) or self.plan is None:
            return
        planned = self.plan.device(device)
        needed = planned.predicted_mb.total if planned.predicted_mb is not None else planned.budget_mb
        if float(budget) < needed:
            log(
                WARNING,
                "device %d reports %.1f MB, below the %.1f MB its selection needs: re-plan next round",
                device,
                budget,
                needed,
            )
            self.budget_drops[device] = float(budget)
