"""CIFAR-10 from a local ``cifar-10-batches-py`` folder, read with torchvision (never downloaded)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .split import Split, normalize

__all__ = ["load_cifar10"]


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
