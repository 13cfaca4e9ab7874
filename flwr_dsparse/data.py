"""Datasets, partitions and batches, the same way in simulation and deployment.

Three datasets, all as normalized ``N x 3 x 32 x 32`` float images with 10 classes:

* ``"synthetic"``: the embedded default. A deterministic CIFAR-shaped 10-class set that the
  project generates from a seed, with no download. Each class has a smooth random prototype
  image; every sample is its prototype, randomly shifted, flipped, rescaled in contrast and
  covered in noise, so a small CNN has to learn shift-invariant features to classify it (it
  is learnable, but not separable in one step).
* ``"cifar10"``: CIFAR-10 from a local ``cifar-10-batches-py`` folder, read with torchvision.
* ``"fashion-mnist"``: Fashion-MNIST (60 000 train, 10 000 test, 28 x 28 grey) from its four
  IDX files, gzipped or not: in ``data-root`` (or torchvision's ``FashionMNIST/raw`` under it),
  else where Debian's package ``dataset-fashion-mnist`` puts them. Each image is padded to
  32 x 32 and repeated to 3 channels, normalized with Fashion-MNIST's own mean and std.

Synthetic and CIFAR-10 share CIFAR-10's channel statistics.

Partitions come from flwr-datasets partitioners over the labels, so simulation and a real
SuperNode with the same ``partition-id`` see the same examples. This module never imports
``flwr`` at module level (``flwr_datasets`` and ``datasets`` are imported where used).
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from itertools import count as count_from
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "DATASETS",
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_PACKAGE",
    "FASHION_MNIST_STD",
    "PARTITION_METHODS",
    "Split",
    "batch_iterator",
    "batches_at",
    "default_dataset",
    "fashion_mnist_default_dir",
    "find_fashion_mnist",
    "load_cifar10",
    "load_dataset",
    "load_fashion_mnist",
    "make_synthetic",
    "normalize",
    "partition_indices",
    "read_idx_ubyte",
]

# CIFAR-10's per-channel statistics, applied to both datasets so a model or a learning rate
# tuned on one behaves the same on the other.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
NUM_CLASSES = 10
IMAGE_SHAPE = (3, 32, 32)
DATASETS = ("synthetic", "cifar10", "fashion-mnist")
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


# --------------------------------------------------------------------------- Fashion-MNIST

# Pixel statistics of the 60 000 training images (in [0, 1], over the 28 x 28 pixels).
FASHION_MNIST_MEAN = 0.2860
FASHION_MNIST_STD = 0.3530
FASHION_MNIST_PACKAGE = "dataset-fashion-mnist"
#: Where Debian's ``dataset-fashion-mnist`` installs the four gzipped IDX files.
FASHION_MNIST_DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
#: Overrides the default folder (the Debian one) when ``data-root`` is empty.
FASHION_MNIST_DIR_ENV = "DSPARSE_FASHION_MNIST_DIR"
FASHION_MNIST_FILES = {
    "train-images": "train-images-idx3-ubyte",
    "train-labels": "train-labels-idx1-ubyte",
    "test-images": "t10k-images-idx3-ubyte",
    "test-labels": "t10k-labels-idx1-ubyte",
}
FASHION_MNIST_SIDE = 28
GZIP_MAGIC = b"\x1f\x8b"
IDX_UBYTE = 0x08


def fashion_mnist_default_dir() -> Path:
    """The folder read when ``data-root`` is empty: ``$DSPARSE_FASHION_MNIST_DIR``, else Debian's."""
    return Path(os.environ.get(FASHION_MNIST_DIR_ENV) or FASHION_MNIST_DEBIAN_DIR)


