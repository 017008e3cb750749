"""Heterogeneous LoRA ranks in the federated loop (LocalGrid, tiny-bert): cuts, aggregation, resume, config."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from flwr.app import ArrayRecord
from safetensors.torch import load_file

from fedtune import config
from fedtune.aggregation import LoraScaling, hetero_update, lora_layers, product_space_mean, to_dense
from fedtune.errors import ConfigError
from fedtune.flower.client import handle_train
from fedtune.flower.local import LocalGrid
from fedtune.flower.records import from_arrayrecord
from fedtune.flower.server import ServerLoop
from tests.conftest import ROOT

RANKS = [2, 4, 8, 16]
F64 = torch.float64


def hetero_cfg(tiny_cfg, **over):
    return tiny_cfg.replace(
        **{
            "adapter.r": 16,
            "aggregation.lora_mode": "hetero",
            "aggregation.client_ranks": RANKS,
            **over,
        }
    )


class Recorder:
    """A client function that keeps what each (round, partition) received and sent."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.seen: dict[tuple[int, int], dict] = {}

    def __call__(self, msg, ctx):
        reply = handle_train(msg, ctx, self.cfg)
        rnd, pid = int(msg.content["config"]["server-round"]), ctx.node_config["partition-id"]
        m, update = reply.content["metrics"], reply.content["update"]
        self.seen[(rnd, pid)] = {
            "received": from_arrayrecord(msg.content["arrays"]),
            "delta": from_arrayrecord(update) if isinstance(update, ArrayRecord) else None,  # else a codec payload
            "n": float(m["num-examples"]),
            "rank": m["lora-rank"],
        }
        return reply


def a_rank(state) -> set[int]:
    return {tuple(state[a].shape)[0] for a, _ in lora_layers(state).values()}


def rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


def dense_by_hand(state, scaling) -> dict[str, torch.Tensor]:
    """scaling(r) * B @ A per layer, in float64."""
    out = {}
    for prefix, (a, b) in lora_layers(state).items():
        r = state[a].shape[0]
        out[prefix] = scaling(prefix, r) * state[b].to(F64) @ state[a].to(F64)
    return out


def truncate(m: torch.Tensor, r: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(m)
    return (u[:, :r] * s[:r]) @ vh[:r]


def test_hetero_ranks_round_trip_through_the_loop(tiny_cfg, tmp_path):
    cfg = hetero_cfg(tiny_cfg, **{"federation.rounds": 2})
    rec = Recorder(cfg)
    grid = LocalGrid(cfg.federation.num_clients, rec)
    ServerLoop(cfg, tmp_path, progress=lambda s: None).main(grid)
    scaling = LoraScaling(cfg.adapter.alpha)
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["accepted"] for r in rows[1:]] == [4, 4]

    for pid, r in enumerate(RANKS):
        # round 1: ranks unknown, every client gets the global at 16 and cuts it itself; round 2: its own cut
        assert a_rank(rec.seen[(1, pid)]["received"]) == {16}
        assert a_rank(rec.seen[(2, pid)]["received"]) == {r}
        assert a_rank(rec.seen[(2, pid)]["delta"]) == {r} and rec.seen[(2, pid)]["rank"] == r
    down = rows[2]["bytes_down_per_client"]
    assert down["1000"] < down["1001"] < down["1002"] < down["1003"]  # ranks 2 < 4 < 8 < 16

    g1 = rec.seen[(2, 3)]["received"]  # the rank-16 client was sent the whole global after round 1
    g2 = load_file(str(tmp_path / "checkpoint" / "adapter_state.safetensors"))
    assert a_rank(g2) == {16}
    exported = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert {v.shape[0] for k, v in exported.items() if ".lora_A." in k} == {16}
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["r"] == 16

    # round 2 as the server should have done it: the clients' trained factors are what they were sent + their delta
    fulls = [
        {k: v + rec.seen[(2, pid)]["delta"].get(k, 0) for k, v in rec.seen[(2, pid)]["received"].items()}
        for pid in range(4)
    ]
    weights = [rec.seen[(2, pid)]["n"] for pid in range(4)]
    w = [x / sum(weights) for x in weights]
    want = hetero_update(g1, fulls, weights, scaling, max_rank=16)
    got = to_dense(g2, scaling)
    for k in want:
        assert rel(got[k].to(F64), want[k].to(F64)) < 1e-5, k
    # ... and by hand, with dense SVDs: G + sum_i w_i (s_i B_i A_i - T_{r_i}(G)), cut to rank 16
    g = dense_by_hand(g1, scaling)
    mine = dense_by_hand(g2, scaling)
    for prefix, gm in g.items():
        new = gm + sum(wi * (dense_by_hand(f, scaling)[prefix] - truncate(gm, r)) for wi, f, r in zip(w, fulls, RANKS))
        assert rel(mine[prefix], truncate(new, 16)) < 1e-5, prefix
    head = [k for k in g2 if "classifier" in k]
    assert head
    for k in head:
        torch.testing.assert_close(
            g2[k].to(F64), sum(wi * f[k].to(F64) for wi, f in zip(w, fulls)), rtol=1e-5, atol=1e-6
        )
    assert rows[2]["lora_truncation_residual"] >= 0.0


