"""The DSparse ClientApp: answers the memory query and trains its selection.

Wiring only: the budget comes from node config or the simulated budgets, the data
from :mod:`flwr_dsparse.data`, training from :class:`flwr_dsparse.trainer.SparseTrainer`.
Every job setting arrives in the server's messages (the same :class:`JobConfig` the
server parsed), so a node never disagrees with the server about the model or data.

The node's replica of the global model lives in ``context.state`` between rounds (the
durable copy); the server sends only the tensors it lacks. In a long-lived process
(Flower's simulation actors) the node's model and momentum also stay alive between its
messages (:mod:`flwr_dsparse.node_state`), used only while they match ``context.state``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from functools import lru_cache
from logging import INFO
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message
from flwr.clientapp import ClientApp
from flwr.supercore import log

from flwr_dsparse import node_state
from flwr_dsparse.allocator import tune_allocator
from flwr_dsparse.config import JobConfig, load_config
from flwr_dsparse.data import Split, batches_at, data_cache_from_env, load_dataset, node_stream_seed, partition_indices
from flwr_dsparse.hardcap import join_cap_from_env
from flwr_dsparse.memory import peak_rss_mb
from flwr_dsparse.models import build_model
from flwr_dsparse.protocol import (
    ARRAYS,
    CONFIG,
    NODE_MEMORY_MB,
    NODE_NUM_PARTITIONS,
    NODE_PARTITION_ID,
    OPTIMIZER,
    STATE_LIVE,
    STATE_LOADED,
    STATE_META,
    STATE_MOMENTUM,
    STATE_REFRESHED,
    STATE_REPLICA,
    QueryReply,
    TrainControl,
    TrainReport,
    read_train_message,
    train_reply_content,
)
from flwr_dsparse.records import from_array_record, fuse_record, tensor_nbytes, to_array_record
from flwr_dsparse.replica_store import ReplicaStore, replica_store_for
from flwr_dsparse.sizes import MB
from flwr_dsparse.trainer import SparseTrainer, StepResult, make_optimizer_factory
from flwr_dsparse.units import Unit, model_units, unit_tensor_names

# Every process that trains (simulation actor, deployed ClientApp) runs with the tuned allocator.
tune_allocator()

__all__ = ["app", "train_selection", "node_budget_mb", "round_random_draws"]


app = ClientApp()


# -- pure helpers (used by the handlers and by the tests) ------------------------------------------
def node_budget_mb(node_config: Mapping[str, Any], config: JobConfig) -> tuple[float, str]:
    """This node's memory budget in MB and where it came from.

    Order: node-config ``memory-mb``; else ``sim-budgets-mb[partition-id]``; else
    psutil's available memory minus ``memory-reserve-mb``.
    """
    if NODE_MEMORY_MB in node_config:
        value = node_config[NODE_MEMORY_MB]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise ValueError(
                f"node-config memory-mb is {value!r}; set it to a positive number of MB, e.g. memory-mb=512"
            )
        return float(value), "node-config memory-mb"
    budgets = config.budgets_mb
    partition = int(node_config.get(NODE_PARTITION_ID, -1))
    if budgets:
        if not 0 <= partition < len(budgets):
            raise ValueError(
                f"sim-budgets-mb has {len(budgets)} entries but this node's partition-id is {partition}; "
                f"give one budget per node (num-supernodes) or set memory-mb in its node config"
            )
        return budgets[partition], "sim-budgets-mb"
    import psutil

    available = psutil.virtual_memory().available / MB - config.memory_reserve_mb
    if available <= 0:
        raise ValueError(
            f"available memory minus memory-reserve-mb ({config.memory_reserve_mb:g} MB) is {available:.0f} MB; "
            "lower memory-reserve-mb or set memory-mb in the node config"
        )
    return available, "psutil available - memory-reserve-mb"


def train_selection(
    model: torch.nn.Module,
    selection: list[str],
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    *,
    lr: float,
    momentum: float,
    momentum_state: Mapping[str, torch.Tensor] | None = None,
) -> tuple[list[StepResult], dict[str, torch.Tensor]]:
    """Train ``selection`` of ``model`` with plain SGD, one step per batch.

    The momentum buffers of the selected parameters are restored from
    ``momentum_state`` (by parameter name) and returned updated, because the trainer's
    optimizer is rebuilt every round while momentum must carry over.
    """
    trainer = _sgd_trainer(model, selection, lr=lr, momentum=momentum, momentum_state=momentum_state or {})
    try:
        results = trainer.train(batches)
        return results, trainer.momentum_state()
    finally:
        trainer.close()


def _sgd_trainer(
    model: torch.nn.Module,
    selection: list[str],
    *,
    lr: float,
    momentum: float,
    momentum_state: Mapping[str, torch.Tensor],
    units: list[Unit] | None = None,
) -> SparseTrainer:
    """A trainer of ``selection`` with plain SGD, its momentum buffers restored (by parameter name)."""
    optimizer_factory = make_optimizer_factory("sgd", lr=lr, momentum=momentum)
    trainer = SparseTrainer(model, selection, units=units, optimizer_factory=optimizer_factory)
    trainer.load_momentum_state(momentum_state)
    return trainer


# Kept per process (a simulation actor serves many messages) and, where $DSPARSE_DATA_CACHE
# names a folder (``dsparse deploy up --fast`` sets it), on disk for the next process: a
# deployed ClientApp is a new process for every message. Hit or miss, the same bytes.
@lru_cache(maxsize=4)
def _train_split(dataset: str, root: str, seed: int, train_examples: int) -> Split:
    cache = data_cache_from_env()
    if cache is not None:
        return cache.train_split(dataset, root=root or None, seed=seed, num_train=train_examples or None)
    train, _ = load_dataset(dataset, root=root or None, seed=seed, num_train=train_examples or None, num_test=10)
    return train


@lru_cache(maxsize=8)
def _partition(config: JobConfig, num_partitions: int) -> tuple[np.ndarray, ...]:
    split = _train_split(config.dataset, config.data_root, config.seed, config.train_examples)
    settings = {"method": config.partitioning, "alpha": config.dirichlet_alpha, "seed": config.seed}
    cache = data_cache_from_env()
    if cache is not None:
        return tuple(cache.partitions(split.y, num_partitions, **settings))
    return tuple(partition_indices(split.y, num_partitions, **settings))


def _node_data(config: JobConfig, node_config: Mapping[str, Any]) -> tuple[Split, np.ndarray, int]:
    try:
        partition, count = int(node_config[NODE_PARTITION_ID]), int(node_config[NODE_NUM_PARTITIONS])
    except KeyError as missing:
        raise ValueError(
            f'node config lacks {missing}; start the SuperNode with --node-config "partition-id=0 num-partitions=7"'
        ) from None
    split = _train_split(config.dataset, config.data_root, config.seed, config.train_examples)
    return split, _partition(config, count)[partition], partition


def round_batches(config: JobConfig, split: Split, indices: np.ndarray, partition: int, server_round: int) -> list:
    # The same deterministic stream for DSparse and FedAvg: round r uses steps (r-1)*K .. r*K-1
    # of the node's stream, computed directly (O(K), not a replay of the (r-1)*K before them),
    # so a node rebuilt between rounds resumes exactly.
    return batches_at(
        split,
        indices,
        config.batch_size,
        seed=node_stream_seed(config.seed, partition),
        start=(server_round - 1) * config.local_steps,
        count=config.local_steps,
    )


@contextmanager
def round_random_draws(seed: int, partition: int, server_round: int) -> Iterator[None]:
    """Torch's random draws of one node's round (dropout: MobileNetV2's classifier) from its own seed.

    Without it they come from the process's global generator, whose state depends on what the
    process did before: building a model reseeds it (``build_model``), and a simulation actor
    trains other nodes in between. Seeded from the job's seed, the node and the round alone,
    a round draws the same numbers live, rebuilt or refreshed, on any actor or process; the
    process's own generator is left as it was.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed((node_stream_seed(seed, partition) * 1_000_003 + server_round) % 2**63)
        yield


def _job(message: Message) -> tuple[JobConfig, TrainControl]:
    job, control = read_train_message(message)
    return load_config(job), control


# -- handlers ---------------------------------------------------------------------------------------
@app.query()
def query(msg: Message, context: Context) -> Message:
    """Round 0: report budget, batch size and number of training examples."""
    config = load_config(dict(msg.content[CONFIG]))
    budget, source = node_budget_mb(context.node_config, config)
    _, indices, partition = _node_data(config, context.node_config)
    log(INFO, "device %d: memory budget %.1f MB from %s, batch size %d", partition, budget, source, config.batch_size)
    reply = QueryReply(partition, budget, config.batch_size, len(indices), source)
    return Message(reply.content(), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Apply the received tensors to the replica, train the selection, send it back."""
    config, control = _job(msg)
    split, indices, partition = _node_data(config, context.node_config)
    arrays = msg.content[ARRAYS]
    received = from_array_record(arrays, writable=False)  # views: they are only copied into the model
    bytes_recv = tensor_nbytes(received)
    sparse = config.method != "fedavg"
    store = replica_store_for(config.replica_store)
    meta = context.state.get(STATE_META, ConfigRecord())
    durable_token = meta.get("token")
    # With a store, a stale entry (another actor trained the node since) is refreshed from it.
    live = node_state.take(context.run_id, context.node_id, durable_token, stale=store is not None) if sparse else None
    source = STATE_LIVE if live is not None else STATE_LOADED
    if live is not None and store is not None and live.token != durable_token:
        live = _refreshed(live, store, context, durable_token)
        source = STATE_REFRESHED if live is not None else STATE_LOADED
    durable_momentum: dict[str, torch.Tensor] = {}  # read with the replica when there is no live state
    if live is not None:
        model, tensors, units = live.model, live.tensors, live.units
        _load_into(tensors, received)
    else:
        # A retired model serves as well as a new one: the whole state dict is loaded into it.
        # A node absent from the previous round on this actor was trained elsewhere since.
        # With a store a stale entry is worth keeping (it is refreshed, see above): none is reclaimed.
        reclaim_before = control.server_round - 1 if store is None else None
        spare = node_state.spare_model(config.model, reclaim_before=reclaim_before) if sparse else None
        model = spare if spare is not None else build_model(config.model, seed=config.seed)
        tensors = model.state_dict()
        # From a store the entry is read straight into the model (a third of the cost of a
        # state dict loaded into it); otherwise, or where it does not fit, the whole state dict.
        stored = None
        if sparse and store is not None and len(received) < len(tensors):
            stored = store.load_into(context.run_id, context.node_id, durable_token, tensors)
        if stored is not None:
            durable_momentum = stored
            _load_into(tensors, received)
        else:
            replica, durable_momentum = _durable_copy(context, store, meta)  # FedAvg keeps no replica: {}
            state = {**replica, **received}
            missing = [name for name in tensors if name not in state]
            if missing:
                # A restarted node lost its replica; failing makes the server resend everything.
                raise RuntimeError(
                    f"replica lacks {len(missing)} tensors (e.g. {missing[:2]}); the node lost its state"
                )
            model.load_state_dict(state)
        units = model_units(model)

    if not sparse:
        selection = [unit.name for unit in units]  # FedAvg sends the whole model every round
    else:
        selection = control.units
        if selection is None:
            if "selection" not in meta:
                raise RuntimeError("no selection: this node has no saved selection and the server sent none")
            selection = [name for name in str(meta["selection"]).split(",") if name]

    restored = OPTIMIZER in msg.content.array_records
    if restored:
        # The server's copy of this node's momentum (after a retry, a restart or a resume).
        momentum_state = from_array_record(msg.content[OPTIMIZER])
    elif live is not None:
        momentum_state = live.momentum
    else:
        momentum_state = durable_momentum
    batches = round_batches(config, split, indices, partition, control.server_round)
    # Under `dsparse deploy up --hard-cap`: the cap binds from here, on what training adds (no-op elsewhere).
    join_cap_from_env(resident_mb=tensor_nbytes(tensors) / 2**20, label=",".join(selection))
    # The live trainer's optimizer already holds the momentum it would be restored with. A
    # collective round trains with its own trainer, so the live one's hooks come off first.
    trainer = live.trainer if live is not None else None
    if trainer is not None and (restored or live.selection != selection or control.round_transport == "collective"):
        trainer.close()
        trainer = None
    if control.round_transport == "collective":
        with round_random_draws(config.seed, partition, control.server_round):
            results, momentum_state = _collective_round(config, control, model, units, batches, momentum_state)
    else:
        if trainer is None:
            trainer = _sgd_trainer(
                model, selection, lr=config.lr, momentum=config.momentum, momentum_state=momentum_state, units=units
            )
        with round_random_draws(config.seed, partition, control.server_round):
            results = trainer.train(batches)
        momentum_state = trainer.momentum_state()
        if not sparse:
            trainer.close()  # FedAvg keeps nothing alive
    sent = {name: tensors[name] for name in unit_tensor_names(units, selection)}
    # DSparse records travel fused (one Array for all the tensors: Flower moves each array as
    # objects of its own); Flower's FedAvg averages by array name, so it gets one array per tensor.
    encode = fuse_record if sparse else to_array_record
    reply = encode(sent)
    # Encoded only where it travels: the reply (when asked) and a context.state durable copy.
    momentum_record = encode(momentum_state) if control.send_state or store is None else None
    token = node_state.new_token(control.server_round)
    if store is not None:  # the durable copy on the node's disk; context.state keeps its token
        # The model is the entry this process last wrote or read plus what it received and what
        # it trained (frozen units stay as they were: BatchNorm eval, no gradients), live or
        # loaded, so only those bytes are rewritten (the store checks the file is still that entry).
        changed = {*received, *sent} if sparse else None
        store.save(context.run_id, context.node_id, token, tensors if sparse else {}, momentum_state, changed=changed)
        for key in (STATE_REPLICA, STATE_MOMENTUM):
            context.state.pop(key, None)
    else:
        context.state[STATE_MOMENTUM] = momentum_record
        if sparse:  # the durable copy: the whole model, one fused record (one copy of its bytes)
            context.state[STATE_REPLICA] = fuse_record(tensors)
    context.state[STATE_META] = ConfigRecord({"selection": ",".join(selection), "token": token})
    if sparse:
        kept = node_state.NodeState(
            token, model, selection, momentum_state, config.model, tensors, units, trainer, control.server_round
        )
        node_state.put(context.run_id, context.node_id, kept)
    examples = sum(r.examples for r in results)
    report = TrainReport(
        server_round=control.server_round,
        partition_id=partition,
        num_examples=examples,
        train_loss=sum(r.loss * r.examples for r in results) / max(examples, 1),
        step_seconds=sum(r.seconds for r in results) / max(len(results), 1),
        peak_rss_mb=peak_rss_mb(),
        bytes_recv=bytes_recv,
        bytes_sent=tensor_nbytes(sent),
        # The current budget, so the server re-plans a node whose memory dropped.
        budget_mb=node_budget_mb(context.node_config, config)[0],
        state_source=source,
    )
    state_up = ArrayRecord(dict(momentum_record)) if control.send_state else None  # the same Arrays
    return Message(train_reply_content(reply, report, state_up), reply_to=msg)


def _durable_copy(
    context: Context, store: ReplicaStore | None, meta: ConfigRecord
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The node's replica and momentum as its last message left them (empty where there are none).

    From the node's replica store when one is set (the entry of ``meta``'s token), else from
    ``context.state``.
    """
    if store is not None:
        return store.load(context.run_id, context.node_id, meta.get("token")) or ({}, {})
    replica = from_array_record(context.state[STATE_REPLICA], writable=False) if STATE_REPLICA in context.state else {}
    momentum = from_array_record(context.state[STATE_MOMENTUM]) if STATE_MOMENTUM in context.state else {}
    return replica, momentum


def _refreshed(
    live: node_state.NodeState, store: ReplicaStore, context: Context, token: str | None
) -> node_state.NodeState | None:
    """``live`` (a stale entry) brought to the store's entry under ``token`` in place, or ``None``.

    The tensors are read from the store straight into the live model and the trainer's
    momentum is replaced with the entry's, so the entry is then what a miss would rebuild.
    ``None`` (the entry retired) where the store has no such entry or it does not fit.
    """
    momentum = store.load_into(context.run_id, context.node_id, token, live.tensors)
    if momentum is None:
        node_state.retire(live)
        return None
    if live.trainer is not None:
        live.trainer.load_momentum_state(momentum)
    live.momentum, live.token = momentum, token or ""
    return live


def _load_into(tensors: Mapping[str, torch.Tensor], received: Mapping[str, torch.Tensor]) -> None:
    """Copy ``received`` into the live model's ``tensors`` (its state dict's views, by name)."""
    with torch.no_grad():
        for name, tensor in received.items():
            tensors[name].copy_(tensor)


def _collective_round(
    config: JobConfig,
    control: TrainControl,
    model: torch.nn.Module,
    units,
    batches,
    momentum_state: Mapping[str, torch.Tensor],
) -> tuple[list[StepResult], dict[str, torch.Tensor]]:
    """The round's K steps as per-step synchronous AllReduce/Broadcast among the nodes.

    The server sent every node the whole global model it lacks, so all ranks start equal
    (no initial broadcast). The node's momentum carries over as with the server transport;
    the members average it first, so they stay bit-identical even after a round that the
    server-side transport redid (:func:`flwr_dsparse.collective.sync_momentum`).
    """
    from flwr_dsparse.collective import Rendezvous, run_collective_round
    from flwr_dsparse.plan import Plan

    rendezvous = Rendezvous(control.rank, control.world_size, control.collective_addr, control.collective_port)
    result = run_collective_round(
        Plan.from_json(control.plan),
        rendezvous,
        model,
        batches,
        config.local_steps,
        make_optimizer_factory("sgd", lr=config.lr, momentum=config.momentum),
        config.collective_timeout,
        units=units,
        sync_start=False,
        momentum_state=momentum_state,
    )
    seconds = [c + a for c, a in zip(result.compute_seconds, result.aggregation_seconds, strict=False)]
    steps = [
        StepResult(loss, len(batch[1]), s, saved_mb=0.0)
        for loss, batch, s in zip(result.losses, batches, seconds, strict=False)
    ]
    return steps, result.momentum_state
