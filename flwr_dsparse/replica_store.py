"""A node's durable replica and momentum in a folder on the node, instead of in ``context.state``.

Flower keeps a node's ``context.state`` outside the ClientApp (in the SuperNode, or in the
simulation engine) and moves it into and out of the ClientApp process with every message: for
MobileNetV2 a 9 MB replica serialized both ways per message, which Flower's own transport of
the same message bytes (the echo app of ``experiments.round_overhead``) does not pay. A folder
on the node's own disk serves every ClientApp process of that node (forked per message in a
deployment, the actors in turn in a simulation): the replica is written once per round and
read back only by a process that holds no live state (:mod:`flwr_dsparse.node_state`).

``context.state`` keeps the token of the node's current copy (``STATE_META``), and an entry is
used only when its token matches, so a stale entry (a round written by another process since),
another run's or another node's file is never read as this node's state. A node whose entry is
missing or unreadable (a fresh disk, a reconnected node with a new node id) fails its message
as a node that lost its state does, and the server resends the whole model.

An entry is one file per (run, node), overwritten in place: a fixed-size header (the token and
where the layout lies), every tensor's bytes written straight from its memory, and the layout
(names, dtypes, shapes, offsets). Writing a new file per round and renaming it into place cost
7 ms for MobileNetV2 on this machine (the kernel allocates fresh pages every time); rewriting
the pages of the existing file costs 0.3 ms, and the whole save 1.4 ms (7-12 ms on a loaded
day). A process that wrote the entry last, and whose node changed only some tensors (a live
node: what it received and trained), rewrites only those and the momentum (0.7-0.9 ms on that
loaded day). Either way the header is first
rewritten with no token, then the tensors, then the header with the new token, so a reader
that finds the token it expects finds that write's tensors (it checks the header again after
reading them).

Where an entry lives is the job's ``replica-store`` key (:func:`replica_store_for`):
``"auto"`` is ``$DSPARSE_REPLICA_STORE`` on the node where it is set (``dsparse deploy up
--fast`` sets one in the deployment's state directory), else, in a simulation, a folder of the
run that the ServerApp makes (:func:`make_run_folder`; its nodes share its machine), else
``context.state``; ``"context"`` is always ``context.state``; anything else is a folder on
every node.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import tempfile
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import torch

from .config import REPLICA_STORE_AUTO, REPLICA_STORE_CONTEXT

__all__ = [
    "HEADER_BYTES",
    "REPLICA_STORE_ENV",
    "RUN_FOLDER_PREFIX",
    "ReplicaStore",
    "make_run_folder",
    "replica_store_for",
    "replica_store_from_env",
]

#: A folder on the node: ClientApps keep the node's replica and momentum there (unset or empty: in context.state).
REPLICA_STORE_ENV = "DSPARSE_REPLICA_STORE"
#: What a simulation's run folder is called: the prefix, then the ServerApp's process id.
RUN_FOLDER_PREFIX = "dsparse-replicas-"
#: The header's fixed size: the token and where the layout (names, dtypes, shapes, offsets) lies.
HEADER_BYTES = 4096


def replica_store_from_env(env: Mapping[str, str] | None = None) -> ReplicaStore | None:
    """The store in ``$DSPARSE_REPLICA_STORE``, or ``None`` when it is unset or empty."""
    folder = (os.environ if env is None else env).get(REPLICA_STORE_ENV, "")
    return ReplicaStore(Path(folder)) if folder else None


def make_run_folder(root: str | Path | None = None) -> Path:
    """A new folder for one simulation's store, named after this process (in the temp folder).

    The ServerApp removes it at the run's end; one that was killed first cannot, so the
    folders of processes that are gone are removed here (a live process's never are).
    """
    root = Path(root) if root is not None else Path(tempfile.gettempdir())
    for folder in root.glob(f"{RUN_FOLDER_PREFIX}*"):
        owner = folder.name[len(RUN_FOLDER_PREFIX) :].split("-", 1)[0]
        if owner.isdigit() and not _process_alive(int(owner)):
            shutil.rmtree(folder, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f"{RUN_FOLDER_PREFIX}{os.getpid()}-", dir=root))


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process: alive
    return True


def replica_store_for(setting: str, env: Mapping[str, str] | None = None) -> ReplicaStore | None:
    """The store the job's ``replica-store`` value names on this node (``None``: ``context.state``).

    ``"context"``: none. ``"auto"``: ``$DSPARSE_REPLICA_STORE`` when set (where it is not, the
    ServerApp of a simulation has replaced ``"auto"`` with its run folder). Anything else: that
    folder.
    """
    if setting == REPLICA_STORE_CONTEXT:
        return None
    if setting and setting != REPLICA_STORE_AUTO:
        return ReplicaStore(Path(setting))
    return replica_store_from_env(env)


@dataclass(frozen=True)
class ReplicaStore:
    """One file per (run, node) in ``folder``: the token, the replica and the momentum buffers."""

    folder: Path

    def path(self, run_id: int, node_id: int) -> Path:
        return self.folder / f"run{run_id}-node{node_id}.replica"

    def save(
        self,
        run_id: int,
        node_id: int,
        token: str,
        replica: Mapping[str, torch.Tensor],
        momentum: Mapping[str, torch.Tensor],
        *,
        changed: Collection[str] | None = None,
    ) -> None:
        """Write the node's state under ``token`` over its previous entry (see the module docstring).

        ``changed``: the replica tensors that differ from the last entry this process wrote
        or read there (``None``: any may). While that entry is still the file's (its token in the header)
        and the names, dtypes and shapes are the same, only those tensors and the momentum are
        rewritten in place, under the same blank-token protocol as a whole write; otherwise the
        whole entry is. A live node changes only what it received and what it trained.
        """
        path = self.path(run_id, node_id)
        signature = _signature(replica, momentum)
        last = _SEEN.pop(path, None)
        self.folder.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            header = _read_header(os.pread(descriptor, HEADER_BYTES, 0))
            if changed is not None and last is not None and last.signature == signature and header == last.header:
                _rewrite(descriptor, last, replica, momentum, changed, token)
                _SEEN[path] = _Seen(signature, {**last.header, "token": token}, last.offsets)
            else:
                written = _write_whole(descriptor, replica, momentum, token)
                _SEEN[path] = _Seen(signature, *written)
        finally:
            os.close(descriptor)

    def load(
        self, run_id: int, node_id: int, token: str | None
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]] | None:
        """The node's (replica, momentum) written under ``token``; ``None`` if there is no such entry."""
        return self._read(run_id, node_id, token, into=None)

    def load_into(
        self, run_id: int, node_id: int, token: str | None, replica: Mapping[str, torch.Tensor]
    ) -> dict[str, torch.Tensor] | None:
        """Read the entry under ``token`` straight into ``replica``'s tensors; return its momentum.

        For a node whose model is alive in this process but stale (another process trained
        the node since): its tensors are refreshed in place, with no new tensors and no
        ``load_state_dict``. ``None``, with ``replica`` untouched, where the entry does not
        fit it (other names, dtypes or shapes; a tensor that is not contiguous on the CPU)
        or there is no such entry. ``None`` after reading, where the entry was rewritten
        meanwhile: ``replica`` then holds a mix, and the caller must drop it.
        """
        got = self._read(run_id, node_id, token, into=replica)
        return None if got is None else got[1]

    def _read(
        self, run_id: int, node_id: int, token: str | None, *, into: Mapping[str, torch.Tensor] | None
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]] | None:
        """Read the entry under ``token``: its replica into ``into``'s tensors where given, else into new ones."""
        if token is None:
            return None
        path = self.path(run_id, node_id)
        try:
            descriptor = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            header = _read_header(os.pread(descriptor, HEADER_BYTES, 0))
            if header is None or header.get("token") != token:
                return None
            try:
                at, length = header["layout"]
                layout = json.loads(os.pread(descriptor, length, at))
                targets = _targets(layout, into)
            except (KeyError, TypeError, ValueError):
                return None  # not an entry this code wrote: as no entry, the server resends
            if targets is None or not _read_all(descriptor, targets):
                return None
            if (_read_header(os.pread(descriptor, HEADER_BYTES, 0)) or {}).get("token") != token:
                return None  # rewritten while it was read
        finally:
            os.close(descriptor)
        out: dict[str, dict[str, torch.Tensor]] = {"replica": {}, "momentum": {}}
        for (record, name, *_), tensor in zip(layout, targets.tensors, strict=True):
            out[record][name] = tensor
        # As after a write: this process knows the file's layout, so its next save of the node
        # (a live node, or a forked --fast ClientApp) rewrites only what changed.
        _SEEN[path] = _Seen(_signature(out["replica"], out["momentum"]), header, targets.offsets)
        return out["replica"], out["momentum"]


