"""Zeroth-order FedKSeed mode through the federated loop (LocalGrid, tiny random BERT).

One module-scoped run (K = 4096, 4 clients, 3 rounds, node 1001 offline in round 2)
feeds the wire, replay and catch-up tests; it takes 20 local steps instead of the
default 200 for speed (nothing it checks depends on the number of steps). The byte
budgets are checked at the paper's settings (200 steps) by one run marked slow; the
other tests use short runs (3 to 60 local steps).
"""

from __future__ import annotations

import json
import math
import struct

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

from fedtune import adapters, config, workspace
from fedtune.data import collate
from fedtune.errors import ConfigError
from fedtune.flower import protocol as P
from fedtune.flower import zo_client as zc
from fedtune.flower.local import LocalGrid
from fedtune.flower.records import wire_bytes
from fedtune.flower.server import ServerLoop
from fedtune.flower.zo_server import HISTORY_FILE
from fedtune.train import batch_stream
from fedtune.zo import (
    ProSampler,
    SeedHistory,
    UniformSampler,
    aggregate_pairs,
    decode_downlink,
    decode_uplink,
    encode_downlink,
    uplink_size,
)
from tests.test_round_loop import ROW_FIELDS

from .conftest import CONFIGS

OFFLINE = {2: {1001}}  # round -> nodes that are not available


def zo_cfg(**overrides):
    return config.load(CONFIGS / "tiny.toml").replace(**{"train.mode": "zo", "federation.rounds": 3, **overrides})


class RecordingGrid(LocalGrid):
    """LocalGrid that keeps every message and reply and takes nodes offline per round."""

    def __init__(self, num_nodes, client_fn, offline=None):
        super().__init__(num_nodes, client_fn)
        self.offline = offline or {}
        self.round = 1
        self.sent: list[list[Message]] = []
        self.replies: list[list[Message]] = []

    def get_node_ids(self):
        return [n for n in self.node_ids if n not in self.offline.get(self.round, ())]

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        if messages and all(m.metadata.message_type == MessageType.QUERY for m in messages):
            return super().send_and_receive(messages, timeout=timeout)  # identity queries: not a round
        replies = super().send_and_receive(messages, timeout=timeout)
        self.sent.append(messages)
        self.replies.append(replies)
        self.round += 1
        return replies


def run(cfg, out, client=None, offline=None):
    client = client or (lambda m, c: zc.handle_train_zo(m, c, cfg))
    grid = RecordingGrid(cfg.federation.num_clients, client, offline)
    summary = ServerLoop(cfg, out, progress=lambda s: None).main(grid)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return summary, rows, grid


def history_of(cfg, out) -> SeedHistory:
    return SeedHistory.from_bytes((out / HISTORY_FILE).read_bytes(), cfg.zo.pool())


def cached_params(context: Context) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(a.numpy().copy()) for k, a in context.state[zc.PARAMS_STATE].items()}


def assert_bit_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


@pytest.fixture(autouse=True)
def fresh_workspace(monkeypatch):
    """A freshly built model per test (ZO snapshots the initial model on first use; scope
    "full" moves base weights), and no change to the process's thread count."""
    monkeypatch.setattr(workspace, "_CACHE", {})
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)


