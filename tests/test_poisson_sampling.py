"""Poisson client sampling (``federation.sampling = "poisson"``): the sampler, DP-FedAvg's expected-count
denominator (McMahan et al. 2018, arXiv:1710.06963) by hand, opacus' accountant at q = fraction_train, the
refusals, and rounds that draw nobody, in-process on the tiny model."""

import math

import numpy as np
import pytest
import torch

from fedtune import config
from fedtune.errors import ConfigError
from fedtune.flower.client import handle_train
from fedtune.flower.local import LocalGrid
from fedtune.flower.records import from_arrayrecord
from fedtune.flower.server import NodeSampler, ServerLoop, poisson_sample_nodes, sample_nodes
from fedtune.privacy.client_level import (
    adaptive_private_mean,
    central_noise_std,
    noisy_unclipped_fraction,
    private_mean,
    update_noise_multiplier,
)
from fedtune.seeds import derive_seed
from tests.conftest import CONFIGS, metrics_rows
from tests.test_privacy import opacus_epsilon

CENTRAL = {"privacy.mode": "client-central", "privacy.clip_norm": 0.5, "privacy.noise_multiplier": 1.0}


def _run(cfg, out, updates=None):
    """One in-process run; ``updates[round]`` collects every update as its client sent it."""

    def client(msg, ctx):
        reply = handle_train(msg, ctx, cfg)
        if updates is not None and not reply.has_error():
            rnd = int(msg.content["config"]["server-round"])
            updates.setdefault(rnd, []).append(from_arrayrecord(reply.content["update"]))
        return reply

    return ServerLoop(cfg, out, progress=lambda s: None).main(LocalGrid(cfg.federation.num_clients, client))


# --- the sampler -------------------------------------------------------------------------------


def test_inclusion_frequency_is_q_and_draws_are_independent_of_the_count():
    nodes, q, rounds = list(range(100, 140)), 0.3, 2000  # 40 nodes
    counts = np.zeros(len(nodes))
    sizes = []
    for rnd in range(1, rounds + 1):
        picked = poisson_sample_nodes(nodes, q, seed=5, rnd=rnd)
        assert picked == sorted(set(picked)) and set(picked) <= set(nodes)
        counts[[n - 100 for n in picked]] += 1
        sizes.append(len(picked))
    # each node's count is Binomial(2000, 0.3): sd sqrt(2000 * 0.21) = 20.5, so 5 sd is 102 (p < 1e-6 per node)
    sd = math.sqrt(rounds * q * (1 - q))
    assert np.all(np.abs(counts - rounds * q) < 5 * sd), counts
    # the round's size is Binomial(40, 0.3): mean 12, variance 8.4; a fixed-size sampler would have variance 0
    assert abs(np.mean(sizes) - 12) < 0.3 and 6.5 < np.var(sizes) < 10.5
    # no minimum: with q = 0.02, P(empty) = 0.98^40 = 0.446; 2000 rounds give about 892 (sd 22)
    empty = sum(not poisson_sample_nodes(nodes, 0.02, seed=5, rnd=r) for r in range(1, rounds + 1))
    assert abs(empty - rounds * 0.98**40) < 5 * math.sqrt(rounds * 0.446 * 0.554)


def test_the_draw_is_reproducible_per_seed_and_round_and_follows_the_order():
    nodes = [7, 3, 11, 5, 2, 13, 17, 19]
    a = [poisson_sample_nodes(nodes, 0.5, seed=1, rnd=r) for r in range(1, 30)]
    assert a == [poisson_sample_nodes(list(reversed(nodes)), 0.5, seed=1, rnd=r) for r in range(1, 30)]
    assert a != [poisson_sample_nodes(nodes, 0.5, seed=2, rnd=r) for r in range(1, 30)]
    assert len({tuple(x) for x in a}) > 10  # rounds differ
    # the draw: one uniform per node in `order`, from numpy's generator seeded by [seed, round]
    u = np.random.default_rng([1, 4]).random(len(nodes))
    assert a[3] == sorted(n for n, x in zip(sorted(nodes), u) if x < 0.5)
    # the order decides which uniform a node gets (NodeIdentities.order: by partition id)
    rev = poisson_sample_nodes(nodes, 0.5, seed=1, rnd=4, order=lambda ids: sorted(ids, reverse=True))
    assert rev == sorted(n for n, x in zip(sorted(nodes, reverse=True), u) if x < 0.5)
    assert poisson_sample_nodes(nodes, 1.0, seed=1, rnd=1) == sorted(nodes)


