"""The planner: for every device, the best selection that fits its memory budget.

For one device the problem is: choose units maximising the total score subject
to predicted memory ≤ budget. The coupling is in the earliest trained unit
``e``: it decides which activations the later units keep. With ``e`` fixed a
selection's memory is the largest of a few phases, each additive over the later
units (:meth:`CostModel.memory_terms`), so the search enumerates every ``e`` and,
for each, every subset of the later units, exactly, with vectorised subset sums.
Units are few (MobileNetV2 has 20: 2²⁰ subsets in all).

Two objectives:

* ``"criticality"`` (the paper's planner): every device trains its most critical
  selection that fits its memory, however long its step takes.
* ``"balanced"`` (the default): a synchronous step waits for the slowest device, so
  the planner also chooses the cluster's step, the cap ``T`` on every device's
  predicted step time, and then every device trains its most critical selection
  that fits both its memory and ``T``. Minimising ``T`` alone is degenerate (every
  device would train only its fastest unit, the classifier), so ``T`` is the knee of
  the cluster's criticality against its step (:func:`balanced_step_cap`): the last
  second of step that still buys criticality at the average rate between the
  fastest plan and the memory-only one, and where that curve is flat (caps within
  :data:`KNEE_TOLERANCE` of the best), the fastest of them. At that ``T`` no plan has
  more criticality, and no plan with as much criticality has a faster slowest device.
  The search is exact: each device's (step time, criticality) Pareto frontier under
  its memory budget, from the same subset enumeration, gives every candidate ``T``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .costs import CostModel
from .peak import SelectionMemory, subset_sums
from .plan import Plan, plan_from_selections

__all__ = [
    "DeviceSpec",
    "MAX_SEARCH_UNITS",
    "OBJECTIVES",
    "SelectionSpace",
    "KNEE_TOLERANCE",
    "balanced_step_cap",
    "best_selection",
    "make_plan",
    "parse_budgets",
    "step_frontier",
    "validate_devices",
]

#: Subset enumeration is exact up to this many units after the earliest (2²³ candidates).
MAX_SEARCH_UNITS = 23
_SLACK_MB = 1e-9  # float noise between the search's sums and predict()'s
_SLACK_S = 1e-9  # relative float noise between the search's step-time sums and step_time()'s
#: ``"balanced"``: the cluster's step cap chosen with criticality (default); ``"criticality"``: memory only.
OBJECTIVES = ("balanced", "criticality")
#: Step caps whose knee utility (:func:`balanced_step_cap`, a share of each range) is within this
#: of the best are equally good, and the fastest of them is chosen. The utility of MobileNetV2's
#: plans is flat near its best (on the comparison's cluster, caps from 0.45x to 0.49x of the
#: full step are within 0.005 of it), so a hair of estimated criticality (the scores come from
#: 64 examples) decided several percent of every synchronous step; time saved is certain.
KNEE_TOLERANCE = 0.01


@dataclass(frozen=True)
class DeviceSpec:
    """A device as the planner sees it."""

    id: int
    budget_mb: float
    batch_size: int


def parse_budgets(text: str, *, field: str = "budgets") -> list[float]:
    """Parse ``"80,110,140"`` into MB values, rejecting anything not a positive number."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"{field} is empty; give comma-separated MB values such as '80,110,140'")
    budgets = []
    for position, item in enumerate(text.split(",")):
        try:
            value = float(item)
        except ValueError:
            raise ValueError(
                f"{field}: item {position} ({item.strip()!r}) is not a number; give MB values such as '80,110,140'"
            ) from None
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"{field}: item {position} is {value}; every budget must be a positive number of MB")
        budgets.append(value)
    return budgets


def validate_devices(devices: Sequence[DeviceSpec]) -> None:
    """Reject empty lists, duplicate ids and non-positive or non-numeric fields, naming them."""
    if not devices:
        raise ValueError("no devices to plan for; give at least one budget")
    seen: set[int] = set()
    for device in devices:
        if isinstance(device.id, bool) or not isinstance(device.id, int) or device.id < 0:
            raise ValueError(f"device id {device.id!r} must be a non-negative integer")
        if device.id in seen:
            raise ValueError(f"duplicate device id {device.id}; every device needs its own id (partition-id)")
        seen.add(device.id)
        budget = device.budget_mb
        if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not math.isfinite(budget) or budget <= 0:
            raise ValueError(f"budget_mb of device {device.id} is {budget!r}; it must be a positive number of MB")
        if isinstance(device.batch_size, bool) or not isinstance(device.batch_size, int) or device.batch_size <= 0:
            raise ValueError(
                f"batch_size of device {device.id} is {device.batch_size!r}; it must be a positive integer"
            )


