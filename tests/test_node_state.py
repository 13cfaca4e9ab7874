"""The live node state (flwr_dsparse.node_state), the one-copy and fused codec (records) and checkpoint-every."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flwr.app import Array, ArrayRecord

import client.app as client_app_module
from client.app import app
from experiments.fault_matrix import SMALL_JOB
from flwr_dsparse import node_state
from flwr_dsparse.config import load_config
from flwr_dsparse.protocol import FUSED, FUSED_STYPE, STATE_META, STATE_MOMENTUM, STATE_REPLICA
from flwr_dsparse.records import (
    FUSED_ALIGN,
    FUSED_MAGIC,
    FUSED_PREFIX,
    array_of,
    from_array_record,
    fuse_record,
    is_fused,
    record_nbytes,
    tensor_nbytes,
    tensor_of,
    to_array_record,
)
from flwr_dsparse.replica_store import (
    _SEEN,
    HEADER_BYTES,
    REPLICA_STORE_ENV,
    RUN_FOLDER_PREFIX,
    ReplicaStore,
    make_run_folder,
    replica_store_for,
    replica_store_from_env,
)
from flwr_dsparse.testing import LocalGrid
from server.app import run_job

JOB = {**SMALL_JOB, "num-server-rounds": 3, "checkpoint-every": 1}
_TAKE = node_state.take


def _run(tmp_path, monkeypatch, *, live: bool | str, fault=None, **extra):
    """``live``: True uses the live state; False never looks; ``"stale"`` finds every entry stale."""
    hits = []
    take = _TAKE  # not node_state.take: an earlier _run of the same test patched it

    def counting_take(run_id, node_id, token, *, stale=False):
        if live == "stale":
            _make_stale(run_id, node_id)
        state = take(run_id, node_id, token, stale=stale) if live else None
        hits.append(state is not None)
        return state

    monkeypatch.setattr(node_state, "take", counting_take)
    node_state.clear()
    grid = LocalGrid(app, range(3), 3, fault=fault)
    run_job(grid, load_config({**JOB, **extra, "out-dir": str(tmp_path)}))  # type: ignore[arg-type]
    model = torch.load(tmp_path / "final_model.pt")
    contexts = {node.partition: node.context for node in grid.nodes.values()}
    return model, contexts, hits


def _make_stale(run_id: int, node_id: int) -> None:
    """As if another actor had trained the node since: another token, and its tensors and momentum all wrong."""
    entry = node_state._LIVE.get((run_id, node_id))
    if entry is None:
        return
    entry.token = f"not-{entry.token}"
    with torch.no_grad():
        for tensor in [*entry.tensors.values(), *entry.momentum.values()]:
            tensor.fill_(7)
        optimizer = entry.trainer.optimizer if entry.trainer is not None else None
        for state in optimizer.state.values() if optimizer is not None else ():
            state["momentum_buffer"].fill_(-3)


def test_live_state_and_rebuilding_from_context_state_are_bit_identical(tmp_path, monkeypatch, one_torch_thread):
    cached, cached_nodes, hits = _run(tmp_path / "live", monkeypatch, live=True)
    rebuilt, rebuilt_nodes, misses = _run(tmp_path / "rebuilt", monkeypatch, live=False)
    # Round 1 builds every node; rounds 2 and 3 use the live model of each of the 3 nodes.
    assert hits.count(True) == 6 and not any(misses)
    assert _sources(tmp_path / "live") == [[0, 0, 0], [1, 1, 1], [1, 1, 1]]  # as the history reports it
    assert _sources(tmp_path / "rebuilt") == [[0, 0, 0]] * 3
    assert cached.keys() == rebuilt.keys()
    assert all(torch.equal(cached[name], rebuilt[name]) for name in cached)
    for partition, context in cached_nodes.items():
        other = rebuilt_nodes[partition].state
        for key in (STATE_MOMENTUM, STATE_REPLICA):
            a, b = from_array_record(context.state[key]), from_array_record(other[key])
            assert a.keys() == b.keys() and a, (partition, key)
            assert all(torch.equal(a[name], b[name]) for name in a), (partition, key)


def test_a_live_node_sent_every_tensor_keeps_its_live_state_with_the_same_bits(tmp_path, monkeypatch, one_torch_thread):
    """Where some node trains every unit, every tensor changes each round and each node is sent all of
    them. Its live state is still valid (its token matches) and is kept: the same bits as rebuilding."""
    every_unit = {"sim-budgets-mb": "60,60,60"}
    reads = []
    durable_copy = client_app_module._durable_copy
    monkeypatch.setattr(client_app_module, "_durable_copy", lambda *a: reads.append(1) or durable_copy(*a))
    cached, _, hits = _run(tmp_path / "live", monkeypatch, live=True, **every_unit)
    assert len(reads) == 3  # round 1's misses only: rounds 2 and 3 read no durable copy
    rebuilt, _, misses = _run(tmp_path / "rebuilt", monkeypatch, live=False, **every_unit)
    rounds = [r for r in json.loads((tmp_path / "live" / "metrics.json").read_text())["rounds"] if r.get("devices")]
    whole = [r["devices"]["0"]["bytes-down"] for r in rounds]
    assert whole == [whole[0]] * 3  # rounds 2 and 3 send node 0 as much as round 1: the whole model
    assert hits.count(True) == 6 and not any(misses)
    assert _same(cached, rebuilt)


def test_a_rounds_random_draws_are_the_nodes_own_whether_its_state_is_live_or_rebuilt(
    tmp_path, monkeypatch, one_torch_thread
):
    """Dropout (as in MobileNetV2's classifier) draws from the node's seed for the round, not from the
    process's generator, which building a model reseeds: kept alive or rebuilt, the same bits."""
    build = client_app_module.build_model

    def with_dropout(*args, **kwargs):
        model = build(*args, **kwargs)
        model.classifier.register_forward_pre_hook(lambda module, inputs: (F.dropout(inputs[0], 0.5, module.training),))
        return model

    monkeypatch.setattr(client_app_module, "build_model", with_dropout)
    cached, _, hits = _run(tmp_path / "live", monkeypatch, live=True)
    rebuilt, _, misses = _run(tmp_path / "rebuilt", monkeypatch, live=False)
    assert hits.count(True) == 6 and not any(misses)
    assert _same(cached, rebuilt)
    before = torch.random.get_rng_state()
    with client_app_module.round_random_draws(0, 1, 2):
        first = torch.rand(3)
    assert torch.equal(torch.random.get_rng_state(), before)  # the process's generator is left as it was
    with client_app_module.round_random_draws(0, 1, 2):
        assert torch.equal(torch.rand(3), first)
    with client_app_module.round_random_draws(0, 1, 3):
        assert not torch.equal(torch.rand(3), first)  # another round draws other numbers


def test_a_miss_trains_a_retired_model_as_it_would_a_new_one(tmp_path, monkeypatch, one_torch_thread):
    """A stale entry's model (hooks off, gradients dropped) is reused: the same bits as building one."""
    built = []
    build = client_app_module.build_model
    monkeypatch.setattr(client_app_module, "build_model", lambda *a, **k: built.append(1) or build(*a, **k))
    rebuilt, rebuilt_nodes, _ = _run(tmp_path / "rebuilt", monkeypatch, live=False)
    built_fresh = len(built)
    built.clear()
    reused, reused_nodes, hits = _run(tmp_path / "reused", monkeypatch, live="stale")
    assert not any(hits) and built_fresh == 9 and len(built) == 3  # rounds 2 and 3 reuse round 1's models
    assert _same(rebuilt, reused)
    for partition, context in reused_nodes.items():
        for key in (STATE_MOMENTUM, STATE_REPLICA):
            other = rebuilt_nodes[partition].state
            assert _same(from_array_record(context.state[key]), from_array_record(other[key])), (partition, key)


def _sources(out_dir) -> list[list[float]]:
    """Each training round's state-source per node (0 loaded, 1 live, 2 refreshed), from the history."""
    rounds = [r for r in json.loads((out_dir / "metrics.json").read_text())["rounds"] if r.get("devices")]
    return [[r["devices"][str(pid)]["state-source"] for pid in range(3)] for r in rounds]


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)


