"""Compression inside the federated loop: wire bytes, error feedback, downlink catch-up, bad payloads."""

import pytest
import torch
from flwr.app import ConfigRecord

from fedtune import workspace
from fedtune.compression import build_codec, expected_size
from fedtune.flower import protocol as P
from fedtune.flower.client import handle_train
from fedtune.flower.local import LocalGrid
from fedtune.flower.records import from_arrayrecord
from fedtune.flower.server import ServerLoop
from tests.conftest import metrics_rows


def _run(cfg, out, client=None, **kw):
    grid = LocalGrid(cfg.federation.num_clients, client or (lambda m, c: handle_train(m, c, cfg)), **kw)
    return ServerLoop(cfg, out, progress=lambda s: None).main(grid), grid


@pytest.mark.parametrize(
    "comp",
    [
        {"compression.codec": "topk+ternary", "compression.ratio": 0.1},
        # LoRA matrices (256 values) 1-bit, the head (64 + 2) int8
        {
            "compression.codec": "sign",
            "compression.small_codec": "int8",
            "compression.small_numel": 100,
            "compression.error_feedback": True,
        },
    ],
)
def test_uplink_bytes_are_the_codec_payload(tiny_cfg, tmp_path, comp):
    from flwr.app import RecordDict

    from fedtune.flower.records import wire_bytes

    dense, _ = _run(tiny_cfg.replace(**{"federation.rounds": 1}), tmp_path / "dense")
    cfg = tiny_cfg.replace(**{"federation.rounds": 1, **comp})
    replies = {}

    def client(msg, ctx):
        reply = handle_train(msg, ctx, cfg)
        upd = reply.content[P.UPDATE]
        # captured now: the server later swaps the content for the decoded arrays
        replies[ctx.node_id] = (
            bytes(upd["payload"]),
            wire_bytes(reply.content),
            wire_bytes(RecordDict({P.UPDATE: upd})),
        )
        return reply

    summary, _ = _run(cfg, tmp_path / "comp", client=client)
    ws = workspace.get(cfg)
    layout = {k: tuple(ws.initial_state()[k].shape) for k in ws.trainable_keys()}
    bound = expected_size(build_codec(cfg.compression), layout)  # index coding may come in under it
    logged = metrics_rows(tmp_path / "comp")[1]["bytes_up_per_client"]
    for node, (payload, reply_bytes, update_bytes) in replies.items():
        assert len(payload) <= bound
        # what is logged is the serialized reply; the update record is the payload plus a few bytes
        assert logged[str(node)] == reply_bytes
        assert update_bytes <= len(payload) + 64  # record, key and codec-name framing
    assert metrics_rows(tmp_path / "comp")[1]["accepted"] == cfg.federation.clients_per_round
    assert summary["total_bytes_up"] * 4 < dense["total_bytes_up"]


