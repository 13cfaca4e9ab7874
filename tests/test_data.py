"""Tests of flwr_dsparse.data: embedded data, local CIFAR-10, partitions, batches."""

from __future__ import annotations

import pickle
import subprocess
import sys
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch

from flwr_dsparse.data import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    Split,
    batch_iterator,
    batches_at,
    load_dataset,
    normalize,
    partition_indices,
)
from flwr_dsparse.models import build_model

# ----------------------------------------------------------------------------- synthetic


def test_synthetic_shapes_dtypes_and_balance() -> None:
    train, test = load_dataset("synthetic", num_train=1000, num_test=300, seed=3)
    assert train.x.shape == (1000, 3, 32, 32) and train.x.dtype == torch.float32
    assert train.y.shape == (1000,) and train.y.dtype == torch.int64
    assert test.x.shape == (300, 3, 32, 32) and len(test) == 300
    assert torch.bincount(train.y, minlength=10).tolist() == [100] * 10
    assert torch.isfinite(train.x).all()


def test_synthetic_is_deterministic_per_seed_and_test_is_held_out() -> None:
    a_train, a_test = load_dataset("synthetic", num_train=200, num_test=100, seed=1)
    b_train, b_test = load_dataset("synthetic", num_train=200, num_test=100, seed=1)
    c_train, _ = load_dataset("synthetic", num_train=200, num_test=100, seed=2)
    assert torch.equal(a_train.x, b_train.x) and torch.equal(a_train.y, b_train.y)
    assert torch.equal(a_test.x, b_test.x)
    assert not torch.equal(a_train.x, c_train.x)
    # The test split is drawn from its own stream, not a prefix of the train split.
    assert not torch.equal(a_train.x[:100], a_test.x)


def test_synthetic_default_size_is_fast() -> None:
    # Timing lives in benchmarks; this only guards against an accidental slow path
    # (a per-image Python loop) with a bound ten times the measured ~1 s.
    import time

    start = time.perf_counter()
    train, test = load_dataset("synthetic")
    assert (len(train), len(test)) == (10_000, 2_000)
    assert time.perf_counter() - start < 10.0


def test_synthetic_is_learnable_but_not_in_one_step() -> None:
    # One intra-op thread: on a shared 2-core runner, more threads only contend.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _learn_and_check()
    finally:
        torch.set_num_threads(threads)


