import math
import re
import tomllib

import pytest

from fedtune import cli, config, workspace
from fedtune.errors import ConfigError

from .conftest import CONFIGS, ROOT

SHIPPED = sorted(CONFIGS.glob("*.toml"))


def problems(overrides, path=None) -> tuple[str, ...]:
    """The problems `config.load` reports for ``overrides`` (it must refuse them)."""
    with pytest.raises(ConfigError) as exc:
        config.load(path, overrides)
    return exc.value.problems


def test_the_shipped_configs_are_there():
    assert {p.name for p in SHIPPED} >= {"default.toml", "tiny.toml", "flwr-run.toml", "smollm2-chatterbot.toml"}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_config_loads_and_passes_check_config(path):
    cfg = config.load(path)
    # round trip through the TOML the run directory records
    again = config.from_dict(tomllib.loads(config.to_toml(cfg)))
    assert again.to_dict() == cfg.to_dict()
    workspace.check_data(cfg)  # what check-config adds: the model resolves, the data loads and partitions
    assert cli.main(["check-config", "--config", str(path)]) == 0


def test_defaults_are_the_bundled_demo():
    cfg = config.load(None)
    assert cfg.model.name == "minilm"
    assert cfg.adapter.method == "lora"
    assert cfg.data.dataset == "rotten_tomatoes"
    assert cfg.model.num_labels is None  # the data's label count


def test_unknown_key_is_named():
    assert problems({"train.lrr": 0.1}) == (
        "train.lrr: unknown key (known: batch_size, eval_batch_size, local_steps, logit_adjustment, lr, lr_min_ratio, "
        "lr_schedule, max_grad_norm, mixed_precision, mode, momentum, optimizer, physical_batch_size, seed, weight_decay)",
    )
    assert problems({"zo.num_seed": 5})[0].startswith("zo.num_seed: unknown key (known: distribution, eps,")


def test_unknown_section_is_named():
    with pytest.raises(ConfigError, match="unknown section.*trian"):
        config.from_dict({"trian": {"lr": 1}})


@pytest.mark.parametrize(
    "key,value,needle",
    [
        ("train.lr", -1.0, "train.lr: must be > 0 (got -1.0)"),
        ("train.lr", "abc", "train.lr: expected a number, got 'abc'"),
        ("train.local_steps", 2.5, "train.local_steps: expected an integer, got 2.5"),
        ("adapter.method", "lorax", "adapter.method: must be one of lora, dora, prompt, head, lora-sb (got 'lorax')"),
        (
            "data.partition",
            "random",
            "data.partition: must be one of iid, dirichlet, pathological, domain (got 'random')",
        ),
        ("federation.fraction_train", 1.5, "federation.fraction_train: must be in (0, 1] (got 1.5)"),
        ("model.quantization", "3bit", "model.quantization: must be one of none, 4bit (got '3bit')"),
        ("model.num_labels", 1, "model.num_labels: must be >= 2 (got 1)"),
        ("adapter.ffa", "maybe", "adapter.ffa: expected true or false, got 'maybe'"),
        ("compression.ratio", float("nan"), "compression.ratio: expected a finite number, got nan"),
        ("zo.lr", "abc", "zo.lr: expected a number, got 'abc'"),
        ("aggregation.client_ranks", "2,x", "aggregation.client_ranks: expected a list of integers, got '2,x'"),
    ],
)
def test_bad_values_name_the_key(key, value, needle):
    assert needle in problems({key: value})