@pytest.mark.parametrize("live", [False, True], ids=["whole-writes", "live-nodes-rewrite-what-changed"])
def test_the_replica_store_holds_what_context_state_would_and_gives_the_same_model(
    live, tmp_path, monkeypatch, one_torch_thread
):
    cached, cached_nodes, _ = _run(tmp_path / "live", monkeypatch, live=True)
    monkeypatch.setenv(REPLICA_STORE_ENV, str(tmp_path / "store"))
    stored, stored_nodes, hits = _run(tmp_path / "stored", monkeypatch, live=live)
    assert hits.count(True) == (6 if live else 0) and _same(cached, stored)
    store = ReplicaStore(tmp_path / "store")
    for partition, context in stored_nodes.items():
        # Only the token travels in context.state; the node's disk holds the same state.
        assert STATE_REPLICA not in context.state and STATE_MOMENTUM not in context.state
        replica, momentum = store.load(context.run_id, context.node_id, context.state[STATE_META]["token"])
        expected = cached_nodes[partition].state
        assert _same(replica, from_array_record(expected[STATE_REPLICA])), partition
        assert _same(momentum, from_array_record(expected[STATE_MOMENTUM])) and momentum, partition
    entries = sorted(p.name for p in store.folder.iterdir())  # one per node, no partial files left
    assert entries == sorted(store.path(c.run_id, c.node_id).name for c in stored_nodes.values())


