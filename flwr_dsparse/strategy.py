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

Reliability (:meth:`DSparse.start` runs its own round loop for it):

* a round needs ``min_replies`` accepted replies; below that nothing is applied, the
  round is retried up to ``round_retries`` times, then the run stops with
  :class:`RoundFailed` (never a silently skipped round);
* before each round the node set is compared with the plan: nodes that left are
  dropped, new nodes are queried, and the devices are re-planned (logged, recorded in
  the round's ``events``);
* every train reply carries the node's current ``budget-mb``; a budget below what the
  device's selection needs re-plans it from the next round;
* with ``keep_client_state`` the nodes return their optimizer state (momentum) with
  each reply, the server keeps the copy of the last *accepted* reply and sends it back
  whenever a node's own copy may differ (a retry, a rejected reply, a restarted node, a
  resumed run), so client state is reconstructible from the server;
* with ``checkpoint_path`` every round's end writes an atomic checkpoint, and
  ``resume`` continues from its last complete round.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from logging import INFO, WARNING
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
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
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .plan import Plan, format_plan
from .records import from_array_record, record_nbytes, tensor_nbytes, to_array_record

__all__ = [
    "DSparse",
    "DeviceReport",
    "PlanFn",
    "RoundFailed",
    "device_tensors",
    "read_device_report",
    "reply_node",
    "sent_message_ids",
]

ARRAYS_KEY = "arrays"
CONFIG_KEY = "config"
METRICS_KEY = "metrics"
STATE_KEY = "optimizer"  # the node's momentum buffers, by parameter name
# The .npy header of one array on the wire is ~128 bytes; anything beyond the selection's
# raw bytes plus this per array is an oversize payload.
_HEADER_ALLOWANCE = 1024
# Run-config keys that may differ between a run and its resume (they do not change the model).
RESUMABLE_KEYS = frozenset(
    {"resume", "num-server-rounds", "round-timeout", "out-dir", "min-nodes", "min-replies", "round-retries",
     "checkpoint", "test-examples", "collective-timeout", "collective-addr", "collective-port"}
)


class RoundFailed(RuntimeError):
    """A round got fewer than ``min_replies`` accepted replies in every attempt; the run stops."""


class _TooFewReplies(RuntimeError):
    pass


class _CollectiveFailed(RuntimeError):
    pass


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


def reply_node(reply: Message, sent: Mapping[str, int]) -> int:
    """The node a reply is about: the destination of the message it answers.

    ``sent`` maps the message ids of what was sent (set by the Grid when it pushed them) to
    their destination nodes. The SuperLink answers a message to a node that went offline
    itself (a ``NODE_UNAVAILABLE`` error whose source is the SuperLink), so the source id
    alone would blame the wrong node. Without a match (messages never pushed through a
    Grid, as in unit tests) the source id is used.
    """
    return sent.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)


def sent_message_ids(messages: Iterable[Message]) -> dict[str, int]:
    """Message id to destination node, for the messages a Grid has pushed (see :func:`reply_node`)."""
    return {m.metadata.message_id: m.metadata.dst_node_id for m in messages if m.metadata.message_id}


