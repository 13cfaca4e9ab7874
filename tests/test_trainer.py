"""The sparse trainer: a selection trained, everything else frozen before the backward."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import batch
from torch import nn

from flwr_dsparse.memory import SavedTensorMeter, saved_tensors
from flwr_dsparse.models import build_model
from flwr_dsparse.trainer import SparseTrainer, make_optimizer_factory
from flwr_dsparse.units import model_units


def test_trainer_freezes_before_backward_and_keeps_frozen_state() -> None:
    model = build_model("tiny")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = SparseTrainer(
        model, ["features.3", "classifier"], optimizer_factory=make_optimizer_factory("sgd", lr=0.1)
    )
    trainer.step(*batch(8))
    trained = {n for u in trainer.units if u.name in trainer.selection for n in u.tensor_names}
    for name, value in model.state_dict().items():
        if name.endswith("num_batches_tracked"):
            continue
        if name in trained:
            assert not torch.equal(value, before[name]), name
        else:  # frozen weights and frozen BatchNorm running stats are untouched
            assert torch.equal(value, before[name]), name
    assert all(p.grad is None for n, p in model.named_parameters() if n not in trained)
    params_in_optimizer = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert params_in_optimizer == {id(p) for n, p in model.named_parameters() if n in trained}


def test_frozen_prefix_saves_nothing() -> None:
    model = build_model("tiny")
    trainer = SparseTrainer(model, ["classifier"])
    trainer.train_mode()
    meter = SavedTensorMeter.for_tensors(list(model.parameters()))
    inputs, targets = batch(8)
    with saved_tensors(meter):
        trainer.loss_fn(model(inputs), targets)
    # Only the classifier's input (8 × 64 floats) and the loss's own tensors are kept.
    assert meter.total_bytes < 8 * 64 * 4 * 4


def test_inference_only_trainer_steps_without_optimizer() -> None:
    model = build_model("tiny")
    before = [p.clone() for p in model.parameters()]
    result = SparseTrainer(model, []).step(*batch(4))
    assert result.examples == 4 and np.isfinite(result.loss)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=False))


def _recursive_modes(model: nn.Module, trainer: SparseTrainer) -> dict[str, bool]:
    """The modes ``model.train()`` and then ``eval()`` of every frozen unit give, by module name."""
    model.train()
    modules = dict(model.named_modules())
    for unit in trainer.units:
        if unit.name not in trainer.selection:
            modules[unit.name].eval()
    return {name: module.training for name, module in modules.items()}


@pytest.mark.parametrize("model_name", ["tiny", "mobilenet_v2"])
def test_train_mode_sets_every_module_as_the_recursive_calls_would(model_name: str) -> None:
    model = build_model(model_name)
    names = [unit.name for unit in model_units(model)]
    trainer = SparseTrainer(model, names[-2:])
    for selection in (names[-2:], names[1:3], []):
        trainer.set_selection(selection)
        model.eval()  # whatever the modes were before (an evaluation), train_mode sets every one
        trainer.train_mode()
        flat = {name: module.training for name, module in model.named_modules()}
        assert flat == _recursive_modes(model, trainer)
        assert any(flat.values()) and not all(flat.values())


def test_train_mode_calls_a_module_s_own_train_override() -> None:
    calls = []

    class Counting(nn.Linear):
        def train(self, mode: bool = True) -> nn.Module:
            calls.append(mode)
            return super().train(mode)

    model = nn.Sequential(nn.Linear(4, 4), Counting(4, 2))
    trainer = SparseTrainer(model, [model_units(model)[-1].name])
    trainer.train_mode()
    assert calls == [True] and model[1].training and not model[0].training


def test_load_momentum_state_leaves_exactly_the_saved_buffers() -> None:
    """A trainer that trained takes a saved state as is: its buffers, and none where it has none."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    units = model_units(model)
    trainer = SparseTrainer(
        model, [unit.name for unit in units], optimizer_factory=make_optimizer_factory("sgd", lr=0.1, momentum=0.9)
    )
    trainer.train([(torch.randn(5, 4), torch.randint(0, 2, (5,)))])
    trained = trainer.momentum_state()
    saved = {name: torch.full_like(buffer, 0.5) for name, buffer in trained.items() if name.startswith("0.")}
    assert len(trained) == 4 and len(saved) == 2
    trainer.load_momentum_state(saved)
    after = trainer.momentum_state()
    assert after.keys() == saved.keys() and all(torch.equal(after[name], saved[name]) for name in saved)
    trainer.close()
