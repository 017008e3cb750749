"""Secure aggregation (``aggregation.secure = "secagg+"``): config checks and a real SecAgg+ simulation."""

import json
import logging

import pytest

from fedtune import config, workspace
from fedtune.errors import ConfigError

from .conftest import CONFIGS

SECURE = {"aggregation.secure": "secagg+"}


def _load(**overrides):
    return config.load(CONFIGS / "tiny.toml", {**SECURE, **overrides})


def test_defaults_are_flowers_and_unset_without_secure():
    agg = _load().aggregation
    assert (
        agg.num_shares,
        agg.reconstruction_threshold,
        agg.clipping_range,
        agg.quantization_range,
        agg.max_weight,
    ) == (3, 2, 8.0, 2**22, 1000.0)
    plain = config.load(CONFIGS / "tiny.toml").aggregation
    assert plain.secure == "none" and plain.num_shares is None
    # round-trips through the run directory's config.toml
    assert config.from_dict(__import__("tomllib").loads(config.to_toml(_load()))).aggregation == agg


@pytest.mark.parametrize(
    "overrides,needle",
    [
        ({"aggregation.secure": "secagg"}, "aggregation.secure: must be one of none, secagg+"),
        (
            {"aggregation.secure": "none", "aggregation.num_shares": 3},
            "aggregation.num_shares: only used with aggregation.secure = 'secagg+'",
        ),
        ({"aggregation.num_shares": 2}, "aggregation.num_shares: must be an integer (> 2"),
        (
            {"aggregation.num_shares": 3, "aggregation.reconstruction_threshold": 3},
            "aggregation.reconstruction_threshold: must be less than aggregation.num_shares = 3",
        ),
        ({"aggregation.clipping_range": 0.0}, "aggregation.clipping_range: must be > 0"),
        ({"aggregation.quantization_range": 2**32}, "aggregation.quantization_range: must be in [2, "),
        ({"aggregation.robust": "median"}, "aggregation.robust: 'median' cannot be combined with aggregation.secure"),
        (
            {"aggregation.lora_mode": "exact"},
            "aggregation.lora_mode: 'exact' cannot be combined with aggregation.secure",
        ),
        (
            {"aggregation.server_optimizer": "fedadam"},
            "aggregation.server_optimizer: 'fedadam' cannot be combined with aggregation.secure",
        ),
        ({"aggregation.max_update_norm": 1.0}, "max_update_norm: the server cannot measure"),
        ({"compression.codec": "topk", "compression.ratio": 0.1}, "compression.codec: SecAgg+ quantizes"),
        (
            {"privacy.mode": "client-central", "privacy.noise_multiplier": 1.0, "privacy.clip_norm": 1.0},
            "privacy.mode: 'client-central' clips each update on the server",
        ),
        (
            {"federation.num_clients": 1, "federation.min_train_clients": 1, "federation.min_available_clients": 1},
            "federation.min_train_clients: SecAgg+ needs at least 2",
        ),
    ],
)
def test_refuses_what_does_not_compose(overrides, needle):
    with pytest.raises(ConfigError) as exc:
        _load(**overrides)
    assert needle in str(exc.value)


def test_client_local_dp_composes():
    cfg = _load(**{"privacy.mode": "client-local", "privacy.noise_multiplier": 1.0, "privacy.clip_norm": 1.0})
    assert cfg.privacy.mode == "client-local"


def test_simulate_refuses_resume_with_secagg(tmp_path):
    from fedtune.flower import simulation

    with pytest.raises(ConfigError, match="--resume is not supported"):
        simulation.simulate(_load(), tmp_path, resume=True)


def _reference_mean(cfg, start, rnd, num_clients):
    """Plain FedAvg of the same clients' deltas: each client's training run here, in this process."""
    from flwr.app import Context, RecordDict

    from fedtune.flower.secagg import fit_config, train_delta

    deltas, weights = [], []
    for pid in range(num_clients):
        ctx = Context(
            run_id=0,
            node_id=pid + 1,
            node_config={"partition-id": pid, "num-partitions": num_clients},
            state=RecordDict(),
            run_config={},
        )
        delta, metrics = train_delta(start, fit_config(cfg, rnd), ctx, cfg)
        deltas.append(delta)
        weights.append(float(metrics["num-examples"]))
    total = sum(weights)
    return {k: sum(w * d[k] for w, d in zip(weights, deltas)) / total for k in deltas[0]}, weights


