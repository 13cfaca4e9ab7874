"""The job configuration: Flower's ``run_config`` parsed and checked once, before training.

Flower hands the apps a flat mapping of ``bool | int | float | str`` values (the
``[tool.flwr.app.config]`` table, overridden by ``--run-config``). This module turns
it into one frozen :class:`JobConfig`. Every bad value raises ``ValueError`` naming
the key, the value and the fix, so a typo stops the run before any node trains.

The defaults here are the defaults of ``pyproject.toml`` (a test keeps them equal),
so the in-process simulation API, which passes an empty ``run_config``, runs the
same job as ``flwr run .``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

from .data import DATASETS
from .models import MODELS
from .planner import OBJECTIVES, parse_budgets
from .scoring import SCORERS as _SCORER_FUNCTIONS

__all__ = [
    "JobConfig",
    "load_config",
    "parse_budgets_mb",
    "METHODS",
    "DATASETS",
    "PARTITIONINGS",
    "SCORERS",
    "TRANSPORTS",
    "REPLICA_STORE_AUTO",
    "REPLICA_STORE_CONTEXT",
]

METHODS = ("dsparse", "fedavg")
PARTITIONINGS = ("iid", "dirichlet")
SCORERS = tuple(_SCORER_FUNCTIONS)  # the names of flwr_dsparse.scoring's scorers, not a second list
TRANSPORTS = ("server", "collective")
#: ``replica-store`` values (any other value is a folder): see :mod:`flwr_dsparse.replica_store`.
REPLICA_STORE_AUTO = "auto"
REPLICA_STORE_CONTEXT = "context"


@dataclass(frozen=True)
class JobConfig:
    """One DSparse or FedAvg job, as the ServerApp runs it.

    Field names are the ``run_config`` keys with ``-`` replaced by ``_``.
    """

    method: str = "dsparse"
    num_server_rounds: int = 20
    local_steps: int = 1
    batch_size: int = 32
    lr: float = 0.01
    momentum: float = 0.9
    seed: int = 0
    model: str = "mobilenet_v2"
    initial_weights: str = ""
    dataset: str = "synthetic"
    data_root: str = ""
    train_examples: int = 0
    test_examples: int = 256
    evaluate_every: int = 1
    scorer: str = "gradient"
    partitioning: str = "iid"
    dirichlet_alpha: float = 0.5
    sim_budgets_mb: str = "30,40,50,60,75,95,130"
    memory_reserve_mb: float = 0.0
    allow_inference_only: bool = False
    max_step_fraction: float = 1.0
    plan_objective: str = "balanced"
    rescore_every: int = 0
    min_nodes: int = 2
    round_timeout: float = 600.0
    out_dir: str = "outputs"
    min_replies: int = 1
    round_retries: int = 2
    checkpoint: bool = True
    checkpoint_every: int = 10
    resume: bool = False
    transport: str = "server"
    collective_addr: str = "127.0.0.1"
    collective_port: int = 0
    collective_timeout: float = 60.0
    replica_store: str = REPLICA_STORE_AUTO

    @property
    def budgets_mb(self) -> list[float]:
        """``sim-budgets-mb`` as numbers, one per partition id (may be empty)."""
        return parse_budgets_mb(self.sim_budgets_mb)

    def to_run_config(self) -> dict[str, Any]:
        """Back to ``run_config`` keys (``-`` separated), e.g. to ship in a ConfigRecord."""
        return {key.replace("_", "-"): value for key, value in asdict(self).items()}


def _keys() -> dict[str, type]:
    return {f.name.replace("_", "-"): type(f.default) for f in fields(JobConfig)}


def parse_budgets_mb(text: str, *, key: str = "sim-budgets-mb") -> list[float]:
    """Parse ``"80,110,150"`` into MB values; an empty string means no simulated budgets."""
    if not text.strip():
        return []
    return parse_budgets(text, field=key)


def _coerce(key: str, value: Any, kind: type) -> Any:
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ValueError(f"{key} must be true or false, got {value!r}")
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{key} must be a whole number, got {value!r}; write e.g. {key}=4")
        return value
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{key} must be a number, got {value!r}; write e.g. {key}=0.5")
        return float(value)
    if not isinstance(value, str):
        raise ValueError(f'{key} must be a string, got {value!r}; quote it, e.g. {key}="{value}"')
    return value


def _one_of(key: str, value: str, choices: tuple[str, ...] | list[str]) -> None:
    if value not in choices:
        raise ValueError(f"{key} is {value!r}; set {key} to one of: {', '.join(choices)}")


def _positive(key: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{key} must be > 0, got {value!r}; set a positive {key}")


def load_config(run_config: Mapping[str, Any]) -> JobConfig:
    """Parse and validate ``run_config``; missing keys take the defaults.

    Parameters
    ----------
    run_config : Mapping[str, Any]
        Flower's ``context.run_config`` (keys ``-`` separated).

    Returns
    -------
    JobConfig
        The checked configuration.

    Raises
    ------
    ValueError
        For an unknown key, a value of the wrong type, or a value out of range.
        The message names the key and how to fix it.
    """
    kinds = _keys()
    unknown = sorted(set(run_config) - set(kinds))
    if unknown:
        raise ValueError(
            f"unknown run_config key(s) {unknown}; valid keys are: {', '.join(kinds)} "
            "(fix the name in [tool.flwr.app.config] or in --run-config)"
        )
    values = {key: _coerce(key, value, kinds[key]) for key, value in run_config.items()}
    config = JobConfig(**{key.replace("-", "_"): value for key, value in values.items()})

    _one_of("method", config.method, METHODS)
    _one_of("model", config.model, sorted(MODELS))
    _one_of("dataset", config.dataset, DATASETS)
    _one_of("scorer", config.scorer, SCORERS)
    _one_of("partitioning", config.partitioning, PARTITIONINGS)
    _one_of("transport", config.transport, TRANSPORTS)
    _one_of("plan-objective", config.plan_objective, OBJECTIVES)
    positive = (
        "checkpoint-every",
        "evaluate-every",
        "num-server-rounds",
        "local-steps",
        "batch-size",
        "lr",
        "dirichlet-alpha",
        "round-timeout",
        "min-nodes",
    )
    for key in positive + ("min-replies", "collective-timeout"):
        _positive(key, values.get(key, getattr(config, key.replace("-", "_"))))
    for key in ("momentum", "memory-reserve-mb", "train-examples", "test-examples", "round-retries", "rescore-every"):
        value = getattr(config, key.replace("-", "_"))
        if value < 0:
            raise ValueError(f"{key} must be >= 0, got {value!r}")
    if not 0 < config.max_step_fraction <= 1:
        raise ValueError(
            f"max-step-fraction must be in (0, 1], got {config.max_step_fraction}; 1 sets no cap by hand, "
            "0.6 caps every device's predicted step at 60% of a full update's"
        )
    if not 0 <= config.collective_port <= 65535:
        raise ValueError(
            f"collective-port must be 0 (a free port each round) or a TCP port 1..65535, got {config.collective_port}"
        )
    if config.momentum >= 1:
        raise ValueError(f"momentum must be below 1, got {config.momentum}; use e.g. momentum=0.9")
    if config.method == "fedavg" and (config.resume or config.transport != "server"):
        raise ValueError(
            'resume and transport="collective" are DSparse features; set method="dsparse", '
            'or resume=false and transport="server" for FedAvg'
        )
    if not config.replica_store.strip():
        raise ValueError(
            f'replica-store is empty; set it to "{REPLICA_STORE_AUTO}", "{REPLICA_STORE_CONTEXT}" '
            "or a folder that exists on every node"
        )
    _ = config.budgets_mb  # parse now: a malformed budgets string must fail before training
    if config.dataset == "cifar10" and not config.data_root:
        raise ValueError(
            'dataset="cifar10" needs data-root: set data-root to the folder that holds '
            "cifar-10-batches-py (e.g. --run-config 'data-root=\"/data\"')"
        )
    return config