#: Buffers per ``pwritev`` call (Linux's IOV_MAX is 1024).
_MAX_BUFFERS = 1000


@dataclass(frozen=True)
class _Seen:
    """The entry this process last wrote to or read from a file: enough to rewrite only part of it."""

    signature: tuple  # (record, name, dtype, shape) of every tensor, in file order
    header: dict  # the header it left or found (the token and where the layout lies)
    offsets: dict[tuple[str, str], int]  # (record, name) -> where the tensor's bytes start


#: Per entry file, the entry this process last wrote or read there (its next save may rewrite part of it).
_SEEN: dict[Path, _Seen] = {}

#: Where a new tensor's bytes start in the buffer a read allocates (as a fused record aligns them).
_ALIGN = 64


def _signature(replica: Mapping[str, torch.Tensor], momentum: Mapping[str, torch.Tensor]) -> tuple:
    """(record, name, dtype, shape) of every tensor of an entry, in file order."""
    return tuple(
        (record, name, tensor.dtype, tuple(tensor.shape))
        for record, tensors in (("replica", replica), ("momentum", momentum))
        for name, tensor in tensors.items()
    )


@dataclass(frozen=True)
class _Targets:
    """Where a read puts an entry's tensors, in file order."""

    tensors: list[torch.Tensor]  # one per layout entry: a given tensor or a new one
    buffers: list  # their writable bytes, which the read fills
    offsets: dict[tuple[str, str], int]  # (record, name) -> where the tensor's bytes start in the file


