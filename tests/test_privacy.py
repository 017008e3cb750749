"""Tests for fedtune.privacy: config, accountants (golden values from opacus),
clipping / noise properties, DP-SGD on tiny random peft models."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from opacus.accountants import RDPAccountant

from fedtune.adapters import freeze_
from fedtune.delta import global_norm
from fedtune.errors import ConfigError, FedtuneError, PayloadError
from fedtune.privacy import (
    DEFAULT_ALPHAS,
    ClientLevelAccountant,
    PrivacyConfig,
    RdpAccountant,
    add_gaussian_noise,
    calibrate_noise_multiplier,
    central_noise_std,
    check_budget_at_start,
    check_dp_compatible,
    clip_delta,
    empty_batch_step,
    local_epsilon,
    local_noise_std,
    make_private,
    next_round_within_budget,
    noisy_label_counts,
    private_mean,
)

torch.set_num_threads(1)
pytestmark = [
    pytest.mark.filterwarnings("ignore:Secure RNG turned off"),
    # opacus' backward hook on the first LoRA layer, whose input needs no grad: harmless
    pytest.mark.filterwarnings("ignore:Full backward hook is firing"),
]


def opacus_epsilon(z: float, q: float, steps: int, delta: float) -> float:
    acc = RDPAccountant()
    acc.history = [(z, q, steps)]
    return float(acc.get_epsilon(delta))


# ---------------------------------------------------------------- config


def test_config_modes_and_roundtrip():
    configs = [
        PrivacyConfig(),
        PrivacyConfig(mode="sample", noise_multiplier=1.0, max_grad_norm=1.0),
        PrivacyConfig(mode="sample", target_epsilon=8.0, max_grad_norm=0.5, delta=1e-6),
        PrivacyConfig(mode="client-central", noise_multiplier=1.0, clip_norm=0.1, epsilon_budget=5.0),
        PrivacyConfig(mode="client-local", noise_multiplier=0.0, clip_norm=1, budget_policy="stop"),
    ]
    for cfg in configs:
        assert PrivacyConfig.from_dict(cfg.to_dict()) == cfg
    assert not configs[0].enabled and configs[3].client_level and not configs[1].client_level


def test_config_rejects_unknown_keys():
    with pytest.raises(ConfigError, match="noise_multiplyer"):
        PrivacyConfig.from_dict({"mode": "sample", "noise_multiplyer": 1.0, "max_grad_norm": 1.0})


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"mode": "dp"}, "mode"),
        ({"mode": "sample", "noise_multiplier": -0.1, "max_grad_norm": 1.0}, "noise_multiplier"),
        ({"mode": "sample", "noise_multiplier": float("nan"), "max_grad_norm": 1.0}, "noise_multiplier"),
        ({"mode": "sample", "noise_multiplier": True, "max_grad_norm": 1.0}, "noise_multiplier"),
        ({"mode": "sample", "noise_multiplier": 1.0, "max_grad_norm": 1.0, "delta": 0.0}, "delta"),
        ({"mode": "sample", "noise_multiplier": 1.0, "max_grad_norm": 1.0, "delta": 1.0}, "delta"),
        ({"mode": "sample", "noise_multiplier": 1.0, "target_epsilon": 3.0, "max_grad_norm": 1.0}, "target_epsilon"),
        ({"mode": "sample", "max_grad_norm": 1.0}, "target_epsilon"),
        ({"mode": "sample", "target_epsilon": 0.0, "max_grad_norm": 1.0}, "target_epsilon"),
        ({"mode": "sample", "noise_multiplier": 1.0}, "max_grad_norm"),
        ({"mode": "sample", "noise_multiplier": 1.0, "max_grad_norm": 1.0, "clip_norm": 1.0}, "clip_norm"),
        ({"mode": "client-central", "noise_multiplier": 1.0}, "clip_norm"),
        ({"mode": "client-central", "clip_norm": 1.0}, "noise_multiplier"),
        ({"mode": "client-central", "noise_multiplier": 1.0, "clip_norm": 0.0}, "clip_norm"),
        ({"mode": "client-local", "noise_multiplier": 1.0, "clip_norm": 1.0, "target_epsilon": 2.0}, "target_epsilon"),
        ({"mode": "client-local", "noise_multiplier": 1.0, "clip_norm": 1.0, "epsilon_budget": -1.0}, "epsilon_budget"),
        ({"mode": "client-local", "noise_multiplier": 1.0, "clip_norm": 1.0, "budget_policy": "warn"}, "budget_policy"),
        ({"noise_multiplier": 1.0}, "noise_multiplier"),
    ],
)
def test_config_rejects_bad_values_naming_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        PrivacyConfig.from_dict(kwargs)


def test_config_reports_all_errors_at_once():
    with pytest.raises(ConfigError) as info:
        PrivacyConfig(mode="client-central", noise_multiplier=-1.0, clip_norm=-2.0, delta=2.0)
    assert all(f in str(info.value) for f in ("noise_multiplier", "clip_norm", "delta"))


# ---------------------------------------------------------------- accounting


def test_golden_epsilon_literal():
    # Computed once with opacus 1.6.0 RDPAccountant (default alphas).
    acc = RdpAccountant(delta=1e-5)
    acc.record(1.1, 0.01, 1000)
    assert acc.epsilon() == pytest.approx(1.7117700912203435, rel=1e-12)
    acc = RdpAccountant(delta=1e-5)
    acc.record(1.0, 0.1, 100)
    assert acc.epsilon() == pytest.approx(7.899255002434629, rel=1e-12)


@pytest.mark.parametrize(
    "z, q, steps, delta",
    [(1.1, 0.01, 1000, 1e-5), (0.8, 1.0, 10, 1e-5), (2.0, 0.05, 7, 1e-6)],
)
def test_accountants_match_opacus(z, q, steps, delta):
    expected = opacus_epsilon(z, q, steps, delta)
    client = ClientLevelAccountant(z, q, delta)
    client.step(steps)
    assert client.rounds == steps
    assert client.epsilon() == pytest.approx(expected, rel=1e-12)
    # step-by-step through opacus' own step() API
    ref = RDPAccountant()
    stepped = ClientLevelAccountant(z, q, delta)
    for _ in range(steps):
        ref.step(noise_multiplier=z, sample_rate=q)
        stepped.step()
    assert stepped.history == [(z, q, steps)]
    assert stepped.epsilon() == pytest.approx(ref.get_epsilon(delta), rel=1e-12)
    assert ClientLevelAccountant(z, q, delta).epsilon_after(steps) == pytest.approx(expected, rel=1e-12)


def test_default_alphas_are_opacus():
    assert list(DEFAULT_ALPHAS) == list(RDPAccountant.DEFAULT_ALPHAS)


@pytest.mark.parametrize("z, q, budget", [(1.0, 0.1, 4.0), (1.1, 0.01, 1.0), (0.7, 1.0, 20.0), (3.0, 0.02, 0.5)])
def test_max_rounds_within_is_consistent_with_epsilon(z, q, budget):
    acc = ClientLevelAccountant(z, q, 1e-5)
    n = acc.max_rounds_within(budget)
    assert n >= 1
    acc.step(n)
    assert acc.epsilon() <= budget
    acc.step(1)
    assert acc.epsilon() > budget


def test_max_rounds_within_zero_when_one_round_is_too_much():
    assert ClientLevelAccountant(0.0, 0.1, 1e-5).max_rounds_within(10.0) == 0
    assert ClientLevelAccountant(0.5, 1.0, 1e-5).max_rounds_within(1e-3) == 0


def test_budget_policies():
    cfg = PrivacyConfig(mode="client-central", noise_multiplier=1.1, clip_norm=1.0, epsilon_budget=1.0)
    acc = ClientLevelAccountant.from_config(cfg, sample_rate=0.01)
    n = acc.max_rounds_within(1.0)
    assert n > 1
    check_budget_at_start(cfg, acc, n)
    with pytest.raises(ConfigError, match="epsilon_budget"):
        check_budget_at_start(cfg, acc, n + 1)
    acc.step(n - 1)
    assert next_round_within_budget(cfg, acc)
    acc.step()
    assert not next_round_within_budget(cfg, acc)
    stop = PrivacyConfig(
        mode="client-central", noise_multiplier=1.1, clip_norm=1.0, epsilon_budget=1.0, budget_policy="stop"
    )
    check_budget_at_start(stop, acc, 10 * n)  # "stop" never refuses to start
    with pytest.raises(ConfigError, match="sample_rate"):
        ClientLevelAccountant.from_config(cfg)


def test_accountant_state_is_plain_flower_config_record_data():
    from flwr.app import ConfigRecord

    acc = ClientLevelAccountant(1.1, 0.01, 1e-5)
    acc.step(600)
    acc2 = ClientLevelAccountant(1.1, 0.01, 1e-5)
    acc2.load_state_dict(dict(ConfigRecord(acc.state_dict())))
    acc2.step(400)
    assert acc2.epsilon() == pytest.approx(1.7117700912203435, rel=1e-12)
    empty = RdpAccountant(1e-5)
    assert dict(ConfigRecord(empty.state_dict()))["steps"] == [] and empty.epsilon() == 0.0


@pytest.mark.parametrize(
    "state",
    [
        {"mechanism": "prv", "noise_multipliers": [], "sample_rates": [], "steps": []},
        {"mechanism": "rdp", "noise_multipliers": [1.0], "sample_rates": [], "steps": []},
        {"mechanism": "rdp", "noise_multipliers": [1.0], "sample_rates": [1.5], "steps": [3]},
        {"mechanism": "rdp", "noise_multipliers": [-1.0], "sample_rates": [0.1], "steps": [3]},
        {"mechanism": "rdp", "noise_multipliers": [1.0], "sample_rates": [0.1], "steps": [2.5]},
        {"mechanism": "rdp", "noise_multipliers": [1.0], "sample_rates": [0.1]},
    ],
)
def test_malformed_accountant_state_is_refused(state):
    with pytest.raises(FedtuneError, match="accountant state"):
        RdpAccountant(1e-5).load_state_dict(state)


def test_local_epsilon_matches_gaussian_rdp_by_hand():
    # Gaussian mechanism, sensitivity 2C, std z*C: RDP(alpha) = alpha / (2 (z/2)^2) per round;
    # conversion of Balle et al. 2020 (Thm. 21), minimised over opacus' orders.
    z, rounds, delta = 4.0, 20, 1e-5
    a = np.array(DEFAULT_ALPHAS)
    eps = rounds * a / (2 * (z / 2) ** 2) + np.log((a - 1) / a) - (np.log(delta) + np.log(a)) / (a - 1)
    assert local_epsilon(z, rounds, delta) == pytest.approx(float(eps.min()), rel=1e-12)
    assert local_epsilon(z, 0, delta) == 0.0
    cfg = PrivacyConfig(mode="client-local", noise_multiplier=z, clip_norm=1.0)
    acc = ClientLevelAccountant.from_config(cfg)
    acc.step(rounds)
    assert acc.epsilon() == pytest.approx(local_epsilon(z, rounds, delta), rel=1e-12)


# ---------------------------------------------------------------- clipping and noise


@st.composite
def deltas(draw):
    n = draw(st.integers(1, 4))
    scale = draw(st.floats(1e-4, 1e4))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    shapes = [tuple(draw(st.lists(st.integers(1, 5), min_size=0, max_size=3))) for _ in range(n)]
    return {f"layer{i}.weight": scale * torch.randn(s, generator=g) for i, s in enumerate(shapes)}


@settings(max_examples=100, deadline=None)
@given(delta=deltas(), clip_norm=st.floats(1e-3, 1e3))
def test_clipped_norm_never_exceeds_bound(delta, clip_norm):
    clipped, norm = clip_delta(delta, clip_norm)
    assert norm == pytest.approx(global_norm(delta))
    assert global_norm(clipped) <= clip_norm
    assert clipped.keys() == delta.keys()
    assert all(clipped[k].dtype == delta[k].dtype and clipped[k].shape == delta[k].shape for k in delta)
    if norm <= clip_norm:
        assert all(torch.equal(clipped[k], delta[k]) for k in delta)
    else:
        assert global_norm(clipped) == pytest.approx(clip_norm, rel=1e-5)
        # clipping only rescales: direction preserved
        k = next(iter(delta))
        assert torch.allclose(clipped[k] * (norm / global_norm(clipped)), delta[k], rtol=1e-4, atol=1e-6 * norm)


def test_clip_refuses_non_finite_delta():
    with pytest.raises(PayloadError, match="non-finite"):
        clip_delta({"a": torch.tensor([1.0, float("nan")])}, 1.0)
    with pytest.raises(ConfigError, match="clip_norm"):
        clip_delta({"a": torch.ones(2)}, 0.0)


def test_clip_low_precision_stays_within_bound():
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float16, torch.bfloat16):
        delta = {"a": (10 * torch.randn(1000, generator=g)).to(dtype), "b": torch.randn(7, generator=g).to(dtype)}
        clipped, _ = clip_delta(delta, 0.3)
        assert global_norm(clipped) <= 0.3 and clipped["a"].dtype == dtype


@pytest.mark.parametrize("z, c, m", [(1.0, 1.0, 10), (1.1, 0.5, 3), (0.0, 2.0, 1), (4.0, 0.01, 100)])
def test_central_std_equals_flower_compute_stdv(z, c, m):
    from flwr.supercore.differential_privacy import compute_stdv

    assert central_noise_std(z, c, m) == compute_stdv(z, c, m)
    assert local_noise_std(z, c) == pytest.approx(compute_stdv(z, c, 1))


def test_noise_has_the_mechanism_std():
    std = central_noise_std(1.1, 0.5, 4)
    zeros = {"a": torch.zeros(300, 300), "b": torch.zeros(20_000)}
    noisy = add_gaussian_noise(zeros, std, torch.Generator().manual_seed(0))
    flat = torch.cat([noisy["a"].flatten(), noisy["b"]]).double()
    # 110k draws: relative standard error of the sample std is ~0.2%
    assert flat.std().item() == pytest.approx(std, rel=0.01)
    assert abs(flat.mean().item()) < 5 * std / math.sqrt(flat.numel())


def test_same_seed_same_noise_regardless_of_key_order():
    delta = {"b": torch.ones(3, 4), "a": torch.zeros(5)}
    n1 = add_gaussian_noise(delta, 0.7, torch.Generator().manual_seed(42))
    n2 = add_gaussian_noise(dict(reversed(list(delta.items()))), 0.7, torch.Generator().manual_seed(42))
    n3 = add_gaussian_noise(delta, 0.7, torch.Generator().manual_seed(43))
    assert list(n1) == ["b", "a"]
    assert all(torch.equal(n1[k], n2[k]) for k in delta)
    assert not torch.equal(n1["a"], n3["a"])
    assert torch.equal(add_gaussian_noise(delta, 0.0, torch.Generator())["b"], delta["b"])
    half = add_gaussian_noise({"h": torch.zeros(4, dtype=torch.bfloat16)}, 1.0, torch.Generator().manual_seed(0))
    assert half["h"].dtype == torch.bfloat16
    with pytest.raises(ConfigError, match="std"):
        add_gaussian_noise(delta, -1.0, torch.Generator())


def test_private_mean_is_clipped_fixed_denominator_mean_plus_central_noise():
    g = torch.Generator().manual_seed(1)
    ds = [{"w": torch.randn(50_000, generator=g) * s} for s in (0.001, 1.0, 3.0)]
    clean = private_mean(ds, clip_norm=1.0, noise_multiplier=0.0, num_sampled_clients=4, generator=torch.Generator())
    expected = sum(clip_delta(d, 1.0)[0]["w"] for d in ds) / 4  # fixed denominator m=4, one reply missing
    assert torch.allclose(clean["w"], expected, atol=1e-6)
    noisy = private_mean(
        ds, clip_norm=1.0, noise_multiplier=2.0, num_sampled_clients=4, generator=torch.Generator().manual_seed(0)
    )
    assert (noisy["w"] - clean["w"]).std().item() == pytest.approx(central_noise_std(2.0, 1.0, 4), rel=0.02)


# ---------------------------------------------------------------- sample-level DP-SGD on tiny peft models


def _tiny_bert():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=1000,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=2,
    )
    return BertForSequenceClassification(cfg)


def _peft(kind: str):
    from peft import LoraConfig, PromptTuningConfig, TaskType, get_peft_model

    if kind == "prompt":
        config = PromptTuningConfig(task_type=TaskType.SEQ_CLS, num_virtual_tokens=4)
    else:
        config = LoraConfig(
            r=4,
            lora_alpha=8,
            lora_dropout=0.0,
            target_modules=["query", "value"],
            modules_to_save=["classifier"],
            use_dora=(kind == "dora"),
        )
    model = get_peft_model(_tiny_bert(), config)
    if kind != "prompt":  # peft zero-inits B; make it non-zero so A gets a gradient too
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
    return model


def _loader(n: int = 32, batch_size: int = 8):
    from torch.utils.data import DataLoader, TensorDataset

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 1000, (n, 8), generator=g)
    return DataLoader(
        TensorDataset(ids, torch.ones_like(ids), torch.randint(0, 2, (n,), generator=g)), batch_size=batch_size
    )


def _train(pt, batches: int = 4) -> int:
    steps = 0
    for ids, mask, y in pt.data_loader:
        if len(y) == 0:
            empty_batch_step(pt.optimizer)
        else:
            pt.model(input_ids=ids, attention_mask=mask, labels=y).loss.backward()
            pt.optimizer.step()
        pt.optimizer.zero_grad()
        steps += 1
        if steps == batches:
            break
    return steps


def _sgd(model):
    return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)


SAMPLE = PrivacyConfig(mode="sample", noise_multiplier=1.0, max_grad_norm=1.0)


def test_dora_with_sample_dp_is_refused():
    with pytest.raises(ConfigError, match="DoRA"):
        check_dp_compatible("sample", use_dora=True)
    for mode in ("none", "client-central", "client-local"):
        check_dp_compatible(mode, use_dora=True)
    check_dp_compatible("sample", use_dora=False)
    model = _peft("dora")
    with pytest.raises(ConfigError, match="use_dora"):
        make_private(model, _sgd(model), _loader(), SAMPLE, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("kind", ["lora", "prompt"])
def test_opacus_per_sample_grads_match_per_example_autograd(kind):
    model = _peft(kind)
    ids, mask, y = next(iter(_loader(n=3, batch_size=3)))
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    reference = []
    for i in range(3):
        model.zero_grad()
        model(input_ids=ids[i : i + 1], attention_mask=mask[i : i + 1], labels=y[i : i + 1]).loss.backward()
        reference.append({n: p.grad.clone() for n, p in trainable.items()})
    model.zero_grad()
    pt = make_private(model, _sgd(model), _loader(), SAMPLE, generator=torch.Generator().manual_seed(0))
    pt.model(input_ids=ids, attention_mask=mask, labels=y).loss.backward()
    assert any("classifier" in n for n in trainable)  # the modules_to_save head gets per-example grads too
    for n, p in trainable.items():
        assert p.grad_sample.shape == (3, *p.shape), n
        for i in range(3):
            assert torch.allclose(p.grad_sample[i], reference[i][n], atol=1e-5, rtol=1e-4), (n, i)
    pt.close()
    assert "get_prompt" not in vars(model)


def test_dp_sgd_lora_steps_and_epsilon_equals_opacus_across_rounds():
    model = _peft("lora")
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trained_before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    gen = torch.Generator().manual_seed(0)
    pt = make_private(model, _sgd(model), _loader(), SAMPLE, generator=gen)
    assert pt.sample_rate == 0.25 and pt.noise_multiplier == 1.0
    steps1 = _train(pt, batches=3)
    assert pt.accountant.epsilon() == pytest.approx(opacus_epsilon(1.0, 0.25, steps1, 1e-5), rel=1e-12)
    state = pt.accountant.state_dict()
    pt.close()
    # next round: a fresh make_private on the same model, carrying the spent budget
    pt = make_private(model, _sgd(model), _loader(), SAMPLE, generator=gen, accountant_state=state)
    steps2 = _train(pt, batches=2)
    assert pt.accountant.history == [(1.0, 0.25, steps1 + steps2)]
    assert pt.accountant.epsilon() == pytest.approx(opacus_epsilon(1.0, 0.25, steps1 + steps2, 1e-5), rel=1e-12)
    pt.close()
    for n, p in model.named_parameters():
        if n in base_before:
            assert torch.equal(p, base_before[n]), n
        else:
            assert not torch.equal(p, trained_before[n]), n


def test_dp_sgd_prompt_tuning_and_functorch_mode_step():
    for kind, mode in (("prompt", "hooks"), ("lora", "functorch")):
        model = _peft(kind)
        before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        gen = torch.Generator().manual_seed(0)
        pt = make_private(model, _sgd(model), _loader(), SAMPLE, generator=gen, grad_sample_mode=mode)
        steps = _train(pt, batches=2)
        assert pt.accountant.steps == steps
        assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters() if p.requires_grad)
        pt.close()


def test_dp_sgd_is_reproducible_from_the_seed():
    results = []
    for _ in range(2):
        model = _peft("lora")
        pt = make_private(model, _sgd(model), _loader(), SAMPLE, generator=torch.Generator().manual_seed(7))
        _train(pt, batches=2)
        pt.close()
        results.append({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
    assert all(torch.equal(results[0][n], results[1][n]) for n in results[0])


def test_target_epsilon_calibrates_noise_for_the_whole_run():
    cfg = PrivacyConfig(mode="sample", target_epsilon=3.0, max_grad_norm=1.0)
    model = _peft("lora")
    with pytest.raises(ConfigError, match="total_steps"):
        make_private(model, _sgd(model), _loader(), cfg, generator=torch.Generator())
    pt = make_private(model, _sgd(model), _loader(), cfg, generator=torch.Generator().manual_seed(0), total_steps=40)
    planned = opacus_epsilon(pt.noise_multiplier, pt.sample_rate, 40, cfg.delta)
    assert 3.0 - 0.01 <= planned <= 3.0
    assert pt.accountant.epsilon_after(pt.noise_multiplier, pt.sample_rate, 40) == pytest.approx(planned, rel=1e-12)
    pt.close()


def test_empty_poisson_batch_takes_a_noise_only_step():
    model = _peft("lora")
    pt = make_private(model, _sgd(model), _loader(), SAMPLE, generator=torch.Generator().manual_seed(0))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    empty_batch_step(pt.optimizer)
    assert pt.accountant.steps == 1
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters() if p.requires_grad)
    pt.close()


def test_ffa_lora_dp_sgd_trains_only_B_and_head():
    model = _peft("lora")
    freeze_(model, ".lora_A.")  # as adapters.wrap does for adapter.ffa
    assert any("lora_A" in n for n, p in model.named_parameters() if not p.requires_grad)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_B" in n or "classifier" in n for n in trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    pt = make_private(model, _sgd(model), _loader(), SAMPLE, generator=torch.Generator().manual_seed(0))
    _train(pt, batches=2)
    pt.close()
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) == (n not in trainable), n


@pytest.mark.parametrize("q,steps,target", [(0.01, 1000, 3.0), (0.1, 120, 8.0), (0.5, 10, 1.0)])
def test_calibration_matches_opacus_and_covers_other_releases(q, steps, target):
    from opacus.accountants.utils import get_noise_multiplier

    z = calibrate_noise_multiplier(target, sample_rate=q, steps=steps, delta=1e-5)
    z_opacus = get_noise_multiplier(
        target_epsilon=target, target_delta=1e-5, sample_rate=q, steps=steps, accountant="rdp"
    )
    assert z == pytest.approx(z_opacus, rel=0.02)
    assert target - 0.01 <= opacus_epsilon(z, q, steps, 1e-5) <= target
    # a Gaussian release on the same data (the noisy label counts) must fit in the same target
    released = [(10.0, 1.0, 1)]
    z2 = calibrate_noise_multiplier(target, sample_rate=q, steps=steps, delta=1e-5, released=released)
    assert z2 > z
    acc = RDPAccountant()
    acc.history = released + [(z2, q, steps)]
    assert target - 0.01 <= acc.get_epsilon(1e-5) <= target
    with pytest.raises(ConfigError, match="already spend"):
        calibrate_noise_multiplier(target, sample_rate=q, steps=steps, delta=1e-5, released=[(0.1, 1.0, 1)])


def test_noisy_label_counts_are_the_gaussian_mechanism():
    labels = [0] * 30 + [1] * 70
    draws = np.array([noisy_label_counts(labels, 3, 10.0, torch.Generator().manual_seed(s)) for s in range(4000)])
    unclipped = draws[:, :2]  # counts 30 and 70 are 3 and 7 std from 0: clipping never bites
    assert np.allclose(unclipped.mean(0), [30, 70], atol=1.0)
    assert np.allclose(unclipped.std(0), 10.0, rtol=0.05)
    assert (draws[:, 2] >= 0).all() and (draws[:, 2] == 0).mean() == pytest.approx(0.5, abs=0.05)
    assert noisy_label_counts(labels, 2, 10.0, torch.Generator().manual_seed(1)) == noisy_label_counts(
        labels, 2, 10.0, torch.Generator().manual_seed(1)
    )


# ---------------------------------------------------------------- logical batches in physical pieces


def _examples(n: int, seed: int = 0) -> list[dict]:
    """Tokenized classification examples of varied lengths (as `fedtune.data.tokenize` gives them)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 10, (n,), generator=g).tolist()
    return [
        {"input_ids": torch.randint(1, 1000, (k,), generator=g).tolist(), "label": int(i % 2)}
        for i, k in enumerate(lengths)
    ]


