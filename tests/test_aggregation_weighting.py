"""``aggregation.weighting``: each accepted update weighted by its example count, or uniformly.

Every expected value is a hand computation (the plain or example-weighted mean of the clients'
updates, in float64) compared with what the server's real aggregation path produced.
"""

from __future__ import annotations

import json
import logging
import tomllib

import numpy as np
import pytest
import torch
from flwr.app import Message, MetricRecord, RecordDict

from fedtune import config, workspace
from fedtune.aggregation.config import AggregationConfig
from fedtune.errors import ConfigError
from fedtune.flower import protocol as P
from fedtune.flower.client import handle_train
from fedtune.flower.local import LocalGrid
from fedtune.flower.records import to_arrayrecord
from fedtune.flower.server import DeltaRounds, ServerLoop

from .conftest import CONFIGS, run_capturing_updates
from .test_secagg import clients_deltas

NUM_EXAMPLES = [10, 30, 160]
LOSSES = [1.0, 2.0, 4.0]


def _mean(values, weights):
    """sum_i w_i v_i / sum_i w_i, in float64."""
    total = float(sum(weights))
    return sum(float(w) / total * v.double() for w, v in zip(weights, values))


def _fake_replies(rounds: DeltaRounds, msgs, gen):
    """One delta a node over the trainable keys, with NUM_EXAMPLES and LOSSES in its metrics."""
    for msg, n, loss in zip(msgs, NUM_EXAMPLES, LOSSES):
        delta = {k: 0.01 * torch.randn(rounds.state[k].shape, generator=gen) for k in rounds.keys}
        metrics = MetricRecord({"num-examples": n, "server-round": 1, "train_loss": loss})
        reply = Message(RecordDict({P.UPDATE: to_arrayrecord(delta), P.METRICS: metrics}), reply_to=msg)
        yield msg.metadata.dst_node_id, reply, delta


@pytest.mark.parametrize(
    "overrides,step",
    [
        ({}, 1.0),  # Flower's FedAvg
        ({"aggregation.server_optimizer": "fedavgm", "aggregation.server_lr": 0.5}, 0.5),  # new = g + lr * mean
        ({"aggregation.lora_mode": "ffa", "adapter.ffa": True}, 1.0),  # fedtune's FFA-LoRA aggregator
    ],
    ids=["fedavg", "fedavgm", "ffa"],
)
@pytest.mark.parametrize("weighting", ["examples", "uniform"])
def test_server_weights_each_reply_as_configured(tiny_cfg, weighting, overrides, step):
    cfg = tiny_cfg.replace(**{"aggregation.weighting": weighting, **overrides})
    rounds = DeltaRounds(cfg)
    rounds.setup(workspace.get(cfg))
    before = {k: v.clone() for k, v in rounds.state.items()}
    # the fake replies never reach a client; the grid sets the process identity Flower's messages need
    nodes = LocalGrid(len(NUM_EXAMPLES), handle_train).get_node_ids()
    msgs = rounds.messages(1, nodes)
    deltas, rows = [], []
    for node, reply, delta in _fake_replies(rounds, msgs, torch.Generator().manual_seed(0)):
        rows.append(rounds.receive(1, node, reply))
        deltas.append(delta)
    train, _ = rounds.aggregate(1)

    weights = NUM_EXAMPLES if weighting == "examples" else [1, 1, 1]
    other = [1, 1, 1] if weighting == "examples" else NUM_EXAMPLES
    gap = 0.0
    for k in rounds.keys:
        want = before[k].double() + step * _mean([d[k] for d in deltas], weights)
        torch.testing.assert_close(rounds.state[k].double(), want, rtol=0, atol=1e-6)
        gap = max(gap, float((want - before[k].double() - step * _mean([d[k] for d in deltas], other)).abs().max()))
    assert gap > 1e-3  # the two weightings differ far above the tolerance: the check means something
    for k in set(before) - set(rounds.keys):  # frozen keys (FFA's A) stay where they were
        assert torch.equal(rounds.state[k], before[k])
    # the round's train metrics take the same weights; each client's row keeps its true example count
    assert train["train_loss"] == pytest.approx(float(np.average(LOSSES, weights=weights)))
    assert [r["num-examples"] for r in rows] == NUM_EXAMPLES


