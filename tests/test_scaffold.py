"""SCAFFOLD (``aggregation.server_optimizer = "scaffold"``, Karimireddy et al. 2020, arXiv:1910.06378):
the client correction and c_i update against hand computations under SGD, the server c update against
numpy, end-to-end runs (bytes, c, x, the stored c_i), resume, refusals."""

import json

import numpy as np
import pytest
import torch
from flwr.app import Context, RecordDict
from safetensors.torch import load_file

from fedtune import config
from fedtune.aggregation.scaffold import (
    LocalCorrection,
    client_control_update,
    correction,
    server_control_update,
    zeros_like,
)
from fedtune.errors import ConfigError
from fedtune.flower import client as client_mod
from fedtune.flower import protocol as P
from fedtune.flower.local import LocalGrid
from fedtune.flower.records import from_arrayrecord, pack, wire_bytes
from fedtune.flower.server import SCAFFOLD_FILE, ServerLoop
from tests.conftest import metrics_rows, run_capturing_updates
from tests.test_resume import Crash, CrashingGrid

SCAFFOLD = {"aggregation.server_optimizer": "scaffold"}


# --- client half: hand computation under plain SGD ------------------------------------------------


def _sgd_round(x, target, c, c_i, lrs):
    """K SGD steps on 0.5 ||w - target||^2 (w = params "a"; "b" gets no gradient) with the correction hook."""
    params = {k: torch.nn.Parameter(v.clone()) for k, v in x.items()}
    opt = torch.optim.SGD(list(params.values()), lr=lrs[0])
    hook = LocalCorrection(params, correction(c, c_i))
    for lr in lrs:
        for g in opt.param_groups:
            g["lr"] = lr
        opt.zero_grad(set_to_none=True)
        (0.5 * (params["a"] - target).square().sum()).backward()
        hook(opt)
        opt.step()
    return {k: p.detach() for k, p in params.items()}, hook


def test_correction_and_c_i_update_match_a_hand_computation_under_sgd():
    # a: grad g = w - 3, from 0 with c - c_i = 0.5 - (-0.5) = 1, lr 0.1:
    #   y1 = 0 - 0.1 (-3 + 1) = 0.2;  y2 = 0.2 - 0.1 (-2.8 + 1) = 0.38;  y3 = 0.38 - 0.1 (-2.62 + 1) = 0.542
    # c_i+ = c_i - c + (x - y) / (K lr) = -1 - 0.542 / 0.3 = -2.806667, the mean of the gradients (-3, -2.8, -2.62)
    # b: no gradient, c - c_i = -2: y = 0 - 3 * 0.1 * (-2) = 0.6, c_i+ = 1 - (-1) - 0.6 / 0.3 = 0 (its mean gradient)
    x = {"a": torch.zeros(1), "b": torch.zeros(2)}
    c = {"a": torch.tensor([0.5]), "b": torch.tensor([-1.0, -1.0])}
    c_i = {"a": torch.tensor([-0.5]), "b": torch.tensor([1.0, 1.0])}
    y, hook = _sgd_round(x, torch.tensor([3.0]), c, c_i, [0.1, 0.1, 0.1])
    torch.testing.assert_close(y["a"], torch.tensor([0.542]))
    torch.testing.assert_close(y["b"], torch.tensor([0.6, 0.6]))
    assert hook.steps == 3 and hook.lr_sum == pytest.approx(0.3)
    new, delta_c = client_control_update(c_i, hook.mean_gradient())
    torch.testing.assert_close(new["a"], torch.tensor([-8.42 / 3]))
    # option II as the paper writes it, from the drift: the same c_i+
    for k in x:
        torch.testing.assert_close(new[k], c_i[k] - c[k] + (x[k] - y[k]) / 0.3)
    torch.testing.assert_close(new["b"], torch.zeros(2))
    torch.testing.assert_close(delta_c["a"], torch.tensor([-8.42 / 3 + 0.5]))
    torch.testing.assert_close(delta_c["b"], torch.tensor([-1.0, -1.0]))


