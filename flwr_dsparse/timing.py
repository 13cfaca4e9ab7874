"""Per-unit step times: forward and backward of each unit, timed with module hooks (for the cost model)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence

import torch
from torch import nn

from .trainer import SparseTrainer
from .units import Unit

__all__ = ["time_units"]


def time_units(
    model: nn.Module,
    units: Sequence[Unit],
    inputs: torch.Tensor,
    targets: torch.Tensor,
    *,
    lean_frozen: bool = True,
    repeats: int = 3,
) -> tuple[list[float], ...]:
    """Per-unit seconds on ``inputs``: forward building a graph, trained backward,
    frozen (pass-through) backward, and forward under ``no_grad``.

    Forward hooks time each unit's forward. Backward pre-hooks fire when a
    unit's output gradient is ready, so the gap between consecutive units'
    pre-hooks is the later unit's backward.
    """
    names = [u.name for u in units]
    modules = dict(model.named_modules())
    state = {k: v.clone() for k, v in model.state_dict().items()}

    def timed_step(selection: Sequence[str]) -> tuple[list[float], list[float]]:
        trainer = SparseTrainer(model, selection, units=units, lean_frozen=lean_frozen)
        trainer.train_mode()
        forward_start: dict[str, float] = {}
        forward_end: dict[str, float] = {}
        grad_ready: dict[str, float] = {}
        hooks = []
        for name in names:
            module = modules[name]
            hooks.append(
                module.register_forward_pre_hook(lambda m, a, n=name: forward_start.__setitem__(n, time.perf_counter()))
            )
            hooks.append(
                module.register_forward_hook(lambda m, a, o, n=name: forward_end.__setitem__(n, time.perf_counter()))
            )
            hooks.append(
                module.register_full_backward_pre_hook(
                    lambda m, g, n=name: grad_ready.__setitem__(n, time.perf_counter())
                )
            )
        try:
            with torch.set_grad_enabled(bool(selection)):
                loss = trainer.loss_fn(model(inputs), targets)
            backward_start = time.perf_counter()
            if selection:
                loss.backward()
            backward_end = time.perf_counter()
        finally:
            for hook in hooks:
                hook.remove()
            trainer.close()
            model.zero_grad(set_to_none=True)
        forward = [forward_end[n] - forward_start[n] for n in names]
        backward = [0.0] * len(names)
        # Units whose gradient arrived, in the order backward visits them (last unit first).
        visited = [n for n in reversed(names) if n in grad_ready]
        previous = backward_start
        for i, name in enumerate(visited):
            until = grad_ready[visited[i + 1]] if i + 1 < len(visited) else backward_end
            backward[names.index(name)] = until - grad_ready[name]
            if i == 0:  # the loss's own backward is charged to the last unit
                backward[names.index(name)] += grad_ready[name] - previous
        return forward, backward

    try:
        runs_full = [timed_step(names) for _ in range(repeats + 1)][1:]
        runs_frozen = [timed_step(names[:1]) for _ in range(repeats + 1)][1:]
        runs_inference = [timed_step([]) for _ in range(repeats + 1)][1:]
    finally:
        model.load_state_dict(state)
        for p in model.parameters():
            p.requires_grad_(True)
    med = lambda runs, part, i: statistics.median(run[part][i] for run in runs)  # noqa: E731
    n = len(names)
    return (
        [med(runs_full, 0, i) for i in range(n)],
        [med(runs_full, 1, i) for i in range(n)],
        [med(runs_frozen, 1, i) for i in range(n)],
        [med(runs_inference, 0, i) for i in range(n)],
    )
