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

Flower 1.42 moves each ``Array`` of a record as objects of its own (the array and its
chunks), one request each and on every hop (ServerApp to SuperLink to SuperNode to
ClientApp): MobileNetV2's 314 tensors cost about 630 requests per message each way.
:func:`fuse_record` packs a record's tensors into one ``.npy`` buffer per dtype plus a JSON
layout (names, dtypes and shapes, in order); :func:`from_array_record` reads fused and
per-tensor records alike, as views of the buffers.
"""

from __future__ import annotations

import io
import json
import math
import warnings
from collections.abc import Mapping
from functools import lru_cache

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from flwr.common.constant import SType

from .protocol import FUSED_BUFFER, FUSED_LAYOUT, FUSED_LAYOUT_STYPE

__all__ = [
    "array_of",
    "record_of",
    "from_array_record",
    "fuse_record",
    "is_fused",
    "record_nbytes",
    "tensor_nbytes",
    "tensor_of",
    "to_array_record",
]


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


def _numpy_of(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().cpu().contiguous().numpy()


def _npy_array(dtype: np.dtype, shape: tuple[int, ...], pieces: list[memoryview]) -> Array:
    """An ``Array`` of ``pieces`` (the raw C-ordered bytes) behind one ``.npy`` header: one copy."""
    data = b"".join((_npy_header(dtype, shape), *pieces))
    return Array(dtype=str(dtype), shape=shape, stype=SType.NUMPY, data=data)


def array_of(tensor: torch.Tensor) -> Array:
    """One tensor as a Flower ``Array``, byte-identical to ``Array(tensor.numpy())``, in one copy."""
    array = _numpy_of(tensor)
    return _npy_array(array.dtype, tuple(int(n) for n in array.shape), [memoryview(array.reshape(-1)).cast("B")])


@lru_cache(maxsize=4096)
def _parse_header(header: bytes) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    """(shape, fortran order, dtype, data offset) of a ``.npy`` header, read by numpy's own parser."""
    stream = io.BytesIO(header)
    major, _ = np.lib.format.read_magic(stream)
    read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
    shape, fortran_order, dtype = read_header(stream)
    return shape, fortran_order, dtype, stream.tell()


def _npy_parts(array: Array) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    """(shape, fortran order, dtype, data offset) of a ``.npy`` Array."""
    data = array.data
    # The header's length is in bytes 8-9 (version 1) or 8-11 (version 2) of the .npy magic.
    if data[6:7] == b"\x01":
        end = 10 + int.from_bytes(data[8:10], "little")
    else:
        end = 12 + int.from_bytes(data[8:12], "little")
    return _parse_header(bytes(data[:end]))


def tensor_of(array: Array, *, writable: bool = True) -> torch.Tensor:
    """A Flower ``Array`` as a torch tensor.

    ``writable=False`` returns a read-only view of the wire bytes (no copy): the caller must
    never write to it (the strategy only reads replies). ``writable=True`` copies once.
    Anything that is not a plain C-ordered ``.npy`` falls back to Flower's ``Array.numpy()``.
    """
    if array.stype != SType.NUMPY:
        raise TypeError(f"array has stype {array.stype!r}; only {SType.NUMPY!r} arrays can become tensors")
    data = array.data
    shape, fortran_order, dtype, offset = _npy_parts(array)
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


def record_of(arrays: Mapping[str, Array]) -> ArrayRecord:
    """An ``ArrayRecord`` holding these ``Array`` objects themselves.

    Flower's ``ArrayRecord(dict)`` builds a new, validated ``Array`` per entry (about 5 us
    each: a MobileNetV2 record costs 1.5 ms, paid for every message and every round).
    """
    record = ArrayRecord()
    for name, array in arrays.items():
        record[name] = array
    return record


def to_array_record(tensors: Mapping[str, torch.Tensor], *, arrays: Mapping[str, Array] | None = None) -> ArrayRecord:
    """Pack tensors (in the given order) into an ``ArrayRecord``; values are copied.

    ``arrays`` holds already-encoded ``Array`` objects by name (e.g. the round's encoding of
    a global tensor, shared by every message that carries it); they are used as they are.
    """
    arrays = arrays or {}
    return record_of({name: arrays[name] if name in arrays else array_of(tensor) for name, tensor in tensors.items()})


def from_array_record(record: ArrayRecord, *, writable: bool = True) -> dict[str, torch.Tensor]:
    """Unpack an ``ArrayRecord`` (fused or not) into torch tensors, in record order (see :func:`tensor_of`).

    A fused record (:func:`fuse_record`) gives views of its buffers with ``writable=False``
    and a copy of each tensor otherwise. A fused record that does not match its layout
    raises ``ValueError`` saying how.
    """
    if is_fused(record):
        return _unfuse(record, writable)
    return {name: tensor_of(array, writable=writable) for name, array in record.items()}


def is_fused(record: ArrayRecord) -> bool:
    """Whether ``record`` is a fused record (:func:`fuse_record`)."""
    return FUSED_LAYOUT in record