def test_node_sampler_picks_the_sampler_from_the_config(tiny_cfg):
    fixed = tiny_cfg.replace(**{"federation.fraction_train": 0.5})
    poisson = fixed.replace(**{"federation.sampling": "poisson"})
    grid = LocalGrid(4, lambda m, c: None)
    for rnd in range(1, 20):
        got = NodeSampler(fixed).sample(grid, rnd)
        assert len(got) == 2 and got == sample_nodes(grid.get_node_ids(), 0.5, 2, seed=0, rnd=rnd)
    # the simulated nodes' partition ids 0..3 order them as their node ids do in LocalGrid
    sampler = NodeSampler(poisson)
    sizes = {len(sampler.sample(grid, rnd)) for rnd in range(1, 40)}
    assert sizes >= {1, 2, 3} and min(sizes) < 2  # min_train_clients = 2 is no floor under Poisson


# --- the estimator, by hand --------------------------------------------------------------------


def test_private_mean_divides_by_the_expected_count():
    d1 = {"a": torch.tensor([3.0, 4.0]), "b": torch.tensor([0.0])}  # norm 5: clipped to C = 2 -> [1.2, 1.6]
    d2 = {"a": torch.tensor([0.6, 0.8]), "b": torch.tensor([1.0])}  # norm sqrt(2) = 1.41: fits
    d3 = {"a": torch.tensor([0.0, 1.0]), "b": torch.tensor([0.0])}
    C, z, qn = 2.0, 0.7, 2.5  # three drawn, 2.5 expected: the sum is divided by 2.5, not 3
    mean = private_mean(
        [d1, d2, d3], clip_norm=C, noise_multiplier=z, expected_clients=qn, generator=torch.Generator().manual_seed(3)
    )
    g = torch.Generator().manual_seed(3)
    noise = {k: torch.randn(shape, generator=g) for k, shape in (("a", (2,)), ("b", (1,)))}  # sorted keys
    std = z * C / qn
    assert central_noise_std(z, C, expected_clients=qn) == pytest.approx(0.56)
    torch.testing.assert_close(mean["a"], torch.tensor([1.8, 3.4]) / 2.5 + std * noise["a"])
    torch.testing.assert_close(mean["b"], torch.tensor([1.0]) / 2.5 + std * noise["b"])
    # nobody drawn: the release is the noise alone, shaped like `like`
    like = {"a": torch.zeros(2), "b": torch.zeros(1)}
    empty = private_mean(
        [], clip_norm=C, noise_multiplier=z, expected_clients=qn, generator=torch.Generator().manual_seed(3), like=like
    )
    torch.testing.assert_close(empty["a"], std * noise["a"])
    # the fixed-size estimator is unchanged and still refuses more updates than were sampled
    fixed = private_mean([d2], clip_norm=C, noise_multiplier=0.0, num_sampled_clients=2, generator=torch.Generator())
    torch.testing.assert_close(fixed["a"], torch.tensor([0.3, 0.4]))
    with pytest.raises(ValueError, match="only 2 clients were sampled"):
        private_mean([d1, d2, d3], clip_norm=C, noise_multiplier=z, num_sampled_clients=2, generator=g)
    with pytest.raises(ConfigError, match="give exactly one"):
        private_mean([d1], clip_norm=C, noise_multiplier=z, num_sampled_clients=1, expected_clients=qn, generator=g)


