"""Fashion-MNIST from its four IDX files, gzipped or not.

Read from ``data-root`` (or torchvision's ``FashionMNIST/raw`` under it), else from where
Debian's package ``dataset-fashion-mnist`` puts them. Each image is padded to 32 x 32 and
repeated to 3 channels (a view of one grey plane), normalized with Fashion-MNIST's own mean
and std.
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from .split import IMAGE_SHAPE, NUM_CLASSES, Split, _subset_rows

__all__ = [
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_PACKAGE",
    "FASHION_MNIST_STD",
    "default_dataset",
    "fashion_mnist_default_dir",
    "find_fashion_mnist",
    "load_fashion_mnist",
    "read_idx_ubyte",
]

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
