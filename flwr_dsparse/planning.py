"""From a model and budgets to a Plan in one call: cost model, criticality scores, planner.

The ServerApp (from its nodes' reports), ``dsparse plan`` (from the command line) and the
comparison experiment (from its setup) all plan this way; they differ only in where the
budgets and the calibration batch come from.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .costs import CostModel
from .plan import Plan
from .planner import DeviceSpec, make_plan
from .scoring import get_scorer

__all__ = ["PlannedModel", "plan_model"]


@dataclass(frozen=True)
class PlannedModel:
    """A plan with what it was made from: the cost model and each unit's criticality score."""

    plan: Plan
    cost: CostModel
    scores: list[float]


def plan_model(
    model: nn.Module,
    devices: Sequence[DeviceSpec],
    calibration: tuple[torch.Tensor, torch.Tensor],
    *,
    scorer: str = "gradient",
    optimizer: str = "sgd",
    momentum: float = 0.0,
    reserve_mb: float = 0.0,
    cost_options: Mapping[str, Any] | None = None,
    meta: Mapping[str, Any] | None = None,
    progress: Callable[[str], None] | None = None,
    **planner_options: Any,
) -> PlannedModel:
    """Profile ``model`` on the calibration batch's input shape, score its units on that batch,
    and plan ``devices``.

    Parameters
    ----------
    model : nn.Module
        The model as it will be fine-tuned (criticality depends on its weights).
    devices : Sequence[DeviceSpec]
        One entry per device: id, budget, batch size.
    calibration : tuple of Tensor
        Inputs and targets the scorer computes criticality on; the inputs' shape (without
        the batch dimension) is the sample shape the cost model profiles.
    cost_options : Mapping, optional
        Extra keyword arguments of :class:`~flwr_dsparse.costs.CostModel`.
    planner_options
        Keyword arguments of :func:`~flwr_dsparse.planner.make_plan` (e.g.
        ``allow_inference_only``, ``max_step_fraction``).
    """
    inputs, targets = calibration
    cost = CostModel(
        model,
        tuple(inputs.shape[1:]),
        optimizer=optimizer,
        momentum=momentum,
        reserve_mb=reserve_mb,
        progress=progress,
        **dict(cost_options or {}),
    )
    scores = list(get_scorer(scorer)(model, cost.units, inputs, targets))
    plan = make_plan(list(devices), cost, scores, meta=dict(meta or {}), **planner_options)
    return PlannedModel(plan, cost, scores)