# Two bad keys per section: both must be reported, each as `section.key: why (got value)`
# (a value of the wrong type as `section.key: expected <type>, got value`).
TWO_BAD = {
    "model": (
        {"max_length": 0, "device": "tpu"},
        ["model.max_length: must be > 0 (got 0)", "model.device: must be one of auto, cpu, cuda (got 'tpu')"],
    ),
    "adapter": (
        {"r": 0, "dropout": 1.0},
        ["adapter.r: must be > 0 (got 0)", "adapter.dropout: must be in [0, 1) (got 1.0)"],
    ),
    "data": (
        {"test_fraction": 1.0, "dirichlet_alpha": "high"},
        ["data.test_fraction: must be in (0, 1) (got 1.0)", "data.dirichlet_alpha: expected a number, got 'high'"],
    ),
    "train": (
        {"lr": "abc", "batch_size": 0},
        ["train.lr: expected a number, got 'abc'", "train.batch_size: must be > 0 (got 0)"],
    ),
    "federation": (
        {"rounds": 0, "fraction_train": 1.5},
        ["federation.rounds: must be > 0 (got 0)", "federation.fraction_train: must be in (0, 1] (got 1.5)"],
    ),
    "simulation": (
        {"backend": "dask", "cpus_per_client": 0},
        ["simulation.backend: must be one of ray (got 'dask')", "simulation.cpus_per_client: must be > 0 (got 0.0)"],
    ),
    "output": (
        {"name": 3, "save_adapter": "maybe"},
        ["output.name: expected a string, got 3", "output.save_adapter: expected true or false, got 'maybe'"],
    ),
    "eval": (
        {"max_new_tokens": 0, "forgetting_source": "wiki"},
        [
            "eval.max_new_tokens: must be > 0 (got 0)",
            "eval.forgetting_source: must be one of auto, chatterbot, rotten_tomatoes (got 'wiki')",
        ],
    ),
    "compression": (
        {"ratio": 2.0, "sign_scale": "max"},
        [
            "compression.ratio: must be in (0, 1] (got 2.0)",
            "compression.sign_scale: must be one of mean_abs, rms (got 'max')",
        ],
    ),
    "privacy": (
        {"delta": 2.0, "budget_policy": "warn"},
        [
            "privacy.delta: must be in (0, 1) (got 2.0)",
            "privacy.budget_policy: must be one of refuse, stop (got 'warn')",
        ],
    ),
    "aggregation": (
        {"trim_beta": 0.7, "num_malicious": -1},
        ["aggregation.trim_beta: must be in [0, 0.5) (got 0.7)", "aggregation.num_malicious: must be >= 0 (got -1)"],
    ),
    "zo": (
        {"eps": 0, "scope": "lora"},
        ["zo.eps: must be > 0 (got 0.0)", "zo.scope: must be one of adapter, full (got 'lora')"],
    ),
    "attack": (
        {"kind": "scale", "factor": -2.0, "partition_ids": [1, 1]},
        [
            "attack.factor: must be > 0 (got -2.0)",
            "attack.partition_ids: must be distinct partition ids >= 0, at least one (got [1, 1])",
        ],
    ),
}


@pytest.mark.parametrize("section", sorted(TWO_BAD))
def test_every_section_reports_all_its_problems_at_once(section):
    values, expected = TWO_BAD[section]
    got = problems({f"{section}.{k}": v for k, v in values.items()})
    assert sorted(got) == sorted(expected)
    # the same two lines whether the section is built alone or as part of a run's config
    cls = type(getattr(config.FedtuneConfig(), section))
    with pytest.raises(ConfigError) as exc:
        cls.from_dict(values)
    assert sorted(exc.value.problems) == sorted(expected)


def test_every_section_is_covered_by_the_two_bad_keys_test():
    assert set(config.SECTIONS) - {"label_words"} == set(TWO_BAD)


def test_problems_of_every_section_come_together():
    got = problems({"train.lr": "abc", "zo.eps": -1.0, "privacy.mode": "dp", "compression.bitz": 4})
    assert [p.split(":")[0] for p in got] == ["train.lr", "compression.bitz", "privacy.mode", "zo.eps"]


