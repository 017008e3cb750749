"""``aggregation.robust = "multikrum"``: Multi-Krum (Blanchard et al. 2017; El Mhamdi et al. 2018).

Each update scores the sum of its squared L2 distances to its n - f - 2 nearest others; the m
best-scored are kept (``aggregation.krum_select``, n - f when unset) and averaged with the
``aggregation.weighting`` weights. Every expected value is computed here in numpy from that
definition, independently of Flower's ``select_multikrum``, and compared with what the server's
real aggregation path (and the AGR-tailored attack's copy of the rule) produced.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from flwr.app import Message, MetricRecord, RecordDict

from fedtune import attack, cli, config, workspace
from fedtune.aggregation.config import AggregationConfig, multikrum_kept
from fedtune.errors import ConfigError
from fedtune.flower import protocol as P
from fedtune.flower.client import handle_train
from fedtune.flower.local import LocalGrid
from fedtune.flower.records import to_arrayrecord
from fedtune.flower.server import DeltaRounds, MultiKrum, build_strategy

from .conftest import CONFIGS, run_capturing_updates

NUM_EXAMPLES = [10, 40, 25, 160, 70, 5]  # six clients; the last two send the outliers


def multikrum_reference(rows: np.ndarray, f: int, m: int) -> tuple[list[int], np.ndarray]:
    """Multi-Krum by its definition, in float64: (kept rows, best score first; every row's score)."""
    d2 = ((rows[:, None, :] - rows[None, :, :]) ** 2).sum(-1)
    c = max(1, len(rows) - f - 2)
    scores = np.array([np.sort(np.delete(d2[i], i))[:c].sum() for i in range(len(rows))])
    return [int(i) for i in np.argsort(scores, kind="stable")[:m]], scores


def weighted_mean(rows: np.ndarray, weights) -> np.ndarray:
    w = np.asarray(weights, dtype=np.float64)
    return (w[:, None] * rows).sum(0) / w.sum()


def hand_made_deltas(keys, state) -> list[dict[str, torch.Tensor]]:
    """Four honest deltas of clearly different spreads around a common step, and two far outliers."""
    gen = torch.Generator().manual_seed(0)
    step = {k: 0.01 * torch.randn(state[k].shape, generator=gen) for k in keys}
    honest = [
        {k: step[k] + s * torch.randn(state[k].shape, generator=gen) for k in keys} for s in (1e-3, 2e-3, 4e-3, 8e-3)
    ]
    outliers = [{k: v + 3.0 * torch.randn(v.shape, generator=gen) for k, v in step.items()} for _ in range(2)]
    return honest + outliers


def _flat(delta, keys) -> np.ndarray:
    return np.concatenate([delta[k].double().reshape(-1).numpy() for k in keys])


# --- the server's aggregation on hand-made updates ---------------------------------------------


@pytest.mark.parametrize("weighting", ["examples", "uniform"])
@pytest.mark.parametrize("krum_select", [None, 2])
def test_server_keeps_the_m_best_scored_updates_and_averages_them_with_their_weights(tiny_cfg, weighting, krum_select):
    cfg = tiny_cfg.replace(
        **{
            "federation.num_clients": 6,
            "aggregation.robust": "multikrum",
            "aggregation.num_malicious": 2,
            "aggregation.weighting": weighting,
            **({"aggregation.krum_select": krum_select} if krum_select else {}),
        }
    )
    rounds = DeltaRounds(cfg)
    rounds.setup(workspace.get(cfg))
    before = {k: v.clone() for k, v in rounds.state.items()}
    nodes = LocalGrid(len(NUM_EXAMPLES), handle_train).get_node_ids()
    deltas = hand_made_deltas(rounds.keys, rounds.state)
    for msg, delta, n in zip(rounds.messages(1, nodes), deltas, NUM_EXAMPLES):
        metrics = MetricRecord({"num-examples": n, "server-round": 1, "train_loss": 1.0})
        reply = Message(RecordDict({P.UPDATE: to_arrayrecord(delta), P.METRICS: metrics}), reply_to=msg)
        rounds.receive(1, msg.metadata.dst_node_id, reply)
    rounds.aggregate(1)

    rows = np.stack([_flat(d, rounds.keys) for d in deltas])
    m = krum_select or 6 - 2  # n - f by default
    kept, scores = multikrum_reference(rows, f=2, m=m)
    assert 4 not in kept and 5 not in kept  # the outliers are never kept
    ranked = np.sort(scores)
    assert ranked[m] > 1.2 * ranked[m - 1]  # no near tie at the cut: the kept set is unambiguous
    weights = [NUM_EXAMPLES[i] if weighting == "examples" else 1 for i in kept]
    want = _flat(before, rounds.keys) + weighted_mean(rows[kept], weights)
    np.testing.assert_allclose(_flat(rounds.state, rounds.keys), want, rtol=0, atol=1e-6)
    # the weights matter at this tolerance: the other weighting lands elsewhere
    other = [1 if weighting == "examples" else NUM_EXAMPLES[i] for i in kept]
    assert np.abs(weighted_mean(rows[kept], weights) - weighted_mean(rows[kept], other)).max() > 1e-4


def test_the_default_m_follows_each_rounds_size_and_is_at_least_one():
    assert [multikrum_kept(n, 2, None) for n in (1, 2, 3, 6, 10)] == [1, 1, 1, 4, 8]
    assert [multikrum_kept(n, 2, 5) for n in (3, 5, 10)] == [3, 5, 5]  # a round of fewer keeps them all
    agg = AggregationConfig(robust="multikrum", num_malicious=1)
    assert agg.krum_kept(7) == 6 and AggregationConfig(robust="multikrum", krum_select=3).krum_kept(7) == 3


def test_build_strategy_gives_multikrum_its_f_and_krum_keeps_one(tiny_cfg):
    strategy = build_strategy(tiny_cfg.replace(**{"aggregation.robust": "multikrum", "aggregation.num_malicious": 1}))
    assert isinstance(strategy, MultiKrum) and strategy.num_malicious_nodes == 1
    krum = build_strategy(tiny_cfg.replace(**{"aggregation.robust": "krum", "aggregation.num_malicious": 1}))
    assert type(krum).__name__ == "Krum" and krum.num_nodes_to_select == 1


# --- the AGR-tailored attack's copy of the rule ------------------------------------------------


def test_attack_rule_is_the_servers_multikrum_and_agrees_with_the_definition():
    g = torch.Generator().manual_seed(3)
    rows = torch.randn(9, 30, generator=g, dtype=torch.float64)
    rows[7] += 10.0  # one outlier
    for f, krum_select in ((2, None), (0, None), (2, 3), (1, 9)):
        rule = attack.ServerRule("multikrum", num_malicious=f, krum_select=krum_select)
        m = krum_select if krum_select is not None else 9 - f
        kept, _ = multikrum_reference(rows.numpy(), f, m)
        assert attack.krum_rows(rows, rule) == kept
        got, pick = attack.robust_aggregate(rows, rule)
        np.testing.assert_allclose(got.numpy(), rows.numpy()[kept].mean(0), rtol=1e-12, atol=1e-12)
        assert pick is None
    assert (
        attack.krum_rows(rows, attack.ServerRule("krum", num_malicious=2)) == multikrum_reference(rows.numpy(), 2, 1)[0]
    )


def test_agr_tailored_against_multikrum_keeps_every_copy_at_its_gamma_and_not_one_step_above():
    """The search's guarantee, checked against Multi-Krum by its definition: every copy is kept at the
    returned gamma, and at the grid point just above (probed, per `search_gamma`) one is not.

    f = 0 and m = k: the k copies must be the k best-scored of the 2k rows. With m = 2k - f (the
    default) the copies' k - 1 zero distances to each other keep them in at every gamma, as they make
    Krum pick one when f >= k - 1: the search then runs to its top."""
    g = torch.Generator().manual_seed(5)
    benign = torch.randn(4, 12, generator=g, dtype=torch.float64)
    k = 4
    rule = attack.ServerRule("multikrum", num_malicious=0, krum_select=k)
    m_vec, gamma = attack.tailor(benign, rule, gamma_init=2.0, steps=6)
    mean, std = benign.mean(0), benign.std(0, unbiased=True)
    torch.testing.assert_close(m_vec, mean - gamma * std)

    def all_copies_kept(gam, f=0, m=k):
        rows = torch.cat([benign, (mean - gam * std).expand(k, -1)]).numpy()
        return set(range(k, 2 * k)) <= set(multikrum_reference(rows, f, m)[0])

    grid = 2.0 / 2**5
    assert 0 < gamma < 4.0 - grid  # the search neither failed everywhere nor ran to its top
    assert all_copies_kept(gamma) and not all_copies_kept(gamma + grid)
    default = attack.ServerRule("multikrum", num_malicious=2)  # m = 2k - f = 6
    assert attack.tailor(benign, default, gamma_init=2.0, steps=6)[1] == 4.0 - grid
    assert all(all_copies_kept(0.5 * j, f=2, m=6) for j in range(20))


# --- configuration: the same refusals as Krum, and m against the round's size -------------------


def _problems(overrides):
    with pytest.raises(ConfigError) as exc:
        config.load(CONFIGS / "tiny.toml", overrides)
    return exc.value.problems


MK = {"aggregation.robust": "multikrum"}
CENTRAL = {"privacy.mode": "client-central", "privacy.noise_multiplier": 1.0, "privacy.clip_norm": 1.0}


@pytest.mark.parametrize(
    "overrides,second",
    [
        ({"adapter.ffa": True, "aggregation.lora_mode": "ffa"}, "aggregation.lora_mode = 'ffa'"),
        ({"aggregation.lora_mode": "exact"}, "aggregation.lora_mode = 'exact'"),
        ({"aggregation.server_optimizer": "fedadam"}, "aggregation.server_optimizer = 'fedadam'"),
        (CENTRAL, "privacy.mode = 'client-central'"),
        ({"aggregation.secure": "secagg+"}, "aggregation.secure = 'secagg+'"),
        ({"train.mode": "zo"}, "train.mode = 'zo'"),
    ],
)
def test_multikrum_is_refused_where_krum_is(overrides, second):
    for rule in ("krum", "multikrum"):
        problems = _problems({**overrides, "aggregation.robust": rule})
        assert any(p.startswith(f"aggregation.robust: {rule!r} cannot be combined with {second}") for p in problems)


def test_multikrum_composes_where_krum_does():
    for extra in (
        {},
        {"adapter.ffa": True},
        {"aggregation.server_optimizer": "fedprox"},
        {"aggregation.weighting": "uniform"},
    ):
        cfg = config.load(CONFIGS / "tiny.toml", {**MK, "aggregation.krum_select": 3, **extra})
        assert (cfg.aggregation.robust, cfg.aggregation.krum_select) == ("multikrum", 3)
    # and it survives the run directory's config.toml
    assert config.from_dict(__import__("tomllib").loads(config.to_toml(cfg))).aggregation.krum_select == 3


@pytest.mark.parametrize(
    "overrides,message",
    [
        (
            {"aggregation.robust": "krum", "aggregation.krum_select": 2},
            "aggregation.krum_select: only used with aggregation.robust = 'multikrum', which is 'krum'; unset it (got 2)",
        ),
        (
            {"aggregation.krum_select": 2},
            "aggregation.krum_select: only used with aggregation.robust = 'multikrum', which is 'none'; unset it (got 2)",
        ),
        ({**MK, "aggregation.krum_select": 0}, "aggregation.krum_select: must be > 0 (got 0)"),
        ({**MK, "aggregation.krum_select": 2.5}, "aggregation.krum_select"),
        (
            {**MK, "aggregation.krum_select": 3, "federation.fraction_train": 0.5},
            "aggregation.krum_select: Multi-Krum cannot keep more updates than a round has, and a round samples 2 "
            "clients (federation.num_clients = 4 x federation.fraction_train = 0.5, at least "
            "federation.min_train_clients = 2), so every update would be kept (the plain mean); lower it to at "
            "most 2 (got 3)",
        ),
        (
            {**MK, "aggregation.krum_select": 5, "federation.sampling": "poisson"},
            "aggregation.krum_select: Multi-Krum cannot keep more updates than a round has, and "
            "federation.sampling = 'poisson' includes at most federation.num_clients = 4 clients a round",
        ),
        (
            {**MK, "aggregation.num_malicious": 4},
            "aggregation.num_malicious: with aggregation.krum_select unset Multi-Krum keeps n - f of a round's n "
            "updates, and a round samples 4 clients",
        ),
    ],
)
def test_krum_select_refusals_name_the_key_and_the_value(overrides, message):
    problems = _problems(overrides)
    assert any(p.startswith(message) for p in problems), problems


def test_what_a_round_can_honour_is_accepted():
    # Poisson: a round may hold up to num_clients, so an m above the expected 2 is allowed
    cfg = config.load(
        CONFIGS / "tiny.toml",
        {**MK, "aggregation.krum_select": 3, "federation.sampling": "poisson", "federation.fraction_train": 0.5},
    )
    assert cfg.aggregation.krum_select == 3
    assert config.load(CONFIGS / "tiny.toml", {**MK, "aggregation.num_malicious": 3}).aggregation.krum_kept(4) == 1
    # the same refusal for Krum would be new: Krum keeps one update whatever f is
    assert config.load(CONFIGS / "tiny.toml", {"aggregation.robust": "krum", "aggregation.num_malicious": 4})


def test_check_config_refuses_what_the_run_would(capsys):
    argv = ["check-config", "--config", str(CONFIGS / "tiny.toml"), "--set", "aggregation.robust=multikrum"]
    assert cli.main([*argv, "--set", "aggregation.krum_select=9"]) == 2
    assert "aggregation.krum_select: Multi-Krum cannot keep more updates than a round has" in capsys.readouterr().err
    assert cli.main([*argv, "--set", "aggregation.krum_select=4"]) == 0


# --- one federated round end to end ------------------------------------------------------------


def test_a_scale_x100_attacker_is_left_out_and_the_honest_updates_are_averaged_by_examples(tiny_cfg, tmp_path):
    cfg = tiny_cfg.replace(
        **{
            "federation.num_clients": 5,
            "federation.rounds": 1,
            "attack.kind": "scale",
            "attack.factor": 100.0,
            "attack.partition_ids": [2],
            "aggregation.robust": "multikrum",
            "aggregation.num_malicious": 1,
        }
    )
    start = workspace.get(cfg).initial_state()
    loop, sent = run_capturing_updates(cfg, tmp_path)
    nodes = sorted(sent)
    keys = list(sent[nodes[0]][0])
    rows = np.stack([_flat(sent[n][0], keys) for n in nodes])
    counts = [sent[n][1] for n in nodes]
    assert len(set(counts)) > 1  # the clients' sizes differ, so the weights are seen
    kept, _ = multikrum_reference(rows, f=1, m=5 - 1)
    attacker = nodes.index(1000 + 2)  # LocalGrid: node 1000 + i holds partition i
    assert sorted(kept) == [i for i in range(5) if i != attacker]
    state = loop.protocol.state
    want = _flat(start, keys) + weighted_mean(rows[kept], [counts[i] for i in kept])
    np.testing.assert_allclose(_flat(state, keys), want, rtol=0, atol=1e-6)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["aggregation"]["strategy"] == "MultiKrum" and summary["aggregation"]["robust"] == "multikrum"
