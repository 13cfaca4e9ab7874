"""Fast deployment, part 1: Flower 1.42's polls made short, each patch version-guarded.

What a stock deployment waits for (see :mod:`flwr_dsparse.deploy.fast` for the whole mode):
the SuperNode's pull loop sleeps a hard-coded 3 s when the SuperLink has nothing for it
(``flwr/supernode/start_client_internal.py``) and 0.5 s while it waits for its ClientApp's
reply; ``HttpGrid.send_and_receive`` (the ServerApp's grid) polls for replies every 3 s
(``flwr/superlink/grid/http_grid.py``); a not-yet-available object is retried after 1 s,
doubling to 10 s (``inflatable_utils.pull_objects``). Every patch here checks the Flower
version (1.42.* only) and the exact attribute it replaces (:func:`_guard`); when either does
not hold it logs one warning line and leaves that part stock.
"""

from __future__ import annotations

import importlib
import logging
import sys
import time
import types
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any

__all__ = [
    "FAST_POLL_S",
    "IDLE_POLL_S",
    "SUPPORTED_FLOWER",
    "SIM_IDLE_POLL_S",
    "SIM_POLL_S",
    "PollBackoff",
    "SimulationPickup",
    "bound_supernode_sleeps",
    "fast_grid",
    "fast_object_pulls",
    "fast_simulation_grid",
    "flower_version_problem",
    "is_simulation_grid",
    "poll_grid_replies",
    "polling_send_and_receive",
    "reuse_installed_fabs",
    "warn_stock",
]

SUPPORTED_FLOWER = "1.42."  # the release whose internals the patches below were read from
# Every patched poll starts at FAST_POLL_S after activity and backs off (x1.5) to
# IDLE_POLL_S while nothing happens: 50 ms polls everywhere kept 1.2 of this machine's
# 2 cores busy with loopback requests in an idle deployment (measured); the back-off keeps
# a waiting deployment near the stock one's cost, and the first polls after work fast.
FAST_POLL_S = 0.02
IDLE_POLL_S = 0.25
# The simulation's grid looks for replies in an in-memory LinkState (a dict lookup under a
# lock), so it can look far more often than a deployment's HTTP grid can.
SIM_POLL_S = 0.005
SIM_IDLE_POLL_S = 0.02
SIM_ENGINE_MODULE = "flwr.server.superlink.fleet.vce.vce_api"  # the simulation engine's message loop


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


def warn_stock(part: str, reason: str) -> None:
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
    warn_stock(part, problem)
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


def polling_send_and_receive(
    grid: Any,
    messages: Iterable[Any],
    *,
    timeout: float | None = None,
    first: float = FAST_POLL_S,
    longest: float = IDLE_POLL_S,
    after_push: Callable[[list[Any]], None] | None = None,
    on_reply: Callable[[Any], None] | None = None,
) -> list[Any]:
    """``HttpGrid.send_and_receive`` of Flower 1.42, pulling after ``first`` to ``longest`` s instead of 3 s.

    ``after_push(messages)``, where given, runs once the messages are stored (the
    simulation hands them to its workers there, :class:`SimulationPickup`).
    ``on_reply(reply)``, where given, runs for each reply as it is pulled (the DSparse
    strategy checks it then, while other nodes still train).
    """
    backoff = PollBackoff(first, longest)
    messages = list(messages)
    message_ids = set(grid.push_messages(messages))
    if after_push is not None:
        after_push(messages)
    del messages
    end_time = time.time() + (timeout if timeout is not None else 0.0)
    replies: list[Any] = []
    while timeout is None or time.time() < end_time:
        pulled = list(grid.pull_messages(message_ids))
        replies.extend(pulled)
        if on_reply is not None:
            for reply in pulled:
                on_reply(reply)
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

    def send_and_receive(
        self: Any,
        messages: Iterable[Any],
        *,
        timeout: float | None = None,
        on_reply: Callable[[Any], None] | None = None,
    ) -> list[Any]:
        return polling_send_and_receive(
            self, messages, timeout=timeout, first=first, longest=longest, on_reply=on_reply
        )

    grid_class.send_and_receive = send_and_receive
    return True


