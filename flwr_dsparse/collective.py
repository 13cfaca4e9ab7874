"""Collective transport: the Plan's AllReduce and Broadcast, every step, over torch.distributed.

Devices on one LAN exchange directly, with no server in between. From a :class:`~flwr_dsparse.plan.Plan`
every rank builds, in the same order, two gloo process groups per plan group ``G``:

* the **AllReduce group**: ``G``'s members;
* the **Broadcast group**: ``G``'s root member plus every device outside ``G``.

Each training step then is

1. every rank runs forward and backward on its own selection (:class:`~flwr_dsparse.trainer.SparseTrainer`);
2. for each group, the members all-reduce (mean) the gradients of ``G``'s parameters, and the float
   BatchNorm statistics of ``G``'s units, so the members stay bit-identical;
3. the members apply the identical optimizer step;
4. the root broadcasts the new values of ``G``'s tensors (parameters and buffers) to the non-members.

With fusion on, one collective moves one flat contiguous buffer per group; with it off, one collective
per tensor (the comparison the aggregation benchmark makes).

Hang guards: rendezvous, group creation and every collective run under a timeout, and a failure
becomes a :class:`CollectiveError` that names the group and its ranks. A rank whose plan digest
differs from rank 0's refuses to start (:class:`PlanMismatchError`), on every rank at once.

The style follows torch's ``ddp_comm_hooks/default_hooks.py``: small functions over explicit
state (:class:`GroupComm`), process groups passed in, never looked up globally.
"""

from __future__ import annotations

import argparse
import io
import itertools
import os
import queue as queue_module
import re
import socket
import sys
import time
import traceback
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
import torch.distributed as dist
from torch import nn

from .plan import Group, Plan
from .trainer import LossFn, OptimizerFactory, SparseTrainer, make_optimizer_factory
from .units import Unit, model_units

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "CollectiveError",
    "PlanMismatchError",
    "Rendezvous",
    "GroupComm",
    "CollectiveResult",
    "RankOutcome",
    "check_plan_ranks",
    "init_collective",
    "check_plan_digest",
    "build_group_comms",
    "averaged_tensors",
    "sync_momentum",
    "synced_tensors",
    "allreduce_mean",
    "broadcast_from_root",
    "sync_from_rank0",
    "run_collective_steps",
    "run_collective_round",
    "launch_local",
    "free_port",
    "add_cli",
]

DEFAULT_TIMEOUT_S = 60.0
# Integer buffers (BatchNorm's num_batches_tracked) ride in the float32 fused buffer; float32 holds
# every integer below 2**24 exactly, far beyond any step count of one run.
_EXACT_INT_IN_FLOAT32 = 2**24


class CollectiveError(RuntimeError):
    """A rendezvous, group creation or collective failed or timed out; the message names the group."""


class PlanMismatchError(RuntimeError):
    """The ranks were started with different plans."""


# --------------------------------------------------------------------------- rendezvous


@dataclass(frozen=True)
class Rendezvous:
    """Where and as whom one rank joins: ``tcp://master_addr:master_port`` as ``rank`` of ``world_size``."""

    rank: int
    world_size: int
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    # torchrun's agent already serves the store on MASTER_PORT; "env://" joins it as a client
    # instead of starting a second server on the same port.
    from_env: bool = False

    def __post_init__(self) -> None:
        if self.world_size < 1:
            raise ValueError(f"world-size must be >= 1, got {self.world_size}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside [0, {self.world_size}); pass --rank 0..{self.world_size - 1}")
        if not 0 < self.master_port < 65536:
            raise ValueError(f"master-port {self.master_port} is not a TCP port (1..65535)")

    @property
    def init_method(self) -> str:
        return "env://" if self.from_env else f"tcp://{self.master_addr}:{self.master_port}"

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> "Rendezvous":
        """Read torchrun's variables: ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``."""
        env = os.environ if environ is None else environ
        missing = [key for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if key not in env]
        if missing:
            raise ValueError(
                f"environment lacks {', '.join(missing)}; launch with torchrun or pass "
                "--rank, --world-size, --master-addr and --master-port"
            )
        return cls(int(env["RANK"]), int(env["WORLD_SIZE"]), env["MASTER_ADDR"], int(env["MASTER_PORT"]), from_env=True)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (for single-machine launches)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def check_plan_ranks(plan: Plan, world_size: int) -> None:
    """Device ids of the plan must be the ranks ``0 .. world_size-1``."""
    ids = list(plan.device_ids)
    if ids != list(range(world_size)):
        raise ValueError(
            f"the plan's device ids {ids} are not the ranks 0..{world_size - 1} of world-size {world_size}; "
            f"pass --world-size {len(ids)} and number the plan's devices 0..{len(ids) - 1}"
        )


