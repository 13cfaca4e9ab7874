import os

# Tests never phone home and never install packages at run time.
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")


import pytest
import torch


@pytest.fixture
def one_torch_thread():
    """One intra-op thread for the test, restored after: in-process runs of several simulated
    nodes on a small shared machine stall on the slowest core with more."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