def test_a_stale_entry_is_refreshed_from_the_store_in_place_with_the_same_bits(tmp_path, monkeypatch, one_torch_thread):
    """Another actor trained the node since (its entry here holds other bits): with a store the entry's
    model is read in place and its trainer kept, and the run ends as one that never went stale."""
    built, loads = [], []
    build = client_app_module.build_model
    monkeypatch.setattr(client_app_module, "build_model", lambda *a, **k: built.append(1) or build(*a, **k))
    load_into = ReplicaStore.load_into
    monkeypatch.setattr(ReplicaStore, "load_into", lambda *a: loads.append(1) or load_into(*a))
    cached, cached_nodes, _ = _run(tmp_path / "live", monkeypatch, live=True)
    monkeypatch.setenv(REPLICA_STORE_ENV, str(tmp_path / "store"))
    built.clear()
    refreshed, refreshed_nodes, hits = _run(tmp_path / "stale", monkeypatch, live="stale")
    assert hits.count(True) == 6 and len(loads) == 6 and len(built) == 3  # rounds 2 and 3 build nothing
    assert _sources(tmp_path / "stale") == [[0, 0, 0], [2, 2, 2], [2, 2, 2]]
    assert _same(cached, refreshed)
    store = ReplicaStore(tmp_path / "store")
    for partition, context in refreshed_nodes.items():
        replica, momentum = store.load(context.run_id, context.node_id, context.state[STATE_META]["token"])
        expected = cached_nodes[partition].state
        assert _same(replica, from_array_record(expected[STATE_REPLICA])), partition
        assert _same(momentum, from_array_record(expected[STATE_MOMENTUM])) and momentum, partition


def test_load_into_reads_an_entry_into_the_given_tensors_or_leaves_them_untouched(tmp_path):
    store = ReplicaStore(tmp_path / "store")
    replica = {"w": torch.randn(2, 3), "n": torch.tensor(4), "b": torch.randn(5, dtype=torch.float64)}
    momentum = {"w": torch.randn(2, 3)}
    store.save(1, 7, "t1", replica, momentum)
    live = {name: torch.zeros_like(tensor) for name, tensor in replica.items()}
    addresses = {name: tensor.data_ptr() for name, tensor in live.items()}
    got = store.load_into(1, 7, "t1", live)
    assert _same(got, momentum) and _same(live, replica)
    assert {name: tensor.data_ptr() for name, tensor in live.items()} == addresses  # the same memory
    misfits = {
        "another shape": {**live, "w": torch.zeros(3, 2)},
        "another dtype": {**live, "b": torch.zeros(5)},
        "a name missing": {"w": live["w"], "n": live["n"]},
        "a name more": {**live, "x": torch.zeros(1)},
        "not contiguous": {**live, "w": torch.zeros(3, 2).t()},
    }
    for why, tensors in misfits.items():
        before = {name: tensor.clone() for name, tensor in tensors.items()}
        assert store.load_into(1, 7, "t1", tensors) is None, why
        assert _same(tensors, before), why
    assert store.load_into(1, 7, "t0", live) is None and store.load_into(1, 7, None, live) is None


