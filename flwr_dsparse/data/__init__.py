"""Datasets, partitions and batches, the same way in simulation and deployment.

Three datasets, all as normalized ``N x 3 x 32 x 32`` float images with 10 classes:

* ``"synthetic"`` (:mod:`.synthetic`): the embedded default. A deterministic CIFAR-shaped
  10-class set that the project generates from a seed, with no download.
* ``"cifar10"`` (:mod:`.cifar10`): CIFAR-10 from a local ``cifar-10-batches-py`` folder, read
  with torchvision.
* ``"fashion-mnist"`` (:mod:`.fashion_mnist`): Fashion-MNIST (60 000 train, 10 000 test,
  28 x 28 grey) from its four IDX files, gzipped or not: in ``data-root`` (or torchvision's
  ``FashionMNIST/raw`` under it), else where Debian's package ``dataset-fashion-mnist`` puts
  them. Each image is padded to 32 x 32 and repeated to 3 channels, normalized with
  Fashion-MNIST's own mean and std.

Synthetic and CIFAR-10 share CIFAR-10's channel statistics (:mod:`.split`).

Partitions come from flwr-datasets partitioners over the labels, so simulation and a real
SuperNode with the same ``partition-id`` see the same examples; a node's batches are
computed directly for any step (:mod:`.partition`). :mod:`.cache` keeps a training split
and its partitions on disk for processes that would otherwise recompute them (a deployed
ClientApp, one process per message). This package never imports ``flwr`` at module level
(``flwr_datasets`` and ``datasets`` are imported where used).
"""

from __future__ import annotations

from pathlib import Path

from .cache import DATA_CACHE_ENV, DataCache, data_cache_from_env
from .cifar10 import load_cifar10
from .fashion_mnist import (
    FASHION_MNIST_MEAN,
    FASHION_MNIST_PACKAGE,
    FASHION_MNIST_STD,
    default_dataset,
    fashion_mnist_default_dir,
    find_fashion_mnist,
    load_fashion_mnist,
    read_idx_ubyte,
)
from .partition import PARTITION_METHODS, batch_iterator, batches_at, node_stream_seed, partition_indices
from .split import CIFAR10_MEAN, CIFAR10_STD, IMAGE_SHAPE, NUM_CLASSES, Split, _subset, normalize
from .synthetic import SYNTHETIC_NUM_TEST, SYNTHETIC_NUM_TRAIN, make_synthetic

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "DATASETS",
    "DATA_CACHE_ENV",
    "DataCache",
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_PACKAGE",
    "FASHION_MNIST_STD",
    "IMAGE_SHAPE",
    "NUM_CLASSES",
    "PARTITION_METHODS",
    "Split",
    "batch_iterator",
    "batches_at",
    "data_cache_from_env",
    "default_dataset",
    "fashion_mnist_default_dir",
    "find_fashion_mnist",
    "load_cifar10",
    "load_dataset",
    "load_fashion_mnist",
    "make_synthetic",
    "node_stream_seed",
    "normalize",
    "partition_indices",
    "read_idx_ubyte",
]

DATASETS = ("synthetic", "cifar10", "fashion-mnist")


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
        ``"synthetic"`` (embedded, generated from ``seed``), ``"cifar10"`` (read from
        ``root``) or ``"fashion-mnist"`` (read from ``root``, else from the Debian package's
        folder, :func:`find_fashion_mnist`).
    root : str or Path, optional
        For ``"cifar10"``: the folder that contains ``cifar-10-batches-py``. For
        ``"fashion-mnist"``: the folder of the four IDX files (or of ``FashionMNIST/raw``).
    seed : int
        Seed of the synthetic data; for the files it picks the subset when truncating.
    num_train, num_test : int, optional
        Number of examples per split. Synthetic defaults to 10 000 / 2 000; the files to the
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
    if name == "fashion-mnist":
        return load_fashion_mnist(root, num_train=num_train, num_test=num_test, seed=seed)
    train, test = load_cifar10(root)
    return _subset(train, num_train, seed, "num_train"), _subset(test, num_test, seed + 1, "num_test")
