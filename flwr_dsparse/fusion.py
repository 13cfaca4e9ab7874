"""Gradient fusion: a group's tensors packed into one flat buffer, and split back.

DSparse fuses the tensors that the same devices update into one exchange. Both transports do
it the same way: the server's grouped mean packs each reply in float64, where every float32
value and every integer count is exact, and the collective packs in float32, gloo's wire
type. One buffer means one message per group, not one per tensor.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["fuse", "split_like"]


def fuse(tensors: Sequence[torch.Tensor], dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """Every tensor, flattened in order into one contiguous ``dtype`` buffer.

    Each run of tensors that already lie back to back in one storage (the views of a fused
    wire record, :func:`flwr_dsparse.records.fuse_record`) is copied into its slice in one
    ``copy_`` (which casts), any other tensor on its own, so nothing is concatenated on the
    way and a fused reply costs one copy per run instead of one per tensor. Pass ``out`` (a
    buffer of the total size) to reuse one across calls.
    """
    sizes = [tensor.numel() for tensor in tensors]
    flat = torch.empty(sum(sizes), dtype=dtype) if out is None else out
    if flat.numel() != sum(sizes) or flat.dtype != dtype:
        raise ValueError(f"out holds {flat.numel()} {flat.dtype} values; the tensors need {sum(sizes)} {dtype}")
    with torch.no_grad():
        start = 0
        for first, count in _storage_runs(tensors):
            flat.narrow(0, start, count).copy_(_span(first, count))
            start += count
    return flat


def _storage_runs(tensors: Sequence[torch.Tensor]) -> list[tuple[torch.Tensor, int]]:
    """``(first tensor, elements)`` of each maximal run of tensors that continue one another in one storage."""
    runs: list[tuple[torch.Tensor, int]] = []
    end: tuple[int, int, torch.dtype] | None = None  # (storage, offset) just past the current run, and its dtype
    for tensor in tensors:
        tensor = tensor.detach()
        if tensor.is_contiguous() and tensor.numel() > 0:
            here = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tensor.dtype)
            if here == end:
                runs[-1] = (runs[-1][0], runs[-1][1] + tensor.numel())
            else:
                runs.append((tensor, tensor.numel()))
            end = (here[0], here[1] + tensor.numel(), tensor.dtype)
        else:
            runs.append((tensor, tensor.numel()))
            end = None
    return runs


def _span(first: torch.Tensor, count: int) -> torch.Tensor:
    """The ``count`` elements of ``first``'s storage from ``first`` on, flat (``first`` itself when it has them all)."""
    if count == first.numel():
        return first.reshape(-1)
    return first.as_strided((count,), (1,), first.storage_offset())


def split_like(flat: torch.Tensor, likes: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Views of ``flat`` shaped like each of ``likes`` in order (the inverse of :func:`fuse`)."""
    sizes = [like.numel() for like in likes]
    if flat.numel() != sum(sizes):
        raise ValueError(f"the buffer holds {flat.numel()} values; the tensors need {sum(sizes)}")
    return [piece.view(like.shape) for piece, like in zip(flat.split(sizes), likes, strict=True)]
