"""Reply validation: nothing a node sends is applied before it passes every check here.

A train reply is rejected (never applied, counted by kind) when it is for another round,
is malformed, is larger on the wire than its selection can be, does not decode, carries
tensors outside the device's selection or lacks some, has a wrong shape or dtype, holds
NaN or Inf, reports a non-positive example count, or carries optimizer state outside its
selection. The checks are pure functions of the reply and what the server expects.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from logging import WARNING
from typing import Any

import torch
from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.supercore import log

from ..exchange import TensorSpec, Update, tensor_specs
from ..plan import Plan
from ..protocol import ARRAYS, METRICS, OPTIMIZER, REPORT_EXAMPLES_KEY, REPORT_ROUND_KEY
from ..records import from_array_record, record_nbytes, tensor_nbytes

__all__ = [
    "HEADER_ALLOWANCE",
    "REJECTION_KINDS",
    "AcceptedReply",
    "ReplyRejected",
    "accept_train_reply",
    "check_optimizer_state",
    "check_reply",
    "ReplyTally",
    "check_update",
    "collective_mismatch",
    "payload_nbytes",
    "reply_node",
    "selection_of",
    "sent_message_ids",
    "tally_metrics",
    "tally_replies",
]

# The .npy header of one array on the wire is ~128 bytes; anything beyond the selection's
# raw bytes plus this per array is an oversize payload.
HEADER_ALLOWANCE = 1024

REJECTION_KINDS = (
    "unexpected-tensors",
    "missing-tensors",
    "shape",
    "dtype",
    "non-finite",
    "examples",
    "duplicate",
    "stale-round",
    "unknown-node",
    "malformed",
    "oversize",
    "optimizer-state",
)


class ReplyRejected(ValueError):
    """A reply that must not be applied; ``kind`` is one of :data:`REJECTION_KINDS`."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def all_finite(tensor: torch.Tensor) -> bool:
    """No NaN or Inf in ``tensor``: exactly ``torch.isfinite(tensor).all()``, about 10x faster.

    A NaN or Inf makes the sum non-finite, so a finite sum (in the tensor's own dtype: one pass,
    nothing widened) proves the tensor finite; only a non-finite sum, which finite values can
    also give by overflowing, takes the direct test.
    """
    if not tensor.dtype.is_floating_point:
        return True
    return math.isfinite(tensor.sum().item()) or bool(torch.isfinite(tensor).all())


def check_update(
    device: int,
    tensors: Mapping[str, torch.Tensor],
    examples: object,
    expected: Mapping[str, TensorSpec],
) -> Update:
    """Accept a device's reply as an :class:`Update`, or raise :class:`ReplyRejected`.

    Parameters
    ----------
    device : int
        The device (partition id) that sent it, for messages.
    tensors : Mapping[str, torch.Tensor]
        The tensors it sent.
    examples : object
        Its reported example count; must be a positive integer.
    expected : Mapping[str, TensorSpec]
        Exactly the tensors of its selection, with their global shape and dtype.
    """
    extra = sorted(set(tensors) - set(expected))
    if extra:
        raise ReplyRejected(
            "unexpected-tensors",
            f"device {device} sent {len(extra)} tensor(s) outside its selection, e.g. {extra[:3]}",
        )
    absent = [name for name in expected if name not in tensors]
    if absent:
        raise ReplyRejected(
            "missing-tensors", f"device {device} left out {len(absent)} selected tensor(s), e.g. {absent[:3]}"
        )
    for name, spec in expected.items():
        tensor = tensors[name]
        if tuple(tensor.shape) != spec.shape:
            raise ReplyRejected(
                "shape", f"device {device} sent {name} with shape {tuple(tensor.shape)}, expected {spec.shape}"
            )
        if tensor.dtype != spec.dtype:
            raise ReplyRejected("dtype", f"device {device} sent {name} as {tensor.dtype}, expected {spec.dtype}")
        if tensor.dtype.is_floating_point and not all_finite(tensor):
            raise ReplyRejected("non-finite", f"device {device} sent NaN or Inf in {name}")
    if (
        isinstance(examples, bool)
        or not isinstance(examples, (int, float))
        or examples != int(examples)
        or examples <= 0
    ):
        raise ReplyRejected(
            "examples", f"device {device} reported num-examples={examples!r}; it must be a positive integer"
        )
    return Update(device, int(examples), dict(tensors))


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


def _size_limit(tensors: Mapping[str, torch.Tensor]) -> int:
    return tensor_nbytes(tensors) + HEADER_ALLOWANCE * max(len(tensors), 1)


@dataclass(frozen=True)
class AcceptedReply:
    """A train reply that passed every check."""

    update: Update
    metrics: dict[str, Any]
    state: dict[str, torch.Tensor] | None