def test_a_per_step_lr_schedule_uses_the_sum_of_the_lrs():
    """With lrs l_k, SGD gives (x - y) / sum l = sum l_k (g_k + c - c_i) / sum l, so c_i+ is the
    lr-weighted mean of the gradients."""
    x, target = {"a": torch.tensor([1.0, -2.0])}, torch.tensor([3.0, 0.5])
    c, c_i = {"a": torch.tensor([0.2, -0.1])}, {"a": torch.tensor([-0.3, 0.4])}
    lrs = [0.1, 0.25, 0.05, 0.2]
    y, hook = _sgd_round(x, target, c, c_i, lrs)
    w, grads = x["a"].clone(), []
    for lr in lrs:  # the same steps by hand
        g = w - target
        grads.append(g)
        w = w - lr * (g + c["a"] - c_i["a"])
    torch.testing.assert_close(y["a"], w)
    assert hook.lr_sum == pytest.approx(sum(lrs))
    new, _ = client_control_update(c_i, hook.mean_gradient())
    torch.testing.assert_close(new["a"], sum(lr * g for lr, g in zip(lrs, grads)) / sum(lrs))
    torch.testing.assert_close(new["a"], c_i["a"] - c["a"] + (x["a"] - y["a"]) / sum(lrs))  # option II


def test_under_adamw_c_i_is_the_mean_gradient_not_the_drift_per_unit_lr():
    """AdamW's steps are about lr per coordinate whatever the gradient's size, so on a linear loss with
    gradient g ~ 1e-3 the drift per unit of lr is about 1: c_i+ must be g, the gradients' mean."""
    g = torch.tensor([2e-3, -1e-3])
    zero = {"a": torch.zeros(2)}
    params = {"a": torch.nn.Parameter(torch.zeros(2))}
    opt = torch.optim.AdamW(list(params.values()), lr=1e-2, weight_decay=0.0)
    hook = LocalCorrection(params, correction(zero, zero))
    for _ in range(4):
        opt.zero_grad(set_to_none=True)
        (g * params["a"]).sum().backward()
        hook(opt)
        opt.step()
    new, _ = client_control_update(zero, hook.mean_gradient())
    torch.testing.assert_close(new["a"], g)
    drift = -params["a"].detach() / hook.lr_sum  # what option II's formula (x - y) / sum lr would store
    assert drift.abs().min() > 0.9


def test_client_update_refuses_no_steps_and_other_keys():
    z = {"a": torch.zeros(2)}
    with pytest.raises(ValueError, match="at least one local step"):
        LocalCorrection({"a": torch.nn.Parameter(torch.zeros(2))}, z).mean_gradient()
    with pytest.raises(KeyError, match="mean gradient keys differ"):
        client_control_update(z, {"b": torch.zeros(2)})


# --- server half: numpy ---------------------------------------------------------------------------


def test_server_c_update_matches_numpy():
    rng = np.random.default_rng(0)
    c = {"a": rng.normal(size=(3, 2)).astype(np.float32), "b": rng.normal(size=4).astype(np.float32)}
    deltas = [{k: rng.normal(size=v.shape).astype(np.float32) for k, v in c.items()} for _ in range(3)]
    n = 10
    got = server_control_update(
        {k: torch.from_numpy(v) for k, v in c.items()},
        [{k: torch.from_numpy(v) for k, v in d.items()} for d in deltas],
        n,
    )
    for k in c:  # c + |S| / N * mean(delta_c_i)
        want = c[k] + len(deltas) / n * np.mean([d[k] for d in deltas], axis=0)
        np.testing.assert_allclose(got[k].numpy(), want, rtol=1e-6, atol=1e-6)
    same = server_control_update({k: torch.from_numpy(v) for k, v in c.items()}, [], n)
    assert all(torch.equal(same[k], torch.from_numpy(c[k])) for k in c)


# --- end to end on the tiny config ----------------------------------------------------------------


