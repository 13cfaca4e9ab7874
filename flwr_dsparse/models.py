"""Models by name. No weights are downloaded: every model starts from its seed."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

__all__ = ["MODELS", "build_model", "TinyNet"]


def _conv_block(in_channels: int, out_channels: int, stride: int, batch_norm: bool = True) -> nn.Sequential:
    if not batch_norm:
        return nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1), nn.ReLU(inplace=True))
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class TinyNet(nn.Module):
    """A small MobileNet-shaped CNN (``features`` blocks plus ``classifier``).

    It has the same unit layout as MobileNetV2 (``features.0`` … and
    ``classifier``) at a fraction of the cost, for tests and quick runs.
    With ``batch_norm=False`` (the ``"tiny_nobn"`` model) the blocks are conv (with
    bias) and ReLU: the mean of per-device gradients then equals the gradient of the
    union batch exactly, which BatchNorm's per-batch statistics would break.
    """

    def __init__(
        self, num_classes: int = 10, in_channels: int = 3, width: int = 16, *, batch_norm: bool = True
    ) -> None:
        super().__init__()
        self.features = nn.Sequential(
            _conv_block(in_channels, width, 1, batch_norm),
            _conv_block(width, width * 2, 2, batch_norm),
            _conv_block(width * 2, width * 2, 1, batch_norm),
            _conv_block(width * 2, width * 4, 2, batch_norm),
            _conv_block(width * 4, width * 4, 1, batch_norm),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(width * 4, num_classes))

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(inputs)))


def _mobilenet_v2(num_classes: int) -> nn.Module:
    from torchvision.models import mobilenet_v2

    return mobilenet_v2(weights=None, num_classes=num_classes)


MODELS: dict[str, Callable[[int], nn.Module]] = {
    "mobilenet_v2": _mobilenet_v2,
    "tiny": lambda num_classes: TinyNet(num_classes),
    "tiny_nobn": lambda num_classes: TinyNet(num_classes, width=4, batch_norm=False),
}


def build_model(name: str, num_classes: int = 10, *, seed: int | None = 0) -> nn.Module:
    """Build a fresh model by name, deterministically from ``seed``."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(sorted(MODELS))}")
    if seed is not None:
        torch.manual_seed(seed)
    return MODELS[name](num_classes)
