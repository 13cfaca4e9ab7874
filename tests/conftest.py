import os

# Tests never phone home and never install packages at run time.
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")


import pytest
import torch

from flwr_dsparse.costs import CostModel
from flwr_dsparse.models import build_model


@pytest.fixture
def one_torch_thread():
    """One intra-op thread for the test, restored after: in-process runs of several simulated
    nodes on a small shared machine stall on the slowest core with more."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_cost() -> CostModel:
    """The tiny model's cost model without step timing (test_costs.py, test_plan.py)."""
    return CostModel(build_model("tiny"), (3, 32, 32), time_batches=None)


def batch(size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded CIFAR-shaped batch: ``size`` images of 3×32×32 and their labels in 0..9."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(size, 3, 32, 32, generator=generator), torch.randint(0, 10, (size,), generator=generator)
