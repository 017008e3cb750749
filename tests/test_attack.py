"""Simulated attacks (fedtune.attack): what an attacker sends, what the defences make of it.

The attacker's update is checked against the benign update computed independently
(the same client run honestly), and the server's rejections against their reasons
in metrics.jsonl; every run is the real loop on the tiny model (LocalGrid).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Message, MessageType, RecordDict

from fedtune import attack, config, workspace
from fedtune.errors import ConfigError
from fedtune.flower.client import handle_train, local_data
from fedtune.flower.local import LocalGrid
from fedtune.flower.records import from_arrayrecord, to_arrayrecord
from fedtune.flower.server import ServerLoop
from tests.conftest import CONFIGS, metrics_rows, run_capturing_updates


def _norm(d):
    return math.sqrt(sum(float(v.double().square().sum()) for v in d.values()))


# --- configuration -------------------------------------------------------------------------


def test_attackers_are_a_seeded_choice_of_the_fraction_or_the_listed_partitions():
    a = attack.AttackConfig(kind="sign-flip", fraction=0.3)
    chosen = attack.attackers(a, 10)
    assert len(chosen) == 3 and chosen == tuple(sorted(set(chosen))) and all(0 <= p < 10 for p in chosen)
    assert attack.attackers(attack.AttackConfig(kind="sign-flip", fraction=0.3), 10) == chosen  # reproducible
    others = {attack.attackers(attack.AttackConfig(kind="sign-flip", fraction=0.3, seed=s), 10) for s in range(1, 8)}
    assert len(others | {chosen}) > 1  # the seed decides
    assert attack.num_attackers(attack.AttackConfig(kind="scale", fraction=0.25), 10) == 3  # 2.5 rounds half up
    assert attack.attackers(attack.AttackConfig(kind="scale", partition_ids=(7, 2)), 10) == (2, 7)
    assert attack.attackers(attack.AttackConfig(), 10) == ()


def test_section_defaults_and_what_each_kind_reads(tiny_cfg):
    cfg = tiny_cfg.replace(**{"attack.kind": "scale", "attack.fraction": 0.5})
    assert cfg.attack.factor == 10.0 and cfg.attack.layout is None
    assert tiny_cfg.replace(**{"attack.kind": "wrong-layout", "attack.partition_ids": [1]}).attack.layout == "shape"
    assert config.load(CONFIGS / "tiny.toml").attack.kind == "none"
    text = config.to_toml(cfg)
    assert config.from_dict(__import__("tomllib").loads(text)).attack == cfg.attack


@pytest.mark.parametrize(
    "overrides, expected",
    [
        ({"attack.kind": "sign-flip"}, ["attack.fraction: attack.kind = 'sign-flip' needs which clients attack"]),
        ({"attack.kind": "sign-flip", "attack.fraction": 0.5, "attack.partition_ids": [0]}, ["not both"]),
        ({"attack.fraction": 0.5}, ["attack.fraction: only used with an attack.kind, which is 'none'"]),
        (
            {"attack.kind": "sign-flip", "attack.fraction": 0.5, "attack.factor": 3.0},
            ["attack.factor: only used with attack.kind = 'scale', which is 'sign-flip'"],
        ),
        ({"attack.kind": "gaussian", "attack.fraction": 0.5}, ["attack.noise_norm: attack.kind = 'gaussian' needs"]),
        (
            {"attack.kind": "scale", "attack.partition_ids": [0, 4]},
            ["attack.partition_ids: [4] are not partitions", "federation.num_clients = 4"],
        ),
        (
            {"attack.kind": "nan", "attack.partition_ids": [0], "compression.codec": "sign"},
            ["attack.kind: 'nan' cannot be combined with compression.codec = 'sign'"],
        ),
        (
            {
                "attack.kind": "wrong-layout",
                "attack.layout": "dtype",
                "attack.partition_ids": [0],
                "compression.codec": "int8",
            },
            ["attack.layout: 'dtype' cannot be combined with compression.codec = 'int8'"],
        ),
        (
            {"attack.kind": "scale", "attack.partition_ids": [0], "train.mode": "zo"},
            ["attack.kind: 'scale' cannot be combined with train.mode = 'zo'"],
        ),
        (
            {"attack.kind": "replay", "attack.partition_ids": [0], "aggregation.secure": "secagg+"},
            ["attack.kind: 'replay' cannot be combined with aggregation.secure = 'secagg+'"],
        ),
        ({"attack.kind": "alie", "attack.partition_ids": [0]}, ["'alie' estimates the per-coordinate std", "give 1"]),
        (
            {
                "attack.kind": "alie",
                "attack.partition_ids": [0, 1],
                "privacy.mode": "client-local",
                "privacy.noise_multiplier": 0.5,
                "privacy.clip_norm": 1.0,
            },
            ["attack.kind: 'alie' cannot be combined with privacy.mode = 'client-local'"],
        ),
        (
            {"attack.kind": "alie", "attack.partition_ids": [0, 1, 2]},
            ["attack.z: Baruch et al.'s z_max for federation.num_clients = 4 and 3 attackers"],
        ),
        (
            {"attack.kind": "agr-tailored", "attack.partition_ids": [0, 1]},
            [
                "attack.kind: 'agr-tailored' needs a known robust rule: set aggregation.robust or "
                "aggregation.max_update_norm",
                "(got robust = 'none', max_update_norm = None)",
            ],
        ),
        (
            {"attack.kind": "agr-tailored", "attack.partition_ids": [0, 1], "aggregation.secure": "secagg+"},
            ["attack.kind: 'agr-tailored' needs a known robust rule"],
        ),
        (
            {"attack.kind": "agr-tailored", "attack.partition_ids": [3], "aggregation.robust": "median"},
            ["attack.kind: 'agr-tailored' estimates the per-coordinate std", "give 1"],
        ),
        (
            {
                "attack.kind": "agr-tailored",
                "attack.partition_ids": [0, 1],
                "aggregation.max_update_norm": 1.0,
                "aggregation.lora_mode": "hetero",
            },
            ["attack.kind: 'agr-tailored' cannot be combined with aggregation.lora_mode = 'hetero'"],
        ),
        (
            {
                "attack.kind": "agr-tailored",
                "attack.partition_ids": [0, 1],
                "aggregation.robust": "krum",
                "attack.perturbation": "noise",
                "attack.gamma_init": 0.0,
            },
            [
                "attack.perturbation: must be one of std, unit-vector, sign (got 'noise')",
                "attack.gamma_init: must be > 0",
            ],
        ),
        (
            {"attack.kind": "alie", "attack.partition_ids": [0, 1], "attack.z": 1.0, "attack.perturbation": "sign"},
            ["attack.perturbation: only used with attack.kind = 'agr-tailored', which is 'alie'"],
        ),
        (
            {
                "attack.kind": "label-flip",
                "attack.partition_ids": [0],
                "model.task": "causal-lm",
                "data.dataset": "chatterbot",
            },
            ["attack.kind: 'label-flip' cannot be combined with model.task = 'causal-lm'"],
        ),
    ],
)
def test_what_does_not_compose_is_refused_naming_both_keys(tiny_cfg, overrides, expected):
    with pytest.raises(ConfigError) as err:
        tiny_cfg.replace(**overrides)
    for text in expected:
        assert text in str(err.value), str(err.value)


def test_what_composes_is_accepted(tiny_cfg):
    """Model poisoning through the 1-bit codec, label flipping under zeroth-order training, a
    codec-carried wrong layout, ALIE with z set where z_max is not positive."""
    for overrides in (
        {"attack.kind": "scale", "attack.fraction": 0.25, "compression.codec": "sign"},
        {"attack.kind": "label-flip", "attack.fraction": 0.25, "train.mode": "zo"},
        {
            "attack.kind": "wrong-layout",
            "attack.layout": "shape",
            "attack.partition_ids": [1],
            "compression.codec": "topk+int8",
        },
        {"attack.kind": "alie", "attack.partition_ids": [0, 1], "attack.z": 1.0, "aggregation.robust": "median"},
        {
            "attack.kind": "sign-flip",
            "attack.fraction": 0.5,
            "aggregation.robust": "krum",
            "aggregation.max_update_norm": 5.0,
        },
        {"attack.kind": "agr-tailored", "attack.fraction": 0.5, "aggregation.robust": "trimmed-mean"},
        {"attack.kind": "agr-tailored", "attack.partition_ids": [0, 1], "aggregation.max_update_norm": 2.0},
        {
            "attack.kind": "agr-tailored",
            "attack.partition_ids": [0, 1, 2],
            "attack.perturbation": "unit-vector",
            "aggregation.robust": "krum",
            "aggregation.max_update_norm": 2.0,
        },
    ):
        tiny_cfg.replace(**overrides)
    a = tiny_cfg.replace(
        **{"attack.kind": "agr-tailored", "attack.fraction": 0.5, "aggregation.robust": "median"}
    ).attack
    assert (a.perturbation, a.gamma_init) == ("std", attack.GAMMA_INIT)  # the documented defaults


def test_wrong_types_are_reported_together(tiny_cfg):
    with pytest.raises(ConfigError) as err:
        tiny_cfg.replace(**{"attack.kind": 3, "attack.partition_ids": "a,b", "attack.allow_deployment": "maybe"})
    text = str(err.value)
    assert "attack.kind: expected a string, got 3" in text
    assert "attack.partition_ids: expected a list of integers" in text
    assert "attack.allow_deployment: expected true or false, got 'maybe'" in text


def test_a_deployment_refuses_the_section_unless_allowed_for_tests():
    from tests.conftest import ROOT

    run_config = {"config": "simulations/configs/tiny.toml", "attack.kind": "sign-flip", "attack.fraction": 0.5}
    with pytest.raises(ConfigError, match="attack.allow_deployment = true"):
        config.from_run_config(run_config, base_dir=ROOT)
    cfg = config.from_run_config({**run_config, "attack.allow_deployment": True}, base_dir=ROOT)
    assert cfg.attack.kind == "sign-flip"


def test_alie_z_max_golden_values():
    # Phi^-1 from a standard normal table: n = 10, m = 4: s = 2, Phi^-1(4/6) = 0.4307;
    # n = 50, m = 12: s = 14, Phi^-1(24/38) = 0.3360; n = 20, m = 5: s = 6, Phi^-1(9/15) = 0.2533
    assert attack.alie_z(10, 4) == pytest.approx(0.430727, abs=1e-6)
    assert attack.alie_z(50, 12) == pytest.approx(0.336038, abs=1e-6)
    assert attack.alie_z(20, 5) == pytest.approx(0.253347, abs=1e-6)
    for n, m in ((10, 2), (10, 6), (10, 0)):
        with pytest.raises(ValueError):
            attack.alie_z(n, m)


# --- the attacks as pure functions ---------------------------------------------------------


def _delta(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "a.lora_A": torch.randn(2, 3, generator=g),
        "a.lora_B": torch.randn(3, 2, generator=g),
        "head": torch.randn(4, generator=g),
    }


def test_model_poisoning_by_hand():
    d = _delta()
    for k in d:
        torch.testing.assert_close(attack.sign_flip(d)[k], -d[k], rtol=0, atol=0)
        torch.testing.assert_close(attack.scale(d, 10.0)[k], d[k] * 10, rtol=0, atol=0)
    noise = attack.gaussian(d, 2.5, torch.Generator().manual_seed(1))
    assert _norm(noise) == pytest.approx(2.5, rel=1e-6) and {k: v.shape for k, v in noise.items()} == {
        k: v.shape for k, v in d.items()
    }
    again = attack.gaussian(_delta(5), 2.5, torch.Generator().manual_seed(1))
    assert all(torch.equal(noise[k], again[k]) for k in d)  # noise, not a function of the update
    # ALIE by hand on one coordinate: values 1, 2, 6 -> mean 3, sample std sqrt(7), z = 0.5
    benign = [{"x": torch.tensor([v, 0.0])} for v in (1.0, 2.0, 6.0)]
    got = attack.alie(benign, 0.5)["x"]
    assert got[0].item() == pytest.approx(3 - 0.5 * math.sqrt(7), rel=1e-6) and got[1].item() == 0.0


def test_hostile_payloads_by_hand():
    d = _delta()
    bad = attack.with_nan(d)
    assert math.isnan(bad["a.lora_A"].view(-1)[0]) and math.isinf(bad["a.lora_A"].view(-1)[-1])
    assert torch.isfinite(d["a.lora_A"]).all()  # the benign update is left alone
    assert set(attack.wrong_layout(d, "missing")) == {"a.lora_A", "a.lora_B"}
    assert set(attack.wrong_layout(d, "extra")) == {*d, attack.EXTRA_KEY}
    assert attack.wrong_layout(d, "shape")["a.lora_A"].shape == (3, 3)
    assert attack.wrong_layout(d, "dtype")["a.lora_A"].dtype == torch.float64
    big = attack.oversized(d, torch.Generator().manual_seed(0))
    assert big[attack.PADDING_KEY].numel() == attack.OVERSIZE * sum(v.numel() for v in d.values())
    flipped = attack.flip_labels([{"label": 0, "t": 1}, {"label": 2}], 3)
    assert [e["label"] for e in flipped] == [2, 0]


# --- AGR-tailored (Shejwalkar & Houmansadr 2021) --------------------------------------------


def _krum_pick(rows, f):
    """Krum by its definition (Blanchard et al. 2017): the row whose n - f - 2 nearest others are nearest."""
    d2 = ((rows[:, None, :] - rows[None, :, :]) ** 2).sum(-1)
    c = max(1, len(rows) - f - 2)
    return int(np.argmin([np.sort(np.delete(d2[i], i))[:c].sum() for i in range(len(rows))]))


def _reference(rows, rule):
    """The rule computed independently of Flower: numpy's median, scipy's trimmed mean, Krum as defined."""
    from scipy import stats

    if rule.robust == "median":
        return np.median(rows, axis=0)
    if rule.robust == "trimmed-mean":
        return stats.trim_mean(rows, rule.trim_beta, axis=0)
    return rows[_krum_pick(rows, rule.num_malicious)]


def test_the_gamma_search_is_a_binary_search_over_a_dyadic_grid():
    probes = []

    def below(limit):
        return lambda g: probes.append(g) or g <= limit

    # by hand: gamma_init 4, 3 probes: 4 fails, 4 - 2 = 2 succeeds, 2 + 1 = 3 succeeds
    assert attack.search_gamma(below(3.3), 4.0, 3) == 3.0 and probes == [4.0, 2.0, 3.0]
    assert attack.search_gamma(lambda g: True, 4.0, 3) == 7.0  # the top of the grid, 4 * (2 - 2**-2)
    assert attack.search_gamma(lambda g: False, 4.0, 3) == 0.0
    rng = np.random.default_rng(0)
    grid = 10.0 * np.arange(1, 2**8) / 2**7  # GAMMA_INIT 10, 8 probes
    for limit in rng.uniform(0, 21, size=50):
        want = grid[grid <= limit].max() if (grid <= limit).any() else 0.0
        assert attack.search_gamma(below(limit), 10.0, 8) == want


def test_agr_tailored_by_hand_on_three_colluders():
    """One coordinate; benign 0, 1, 2: mean 1, sample std 1, so m = 1 - gamma. gamma_init 0.75
    and 3 probes search the grid 0.1875 * (1..7): 0.75, then up or down 0.375, then 0.1875."""
    benign = torch.tensor([[0.0], [1.0], [2.0]])
    med, trim, krum = (attack.ServerRule(r, trim_beta=0.2) for r in ("median", "trimmed-mean", "krum"))
    # median of 0, 1, 2 and three copies of x = 1 - gamma: x for 0 <= x <= 1, (x + 0) / 2 below 0;
    # its distance from the mean grows with gamma, so every probe improves: 0.75, 1.125, 1.3125
    m, gamma = attack.tailor(benign, med, gamma_init=0.75, steps=3)
    assert gamma == 1.3125 and m.item() == -0.3125
    assert attack.robust_aggregate(torch.cat([benign, m.expand(3, 1)]), med)[0].item() == -0.15625
    # trimmed mean, beta 0.2 of 6 values cuts 1 per tail: mean of x, x, 0, 1 below 0, also monotone
    m, gamma = attack.tailor(benign, trim, gamma_init=0.75, steps=3)
    assert gamma == 1.3125
    assert attack.robust_aggregate(torch.cat([benign, m.expand(3, 1)]), trim)[0].item() == (2 * -0.3125 + 1) / 4
    # Krum, f = 0: each of 6 values scores its 4 nearest squared distances. A copy: 0 + 0 + x^2 +
    # (1 - x)^2; benign 0: 1 + 3 x^2 (|x| <= 2); benign 1 and 2 always score more than a copy.
    # Copy < benign 0 iff (gamma - 1)(gamma - 3) > 0 with gamma < 3: gamma < 1. Largest grid
    # point below 1: 0.9375 (probes 0.75 picked, 1.125 not, 0.9375 picked).
    m, gamma = attack.tailor(benign, krum, gamma_init=0.75, steps=3)
    assert gamma == 0.9375 and m.item() == 0.0625
    for j in range(1, 8):  # the whole grid, against Krum computed by its definition
        g = 0.1875 * j
        rows = np.array([[0.0], [1.0], [2.0]] + [[1.0 - g]] * 3)
        assert (_krum_pick(rows, 0) >= 3) == (g < 1), g


def test_the_robust_rules_are_the_servers_and_agree_with_independent_references():
    g = torch.Generator().manual_seed(3)
    rows = torch.randn(9, 30, generator=g, dtype=torch.float64)
    rows[7:] = rows[6]  # copies, as colluders send
    for rule in (
        attack.ServerRule("median"),
        attack.ServerRule("trimmed-mean", trim_beta=0.25),
        attack.ServerRule("krum", num_malicious=2),
        attack.ServerRule("krum", num_malicious=0),
    ):
        got, pick = attack.robust_aggregate(rows, rule)
        np.testing.assert_allclose(got.numpy(), _reference(rows.numpy(), rule), rtol=1e-12, atol=1e-12)
        assert (pick is None) == (rule.robust != "krum")


@pytest.mark.parametrize("robust", ["median", "trimmed-mean", "krum"])
def test_agr_tailored_moves_the_robust_aggregate_further_than_alie_at_z_1(robust):
    """Five colluders, random updates: the search beats ALIE's fixed z = 1 (the same m at gamma = 1),
    each aggregate computed by the independent reference; gamma is on the search's grid and the
    grid point above it does no better (Krum: is not picked). Krum with f = 0: with f >= 1 the five
    copies' four zero distances win it all the way to the top of the grid."""
    rule = attack.ServerRule(robust, trim_beta=0.2, num_malicious=0)
    g = torch.Generator().manual_seed(11)
    benign = [
        {"a": torch.randn(4, 5, generator=g) * 0.1 + 0.05, "b": torch.randn(20, generator=g) * 0.1} for _ in range(5)
    ]
    flat = np.stack([np.concatenate([d["a"].double().numpy().ravel(), d["b"].double().numpy()]) for d in benign])
    mean = flat.mean(0)

    def deviation(update):
        m = np.concatenate([update["a"].double().numpy().ravel(), update["b"].double().numpy()])
        rows = np.concatenate([flat, np.repeat(m[None], 5, axis=0)])
        return np.linalg.norm(_reference(rows, rule) - mean), _krum_pick(rows, 0) >= 5

    tailored, (alie_dev, alie_picked) = attack.agr_tailored(benign, rule), deviation(attack.alie(benign, 1.0))
    dev, picked = deviation(tailored)
    assert dev > 1.5 * alie_dev, (dev, alie_dev)
    _, gamma = attack.tailor(torch.from_numpy(flat), rule)
    spacing = attack.GAMMA_INIT / 2 ** (attack.SEARCH_STEPS - 1)
    assert gamma > 1.0 and (gamma / spacing) == round(gamma / spacing)
    std = flat.std(0, ddof=1)
    up = mean - (gamma + spacing) * std
    rows_up = np.concatenate([flat, np.repeat(up[None], 5, axis=0)])
    if robust == "krum":
        assert alie_picked and picked and _krum_pick(rows_up, 0) < 5
    else:  # monotone here: the search climbs to the top of its grid
        assert gamma == attack.GAMMA_INIT * (2 - 2 ** (1 - attack.SEARCH_STEPS))