def test_a_save_after_a_load_rewrites_only_what_changed(tmp_path):
    """A process that read an entry (a forked ClientApp, a refreshed live node) rewrites only part of it."""
    store = ReplicaStore(tmp_path / "store")
    store.save(1, 7, "t1", {"a": torch.zeros(4), "b": torch.zeros(3)}, {"a": torch.zeros(4)})
    _SEEN.clear()  # as a new process
    replica, momentum = store.load(1, 7, "t1")
    replica["a"] += 1
    replica["b"] += 5  # changed, but not said to be: an in-place rewrite leaves it as it was on disk
    momentum["a"] += 2
    store.save(1, 7, "t2", replica, momentum, changed={"a"})
    got_replica, got_momentum = store.load(1, 7, "t2")
    assert _same(got_replica, {"a": torch.ones(4), "b": torch.zeros(3)}) and _same(got_momentum, momentum)


def test_live_entries_beyond_max_live_bytes_retire_the_oldest(monkeypatch):
    node_state.clear()
    monkeypatch.setattr(node_state, "MAX_LIVE_BYTES", 2 * 4 * 6)  # two entries of 6 float32 values
    for node, server_round in ((7, 3), (8, 1), (9, 2)):
        model = torch.nn.Linear(2, 2)
        entry = node_state.NodeState(str(node), model, ["w"], tensors=model.state_dict(), server_round=server_round)
        node_state.put(1, node, entry)
    assert node_state.take(1, 8, "8") is None  # the oldest round, retired
    assert node_state.take(1, 7, "7") is not None and node_state.take(1, 9, "9") is not None
    node_state.clear()


def test_a_node_whose_store_entry_vanished_fails_one_round_and_is_resent_the_model(
    tmp_path, monkeypatch, one_torch_thread
):
    """As a node that lost its context.state: its round is refused (never applied stale), the others'
    replies are, and the server resends it the whole model the round after."""
    monkeypatch.setenv(REPLICA_STORE_ENV, str(tmp_path / "store"))
    store = ReplicaStore(tmp_path / "store")

    def lose_node_1_after_round_1(partition, server_round, message, reply):
        if (partition, server_round) == (1, 1):
            store.path(1, message.metadata.dst_node_id).unlink()
        return reply

    _run(tmp_path / "run", monkeypatch, live=False, fault=lose_node_1_after_round_1)
    rounds = [r for r in json.loads((tmp_path / "run" / "metrics.json").read_text())["rounds"] if r.get("devices")]
    assert [sorted(r["accepted"]) for r in rounds] == [[0, 1, 2], [0, 2], [0, 1, 2]]
    assert rounds[1]["devices"]["1"]["status"] != "ok"
    model_bytes = rounds[0]["devices"]["1"]["bytes-down"]  # round 1 sends every node the whole model
    assert rounds[2]["devices"]["1"]["bytes-down"] == model_bytes > rounds[2]["devices"]["0"]["bytes-down"]


def test_a_store_entry_is_read_only_under_its_token_run_and_node(tmp_path):
    store = ReplicaStore(tmp_path / "store")
    replica, momentum = {"w": torch.randn(3), "n": torch.tensor(2)}, {"w": torch.randn(3)}
    store.save(1, 7, "t1", replica, momentum)
    got_replica, got_momentum = store.load(1, 7, "t1")
    assert _same(got_replica, replica) and _same(got_momentum, momentum)
    assert store.load(1, 7, "t0") is None  # stale: another process wrote the node since
    assert store.load(2, 7, "t1") is None and store.load(1, 8, "t1") is None  # another run, another node
    assert store.load(1, 7, None) is None  # context.state lost its token
    store.save(1, 7, "t2", {"w": torch.zeros(3)}, {})
    assert store.load(1, 7, "t1") is None and _same(store.load(1, 7, "t2")[0], {"w": torch.zeros(3)})
    assert [p.name for p in store.folder.iterdir()] == [store.path(1, 7).name]  # overwritten in place
    assert replica_store_from_env({}) is None and replica_store_from_env({REPLICA_STORE_ENV: ""}) is None
    assert replica_store_from_env({REPLICA_STORE_ENV: str(tmp_path)}).folder == tmp_path


