"""Fast deployment, part 2: a warm SuperExec that forks a ClientApp or ServerApp process per task.

A stock Flower 1.42 SuperExec starts every task (a ClientApp for each message) as a fresh
``flwr-clientapp`` process: Python, torch and the app are imported again, 5-7 s of CPU on
this machine per node and round. :func:`fork_task_processes` makes SuperExec fork a child of
itself instead, after importing the heavy libraries once (:data:`DEFAULT_WARM_IMPORTS`), and
run Flower's own entry function in the child. Each task still gets a process of its own
(isolation, and Flower's ``flwr_exit`` ends the process, so a thread would not do).
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
import threading
import traceback
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .fast_patches import PollBackoff, _guard, _pace_module, poll_grid_replies

__all__ = [
    "DEFAULT_WARM_IMPORTS",
    "PROFILE_ENV",
    "WARM_IMPORTS_ENV",
    "WARM_MODELS_ENV",
    "build_spare_models",
    "fork_task_processes",
    "task_argv",
    "warm_imports_from_env",
    "warm_models_from_env",
]

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
WARM_MODELS_ENV = "FLWR_DSPARSE_WARM_MODELS"  # comma-separated model names; "" builds none
PROFILE_ENV = "FLWR_DSPARSE_FAST_PROFILE"  # a folder: every forked task writes its cProfile stats there


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


def warm_models_from_env(env: Mapping[str, str] | None = None) -> list[str]:
    """The models a warm ClientApp launcher builds once (``$FLWR_DSPARSE_WARM_MODELS``; default all)."""
    raw = (os.environ if env is None else env).get(WARM_MODELS_ENV)
    if raw is None:
        from ..models import MODELS

        return list(MODELS)
    return [name.strip() for name in raw.split(",") if name.strip()]


def build_spare_models(names: Sequence[str]) -> list[str]:
    """Build one model per name into :mod:`flwr_dsparse.node_state`'s spares; returns those that failed.

    A forked ClientApp holds no live state, so it loads its whole replica into a model
    (:func:`flwr_dsparse.node_state.spare_model`): inherited from here, it need not be built
    in every child (17 ms for MobileNetV2 on this machine). Building runs no parallel torch
    region (the process keeps its one thread, checked), so the children fork as safely as before.
    """
    from .. import node_state
    from ..models import build_model

    failed = []
    for name in names:
        try:
            node_state.add_spare(name, build_model(name, seed=0))
        except Exception:  # noqa: BLE001 - the child builds it itself and reports properly
            failed.append(name)
    return failed


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
        argv = task_argv(spec)
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


def task_argv(spec: Any) -> list[str]:
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