def test_equal_ranks_match_exact_lora_aggregation(tiny_cfg, tmp_path):
    base = tiny_cfg.replace(**{"federation.rounds": 1})
    hetero = base.replace(**{"aggregation.lora_mode": "hetero", "aggregation.client_ranks": [8]})
    exact = base.replace(**{"aggregation.lora_mode": "exact"})
    rec = Recorder(hetero)
    ServerLoop(hetero, tmp_path / "hetero", progress=lambda s: None).main(LocalGrid(4, rec))
    ServerLoop(exact, tmp_path / "exact", progress=lambda s: None).main(
        LocalGrid(4, lambda m, c: handle_train(m, c, exact))
    )
    h = load_file(str(tmp_path / "hetero" / "checkpoint" / "adapter_state.safetensors"))
    e = load_file(str(tmp_path / "exact" / "checkpoint" / "adapter_state.safetensors"))
    scaling = LoraScaling(base.adapter.alpha)
    dh, de = to_dense(h, scaling), to_dense(e, scaling)
    assert dh.keys() == de.keys()
    for k in dh:
        torch.testing.assert_close(dh[k], de[k], rtol=1e-5, atol=1e-6)
    # the same clients' factors through the library's exact mean, too
    fulls = [
        {k: v + rec.seen[(1, p)]["delta"].get(k, 0) for k, v in rec.seen[(1, p)]["received"].items()} for p in range(4)
    ]
    ref, _ = product_space_mean(fulls, [rec.seen[(1, p)]["n"] for p in range(4)], scaling)
    for k, v in to_dense(ref, scaling).items():
        torch.testing.assert_close(dh[k], v, rtol=1e-5, atol=1e-6)


class _Crash(BaseException):
    pass


def test_hetero_resume_matches_an_uninterrupted_run(tiny_cfg, tmp_path):
    cfg = hetero_cfg(tiny_cfg, **{"federation.rounds": 3, "compression.codec": "fp16"})
    fn = lambda m, c: handle_train(m, c, cfg)  # noqa: E731
    whole = ServerLoop(cfg, tmp_path / "whole", progress=lambda s: None).main(LocalGrid(4, fn))

    class Crashing(LocalGrid):
        def send_and_receive(self, messages, *, timeout=None):
            messages = list(messages)
            if int(messages[0].content["config"].get("server-round", 0)) == 3:  # (identity queries: 0)
                raise _Crash
            return super().send_and_receive(messages, timeout=timeout)

    out = tmp_path / "broken"
    with pytest.raises(_Crash):
        ServerLoop(cfg, out, progress=lambda s: None).main(Crashing(4, fn))
    resumed = ServerLoop(cfg, out, progress=lambda s: None, resume=True).main(LocalGrid(4, fn))
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["accepted"] for r in rows[1:]] == [4, 4, 4]
    # the node ranks came back with the checkpoint: round 3 sends the same cuts, byte for byte
    assert resumed["total_bytes_down"] == whole["total_bytes_down"]
    assert resumed["final"] == whole["final"]
    a = load_file(str(tmp_path / "whole" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def test_a_bad_rank_report_is_dropped_and_the_round_goes_on(tiny_cfg, tmp_path):
    cfg = hetero_cfg(tiny_cfg, **{"federation.rounds": 1})

    def client(msg, ctx):
        reply = handle_train(msg, ctx, cfg)
        if ctx.node_config["partition-id"] == 0:
            reply.content["metrics"]["lora-rank"] = 32
        return reply

    ServerLoop(cfg, tmp_path, progress=lambda s: None).main(LocalGrid(4, client))
    row = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()][1]
    assert row["accepted"] == 3
    assert "lora-rank" in row["rejected"][0]["reason"]


@pytest.mark.parametrize(
    "over",
    [
        {"privacy.mode": "sample", "privacy.noise_multiplier": 1.0, "privacy.max_grad_norm": 1.0},
        {"privacy.mode": "client-local", "privacy.noise_multiplier": 0.5, "privacy.clip_norm": 1.0},
        {
            "adapter.method": "dora",
            "aggregation.server_optimizer": "fedprox",
            "aggregation.proximal_mu": 0.1,
            "aggregation.max_update_norm": 100.0,
        },
        {"compression.codec": "topk+int8", "compression.error_feedback": True},
    ],
    ids=["dp-sgd", "local-dp", "dora-fedprox", "topk-ef"],
)
def test_hetero_runs_with_the_settings_it_allows(tiny_cfg, tmp_path, over):
    cfg = hetero_cfg(tiny_cfg, **{"federation.rounds": 2, **over})
    rec = Recorder(cfg)
    summary = ServerLoop(cfg, tmp_path, progress=lambda s: None).main(LocalGrid(4, rec))
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["accepted"] for r in rows[1:]] == [4, 4]
    assert [rec.seen[(2, p)]["rank"] for p in range(4)] == RANKS
    assert summary["aggregation"]["client_ranks"] == RANKS


