"""The memory probe: one fresh process that trains a selection and reports its peak memory.

Started by :func:`flwr_dsparse.memory.measure_training_rss` (peak RSS increase) and by
``experiments/memory_bench.py`` under a hard cap (:func:`flwr_dsparse.hardcap.run_capped`
with ``join="self"``): the probe builds the model and the batch, then joins the cap, so the
cap and the cgroup's peak count only what training adds.

    python -m flwr_dsparse.probe '{"model": "mobilenet_v2", "selection": ["classifier"], "batch_size": 128}'
"""

from __future__ import annotations

import json
import sys

__all__ = ["probe"]


def probe(request: dict) -> dict[str, float]:
    """Train ``request["selection"]`` for ``steps`` steps; the RSS baseline, peak and increase (MiB)."""
    from .allocator import tune_allocator

    tuned = tune_allocator() if request.get("tune_allocator", True) else False
    import torch

    from .hardcap import join_cap_from_env
    from .memory import current_rss_mb, peak_rss_mb, reset_peak_rss
    from .models import build_model
    from .trainer import SparseTrainer, make_optimizer_factory
    from .units import model_units

    torch.set_num_threads(int(request.get("threads", 1)))
    num_classes = request.get("num_classes", 10)
    batch_size = request["batch_size"]
    model = build_model(request["model"], num_classes, seed=0)
    units = model_units(model)
    selection = request.get("selection")
    selection = selection if selection is not None else [u.name for u in units]
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(batch_size, *request.get("input_shape", (3, 32, 32)), generator=generator)
    targets = torch.randint(0, num_classes, (batch_size,), generator=generator)
    trainer = SparseTrainer(
        model,
        [] if request.get("no_grad_forward") else selection,
        units=units,
        optimizer_factory=make_optimizer_factory(
            request.get("optimizer", "sgd"), lr=0.01, momentum=request.get("momentum", 0.0)
        ),
        lean_frozen=request.get("lean_frozen", True),
    )
    if not request.get("cold", False):
        # A warm process: one tiny inference forward pays the runtime's one-time start-up
        # (thread pool, oneDNN primitives) into the baseline.
        with torch.no_grad():
            model.eval()
            model(inputs[:1])
    joined = join_cap_from_env()
    baseline = current_rss_mb()
    reset_peak_rss()
    for _ in range(request.get("steps", 5)):
        trainer.step(inputs, targets)
    peak = peak_rss_mb()
    return {
        "baseline_mb": baseline,
        "peak_mb": peak,
        "increase_mb": peak - baseline,
        "joined_cap": joined,
        "allocator_tuned": tuned,
    }


if __name__ == "__main__":
    print(json.dumps(probe(json.loads(sys.argv[1]))))
