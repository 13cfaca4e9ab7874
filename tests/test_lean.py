"""Lean frozen layers: the same gradients as plain autograd, and less saved for backward."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from flwr_dsparse.lean import install_lean_layers
from flwr_dsparse.memory import SavedTensorMeter, saved_tensors
from flwr_dsparse.models import build_model
from flwr_dsparse.trainer import SparseTrainer


def _eval_bn(channels: int) -> nn.Module:
    layer = nn.BatchNorm2d(channels)
    with torch.no_grad():  # non-trivial running statistics and affine parameters
        layer.running_mean.uniform_(-1, 1)
        layer.running_var.uniform_(0.5, 2.0)
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.uniform_(-0.5, 0.5)
    return layer.eval()


LAYERS = {
    "conv": lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1),
    "depthwise conv": lambda: nn.Conv2d(6, 6, 3, padding=1, groups=6, bias=False),
    "conv1d": lambda: nn.Conv1d(4, 5, 3, padding=2, dilation=2),
    "linear": lambda: nn.Linear(6, 3),
    "batchnorm eval": lambda: _eval_bn(4),
    "relu": lambda: nn.ReLU(inplace=True),
    "relu6": lambda: nn.ReLU6(inplace=True),
}


def _input(name: str) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    shape = {"linear": (5, 6), "depthwise conv": (3, 6, 8, 8), "conv1d": (3, 4, 16)}.get(name, (3, 4, 8, 8))
    return torch.randn(*shape, generator=generator) * 4  # spans ReLU6's both edges


@pytest.mark.parametrize("name", list(LAYERS))
def test_frozen_layer_input_gradient_equals_plain_autograd(name: str) -> None:
    plain = LAYERS[name]()
    lean = copy.deepcopy(plain)
    for layer in (plain, lean):
        for param in layer.parameters():
            param.requires_grad_(False)  # frozen before the forward
    install_lean_layers([lean])
    gradients, outputs = [], []
    for layer in (plain, lean):
        inputs = _input(name).requires_grad_()
        # A trained multiplier before the layer, as in a model: the layer's input needs a gradient.
        output = layer(inputs * 1.0)
        outputs.append(output.detach())
        output.backward(torch.linspace(-1, 1, output.numel()).view_as(output))
        gradients.append(inputs.grad)
    assert torch.equal(outputs[0], outputs[1])
    torch.testing.assert_close(gradients[1], gradients[0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["conv", "linear", "batchnorm eval", "relu6"])
def test_frozen_layer_saves_only_what_the_input_gradient_needs(name: str) -> None:
    saved = {}
    for lean in (False, True):
        layer = LAYERS[name]()
        for param in layer.parameters():
            param.requires_grad_(False)
        if lean:  # not the unit's last leaf, so an activation keeps its mask
            install_lean_layers([nn.Sequential(layer, nn.Identity())])
        inputs = _input(name).requires_grad_()
        meter = SavedTensorMeter.for_tensors(list(layer.parameters()) + list(layer.buffers()))
        with saved_tensors(meter):
            layer(inputs * 1.0)
        saved[lean] = meter.total_bytes
    numel = _input(name).numel()
    expected = {"conv": 0, "linear": 0, "batchnorm eval": 4 * 4, "relu6": numel}  # scale: 4 channels; mask: bool
    assert saved[True] == expected[name]
    # Plain autograd keeps the input (or the output); a frozen Linear's addmm already keeps nothing.
    assert saved[False] == (0 if name == "linear" else 4 * numel)


def test_layers_with_trained_parameters_are_left_as_they_are() -> None:
    layer = nn.Conv2d(4, 6, 3)
    install_lean_layers([layer])
    inputs = _input("conv").requires_grad_()
    layer(inputs).sum().backward()
    assert layer.weight.grad is not None and inputs.grad is not None


def _mobilenet_step(lean: bool, selection: list[str]) -> tuple[dict[str, torch.Tensor], float]:
    model = build_model("mobilenet_v2", seed=0)
    trainer = SparseTrainer(model, selection, lean_frozen=lean)
    generator = torch.Generator().manual_seed(0)
    inputs, targets = torch.randn(4, 3, 32, 32, generator=generator), torch.randint(0, 10, (4,), generator=generator)
    trainer.train_mode()
    meter = SavedTensorMeter.for_tensors(list(model.parameters()) + list(model.buffers()))
    with saved_tensors(meter):
        loss = trainer.loss_fn(model(inputs), targets)
    loss.backward()
    trainer.close()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, meter.total_mb


def test_whole_mobilenet_selection_has_plain_gradients_and_saves_less() -> None:
    selection = ["features.3", "features.7", "features.12", "features.15"]  # frozen blocks between and after
    plain, plain_mb = _mobilenet_step(False, selection)
    lean, lean_mb = _mobilenet_step(True, selection)
    assert set(lean) == set(plain) and plain
    for name in plain:
        torch.testing.assert_close(lean[name], plain[name], rtol=1e-6, atol=1e-6, msg=name)
    assert lean_mb < 0.5 * plain_mb


def test_trainer_close_restores_the_modules_own_forward() -> None:
    model = build_model("tiny")
    trainer = SparseTrainer(model, ["features.1"])
    assert any("forward" in m.__dict__ for m in model.modules())
    trainer.close()
    assert not any("forward" in m.__dict__ for m in model.modules())