@pytest.fixture(scope="module")
def run3(tmp_path_factory):
    """3 rounds at K = 4096, 20 local steps; node 1001 skips round 2."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(workspace, "_CACHE", {})
        mp.setattr(torch, "set_num_threads", lambda n: None)
        cfg = zo_cfg(**{"zo.local_steps": 20})
        out = tmp_path_factory.mktemp("zo-run3")
        summary, rows, grid = run(cfg, out, offline=OFFLINE)
        yield cfg, out, summary, rows, grid


# -- the 3-round run ---------------------------------------------------------------------


def test_run_completes_and_writes_backprop_fields(run3):
    cfg, out, summary, rows, grid = run3
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    assert [r["accepted"] for r in rows[1:]] == [4, 3, 4]
    backprop_fields = ROW_FIELDS | {"eval"}  # every round is evaluated here (eval_every = 1)
    for r in rows[1:]:
        assert backprop_fields <= set(r)
        assert r["bytes_up"] == sum(r["bytes_up_per_client"].values())
        assert r["bytes_down"] == sum(r["bytes_down_per_client"].values())
        assert 0 < r["zo"]["pairs"] <= r["accepted"] * cfg.zo.local_steps
    saved = json.loads((out / "summary.json").read_text())
    assert saved["zo"] == cfg.zo.to_dict() and saved["zo_history"]["rounds"] == 3
    assert saved["total_bytes_up"] == sum(r["bytes_up"] for r in rows)
    assert saved["final"] == rows[-1]["eval"]
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert len(history_of(cfg, out)) == 3


def test_no_tensor_ever_crosses_the_wire(run3):
    *_, grid = run3
    for msgs, replies in zip(grid.sent, grid.replies):
        for m in msgs:
            assert not m.content.array_records and set(m.content) == {P.CONFIG, P.ZO}
        for r in replies:
            assert not r.has_error(), r.error.reason
            assert not r.content.array_records and set(r.content) == {P.ZO, P.METRICS}


def test_bytes_are_the_wire_size_of_the_real_records(run3):
    cfg, _, _, rows, grid = run3
    for msgs, replies, row in zip(grid.sent, grid.replies, rows[1:]):
        assert row["bytes_down_per_client"] == {str(m.metadata.dst_node_id): wire_bytes(m.content) for m in msgs}
        assert row["bytes_up_per_client"] == {str(r.metadata.src_node_id): wire_bytes(r.content) for r in replies}
        for r in replies:
            assert len(r.content[P.ZO][zc.UPLINK_KEY]) == uplink_size(cfg.zo.local_steps, cfg.zo.pool())


@pytest.mark.slow
def test_bytes_per_client_round_at_paper_settings(tmp_path):
    """K = 4096, the default 200 local steps, 4 clients, node 1001 catching up two rounds."""
    cfg = zo_cfg()
    assert cfg.zo.num_seeds == 4096 and cfg.zo.local_steps == 200
    _, rows, grid = run(cfg, tmp_path, offline=OFFLINE)
    up = [v for row in rows[1:] for v in row["bytes_up_per_client"].values()]
    down = [v for row in rows[1:] for v in row["bytes_down_per_client"].values()]
    assert len(up) == 11 and max(up) <= 2_000
    assert max(down) <= 18_000
    print(
        f"\nper client-round: up {min(up)}-{max(up)} B, down {min(down)}-{max(down)} B "
        f"(round 3, node 1001: {rows[3]['bytes_down_per_client']['1001']} B)"
    )


def test_server_model_equals_a_fresh_clients_replay_bit_for_bit(run3, monkeypatch):
    cfg, out, _, _, _ = run3
    history = history_of(cfg, out)
    monkeypatch.setattr(workspace, "_CACHE", {})  # a new process's model, built from scratch
    fresh = zo_cfg(**{"zo.local_steps": 0})  # replay only; local_steps does not enter replay
    ws = workspace.get(fresh)
    msg = Message(
        RecordDict(
            {
                P.CONFIG: ConfigRecord({"server-round": len(history) + 1}),
                P.ZO: ConfigRecord({zc.DOWNLINK_KEY: encode_downlink(history, 0)}),
            }
        ),
        dst_node_id=1000,
        message_type=MessageType.TRAIN,
    )
    ctx = Context(
        run_id=1, node_id=1000, node_config={"partition-id": 0, "num-partitions": 4}, state=RecordDict(), run_config={}
    )
    assert not zc.handle_train_zo(msg, ctx, fresh).has_error()
    replayed = cached_params(ctx)
    from safetensors.torch import load_file

    adapters.set_state_(ws.model, load_file(str(out / "adapter" / "adapter_model.safetensors")))
    assert_bit_equal(zc.read_params(ws, "adapter"), replayed)
    initial = zc.initial_params(ws, "adapter")
    assert any(not torch.equal(initial[k], replayed[k]) for k in initial)


def test_client_that_skipped_a_round_catches_up_bit_for_bit(run3):
    cfg, out, _, _, grid = run3
    pool = cfg.zo.pool()
    # round 3: node 1001 (offline in round 2) gets rounds 1-2, the others round 2 only
    firsts = {
        m.metadata.dst_node_id: decode_downlink(bytes(m.content[P.ZO][zc.DOWNLINK_KEY]), pool) for m in grid.sent[2]
    }
    assert firsts[1001][0] == 1 and len(firsts[1001][1]) == 2
    assert all(firsts[n][0] == 2 and len(firsts[n][1]) == 1 for n in (1000, 1002, 1003))
    states = {n: grid.contexts[n].state for n in grid.node_ids}
    assert {int(s[P.ZO_STATE]["round"]) for s in states.values()} == {2}
    present_all_along = cached_params(grid.contexts[1000])
    for n in (1001, 1002, 1003):
        assert_bit_equal(cached_params(grid.contexts[n]), present_all_along)


# -- short runs ------------------------------------------------------------------------


def test_client_that_lost_its_state_is_resent_the_whole_history(tmp_path):
    cfg = zo_cfg(**{"zo.local_steps": 3, "federation.rounds": 4})

    def client(msg, ctx):
        if ctx.node_id == 1002 and int(msg.content[P.CONFIG]["server-round"]) == 3:
            for key in list(ctx.state):  # e.g. the SuperNode restarted
                del ctx.state[key]
        return zc.handle_train_zo(msg, ctx, cfg)

    _, rows, grid = run(cfg, tmp_path, client)
    assert [r["accepted"] for r in rows[1:]] == [4, 4, 3, 4]
    # round 3: the downlink starts at round 2, the client holds nothing: an error reply
    assert rows[3]["rejected"][0]["node"] == 1002 and "state was lost" in rows[3]["rejected"][0]["reason"]
    # round 4: the server resends rounds 1-3 and the client replays from the initial model
    msg = next(m for m in grid.sent[3] if m.metadata.dst_node_id == 1002)
    first, entries = decode_downlink(bytes(msg.content[P.ZO][zc.DOWNLINK_KEY]), cfg.zo.pool())
    assert (first, len(entries)) == (1, 3)
    assert_bit_equal(cached_params(grid.contexts[1002]), cached_params(grid.contexts[1000]))


def _patched_uplink(raw: bytes, what: str) -> bytes:
    n = struct.unpack_from("<I", raw, 12)[0]
    buf = bytearray(raw)
    if what == "index":
        struct.pack_into("<H", buf, 16, 4096)  # K = 4096: one past the pool
    else:
        struct.pack_into("<f", buf, 16 + 2 * n, float("nan"))
    return bytes(buf)


def test_malformed_uplinks_are_dropped_and_the_round_goes_on(tmp_path):
    cfg = zo_cfg(**{"zo.local_steps": 4, "federation.rounds": 2})

    def client(msg, ctx):
        reply = zc.handle_train_zo(msg, ctx, cfg)
        what = {0: "index", 1: "nan"}.get(ctx.node_config["partition-id"])
        if what:
            raw = reply.content[P.ZO][zc.UPLINK_KEY]
            reply.content[P.ZO] = ConfigRecord({zc.UPLINK_KEY: _patched_uplink(raw, what)})
        return reply

    _, rows, grid = run(cfg, tmp_path, client)
    for row in rows[1:]:
        assert row["accepted"] == 2
        reasons = {r["node"]: r["reason"] for r in row["rejected"]}
        assert "unknown seed index 4096" in reasons[1000] and "non-finite" in reasons[1001]
    # the history holds exactly the aggregate of the two well-formed clients
    pool = cfg.zo.pool()
    good = [r for r in grid.replies[0] if r.metadata.src_node_id in (1002, 1003)]
    expect = aggregate_pairs(
        [decode_uplink(bytes(r.content[P.ZO][zc.UPLINK_KEY]), pool) for r in good],
        [float(r.content[P.METRICS]["num-examples"]) for r in good],
        pool.num_seeds,
    )
    assert history_of(cfg, tmp_path).entry(1) == expect


@pytest.mark.parametrize("pro", [False, True])
def test_seed_indices_come_from_the_configured_sampler(tmp_path, pro):
    cfg = zo_cfg(**{"zo.local_steps": 6, "zo.pro": pro, "zo.lr": 1e-2, "zo.eps": 1e-2, "federation.rounds": 2})
    _, _, grid = run(cfg, tmp_path)
    pool = cfg.zo.pool()
    after_round_1 = SeedHistory(pool, history_of(cfg, tmp_path).entries[:1])
    sampler = (
        ProSampler.from_history(after_round_1, cfg.zo.pro_clip, cfg.zo.pro_temperature)
        if pro
        else UniformSampler(pool.num_seeds)
    )
    if pro:
        assert sampler.probabilities.max() > 1.5 / pool.num_seeds  # round 1's seeds are favoured
    for reply in grid.replies[1]:
        pid = reply.metadata.src_node_id - 1000
        got = [i for i, _ in decode_uplink(bytes(reply.content[P.ZO][zc.UPLINK_KEY]), pool)]
        assert got == sampler.sample(cfg.zo.local_steps, zc.step_generators(cfg, 2, pid)[0])


def test_scope_full_tunes_base_weights_and_replays(tmp_path):
    cfg = zo_cfg(**{"zo.scope": "full", "zo.local_steps": 3, "zo.lr": 1e-3, "federation.rounds": 2})
    _, rows, grid = run(cfg, tmp_path)
    assert [r["accepted"] for r in rows[1:]] == [4, 4]
    ws = workspace.get(cfg)
    server = zc.read_params(ws, "full")  # the loop leaves the server's model loaded
    initial = zc.initial_params(ws, "full")
    base = "base_model.model.bert.embeddings.word_embeddings.weight"
    assert base in server and not torch.equal(server[base], initial[base])
    assert zc.PARAMS_STATE not in grid.contexts[1000].state  # the full model is not cached per node
    ctx = Context(run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config={})
    zc.sync_model_(ws, ctx, cfg, encode_downlink(history_of(cfg, tmp_path), 0))
    assert_bit_equal(zc.read_params(ws, "full"), server)


def test_local_zo_steps_decrease_the_clients_loss():
    """A weak but real learning check: 60 MeZO steps on one client's data (lr = eps = 1e-2)."""
    cfg = zo_cfg(**{"zo.local_steps": 60, "zo.lr": 1e-2, "zo.eps": 1e-2})
    ws = workspace.get(cfg)
    zc.load_params_(ws, "adapter", zc.initial_params(ws, "adapter"))
    data = ws.client_data(0)
    full = collate(data, ws.pad_id, ws.task)

    def loss() -> float:
        ws.model.eval()
        with torch.no_grad():
            return float(ws.model(**full).loss)

    before = loss()
    pairs, train_loss = zc.local_round_(ws, data, cfg, SeedHistory(cfg.zo.pool()), 1, 0)
    after = loss()
    assert len(pairs) == 60 and math.isfinite(train_loss)
    assert after < before - 0.05, (before, after)


