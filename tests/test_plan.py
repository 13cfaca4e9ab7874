"""The Plan: selections turned into groups and their exchanges (the planner's own tests: test_planner.py)."""

from __future__ import annotations

from flwr_dsparse.costs import CostModel
from flwr_dsparse.plan import plan_from_selections


def test_groups_of_a_hand_made_three_device_plan(tiny_cost: CostModel) -> None:
    units = tiny_cost.units
    selections = {0: ["classifier"], 1: ["features.4", "classifier"], 2: ["features.3", "features.4", "classifier"]}
    plan = plan_from_selections(units, selections, tiny_cost.tensor_bytes())
    summary = [(g.members, g.units, g.broadcast.root, g.broadcast.receivers) for g in plan.groups]
    assert summary == [
        ((2,), ("features.3",), 2, (0, 1)),
        ((1, 2), ("features.4",), 1, (0,)),
        ((0, 1, 2), ("classifier",), 0, ()),
    ]
    assert plan.frozen_units == ("features.0", "features.1", "features.2")
    sizes = tiny_cost.tensor_bytes()
    group = plan.groups[1]
    assert group.params == ("features.4.0.weight", "features.4.1.weight", "features.4.1.bias")
    assert group.allreduce.bytes == sum(sizes[t] for t in group.tensors) == group.broadcast.bytes
    assert plan.groups[2].broadcast.bytes == 0  # nobody outside the group
