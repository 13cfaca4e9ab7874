"""The wire protocol between the DSparse ServerApp and ClientApp: every record key, named once.

Three message kinds travel (Flower's :class:`~flwr.app.MessageType`):

* ``QUERY`` (round 0, and a node that joins later). Down: the job's run_config as the
  ``config`` ConfigRecord. Up: :class:`QueryReply` (``metrics``, plus the budget's source in
  ``config``).
* ``TRAIN``. Down: the tensors the node's replica lacks (``arrays``), the job's run_config
  (``config``), this round's :class:`TrainControl` (``control``), and, when the server
  restores it, the node's momentum (``optimizer``). Up: the node's selected tensors
  (``arrays``), :class:`TrainReport` (``metrics``) and, when asked, its momentum.
* ``EVALUATE`` is not used: DSparse evaluates centrally.

Job keys (the run_config, parsed by :func:`flwr_dsparse.config.load_config`) and control keys
(what the server decides per round) travel in two ConfigRecords, so neither can shadow the
other. Flower's own FedAvg (the baseline) sends only ``arrays`` and ``config``, with its
``server-round`` inside ``config``: :func:`read_train_message` reads both forms.

The node's own durable state (``context.state``) uses the ``STATE_*`` names, and what a
node is told at start (its ``node_config``) the ``NODE_*`` names.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

__all__ = [
    "ARRAYS",
    "CONFIG",
    "CONTROL",
    "CONTROL_KEYS",
    "FEDAVG_ROUND_KEY",
    "FUSED",
    "FUSED_STYPE",
    "METRICS",
    "NODE_MEMORY_MB",
    "NODE_NUM_PARTITIONS",
    "NODE_PARTITION_ID",
    "OPTIMIZER",
    "STATE_META",
    "STATE_MOMENTUM",
    "STATE_REPLICA",
    "DeviceReport",
    "QueryReply",
    "REPORT_EXAMPLES_KEY",
    "REPORT_LOSS_KEY",
    "REPORT_PARTITION_KEY",
    "REPORT_ROUND_KEY",
    "TrainControl",
    "TrainReport",
    "query_content",
    "read_device_report",
    "read_train_message",
    "train_content",
    "train_reply_content",
]

# -- record names inside a Message's RecordDict ------------------------------------------------
ARRAYS = "arrays"  # ArrayRecord: model tensors (down: what the replica lacks; up: the selection)
CONFIG = "config"  # ConfigRecord: the job's run_config down; the budget's source up (query)
CONTROL = "control"  # ConfigRecord: TrainControl, this round's server decisions
METRICS = "metrics"  # MetricRecord: QueryReply or TrainReport
OPTIMIZER = "optimizer"  # ArrayRecord: the node's momentum buffers, by parameter name

#: The key under which Flower's FedAvg puts the round number into ``config``.
FEDAVG_ROUND_KEY = "server-round"

# -- inside an ArrayRecord: a fused record (flwr_dsparse.records.fuse_record) -----------------------
# Flower 1.42 moves every Array as objects of its own (one request each, per hop), so the
# DSparse messages and the node's state carry one Array instead: every dtype's buffer and the
# layout in one byte string.
FUSED = "dsparse.fused"  # the one Array (stype FUSED_STYPE) of a fused record
FUSED_STYPE = "dsparse.fused+v2"

# -- the node's context.state ---------------------------------------------------------------------
STATE_REPLICA = "dsparse.replica"  # ArrayRecord: the node's copy of the global model
STATE_MOMENTUM = "dsparse.momentum"  # ArrayRecord: its momentum buffers
STATE_META = "dsparse.meta"  # ConfigRecord: its last selection and batch cursor

# -- the node's node_config (`flower-supernode --node-config`, or the simulation's) ---------------
NODE_PARTITION_ID = "partition-id"  # int: which data partition (and device) the node is; Flower's own key
NODE_NUM_PARTITIONS = "num-partitions"  # int: how many partitions there are; Flower's own key
NODE_MEMORY_MB = "memory-mb"  # float: the device's training budget, when its owner states it


def _wire(name: str) -> str:
    """A dataclass field's key on the wire: ``server_round`` -> ``server-round`` (run_config style)."""
    return name.replace("_", "-")