def fast_grid(grid: Any, first: float = FAST_POLL_S, longest: float = IDLE_POLL_S) -> Any:
    """``grid`` with replies polled every ``first``-``longest`` seconds (a deployed ``HttpGrid`` only).

    For a ServerApp run by a stock SuperExec: ``grid = fast_grid(grid)`` at the top of its
    ``main``. Any other grid (the simulation's in-memory one) is returned untouched.
    """
    return _poll_replies_of(grid, "ServerApp reply polling (3 s)", "http_grid", "HttpGrid", first, longest)


def fast_simulation_grid(grid: Any, first: float = SIM_POLL_S, longest: float = SIM_IDLE_POLL_S) -> Any:
    """``grid`` with messages handed to the workers on push and replies polled every ``first``-``longest`` s.

    For the simulation's ``InMemoryGrid`` only; any other grid is returned untouched. Flower's
    simulation waits 0.1 s twice a round: its engine looks for new messages every 0.1 s
    (``vce_api.add_messages_to_queue``), and its grid sleeps its ``pull_interval`` (0.1 s)
    between looks for replies. The patched ``send_and_receive`` gives the messages it pushed
    to the engine's workers at once (:class:`SimulationPickup`) and looks for replies every
    ``first`` to ``longest`` s; a look is a lookup in the in-memory LinkState, so the short
    polls cost next to nothing. The ServerApp applies it in every simulation (the echo app
    too, so the transport floor it measures is the same loop).
    """
    found = _guard(
        "simulation message pickup and reply polling (0.1 s)",
        ("flwr.superlink.grid.inmemory_grid", "InMemoryGrid"),
        (SIM_ENGINE_MODULE, "add_messages_to_queue"),
    )
    if found is not None and isinstance(grid, found[0]):
        pickup = SimulationPickup(found[1].__code__, grid.state)
        grid.send_and_receive = partial(
            polling_send_and_receive, grid, first=first, longest=longest, after_push=pickup.deliver
        )
    return grid


class SimulationPickup:
    """Hands pushed messages to the simulation engine's workers at once, instead of at its next 0.1 s look.

    Flower 1.42's engine runs ``add_messages_to_queue(state, queue, nodes_mapping, f_stop)``
    in a thread of the ServerApp's process: every 0.1 s it takes each node's next
    undelivered message from the LinkState (``get_message_ins``, which marks it delivered
    under the state's lock) and puts it on the workers' queue. :meth:`deliver` does the same
    for the nodes just messaged, right after the push, through that thread's own ``state``
    and ``queue`` (read from its frame): a message is handed out once, whoever takes it
    first, so the engine's loop and this one never both deliver it. Only the loop over
    ``state``, the grid's own LinkState, counts: a finished run's loop that has not exited
    yet serves another state. Until the engine's thread runs (its Ray actors start after the
    ServerApp does) the messages wait for it as they would stock; if it never shows up after
    replies came, one warning says so.
    """

    def __init__(self, scanner_code: types.CodeType, state: Any) -> None:
        self.scanner_code, self.state = scanner_code, state
        self._engine: tuple[Any, Any] | None = None  # the engine thread's (state, queue)
        self._pushes = 0

    def engine(self) -> tuple[Any, Any] | None:
        """The running engine loop's ``(state, queue)`` for :attr:`state`, or ``None`` while it has not started."""
        if self._engine is None:
            for frame in sys._current_frames().values():  # noqa: SLF001 - the only way to reach that thread
                while frame is not None and frame.f_code is not self.scanner_code:
                    frame = frame.f_back
                if frame is not None and frame.f_locals["state"] is self.state:
                    self._engine = (self.state, frame.f_locals["queue"])
                    break
        return self._engine

    def deliver(self, messages: list[Any]) -> None:
        """Put each pushed message's node's next undelivered message on the workers' queue, in push order."""
        self._pushes += 1
        engine = self.engine()
        if engine is None:
            if self._pushes == 3:  # by then the engine has answered two pushes: it runs elsewhere
                warn_stock("simulation message pickup (0.1 s)", "the engine's message loop was not found")
            return
        state, queue = engine
        for node_id in dict.fromkeys(message.metadata.dst_node_id for message in messages):
            for message in state.get_message_ins(node_id=node_id, limit=1):
                queue.put(message)


