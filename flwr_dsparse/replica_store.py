"""A node's durable replica and momentum in a folder on the node, instead of in ``context.state``.

Flower keeps a node's ``context.state`` outside the ClientApp (in the SuperNode, or in the
simulation engine) and moves it into and out of the ClientApp process with every message: for
MobileNetV2 a 9 MB replica serialized both ways per message, which Flower's own transport of
the same message bytes (the echo app of ``experiments.round_overhead``) does not pay. A folder
on the node's own disk serves every ClientApp process of that node (forked per message in a
deployment, the actors in turn in a simulation): the replica is written once per round and
read back only by a process that holds no live state (:mod:`flwr_dsparse.node_state`).

``context.state`` keeps the token of the node's current copy (``STATE_META``), and an entry is
used only when its token matches, so a stale file (a round written by another process since),
another run's or another node's file is never read as this node's state. An entry is written
to a temporary file and renamed into place, so a reader never sees a partial one. A node whose
entry is missing (a fresh disk, a reconnected node with a new node id) fails its message as a
node that lost its state does, and the server resends the whole model.

Set :data:`REPLICA_STORE_ENV` to a folder on each node (``dsparse deploy up --fast`` sets one
in the deployment's state directory); unset or empty, the replica stays in ``context.state``.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["REPLICA_STORE_ENV", "ReplicaStore", "replica_store_from_env"]

#: A folder on the node: ClientApps keep the node's replica and momentum there (unset or empty: in context.state).
REPLICA_STORE_ENV = "DSPARSE_REPLICA_STORE"


def replica_store_from_env(env: Mapping[str, str] | None = None) -> ReplicaStore | None:
    """The store in ``$DSPARSE_REPLICA_STORE``, or ``None`` when it is unset or empty."""
    folder = (os.environ if env is None else env).get(REPLICA_STORE_ENV, "")
    return ReplicaStore(Path(folder)) if folder else None


@dataclass(frozen=True)
class ReplicaStore:
    """One file per (run, node) in ``folder``: the token, the replica and the momentum buffers."""

    folder: Path

    def path(self, run_id: int, node_id: int) -> Path:
        return self.folder / f"run{run_id}-node{node_id}.pt"

    def save(
        self,
        run_id: int,
        node_id: int,
        token: str,
        replica: Mapping[str, torch.Tensor],
        momentum: Mapping[str, torch.Tensor],
    ) -> None:
        """Write the node's state under ``token``, replacing its previous entry atomically."""
        self.folder.mkdir(parents=True, exist_ok=True)
        target = self.path(run_id, node_id)
        partial = target.with_name(f".{target.name}.{os.getpid()}.{uuid.uuid4().hex}")
        try:
            torch.save({"token": token, "replica": dict(replica), "momentum": dict(momentum)}, partial)
            os.replace(partial, target)
        finally:
            partial.unlink(missing_ok=True)

    def load(
        self, run_id: int, node_id: int, token: str | None
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]] | None:
        """The node's (replica, momentum) written under ``token``; ``None`` if there is no such entry."""
        if token is None:
            return None
        try:
            entry = torch.load(self.path(run_id, node_id), map_location="cpu", weights_only=True)
        except FileNotFoundError:
            return None
        if entry.get("token") != token:
            return None
        return entry["replica"], entry["momentum"]
