"""Memory measurement: real autograd saved tensors and process RSS.

These are the measuring instruments the cost model is calibrated with and the
trainer reports with. Nothing here predicts; it only observes.
"""

from __future__ import annotations

import resource
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator, Iterable

import torch

__all__ = ["SavedTensorMeter", "current_rss_mb", "peak_rss_mb", "saved_tensors"]

MB = 1024 * 1024


def current_rss_mb() -> float:
    """Resident set size of this process now, in MiB (Linux ``/proc``; psutil elsewhere)."""
    try:
        with open("/proc/self/statm") as statm:
            pages = int(statm.read().split()[1])
        return pages * resource.getpagesize() / MB
    except OSError:  # not Linux
        import psutil

        return psutil.Process().memory_info().rss / MB


def peak_rss_mb() -> float:
    """High-water mark of this process's RSS since it started, in MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # ru_maxrss is KiB on Linux and bytes on macOS.
    return peak / (MB if sys.platform == "darwin" else 1024)


@dataclass
class SavedTensorMeter:
    """Counts the unique storages autograd saves for backward.

    Storages listed in ``exclude`` (the model's own parameters and buffers,
    which are accounted as weights) are not counted. ``attribute`` may name the
    unit currently running, so the bytes can be split per unit; a storage is
    counted once, for the first unit that saved it.
    """

    exclude: set[int] = field(default_factory=set)
    seen: set[int] = field(default_factory=set)
    total_bytes: int = 0
    bytes_by_owner: dict[str, int] = field(default_factory=dict)
    owner: str = ""

    @classmethod
    def for_tensors(cls, tensors: Iterable[torch.Tensor]) -> "SavedTensorMeter":
        return cls(exclude={t.untyped_storage().data_ptr() for t in tensors})

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key not in self.exclude and key not in self.seen:
            self.seen.add(key)
            self.total_bytes += storage.nbytes()
            self.bytes_by_owner[self.owner] = self.bytes_by_owner.get(self.owner, 0) + storage.nbytes()
        return tensor

    @staticmethod
    def unpack(tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    @property
    def total_mb(self) -> float:
        return self.total_bytes / MB


@contextmanager
def saved_tensors(meter: SavedTensorMeter) -> Iterator[SavedTensorMeter]:
    """Run the block with ``meter`` counting every tensor autograd saves."""
    with torch.autograd.graph.saved_tensors_hooks(meter.pack, meter.unpack):
        yield meter