def test_a_wrong_type_does_not_raise_checks_of_its_default():
    # noise_multiplier of the wrong type: 'sample' must not also be told it has no noise multiplier
    got = problems({"privacy.mode": "sample", "privacy.noise_multiplier": "abc", "privacy.max_grad_norm": 1.0})
    assert got == ("privacy.noise_multiplier: expected a number, got 'abc'",)
    # num_clients of the wrong type: min_train_clients is not compared with the default of 10
    got = problems({"federation.num_clients": "ten", "federation.min_train_clients": 20})
    assert got == ("federation.num_clients: expected an integer, got 'ten'",)
    # a section constructed directly is checked the same way
    with pytest.raises(ConfigError, match=re.escape("model.max_length: expected an integer, got '64'")):
        config.ModelConfig(max_length="64")


def test_flat_run_config_spellings_are_read():
    cfg = config.from_run_config(
        {
            "config": "simulations/configs/tiny.toml",
            "output.save_adapter": "false",
            "train.local_steps": 4.0,
            "train.lr": 1,
            "aggregation.lora-mode": "hetero",
            "aggregation.client_ranks": "2 4,8",
            "adapter.r": 8,
        },
        base_dir=ROOT,
    )
    assert cfg.output.save_adapter is False and cfg.aggregation.lora_mode == "hetero"
    assert (cfg.train.local_steps, cfg.train.lr, cfg.aggregation.client_ranks) == (4, 1.0, (2, 4, 8))
    assert isinstance(cfg.train.lr, float) and isinstance(cfg.train.local_steps, int)
    assert (
        "aggregation.lora_mode: given twice"
        in problems({"aggregation.lora-mode": "naive", "aggregation.lora_mode": "naive"})[0]
    )


def test_overrides_parse_toml_values():
    over = config.parse_overrides(
        ["train.lr=2e-3", 'adapter.target_modules=["query"]', "output.name=abc", "adapter.ffa=true"]
    )
    assert over == {"train.lr": 0.002, "adapter.target_modules": ["query"], "output.name": "abc", "adapter.ffa": True}
    with pytest.raises(ConfigError, match="SECTION.KEY=VALUE"):
        config.parse_overrides(["lr=1"])


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_a_variant_holds_only_what_it_changes_on_top_of_its_base(tmp_path):
    (tmp_path / "sub").mkdir()
    base = _write(tmp_path / "base.toml", "[model]\nname = 'tiny-bert'\n[train]\nlr = 0.1\nlocal_steps = 3\n")
    mid = _write(tmp_path / "sub" / "mid.toml", "base = '../base.toml'\n[train]\nlr = 0.2\n")
    top = _write(tmp_path / "top.toml", "base = 'sub/mid.toml'\n[federation]\nrounds = 7\n")
    cfg = config.load(top)
    # a chain of bases, each path relative to the file naming it, key by key as --set would
    assert cfg.to_dict() == config.load(base, {"train.lr": 0.2, "federation.rounds": 7}).to_dict()
    assert cfg.train.local_steps == 3 and cfg.model.name == "tiny-bert"
    assert config.load(top, {"train.lr": 0.3}).train.lr == 0.3  # overrides still come last
    # the run directory records the resolved config, which loads without its base
    assert config.from_dict(tomllib.loads(config.to_toml(cfg))).to_dict() == cfg.to_dict()
    assert config.load(mid).train.lr == 0.2


def test_a_missing_base_or_a_cycle_of_bases_is_refused_naming_the_files(tmp_path):
    a = _write(tmp_path / "a.toml", "base = 'gone.toml'\n")
    assert problems({}, a) == (f"config file not found: {tmp_path / 'gone.toml'} (the base of {a})",)
    _write(tmp_path / "b.toml", "base = 'c.toml'\n")
    c = _write(tmp_path / "c.toml", "base = './b.toml'\n")
    (why,) = problems({}, c)
    assert "makes a cycle" in why and str(tmp_path / "b.toml") in why
    assert "base must name another config file" in problems({}, _write(tmp_path / "d.toml", "base = 3\n"))[0]


