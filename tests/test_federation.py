"""The federated loop in one process (LocalGrid): real messages, records and sizes."""

import json

import pytest
import torch
from flwr.app import Message, MessageType, RecordDict

from fedtune import adapters, config, workspace
from fedtune.flower.client import handle_train
from fedtune.flower.local import LocalGrid
from fedtune.flower.records import PACKED, array_data_bytes, from_arrayrecord, pack, to_arrayrecord, wire_bytes
from fedtune.flower.server import ServerLoop, sample_nodes


def _run(cfg, tmp_path, **grid_kw):
    grid = LocalGrid(cfg.federation.num_clients, lambda m, c: handle_train(m, c, cfg), **grid_kw)
    return ServerLoop(cfg, tmp_path, progress=lambda s: None).main(grid), grid


def test_sampling_is_seeded_and_respects_minimum():
    nodes = [2**63 + 5, 17, 99, 3, 42]
    a = sample_nodes(nodes, 0.4, 1, seed=7, rnd=3)
    assert a == sample_nodes(nodes, 0.4, 1, seed=7, rnd=3) and len(a) == 2 and set(a) <= set(nodes)
    assert len(sample_nodes(nodes, 0.1, 3, seed=7, rnd=3)) == 3


def test_sampling_follows_partitions_not_random_node_ids(tiny_cfg, tmp_path):
    """Flower's node ids are random per run: two runs must still sample the same silos."""
    cfg = tiny_cfg.replace(**{"federation.rounds": 3, "federation.fraction_train": 0.5})
    picked, finals = [], []
    for i, ids in enumerate(([10, 20, 30, 40], [987654321, 5, 2**63 + 1, 123])):
        summary, grid = _run(cfg, tmp_path / str(i), node_ids=ids)
        rows = [json.loads(x) for x in (tmp_path / str(i) / "metrics.jsonl").read_text().splitlines()]
        picked.append([sorted(int(c["partition-id"]) for c in r["clients"]) for r in rows[1:]])
        finals.append(summary["final"])
        assert grid.contexts[ids[1]].node_config["partition-id"] == 1
    assert picked[0] == picked[1] and all(len(p) == 2 for p in picked[0])
    assert len({tuple(p) for p in picked[0]}) > 1  # sampling does change across rounds
    assert finals[0] == finals[1]


@pytest.mark.parametrize("method", ["lora", "dora", "prompt"])
def test_client_sends_only_the_adapter(tiny_cfg, method):
    cfg = tiny_cfg.replace(**{"adapter.method": method})
    ws = workspace.get(cfg)
    state = ws.initial_state()
    grid = LocalGrid(cfg.federation.num_clients, lambda m, c: handle_train(m, c, cfg))
    msg = Message(
        RecordDict(
            {"arrays": to_arrayrecord(state), "config": __import__("flwr").app.ConfigRecord({"server-round": 1})}
        ),
        dst_node_id=grid.node_ids[0],
        message_type=MessageType.TRAIN,
    )
    reply = grid.send_and_receive([msg])[0]
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    update = reply.content["update"]
    n_trainable = adapters.num_trainable(ws.model)
    # the tensor bytes on the wire are exactly the trainable adapter in fp32 ...
    assert array_data_bytes(update) == 4 * n_trainable
    assert set(from_arrayrecord(update)) == set(ws.trainable_keys())
    assert list(update) == [PACKED]  # one array on the wire (two Flower objects), whatever the tensor count
    # ... and the whole serialized reply is that plus names/headers, never the base model
    base_bytes = sum(p.numel() * 4 for p in ws.model.base_model.parameters())
    n_keys = len(ws.trainable_keys())
    assert 4 * n_trainable <= wire_bytes(reply.content) <= 4 * n_trainable + 400 * n_keys + 512
    assert wire_bytes(reply.content) < base_bytes / 50


