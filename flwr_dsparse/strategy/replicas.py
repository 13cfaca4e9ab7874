"""What each device's replica holds: tensor versions, its selection, and its momentum.

The server never asks a node what it holds; it keeps a ledger instead, optimistic on
delivery and pessimistic on failure:

* a tensor sent is assumed held (:meth:`Replicas.mark_sent`);
* a device that trained holds its own values of its selection, which match no global
  version, unless it was its group's only accepted member (then the mean *is* its values);
* a device that failed or did not answer may have lost its replica: it is sent everything.

With ``keep_client_state`` the server also keeps each device's momentum from its last
accepted reply and restores it whenever the node's own copy may differ.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch

from ..exchange import TensorVersions, Update
from ..plan import Plan

__all__ = ["Replicas", "device_tensors"]


def device_tensors(plan: Plan, device: int) -> list[str]:
    """Parameters and buffers that ``device`` trains (BatchNorm statistics travel with their unit)."""
    return [name for group in plan.groups_of(device) for name in group.tensors]


class Replicas:
    """The server's ledger of every device's replica (see the module docstring)."""

    def __init__(self) -> None:
        self.versions: TensorVersions | None = None
        self.sent_selection: dict[int, tuple[str, ...]] = {}
        # The server's copy of each device's optimizer state (from its last accepted reply),
        # and which devices are known to hold exactly that copy.
        self.client_state: dict[int, dict[str, torch.Tensor]] = {}
        self.state_synced: set[int] = set()

    def track(self, names: Sequence[str]) -> TensorVersions:
        """Start tracking the global model's tensors ``names``; later rounds must have the same."""
        if self.versions is None:
            self.versions = TensorVersions(names)
        elif list(names) != self.versions.names:
            raise ValueError("the global model's tensors changed between rounds; DSparse needs one fixed model")
        return self.versions

    def selection_changed(self, device: int, units: tuple[str, ...]) -> bool:
        return self.sent_selection.get(device) != units

    def mark_sent(self, device: int, names: Iterable[str], units: tuple[str, ...]) -> None:
        """``names`` and the selection ``units`` went to ``device`` (assumed delivered)."""
        assert self.versions is not None
        self.versions.mark_held(device, names)
        self.sent_selection[device] = units

    def state_to_restore(self, device: int) -> dict[str, torch.Tensor] | None:
        """The momentum to send ``device`` when its own copy may differ (``None``: it holds it)."""
        return None if device in self.state_synced else self.client_state.get(device, {})

    def drop(self, device: int) -> None:
        """``device`` left the plan: forget its replica and selection."""
        assert self.versions is not None
        self.versions.forget(device)
        self.sent_selection.pop(device, None)

    def after_round(
        self, plan: Plan, updates: Mapping[int, Update], replied: set[int], failed: set[int], sent: set[int]
    ) -> None:
        """What each replica holds after a round (see the module docstring)."""
        assert self.versions is not None
        for device in failed:
            self.versions.forget(device)
        for device in replied - failed:
            self.versions.mark_diverged(device, device_tensors(plan, device))
        for group in plan.groups:
            members = [d for d in group.members if d in updates]
            if len(members) == 1:
                self.versions.mark_held(members[0], group.tensors)
        for device in sent - replied - failed:
            self.versions.forget(device)  # no answer at all: its state is unknown
        # Whoever did not have a reply accepted may now hold momentum the server did not keep.
        self.state_synced -= (replied | failed | sent) - set(updates)

    def keep_state(self, device: int, state: dict[str, torch.Tensor]) -> None:
        """The momentum of ``device``'s accepted reply: the node holds exactly this copy."""
        self.client_state[device] = state
        self.state_synced.add(device)

    def keep_states(self, states: Mapping[int, dict[str, torch.Tensor] | None], accepted: Iterable[int]) -> None:
        """After an applied round: keep the momentum each accepted device uploaded.

        A device that uploaded none (a round between ``checkpoint_every`` uploads) holds its own
        momentum, the one to continue from; the server's older copy is restored only if the
        node later fails or is rejected.
        """
        for device in accepted:
            state = states.get(device)
            if state is not None:
                self.keep_state(device, state)
            else:
                self.state_synced.add(device)

    def reset_nodes(self) -> None:
        """The nodes are new processes (a resumed run): they hold nothing."""
        assert self.versions is not None
        self.versions.held.clear()
        self.sent_selection.clear()
        self.state_synced.clear()