def _recording_client(monkeypatch):
    """Patch the ClientApp's handler so every call is recorded: (round, node) -> (request, c_i before it,
    (update, delta_c_i) sent); the server later swaps a reply's content for the decoded arrays."""
    calls = {}
    real = client_mod.handle_train

    def handle(msg, ctx, cfg):
        before = from_arrayrecord(ctx.state[P.SCAFFOLD_CI]) if P.SCAFFOLD_CI in ctx.state else None
        reply = real(msg, ctx, cfg)
        sent = (from_arrayrecord(reply.content[P.UPDATE]), from_arrayrecord(reply.content[P.SCAFFOLD_DELTA_C]))
        calls[(int(msg.content[P.CONFIG]["server-round"]), ctx.node_id)] = (msg, before, sent)
        return reply

    monkeypatch.setattr(client_mod, "handle_train", handle)
    return calls, real


def test_end_to_end_bytes_double_and_c_is_the_mean_of_the_clients_delta_c(tiny_cfg, tmp_path, monkeypatch):
    cfg = tiny_cfg.replace(**{"federation.rounds": 2, **SCAFFOLD})
    plain = tiny_cfg.replace(**{"federation.rounds": 2})
    run_capturing_updates(plain, tmp_path / "fedavg")
    calls, _ = _recording_client(monkeypatch)
    loop, _ = run_capturing_updates(cfg, tmp_path / "scaffold")
    rows, base = metrics_rows(tmp_path / "scaffold"), metrics_rows(tmp_path / "fedavg")
    c_bytes = wire_bytes(RecordDict({P.SCAFFOLD_C: pack(loop.protocol.control)}))
    dc_bytes = wire_bytes(RecordDict({P.SCAFFOLD_DELTA_C: pack(loop.protocol.control)}))
    for r, b in zip(rows[1:], base[1:]):
        assert r["accepted"] == b["accepted"] == 4 and not r["rejected"]
        # exactly one more record of the adapter's size each way, per client
        assert r["bytes_down"] == b["bytes_down"] + 4 * c_bytes
        assert r["bytes_up"] == b["bytes_up"] + 4 * dc_bytes
        assert 1.95 < r["bytes_down"] / b["bytes_down"] < 2.05 and 1.95 < r["bytes_up"] / b["bytes_up"] < 2.05
    # c after round r = sum over rounds and clients of delta_c_i / N (every client every round here)
    n = cfg.federation.num_clients
    c = None
    for rnd in (1, 2):
        sent_c = from_arrayrecord(next(m for (r, _), (m, _, _) in calls.items() if r == rnd).content[P.SCAFFOLD_C])
        if c is None:
            assert all(torch.count_nonzero(v) == 0 for v in sent_c.values())  # zeros at the start
        else:
            for k in c:
                torch.testing.assert_close(sent_c[k], c[k], rtol=0, atol=0)
        dcs = [dc for (r, _), (_, _, (_, dc)) in calls.items() if r == rnd]
        mean = {k: torch.stack([d[k] for d in dcs]).mean(0) for k in dcs[0]}
        c = {k: (c[k] if c is not None else 0) + len(dcs) / n * mean[k] for k in mean}
    assert any(float(v.abs().max()) > 0 for v in c.values())
    for k in c:
        torch.testing.assert_close(loop.protocol.control[k], c[k], rtol=1e-5, atol=1e-6)
    summary = json.loads((tmp_path / "scaffold" / "summary.json").read_text())
    assert summary["aggregation"]["strategy"].startswith("SCAFFOLD")


def test_server_lr_scales_the_weighted_mean_update(tiny_cfg, tmp_path):
    from fedtune import workspace

    cfg = tiny_cfg.replace(**{"federation.rounds": 1, "aggregation.server_lr": 0.5, **SCAFFOLD})
    loop, sent = run_capturing_updates(cfg, tmp_path)
    x0 = workspace.get(cfg).initial_state()
    total = sum(n for _, n in sent.values())
    for k in loop.protocol.keys:  # x1 = x0 + eta_g * sum n_i u_i / sum n_i
        mean = sum(u[k] * n for u, n in sent.values()) / total
        torch.testing.assert_close(loop.protocol.state[k], x0[k] + 0.5 * mean, rtol=1e-5, atol=1e-6)