def test_unset_drops_a_key_the_file_sets_back_to_its_default(tmp_path):
    long = CONFIGS / "smollm2-chatterbot-long.toml"
    assert config.parse_overrides(["~aggregation.server_lr"]) == {"aggregation.server_lr": config.UNSET}
    # FedAvg has no server step, so the file's server_lr is refused unless it is unset
    (why,) = problems({"aggregation.server_optimizer": "fedavg"}, long)
    assert why.startswith("aggregation.server_lr: only used with")
    cfg = config.load(long, config.parse_overrides(["aggregation.server_optimizer=fedavg", "~aggregation.server_lr"]))
    assert cfg.aggregation.server_optimizer == "fedavg" and cfg.aggregation.server_lr is None
    # the key goes from the file and its base alike: fedtune's default, not the base's 10
    default = config.load(None).train.local_steps
    assert (
        default not in (10, 20) and config.load(long, {"train.local_steps": config.UNSET}).train.local_steps == default
    )
    # the later of --set and --unset wins, as with two --set
    argv = ["check-config", "--config-only", "--config", str(long), "--set", "aggregation.server_optimizer=fedavg"]
    assert cli.main([*argv, "--unset", "aggregation.server_lr"]) == 0
    assert cli.main([*argv, "--unset", "aggregation.server_lr", "--set", "aggregation.server_lr=2.0"]) == 2
    assert problems(config.parse_overrides(["~aggregation.server_rate", "~nope.x"]), long) == (
        "--unset aggregation.server_rate: there is no such setting",
        "--unset nope.x: there is no such setting",
    )
    with pytest.raises(ConfigError, match="expected SECTION.KEY"):
        config.parse_overrides(["~server_lr"])


def test_run_config_from_flower(tmp_path):
    cfg = config.from_run_config({"config": "simulations/configs/tiny.toml", "train.lr": 0.5}, base_dir=ROOT)
    assert cfg.model.name == "tiny-bert" and cfg.train.lr == 0.5
    with pytest.raises(ConfigError, match="config file not found"):
        config.from_run_config({"config": "nope.toml"}, base_dir=tmp_path)


def test_pyproject_registers_the_flower_app():
    py = tomllib.loads((ROOT / "pyproject.toml").read_text())
    comps = py["tool"]["flwr"]["app"]["components"]
    assert comps == {"serverapp": "server.app:app", "clientapp": "clients.app:app"}
    assert (ROOT / py["tool"]["flwr"]["app"]["config"]["config"]).is_file()


# --- aggregation composes or refuses --------------------------------------------------------------
# The server decides the new global state with, in this order: client-central DP's private mean, a
# LoRA-aware aggregator (lora_mode exact / ffa / hetero), the Flower strategy (robust rule, else server
# optimizer) (fedtune/flower/server.py). Each pair below used to be accepted, and the later step computed
# and thrown away while summary.json named it.

CENTRAL = {"privacy.mode": "client-central", "privacy.noise_multiplier": 1.0, "privacy.clip_norm": 1.0}
FFA = {"adapter.ffa": True, "aggregation.lora_mode": "ffa"}