def _timeout(timeout_s: float) -> timedelta:
    if not timeout_s > 0:
        raise ValueError(f"timeout must be > 0 seconds, got {timeout_s}")
    return timedelta(seconds=timeout_s)


def init_collective(rendezvous: Rendezvous, plan: Plan, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> tuple["GroupComm", ...]:
    """Join the default gloo group, refuse a different plan, and build every plan group.

    Returns this rank's :class:`GroupComm` for every plan group, in plan order.
    """
    check_plan_ranks(plan, rendezvous.world_size)
    timeout = _timeout(timeout_s)
    if not dist.is_initialized():
        start = time.monotonic()
        try:
            dist.init_process_group(
                "gloo",
                init_method=rendezvous.init_method,
                rank=rendezvous.rank,
                world_size=rendezvous.world_size,
                timeout=timeout,
            )
        except (RuntimeError, OSError) as error:
            raise CollectiveError(
                f"rendezvous at {rendezvous.init_method} failed for rank {rendezvous.rank} of {rendezvous.world_size} "
                f"after {time.monotonic() - start:.1f} s (timeout {timeout_s:g} s): not every rank joined. Start all "
                f"{rendezvous.world_size} ranks with the same --master-addr/--master-port, or raise --timeout. "
                f"Cause: {_first_line(error)}"
            ) from error
    check_plan_digest(plan, rendezvous.rank, rendezvous.world_size, timeout_s=timeout_s)
    return build_group_comms(plan, rendezvous.rank, timeout_s=timeout_s)


def check_plan_digest(plan: Plan, rank: int, world_size: int, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
    """Every rank gathers every digest, so all ranks refuse together (none is left hanging)."""
    digests: list[Any] = [None] * world_size
    _guarded(lambda: dist.all_gather_object(digests, plan.digest()), "plan-digest exchange on the default group",
             rank, tuple(range(world_size)), timeout_s)
    differing = [r for r, digest in enumerate(digests) if digest != digests[0]]
    if differing:
        raise PlanMismatchError(
            f"rank(s) {differing} hold a plan whose digest differs from rank 0's ({digests[0][:12]}…); "
            f"this rank {rank} has {plan.digest()[:12]}…. Give every rank the same plan.json "
            "(compare Plan.digest() or sha256sum of the canonical JSON)"
        )


# --------------------------------------------------------------------------- groups


@dataclass(frozen=True)
class GroupComm:
    """One plan group as this rank sees it: the plan group and this rank's process-group handles.

    ``allreduce_pg`` is ``None`` when this rank is not a member, or when the group has a single
    member (its mean is itself, nothing travels). ``broadcast_pg`` is ``None`` when this rank is
    neither the root nor a receiver, or when there are no receivers.
    """

    index: int
    group: Group
    rank: int
    timeout_s: float
    allreduce_pg: Any = None
    broadcast_pg: Any = None

    @property
    def members(self) -> tuple[int, ...]:
        return self.group.members

    @property
    def root(self) -> int:
        return self.group.broadcast.root

    @property
    def broadcast_ranks(self) -> tuple[int, ...]:
        return (self.group.broadcast.root,) + tuple(self.group.broadcast.receivers)

    @property
    def is_member(self) -> bool:
        return self.rank in self.group.members

    def label(self) -> str:
        units = self.group.units
        span = units[0] if len(units) == 1 else f"{units[0]}..{units[-1]}"
        return f"group {self.index} (members {list(self.members)}, units {span})"


def build_group_comms(plan: Plan, rank: int, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> tuple[GroupComm, ...]:
    """Create both process groups of every plan group, on every rank, in plan order.

    ``new_group`` is collective over the *whole* world: every rank must call it for every group,
    in the same order, or later collectives hang (``use_local_synchronization=True`` deadlocked
    with overlapping groups). Groups that would move nothing (a single member, no receivers) are
    skipped, identically on every rank, because the plan digests were checked equal.
    """
    timeout = _timeout(timeout_s)
    world = tuple(range(len(plan.devices)))
    comms = []
    for index, group in enumerate(plan.groups):
        members = tuple(group.members)
        broadcast_ranks = tuple(sorted((group.broadcast.root,) + tuple(group.broadcast.receivers)))
        allreduce_pg = broadcast_pg = None
        if len(members) > 1:
            handle = _guarded(lambda: dist.new_group(list(members), timeout=timeout, backend="gloo"),
                              f"creating the all-reduce group of group {index}", rank, world, timeout_s)
            allreduce_pg = handle if rank in members else None
        if group.broadcast.receivers:
            handle = _guarded(lambda: dist.new_group(list(broadcast_ranks), timeout=timeout, backend="gloo"),
                              f"creating the broadcast group of group {index}", rank, world, timeout_s)
            broadcast_pg = handle if rank in broadcast_ranks else None
        comms.append(GroupComm(index, group, rank, timeout_s, allreduce_pg, broadcast_pg))
    return tuple(comms)


# --------------------------------------------------------------------------- tensors of a group


def averaged_tensors(group: Group, model: nn.Module) -> list[torch.Tensor]:
    """What the members average: gradients of ``G``'s parameters and ``G``'s float buffers.

    Averaging BatchNorm's running statistics among the members (as the server-side grouped mean
    does) keeps the members bit-identical although each saw its own batch. Integer buffers
    (``num_batches_tracked``) are equal on all members already and are not averaged.
    """
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    tensors = []
    for name in group.params:
        param = params[name]
        if param.grad is None:  # an unused parameter: its gradient is zero, and it must still travel
            param.grad = torch.zeros_like(param)
        tensors.append(param.grad)
    tensors.extend(buffers[name] for name in group.buffers if buffers[name].is_floating_point())
    return tensors


def synced_tensors(group: Group, model: nn.Module) -> list[torch.Tensor]:
    """What the root broadcasts: the values of ``G``'s parameters and buffers."""
    state = dict(model.named_parameters())
    state.update(model.named_buffers())
    return [state[name].data for name in group.tensors]


def _flatten(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """One contiguous float32 buffer holding every tensor, integers cast exactly."""
    for tensor in tensors:
        if not tensor.is_floating_point() and tensor.numel() and int(tensor.abs().max()) >= _EXACT_INT_IN_FLOAT32:
            raise ValueError(f"integer tensor value {int(tensor.abs().max())} is too large to fuse exactly; turn fusion off")
    return torch.cat([tensor.detach().reshape(-1).to(torch.float32) for tensor in tensors])


def _unflatten_into(flat: torch.Tensor, tensors: Sequence[torch.Tensor]) -> None:
    offset = 0
    with torch.no_grad():
        for tensor in tensors:
            count = tensor.numel()
            tensor.copy_(flat[offset : offset + count].view_as(tensor))  # copy_ casts back to the tensor's dtype
            offset += count


def _nbytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(tensor.numel() * tensor.element_size() for tensor in tensors)


# --------------------------------------------------------------------------- collectives


def allreduce_mean(comm: GroupComm, tensors: Sequence[torch.Tensor], *, fused: bool = True) -> int:
    """Average ``tensors`` in place over the group's members; returns the payload bytes this rank moved.

    A no-op (0 bytes) on non-members and on single-member groups.
    """
    pg = comm.allreduce_pg
    if pg is None or not tensors:
        return 0
    count = len(comm.members)
    what = f"all-reduce of {comm.label()}"
    if fused:
        flat = _flatten(tensors)
        _guarded(lambda: dist.all_reduce(flat, group=pg), what, comm.rank, comm.members, comm.timeout_s)
        flat.div_(count)  # gloo has no AVG; SUM then divide, as DDP's allreduce_hook does
        _unflatten_into(flat, tensors)
        return flat.numel() * flat.element_size()
    for tensor in tensors:
        _guarded(lambda: dist.all_reduce(tensor, group=pg), what, comm.rank, comm.members, comm.timeout_s)
        tensor.div_(count)
    return _nbytes(tensors)


def broadcast_from_root(comm: GroupComm, tensors: Sequence[torch.Tensor], *, fused: bool = True) -> int:
    """Overwrite ``tensors`` on the receivers with the root's values; returns this rank's payload bytes."""
    pg = comm.broadcast_pg
    if pg is None or not tensors:
        return 0
    what = f"broadcast of {comm.label()} from root {comm.root}"
    ranks = comm.broadcast_ranks
    if fused:
        flat = _flatten(tensors)  # receivers pack too: it sizes the buffer, and the copy is cheap
        _guarded(lambda: dist.broadcast(flat, src=comm.root, group=pg), what, comm.rank, ranks, comm.timeout_s)
        if comm.rank != comm.root:
            _unflatten_into(flat, tensors)
        return flat.numel() * flat.element_size()
    for tensor in tensors:
        _guarded(lambda: dist.broadcast(tensor, src=comm.root, group=pg), what, comm.rank, ranks, comm.timeout_s)
    return _nbytes(tensors)


def sync_from_rank0(model: nn.Module, rank: int, world_size: int, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
    """Give every rank rank 0's full model state (as DDP does at construction), one fused broadcast."""
    if world_size < 2:
        return
    tensors = [tensor.data for tensor in model.state_dict(keep_vars=True).values()]
    flat = _flatten(tensors)
    _guarded(lambda: dist.broadcast(flat, src=0), "initial model broadcast from rank 0 on the default group",
             rank, tuple(range(world_size)), timeout_s)
    if rank != 0:
        _unflatten_into(flat, tensors)


def _guarded(operation: Callable[[], Any], what: str, rank: int, ranks: Sequence[int], timeout_s: float) -> Any:
    """Run a blocking collective; turn a dead or stuck peer into an error that names the group."""
    start = time.monotonic()
    try:
        return operation()
    except (RuntimeError, OSError) as error:
        if isinstance(error, (CollectiveError, PlanMismatchError)):
            raise
        raise CollectiveError(
            f"{what} failed on rank {rank} after {time.monotonic() - start:.1f} s (timeout {timeout_s:g} s): "
            f"a peer among ranks {list(ranks)} exited, crashed or is slower than the timeout. Check that every "
            f"rank is alive and runs the same plan, or raise --timeout. Cause: {_first_line(error)}"
        ) from error


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    line = text.splitlines()[0] if text else type(error).__name__
    line = line.split(" This is typically caused by")[0]  # gloo's generic advice; ours precedes it
    return re.sub(r"\[[^\]]*/third_party/gloo/", "[gloo/", line)  # drop the build machine's path


# --------------------------------------------------------------------------- training


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


def sync_momentum(trainer: SparseTrainer, comms: Sequence[GroupComm], momentum_state: Mapping[str, torch.Tensor],
                  *, fused: bool = True) -> int:
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
    rank: int,
    world_size: int,
    master_addr: str,
    master_port: int,
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
    rendezvous: Rendezvous | None = None,
    momentum_state: Mapping[str, torch.Tensor] | None = None,
) -> CollectiveResult:
    """One round of ``steps`` per-step synchronous steps among the plan's devices (the client's hook).

    Joins the rendezvous, checks the plan digest, builds the groups, optionally gives every rank
    rank 0's model (``sync_start``), trains rank ``rank``'s selection of ``plan`` with per-step
    AllReduce and Broadcast, and leaves the process group if it created it. ``model`` is updated in
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
    rendezvous = rendezvous or Rendezvous(rank, world_size, master_addr, master_port)
    owns_default_group = not dist.is_initialized()  # leave a caller's own process group alone
    trainer = SparseTrainer(model, plan.device(rendezvous.rank).units, units=units or model_units(model),
                            optimizer_factory=optimizer_factory, loss_fn=loss_fn)
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
        _guarded(lambda: dist.barrier(), "final barrier on the default group", rendezvous.rank,
                 tuple(range(rendezvous.world_size)), timeout_s)
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


# --------------------------------------------------------------------------- single-machine launcher


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


def _local_entry(worker: Callable[..., Any], rank: int, world_size: int, master_addr: str, master_port: int,
                 args: tuple, results: Any, threads: int) -> None:
    # N ranks share the machine's cores; one intra-op thread each avoids oversubscription.
    torch.set_num_threads(threads)
    try:
        value = worker(rank, world_size, master_addr, master_port, *args)
        payload = io.BytesIO()
        torch.save(value, payload)  # plain bytes: shared-memory tensors would die with this process
        results.put((rank, payload.getvalue(), None, None))
    except BaseException as error:  # noqa: BLE001 - report everything, the parent decides
        results.put((rank, None, f"{type(error).__name__}: {error}\n{traceback.format_exc()}", type(error).__name__))
        raise SystemExit(1)


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
        context.Process(target=_local_entry, args=(worker, rank, world_size, master_addr, port, tuple(args), results,
                                                   threads_per_rank), daemon=False)
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
            error = (f"rank {rank} was still running after the deadline of {deadline_s:g} s and was killed"
                     if rank in killed else f"rank {rank} exited with code {process.exitcode} without reporting")
        value = torch.load(io.BytesIO(payload), weights_only=False) if payload is not None else None
        outcomes.append(RankOutcome(rank, process.exitcode, value, error, error_type))
    return outcomes


# --------------------------------------------------------------------------- CLI


def add_cli(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``dsparse collective``: run one device (or, with ``--local``, every device) of a plan."""
    parser = subparsers.add_parser(
        "collective",
        help="train a plan with per-step AllReduce/Broadcast over torch.distributed (gloo)",
        description=(
            "Run one rank of the collective transport. The rank and rendezvous come from the flags or, "
            "when --rank is absent, from torchrun's RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT. "
            "--local starts every device of the plan on 127.0.0.1 instead."
        ),
    )
    parser.add_argument("--plan", required=True, type=Path, help="plan JSON (from `dsparse plan --json`)")
    parser.add_argument("--rank", type=int, default=None, help="this device's id in the plan")
    parser.add_argument("--world-size", type=int, default=None, help="number of devices (default: the plan's)")
    parser.add_argument("--master-addr", default="127.0.0.1", help="address of rank 0 (default 127.0.0.1)")
    parser.add_argument("--master-port", type=int, default=29500, help="rendezvous port on rank 0 (default 29500)")
    parser.add_argument("--local", action="store_true", help="start all ranks of the plan on this machine")
    parser.add_argument("--model", default=None, help="model name (default: the plan's meta 'model', else tiny)")
    parser.add_argument("--steps", type=int, default=10, help="synchronous steps (default 10)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the plan's per-device batch size, else 32")
    parser.add_argument("--optimizer", default="sgd", choices=("sgd", "adam"))
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--momentum", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0, help="model and data seed")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds before a silent peer is an error")
    parser.add_argument("--no-fusion", action="store_true", help="one collective per tensor instead of one per group")
    parser.add_argument("--out", type=Path, default=None, help="torch.save the final state here ({rank} is replaced)")
    parser.set_defaults(func=_cli_main)
    return parser


@dataclass(frozen=True)
class _CliJob:
    plan_json: str
    model: str
    steps: int
    batch_size: int | None
    optimizer: str
    lr: float
    momentum: float
    seed: int
    timeout_s: float
    fused: bool
    out: str | None


def _cli_rank(rank: int, world_size: int, master_addr: str, master_port: int, job: _CliJob,
              rendezvous: Rendezvous | None = None) -> dict[str, Any]:
    from .data import batch_iterator, make_synthetic  # the data room; imported where used
    from .models import build_model

    plan = Plan.from_json(job.plan_json)
    batch_size = job.batch_size or plan.device(rank).batch_size or 32
    train, _ = make_synthetic(max(batch_size * world_size * 4, 1000), 10, seed=job.seed)
    batches = batch_iterator(train, range(rank, len(train), world_size), batch_size, seed=job.seed + rank)
    model = build_model(job.model, seed=job.seed)
    result = run_collective_round(
        plan, rank, world_size, master_addr, master_port, model, batches, job.steps,
        make_optimizer_factory(job.optimizer, lr=job.lr, momentum=job.momentum), job.timeout_s,
        fused=job.fused, rendezvous=rendezvous,
    )
    if job.out:
        torch.save(model.state_dict(), job.out.replace("{rank}", str(rank)))
    return {
        "rank": rank,
        "first_loss": result.losses[0],
        "last_loss": result.losses[-1],
        "median_compute_s": sorted(result.compute_seconds)[len(result.compute_seconds) // 2],
        "median_aggregation_s": sorted(result.aggregation_seconds)[len(result.aggregation_seconds) // 2],
        "payload_mb": result.payload_bytes / 2**20,
    }


def _print_rank(summary: Mapping[str, Any], steps: int) -> None:
    print(
        f"rank {summary['rank']}: {steps} steps, loss {summary['first_loss']:.4f} -> {summary['last_loss']:.4f}, "
        f"median compute {summary['median_compute_s'] * 1e3:.1f} ms, median aggregation "
        f"{summary['median_aggregation_s'] * 1e3:.1f} ms, {summary['payload_mb']:.2f} MB handed to collectives"
    )


def _cli_main(args: argparse.Namespace) -> int:
    try:
        plan_json = args.plan.read_text()
    except OSError as error:
        raise SystemExit(f"cannot read plan {args.plan}: {error}; create one with `dsparse plan --json > plan.json`")
    plan = Plan.from_json(plan_json)
    model = args.model or str(plan.meta.get("model", "tiny"))
    job = _CliJob(plan_json, model, args.steps, args.batch_size, args.optimizer, args.lr, args.momentum, args.seed,
                  args.timeout, not args.no_fusion, str(args.out) if args.out else None)
    if args.local:
        world_size = args.world_size or len(plan.devices)
        check_plan_ranks(plan, world_size)
        outcomes = launch_local(_cli_rank, world_size, (job,), master_addr=args.master_addr,
                                deadline_s=args.timeout * 3 + 60)
        failed = [outcome for outcome in outcomes if not outcome.ok]
        for outcome in outcomes:
            if outcome.ok:
                _print_rank(outcome.result, args.steps)
        for outcome in failed:
            print(f"rank {outcome.rank} failed: {(outcome.error or '').splitlines()[0]}")
        return 1 if failed else 0
    if args.rank is None:
        rendezvous = Rendezvous.from_environ()
    else:
        rendezvous = Rendezvous(args.rank, args.world_size or len(plan.devices), args.master_addr, args.master_port)
    if "LOCAL_WORLD_SIZE" in os.environ:  # torchrun put several ranks on this machine: share its cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["LOCAL_WORLD_SIZE"])))
    try:
        summary = _cli_rank(rendezvous.rank, rendezvous.world_size, rendezvous.master_addr, rendezvous.master_port,
                            job, rendezvous)
    except (CollectiveError, PlanMismatchError) as error:
        print(f"dsparse collective: rank {rendezvous.rank}: {error}", file=sys.stderr)
        return 1
    _print_rank(summary, args.steps)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m flwr_dsparse.collective …`` (the same as ``dsparse collective …``)."""
    parser = argparse.ArgumentParser(prog="dsparse")
    add_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["collective", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
