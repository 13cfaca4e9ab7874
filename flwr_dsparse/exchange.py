"""The exchange: which tensors each device lacks, and the grouped mean of what came back.

This is the pure half of the Flower strategy (no ``flwr`` import), in the style of
torch's comm hooks: small functions over explicit state.

* **Versioned delta sync (the Broadcast side).** :class:`TensorVersions` holds a
  version per global tensor and, per device, the version its replica holds. A device
  is sent exactly the tensors whose version it does not hold. Units frozen for all
  devices never change version, so they travel once.
* **Grouped mean (the AllReduce side).** :func:`aggregate_groups` averages, for each
  Plan group, the group's tensors over the members that replied, weighted by their
  example counts, with the whole group fused into one flat buffer.
* **Reply checks.** :func:`check_update` rejects an update that carries tensors
  outside the device's selection, misses some, has a wrong shape or dtype, or
  holds NaN/Inf, before anything is applied.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import torch

from .plan import Group

__all__ = [
    "TensorSpec",
    "tensor_specs",
    "TensorVersions",
    "Update",
    "fused_weighted_mean",
    "aggregate_groups",
    "ReplyRejected",
    "check_update",
    "REJECTION_KINDS",
]

# A version is the server round that last changed a tensor; 0 is the initial model.
INITIAL_VERSION = 0
_DIVERGED = -1  # the device changed its copy locally, so it matches no global version

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


@dataclass(frozen=True)
class TensorSpec:
    """Shape and dtype a tensor must have to be accepted."""

    shape: tuple[int, ...]
    dtype: torch.dtype


def tensor_specs(tensors: Mapping[str, torch.Tensor]) -> dict[str, TensorSpec]:
    return {name: TensorSpec(tuple(t.shape), t.dtype) for name, t in tensors.items()}


class TensorVersions:
    """Version of every global tensor, and the version each device's replica holds.

    Parameters
    ----------
    names : Iterable[str]
        Every tensor of the global model, in model order (the order tensors are sent in).
    """

    def __init__(self, names: Iterable[str]) -> None:
        self.current: dict[str, int] = {name: INITIAL_VERSION for name in names}
        self.held: dict[int, dict[str, int]] = {}

    @property
    def names(self) -> list[str]:
        return list(self.current)

    def missing(self, device: int) -> list[str]:
        """Tensors whose current version ``device`` does not hold, in model order."""
        held = self.held.get(device, {})
        return [name for name, version in self.current.items() if held.get(name) != version]

    def mark_held(self, device: int, names: Iterable[str]) -> None:
        """``device`` now holds the current version of ``names`` (they were sent to it)."""
        held = self.held.setdefault(device, {})
        for name in names:
            held[name] = self.current[name]

    def mark_diverged(self, device: int, names: Iterable[str]) -> None:
        """``device`` trained ``names`` locally, so its copies differ from every global version."""
        held = self.held.setdefault(device, {})
        for name in names:
            held[name] = _DIVERGED

    def forget(self, device: int) -> None:
        """Nothing is known about ``device``'s replica (it failed or is new): send it all next time."""
        self.held.pop(device, None)

    def bump(self, names: Iterable[str], version: int) -> None:
        """``names`` changed globally in round ``version``."""
        for name in names:
            self.current[name] = version

    def to_dict(self) -> dict:
        return {"current": dict(self.current), "held": {str(d): dict(h) for d, h in self.held.items()}}

    @classmethod
    def from_dict(cls, data: Mapping) -> "TensorVersions":
        versions = cls(data["current"])
        versions.current = {name: int(v) for name, v in data["current"].items()}
        versions.held = {int(d): {n: int(v) for n, v in h.items()} for d, h in data["held"].items()}
        return versions


@dataclass(frozen=True)
class Update:
    """One device's accepted training result: its example count and its selected tensors."""

    device: int
    examples: int
    tensors: Mapping[str, torch.Tensor]


def fused_weighted_mean(names: Sequence[str], updates: Sequence[Update]) -> dict[str, torch.Tensor]:
    """Example-weighted mean of ``names`` over ``updates``, as one fused buffer.

    The tensors of all ``names`` are flattened into a single float64 buffer per
    update (the fusion that lets a transport send the group as one message), then
    ``sum_i (n_i / N) * x_i`` is accumulated in update order, and the result is split
    back and cast to each tensor's dtype (integers are rounded). With one update the
    weight is exactly 1.0, so the result is bit-identical to that update.

    Parameters
    ----------
    names : Sequence[str]
        The group's tensors (parameters and buffers), in a fixed order.
    updates : Sequence[Update]
        At least one update holding every name; summed in the given order
        (callers sort by device id, for determinism).
    """
    if not updates:
        raise ValueError("fused_weighted_mean needs at least one update")
    total = sum(update.examples for update in updates)
    first = updates[0].tensors
    acc = torch.zeros(sum(first[name].numel() for name in names), dtype=torch.float64)
    for update in updates:
        flat = torch.cat([update.tensors[name].reshape(-1).to(torch.float64) for name in names])
        # Multiply then add as two IEEE operations (no fused alpha), so the result is
        # reproducible by a hand computation.
        acc += flat * (update.examples / total)
    out: dict[str, torch.Tensor] = {}
    offset = 0
    for name in names:
        like = first[name]
        piece = acc[offset : offset + like.numel()].view(like.shape)
        offset += like.numel()
        if like.dtype.is_floating_point:
            out[name] = piece.to(like.dtype)
        else:
            out[name] = piece.round().to(like.dtype)
    return out


def aggregate_groups(groups: Sequence[Group], updates: Mapping[int, Update]) -> dict[str, torch.Tensor]:
    """The grouped mean of one round: for each group, the mean over its members that replied.

    Parameters
    ----------
    groups : Sequence[Group]
        The Plan's groups.
    updates : Mapping[int, Update]
        Accepted updates by device id.

    Returns
    -------
    dict[str, torch.Tensor]
        New values of the tensors of every group with at least one reply. Tensors of
        groups without a reply, and of units nobody trains, are absent: they stay as
        they are.
    """
    new: dict[str, torch.Tensor] = {}
    for group in groups:
        replied = [updates[device] for device in sorted(group.members) if device in updates]
        if replied:
            new.update(fused_weighted_mean(group.tensors, replied))
    return new


class ReplyRejected(ValueError):
    """A reply that must not be applied; ``kind`` is one of :data:`REJECTION_KINDS`."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


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
        raise ReplyRejected("missing-tensors", f"device {device} left out {len(absent)} selected tensor(s), e.g. {absent[:3]}")
    for name, spec in expected.items():
        tensor = tensors[name]
        if tuple(tensor.shape) != spec.shape:
            raise ReplyRejected("shape", f"device {device} sent {name} with shape {tuple(tensor.shape)}, expected {spec.shape}")
        if tensor.dtype != spec.dtype:
            raise ReplyRejected("dtype", f"device {device} sent {name} as {tensor.dtype}, expected {spec.dtype}")
        if tensor.dtype.is_floating_point and not bool(torch.isfinite(tensor).all()):
            raise ReplyRejected("non-finite", f"device {device} sent NaN or Inf in {name}")
    if isinstance(examples, bool) or not isinstance(examples, (int, float)) or examples != int(examples) or examples <= 0:
        raise ReplyRejected("examples", f"device {device} reported num-examples={examples!r}; it must be a positive integer")
    return Update(device, int(examples), dict(tensors))
