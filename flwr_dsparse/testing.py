"""Test harnesses for DSparse and for users' own tests of their Flower apps.

:class:`LocalGrid` is Flower's ``Grid`` answered in this process by a real ``ClientApp``,
one ``Context`` per node. It exists because Flower's simulation has a fixed node set (no
node can join, leave or die) and a Ray start per case takes seconds to minutes; what it does
not exercise is the transport (for that, use ``flwr.simulation.run_simulation`` or a
deployment, :mod:`flwr_dsparse.deploy`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from flwr.app import Context, Error, Message, MessageType, RecordDict
from flwr.clientapp import ClientApp

from .protocol import NODE_NUM_PARTITIONS, NODE_PARTITION_ID

__all__ = ["Fault", "LocalGrid"]

#: ``fault(partition, server_round, message, reply)`` returns the reply to deliver: the reply
#: itself or a changed one, ``None`` (no reply: a timeout or a dead node) or a list of replies
#: (duplicates).
Fault = Callable[[int, int, Message, Message], Any]


@dataclass
class _Node:
    """One simulated node: its Flower node id, its partition and its Context."""

    node_id: int
    partition: int
    context: Context


class LocalGrid:
    """Flower's Grid, answered in-process by ``client_app``, one Context per node.

    Parameters
    ----------
    client_app : ClientApp
        The app that answers (e.g. the project's ``client.app.app``).
    partitions : Iterable[int]
        The partition ids of the nodes connected at the start.
    num_partitions : int
        Every node's ``num-partitions`` node-config entry.
    node_config : Mapping, optional
        Extra node config per partition id (e.g. ``{2: {"memory-mb": 40.0}}``).
    fault : Fault, optional
        May change, drop or duplicate a train reply.
    membership : Callable[[int], Iterable[int]], optional
        The partitions connected before a round (nodes leaving and joining).
    """

    def __init__(
        self,
        client_app: ClientApp,
        partitions: Iterable[int],
        num_partitions: int,
        *,
        node_config: Mapping | None = None,
        fault: Fault | None = None,
        membership: Callable[[int], Iterable[int]] | None = None,
    ) -> None:
        self.client_app = client_app
        self.num_partitions = num_partitions
        self.node_config = dict(node_config or {})
        self.fault = fault
        self.membership = membership
        self.nodes: dict[int, _Node] = {}
        self._next_round = 1
        # Messages are built outside a running app: give them the task identity an app would have.
        from flwr.supercore.task_identity import TaskIdentity

        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
        for partition in partitions:
            self.connect(partition)

    def connect(self, partition: int) -> int:
        node_id = 1000 + partition + 100 * len(self.nodes)  # a new id for every (re)connection
        config = {
            NODE_PARTITION_ID: partition,
            NODE_NUM_PARTITIONS: self.num_partitions,
            **self.node_config.get(partition, {}),
        }
        self.nodes[node_id] = _Node(node_id, partition, Context(1, node_id, config, RecordDict(), {}))
        return node_id

    def disconnect(self, partition: int) -> None:
        for node_id in [n for n, node in self.nodes.items() if node.partition == partition]:
            del self.nodes[node_id]

    # -- the Grid methods DSparse uses ---------------------------------------------------------
    def get_node_ids(self) -> list[int]:
        if self.membership is not None:
            wanted = set(self.membership(self._next_round))
            for partition in {n.partition for n in self.nodes.values()} - wanted:
                self.disconnect(partition)
            for partition in wanted - {n.partition for n in self.nodes.values()}:
                self.connect(partition)
        return sorted(self.nodes)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        replies: list[Message] = []
        for message in messages:
            node = self.nodes.get(message.metadata.dst_node_id)
            if node is None:
                continue  # a node that is gone never answers
            try:
                reply = self.client_app(message, node.context)
            except Exception as error:  # what Flower does with a raising ClientApp: an error reply
                reply = Message(Error(code=0, reason=f"ClientApp raised: {error!r}"), reply_to=message)
            if message.metadata.message_type == MessageType.TRAIN:
                server_round = int(message.metadata.group_id)
                self._next_round = server_round + 1
                if self.fault is not None:
                    reply = self.fault(node.partition, server_round, message, reply)
            if reply is None:
                continue
            replies.extend(reply if isinstance(reply, list) else [reply])
        return replies
