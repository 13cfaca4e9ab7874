"""Collective transport: the Plan's AllReduce and Broadcast, every step, over torch.distributed.

* :mod:`.groups`: rendezvous, one gloo AllReduce group and one Broadcast group per plan
  group, and the fused or per-tensor collectives with their hang guards;
* :mod:`.steps`: K synchronous training steps of one rank (the ClientApp calls
  :func:`run_collective_round` for ``transport="collective"``);
* :mod:`.launch`: every rank on one machine (:func:`launch_local`), for tests and benchmarks.

The ``dsparse collective`` command lives in :mod:`flwr_dsparse.cli.collective`.
"""

from .groups import (
    DEFAULT_TIMEOUT_S,
    CollectiveError,
    GroupComm,
    PlanMismatchError,
    Rendezvous,
    allreduce_mean,
    averaged_tensors,
    broadcast_from_root,
    build_group_comms,
    check_plan_digest,
    check_plan_ranks,
    init_collective,
    sync_from_rank0,
    synced_tensors,
)
from .launch import RankOutcome, launch_local
from .steps import CollectiveResult, run_collective_round, run_collective_steps, sync_momentum

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "CollectiveError",
    "CollectiveResult",
    "GroupComm",
    "PlanMismatchError",
    "RankOutcome",
    "Rendezvous",
    "allreduce_mean",
    "averaged_tensors",
    "broadcast_from_root",
    "build_group_comms",
    "check_plan_digest",
    "check_plan_ranks",
    "init_collective",
    "launch_local",
    "run_collective_round",
    "run_collective_steps",
    "sync_from_rank0",
    "sync_momentum",
    "synced_tensors",
]