def test_adaptive_fraction_divides_by_the_expected_count():
    norms, C, sigma_b, qn = [0.5, 1.0, 1.5], 1.0, 0.8, 2.0  # two of three fit; 2 expected
    frac = noisy_unclipped_fraction(
        norms, C, count_std=sigma_b, expected_clients=qn, generator=torch.Generator().manual_seed(9)
    )
    n = torch.randn((), generator=torch.Generator().manual_seed(9), dtype=torch.float64).item()
    assert frac == pytest.approx(0.5 + ((0.5 + 0.5 - 0.5) + sigma_b * n) / qn, rel=1e-12)
    # an empty round still releases 1/2 + noise / (q N), and the update's noise is z_delta * C / (q N)
    mean, frac0 = adaptive_private_mean(
        [],
        clip_norm=C,
        noise_multiplier=1.0,
        count_std=sigma_b,
        expected_clients=qn,
        generator=torch.Generator().manual_seed(1),
        count_generator=torch.Generator().manual_seed(9),
        like={"w": torch.zeros(3)},
    )
    assert frac0 == pytest.approx(0.5 + sigma_b * n / qn, rel=1e-12)
    want = update_noise_multiplier(1.0, sigma_b) * C / qn * torch.randn(3, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(mean["w"], want)


# --- in-process runs ---------------------------------------------------------------------------


def test_run_divides_by_q_n_and_epsilon_is_opacus_at_fraction_train(tiny_cfg, tmp_path):
    z, q, rounds, delta, C = 1.0, 0.5, 3, 1e-5, 0.5
    cfg = tiny_cfg.replace(
        **CENTRAL,
        **{
            "federation.rounds": rounds,
            "federation.fraction_train": q,
            "federation.sampling": "poisson",
            "federation.seed": 3,  # draws 4, 2 and 3 of the 4 clients: the count varies around q N = 2
            "federation.eval_every": 100,
            "train.local_steps": 1,
            "privacy.delta": delta,
            "output.save_adapter": False,
        },
    )
    summary = _run(cfg, tmp_path / "three")
    rows = metrics_rows(tmp_path / "three")[1:]
    drawn = [len(poisson_sample_nodes(range(4), q, seed=3, rnd=r)) for r in range(1, rounds + 1)]
    assert [r["sampled"] for r in rows] == [r["accepted"] for r in rows] == drawn == [4, 2, 3]
    priv = summary["privacy"]
    want = opacus_epsilon(z, q, rounds, delta)
    assert priv["epsilon"] == pytest.approx(want, rel=1e-9)
    assert rows[-1]["dp_epsilon"] == pytest.approx(want, rel=1e-9)
    assert "exact for the sampler that ran" in priv["sampling"] and "Poisson" in priv["sampling"]
    assert "q = 0.5" in priv["accounting"]
    assert priv["epsilon_without_sampling"] == pytest.approx(opacus_epsilon(z, 1.0, rounds, delta), rel=1e-9)
    assert "expected count q*N" in summary["aggregation"]["strategy"]

    # round 1 by hand: all 4 drawn, and the global moved by (sum of the 4 clipped updates) / (q N = 2), more
    # than a mean, plus N(0, (z C / (q N))^2) from the (seed, round) stream
    from safetensors.torch import load_file

    from fedtune import workspace

    one = cfg.replace(**{"federation.rounds": 1})
    updates: dict[int, list] = {}
    _run(one, tmp_path / "one", updates)
    assert len(updates[1]) == 4
    ws = workspace.get(one)
    init, keys = ws.initial_state(), ws.trainable_keys()
    qn = q * one.federation.num_clients
    acc = {k: torch.zeros(init[k].shape, dtype=torch.float64) for k in keys}
    for d in updates[1]:
        norm = math.sqrt(sum(float((v.double() ** 2).sum()) for v in d.values()))
        for k in keys:
            acc[k] += d[k].double() * min(1.0, C / norm)
    g = torch.Generator().manual_seed(derive_seed(3, "dp", 1))
    noise = {k: torch.randn(init[k].shape, generator=g) for k in sorted(keys)}
    after = load_file(str(tmp_path / "one" / "checkpoint" / "adapter_state.safetensors"))
    for k in keys:
        torch.testing.assert_close(after[k], init[k] + (acc[k] / qn).float() + z * C / qn * noise[k])


def test_empty_rounds_do_not_crash_and_dp_still_releases_noise(tiny_cfg, tmp_path):
    # q = 0.1 over 4 clients: P(empty round) = 0.9^4 = 0.66; seed 0 draws nobody in some of these rounds
    base = tiny_cfg.replace(
        **{
            "federation.rounds": 4,
            "federation.fraction_train": 0.1,
            "federation.min_train_clients": 1,
            "federation.sampling": "poisson",
            "federation.eval_every": 100,
            "train.local_steps": 1,
            "output.save_adapter": False,
        }
    )
    drawn = [poisson_sample_nodes(range(4), 0.1, seed=0, rnd=r) for r in range(1, 5)]
    assert [] in drawn and any(drawn)  # the seed exercises both kinds of round
    plain = _run(base, tmp_path / "plain")
    rows = metrics_rows(tmp_path / "plain")[1:]
    assert [r["sampled"] for r in rows] == [len(d) for d in drawn]
    for r, d in zip(rows, drawn):
        if not d:  # nothing sent, nothing received, no rejection invented
            assert (r["accepted"], r["rejected"], r["clients"], r["bytes_down"], r["train"]) == (0, [], [], 0, {})
    assert plain["rounds_completed"] == 4
    # client-central DP: an empty round still adds noise of std z C / (q N) = 1 * 0.5 / 0.4, and is accounted
    dp = base.replace(**CENTRAL, **{"privacy.adaptive_clip": True, "privacy.count_noise": 1.5})
    out = _run(dp, tmp_path / "dp")
    rows = metrics_rows(tmp_path / "dp")[1:]
    assert out["privacy"]["epsilon"] == pytest.approx(opacus_epsilon(1.0, 0.1, 4, 1e-5), rel=1e-9)
    first_empty = next(i for i, d in enumerate(drawn) if not d) + 1
    frac = rows[first_empty - 1]["dp_unclipped_fraction"]
    n = torch.randn(
        (), generator=torch.Generator().manual_seed(derive_seed(0, "dp-count", first_empty)), dtype=torch.float64
    )
    sigma_b = 1.5 * 0.4  # count_noise x q N
    assert frac == pytest.approx(0.5 + sigma_b * n.item() / 0.4, rel=1e-9)  # no bits, only the count's noise
    # ... and it moved C: the released fraction is used as in any round
    assert rows[first_empty]["dp_clip_norm"] == pytest.approx(
        rows[first_empty - 1]["dp_clip_norm"] * math.exp(-0.2 * (frac - 0.5))
    )


def test_zeroth_order_rounds_take_a_varying_count_and_empty_rounds(tiny_cfg, tmp_path):
    cfg = tiny_cfg.replace(
        **{
            "train.mode": "zo",
            "zo.num_seeds": 64,
            "zo.local_steps": 1,
            "zo.lr": 1e-3,
            "federation.rounds": 2,  # seed 0 at q = 0.1 draws nobody in round 1, partition 0 in round 2
            "federation.fraction_train": 0.1,
            "federation.min_train_clients": 1,
            "federation.sampling": "poisson",
            "federation.eval_every": 100,
            "output.save_adapter": False,
        }
    )
    summary = _run(cfg, tmp_path)
    rows = metrics_rows(tmp_path)[1:]
    assert [(r["sampled"], r["accepted"]) for r in rows] == [(0, 0), (1, 1)]
    assert [r["zo"]["history_rounds"] for r in rows] == [1, 2] and rows[0]["zo"]["pairs"] == 0
    assert summary["zo_history"]["rounds"] == 2


# --- configuration ------------------------------------------------------------------------------


def test_refusals_name_the_keys(tiny_cfg):
    cases = [
        (
            {"federation.sampling": "bernoulli"},
            "federation.sampling: must be one of fixed, poisson, label-balanced (got 'bernoulli')",
        ),
        (
            # q N = 4 x 0.25 = 1 expected a round, min_train_clients = 2 (tiny.toml) would be a floor
            {"federation.sampling": "poisson", "federation.fraction_train": 0.25},
            "federation.min_train_clients: federation.sampling = 'poisson' keeps no minimum",
        ),
        (
            {"federation.sampling": "poisson", "aggregation.secure": "secagg+"},
            "federation.sampling: 'poisson' cannot be combined with aggregation.secure = 'secagg+'",
        ),
    ]
    for over, msg in cases:
        with pytest.raises(ConfigError) as err:
            tiny_cfg.replace(**over)
        assert any(p.startswith(msg) for p in err.value.problems), (msg, err.value.problems)
    with pytest.raises(ConfigError) as err:
        tiny_cfg.replace(**{"federation.sampling": "poisson", "federation.fraction_train": 0.25})
    assert "lower it to at most 1 (fraction_train x num_clients = 1 expected a round)" in str(err.value)
    ok = tiny_cfg.replace(
        **{"federation.sampling": "poisson", "federation.fraction_train": 0.25, "federation.min_train_clients": 1}
    )
    assert (ok.federation.sample_rate, ok.federation.expected_clients_per_round) == (0.25, 1.0)
    # the fixed sampler keeps its rate m / N: here the floor of 2 raises it to 2 / 4
    fixed = tiny_cfg.replace(**{"federation.fraction_train": 0.25})
    assert (fixed.federation.sample_rate, fixed.federation.expected_clients_per_round) == (0.5, 2)


def test_budget_and_adaptive_checks_use_the_poisson_rate_and_expected_count(tiny_cfg):
    # adaptive clipping's sigma_b = count_noise x q N = 0.05 x 2.5 = 0.125 <= z / 2: refused with q N in the message
    with pytest.raises(ConfigError) as err:
        tiny_cfg.replace(
            **CENTRAL,
            **{
                "federation.num_clients": 10,
                "federation.fraction_train": 0.25,
                "federation.sampling": "poisson",
                "privacy.adaptive_clip": True,
            },
        )
    assert any("count_noise x 2.5 clients a round = 0.125" in p for p in err.value.problems), err.value.problems
    # the budget check accounts at q = fraction_train = 0.25, not the fixed sampler's max(int(2.5), 2) / 10 = 0.2
    over = {"federation.num_clients": 10, "federation.fraction_train": 0.25, "federation.rounds": 20}
    budget = (opacus_epsilon(1.0, 0.25, 20, 1e-5) + opacus_epsilon(1.0, 0.2, 20, 1e-5)) / 2
    fixed = tiny_cfg.replace(**CENTRAL, **over, **{"privacy.epsilon_budget": budget})  # fits at 0.2
    assert fixed.federation.sample_rate == 0.2
    with pytest.raises(ConfigError, match="privacy.epsilon_budget: federation.rounds = 20 would spend"):
        tiny_cfg.replace(**CENTRAL, **over, **{"privacy.epsilon_budget": budget, "federation.sampling": "poisson"})


def test_shipped_dp_config_is_poisson_and_its_epsilon_is_the_documented_one():
    cfg = config.load(CONFIGS / "dp-many-clients.toml")
    assert cfg.federation.sampling == "poisson" and cfg.federation.sample_rate == 0.1
    from fedtune.privacy.ledger import RunPrivacy

    acc = RunPrivacy(cfg).accountant
    eps = acc.epsilon_after(cfg.federation.rounds)
    assert eps == pytest.approx(opacus_epsilon(0.75, 0.1, 30, 1e-4), rel=1e-9)
    assert round(eps, 2) == 7.37  # the figure the config's comments state
