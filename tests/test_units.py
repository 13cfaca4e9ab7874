"""Units: how a model is cut into the pieces a device trains or freezes."""

from __future__ import annotations

import pytest
from torch import nn

from flwr_dsparse.models import TinyNet, build_model
from flwr_dsparse.units import model_units


def test_mobilenet_units_are_blocks_and_classifier() -> None:
    units = model_units(build_model("mobilenet_v2"))
    assert [u.name for u in units] == [f"features.{i}" for i in range(19)] + ["classifier"]
    assert sum(u.num_params for u in units) == sum(p.numel() for p in build_model("mobilenet_v2").parameters())


def test_generic_model_units_are_children_with_parameters_and_explicit_names_work() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    assert [u.name for u in model_units(model)] == ["0", "2"]
    explicit = model_units(TinyNet(), ["features", "classifier"])
    assert [u.name for u in explicit] == ["features", "classifier"]


def test_unknown_unit_name_lists_valid_names() -> None:
    with pytest.raises(ValueError, match=r"unknown module name\(s\) \['nope'\].*features\.0"):
        model_units(TinyNet(), ["features.0", "nope"])


def test_units_must_cover_every_parameter() -> None:
    with pytest.raises(ValueError, match="belong to no unit"):
        model_units(TinyNet(), ["classifier"])
