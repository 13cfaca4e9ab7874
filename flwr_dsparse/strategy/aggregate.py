"""The grouped mean: each Plan group's tensors averaged over the members that replied.

Pure functions over tensors (the AllReduce side of DSparse, computed at the server): no
Flower, no strategy state. Each group is fused into one flat buffer, the fusion that lets a
transport move the group as one message.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from ..exchange import Update
from ..fusion import fuse, split_like
from ..plan import Group

__all__ = ["aggregate_groups", "fused_weighted_mean", "member_values"]


def fused_weighted_mean(names: Sequence[str], updates: Sequence[Update]) -> dict[str, torch.Tensor]:
    """Example-weighted mean of ``names`` over ``updates``, as one fused buffer.

    The tensors of all ``names`` are flattened into a single float64 buffer per
    update (the fusion that lets a transport send the group as one message), then
    ``sum_i (n_i / N) * x_i`` is accumulated in update order, and the result is split
    back and cast to each tensor's dtype (integers are rounded). With one update the
    weight is exactly 1.0, so the result is bit-identical to that update.

    Parameters
    ----------
    names : Sequence[str]
        The group's tensors (parameters and buffers), in a fixed order.
    updates : Sequence[Update]
        At least one update holding every name; summed in the given order
        (callers sort by device id, for determinism).
    """
    if not updates:
        raise ValueError("fused_weighted_mean needs at least one update")
    total = sum(update.examples for update in updates)
    likes = [updates[0].tensors[name] for name in names]
    # Two float64 buffers (float64 holds every float32 value and every integer count exactly):
    # the sum, started as the first update's weighted values, and the next update's values.
    acc = fuse(likes, torch.float64).mul_(updates[0].examples / total)
    flat = torch.empty_like(acc)  # unfilled: no pages touched unless a second update is copied in
    for update in updates[1:]:
        fuse([update.tensors[name] for name in names], torch.float64, out=flat)
        # Multiply then add as two IEEE operations (no fused alpha), so the result is
        # reproducible by a hand computation: the same values as ``acc += flat * w``.
        flat.mul_(update.examples / total)
        acc.add_(flat)
    # Cast back per tensor, but the dtype that holds most of the values (float32 weights) in
    # one pass over the whole buffer: the same elementwise casts, without one call per tensor.
    main = max({like.dtype for like in likes}, key=lambda d: sum(like.numel() for like in likes if like.dtype == d))
    in_main = split_like(_cast(acc, main), likes)
    return {
        name: cast if like.dtype == main else _cast(piece, like.dtype)
        for name, like, piece, cast in zip(names, likes, split_like(acc, likes), in_main, strict=True)
    }


def _cast(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Float64 ``values`` as ``dtype``: floats cast, integers rounded first."""
    return values.to(dtype) if dtype.is_floating_point else values.round().to(dtype)


def aggregate_groups(groups: Sequence[Group], updates: Mapping[int, Update]) -> dict[str, torch.Tensor]:
    """The grouped mean of one round: for each group, the mean over its members that replied.

    Parameters
    ----------
    groups : Sequence[Group]
        The Plan's groups.
    updates : Mapping[int, Update]
        Accepted updates by device id.

    Returns
    -------
    dict[str, torch.Tensor]
        New values of the tensors of every group with at least one reply. Tensors of
        groups without a reply, and of units nobody trains, are absent: they stay as
        they are.
    """
    new: dict[str, torch.Tensor] = {}
    for group in groups:
        replied = [updates[device] for device in sorted(group.members) if device in updates]
        if replied:
            new.update(fused_weighted_mean(group.tensors, replied))
    return new


def member_values(groups: Sequence[Group], updates: Mapping[int, Update]) -> dict[str, torch.Tensor]:
    """Each group's tensors from its first member that replied (collective rounds).

    After a collective round the members of a group hold bit-identical values (checked by
    the strategy), so the group's value is any member's.
    """
    new: dict[str, torch.Tensor] = {}
    for group in groups:
        member = next((device for device in group.members if device in updates), None)
        if member is not None:
            new.update({name: updates[member].tensors[name] for name in group.tensors})
    return new