def test_a_save_rewrites_only_what_changed_while_the_file_holds_this_process_s_last_write(tmp_path):
    store = ReplicaStore(tmp_path / "store")
    replica, momentum = {"a": torch.zeros(4), "b": torch.zeros(3)}, {"a": torch.zeros(4)}
    store.save(1, 7, "t1", replica, momentum)
    replica["a"] += 1
    momentum["a"] += 2
    replica["b"] += 5  # changed, but not said to be: an in-place rewrite leaves it as it was on disk
    store.save(1, 7, "t2", replica, momentum, changed={"a"})
    got_replica, got_momentum = store.load(1, 7, "t2")
    assert _same(got_replica, {"a": torch.ones(4), "b": torch.zeros(3)}) and _same(got_momentum, momentum)
    # Another process wrote the entry since (its token in the header): the whole entry is written.
    path = store.path(1, 7)
    header = json.loads(path.read_bytes()[:HEADER_BYTES])
    path.write_bytes(
        json.dumps({**header, "token": "other"}).encode().ljust(HEADER_BYTES) + path.read_bytes()[HEADER_BYTES:]
    )
    store.save(1, 7, "t3", replica, momentum, changed={"a"})
    assert _same(store.load(1, 7, "t3")[0], replica)
    # Another shape (a new selection's momentum): the whole entry again, the file resized.
    store.save(1, 7, "t4", replica, {"b": torch.full((3,), 7.0)}, changed=set())
    assert _same(store.load(1, 7, "t4")[1], {"b": torch.full((3,), 7.0)})
    assert store.load(1, 7, "t3") is None


def test_a_store_entry_cut_short_or_caught_mid_write_is_no_entry(tmp_path):
    """A reader never takes a partial write: the server then resends, as for a lost entry."""
    store = ReplicaStore(tmp_path / "store")
    big = {"w": torch.randn(1000)}
    store.save(1, 7, "t1", big, {})
    path = store.path(1, 7)
    whole = path.read_bytes()
    path.write_bytes(whole[: len(whole) - 100])  # the arrays cut short
    assert store.load(1, 7, "t1") is None
    path.write_bytes(b" " * HEADER_BYTES + whole[HEADER_BYTES:])  # the header blanked (the write's first step)
    assert store.load(1, 7, "t1") is None
    path.write_bytes(b"not an entry")
    assert store.load(1, 7, "t1") is None
    store.save(1, 7, "t2", {"w": torch.ones(2)}, {"w": torch.ones(2)})  # over the junk, and smaller
    assert _same(store.load(1, 7, "t2")[1], {"w": torch.ones(2)}) and path.stat().st_size < len(whole)


def test_a_simulations_run_folder_is_named_after_its_process_and_dead_ones_are_removed(tmp_path):
    """A ServerApp killed before its cleanup leaves its run folder; the next run removes it."""
    import os
    import subprocess
    import sys

    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True).stdout)
    left = tmp_path / f"{RUN_FOLDER_PREFIX}{dead}-abc"
    mine = tmp_path / f"{RUN_FOLDER_PREFIX}{os.getpid()}-def"
    unnamed = tmp_path / f"{RUN_FOLDER_PREFIX}xyz"
    for folder in (left, mine, unnamed):
        (folder / "entry").mkdir(parents=True)
    made = make_run_folder(tmp_path)
    assert made.name.startswith(f"{RUN_FOLDER_PREFIX}{os.getpid()}-") and made.is_dir()
    assert not left.exists() and mine.exists() and unnamed.exists()  # only a gone process's


