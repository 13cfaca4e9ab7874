"""The server's global model and its wire encodings, shared by every message of a round.

Encoding a tensor into a Flower ``Array`` copies its bytes, and a round sends the same tensor
to several nodes and returns it in the model; :class:`GlobalModel` encodes each tensor once
per version and hands the one ``Array`` to every record that carries it. The model
``aggregate_train`` returned is recognised when ``start()`` passes it back, so it is never
decoded again.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from flwr.app import Array, ArrayRecord

from ..exchange import TensorVersions
from ..records import array_of, from_array_record, record_of

__all__ = ["GlobalModel"]


class GlobalModel:
    """The global tensors by name, each with the encoding of its current version."""

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}
        # Each tensor's encoding, by name: (the version it encodes, the Array every message shares).
        self._encoded: dict[str, tuple[int, Array]] = {}
        self._returned: ArrayRecord | None = None  # the record of the last record() call

    def replace(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Hold ``tensors`` (a resumed checkpoint, a caller's model); every encoding is dropped."""
        self.tensors = dict(tensors)
        self._encoded.clear()
        self._returned = None

    def update(self, new: Mapping[str, torch.Tensor]) -> None:
        """Take the round's new tensors; their encodings are renewed when their version is bumped."""
        self.tensors.update(new)

    def arrays(self, names: Iterable[str], versions: TensorVersions) -> dict[str, Array]:
        """The encoded ``Array`` of each named tensor, encoding only those whose version changed."""
        out = {}
        for name in names:
            version = versions.current[name]
            cached = self._encoded.get(name)
            if cached is None or cached[0] != version:
                cached = self._encoded[name] = (version, array_of(self.tensors[name]))
            out[name] = cached[1]
        return out

    def record(self, versions: TensorVersions) -> ArrayRecord:
        """The whole model as an ``ArrayRecord`` of the shared encodings."""
        self._returned = record_of(self.arrays(self.tensors, versions))
        return self._returned

    def take(self, arrays: ArrayRecord, versions: TensorVersions | None) -> None:
        """Start a round from ``arrays``: ours if it is what :meth:`record` returned, else decoded once."""
        if arrays is self._returned:
            return
        self.tensors = from_array_record(arrays)
        # A model from outside (the first round, a caller's own): its Arrays are already encoded.
        self._encoded = {
            name: (versions.current[name] if versions and name in versions.current else 0, array)
            for name, array in arrays.items()
        }
        self._returned = arrays
