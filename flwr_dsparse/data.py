"""Datasets, partitions and batches, the same way in simulation and deployment.

Two datasets, one normalization:

* ``"synthetic"``: the embedded default. A deterministic CIFAR-shaped 10-class set that the
  project generates from a seed, with no download. Each class has a smooth random prototype
  image; every sample is its prototype, randomly shifted, flipped, rescaled in contrast and
  covered in noise, so a small CNN has to learn shift-invariant features to classify it (it
  is learnable, but not separable in one step).
* ``"cifar10"``: CIFAR-10 from a local ``cifar-10-batches-py`` folder, read with torchvision.

Partitions come from flwr-datasets partitioners over the labels, so simulation and a real
SuperNode with the same ``partition-id`` see the same examples. This module never imports
``flwr`` at module level (``flwr_datasets`` and ``datasets`` are imported where used).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "DATASETS",
    "PARTITION_METHODS",
    "Split",
    "batch_iterator",
    "load_cifar10",
    "load_dataset",
    "make_synthetic",
    "normalize",
    "partition_indices",
]

# CIFAR-10's per-channel statistics, applied to both datasets so a model or a learning rate
# tuned on one behaves the same on the other.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
NUM_CLASSES = 10
IMAGE_SHAPE = (3, 32, 32)
DATASETS = ("synthetic", "cifar10")
PARTITION_METHODS = ("iid", "dirichlet")

# Sizes of the embedded dataset when none are given: large enough to learn from, small
# enough to generate in well under a second.
SYNTHETIC_NUM_TRAIN = 10_000
SYNTHETIC_NUM_TEST = 2_000
NOISE_STD = 0.3


@dataclass(frozen=True)
class Split:
    """One split of a dataset: normalized images and their labels.

    Attributes
    ----------
    x : torch.Tensor
        ``float32`` images of shape ``N x 3 x 32 x 32``, normalized with CIFAR-10's
        per-channel mean and standard deviation.
    y : torch.Tensor
        ``int64`` labels of shape ``N``, in ``0 .. 9``.
    """

    x: torch.Tensor
    y: torch.Tensor

    def __post_init__(self) -> None:
        if self.x.dtype != torch.float32 or self.x.dim() != 4 or tuple(self.x.shape[1:]) != IMAGE_SHAPE:
            raise ValueError(
                f"Split.x must be float32 N x 3 x 32 x 32, got {self.x.dtype} {tuple(self.x.shape)}"
            )
        if self.y.dtype != torch.int64 or self.y.shape != (self.x.shape[0],):
            raise ValueError(
                f"Split.y must be int64 of shape ({self.x.shape[0]},), got {self.y.dtype} "
                f"{tuple(self.y.shape)}"
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


# --------------------------------------------------------------------------- synthetic


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


def _synthetic_samples(
    prototypes: torch.Tensor, labels: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
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


# --------------------------------------------------------------------------- CIFAR-10


def _unchecked_cifar10_class() -> type:
    from torchvision.datasets import CIFAR10

    class UncheckedCIFAR10(CIFAR10):
        """torchvision's reader, with md5 sums of ``None``: presence is checked, not content."""

        train_list = [[name, None] for name, _ in CIFAR10.train_list]
        test_list = [[name, None] for name, _ in CIFAR10.test_list]
        meta = {**CIFAR10.meta, "md5": None}

    return UncheckedCIFAR10


