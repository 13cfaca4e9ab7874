"""Fast deployment mode: a deployed round that costs little more than its arithmetic.

A stock Flower 1.42 deployment spends seconds of every round waiting, not computing
(measured on this project's machine: 64-83 s per MobileNetV2 round with 3 SuperNodes):

1. the SuperNode's pull loop sleeps a hard-coded 3 s when the SuperLink has nothing for it
   (``flwr/supernode/start_client_internal.py``, ``time.sleep(3)`` in
   ``start_client_internal``), and 0.5 s while it waits for its ClientApp's reply;
2. ``HttpGrid.send_and_receive`` (the ServerApp's grid) polls for replies every 3 s
   (``flwr/superlink/grid/http_grid.py``);
3. SuperExec polls for tasks every ``FLWR_SUPEREXEC_TASK_POLL_INTERVAL`` seconds (1 s);
4. every message starts a fresh ``flwr-clientapp`` process: Python, torch and the app are
   imported again (about 5-7 s of CPU on this machine, per node and round).

This module fixes all four without editing Flower's files, in Flower's own processes:

* the deployment runs ``python -m flwr_dsparse.deploy.fast flower-supernode ...`` instead
  of ``flower-supernode``, and puts a folder with a ``flower-superexec`` launcher of the same
  form first on ``PATH`` (SuperLink and SuperNode start ``flower-superexec`` by name);
The polls are patched in :mod:`.fast_patches`, the warm launcher lives in :mod:`.fast_launcher`;
this module wires them into a deployment:

* :func:`bound_supernode_sleeps` swaps the ``time`` module seen by
  ``start_client_internal`` for one whose ``sleep`` is capped (fix 1);
* :func:`poll_grid_replies` replaces ``HttpGrid.send_and_receive`` with the same loop
  polling every ~50 ms (fix 2); :func:`fast_grid` does it for one grid instance;
* the environment sets ``FLWR_SUPEREXEC_TASK_POLL_INTERVAL`` (a public Flower setting, fix 3);
* :func:`fork_task_processes` makes SuperExec's ``SubprocessExecutor.launch`` fork a child
  of the warm SuperExec (torch and the app's libraries imported once, at start-up) for
  ClientApp and ServerApp tasks, and run Flower's own ``flwr-clientapp`` /
  ``flwr-serverapp`` entry function in it (fix 4). Each task still gets a process of its
  own (isolation, and Flower's ``flwr_exit`` ends the process, so a thread would not do);
* :func:`build_spare_models` builds each model once in the warm SuperExec, so a ClientApp
  child loads its replica into an inherited model instead of building one;
* :func:`reuse_installed_fabs` lets those children skip Flower's unzip-and-verify of a FAB
  the node installed already (every ClientApp task does it, 0.07 s per message here);
* the environment sets ``DSPARSE_DATA_CACHE`` to a folder of the deployment
  (:mod:`flwr_dsparse.data.cache`): the first ClientApp of a node computes its training
  split and partition, every later one memory-maps them (the same bytes);
* the environment sets ``DSPARSE_REPLICA_STORE`` to a folder of the deployment
  (:mod:`flwr_dsparse.replica_store`): each node's durable replica and momentum stay on its
  disk between its ClientApp processes instead of travelling in ``context.state`` to and
  from every one of them.

Every patch checks the Flower version (1.42.* only) and the exact attribute it replaces;
when either does not hold it logs one warning line and leaves that part stock, so a
fast deployment on another Flower release is a stock deployment, never a broken one.
"""

from __future__ import annotations

import importlib
import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from .fast_launcher import (
    DEFAULT_WARM_IMPORTS,
    WARM_IMPORTS_ENV,
    build_spare_models,
    fork_task_processes,
    warm_imports_from_env,
    warm_models_from_env,
)
from .fast_launcher import _import_all as _import_all
from .fast_patches import (
    FAST_POLL_S,
    IDLE_POLL_S,
    SUPPORTED_FLOWER,
    PollBackoff,
    bound_supernode_sleeps,
    fast_grid,
    fast_object_pulls,
    flower_version_problem,
    poll_grid_replies,
    reuse_installed_fabs,
)

__all__ = [
    "DEFAULT_WARM_IMPORTS",
    "FAST_POLL_S",
    "IDLE_POLL_S",
    "SUPPORTED_FLOWER",
    "PollBackoff",
    "bound_supernode_sleeps",
    "fast_env",
    "fast_grid",
    "fast_object_pulls",
    "flower_version_problem",
    "fork_task_processes",
    "main",
    "poll_grid_replies",
    "reuse_installed_fabs",
    "write_launchers",
]

POLL_ENV = "FLWR_DSPARSE_FAST_POLL"  # "first,longest" seconds of every patched poll
TASK_POLL_ENV = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"  # Flower's own (range 0.01-60)
LAUNCHED_BY = "flwr_dsparse.deploy.fast"


