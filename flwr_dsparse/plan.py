"""The Plan: who trains what, and which exchanges that implies.

A :class:`Plan` is immutable, deterministic and serialisable to JSON. It is
the one contract between the planner, the Flower strategy and the collective
transport: every device gets a selection of units, and the units are grouped by
the exact set of devices that trains them. Each group implies

* an **AllReduce** among its members (average what they trained), and
* a **Broadcast** from one root member to every device outside the group.

Units that share the same member set are fused into one group, which is the
paper's gradient fusion at the level of the plan.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from .sizes import MB
from .units import Unit, compress_unit_names, validate_unit_names

__all__ = [
    "MemoryEstimate",
    "DevicePlan",
    "AllReduceTask",
    "BroadcastTask",
    "Group",
    "Plan",
    "format_plan",
    "plan_from_selections",
]


@dataclass(frozen=True)
class MemoryEstimate:
    """Predicted training memory of one selection, in MB (MiB), by part."""

    weights: float
    grads: float
    optimizer: float
    activations: float
    workspace: float
    reserve: float

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optimizer + self.activations + self.workspace + self.reserve

    def to_dict(self) -> dict[str, float]:
        parts = asdict(self)
        parts["total"] = self.total
        return parts  # unrounded, so a plan survives a JSON round trip unchanged

    @classmethod
    def from_dict(cls, data: Mapping[str, float]) -> MemoryEstimate:
        return cls(
            **{
                key: float(data[key])
                for key in ("weights", "grads", "optimizer", "activations", "workspace", "reserve")
            }
        )


@dataclass(frozen=True)
class DevicePlan:
    """What one device trains."""

    id: int
    budget_mb: float
    batch_size: int
    units: tuple[str, ...]
    params: tuple[str, ...]
    predicted_mb: MemoryEstimate | None = None
    predicted_step_s: float | None = None
    score: float = 0.0

    @property
    def inference_only(self) -> bool:
        return not self.units


@dataclass(frozen=True)
class AllReduceTask:
    """Average the group's tensors among its members."""

    members: tuple[int, ...]
    bytes: int


@dataclass(frozen=True)
class BroadcastTask:
    """Send the group's averaged tensors from ``root`` to every non-member."""

    root: int
    receivers: tuple[int, ...]
    bytes: int


@dataclass(frozen=True)
class Group:
    """Units trained by exactly the same set of devices, exchanged as one fused buffer."""

    members: tuple[int, ...]
    units: tuple[str, ...]
    params: tuple[str, ...]
    buffers: tuple[str, ...]
    allreduce: AllReduceTask
    broadcast: BroadcastTask

    @property
    def tensors(self) -> tuple[str, ...]:
        return self.params + self.buffers


