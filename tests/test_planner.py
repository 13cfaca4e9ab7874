"""The planner: exact search, the balanced (straggler) objective, the memory-only objective, errors."""

from __future__ import annotations

import itertools
import time
from dataclasses import replace

import numpy as np
import pytest

from flwr_dsparse.costs import CostModel, UnitCost
from flwr_dsparse.models import build_model
from flwr_dsparse.plan import Plan
from flwr_dsparse.planner import (
    KNEE_TOLERANCE,
    OBJECTIVES,
    DeviceSpec,
    SelectionSpace,
    best_selection,
    make_plan,
    parse_budgets,
    step_frontier,
    validate_devices,
)
from flwr_dsparse.scoring import depth_scores


@pytest.fixture(scope="module")
def tiny_cost() -> CostModel:
    return CostModel(build_model("tiny"), (3, 32, 32), time_batches=None)


class FixedTimesCostModel(CostModel):
    """The tiny model's measured memory with fixed step times: each unit's work proportional to its
    trained activations and weights (made up, but the shape a calibration gives).

    The planner's exactness is what these tests check, so its inputs must not move between runs;
    timed on a shared machine, a calibration once made the whole model 6x faster than its
    classifier alone and a step cap unsatisfiable.
    """

    def __init__(self) -> None:
        super().__init__(build_model("tiny"), (3, 32, 32), time_batches=None)
        timed = []
        for cost in super().unit_costs:
            work = 2e-10 * (cost.act_trained[1] + cost.param_bytes / 16)  # seconds per sample
            timed.append(
                replace(
                    cost,
                    forward_s=(1e-4, work),
                    backward_trained_s=(2e-4, 2 * work),
                    backward_frozen_s=(1e-4, work),
                    forward_inference_s=(5e-5, 0.8 * work),
                )
            )
        self._fixed_times = timed

    @property
    def unit_costs(self) -> list[UnitCost]:
        return self._fixed_times


@pytest.fixture(scope="module")
def timed_tiny_cost() -> CostModel:
    return FixedTimesCostModel()


# -- memory only (objective criticality, the paper's planner) ---------------------------------------
def brute_force(cost: CostModel, scores: list[float], budget: float, batch_size: int) -> float:
    names = cost.unit_names
    best = -1.0
    for r in range(1, len(names) + 1):
        for combo in itertools.combinations(range(len(names)), r):
            if cost.predict([names[i] for i in combo], batch_size).total <= budget + 1e-9:
                best = max(best, sum(scores[i] for i in combo))
    return best


def test_exact_search_equals_brute_force(tiny_cost: CostModel) -> None:
    rng = np.random.default_rng(1)
    cheapest = tiny_cost.memory_terms(32).cheapest()[0]
    full = tiny_cost.predict(tiny_cost.unit_names, 32).total
    for _ in range(6):
        scores = list(rng.random(len(tiny_cost.unit_names)))
        budget = float(rng.uniform(cheapest, full))
        plan = make_plan([DeviceSpec(0, budget, 32)], tiny_cost, scores, objective="criticality")
        device = plan.device(0)
        assert device.score == pytest.approx(brute_force(tiny_cost, scores, budget, 32), rel=1e-12)
        assert device.predicted_mb.total <= budget + 1e-6


def test_budgets_respected_and_score_monotone_in_budget(tiny_cost: CostModel) -> None:
    scores = [0.3, 0.1, 0.5, 0.2, 0.4, 0.9]
    budgets = list(np.linspace(tiny_cost.memory_terms(64).cheapest()[0] + 0.01, 40, 25))
    plan = make_plan([DeviceSpec(i, b, 64) for i, b in enumerate(budgets)], tiny_cost, scores, objective="criticality")
    previous = -1.0
    for device, budget in zip(plan.devices, budgets, strict=True):
        assert device.predicted_mb.total <= budget + 1e-6
        assert device.score >= previous - 1e-12
        previous = device.score


def test_plan_is_deterministic_and_round_trips_json(timed_tiny_cost: CostModel) -> None:
    devices = [DeviceSpec(i, b, 32) for i, b in enumerate([16.0, 20.0, 30.0])]
    scores = depth_scores(None, timed_tiny_cost.units)
    first, second = (make_plan(devices, cost, scores) for cost in (timed_tiny_cost, timed_tiny_cost))
    assert first.to_json() == second.to_json() and first.digest() == second.digest()
    assert Plan.from_json(first.to_json()) == first