def test_agr_tailored_under_a_norm_bound_ends_at_the_bound():
    benign = torch.tensor([[0.0], [1.0], [2.0]])
    # the bound alone (FedAvg behind it): |1 - gamma| <= 3 -> gamma = 4, m = -3, exactly
    m, gamma = attack.tailor(benign, attack.ServerRule(max_norm=3.0))
    assert gamma == 4.0 and m.item() == -3.0
    # median and bound 0.1: |1 - gamma| <= 0.1 caps the search's 1.3125 at 1.1; float32 stays inside
    rule = attack.ServerRule("median", max_norm=0.1)
    assert attack.tailor(benign, rule, gamma_init=0.75, steps=3)[1] == pytest.approx(1.1, abs=1e-12)
    sent = attack.agr_tailored([{"x": v.float()} for v in benign], rule, gamma_init=0.75, steps=3)
    assert sent["x"].dtype == torch.float32 and 0.1 * (1 - 1e-6) <= _norm(sent) <= 0.1
    # random updates, each direction: the norm is the bound and m = mean - gamma * p
    g = torch.Generator().manual_seed(5)
    benign = [{"a": torch.randn(3, 4, generator=g) + 0.3, "b": torch.randn(6, generator=g)} for _ in range(4)]
    flat = torch.stack([torch.cat([d["a"].reshape(-1), d["b"]]).double() for d in benign])
    mean = flat.mean(0)
    for robust in ("none", "median", "krum"):
        for perturbation, p in (
            ("std", flat.std(0, unbiased=True)),
            ("unit-vector", mean / mean.norm()),
            ("sign", mean.sign()),
        ):
            rule = attack.ServerRule(robust, num_malicious=0, max_norm=1.5 * float(mean.norm()))
            m, gamma = attack.tailor(flat, rule, perturbation=perturbation)
            torch.testing.assert_close(m, mean - gamma * p, rtol=1e-9, atol=1e-12)
            if robust != "krum":  # Krum may refuse a copy before the bound
                assert float(m.norm()) == pytest.approx(rule.max_norm, rel=1e-9)
            assert float(m.norm()) <= rule.max_norm * (1 + 1e-12)
            sent = attack.agr_tailored(benign, rule, perturbation=perturbation)
            assert _norm(sent) <= rule.max_norm
            if robust != "krum":
                assert _norm(sent) >= rule.max_norm * (1 - 1e-6)
    # no gamma brings the mean inside: the least-norm gamma (0 here), scaled onto the bound
    m, gamma = attack.tailor(torch.tensor([[4.0, 1.0], [4.0, -1.0]]), attack.ServerRule(max_norm=1.0))
    assert gamma == 0.0 and m.tolist() == [1.0, 0.0]


