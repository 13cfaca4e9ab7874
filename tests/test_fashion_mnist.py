"""Fashion-MNIST: the IDX reader on files the tests write, the lookup, and the installed release."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from flwr_dsparse.config import load_config
from flwr_dsparse.data import (
    FASHION_MNIST_MEAN,
    FASHION_MNIST_PACKAGE,
    FASHION_MNIST_STD,
    default_dataset,
    find_fashion_mnist,
    load_dataset,
    partition_indices,
    read_idx_ubyte,
)

NAMES = {
    "train-images": "train-images-idx3-ubyte",
    "train-labels": "train-labels-idx1-ubyte",
    "test-images": "t10k-images-idx3-ubyte",
    "test-labels": "t10k-labels-idx1-ubyte",
}


def _idx_bytes(array: np.ndarray) -> bytes:
    """``array`` (uint8) in the IDX format: magic 0x0000 08 ndim, big-endian dimensions, the bytes."""
    return bytes((0, 0, 0x08, array.ndim)) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def _write(path: Path, data: bytes, gz: bool) -> Path:
    path = path.with_name(path.name + ".gz") if gz else path
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def _write_fashion(folder: Path, *, gz: bool = True, num_train: int = 12, num_test: int = 5, seed: int = 0) -> dict:
    """A tiny Fashion-MNIST in the release's four files; returns the arrays written."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images": rng.integers(0, 256, (num_train, 28, 28), dtype=np.uint8),
        "train-labels": (np.arange(num_train) % 10).astype(np.uint8),
        "test-images": rng.integers(0, 256, (num_test, 28, 28), dtype=np.uint8),
        "test-labels": rng.integers(0, 10, num_test, dtype=np.uint8),
    }
    for role, array in arrays.items():
        _write(folder / NAMES[role], _idx_bytes(array), gz)
    return arrays


def _normalized(pixels: np.ndarray) -> torch.Tensor:
    return (torch.from_numpy(pixels.astype(np.float32)) / 255.0 - FASHION_MNIST_MEAN) / FASHION_MNIST_STD


@pytest.mark.parametrize("gz", [True, False], ids=["gzipped", "plain"])
def test_reads_the_four_files_padded_three_channels_normalized(tmp_path: Path, gz: bool) -> None:
    arrays = _write_fashion(tmp_path, gz=gz)
    train, test = load_dataset("fashion-mnist", root=tmp_path)
    assert tuple(train.x.shape) == (12, 3, 32, 32) and tuple(test.x.shape) == (5, 3, 32, 32)
    assert train.x.dtype == torch.float32 and train.y.dtype == torch.int64
    assert train.y.tolist() == arrays["train-labels"].tolist() and test.y.tolist() == arrays["test-labels"].tolist()
    for channel in range(3):  # the grey image, centred in 32 x 32, in every channel
        assert torch.allclose(test.x[:, channel, 2:30, 2:30], _normalized(arrays["test-images"]), atol=1e-6)
    border = torch.ones(32, 32, dtype=torch.bool)
    border[2:30, 2:30] = False
    background = torch.tensor(-FASHION_MNIST_MEAN / FASHION_MNIST_STD)
    assert torch.allclose(train.x[:, :, border], background.expand(12, 3, int(border.sum())))


def test_torchvision_raw_layout_under_data_root(tmp_path: Path) -> None:
    arrays = _write_fashion(tmp_path / "FashionMNIST" / "raw", gz=False)
    files = find_fashion_mnist(tmp_path)
    assert {path.parent for path in files.values()} == {tmp_path / "FashionMNIST" / "raw"}
    _, test = load_dataset("fashion-mnist", root=tmp_path)
    assert test.y.tolist() == arrays["test-labels"].tolist()


def test_default_folder_and_default_dataset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DSPARSE_FASHION_MNIST_DIR", str(tmp_path / "absent"))
    name, root, note = default_dataset()
    assert (name, root) == ("synthetic", "") and note.startswith("warning:") and "\n" not in note
    assert str(tmp_path / "absent") in note and FASHION_MNIST_PACKAGE in note
    arrays = _write_fashion(tmp_path / "fm")
    monkeypatch.setenv("DSPARSE_FASHION_MNIST_DIR", str(tmp_path / "fm"))
    assert default_dataset()[:2] == ("fashion-mnist", str(tmp_path / "fm"))
    train, _ = load_dataset("fashion-mnist")  # no root: the default folder
    assert train.y.tolist() == arrays["train-labels"].tolist()


