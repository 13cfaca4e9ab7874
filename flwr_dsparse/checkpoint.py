"""Round checkpoints: written atomically, verified before use.

A checkpoint is one file::

    DSPARSE-CHECKPOINT 1\\n
    <sha256 of the payload, 64 hex digits>\\n
    <payload: torch.save of a dict of tensors, numbers, strings, lists and dicts>

:func:`save_checkpoint` writes it to a temporary file in the same folder, fsyncs the
file, renames it over the old one and fsyncs the folder, so a crash at any moment leaves
either the previous complete checkpoint or the new complete one, never a mix.
:func:`load_checkpoint` refuses a file with another header, a wrong digest (a truncated
or corrupt file) or a payload that does not decode, naming the path and what to do; the
payload is read with ``weights_only=True``, so a crafted file cannot run code.

No ``flwr`` import: the strategy decides what goes into the state.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = ["CheckpointError", "save_checkpoint", "load_checkpoint", "MAGIC"]

MAGIC = b"DSPARSE-CHECKPOINT 1\n"
_DIGEST_LEN = 64


class CheckpointError(ValueError):
    """A checkpoint that must not be resumed from (missing, truncated, corrupt, or of another job)."""


def save_checkpoint(path: str | Path, state: Mapping[str, Any]) -> Path:
    """Write ``state`` to ``path`` atomically (temp file, fsync, rename, fsync of the folder)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(dict(state), buffer)
    payload = buffer.getvalue()
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(temporary, "wb") as handle:
        handle.write(MAGIC)
        handle.write(hashlib.sha256(payload).hexdigest().encode() + b"\n")
        handle.write(payload)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    # The rename is durable only once the folder entry is on disk.
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read and verify a checkpoint written by :func:`save_checkpoint`.

    Raises
    ------
    CheckpointError
        The file is missing, has another header, is truncated or corrupt (digest
        mismatch), or its payload does not decode. The message names the path.
    """
    path = Path(path)
    fix = f"delete {path} to start from round 1, or restore a good copy of it"
    if not path.is_file():
        raise CheckpointError(
            f"resume=true but there is no checkpoint at {path}; run once without resume (checkpoint=true "
            "writes it at every round's end) or point out-dir at the run to resume"
        )
    data = path.read_bytes()
    if not data.startswith(MAGIC):
        raise CheckpointError(f"{path} is not a DSparse checkpoint (its header is {data[: len(MAGIC)]!r}); {fix}")
    header_end = len(MAGIC) + _DIGEST_LEN + 1
    digest, payload = data[len(MAGIC) : header_end - 1], data[header_end:]
    if len(data) < header_end or hashlib.sha256(payload).hexdigest().encode() != digest:
        raise CheckpointError(
            f"checkpoint {path} is truncated or corrupt ({len(data)} bytes; its sha256 does not match the header); "
            f"refusing to resume from it: {fix}"
        )
    try:
        state = torch.load(io.BytesIO(payload), weights_only=True)
    except Exception as error:  # a digest-valid payload that does not decode: another torch, or a bug
        raise CheckpointError(f"checkpoint {path} does not decode ({error!r}); {fix}") from error
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(state).__name__}, not a state dict; {fix}")
    return state