def _to_wire(instance: Any, skip_none: bool = True) -> dict[str, Any]:
    out = {}
    for item in dataclasses.fields(instance):
        value = getattr(instance, item.name)
        if value is None and skip_none:
            continue
        out[_wire(item.name)] = value
    return out


def _from_wire(cls: type, record: Mapping[str, Any], what: str) -> Any:
    """Build ``cls`` from a record, coercing each field to its declared type; a bad record raises
    ``ValueError`` naming the key."""
    values = {}
    for item in dataclasses.fields(cls):
        key = _wire(item.name)
        if key not in record:
            if item.default is dataclasses.MISSING:
                raise ValueError(f"{what} lacks {key!r}")
            continue
        value = record[key]
        kind = item.type if isinstance(item.type, str) else item.type.__name__
        try:
            if kind.startswith("int"):
                if isinstance(value, bool) or float(value) != int(value):
                    raise ValueError
                value = int(value)
            elif kind.startswith("float"):
                if isinstance(value, bool):
                    raise ValueError
                value = float(value)
            elif kind.startswith("bool"):
                if not isinstance(value, bool):
                    raise ValueError
            elif kind.startswith("str"):
                value = str(value)
        except (TypeError, ValueError):
            raise ValueError(f"{what}: {key!r} is {value!r}, not a {kind.split(' ')[0]}") from None
        values[item.name] = value
    return cls(**values)


# -- query -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class QueryReply:
    """A node's answer to the memory query: who it is and what it can afford."""

    partition_id: int
    budget_mb: float
    batch_size: int
    num_examples: int
    budget_source: str = ""

    def content(self) -> RecordDict:
        metrics = _to_wire(self)
        source = metrics.pop("budget-source")
        return RecordDict({METRICS: MetricRecord(metrics), CONFIG: ConfigRecord({"budget-source": source})})


@dataclass(frozen=True)
class DeviceReport:
    """One node's query reply, as the strategy keeps it: the Flower node id and its device."""

    node_id: int
    device: int
    budget_mb: float
    batch_size: int
    num_examples: int
    budget_source: str = ""


def query_content(job: Mapping[str, Any]) -> RecordDict:
    """The query's content: the job's run_config (what a node needs to answer)."""
    return RecordDict({CONFIG: ConfigRecord(dict(job))})


def read_device_report(message: Message, node: int | None = None) -> DeviceReport:
    """Parse a query reply; raise ``ValueError`` naming the node if it is malformed or an error.

    ``node`` is the node the reply is about; default its source.
    """
    node = message.metadata.src_node_id if node is None else node
    if message.has_error():
        raise ValueError(f"node {node} could not answer the memory query: {message.error.reason}")
    try:
        fields = dict(message.content[METRICS])
        fields.update(message.content.config_records.get(CONFIG, ConfigRecord()))
        reply = _from_wire(QueryReply, fields, f"node {node}'s query reply")
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"node {node} sent a malformed query reply ({error})") from error
    return DeviceReport(
        node, reply.partition_id, reply.budget_mb, reply.batch_size, reply.num_examples, reply.budget_source
    )


# -- train -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrainControl:
    """What the server decides for one node in one round (the ``control`` ConfigRecord).

    Attributes
    ----------
    server_round : int
        The round this message belongs to; the reply must carry it back.
    selection : str, optional
        Comma-separated unit names the node trains; absent when unchanged since its last
        message (the node keeps its own copy).
    send_state : bool
        Return the momentum buffers with the reply (the server keeps them for a checkpoint).
    round_transport : str
        ``"server"`` (grouped mean at the server) or ``"collective"`` (gloo among the nodes).
    plan, rank, world_size, collective_addr, collective_port
        The collective round's plan JSON, this node's rank and the rendezvous.
    """

    server_round: int
    selection: str | None = None
    send_state: bool = False
    round_transport: str = "server"
    plan: str = ""
    rank: int = -1
    world_size: int = 0
    collective_addr: str = ""
    collective_port: int = 0

    @property
    def units(self) -> list[str] | None:
        """The selection as unit names, or ``None`` when the server sent none."""
        return None if self.selection is None else [name for name in self.selection.split(",") if name]


