"""The exchange: which tensors each device lacks, and what one device's update is.

This is the pure half of the Flower strategy (no ``flwr`` import), in the style of
torch's comm hooks: small functions over explicit state.

* **Versioned delta sync (the Broadcast side).** :class:`TensorVersions` holds a
  version per global tensor and, per device, the version its replica holds. A device
  is sent exactly the tensors whose version it does not hold. Units frozen for all
  devices never change version, so they travel once.
* **What comes back.** An :class:`Update` is one device's accepted result; the grouped
  mean over updates (the AllReduce side) is :mod:`flwr_dsparse.strategy.aggregate`, the
  checks a reply passes first are :mod:`flwr_dsparse.strategy.replies`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

__all__ = ["INITIAL_VERSION", "TensorSpec", "TensorVersions", "Update", "tensor_specs"]

# A version is the server round that last changed a tensor; 0 is the initial model.
INITIAL_VERSION = 0
_DIVERGED = -1  # the device changed its copy locally, so it matches no global version


@dataclass(frozen=True)
class TensorSpec:
    """Shape and dtype a tensor must have to be accepted."""

    shape: tuple[int, ...]
    dtype: torch.dtype


def tensor_specs(tensors: Mapping[str, torch.Tensor]) -> dict[str, TensorSpec]:
    """The spec (shape, dtype) of every tensor, by name."""
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
    def from_dict(cls, data: Mapping) -> TensorVersions:
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