def accept_train_reply(
    message: Message,
    server_round: int,
    device: int,
    selected: Mapping[str, torch.Tensor],
    params: Iterable[str],
) -> AcceptedReply:
    """Check one train reply of ``device``, or raise :class:`ReplyRejected`.

    Parameters
    ----------
    message : Message
        The reply (not an error reply).
    server_round : int
        The round being aggregated.
    selected : Mapping[str, torch.Tensor]
        The global values of exactly the device's selected tensors (their shapes and
        dtypes are what the reply must carry).
    params : Iterable[str]
        The device's selected parameters: the only names its optimizer state may hold.
    """
    group_id = message.metadata.group_id
    if group_id and group_id != str(server_round):
        raise ReplyRejected("stale-round", f"device {device} replied for round {group_id} during round {server_round}")
    content = message.content
    if not {ARRAYS} <= set(content.array_records) <= {ARRAYS, OPTIMIZER} or METRICS not in content.metric_records:
        raise ReplyRejected(
            "malformed",
            f"device {device} replied with records {sorted(content.keys())}; expected '{ARRAYS}' and '{METRICS}'",
        )
    metrics = dict(content[METRICS].items())
    reported = metrics.get(REPORT_ROUND_KEY)
    if reported != server_round:
        raise ReplyRejected(
            "stale-round", f"device {device} reported {REPORT_ROUND_KEY} {reported!r} during round {server_round}"
        )
    # Checked on the wire size, before decoding: an oversize payload is never unpacked.
    wire, limit = content[ARRAYS].count_bytes(), _size_limit(selected)
    if wire > limit:
        raise ReplyRejected(
            "oversize", f"device {device} sent {wire} bytes, beyond the {limit} bytes its selection can take"
        )
    try:
        # Views of the wire bytes (no copy): a reply is only read, checked and averaged.
        tensors = from_array_record(content[ARRAYS], writable=False)
    except Exception as error:  # an undecodable payload is a bad reply, not a crash
        raise ReplyRejected("malformed", f"device {device} sent arrays that do not decode ({error!r})") from error
    update = check_update(device, tensors, metrics.get(REPORT_EXAMPLES_KEY), tensor_specs(selected))
    state = None
    if OPTIMIZER in content.array_records:
        state = check_optimizer_state(device, content[OPTIMIZER], {name: selected[name] for name in params})
    return AcceptedReply(update, metrics, state)