def is_simulation_grid(grid: Any) -> bool:
    """Whether ``grid`` is Flower's simulation grid (``InMemoryGrid``): its nodes run on this machine.

    ``False`` (with the one-line warning) where this Flower is not the one read.
    """
    found = _guard("simulation detection", ("flwr.superlink.grid.inmemory_grid", "InMemoryGrid"))
    return found is not None and isinstance(grid, found[0])


def _poll_replies_of(grid: Any, part: str, module: str, name: str, first: float, longest: float) -> Any:
    """``grid`` polling with :func:`polling_send_and_receive` if it is ``flwr.superlink.grid.<module>.<name>``."""
    found = _guard(part, (f"flwr.superlink.grid.{module}", name))
    if found is not None and isinstance(grid, found[0]):
        grid.send_and_receive = partial(polling_send_and_receive, grid, first=first, longest=longest)
    return grid


# ---------------------------------------------------------------- 3. FAB installs


def reuse_installed_fabs() -> bool:
    """Install a FAB once per node, not once per message.

    Every ClientApp task calls Flower's ``install_from_fab(fab.content, skip_prompt=True)``,
    which unzips the whole FAB into a temporary folder and checks every file's hash before it
    finds the app already installed (``run_clientapp.py``, ``run_serverapp.py``): 0.07 s per
    message for this project's FAB, in every child. The patched call hashes the FAB's bytes
    (Flower's own FAB hash) and returns the folder a completed install of the same bytes left
    a marker for; anything else (a first install, a marker whose folder is gone) goes to
    Flower's function. Returns whether the patch applied.
    """
    modules = ("flwr.supernode.runtime.run_clientapp", "flwr.superlink.runtime.run_serverapp")
    targets = [(module, "install_from_fab") for module in modules] + [("flwr.cli.install", "get_flwr_home")]
    found = _guard("FAB install per message", *targets)
    if found is None or any(not callable(function) for function in found):
        return False
    *installs, flwr_home = found
    for module, install in zip(modules, installs, strict=True):
        if not getattr(install, "_dsparse_reuses_installs", False):
            sys.modules[module].install_from_fab = _reusing_install(install, flwr_home)  # type: ignore[attr-defined]
    return True


def _reusing_install(install: Any, flwr_home: Any) -> Any:
    """Flower's ``install_from_fab``, skipped for bytes whose install finished before (see above)."""
    import hashlib
    import os
    from pathlib import Path

    def install_from_fab(fab_file: Any, install_dir: Any = None, skip_prompt: bool = False) -> Any:
        if not isinstance(fab_file, bytes) or not skip_prompt:
            return install(fab_file, install_dir, skip_prompt)
        base = Path(install_dir).expanduser() if install_dir else Path(flwr_home())
        marker = base / "apps" / f".dsparse-installed-{hashlib.sha256(fab_file).hexdigest()}"
        try:
            installed = Path(marker.read_text())
            if installed.is_dir():
                return installed
        except OSError:
            pass  # no marker yet: install
        installed = Path(install(fab_file, install_dir, skip_prompt))
        partial_marker = marker.with_name(f"{marker.name}.{os.getpid()}")
        partial_marker.write_text(str(installed))
        os.replace(partial_marker, marker)
        return installed

    install_from_fab._dsparse_reuses_installs = True  # type: ignore[attr-defined]
    return install_from_fab
