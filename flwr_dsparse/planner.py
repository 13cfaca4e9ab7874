"""The planner: for every device, the best selection that fits its memory budget.

For one device the problem is: choose units maximising the total score subject
to predicted memory ≤ budget. The coupling is in the earliest trained unit
``e``: it decides which activations the later units keep. With ``e`` fixed the
cost is additive (:meth:`CostModel.selection_terms`), so the search enumerates
every ``e`` and, for each, every subset of the later units, exactly, with a
vectorised subset-sum. Units are few (MobileNetV2 has 20: 2²⁰ subsets in all).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from .costs import CostModel
from .plan import Plan, plan_from_selections

__all__ = ["DeviceSpec", "MAX_SEARCH_UNITS", "best_selection", "make_plan", "parse_budgets", "validate_devices"]

#: Subset enumeration is exact up to this many units after the earliest (2²³ candidates).
MAX_SEARCH_UNITS = 23
_SLACK_MB = 1e-9  # float noise between the search's sums and predict()'s


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
            raise ValueError(f"{field}: item {position} ({item.strip()!r}) is not a number; give MB values such as '80,110,140'") from None
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
            raise ValueError(f"batch_size of device {device.id} is {device.batch_size!r}; it must be a positive integer")


def _subset_sums(weights: np.ndarray) -> np.ndarray:
    """All subset sums; bit ``k`` of an index says whether item ``k`` is in the subset."""
    sums = np.zeros(1)
    for weight in weights:
        sums = np.concatenate([sums, sums + weight])
    return sums


def best_selection(
    base: np.ndarray,
    increments: np.ndarray,
    scores: Sequence[float],
    budget_mb: float,
    *,
    time_terms: tuple[np.ndarray, np.ndarray] | None = None,
    max_step_s: float | None = None,
) -> tuple[tuple[int, ...], float, float] | None:
    """The exact best selection under ``budget_mb`` (and, optionally, ``max_step_s``).

    Returns ``(unit indices, total score, predicted MB)``, or ``None`` if no
    non-empty selection fits. Ties go to the cheaper selection, then to the
    later earliest unit, so the answer is deterministic. ``time_terms`` is
    :meth:`CostModel.step_time_terms` at the device's batch size; with
    ``max_step_s`` a selection must also be predicted to step within it.
    """
    count = len(base)
    values = np.asarray(scores, dtype=float)
    best: tuple[float, float, int, tuple[int, ...]] | None = None  # (score, -mb, e, indices)
    for first in range(count):
        later = np.arange(first + 1, count)
        if len(later) > MAX_SEARCH_UNITS:
            raise ValueError(
                f"the model has {count} units; exact search supports at most {MAX_SEARCH_UNITS + 1}; "
                "pass coarser unit names (e.g. whole stages)"
            )
        memory = base[first] + _subset_sums(increments[first, later])
        value = values[first] + _subset_sums(values[later])
        fits = memory <= budget_mb + _SLACK_MB
        if max_step_s is not None and time_terms is not None:
            time_base, time_increments = time_terms
            fits &= time_base[first] + _subset_sums(time_increments[later]) <= max_step_s * (1 + 1e-9)
        if not fits.any():
            continue
        candidates = np.flatnonzero(fits)
        # Highest score; among equals, least memory; among those, the smallest index.
        order = np.lexsort((candidates, memory[candidates], -value[candidates]))
        pick = int(candidates[order[0]])
        indices = (first,) + tuple(int(later[k]) for k in range(len(later)) if pick >> k & 1)
        key = (float(value[pick]), -float(memory[pick]), first, indices)
        if best is None or key[:3] > best[:3]:
            best = key
    if best is None:
        return None
    return best[3], best[0], -best[1]


def _cheapest_mb(base: np.ndarray, increments: np.ndarray) -> tuple[float, int]:
    """Memory of the cheapest non-empty selection, and its earliest unit."""
    options = [base[e] + np.minimum(increments[e, e + 1 :], 0).sum() for e in range(len(base))]
    first = int(np.argmin(options))
    return float(options[first]), first


def make_plan(
    devices: Sequence[DeviceSpec],
    cost_model: CostModel,
    scores: Sequence[float],
    *,
    allow_inference_only: bool = False,
    max_step_fraction: float = 1.0,
    meta: Mapping[str, Any] | None = None,
) -> Plan:
    """Plan every device: the highest-scoring selection that fits its budget.

    A synchronous step waits for the slowest device, and a device that can afford the
    whole model is as slow as a full update. ``max_step_fraction`` below 1 also caps
    every device's predicted step time at that fraction of the full update's (at its
    batch size), trading what the large devices train for the cluster's step time.

    Parameters
    ----------
    devices : Sequence[DeviceSpec]
        Ids, budgets (MB) and batch sizes.
    cost_model : CostModel
        Predicts memory per selection.
    scores : Sequence[float]
        One criticality score per unit, in unit order.
    allow_inference_only : bool
        If true, a device whose budget is below the cheapest selection trains
        nothing (it still receives broadcasts) instead of raising.
    max_step_fraction : float
        In (0, 1]; 1 is memory only (the paper's planner). Needs a cost model with
        step-time calibration.
    meta : Mapping, optional
        Provenance stored in the plan.

    Raises
    ------
    ValueError
        For invalid devices or scores, and for a budget below the cheapest
        trainable selection (unless ``allow_inference_only``).
    """
    validate_devices(devices)
    names = cost_model.unit_names
    if len(scores) != len(names):
        raise ValueError(f"got {len(scores)} scores for {len(names)} units; give one score per unit ({', '.join(names)})")
    if not all(math.isfinite(float(s)) for s in scores):
        raise ValueError(f"scores must be finite numbers, got {list(scores)}")
    if not 0 < max_step_fraction <= 1:
        raise ValueError(f"max-step-fraction must be in (0, 1], got {max_step_fraction}; 1 plans by memory only")
    capped = max_step_fraction < 1
    if capped and cost_model.step_time(names, 1) <= 0:
        raise ValueError("max-step-fraction < 1 needs a cost model calibrated for step time (time_batches)")
    terms: dict[int, tuple[np.ndarray, np.ndarray, float]] = {}
    selections, estimates, step_seconds, totals = {}, {}, {}, {}
    for device in sorted(devices, key=lambda d: d.id):
        if device.batch_size not in terms:
            terms[device.batch_size] = cost_model.selection_terms(device.batch_size)
        base, increments, _ = terms[device.batch_size]
        cap = max_step_fraction * cost_model.step_time(names, device.batch_size) if capped else None
        time_terms = cost_model.step_time_terms(device.batch_size) if capped else None
        found = best_selection(base, increments, scores, device.budget_mb, time_terms=time_terms, max_step_s=cap)
        if found is None and capped and best_selection(base, increments, scores, device.budget_mb) is not None:
            if not allow_inference_only:
                raise ValueError(
                    f"no selection of device {device.id} fits both its budget {device.budget_mb:g} MB and "
                    f"max-step-fraction={max_step_fraction:g} ({cap:.3f} s per step at batch {device.batch_size}); "
                    "raise max-step-fraction (or allow inference-only devices)"
                )
            indices, total_score = (), 0.0
        elif found is None:
            cheapest, first = _cheapest_mb(base, increments)
            if not allow_inference_only:
                raise ValueError(
                    f"budget {device.budget_mb:g} MB for device {device.id} is below the {cheapest:.1f} MB that the "
                    f"smallest selection ({names[first]}) needs at batch {device.batch_size}; lower batch-size or "
                    "raise memory-mb (or allow inference-only devices)"
                )
            indices: tuple[int, ...] = ()
            total_score = 0.0
        else:
            indices, total_score, _ = found
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
        meta=dict(meta or {}),
    )