def test_missing_files_name_the_path_the_package_and_the_key(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as info:
        load_dataset("fashion-mnist", root="/nonexistent")
    message = str(info.value)
    assert "/nonexistent" in message and FASHION_MNIST_PACKAGE in message and "data-root" in message
    _write_fashion(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError, match=r"missing t10k-labels-idx1-ubyte\[\.gz\]"):
        load_dataset("fashion-mnist", root=tmp_path)


def test_subsets_are_seeded_and_partitioned_by_flwr_datasets(tmp_path: Path) -> None:
    arrays = _write_fashion(tmp_path, num_train=40)
    a, _ = load_dataset("fashion-mnist", root=tmp_path, num_train=10, num_test=3, seed=2)
    b, _ = load_dataset("fashion-mnist", root=tmp_path, num_train=10, num_test=3, seed=2)
    assert len(a) == 10 and torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
    full, _ = load_dataset("fashion-mnist", root=tmp_path)
    rows = [int(torch.nonzero((full.x == image).flatten(1).all(1))[0]) for image in a.x]
    assert rows == sorted(rows) and a.y.tolist() == arrays["train-labels"][rows].tolist()
    with pytest.raises(ValueError, match="num_train=41 is more than the 40"):
        load_dataset("fashion-mnist", root=tmp_path, num_train=41)
    parts = partition_indices(full.y, 4, seed=0)
    assert sorted(np.concatenate(parts).tolist()) == list(range(40))


def test_each_file_is_read_once_per_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write_fashion(tmp_path)
    reads: list[str] = []
    original = Path.read_bytes

    def counting(self: Path) -> bytes:
        reads.append(self.name)
        return original(self)

    monkeypatch.setattr(Path, "read_bytes", counting)
    load_dataset("fashion-mnist", root=tmp_path)
    load_dataset("fashion-mnist", root=tmp_path, num_train=4)
    assert sorted(reads) == sorted(f"{name}.gz" for name in NAMES.values())
    # A rewritten file (another size) is read again, not served stale from the cache.
    _write(tmp_path / NAMES["test-labels"], _idx_bytes(np.zeros(7, dtype=np.uint8)), True)
    _write(tmp_path / NAMES["test-images"], _idx_bytes(np.zeros((7, 28, 28), dtype=np.uint8)), True)
    _, test = load_dataset("fashion-mnist", root=tmp_path)
    assert len(test) == 7


@pytest.mark.parametrize("gz", [True, False], ids=["gzipped", "plain"])
def test_truncated_image_file_is_a_clear_error(tmp_path: Path, gz: bool) -> None:
    arrays = _write_fashion(tmp_path, gz=gz)
    data = _idx_bytes(arrays["train-images"])
    _write(tmp_path / NAMES["train-images"], data[:-100], gz)
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte.*truncated: the header gives shape 12 x 28 x 28"):
        load_dataset("fashion-mnist", root=tmp_path)
    _write(tmp_path / NAMES["train-images"], data[:10], gz)  # not even a whole header
    with pytest.raises(ValueError, match="truncated header"):
        load_dataset("fashion-mnist", root=tmp_path)


def test_truncated_gzip_stream_is_a_clear_error(tmp_path: Path) -> None:
    _write_fashion(tmp_path)
    path = tmp_path / f"{NAMES['test-images']}.gz"
    path.write_bytes(path.read_bytes()[:-200])
    with pytest.raises(ValueError, match=r"t10k-images-idx3-ubyte\.gz: corrupt or truncated gzip"):
        load_dataset("fashion-mnist", root=tmp_path)


def test_wrong_magic_is_a_clear_error(tmp_path: Path) -> None:
    arrays = _write_fashion(tmp_path)
    # A label file (1-D) where the image file (3-D) should be.
    _write(tmp_path / NAMES["train-images"], _idx_bytes(arrays["train-labels"]), True)
    expected = "is not an IDX file of 3-D unsigned bytes: magic 0x00000801, expected 0x00000803"
    with pytest.raises(ValueError, match=expected):
        load_dataset("fashion-mnist", root=tmp_path)


def test_mislabelled_files_are_clear_errors(tmp_path: Path) -> None:
    arrays = _write_fashion(tmp_path)
    _write(tmp_path / NAMES["train-labels"], _idx_bytes(arrays["train-labels"][:11]), True)
    with pytest.raises(ValueError, match="holds 12 images but .*train-labels-idx1-ubyte.gz holds 11 labels"):
        load_dataset("fashion-mnist", root=tmp_path)
    labels = arrays["train-labels"].copy()
    labels[5] = 10
    _write(tmp_path / NAMES["train-labels"], _idx_bytes(labels), True)
    with pytest.raises(ValueError, match=r"label 10 at index 5 is outside 0\.\.9"):
        load_dataset("fashion-mnist", root=tmp_path)


def test_images_of_another_size_are_refused(tmp_path: Path) -> None:
    _write_fashion(tmp_path)
    _write(tmp_path / NAMES["test-images"], _idx_bytes(np.zeros((5, 27, 27), dtype=np.uint8)), True)
    with pytest.raises(ValueError, match="images are 27 x 27, Fashion-MNIST's are 28 x 28"):
        load_dataset("fashion-mnist", root=tmp_path)


def test_reader_returns_read_only_arrays(tmp_path: Path) -> None:
    arrays = _write_fashion(tmp_path, gz=False)
    images = read_idx_ubyte(tmp_path / NAMES["train-images"], 3)
    assert np.array_equal(images, arrays["train-images"]) and not images.flags.writeable


def test_run_config_accepts_fashion_mnist_without_data_root() -> None:
    assert load_config({"dataset": "fashion-mnist"}).dataset == "fashion-mnist"
    with pytest.raises(ValueError, match="fashion-mnist"):
        load_config({"dataset": "mnist"})


def test_server_fails_on_a_missing_data_root_before_contacting_any_node() -> None:
    from server.app import run_job

    class UntouchableGrid:
        def __getattr__(self, name: str):
            raise AssertionError(f"the server used grid.{name} before checking the data")

    config = load_config({"dataset": "fashion-mnist", "data-root": "/nonexistent", "model": "tiny"})
    with pytest.raises(FileNotFoundError) as info:
        run_job(UntouchableGrid(), config)
    message = str(info.value)
    assert "/nonexistent" in message and FASHION_MNIST_PACKAGE in message and "data-root" in message


# ----------------------------------------------------------------------------- the installed release

_NAME, _ROOT, _NOTE = default_dataset()


@pytest.mark.skipif(_NAME != "fashion-mnist", reason=_NOTE)
def test_installed_release_is_the_official_split() -> None:
    train, test = load_dataset("fashion-mnist")
    assert (len(train), len(test)) == (60_000, 10_000)
    assert torch.bincount(train.y).tolist() == [6_000] * 10 and torch.bincount(test.y).tolist() == [1_000] * 10
    inner = train.x[:, 0, 2:30, 2:30]
    # Normalized with the dataset's own statistics: the 28 x 28 pixels have mean 0 and std 1.
    assert abs(float(inner.mean())) < 1e-3 and abs(float(inner.std()) - 1.0) < 1e-3
    assert torch.equal(train.x[:, 0], train.x[:, 2])


def test_data_cache_keeps_the_grey_plane_and_follows_the_files(tmp_path: Path) -> None:
    """Cached Fashion-MNIST: the same 3-channel view of one plane; rewritten files are a new entry."""
    from flwr_dsparse.data import DataCache

    _write_fashion(tmp_path / "fm", num_train=20)
    uncached, _ = load_dataset("fashion-mnist", root=tmp_path / "fm", num_train=15, seed=1)
    cache = DataCache(tmp_path / "cache")
    for _ in range(2):  # miss, then hit
        split = cache.train_split("fashion-mnist", root=tmp_path / "fm", seed=1, num_train=15)
        assert torch.equal(split.x, uncached.x) and torch.equal(split.y, uncached.y)
        assert split.x.stride(1) == 0  # still one plane, expanded
    plane = np.load(next((tmp_path / "cache").glob("split-*")) / "x.npy")
    assert plane.shape == (15, 1, 32, 32)
    _write_fashion(tmp_path / "fm", num_train=20, seed=9)  # other images in the same files
    changed = cache.train_split("fashion-mnist", root=tmp_path / "fm", seed=1, num_train=15)
    assert torch.equal(changed.x, load_dataset("fashion-mnist", root=tmp_path / "fm", num_train=15, seed=1)[0].x)
    assert not torch.equal(changed.x, uncached.x)
