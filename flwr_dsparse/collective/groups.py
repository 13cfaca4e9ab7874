"""Collective transport, the process groups: the Plan's AllReduce and Broadcast, every step, over torch.distributed.

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

import os
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..fusion import fuse, split_like
from ..plan import Group, Plan

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "CollectiveError",
    "GroupComm",
    "PlanMismatchError",
    "Rendezvous",
    "allreduce_mean",
    "averaged_tensors",
    "broadcast_from_root",
    "build_group_comms",
    "check_plan_digest",
    "check_plan_ranks",
    "init_collective",
    "join_default_group",
    "run_guarded",
    "sync_from_rank0",
    "synced_tensors",
]

DEFAULT_TIMEOUT_S = 60.0
# Integer buffers (BatchNorm's num_batches_tracked) ride in the float32 fused buffer; float32 holds
# every integer below 2**24 exactly, far beyond any step count of one run.
_EXACT_INT_IN_FLOAT32 = 2**24


class CollectiveError(RuntimeError):
    """A rendezvous, group creation or collective failed or timed out; the message names the group."""


class PlanMismatchError(RuntimeError):
    """The ranks were started with different plans."""


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
            raise ValueError(
                f"rank {self.rank} is outside [0, {self.world_size}); pass --rank 0..{self.world_size - 1}"
            )
        if not 0 < self.master_port < 65536:
            raise ValueError(f"master-port {self.master_port} is not a TCP port (1..65535)")

    @property
    def init_method(self) -> str:
        return "env://" if self.from_env else f"tcp://{self.master_addr}:{self.master_port}"

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> Rendezvous:
        """Read torchrun's variables: ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``."""
        env = os.environ if environ is None else environ
        missing = [key for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if key not in env]
        if missing:
            raise ValueError(
                f"environment lacks {', '.join(missing)}; launch with torchrun or pass "
                "--rank, --world-size, --master-addr and --master-port"
            )
        return cls(int(env["RANK"]), int(env["WORLD_SIZE"]), env["MASTER_ADDR"], int(env["MASTER_PORT"]), from_env=True)


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


def init_collective(
    rendezvous: Rendezvous, plan: Plan, *, timeout_s: float = DEFAULT_TIMEOUT_S
) -> tuple[GroupComm, ...]:
    """Join the default gloo group, refuse a different plan, and build every plan group.

    Returns this rank's :class:`GroupComm` for every plan group, in plan order.
    """
    check_plan_ranks(plan, rendezvous.world_size)
    join_default_group(rendezvous, timeout_s=timeout_s)
    check_plan_digest(plan, rendezvous.rank, rendezvous.world_size, timeout_s=timeout_s)
    return build_group_comms(plan, rendezvous.rank, timeout_s=timeout_s)


def join_default_group(rendezvous: Rendezvous, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
    """Join the default gloo group at ``rendezvous`` unless this process is in one already.

    A caller that runs several collective rounds over one rendezvous joins once with this;
    :func:`~flwr_dsparse.collective.run_collective_round` then leaves the group to it.
    """
    if dist.is_initialized():
        return
    start = time.monotonic()
    try:
        dist.init_process_group(
            "gloo",
            init_method=rendezvous.init_method,
            rank=rendezvous.rank,
            world_size=rendezvous.world_size,
            timeout=_timeout(timeout_s),
        )
    except (RuntimeError, OSError) as error:
        raise CollectiveError(
            f"rendezvous at {rendezvous.init_method} failed for rank {rendezvous.rank} of {rendezvous.world_size} "
            f"after {time.monotonic() - start:.1f} s (timeout {timeout_s:g} s): not every rank joined. Start all "
            f"{rendezvous.world_size} ranks with the same --master-addr/--master-port, or raise --timeout. "
            f"Cause: {_first_line(error)}"
        ) from error


def check_plan_digest(plan: Plan, rank: int, world_size: int, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
    """Every rank gathers every digest, so all ranks refuse together (none is left hanging)."""
    digests: list[Any] = [None] * world_size
    run_guarded(
        lambda: dist.all_gather_object(digests, plan.digest()),
        "plan-digest exchange on the default group",
        rank,
        tuple(range(world_size)),
        timeout_s,
    )
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

    def new_group(ranks: tuple[int, ...], what: str) -> Any:
        """Every rank creates the group; only its members keep the handle."""
        handle = run_guarded(
            lambda: dist.new_group(list(ranks), timeout=timeout, backend="gloo"), what, rank, world, timeout_s
        )
        return handle if rank in ranks else None

    comms = []
    for index, group in enumerate(plan.groups):
        members = tuple(group.members)
        broadcast_ranks = tuple(sorted((group.broadcast.root,) + tuple(group.broadcast.receivers)))
        # A group that would move nothing (one member, no receivers) gets no process group.
        allreduce_pg = broadcast_pg = None
        if len(members) > 1:
            allreduce_pg = new_group(members, f"creating the all-reduce group of group {index}")
        if group.broadcast.receivers:
            broadcast_pg = new_group(broadcast_ranks, f"creating the broadcast group of group {index}")
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
    """One contiguous float32 buffer (gloo's wire type) holding every tensor, integers cast exactly."""
    for tensor in tensors:
        if not tensor.is_floating_point() and tensor.numel() and int(tensor.abs().max()) >= _EXACT_INT_IN_FLOAT32:
            raise ValueError(
                f"integer tensor value {int(tensor.abs().max())} is too large to fuse exactly; turn fusion off"
            )
    return fuse(tensors, torch.float32)


def _unflatten_into(flat: torch.Tensor, tensors: Sequence[torch.Tensor]) -> None:
    with torch.no_grad():
        for tensor, piece in zip(tensors, split_like(flat, tensors), strict=True):
            tensor.copy_(piece)  # copy_ casts back to the tensor's dtype


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
        run_guarded(lambda: dist.all_reduce(flat, group=pg), what, comm.rank, comm.members, comm.timeout_s)
        flat.div_(count)  # gloo has no AVG; SUM then divide, as DDP's allreduce_hook does
        _unflatten_into(flat, tensors)
        return flat.numel() * flat.element_size()
    for tensor in tensors:
        run_guarded(
            lambda tensor=tensor: dist.all_reduce(tensor, group=pg), what, comm.rank, comm.members, comm.timeout_s
        )
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
        run_guarded(lambda: dist.broadcast(flat, src=comm.root, group=pg), what, comm.rank, ranks, comm.timeout_s)
        if comm.rank != comm.root:
            _unflatten_into(flat, tensors)
        return flat.numel() * flat.element_size()
    for tensor in tensors:
        run_guarded(
            lambda tensor=tensor: dist.broadcast(tensor, src=comm.root, group=pg),
            what,
            comm.rank,
            ranks,
            comm.timeout_s,
        )
    return _nbytes(tensors)


def sync_from_rank0(model: nn.Module, rank: int, world_size: int, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
    """Give every rank rank 0's full model state (as DDP does at construction), one fused broadcast."""
    if world_size < 2:
        return
    tensors = [tensor.data for tensor in model.state_dict(keep_vars=True).values()]
    flat = _flatten(tensors)
    run_guarded(
        lambda: dist.broadcast(flat, src=0),
        "initial model broadcast from rank 0 on the default group",
        rank,
        tuple(range(world_size)),
        timeout_s,
    )
    if rank != 0:
        _unflatten_into(flat, tensors)


def run_guarded(operation: Callable[[], Any], what: str, rank: int, ranks: Sequence[int], timeout_s: float) -> Any:
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
