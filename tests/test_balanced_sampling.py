"""Label-balanced client sampling (``federation.sampling = "label-balanced"``): the sampler by hand,
the class counts a node tells the server with its identity, a run whose rounds are the ones the
sampler picks from every silo's true counts, and the refusals."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

from fedtune import config, workspace
from fedtune.errors import ConfigError
from fedtune.flower import protocol as P
from fedtune.flower.client import class_counts, handle_train
from fedtune.flower.identity import CLASS_COUNTS, NodeIdentities
from fedtune.flower.local import LocalGrid
from fedtune.flower.server import BALANCE_SLACK, ServerLoop, balanced_sample_nodes, sample_nodes

from .conftest import CONFIGS, metrics_rows

BALANCED = {"federation.sampling": "label-balanced"}


def _mix(counts, nodes, weighted=True):
    """The pooled class shares of ``nodes``, each node's shares weighted by its size (or equally)."""
    shares = [np.asarray(counts[n], float) / sum(counts[n]) for n in nodes]
    w = [sum(counts[n]) if weighted else 1.0 for n in nodes]
    return sum(wi * s for wi, s in zip(w, shares)) / sum(w)


# -- the sampler -----------------------------------------------------------------------------


def test_two_single_label_groups_always_pair_across_labels_and_everyone_takes_part():
    # nodes 0-2 hold only class 0, nodes 3-5 only class 1, all of 100 examples: the federation is 50/50;
    # a pair across the groups mixes 50/50 exactly (gap 0), a pair within one is 100/0 (L1 gap 1.0 > 0 + slack)
    counts = {n: [100, 0] if n < 3 else [0, 100] for n in range(6)}
    seen = set()
    for rnd in range(1, 200):
        a, b = balanced_sample_nodes(counts, 2, seed=3, rnd=rnd, weighted=True)
        assert (a < 3) != (b < 3), (rnd, a, b)
        seen.update((a, b))
    assert seen == set(range(6))
    # fixed-size sampling picks a same-label pair in 2/5 of rounds (choose 2 of 6: 6 of 15 pairs)


def test_the_draw_is_reproducible_and_follows_seed_and_round():
    counts = {11: [50, 5], 12: [3, 40], 13: [20, 20], 14: [60, 1], 15: [2, 30], 16: [10, 12]}
    a = [balanced_sample_nodes(counts, 3, seed=1, rnd=r, weighted=True) for r in range(1, 40)]
    assert a == [
        balanced_sample_nodes(dict(reversed(counts.items())), 3, seed=1, rnd=r, weighted=True) for r in range(1, 40)
    ]
    assert a != [balanced_sample_nodes(counts, 3, seed=2, rnd=r, weighted=True) for r in range(1, 40)]
    assert all(len(set(x)) == 3 and x == sorted(x) for x in a)


def test_each_added_node_is_within_the_slack_of_the_best_choice_by_hand():
    # the federation holds 90 + 40 = 130 of class 0 and 10 + 80 + 40 = 130 of class 1 (50/50); weighted by
    # examples, node 1 (90 of class 0) + node 2 (10 of class 1) mix 90/10, far from it; every gap by hand
    counts = {1: [90, 0], 2: [0, 10], 3: [0, 80], 4: [40, 40]}
    total = np.array([130.0, 130.0])
    target = total / total.sum()  # 50/50
    for rnd in range(1, 60):
        picked = balanced_sample_nodes(counts, 2, seed=0, rnd=rnd, weighted=True)
        # whichever node came first, the other is within the slack of its best partner
        ok = False
        for f in picked:
            other = [n for n in picked if n != f][0]
            gaps = {n: np.abs(_mix(counts, [f, n]) - target).sum() for n in counts if n != f}
            ok |= gaps[other] <= min(gaps.values()) + BALANCE_SLACK
        assert ok, picked
    # node 1's best partner by examples is node 3 (90/80 -> 0.53/0.47), not the small node 2 (0.9/0.1);
    # counted equally, node 2 balances node 1 as well as node 3 does (both 0.5/0.5)
    assert np.abs(_mix(counts, [1, 3]) - target).sum() < np.abs(_mix(counts, [1, 2]) - target).sum() - BALANCE_SLACK
    assert np.abs(_mix(counts, [1, 2], weighted=False) - target).sum() == pytest.approx(0.0)
    pairs_w = {tuple(balanced_sample_nodes(counts, 2, seed=0, rnd=r, weighted=True)) for r in range(1, 200)}
    pairs_u = {tuple(balanced_sample_nodes(counts, 2, seed=0, rnd=r, weighted=False)) for r in range(1, 200)}
    assert (1, 2) not in pairs_w and (1, 2) in pairs_u


def test_a_node_that_did_not_say_counts_as_the_federations_mix():
    counts = {1: [100, 0], 2: [0, 100], 3: None}
    rounds = [balanced_sample_nodes(counts, 2, seed=0, rnd=r, weighted=True) for r in range(1, 100)]
    assert [1, 2] in rounds and [1, 3] in rounds and [2, 3] in rounds  # node 3 balances nobody, is still drawn
    # nobody said: a uniform draw of k
    assert len(balanced_sample_nodes({1: None, 2: None, 3: None}, 2, seed=0, rnd=1, weighted=True)) == 2


# -- the exchange and a run ------------------------------------------------------------------


def _query(counts: bool) -> Message:
    return Message(
        RecordDict({P.CONFIG: ConfigRecord({"ask": "identity", CLASS_COUNTS: counts})}),
        dst_node_id=1000,
        message_type=MessageType.QUERY,
    )


