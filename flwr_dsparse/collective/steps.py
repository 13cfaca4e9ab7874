"""Collective transport, the training loop: K synchronous steps of one rank over its plan groups.

Each step: forward and backward on the rank's own selection, then per group the members
all-reduce (mean) the gradients in an optimizer pre-hook, apply the identical step, and the
root broadcasts the new values to the non-members (:mod:`.groups`).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from ..plan import Plan
from ..trainer import LossFn, OptimizerFactory, SparseTrainer
from ..units import Unit, model_units
from .groups import (
    DEFAULT_TIMEOUT_S,
    GroupComm,
    Rendezvous,
    allreduce_mean,
    averaged_tensors,
    broadcast_from_root,
    init_collective,
    run_guarded,
    sync_from_rank0,
    synced_tensors,
)

__all__ = ["CollectiveResult", "run_collective_round", "run_collective_steps", "sync_momentum"]


@dataclass
class CollectiveResult:
    """What one rank returns after a collective round.

    Attributes
    ----------
    rank : int
        This rank (the plan's device id).
    tensors : dict[str, torch.Tensor]
        Final values of the tensors of every group this rank is a member of (what it trained),
        detached clones. The model passed in holds the full final state.
    losses : list[float]
        Training loss of every step.
    compute_seconds, aggregation_seconds : list[float]
        Per step: forward/backward/optimizer time, and all-reduce plus broadcast time.
    payload_bytes : int
        Bytes this rank handed to collectives over the whole round (not counting the initial sync).
    plan_digest : str
        The digest every rank agreed on.
    momentum_state : dict[str, torch.Tensor]
        SGD momentum buffers of this rank's selection after the round, by parameter name
        (empty without momentum); hand them to the next round to carry momentum over.
    """

    rank: int
    tensors: dict[str, torch.Tensor]
    losses: list[float] = field(default_factory=list)
    compute_seconds: list[float] = field(default_factory=list)
    aggregation_seconds: list[float] = field(default_factory=list)
    payload_bytes: int = 0
    plan_digest: str = ""
    momentum_state: dict[str, torch.Tensor] = field(default_factory=dict)


def run_collective_steps(
    trainer: SparseTrainer,
    comms: Sequence[GroupComm],
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    steps: int,
    *,
    rank: int,
    fused: bool = True,
) -> CollectiveResult:
    """Run ``steps`` synchronous steps over already-built group comms, as rank ``rank``.

    The all-reduce runs in an optimizer step pre-hook, i.e. after backward and before the step, so
    :meth:`SparseTrainer.step` stays the only code that trains. Every rank walks the groups in plan
    order (all-reduces, then broadcasts); one global order means no two ranks wait on each other
    in opposite orders.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    model = trainer.model
    member_comms = [comm for comm in comms if comm.is_member]
    result = CollectiveResult(rank=rank, tensors={})
    clock = {"allreduce": 0.0}

    def allreduce_hook(optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        start = time.perf_counter()
        for comm in member_comms:
            result.payload_bytes += allreduce_mean(comm, averaged_tensors(comm.group, model), fused=fused)
        clock["allreduce"] += time.perf_counter() - start

    handle = trainer.optimizer.register_step_pre_hook(allreduce_hook) if trainer.optimizer is not None else None
    try:
        done = 0
        for inputs, targets in itertools.islice(batches, steps):
            clock["allreduce"] = 0.0
            step = trainer.step(inputs, targets)
            start = time.perf_counter()
            for comm in comms:
                result.payload_bytes += broadcast_from_root(comm, synced_tensors(comm.group, model), fused=fused)
            broadcast_s = time.perf_counter() - start
            result.losses.append(step.loss)
            result.compute_seconds.append(step.seconds - clock["allreduce"])
            result.aggregation_seconds.append(clock["allreduce"] + broadcast_s)
            done += 1
        if done < steps:
            # Stopping early would leave the other ranks waiting in a collective until their timeout.
            raise ValueError(f"rank {rank} got only {done} batches for {steps} steps; give every rank >= steps batches")
    finally:
        if handle is not None:
            handle.remove()
    state = dict(model.named_parameters())
    state.update(model.named_buffers())
    result.tensors = {name: state[name].detach().clone() for comm in member_comms for name in comm.group.tensors}
    result.momentum_state = trainer.momentum_state()
    return result


def sync_momentum(
    trainer: SparseTrainer,
    comms: Sequence[GroupComm],
    momentum_state: Mapping[str, torch.Tensor],
    *,
    fused: bool = True,
) -> int:
    """Load ``momentum_state`` and average each group's buffers over its members; returns payload bytes.

    Members apply the same averaged gradient every step, so their momentum buffers stay equal
    once they start equal. They may not start equal: a round the server-side transport redid
    leaves each device with momentum of its own gradients, and a device new to a selection has
    none (zero, which SGD's first step with dampening 0 assumes anyway). One average per
    group at the round's start makes them equal again, so the members stay bit-identical.
    """
    trainer.load_momentum_state(momentum_state, zeros_for_missing=True)
    if trainer.optimizer is None or not trainer.momentum_state():
        return 0  # no momentum to carry (plain SGD, Adam, or nothing selected)
    params = dict(trainer.model.named_parameters())
    moved = 0
    for comm in comms:
        if comm.is_member:
            buffers = [trainer.optimizer.state[params[name]]["momentum_buffer"] for name in comm.group.params]
            moved += allreduce_mean(comm, buffers, fused=fused)
    return moved


def run_collective_round(
    plan: Plan,
    rendezvous: Rendezvous,
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    steps: int,
    optimizer_factory: OptimizerFactory | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    *,
    fused: bool = True,
    units: Sequence[Unit] | None = None,
    loss_fn: LossFn | None = None,
    sync_start: bool = True,
    momentum_state: Mapping[str, torch.Tensor] | None = None,
) -> CollectiveResult:
    """One round of ``steps`` per-step synchronous steps among the plan's devices (the client's hook).

    Joins ``rendezvous`` (unless this process is in a default group already, e.g. one that
    :func:`~.groups.join_default_group` joined for several rounds), checks the plan digest,
    builds the groups, optionally gives every rank rank 0's model (``sync_start``), trains this
    rank's selection of ``plan`` with per-step AllReduce and Broadcast, and leaves the process
    group if it created it. ``model`` is updated in
    place. Call it once per round; it can be called again in the same process. With
    ``momentum_state`` (the previous round's ``result.momentum_state``; ``{}`` for none yet)
    the SGD momentum carries over, averaged over each group's members first
    (:func:`sync_momentum`); without it every round starts with fresh momentum.

    Raises
    ------
    CollectiveError
        A peer died or stalled past ``timeout_s`` (the message names the group).
    PlanMismatchError
        Some rank was given a different plan.
    """
    owns_default_group = not dist.is_initialized()  # leave a caller's own process group alone
    trainer = SparseTrainer(
        model,
        plan.device(rendezvous.rank).units,
        units=units or model_units(model),
        optimizer_factory=optimizer_factory,
        loss_fn=loss_fn,
    )
    comms: tuple[GroupComm, ...] = ()
    try:
        comms = init_collective(rendezvous, plan, timeout_s=timeout_s)
        if sync_start:
            sync_from_rank0(model, rendezvous.rank, rendezvous.world_size, timeout_s=timeout_s)
        if momentum_state is not None:
            sync_momentum(trainer, comms, momentum_state, fused=fused)
        result = run_collective_steps(trainer, comms, batches, steps, rank=rendezvous.rank, fused=fused)
        result.plan_digest = plan.digest()
        # Rank 0 serves the store; the barrier keeps it up until every rank is done with it.
        run_guarded(
            lambda: dist.barrier(),
            "final barrier on the default group",
            rendezvous.rank,
            tuple(range(rendezvous.world_size)),
            timeout_s,
        )
        return result
    finally:
        trainer.close()
        if owns_default_group and dist.is_initialized():
            dist.destroy_process_group()  # and with it every group of this round
        elif dist.is_initialized():
            for comm in comms:
                for handle in (comm.allreduce_pg, comm.broadcast_pg):
                    if handle is not None:
                        dist.destroy_process_group(handle)
