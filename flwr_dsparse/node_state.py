"""A node's live state between messages: the model, its selection and momentum stay in the process.

Flower's simulation runs ClientApps in long-lived actor processes, so a node's model can stay
alive between its messages instead of being rebuilt and reloaded from ``context.state`` every
round. ``context.state`` stays the durable copy: it is written every round, and the live copy
is used only when it is provably the same state, so results are bit-identical with or without
it. An entry is keyed by (run id, node id) and carries a token that is also written to the
node's ``context.state``; it is used only when the token matches, which rules out

* another run or another node (the key),
* a stale copy: several actors serve the nodes in turn, so an actor may hold a node's state
  of an older round while another actor trained it since (the token differs),
* a restarted node or a fresh process (no entry, or ``context.state`` lost its token).

A message from the server that resends the whole model (it thinks the node lost its state)
drops the live copy: the node then rebuilds from the message and ``context.state``.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, field

import torch

__all__ = ["NodeState", "clear", "put", "take", "new_token"]


@dataclass
class NodeState:
    """What one node keeps alive between its messages.

    Attributes
    ----------
    token : str
        Written to ``context.state`` beside the durable copy; the entry is valid only while they match.
    model : torch.nn.Module
        The model holding the node's replica.
    selection : list of str
        The units it trains.
    momentum : dict
        Its momentum buffers by parameter name.
    """

    token: str
    model: torch.nn.Module
    selection: list[str]
    momentum: dict[str, torch.Tensor] = field(default_factory=dict)


_LIVE: dict[tuple[int, int], NodeState] = {}
_COUNTER = itertools.count()


def new_token(server_round: int) -> str:
    """A token no other process or message can produce (process id, round, a counter)."""
    return f"{os.getpid()}:{server_round}:{next(_COUNTER)}"


def take(run_id: int, node_id: int, token: str | None) -> NodeState | None:
    """The live state of (``run_id``, ``node_id``) if its token is ``token``; any stale entry is dropped."""
    state = _LIVE.pop((run_id, node_id), None)
    if state is None or token is None or state.token != token:
        return None
    return state


def put(run_id: int, node_id: int, state: NodeState) -> None:
    """Keep ``state`` alive for the node's next message."""
    _LIVE[(run_id, node_id)] = state


def clear() -> None:
    """Forget every live state (tests; the durable copies in ``context.state`` remain)."""
    _LIVE.clear()
