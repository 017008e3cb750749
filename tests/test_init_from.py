"""``adapter.init_from``: a run starts from the adapter another run exported (its full state, as trained)."""

import json

import pytest
import torch
from safetensors.torch import load_file

from fedtune import adapters, config, workspace
from fedtune.centralized import run_centralized
from fedtune.cli import main
from fedtune.errors import ConfigError
from tests.conftest import CONFIGS, metrics_rows, run_capturing_updates
from tests.test_config import problems

SHORT = {"federation.rounds": 2, "train.local_steps": 3, "train.lr": 5e-2}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A short centralized run of the tiny config with a Fed-SB core (its fixed factors are part of the state)."""
    cfg = config.load(CONFIGS / "tiny.toml", {**SHORT, "adapter.method": "lora-sb"})
    out = tmp_path_factory.mktemp("first")
    run_centralized(cfg, out)
    return cfg, out


def test_the_export_holds_the_full_state_and_what_it_fits(trained):
    cfg, out = trained
    state = load_file(str(out / "adapter" / workspace.INIT_STATE))
    built = workspace.get(cfg).initial_state()
    assert set(state) == set(built)  # cores, fixed factors and head, not the folded PEFT form
    assert any(".lora_R." in k for k in state) and any(".lora_A." in k for k in state)
    trainable = workspace.get(cfg).trainable_keys()
    assert any(not torch.equal(state[k], built[k]) for k in trainable)  # it is the trained adapter
    meta = json.loads((out / "adapter" / workspace.INIT_META).read_text())
    a = cfg.adapter
    assert meta == {
        "model": "tiny-bert",
        "adapter": {"method": "lora-sb", "r": a.r, "alpha": a.alpha, "target_modules": list(a.target_modules)}
        | {"num_virtual_tokens": a.num_virtual_tokens},
    }


def test_a_federated_run_starts_where_the_exported_run_ended(trained, tmp_path):
    first_cfg, first = trained
    cfg = first_cfg.replace(**{"adapter.init_from": str(first / "adapter"), "federation.rounds": 1})
    ws = workspace.get(cfg)
    exported = load_file(str(first / "adapter" / workspace.INIT_STATE))
    init = ws.initial_state()
    assert all(torch.equal(init[k], exported[k]) for k in exported)
    run_capturing_updates(cfg, tmp_path / "second")
    # round 0 evaluates the starting adapter: the first run's final figures, on the same held-out split
    first_final = json.loads((first / "summary.json").read_text())["final"]
    round0 = metrics_rows(tmp_path / "second")[0]["eval"]
    assert round0["accuracy"] == first_final["accuracy"] and round0["loss"] == pytest.approx(first_final["loss"])
    # and the seeded adapter would not have: the start really moved
    seeded = workspace.get(first_cfg).initial_state()
    assert any(not torch.equal(seeded[k], init[k]) for k in ws.trainable_keys())


def test_an_adapter_that_does_not_fit_is_refused_before_the_run(trained, tmp_path, capsys):
    first_cfg, first = trained
    src = str(first / "adapter")
    r = first_cfg.adapter.r
    with pytest.raises(ConfigError) as exc:
        workspace.check_data(first_cfg.replace(**{"adapter.init_from": src, "adapter.r": r + 1}))
    assert exc.value.problems == (
        f"adapter.r: {r + 1}, and the adapter of adapter.init_from = {src!r} was trained with {r}; set it so or "
        "start from another adapter",
    )
    with pytest.raises(ConfigError, match="was trained on model.name = 'tiny-bert'"):
        workspace.check_data(first_cfg.replace(**{"adapter.init_from": src, "model.name": "tiny-llama"}))
    with pytest.raises(ConfigError, match="holds no fedtune_state.safetensors"):
        workspace.check_data(first_cfg.replace(**{"adapter.init_from": str(tmp_path)}))
    # the same tensors, shape for shape: a head for 3 classes does not load into one for 2
    with pytest.raises(ConfigError, match="does not fit this model's adapter"):
        workspace.build(first_cfg.replace(**{"adapter.init_from": src, "model.num_labels": 3}))
    # check-config makes the refusal, naming the key
    toml = tmp_path / "c.toml"
    toml.write_text(config.to_toml(first_cfg.replace(**{"adapter.init_from": src})))
    assert main(["check-config", "--config", str(toml), "--set", f"adapter.r={r + 1}"]) == 2
    assert "adapter.r:" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="adapter.head_init: 'prototypes' replaces the head"):
        config.load(None, {"adapter.init_from": src, "adapter.head_init": "prototypes", "model.pooling": "mean"})
    # what would build the seeded state is not read: refused, not ignored
    over = {"adapter.method": "lora-sb", "adapter.sb_factors": "svd", "adapter.init_seed": 3}
    assert problems({"adapter.init_from": src, **over}) == (
        f"adapter.init_seed: the seeded adapter and LoRA-SB's factors come whole from adapter.init_from = {src!r}, "
        "so this would not be read; leave it out (got 3)",
        f"adapter.sb_factors: the seeded adapter and LoRA-SB's factors come whole from adapter.init_from = {src!r}, "
        "so this would not be read; leave it out (got 'svd')",
    )
    assert config.load(None, over).adapter.sb_factors == "svd"  # accepted without init_from


def test_a_plain_lora_export_starts_a_run_too(tmp_path):
    cfg = config.load(CONFIGS / "tiny.toml", SHORT)
    run_centralized(cfg, tmp_path / "a")
    again = cfg.replace(**{"adapter.init_from": str(tmp_path / "a" / "adapter")})
    ws = workspace.get(again)
    exported = load_file(str(tmp_path / "a" / "adapter" / workspace.INIT_STATE))
    assert all(torch.equal(adapters.get_state(ws.model)[k], exported[k]) for k in exported)