@pytest.mark.parametrize(
    "overrides,first,second",
    [
        ({**FFA, "aggregation.robust": "krum"}, "aggregation.robust: 'krum'", "aggregation.lora_mode = 'ffa'"),
        ({**FFA, "aggregation.robust": "median"}, "aggregation.robust: 'median'", "aggregation.lora_mode = 'ffa'"),
        (
            {**FFA, "aggregation.robust": "trimmed-mean"},
            "aggregation.robust: 'trimmed-mean'",
            "aggregation.lora_mode = 'ffa'",
        ),
        (
            {**CENTRAL, "aggregation.robust": "median"},
            "aggregation.robust: 'median'",
            "privacy.mode = 'client-central'",
        ),
        ({**CENTRAL, "aggregation.robust": "krum"}, "aggregation.robust: 'krum'", "privacy.mode = 'client-central'"),
        (
            {"aggregation.lora_mode": "exact", "aggregation.robust": "krum"},
            "aggregation.robust: 'krum'",
            "aggregation.lora_mode = 'exact'",
        ),
        (
            {"aggregation.lora_mode": "hetero", "aggregation.robust": "median"},
            "aggregation.robust: 'median'",
            "aggregation.lora_mode = 'hetero'",
        ),
        (
            {**CENTRAL, "aggregation.server_optimizer": "fedadam"},
            "aggregation.server_optimizer: 'fedadam'",
            "privacy.mode = 'client-central'",
        ),
        (
            {**CENTRAL, "aggregation.server_optimizer": "fedavgm"},
            "aggregation.server_optimizer: 'fedavgm'",
            "privacy.mode = 'client-central'",
        ),
        (
            {**CENTRAL, "aggregation.lora_mode": "exact"},
            "aggregation.lora_mode: 'exact'",
            "privacy.mode = 'client-central'",
        ),
        ({**CENTRAL, **FFA}, "aggregation.lora_mode: 'ffa'", "privacy.mode = 'client-central'"),
        (
            {**CENTRAL, "aggregation.lora_mode": "hetero"},
            "aggregation.lora_mode: 'hetero'",
            "privacy.mode = 'client-central'",
        ),
        (
            {**FFA, "aggregation.server_optimizer": "fedyogi"},
            "aggregation.server_optimizer: 'fedyogi'",
            "aggregation.lora_mode = 'ffa'",
        ),
        (
            {"aggregation.lora_mode": "exact", "aggregation.server_optimizer": "fedadam"},
            "aggregation.server_optimizer: 'fedadam'",
            "aggregation.lora_mode = 'exact'",
        ),
        (
            {"adapter.method": "prompt", "aggregation.lora_mode": "exact"},
            "aggregation.lora_mode: 'exact'",
            "adapter.method = 'prompt'",
        ),
    ],
)
def test_aggregation_that_would_be_thrown_away_is_refused_naming_both_keys(overrides, first, second):
    got = problems(overrides)
    named = [p for p in got if p.startswith(first)]
    assert len(named) == 1 and second in named[0] and "; use " in named[0], got


@pytest.mark.parametrize(
    "overrides",
    [
        {**CENTRAL, "aggregation.server_optimizer": "fedprox"},  # FedProx's server step is the mean; mu acts on clients
        {"adapter.ffa": True, "aggregation.robust": "krum"},  # the fix the ffa refusal suggests: A frozen, Krum on B
        {
            "privacy.mode": "client-local",
            "privacy.noise_multiplier": 1.0,
            "privacy.clip_norm": 1.0,
            "aggregation.robust": "median",
        },
        {"aggregation.lora_mode": "exact", "aggregation.server_optimizer": "fedprox"},
        {**FFA, "aggregation.server_optimizer": "fedprox"},
        {"aggregation.robust": "krum", "aggregation.server_optimizer": "fedprox"},
        {**CENTRAL, "adapter.ffa": True},
    ],
)
def test_aggregation_that_composes_is_accepted(overrides):
    config.load(None, overrides)


# --- every refusal a run would make from its configuration, made at validation --------------------

ZO = {"train.mode": "zo"}