@pytest.mark.slow
def test_secagg_simulation_equals_fedavg_up_to_quantization(tmp_path):
    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation

    from fedtune.flower.apps import make_client_app
    from fedtune.flower.secagg import run_secagg
    from fedtune.flower.simulation import backend_config, preflight

    n = 3
    cfg = _load(**{"federation.num_clients": n, "federation.rounds": 2, "federation.fraction_train": 1.0})
    preflight(cfg)
    steps, result = [], {}
    server_app = ServerApp()

    @server_app.main()
    def main(grid, context):
        result.update(
            run_secagg(
                grid,
                context,
                cfg,
                tmp_path,
                lambda s: None,
                on_aggregate=lambda r, before, mean: steps.append((r, before, mean)),
            )
        )

    logging.getLogger("flwr").setLevel(logging.WARNING)
    run_simulation(
        server_app=server_app, client_app=make_client_app(cfg), num_supernodes=n, backend_config=backend_config(cfg)
    )

    assert result["rounds_completed"] == 2
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert all(r["accepted"] == n and "eval" in r for r in rows[1:])
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["aggregation"]["secure"] == "secagg+" and summary["mode"] == "secagg+"
    # the same round and summary fields as every other mode (the loop's bookkeeping)
    from tests.test_round_loop import ROW_FIELDS, SUMMARY_FIELDS

    assert all(ROW_FIELDS <= set(r) for r in rows[1:]) and SUMMARY_FIELDS <= set(summary)
    assert [r for r, _, _ in steps] == [1, 2]

    agg = cfg.aggregation
    for rnd, before, secure_mean in steps:
        ref, weights = _reference_mean(cfg, before, rnd, n)
        # each client's weighted delta is stochastically rounded to a grid of step 2C/Q;
        # SecAgg+ divides the sum by the total weight sum(n_i / max_weight)
        step = 2 * agg.clipping_range / agg.quantization_range
        bound = n * step / (sum(weights) / agg.max_weight) + 1e-6
        assert set(secure_mean) == set(ref)
        worst = max(float((secure_mean[k] - ref[k]).abs().max()) for k in ref)
        size = max(float(ref[k].abs().max()) for k in ref)
        assert worst <= bound, (rnd, worst, bound)
        assert size > 100 * bound  # the deltas are far above the quantization error: the check means something
    assert workspace.get(cfg).trainable_keys()


def test_secagg_samples_with_the_seeded_sampler():
    """MeanDeltaFedAvg picks each round's clients with fedtune's (seed, round) sampler, not Flower's."""
    import torch

    from fedtune.flower.secagg import MeanDeltaFedAvg
    from fedtune.flower.server import sample_nodes

    class Proxy:
        def __init__(self, nid):
            self.cid, self.node_id = str(nid), nid

    class Manager:
        proxies = {str(n): Proxy(n) for n in range(100, 110)}

        def num_available(self):
            return len(self.proxies)

        def wait_for(self, n, timeout=None):
            return True

        def all(self):
            return self.proxies

    def sample(rnd, ids):
        return sample_nodes(ids, 0.3, 2, seed=7, rnd=rnd)

    strategy = MeanDeltaFedAvg(
        {"w": torch.zeros(2)},
        ["w"],
        sample=sample,
        fraction_fit=0.3,
        min_fit_clients=2,
        on_fit_config_fn=lambda rnd: {"server-round": rnd},
    )
    for rnd in (1, 2, 3):
        picked = [p.node_id for p, _ in strategy.configure_fit(rnd, strategy.initial_parameters, Manager())]
        assert picked == sample_nodes(list(range(100, 110)), 0.3, 2, seed=7, rnd=rnd)