def test_the_replica_store_key_names_the_folder_or_context_state(tmp_path):
    env = {REPLICA_STORE_ENV: str(tmp_path / "env")}
    assert replica_store_for("context", env) is None  # always context.state
    assert replica_store_for("auto", env).folder == tmp_path / "env"  # the node's own folder
    assert replica_store_for("auto", {}) is None  # none set: context.state
    assert replica_store_for(str(tmp_path / "job"), env).folder == tmp_path / "job"  # the job's folder wins
    with pytest.raises(ValueError, match="replica-store is empty"):
        load_config({"replica-store": " "})


def test_a_live_state_is_used_only_for_its_run_node_and_token():
    model = torch.nn.Linear(2, 2)
    node_state.clear()
    node_state.put(1, 7, node_state.NodeState("t1", model, ["a"]))
    assert node_state.take(2, 7, "t1") is None  # another run
    assert node_state.take(1, 8, "t1") is None  # another node
    assert node_state.take(1, 7, "t0") is None  # stale: another process trained the node since
    assert node_state.take(1, 7, "t1") is None  # ...and the stale entry was dropped
    node_state.put(1, 7, node_state.NodeState("t1", model, ["a"]))
    assert node_state.take(1, 7, "t0", stale=True).model is model  # to refresh from a replica store
    node_state.put(1, 7, node_state.NodeState("t1", model, ["a"]))
    assert node_state.take(1, 7, None, stale=True) is None  # but never without a token
    node_state.put(1, 7, node_state.NodeState("t1", model, ["a"]))
    assert node_state.take(1, 7, None) is None  # context.state lost its token (a restarted node)
    node_state.put(1, 7, node_state.NodeState("t1", model, ["a"]))
    assert node_state.take(1, 7, "t1").model is model
    assert node_state.new_token(3) != node_state.new_token(3)


def test_a_miss_without_spares_reclaims_the_oldest_entry_stale_by_age_only():
    node_state.clear()
    old, older, fresh, other = (torch.nn.Linear(2, 2) for _ in range(4))
    node_state.put(1, 7, node_state.NodeState("a", old, ["w"], model_name="lin", server_round=3))
    node_state.put(1, 8, node_state.NodeState("b", older, ["w"], model_name="lin", server_round=2))
    node_state.put(1, 9, node_state.NodeState("c", fresh, ["w"], model_name="lin", server_round=4))
    node_state.put(1, 10, node_state.NodeState("d", other, ["w"], model_name="conv", server_round=1))
    assert node_state.spare_model("lin") is None  # without reclaim_before nothing live is touched
    assert node_state.spare_model("lin", reclaim_before=4) is older  # the oldest of rounds < 4
    assert node_state.take(1, 8, "b") is None and node_state.take(1, 7, "a").model is old
    assert node_state.spare_model("lin", reclaim_before=4) is None  # round 4 may still be current
    assert node_state.take(1, 9, "c").model is fresh and node_state.take(1, 10, "d").model is other
    node_state.clear()


@pytest.mark.parametrize(
    "tensor",
    [
        torch.randn(3, 4),
        torch.randn(0),
        torch.tensor(3.0),
        torch.arange(5),
        torch.randn(4, 3, 2).permute(2, 0, 1),
        torch.ones(2, dtype=torch.bool),
    ],
)
def test_array_of_writes_the_bytes_of_np_save_and_reads_them_back(tensor):
    ours, flowers = array_of(tensor), Array(tensor.contiguous().numpy())
    fields = ("data", "dtype", "shape", "stype")
    assert [getattr(ours, f) for f in fields] == [getattr(flowers, f) for f in fields]
    view = tensor_of(ours, writable=False)
    assert torch.equal(view, tensor) and torch.equal(tensor_of(flowers), tensor)
    wire = np.frombuffer(ours.data, dtype=np.uint8).ctypes.data
    if tensor.numel():  # a view of the wire bytes, never copied; the writable one is a copy
        assert wire <= view.data_ptr() < wire + len(ours.data)
        assert not wire <= tensor_of(ours).data_ptr() < wire + len(ours.data)