def test_a_client_trains_its_second_round_with_its_stored_c_i(tiny_cfg, tmp_path, monkeypatch):
    cfg = tiny_cfg.replace(**{"federation.rounds": 3, "federation.fraction_train": 0.5, **SCAFFOLD})
    calls, real = _recording_client(monkeypatch)
    run_capturing_updates(cfg, tmp_path)
    by_node = {}
    for (rnd, node), call in sorted(calls.items()):
        by_node.setdefault(node, []).append((rnd, call))
    node, ((_, first), (_, (msg2, before2, (sent2, _)))) = next((n, v[:2]) for n, v in by_node.items() if len(v) >= 2)
    assert first[1] is None  # zeros at the first participation
    stored = first[2][1]  # c_i = 0 + delta_c_i of its first round
    for k in stored:
        torch.testing.assert_close(before2[k], stored[k], rtol=0, atol=0)

    def retrain(state):  # LocalGrid's node 1000 + i holds partition i
        ctx = Context(1, node, {"partition-id": node - 1000, "num-partitions": 4}, state, {})
        return from_arrayrecord(real(msg2, ctx, cfg).content[P.UPDATE])

    again = retrain(RecordDict({P.SCAFFOLD_CI: pack(stored)}))
    fresh = retrain(RecordDict())
    assert all(torch.equal(again[k], sent2[k]) for k in sent2)  # the stored c_i reproduces its update
    assert any(not torch.equal(fresh[k], sent2[k]) for k in sent2)  # c_i = 0 would have trained otherwise


def test_resume_keeps_c_and_matches_an_uninterrupted_run(tiny_cfg, tmp_path):
    """The server crashes before round 3; the clients (SuperNodes) keep their c_i, the server reloads c."""
    cfg = tiny_cfg.replace(**{"federation.rounds": 3, "federation.fraction_train": 0.5, **SCAFFOLD})
    fn = lambda m, c: client_mod.handle_train(m, c, cfg)  # noqa: E731
    n = cfg.federation.num_clients
    whole = ServerLoop(cfg, tmp_path / "whole", progress=lambda s: None).main(LocalGrid(n, fn))

    out = tmp_path / "broken"
    crashed = CrashingGrid(n, fn, crash_round=3)
    with pytest.raises(Crash):
        ServerLoop(cfg, out, progress=lambda s: None).main(crashed)
    saved = load_file(str(out / "checkpoint" / SCAFFOLD_FILE))
    assert any(float(v.abs().max()) > 0 for v in saved.values())
    grid = LocalGrid(n, fn)
    grid.contexts = crashed.contexts  # the same nodes, holding their c_i
    loop = ServerLoop(cfg, out, progress=lambda s: None, resume=True)
    resumed = loop.main(grid)

    assert [r["round"] for r in metrics_rows(out)] == [0, 1, 2, 3]
    assert resumed["final"] == whole["final"] and resumed["total_bytes_up"] == whole["total_bytes_up"]
    # equal up to float rounding (c holds gradients down to 1e-10; the summed round order differs)
    for name in (f"checkpoint/{SCAFFOLD_FILE}", "adapter/adapter_model.safetensors"):
        a, b = (load_file(str(d / name)) for d in (tmp_path / "whole", out))
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-10)


def test_resume_refuses_a_checkpoint_without_c(tiny_cfg, tmp_path):
    from fedtune.errors import FedtuneError

    cfg = tiny_cfg.replace(**{"federation.rounds": 2, **SCAFFOLD})
    fn = lambda m, c: client_mod.handle_train(m, c, cfg)  # noqa: E731
    with pytest.raises(Crash):
        ServerLoop(cfg, tmp_path, progress=lambda s: None).main(CrashingGrid(4, fn, crash_round=2))
    (tmp_path / "checkpoint" / SCAFFOLD_FILE).unlink()
    with pytest.raises(FedtuneError, match="no SCAFFOLD control variate"):
        ServerLoop(cfg, tmp_path, progress=lambda s: None, resume=True).main(LocalGrid(4, fn))