def find_fashion_mnist(root: str | Path | None = None) -> dict[str, Path]:
    """The four Fashion-MNIST IDX files, by role (``train-images`` …), each gzipped or not.

    With ``root``: ``root`` itself, then torchvision's layout ``root/FashionMNIST/raw``.
    Without: :func:`fashion_mnist_default_dir`. The first folder that holds all four wins.

    Raises
    ------
    FileNotFoundError
        Naming the folders searched, the files missing, the package and ``data-root``.
    """
    if root:
        base = Path(root).expanduser()
        folders = [base, base / "FashionMNIST" / "raw"]
    else:
        folders = [fashion_mnist_default_dir()]
    missing_by_folder = []
    for folder in folders:
        found: dict[str, Path] = {}
        for role, name in FASHION_MNIST_FILES.items():
            for candidate in (folder / f"{name}.gz", folder / name):
                if candidate.is_file():
                    found[role] = candidate
                    break
        if len(found) == len(FASHION_MNIST_FILES):
            return found
        if not folder.is_dir():
            missing_by_folder.append(f"{folder} (no such folder)")
            continue
        missing = [f"{FASHION_MNIST_FILES[role]}[.gz]" for role in FASHION_MNIST_FILES if role not in found]
        missing_by_folder.append(f"{folder} (missing {', '.join(missing)})")
    where = f"data-root {str(root)!r}" if root else f"the default folder {folders[0]}"
    raise FileNotFoundError(
        f"Fashion-MNIST not found in {where}: looked in {'; '.join(missing_by_folder)}. Install Debian's package "
        f"{FASHION_MNIST_PACKAGE} (as root: apt-get update && apt-get install -y {FASHION_MNIST_PACKAGE}; "
        f"scripts/setup.sh does it), which puts the files in {FASHION_MNIST_DEBIAN_DIR}, or set run_config "
        f"'data-root' to a folder holding the four IDX files (or torchvision's FashionMNIST/raw under it)"
    )


def default_dataset() -> tuple[str, str, str]:
    """The dataset a job uses when none is named: ``(name, data_root, one-line note)``.

    Fashion-MNIST where its files are in :func:`fashion_mnist_default_dir` (real images),
    else the embedded synthetic set, with a warning that says why and how to get the files.
    Used by ``scripts/run.sh`` and ``experiments.compare``; the app's own default stays
    ``"synthetic"``, so ``flwr run .`` never needs a file.
    """
    folder = fashion_mnist_default_dir()
    try:
        files = find_fashion_mnist()
    except FileNotFoundError:
        return (
            "synthetic",
            "",
            (
                f"warning: Fashion-MNIST not found in {folder} (install Debian's {FASHION_MNIST_PACKAGE} as root, "
                f"or name a folder with data-root); using the embedded synthetic data instead"
            ),
        )
    return "fashion-mnist", str(folder), f"dataset: Fashion-MNIST (real images) from {files['train-images'].parent}"


def read_idx_ubyte(path: str | Path, ndim: int) -> np.ndarray:
    """An IDX file of unsigned bytes (gzipped or not) as a read-only ``uint8`` array of ``ndim`` dimensions.

    Cached per process by path, size and modification time: each file is read and
    decompressed once. torchvision's reader (``read_sn3_pascalvincent_tensor``) takes
    only an uncompressed path and checks with bare ``assert``; a truncated file there is a
    reshape error. Here every defect is a ``ValueError`` that names the file.
    """
    path = Path(path)
    stat = path.stat()
    return _read_idx_ubyte(str(path.resolve()), stat.st_size, stat.st_mtime_ns, ndim)


