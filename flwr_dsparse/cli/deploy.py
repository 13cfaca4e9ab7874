"""``dsparse deploy``: bring a loopback Flower deployment up and down from the shell.

The library behind it is :mod:`flwr_dsparse.deploy`; this module only parses arguments and
prints what a user needs next (the ``flwr run`` and ``down`` commands).
"""

from __future__ import annotations

import argparse
import inspect
import json
import shlex
import sys
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

from ..deploy import (
    DEFAULT_CONNECTION,
    DEFAULT_SUPERNODE_PORT,
    Deployment,
    flwr_home,
    format_node_config,
    list_nodes,
    make_certificates,
    make_node_keys,
    process_alive,
    start_deployment,
    state_dir_for,
    stop_deployment,
)
from ..deploy.cluster import cap_reports
from ..planner import parse_budgets

__all__ = ["add_cli", "main"]


#: The ``up`` options that :func:`~flwr_dsparse.deploy.start_deployment` takes as given, under the
#: same name; :func:`_cmd_up` translates the others (budgets, node ports, TLS hosts, home).
_UP_AS_GIVEN = (
    "host",
    "port",
    "tls",
    "auth",
    "connection",
    "state_dir",
    "threads_per_node",
    "timeout",
    "fast",
    "hard_cap",
)


def _cmd_up(args: argparse.Namespace) -> int:
    deployment = start_deployment(
        args.nodes,
        memory_mb=parse_budgets(args.memory_mb, field="--memory-mb") if args.memory_mb else None,
        node_ports=[args.node_port + i for i in range(args.nodes)] if args.node_port else None,
        tls_hosts=args.tls_hosts.split(","),
        home=args.flwr_home,
        **{name: getattr(args, name) for name in _UP_AS_GIVEN},
    )
    print(
        f"SuperLink {deployment.address} (pid {deployment.superlink.pid}), "
        f"{'TLS' if deployment.tls else 'insecure'}{', SuperNode auth' if deployment.auth else ''}"
        f"{', fast mode' if deployment.fast else ''}"
    )
    for node in deployment.supernodes:
        print(f"  {node.role}: pid {node.pid}, port {node.port}, node-config {format_node_config(node.node_config)!r}")
    for cap in deployment.hard_caps:
        print(f"  {cap.name}: hard cap of its budget, {cap.budget_mb:g} MB, on training (cgroup {cap.train})")
    print(f"all {len(deployment.supernodes)} SuperNodes online; state and logs in {deployment.state_dir}")
    home_hint = "" if args.flwr_home is None else f"FLWR_HOME={shlex.quote(deployment.flwr_home)} "
    print(f"run the app:  {home_hint}flwr run . {deployment.connection} --stream")
    print(
        f"stop it all:  dsparse deploy down --connection {deployment.connection}"
        + ("" if args.flwr_home is None else f" --flwr-home {shlex.quote(deployment.flwr_home)}")
    )
    return 0


def _load(args: argparse.Namespace) -> Deployment:
    return Deployment.load(state_dir_for(flwr_home(args.flwr_home), args.connection, args.state_dir))


def _cmd_down(args: argparse.Namespace) -> int:
    deployment = _load(args)
    killed = cap_reports(deployment)  # read before the caps are removed
    signalled = stop_deployment(deployment, grace=args.grace)
    for line in killed:
        print(line, file=sys.stderr)
    left = [record.pid for record in deployment.processes if process_alive(record)]
    print(f"stopped {len(signalled)} processes ({', '.join(map(str, signalled)) or 'none were running'})")
    if left:
        print(f"still alive: {left}", file=sys.stderr)
        return 1
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    deployment = _load(args)
    for record in deployment.processes:
        state = "running" if process_alive(record) else "stopped"
        print(f"{record.role:>14}: pid {record.pid:>7} port {record.port:>5} {state}  log {record.log}")
    if deployment.superlink is not None and process_alive(deployment.superlink):
        nodes = list_nodes(deployment.connection, deployment.env())
        print(f"SuperLink {deployment.address}: " + ", ".join(f"{n['node-id']} {n['status']}" for n in nodes))
    for cap in deployment.hard_caps:
        within = f"{cap.name}: within its hard cap ({cap.budget_mb:g} MB), training peak {cap.peak_mb:.1f} MB"
        print(cap.report() or within)
    return 0


def _cmd_certs(args: argparse.Namespace) -> int:
    files = make_certificates(args.out, hosts=args.hosts.split(","), days=args.days)
    print(json.dumps(asdict(files), indent=2))
    print(
        f"SuperLink: --ssl-ca-certfile {files.ca_cert} --ssl-certfile {files.server_cert} "
        f"--ssl-keyfile {files.server_key}\n"
        f"SuperNodes and the flwr connection: --root-certificates / root-certificates = {files.ca_cert}"
    )
    return 0