def test_client_weight_is_the_example_count_or_one():
    agg = config.load(CONFIGS / "tiny.toml").aggregation
    assert agg.weighting == "examples" and agg.client_weight(37) == 37.0  # the default: FedAvg's
    assert AggregationConfig(weighting="uniform").client_weight(37) == 1.0


def test_uniform_run_moves_the_global_by_the_plain_mean_of_the_clients_updates(tiny_cfg, tmp_path):
    cfg = tiny_cfg.replace(**{"federation.rounds": 1, "aggregation.weighting": "uniform"})
    initial = workspace.get(cfg).initial_state()
    loop, sent = run_capturing_updates(cfg, tmp_path)
    deltas = [d for d, _ in sent.values()]
    counts = [n for _, n in sent.values()]
    assert len(deltas) == cfg.federation.num_clients and len(set(counts)) > 1  # the silos' sizes differ
    state, gap = loop.protocol.global_state(), 0.0
    for k in deltas[0]:
        want = initial[k].double() + _mean([d[k] for d in deltas], [1] * len(deltas))
        torch.testing.assert_close(state[k].double(), want, rtol=0, atol=1e-6)
        by_examples = initial[k].double() + _mean([d[k] for d in deltas], counts)
        gap = max(gap, float((want - by_examples).abs().max()))
    assert gap > 1e-4  # FedAvg's example-weighted global is elsewhere
    # what ran is recorded: the summary's aggregation block and the run directory's config
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["aggregation"]["weighting"] == "uniform"
    assert tomllib.loads((tmp_path / "config.toml").read_text())["aggregation"]["weighting"] == "uniform"
    row = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()][1]
    assert sorted(c["num-examples"] for c in row["clients"]) == sorted(counts)


def test_uniform_zeroth_order_round_is_the_plain_mean_of_the_seed_scalars(tiny_cfg, tmp_path):
    from fedtune.flower.zo_client import UPLINK_KEY
    from fedtune.zo import decode_uplink

    cfg = tiny_cfg.replace(
        **{
            "federation.rounds": 1,
            "train.mode": "zo",
            "zo.num_seeds": 8,  # few seeds: the clients' draws overlap
            "zo.local_steps": 4,
            "zo.lr": 1e-3,
            "aggregation.weighting": "uniform",
        }
    )
    sent = {}

    def client(msg, ctx):
        reply = handle_train(msg, ctx, cfg)
        pairs = decode_uplink(reply.content[P.ZO][UPLINK_KEY], cfg.zo.pool(), max_pairs=cfg.zo.local_steps)
        sent[ctx.node_id] = (pairs, int(reply.content[P.METRICS]["num-examples"]))
        return reply

    loop = ServerLoop(cfg, tmp_path, progress=lambda s: None)
    loop.main(LocalGrid(cfg.federation.num_clients, client))
    # by hand: each client's scalars summed per seed, then the plain mean over the clients
    want: dict[int, float] = {}
    for pairs, _ in sent.values():
        for index, scalar in pairs:
            want[int(index)] = want.get(int(index), 0.0) + float(scalar) / len(sent)
    want = {i: v for i, v in want.items() if np.float32(v) != 0}
    [entry] = loop.protocol.history.entries
    assert entry.indices.tolist() == sorted(want)
    np.testing.assert_allclose(entry.scalars, [want[i] for i in sorted(want)], rtol=1e-6)
    assert len({n for _, n in sent.values()}) > 1  # sizes differ, so example weights would give other scalars


def test_secagg_clients_all_send_the_same_weight_under_uniform():
    from fedtune.flower.secagg import check_weight, secagg_weight

    cfg = config.load(CONFIGS / "tiny.toml", {"aggregation.secure": "secagg+", "aggregation.weighting": "uniform"})
    weights = {secagg_weight(n, cfg) for n in (1, 7, 999, 5000)}
    # one weight for all, at max_weight so secaggplus_mod's factor weight / max_weight is 1 (full precision)
    assert weights == {int(cfg.aggregation.max_weight)}
    check_weight(weights.pop(), cfg)  # cannot wrap the masked sum (validation keeps m * Q below the modulus)
    by_examples = config.load(CONFIGS / "tiny.toml", {"aggregation.secure": "secagg+"})
    assert [secagg_weight(n, by_examples) for n in (1, 7)] == [1, 7]