def load_cifar10(root: str | Path | None, *, verify_checksums: bool = False) -> tuple[Split, Split]:
    """Read CIFAR-10 from ``root/cifar-10-batches-py`` with torchvision, never downloading.

    torchvision checks every file's md5 sum; that is optional here (``verify_checksums``),
    so a copy in the standard layout that is not byte-identical to the release (a subset, a
    test fixture) still loads. The presence of every file is always checked first.

    Raises
    ------
    FileNotFoundError
        When the folder or one of its batch files is missing; the message names the folder
        expected and how to point the configuration at it.
    """
    from torchvision.datasets import CIFAR10

    if root is None:
        raise ValueError(
            "dataset 'cifar10' needs a data folder: set run_config 'data-root' (or pass "
            "root=...) to the folder that contains 'cifar-10-batches-py'"
        )
    root = Path(root).expanduser()
    folder = root / CIFAR10.base_folder
    missing = [name for name, _ in CIFAR10.train_list + CIFAR10.test_list if not (folder / name).is_file()]
    if not (folder / CIFAR10.meta["filename"]).is_file():
        missing.append(CIFAR10.meta["filename"])
    if missing:
        raise FileNotFoundError(
            f"CIFAR-10 not found: expected the folder {folder} with {', '.join(missing)}. "
            f"Download and extract cifar-10-python.tar.gz from "
            f"https://www.cs.toronto.edu/~kriz/cifar.html into {root.resolve()} (it creates "
            f"'{CIFAR10.base_folder}'), or point run_config 'data-root' at the folder that "
            f"contains '{CIFAR10.base_folder}'"
        )
    splits = []
    for train in (True, False):
        reader = CIFAR10 if verify_checksums else _unchecked_cifar10_class()
        dataset = reader(str(root), train=train, download=False)
        images = torch.from_numpy(np.ascontiguousarray(dataset.data)).permute(0, 3, 1, 2)
        labels = torch.as_tensor(np.asarray(dataset.targets), dtype=torch.int64)
        splits.append(Split(normalize(images.to(torch.float32) / 255.0), labels))
    return splits[0], splits[1]


# --------------------------------------------------------------------------- public API


