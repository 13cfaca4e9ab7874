"""Trainable units: the granularity at which DSparse selects what to train.

A *unit* is a named sub-module of the model. Selections, plans, exchanges and
the trainer all speak in unit names, and translate them to tensor names
(``named_parameters()`` / ``named_buffers()`` keys) through this module only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

__all__ = ["Unit", "compress_unit_names", "model_units", "unit_tensor_names", "validate_unit_names"]


@dataclass(frozen=True)
class Unit:
    """One selectable part of a model.

    Parameters
    ----------
    index : int
        Position in forward (execution) order; earlier units run first.
    name : str
        Dotted module name, as in ``model.named_modules()``.
    param_names : tuple[str, ...]
        Full ``named_parameters()`` names owned by the unit.
    buffer_names : tuple[str, ...]
        Full ``named_buffers()`` names owned by the unit (BatchNorm running
        statistics travel with their unit).
    num_params : int
        Number of scalar parameters in the unit.
    """

    index: int
    name: str
    param_names: tuple[str, ...]
    buffer_names: tuple[str, ...]
    num_params: int

    @property
    def tensor_names(self) -> tuple[str, ...]:
        """Parameters and buffers, the tensors that travel when the unit is trained."""
        return self.param_names + self.buffer_names


def _default_unit_names(model: nn.Module) -> list[str]:
    # torchvision's MobileNetV2 keeps its 19 blocks in ``features``; the paper
    # selects at block granularity, so each block (plus the classifier) is a unit.
    children = dict(model.named_children())
    if "features" in children and isinstance(children["features"], nn.Sequential) and "classifier" in children:
        names = [f"features.{name}" for name, _ in children["features"].named_children()]
        return names + ["classifier"]
    return [name for name, child in children.items() if any(True for _ in child.parameters())]


def validate_unit_names(names: Sequence[str], valid: Sequence[str], *, what: str = "unit") -> None:
    """Raise ``ValueError`` listing the valid names if any of ``names`` is unknown."""
    unknown = [name for name in names if name not in set(valid)]
    if unknown:
        raise ValueError(f"unknown {what} name(s) {unknown}; valid names are: {', '.join(valid)}")


def model_units(model: nn.Module, names: Sequence[str] | None = None) -> list[Unit]:
    """Cut ``model`` into ordered units.

    Parameters
    ----------
    model : nn.Module
        The model to cut. It is not modified.
    names : Sequence[str] | None
        Explicit module names, in forward order. When ``None``: MobileNetV2-like
        models give ``features.0`` … ``features.N`` and ``classifier``; any other
        model gives its top-level children that own parameters.

    Returns
    -------
    list[Unit]
        Units in forward order. Every parameter of the model belongs to exactly
        one unit.

    Raises
    ------
    ValueError
        If a name is not a module of ``model`` (the message lists the valid
        names), if two units overlap, or if a parameter belongs to no unit.
    """
    modules = dict(model.named_modules())
    unit_names = list(names) if names is not None else _default_unit_names(model)
    if not unit_names:
        raise ValueError("the model has no sub-module with parameters; pass explicit unit names")
    valid = [name for name in modules if name]
    validate_unit_names(unit_names, valid, what="module")
    if len(set(unit_names)) != len(unit_names):
        raise ValueError(f"duplicate unit names in {unit_names}")

    owner: dict[str, str] = {}
    units: list[Unit] = []
    for index, name in enumerate(unit_names):
        module = modules[name]
        params = tuple(f"{name}.{p}" for p, _ in module.named_parameters())
        buffers = tuple(f"{name}.{b}" for b, _ in module.named_buffers())
        for tensor in params + buffers:
            if tensor in owner:
                raise ValueError(f"units {owner[tensor]!r} and {name!r} overlap on tensor {tensor!r}")
            owner[tensor] = name
        num = sum(p.numel() for p in module.parameters())
        units.append(Unit(index, name, params, buffers, num))

    orphans = [p for p, _ in model.named_parameters() if p not in owner]
    if orphans:
        raise ValueError(
            f"parameters {orphans[:5]}{'…' if len(orphans) > 5 else ''} belong to no unit; "
            "add their modules to the unit names"
        )
    return units


def unit_tensor_names(units: Sequence[Unit], selection: Sequence[str], *, buffers: bool = True) -> list[str]:
    """Tensor names of the selected units, in model order."""
    by_name = {unit.name: unit for unit in units}
    validate_unit_names(selection, list(by_name))
    chosen = set(selection)
    names: list[str] = []
    for unit in units:
        if unit.name in chosen:
            names.extend(unit.tensor_names if buffers else unit.param_names)
    return names


def compress_unit_names(selected: Sequence[str], all_units: Sequence[str], *, short: bool = False) -> str:
    """A selection for people: consecutive runs collapse (``features.3…features.18, classifier``).

    ``short=True`` also writes ``features.N`` as ``fN``; a selection of every unit reads ``all``.
    """
    if not selected:
        return "(inference only)"
    if short and list(selected) == list(all_units):
        return "all"
    positions = [list(all_units).index(name) for name in selected]
    runs: list[list[int]] = []
    for position in positions:
        if runs and position == runs[-1][-1] + 1:
            runs[-1].append(position)
        else:
            runs.append([position])
    names = [name.replace("features.", "f") for name in all_units] if short else list(all_units)
    return ", ".join(names[r[0]] if len(r) == 1 else f"{names[r[0]]}…{names[r[-1]]}" for r in runs)