def test_nodes_upload_momentum_only_in_checkpoint_every_rounds_and_the_last(tmp_path, monkeypatch, one_torch_thread):
    _run(tmp_path, monkeypatch, live=True, **{"num-server-rounds": 5, "checkpoint-every": 2})
    rounds = [row for row in json.loads((tmp_path / "metrics.json").read_text())["rounds"] if row.get("devices")]
    uploaded = {row["round"]: sum(d.get("bytes-up-state", 0) for d in row["devices"].values()) for row in rounds}
    assert [r for r, nbytes in uploaded.items() if nbytes] == [2, 4, 5]


# ----------------------------------------------------------------------------- fused records


def _mixed() -> dict[str, torch.Tensor]:
    return {
        "conv.weight": torch.randn(4, 3, 3, 3),
        "bn.num_batches_tracked": torch.tensor(7),
        "bn.running_mean": torch.randn(4),
        "empty": torch.randn(0, 2),
        "steps": torch.arange(6).view(2, 3),
        "fc.weight": torch.randn(5, 4).t(),  # not contiguous
    }


def test_fused_record_is_one_array_of_every_dtype_and_reads_back_in_order():
    tensors = _mixed()
    record = fuse_record(tensors)
    assert list(record) == [FUSED] and record[FUSED].stype == FUSED_STYPE  # one Array: 6 objects a message
    assert is_fused(record) and record_nbytes(record) == tensor_nbytes(tensors)
    buffers = {dtype: offset for dtype, offset, _ in _layout(record)["buffers"]}
    assert sorted(buffers) == ["float32", "int64"] and all(offset % FUSED_ALIGN == 0 for offset in buffers.values())
    # Fused from already-encoded Arrays (the server's shared encodings): the same bytes.
    again = fuse_record(to_array_record(tensors))
    assert bytes(again[FUSED].data) == bytes(record[FUSED].data)
    views, copies = from_array_record(record, writable=False), from_array_record(record)
    assert list(views) == list(copies) == list(tensors)
    for name, tensor in tensors.items():
        assert torch.equal(views[name], tensor) and torch.equal(copies[name], tensor)
    wire = np.frombuffer(record[FUSED].data, dtype=np.uint8).ctypes.data
    size = len(record[FUSED].data)
    assert wire <= views["conv.weight"].data_ptr() < wire + size  # a view of the wire bytes
    assert not wire <= copies["conv.weight"].data_ptr() < wire + size
    assert fuse_record(record) is record  # fusing twice changes nothing
    single = fuse_record({"w": torch.ones(2)})
    assert list(single) == ["w"] and not is_fused(single)  # one tensor: nothing to fuse


def _layout(record: ArrayRecord) -> dict:
    data = bytes(record[FUSED].data)
    _, at, _ = FUSED_PREFIX.unpack_from(data)
    return json.loads(data[at:])


def _relaid(record: ArrayRecord, text: bytes, *, magic: bytes = FUSED_MAGIC) -> ArrayRecord:
    """``record``'s fused Array with its layout replaced by ``text`` (and its prefix by ``magic``)."""
    data = bytes(record[FUSED].data)
    _, at, _ = FUSED_PREFIX.unpack_from(data)
    data = FUSED_PREFIX.pack(magic, at, len(text)) + data[FUSED_PREFIX.size : at] + text
    return ArrayRecord({FUSED: Array(dtype="uint8", shape=(len(data),), stype=FUSED_STYPE, data=data)})