def _check_search_size(count: int, first: int) -> None:
    if count - first - 1 > MAX_SEARCH_UNITS:
        raise ValueError(
            f"the model has {count} units; exact search supports at most {MAX_SEARCH_UNITS + 1}; "
            "pass coarser unit names (e.g. whole stages)"
        )


def best_selection(
    memory: SelectionMemory,
    scores: Sequence[float],
    budget_mb: float,
    *,
    time_terms: tuple[np.ndarray, np.ndarray] | None = None,
    max_step_s: float | None = None,
) -> tuple[tuple[int, ...], float, float] | None:
    """The exact best selection under ``budget_mb`` (and, optionally, ``max_step_s``).

    Returns ``(unit indices, total score, predicted MB)``, or ``None`` if no
    non-empty selection fits. ``memory`` is :meth:`CostModel.memory_terms` at the
    device's batch size. Ties go to the cheaper selection, then to the
    later earliest unit, so the answer is deterministic. ``time_terms`` is
    :meth:`CostModel.step_time_terms` at the device's batch size; with
    ``max_step_s`` a selection must also be predicted to step within it.
    """
    count = memory.count
    values = np.asarray(scores, dtype=float)
    best: tuple[float, float, int, tuple[int, ...]] | None = None  # (score, -mb, e, indices)
    for first in range(count):
        later = np.arange(first + 1, count)
        _check_search_size(count, first)
        if memory.lower_bound(first) > budget_mb + _SLACK_MB:
            continue  # nothing that starts here fits: skip its 2^k subsets
        megabytes = memory.subsets(first)
        value = values[first] + subset_sums(values[later])
        fits = megabytes <= budget_mb + _SLACK_MB
        if max_step_s is not None and time_terms is not None:
            time_base, time_increments = time_terms
            fits &= time_base[first] + subset_sums(time_increments[later]) <= max_step_s * (1 + _SLACK_S)
        if not fits.any():
            continue
        candidates = np.flatnonzero(fits)
        # Highest score; among equals, least memory; among those, the smallest index.
        order = np.lexsort((candidates, megabytes[candidates], -value[candidates]))
        pick = int(candidates[order[0]])
        indices = (first,) + tuple(int(later[k]) for k in range(len(later)) if pick >> k & 1)
        key = (float(value[pick]), -float(megabytes[pick]), first, indices)
        if best is None or key[:3] > best[:3]:
            best = key
    if best is None:
        return None
    return best[3], best[0], -best[1]


class SelectionSpace:
    """Every non-empty selection at one batch size: memory, step time and score, grouped by earliest unit.

    Within a group the selections are sorted by step time, so a device's Pareto frontier is
    one pass over the selections that fit its budget.
    """

    def __init__(
        self,
        memory: SelectionMemory,
        scores: Sequence[float],
        time_terms: tuple[np.ndarray, np.ndarray],
        max_budget_mb: float = math.inf,
    ) -> None:
        count = memory.count
        values = np.asarray(scores, dtype=float)
        time_base, time_increments = time_terms
        self.blocks: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # (memory, seconds, score), sorted
        for first in range(count):
            later = np.arange(first + 1, count)
            _check_search_size(count, first)
            if memory.lower_bound(first) > max_budget_mb + _SLACK_MB:
                continue  # no device affords any selection that starts here: skip its 2^k subsets
            megabytes = memory.subsets(first)
            seconds = time_base[first] + subset_sums(time_increments[later])
            value = values[first] + subset_sums(values[later])
            order = np.argsort(seconds, kind="stable")
            self.blocks.append((megabytes[order], seconds[order], value[order]))