def _rows_seen(model) -> list[int]:
    """The batch size of every forward pass of ``model`` from now on."""
    rows: list[int] = []
    model.register_forward_pre_hook(lambda m, args, kwargs: rows.append(kwargs["input_ids"].shape[0]), with_kwargs=True)
    return rows


def _dp_round(physical: int, noise: float, *, n: int = 64, logical: int = 16, steps: int = 4):
    """One client round of DP-SGD as the client runs it (`fedtune.train.train_local` over opacus' Poisson loader)."""
    from functools import partial

    from torch.utils.data import DataLoader

    from fedtune.config import CLASSIFICATION, TrainConfig
    from fedtune.data import collate
    from fedtune.train import make_optimizer, train_local

    model = _peft("lora")
    rows = _rows_seen(model)
    data = _examples(n)
    loader = DataLoader(data, batch_size=logical, collate_fn=partial(collate, pad_id=0, task=CLASSIFICATION))
    cfg = TrainConfig(batch_size=logical, physical_batch_size=physical, local_steps=steps, optimizer="sgd", lr=0.5)
    gen = torch.Generator().manual_seed(3)
    pt = make_private(
        model,
        make_optimizer(model, cfg),
        loader,
        PrivacyConfig(mode="sample", noise_multiplier=noise, max_grad_norm=0.1),
        generator=gen,
    )

    def cycle():
        while True:
            yield from pt.data_loader

    metrics = train_local(
        pt.model,
        data,
        cfg,
        task=CLASSIFICATION,
        pad_id=0,
        device=torch.device("cpu"),
        generator=gen,
        optimizer=pt.optimizer,
        batches=cycle(),
        clip=False,
    )
    pt.close()
    trained = {k: p.detach().clone() for k, p in model.named_parameters() if p.requires_grad}
    return trained, pt, metrics, rows