@lru_cache(maxsize=8)
def _read_idx_ubyte(path: str, size: int, mtime_ns: int, ndim: int) -> np.ndarray:
    del size, mtime_ns  # cache key only: a rewritten file is read again
    data = Path(path).read_bytes()
    fix = f"re-install it (apt-get install --reinstall -y {FASHION_MNIST_PACKAGE}) or download it again"
    if data[:2] == GZIP_MAGIC:
        try:
            data = gzip.decompress(data)
        except (EOFError, OSError, zlib.error) as error:
            raise ValueError(f"{path}: corrupt or truncated gzip file ({error}); {fix}") from None
    header = 4 + 4 * ndim
    expected_magic = bytes((0, 0, IDX_UBYTE, ndim))
    if data[:4] != expected_magic:
        raise ValueError(
            f"{path} is not an IDX file of {ndim}-D unsigned bytes: magic 0x{data[:4].hex() or 'empty'}, "
            f"expected 0x{expected_magic.hex()}; {fix}"
        )
    if len(data) < header:
        raise ValueError(f"{path}: truncated header ({len(data)} of {header} bytes); {fix}")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    expected = int(np.prod(shape, dtype=np.int64))
    if len(data) - header != expected:
        state = "truncated" if len(data) - header < expected else "longer than its header says"
        raise ValueError(
            f"{path}: {state}: the header gives shape {' x '.join(map(str, shape))} = {expected} bytes of data, "
            f"the file holds {len(data) - header}; {fix}"
        )
    return np.frombuffer(data, dtype=np.uint8, count=expected, offset=header).reshape(shape)


def _fashion_mnist_split(files: dict[str, Path], part: str) -> tuple[np.ndarray, np.ndarray]:
    """One split's images ``N x 28 x 28`` and labels ``N``, checked against each other."""
    images = read_idx_ubyte(files[f"{part}-images"], 3)
    labels = read_idx_ubyte(files[f"{part}-labels"], 1)
    if images.shape[1:] != (FASHION_MNIST_SIDE, FASHION_MNIST_SIDE):
        raise ValueError(
            f"{files[f'{part}-images']}: images are {images.shape[1]} x {images.shape[2]}, "
            f"Fashion-MNIST's are {FASHION_MNIST_SIDE} x {FASHION_MNIST_SIDE}"
        )
    if images.shape[0] != labels.shape[0]:
        raise ValueError(
            f"Fashion-MNIST {part} split: {files[f'{part}-images']} holds {images.shape[0]} images but "
            f"{files[f'{part}-labels']} holds {labels.shape[0]} labels; the files are from different releases"
        )
    if images.shape[0] == 0:
        raise ValueError(f"{files[f'{part}-images']} holds no images")
    bad = np.flatnonzero(labels >= NUM_CLASSES)
    if bad.size:
        raise ValueError(
            f"{files[f'{part}-labels']}: label {int(labels[bad[0]])} at index {int(bad[0])} is outside "
            f"0..{NUM_CLASSES - 1} ({bad.size} such labels); this is not a Fashion-MNIST label file"
        )
    return images, labels


def _grey_split(images: np.ndarray, labels: np.ndarray, rows: np.ndarray) -> Split:
    """``images[rows]`` padded to 32 x 32, normalized, as a 3-channel view of one grey plane."""
    # The border is background, black like the images' own edges: normalized 0. Written in
    # place into one buffer, so the peak is the result plus the bytes (60 000 images: 0.3 GB).
    plane = torch.full((rows.size, 1, *IMAGE_SHAPE[1:]), -FASHION_MNIST_MEAN / FASHION_MNIST_STD)
    margin = (IMAGE_SHAPE[1] - FASHION_MNIST_SIDE) // 2
    inner = plane[:, :, margin : margin + FASHION_MNIST_SIDE, margin : margin + FASHION_MNIST_SIDE]
    inner.copy_(torch.from_numpy(images[rows]).unsqueeze(1)).div_(255.0).sub_(FASHION_MNIST_MEAN)
    inner.div_(FASHION_MNIST_STD)
    return Split(plane.expand(-1, 3, -1, -1), torch.from_numpy(labels[rows].astype(np.int64)))


