"""The sparse trainer: a selection trained, everything else frozen before the backward."""

from __future__ import annotations

import numpy as np
import torch
from conftest import batch

from flwr_dsparse.memory import SavedTensorMeter, saved_tensors
from flwr_dsparse.models import build_model
from flwr_dsparse.trainer import SparseTrainer, make_optimizer_factory


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
