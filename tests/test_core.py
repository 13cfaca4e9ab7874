"""Core: units, cost model, scorers and groups (pure PyTorch, no Flower; the planner: test_planner.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from flwr_dsparse.cli import main as cli_main
from flwr_dsparse.costs import CostModel
from flwr_dsparse.memory import SavedTensorMeter, saved_tensors
from flwr_dsparse.models import TinyNet, build_model
from flwr_dsparse.plan import plan_from_selections
from flwr_dsparse.scoring import depth_scores, get_scorer, gradient_scores
from flwr_dsparse.trainer import SparseTrainer, make_optimizer_factory
from flwr_dsparse.units import model_units

MB = 2**20


@pytest.fixture(scope="module")
def tiny_cost() -> CostModel:
    return CostModel(build_model("tiny"), (3, 32, 32), time_batches=None)


def batch(size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(size, 3, 32, 32, generator=generator), torch.randint(0, 10, (size,), generator=generator)


# -- units ------------------------------------------------------------------------------------------
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


# -- trainer ----------------------------------------------------------------------------------------
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


# -- cost model ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("optimizer,momentum,factor", [("sgd", 0.0, 0), ("sgd", 0.9, 1), ("adam", 0.0, 2)])
def test_grads_and_optimizer_state_match_a_real_step(optimizer: str, momentum: float, factor: int) -> None:
    model = build_model("tiny")
    cost = CostModel(model, (3, 32, 32), optimizer=optimizer, momentum=momentum, time_batches=None)
    selection = ["features.2", "features.4", "classifier"]
    estimate = cost.predict(selection, 8)
    trainer = SparseTrainer(
        model, selection, optimizer_factory=make_optimizer_factory(optimizer, lr=0.01, momentum=momentum)
    )
    trainer.step(*batch(8))
    grad_bytes = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
    state_bytes = sum(
        v.numel() * v.element_size()
        for state in trainer.optimizer.state.values()
        for v in state.values()
        if isinstance(v, torch.Tensor) and v.dim() > 0  # Adam's scalar step counters are not state memory
    )
    weight_bytes = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    assert estimate.grads * MB == pytest.approx(grad_bytes, abs=1e-6)
    assert estimate.optimizer * MB == pytest.approx(state_bytes, abs=1e-6)
    assert state_bytes == factor * grad_bytes
    assert estimate.weights * MB == pytest.approx(weight_bytes, abs=1e-6)


@pytest.mark.parametrize("batch_size", [8, 48])
def test_activation_prediction_matches_saved_tensor_hooks(tiny_cost: CostModel, batch_size: int) -> None:
    model = build_model("tiny")
    names = tiny_cost.unit_names
    rng = np.random.default_rng(0)
    selections = [names, ["classifier"], ["features.2"], names[3:]] + [
        [n for n in names if rng.random() < 0.5] or ["features.1"] for _ in range(6)
    ]
    for selection in selections:
        trainer = SparseTrainer(model, selection)
        measured = trainer.step(*batch(batch_size), measure_saved=True).saved_mb
        trainer.close()
        assert tiny_cost.predict(selection, batch_size).activations == pytest.approx(measured, rel=0.02, abs=0.01), (
            selection
        )


def test_selection_terms_agree_with_predict(tiny_cost: CostModel) -> None:
    base, increments, _ = tiny_cost.selection_terms(32)
    names = tiny_cost.unit_names
    for indices in [(0,), (1, 3), (2, 3, 4, 5), (0, 1, 2, 3, 4, 5), (5,)]:
        expected = base[indices[0]] + sum(increments[indices[0], j] for j in indices[1:])
        assert tiny_cost.predict([names[i] for i in indices], 32).total == pytest.approx(expected, rel=1e-9)


def test_step_time_is_calibrated_and_positive() -> None:
    cost = CostModel(build_model("tiny"), (3, 32, 32), time_batches=(4, 8))
    names = cost.unit_names
    assert cost.step_time(names, 16) > cost.step_time(["classifier"], 16) > 0


@pytest.mark.slow
@pytest.mark.parametrize("label,selection", [("full", None), ("last 8 blocks", "last8")])
def test_prediction_matches_fresh_subprocess_peak_rss(label: str, selection: str | None) -> None:
    from flwr_dsparse.memory import measure_training_rss

    # Plain autograd and glibc's stock allocator: the configuration the workspace coefficients were
    # fitted to. Issue 14's lean layers and tuned allocator measure 40-110% below this prediction
    # (a loose upper bound until the coefficients are refitted); tests/test_lean.py checks the
    # lean layers' saved bytes exactly.
    cost = CostModel(build_model("mobilenet_v2"), (3, 32, 32), time_batches=None, lean_frozen=False)
    names = cost.unit_names
    chosen = names if selection is None else names[-9:]
    # 8 steps, not 3: glibc's adaptive mmap threshold keeps a growing share of freed blocks for
    # the first steps, so a 3-step peak ranged 78-94 MB here for the last 8 blocks; from about
    # 8 steps on it is the steady-state peak that a long run (and a budget) must hold (90-102 MB).
    measured = measure_training_rss(
        "mobilenet_v2", chosen, batch_size=128, steps=8, tune_allocator=False, lean_frozen=False
    )["increase_mb"]
    estimate = cost.predict(chosen, 128)
    predicted = estimate.total - estimate.weights - estimate.reserve
    assert predicted == pytest.approx(measured, rel=0.25), (label, predicted, measured)


# -- scorers -----------------------------------------------------------------------------------------
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


# -- plans and the CLI (the planner's own tests: tests/test_planner.py) ------------------------------
def test_groups_of_a_hand_made_three_device_plan(tiny_cost: CostModel) -> None:
    units = tiny_cost.units
    selections = {0: ["classifier"], 1: ["features.4", "classifier"], 2: ["features.3", "features.4", "classifier"]}
    plan = plan_from_selections(units, selections, tiny_cost.tensor_bytes())
    summary = [(g.members, g.units, g.broadcast.root, g.broadcast.receivers) for g in plan.groups]
    assert summary == [
        ((2,), ("features.3",), 2, (0, 1)),
        ((1, 2), ("features.4",), 1, (0,)),
        ((0, 1, 2), ("classifier",), 0, ()),
    ]
    assert plan.frozen_units == ("features.0", "features.1", "features.2")
    sizes = tiny_cost.tensor_bytes()
    group = plan.groups[1]
    assert group.params == ("features.4.0.weight", "features.4.1.weight", "features.4.1.bias")
    assert group.allreduce.bytes == sum(sizes[t] for t in group.tensors) == group.broadcast.bytes
    assert plan.groups[2].broadcast.bytes == 0  # nobody outside the group


def test_plan_json_has_the_documented_fields(capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        cli_main(
            ["plan", "--model", "tiny", "--batch-size", "16", "--budgets", "12,20,40", "--scorer", "depth", "--json"]
        )
        == 0
    )
    data = json.loads(capsys.readouterr().out)
    device = data["devices"][0]
    assert set(device) >= {"id", "budget_mb", "batch_size", "units", "params", "predicted_mb"}
    assert set(device["predicted_mb"]) >= {"weights", "grads", "optimizer", "activations", "reserve", "total"}
    group = data["groups"][0]
    assert set(group) >= {"members", "units", "params", "allreduce", "broadcast"}
    assert set(group["broadcast"]) == {"root", "receivers", "bytes"}
    assert "frozen_units" in data


def test_cli_reports_bad_budgets_with_exit_code_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["plan", "--model", "tiny", "--budgets", "80,x"]) == 2
    assert "--budgets: item 1 ('x') is not a number" in capsys.readouterr().err