@pytest.mark.parametrize(
    "overrides,key",
    [
        (
            {**ZO, "privacy.mode": "client-local", "privacy.noise_multiplier": 1.0, "privacy.clip_norm": 1.0},
            "privacy.mode: 'client-local' cannot be combined with train.mode = 'zo'",
        ),
        ({**ZO, **CENTRAL}, "privacy.mode: 'client-central' cannot be combined with train.mode = 'zo'"),
        (
            {**ZO, "aggregation.robust": "median"},
            "aggregation.robust: 'median' cannot be combined with train.mode = 'zo'",
        ),
        (
            {**ZO, "aggregation.server_optimizer": "fedprox"},
            "aggregation.server_optimizer: 'fedprox' cannot be combined with train.mode = 'zo'",
        ),
        (
            {**ZO, "aggregation.max_update_norm": 5.0},
            "aggregation.max_update_norm: cannot be combined with train.mode = 'zo'",
        ),
        (
            {**ZO, "compression.downlink": "int8"},
            "compression.downlink: 'int8' cannot be combined with train.mode = 'zo'",
        ),
        ({**ZO, "compression.codec": "int8"}, "compression.codec: 'int8' cannot be combined with train.mode = 'zo'"),
        (
            {**ZO, "zo.scope": "full", "model.quantization": "4bit"},
            "zo.scope: 'full' cannot be combined with model.quantization = '4bit'",
        ),
        (
            {**ZO, "aggregation.lora_mode": "exact"},
            "aggregation.lora_mode: 'exact' cannot be combined with train.mode = 'zo'",
        ),
        (
            {**ZO, "train.lr_schedule": "cosine"},
            "train.lr_schedule: 'cosine' cannot be combined with train.mode = 'zo'",
        ),
        (
            {"eval.forgetting_examples": 5, "eval.forgetting_source": "chatterbot", "data.dataset": "chatterbot"},
            "eval.forgetting_source: 'chatterbot' cannot be combined with data.dataset = 'chatterbot' and no data.domains",
        ),
    ],
)
def test_run_time_refusals_are_made_by_validation(overrides, key):
    assert any(p.startswith(key) for p in problems(overrides))


def test_an_epsilon_budget_the_rounds_exceed_is_refused_at_validation_with_opacus_epsilon():
    from opacus.accountants import RDPAccountant

    over = {**CENTRAL, "privacy.noise_multiplier": 0.5, "privacy.epsilon_budget": 1.0, "federation.rounds": 50}
    (msg,) = problems(over, CONFIGS / "tiny.toml")
    assert msg.startswith("privacy.epsilon_budget: federation.rounds = 50 would spend epsilon ")
    ref = RDPAccountant()  # tiny.toml: 4 clients, all sampled every round
    ref.history = [(0.5, 1.0, 50)]
    eps = float(re.search(r"spend epsilon (\S+) ", msg).group(1))
    assert math.isclose(eps, ref.get_epsilon(delta=1e-5), rel_tol=1e-3)
    config.load(CONFIGS / "tiny.toml", {**over, "privacy.budget_policy": "stop"})  # stopping early is allowed


# --- the CLI -----------------------------------------------------------------------------------------