def test_a_reply_without_delta_c_is_rejected_not_a_crash(tiny_cfg, tmp_path):
    cfg = tiny_cfg.replace(**{"federation.rounds": 1, **SCAFFOLD})

    def fn(m, c):
        reply = client_mod.handle_train(m, c, cfg)
        if c.node_config["partition-id"] == 0:
            del reply.content[P.SCAFFOLD_DELTA_C]
        return reply

    ServerLoop(cfg, tmp_path, progress=lambda s: None).main(LocalGrid(4, fn))
    row = metrics_rows(tmp_path)[1]
    assert row["accepted"] == 3 and "scaffold-delta-c" in row["rejected"][0]["reason"]


# --- refusals ---------------------------------------------------------------------------------------

CENTRAL = {"privacy.mode": "client-central", "privacy.noise_multiplier": 1.0, "privacy.clip_norm": 1.0}


@pytest.mark.parametrize(
    "overrides,first",
    [
        (
            {"compression.codec": "int8"},
            "compression.codec: 'int8' cannot be combined with aggregation.server_optimizer",
        ),
        ({"compression.downlink": "int8"}, "compression.downlink: 'int8' cannot be combined with aggregation.server"),
        ({"aggregation.secure": "secagg+"}, "aggregation.server_optimizer: 'scaffold' cannot be combined with aggreg"),
        (
            {"privacy.mode": "sample", "privacy.noise_multiplier": 1.0, "privacy.max_grad_norm": 1.0},
            "privacy.mode: 'sample' cannot be combined with aggregation.server_optimizer = 'scaffold'",
        ),
        (
            {"privacy.mode": "client-local", "privacy.noise_multiplier": 1.0, "privacy.clip_norm": 1.0},
            "privacy.mode: 'client-local' cannot be combined with aggregation.server_optimizer = 'scaffold'",
        ),
        (CENTRAL, "aggregation.server_optimizer: 'scaffold' cannot be combined with privacy.mode = 'client-central'"),
        ({"train.mode": "zo"}, "aggregation.server_optimizer: 'scaffold' cannot be combined with train.mode = 'zo'"),
        ({"aggregation.robust": "median"}, "aggregation.robust: 'median' cannot be combined with aggregation.server"),
        ({"aggregation.lora_mode": "exact"}, "aggregation.server_optimizer: 'scaffold' cannot be combined with aggr"),
        (
            {"aggregation.lora_mode": "ffa", "adapter.ffa": True},
            "aggregation.server_optimizer: 'scaffold' cannot be combined with aggregation.lora_mode = 'ffa'",
        ),
        ({"aggregation.lora_mode": "hetero"}, "aggregation.server_optimizer: 'scaffold' cannot be combined with aggr"),
        ({"aggregation.proximal_mu": 0.1}, "aggregation.proximal_mu"),
        ({"aggregation.server_lr": 0.0}, "aggregation.server_lr"),
    ],
)
def test_what_cannot_keep_scaffolds_meaning_is_refused_before_the_run(overrides, first):
    with pytest.raises(ConfigError) as exc:
        config.load(None, {**SCAFFOLD, **overrides})
    named = [p for p in exc.value.problems if p.startswith(first)]
    assert len(named) == 1, exc.value.problems
    assert "got" in named[0] or "; use " in named[0] or "must be" in named[0]


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"aggregation.swa_start": 1},  # FedSWA averages the globals; clients and c follow the latest one
        {"aggregation.weighting": "uniform"},
        {"aggregation.max_update_norm": 5.0},
        {"adapter.ffa": True},  # A frozen under lora_mode = 'naive': c covers B (and the head)
        {"federation.sampling": "poisson"},
    ],
)
def test_scaffold_composes_with(overrides):
    cfg = config.load(None, {**SCAFFOLD, **overrides})
    assert cfg.aggregation.server_lr == 1.0  # eta_g's default


def test_zeros_like_and_correction():
    c = {"a": torch.tensor([1.0, 2.0])}
    assert torch.equal(zeros_like(c)["a"], torch.zeros(2))
    assert torch.equal(correction(c, {"a": torch.tensor([0.5, 3.0])})["a"], torch.tensor([0.5, -1.0]))
    with pytest.raises(KeyError):
        correction(c, {"b": torch.zeros(2)})
