"""Tensor dicts to Flower records and back: the only place that converts between them.

Everything above this module (strategy, apps) speaks ``dict[str, torch.Tensor]``;
Flower's ``ArrayRecord`` is only the envelope on the wire.

Flower 1.42's ``Array`` holds a tensor as the bytes of a ``.npy`` file (``stype``
``numpy.ndarray``). ``Array(ndarray)`` writes them through ``np.save`` into a ``BytesIO``
and ``Array.numpy()`` reads them back with ``np.load``: two copies each way. Here the
``.npy`` header is written by numpy's own ``np.lib.format`` and joined to the tensor's
memory in one copy (the bytes are identical to ``np.save``'s), and a tensor is read back
as a view of the wire bytes (``np.frombuffer``), copied once only when the caller needs
to write to it.
"""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Mapping
from functools import lru_cache

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from flwr.common.constant import SType

__all__ = ["array_of", "to_array_record", "from_array_record", "tensor_of", "tensor_nbytes", "record_nbytes"]


@lru_cache(maxsize=4096)
def _npy_header(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    """The ``.npy`` header ``np.save`` writes for a C-ordered array (version 1.0, or 2.0 when it must)."""
    buffer = io.BytesIO()
    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
    try:
        np.lib.format.write_array_header_1_0(buffer, header)
    except ValueError:  # a header over 64 KiB (a shape with very many dimensions)
        buffer = io.BytesIO()
        np.lib.format.write_array_header_2_0(buffer, header)
    return buffer.getvalue()


def array_of(tensor: torch.Tensor) -> Array:
    """One tensor as a Flower ``Array``, byte-identical to ``Array(tensor.numpy())``, in one copy."""
    array = tensor.detach().cpu().contiguous().numpy()
    shape = tuple(int(n) for n in array.shape)
    data = b"".join((_npy_header(array.dtype, shape), memoryview(array).cast("B")))
    return Array(dtype=str(array.dtype), shape=shape, stype=SType.NUMPY, data=data)


@lru_cache(maxsize=4096)
def _parse_header(header: bytes) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    """(shape, fortran order, dtype, data offset) of a ``.npy`` header, read by numpy's own parser."""
    stream = io.BytesIO(header)
    major, _ = np.lib.format.read_magic(stream)
    read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
    shape, fortran_order, dtype = read_header(stream)
    return shape, fortran_order, dtype, stream.tell()


def tensor_of(array: Array, *, writable: bool = True) -> torch.Tensor:
    """A Flower ``Array`` as a torch tensor.

    ``writable=False`` returns a read-only view of the wire bytes (no copy): the caller must
    never write to it (the strategy only reads replies). ``writable=True`` copies once.
    Anything that is not a plain C-ordered ``.npy`` falls back to Flower's ``Array.numpy()``.
    """
    if array.stype != SType.NUMPY:
        raise TypeError(f"array has stype {array.stype!r}; only {SType.NUMPY!r} arrays can become tensors")
    data = array.data
    # The header's length is in bytes 8-9 (version 1) or 8-11 (version 2) of the .npy magic.
    if data[6:7] == b"\x01":
        end = 10 + int.from_bytes(data[8:10], "little")
    else:
        end = 12 + int.from_bytes(data[8:12], "little")
    shape, fortran_order, dtype, offset = _parse_header(bytes(data[:end]))
    if fortran_order or dtype.hasobject:
        values = array.numpy()
    else:
        count = math.prod(shape)
        values = np.frombuffer(data, dtype=dtype, count=count, offset=offset).reshape(shape)
    if writable:
        return torch.from_numpy(values.copy())
    with warnings.catch_warnings():
        # torch warns that the view is not writable: that is the point, nobody writes to it.
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(values)


def to_array_record(tensors: Mapping[str, torch.Tensor], *, arrays: Mapping[str, Array] | None = None) -> ArrayRecord:
    """Pack tensors (in the given order) into an ``ArrayRecord``; values are copied.

    ``arrays`` holds already-encoded ``Array`` objects by name (e.g. the round's encoding of
    a global tensor, shared by every message that carries it); they are used as they are.
    """
    arrays = arrays or {}
    return ArrayRecord({name: arrays[name] if name in arrays else array_of(tensor) for name, tensor in tensors.items()})


def from_array_record(record: ArrayRecord, *, writable: bool = True) -> dict[str, torch.Tensor]:
    """Unpack an ``ArrayRecord`` into torch tensors, in record order (see :func:`tensor_of`)."""
    return {name: tensor_of(array, writable=writable) for name, array in record.items()}


def tensor_nbytes(tensors: Mapping[str, torch.Tensor]) -> int:
    """Raw payload bytes (``numel * element_size``), the unit of every bytes metric."""
    return sum(t.numel() * t.element_size() for t in tensors.values())


def record_nbytes(record: ArrayRecord) -> int:
    """Raw payload bytes of an ``ArrayRecord`` (without the per-array ``.npy`` headers)."""
    return sum(math.prod(array.shape) * np.dtype(array.dtype).itemsize for array in record.values())