@dataclass(frozen=True)
class Plan:
    """An immutable DSparse plan.

    Attributes
    ----------
    unit_names : tuple[str, ...]
        All units of the model, in forward order.
    devices : tuple[DevicePlan, ...]
        One entry per device, sorted by id.
    groups : tuple[Group, ...]
        Distinct member sets, ordered by their first unit.
    frozen_units : tuple[str, ...]
        Units no device trains; they never change and never travel after start.
    meta : dict
        Free-form provenance (model, input shape, scorer …), part of the digest.
    """

    unit_names: tuple[str, ...]
    devices: tuple[DevicePlan, ...]
    groups: tuple[Group, ...]
    frozen_units: tuple[str, ...]
    meta: Mapping[str, Any] = field(default_factory=dict)

    def device(self, device_id: int) -> DevicePlan:
        for device in self.devices:
            if device.id == device_id:
                return device
        raise KeyError(f"device {device_id} is not in the plan (devices: {[d.id for d in self.devices]})")

    @property
    def device_ids(self) -> tuple[int, ...]:
        return tuple(device.id for device in self.devices)

    def groups_of(self, device_id: int) -> tuple[Group, ...]:
        """Groups the device is a member of (it trains their units)."""
        return tuple(group for group in self.groups if device_id in group.members)

    def to_dict(self) -> dict[str, Any]:
        return {
            "unit_names": list(self.unit_names),
            "devices": [
                {
                    "id": d.id,
                    "budget_mb": d.budget_mb,
                    "batch_size": d.batch_size,
                    "units": list(d.units),
                    "params": list(d.params),
                    "predicted_mb": d.predicted_mb.to_dict() if d.predicted_mb else None,
                    "predicted_step_s": d.predicted_step_s,
                    "score": d.score,
                }
                for d in self.devices
            ],
            "groups": [
                {
                    "members": list(g.members),
                    "units": list(g.units),
                    "params": list(g.params),
                    "buffers": list(g.buffers),
                    "allreduce": {"members": list(g.allreduce.members), "bytes": g.allreduce.bytes},
                    "broadcast": {
                        "root": g.broadcast.root,
                        "receivers": list(g.broadcast.receivers),
                        "bytes": g.broadcast.bytes,
                    },
                }
                for g in self.groups
            ],
            "frozen_units": list(self.frozen_units),
            "meta": dict(self.meta),
        }

    def to_json(self, *, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, sort_keys=True)

    def digest(self) -> str:
        """SHA-256 of the canonical JSON; equal plans have equal digests on every machine."""
        return hashlib.sha256(self.to_json(indent=None).encode()).hexdigest()

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Plan:
        try:
            devices = tuple(
                DevicePlan(
                    id=int(d["id"]),
                    budget_mb=float(d["budget_mb"]),
                    batch_size=int(d["batch_size"]),
                    units=tuple(d["units"]),
                    params=tuple(d["params"]),
                    predicted_mb=MemoryEstimate.from_dict(d["predicted_mb"]) if d.get("predicted_mb") else None,
                    predicted_step_s=d.get("predicted_step_s"),
                    score=float(d.get("score", 0.0)),
                )
                for d in data["devices"]
            )
            groups = tuple(
                Group(
                    members=tuple(int(m) for m in g["members"]),
                    units=tuple(g["units"]),
                    params=tuple(g["params"]),
                    buffers=tuple(g.get("buffers", ())),
                    allreduce=AllReduceTask(
                        tuple(int(m) for m in g["allreduce"]["members"]), int(g["allreduce"]["bytes"])
                    ),
                    broadcast=BroadcastTask(
                        int(g["broadcast"]["root"]),
                        tuple(int(r) for r in g["broadcast"]["receivers"]),
                        int(g["broadcast"]["bytes"]),
                    ),
                )
                for g in data["groups"]
            )
            return cls(
                tuple(data["unit_names"]), devices, groups, tuple(data["frozen_units"]), dict(data.get("meta", {}))
            )
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"malformed plan JSON ({error!r}); regenerate it with `dsparse plan --json`") from error

    @classmethod
    def from_json(cls, text: str) -> Plan:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"plan is not valid JSON ({error}); regenerate it with `dsparse plan --json`") from error
        return cls.from_dict(data)