def test_physical_batches_bound_memory_and_keep_the_logical_batch_accounting():
    trained, pt, metrics, rows = _dp_round(physical=4, noise=1.0)
    assert rows and max(rows) <= 4 and sum(rows) == metrics["examples_seen"] > 16  # Poisson batches of about 16
    assert pt.sample_rate == 16 / 64 and pt.accountant.history == [(1.0, 16 / 64, 4)]  # one step per logical batch
    assert pt.accountant.epsilon() == pytest.approx(opacus_epsilon(1.0, 16 / 64, 4, 1e-5), rel=1e-12)
    assert pt.optimizer.expected_batch_size == 16  # the noised sum is divided by the logical batch


def test_physical_batches_without_noise_give_the_logical_batch_update():
    pieces, _, m4, rows4 = _dp_round(physical=4, noise=0.0)
    whole, _, m16, rows16 = _dp_round(physical=0, noise=0.0)
    assert max(rows4) <= 4 < max(rows16) and sum(rows4) == sum(rows16)  # the same Poisson batches
    assert m4["train_loss"] == pytest.approx(m16["train_loss"], rel=1e-5)
    start = {k: p.detach() for k, p in _peft("lora").named_parameters() if p.requires_grad}
    assert any(not torch.equal(whole[k], start[k]) for k in whole)
    for k in whole:
        torch.testing.assert_close(pieces[k], whole[k], rtol=1e-5, atol=1e-6)


