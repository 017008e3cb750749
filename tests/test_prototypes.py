"""``adapter.head_init = "prototypes"``: the nearest-class-mean head, its exchange before round 1, its bytes.

Math first, on hand-made embeddings and a hand-written module against numpy; then runs
of the federated loop (LocalGrid, tiny random BERT with mean pooling) in gradient and
zeroth-order mode, checked against the prototypes computed centrally on every client's
training data; then resume and the refusals.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

from fedtune import adapters, config, prototypes, workspace
from fedtune.errors import ConfigError, PayloadError
from fedtune.flower import protocol as P
from fedtune.flower import zo_client as zc
from fedtune.flower.client import handle_train
from fedtune.flower.local import LocalGrid
from fedtune.flower.prototypes import HEAD_FILE, head_from_payload
from fedtune.flower.records import from_arrayrecord, wire_bytes
from fedtune.flower.server import ServerLoop
from fedtune.flower.zo_server import HISTORY_FILE
from fedtune.metrics import held_out_metrics
from fedtune.zo import encode_downlink
from tests.test_resume import Crash, CrashingGrid
from tests.test_zo_flow import RecordingGrid, assert_bit_equal, cached_params, history_of

from .conftest import CONFIGS, metrics_rows

PROTO = {"adapter.head_init": "prototypes", "model.pooling": "mean"}
ZO = {"train.mode": "zo", "zo.num_seeds": 64, "zo.local_steps": 3, "zo.lr": 1e-3}


def proto_cfg(**over):
    return config.load(CONFIGS / "tiny.toml").replace(**{**PROTO, **over})


@pytest.fixture(autouse=True)
def fresh_workspace(monkeypatch):
    """A freshly built model per test: ZO snapshots the initial model on first use."""
    monkeypatch.setattr(workspace, "_CACHE", {})


def run(cfg, out, client=None, grid_cls=RecordingGrid, **kw):
    client = client or (lambda m, c: handle_train(m, c, cfg))
    grid = grid_cls(cfg.federation.num_clients, client, **kw)
    summary = ServerLoop(cfg, out, progress=lambda s: None).main(grid)
    return summary, metrics_rows(out), grid


def central_head(cfg):
    """The nearest-centroid head of every client's training data, computed in one place (float64 means)."""
    ws = workspace.get(cfg)
    adapters.set_state_(ws.model, ws.initial_state())
    data = [ex for pid in range(cfg.federation.num_clients) for ex in ws.client_data(pid)]
    stats = prototypes.data_stats(
        ws.model, data, pad_id=ws.pad_id, task=ws.task, num_classes=ws.num_labels, batch_size=7
    )
    return prototypes.nearest_centroid_head(stats.means)


def installed_head(out, model):
    payload = (out / HEAD_FILE).read_bytes()
    return head_from_payload(model, payload), payload


def assert_head_close(head, weight, bias):
    wkey, bkey = sorted(head, key=lambda k: not k.endswith("weight"))
    # float16 per-client means: relative error about 2^-11 of each coordinate
    torch.testing.assert_close(head[wkey], weight, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(head[bkey], bias, rtol=5e-3, atol=5e-3)


# -- math ------------------------------------------------------------------------------------


def test_head_from_hand_made_embeddings_equals_a_numpy_nearest_centroid():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 5)) + np.repeat(np.eye(3, 5) * 3, 20, axis=0)
    y = np.repeat([0, 1, 2], 20)
    stats = prototypes.ClassStats(
        torch.from_numpy(np.stack([x[y == c].sum(0) for c in range(3)])), torch.tensor([20, 20, 20])
    )
    weight, bias = prototypes.nearest_centroid_head(stats.means)
    mu = np.stack([x[y == c].mean(0) for c in range(3)])
    np.testing.assert_allclose(weight.numpy(), mu, rtol=1e-6)
    np.testing.assert_allclose(bias.numpy(), -0.5 * (mu**2).sum(1), rtol=1e-6)
    # the linear head decides as the nearest class mean does
    probe = rng.normal(size=(200, 5)) * 3
    logits = probe @ weight.double().numpy().T + bias.double().numpy()
    nearest = ((probe[:, None, :] - mu[None]) ** 2).sum(-1).argmin(1)
    assert (logits.argmax(1) == nearest).all()
    # as sent: rows rounded to float16, the bias that of the rounded rows
    w16, b16 = prototypes.head_from_stats(stats)
    np.testing.assert_array_equal(w16.numpy(), mu.astype(np.float16).astype(np.float32))
    np.testing.assert_allclose(b16.numpy(), -0.5 * (w16.double().numpy() ** 2).sum(1), rtol=1e-6)


