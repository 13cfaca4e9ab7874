"""The embedded synthetic dataset: a deterministic CIFAR-shaped 10-class set generated from a seed.

Each class has a smooth random prototype image; every sample is its prototype, randomly
shifted, flipped, rescaled in contrast and covered in noise, so a small CNN has to learn
shift-invariant features to classify it (it is learnable, but not separable in one step).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .split import NUM_CLASSES, Split, _check_count, normalize

__all__ = ["NOISE_STD", "SYNTHETIC_NUM_TEST", "SYNTHETIC_NUM_TRAIN", "make_synthetic"]

# Sizes of the embedded dataset when none are given: large enough to learn from, small
# enough to generate in well under a second.
SYNTHETIC_NUM_TRAIN = 10_000
SYNTHETIC_NUM_TEST = 2_000
NOISE_STD = 0.3


def _class_prototypes(generator: torch.Generator) -> torch.Tensor:
    """One smooth random colour image per class, in ``[0, 1]``.

    Low-resolution noise, upsampled bicubically, gives blobs and edges at a few scales:
    structure a CNN can pick up, unlike white noise.
    """
    coarse = torch.rand(NUM_CLASSES, 3, 4, 4, generator=generator)
    fine = torch.rand(NUM_CLASSES, 3, 8, 8, generator=generator)
    image = 0.6 * F.interpolate(coarse, size=32, mode="bicubic", align_corners=False)
    image = image + 0.4 * F.interpolate(fine, size=32, mode="bicubic", align_corners=False)
    return image.clamp(0.0, 1.0)


def _shifted(prototypes: torch.Tensor, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """``prototypes[labels]``, each circularly shifted by up to 8 pixels each way and
    mirrored left-right with probability 1/2.

    One gather over per-image row and column indices, instead of a roll and a flip per
    image, so 10k images take a fraction of a second.
    """
    count = labels.shape[0]
    shifts = torch.randint(-8, 9, (count, 2), generator=generator)
    flip = torch.rand(count, 1, generator=generator) < 0.5
    grid = torch.arange(32)
    rows = (grid.view(1, 32) - shifts[:, :1]) % 32  # count x 32
    cols = (grid.view(1, 32) - shifts[:, 1:]) % 32
    cols = torch.where(flip, cols.flip(1), cols)
    pixel = (rows.view(count, 32, 1) * 32 + cols.view(count, 1, 32)).view(count, 1, 1024)
    channel = torch.arange(3).view(1, 3, 1)
    images = prototypes.flatten(2)[labels.view(count, 1, 1), channel, pixel]
    return images.view(count, 3, 32, 32)


def _synthetic_samples(prototypes: torch.Tensor, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Distort each label's prototype: shift, flip, a distractor, contrast, noise.

    In-place arithmetic keeps the peak at two image tensors and the time low.
    """
    count = labels.shape[0]
    images = _shifted(prototypes, labels, generator)
    # A faint, independently shifted prototype of another class on top: the classes
    # overlap, so the task takes a few hundred steps rather than a handful.
    others = (labels + torch.randint(1, NUM_CLASSES, (count,), generator=generator)) % NUM_CLASSES
    images.mul_(0.7).add_(_shifted(prototypes, others, generator), alpha=0.3)
    contrast = 0.6 + 0.8 * torch.rand(count, 1, 1, 1, generator=generator)
    brightness = 0.2 * (torch.rand(count, 1, 1, 1, generator=generator) - 0.5)
    mean = images.mean(dim=(1, 2, 3), keepdim=True)
    images.sub_(mean).mul_(contrast).add_(mean + brightness)
    images.add_(torch.randn(images.shape, generator=generator).mul_(NOISE_STD))
    return images.clamp_(0.0, 1.0)


def make_synthetic(num_train: int, num_test: int, *, seed: int = 0) -> tuple[Split, Split]:
    """Generate the embedded dataset: train and test splits from one seed.

    Both splits share the class prototypes (the seed picks them) and draw their samples
    from independent streams, so the test split is held out, not a copy. Labels are
    balanced: each class has ``num // 10`` or one more examples, in shuffled order.
    """
    _check_count("num_train", num_train)
    _check_count("num_test", num_test)
    prototype_generator = torch.Generator().manual_seed(seed)
    prototypes = _class_prototypes(prototype_generator)
    splits = []
    for stream, count in ((1, num_train), (2, num_test)):
        generator = torch.Generator().manual_seed(seed * 1_000_003 + stream)
        labels = torch.arange(count, dtype=torch.int64) % NUM_CLASSES
        labels = labels[torch.randperm(count, generator=generator)]
        images = _synthetic_samples(prototypes, labels, generator)
        splits.append(Split(normalize(images), labels))
    return splits[0], splits[1]