def check_optimizer_state(
    device: int, record: ArrayRecord, params: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """A reply's optimizer state: only the device's selected parameters, their shapes, finite."""
    if record.count_bytes() > _size_limit(params):
        raise ReplyRejected("optimizer-state", f"device {device} sent an optimizer state beyond its selection's size")
    try:
        state = from_array_record(record, writable=False)
    except Exception as error:
        raise ReplyRejected(
            "optimizer-state", f"device {device} sent an optimizer state that does not decode"
        ) from error
    for name, tensor in state.items():
        if name not in params or tuple(tensor.shape) != tuple(params[name].shape):
            raise ReplyRejected(
                "optimizer-state", f"device {device} sent optimizer state for {name!r} outside its selection"
            )
        if not all_finite(tensor):
            raise ReplyRejected("optimizer-state", f"device {device} sent NaN or Inf in the optimizer state of {name}")
    return state


def payload_nbytes(message: Message) -> int:
    """Raw tensor bytes a reply carried (0 for what does not decode: it still arrived)."""
    try:
        return sum(record_nbytes(record) for record in message.content.array_records.values())
    except Exception:
        return 0


def selection_of(
    plan: Plan, global_tensors: Mapping[str, torch.Tensor], device: int
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """What ``device``'s reply must match: the global values of its selected tensors, and its
    selected parameters (the only names its optimizer state may hold)."""
    tensors = [name for group in plan.groups_of(device) for name in group.tensors]
    params = [name for group in plan.groups_of(device) for name in group.params]
    return {name: global_tensors[name] for name in tensors}, params


@dataclass
class ReplyTally:
    """One round's replies, sorted out: what is applied, and what each device's row records."""

    updates: dict[int, Update]
    states: dict[int, dict[str, torch.Tensor] | None]
    devices: dict[int, dict[str, Any]]
    rejected: Counter[str]
    failed: set[int]
    replied: set[int]


def tally_replies(
    server_round: int,
    replies: Iterable[tuple[int, Message]],
    node_to_device: Mapping[int, int],
    expected: Callable[[int], tuple[Mapping[str, torch.Tensor], list[str]]],
    checked: Mapping[str, AcceptedReply | ReplyRejected] | None = None,
) -> ReplyTally:
    """Check every ``(node, reply)`` of a round (sorted by device id by the caller).

    ``expected(device)`` gives the global values of the device's selected tensors and its
    selected parameters (see :func:`accept_train_reply`). An error reply makes its device
    ``missing``; a reply from a node outside the plan, a second reply of one node, and every
    reply failing a check are rejected, counted by kind, and never applied. ``checked``
    holds :func:`check_reply`'s verdicts by reply message id, reached while other nodes
    still trained; a reply without one is checked here.
    """
    replies = list(replies)
    per_node = Counter(node for node, _ in replies)
    tally = ReplyTally({}, {}, {}, Counter(), set(), set())
    for node, message in replies:
        device = node_to_device.get(node)
        if device is None:
            tally.rejected["unknown-node"] += 1
            log(WARNING, "aggregate_train: rejected a reply from node %d, which is not in the plan", node)
            continue
        row = tally.devices.setdefault(device, {"status": "ok"})
        if message.has_error():
            tally.failed.add(device)
            row.update(status="missing", error=message.error.reason)
            log(WARNING, "aggregate_train: device %d failed: %s", device, message.error.reason)
            continue
        tally.replied.add(device)
        row["bytes-up"] = row.get("bytes-up", 0) + payload_nbytes(message)
        try:
            if per_node[node] > 1:
                # Which of two replies is genuine cannot be told, so neither is applied.
                raise ReplyRejected(
                    "duplicate", f"device {device} sent {per_node[node]} replies in round {server_round}"
                )
            verdict = (checked or {}).get(message.metadata.message_id) or check_reply(
                message, server_round, device, expected
            )
            if isinstance(verdict, ReplyRejected):
                raise verdict
            assert verdict is not None  # error replies and unknown nodes were sorted out above
            accepted = verdict
        except ReplyRejected as rejection:
            tally.rejected[rejection.kind] += 1
            row["status"] = f"rejected:{rejection.kind}"
            tally.updates.pop(device, None)
            tally.states.pop(device, None)
            log(WARNING, "aggregate_train: rejected reply: %s", rejection)
            continue
        tally.updates[device] = accepted.update
        tally.states[device] = accepted.state
        row.update({key: float(value) for key, value in accepted.metrics.items() if isinstance(value, (int, float))})
        if accepted.state is not None:
            row["bytes-up-state"] = record_nbytes(message.content[OPTIMIZER])
    return tally


def check_reply(
    message: Message,
    server_round: int,
    device: int | None,
    expected: Callable[[int], tuple[Mapping[str, torch.Tensor], list[str]]],
) -> AcceptedReply | ReplyRejected | None:
    """:func:`accept_train_reply`'s verdict on one reply, for :func:`tally_replies` to reuse.

    ``None`` where the tally decides alone: an error reply, or a node outside the plan
    (``device`` is ``None``). Pure: the same reply, round and expected values give the same
    verdict, whether it is reached as the reply arrives or at the round's end.
    """
    if device is None or message.has_error():
        return None
    try:
        return accept_train_reply(message, server_round, device, *expected(device))
    except ReplyRejected as rejection:
        return rejection


def collective_mismatch(
    plan: Plan, updates: Mapping[int, Update], missing: Sequence[int], devices: Mapping[int, Mapping[str, Any]]
) -> str:
    """Why a collective round cannot be applied ('' if it can): a missing member, or members that differ."""
    if missing:
        reasons = {d: devices.get(d, {}).get("error", "no reply") for d in missing}
        return f"devices {list(missing)} failed the collective round: " + "; ".join(
            f"{d}: {str(r)[:300]}" for d, r in reasons.items()
        )
    rejected = sorted(d for d in plan.device_ids if d not in updates)
    if rejected:
        return f"replies of devices {rejected} were rejected"
    for index, group in enumerate(plan.groups):
        first = updates[group.members[0]].tensors
        for member in group.members[1:]:
            differing = [n for n in group.tensors if not torch.equal(updates[member].tensors[n], first[n])]
            if differing:
                return (
                    f"group {index}: device {member} returned values that differ from device "
                    f"{group.members[0]}'s in {len(differing)} tensor(s), e.g. {differing[0]}"
                )
    return ""


def tally_metrics(tally: ReplyTally, missing: int) -> MetricRecord:
    """The counts of a round's replies, as ``aggregate_train`` returns them to Flower."""
    return MetricRecord(
        {
            "num-examples": sum(u.examples for u in tally.updates.values()),
            "num-accepted": len(tally.updates),
            "num-missing": missing,
            "num-rejected": sum(tally.rejected.values()),
            **{f"rejected-{kind}": tally.rejected[kind] for kind in REJECTION_KINDS if tally.rejected[kind]},
        }
    )
