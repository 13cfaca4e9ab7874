"""The memory and step-time cost model of a selection.

A selection's predicted training memory is made of

* **weights**: every parameter and buffer (always resident);
* **grads**: one gradient per selected parameter;
* **optimizer**: state of the selected parameters (SGD momentum: 1×, Adam: 2×);
* **activations**: what autograd saves for backward, *measured* with
  ``saved_tensors_hooks`` over forwards with the selection applied, at two
  small batches, and extrapolated linearly to the real batch;
* **workspace**: the rest of the step's peak: the runtime's cold start, transient
  forward/backward buffers, less what backward has already freed at the peak
  (:mod:`flwr_dsparse.peak`: the step's timeline for the tuned allocator, an additive
  model for glibc's stock one);
* **reserve**: a fixed amount the user sets for the runtime itself.

Why per-unit attribution is enough: once the earliest trained unit ``e`` is
fixed, every later unit saves either its "trained" or its "frozen pass-through"
tensors (with lean frozen layers, :mod:`flwr_dsparse.lean`, only what the input
gradient needs; with ``lean_frozen=False``, what plain autograd keeps),
and units before ``e`` save nothing (they run under ``no_grad``). So the
activations of any selection are ``first[e] + Σ_{j>e} (trained[j] if j selected
else frozen[j])``: three forwards per unit position give every selection.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .allocator import ALLOCATORS
from .memory import SavedTensorMeter, saved_tensors
from .peak import PeakCoefficients, SelectionMemory, WorkspaceCoefficients
from .plan import MemoryEstimate
from .sizes import MB
from .timing import time_units
from .trainer import SparseTrainer
from .units import Unit, model_units, validate_unit_names

__all__ = ["ALLOCATORS", "UnitCost", "PeakCoefficients", "WorkspaceCoefficients", "CostModel", "OPTIMIZER_STATE_FACTOR"]

#: Optimizer state per selected parameter, in multiples of the parameter's size.
OPTIMIZER_STATE_FACTOR = {("sgd", False): 0.0, ("sgd", True): 1.0, ("adam", False): 2.0, ("adam", True): 2.0}

ProgressFn = Callable[[str], None]


@dataclass(frozen=True)
class UnitCost:
    """Costs of one unit. Activations (bytes) and times (seconds) are lines ``intercept + slope × batch``."""

    unit: Unit
    param_bytes: int
    buffer_bytes: int
    act_trained: tuple[float, float]
    act_frozen: tuple[float, float]
    act_first: tuple[float, float]
    max_leaf_bytes_per_sample: float
    forward_s: tuple[float, float] = (0.0, 0.0)
    backward_trained_s: tuple[float, float] = (0.0, 0.0)
    backward_frozen_s: tuple[float, float] = (0.0, 0.0)
    forward_inference_s: tuple[float, float] = (0.0, 0.0)

    @staticmethod
    def at(line: tuple[float, float], batch_size: int) -> float:
        return max(0.0, line[0] + line[1] * batch_size)


def _fit_line(small: tuple[int, float], large: tuple[int, float]) -> tuple[float, float]:
    (b1, y1), (b2, y2) = small, large
    slope = (y2 - y1) / (b2 - b1)
    return (y1 - slope * b1, slope)


class CostModel:
    """Predict memory and step time of any selection of a model's units.

    Parameters
    ----------
    model : nn.Module
        The model. It is deep-copied for profiling and never modified.
    input_shape : Sequence[int]
        Shape of one input sample, e.g. ``(3, 32, 32)``.
    units : Sequence[str] | None
        Explicit unit names; default :func:`~flwr_dsparse.units.model_units`.
    optimizer : str
        ``"sgd"`` or ``"adam"``.
    momentum : float
        SGD momentum; any value > 0 adds one state tensor per parameter.
    reserve_mb : float
        Fixed runtime reserve added to every prediction.
    workspace : PeakCoefficients | WorkspaceCoefficients | None
        The peak model's coefficients (:mod:`flwr_dsparse.peak`); default: the timeline
        model for ``allocator="tuned"``, the additive one for ``"stock"``.
    num_classes : int
        Number of classes of the targets used for profiling.
    calibration_batches : tuple[int, int]
        The two batch sizes the activation lines are measured at.
    time_batches : tuple[int, int] | None
        The two batch sizes step time is measured at; ``None`` skips timing
        (all predicted times are then 0).
    progress : callable, optional
        Called with a line of text as profiling advances.
    lean_frozen : bool
        Profile with the trainer's lean frozen layers (its default); must match the
        ``lean_frozen`` of the :class:`~flwr_dsparse.trainer.SparseTrainer` that trains.
    allocator : str
        ``"tuned"`` (the default: every training process runs with
        :mod:`flwr_dsparse.allocator`) or ``"stock"`` (glibc as is).
    threads : int
        The intra-op threads the node trains with (the cold start grows with them).
    """

    def __init__(
        self,
        model: nn.Module,
        input_shape: Sequence[int] = (3, 32, 32),
        *,
        units: Sequence[str] | None = None,
        optimizer: str = "sgd",
        momentum: float = 0.0,
        reserve_mb: float = 0.0,
        workspace: PeakCoefficients | WorkspaceCoefficients | None = None,
        num_classes: int = 10,
        calibration_batches: tuple[int, int] = (4, 8),
        time_batches: tuple[int, int] | None = (8, 32),
        progress: ProgressFn | None = None,
        lean_frozen: bool = True,
        allocator: str = "tuned",
        threads: int = 1,
    ) -> None:
        key = (optimizer.lower(), momentum > 0)
        if key not in OPTIMIZER_STATE_FACTOR:
            raise ValueError(f"unknown optimizer {optimizer!r}; use 'sgd' or 'adam'")
        if reserve_mb < 0:
            raise ValueError(f"reserve_mb must be >= 0, got {reserve_mb}")
        if allocator not in ALLOCATORS:
            raise ValueError(f"allocator {allocator!r} is unknown; use 'tuned' or 'stock'")
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ValueError(f"threads must be a positive integer, got {threads!r}")
        if len(input_shape) == 0 or any(int(d) <= 0 for d in input_shape):
            raise ValueError(f"input shape {tuple(input_shape)} must be positive, e.g. 3x32x32")
        self.model = copy.deepcopy(model)
        self.input_shape = tuple(int(d) for d in input_shape)
        self.units = model_units(self.model, units)
        self.optimizer = optimizer.lower()
        self.momentum = momentum
        self.state_factor = OPTIMIZER_STATE_FACTOR[key]
        self.reserve_mb = reserve_mb
        self.allocator = allocator
        self.threads = threads
        if workspace is None:
            workspace = PeakCoefficients() if allocator == "tuned" else WorkspaceCoefficients()
        self.workspace = workspace
        self._memory: dict[int, SelectionMemory] = {}
        self.num_classes = num_classes
        self.calibration_batches = calibration_batches
        self.time_batches = time_batches
        self.progress = progress or (lambda line: None)
        self.lean_frozen = lean_frozen
        self._unit_costs: list[UnitCost] | None = None
        self._weights_bytes = sum(p.numel() * p.element_size() for p in self.model.parameters()) + sum(
            b.numel() * b.element_size() for b in self.model.buffers()
        )

    # -- profiling ------------------------------------------------------------------------------
    @property
    def unit_names(self) -> list[str]:
        return [u.name for u in self.units]

    @property
    def unit_costs(self) -> list[UnitCost]:
        if self._unit_costs is None:
            self._unit_costs = self._profile()
        return self._unit_costs

    def tensor_bytes(self) -> dict[str, int]:
        """Bytes of every parameter and buffer, by name (what an exchange moves)."""
        sizes = {n: p.numel() * p.element_size() for n, p in self.model.named_parameters()}
        sizes.update({n: b.numel() * b.element_size() for n, b in self.model.named_buffers()})
        return sizes

    def _batch(self, batch_size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        generator = torch.Generator().manual_seed(seed)
        inputs = torch.randn(batch_size, *self.input_shape, generator=generator)
        targets = torch.randint(0, self.num_classes, (batch_size,), generator=generator)
        return inputs, targets

    def _saved_by_unit(self, selection: Sequence[str], batch_size: int) -> dict[str, float]:
        """Bytes autograd saves during one forward with ``selection`` applied, per unit."""
        trainer = SparseTrainer(self.model, selection, units=self.units, lean_frozen=self.lean_frozen)
        trainer.train_mode()
        meter = SavedTensorMeter.for_tensors(list(self.model.parameters()) + list(self.model.buffers()))
        modules = dict(self.model.named_modules())
        hooks = []
        for unit in self.units:

            def mark(module: nn.Module, args: tuple, name: str = unit.name) -> None:
                meter.owner = name  # saved tensors are charged to the unit that runs now

            hooks.append(modules[unit.name].register_forward_pre_hook(mark))
        inputs, targets = self._batch(batch_size)
        # BatchNorm running stats of trained units would drift during profiling; keep them.
        state = {k: v.clone() for k, v in self.model.state_dict().items()}
        try:
            with saved_tensors(meter):
                loss = trainer.loss_fn(self.model(inputs), targets)
            del loss
        finally:
            for hook in hooks:
                hook.remove()
            trainer.close()
            self.model.load_state_dict(state)
        return {u.name: float(meter.bytes_by_owner.get(u.name, 0)) for u in self.units}

    def _max_leaf_bytes(self, batch_size: int) -> dict[str, float]:
        """Per unit, the largest ``input + output`` bytes of any leaf module inside it."""
        modules = dict(self.model.named_modules())
        widest: dict[str, float] = {u.name: 0.0 for u in self.units}
        hooks = []
        for unit in self.units:
            for leaf in modules[unit.name].modules():
                if any(True for _ in leaf.children()):
                    continue

                def measure(module: nn.Module, args: tuple, output: object, name: str = unit.name) -> None:
                    size = sum(a.numel() * a.element_size() for a in args if isinstance(a, torch.Tensor))
                    if isinstance(output, torch.Tensor):
                        size += output.numel() * output.element_size()
                    widest[name] = max(widest[name], float(size))

                hooks.append(leaf.register_forward_hook(measure))
        self.model.eval()
        try:
            with torch.no_grad():
                self.model(self._batch(batch_size)[0])
        finally:
            for hook in hooks:
                hook.remove()
        return {name: size / batch_size for name, size in widest.items()}

    def _profile(self) -> list[UnitCost]:
        names = self.unit_names
        small, large = self.calibration_batches
        measured: dict[str, dict[int, dict[str, float]]] = {"trained": {}, "frozen": {}}
        first: dict[str, dict[int, float]] = {name: {} for name in names}
        for batch in (small, large):
            self.progress(f"profiling activations at batch {batch}: full update")
            measured["trained"][batch] = self._saved_by_unit(names, batch)
            measured["frozen"][batch] = self._saved_by_unit(names[:1], batch)
            for index, name in enumerate(names):
                self.progress(f"profiling activations at batch {batch}: unit {index + 1}/{len(names)} {name}")
                first[name][batch] = self._saved_by_unit([name], batch)[name]
        widest = self._max_leaf_bytes(large)
        timing = None
        if self.time_batches:
            self.progress("timing forward and backward per unit")
            (t1, at_small), (t2, at_large) = [(b, self._time_profile(b)) for b in self.time_batches]
            timing = [
                [_fit_line((t1, small), (t2, large)) for small, large in zip(at_small[k], at_large[k], strict=True)]
                for k in range(4)
            ]
        sizes = self.tensor_bytes()
        costs = []
        for index, unit in enumerate(self.units):
            name = unit.name
            costs.append(
                UnitCost(
                    unit=unit,
                    param_bytes=sum(sizes[p] for p in unit.param_names),
                    buffer_bytes=sum(sizes[b] for b in unit.buffer_names),
                    act_trained=_fit_line(
                        (small, measured["trained"][small][name]), (large, measured["trained"][large][name])
                    ),
                    act_frozen=_fit_line(
                        (small, measured["frozen"][small][name]), (large, measured["frozen"][large][name])
                    ),
                    act_first=_fit_line((small, first[name][small]), (large, first[name][large])),
                    max_leaf_bytes_per_sample=widest[name],
                    forward_s=timing[0][index] if timing else (0.0, 0.0),
                    backward_trained_s=timing[1][index] if timing else (0.0, 0.0),
                    backward_frozen_s=timing[2][index] if timing else (0.0, 0.0),
                    forward_inference_s=timing[3][index] if timing else (0.0, 0.0),
                )
            )
        return costs

    def _time_profile(self, batch: int) -> tuple[list[float], ...]:
        inputs, targets = self._batch(batch, seed=1)
        return time_units(self.model, self.units, inputs, targets, lean_frozen=self.lean_frozen)

    # -- prediction -----------------------------------------------------------------------------
    def _indices(self, selection: Sequence[str]) -> list[int]:
        validate_unit_names(list(selection), self.unit_names)
        chosen = set(selection)
        return [i for i, name in enumerate(self.unit_names) if name in chosen]

    def memory_terms(self, batch_size: int) -> SelectionMemory:
        """Every selection's memory at ``batch_size`` (:class:`~flwr_dsparse.peak.SelectionMemory`), for the planner."""
        if batch_size <= 0:
            raise ValueError(f"batch size must be > 0, got {batch_size}")
        if batch_size not in self._memory:
            costs = self.unit_costs
            at = UnitCost.at
            self._memory[batch_size] = SelectionMemory(
                first=np.array([at(c.act_first, batch_size) for c in costs]),
                trained=np.array([at(c.act_trained, batch_size) for c in costs]),
                frozen=np.array([at(c.act_frozen, batch_size) for c in costs]),
                grads=np.array([float(c.param_bytes) for c in costs]),
                widest=np.array([c.max_leaf_bytes_per_sample * batch_size for c in costs]),
                fixed_bytes=self._weights_bytes + self.reserve_mb * MB,
                state_factor=self.state_factor,
                coefficients=self.workspace,
                threads=self.threads,
            )
        return self._memory[batch_size]

    def predict(self, selection: Sequence[str], batch_size: int) -> MemoryEstimate:
        """Predicted training memory of ``selection`` at ``batch_size``, by part (MB)."""
        memory = self.memory_terms(batch_size)
        indices = self._indices(selection)
        costs = self.unit_costs
        at = UnitCost.at
        grads = sum(costs[i].param_bytes for i in indices) / MB
        if not indices:
            activations, total = 0.0, memory.inference_mb
        else:
            e = indices[0]
            chosen = set(indices)
            activations = (
                at(costs[e].act_first, batch_size)
                + sum(
                    at(costs[j].act_trained if j in chosen else costs[j].act_frozen, batch_size)
                    for j in range(e + 1, len(costs))
                )
            ) / MB
            total = memory.of(indices)
        weights = self._weights_bytes / MB
        optimizer = self.state_factor * grads
        return MemoryEstimate(
            weights=weights,
            grads=grads,
            optimizer=optimizer,
            activations=activations,
            workspace=total - weights - self.reserve_mb - grads - optimizer - activations,
            reserve=self.reserve_mb,
        )

    def step_time_terms(self, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        """The additive structure of :meth:`step_time`, in seconds, for the planner.

        Returns ``(base, increments)``: a selection whose earliest unit is ``e`` takes
        ``base[e] + Σ_{j in selection, j>e} increments[j]`` seconds per step. ``base[e]``
        is the forward (no_grad before ``e``), the trained backward of ``e`` and the
        pass-through backward of every later unit; ``increments[j]`` is what training unit
        ``j`` adds to passing through it.
        """
        if batch_size <= 0:
            raise ValueError(f"batch size must be > 0, got {batch_size}")
        costs = self.unit_costs
        at = UnitCost.at
        n = len(costs)
        inference = np.array([at(c.forward_inference_s, batch_size) for c in costs])
        forward = np.array([at(c.forward_s, batch_size) for c in costs])
        trained = np.array([at(c.backward_trained_s, batch_size) for c in costs])
        frozen = np.array([at(c.backward_frozen_s, batch_size) for c in costs])
        base = np.array(
            [inference[:e].sum() + forward[e:].sum() + trained[e] + frozen[e + 1 :].sum() for e in range(n)]
        )
        return base, trained - frozen

    def step_time(self, selection: Sequence[str], batch_size: int) -> float:
        """Predicted seconds of one training step (forward, backward, optimizer step)."""
        indices = self._indices(selection)
        costs = self.unit_costs
        at = UnitCost.at
        e = indices[0] if indices else len(costs)
        # Units before the earliest trained one run under no_grad, which is cheaper.
        seconds = sum(at(c.forward_inference_s if j < e else c.forward_s, batch_size) for j, c in enumerate(costs))
        if indices:
            chosen = set(indices)
            for j in range(e, len(costs)):
                seconds += at(costs[j].backward_trained_s if j in chosen else costs[j].backward_frozen_s, batch_size)
        return seconds
