"""Criticality scorers: how each unit is rated for the planner."""

from __future__ import annotations

import pytest
import torch
from conftest import batch
from torch import nn

from flwr_dsparse.models import TinyNet, build_model
from flwr_dsparse.scoring import depth_scores, get_scorer, gradient_scores
from flwr_dsparse.units import model_units


def test_depth_scores_prefer_later_units() -> None:
    units = model_units(TinyNet())
    scores = depth_scores(TinyNet(), units)
    assert scores == sorted(scores) and len(set(scores)) == len(scores)


def test_gradient_scores_are_normalised_squared_gradient_norms() -> None:
    model = build_model("tiny")
    units = model_units(model)
    inputs, targets = batch(16)
    scores = gradient_scores(model, units, inputs, targets)
    reference = build_model("tiny")
    reference.train()
    nn.functional.cross_entropy(reference(inputs), targets).backward()
    named = dict(reference.named_parameters())
    raw = [sum(float(named[p].grad.pow(2).sum()) for p in u.param_names) for u in units]
    assert scores == pytest.approx([r / sum(raw) for r in raw], rel=1e-5)
    assert all(
        torch.equal(a, b)
        for a, b in zip(model.state_dict().values(), build_model("tiny").state_dict().values(), strict=True)
    )


def test_get_scorer_accepts_callables_and_rejects_unknown_names() -> None:
    custom = lambda model, units, x, y: [1.0] * len(units)  # noqa: E731
    assert get_scorer(custom) is custom
    with pytest.raises(ValueError, match="unknown scorer 'magic'.*gradient"):
        get_scorer("magic")