# -- bad input ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text,message",
    [
        ("80,abc", r"item 1 \('abc'\) is not a number"),
        ("80,-5", "item 1 is -5.0"),
        ("", "empty"),
        ("80,0", "item 1 is 0.0"),
        ("nan", "item 0 is nan"),
    ],
)
def test_parse_budgets_rejects_bad_values(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_budgets(text)


@pytest.mark.parametrize(
    "devices,message",
    [
        ([DeviceSpec(0, 10, 8), DeviceSpec(0, 20, 8)], "duplicate device id 0"),
        ([DeviceSpec(0, -1, 8)], "budget_mb of device 0 is -1"),
        ([DeviceSpec(0, "80", 8)], "budget_mb of device 0 is '80'"),
        ([DeviceSpec(0, 80, 0)], "batch_size of device 0 is 0"),
        ([DeviceSpec(-2, 80, 8)], "device id -2"),
        ([], "no devices"),
    ],
)
def test_invalid_devices_are_rejected_naming_the_field(devices: list[DeviceSpec], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        validate_devices(devices)


def test_budget_below_cheapest_selection_names_device_budget_and_minimum(
    tiny_cost: CostModel, timed_tiny_cost: CostModel
) -> None:
    scores = depth_scores(None, tiny_cost.units)
    below = r"budget 1 MB for device 3 is below the [\d.]+ MB .* at batch 32; lower batch-size or raise memory-mb"
    with pytest.raises(ValueError, match=below):
        make_plan([DeviceSpec(3, 1.0, 32)], tiny_cost, scores, objective="criticality")
    with pytest.raises(ValueError, match=r"budget 1 MB for device 3 is below the [\d.]+ MB .* at batch 32"):
        make_plan([DeviceSpec(3, 1.0, 32)], timed_tiny_cost, scores)  # the balanced planner says the same
    for cost, objective in ((tiny_cost, "criticality"), (timed_tiny_cost, "balanced")):
        plan = make_plan(
            [DeviceSpec(3, 1.0, 32), DeviceSpec(4, 40.0, 32)],
            cost,
            scores,
            objective=objective,
            allow_inference_only=True,
        )
        assert plan.device(3).inference_only and not plan.device(4).inference_only
        assert all(3 not in g.members and 3 in g.broadcast.receivers for g in plan.groups)


def test_scores_must_match_units(tiny_cost: CostModel) -> None:
    with pytest.raises(ValueError, match="got 2 scores for 6 units"):
        make_plan([DeviceSpec(0, 40, 8)], tiny_cost, [1.0, 2.0])


def test_best_selection_returns_none_when_nothing_fits(tiny_cost: CostModel) -> None:
    memory = tiny_cost.memory_terms(32)
    scores = [1.0] * memory.count
    assert best_selection(memory, scores, memory.cheapest()[0] - 0.01) is None
    assert best_selection(memory, scores, memory.cheapest()[0]) is not None


# -- step-time cap by hand ----------------------------------------------------------------------------


def test_step_time_terms_agree_with_step_time(timed_tiny_cost: CostModel) -> None:
    base, increments = timed_tiny_cost.step_time_terms(16)
    names = timed_tiny_cost.unit_names
    for indices in [(0,), (1, 3), (2, 3, 4, 5), (0, 1, 2, 3, 4, 5), (5,), (0, 5)]:
        expected = base[indices[0]] + sum(increments[j] for j in indices[1:])
        assert timed_tiny_cost.step_time([names[i] for i in indices], 16) == pytest.approx(expected, rel=1e-9)


def test_step_cap_is_the_exact_best_under_both_limits(timed_tiny_cost: CostModel) -> None:
    """Brute force over every selection: the capped planner picks the best score among those
    that fit the budget and the step cap; an ample budget no longer means the whole model."""
    cost = timed_tiny_cost
    names = cost.unit_names
    scores = [1.0, 0.5, 2.0, 0.7, 1.5, 3.0]
    full_s = cost.step_time(names, 16)
    budget = cost.predict(names, 16).total + 5  # the whole model fits
    uncapped = make_plan([DeviceSpec(0, budget, 16)], cost, scores, objective="criticality")
    assert list(uncapped.device(0).units) == names
    capped = make_plan([DeviceSpec(0, budget, 16)], cost, scores, objective="criticality", max_step_fraction=0.6)
    chosen = list(capped.device(0).units)
    assert cost.step_time(chosen, 16) <= 0.6 * full_s * (1 + 1e-9) and chosen != names
    best = max(
        (sum(scores[i] for i in combo), [names[i] for i in combo])
        for size in range(1, len(names) + 1)
        for combo in itertools.combinations(range(len(names)), size)
        if cost.step_time([names[i] for i in combo], 16) <= 0.6 * full_s * (1 + 1e-9)
        and cost.predict([names[i] for i in combo], 16).total <= budget
    )
    assert sum(scores[names.index(u)] for u in chosen) == pytest.approx(best[0])
    assert capped.device(0).predicted_step_s == pytest.approx(cost.step_time(chosen, 16))


def test_step_cap_errors_name_the_fix(timed_tiny_cost: CostModel, tiny_cost: CostModel) -> None:
    names = timed_tiny_cost.unit_names
    budget = timed_tiny_cost.predict(names, 16).total + 5
    with pytest.raises(ValueError, match="max-step-fraction must be in"):
        make_plan([DeviceSpec(0, budget, 16)], timed_tiny_cost, [1.0] * len(names), max_step_fraction=0)
    with pytest.raises(ValueError, match="raise max-step-fraction"):
        make_plan([DeviceSpec(0, budget, 16)], timed_tiny_cost, [1.0] * len(names), max_step_fraction=1e-6)
    with pytest.raises(ValueError, match="max-step-fraction < 1 needs a cost model calibrated for step time"):
        make_plan(
            [DeviceSpec(0, budget, 16)], tiny_cost, [1.0] * len(names), objective="criticality", max_step_fraction=0.5
        )


# -- balanced (the default) ------------------------------------------------------------------------------
def every_selection(cost: CostModel, budget: float, batch_size: int, scores: list[float]) -> list[tuple]:
    """(step seconds, criticality, units) of every non-empty selection that fits ``budget``."""
    names = cost.unit_names
    rows = []
    for size in range(1, len(names) + 1):
        for combo in itertools.combinations(range(len(names)), size):
            units = [names[i] for i in combo]
            if cost.predict(units, batch_size).total <= budget + 1e-9:
                rows.append((cost.step_time(units, batch_size), sum(scores[i] for i in combo), units))
    return rows


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_balanced_plan_is_optimal_by_brute_force_over_every_plan(timed_tiny_cost: CostModel, seed: int) -> None:
    """Every combination of every device's fitting selections (about 10^5 plans): the balanced plan
    is at the knee of criticality against the cluster's slowest step (the most criticality gained
    less step paid, each as a share of its range between the fastest plan and the most critical
    one; of the plans within KNEE_TOLERANCE of that, the fastest); at its slowest step no plan has
    more criticality; and no plan with as much criticality has a faster slowest device."""
    cost = timed_tiny_cost
    rng = np.random.default_rng(seed)
    scores = list(rng.random(len(cost.unit_names)))
    floor = cost.memory_terms(16).cheapest()[0]
    full = cost.predict(cost.unit_names, 16).total
    budgets = sorted(float(b) for b in rng.uniform(floor + 0.2, full + 2, size=3))
    devices = [DeviceSpec(i, b, 16) for i, b in enumerate(budgets)]
    plan = make_plan(devices, cost, scores)
    assert plan.meta["objective"] == "balanced"
    options = [every_selection(cost, b, 16, scores) for b in budgets]
    seconds = [np.array([row[0] for row in rows]) for rows in options]
    values = [np.array([row[1] for row in rows]) for rows in options]
    slowest = np.maximum.reduce(np.meshgrid(*seconds, indexing="ij")).ravel()
    total = sum(np.meshgrid(*values, indexing="ij")).ravel()

    chosen_step = max(cost.step_time(list(d.units), 16) for d in plan.devices)
    chosen_value = sum(scores[cost.unit_names.index(u)] for d in plan.devices for u in d.units)
    for device, budget in zip(plan.devices, budgets, strict=True):
        assert device.predicted_mb.total <= budget + 1e-6
        assert device.predicted_step_s <= chosen_step * (1 + 1e-9)
    fastest = slowest.min()
    low_value = total[slowest <= fastest * (1 + 1e-9)].max()
    high_value = total.max()
    high_step = slowest[total >= high_value * (1 - 1e-12)].min()
    if high_value > low_value and high_step > fastest:

        def knee(value, step):
            return (value - low_value) / (high_value - low_value) - (step - fastest) / (high_step - fastest)

        within = slowest <= high_step * (1 + 1e-9)
        knees = knee(total[within], slowest[within])
        if knees.max() <= KNEE_TOLERANCE:  # no knee: the best plan, ties to the slower
            assert knee(chosen_value, chosen_step) == pytest.approx(knees.max(), abs=1e-9)
        else:  # the fastest plan within the tolerance of the best knee
            near_best = knees >= knees.max() - KNEE_TOLERANCE - 1e-12
            assert knee(chosen_value, chosen_step) >= knees.max() - KNEE_TOLERANCE - 1e-9
            assert chosen_step == pytest.approx(slowest[within][near_best].min(), rel=1e-9)
    assert chosen_value == pytest.approx(total[slowest <= chosen_step * (1 + 1e-9)].max(), rel=1e-9)
    assert chosen_step == pytest.approx(slowest[total >= chosen_value * (1 - 1e-9)].min(), rel=1e-9)
    # Every device is also its own exact best under memory and the cluster's step.
    for device, rows in zip(plan.devices, options, strict=True):
        best = max(value for step, value, _ in rows if step <= chosen_step * (1 + 1e-9))
        assert device.score == pytest.approx(best, rel=1e-9)


def test_balanced_plan_is_never_slower_than_the_memory_only_plan(timed_tiny_cost: CostModel) -> None:
    cost = timed_tiny_cost
    full = cost.predict(cost.unit_names, 16).total
    devices = [DeviceSpec(i, full * f, 16) for i, f in enumerate((0.6, 0.7, 0.8, 0.9, 1.05))]
    for scores in ([1.0, 0.5, 2.0, 0.7, 1.5, 3.0], depth_scores(None, cost.units), [3.0, 2.0, 1.0, 1.0, 0.5, 0.1]):
        balanced = make_plan(devices, cost, scores)
        memory_only = make_plan(devices, cost, scores, objective="criticality")
        slowest = {
            name: max(d.predicted_step_s for d in p.devices)
            for name, p in (("balanced", balanced), ("memory", memory_only))
        }
        assert slowest["balanced"] <= slowest["memory"] * (1 + 1e-9)
        assert sum(d.score for d in balanced.devices) <= sum(d.score for d in memory_only.devices) + 1e-9
        assert memory_only.meta["objective"] == "criticality"


def test_step_frontier_is_the_pareto_front_of_fitting_selections(timed_tiny_cost: CostModel) -> None:
    cost = timed_tiny_cost
    scores = [1.0, 0.5, 2.0, 0.7, 1.5, 3.0]
    budget = cost.predict(cost.unit_names, 16).total * 0.8
    space = SelectionSpace(cost.memory_terms(16), scores, cost.step_time_terms(16))
    seconds, value = step_frontier(space, budget)
    assert np.all(np.diff(seconds) > 0) and np.all(np.diff(value) > 0)
    rows = every_selection(cost, budget, 16, scores)
    for limit in list(seconds) + [seconds[0] * 0.5, seconds[-1] * 2]:
        fitting = [v for s, v, _ in rows if s <= limit * (1 + 1e-9)]
        reached = value[np.searchsorted(seconds, limit * (1 + 1e-9), side="right") - 1] if limit >= seconds[0] else None
        assert reached == (pytest.approx(max(fitting), rel=1e-9) if fitting else None)
    assert len(step_frontier(space, 1.0)[0]) == 0  # nothing fits 1 MB


def test_objective_errors_name_the_choices_and_the_fix(tiny_cost: CostModel, timed_tiny_cost: CostModel) -> None:
    assert OBJECTIVES == ("balanced", "criticality")
    budget = timed_tiny_cost.predict(timed_tiny_cost.unit_names, 16).total
    scores = [1.0] * len(timed_tiny_cost.unit_names)
    with pytest.raises(ValueError, match="objective 'fastest' is unknown; choose 'balanced'.*or 'criticality'"):
        make_plan([DeviceSpec(0, budget, 16)], timed_tiny_cost, scores, objective="fastest")
    with pytest.raises(
        ValueError, match="objective='balanced' needs a cost model calibrated for step time.*objective='criticality'"
    ):
        make_plan([DeviceSpec(0, budget, 16)], tiny_cost, scores)


def test_balanced_with_a_hand_cap_stays_within_both(timed_tiny_cost: CostModel) -> None:
    cost = timed_tiny_cost
    names = cost.unit_names
    budget = cost.predict(names, 16).total + 5
    scores = [1.0, 0.5, 2.0, 0.7, 1.5, 3.0]
    # Halfway between the fastest selection's step and the full update's: feasible however the timing fell.
    full_s = cost.step_time(names, 16)
    fraction = min(1.0, (min(cost.step_time([name], 16) for name in names) / full_s + 1) / 2)
    hand = make_plan(
        [DeviceSpec(0, budget, 16), DeviceSpec(1, budget * 0.7, 16)], cost, scores, max_step_fraction=fraction
    )
    for device in hand.devices:
        assert device.predicted_step_s <= fraction * full_s * (1 + 1e-9)
        assert device.predicted_mb.total <= device.budget_mb + 1e-6
    assert hand.meta["objective"] == "balanced"


def test_planning_stays_fast_for_a_hundred_devices(timed_tiny_cost: CostModel) -> None:
    # Not a speed target (that is the benchmark's job): a guard that planning stays interactive.
    cost = timed_tiny_cost
    full = cost.predict(cost.unit_names, 32).total
    devices = [DeviceSpec(i, full * (0.55 + 0.5 * i / 99), 32) for i in range(100)]
    started = time.perf_counter()
    plan = make_plan(devices, cost, depth_scores(None, cost.units))
    assert len(plan.devices) == 100 and all(not d.inference_only for d in plan.devices)
    assert time.perf_counter() - started < 30