def test_uniform_secagg_round_is_the_plain_mean_within_quantization(tmp_path):
    """Flower's real SecAgg+ workflow and mod, in one process: the unmasked mean is the clients' plain mean."""
    from types import SimpleNamespace

    from flwr.app import Context
    from flwr.common.serde import recorddict_from_proto, recorddict_to_proto

    from fedtune.flower.secagg import handle_secagg_train, run_secagg

    n = 3
    cfg = config.load(
        CONFIGS / "tiny.toml",
        {
            "aggregation.secure": "secagg+",
            "aggregation.weighting": "uniform",
            "federation.num_clients": n,
            "federation.rounds": 1,
            "federation.fraction_train": 1.0,
        },
    )

    def wire(m):  # each party its own copy of a message, as over the wire (secaggplus_mod edits its input)
        if not m.has_content():
            return m
        return Message(metadata=m.metadata, content=recorddict_from_proto(recorddict_to_proto(m.content)))

    class Grid(LocalGrid):
        run = SimpleNamespace(run_id=1)  # Flower's client-manager thread reads it

        def send_and_receive(self, messages, *, timeout=None):
            return [wire(r) for r in super().send_and_receive([wire(m) for m in messages], timeout=timeout)]

    steps = []
    logging.getLogger("flwr").setLevel(logging.WARNING)
    run_secagg(
        Grid(n, lambda m, c: handle_secagg_train(m, c, cfg)),
        Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={}),
        cfg,
        tmp_path,
        lambda s: None,
        on_aggregate=lambda *a: steps.append(a),
    )
    [(rnd, before, secure_mean)] = steps
    deltas, counts = clients_deltas(cfg, before, rnd, n)  # each client's training again, deterministic
    agg = cfg.aggregation
    # each of the n weighted deltas is rounded to a grid of step 2C/Q and the sum is divided by the
    # total weight factor, n x (weight / max_weight = 1): at most one step an entry
    bound = n * (2 * agg.clipping_range / agg.quantization_range) / n + 1e-7
    worst, gap = 0.0, 0.0
    for k in secure_mean:
        plain = _mean([d[k] for d in deltas], [1] * n)
        worst = max(worst, float((secure_mean[k].double() - plain).abs().max()))
        gap = max(gap, float((plain - _mean([d[k] for d in deltas], counts)).abs().max()))
    assert worst <= bound, (worst, bound)
    assert len(set(counts)) > 1 and gap > 100 * bound  # the example-weighted mean is far from what ran
    row = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()][1]
    assert sorted(c["num-examples"] for c in row["clients"]) == sorted(counts)  # true counts, not the weight


@pytest.mark.parametrize("value", ["equal", "Uniform", ""])
def test_a_bad_weighting_is_refused_naming_the_key(value):
    with pytest.raises(ConfigError) as exc:
        config.load(CONFIGS / "tiny.toml", {"aggregation.weighting": value})
    assert f"aggregation.weighting: must be one of examples, uniform (got {value!r})" in exc.value.problems


@pytest.mark.parametrize(
    "overrides",
    [
        {"aggregation.secure": "secagg+"},
        {"train.mode": "zo"},
        {"aggregation.robust": "median"},
        {"aggregation.robust": "krum"},
        {"aggregation.lora_mode": "hetero", "aggregation.client_ranks": "2,4"},
        {"privacy.mode": "client-central", "privacy.clip_norm": 1.0, "privacy.noise_multiplier": 0.5},
        {"aggregation.server_optimizer": "fedadam"},
    ],
)
def test_uniform_composes_with_every_aggregation_path(overrides):
    cfg = config.load(CONFIGS / "tiny.toml", {**overrides, "aggregation.weighting": "uniform"})
    assert cfg.aggregation.weighting == "uniform"
    # and survives the run directory's config.toml and Flower's flat run config
    assert config.from_dict(tomllib.loads(config.to_toml(cfg))).aggregation.weighting == "uniform"
