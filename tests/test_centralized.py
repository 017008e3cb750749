"""The centralized baseline: pooled data, the federated run's step count, a run directory like a federated one."""

import json

import torch

from fedtune import adapters, config, workspace
from fedtune.centralized import pooled_train_data, run_centralized, steps_per_round
from fedtune.cli import main
from fedtune.flower.server import sample_nodes
from fedtune.train import forward_precision
from tests.conftest import metrics_rows
from tests.test_metrics import LLM


def test_clients_per_round_is_what_the_server_samples(tiny_cfg):
    for n, frac, minimum in [(4, 1.0, 2), (10, 0.3, 2), (10, 0.05, 2), (1000, 0.01, 10), (5, 0.5, 5)]:
        cfg = tiny_cfg.replace(
            **{
                "federation.num_clients": n,
                "federation.fraction_train": frac,
                "federation.min_train_clients": minimum,
                "federation.min_available_clients": min(2, n),
            }
        )
        assert cfg.federation.clients_per_round == len(sample_nodes(range(n), frac, minimum, seed=0, rnd=1))
    assert steps_per_round(tiny_cfg) == 4 * tiny_cfg.train.local_steps


def test_pooled_data_is_every_client_partition(tiny_cfg):
    ws = workspace.get(tiny_cfg)
    pooled = pooled_train_data(ws)
    assert len(pooled) == len(ws.all_train_data())
    assert sorted(map(str, pooled)) == sorted(map(str, ws.all_train_data()))


def test_centralized_run_dir_matches_the_federated_layout(tiny_cfg, tmp_path, capsys):
    cfg = tiny_cfg.replace(**{"federation.rounds": 3, "train.local_steps": 2})
    toml = tmp_path / "c.toml"
    toml.write_text(config.to_toml(cfg))
    out = tmp_path / "central"
    assert main(["centralized", "--config", str(toml), "--set", "federation.eval_every=2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "centralized baseline" in printed
    rows = metrics_rows(out)
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    # rounds x clients per round x local steps, evaluated at each round's step boundary
    assert [r["steps_total"] for r in rows[1:]] == [8, 16, 24]
    assert all(r["train"]["steps"] == 8 and r["train"]["examples_seen"] == 8 * cfg.train.batch_size for r in rows[1:])
    assert ["eval" in r for r in rows] == [True, False, True, True]  # eval_every = 2, and the last round
    assert all(r["bytes_up"] == r["bytes_down"] == 0 for r in rows)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mode"] == "centralized" and summary["total_steps"] == 24
    # "auto" resolved on this machine, in the header and the summary
    ws = workspace.get(cfg)
    assert next(ws.model.base_model.parameters()).dtype == torch.float32  # so the autocast alone decides
    precision = forward_precision(ws.device, cfg.train.mixed_precision)
    assert summary["precision"] == precision and f"forward passes in {precision}" in printed
    assert summary["final"] == rows[-1]["eval"] and summary["train_examples"] == 1000  # data.max_train_examples
    assert config.load(out / "config.toml").to_dict() == cfg.replace(**{"federation.eval_every": 2}).to_dict()
    assert (out / "adapter" / "adapter_config.json").is_file()
    # the cached workspace is handed back with its initial adapter
    state, init = adapters.get_state(ws.model), ws.initial_state()
    assert all(torch.equal(state[k], init[k]) for k in init)


def test_centralized_causal_lm_reports_rouge_and_forgetting(tiny_cfg, tmp_path):
    cfg = tiny_cfg.replace(
        **LLM,
        **{
            "federation.rounds": 1,
            "train.local_steps": 2,
            "train.lr": 3e-2,
            "output.save_adapter": False,
            "eval.rouge_examples": 2,
            "eval.forgetting_examples": 6,
            "eval.max_new_tokens": 3,
        },
    )
    summary = run_centralized(cfg, tmp_path)
    rows = metrics_rows(tmp_path)
    for r in (rows[0], rows[-1]):
        assert {"loss", "perplexity", "rouge_l", "forgetting_perplexity"} <= set(r["eval"])
    f = summary["forgetting"]
    assert f["before"] == rows[0]["eval"]["forgetting_perplexity"]
    assert f["after"] == rows[-1]["eval"]["forgetting_perplexity"] and f["ratio"] == f["after"] / f["before"]
