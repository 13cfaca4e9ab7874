"""A dataset split (normalized images and labels) and the helpers every loader shares."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["CIFAR10_MEAN", "CIFAR10_STD", "IMAGE_SHAPE", "NUM_CLASSES", "Split", "normalize"]

# CIFAR-10's per-channel statistics, applied to both datasets so a model or a learning rate
# tuned on one behaves the same on the other.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
NUM_CLASSES = 10
IMAGE_SHAPE = (3, 32, 32)


@dataclass(frozen=True)
class Split:
    """One split of a dataset: normalized images and their labels.

    Attributes
    ----------
    x : torch.Tensor
        ``float32`` images of shape ``N x 3 x 32 x 32``, normalized with the dataset's
        statistics (CIFAR-10's for synthetic and CIFAR-10). For Fashion-MNIST the three
        channels are one grey plane, expanded (a view: a third of the memory).
    y : torch.Tensor
        ``int64`` labels of shape ``N``, in ``0 .. 9``.
    """

    x: torch.Tensor
    y: torch.Tensor

    def __post_init__(self) -> None:
        if self.x.dtype != torch.float32 or self.x.dim() != 4 or tuple(self.x.shape[1:]) != IMAGE_SHAPE:
            raise ValueError(f"Split.x must be float32 N x 3 x 32 x 32, got {self.x.dtype} {tuple(self.x.shape)}")
        if self.y.dtype != torch.int64 or self.y.shape != (self.x.shape[0],):
            raise ValueError(
                f"Split.y must be int64 of shape ({self.x.shape[0]},), got {self.y.dtype} {tuple(self.y.shape)}"
            )

    def __len__(self) -> int:
        return int(self.y.shape[0])

    @property
    def num_classes(self) -> int:
        return NUM_CLASSES


def normalize(images: torch.Tensor) -> torch.Tensor:
    """Normalize ``N x 3 x H x W`` images in ``[0, 1]`` with CIFAR-10's channel statistics."""
    mean = torch.tensor(CIFAR10_MEAN, dtype=torch.float32).view(1, 3, 1, 1)
    scale = 1.0 / torch.tensor(CIFAR10_STD, dtype=torch.float32).view(1, 3, 1, 1)
    return (images.to(torch.float32) - mean).mul_(scale).contiguous()


def _subset_rows(total: int, count: int | None, seed: int, what: str) -> np.ndarray:
    """Sorted rows of a seeded random subset of ``count`` of ``total`` examples (all when ``None``)."""
    if count is None or count == total:
        return np.arange(total, dtype=np.int64)
    _check_count(what, count)
    if count > total:
        raise ValueError(f"{what}={count} is more than the {total} examples available")
    rows = torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:count]
    return rows.sort().values.numpy()


def _subset(split: Split, count: int | None, seed: int, what: str) -> Split:
    if count is None or count == len(split):
        return split
    rows = torch.from_numpy(_subset_rows(len(split), count, seed, what))
    return Split(split.x[rows].contiguous(), split.y[rows].contiguous())


def _check_count(what: str, count: int) -> None:
    if not isinstance(count, (int, np.integer)) or isinstance(count, bool) or count <= 0:
        raise ValueError(f"{what} must be a positive integer, got {count!r}")
