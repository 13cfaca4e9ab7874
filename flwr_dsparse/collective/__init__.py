"""Collective transport: the Plan's AllReduce and Broadcast, every step, over torch.distributed.

* :mod:`.groups`: rendezvous, one gloo AllReduce group and one Broadcast group per plan
  group, and the fused or per-tensor collectives with their hang guards;
* :mod:`.steps`: K synchronous training steps of one rank (the ClientApp calls
  :func:`run_collective_round` for ``transport="collective"``);
* :mod:`.launch`: every rank on one machine (:func:`launch_local`), for tests and benchmarks.

The ``dsparse collective`` command lives in :mod:`flwr_dsparse.cli.collective`.
"""

# The package's public names are its modules' own (each module's ``__all__``), re-exported.
from . import groups, launch, steps
from .groups import *  # noqa: F403
from .launch import *  # noqa: F403
from .steps import *  # noqa: F403

__all__ = [*groups.__all__, *launch.__all__, *steps.__all__]  # noqa: F405
