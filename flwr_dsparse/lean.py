"""Lean frozen layers: a frozen layer that gradients pass through keeps only what its input gradient needs.

Plain autograd saves what the gradients of a layer's *parameters* need even when the
parameters are frozen: a frozen conv keeps its input, an eval-mode BatchNorm its input, a
ReLU6 its 4-byte output. The gradient with respect to the layer's input needs much less:

=====================  ============================================  =========================
layer (frozen)         input gradient                                saved for backward
=====================  ============================================  =========================
Conv1d/2d (zeros pad)  transposed convolution of ``grad`` with ``W``  nothing (``W`` is resident)
Linear                 ``grad @ W``                                   nothing
BatchNorm, eval mode   ``grad * weight / sqrt(running_var + eps)``   per-channel scale
ReLU / ReLU6           ``grad * mask``                                1-byte mask (bool)
residual add           ``grad`` to both inputs                       nothing (as plain autograd)
=====================  ============================================  =========================

A ReLU/ReLU6 that is its unit's last leaf keeps its output instead of a mask: the next unit
(or the loss) usually saves that output anyway, so sharing its storage costs nothing and
keeps the saved bytes of a selection the sum of its units' bytes (what the cost model adds).

:func:`install_lean_layers` replaces the ``forward`` of such leaf modules (an instance
attribute, removed again by the returned handle); the forward result is bit-identical to the
module's own, and input gradients equal plain autograd's to float rounding. Layers whose
input needs no gradient run as before.
"""

from __future__ import annotations

import types
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["LeanHandle", "install_lean_layers", "lean_forward_for"]


class _FrozenConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, inputs: torch.Tensor, module: nn.Module) -> torch.Tensor:  # type: ignore[override]
        ctx.module, ctx.input_shape = module, inputs.shape
        with torch.no_grad():
            return module._conv_forward(inputs, module.weight, module.bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        module = ctx.module
        conv_input = torch.nn.grad.conv2d_input if module.weight.dim() == 4 else torch.nn.grad.conv1d_input
        return conv_input(
            ctx.input_shape, module.weight, grad, module.stride, module.padding, module.dilation, module.groups
        ), None


class _FrozenLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, inputs: torch.Tensor, module: nn.Linear) -> torch.Tensor:  # type: ignore[override]
        ctx.module = module
        with torch.no_grad():
            return F.linear(inputs, module.weight, module.bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return grad.matmul(ctx.module.weight), None


class _ChannelScale(torch.autograd.Function):
    """Eval-mode BatchNorm: forward by the module itself, backward multiplies by the per-channel scale."""

    @staticmethod
    def forward(ctx, inputs: torch.Tensor, scale: torch.Tensor, module: nn.Module) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(scale)
        with torch.no_grad():
            return F.batch_norm(
                inputs, module.running_mean, module.running_var, module.weight, module.bias, False, 0.0, module.eps
            )

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:  # type: ignore[override]
        (scale,) = ctx.saved_tensors
        shape = [1, -1] + [1] * (grad.dim() - 2)
        return grad * scale.view(shape), None, None


class _MaskedActivation(torch.autograd.Function):
    """ReLU (``upper=None``) or ReLU6 (``upper=6``) keeping a bool mask, or the output when ``keep_output``."""

    @staticmethod
    def forward(ctx, inputs: torch.Tensor, upper: float | None, keep_output: bool) -> torch.Tensor:  # type: ignore[override]
        with torch.no_grad():
            output = F.relu(inputs) if upper is None else F.hardtanh(inputs, 0.0, upper)
        ctx.upper, ctx.keep_output = upper, keep_output
        if keep_output:
            ctx.save_for_backward(output)
        else:  # plain autograd passes gradient where min < x < max (hardtanh) or x > 0 (relu)
            mask = inputs > 0 if upper is None else (inputs > 0) & (inputs < upper)
            ctx.save_for_backward(mask)
        return output

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:  # type: ignore[override]
        (saved,) = ctx.saved_tensors
        if ctx.keep_output:
            saved = saved > 0 if ctx.upper is None else (saved > 0) & (saved < ctx.upper)
        return grad * saved, None, None


def _bn_scale(module: nn.modules.batchnorm._BatchNorm) -> torch.Tensor:
    with torch.no_grad():
        scale = torch.rsqrt(module.running_var + module.eps)
        return scale * module.weight if module.weight is not None else scale


def _conv_lean(module: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    if not inputs.requires_grad or module.weight.requires_grad:
        return type(module).forward(module, inputs)
    return _FrozenConv.apply(inputs, module)


def _linear_lean(module: nn.Linear, inputs: torch.Tensor) -> torch.Tensor:
    if not inputs.requires_grad or module.weight.requires_grad:
        return type(module).forward(module, inputs)
    return _FrozenLinear.apply(inputs, module)


def _bn_lean(module: nn.modules.batchnorm._BatchNorm, inputs: torch.Tensor) -> torch.Tensor:
    trainable = module.weight is not None and module.weight.requires_grad
    uses_batch_stats = module.training or module.running_var is None
    if not inputs.requires_grad or trainable or uses_batch_stats:
        return type(module).forward(module, inputs)
    return _ChannelScale.apply(inputs, _bn_scale(module), module)


def _activation_lean(module: nn.Module, inputs: torch.Tensor, *, keep_output: bool) -> torch.Tensor:
    if not inputs.requires_grad:
        return type(module).forward(module, inputs)
    upper = 6.0 if isinstance(module, nn.ReLU6) else None
    return _MaskedActivation.apply(inputs, upper, keep_output)


def _conv_supported(module: nn.Module) -> bool:
    return (
        isinstance(module, nn.Conv1d | nn.Conv2d)
        and module.padding_mode == "zeros"
        and not isinstance(module.padding, str)
    )


def lean_forward_for(module: nn.Module, *, last_in_unit: bool = False) -> types.MethodType | None:
    """The lean ``forward`` for a frozen leaf ``module``, bound to it; None for other layer types."""
    if _conv_supported(module):
        return types.MethodType(_conv_lean, module)
    if type(module) is nn.Linear:
        return types.MethodType(_linear_lean, module)
    if isinstance(module, nn.BatchNorm1d | nn.BatchNorm2d):
        return types.MethodType(_bn_lean, module)
    if type(module) in (nn.ReLU, nn.ReLU6):

        def activation(self: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
            return _activation_lean(self, inputs, keep_output=last_in_unit)

        return types.MethodType(activation, module)
    return None


@dataclass
class LeanHandle:
    """The modules :func:`install_lean_layers` changed; :meth:`remove` restores their own ``forward``."""

    modules: list[nn.Module] = field(default_factory=list)

    def remove(self) -> None:
        for module in self.modules:
            module.__dict__.pop("forward", None)
        self.modules = []


def install_lean_layers(units: Iterable[nn.Module]) -> LeanHandle:
    """Make the supported leaf layers of each frozen unit module lean (see the module docstring).

    The caller passes only units that are frozen and that gradients pass through (after the
    earliest trained unit); each layer still checks at every forward that its own parameters
    are frozen and its input needs a gradient, and otherwise runs as plain autograd.
    """
    handle = LeanHandle()
    for unit in units:
        leaves = [m for m in unit.modules() if not any(True for _ in m.children())]
        for position, leaf in enumerate(leaves):
            lean = lean_forward_for(leaf, last_in_unit=position == len(leaves) - 1)
            if lean is not None and "forward" not in leaf.__dict__:
                leaf.forward = lean
                handle.modules.append(leaf)
    return handle