def _targets(layout: list, into: Mapping[str, torch.Tensor] | None) -> _Targets | None:
    """The tensors to read ``layout`` into: ``into``'s for the replica where given, new ones otherwise.

    ``None`` where ``into`` does not fit the entry's replica (names, dtype, shape, contiguous
    CPU memory), checked before anything is read. Raises ``ValueError`` (or ``TypeError``,
    ``KeyError``) for a layout this code did not write.
    """
    if into is not None:
        names = [entry[1] for entry in layout if entry[0] == "replica"]
        if len(names) != len(into) or not into.keys() >= set(names):
            return None
    fresh = [entry for entry in layout if into is None or entry[0] != "replica"]
    scratch = np.empty(sum(-(-int(entry[5]) // _ALIGN) * _ALIGN for entry in fresh) + _ALIGN, np.uint8)
    start = -scratch.ctypes.data % _ALIGN  # the first new tensor starts on an aligned address too
    tensors, buffers, offsets, position = [], [], {}, HEADER_BYTES
    for record, name, dtype, shape, offset, nbytes in layout:
        if offset != position or record not in ("replica", "momentum"):
            raise ValueError(f"replica store layout entry {name!r} is not where the one before it ends")
        dtype = np.dtype(dtype)
        if into is not None and record == "replica":
            tensor = into[name]
            if (
                tensor.device.type != "cpu"
                or not tensor.is_contiguous()
                or _numpy_dtype(tensor.dtype) != dtype
                or tuple(tensor.shape) != tuple(shape)
            ):
                return None
            # The tensor's own memory, with no tensor object made for it (``detach().numpy()``
            # per tensor was 40% of refreshing a MobileNetV2 replica).
            buffer = (ctypes.c_char * nbytes).from_address(tensor.data_ptr()) if nbytes else bytearray()
        else:
            view = scratch[start : start + nbytes]
            start += -(-nbytes // _ALIGN) * _ALIGN
            tensor = torch.from_numpy(view.view(dtype).reshape(shape))
            buffer = view
        tensors.append(tensor)
        buffers.append(buffer)
        offsets[(record, name)] = offset
        position += nbytes
    return _Targets(tensors, buffers, offsets)


@cache
def _numpy_dtype(dtype: torch.dtype) -> np.dtype:
    return torch.empty(0, dtype=dtype).numpy().dtype


def _read_all(descriptor: int, targets: _Targets) -> bool:
    """Fill ``targets``' buffers from the entry's tensor bytes; ``False`` if the file ends first."""
    position = HEADER_BYTES
    for first in range(0, len(targets.buffers), _MAX_BUFFERS):  # the kernel takes at most IOV_MAX per call
        chunk = targets.buffers[first : first + _MAX_BUFFERS]
        wanted = sum(memoryview(buffer).nbytes for buffer in chunk)
        if os.preadv(descriptor, chunk, position) != wanted:
            return False  # cut short (a regular file reads whole up to its end)
        position += wanted
    return True


def _raw(tensor: torch.Tensor) -> tuple[np.ndarray, memoryview | bytes]:
    array = tensor.detach().cpu().contiguous().numpy()
    return array, memoryview(array).cast("B") if array.nbytes else b""


def _write_whole(
    descriptor: int, replica: Mapping[str, torch.Tensor], momentum: Mapping[str, torch.Tensor], token: str
) -> tuple[dict, dict[tuple[str, str], int]]:
    """Write a whole entry; return its header and every tensor's offset."""
    layout, buffers, offsets, offset = [], [], {}, HEADER_BYTES
    for record, tensors in (("replica", replica), ("momentum", momentum)):
        for name, tensor in tensors.items():
            array, raw = _raw(tensor)
            layout.append([record, name, array.dtype.str, list(array.shape), offset, array.nbytes])
            buffers.append(raw)
            offsets[(record, name)] = offset
            offset += array.nbytes
    text = json.dumps(layout, separators=(",", ":")).encode()
    where = {"layout": [offset, len(text)]}
    os.pwrite(descriptor, _header({"token": "", **where}), 0)  # from here no reader takes the old entry
    if os.fstat(descriptor).st_size != offset + len(text):
        os.ftruncate(descriptor, offset + len(text))
    position = HEADER_BYTES
    buffers.append(text)
    for first in range(0, len(buffers), _MAX_BUFFERS):  # the kernel takes at most IOV_MAX per call
        chunk = buffers[first : first + _MAX_BUFFERS]
        position += _write_all(descriptor, chunk, position)
    header = {"token": token, **where}
    os.pwrite(descriptor, _header(header), 0)
    return header, offsets


def _rewrite(
    descriptor: int,
    last: _Seen,
    replica: Mapping[str, torch.Tensor],
    momentum: Mapping[str, torch.Tensor],
    changed: Collection[str],
    token: str,
) -> None:
    """Rewrite the ``changed`` replica tensors and all the momentum of the entry ``last`` describes, in place."""
    os.pwrite(descriptor, _header({**last.header, "token": ""}), 0)  # as a whole write: no reader meanwhile
    parts = [("replica", name, replica[name]) for name in changed if name in replica]
    parts += [("momentum", name, tensor) for name, tensor in momentum.items()]
    for record, name, tensor in parts:
        _, raw = _raw(tensor)
        _write_all(descriptor, [raw], last.offsets[(record, name)])
    os.pwrite(descriptor, _header({**last.header, "token": token}), 0)


def _write_all(descriptor: int, buffers: list, position: int) -> int:
    """``os.pwritev`` of ``buffers`` at ``position`` until every byte is written; returns the bytes."""
    total = sum(len(buffer) for buffer in buffers)
    written = os.pwritev(descriptor, buffers, position)
    if written < total:  # a short write (rare on a local file): write the rest plainly
        rest = b"".join(bytes(buffer) for buffer in buffers)[written:]
        while rest:
            done = os.pwrite(descriptor, rest, position + written)
            written, rest = written + done, rest[done:]
    return total


def _header(fields: dict) -> bytes:
    text = json.dumps(fields).encode()
    if len(text) > HEADER_BYTES:
        raise ValueError(f"replica store header of {len(text)} bytes exceeds {HEADER_BYTES}")
    return text.ljust(HEADER_BYTES, b" ")


def _read_header(raw: bytes) -> dict | None:
    try:
        header = json.loads(raw.decode())
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None  # not an entry of this format (or none yet)
    return header if isinstance(header, dict) and {"token", "layout"} <= header.keys() else None