@pytest.mark.parametrize(
    ("over", "keys"),
    [
        ({"aggregation.client_ranks": [2, 0]}, ["aggregation.client_ranks"]),
        ({"aggregation.client_ranks": [2, 2.5]}, ["aggregation.client_ranks"]),
        ({"aggregation.client_ranks": []}, ["aggregation.client_ranks"]),
        ({"aggregation.client_ranks": "2,x"}, ["aggregation.client_ranks"]),
        ({"aggregation.client_ranks": [2, True]}, ["aggregation.client_ranks"]),
        ({"aggregation.lora_mode": "exact"}, ["aggregation.client_ranks", "aggregation.lora_mode = 'hetero'"]),
        ({"adapter.r": 8}, ["aggregation.client_ranks", "adapter.r = 8", "adapter.r = max(client_ranks) = 16"]),
        ({"adapter.method": "prompt"}, ["aggregation.lora_mode", "adapter.method"]),
        ({"adapter.ffa": True}, ["adapter.ffa"]),
        ({"train.mode": "zo"}, ["train.mode"]),
        ({"compression.downlink": "fp16"}, ["compression.downlink"]),
        (
            {"privacy.mode": "client-central", "privacy.noise_multiplier": 1.0, "privacy.clip_norm": 1.0},
            ["privacy.mode", "client-central"],
        ),
        ({"aggregation.server_optimizer": "fedadam"}, ["hetero", "fedadam"]),
        ({"aggregation.robust": "median"}, ["robust"]),
    ],
)
def test_config_rejects_bad_hetero_settings_naming_the_keys(tiny_cfg, over, keys):
    with pytest.raises(ConfigError) as err:
        hetero_cfg(tiny_cfg, **over)
    for key in keys:
        assert key in str(err.value)


def test_config_reads_client_ranks_in_every_form(tiny_cfg, tmp_path):
    cfg = hetero_cfg(tiny_cfg)
    assert cfg.aggregation.client_ranks == (2, 4, 8, 16)
    assert [cfg.aggregation.client_rank(i, 16) for i in range(6)] == [2, 4, 8, 16, 2, 4]
    assert hetero_cfg(tiny_cfg, **{"aggregation.client_ranks": "2, 4 8,16"}).aggregation.client_ranks == (2, 4, 8, 16)
    plain = tiny_cfg.replace(**{"aggregation.lora_mode": "hetero"})  # no client_ranks: everyone at adapter.r
    assert plain.aggregation.client_ranks is None and plain.aggregation.client_rank(3, 8) == 8
    # Flower's flat run_config and the TOML written to the run directory give the same config back
    flat = config.from_run_config(
        {
            "config": str(ROOT / "simulations/configs/tiny.toml"),
            "overrides": "adapter.r=16 aggregation.lora_mode=hetero aggregation.client_ranks=[2,4,8,16]",
        }
    )
    assert flat.to_dict() == cfg.to_dict()
    (tmp_path / "c.toml").write_text(config.to_toml(cfg))
    assert config.load(tmp_path / "c.toml").to_dict() == cfg.to_dict()


def test_bench_table_rows_may_hold_lists():
    spec = importlib.util.spec_from_file_location("bench_table", ROOT / "bench" / "table.py")
    table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(table)
    name, overrides = table.parse_row(
        "het:adapter.r=16,aggregation.lora_mode=hetero,aggregation.client_ranks=[2,4,8,16]"
    )
    assert name == "het"
    assert overrides == ["adapter.r=16", "aggregation.lora_mode=hetero", "aggregation.client_ranks=[2,4,8,16]"]
    assert table.parse_row("none:") == ("none", [])