def read_device_report(message: Message, node: int | None = None) -> DeviceReport:
    """Parse a query reply; raise ``ValueError`` naming the node if it is malformed or an error.

    ``node`` is the node the reply is about (:func:`reply_node`); default its source.
    """
    node = message.metadata.src_node_id if node is None else node
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
    min_replies : int (default: 0)
        Accepted replies a round needs before anything is applied (0: no minimum).
    round_retries : int (default: 2)
        How often a round below ``min_replies`` is retried before :class:`RoundFailed`.
    keep_client_state : bool (default: False)
        Nodes return their momentum buffers; the server keeps and restores them.
    checkpoint_path : str or Path, optional
        Where every round's end writes its checkpoint.
    resume : bool (default: False)
        Continue from ``checkpoint_path``'s last complete round.
    fingerprint : Mapping[str, Any], optional
        The job's run_config; a resume refuses a checkpoint whose job differs (outside
        :data:`RESUMABLE_KEYS`).
    transport : str (default: "server")
        ``"collective"``: the nodes run each round's K steps as per-step synchronous
        AllReduce/Broadcast among themselves (:func:`flwr_dsparse.collective.run_collective_round`)
        and return identical group tensors; a failed collective round is retried once with
        the server-side transport.
    collective_addr : str (default: "127.0.0.1")
        Rendezvous host (rank 0's machine) for the collective transport.
    collective_port_fn : Callable[[], int], optional
        Picks the rendezvous port of each collective round (default: a free local port).
    """

    def __init__(
        self,
        *,
        plan_fn: PlanFn,
        train_config: Mapping[str, Any] | None = None,
        query_config: Mapping[str, Any] | None = None,
        min_nodes: int = 2,
        settle_s: float = 1.0,
        min_replies: int = 0,
        round_retries: int = 2,
        keep_client_state: bool = False,
        checkpoint_path: str | Path | None = None,
        resume: bool = False,
        fingerprint: Mapping[str, Any] | None = None,
        transport: str = "server",
        collective_addr: str = "127.0.0.1",
        collective_port_fn: Callable[[], int] | None = None,
    ) -> None:
        if min_nodes < 1:
            raise ValueError(f"min_nodes must be >= 1, got {min_nodes}")
        if min_replies < 0 or round_retries < 0:
            raise ValueError(f"min_replies and round_retries must be >= 0, got {min_replies} and {round_retries}")
        if transport not in ("server", "collective"):
            raise ValueError(f"transport is {transport!r}; use \"server\" or \"collective\"")
        if resume and checkpoint_path is None:
            raise ValueError("resume=True needs a checkpoint_path")
        self.min_replies = min_replies
        self.round_retries = round_retries
        self.keep_client_state = keep_client_state
        self.checkpoint_path = Path(checkpoint_path) if checkpoint_path is not None else None
        self.resume = resume
        self.fingerprint = dict(fingerprint or {})
        self.transport = transport
        self.collective_addr = collective_addr
        self.collective_port_fn = collective_port_fn
        # The server's copy of each node's optimizer state (from its last accepted reply),
        # and which nodes are known to hold exactly that copy.
        self.client_state: dict[int, dict[str, torch.Tensor]] = {}
        self._state_synced: set[int] = set()
        self.evaluations: dict[int, dict[str, float]] = {}
        self._events: list[dict[str, Any]] = []
        self._budget_drops: dict[int, float] = {}
        self._round_transport = "server"
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

    def _ask(self, grid: Grid, nodes: Sequence[int], timeout: float, *, strict: bool = True) -> list[DeviceReport]:
        """Send the memory query to ``nodes``; their reports, sorted by device.

        ``strict``: every node must answer well (round 0). Otherwise (a node joining
        later) a node that does not answer, or answers badly, is left out and logged.
        """
        content = RecordDict({CONFIG_KEY: ConfigRecord(dict(self.query_config))})
        messages = [Message(content, dst_node_id=node, message_type=MessageType.QUERY, group_id="0") for node in nodes]
        replies = list(grid.send_and_receive(messages, timeout=timeout))
        sent = sent_message_ids(messages)
        answered = {reply_node(reply, sent) for reply in replies}
        if strict and not answered >= set(nodes):
            raise TimeoutError(f"nodes {sorted(set(nodes) - answered)} did not answer the memory query within {timeout:.0f} s")
        reports = []
        for reply in replies:
            try:
                reports.append(read_device_report(reply, reply_node(reply, sent)))
            except ValueError as error:
                if strict:
                    raise  # an unanswerable query (no budget) stops the run: training without a plan is meaningless
                log(WARNING, "membership: %s; the node is left out", error)
        return sorted(reports, key=lambda r: r.device)

    def _log_plan(self, plan: Plan) -> None:
        for line in format_plan(plan, {r.device: r.budget_source for r in self.reports}).splitlines():
            log(INFO, "%s", line)

    def _make_plan(self, reports: Sequence[DeviceReport]) -> Plan:
        plan = self.plan_fn(reports)
        if len(plan.devices) < self.min_replies:
            raise RoundFailed(
                f"only {len(plan.devices)} devices can be planned (devices {list(plan.device_ids)}), below "
                f"min-replies={self.min_replies}; start more nodes or lower min-replies"
            )
        return plan

    def query(self, grid: Grid, timeout: float = 600.0) -> Plan:
        """Round 0: ask every node for its budget, build the Plan, and log the ``dsparse plan`` table."""
        nodes = self.wait_for_nodes(grid, timeout)
        reports = self._ask(grid, nodes, timeout)
        self.reports = reports
        plan = self._make_plan(reports)
        self.set_plan(plan, {report.node_id: report.device for report in reports})
        self._log_plan(plan)
        return plan

    # -- membership and budgets: re-plan between rounds ------------------------------------------------
    def _replan(self, reason: str, server_round: int) -> None:
        """Plan again from ``self.reports`` and log what changed."""
        old = self.plan
        plan = self._make_plan(self.reports)
        self.set_plan(plan, {report.node_id: report.device for report in self.reports})
        assert self.versions is not None
        for device in set(old.device_ids if old else ()) - set(plan.device_ids):
            self.versions.forget(device)
            self._sent_selection.pop(device, None)
        changes = {}
        for device in plan.devices:
            before = tuple(old.device(device.id).units) if old and device.id in old.device_ids else None
            if before != tuple(device.units):
                changes[str(device.id)] = {"from": list(before) if before is not None else None, "to": list(device.units)}
        event = {"round": server_round, "event": "replan", "reason": reason, "plan": plan.digest()[:12],
                 "devices": list(plan.device_ids), "changed": changes}
        self._events.append(event)
        log(WARNING, "re-plan before round %d (%s): devices %s, %d selection(s) changed", server_round, reason,
            list(plan.device_ids), len(changes))
        self._log_plan(plan)

    def _sync_membership(self, grid: Grid, server_round: int, timeout: float) -> None:
        """Compare the connected nodes with the plan; query newcomers; re-plan on any change."""
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
            for report in self._ask(grid, joined, timeout, strict=False):
                if report.device in by_device:
                    log(WARNING, "membership: node %d claims device %d, which node %d holds; ignored",
                        report.node_id, report.device, by_device[report.device].node_id)
                    continue
                by_device[report.device] = report
                reasons.append(f"device {report.device} joined")
            self.reports = sorted(by_device.values(), key=lambda r: r.device)
        if self._budget_drops:
            drops = dict(self._budget_drops)
            self._budget_drops.clear()
            self.reports = [
                DeviceReport(r.node_id, r.device, drops[r.device], r.batch_size, r.num_examples, r.budget_source)
                if r.device in drops else r
                for r in self.reports
            ]
            reasons.extend(f"device {d} budget fell to {mb:.1f} MB" for d, mb in sorted(drops.items()))
        if reasons:
            if not self.reports:
                raise RoundFailed(f"no nodes left before round {server_round} ({'; '.join(reasons)}); start SuperNodes")
            self._replan("; ".join(reasons), server_round)

    def _note_budget(self, device: int, metrics: Mapping[str, Any]) -> None:
        """A reported budget below what the device's selection needs re-plans it next round."""
        budget = metrics.get("budget-mb")
        if not isinstance(budget, (int, float)) or isinstance(budget, bool) or self.plan is None:
            return
        planned = self.plan.device(device)
        needed = planned.predicted_mb.total if planned.predicted_mb is not None else planned.budget_mb
        if float(budget) < needed:
            log(WARNING, "device %d reports %.1f MB, below the %.1f MB its selection needs: re-plan next round",
                device, budget, needed)
            self._budget_drops[device] = float(budget)

    # -- the round loop ------------------------------------------------------------------------------
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
        """Run the round-0 query (unless a plan was set), then the rounds.

        Each round: membership check (re-plan if needed), train with up to
        ``round_retries`` retries below ``min_replies``, central evaluation, checkpoint.
        With ``resume``, rounds start after the checkpoint's last complete round.
        """
        log(INFO, "Starting DSparse strategy:")
        self.summary()
        train_config = ConfigRecord() if train_config is None else train_config
        result = Result()
        arrays = initial_arrays
        first_round = 1
        if self.resume:
            assert self.checkpoint_path is not None
            first_round = self._restore(load_checkpoint(self.checkpoint_path), grid, timeout) + 1
            arrays = to_array_record(self._global)
            result.arrays = arrays
            log(INFO, "resumed from %s: rounds 1..%d complete, continuing at round %d",
                self.checkpoint_path, first_round - 1, first_round)
        else:
            if evaluate_fn:
                self._evaluate(evaluate_fn, 0, arrays, result)
            if self.plan is None:
                self.query(grid, timeout=timeout)
        for server_round in range(first_round, num_rounds + 1):
            log(INFO, "")
            log(INFO, "[ROUND %s/%s]", server_round, num_rounds)
            self._sync_membership(grid, server_round, timeout)
            arrays, metrics = self._train_round(grid, server_round, arrays, train_config, timeout)
            result.arrays = arrays
            result.train_metrics_clientapp[server_round] = metrics
            if evaluate_fn:
                self._evaluate(evaluate_fn, server_round, arrays, result)
            if self.checkpoint_path is not None:
                self.save(self.checkpoint_path, server_round)
        return result

    def _evaluate(self, evaluate_fn: Callable, server_round: int, arrays: ArrayRecord, result: Result) -> None:
        metrics = evaluate_fn(server_round, arrays)
        if metrics is not None:
            result.evaluate_metrics_serverapp[server_round] = metrics
            self.evaluations[server_round] = {key: float(value) for key, value in metrics.items()}
            log(INFO, "round %d global evaluation: %s", server_round, self.evaluations[server_round])

    def _train_round(
        self, grid: Grid, server_round: int, arrays: ArrayRecord, config: ConfigRecord, timeout: float
    ) -> tuple[ArrayRecord, MetricRecord]:
        """One round with retries: never applies a round below ``min_replies``."""
        attempts = self.round_retries + 1
        attempt = 0
        fell_back = False
        self._round_transport = self.transport
        while True:
            attempt += 1
            replies = grid.send_and_receive(self.configure_train(server_round, arrays, config, grid), timeout=timeout)
            try:
                new_arrays, metrics = self.aggregate_train(server_round, replies)
            except _CollectiveFailed as error:
                # A dead or mismatched collective peer: redo the round with the server-side
                # transport (once, not counted as a retry), then try the collective again next round.
                if fell_back:
                    raise RoundFailed(f"round {server_round}: {error}") from error
                fell_back = True
                attempt -= 1
                self._round_transport = "server"
                self._events.append({"round": server_round, "event": "collective-fallback", "reason": str(error)})
                log(WARNING, "round %d: collective transport failed (%s); retrying with the server-side transport",
                    server_round, error)
                continue
            except _TooFewReplies as error:
                if attempt >= attempts:
                    raise RoundFailed(
                        f"round {server_round} got fewer than min-replies={self.min_replies} accepted replies in all "
                        f"{attempts} attempts (last attempt: {error}); the run stops, nothing of round {server_round} "
                        f"was applied and rounds 1..{server_round - 1} are complete"
                        + (f" (checkpoint {self.checkpoint_path})" if self.checkpoint_path else "")
                        + ". Start more nodes, lower min-replies or raise round-timeout, then resume=true"
                    ) from error
                self._events.append({"round": server_round, "event": "retry", "attempt": attempt, "reason": str(error)})
                log(WARNING, "round %d attempt %d of %d: %s; retrying the round", server_round, attempt, attempts, error)
                continue
            self.history[-1]["attempts"] = attempt + int(fell_back)
            self.history[-1]["transport"] = self._round_transport
            return new_arrays, metrics

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
        state_down: dict[int, int] = {}
        collective = self._collective_config(server_round)
        for node, device in sorted(self.node_to_device.items(), key=lambda item: item[1]):
            plan_device = self.plan.device(device)
            send = self.versions.missing(device)
            payload = {name: self._global[name] for name in send}
            train_config = ConfigRecord({**self.train_config, **dict(config), "server-round": server_round, "method": "dsparse"})
            if self._sent_selection.get(device) != plan_device.units:
                train_config["selection"] = ",".join(plan_device.units)
            if collective:
                train_config.update({**collective, "rank": device})
            content = RecordDict({ARRAYS_KEY: to_array_record(payload), CONFIG_KEY: train_config})
            if self.keep_client_state:
                train_config["send-state"] = True
                if device not in self._state_synced:
                    # The node's momentum may differ from the last accepted one (retry, rejected
                    # reply, restart, resume): give it the server's copy (empty = start at zero).
                    state = self.client_state.get(device, {})
                    content[STATE_KEY] = to_array_record(state)
                    state_down[device] = tensor_nbytes(state)
            messages.append(Message(content, dst_node_id=node, message_type=MessageType.TRAIN, group_id=str(server_round)))
            # Optimistic: assume delivery. A node that fails is forgotten in aggregate_train.
            self.versions.mark_held(device, send)
            self._sent_selection[device] = plan_device.units
            bytes_down[device] = tensor_nbytes(payload)
        # The messages themselves: the Grid sets their ids when it pushes them (see reply_node).
        self._round = {"round": server_round, "started": started, "bytes-down": bytes_down, "sent": set(bytes_down),
                       "state-down": state_down, "messages": messages}
        log(INFO, "configure_train: %d nodes, %.2f MiB down in total", len(messages), sum(bytes_down.values()) / 2**20)
        return messages

    def _collective_config(self, server_round: int) -> dict[str, Any]:
        """The rendezvous part of a collective round's train config (empty for the server transport)."""
        if self._round_transport != "collective" or self.plan is None:
            return {}
        if list(self.plan.device_ids) != list(range(len(self.plan.devices))):
            # Ranks are device ids; after a node left, the ids have a gap.
            log(WARNING, "round %d: devices %s are not ranks 0..%d; this round uses the server-side transport",
                server_round, list(self.plan.device_ids), len(self.plan.devices) - 1)
            self._round_transport = "server"
            return {}
        if self.collective_port_fn is not None:
            port = self.collective_port_fn()
        else:
            from .ports import free_port

            port = free_port(self.collective_addr)
        return {"round-transport": "collective", "plan": self.plan.to_json(), "world-size": len(self.plan.devices),
                "collective-addr": self.collective_addr, "collective-port": port}

    def _accept(
        self, server_round: int, message: Message, device: int
    ) -> tuple[Update, dict[str, float], dict[str, torch.Tensor] | None]:
        """Check one reply and return its update, metrics and optimizer state, or raise ReplyRejected."""
        group_id = message.metadata.group_id
        if group_id and group_id != str(server_round):
            raise ReplyRejected("stale-round", f"device {device} replied for round {group_id} during round {server_round}")
        content = message.content
        if not {ARRAYS_KEY} <= set(content.array_records) <= {ARRAYS_KEY, STATE_KEY} or METRICS_KEY not in content.metric_records:
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
        selected = {name: self._global[name] for name in device_tensors(self.plan, device)}
        expected = tensor_specs(selected)
        # Checked on the wire size, before decoding: an oversize payload is never unpacked.
        wire = _wire_nbytes(content[ARRAYS_KEY])
        limit = tensor_nbytes(selected) + _HEADER_ALLOWANCE * max(len(selected), 1)
        if wire > limit:
            raise ReplyRejected(
                "oversize", f"device {device} sent {wire} bytes, beyond the {limit} bytes its selection can take"
            )
        try:
            tensors = from_array_record(content[ARRAYS_KEY])
        except Exception as error:  # an undecodable payload is a bad reply, not a crash
            raise ReplyRejected("malformed", f"device {device} sent arrays that do not decode ({error!r})") from error
        update = check_update(device, tensors, metrics.get("num-examples"), expected)
        state = None
        if STATE_KEY in content.array_records:
            state = self._check_state(device, content[STATE_KEY])
        return update, metrics, state

    def _check_state(self, device: int, record: ArrayRecord) -> dict[str, torch.Tensor]:
        """A reply's optimizer state: only the device's selected parameters, their shapes, finite."""
        assert self.plan is not None
        params = {name for group in self.plan.groups_of(device) for name in group.params}
        limit = sum(tensor_nbytes({n: self._global[n]}) for n in params) + _HEADER_ALLOWANCE * max(len(params), 1)
        if _wire_nbytes(record) > limit:
            raise ReplyRejected("optimizer-state", f"device {device} sent an optimizer state beyond its selection's size")
        try:
            state = from_array_record(record)
        except Exception as error:
            raise ReplyRejected("optimizer-state", f"device {device} sent an optimizer state that does not decode") from error
        for name, tensor in state.items():
            if name not in params or tuple(tensor.shape) != tuple(self._global[name].shape):
                raise ReplyRejected("optimizer-state", f"device {device} sent optimizer state for {name!r} outside its selection")
            if not bool(torch.isfinite(tensor).all()):
                raise ReplyRejected("optimizer-state", f"device {device} sent NaN or Inf in the optimizer state of {name}")
        return state

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Grouped example-weighted mean over accepted replies; returns the full global model."""
        if self.plan is None or self.versions is None:
            raise RuntimeError("aggregate_train before configure_train")
        this_round = self._round.get("round") == server_round
        # (popped: the messages hold the round's whole download, no need to keep it longer)
        sent_ids = sent_message_ids(self._round.pop("messages", [])) if this_round else {}
        by_node = [(reply_node(m, sent_ids), m) for m in replies]
        # Sort by device id so sums and logs do not depend on arrival order.
        by_node.sort(key=lambda item: (self.node_to_device.get(item[0], 1 << 62), item[0]))
        per_node = Counter(node for node, _ in by_node)
        updates: dict[int, Update] = {}
        devices: dict[int, dict[str, Any]] = {}
        rejected: Counter[str] = Counter()
        failed: set[int] = set()
        replied: set[int] = set()
        states: dict[int, dict[str, torch.Tensor] | None] = {}
        for node, message in by_node:
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
                update, metrics, state = self._accept(server_round, message, device)
            except ReplyRejected as rejection:
                rejected[rejection.kind] += 1
                row["status"] = f"rejected:{rejection.kind}"
                updates.pop(device, None)
                states.pop(device, None)
                log(WARNING, "aggregate_train: rejected reply: %s", rejection)
                continue
            updates[device] = update
            states[device] = state
            row.update({key: float(value) for key, value in metrics.items() if isinstance(value, (int, float))})
            if state is not None:
                row["bytes-up-state"] = record_nbytes(message.content[STATE_KEY])

        sent = self._round.get("sent", set()) if this_round else set()
        no_reply = sorted(sent - replied - failed)
        if self._round_transport == "collective":
            trouble = self._collective_trouble(updates, sorted(failed) + no_reply, devices)
            if trouble:
                self._update_held({}, replied, failed | set(no_reply))
                raise _CollectiveFailed(trouble)
        if len(updates) < self.min_replies:
            # Nothing of this attempt is applied; what the nodes hold is now unknown or diverged.
            self._update_held({}, replied, failed)
            self.rejections.update(rejected)
            raise _TooFewReplies(
                f"{len(updates)} accepted (devices {sorted(updates)}), missing {sorted(failed) + no_reply}, "
                f"rejected {dict(rejected) or 0}"
            )

        agg_started = time.perf_counter()
        if self._round_transport == "collective":
            # The members were checked bit-identical: the group's value is any member's.
            new = {name: updates[group.members[0]].tensors[name] for group in self.plan.groups
                   if group.members[0] in updates for name in group.tensors}
        else:
            new = aggregate_groups(self.plan.groups, updates)
        self._global.update(new)
        self.versions.bump(new, server_round)
        aggregation_s = time.perf_counter() - agg_started
        self._update_held(updates, replied, failed)
        self.rejections.update(rejected)
        for device, update in updates.items():
            if states.get(device) is not None:
                self.client_state[device] = states[device]  # type: ignore[assignment]
                self._state_synced.add(device)
            self._note_budget(device, devices[device])

        for device in sent:
            if device not in devices:
                devices[device] = {"status": "missing", "error": "no reply before the timeout"}
        bytes_down = self._round.get("bytes-down", {}) if this_round else {}
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
            "bytes-up-state": sum(r.get("bytes-up-state", 0) for r in devices.values()),
            "bytes-down-state": sum(self._round.get("state-down", {}).values()),
            "plan": self.plan.digest()[:12],
            "events": [event for event in self._events if event["round"] == server_round],
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
        # Whoever did not have a reply accepted may now hold momentum the server did not keep.
        self._state_synced -= (replied | failed | self._round.get("sent", set())) - set(updates)

    def _collective_trouble(self, updates: Mapping[int, Update], missing: Sequence[int], devices: Mapping) -> str:
        """Why a collective round cannot be applied ('' if it can): a missing member, or members that differ."""
        assert self.plan is not None
        if missing:
            reasons = {d: devices.get(d, {}).get("error", "no reply") for d in missing}
            return f"devices {list(missing)} failed the collective round: " + "; ".join(
                f"{d}: {str(r)[:300]}" for d, r in reasons.items()
            )
        rejected = sorted(d for d in self.plan.device_ids if d not in updates)
        if rejected:
            return f"replies of devices {rejected} were rejected"
        for index, group in enumerate(self.plan.groups):
            first = updates[group.members[0]].tensors
            for member in group.members[1:]:
                differing = [n for n in group.tensors if not torch.equal(updates[member].tensors[n], first[n])]
                if differing:
                    return (f"group {index}: device {member} returned values that differ from device "
                            f"{group.members[0]}'s in {len(differing)} tensor(s), e.g. {differing[0]}")
        return ""

    # -- checkpoint and resume -------------------------------------------------------------------------
    def checkpoint_state(self, server_round: int) -> dict[str, Any]:
        """Everything a resume needs after ``server_round`` completed."""
        assert self.plan is not None and self.versions is not None
        np_state = np.random.get_state()
        return {
            "round": server_round,
            "fingerprint": dict(self.fingerprint),
            "global": {name: tensor.clone() for name, tensor in self._global.items()},
            "plan": self.plan.to_json(),
            "reports": [asdict(report) for report in self.reports],
            "versions": self.versions.to_dict(),
            "client-state": {str(d): dict(state) for d, state in self.client_state.items()},
            "history": list(self.history),
            "evaluations": {str(r): dict(m) for r, m in self.evaluations.items()},
            "rejections": dict(self.rejections),
            "events": list(self._events),
            "rng": {
                "torch": torch.get_rng_state(),
                "python": random.getstate(),
                "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(float, np_state[2:])],
            },
        }

    def save(self, path: str | Path, server_round: int) -> Path:
        """Write the checkpoint of ``server_round`` atomically."""
        written = save_checkpoint(path, self.checkpoint_state(server_round))
        log(INFO, "checkpoint: round %d written to %s", server_round, written)
        return written

    def _restore(self, state: Mapping[str, Any], grid: Grid, timeout: float) -> int:
        """Load a checkpoint's state; map the connected nodes to its devices. Returns its round."""
        try:
            server_round = int(state["round"])
            saved_fingerprint = dict(state["fingerprint"])
            plan = Plan.from_json(state["plan"])
            global_tensors = dict(state["global"])
            reports = [DeviceReport(**report) for report in state["reports"]]
            versions = TensorVersions.from_dict(state["versions"])
        except (KeyError, TypeError, ValueError) as error:
            raise CheckpointError(f"checkpoint {self.checkpoint_path} lacks part of the run state ({error!r})") from error
        differing = sorted(
            key for key in set(saved_fingerprint) | set(self.fingerprint)
            if key not in RESUMABLE_KEYS and saved_fingerprint.get(key) != self.fingerprint.get(key)
        )
        if differing:
            raise CheckpointError(
                f"checkpoint {self.checkpoint_path} is of another job: {', '.join(f'{k}={saved_fingerprint.get(k)!r} there, {self.fingerprint.get(k)!r} here' for k in differing)}; "
                "resume with the same settings, or use another out-dir for a new run"
            )
        self._global = global_tensors
        self.versions = versions
        # The nodes of a resumed run are new processes (Flower's context.state is per run):
        # they hold nothing, so they get the whole model and the server's optimizer state.
        self.versions.held.clear()
        self._sent_selection.clear()
        self._state_synced.clear()
        self.client_state = {int(d): dict(s) for d, s in state["client-state"].items()}
        self.history = list(state["history"])
        self.evaluations = {int(r): dict(m) for r, m in state["evaluations"].items()}
        self.rejections = Counter(state["rejections"])
        self._events = list(state["events"])
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        random.setstate(_tuples(rng["python"]))
        numpy_state = rng["numpy"]
        np.random.set_state((numpy_state[0], numpy_state[1].numpy().astype(np.uint32), int(numpy_state[2]),
                             int(numpy_state[3]), float(numpy_state[4])))

        # Node ids are new in every run: ask the nodes again who they are.
        nodes = self.wait_for_nodes(grid, timeout)
        self.reports = self._ask(grid, nodes, timeout)
        now = [(r.device, r.budget_mb, r.batch_size) for r in self.reports]
        before = [(r.device, r.budget_mb, r.batch_size) for r in reports]
        self.plan = plan
        if now == before:
            self.set_plan(plan, {report.node_id: report.device for report in self.reports})
            self._log_plan(plan)
        else:
            self._replan(f"the nodes after the resume differ from the checkpoint's ({before} -> {now})", server_round + 1)
        return server_round

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


def _tuples(value: Any) -> Any:
    """``random.setstate`` wants tuples; a checkpoint may hand back lists."""
    return tuple(_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def _wire_nbytes(record: ArrayRecord) -> int:
    """Serialized bytes of an ArrayRecord as it arrived (without decoding it)."""
    return sum(len(array.data) for array in record.values())


def _safe_nbytes(message: Message) -> int:
    try:
        return sum(record_nbytes(record) for record in message.content.array_records.values())
    except Exception:  # a payload that does not decode still arrived; count what can be counted
        return 0