def _pareto(seconds: np.ndarray, value: np.ndarray, *, presorted: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The points of ``(seconds, value)``, sorted by seconds, that beat every faster point's value.

    ``presorted``: the points are already in order of seconds (equal seconds may then both
    stay, the better one last, which the final merge resolves).
    """
    if len(seconds) == 0:
        return seconds, value
    if not presorted:
        order = np.lexsort((-value, seconds))
        seconds, value = seconds[order], value[order]
    best = np.maximum.accumulate(value)
    keep = np.ones(len(value), dtype=bool)
    keep[1:] = best[1:] > best[:-1]
    return seconds[keep], value[keep]


def step_frontier(
    space: SelectionSpace, budget_mb: float, max_step_s: float | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """One device's (step time, criticality) Pareto frontier under its memory budget.

    Returns ``(seconds, scores)``, both strictly increasing: ``scores[k]`` is the most
    criticality any selection that fits ``budget_mb`` reaches within ``seconds[k]`` per step.
    Empty when nothing fits.
    """
    seconds_parts, value_parts = [], []
    for memory, seconds, value in space.blocks:
        fits = memory <= budget_mb + _SLACK_MB
        if max_step_s is not None:
            fits &= seconds <= max_step_s * (1 + _SLACK_S)
        if fits.any():
            block_seconds, block_value = _pareto(seconds[fits], value[fits], presorted=True)
            seconds_parts.append(block_seconds)
            value_parts.append(block_value)
    if not seconds_parts:
        return np.zeros(0), np.zeros(0)
    return _pareto(np.concatenate(seconds_parts), np.concatenate(value_parts))


def balanced_step_cap(
    frontiers: Sequence[tuple[np.ndarray, np.ndarray]], *, tolerance: float = KNEE_TOLERANCE
) -> float:
    """The cluster's step cap ``T``: where one more second of step stops paying for itself.

    ``frontiers`` are the devices' :func:`step_frontier` results (none empty). ``C(T)`` is
    the cluster's criticality (the sum of every device's best within ``T``). Between the
    fastest plan (``T_lo``: the slowest device's fastest selection) and the memory-only plan
    (``T_hi``: every device's most critical selection), ``T`` maximises the criticality
    gained minus the step time paid, each as a share of its whole range::

        (C(T) - C(T_lo)) / (C(T_hi) - C(T_lo))  -  (T - T_lo) / (T_hi - T_lo)

    that is, the last cap whose extra second still buys criticality at least at the average
    rate between the two ends. Caps within ``tolerance`` of the best utility count as equal and
    the fastest of them wins (:data:`KNEE_TOLERANCE`). A curve with no knee (the best utility
    at most ``tolerance``: criticality comes no faster than step time) keeps the best cap, ties
    going to the larger ``T``, so a cluster whose criticality only comes with the slowest step
    keeps the memory-only plan. Every candidate is a frontier time, so the cluster's slowest
    predicted step is ``T`` itself.
    """
    if not frontiers or any(len(seconds) == 0 for seconds, _ in frontiers):
        raise ValueError("balanced_step_cap needs one non-empty frontier per trainable device")
    low = max(float(seconds[0]) for seconds, _ in frontiers)
    high = max(float(seconds[-1]) for seconds, _ in frontiers)
    candidates = np.unique(np.concatenate([seconds for seconds, _ in frontiers]))
    candidates = candidates[(candidates >= low) & (candidates <= high)]
    total = np.zeros(len(candidates))
    for seconds, value in frontiers:
        total += value[np.searchsorted(seconds, candidates, side="right") - 1]
    gain, span = total[-1] - total[0], high - low
    if gain <= 0 or span <= 0:
        return float(candidates[-1] if gain > 0 else candidates[0])
    utility = (total - total[0]) / gain - (candidates - low) / span
    if utility.max() <= tolerance:
        return float(candidates[np.flatnonzero(utility >= utility.max() - 1e-12)[-1]])
    return float(candidates[np.flatnonzero(utility >= utility.max() - tolerance)[0]])


def make_plan(
    devices: Sequence[DeviceSpec],
    cost_model: CostModel,
    scores: Sequence[float],
    *,
    objective: str = "balanced",
    allow_inference_only: bool = False,
    max_step_fraction: float = 1.0,
    meta: Mapping[str, Any] | None = None,
) -> Plan:
    """Plan every device: the most critical selection that fits its budget and the cluster's step.

    A synchronous step waits for the slowest device. With ``objective="balanced"`` (the
    default) the planner chooses the cluster's step cap ``T`` (:func:`balanced_step_cap`:
    the knee of criticality against step time) and every device trains its most critical
    selection that fits its memory and ``T``. ``objective="criticality"`` is the paper's
    planner: memory only, so a device that affords much trains much, and is the straggler.
    ``max_step_fraction`` below 1 also caps every device's predicted step time at that
    fraction of the full update's (at its batch size), by hand, with either objective.

    Parameters
    ----------
    devices : Sequence[DeviceSpec]
        Ids, budgets (MB) and batch sizes.
    cost_model : CostModel
        Predicts memory and step time per selection.
    scores : Sequence[float]
        One criticality score per unit, in unit order.
    objective : str
        ``"balanced"`` or ``"criticality"`` (see above). ``"balanced"`` needs a cost model
        with step-time calibration (``time_batches``, the default).
    allow_inference_only : bool
        If true, a device whose budget is below the cheapest selection trains
        nothing (it still receives broadcasts) instead of raising.
    max_step_fraction : float
        In (0, 1]; 1 sets no cap by hand. Below 1 it needs a cost model with
        step-time calibration.
    meta : Mapping, optional
        Provenance stored in the plan (the objective is added to it).

    Raises
    ------
    ValueError
        For invalid devices, scores or objective, and for a budget below the cheapest
        trainable selection (unless ``allow_inference_only``).
    """
    validate_devices(devices)
    names = cost_model.unit_names
    if len(scores) != len(names):
        raise ValueError(
            f"got {len(scores)} scores for {len(names)} units; give one score per unit ({', '.join(names)})"
        )
    if not all(math.isfinite(float(s)) for s in scores):
        raise ValueError(f"scores must be finite numbers, got {list(scores)}")
    if objective not in OBJECTIVES:
        raise ValueError(
            f"objective {objective!r} is unknown; choose 'balanced' (the cluster's step chosen with criticality) "
            "or 'criticality' (memory only, the paper's planner)"
        )
    if not 0 < max_step_fraction <= 1:
        raise ValueError(f"max-step-fraction must be in (0, 1], got {max_step_fraction}; 1 sets no step cap by hand")
    capped = max_step_fraction < 1
    balanced = objective == "balanced"
    if (capped or balanced) and cost_model.step_time(names, 1) <= 0:
        needs = "objective='balanced'" if balanced else "max-step-fraction < 1"
        raise ValueError(
            f"{needs} needs a cost model calibrated for step time (time_batches); "
            "plan by memory only with objective='criticality' and max-step-fraction=1"
        )
    memory_terms: dict[int, SelectionMemory] = {}
    time_terms: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    spaces: dict[int, SelectionSpace] = {}
    hand_caps: dict[int, float | None] = {}
    found: dict[int, tuple[tuple[int, ...], float, float] | None] = {}
    frontiers: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    ordered = sorted(devices, key=lambda d: d.id)
    for device in ordered:
        batch = device.batch_size
        if batch not in memory_terms:
            memory_terms[batch] = cost_model.memory_terms(batch)
            if capped or balanced:
                time_terms[batch] = cost_model.step_time_terms(batch)
        memory = memory_terms[batch]
        cap = max_step_fraction * cost_model.step_time(names, batch) if capped else None
        hand_caps[device.id] = cap
        if balanced:
            if batch not in spaces:
                largest = max(d.budget_mb for d in ordered if d.batch_size == batch)
                spaces[batch] = SelectionSpace(memory, scores, time_terms[batch], largest)
            frontier = step_frontier(spaces[batch], device.budget_mb, cap)
            fits = len(frontier[0]) > 0
            if fits:
                frontiers[device.id] = frontier
        else:
            found[device.id] = best_selection(
                memory, scores, device.budget_mb, time_terms=time_terms.get(batch), max_step_s=cap
            )
            fits = found[device.id] is not None
        if not fits:
            _untrainable(device, memory, scores, names, cap, max_step_fraction, allow_inference_only)
            found[device.id] = None
    if balanced and frontiers:
        cluster_cap = balanced_step_cap(list(frontiers.values()))
        for device in ordered:
            if device.id in frontiers:
                cap = min(cluster_cap, hand_caps[device.id] or math.inf)
                found[device.id] = best_selection(
                    memory_terms[device.batch_size],
                    scores,
                    device.budget_mb,
                    time_terms=time_terms[device.batch_size],
                    max_step_s=cap,
                )
    selections, estimates, step_seconds, totals = {}, {}, {}, {}
    for device in ordered:
        indices, total_score = (found[device.id] or ((), 0.0, 0.0))[:2]
        selection = [names[i] for i in indices]
        selections[device.id] = selection
        estimates[device.id] = cost_model.predict(selection, device.batch_size)
        step_seconds[device.id] = cost_model.step_time(selection, device.batch_size)
        totals[device.id] = total_score
    return plan_from_selections(
        cost_model.units,
        selections,
        cost_model.tensor_bytes(),
        budgets_mb={d.id: float(d.budget_mb) for d in devices},
        batch_sizes={d.id: d.batch_size for d in devices},
        estimates=estimates,
        step_seconds=step_seconds,
        scores=totals,
        meta={**dict(meta or {}), "objective": objective},
    )


def _untrainable(
    device: DeviceSpec,
    memory: SelectionMemory,
    scores: Sequence[float],
    names: Sequence[str],
    cap: float | None,
    max_step_fraction: float,
    allow_inference_only: bool,
) -> None:
    """A device that can train nothing: raise, naming why and the fix, unless inference-only is allowed."""
    if allow_inference_only:
        return
    if cap is not None and best_selection(memory, scores, device.budget_mb) is not None:
        raise ValueError(
            f"no selection of device {device.id} fits both its budget {device.budget_mb:g} MB and "
            f"max-step-fraction={max_step_fraction:g} ({cap:.3f} s per step at batch {device.batch_size}); "
            "raise max-step-fraction (or allow inference-only devices)"
        )
    cheapest, first = memory.cheapest()
    raise ValueError(
        f"budget {device.budget_mb:g} MB for device {device.id} is below the {cheapest:.1f} MB that the "
        f"smallest selection ({names[first]}) needs at batch {device.batch_size}; lower batch-size or "
        "raise memory-mb (or allow inference-only devices)"
    )
