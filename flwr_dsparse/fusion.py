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

    Each tensor is copied straight into its slice (``copy_`` casts), so nothing is
    concatenated on the way. Pass ``out`` (a buffer of the total size) to reuse one
    across calls.
    """
    sizes = [tensor.numel() for tensor in tensors]
    flat = torch.empty(sum(sizes), dtype=dtype) if out is None else out
    if flat.numel() != sum(sizes) or flat.dtype != dtype:
        raise ValueError(f"out holds {flat.numel()} {flat.dtype} values; the tensors need {sum(sizes)} {dtype}")
    with torch.no_grad():
        for piece, tensor in zip(flat.split(sizes), tensors, strict=True):
            piece.copy_(tensor.detach().reshape(-1))
    return flat


def split_like(flat: torch.Tensor, likes: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Views of ``flat`` shaped like each of ``likes`` in order (the inverse of :func:`fuse`)."""
    sizes = [like.numel() for like in likes]
    if flat.numel() != sum(sizes):
        raise ValueError(f"the buffer holds {flat.numel()} values; the tensors need {sum(sizes)}")
    return [piece.view(like.shape) for piece, like in zip(flat.split(sizes), likes, strict=True)]
