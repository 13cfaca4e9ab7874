"""Start every rank of a collective job on this machine and collect each rank's outcome.

Apart from the transport on purpose: on a real cluster each device starts its own rank
(``dsparse collective --rank`` or torchrun); this launcher is for one machine (tests,
benchmarks, the comparison).
"""

from __future__ import annotations

import io
import queue as queue_module
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..allocator import tune_allocator
from ..ports import free_port

__all__ = ["RankOutcome", "launch_local"]


@dataclass(frozen=True)
class RankOutcome:
    """How one locally launched rank ended: its return value, or its error, and its exit code."""

    rank: int
    exitcode: int | None
    result: Any = None
    error: str | None = None
    error_type: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.exitcode == 0


def _local_entry(
    worker: Callable[..., Any],
    rank: int,
    world_size: int,
    master_addr: str,
    master_port: int,
    args: tuple,
    results: Any,
    threads: int,
) -> None:
    # N ranks share the machine's cores; one intra-op thread each avoids oversubscription.
    torch.set_num_threads(threads)
    tune_allocator()  # every training process runs with the same allocator settings
    try:
        value = worker(rank, world_size, master_addr, master_port, *args)
        payload = io.BytesIO()
        torch.save(value, payload)  # plain bytes: shared-memory tensors would die with this process
        results.put((rank, payload.getvalue(), None, None))
    except BaseException as error:  # noqa: BLE001 - report everything, the parent decides
        results.put((rank, None, f"{type(error).__name__}: {error}\n{traceback.format_exc()}", type(error).__name__))
        raise SystemExit(1) from error


def launch_local(
    worker: Callable[..., Any],
    world_size: int,
    args: tuple = (),
    *,
    master_addr: str = "127.0.0.1",
    master_port: int | None = None,
    start_method: str = "spawn",
    deadline_s: float | None = None,
    threads_per_rank: int = 1,
    exit_grace_s: float = 30.0,
) -> list[RankOutcome]:
    """Start ``world_size`` ranks on this machine and collect each one's outcome.

    Each rank runs ``worker(rank, world_size, master_addr, master_port, *args)``. Unlike
    ``torch.multiprocessing.spawn`` it does not kill the other ranks when one fails: the caller
    sees every rank's own error (a dead peer's neighbours report a :class:`CollectiveError`).
    Ranks still running after ``deadline_s`` are killed and reported as such. A rank that
    reported but has not exited ``exit_grace_s`` seconds later is killed too (its outcome is
    kept): interpreter shutdown can take seconds on a loaded machine, but never forever.
    """
    if exit_grace_s < 0:
        raise ValueError(f"exit_grace_s must be >= 0, got {exit_grace_s}")
    if world_size < 1:
        raise ValueError(f"world-size must be >= 1, got {world_size}")
    port = master_port or free_port(master_addr)
    context = torch.multiprocessing.get_context(start_method)
    results = context.Queue()
    processes = [
        context.Process(
            target=_local_entry,
            args=(worker, rank, world_size, master_addr, port, tuple(args), results, threads_per_rank),
            daemon=False,
        )
        for rank in range(world_size)
    ]
    for process in processes:
        process.start()
    reports: dict[int, tuple] = {}
    stop_at = None if deadline_s is None else time.monotonic() + deadline_s
    try:
        while len(reports) < world_size:
            try:
                rank, payload, error, error_type = results.get(timeout=0.2)
                reports[rank] = (payload, error, error_type)
                continue
            except queue_module.Empty:
                pass
            if all(not process.is_alive() for process in processes):
                try:  # a last report may still be in the pipe
                    while True:
                        rank, payload, error, error_type = results.get(timeout=0.5)
                        reports[rank] = (payload, error, error_type)
                except queue_module.Empty:
                    break
            if stop_at is not None and time.monotonic() > stop_at:
                break
    finally:
        killed = set()
        for rank, process in enumerate(processes):
            # A rank that reported is only exiting (interpreter shutdown can take seconds on a
            # loaded machine); one that did not report by the deadline is stuck.
            process.join(timeout=exit_grace_s if rank in reports else 0.5)
            if process.is_alive():
                process.kill()
                killed.add(rank)
            process.join()
        results.close()
    outcomes = []
    for rank, process in enumerate(processes):
        payload, error, error_type = reports.get(rank, (None, None, None))
        if rank not in reports:
            error = (
                f"rank {rank} was still running after the deadline of {deadline_s:g} s and was killed"
                if rank in killed
                else f"rank {rank} exited with code {process.exitcode} without reporting"
            )
        value = torch.load(io.BytesIO(payload), weights_only=False) if payload is not None else None
        outcomes.append(RankOutcome(rank, process.exitcode, value, error, error_type))
    return outcomes