def test_a_node_tells_its_true_class_counts_only_when_the_run_samples_by_them(tiny_cfg):
    cfg = tiny_cfg.replace(**BALANCED)
    ws = workspace.get(cfg)
    ctx = Context(run_id=1, node_id=7, node_config={"partition-id": 2}, state=RecordDict(), run_config={})
    part = ws.partitions()[2]
    labels = [ws.splits.train[i]["label"] for i in part]
    assert class_counts(ctx, cfg) == [labels.count(0), labels.count(1)]
    with pytest.raises(ValueError, match="federation.sampling is 'fixed', not 'label-balanced'"):
        class_counts(ctx, tiny_cfg)
    grid = LocalGrid(4, lambda m, c: handle_train(m, c, cfg), class_counts=lambda c: class_counts(c, tiny_cfg))
    (reply,) = grid.send_and_receive([_query(True)])
    assert reply.has_error() and "not 'label-balanced'" in reply.error.reason
    (reply,) = grid.send_and_receive([_query(False)])  # the plain identity query still works
    assert dict(reply.content[P.METRICS]) == {"partition-id": 0}


def _six_silos(rounds: int, **overrides):
    """The tiny config over 6 label-skewed silos, 2 a round (unless ``overrides`` say otherwise), and
    each silo's true class counts."""
    cfg = config.load(CONFIGS / "tiny.toml").replace(
        **{
            **BALANCED,
            "federation.num_clients": 6,
            "federation.fraction_train": 0.34,
            "federation.rounds": rounds,
            "data.dirichlet_alpha": 0.2,
            **overrides,
        }
    )
    ws = workspace.get(cfg)
    truth = {}
    for pid, idx in enumerate(ws.partitions()):
        labels = [ws.splits.train[i]["label"] for i in idx]
        truth[pid] = [labels.count(0), labels.count(1)]
    return cfg, truth


def _trained(out) -> list[list[int]]:
    return [sorted(int(c["partition-id"]) for c in row["clients"]) for row in metrics_rows(out)[1:]]


def test_a_run_trains_the_rounds_the_sampler_picks_from_every_silos_true_counts(tmp_path):
    cfg, truth = _six_silos(rounds=4)
    grid = LocalGrid(6, lambda m, c: handle_train(m, c, cfg), class_counts=lambda c: class_counts(c, cfg))
    ServerLoop(cfg, tmp_path, progress=lambda s: None).main(grid)
    # node 1000 + i holds partition i (LocalGrid); the sampler orders nodes by partition id
    expected = [balanced_sample_nodes(truth, 2, seed=cfg.federation.seed, rnd=r, weighted=True) for r in range(1, 5)]
    trained = _trained(tmp_path)
    assert trained == expected
    fixed = [sample_nodes(range(6), 0.34, 2, seed=cfg.federation.seed, rnd=r) for r in range(1, 5)]
    assert trained != fixed  # the run did not sample as "fixed" does
    identities = NodeIdentities(ask_counts=True)
    identities.learn(grid, grid.get_node_ids())
    assert identities.class_counts == {1000 + pid: c for pid, c in truth.items()}


def test_a_resumed_run_asks_again_and_trains_the_rounds_of_an_uninterrupted_one(tmp_path):
    from tests.test_resume import Crash, CrashingGrid

    cfg, _ = _six_silos(rounds=4)

    def grid(cls=LocalGrid, **kw):
        return cls(6, lambda m, c: handle_train(m, c, cfg), class_counts=lambda c: class_counts(c, cfg), **kw)

    ServerLoop(cfg, tmp_path / "whole", progress=lambda s: None).main(grid())
    out = tmp_path / "broken"
    with pytest.raises(Crash):
        ServerLoop(cfg, out, progress=lambda s: None).main(grid(CrashingGrid, crash_round=3))
    ServerLoop(cfg, out, progress=lambda s: None, resume=True).main(grid())
    assert _trained(out) == _trained(tmp_path / "whole")
    assert len({tuple(r) for r in _trained(out)}) > 1


@pytest.mark.slow
def test_on_flowers_simulation_engine_the_client_app_answers_the_counts(tmp_path):
    from fedtune.flower.simulation import simulate

    cfg, truth = _six_silos(rounds=2)
    simulate(cfg, tmp_path, progress=lambda s: None)
    assert _trained(tmp_path) == [
        balanced_sample_nodes(truth, 2, seed=cfg.federation.seed, rnd=r, weighted=True) for r in (1, 2)
    ]


# -- refusals --------------------------------------------------------------------------------


def test_refused_without_classes_or_under_privacy(tiny_cfg):
    for over, key in (
        ({"model.task": "causal-lm"}, "model.task = 'causal-lm' has no classes"),
        (
            {"privacy.mode": "sample", "privacy.noise_multiplier": 0.8, "privacy.max_grad_norm": 1.0},
            "privacy.mode = 'sample'",
        ),
        (
            {"privacy.mode": "client-central", "privacy.noise_multiplier": 1.0, "privacy.clip_norm": 1.0},
            "privacy.mode = 'client-central'",
        ),
    ):
        with pytest.raises(ConfigError) as err:
            tiny_cfg.replace(**BALANCED, **over)
        assert any(p.startswith("federation.sampling: 'label-balanced'") and key in p for p in err.value.problems), (
            err.value.problems
        )
    with pytest.raises(ConfigError, match=r"federation.sampling: must be one of fixed, poisson, label-balanced"):
        tiny_cfg.replace(**{"federation.sampling": "balanced"})
    llama = tiny_cfg.replace(**BALANCED, **{"model.name": "tiny-llama"})
    with pytest.raises(
        ConfigError, match=r"federation.sampling: 'label-balanced' .*'tiny-llama' is trained as a causal LM"
    ):
        workspace.check_data(llama)