def _cmd_keys(args: argparse.Namespace) -> int:
    keys = make_node_keys(args.out, args.name)
    print(f"private key (flower-supernode --auth-supernode-private-key): {keys.private_key}")
    print(f"public key (flwr supernode register {keys.public_key} <connection>): {keys.public_key}")
    return 0


def _guarded(command: Any) -> Any:
    """Report a failed start or stop as one ``error:`` line and exit status 2, not a traceback."""

    def run(args: argparse.Namespace) -> int:
        try:
            return int(command(args))
        except (ValueError, OSError, RuntimeError, TimeoutError) as error:
            print(f"dsparse deploy {args.deploy_command}: error: {error}", file=sys.stderr)
            return 2

    return run


def add_cli(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``deploy`` with ``up``, ``down``, ``status``, ``certs`` and ``keys``."""
    parser = subparsers.add_parser(
        "deploy",
        help="run a real Flower SuperLink and SuperNodes on this machine",
        description="Bring up (and tear down) a Flower SuperLink and N SuperNodes on loopback.",
    )
    commands = parser.add_subparsers(dest="deploy_command", required=True)

    def common(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--connection", default=DEFAULT_CONNECTION, help="flwr connection name (default %(default)s)")
        sub.add_argument("--flwr-home", default=None, help="FLWR_HOME (default: $FLWR_HOME or ~/.flwr)")
        sub.add_argument("--state-dir", default=None, help="state and logs (default: <flwr-home>/dsparse/<connection>)")

    up = commands.add_parser("up", help="start a SuperLink and N SuperNodes, wait until all are online")
    # The options start_deployment also takes default to its own defaults: one place states them.
    default = {name: parameter.default for name, parameter in inspect.signature(start_deployment).parameters.items()}
    up.add_argument("--nodes", type=int, default=3, help="number of SuperNodes (default %(default)s)")
    up.add_argument("--memory-mb", default=None, help="comma-separated budgets, one per node, e.g. 80,110,150")
    up.add_argument("--host", default=default["host"], help="SuperLink bind address (default %(default)s)")
    up.add_argument("--port", type=int, default=default["port"], help="SuperLink port (default %(default)s)")
    up.add_argument(
        "--node-port",
        type=int,
        default=DEFAULT_SUPERNODE_PORT,
        help="first SuperNode Runtime API port; node i gets node-port+i (default %(default)s)",
    )
    up.add_argument("--tls", action="store_true", help="generate a CA and server certificate and use TLS")
    up.add_argument("--tls-hosts", default=",".join(default["tls_hosts"]), help="names in the server certificate")
    up.add_argument("--auth", action="store_true", help="SuperNode authentication (needs --tls)")
    up.add_argument(
        "--threads-per-node",
        type=int,
        default=None,
        help="OMP threads per SuperNode (default: CPU cores / nodes, at least 1)",
    )
    up.add_argument(
        "--fast",
        action="store_true",
        help="fast mode: 50 ms polls and warm, forked ClientApp processes (Flower 1.42.*; "
        "see docs/deployment.md); per-step rounds cost about their arithmetic",
    )
    up.add_argument(
        "--hard-cap",
        action="store_true",
        help="run each SuperNode and its ClientApps under a hard memory cap (cgroup) of its --memory-mb "
        "budget on what training adds; a node the kernel kills is reported by `status` and `down`",
    )
    up.add_argument(
        "--timeout", type=float, default=default["timeout"], help="seconds to wait for all nodes (default %(default)s)"
    )
    common(up)
    up.set_defaults(func=_guarded(_cmd_up))

    down = commands.add_parser("down", help="stop every process of the deployment by id")
    down.add_argument("--grace", type=float, default=5.0, help="seconds between SIGTERM and SIGKILL")
    common(down)
    down.set_defaults(func=_guarded(_cmd_down))

    status = commands.add_parser("status", help="processes and the SuperLink's node list")
    common(status)
    status.set_defaults(func=_guarded(_cmd_status))

    certs = commands.add_parser("certs", help="write a throwaway CA and SuperLink certificate")
    certs.add_argument("--out", required=True, help="output folder")
    certs.add_argument(
        "--hosts",
        default="127.0.0.1,localhost",
        help="comma-separated names/IPs the SuperNodes dial (default %(default)s)",
    )
    certs.add_argument("--days", type=int, default=30)
    certs.set_defaults(func=_guarded(_cmd_certs))

    keys = commands.add_parser("keys", help="write a SuperNode authentication key pair")
    keys.add_argument("--out", required=True, help="output folder")
    keys.add_argument("--name", default="supernode", help="file name of the private key")
    keys.set_defaults(func=_guarded(_cmd_keys))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``dsparse deploy up|down|status|certs|keys ...`` on its own (``python -m flwr_dsparse.deploy``)."""
    parser = argparse.ArgumentParser(prog="python -m flwr_dsparse.deploy")
    subparsers = parser.add_subparsers(dest="command")
    add_cli(subparsers)
    args = parser.parse_args(["deploy", *(argv if argv is not None else sys.argv[1:])])
    return int(args.func(args))
