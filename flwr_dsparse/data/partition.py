"""Partitions of a split among the nodes (flwr-datasets partitioners), and each node's batch stream.

Partitions come from flwr-datasets partitioners over the labels, so simulation and a real
SuperNode with the same ``partition-id`` see the same examples (``flwr_datasets`` and
``datasets`` are imported where used). A node's batch for (seed, step) is computed directly
(:func:`batches_at`), never by replaying its stream.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from itertools import count as count_from

import numpy as np
import torch

from .split import Split

__all__ = ["PARTITION_METHODS", "batch_iterator", "batches_at", "node_stream_seed", "partition_indices"]

PARTITION_METHODS = ("iid", "dirichlet")


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


def node_stream_seed(seed: int, partition: int) -> int:
    """The seed of partition ``partition``'s batch stream in a job seeded ``seed``.

    One stream per node and job; the ClientApp and every experiment that replays a node's
    batches (the comparison's collective ranks) derive it here, so they see the same batches.
    """
    return seed * 10_007 + partition


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