def test_round_loop_writes_outputs_and_survives_a_failing_client(tiny_cfg, tmp_path):
    cfg = tiny_cfg.replace(**{"federation.rounds": 2})
    summary, grid = _run(cfg, tmp_path, fail=lambda node, rnd: node == 1001 and rnd == 2)
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert rows[1]["accepted"] == 4 and rows[2]["accepted"] == 3
    assert rows[2]["rejected"][0]["node"] == 1001 and "simulated client failure" in rows[2]["rejected"][0]["reason"]
    assert rows[2]["bytes_up"] == sum(rows[2]["bytes_up_per_client"].values())
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["total_bytes_up"] == sum(r["bytes_up"] for r in rows)
    assert saved["final"]["accuracy"] == rows[-1]["eval"]["accuracy"]
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    assert config.load(tmp_path / "config.toml").to_dict() == cfg.to_dict()


def test_malformed_update_is_dropped_and_the_round_goes_on(tiny_cfg, tmp_path):
    cfg = tiny_cfg.replace(**{"federation.rounds": 1})

    def client(msg, ctx):
        reply = handle_train(msg, ctx, cfg)
        if ctx.node_config["partition-id"] == 0:
            bad = from_arrayrecord(reply.content["update"])
            first = sorted(bad)[0]
            bad[first] = bad[first] * float("nan")
            reply.content["update"] = pack(bad)
        return reply

    grid = LocalGrid(cfg.federation.num_clients, client)
    ServerLoop(cfg, tmp_path, progress=lambda s: None).main(grid)
    row = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()][1]
    assert row["accepted"] == cfg.federation.num_clients - 1
    assert "non-finite" in row["rejected"][0]["reason"]


def test_fedavg_of_identical_updates_is_that_update(tiny_cfg, tmp_path):
    """Every client trains on the same data with the same seed: the mean equals each one."""
    cfg = tiny_cfg.replace(**{"federation.rounds": 1, "data.partition": "iid"})
    ws = workspace.get(cfg)
    start = ws.initial_state()

    def client(msg, ctx):
        ctx.node_config["partition-id"] = 0
        return handle_train(msg, ctx, cfg)

    grid = LocalGrid(cfg.federation.num_clients, client)
    ServerLoop(cfg, tmp_path, progress=lambda s: None).main(grid)
    single = LocalGrid(cfg.federation.num_clients, client).send_and_receive(
        [
            Message(
                RecordDict(
                    {
                        "arrays": to_arrayrecord(start),
                        "config": __import__("flwr").app.ConfigRecord({"server-round": 1}),
                    }
                ),
                dst_node_id=1000,
                message_type=MessageType.TRAIN,
            )
        ]
    )[0]
    from peft import PeftModel  # noqa: F401  (peft loads the export below)

    from fedtune.flower.records import from_arrayrecord

    delta = from_arrayrecord(single.content["update"])
    exported = _load_safetensors(tmp_path / "adapter" / "adapter_model.safetensors")
    for k, d in delta.items():
        expect = start[k] + d
        got = exported[_export_key(k, exported)]
        torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-6)


def _load_safetensors(path):
    from safetensors.torch import load_file

    return load_file(str(path))


def _export_key(k, exported):
    return k if k in exported else next(e for e in exported if e.endswith(k.split("base_model.model.")[-1]))


def test_exported_adapter_loads_with_peft_and_reproduces_accuracy(tiny_cfg, tmp_path):
    from peft import PeftModel

    from fedtune import models
    from fedtune.train import evaluate

    cfg = tiny_cfg.replace(**{"federation.rounds": 1})
    summary, _ = _run(cfg, tmp_path)
    ws = workspace.get(cfg)
    base = models.load_base(ws.resolved, cfg.model, ws.tokenizer, torch.device("cpu"))
    model = PeftModel.from_pretrained(base, str(tmp_path / "adapter"))
    got = evaluate(model, ws.test_data(), task=ws.task, pad_id=ws.pad_id, device=torch.device("cpu"))
    assert got["accuracy"] == pytest.approx(summary["final"]["accuracy"], abs=1e-9)
    assert got["loss"] == pytest.approx(summary["final"]["loss"], rel=1e-5)


@pytest.mark.parametrize("method", ["lora", "dora", "prompt"])
def test_adapter_state_round_trips(tiny_cfg, method):
    ws = workspace.get(tiny_cfg.replace(**{"adapter.method": method}))
    state = ws.initial_state()
    noisy = {k: v + torch.randn(v.shape, generator=torch.Generator().manual_seed(0)) for k, v in state.items()}
    adapters.set_state_(ws.model, noisy)
    back = adapters.get_state(ws.model)
    assert back.keys() == noisy.keys()
    for k in noisy:
        torch.testing.assert_close(back[k], noisy[k])


