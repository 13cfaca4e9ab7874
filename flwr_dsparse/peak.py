"""The peak memory of one training step, for one selection or for every selection at once.

A step's memory is not a sum: autograd frees what each unit saved as the backward passes it,
and gradients appear as it goes, so the peak is the largest of a few moments. With the tuned
allocator (:mod:`flwr_dsparse.allocator`) freed blocks go straight back to the OS, and the
peak a hard cap sees is the largest of

* the **forward** through the frozen prefix (under ``no_grad``): the widest leaf module's
  input and output (``forward ×`` its bytes), and the backward's primitives of the previous
  step, still cached (``cache ×`` the widest input + output of every unit from ``e`` on);
* the **backward at unit** ``j``, for every ``j`` from the earliest trained unit ``e`` on:
  what units ``e..j`` saved (still alive), the gradients of trained units ``≥ j`` (already
  made), and the gradient flowing through ``j``'s widest leaf (``trained ×`` or ``frozen ×``
  its input and output bytes, as ``j`` is trained or passed through);

each plus the optimizer state and the runtime's cold start: what the first forward of a fresh
process allocates (oneDNN primitives with their reordered copies of the weights and their
buffers, which grow with the model's parameters and its widest layer, and the thread pool,
which grows with the intra-op threads). Every moment is a sum
over the selected units, so a moment is a *phase* ``base + Σ increments`` and a selection's
memory is the largest phase: :class:`SelectionMemory` evaluates it for one selection and, for
the planner, for every subset of the units after ``e`` at once. ``margin`` scales the
training part, sized from measurements so that the prediction stays an upper bound.

With glibc's stock allocator freed blocks stay in the heap, the moments pile up, and the
peak is the additive model of :class:`WorkspaceCoefficients` (one phase).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import numpy as np

from .sizes import MB

__all__ = ["PeakCoefficients", "SelectionMemory", "WorkspaceCoefficients", "subset_sums"]


@dataclass(frozen=True)
class PeakCoefficients:
    """The timeline model (tuned allocator): see the module docstring.

    Fitted to cold, hard-capped probes (the cgroup's peak after model and batch are built) of
    24 MobileNetV2 selections at batch 128, at 1 and 2 threads, on 2-core x86-64 Linux, torch
    2.14, lean frozen layers: before the margin, -6.4% to +6.2% of the measured peak, so with
    it every probe is at or below the prediction. The small-unit heap term (no unit of
    MobileNetV2 is small at batch 128) covers batch 32: there 14 MobileNetV2 selections
    measure 4% to 18% below the prediction (without the term: from 13% above it to 13%
    below), and the comparison's plans fit their hard caps (``experiments/memory_bench.py``,
    ``experiments.compare``).
    """

    forward: float = 1.0
    cache: float = 0.1
    trained: float = 0.5
    frozen: float = 1.5
    #: The cold start: MB at one thread, plus ``cold_weights`` × the parameters' bytes, plus
    #: ``cold_widest`` × the widest leaf's input + output, plus MB per further intra-op thread.
    cold_mb: float = 0.5
    cold_weights: float = 0.45
    cold_widest: float = 0.2
    cold_mb_per_thread: float = 0.25
    #: The heap a small step leaves: a unit the backward runs through (from the earliest trained
    #: unit to the output, trained or passed through) whose widest leaf input + output is at
    #: most ``small_unit_mb`` makes blocks under the allocator's mmap threshold (its small
    #: activations, BN and bias gradients, per-channel buffers) that stay in the heap, about
    #: ``small_unit_heap`` × that widest input + output. MobileNetV2 at 32x32: no unit is that
    #: small at batch 128; at batch 32 the last 15 are, and this is what the timeline terms
    #: miss there (3-6 MB, from cold capped probes).
    small_unit_heap: float = 0.85
    small_unit_mb: float = 0.8
    #: Relative margin on the training memory (everything but weights and reserve).
    margin: float = 0.07


@dataclass(frozen=True)
class WorkspaceCoefficients:
    """The additive model (glibc's stock allocator): transient memory beyond weights, grads, state and saved tensors.

    ``forward`` multiplies the largest leaf-module ``input + output`` bytes at the batch (the
    widest point of the forward); ``backward`` multiplies the gradient bytes of the selection;
    ``trained_forward`` multiplies the widest leaf from the earliest trained unit on. Fitted to
    fresh-subprocess peak-RSS probes of MobileNetV2 and TinyNet with plain autograd and the
    stock allocator (2-core x86-64 Linux, torch 2.14, one intra-op thread).
    """

    forward: float = 2.0
    backward: float = 1.5
    trained_forward: float = 0.75
    #: MB any training step adds beyond its tensors (autograd graph, allocator arenas).
    constant_mb: float = 6.0


def subset_sums(weights: np.ndarray) -> np.ndarray:
    """All subset sums; bit ``k`` of an index says whether item ``k`` is in the subset."""
    sums = np.zeros(1)
    for weight in weights:
        sums = np.concatenate([sums, sums + weight])
    return sums


class SelectionMemory:
    """Predicted memory (MB) of every selection of ``n`` units at one batch size, as phases.

    Parameters
    ----------
    first, trained, frozen : np.ndarray
        Per unit, bytes saved for backward when it is the earliest trained unit, a later
        trained unit, or passed through.
    grads : np.ndarray
        Per unit, parameter bytes (its gradients when trained).
    widest : np.ndarray
        Per unit, the largest ``input + output`` bytes of any of its leaf modules.
    fixed_bytes : float
        Weights and reserve (outside the margin).
    state_factor : float
        Optimizer state per trained parameter byte.
    coefficients : PeakCoefficients | WorkspaceCoefficients
        The timeline model or the stock allocator's additive one.
    threads : int
        The intra-op threads the step runs with.
    """

    def __init__(
        self,
        first: np.ndarray,
        trained: np.ndarray,
        frozen: np.ndarray,
        grads: np.ndarray,
        widest: np.ndarray,
        fixed_bytes: float,
        state_factor: float,
        coefficients: PeakCoefficients | WorkspaceCoefficients,
        threads: int = 1,
    ) -> None:
        self.first, self.trained, self.frozen = first / MB, trained / MB, frozen / MB
        self.grads, self.widest = grads / MB, widest / MB
        self.fixed = fixed_bytes / MB
        self.state_factor = state_factor
        self.coefficients = coefficients
        self.threads = threads
        self.count = len(first)
        self._subsets = cache(self._all_subsets)

    @property
    def inference_mb(self) -> float:
        """Memory of training nothing: weights, reserve and a no_grad forward."""
        c = self.coefficients
        if isinstance(c, WorkspaceCoefficients):
            return self.fixed + c.forward * self.widest.max()
        return self.fixed + (1 + c.margin) * (self._cold() + c.forward * self.widest.max())

    def _cold(self) -> float:
        c = self.coefficients
        threads = c.cold_mb_per_thread * max(0, self.threads - 1)
        return c.cold_mb + c.cold_weights * self.grads.sum() + c.cold_widest * self.widest.max() + threads

    def _small_unit_heap(self, e: int) -> float:
        """The heap the backward leaves in the small units from ``e`` on (see :class:`PeakCoefficients`)."""
        c = self.coefficients
        widest = self.widest[e:]
        return c.small_unit_heap * float(widest[widest <= c.small_unit_mb].sum())

    def phases(self, e: int) -> tuple[np.ndarray, np.ndarray]:
        """``(bases, increments)`` for earliest unit ``e``: phase ``p`` of a selection costs
        ``bases[p] + Σ increments[p, k]`` over the later units ``e + 1 + k`` it selects (MB)."""
        later = np.arange(e + 1, self.count)
        c = self.coefficients
        state = self.state_factor
        g, t, f, w = self.grads, self.trained, self.frozen, self.widest
        if isinstance(c, WorkspaceCoefficients):  # one phase: everything at once
            per_param = 1.0 + state + c.backward
            base = (
                self.fixed
                + c.forward * w.max()
                + self.first[e]
                + f[later].sum()
                + per_param * g[e]
                + c.trained_forward * w[e:].max()
                + c.constant_mb
            )
            return np.array([base]), (per_param * g[later] + t[later] - f[later])[None, :]
        scale = 1.0 + c.margin
        start = self._cold() + self._small_unit_heap(e)  # in every moment of a step that trains from e
        rows, bases = [], []
        if e > 0:  # the no_grad forward through the prefix
            bases.append(start + c.forward * w[:e].max() + c.cache * w[e:].sum() + state * g[e])
            rows.append(state * g[later])
        for j in range(e, self.count):  # the backward at unit j
            upto, after = later <= j, later >= j
            bases.append(
                start
                + self.first[e]
                + f[later[upto]].sum()
                + (1 + state) * g[e] * (j == e)
                + state * g[e] * (j > e)
                + (c.trained if j == e else c.frozen) * w[j]
            )
            increment = (t[later] - f[later]) * upto + g[later] * after + state * g[later]
            increment = increment + (c.trained - c.frozen) * w[j] * (later == j)
            rows.append(increment)
        return self.fixed + scale * np.array(bases), scale * np.array(rows).reshape(len(bases), len(later))

    def of(self, indices: list[int]) -> float:
        """Memory (MB) of the selection of unit ``indices`` (sorted, non-empty)."""
        e = indices[0]
        bases, increments = self.phases(e)
        chosen = np.isin(np.arange(e + 1, self.count), indices[1:])
        return float((bases + increments[:, chosen].sum(axis=1)).max())

    def lower_bound(self, e: int) -> float:
        """A bound at or below the memory of every selection whose earliest unit is ``e``."""
        bases, increments = self.phases(e)
        return float((bases + np.minimum(increments, 0).sum(axis=1)).max())

    def subsets(self, e: int) -> np.ndarray:
        """Memory of every subset of the units after ``e`` (bit ``k``: unit ``e + 1 + k``), cached."""
        return self._subsets(e)

    def _all_subsets(self, e: int) -> np.ndarray:
        bases, increments = self.phases(e)
        memory = bases[0] + subset_sums(increments[0])
        for base, increment in zip(bases[1:], increments[1:], strict=True):
            np.maximum(memory, base + subset_sums(increment), out=memory)
        return memory

    def cheapest(self) -> tuple[float, int]:
        """Memory of the cheapest non-empty selection, and its earliest unit."""
        best, first = np.inf, 0
        for e in range(self.count):
            if self.lower_bound(e) < best:
                low = float(self.subsets(e).min())
                if low < best:
                    best, first = low, e
        return best, first