def load_dataset(
    name: str,
    *,
    root: str | Path | None = None,
    seed: int = 0,
    num_train: int | None = None,
    num_test: int | None = None,
) -> tuple[Split, Split]:
    """Load a dataset by name as ``(train, test)`` splits.

    Parameters
    ----------
    name : str
        ``"synthetic"`` (embedded, generated from ``seed``) or ``"cifar10"`` (read from
        ``root``).
    root : str or Path, optional
        For ``"cifar10"``: the folder that contains ``cifar-10-batches-py``.
    seed : int
        Seed of the synthetic data; for CIFAR-10 it picks the subset when truncating.
    num_train, num_test : int, optional
        Number of examples per split. Synthetic defaults to 10 000 / 2 000; CIFAR-10 to the
        full splits, and a smaller number takes a seeded random subset.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")
    if name == "synthetic":
        return make_synthetic(
            SYNTHETIC_NUM_TRAIN if num_train is None else num_train,
            SYNTHETIC_NUM_TEST if num_test is None else num_test,
            seed=seed,
        )
    train, test = load_cifar10(root)
    return _subset(train, num_train, seed, "num_train"), _subset(test, num_test, seed + 1, "num_test")


def _subset(split: Split, count: int | None, seed: int, what: str) -> Split:
    if count is None or count == len(split):
        return split
    _check_count(what, count)
    if count > len(split):
        raise ValueError(f"{what}={count} is more than the {len(split)} examples available")
    rows = torch.randperm(len(split), generator=torch.Generator().manual_seed(seed))[:count]
    rows = rows.sort().values
    return Split(split.x[rows].contiguous(), split.y[rows].contiguous())


def _check_count(what: str, count: int) -> None:
    if not isinstance(count, (int, np.integer)) or isinstance(count, bool) or count <= 0:
        raise ValueError(f"{what} must be a positive integer, got {count!r}")


def partition_indices(
    labels: torch.Tensor | np.ndarray | Sequence[int],
    num_partitions: int,
    *,
    method: str = "iid",
    alpha: float = 0.5,
    seed: int = 0,
) -> list[np.ndarray]:
    """Split example indices among ``num_partitions`` partitions with flwr-datasets.

    The labels are wrapped in a ``datasets.Dataset`` (in memory, offline) with an index
    column, and the partitioner's partitions are read back as index arrays.

    Parameters
    ----------
    labels : tensor, array or sequence of int
        The label of every example of the split to partition.
    num_partitions : int
        Number of partitions (the ``num-partitions`` of the node config).
    method : str
        ``"iid"`` (a seeded shuffle, then equal contiguous shards) or ``"dirichlet"``
        (per-class proportions from ``Dirichlet(alpha)``; smaller alpha, more skew).
    alpha : float
        Dirichlet concentration, > 0. Ignored for ``"iid"``.
    seed : int
        Seed of the shuffle and of the Dirichlet draws.

    Returns
    -------
    list of np.ndarray
        One sorted ``int64`` array of example indices per partition id; together they cover
        every example exactly once.
    """
    from datasets import Dataset
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner

    label_array = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels)
    if label_array.ndim != 1 or label_array.size == 0:
        raise ValueError(f"labels must be a non-empty 1-D sequence, got shape {label_array.shape}")
    if isinstance(num_partitions, bool) or not isinstance(num_partitions, (int, np.integer)) or num_partitions <= 0:
        raise ValueError(f"num_partitions must be a positive integer, got {num_partitions!r}")
    if num_partitions > label_array.size:
        raise ValueError(
            f"num_partitions={num_partitions} is more than the {label_array.size} examples; "
            f"lower num-partitions or use more data"
        )
    if method not in PARTITION_METHODS:
        raise ValueError(
            f"unknown partitioning {method!r}; choose one of: {', '.join(PARTITION_METHODS)}"
        )
    dataset = Dataset.from_dict(
        {"index": np.arange(label_array.size, dtype=np.int64), "label": label_array.astype(np.int64)}
    )
    if method == "iid":
        # IidPartitioner cuts contiguous shards; flwr-datasets' FederatedDataset shuffles
        # first, and so do we, or each partition would be one slice of the stored order.
        partitioner = IidPartitioner(num_partitions=num_partitions)
        partitioner.dataset = dataset.shuffle(seed=seed)
    else:
        if not alpha > 0:
            raise ValueError(f"dirichlet-alpha must be > 0, got {alpha!r}")
        # The partitioner redraws until every partition has this many examples; ask for at
        # most half the fair share so small test datasets do not exhaust its 10 tries.
        min_size = max(1, min(10, label_array.size // (2 * num_partitions)))
        partitioner = DirichletPartitioner(
            num_partitions=num_partitions,
            partition_by="label",
            alpha=float(alpha),
            min_partition_size=min_size,
            self_balancing=False,
            shuffle=True,
            seed=seed,
        )
        partitioner.dataset = dataset
    return [
        np.sort(np.asarray(partitioner.load_partition(pid)["index"], dtype=np.int64))
        for pid in range(num_partitions)
    ]


def batch_iterator(
    split: Split, indices: np.ndarray | Sequence[int] | None, batch_size: int, *, seed: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(x, y)`` batches from ``split[indices]`` forever.

    Every epoch is a fresh permutation drawn from ``seed`` and the epoch number, so the
    same arguments always yield the same stream, and a client that is rebuilt between
    rounds can resume by skipping what it consumed. Batches do not cross epochs: the last
    batch of an epoch may be smaller. ``indices=None`` means the whole split.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size <= 0:
        raise ValueError(f"batch-size must be a positive integer, got {batch_size!r}")
    rows = (
        torch.arange(len(split), dtype=torch.int64)
        if indices is None
        else torch.as_tensor(np.asarray(indices, dtype=np.int64))
    )
    if rows.numel() == 0:
        raise ValueError("cannot iterate over an empty partition; lower num-partitions or use more data")
    if int(rows.min()) < 0 or int(rows.max()) >= len(split):
        raise ValueError(
            f"indices must lie in [0, {len(split)}), got values from {int(rows.min())} to {int(rows.max())}"
        )
    # Validation above runs at the call, not at the first next(): the generator is separate.
    return _batches(split, rows, batch_size, seed)


def _batches(
    split: Split, rows: torch.Tensor, batch_size: int, seed: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    epoch = 0
    while True:
        generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        order = rows[torch.randperm(rows.numel(), generator=generator)]
        for start in range(0, order.numel(), batch_size):
            chunk = order[start : start + batch_size]
            yield split.x[chunk], split.y[chunk]
        epoch += 1