def _learn_and_check() -> None:
    torch.manual_seed(0)
    train, test = load_dataset("synthetic", num_train=2000, num_test=300, seed=0)
    model = build_model("tiny", seed=0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    batches = batch_iterator(train, None, 32, seed=0)

    def accuracy() -> float:
        model.eval()
        with torch.no_grad():
            correct = (model(test.x).argmax(1) == test.y).float().mean().item()
        model.train()
        return correct

    def step() -> None:
        x, y = next(batches)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    step()
    after_one = accuracy()
    for _ in range(99):
        step()
    after_many = accuracy()
    # Measured: ~0.10 after one step, 0.63 after 100 steps, ~0.9 after 300 (chance is 0.10).
    assert after_one < 0.25, after_one
    assert after_many > 0.35, after_many


# ----------------------------------------------------------------------------- CIFAR-10


def _write_fake_cifar(root: Path, per_batch: int = 6, num_test: int = 8) -> tuple[np.ndarray, list[int]]:
    """Write a tiny copy in the real ``cifar-10-batches-py`` layout; return the test batch."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)

    def write(name: str, count: int) -> tuple[np.ndarray, list[int]]:
        data = rng.integers(0, 256, size=(count, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, size=count)]
        entry = {
            "batch_label": name,
            "labels": labels,
            "data": data,
            "filenames": [f"{name}_{i}.png" for i in range(count)],
        }
        with open(folder / name, "wb") as handle:
            pickle.dump(entry, handle)
        return data, labels

    for index in range(1, 6):
        write(f"data_batch_{index}", per_batch)
    test = write("test_batch", num_test)
    meta = {
        "label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"],
        "num_cases_per_batch": per_batch,
        "num_vis": 3072,
    }
    with open(folder / "batches.meta", "wb") as handle:
        pickle.dump(meta, handle)
    return test


def test_cifar10_reads_local_folder_with_same_normalization(tmp_path: Path) -> None:
    test_data, test_labels = _write_fake_cifar(tmp_path)
    train, test = load_dataset("cifar10", root=tmp_path)
    assert len(train) == 30 and len(test) == 8
    assert train.x.dtype == torch.float32 and train.y.dtype == torch.int64
    assert test.y.tolist() == test_labels
    # CIFAR stores rows as 3 x 1024 planes (R, G, B); pixel (c, 0, 0) of image 0 is data[0, c*1024].
    for channel in range(3):
        expected = (test_data[0, channel * 1024] / 255.0 - CIFAR10_MEAN[channel]) / CIFAR10_STD[channel]
        assert test.x[0, channel, 0, 0].item() == pytest.approx(expected, abs=1e-5)
    # One normalization for both datasets.
    raw = torch.from_numpy(test_data.reshape(-1, 3, 32, 32).astype(np.float32) / 255.0)
    assert torch.allclose(test.x, normalize(raw), atol=1e-6)


def test_cifar10_subset_is_seeded(tmp_path: Path) -> None:
    _write_fake_cifar(tmp_path)
    a, _ = load_dataset("cifar10", root=tmp_path, num_train=10, seed=4)
    b, _ = load_dataset("cifar10", root=tmp_path, num_train=10, seed=4)
    assert len(a) == 10 and torch.equal(a.x, b.x)
    with pytest.raises(ValueError, match="num_train=31 is more than the 30"):
        load_dataset("cifar10", root=tmp_path, num_train=31)


def test_cifar10_missing_folder_says_where_to_put_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as info:
        load_dataset("cifar10", root=tmp_path / "nowhere")
    message = str(info.value)
    assert str(tmp_path / "nowhere" / "cifar-10-batches-py") in message
    assert "data_batch_1" in message and "data-root" in message


def test_cifar10_missing_one_file_is_named(tmp_path: Path) -> None:
    _write_fake_cifar(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_3"):
        load_dataset("cifar10", root=tmp_path)


def test_cifar10_without_root_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="data-root"):
        load_dataset("cifar10")


def test_unknown_dataset_lists_valid_names() -> None:
    with pytest.raises(ValueError, match="unknown dataset 'mnist'.*synthetic, cifar10, fashion-mnist"):
        load_dataset("mnist")


def test_split_validates_dtypes() -> None:
    with pytest.raises(ValueError, match="float32"):
        Split(torch.zeros(2, 3, 32, 32, dtype=torch.float64), torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ValueError, match="int64"):
        Split(torch.zeros(2, 3, 32, 32), torch.zeros(2, dtype=torch.int32))


# ----------------------------------------------------------------------------- partitions


@pytest.mark.parametrize("method", ["iid", "dirichlet"])
def test_partitions_cover_every_example_once_and_are_deterministic(method: str) -> None:
    labels = torch.arange(700) % 10
    parts = partition_indices(labels, 7, method=method, alpha=0.5, seed=1)
    again = partition_indices(labels, 7, method=method, alpha=0.5, seed=1)
    assert len(parts) == 7
    assert all(p.dtype == np.int64 and len(p) > 0 for p in parts)
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(700))
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))


def test_iid_partitions_are_equal_and_shuffled() -> None:
    labels = np.repeat(np.arange(10), 70)  # sorted by class: an unshuffled split would be 1-2 classes
    parts = partition_indices(labels, 7, method="iid", seed=0)
    assert [len(p) for p in parts] == [100] * 7
    assert all(len(np.unique(labels[p])) >= 8 for p in parts)
    other = partition_indices(labels, 7, method="iid", seed=1)
    assert not np.array_equal(parts[0], other[0])


def test_dirichlet_small_alpha_skews_labels() -> None:
    labels = np.arange(2000) % 10

    def mean_top_class_share(alpha: float) -> float:
        parts = partition_indices(labels, 5, method="dirichlet", alpha=alpha, seed=0)
        return float(np.mean([np.bincount(labels[p], minlength=10).max() / len(p) for p in parts]))

    assert mean_top_class_share(0.1) > mean_top_class_share(100.0) + 0.2


def test_partition_argument_errors() -> None:
    labels = np.arange(50) % 10
    with pytest.raises(ValueError, match="num_partitions must be a positive integer, got 0"):
        partition_indices(labels, 0)
    with pytest.raises(ValueError, match="dirichlet-alpha must be > 0, got 0"):
        partition_indices(labels, 2, method="dirichlet", alpha=0)
    with pytest.raises(ValueError, match="unknown partitioning 'shards'.*iid, dirichlet"):
        partition_indices(labels, 2, method="shards")
    with pytest.raises(ValueError, match="num_partitions=51 is more than the 50 examples"):
        partition_indices(labels, 51)


def test_partitioning_works_offline(tmp_path: Path) -> None:
    # A fresh interpreter with every Hugging Face client forced offline: partitioning an
    # in-memory Dataset must not reach for the Hub.
    code = (
        "import numpy as np\n"
        "from flwr_dsparse.data import partition_indices\n"
        "p = partition_indices(np.arange(100) % 10, 4, method='dirichlet', seed=0)\n"
        "print(sum(len(x) for x in p))\n"
    )
    env = {
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf"),
        "NO_PROXY": "",
        "HTTPS_PROXY": "http://127.0.0.1:9",  # an unreachable proxy: any request would fail
        "HTTP_PROXY": "http://127.0.0.1:9",
        "PATH": "/usr/bin:/bin",
    }
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "100"


# ----------------------------------------------------------------------------- batches


def test_batch_iterator_epochs_cover_partition_and_reshuffle() -> None:
    train, _ = load_dataset("synthetic", num_train=50, num_test=10)
    indices = np.arange(5, 25)  # 20 examples, batch 8 -> 8, 8, 4 per epoch
    stream = batch_iterator(train, indices, 8, seed=0)
    epoch_one = list(islice(stream, 3))
    epoch_two = list(islice(stream, 3))
    assert [len(y) for _, y in epoch_one] == [8, 8, 4]

    def rows(epoch: list[tuple[torch.Tensor, torch.Tensor]]) -> list[int]:
        # Recover each example's row from its pixels (all synthetic images differ).
        out = []
        for x, _ in epoch:
            for image in x:
                matches = torch.nonzero((train.x == image).flatten(1).all(1)).flatten()
                out.append(int(matches[0]))
        return out

    first, second = rows(epoch_one), rows(epoch_two)
    assert sorted(first) == list(range(5, 25)) and sorted(second) == list(range(5, 25))
    assert first != second  # a fresh permutation every epoch


def test_batch_iterator_is_deterministic_and_labels_match() -> None:
    train, _ = load_dataset("synthetic", num_train=40, num_test=10)
    a = list(islice(batch_iterator(train, None, 16, seed=5), 6))
    b = list(islice(batch_iterator(train, None, 16, seed=5), 6))
    c = list(islice(batch_iterator(train, None, 16, seed=6), 1))
    assert all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b, strict=True))
    assert not torch.equal(a[0][1], c[0][1]) or not torch.equal(a[0][0], c[0][0])
    for x, y in a:
        for image, label in zip(x, y, strict=True):
            row = torch.nonzero((train.x == image).flatten(1).all(1)).flatten()[0]
            assert train.y[row] == label


def test_batch_iterator_argument_errors() -> None:
    train, _ = load_dataset("synthetic", num_train=20, num_test=10)
    with pytest.raises(ValueError, match="batch-size must be a positive integer, got 0"):
        batch_iterator(train, None, 0, seed=0)
    with pytest.raises(ValueError, match="empty partition"):
        batch_iterator(train, np.array([], dtype=np.int64), 4, seed=0)
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 20\)"):
        batch_iterator(train, np.array([3, 20]), 4, seed=0)


def _same_batches(a: list, b: list) -> bool:
    """Equal length, and every ``(x, y)`` bit-identical."""
    pairs = zip(a, b, strict=False)
    return len(a) == len(b) and all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in pairs)


@pytest.mark.parametrize(("size", "batch"), [(37, 8), (40, 8), (5, 16)], ids=["ragged", "even", "one-batch-epochs"])
def test_batches_at_equals_the_stream_bit_for_bit(size: int, batch: int) -> None:
    train, _ = load_dataset("synthetic", num_train=60, num_test=10)
    indices = np.arange(3, 3 + size)
    steps = 250  # many epochs: 5, 5 and 1 batches per epoch
    stream = list(islice(batch_iterator(train, indices, batch, seed=11), steps))
    direct = batches_at(train, indices, batch, seed=11, start=0, count=steps)
    assert len(direct) == steps
    for (xs, ys), (xd, yd) in zip(stream, direct, strict=True):
        assert torch.equal(xs, xd) and torch.equal(ys, yd)
    for start, count in ((0, 1), (4, 3), (123, 7), (249, 1)):  # windows that start and end mid-epoch
        window = batches_at(train, indices, batch, seed=11, start=start, count=count)
        assert _same_batches(window, stream[start : start + count])
    assert batches_at(train, indices, batch, seed=11, start=10, count=0) == []


def test_client_round_batches_are_the_rounds_stretch_of_the_node_stream() -> None:
    from client.app import round_batches
    from flwr_dsparse.config import load_config

    train, _ = load_dataset("synthetic", num_train=60, num_test=10)
    config = load_config({"local-steps": 3, "batch-size": 8, "seed": 2})
    indices = np.arange(10, 45)
    stream = list(islice(batch_iterator(train, indices, 8, seed=2 * 10_007 + 4), 30))
    for server_round in (1, 2, 7, 10):
        got = round_batches(config, train, indices, 4, server_round)
        want = stream[(server_round - 1) * 3 : server_round * 3]
        assert len(got) == 3 and _same_batches(got, want)


def test_batches_at_argument_errors() -> None:
    train, _ = load_dataset("synthetic", num_train=20, num_test=10)
    with pytest.raises(ValueError, match="start must be a step number >= 0, got -1"):
        batches_at(train, None, 4, seed=0, start=-1)
    with pytest.raises(ValueError, match="count must be a number of batches >= 0"):
        batches_at(train, None, 4, seed=0, start=0, count=-2)
    with pytest.raises(ValueError, match="batch-size must be a positive integer"):
        batches_at(train, None, 0, seed=0, start=0)


# ----------------------------------------------------------------------------- the on-disk cache


def test_data_cache_hit_and_miss_give_the_uncached_bytes_and_batches(tmp_path: Path) -> None:
    """A deployed ClientApp reads its split and partition from the cache: the very bytes it would compute."""
    from flwr_dsparse.data import DataCache, data_cache_from_env

    assert data_cache_from_env({}) is None and data_cache_from_env({"DSPARSE_DATA_CACHE": ""}) is None
    assert data_cache_from_env({"DSPARSE_DATA_CACHE": str(tmp_path)}).folder == tmp_path
    uncached, _ = load_dataset("synthetic", num_train=300, seed=5)
    want_parts = partition_indices(uncached.y, 3, method="dirichlet", alpha=0.5, seed=5)
    cache = DataCache(tmp_path / "cache")
    miss = cache.train_split("synthetic", seed=5, num_train=300)
    entries = sorted(path.name for path in (tmp_path / "cache").iterdir())
    hit = DataCache(tmp_path / "cache").train_split("synthetic", seed=5, num_train=300)
    assert len(entries) == 1 and entries[0].startswith("split-")  # no staging folder left behind
    for split in (miss, hit):
        assert torch.equal(split.x, uncached.x) and torch.equal(split.y, uncached.y)
    for _ in range(2):  # a miss that writes, then a hit
        parts = cache.partitions(hit.y, 3, method="dirichlet", alpha=0.5, seed=5)
        assert [p.tolist() for p in parts] == [p.tolist() for p in want_parts]
    want = batches_at(uncached, want_parts[1], 16, seed=7, start=40, count=5)
    assert _same_batches(batches_at(hit, parts[1], 16, seed=7, start=40, count=5), want)
    hit.x[0].zero_()  # copy-on-write pages: the file keeps its bytes
    assert torch.equal(cache.train_split("synthetic", seed=5, num_train=300).x, uncached.x)
    # Another seed, size or partitioning is another entry, never a stale hit.
    other = cache.train_split("synthetic", seed=6, num_train=300)
    assert not torch.equal(other.x, uncached.x)
    assert len(list((tmp_path / "cache").glob("split-*"))) == 2
    iid = cache.partitions(hit.y, 3, method="iid", alpha=0.5, seed=5)
    assert [p.tolist() for p in iid] == [p.tolist() for p in partition_indices(uncached.y, 3, seed=5)]
