"""The DSparse Flower strategy, one concept per module, in the order a round flows:

* :mod:`.membership`: the round-0 query, joins, leaves, budget drops, re-planning;
* :mod:`.replicas`: what each device's replica holds (delta sync) and its momentum;
* :mod:`.replies`: every check a reply passes before anything of it is applied;
* :mod:`.aggregate`: the grouped mean, pure functions over tensors;
* :mod:`.rounds`: the round's state, retries and fallback, checkpoint and resume;
* :mod:`.dsparse`: the :class:`DSparse` Strategy itself, Flower's methods only.
"""

from ..protocol import DeviceReport, read_device_report
from .dsparse import DSparse
from .membership import PlanFn, RoundFailed
from .replicas import device_tensors
from .replies import reply_node, sent_message_ids

__all__ = [
    "DSparse",
    "DeviceReport",
    "PlanFn",
    "RoundFailed",
    "device_tensors",
    "read_device_report",
    "reply_node",
    "sent_message_ids",
]