def test_a_silo_trains_on_its_own_file(tiny_cfg, tmp_path):
    """Deployment: node_config data-path points at the silo's own CSV."""
    rows = "\n".join(f"review {i} {'good' if i % 2 else 'bad'},{i % 2}" for i in range(40))
    (tmp_path / "silo.csv").write_text("text,label\n" + rows + "\n")
    cfg = tiny_cfg.replace(**{"federation.rounds": 1})
    grid = LocalGrid(cfg.federation.num_clients, lambda m, c: handle_train(m, c, cfg))
    for ctx in grid.contexts.values():
        ctx.node_config["data-path"] = str(tmp_path / "silo.csv")
    ServerLoop(cfg, tmp_path / "run", progress=lambda s: None).main(grid)
    row = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()][1]
    assert row["accepted"] == cfg.federation.num_clients
    assert all(c["num-examples"] == 40 for c in row["clients"])


@pytest.mark.parametrize("optimizer", ["fedadam", "fedyogi", "fedavgm"])
def test_server_optimizers_keep_every_round_accepted_and_float32(tiny_cfg, tmp_path, optimizer):
    """Flower's adaptive optimizers return float64 arrays; the global must stay float32, or every
    reply from round 2 on fails validation (what made FedAdam look stuck at chance)."""
    cfg = tiny_cfg.replace(**{"federation.rounds": 3, "aggregation.server_optimizer": optimizer})
    seen = {}

    def client(msg, ctx):
        reply = handle_train(msg, ctx, cfg)
        rnd = int(msg.content["config"]["server-round"])
        from fedtune.flower.records import from_arrayrecord

        seen[(rnd, ctx.node_config["partition-id"])] = (
            from_arrayrecord(reply.content["update"]),
            float(reply.content["metrics"]["num-examples"]),
        )
        return reply

    ServerLoop(cfg, tmp_path, progress=lambda s: None).main(LocalGrid(cfg.federation.num_clients, client))
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["accepted"] for r in rows[1:]] == [cfg.federation.num_clients] * 3, [r["rejected"] for r in rows[1:]]
    final = _load_safetensors(tmp_path / "checkpoint" / "adapter_state.safetensors")
    assert {v.dtype for v in final.values()} == {torch.float32}
    if optimizer != "fedadam":
        return
    # round 1 by hand, Flower's FedAdam: m = (1-b1) D, v = (1-b2) D^2, x += eta_t m / (sqrt(v) + tau),
    # D = the example-weighted mean delta, eta_t = eta sqrt(1 - b2^(t+1)) / (1 - b1^(t+1))
    agg = cfg.aggregation
    start = workspace.get(cfg).initial_state()
    deltas = [seen[(1, p)] for p in range(cfg.federation.num_clients)]
    total = sum(n for _, n in deltas)
    eta = agg.server_lr * (1 - agg.beta_2**2) ** 0.5 / (1 - agg.beta_1**2)
    round1 = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[1])
    assert round1["accepted"] == cfg.federation.num_clients
    want = {}
    for k in deltas[0][0]:
        d = sum(n * delta[k].double() for delta, n in deltas) / total
        m, v = (1 - agg.beta_1) * d, (1 - agg.beta_2) * d**2
        want[k] = start[k].double() + eta * m / (v.sqrt() + agg.tau)
    # the round-2 clients were sent x_1: their starting point is the checkpointed global after round 1
    got = {}

    def capture(msg, ctx):
        from fedtune.flower.records import from_arrayrecord

        got.update(from_arrayrecord(msg.content["arrays"]))
        raise RuntimeError("only capturing")

    cfg2 = cfg.replace(**{"federation.rounds": 2})
    ServerLoop(cfg2, tmp_path / "again", progress=lambda s: None).main(
        LocalGrid(
            cfg.federation.num_clients,
            lambda m, c: capture(m, c) if int(m.content["config"]["server-round"]) == 2 else handle_train(m, c, cfg2),
        )
    )
    for k, w in want.items():
        torch.testing.assert_close(got[k].double(), w, rtol=1e-5, atol=1e-7)