# --- inside the client code path -----------------------------------------------------------


def _train_msg(state, rnd, node):
    content = RecordDict(
        {
            "arrays": to_arrayrecord(state),
            "config": ConfigRecord({"server-round": rnd, "round-seed": 7, "version": rnd}),
        }
    )
    return Message(content, dst_node_id=node, message_type=MessageType.TRAIN)


def _sent(cfg, pid, rnd=1, node_config=None):
    """What the client holding partition ``pid`` sends in round ``rnd`` from the initial adapter."""
    grid = LocalGrid(cfg.federation.num_clients, lambda m, c: handle_train(m, c, cfg))
    node = grid.node_ids[pid]
    grid.contexts[node].node_config.update(node_config or {})
    reply = grid.send_and_receive([_train_msg(workspace.get(cfg).initial_state(), rnd, node)])[0]
    assert not reply.has_error(), reply.error.reason
    return from_arrayrecord(reply.content["update"]), reply.content["metrics"]


@pytest.mark.parametrize(
    "kind, extra", [("sign-flip", {}), ("scale", {"attack.factor": 3.0}), ("gaussian", {"attack.noise_norm": 0.7})]
)
def test_an_attacker_sends_what_the_attack_says_of_its_benign_update(tiny_cfg, kind, extra):
    honest = tiny_cfg
    benign, _ = _sent(honest, 1)
    again, _ = _sent(honest, 1)
    assert all(torch.equal(benign[k], again[k]) for k in benign)  # training is reproducible
    cfg = tiny_cfg.replace(**{"attack.kind": kind, "attack.partition_ids": [1], **extra})
    sent, metrics = _sent(cfg, 1)
    assert sent.keys() == benign.keys() and metrics["server-round"] == 1
    if kind == "sign-flip":
        assert all(torch.equal(sent[k], -benign[k]) for k in benign)
    elif kind == "scale":
        for k in benign:
            torch.testing.assert_close(sent[k], 3.0 * benign[k], rtol=0, atol=0)
    else:
        assert _norm(sent) == pytest.approx(0.7, rel=1e-5)
        assert abs(sum(float((sent[k] * benign[k]).sum()) for k in benign)) < 0.7 * _norm(benign)
    honest_peer, _ = _sent(cfg, 0)  # not an attacker: its benign update
    expect, _ = _sent(honest, 0)
    assert all(torch.equal(honest_peer[k], expect[k]) for k in expect)