#: Every control key, as it travels (derived from :class:`TrainControl`).
CONTROL_KEYS = tuple(_wire(item.name) for item in dataclasses.fields(TrainControl))


def train_content(
    arrays: ArrayRecord, job: Mapping[str, Any], control: TrainControl, state: ArrayRecord | None = None
) -> RecordDict:
    """A train message's content (see the module docstring); the tensors travel fused."""
    from .records import fuse_record  # records reads this module's keys

    content = RecordDict(
        {ARRAYS: fuse_record(arrays), CONFIG: ConfigRecord(dict(job)), CONTROL: ConfigRecord(_to_wire(control))}
    )
    if state is not None:
        content[OPTIMIZER] = fuse_record(state)
    return content


def read_train_message(message: Message) -> tuple[dict[str, Any], TrainControl]:
    """The job's run_config and this round's control, from a DSparse or a Flower FedAvg message."""
    content = message.content
    job = dict(content[CONFIG])
    if CONTROL in content.config_records:
        return job, _from_wire(TrainControl, content[CONTROL], "the train message's control record")
    if FEDAVG_ROUND_KEY not in job:
        raise ValueError(f"train message has neither a {CONTROL!r} record nor {FEDAVG_ROUND_KEY!r} in {CONFIG!r}")
    return job, TrainControl(server_round=int(job.pop(FEDAVG_ROUND_KEY)))


@dataclass(frozen=True)
class TrainReport:
    """A node's figures for one round (the reply's ``metrics``).

    ``budget_mb`` is the node's current budget, so the server re-plans a node whose memory
    dropped; ``peak_rss_mb`` the process's peak resident memory. ``state_source`` says where
    the node's model came from (:data:`STATE_SOURCES`): what each round's misses cost shows in
    the history, per node.
    """

    server_round: int
    partition_id: int
    num_examples: int
    train_loss: float
    step_seconds: float
    peak_rss_mb: float
    bytes_recv: int
    bytes_sent: int
    budget_mb: float
    state_source: int = 0

    def record(self) -> MetricRecord:
        return MetricRecord(_to_wire(self))


#: ``TrainReport.state_source``: the node's model was loaded from its durable copy (a miss, and
#: every FedAvg round), was its process's live copy, or a live copy refreshed from the replica store.
STATE_LOADED, STATE_LIVE, STATE_REFRESHED = 0, 1, 2
STATE_SOURCES = {STATE_LOADED: "loaded", STATE_LIVE: "live", STATE_REFRESHED: "refreshed"}

#: The reply's metric keys the server checks before it decodes anything (a stale round, the
#: example count), derived from :class:`TrainReport` like every other key.
REPORT_ROUND_KEY = _wire("server_round")
REPORT_EXAMPLES_KEY = _wire("num_examples")
#: ... and those the server's history reads from every reply (FedAvg's too).
REPORT_PARTITION_KEY = _wire("partition_id")
REPORT_LOSS_KEY = _wire("train_loss")


def train_reply_content(arrays: ArrayRecord, report: TrainReport, state: ArrayRecord | None = None) -> RecordDict:
    """A train reply's content: the selected tensors, the figures and (when asked) the momentum.

    The records go as given: the ClientApp fuses them for DSparse, and answers Flower's
    FedAvg (which averages by array name) with one array per tensor.
    """
    content = RecordDict({ARRAYS: arrays, METRICS: report.record()})
    if state is not None:
        content[OPTIMIZER] = state
    return content
