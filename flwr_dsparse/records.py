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
:func:`fuse_record` packs a record's tensors into one ``Array``: every dtype's buffer and a
JSON layout in one byte string (:data:`FUSED_PREFIX`), so a message is 6 objects instead
of 10 with a buffer per dtype; :func:`from_array_record` reads fused and per-tensor records
alike, as views of the buffers.
"""

from __future__ import annotations

import io
import json
import math
import struct
import warnings
from collections.abc import Mapping
from functools import lru_cache

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from flwr.common.constant import SType

from .protocol import FUSED, FUSED_STYPE

__all__ = [
    "FUSED_ALIGN",
    "FUSED_MAGIC",
    "FUSED_PREFIX",
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
    return torch.from_numpy(values.copy()) if writable else _read_only_tensor(values)


def _read_only_tensor(values: np.ndarray) -> torch.Tensor:
    """``values`` (a view of wire bytes) as a tensor sharing its memory, which nobody writes to."""
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
    return FUSED in record


#: A fused Array's bytes: this prefix (8 bytes of magic, the layout's offset and length), every
#: dtype's buffer at an offset that is a multiple of :data:`FUSED_ALIGN`, then the layout: JSON
#: ``{"tensors": [[name, dtype, shape], ...], "buffers": [[dtype, offset, count], ...]}``.
FUSED_PREFIX = struct.Struct("<8sQQ")
FUSED_MAGIC = b"DSPFUSE2"
FUSED_ALIGN = 64  # as a .npy header pads its data: a view of a buffer starts where numpy's would


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
    """``items`` (tensors, or ``.npy`` Arrays) as one ``Array`` of every dtype's buffer and their layout, in one copy.

    The record holds one Array, keyed ``FUSED`` (:mod:`flwr_dsparse.protocol`; its bytes:
    :data:`FUSED_PREFIX`); the layout lists the tensors in the given order. A record that
    is fused already, or holds at most one array, is returned as it is.
    """
    if isinstance(items, ArrayRecord) and (is_fused(items) or len(items) <= 1):
        return items
    if len(items) <= 1:
        return record_of({name: item if isinstance(item, Array) else array_of(item) for name, item in items.items()})
    tensors, pieces = [], {}
    for name, item in items.items():
        dtype, shape, raw = _raw_bytes(item)
        tensors.append([name, str(dtype), list(shape)])
        pieces.setdefault(dtype, []).append(raw)
    # parts[0] becomes the prefix once the layout's place is known; the buffers start aligned.
    parts: list[bytes | memoryview] = [b"", bytes(FUSED_ALIGN - FUSED_PREFIX.size)]
    buffers, at = [], FUSED_ALIGN
    for dtype, raws in pieces.items():
        nbytes = sum(len(raw) for raw in raws)
        buffers.append([str(dtype), at, nbytes // dtype.itemsize])
        parts.extend(raws)
        at += nbytes
        pad = -at % FUSED_ALIGN
        parts.append(bytes(pad))
        at += pad
    text = json.dumps({"tensors": tensors, "buffers": buffers}, separators=(",", ":")).encode()
    parts[0] = FUSED_PREFIX.pack(FUSED_MAGIC, at, len(text))
    parts.append(text)
    data = b"".join(parts)
    return record_of({FUSED: Array(dtype="uint8", shape=(len(data),), stype=FUSED_STYPE, data=data)})


def _layout_of(array: Array) -> tuple[list[tuple[str, str, tuple[int, ...]]], list[tuple[str, int, int]]]:
    """The (tensors, buffers) of a fused Array, checked to lie within its bytes."""
    if array.stype != FUSED_STYPE:
        raise ValueError(f"{FUSED!r} has stype {array.stype!r}, expected {FUSED_STYPE!r}")
    data = array.data
    if len(data) < FUSED_PREFIX.size:
        raise ValueError(f"{FUSED!r} holds {len(data)} bytes, fewer than its prefix")
    magic, at, length = FUSED_PREFIX.unpack_from(data)
    if magic != FUSED_MAGIC or at + length != len(data):
        raise ValueError(f"{FUSED!r} does not start with a fused record's prefix, or its layout is cut short")
    try:
        layout = json.loads(bytes(data[at:]))
        tensors = [(str(name), str(dtype), tuple(int(n) for n in shape)) for name, dtype, shape in layout["tensors"]]
        buffers = [(str(dtype), int(offset), int(count)) for dtype, offset, count in layout["buffers"]]
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"{FUSED!r}'s layout is not the JSON of tensors and buffers ({error!r})") from None
    names = [name for name, _, _ in tensors]
    if len(set(names)) != len(names):
        raise ValueError(f"the layout names a tensor twice: {sorted({n for n in names if names.count(n) > 1})[:3]}")
    if any(n < 0 for _, _, shape in tensors for n in shape):
        raise ValueError("the layout holds a negative dimension")
    dtypes = [dtype for dtype, _, _ in buffers]
    if len(set(dtypes)) != len(dtypes):
        raise ValueError(f"the layout gives a dtype two buffers: {dtypes}")
    for dtype, offset, count in buffers:
        try:
            itemsize = np.dtype(dtype).itemsize
        except TypeError:
            raise ValueError(f"the layout's buffer dtype {dtype!r} is not a dtype") from None
        if offset < FUSED_PREFIX.size or count < 0 or offset + count * itemsize > at:
            raise ValueError(f"the {dtype} buffer ({count} values at byte {offset}) lies outside the record's bytes")
    return tensors, buffers


def _unfuse(record: ArrayRecord, writable: bool) -> dict[str, torch.Tensor]:
    extra = sorted(set(record) - {FUSED})
    if extra:
        raise ValueError(f"fused record holds arrays besides {FUSED!r}: {extra[:3]}")
    array = record[FUSED]
    tensors, buffers = _layout_of(array)
    views = {
        dtype: _read_only_tensor(np.frombuffer(array.data, dtype=np.dtype(dtype), count=count, offset=offset))
        for dtype, offset, count in buffers
    }
    used = dict.fromkeys(views, 0)
    out = {}
    for name, dtype, shape in tensors:
        if dtype not in views:
            raise ValueError(f"fused record lacks the {dtype} buffer its layout names (for {name!r})")
        buffer, count = views[dtype], math.prod(shape)
        if used[dtype] + count > buffer.numel():
            raise ValueError(f"the {dtype} buffer holds {buffer.numel()} values; the layout needs more (at {name!r})")
        view = buffer[used[dtype] : used[dtype] + count].view(shape)
        used[dtype] += count
        out[name] = view.clone() if writable else view
    short = {dtype: (used[dtype], views[dtype].numel()) for dtype in views if used[dtype] != views[dtype].numel()}
    if short:
        raise ValueError(f"fused buffers hold more values than the layout uses: {short}")
    return out


def tensor_nbytes(tensors: Mapping[str, torch.Tensor]) -> int:
    """Raw payload bytes (``numel * element_size``), the unit of every bytes metric."""
    return sum(t.numel() * t.element_size() for t in tensors.values())


def record_nbytes(record: ArrayRecord) -> int:
    """Raw payload bytes of an ``ArrayRecord`` (without the ``.npy`` headers, a fused record's layout and padding)."""
    if is_fused(record):
        return sum(count * np.dtype(dtype).itemsize for dtype, _, count in _layout_of(record[FUSED])[1])
    return sum(math.prod(array.shape) * np.dtype(array.dtype).itemsize for array in record.values())
