"""A training split and its partitions on disk, shared by every process that trains on them.

A deployed ClientApp is a fresh process for every message (Flower 1.42), so without help
each message regenerates the synthetic data or decodes the IDX files (5-9 s here for
MobileNetV2's default job) and recomputes the node's partition with flwr-datasets (2-3 s).
A :class:`DataCache` computes each once and keeps the result as ``.npy`` files; later
processes memory-map them (copy-on-write: nothing is ever written back) and share the pages
through the OS page cache. A hit holds the very bytes a miss computes (tested): the cache
stores what :func:`flwr_dsparse.data.load_dataset` and
:func:`~flwr_dsparse.data.partition_indices` return, never an approximation.

The key of a split names everything its bytes depend on: the dataset, its files (path, size,
modification time), seed and size, the torch and numpy releases (their generators) and the
source of the modules that compute it; a partition's key holds a hash of the labels, the
partitioner's settings and the flwr-datasets release. A changed input is a new key, never a
stale hit. Entries are written to a temporary folder and renamed into place, so concurrent
processes (three SuperNodes' first messages) never read a partial entry.

``dsparse deploy up --fast`` sets :data:`DATA_CACHE_ENV` to a folder in the deployment's
state directory; :func:`data_cache_from_env` is how the ClientApp finds it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .split import Split

__all__ = ["DATA_CACHE_ENV", "DataCache", "data_cache_from_env"]

#: A folder: ClientApps keep their training split and partitions there (unset or empty: no cache).
DATA_CACHE_ENV = "DSPARSE_DATA_CACHE"
CACHE_FORMAT = 1  # bump when the layout of an entry changes
# The modules whose code decides a split's bytes, and a partition's.
_SPLIT_SOURCES = ("split.py", "synthetic.py", "cifar10.py", "fashion_mnist.py", "__init__.py")
_PARTITION_SOURCES = ("partition.py",)


def data_cache_from_env(env: Mapping[str, str] | None = None) -> DataCache | None:
    """The cache in ``$DSPARSE_DATA_CACHE``, or ``None`` when it is unset or empty."""
    folder = (os.environ if env is None else env).get(DATA_CACHE_ENV, "")
    return DataCache(folder) if folder else None


def _sources_digest(names: Sequence[str]) -> str:
    here = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for name in names:
        digest.update(name.encode())
        digest.update((here / name).read_bytes())
    return digest.hexdigest()


def _files_of(name: str, root: str | Path | None) -> list[list[Any]]:
    """(path, size, mtime) of the files a file dataset reads; [] for the embedded one."""
    if name == "synthetic":
        return []
    if name == "fashion-mnist":
        from .fashion_mnist import find_fashion_mnist

        paths = sorted(find_fashion_mnist(root).values())
    else:
        folder = Path(root).expanduser() / "cifar-10-batches-py" if root else None
        paths = sorted(folder.iterdir()) if folder is not None and folder.is_dir() else []
    return [[str(path.resolve()), path.stat().st_size, path.stat().st_mtime_ns] for path in paths]


def _digest(fields: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:32]


class DataCache:
    """Training splits and partitions as ``.npy`` files under ``folder``.

    Parameters
    ----------
    folder : str or Path
        Created on first use. Entries never go stale (a changed input is a new key); delete
        the folder to reclaim the space.
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)

    # -- splits ---------------------------------------------------------------------------------
    def split_key(self, name: str, *, root: str | Path | None, seed: int, num_train: int | None) -> str:
        """The key of a training split: everything its bytes depend on."""
        return _digest(
            {
                "format": CACHE_FORMAT,
                "dataset": name,
                "root": str(Path(root).expanduser().resolve()) if root else "",
                "files": _files_of(name, root),
                "seed": seed,
                "num_train": num_train,
                "torch": torch.__version__,
                "numpy": np.__version__,
                "sources": _sources_digest(_SPLIT_SOURCES),
            }
        )

    def train_split(
        self, name: str, *, root: str | Path | None = None, seed: int = 0, num_train: int | None = None
    ) -> Split:
        """``load_dataset(name, root=root, seed=seed, num_train=num_train)[0]``, computed once per key."""
        from . import load_dataset

        entry = self.folder / f"split-{self.split_key(name, root=root, seed=seed, num_train=num_train)}"
        cached = _read_split(entry)
        if cached is not None:
            return cached
        # The test split is not kept; its size does not change the training split's bytes.
        train, _ = load_dataset(name, root=root or None, seed=seed, num_train=num_train, num_test=1)
        _write_entry(entry, lambda folder: _write_split(folder, train))
        return train

    # -- partitions -----------------------------------------------------------------------------
    def partitions(
        self, labels: torch.Tensor, num_partitions: int, *, method: str, alpha: float, seed: int
    ) -> list[np.ndarray]:
        """``partition_indices(labels, num_partitions, method=..., alpha=..., seed=...)``, once per key."""
        from . import partition_indices

        label_bytes = np.ascontiguousarray(np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels))
        import flwr_datasets

        key = _digest(
            {
                "format": CACHE_FORMAT,
                "labels": hashlib.sha256(label_bytes.tobytes()).hexdigest(),
                "labels_dtype": str(label_bytes.dtype),
                "num_partitions": num_partitions,
                "method": method,
                "alpha": float(alpha),
                "seed": seed,
                "flwr_datasets": flwr_datasets.__version__,
                "sources": _sources_digest(_PARTITION_SOURCES),
            }
        )
        entry = self.folder / f"partitions-{key}"
        cached = _read_partitions(entry, num_partitions)
        if cached is not None:
            return cached
        parts = partition_indices(labels, num_partitions, method=method, alpha=alpha, seed=seed)
        _write_entry(entry, lambda folder: _write_partitions(folder, parts))
        return parts