def test_zo_loss_applies_the_configured_logit_adjustment():
    """ZO clients train on the same logit-adjusted loss as gradient clients (train.logit_adjustment)."""
    ws = workspace.get(zo_cfg())
    zc.load_params_(ws, "adapter", zc.initial_params(ws, "adapter"))
    data = ws.client_data(0)
    ws.model.eval()
    plain, adjusted = [], []
    f0 = zc.batch_loss_fns(ws, data, 1, 4, torch.Generator().manual_seed(0), plain)[0]
    f1 = zc.batch_loss_fns(ws, data, 1, 4, torch.Generator().manual_seed(0), adjusted, logit_adjustment=0.7)[0]
    batch = collate(next(batch_stream(data, 4, torch.Generator().manual_seed(0))), ws.pad_id, ws.task)
    labels = [d["label"] for d in data]
    prior = torch.tensor([(labels.count(c) + 1) / (len(labels) + 2) for c in (0, 1)]).log()
    with torch.no_grad():
        logits = ws.model(**{k: v for k, v in batch.items() if k != "labels"}).logits.float()
        want_plain = float(torch.nn.functional.cross_entropy(logits, batch["labels"]))
        want_adj = float(torch.nn.functional.cross_entropy(logits + 0.7 * prior, batch["labels"]))
        assert math.isclose(f0(), want_plain, rel_tol=1e-5) and math.isclose(f1(), want_adj, rel_tol=1e-5)
    assert abs(want_adj - want_plain) > 1e-4  # the check can tell the two apart
    assert len(plain) == len(adjusted) == 1  # every call logs its loss


