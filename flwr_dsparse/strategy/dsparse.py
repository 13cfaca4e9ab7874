"""The DSparse strategy for Flower's Message API: Flower's methods, delegating to the rooms beside it.

``DSparse`` runs one synchronous round as the Plan says:

* **round 0, the query** (:mod:`.membership`): every node reports its memory budget, batch
  size and example count; a plan function turns the reports into a :class:`~flwr_dsparse.plan.Plan`;
* **configure_train (Broadcast side):** each node gets its own ``Message`` with its
  selection (when it changed), the hyper-parameters, and only the tensors its replica
  lacks (:mod:`.replicas`, versioned delta sync);
* **aggregate_train (AllReduce side):** each reply is checked (:mod:`.replies`), and each
  Plan group's tensors become the example-weighted mean over the members whose replies
  were accepted (:mod:`.aggregate`). Everything else stays bit-identical, and the full
  global model is returned, because ``start()`` replaces it.

Reliability (:meth:`DSparse.start` runs its own round loop for it, :mod:`.rounds`): a round
needs ``min_replies`` accepted replies, else it is retried and then the run stops with
:class:`~.membership.RoundFailed`; nodes that join or leave and budgets that drop re-plan the devices;
with ``keep_client_state`` the server keeps each node's momentum and restores it whenever
the node's own copy may differ; with ``checkpoint_path`` every round's end writes an atomic
checkpoint, and ``resume`` continues from its last complete round. The nodes upload their
momentum only every ``checkpoint_every`` rounds (and in the last round), so the checkpoints in
between hold the model and plan of their round and the momentum of the last round that uploaded it.

Encoding (:mod:`.global_model`): each global tensor is encoded once per version and the one
``Array`` is shared by every message that carries it and by the returned model; the model
``aggregate_train`` returned is not decoded again by the next ``configure_train``; replies
are read as views of their wire bytes (:mod:`flwr_dsparse.records`).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from functools import partial
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.serverapp.strategy.result import Result
from flwr.supercore import log

from ..checkpoint import save_checkpoint
from ..exchange import TensorVersions
from ..plan import Plan
from ..protocol import TrainControl, train_content
from ..records import fuse_record, tensor_nbytes, to_array_record
from .aggregate import aggregate_groups, member_values
from .global_model import GlobalModel
from .membership import Membership, PlanFn
from .replicas import Replicas
from .replies import check_reply, reply_node, selection_of, sent_message_ids, tally_metrics, tally_replies
from .rounds import (
    TOO_FEW_REPLIES,
    EvaluateFn,
    RoundState,
    checkpoint_state,
    collective_control,
    round_failure,
    round_metrics,
    round_record,
    run_rounds,
)

__all__ = ["DSparse"]


class DSparse(Strategy):
    """DSparse: each device trains the units that fit its memory; each tensor is averaged
    only over the devices that trained it.

    Parameters
    ----------
    plan_fn : PlanFn
        Builds the Plan from the nodes' query answers (``Sequence[DeviceReport]``) and the
        global model's tensors, e.g. :func:`flwr_dsparse.planner.make_plan` behind a cost model.
    train_config : Mapping[str, Any], optional
        The job's keys sent with every train message; ``start()``'s ``train_config`` is merged on top.
    query_config : Mapping[str, Any], optional
        Sent with the round-0 query (what a node needs to answer: data, batch size, budgets).
    min_nodes : int (default: 2)
        Nodes to wait for before the query.
    settle_s : float (default: 1.0)
        After ``min_nodes`` connected, wait until the node count is stable this long.
    min_replies : int (default: 0)
        Accepted replies a round needs before anything is applied (0: no minimum).
    round_retries : int (default: 2)
        How often a round below ``min_replies`` is retried before :class:`~.membership.RoundFailed`.
    keep_client_state : bool (default: False)
        Nodes return their momentum buffers; the server keeps and restores them.
    checkpoint_every : int (default: 1)
        With ``keep_client_state``, nodes return their momentum only in rounds divisible by
        this and in the run's last round (1: every round).
    rescore_every : int (default: 0)
        Re-plan every this many rounds with ``plan_fn`` on the trained global model, so the
        criticality scores follow training (units that have learned give way); 0: never.
    checkpoint_path : str or Path, optional
        Where every round's end writes its checkpoint.
    resume : bool (default: False)
        Continue from ``checkpoint_path``'s last complete round.
    fingerprint : Mapping[str, Any], optional
        The job's run_config; a resume refuses a checkpoint of another job.
    transport : str (default: "server")
        ``"collective"``: the nodes run each round's K steps as per-step synchronous
        AllReduce/Broadcast among themselves and return identical group tensors; a failed
        collective round is redone once with the server-side transport.
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
        checkpoint_every: int = 1,
        rescore_every: int = 0,
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
            raise ValueError(f'transport is {transport!r}; use "server" or "collective"')
        if checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be >= 1, got {checkpoint_every}; 1 uploads momentum every round")
        if rescore_every < 0:
            raise ValueError(f"rescore_every must be >= 0, got {rescore_every}; 0 never re-scores")
        if resume and checkpoint_path is None:
            raise ValueError("resume=True needs a checkpoint_path")
        self.model = GlobalModel()
        self.membership = Membership(
            plan_fn,
            query_config or {},
            min_nodes=min_nodes,
            settle_s=settle_s,
            min_replies=min_replies,
            global_tensors=lambda: self.model.tensors,
        )
        self.replicas = Replicas()
        self.train_config = dict(train_config or {})
        self.min_replies, self.round_retries = min_replies, round_retries
        self.keep_client_state = keep_client_state
        self.checkpoint_every = checkpoint_every
        self.rescore_every = rescore_every
        self.num_rounds: int | None = None  # set by start(): its last round always uploads momentum
        self.checkpoint_path = Path(checkpoint_path) if checkpoint_path is not None else None
        self.resume = resume
        self.fingerprint = dict(fingerprint or {})
        self.transport, self.round_transport = transport, transport
        self.collective_addr, self.collective_port_fn = collective_addr, collective_port_fn
        self.history: list[dict[str, Any]] = []
        self.evaluations: dict[int, dict[str, float]] = {}
        self.events: list[dict[str, Any]] = []
        self.rejections: Counter[str] = Counter()
        self.round: RoundState | None = None

    # -- the plan and who holds what ---------------------------------------------------------------
    @property
    def plan(self) -> Plan | None:
        return self.membership.plan

    @property
    def versions(self) -> TensorVersions | None:
        return self.replicas.versions

    @property
    def client_state(self) -> dict[int, dict[str, torch.Tensor]]:
        return self.replicas.client_state

    @property
    def global_tensors(self) -> dict[str, torch.Tensor]:
        """The global model after the last aggregation."""
        return dict(self.model.tensors)

    def set_global(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Hold ``tensors`` as the global model (a resume, a caller's own start)."""
        self.model.replace(tensors)

    def uploads_state(self, server_round: int) -> bool:
        """Whether the nodes return their momentum in ``server_round`` (see ``checkpoint_every``)."""
        return self.keep_client_state and (server_round % self.checkpoint_every == 0 or server_round == self.num_rounds)

    def global_record(self) -> ArrayRecord:
        """The global model as an ``ArrayRecord`` of the shared encodings."""
        assert self.versions is not None
        return self.model.record(self.versions)

    def summary(self) -> None:
        """Log the strategy's configuration and its plan."""
        log(INFO, "\t├──> DSparse: synchronous grouped aggregation, versioned delta sync")
        log(INFO, "\t│\t├── Train config: %s", self.train_config or "(empty)")
        log(INFO, "\t│\t└── Minimum nodes: %d", self.membership.min_nodes)
        if self.plan is None:
            log(INFO, "\t└──> Plan: not built yet (round-0 query pending)")
            return
        log(
            INFO,
            "\t└──> Plan %s: %d devices, %d groups",
            self.plan.digest()[:12],
            len(self.plan.devices),
            len(self.plan.groups),
        )

    def set_plan(self, plan: Plan, node_to_device: Mapping[int, int]) -> None:
        """Use ``plan`` from the next round; ``node_to_device`` maps Flower node ids to plan device ids."""
        self.membership.set_plan(plan, node_to_device)

    def replan(self, reason: str, server_round: int) -> None:
        """Plan again from the current reports, forget the replicas of devices that left, record why."""
        event, dropped = self.membership.replan(reason, server_round)
        for device in dropped:
            self.replicas.drop(device)
        self.events.append(event)

    # -- the round loop ----------------------------------------------------------------------------
    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: EvaluateFn | None = None,
    ) -> Result:
        """Run the round-0 query (unless a plan was set), then the rounds.

        Each round: membership check (re-plan if needed), train with up to
        ``round_retries`` retries below ``min_replies``, central evaluation, checkpoint.
        With ``resume``, rounds start after the checkpoint's last complete round.
        """
        log(INFO, "Starting DSparse strategy:")
        self.summary()
        self.num_rounds = num_rounds
        train_config = ConfigRecord() if train_config is None else train_config
        return run_rounds(self, grid, initial_arrays, num_rounds, timeout, train_config, evaluate_fn)

    # -- train -------------------------------------------------------------------------------------
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """One message per planned node: its selection if changed, hyper-parameters, missing tensors."""
        if self.plan is None:
            raise RuntimeError("DSparse has no plan: call start() (which runs the query) or set_plan() first")
        state = RoundState(server_round, time.perf_counter(), self.round_transport)
        self.model.take(arrays, self.replicas.versions)
        versions = self.replicas.track(list(self.model.tensors))
        collective = collective_control(self.plan, state, self.collective_addr, self.collective_port_fn)
        job = {**self.train_config, **dict(config), "method": "dsparse"}
        fused: dict[tuple[str, ...], ArrayRecord] = {}  # one fused payload per distinct set of tensors
        for node, device in sorted(self.membership.node_to_device.items(), key=lambda item: item[1]):
            units = self.plan.device(device).units
            send = versions.missing(device)
            payload = fused.get(tuple(send))
            if payload is None:  # one encoding per tensor, shared by every message
                payload = fused[tuple(send)] = fuse_record(self.model.arrays(send, versions))
            restore_state = self.replicas.state_to_restore(device) if self.keep_client_state else None
            control = TrainControl(
                server_round,
                selection=",".join(units) if self.replicas.selection_changed(device, units) else None,
                send_state=self.uploads_state(server_round),
                **collective,
                **({"rank": device} if collective else {}),
            )
            # The node's momentum may differ from the last accepted one (retry, rejected reply,
            # restart, resume): then it gets the server's copy (empty = start at zero).
            restore_record = to_array_record(restore_state) if restore_state is not None else None
            content = train_content(payload, job, control, restore_record)
            if restore_state is not None:
                state.state_down[device] = tensor_nbytes(restore_state)
            state.messages.append(
                Message(content, dst_node_id=node, message_type=MessageType.TRAIN, group_id=str(server_round))
            )
            self.replicas.mark_sent(device, send, units)  # optimistic; a node that fails is forgotten
            state.bytes_down[device] = tensor_nbytes({name: self.model.tensors[name] for name in send})
        self.round = state
        mib_down = sum(state.bytes_down.values()) / 2**20
        log(INFO, "configure_train: %d nodes, %.2f MiB down in total", len(state.messages), mib_down)
        return state.messages

    def check_reply(self, reply: Message) -> None:
        """Check one train reply as it arrives; :meth:`aggregate_train` then reuses the verdict.

        Called by a Grid that hands over replies one by one (:func:`~.rounds.streams_replies`
        says which do). The checks read only the reply, the plan and the
        global model before this round, none of which changes until ``aggregate_train``.
        """
        state, plan = self.round, self.plan
        if state is None or plan is None or not reply.metadata.message_id:
            return
        node = reply_node(reply, sent_message_ids(state.messages))
        expected = partial(selection_of, plan, self.model.tensors)
        try:
            verdict = check_reply(reply, state.server_round, self.membership.node_to_device.get(node), expected)
        except Exception as error:  # noqa: BLE001 - never lose a pulled reply: aggregate_train checks it again
            log(WARNING, "check_reply: reply %s left to aggregate_train (%r)", reply.metadata.message_id, error)
            return
        if verdict is not None:
            state.checked[reply.metadata.message_id] = verdict

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Grouped example-weighted mean over accepted replies; returns the full global model.

        A round that cannot be applied returns ``None`` and its metrics; ``self.round.failure``
        says why (:func:`~.rounds.train_with_retries` retries it).
        """
        plan = self.plan
        if plan is None or self.versions is None:
            raise RuntimeError("aggregate_train before configure_train")
        if self.round is None or self.round.server_round != server_round:
            self.round = RoundState(server_round, time.perf_counter(), self.round_transport)
        state = self.round
        sent_ids = sent_message_ids(state.messages)
        state.messages = []  # they hold the round's whole download: no need to keep it longer
        by_node = sorted(
            ((reply_node(m, sent_ids), m) for m in replies),
            key=lambda item: (self.membership.node_to_device.get(item[0], 1 << 62), item[0]),
        )
        expected = partial(selection_of, plan, self.model.tensors)
        tally = tally_replies(server_round, by_node, self.membership.node_to_device, expected, state.checked)
        failure = round_failure(state, tally, plan, self.min_replies)
        if failure is not None:
            # Nothing of this attempt is applied; what the nodes hold is now unknown or diverged.
            state.failure_kind, state.failure = failure
            self.replicas.after_round(plan, {}, tally.replied, tally.failed, state.sent)
            if state.failure_kind == TOO_FEW_REPLIES:
                self.rejections.update(tally.rejected)
            log(WARNING, "aggregate_train: round %d applies nothing (%s)", server_round, state.failure)
            return None, tally_metrics(tally, len(tally.failed | (state.sent - tally.replied)))

        agg_started = time.perf_counter()
        aggregate = member_values if state.transport == "collective" else aggregate_groups
        new = aggregate(plan.groups, tally.updates)
        self.model.update(new)
        self.versions.bump(new, server_round)
        aggregation_s = time.perf_counter() - agg_started
        self.replicas.after_round(plan, tally.updates, tally.replied, tally.failed, state.sent)
        self.rejections.update(tally.rejected)
        self.replicas.keep_states(tally.states, tally.updates)
        for device in tally.updates:
            self.membership.note_budget(device, tally.devices[device])

        events = [event for event in self.events if event["round"] == server_round]
        record = round_record(state, tally, plan, updated=len(new), aggregation_s=aggregation_s, events=events)
        self.history.append(record.to_row())
        counts = (len(tally.updates), len(record.missing), sum(tally.rejected.values()), len(new), aggregation_s)
        log(INFO, "aggregate_train: %d accepted, %d missing, %d rejected; %d tensors updated in %.3f s", *counts)
        return self.global_record(), round_metrics(tally, record)

    # -- checkpoint --------------------------------------------------------------------------------
    def save(self, path: str | Path, server_round: int) -> Path:
        """Write the checkpoint of ``server_round`` atomically."""
        written = save_checkpoint(path, checkpoint_state(self, server_round))
        log(INFO, "checkpoint: round %d written to %s", server_round, written)
        return written

    # -- evaluate: centralized only (evaluate_fn) --------------------------------------------------
    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """No federated evaluation: DSparse evaluates centrally through ``evaluate_fn``."""
        return []

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Nothing to aggregate (see :meth:`configure_evaluate`)."""
        return None