# -- entries on disk -------------------------------------------------------------------------------
def _write_entry(entry: Path, write: Any) -> None:
    """Write an entry into a private folder, then rename it into place (atomic; the first writer wins)."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    staging = entry.parent / f".{entry.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        write(staging)
        os.rename(staging, entry)
    except OSError:
        if not entry.is_dir():  # not a lost race: a real failure (full disk, permissions)
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _write_split(folder: Path, split: Split) -> None:
    x = split.x
    # Fashion-MNIST's three channels are one grey plane, expanded: keep the plane only.
    expanded = x.shape[1] > 1 and x.stride(1) == 0
    base = x[:, :1] if expanded else x
    np.save(folder / "x.npy", np.ascontiguousarray(base.numpy()))
    np.save(folder / "y.npy", np.ascontiguousarray(split.y.numpy()))
    meta = {"channels": int(x.shape[1]), "expanded": expanded}
    (folder / "meta.json").write_text(json.dumps(meta))


def _read_split(entry: Path) -> Split | None:
    try:
        meta = json.loads((entry / "meta.json").read_text())
        # "c": copy-on-write pages of the file: readable and writable, never written back.
        x = torch.from_numpy(np.load(entry / "x.npy", mmap_mode="c"))
        y = torch.from_numpy(np.load(entry / "y.npy", mmap_mode="c"))
    except (OSError, ValueError):
        return None
    if meta.get("expanded"):
        x = x.expand(-1, int(meta["channels"]), -1, -1)
    return Split(x, y)


def _write_partitions(folder: Path, parts: Sequence[np.ndarray]) -> None:
    sizes = np.asarray([len(part) for part in parts], dtype=np.int64)
    np.save(folder / "sizes.npy", sizes)
    np.save(folder / "indices.npy", np.concatenate([np.asarray(part, dtype=np.int64) for part in parts]))


def _read_partitions(entry: Path, count: int) -> list[np.ndarray] | None:
    try:
        sizes = np.load(entry / "sizes.npy")
        indices = np.load(entry / "indices.npy")
    except (OSError, ValueError):
        return None
    if sizes.shape != (count,) or int(sizes.sum()) != indices.size:
        return None
    return np.split(indices, np.cumsum(sizes)[:-1])