def test_zo_loss_runs_under_the_configured_mixed_precision():
    """train.mixed_precision reaches ZO forward passes (bf16 autocast), not only gradient training's."""
    ws = workspace.get(zo_cfg())
    zc.load_params_(ws, "adapter", zc.initial_params(ws, "adapter"))
    data = ws.client_data(0)
    ws.model.eval()
    values = {}
    for mode in ("no", "bf16"):
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            values[mode] = zc.batch_loss_fns(ws, data, 1, 4, g, [], mixed_precision=mode)[0]()
    batch = collate(next(batch_stream(data, 4, torch.Generator().manual_seed(0))), ws.pad_id, ws.task)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        want_bf16 = float(ws.model(**batch).loss.float())
    assert values["bf16"] == want_bf16
    assert values["no"] != values["bf16"]  # the check can tell the two apart


def test_initial_model_is_the_built_adapter_even_after_other_training():
    """A process that moved the adapter before (e.g. a backprop run) still starts ZO from the built one."""
    ws = workspace.get(zo_cfg())
    built = zc.read_params(ws, "adapter")
    g = torch.Generator().manual_seed(0)
    adapters.set_state_(ws.model, {k: v + torch.randn(v.shape, generator=g) for k, v in ws.initial_state().items()})
    assert_bit_equal(zc.initial_params(ws, "adapter"), built)
    with pytest.raises(RuntimeError, match="fresh process"):
        zc.initial_params(ws, "full")


