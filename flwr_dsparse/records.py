"""Tensor dicts to Flower records and back: the only place that converts between them.

Everything above this module (strategy, apps) speaks ``dict[str, torch.Tensor]``;
Flower's ``ArrayRecord`` is only the envelope on the wire.
"""

from __future__ import annotations

from typing import Mapping

import torch
from flwr.app import Array, ArrayRecord

__all__ = ["to_array_record", "from_array_record", "tensor_nbytes", "record_nbytes"]


def to_array_record(tensors: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """Pack tensors (in the given order) into an ``ArrayRecord``; values are copied."""
    return ArrayRecord({name: Array(tensor.detach().cpu().contiguous().numpy()) for name, tensor in tensors.items()})


def from_array_record(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """Unpack an ``ArrayRecord`` into writable torch tensors, in record order."""
    # Array.numpy() may be a read-only view of the wire bytes; copy so callers can write.
    return {name: torch.from_numpy(array.numpy().copy()) for name, array in record.items()}


def tensor_nbytes(tensors: Mapping[str, torch.Tensor]) -> int:
    """Raw payload bytes (``numel * element_size``), the unit of every bytes metric."""
    return sum(t.numel() * t.element_size() for t in tensors.values())


def record_nbytes(record: ArrayRecord) -> int:
    """Raw payload bytes of an ``ArrayRecord`` (without the per-array ``.npy`` headers)."""
    return sum(int(array.numpy().nbytes) for array in record.values())
