"""Criticality scorers: how much each unit is worth training (higher is better).

A scorer is ``scorer(model, units, inputs, targets) -> list[float]``, one score
per unit in unit order. Users may pass their own callable anywhere a scorer
name is accepted.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from .units import Unit

__all__ = ["Scorer", "SCORERS", "depth_scores", "gradient_scores", "get_scorer"]

Scorer = Callable[[nn.Module, Sequence[Unit], torch.Tensor, torch.Tensor], list[float]]


def depth_scores(
    model: nn.Module, units: Sequence[Unit], inputs: torch.Tensor | None = None, targets: torch.Tensor | None = None
) -> list[float]:
    """Later units first: the classic fine-tuning prior (the head adapts fastest)."""
    count = len(units)
    return [(unit.index + 1) / count for unit in units]


def gradient_scores(
    model: nn.Module, units: Sequence[Unit], inputs: torch.Tensor, targets: torch.Tensor
) -> list[float]:
    """First-order loss decrease of one SGD step on each unit alone.

    One SGD step of size ``lr`` on unit ``u`` alone lowers the loss by about
    ``lr · ‖∇_u L‖²``; ``lr`` is common to all units, so the score is the squared
    gradient norm, from one backward on the calibration batch, normalised to
    sum to 1. The model is copied, so its weights and BatchNorm statistics stay.
    """
    probe = copy.deepcopy(model)
    probe.train()
    for param in probe.parameters():
        param.requires_grad_(True)
    probe.zero_grad(set_to_none=True)
    F.cross_entropy(probe(inputs), targets).backward()
    named = dict(probe.named_parameters())
    raw = []
    for unit in units:
        grads = [named[name].grad for name in unit.param_names if named[name].grad is not None]
        raw.append(float(sum(float(g.pow(2).sum()) for g in grads)))
    total = sum(raw)
    if not total > 0:  # zero or non-finite gradients: no information, fall back to depth
        return depth_scores(model, units)
    return [value / total for value in raw]


SCORERS: dict[str, Scorer] = {"gradient": gradient_scores, "depth": depth_scores}


def get_scorer(scorer: str | Scorer) -> Scorer:
    """A scorer by name (``gradient`` or ``depth``), or the user's callable as is."""
    if callable(scorer):
        return scorer
    if scorer not in SCORERS:
        raise ValueError(f"unknown scorer {scorer!r}; use one of {', '.join(SCORERS)} or pass a callable")
    return SCORERS[scorer]
