"""Memory measurement: real autograd saved tensors and process RSS.

These are the measuring instruments the cost model is calibrated with and the
trainer reports with. Nothing here predicts; it only observes. The training probe
that :func:`measure_training_rss` starts lives in :mod:`flwr_dsparse.probe`, so this
module imports nothing of the trainer's (the trainer imports it).
"""

from __future__ import annotations

import resource
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import psutil
import torch

from .sizes import MB

__all__ = [
    "SavedTensorMeter",
    "current_rss_mb",
    "measure_training_rss",
    "peak_rss_mb",
    "reset_peak_rss",
    "saved_tensors",
]


def current_rss_mb() -> float:
    """Resident set size of this process now, in MiB."""
    return psutil.Process().memory_info().rss / MB


def peak_rss_mb() -> float:
    """High-water mark of this process's RSS, in MiB (since start or :func:`reset_peak_rss`)."""
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over fork and exec, so a probe started
    # from a big parent would report the parent's size as its own peak.
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (MB if sys.platform == "darwin" else 1024)  # bytes on macOS, KiB elsewhere


def reset_peak_rss() -> bool:
    """Reset the RSS high-water mark to the current RSS (Linux ≥ 4.0); False if unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


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
    def for_tensors(cls, tensors: Iterable[torch.Tensor]) -> SavedTensorMeter:
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


def measure_training_rss(
    model_name: str,
    selection: list[str] | None,
    *,
    batch_size: int,
    input_shape: tuple[int, ...] = (3, 32, 32),
    num_classes: int = 10,
    steps: int = 5,
    optimizer: str = "sgd",
    momentum: float = 0.0,
    no_grad_forward: bool = False,
    timeout_s: float = 600.0,
    threads: int = 1,
    cold: bool = False,
    lean_frozen: bool = True,
    tune_allocator: bool = True,
) -> dict[str, float]:
    """Peak RSS increase of a fresh subprocess that trains ``selection`` for ``steps`` steps.

    The baseline is the RSS after the model and one batch exist, so the
    increase is what training adds: gradients, optimizer state, saved
    activations, and the transient workspace and allocator slack. A fresh
    process is the only honest measure: allocators never give memory back, so
    an in-process high-water mark carries whatever ran before.

    ``selection=None`` trains every unit; ``no_grad_forward=True`` measures a
    plain inference forward instead. ``cold=True`` skips the warm-up forward, so the
    runtime's first-forward start-up counts too; ``threads`` is torch's intra-op thread
    count; ``lean_frozen`` and ``tune_allocator`` switch lean frozen layers and
    :func:`flwr_dsparse.allocator.tune_allocator` (both on, as in training). The probe
    itself is :mod:`flwr_dsparse.probe`.
    """
    import json
    import subprocess

    request = {
        "model": model_name,
        "selection": selection,
        "batch_size": batch_size,
        "input_shape": list(input_shape),
        "num_classes": num_classes,
        "steps": steps,
        "optimizer": optimizer,
        "momentum": momentum,
        "no_grad_forward": no_grad_forward,
        "threads": threads,
        "cold": cold,
        "lean_frozen": lean_frozen,
        "tune_allocator": tune_allocator,
    }
    completed = subprocess.run(
        [sys.executable, "-m", "flwr_dsparse.probe", json.dumps(request)],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    if completed.returncode != 0:
        raise RuntimeError(f"memory probe failed for {request}:\n{completed.stderr[-2000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])
