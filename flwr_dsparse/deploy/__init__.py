"""Bring up a real Flower deployment on loopback: one SuperLink and N SuperNodes.

The rooms of this package, in the order a deployment comes up:

* :mod:`.tls`: throwaway CA, SuperLink certificate and SuperNode authentication keys;
* :mod:`.flwr_cli`: the ``flower-superlink`` / ``flower-supernode`` command lines and the
  ``flwr`` CLI calls (connections, ``supernode ls``, ``supernode register``);
* :mod:`.processes`: starting, watching and stopping processes by id;
* :mod:`.cluster`: a whole deployment (:func:`start_deployment`, :func:`stop_deployment`,
  :func:`run_app`) and its state file;
* :mod:`.fast`: the fast mode (``start_deployment(fast=True)``, ``dsparse deploy up --fast``):
  short polls and warm, forked ClientApp processes, patched into Flower 1.42's processes.

The ``dsparse deploy`` command lives in :mod:`flwr_dsparse.cli.deploy`;
``python -m flwr_dsparse.deploy`` runs it too.
"""

from __future__ import annotations

from .cluster import (
    DEFAULT_CONNECTION,
    Deployment,
    fast_setup,
    run_app,
    start_deployment,
    start_superlink,
    start_supernode,
    state_dir_for,
    stop_deployment,
    wait_for_nodes,
)
from .flwr_cli import (
    DEFAULT_SUPERLINK_PORT,
    DEFAULT_SUPERNODE_PORT,
    FLOWER_ENV,
    deployment_env,
    flwr_home,
    format_node_config,
    format_run_config,
    list_nodes,
    register_node,
    superlink_command,
    supernode_command,
    write_connection,
)
from .processes import ProcessRecord, process_alive, spawn_process, stop_processes
from .tls import NodeKeys, TlsFiles, make_certificates, make_node_keys

__all__ = [
    "DEFAULT_CONNECTION",
    "DEFAULT_SUPERLINK_PORT",
    "DEFAULT_SUPERNODE_PORT",
    "FLOWER_ENV",
    "Deployment",
    "NodeKeys",
    "fast_setup",
    "ProcessRecord",
    "TlsFiles",
    "deployment_env",
    "flwr_home",
    "format_node_config",
    "format_run_config",
    "list_nodes",
    "make_certificates",
    "make_node_keys",
    "process_alive",
    "register_node",
    "run_app",
    "spawn_process",
    "start_deployment",
    "start_superlink",
    "start_supernode",
    "state_dir_for",
    "stop_deployment",
    "stop_processes",
    "superlink_command",
    "supernode_command",
    "wait_for_nodes",
    "write_connection",
]
