"""A node's live state between messages: its model, trainer and momentum stay in the process.

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

A message that carries every tensor (the server resent the whole model, or some node trains
every unit so every tensor changed) is applied to a valid live copy like any other: with the
token matching, the live copy is the durable one, so rebuilding would give the same bits
(tested) at the cost of a state dict load and a new trainer.

A hit also keeps the trainer (its hooks, lean layers and optimizer with the momentum inside)
while the selection stays the same. Where the durable copy is a replica store on the node's
disk, a stale entry is not dropped but refreshed: the store's entry is read straight into its
tensors and the trainer's momentum replaced, a third of the cost of loading a state dict into a
model, and the trainer is kept. Without a store a stale entry is dropped.

A miss (no entry, or a dropped one) reuses a retired entry's
model rather than building one: it loads a whole state dict into it either way. Without a
store, where no entry was retired yet, it reclaims the model of an entry that is stale by age:
a node whose entry here is older than the previous round was served elsewhere since (per-step
rounds message every node every round), so the actor's copy will never match again; building
a model instead costs as much as a MobileNetV2 step on this machine's cores. With a store no
entry is reclaimed: a stale one is refreshed on the node's next visit, so each actor builds a
node's model at most once.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, field

import torch

from .records import tensor_nbytes
from .trainer import SparseTrainer
from .units import Unit

__all__ = ["MAX_LIVE_BYTES", "NodeState", "add_spare", "clear", "put", "retire", "spare_model", "take", "new_token"]

#: Models of retired entries kept per model name for reuse: the one model a miss needs, and one more.
MAX_SPARES = 2
#: Bytes of live entries kept per process (their models' tensors and gradients, and momentum);
#: beyond it the oldest entries are retired (their durable copies remain). With a replica store no
#: entry is reclaimed on a miss, so this is what bounds an actor's memory: about 19 MobileNetV2
#: entries, every entry of a 100-node run of the tiny model.
MAX_LIVE_BYTES = 512 * 2**20


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
        Its momentum buffers by parameter name (copies; the durable copy's and a new trainer's).
    model_name : str
        The architecture's name (:func:`flwr_dsparse.models.build_model`): which misses may reuse ``model``.
    tensors : dict
        ``model.state_dict()``: views of its parameters and buffers, which change only in place.
    units : list of Unit
        ``model_units(model)``.
    trainer : SparseTrainer, optional
        The trainer of ``selection`` on ``model``, hooks installed; its optimizer holds ``momentum``.
    server_round : int
        The round the entry was kept after (how stale it is: :func:`spare_model`).
    held_bytes : int
        What keeping it alive holds (its tensors, gradients and momentum), set by :func:`put`.
    """

    token: str
    model: torch.nn.Module
    selection: list[str]
    momentum: dict[str, torch.Tensor] = field(default_factory=dict)
    model_name: str = ""
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    units: list[Unit] = field(default_factory=list)
    trainer: SparseTrainer | None = None
    server_round: int = 0
    held_bytes: int = 0


_LIVE: dict[tuple[int, int], NodeState] = {}
_SPARES: dict[str, list[torch.nn.Module]] = {}
_COUNTER = itertools.count()


def new_token(server_round: int) -> str:
    """A token no other process or message can produce (process id, round, a counter)."""
    return f"{os.getpid()}:{server_round}:{next(_COUNTER)}"


def take(run_id: int, node_id: int, token: str | None, *, stale: bool = False) -> NodeState | None:
    """The live state of (``run_id``, ``node_id``) if its token is ``token``; a stale entry is retired.

    ``stale=True`` returns a stale entry too (its token differs from ``token``): a node whose
    durable copy is in a replica store refreshes the entry's tensors in place from it
    (:meth:`flwr_dsparse.replica_store.ReplicaStore.load_into`) and keeps its trainer. With no
    ``token`` (``context.state`` lost it) the entry is always retired.
    """
    state = _LIVE.pop((run_id, node_id), None)
    if state is not None and (token is None or (state.token != token and not stale)):
        retire(state)
        return None
    return state


def retire(state: NodeState) -> None:
    """Drop ``state``, keeping its model as a spare for the next miss of the same architecture.

    A miss loads a whole state dict into the model it trains (every parameter and buffer),
    so a retired model serves as well as a freshly built one and saves building it (for
    MobileNetV2 about as long as a training step). What a state dict does not hold is reset
    here: the trainer's hooks and lean layers are removed and gradients dropped.
    """
    if state.trainer is not None:
        state.trainer.close()
    for param in state.model.parameters():
        param.grad = None
    if state.model_name:
        add_spare(state.model_name, state.model)


def add_spare(model_name: str, model: torch.nn.Module) -> None:
    """Keep ``model`` (an architecture named ``model_name``) for a miss to load a state dict into."""
    spares = _SPARES.setdefault(model_name, [])
    if len(spares) < MAX_SPARES:
        spares.append(model)


def spare_model(model_name: str, reclaim_before: int | None = None) -> torch.nn.Module | None:
    """A retired model of ``model_name`` to load a whole state dict into, or ``None``.

    With no retired one, and ``reclaim_before`` given, the oldest live entry of that
    architecture kept before round ``reclaim_before`` is retired for it (see the module's
    docstring): dropping an entry never loses anything, its node's durable copy remains.
    """
    spares = _SPARES.get(model_name)
    if not spares and reclaim_before is not None:
        stale = [
            key
            for key, state in _LIVE.items()
            if state.model_name == model_name and state.server_round < reclaim_before
        ]
        if stale:
            retire(_LIVE.pop(min(stale, key=lambda key: _LIVE[key].server_round)))
            spares = _SPARES.get(model_name)
    return spares.pop() if spares else None


def put(run_id: int, node_id: int, state: NodeState) -> None:
    """Keep ``state`` alive for the node's next message (retiring the oldest beyond :data:`MAX_LIVE_BYTES`)."""
    grads = {name: p.grad for name, p in state.model.named_parameters() if p.grad is not None}
    state.held_bytes = tensor_nbytes(state.tensors) + tensor_nbytes(grads) + tensor_nbytes(state.momentum)
    _LIVE[(run_id, node_id)] = state
    while len(_LIVE) > 1 and sum(entry.held_bytes for entry in _LIVE.values()) > MAX_LIVE_BYTES:
        oldest = min(_LIVE, key=lambda key: _LIVE[key].server_round)
        retire(_LIVE.pop(oldest))


def clear() -> None:
    """Forget every live state and spare model (tests; the durable copies in ``context.state`` remain)."""
    _LIVE.clear()
    _SPARES.clear()