def _tensors_changed(change):
    return lambda layout: {**layout, "tensors": change(layout["tensors"])}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (_tensors_changed(lambda t: t + [["ghost", "float32", [2]]]), "needs more"),
        (_tensors_changed(lambda t: t[:-1]), "more values than the layout uses"),
        (_tensors_changed(lambda t: t + [t[0]]), "names a tensor twice"),
        (_tensors_changed(lambda t: [[t[0][0], "float64", t[0][2]], *t[1:]]), "lacks the float64 buffer"),
        (_tensors_changed(lambda t: [[n, d, [-1] + s[1:]] if s else [n, d, s] for n, d, s in t]), "negative dimension"),
        (lambda layout: {**layout, "buffers": [["float32", 64, 10**9]]}, "outside the record's bytes"),
        (lambda layout: {**layout, "buffers": [["float32", 64, 5], ["float32", 128, 0]]}, "two buffers"),
        (lambda layout: {**layout, "buffers": [["no-such-dtype", 64, 1]]}, "is not a dtype"),
        (lambda layout: {"not": "a list"}, "not the JSON of tensors and buffers"),
    ],
)
def test_a_fused_record_that_does_not_match_its_layout_is_refused(change, message):
    record = fuse_record({"a": torch.randn(3), "b": torch.randn(2, 2)})
    broken = _relaid(record, json.dumps(change(_layout(record))).encode())
    with pytest.raises(ValueError, match=message):
        from_array_record(broken)
    stray = ArrayRecord({**dict(record), "stray": array_of(torch.ones(1))})
    with pytest.raises(ValueError, match="arrays besides"):
        from_array_record(stray)
    with pytest.raises(ValueError, match="prefix"):
        from_array_record(_relaid(record, json.dumps(_layout(record)).encode(), magic=b"NOTFUSED"))


def test_fused_replies_pass_every_check_of_the_strategy():
    """NaN, names outside the selection, wrong shapes and a broken layout are refused with the reason."""
    from flwr.app import Message, MessageType, RecordDict

    from flwr_dsparse.protocol import ARRAYS, TrainReport, train_reply_content
    from flwr_dsparse.strategy.replies import ReplyRejected, accept_train_reply

    selected = {"a.weight": torch.zeros(3, 2), "a.bias": torch.zeros(3), "bn.num_batches_tracked": torch.tensor(0)}
    report = TrainReport(1, 0, 8, 0.5, 0.1, 100.0, 0, 0, 50.0)

    def reply(tensors):
        content = train_reply_content(fuse_record(tensors), report)
        return Message(content, dst_node_id=1, message_type=MessageType.TRAIN, group_id="1")

    good = {name: torch.ones_like(t) for name, t in selected.items()}
    accepted = accept_train_reply(reply(good), 1, 0, selected, ["a.weight", "a.bias"])
    assert sorted(accepted.update.tensors) == sorted(selected)
    cases = {
        "non-finite": {**good, "a.bias": torch.tensor([1.0, float("nan"), 0.0])},
        "unexpected-tensors": {**good, "b.weight": torch.ones(2)},
        "missing-tensors": {k: v for k, v in good.items() if k != "a.bias"},
        "shape": {**good, "a.weight": torch.ones(2, 3)},
    }
    for kind, tensors in cases.items():
        with pytest.raises(ReplyRejected) as error:
            accept_train_reply(reply(tensors), 1, 0, selected, ["a.weight", "a.bias"])
        assert error.value.kind == kind, (kind, str(error.value))
    content = reply(good).content
    broken = _relaid(content[ARRAYS], b"[[")
    message = Message(RecordDict({**dict(content), ARRAYS: broken}), dst_node_id=1, message_type=MessageType.TRAIN)
    with pytest.raises(ReplyRejected, match="do not decode.*not the JSON of tensors and buffers") as error:
        accept_train_reply(message, 1, 0, selected, ["a.weight", "a.bias"])
    assert error.value.kind == "malformed"


def test_train_messages_and_dsparse_replies_travel_fused(tmp_path, monkeypatch, one_torch_thread):
    """Down and up, a DSparse message holds a few arrays, not one per tensor; the node's state too."""
    from flwr_dsparse.protocol import ARRAYS

    sizes = []
    send = LocalGrid.send_and_receive

    def counting(self, messages, **kwargs):
        messages = list(messages)
        replies = send(self, messages, **kwargs)
        sizes.extend(len(m.content[ARRAYS]) for m in messages + list(replies) if ARRAYS in m.content.array_records)
        return replies

    monkeypatch.setattr(LocalGrid, "send_and_receive", counting)
    _, contexts, _ = _run(tmp_path, monkeypatch, live=True)
    assert sizes and max(sizes) == 1, sizes  # one Array: every dtype's buffer and the layout
    for context in contexts.values():
        assert is_fused(context.state[STATE_REPLICA])
