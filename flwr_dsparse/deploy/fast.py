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
* :func:`bound_supernode_sleeps` swaps the ``time`` module seen by
  ``start_client_internal`` for one whose ``sleep`` is capped (fix 1);
* :func:`poll_grid_replies` replaces ``HttpGrid.send_and_receive`` with the same loop
  polling every ~50 ms (fix 2); :func:`fast_grid` does it for one grid instance;
* the environment sets ``FLWR_SUPEREXEC_TASK_POLL_INTERVAL`` (a public Flower setting, fix 3);
* :func:`fork_task_processes` makes SuperExec's ``SubprocessExecutor.launch`` fork a child
  of the warm SuperExec (torch and the app's libraries imported once, at start-up) for
  ClientApp and ServerApp tasks, and run Flower's own ``flwr-clientapp`` /
  ``flwr-serverapp`` entry function in it (fix 4). Each task still gets a process of its
  own (isolation, and Flower's ``flwr_exit`` ends the process, so a thread would not do).

Every patch checks the Flower version (1.42.* only) and the exact attribute it replaces;
when either does not hold it logs one warning line and leaves that part stock, so a
fast deployment on another Flower release is a stock deployment, never a broken one.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import shlex
import sys
import threading
import time
import traceback
import types
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

__all__ = [
    "DEFAULT_WARM_IMPORTS",
    "FAST_POLL_S",
    "SUPPORTED_FLOWER",
    "fast_env",
    "fast_grid",
    "fast_object_pulls",
    "flower_version_problem",
    "fork_task_processes",
    "poll_grid_replies",
    "bound_supernode_sleeps",
    "main",
    "write_launchers",
]

SUPPORTED_FLOWER = "1.42."  # the release whose internals the patches below were read from
# Every patched poll starts at FAST_POLL_S after activity and backs off (x1.5) to
# IDLE_POLL_S while nothing happens: 50 ms polls everywhere kept 1.2 of this machine's
# 2 cores busy with loopback requests in an idle deployment (measured); the back-off keeps
# a waiting deployment near the stock one's cost, and the first polls after work fast.
FAST_POLL_S = 0.02
IDLE_POLL_S = 0.25
# What a warm SuperExec imports once, before it forks a task process: the heavy libraries
# of both DSparse apps. The app's own modules (client/, server/) still come from the FAB.
DEFAULT_WARM_IMPORTS = (
    "numpy",
    "torch",
    "torchvision",
    "flwr.clientapp",
    "flwr.serverapp",
    "flwr.serverapp.strategy",
    "flwr.supernode.cli.flwr_clientapp",
    "flwr.superlink.cli.flwr_serverapp",
    "flwr_datasets",
    "flwr_datasets.partitioner",
    "flwr_dsparse.config",
    "flwr_dsparse.data",
    "flwr_dsparse.models",
    "flwr_dsparse.trainer",
    "flwr_dsparse.records",
    "flwr_dsparse.planner",
)
WARM_IMPORTS_ENV = "FLWR_DSPARSE_WARM_IMPORTS"  # comma-separated module names; "" imports nothing
POLL_ENV = "FLWR_DSPARSE_FAST_POLL"  # "first,longest" seconds of every patched poll
TASK_POLL_ENV = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"  # Flower's own (range 0.01-60)
PROFILE_ENV = "FLWR_DSPARSE_FAST_PROFILE"  # a folder: every forked task writes its cProfile stats there
LAUNCHED_BY = "flwr_dsparse.deploy.fast"
_LOG = logging.getLogger("flwr_dsparse.deploy.fast")


def flower_version_problem(version: str | None = None) -> str | None:
    """Why the fast patches cannot apply to this Flower, or ``None`` when they can.

    ``version`` defaults to the installed ``flwr.__version__``.
    """
    if version is None:
        try:
            import flwr

            version = str(flwr.__version__)
        except Exception as error:  # noqa: BLE001 - any import failure means "stock"
            return f"flwr could not be imported ({error})"
    if not version.startswith(SUPPORTED_FLOWER):
        return f"Flower {version} is installed; the fast-mode patches are written for {SUPPORTED_FLOWER}*"
    return None


def _warn_stock(part: str, reason: str) -> None:
    """The one-line warning of a patch that falls back to Flower's stock behaviour."""
    message = f"dsparse fast deployment: {part} left stock: {reason}"
    try:
        from flwr.supercore import log

        log(logging.WARNING, message)
    except Exception:  # noqa: BLE001 - warn even where Flower's logger is unavailable
        print(f"WARNING: {message}", file=sys.stderr, flush=True)


def _guard(part: str, *targets: tuple[str, str]) -> list[Any] | None:
    """Each ``(module, attribute)`` of ``targets`` when this Flower is supported and has them all.

    Otherwise one warning line naming ``part`` and the reason, and ``None``: the caller
    leaves that part of Flower stock.
    """
    problem = flower_version_problem()
    if problem is None:
        try:
            return [getattr(importlib.import_module(module), attribute) for module, attribute in targets]
        except (ImportError, AttributeError) as error:
            problem = f"{error} (the patch was written for Flower {SUPPORTED_FLOWER}*)"
    _warn_stock(part, problem)
    return None


# ---------------------------------------------------------------- 1. SuperNode waits


class PollBackoff:
    """Poll intervals that start at ``first`` after activity and grow by ``growth`` to ``longest``."""

    def __init__(self, first: float = FAST_POLL_S, longest: float = IDLE_POLL_S, growth: float = 1.5) -> None:
        if not 0 < first <= longest:
            raise ValueError(f"poll intervals must satisfy 0 < first <= longest, got {first!r}, {longest!r}")
        self.first, self.longest, self.growth = first, longest, growth
        self._next = first

    def next(self) -> float:
        """The interval to wait now; the one after it is longer (up to ``longest``)."""
        interval = self._next
        self._next = min(self.longest, interval * self.growth)
        return interval

    def reset(self) -> None:
        """Something happened: poll quickly again."""
        self._next = self.first


class _PacedTime(types.ModuleType):
    """The ``time`` module for one Flower module: its ``sleep`` follows a :class:`PollBackoff`.

    A wait of at least ``idle_from`` seconds is an idle poll (the next back-off interval);
    a shorter one is a wait for work in progress (at most ``backoff.first``), and it resets
    the back-off, since a poll right after work is the one most likely to find more.
    """

    def __init__(self, backoff: PollBackoff, idle_from: float = 0.0) -> None:
        super().__init__("time")
        self.backoff, self.idle_from = backoff, idle_from

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    def sleep(self, seconds: float) -> None:
        if seconds >= self.idle_from:
            time.sleep(min(seconds, self.backoff.next()))
        else:
            self.backoff.reset()
            time.sleep(min(seconds, self.backoff.first))


def _pace_module(part: str, module: str, backoff: PollBackoff, idle_from: float = 0.0) -> bool:
    """Give ``module`` a :class:`_PacedTime` as its ``time`` global; whether it applied."""
    if _guard(part, (module, "time")) is None:
        return False
    sys.modules[module].time = _PacedTime(backoff, idle_from)  # type: ignore[attr-defined]
    return True


def bound_supernode_sleeps(backoff: PollBackoff | None = None) -> bool:
    """Pace the SuperNode main loop's waits: 3 s between idle pulls, 0.5 s for a reply.

    ``start_client_internal`` calls ``time.sleep`` through its module global ``time``, so
    only that module sees the paced ``sleep``: idle pulls (the 3 s ones) back off from
    ``backoff.first`` to ``backoff.longest``, the 0.5 s waits for the ClientApp's reply
    become ``backoff.first``. Returns whether the patch applied.
    """
    return _pace_module(
        "SuperNode pull loop (3 s sleep)", "flwr.supernode.start_client_internal", backoff or PollBackoff(), 1.0
    )


def fast_object_pulls(first: float = FAST_POLL_S, longest: float = IDLE_POLL_S) -> bool:
    """Retry a not-yet-available object after ``first`` s (doubling to ``longest``), not 1 s (to 10).

    A SuperNode creates the ClientApp's task before it has pulled the message's objects
    from the SuperLink, so a ClientApp started at once asks for objects that are not
    there yet, and Flower's ``pull_objects`` then waits 1 s, 2 s, 4 s ... between tries
    (``PULL_INITIAL_BACKOFF``, ``PULL_BACKOFF_CAP``). The tries are unlimited instead of
    500 so that ``max_time`` (Flower's, 7200 s) stays the only bound, as it is in effect
    with the stock back-off. Returns whether the patch applied.
    """
    module = "flwr.supercore.inflatable.inflatable_utils"
    functions = _guard(
        "object pull back-off (1-10 s)", (module, "pull_objects"), (module, "pull_and_inflate_object_from_tree")
    )
    keys = {"initial_backoff", "backoff_cap", "max_tries_per_object"}
    if functions is None or any(not keys <= set(function.__kwdefaults__ or {}) for function in functions):
        return False
    for function in functions:
        function.__kwdefaults__.update(initial_backoff=first, backoff_cap=longest, max_tries_per_object=None)
    return True


# ---------------------------------------------------------------- 2. ServerApp reply polls


def _send_and_receive(
    grid: Any,
    messages: Iterable[Any],
    *,
    timeout: float | None = None,
    first: float = FAST_POLL_S,
    longest: float = IDLE_POLL_S,
) -> list[Any]:
    """``HttpGrid.send_and_receive`` of Flower 1.42, pulling after ``first`` to ``longest`` s instead of 3 s."""
    backoff = PollBackoff(first, longest)
    message_ids = set(grid.push_messages(messages))
    del messages
    end_time = time.time() + (timeout if timeout is not None else 0.0)
    replies: list[Any] = []
    while timeout is None or time.time() < end_time:
        pulled = grid.pull_messages(message_ids)
        replies.extend(pulled)
        message_ids.difference_update({message.metadata.reply_to_message_id for message in pulled})
        if not message_ids:
            break
        if pulled:
            backoff.reset()  # replies come in bunches
        time.sleep(backoff.next())
    return replies


def poll_grid_replies(first: float = FAST_POLL_S, longest: float = IDLE_POLL_S) -> bool:
    """Make every ``HttpGrid`` of this process poll for replies every ``first``-``longest`` seconds.

    Flower's ``send_and_receive`` pushes, then pulls and sleeps 3 s until all replies are in
    or the timeout passes; this is the same loop with short, backed-off sleeps
    (``pull_messages`` may be called at any rate). Returns whether the patch applied.
    """
    found = _guard("ServerApp reply polling (3 s)", ("flwr.superlink.grid.http_grid", "HttpGrid"))
    if found is None or not hasattr(found[0], "send_and_receive"):
        return False
    grid_class = found[0]

    def send_and_receive(self: Any, messages: Iterable[Any], *, timeout: float | None = None) -> list[Any]:
        return _send_and_receive(self, messages, timeout=timeout, first=first, longest=longest)

    grid_class.send_and_receive = send_and_receive
    return True


def fast_grid(grid: Any, first: float = FAST_POLL_S, longest: float = IDLE_POLL_S) -> Any:
    """``grid`` with replies polled every ``first``-``longest`` seconds (a deployed ``HttpGrid`` only).

    For a ServerApp run by a stock SuperExec: ``grid = fast_grid(grid)`` at the top of its
    ``main``. Any other grid (the simulation's in-memory one) is returned untouched.
    """
    found = _guard("ServerApp reply polling (3 s)", ("flwr.superlink.grid.http_grid", "HttpGrid"))
    if found is not None and isinstance(grid, found[0]):
        grid.send_and_receive = partial(_send_and_receive, grid, first=first, longest=longest)
    return grid


# ---------------------------------------------------------------- 4. warm task processes


def _import_all(names: Sequence[str]) -> list[str]:
    """Import ``names``; return those that failed (a missing optional library is no error)."""
    failed = []
    for name in names:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 - the child imports it again and reports properly
            failed.append(name)
    return failed


def warm_imports_from_env(env: Mapping[str, str] | None = None) -> list[str]:
    raw = (os.environ if env is None else env).get(WARM_IMPORTS_ENV)
    if raw is None:
        return list(DEFAULT_WARM_IMPORTS)
    return [name.strip() for name in raw.split(",") if name.strip()]


def _exit_code(error: SystemExit) -> int:
    if error.code is None:
        return 0
    return error.code if isinstance(error.code, int) else 1


def _profiled(entry: Callable[[], None], folder: str | None) -> None:
    """``entry()``; with ``folder`` (``FLWR_DSPARSE_FAST_PROFILE``) its cProfile stats go to ``folder/<pid>.prof``."""
    if not folder:
        entry()
        return
    import cProfile

    profile = cProfile.Profile()
    try:
        profile.runcall(entry)
    finally:
        Path(folder).mkdir(parents=True, exist_ok=True)
        profile.dump_stats(str(Path(folder) / f"{sys.argv[0]}-{os.getpid()}.prof"))


def _run_child(entry: Callable[[], None], argv: list[str], suppress_output: bool, before: Callable[[], Any]) -> None:
    """In a forked child: run a Flower entry function as if started as ``argv``, then exit."""
    code = 1
    try:
        if suppress_output:  # what SubprocessExecutor does for such tasks
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
        sys.argv = argv
        before()
        _profiled(entry, os.environ.get(PROFILE_ENV))
        code = 0
    except SystemExit as error:  # flwr_exit ends every task this way
        code = _exit_code(error)
    except BaseException:  # noqa: BLE001 - report, then exit like a crashed process
        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):  # exiting anyway
                stream.flush()
        # No atexit handlers or finalizers of the parent's objects (its HTTP client).
        os._exit(code)


def fork_task_processes(backoff: PollBackoff | None = None) -> bool:
    """Make this SuperExec fork its ClientApp and ServerApp task processes instead of spawning them.

    ``SubprocessExecutor.launch`` starts ``flwr-clientapp --clientappio-api-address ...
    --token ...`` (or ``flwr-serverapp``) with ``subprocess.Popen``. The patched ``launch``
    forks instead, and the child calls the same console entry function with the same
    arguments: everything this process imported (torch, the app's libraries) is already
    there. ServerApp children also get :func:`poll_grid_replies`. Other task types keep
    the stock launch. SuperExec's own task poll (``run_superexec``'s ``time.sleep``) is
    paced by ``backoff``, reset at every launch. Returns whether the patch applied.
    """
    backoff = backoff or PollBackoff()
    found = _guard(
        "warm ClientApp launcher (a fresh process per message)",
        ("flwr.supercore.superexec.executor.subprocess_executor", "SubprocessExecutor"),
        ("flwr.supercore.constant", "TASK_TYPE_TO_APPIO_API_ADDRESS_ARG"),
        ("flwr.supernode.cli.flwr_clientapp", "flwr_clientapp"),
        ("flwr.superlink.cli.flwr_serverapp", "flwr_serverapp"),
    )
    if found is None or not hasattr(os, "fork"):
        return False
    executor = found[0]
    from flwr.supercore.constant import TaskType

    entries: dict[Any, tuple[str, str, Callable[[], Any]]] = {
        TaskType.CLIENT_APP: ("flwr.supernode.cli.flwr_clientapp", "flwr_clientapp", lambda: None),
        TaskType.SERVER_APP: (
            "flwr.superlink.cli.flwr_serverapp",
            "flwr_serverapp",
            lambda: poll_grid_replies(backoff.first, backoff.longest),
        ),
    }
    stock_launch = executor.launch

    def launch(self: Any, spec: Any) -> Any:
        backoff.reset()  # a task now: the next may follow at once (the SuperNode's next message)
        if spec.task_type not in entries:
            return stock_launch(self, spec)
        module, function, before = entries[spec.task_type]
        entry = getattr(importlib.import_module(module), function)
        argv = _task_argv(spec)
        pid = os.fork()
        if pid == 0:
            _run_child(entry, argv, spec.suppress_output, before)
        # Reap the child when it ends (Popen objects are reaped by subprocess; this is ours).
        threading.Thread(target=os.waitpid, args=(pid, 0), daemon=True, name=f"reap-{pid}").start()
        from flwr.supercore.superexec.executor import LaunchResult

        return LaunchResult.accepted()

    executor.launch = launch
    _pace_module("SuperExec task poll", "flwr.supercore.superexec.run_superexec", backoff)
    return True


def _task_argv(spec: Any) -> list[str]:
    """The command line ``SubprocessExecutor.launch`` (Flower 1.42) builds for ``spec``."""
    from flwr.supercore.constant import TASK_TYPE_TO_APPIO_API_ADDRESS_ARG, TASK_TYPE_TO_COMMAND

    argv = [
        TASK_TYPE_TO_COMMAND[spec.task_type],
        TASK_TYPE_TO_APPIO_API_ADDRESS_ARG[spec.task_type],
        spec.runtime_api_address,
        "--token",
        spec.token,
    ]
    if spec.insecure:
        argv.append("--insecure")
    elif spec.root_certificates_path is not None:
        argv += ["--root-certificates", spec.root_certificates_path]
    if spec.parent_pid is not None:
        argv += ["--parent-pid", str(spec.parent_pid)]
    if spec.runtime_dependency_install:
        argv.append("--allow-runtime-dependency-installation")
    return argv


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
) -> dict[str, str]:
    """What the processes of a fast deployment add to their environment.

    ``launchers`` goes first on ``PATH`` (``path``, default this process's ``PATH``).
    Every patched poll (SuperExec's task poll, the SuperNode's loop, the ServerApp's reply
    poll) waits ``first`` seconds after activity, backing off to ``longest``; Flower's own
    ``FLWR_SUPEREXEC_TASK_POLL_INTERVAL`` is set to ``longest``. ``warm_imports``
    replaces :data:`DEFAULT_WARM_IMPORTS`.
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
    module, function = ENTRY_POINTS[name]
    sys.argv = [name, *rest]
    getattr(importlib.import_module(module), function)()


if __name__ == "__main__":
    main()