def test_check_config_refuses_what_the_run_would(capsys):
    assert (
        cli.main(
            [
                "check-config",
                "--set",
                "adapter.ffa=true",
                "--set",
                "aggregation.lora_mode=ffa",
                "--set",
                "aggregation.robust=krum",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "aggregation.robust: 'krum' cannot be combined with aggregation.lora_mode = 'ffa'" in err


def test_simulate_without_config_runs_the_documented_default_job(monkeypatch, tmp_path):
    from fedtune.flower import simulation

    ran = []
    monkeypatch.setattr(simulation, "simulate", lambda cfg, out, **kw: ran.append((cfg, out)))
    assert cli.main(["simulate", "--out", str(tmp_path / "run")]) == 0
    ((cfg, out),) = ran
    default = config.load(CONFIGS / "default.toml")
    assert cfg == default and cli.DEFAULT_CONFIG == CONFIGS / "default.toml"
    # what made the built-in dataclass defaults a different job
    assert (cfg.federation.rounds, cfg.train.logit_adjustment, cfg.train.lr_schedule) == (24, 1.0, "cosine")
    assert config.load(None).federation.rounds != 24
    # --set applies on top of the default job
    assert cli.main(["simulate", "--out", str(tmp_path / "r2"), "--set", "federation.rounds=3"]) == 0
    assert ran[1][0] == default.replace(**{"federation.rounds": 3})


def test_without_the_repository_a_command_without_config_says_so(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(cli, "DEFAULT_CONFIG", tmp_path / "default.toml")
    assert cli.main(["check-config"]) == 2
    assert "pass --config FILE" in capsys.readouterr().err


def test_sections_built_in_python_hold_tuples_and_keep_flowers_defaults():
    from fedtune.aggregation import AggregationConfig

    c = AggregationConfig(lora_mode="hetero", client_ranks=[4, 8])
    assert c.client_ranks == (4, 8) and hash(c) == hash(AggregationConfig(lora_mode="hetero", client_ranks=(4, 8)))
    assert config.AdapterConfig(target_modules=["query"]).target_modules == ("query",)
    # settings whose default depends on another one are filled once the section is valid
    adam = AggregationConfig(server_optimizer="fedadam")
    assert (adam.server_lr, adam.beta_1, adam.proximal_mu) == (0.1, 0.9, None)
    assert AggregationConfig(secure="secagg+").num_shares == 3


SAMPLE_DP = {"privacy.mode": "sample", "privacy.target_epsilon": 8.0, "privacy.max_grad_norm": 1.0}


@pytest.mark.parametrize(
    "overrides, needle",
    [
        ({"zo.lr": 0.1}, "zo.lr: only used with train.mode = 'zo', which is 'backprop'; unset it (got 0.1)"),
        ({"zo.pro": True}, "zo.pro: only used with train.mode = 'zo', which is 'backprop'"),
        ({"train.momentum": 0.9}, "train.momentum: only used with train.optimizer = 'sgd', which is 'adamw'"),
        (
            {"adapter.method": "lora-sb", "adapter.sb_public_examples": 32},
            "adapter.sb_public_examples: only sb_factors = 'gradient' reads it, and sb_factors is 'random'",
        ),
        (
            {"train.lr_min_ratio": 0.5},
            "train.lr_min_ratio: only used with train.lr_schedule = 'cosine', which is 'constant'; unset it (got 0.5)",
        ),
        (
            {"aggregation.trim_beta": 0.3},
            "aggregation.trim_beta: only used with aggregation.robust = 'trimmed-mean', which is 'none'",
        ),
        ({"privacy.label_noise": 3.0}, "privacy.label_noise: only used with privacy.mode = 'sample', which is 'none'"),
        (
            {**SAMPLE_DP, "privacy.label_noise": 3.0},
            "privacy.label_noise: noises the label counts behind train.logit_adjustment, which is 0",
        ),
        (
            {"compression.codec": "int8", "compression.ratio": 0.5},
            "compression.ratio: read only by topk / randk codecs, and compression.codec = 'int8', "
            "compression.downlink = 'none' (got 0.5)",
        ),
    ],
)
def test_a_setting_the_run_would_not_read_is_refused(overrides, needle):
    got = problems(overrides)
    assert len(got) == 1 and got[0].startswith(needle), got


@pytest.mark.parametrize(
    "overrides",
    [
        {"train.optimizer": "sgd", "train.momentum": 0.9},
        {**ZO, "zo.lr": 0.1, "zo.pro": True},
        {"train.mode": "backprop", "zo.lr": 1e-6},  # a [zo] value equal to its default changes nothing
        {"train.lr_schedule": "cosine", "train.lr_min_ratio": 0.5},
        {"train.lr_schedule": "constant", "train.lr_min_ratio": 0.1},  # the default: as a saved config writes it
        {"aggregation.robust": "trimmed-mean", "aggregation.trim_beta": 0.3},
        {**SAMPLE_DP, "train.logit_adjustment": 1.0, "privacy.label_noise": 3.0},
    ],
)
def test_the_same_settings_where_they_are_read_are_accepted(overrides):
    config.load(None, overrides)