def test_merge_downlink_gap_overlap_and_divergence():
    from fedtune.errors import PayloadError
    from fedtune.zo import RoundEntry, SeedPool

    pool = SeedPool(16)
    e = [RoundEntry(np.array([i], np.uint32), np.array([1.0 + i], np.float32)) for i in range(4)]
    held = SeedHistory(pool, e[:2])
    with pytest.raises(PayloadError, match="state was lost"):
        zc.merge_downlink(held, 4, e[3:])
    hist, valid = zc.merge_downlink(held, 3, e[2:])  # the usual case
    assert hist.entries == tuple(e) and valid == 2
    hist, valid = zc.merge_downlink(held, 1, e)  # a resend of everything: held rounds agree
    assert hist.entries == tuple(e) and valid == 2
    other = [e[0], e[3]]
    hist, valid = zc.merge_downlink(held, 1, other)  # the server's round 2 differs: cache unusable
    assert hist.entries == tuple(other) and valid == 1


def test_resumed_run_continues_to_the_same_history(tmp_path):
    """Crash in round 3, resume with fresh clients (no per-node state): same history bits."""
    cfg = zo_cfg(**{"zo.local_steps": 4})
    run(cfg, tmp_path / "whole")

    class Crash(RuntimeError):
        pass

    class CrashingGrid(RecordingGrid):
        def get_node_ids(self):
            if self.round == 3:
                raise Crash("server process killed")
            return super().get_node_ids()

    grid = CrashingGrid(4, lambda m, c: zc.handle_train_zo(m, c, cfg))
    with pytest.raises(Crash):
        ServerLoop(cfg, tmp_path / "resumed", progress=lambda s: None).main(grid)
    assert len(history_of(cfg, tmp_path / "resumed" / "checkpoint")) == 2
    grid = RecordingGrid(4, lambda m, c: zc.handle_train_zo(m, c, cfg))
    summary = ServerLoop(cfg, tmp_path / "resumed", progress=lambda s: None, resume=True).main(grid)
    assert len(grid.sent) == 1  # round 3 only, everyone gets rounds 1-2
    assert (tmp_path / "resumed" / HISTORY_FILE).read_bytes() == (tmp_path / "whole" / HISTORY_FILE).read_bytes()
    rows = [json.loads(x) for x in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    assert summary["total_bytes_up"] == sum(r["bytes_up"] for r in rows)
    whole = json.loads((tmp_path / "whole" / "summary.json").read_text())
    assert summary["final"] == whole["final"]


def test_zo_refuses_settings_it_would_ignore_at_validation():
    with pytest.raises(ConfigError, match="robust"):
        zo_cfg(**{"aggregation.robust": "median"})