# ---------------------------------------------------------------- wiring into a deployment

# The Flower executables this module can stand in for, and their console entry functions.
ENTRY_POINTS = {
    "flower-supernode": ("flwr.supernode.cli.flower_supernode", "flower_supernode"),
    "flower-superexec": ("flwr.supercore.cli.flower_superexec", "flower_superexec"),
}


def write_launchers(folder: str | Path, python: str = sys.executable) -> dict[str, str]:
    """Write ``flower-supernode`` and ``flower-superexec`` launchers into ``folder``.

    Each is ``exec <python> -m flwr_dsparse.deploy.fast <name> "$@"``; with ``folder`` first
    on ``PATH`` (see :func:`fast_env`) the SuperLink and the SuperNodes start the fast
    SuperExec by its usual name. Returns the paths by name.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name in ENTRY_POINTS:
        path = folder / name
        path.write_text(f'#!/bin/sh\nexec {shlex.quote(python)} -m {LAUNCHED_BY} {name} "$@"\n')
        path.chmod(0o755)
        paths[name] = str(path)
    return paths


def fast_env(
    launchers: str | Path,
    *,
    path: str | None = None,
    first: float = FAST_POLL_S,
    longest: float = IDLE_POLL_S,
    warm_imports: Sequence[str] | None = None,
    data_cache: str | Path | None = None,
    replica_store: str | Path | None = None,
) -> dict[str, str]:
    """What the processes of a fast deployment add to their environment.

    ``launchers`` goes first on ``PATH`` (``path``, default this process's ``PATH``).
    Every patched poll (SuperExec's task poll, the SuperNode's loop, the ServerApp's reply
    poll) waits ``first`` seconds after activity, backing off to ``longest``; Flower's own
    ``FLWR_SUPEREXEC_TASK_POLL_INTERVAL`` is set to ``longest``. ``warm_imports``
    replaces :data:`DEFAULT_WARM_IMPORTS`. ``data_cache`` (default ``data-cache`` beside the
    launchers' folder, unless ``$DSPARSE_DATA_CACHE`` is set already) is where the ClientApps
    keep their training split and partitions (:mod:`flwr_dsparse.data.cache`), and
    ``replica_store`` (default ``replica-store`` beside it, unless ``$DSPARSE_REPLICA_STORE`` is
    set already) where they keep each node's durable replica (:mod:`flwr_dsparse.replica_store`).
    """
    PollBackoff(first, longest)  # checks the pair
    if not 0.01 <= longest <= 60:
        raise ValueError(f"longest fast poll {longest!r} s is outside Flower's 0.01-60 s range; use e.g. 0.25")
    env = {
        "PATH": str(launchers) + os.pathsep + (os.environ.get("PATH", "") if path is None else path),
        TASK_POLL_ENV: f"{longest:g}",
        POLL_ENV: f"{first:g},{longest:g}",
    }
    if warm_imports is not None:
        env[WARM_IMPORTS_ENV] = ",".join(warm_imports)
    # Imported here: the SuperNode's launcher must not import torch (both modules do).
    from ..data.cache import DATA_CACHE_ENV
    from ..replica_store import REPLICA_STORE_ENV

    for key, given, default in (
        (DATA_CACHE_ENV, data_cache, "data-cache"),
        (REPLICA_STORE_ENV, replica_store, "replica-store"),
    ):
        env[key] = str(given if given is not None else os.environ.get(key) or Path(launchers).parent / default)
    return env


def _backoff_from_env() -> PollBackoff:
    try:
        first, longest = (float(value) for value in os.environ.get(POLL_ENV, "").split(","))
        return PollBackoff(first, longest)
    except ValueError:
        return PollBackoff()


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m flwr_dsparse.deploy.fast <flower-supernode|flower-superexec> [flower args]``.

    Applies this role's patches (each falls back with a warning), then runs Flower's own
    entry function with the remaining arguments.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] not in ENTRY_POINTS:
        roles = ",".join(ENTRY_POINTS)
        raise SystemExit(f"usage: python -m {LAUNCHED_BY} {{{roles}}} [flower arguments]; got {args[:1]}")
    name, rest = args[0], args[1:]
    backoff = _backoff_from_env()
    fast_object_pulls(backoff.first, backoff.longest)  # inherited by forked task processes
    if name == "flower-supernode":
        bound_supernode_sleeps(backoff)
    else:
        if fork_task_processes(backoff):
            _import_all(warm_imports_from_env())
            reuse_installed_fabs()  # the forked task processes inherit it
            # For ClientApp children (a SuperLink's SuperExec, which forks ServerApps, cannot be
            # told apart by its arguments: there the models cost 14 MB and are never used).
            build_spare_models(warm_models_from_env())
    module, function = ENTRY_POINTS[name]
    sys.argv = [name, *rest]
    getattr(importlib.import_module(module), function)()


if __name__ == "__main__":
    main()