def plan_from_selections(
    units: Sequence[Unit],
    selections: Mapping[int, Sequence[str]],
    tensor_bytes: Mapping[str, int],
    *,
    budgets_mb: Mapping[int, float] | None = None,
    batch_sizes: Mapping[int, int] | None = None,
    estimates: Mapping[int, MemoryEstimate] | None = None,
    step_seconds: Mapping[int, float] | None = None,
    scores: Mapping[int, float] | None = None,
    meta: Mapping[str, Any] | None = None,
) -> Plan:
    """Build a :class:`Plan` from given selections (the grouping half of planning).

    Parameters
    ----------
    units : Sequence[Unit]
        All units of the model, in forward order.
    selections : Mapping[int, Sequence[str]]
        Device id to the unit names it trains (empty: inference only).
    tensor_bytes : Mapping[str, int]
        Size in bytes of every parameter and buffer, by name.
    budgets_mb, batch_sizes, estimates, step_seconds, scores : Mapping, optional
        Per-device annotations carried into the plan.
    meta : Mapping, optional
        Provenance stored in the plan.

    Returns
    -------
    Plan
        Devices sorted by id; one group per distinct member set, ordered by its
        first unit; the broadcast root of a group is its smallest member id.
    """
    unit_names = [unit.name for unit in units]
    device_ids = sorted(selections)
    for device_id in device_ids:
        validate_unit_names(list(selections[device_id]), unit_names)

    members_of_unit: dict[str, tuple[int, ...]] = {
        unit.name: tuple(d for d in device_ids if unit.name in set(selections[d])) for unit in units
    }
    by_members: dict[tuple[int, ...], list[Unit]] = {}
    for unit in units:  # forward order, so groups come out ordered by their first unit
        members = members_of_unit[unit.name]
        if members:
            by_members.setdefault(members, []).append(unit)

    groups = []
    for members, group_units in by_members.items():
        params = tuple(p for unit in group_units for p in unit.param_names)
        buffers = tuple(b for unit in group_units for b in unit.buffer_names)
        fused = sum(int(tensor_bytes[name]) for name in params + buffers)
        receivers = tuple(d for d in device_ids if d not in members)
        groups.append(
            Group(
                members=members,
                units=tuple(unit.name for unit in group_units),
                params=params,
                buffers=buffers,
                allreduce=AllReduceTask(members, fused),
                broadcast=BroadcastTask(members[0], receivers, fused if receivers else 0),
            )
        )

    devices = []
    for device_id in device_ids:
        chosen = set(selections[device_id])
        ordered = tuple(unit.name for unit in units if unit.name in chosen)
        params = tuple(p for unit in units if unit.name in chosen for p in unit.param_names)
        devices.append(
            DevicePlan(
                id=int(device_id),
                budget_mb=float((budgets_mb or {}).get(device_id, 0.0)),
                batch_size=int((batch_sizes or {}).get(device_id, 0)),
                units=ordered,
                params=params,
                predicted_mb=(estimates or {}).get(device_id),
                predicted_step_s=(step_seconds or {}).get(device_id),
                score=float((scores or {}).get(device_id, 0.0)),
            )
        )
    frozen = tuple(name for name in unit_names if not members_of_unit[name])
    return Plan(tuple(unit_names), tuple(devices), tuple(groups), frozen, dict(meta or {}))


def format_plan(plan: Plan, sources: Mapping[int, str] | None = None) -> str:
    """The ``dsparse plan`` table: a summary line, one row per device, then the groups.

    ``sources`` maps a device id to where its budget came from (``node-config memory-mb``,
    ``sim-budgets-mb``, ``psutil …``); when given, the table has a ``budget source`` column.
    """
    source_header = f" {'budget source':<24}" if sources is not None else ""
    lines = [
        f"dsparse plan {plan.digest()[:12]}: {len(plan.devices)} devices, {len(plan.groups)} groups, "
        f"{len(plan.frozen_units)} units frozen for all",
        f"{'device':>6} {'budget':>7}{source_header} {'weights':>8} {'grads':>6} {'optim':>6} {'activ':>7} "
        f"{'work':>6} {'reserve':>7} {'total':>7} {'step s':>7}  trains",
    ]
    for d in plan.devices:
        p = d.predicted_mb
        numbers = (
            f"{p.weights:8.1f} {p.grads:6.1f} {p.optimizer:6.1f} {p.activations:7.1f} {p.workspace:6.1f} "
            f"{p.reserve:7.1f} {p.total:7.1f}"
            if p
            else " " * 52
        )
        step = f"{d.predicted_step_s:7.3f}" if d.predicted_step_s is not None else " " * 7
        source = f" {(sources or {}).get(d.id) or '-':<24}" if sources is not None else ""
        lines.append(
            f"{d.id:>6} {d.budget_mb:7.1f}{source} {numbers} {step}  {compress_unit_names(d.units, plan.unit_names)}"
        )
    lines.append("")
    lines.append(f"{'group':>5} {'members':18s} {'MB/exchange':>11} {'broadcast':24s} units")
    for index, g in enumerate(plan.groups):
        broadcast = f"{g.broadcast.root} -> {list(g.broadcast.receivers)}" if g.broadcast.receivers else "-"
        lines.append(
            f"{index:>5} {str(list(g.members)):18s} {g.allreduce.bytes / MB:11.2f} {broadcast:24s} "
            f"{compress_unit_names(g.units, plan.unit_names)}"
        )
    frozen = compress_unit_names(plan.frozen_units, plan.unit_names) if plan.frozen_units else "-"
    lines.append(f"frozen for everyone: {frozen}")
    return "\n".join(lines)