def load_fashion_mnist(
    root: str | Path | None = None, *, num_train: int | None = None, num_test: int | None = None, seed: int = 0
) -> tuple[Split, Split]:
    """Fashion-MNIST as ``(train, test)`` splits from :func:`find_fashion_mnist`'s files.

    ``num_train`` / ``num_test`` take a seeded random subset (``seed`` and ``seed + 1``, as
    for CIFAR-10), chosen before the images are converted, so a small subset costs little.
    """
    files = find_fashion_mnist(root)
    splits = []
    for part, wanted, subset_seed in (("train", num_train, seed), ("test", num_test, seed + 1)):
        images, labels = _fashion_mnist_split(files, part)
        rows = _subset_rows(len(labels), wanted, subset_seed, f"num_{part}")
        splits.append(_grey_split(images, labels, rows))
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
        raise ValueError(f"unknown partitioning {method!r}; choose one of: {', '.join(PARTITION_METHODS)}")
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
        np.sort(np.asarray(partitioner.load_partition(pid)["index"], dtype=np.int64)) for pid in range(num_partitions)
    ]


def batch_iterator(
    split: Split, indices: np.ndarray | Sequence[int] | None, batch_size: int, *, seed: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(x, y)`` batches from ``split[indices]`` forever.

    Every epoch is a fresh permutation drawn from ``seed`` and the epoch number, so the
    same arguments always yield the same stream. Batches do not cross epochs: the last
    batch of an epoch may be smaller. ``indices=None`` means the whole split.
    :func:`batches_at` computes any stretch of this stream directly, without replaying it.
    """
    rows = _stream_rows(split, indices, batch_size)
    # Validation above runs at the call, not at the first next(): the generator is separate.
    return _batches(split, rows, batch_size, seed)


def batches_at(
    split: Split,
    indices: np.ndarray | Sequence[int] | None,
    batch_size: int,
    *,
    seed: int,
    start: int,
    count: int = 1,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Batches ``start .. start + count - 1`` of :func:`batch_iterator`'s stream, computed directly.

    Step ``s`` is batch ``s % b`` of epoch ``s // b`` (``b`` batches per epoch), so the cost
    is one epoch permutation per epoch touched, whatever ``start`` is: a node rebuilt for
    round ``r`` reads its ``K`` batches in O(K), not by skipping ``(r - 1) * K``. The
    batches are bit-identical to the stream's.
    """
    rows = _stream_rows(split, indices, batch_size)
    if isinstance(start, bool) or not isinstance(start, (int, np.integer)) or start < 0:
        raise ValueError(f"start must be a step number >= 0, got {start!r}")
    if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 0:
        raise ValueError(f"count must be a number of batches >= 0, got {count!r}")
    per_epoch = -(-rows.numel() // batch_size)
    batches = []
    order, order_epoch = rows, -1
    for step in range(start, start + count):
        epoch, position = divmod(step, per_epoch)
        if epoch != order_epoch:
            order, order_epoch = _epoch_order(rows, seed, epoch), epoch
        batches.append(_batch(split, order, position, batch_size))
    return batches


def _stream_rows(split: Split, indices: np.ndarray | Sequence[int] | None, batch_size: int) -> torch.Tensor:
    """The checked rows a stream draws from (``None``: the whole split)."""
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
    return rows


def _epoch_order(rows: torch.Tensor, seed: int, epoch: int) -> torch.Tensor:
    """``rows`` in epoch ``epoch``'s order: a permutation from a generator seeded by (seed, epoch)."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return rows[torch.randperm(rows.numel(), generator=generator)]


def _batch(split: Split, order: torch.Tensor, position: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch ``position`` of an epoch ordered as ``order``."""
    chunk = order[position * batch_size : (position + 1) * batch_size]
    return split.x[chunk], split.y[chunk]


def _batches(
    split: Split, rows: torch.Tensor, batch_size: int, seed: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    per_epoch = -(-rows.numel() // batch_size)
    for epoch in count_from():
        order = _epoch_order(rows, seed, epoch)
        for position in range(per_epoch):
            yield _batch(split, order, position, batch_size)