def test_physical_batches_without_dp_accumulate_the_same_gradient():
    from fedtune.config import CLASSIFICATION, TrainConfig
    from fedtune.train import train_local

    out = []
    for physical in (0, 3):
        model = _peft("lora")
        rows = _rows_seen(model)
        cfg = TrainConfig(
            batch_size=8, physical_batch_size=physical, local_steps=3, optimizer="adamw", lr=1e-2, max_grad_norm=1.0
        )
        train_local(
            model,
            _examples(40),
            cfg,
            task=CLASSIFICATION,
            pad_id=0,
            device=torch.device("cpu"),
            generator=torch.Generator().manual_seed(0),
        )
        assert max(rows) == (8 if physical == 0 else 3)
        out.append({k: p.detach().clone() for k, p in model.named_parameters() if p.requires_grad})
    for k in out[0]:
        torch.testing.assert_close(out[1][k], out[0][k], rtol=1e-5, atol=1e-6)


def test_client_reports_the_logical_batch_epsilon(tiny_cfg):
    """Through the client handler: the reported epsilon is opacus' for (z, q = logical batch / examples, local steps)."""
    from flwr.app import ConfigRecord, Message, MessageType, RecordDict

    from fedtune import workspace
    from fedtune.flower.client import handle_train
    from fedtune.flower.local import LocalGrid
    from fedtune.flower.records import to_arrayrecord

    cfg = tiny_cfg.replace(
        **{
            "privacy.mode": "sample",
            "privacy.noise_multiplier": 0.8,
            "privacy.max_grad_norm": 1.0,
            "train.batch_size": 16,
            "train.physical_batch_size": 4,
            "train.local_steps": 5,
        }
    )
    ws = workspace.get(cfg)
    grid = LocalGrid(cfg.federation.num_clients, lambda m, c: handle_train(m, c, cfg))
    msg = Message(
        RecordDict({"arrays": to_arrayrecord(ws.initial_state()), "config": ConfigRecord({"server-round": 1})}),
        dst_node_id=grid.node_ids[0],
        message_type=MessageType.TRAIN,
    )
    reply = grid.send_and_receive([msg])[0]
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    m = reply.content["metrics"]
    n = len(ws.client_data(int(m["partition-id"])))
    q = 1 / math.ceil(n / 16)  # opacus' rate for a loader of batch 16 over n examples: 16 / n when 16 divides n
    assert m["dp-sample-rate"] == pytest.approx(q, rel=1e-12) and m["steps"] == 5
    assert m["dp-epsilon"] == pytest.approx(opacus_epsilon(0.8, q, 5, cfg.privacy.delta), rel=1e-9)