def test_alie_colluders_send_mean_minus_z_std_of_their_benign_updates(tiny_cfg):
    cfg = tiny_cfg.replace(**{"attack.kind": "alie", "attack.partition_ids": [0, 2], "attack.z": 1.5})
    benign = [_sent(tiny_cfg, p)[0] for p in (0, 2)]
    sent0, _ = _sent(cfg, 0)
    sent2, _ = _sent(cfg, 2)
    for k in sent0:
        # two samples: mean (a+b)/2, sample std |a-b|/sqrt(2)
        a, b = benign[0][k].double(), benign[1][k].double()
        expect = ((a + b) / 2 - 1.5 * (a - b).abs() / math.sqrt(2)).float()
        torch.testing.assert_close(sent0[k], expect, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(sent2[k], sent0[k], rtol=1e-5, atol=1e-7)  # colluders agree


def test_agr_tailored_colluders_send_the_update_crafted_against_the_servers_median_and_bound(tiny_cfg, tmp_path):
    """Partitions 0 and 2 collude against the median under a norm bound, through the real client
    and server: both send `attack.agr_tailored` of their two benign updates (trained here as
    honest clients), at the bound (they ride it: the search wants more), and the server accepts
    them and moves the global by the median of all four updates."""
    honest = tiny_cfg.replace(**{"federation.rounds": 1, "aggregation.robust": "median"})
    benign = {p: _sent(honest, p)[0] for p in range(4)}
    bound = 1.05 * max(_norm(d) for d in benign.values())  # every honest update is accepted
    cfg = honest.replace(
        **{"aggregation.max_update_norm": bound, "attack.kind": "agr-tailored", "attack.partition_ids": [0, 2]}
    )
    expect = attack.agr_tailored([benign[0], benign[2]], attack.ServerRule("median", max_norm=bound))
    start = workspace.get(cfg).initial_state()
    loop, sent = _sent_updates(cfg, tmp_path)
    row = metrics_rows(tmp_path)[1]
    assert row["accepted"] == 4 and not row["rejected"]
    for node in (1000, 1002):  # LocalGrid: node 1000 + i holds partition i
        for k in expect:
            torch.testing.assert_close(sent[node][k], expect[k], rtol=1e-5, atol=1e-7)
        assert bound * (1 - 1e-5) <= _norm(sent[node]) <= bound
    for node in (1001, 1003):  # honest peers send their benign updates
        assert all(torch.equal(sent[node][k], benign[node - 1000][k]) for k in expect)
    state = loop.protocol.state
    for k in start:
        med = np.median(np.stack([d[k].numpy() for d in sent.values()]), axis=0)
        np.testing.assert_allclose((state[k] - start[k]).numpy(), med, rtol=1e-5, atol=1e-6)
    assert json.loads((tmp_path / "summary.json").read_text())["attack"]["kind"] == "agr-tailored"


def test_label_flip_poisons_the_attackers_own_data_before_training(tiny_cfg):
    cfg = tiny_cfg.replace(**{"attack.kind": "label-flip", "attack.partition_ids": [2]})
    ws = workspace.get(cfg)
    grid = LocalGrid(cfg.federation.num_clients, lambda m, c: handle_train(m, c, cfg))
    ctx = grid.contexts[grid.node_ids[2]]
    _, data = local_data(ws, ctx, cfg)
    clean = ws.client_data(2)
    assert [e["label"] for e in data] == [ws.num_labels - 1 - e["label"] for e in clean]
    assert [e["input_ids"] for e in data] == [e["input_ids"] for e in clean]
    assert [e["label"] for e in ws.client_data(2)] == [e["label"] for e in clean]  # the cache is untouched
    sent, _ = _sent(cfg, 2)
    benign, _ = _sent(tiny_cfg, 2)
    assert any(not torch.equal(sent[k], benign[k]) for k in benign)
    assert _sent(cfg, 1)[0].keys() == benign.keys()


def test_a_supernode_attacks_through_its_node_config_only_when_the_run_allows_it(tiny_cfg, tmp_path):
    benign, _ = _sent(tiny_cfg, 3)
    allowed = tiny_cfg.replace(**{"attack.allow_deployment": True})
    sent, _ = _sent(allowed, 3, node_config={"attack": "scale", "attack-factor": 2.0})
    for k in benign:
        torch.testing.assert_close(sent[k], 2.0 * benign[k], rtol=0, atol=0)
    cfg = tiny_cfg.replace(**{"federation.rounds": 1})
    grid = LocalGrid(cfg.federation.num_clients, lambda m, c: handle_train(m, c, cfg))
    grid.contexts[grid.node_ids[3]].node_config["attack"] = "sign-flip"
    ServerLoop(cfg, tmp_path, progress=lambda s: None).main(grid)
    row = metrics_rows(tmp_path)[1]
    assert row["accepted"] == 3 and row["rejected"][0]["node"] == grid.node_ids[3]
    assert "attack.allow_deployment = true" in row["rejected"][0]["reason"]


# --- the server: hostile payloads rejected with their reason, the round completes ------------


HOSTILE = [
    ("nan", {}, "non-finite value"),
    ("wrong-layout", {"attack.layout": "missing"}, "missing key"),
    ("wrong-layout", {"attack.layout": "extra"}, "unexpected key(s) 'attack.extra'"),
    ("wrong-layout", {"attack.layout": "shape"}, "has shape"),
    ("wrong-layout", {"attack.layout": "dtype"}, "has dtype torch.float64, expected torch.float32"),
    ("oversized", {}, "oversized update"),
    ("wrong-round", {}, "reply claims server round 1, this is round 2"),
    ("replay", {}, "replayed update: the same payload node 1001 sent in round 1"),
    # through a codec: the layout checksum, the codec's size bound, the payload digest
    ("wrong-layout", {"attack.layout": "shape", "compression.codec": "sign"}, "layout mismatch"),
    ("oversized", {"compression.codec": "topk+int8"}, "oversized update"),
    ("replay", {"compression.codec": "sign", "compression.error_feedback": True}, "replayed update"),
]


@pytest.mark.parametrize(
    "kind, extra, reason", HOSTILE, ids=[f"{k}-{'-'.join(map(str, e.values()))}" for k, e, _ in HOSTILE]
)
def test_hostile_payloads_are_rejected_with_their_reason_and_the_round_completes(
    tiny_cfg, tmp_path, kind, extra, reason
):
    cfg = tiny_cfg.replace(**{"federation.rounds": 2, "attack.kind": kind, "attack.partition_ids": [1], **extra})
    grid = LocalGrid(cfg.federation.num_clients, lambda m, c: handle_train(m, c, cfg))
    summary = ServerLoop(cfg, tmp_path, progress=lambda s: None).main(grid)
    rows = metrics_rows(tmp_path)
    assert summary["rounds_completed"] == 2 and all(math.isfinite(r["eval"]["loss"]) for r in rows)
    attacker = grid.node_ids[1]
    last = rows[2]
    assert last["accepted"] == cfg.federation.num_clients - 1
    assert [r["node"] for r in last["rejected"]] == [attacker] and reason in last["rejected"][0]["reason"], last
    assert attacker not in {c["node"] for c in last["clients"]}
    assert summary["attack"]["kind"] == kind and summary["attack"]["attackers"] == [1]
    if kind == "replay":  # the first send was an honest update, the second its copy
        assert rows[1]["accepted"] == cfg.federation.num_clients and not rows[1]["rejected"]
    elif kind != "wrong-round":
        assert [r["node"] for r in rows[1]["rejected"]] == [attacker]
    assert "server-round" not in last["train"] and all("server-round" not in c for c in last["clients"])


# --- the defences see the attack ----------------------------------------------------------


def _sent_updates(cfg, out):
    """Run ``cfg``; return (loop, node -> the update it sent)."""
    loop, sent = run_capturing_updates(cfg, out)
    return loop, {node: delta for node, (delta, _) in sent.items()}


def test_median_and_krum_hold_against_a_scale_x100_attacker_where_fedavg_moves_far(tiny_cfg, tmp_path):
    base = tiny_cfg.replace(
        **{
            "federation.num_clients": 5,
            "federation.rounds": 1,
            "data.partition": "iid",
            "attack.kind": "scale",
            "attack.factor": 100.0,
            "attack.partition_ids": [2],
        }
    )
    start = workspace.get(base).initial_state()
    moved = {}
    for rule in ("none", "median", "krum"):
        cfg = base.replace(
            **{"aggregation.robust": rule, **({"aggregation.num_malicious": 1} if rule == "krum" else {})}
        )
        loop, sent = _sent_updates(cfg, tmp_path / rule)
        state = loop.protocol.state
        change = {k: state[k] - start[k] for k in start}
        attacker = 1000 + 2  # LocalGrid: node 1000 + i holds partition i
        honest = {n: d for n, d in sent.items() if n != attacker}
        bound = max(_norm(d) for d in honest.values())
        moved[rule] = _norm(change) / bound
        keys = sent[attacker].keys()
        if rule == "median":  # the coordinate-wise median of the 5 updates (numpy's, on the deltas)
            for k in keys:
                med = np.median(np.stack([d[k].numpy() for d in sent.values()]), axis=0)
                np.testing.assert_allclose(change[k].numpy(), med, rtol=1e-5, atol=1e-6)
        if rule == "krum":  # one honest client's update, never the attacker's
            picked = [n for n, d in honest.items() if all(torch.allclose(change[k], d[k], atol=1e-6) for k in keys)]
            assert len(picked) == 1
    assert moved["none"] > 10, moved  # FedAvg: a fifth of the x100 update
    assert moved["median"] <= 1.0 and moved["krum"] <= 1.0, moved


def test_a_robust_rule_sees_only_the_accepted_updates(tiny_cfg, tmp_path):
    cfg = tiny_cfg.replace(
        **{
            "federation.num_clients": 5,
            "federation.rounds": 1,
            "data.partition": "iid",
            "aggregation.robust": "median",
            "attack.kind": "nan",
            "attack.partition_ids": [0],
        }
    )
    start = workspace.get(cfg).initial_state()
    loop, sent = _sent_updates(cfg, tmp_path)
    row = metrics_rows(tmp_path)[1]
    assert row["accepted"] == 4 and "non-finite" in row["rejected"][0]["reason"]
    attacker = 1000
    state = loop.protocol.state
    for k in start:
        med = np.median(np.stack([d[k].numpy() for n, d in sent.items() if n != attacker]), axis=0)
        np.testing.assert_allclose((state[k] - start[k]).numpy(), med, rtol=1e-5, atol=1e-6)