def test_error_feedback_keeps_what_was_dropped(tiny_cfg, tmp_path):
    cfg = tiny_cfg.replace(
        **{
            "federation.rounds": 1,
            "compression.codec": "topk",
            "compression.ratio": 0.05,
            "compression.error_feedback": True,
        }
    )
    seen = {}

    def client(msg, ctx):
        reply = handle_train(msg, ctx, cfg)
        seen[ctx.node_id] = (bytes(reply.content[P.UPDATE]["payload"]), ctx)
        return reply

    _run(cfg, tmp_path, client=client)
    ws = workspace.get(cfg)
    layout = {k: tuple(ws.initial_state()[k].shape) for k in ws.trainable_keys()}
    codec = build_codec(cfg.compression)
    for payload, ctx in seen.values():
        sent = codec.decode(payload, layout, seed=_round_seed(cfg))
        residual = from_arrayrecord(ctx.state[P.EF_RESIDUAL])
        for k in layout:
            # top-k: sent and residual have disjoint support and add up to the delta
            assert not bool(((sent[k] != 0) & (residual[k] != 0)).any())
        nz = sum(int((v != 0).sum()) for v in sent.values())
        assert nz <= sum(max(1, -(-int(torch.tensor(s).prod()) * 5 // 100)) for s in layout.values())


def _round_seed(cfg, rnd=1):
    import zlib

    return zlib.crc32(f"{cfg.federation.seed}/round/{rnd}".encode())  # the round seed, by hand


def test_malformed_payload_is_dropped(tiny_cfg, tmp_path):
    cfg = tiny_cfg.replace(**{"federation.rounds": 1, "compression.codec": "int8"})

    def client(msg, ctx):
        reply = handle_train(msg, ctx, cfg)
        if ctx.node_config["partition-id"] == 0:
            upd = reply.content[P.UPDATE]
            reply.content[P.UPDATE] = ConfigRecord({"codec": upd["codec"], "payload": bytes(upd["payload"])[:-3]})
        if ctx.node_config["partition-id"] == 1:
            upd = reply.content[P.UPDATE]
            reply.content[P.UPDATE] = ConfigRecord({"codec": "zstd", "payload": bytes(upd["payload"])})
        return reply

    _run(cfg, tmp_path, client=client)
    row = metrics_rows(tmp_path)[1]
    assert row["accepted"] == cfg.federation.num_clients - 2
    reasons = " ".join(r["reason"] for r in row["rejected"])
    assert "zstd" in reasons and ("truncated" in reasons or "length" in reasons or "short" in reasons)


@pytest.mark.parametrize("downlink", ["int8", "topk+int8"])
def test_downlink_clients_track_the_public_adapter(tiny_cfg, tmp_path, downlink):
    cfg = tiny_cfg.replace(
        **{"federation.rounds": 4, "federation.fraction_train": 0.5, "compression.downlink": downlink}
    )
    copies = {}

    def client(msg, ctx):
        reply = handle_train(msg, ctx, cfg)
        copies[ctx.node_id] = (
            int(msg.content[P.CONFIG]["server-round"]),
            P.DOWNLINK in msg.content,
            from_arrayrecord(ctx.state[P.GLOBAL_COPY]),
        )
        return reply

    grid = LocalGrid(cfg.federation.num_clients, client)
    loop = ServerLoop(cfg, tmp_path, progress=lambda s: None)
    loop.main(grid)
    rows = metrics_rows(tmp_path)
    assert any(v[1] for v in copies.values()), "some client should have caught up through compressed broadcasts"
    last_round = max(v[0] for v in copies.values())
    for rnd, _, copy in copies.values():
        if rnd == last_round:  # clients of the last round hold exactly the server's public copy
            for k, v in loop.protocol.broadcast.public.items():
                torch.testing.assert_close(copy[k], v, rtol=0, atol=0)
    dense = sum(v.numel() * 4 for v in loop.protocol.broadcast.public.values())
    assert min(min(r["bytes_down_per_client"].values()) for r in rows[2:]) < dense


def test_a_client_with_no_copy_starts_from_its_seeded_version_0(tiny_cfg, tmp_path):
    """Round 1 sends every client only the compressed payload (each builds version 0, the seeded initial
    adapter, itself and checks its digest); a client whose version 0 differs is refused that round and
    gets the full adapter the next time."""
    cfg = tiny_cfg.replace(**{"federation.rounds": 2, "compression.downlink": "int8"})
    seen: list[tuple[int, int, str]] = []  # (round, node, "downlink" | "arrays")
    odd = {}

    def client(msg, ctx):
        rnd = int(msg.content[P.CONFIG]["server-round"])
        seen.append((rnd, ctx.node_id, "downlink" if P.DOWNLINK in msg.content else "arrays"))
        if rnd == 1 and not odd:  # the first client reached claims a different version 0
            odd["node"] = ctx.node_id
            msg.content[P.DOWNLINK]["base-digest"] = b"\0" * 16
        reply = handle_train(msg, ctx, cfg)
        if rnd == 1 and ctx.node_id != odd["node"]:  # it holds exactly the server's public version 1
            held = from_arrayrecord(ctx.state[P.GLOBAL_COPY])
            for k, v in loop.protocol.broadcast.public.items():
                torch.testing.assert_close(held[k], v, rtol=0, atol=0)
        return reply

    loop = ServerLoop(cfg, tmp_path, progress=lambda s: None)
    loop.main(LocalGrid(cfg.federation.num_clients, client))
    rows = metrics_rows(tmp_path)
    n = cfg.federation.num_clients
    assert [kind for rnd, _, kind in seen if rnd == 1] == ["downlink"] * n
    assert [r["node"] for r in rows[1]["rejected"]] == [odd["node"]]
    assert "differs from this client's seeded initial adapter" in rows[1]["rejected"][0]["reason"]
    assert rows[1]["accepted"] == n - 1 and rows[2]["accepted"] == n
    assert {node: kind for rnd, node, kind in seen if rnd == 2} == {
        node: "arrays" if node == odd["node"] else "downlink" for _, node, _ in seen
    }
    # round 1's downlink is one int8 payload a client: about a quarter of the fp32 adapter
    dense = sum(v.numel() * 4 for v in loop.protocol.broadcast.public.values())
    assert max(rows[1]["bytes_down_per_client"].values()) < 0.3 * dense + 1024


def test_delta_catchup_sends_one_payload_of_the_global_minus_the_node_copy(tiny_cfg, tmp_path):
    """``downlink_catchup = "delta"``: a returning node gets one payload, codec(global - its copy), however
    many rounds it missed; its copy becomes copy + decoded, the same on both sides, bit for bit."""
    cfg = tiny_cfg.replace(
        **{
            "federation.rounds": 6,
            "federation.fraction_train": 0.5,
            "compression.downlink": "int8",
            "compression.downlink_catchup": "delta",
        }
    )
    codec = build_codec(cfg.compression, "downlink")
    held: dict[int, dict] = {}  # node -> the copy it held after its last round (computed here, by hand)
    seen: list[tuple[int, int, int]] = []  # (round, node, payloads)

    def client(msg, ctx):
        rnd = int(msg.content[P.CONFIG]["server-round"])
        down = msg.content[P.DOWNLINK] if P.DOWNLINK in msg.content else None
        assert down is not None, "every node starts from its seeded version 0, so no full copy is needed here"
        seen.append((rnd, ctx.node_id, len(down["payloads"])))
        glob = loop.protocol.broadcast.public  # the global the round trains from
        prev = held.get(ctx.node_id, loop.protocol.broadcast.base)
        change = {k: glob[k] - prev[k] for k in glob}
        step = codec.decode(codec.encode(change, seed=0), {k: tuple(v.shape) for k, v in change.items()}, seed=0)
        held[ctx.node_id] = {k: prev[k] + step[k] for k in prev}
        reply = handle_train(msg, ctx, cfg)
        mine = from_arrayrecord(ctx.state[P.GLOBAL_COPY])
        for k, v in held[ctx.node_id].items():
            torch.testing.assert_close(mine[k], v, rtol=0, atol=0)
        return reply

    loop = ServerLoop(cfg, tmp_path, progress=lambda s: None)
    loop.main(LocalGrid(cfg.federation.num_clients, client))
    assert {n for _, _, n in seen} == {1}
    rounds_of = {}
    for rnd, node, _ in seen:
        rounds_of.setdefault(node, []).append(rnd)
    assert any(b - a > 1 for rs in rounds_of.values() for a, b in zip(rs, rs[1:])), "some node should miss rounds"
    for node, copy in held.items():  # the server's record of each node's copy is the node's own
        for k, v in copy.items():
            torch.testing.assert_close(loop.protocol.broadcast.copies[node][k], v, rtol=0, atol=0)
    # one int8 payload per client-round, whatever the gap: about a quarter of the fp32 adapter
    dense = loop.protocol.broadcast.full_bytes
    rows = metrics_rows(tmp_path)
    assert max(max(r["bytes_down_per_client"].values()) for r in rows[1:]) < 0.3 * dense + 1024


@pytest.mark.parametrize("catchup", ["replay", "delta"])
def test_a_node_whose_update_was_dropped_gets_the_full_adapter_next(tiny_cfg, tmp_path, catchup):
    """A node whose reply is dropped may or may not keep the copy it was sent: it gets the full adapter in its
    next round (not a payload against a version it may not hold), then payloads again."""
    cfg = tiny_cfg.replace(
        **{
            "federation.rounds": 3,
            "compression.codec": "int8",
            "compression.downlink": "int8",
            "compression.downlink_catchup": catchup,
        }
    )
    kinds: dict[tuple[int, int], str] = {}
    bad = {}

    def client(msg, ctx):
        rnd = int(msg.content[P.CONFIG]["server-round"])
        kinds[rnd, ctx.node_id] = "downlink" if P.DOWNLINK in msg.content else "arrays"
        reply = handle_train(msg, ctx, cfg)
        if rnd == 1 and not bad:  # the first node reached sends a truncated payload (it kept its new copy)
            bad["node"] = ctx.node_id
            upd = reply.content[P.UPDATE]
            reply.content[P.UPDATE] = ConfigRecord({"codec": upd["codec"], "payload": bytes(upd["payload"])[:-3]})
        return reply

    loop = ServerLoop(cfg, tmp_path, progress=lambda s: None)
    loop.main(LocalGrid(cfg.federation.num_clients, client))
    rows = metrics_rows(tmp_path)
    n = cfg.federation.num_clients
    assert [r["node"] for r in rows[1]["rejected"]] == [bad["node"]]
    assert rows[2]["accepted"] == n and rows[3]["accepted"] == n
    assert kinds[2, bad["node"]] == "arrays" and kinds[3, bad["node"]] == "downlink"
    assert all(kind == "downlink" for (rnd, node), kind in kinds.items() if node != bad["node"])


def test_downlink_catchup_is_checked():
    from fedtune.compression.config import CompressionConfig
    from fedtune.errors import ConfigError

    assert CompressionConfig(downlink="sign", downlink_catchup="delta").downlink_catchup == "delta"
    with pytest.raises(ConfigError, match="compression.downlink_catchup: applies to a compressed downlink"):
        CompressionConfig(downlink_catchup="delta")
    with pytest.raises(ConfigError, match="compression.downlink_catchup.*'merge'"):
        CompressionConfig(downlink="int8", downlink_catchup="merge")


@pytest.mark.parametrize("catchup", ["replay", "delta"])
def test_a_node_whose_reply_was_lost_gets_the_full_adapter_next(tiny_cfg, tmp_path, catchup):
    """The node trained (and kept the copy it was sent) but its reply never reached the server: the round
    names it as timed out, and its next round gets the full adapter, which it accepts."""
    cfg = tiny_cfg.replace(
        **{"federation.rounds": 3, "compression.downlink": "int8", "compression.downlink_catchup": catchup}
    )
    kinds: dict[tuple[int, int], str] = {}
    lost = 1001

    class LossyGrid(LocalGrid):
        def send_and_receive(self, messages, *, timeout=None):
            messages = list(messages)
            replies = super().send_and_receive(messages, timeout=timeout)
            rounds = {int(m.content[P.CONFIG]["server-round"]) for m in messages if P.DOWNLINK in m.content}
            return [r for r in replies if not (rounds == {2} and r.metadata.src_node_id == lost)]

    def client(msg, ctx):
        kinds[int(msg.content[P.CONFIG]["server-round"]), ctx.node_id] = (
            "downlink" if P.DOWNLINK in msg.content else "arrays"
        )
        return handle_train(msg, ctx, cfg)

    loop = ServerLoop(cfg, tmp_path, progress=lambda s: None)
    loop.main(LossyGrid(cfg.federation.num_clients, client))
    rows = metrics_rows(tmp_path)
    n = cfg.federation.num_clients
    assert [r["node"] for r in rows[2]["rejected"]] == [lost]
    assert "no reply within" in rows[2]["rejected"][0]["reason"]
    assert rows[3]["accepted"] == n
    assert kinds[3, lost] == "arrays" and kinds[2, lost] == "downlink"