class HandModel(torch.nn.Module):
    """A hand-written classifier: the feature of an example is the mean of its token embeddings."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(50, 4)
        self.drop = torch.nn.Dropout(0.5)  # eval(): off while the stats are taken
        self.classifier = torch.nn.Linear(4, 3)

    def features(self, input_ids, attention_mask):
        m = attention_mask.unsqueeze(-1).float()
        return (self.emb(input_ids) * m).sum(1) / m.sum(1)

    def forward(self, input_ids, attention_mask):
        return self.classifier(self.drop(self.features(input_ids, attention_mask)))


def test_sums_of_two_clients_add_up_to_the_pooled_mean():
    torch.manual_seed(0)
    model = HandModel()
    ids = torch.randint(1, 50, (30, 6))
    mask = (torch.rand(30, 6) > 0.3).long()
    mask[:, 0] = 1
    labels = torch.tensor([0, 1, 2, 1, 1, 0] * 5)
    feats = model.features(ids, mask).detach().double().numpy()

    def batches(rows, size=4):
        return [
            {
                "input_ids": ids[rows[i : i + size]],
                "attention_mask": mask[rows[i : i + size]],
                "labels": labels[rows[i : i + size]],
            }
            for i in range(0, len(rows), size)
        ]

    model.train()
    a = prototypes.class_sums(model, batches(list(range(0, 13))), 3)
    b = prototypes.class_sums(model, batches(list(range(13, 30))), 3)
    assert model.training  # left as it was
    for part, rows in ((a, range(0, 13)), (b, range(13, 30))):
        rows = np.array(list(rows))
        want = np.stack([feats[rows][labels.numpy()[rows] == c].sum(0) for c in range(3)])
        np.testing.assert_allclose(part.sums.numpy(), want, rtol=1e-6, atol=1e-6)
    pooled = prototypes.total([a, b])
    assert pooled.counts.tolist() == [10, 15, 5]
    want = np.stack([feats[labels.numpy() == c].mean(0) for c in range(3)])
    np.testing.assert_allclose(pooled.means.numpy(), want, rtol=1e-6, atol=1e-6)
    # through the wire (float16 means, counts): the same pooled mean to float16 precision
    wired = prototypes.total([prototypes.decode_stats(prototypes.encode_stats(s), 3, 4) for s in (a, b)])
    assert wired.counts.tolist() == [10, 15, 5]
    np.testing.assert_allclose(wired.means.numpy(), want, rtol=2e-3, atol=1e-3)


def test_wire_round_trips_and_refuses_malformed_payloads():
    stats = prototypes.ClassStats(torch.tensor([[2.0, -4.0], [0.0, 0.0]], dtype=torch.float64), torch.tensor([2, 0]))
    raw = prototypes.encode_stats(stats)
    assert len(raw) == 12 + 2 * 4 + 2 * 2 * 2
    back = prototypes.decode_stats(raw, 2, 2)
    assert back.counts.tolist() == [2, 0] and back.sums.tolist() == [[2.0, -4.0], [0.0, 0.0]]
    with pytest.raises(ValueError, match="no example"):
        _ = back.means
    for bad in (raw[:-1], raw + b"\0\0"):
        with pytest.raises(PayloadError, match="bytes"):
            prototypes.decode_stats(bad, 2, 2)
    with pytest.raises(PayloadError):
        prototypes.decode_stats(raw, 2, 3)
    nan = raw[:-2] + np.float16(np.nan).tobytes()
    with pytest.raises(PayloadError, match="non-finite"):
        prototypes.decode_stats(nan, 2, 2)
    with pytest.raises(ValueError, match="float16"):
        prototypes.encode_stats(prototypes.ClassStats(torch.full((1, 2), 1e6, dtype=torch.float64), torch.tensor([1])))
    w = torch.tensor([[1.5, -0.25]]).half().float()
    b = torch.tensor([-1.2345678])
    payload = prototypes.encode_head(w, b)
    w2, b2 = prototypes.decode_head(payload)
    assert torch.equal(w2, w) and torch.equal(b2, b)  # what the server installs is what clients decode
    with pytest.raises(PayloadError):
        prototypes.decode_head(payload[:-1])


# -- gradient rounds -------------------------------------------------------------------------


def test_gradient_run_starts_from_the_prototypes_of_all_clients(tmp_path):
    cfg = proto_cfg(**{"federation.rounds": 1})
    summary, rows, grid = run(cfg, tmp_path)
    ws = workspace.get(cfg)
    head, payload = installed_head(tmp_path, ws.model)
    assert_head_close(head, *central_head(cfg))
    # the exchange: one request to every node before round 1, its bytes in the round-0 row
    asked, replies = grid.sent[0], grid.replies[0]
    assert sorted(m.metadata.dst_node_id for m in asked) == grid.node_ids
    assert all(P.PROTOTYPES in m.content and P.ARRAYS not in m.content for m in asked)
    r0 = rows[0]
    assert r0["bytes_up_per_client"] == {str(r.metadata.src_node_id): wire_bytes(r.content) for r in replies}
    assert r0["bytes_down_per_client"] == {str(m.metadata.dst_node_id): wire_bytes(m.content) for m in asked}
    assert r0["bytes_up"] == sum(r0["bytes_up_per_client"].values()) > 4 * 2 * 32 * 2  # 2 classes x 32 fp16 each
    assert r0["head_init"]["answered"] == 4 and sum(r0["head_init"]["examples_per_class"]) == sum(
        len(ws.client_data(p)) for p in range(4)
    )
    assert summary["total_bytes_up"] == sum(r["bytes_up"] for r in rows)
    assert summary["total_bytes_down"] == sum(r["bytes_down"] for r in rows)
    # round 1 sends exactly that head (in the full fp32 adapter) to every client
    for m in grid.sent[1]:
        sent = from_arrayrecord(m.content[P.ARRAYS])
        for k, v in head.items():
            assert torch.equal(sent[k], v), k
    # round 0 evaluated the untuned adapter with the prototype head: its zero-shot accuracy
    adapters.set_state_(ws.model, {**ws.initial_state(), **head})
    assert rows[0]["eval"] == held_out_metrics(ws, cfg, final=False)


def test_default_random_head_runs_no_exchange(tmp_path):
    cfg = config.load(CONFIGS / "tiny.toml").replace(**{"federation.rounds": 1, "model.pooling": "mean"})
    assert cfg.adapter.head_init == "random"
    _, rows, grid = run(cfg, tmp_path)
    assert len(grid.sent) == 1 and all(P.PROTOTYPES not in m.content for m in grid.sent[0])
    assert rows[0].keys() == {"round", "eval", "bytes_up", "bytes_down"}
    assert not (tmp_path / HEAD_FILE).exists()
    ws = workspace.get(cfg)
    sent = from_arrayrecord(grid.sent[0][0].content[P.ARRAYS])
    assert all(torch.equal(sent[k], ws.initial_state()[k]) for k in sent)  # the seeded random head


def test_compressed_broadcast_sends_the_prototype_head_in_full_first(tmp_path):
    cfg = proto_cfg(**{"federation.rounds": 2, "compression.downlink": "int8"})
    _, rows, grid = run(cfg, tmp_path)
    head, _ = installed_head(tmp_path, workspace.get(cfg).model)
    assert all(not r["rejected"] for r in rows[1:])
    for m in grid.sent[1]:  # round 1: nobody built this version 0 itself, so everybody gets it in full
        sent = from_arrayrecord(m.content[P.ARRAYS])
        assert all(torch.equal(sent[k], v) for k, v in head.items())
    assert all(P.DOWNLINK in m.content for m in grid.sent[2])  # then the compressed payloads


def test_delta_catchup_codes_the_prototype_head_from_the_seeded_version_0(tmp_path):
    from fedtune.compression import build_codec

    cfg = proto_cfg(**{"federation.rounds": 2, "compression.downlink": "int8", "compression.downlink_catchup": "delta"})
    _, rows, grid = run(cfg, tmp_path)
    assert all(not r["rejected"] for r in rows[1:])  # every client decoded from its own version 0
    ws = workspace.get(cfg)
    head, _ = installed_head(tmp_path, ws.model)
    seeded = ws.initial_state()
    layout = {k: tuple(seeded[k].shape) for k in sorted(ws.trainable_keys())}
    codec = build_codec(cfg.compression, "downlink")
    for m in grid.sent[1]:  # round 1: one int8 payload of (global - seeded version 0), no full copy
        assert P.ARRAYS not in m.content
        down = m.content[P.DOWNLINK]
        assert int(down["from-version"]) == 0 and len(down["payloads"]) == 1
        got = codec.decode(down["payloads"][0], layout, seed=0)
        for k, v in head.items():  # the head the client decodes: the prototype head within int8's step
            step = (v - seeded[k]).abs().max() / 127
            torch.testing.assert_close(seeded[k] + got[k], v, rtol=0, atol=float(step) * 0.51)


# -- zeroth-order rounds ---------------------------------------------------------------------


def zo_client_fn(cfg, wipe=None):
    def client(msg, ctx):
        if wipe and ctx.node_id == wipe[0] and int(msg.content[P.CONFIG]["server-round"]) == wipe[1]:
            for key in list(ctx.state):  # e.g. the SuperNode restarted
                del ctx.state[key]
        return handle_train(msg, ctx, cfg)

    return client


def test_zo_replicas_agree_on_the_prototype_head_and_get_it_once(tmp_path):
    cfg = proto_cfg(**ZO, **{"federation.rounds": 4})
    _, rows, grid = run(cfg, tmp_path, zo_client_fn(cfg, wipe=(1002, 3)))
    ws = workspace.get(cfg)
    head, payload = installed_head(tmp_path, ws.model)
    assert_head_close(head, *central_head(cfg))
    assert rows[0]["bytes_up"] > 0 and rows[0]["head_init"]["answered"] == 4

    def got_head(rnd):
        return {m.metadata.dst_node_id for m in grid.sent[rnd] if zc.HEAD_KEY in m.content[P.ZO]}

    assert all(bytes(m.content[P.ZO][zc.HEAD_KEY]) == payload for m in grid.sent[1])
    assert got_head(1) == set(grid.node_ids) and got_head(2) == set()
    # node 1002 lost its state in round 3 (an error reply), so round 4 resends the history and the head
    assert [r["accepted"] for r in rows[1:]] == [4, 4, 3, 4] and got_head(3) == set() and got_head(4) == {1002}
    assert rows[4]["bytes_down_per_client"]["1002"] > rows[4]["bytes_down_per_client"]["1000"] + len(payload)
    for n in grid.node_ids:  # every replica holds the same bits
        assert_bit_equal(cached_params(grid.contexts[n]), cached_params(grid.contexts[1000]))

    # a fresh node replaying the whole history from initial params + head gets the server's model
    history = history_of(cfg, tmp_path)

    def fresh(with_head):
        rec = ConfigRecord({zc.DOWNLINK_KEY: encode_downlink(history, 0)})
        if with_head:
            rec[zc.HEAD_KEY] = payload
        msg = Message(
            RecordDict({P.CONFIG: ConfigRecord({"server-round": len(history) + 1}), P.ZO: rec}),
            dst_node_id=1000,
            message_type=MessageType.TRAIN,
        )
        ctx = Context(
            run_id=1,
            node_id=1000,
            node_config={"partition-id": 0, "num-partitions": 4},
            state=RecordDict(),
            run_config={},
        )
        reply = zc.handle_train_zo(msg, ctx, cfg.replace(**{"zo.local_steps": 0}))
        assert not reply.has_error()
        return ctx

    with pytest.raises(PayloadError, match="no prototype head"):
        fresh(with_head=False)
    ctx = fresh(with_head=True)
    from safetensors.torch import load_file

    adapters.set_state_(ws.model, load_file(str(tmp_path / "adapter" / "adapter_model.safetensors")))
    assert_bit_equal(zc.read_params(ws, "adapter"), cached_params(ctx))
    # and the initial model every replica starts from: the built adapter with the prototype head
    zc.start_params_(ws, ctx, cfg)
    start = zc.read_params(ws, "adapter")
    for k, v in zc.initial_params(ws, "adapter").items():
        if "classifier" not in k:
            assert torch.equal(start[k], v), k
    state = adapters.get_state(ws.model)
    assert all(torch.equal(state[k], v) for k, v in head.items())


# -- resume ----------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["backprop", "zo"])
def test_resume_keeps_the_head_and_does_not_ask_again(tmp_path, mode):
    cfg = proto_cfg(**({**ZO} if mode == "zo" else {}), **{"federation.rounds": 3})
    asked = []

    def client(msg, ctx):
        if P.PROTOTYPES in msg.content:
            asked.append(ctx.node_id)
        return handle_train(msg, ctx, cfg)

    whole, _, _ = run(cfg, tmp_path / "whole", client, grid_cls=LocalGrid)
    assert len(asked) == 4
    out = tmp_path / "broken"
    with pytest.raises(Crash):
        run(cfg, out, client, grid_cls=CrashingGrid, crash_round=3)
    assert len(asked) == 8 and (out / "checkpoint" / HEAD_FILE).is_file()
    resumed = ServerLoop(cfg, out, progress=lambda s: None, resume=True).main(LocalGrid(4, client))
    assert len(asked) == 8  # no second exchange: the head comes from the checkpoint
    assert (out / HEAD_FILE).read_bytes() == (tmp_path / "whole" / HEAD_FILE).read_bytes()
    rows = metrics_rows(out)
    assert [r["round"] for r in rows] == [0, 1, 2, 3] and rows[0]["bytes_up"] > 0
    assert resumed["total_bytes_up"] == whole["total_bytes_up"] == sum(r["bytes_up"] for r in rows)
    if mode == "zo":  # bit for bit: the history replayed from the same initial model
        assert (out / HISTORY_FILE).read_bytes() == (tmp_path / "whole" / HISTORY_FILE).read_bytes()
        assert resumed["final"] == whole["final"]
    else:  # Flower's FedAvg sums the replies in the order its own sampling gives them: the last bits may differ
        assert resumed["final"] == pytest.approx(whole["final"], rel=1e-5)


# -- refusals --------------------------------------------------------------------------------


def test_refused_where_there_is_no_head_or_the_means_would_escape_privacy():
    base = config.load(CONFIGS / "tiny.toml")
    for over, key in (
        (
            {"privacy.mode": "sample", "privacy.noise_multiplier": 0.8, "privacy.max_grad_norm": 1.0},
            "privacy.mode = 'sample'",
        ),
        (
            {"privacy.mode": "client-local", "privacy.noise_multiplier": 1.0, "privacy.clip_norm": 1.0},
            "privacy.mode = 'client-local'",
        ),
        (
            {"privacy.mode": "client-central", "privacy.noise_multiplier": 1.0, "privacy.clip_norm": 1.0},
            "privacy.mode = 'client-central'",
        ),
        ({"model.task": "label-words"}, "model.task = 'label-words'"),
        ({"aggregation.secure": "secagg+"}, "aggregation.secure = 'secagg+'"),
    ):
        with pytest.raises(ConfigError) as err:
            base.replace(**PROTO, **over)
        assert any(p.startswith("adapter.head_init:") and key in p for p in err.value.problems), err.value.problems
    with pytest.raises(ConfigError, match=r"adapter.head_init: must be one of random, prototypes \(got 'zero'\)"):
        base.replace(**{"adapter.head_init": "zero"})
    llama = base.replace(**{"model.name": "tiny-llama", "adapter.head_init": "prototypes"})
    with pytest.raises(ConfigError, match=r"adapter.head_init: 'prototypes' .*'tiny-llama' \(causal-lm\) has none"):
        workspace.check_data(llama)
    with pytest.raises(ConfigError, match="adapter.head_init: 'prototypes' needs a sequence classifier"):
        prototypes.classifier_module(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_a_client_of_a_random_head_run_sends_no_class_means(tiny_cfg):
    msg = Message(
        RecordDict(
            {P.CONFIG: ConfigRecord({"server-round": 0}), P.PROTOTYPES: ConfigRecord({"request": "class-means"})}
        ),
        dst_node_id=1000,
        message_type=MessageType.TRAIN,
    )
    grid = LocalGrid(4, lambda m, c: handle_train(m, c, tiny_cfg))
    (reply,) = grid.send_and_receive([msg])
    assert reply.has_error() and "adapter.head_init is 'random'" in reply.error.reason