def _raw_bytes(item: torch.Tensor | Array) -> tuple[np.dtype, tuple[int, ...], memoryview]:
    """(dtype, shape, raw C-ordered bytes) of a tensor or of a ``.npy`` Array, without a copy where possible."""
    if isinstance(item, torch.Tensor):
        array = _numpy_of(item)
        return array.dtype, tuple(int(n) for n in array.shape), memoryview(array.reshape(-1)).cast("B")
    shape, fortran_order, dtype, offset = _npy_parts(item)
    if fortran_order or dtype.hasobject:
        array = np.ascontiguousarray(item.numpy())
        return array.dtype, tuple(int(n) for n in array.shape), memoryview(array.reshape(-1)).cast("B")
    return dtype, tuple(shape), memoryview(item.data)[offset : offset + math.prod(shape) * dtype.itemsize]


def fuse_record(items: ArrayRecord | Mapping[str, torch.Tensor | Array]) -> ArrayRecord:
    """``items`` (tensors, or ``.npy`` Arrays) as one 1-D buffer per dtype plus their layout, in one copy.

    The buffers are keyed ``FUSED_BUFFER + dtype`` and the layout ``FUSED_LAYOUT`` (JSON
    ``[[name, dtype, shape], ...]`` in the given order; :mod:`flwr_dsparse.protocol`).
    A record that is fused already, or holds at most one array, is returned as it is.
    """
    if isinstance(items, ArrayRecord) and (is_fused(items) or len(items) <= 1):
        return items
    if len(items) <= 1:
        return record_of({name: item if isinstance(item, Array) else array_of(item) for name, item in items.items()})
    layout, pieces = [], {}
    for name, item in items.items():
        dtype, shape, raw = _raw_bytes(item)
        layout.append([name, str(dtype), list(shape)])
        pieces.setdefault(dtype, []).append(raw)
    record = {
        FUSED_BUFFER + str(dtype): _npy_array(dtype, (sum(len(p) for p in raws) // dtype.itemsize,), raws)
        for dtype, raws in pieces.items()
    }
    text = json.dumps(layout, separators=(",", ":")).encode()
    record[FUSED_LAYOUT] = Array(dtype="uint8", shape=(len(text),), stype=FUSED_LAYOUT_STYPE, data=text)
    return record_of(record)


def _layout_of(record: ArrayRecord) -> list[tuple[str, str, tuple[int, ...]]]:
    array = record[FUSED_LAYOUT]
    if array.stype != FUSED_LAYOUT_STYPE:
        raise ValueError(f"{FUSED_LAYOUT!r} has stype {array.stype!r}, expected {FUSED_LAYOUT_STYPE!r}")
    try:
        entries = json.loads(bytes(array.data))
        layout = [(str(name), str(dtype), tuple(int(n) for n in shape)) for name, dtype, shape in entries]
    except (TypeError, ValueError) as error:
        raise ValueError(f"{FUSED_LAYOUT!r} is not a JSON list of [name, dtype, shape] ({error})") from None
    names = [name for name, _, _ in layout]
    if len(set(names)) != len(names):
        raise ValueError(f"the layout names a tensor twice: {sorted({n for n in names if names.count(n) > 1})[:3]}")
    if any(n < 0 for _, _, shape in layout for n in shape):
        raise ValueError("the layout holds a negative dimension")
    return layout


def _unfuse(record: ArrayRecord, writable: bool) -> dict[str, torch.Tensor]:
    layout = _layout_of(record)
    keys = {FUSED_BUFFER + dtype for _, dtype, _ in layout}
    extra = sorted(set(record) - keys - {FUSED_LAYOUT})
    if extra:
        raise ValueError(f"fused record holds arrays its layout does not use: {extra[:3]}")
    buffers, used = {}, dict.fromkeys(keys, 0)
    for key in keys:
        if key not in record:
            raise ValueError(f"fused record lacks the buffer {key!r} its layout names")
        held = str(_npy_parts(record[key])[2])
        if FUSED_BUFFER + held != key:
            raise ValueError(f"buffer {key!r} holds {held} values")
        buffers[key] = tensor_of(record[key], writable=False).reshape(-1)
    out = {}
    for name, dtype, shape in layout:
        key, count = FUSED_BUFFER + dtype, math.prod(shape)
        buffer = buffers[key]
        if used[key] + count > buffer.numel():
            raise ValueError(f"buffer {key!r} holds {buffer.numel()} values; the layout needs more (at {name!r})")
        view = buffer[used[key] : used[key] + count].view(shape)
        used[key] += count
        out[name] = view.clone() if writable else view
    short = {key: (used[key], buffers[key].numel()) for key in keys if used[key] != buffers[key].numel()}
    if short:
        raise ValueError(f"fused buffers hold more values than the layout uses: {short}")
    return out


def tensor_nbytes(tensors: Mapping[str, torch.Tensor]) -> int:
    """Raw payload bytes (``numel * element_size``), the unit of every bytes metric."""
    return sum(t.numel() * t.element_size() for t in tensors.values())


def record_nbytes(record: ArrayRecord) -> int:
    """Raw payload bytes of an ``ArrayRecord`` (without the ``.npy`` headers and a fused record's layout)."""
    return sum(
        math.prod(array.shape) * np.dtype(array.dtype).itemsize
        for name, array in record.items()
        if name != FUSED_LAYOUT
    )
