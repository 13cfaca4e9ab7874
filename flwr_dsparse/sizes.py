"""``MB``: the one unit of every memory figure in the project (a MiB, 2**20 bytes).

Torch-free on purpose, so light processes (the hard-cap helpers that join a cgroup before
exec'ing a SuperNode) can use it without importing torch.
"""

__all__ = ["MB"]

MB = 1024 * 1024
