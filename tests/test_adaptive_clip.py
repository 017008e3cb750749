"""Adaptive clipping for client-level DP (Andrew et al. 2021, arXiv:1905.03871): hand computations,
opacus' accountant, and in-process runs of the server loop on the tiny model."""

import math

import pytest
import torch

from fedtune.delta import global_norm
from fedtune.errors import ConfigError
from fedtune.flower.client import handle_train
from fedtune.flower.local import LocalGrid
from fedtune.flower.records import from_arrayrecord
from fedtune.flower.server import ServerLoop
from fedtune.privacy.client_level import (
    adaptive_private_mean,
    next_clip_norm,
    noisy_unclipped_fraction,
    update_noise_multiplier,
)
from fedtune.seeds import derive_seed
from tests.conftest import metrics_rows
from tests.test_privacy import opacus_epsilon
from tests.test_resume import Crash, CrashingGrid

CENTRAL = {"privacy.mode": "client-central", "privacy.clip_norm": 1.0, "privacy.noise_multiplier": 1.0}


# --- the math, by hand ------------------------------------------------------------------------


def test_clip_update_is_the_geometric_rule():
    # C * exp(-eta * (b - gamma)): 1.0 * exp(-0.2 * 0.3) = 0.9417645335842487
    assert next_clip_norm(1.0, 0.8, target_quantile=0.5, clip_lr=0.2) == pytest.approx(0.9417645335842487, rel=1e-12)
    # fewer fit than the target: C grows, 2 * exp(0.5 * 0.5) = 2.568050833375483
    assert next_clip_norm(2.0, 0.0, target_quantile=0.5, clip_lr=0.5) == pytest.approx(2.568050833375483, rel=1e-12)
    assert next_clip_norm(3.0, 0.9, target_quantile=0.9, clip_lr=0.2) == 3.0  # on target: unchanged


def test_update_noise_multiplier_is_theorem_1():
    # (z^-2 - (2 sigma_b)^-2)^(-1/2): z = 1, sigma_b = 1 -> 1 / sqrt(0.75); z = 2, sigma_b = 5 -> 1 / sqrt(0.24)
    assert update_noise_multiplier(1.0, 1.0) == pytest.approx(1.1547005383792517, rel=1e-12)
    assert update_noise_multiplier(2.0, 5.0) == pytest.approx(2.0412414523193148, rel=1e-12)
    z_delta = update_noise_multiplier(0.7, 3.0)  # the pair (update, centred count) has noise multiplier z
    assert 1 / z_delta**2 + 0.5**2 / 3.0**2 == pytest.approx(1 / 0.7**2, rel=1e-12)
    assert update_noise_multiplier(0.0, 0.0) == 0.0  # no noise asked for
    with pytest.raises(ConfigError, match="must exceed noise_multiplier / 2 = 0.5"):
        update_noise_multiplier(1.0, 0.5)  # sigma_b = z / 2: no z_delta exists


def test_noisy_fraction_and_mean_by_hand():
    d1 = {"a": torch.tensor([3.0, 4.0]), "b": torch.tensor([0.0])}  # norm 5: clipped at C = 2
    d2 = {"a": torch.tensor([0.6, 0.8]), "b": torch.tensor([0.0])}  # norm 1: fits
    C, m, z, count_std = 2.0, 3, 1.0, 1.5  # 3 sampled, one reply dropped
    mean, frac = adaptive_private_mean(
        [d1, d2],
        clip_norm=C,
        noise_multiplier=z,
        count_std=count_std,
        num_sampled_clients=m,
        generator=torch.Generator().manual_seed(7),
        count_generator=torch.Generator().manual_seed(8),
    )
    # the count: 1/2 + ((0 - 1/2) + (1 - 1/2) + sigma_b * n) / m, n the first float64 draw of seed 8
    n = torch.randn((), generator=torch.Generator().manual_seed(8), dtype=torch.float64).item()
    assert frac == pytest.approx(0.5 + (0.0 + count_std * n) / m, rel=1e-12)
    # the update: (clip(d1) + d2) / m plus noise z_delta * C / m, keys drawn in sorted order
    z_delta = (z**-2 - (2 * count_std) ** -2) ** -0.5
    g = torch.Generator().manual_seed(7)
    noise = {k: torch.randn(shape, generator=g) for k, shape in (("a", (2,)), ("b", (1,)))}
    want_a = (torch.tensor([1.2, 1.6]) + torch.tensor([0.6, 0.8])) / m + z_delta * C / m * noise["a"]
    torch.testing.assert_close(mean["a"], want_a, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(mean["b"], z_delta * C / m * noise["b"], rtol=1e-6, atol=1e-6)
    # without noise the fraction is the exact share of norms <= C
    exact = noisy_unclipped_fraction(
        [0.5, 1.0, 1.5, 2.0], 1.0, count_std=0.0, num_sampled_clients=4, generator=torch.Generator()
    )
    assert exact == 0.5


# --- configuration ---------------------------------------------------------------------------


def test_adaptive_keys_are_refused_where_unused(tiny_cfg):
    base = tiny_cfg
    cases = [
        (
            {"privacy.mode": "sample", "privacy.noise_multiplier": 1.0, "privacy.max_grad_norm": 1.0}
            | {"privacy.adaptive_clip": True, "privacy.clip_lr": 0.1},
            [
                "privacy.adaptive_clip: only used with privacy.mode = 'client-central', which is 'sample'",
                "privacy.clip_lr: only used with privacy.adaptive_clip = true and privacy.mode = 'client-central'",
            ],
        ),
        ({"privacy.target_quantile": 0.9}, ["privacy.target_quantile: only used with privacy.adaptive_clip = true"]),
        (
            CENTRAL | {"privacy.mode": "client-local", "privacy.adaptive_clip": True},
            ["privacy.adaptive_clip: cannot be combined with privacy.mode = 'client-local'"],
        ),
        (CENTRAL | {"privacy.count_noise": 0.5}, ["privacy.count_noise: only used with privacy.adaptive_clip = true"]),
        (
            CENTRAL | {"privacy.adaptive_clip": True, "privacy.target_quantile": 1.0, "privacy.clip_lr": 0.0},
            ["privacy.target_quantile: must be in (0, 1) (got 1.0)", "privacy.clip_lr: must be > 0 (got 0.0)"],
        ),
        (
            # tiny.toml samples all 4 clients: sigma_b = 0.05 * 4 = 0.2 <= z / 2 = 0.5
            CENTRAL | {"privacy.adaptive_clip": True},
            [
                "privacy.count_noise: the count of unclipped clients gets noise of std count_noise x 4 clients a round "
                "= 0.2, which must exceed privacy.noise_multiplier / 2 = 0.5",
                "raise privacy.count_noise above 0.125",
            ],
        ),
    ]
    for over, messages in cases:
        with pytest.raises(ConfigError) as err:
            base.replace(**over)
        for msg in messages:
            assert any(p.startswith(msg) or msg in p for p in err.value.problems), (msg, err.value.problems)
    ok = base.replace(**CENTRAL, **{"privacy.adaptive_clip": True, "privacy.count_noise": 0.13})
    assert ok.privacy.adaptive.count_std(4) == pytest.approx(0.52)
    assert (ok.privacy.adaptive.target_quantile, ok.privacy.adaptive.clip_lr) == (0.5, 0.2)  # the paper's


# --- in-process runs (LocalGrid, tiny model) ---------------------------------------------------


def _run(cfg, out, norms=None, grid_cls=LocalGrid, **grid_kw):
    """One run; ``norms[round]`` collects the L2 norm of every update as the client sent it."""

    def client(msg, ctx):
        reply = handle_train(msg, ctx, cfg)
        if norms is not None and not reply.has_error():
            rnd = int(msg.content["config"]["server-round"])
            norms.setdefault(rnd, []).append(global_norm(from_arrayrecord(reply.content["update"])))
        return reply

    grid = grid_cls(cfg.federation.num_clients, client, **grid_kw)
    return ServerLoop(cfg, out, progress=lambda s: None).main(grid), grid


def test_clip_norm_moves_toward_the_quantile_and_is_recorded(tiny_cfg, tmp_path):
    # the tiny model's one-step updates have norm ~0.15-0.23; start C ten times above them
    cfg = tiny_cfg.replace(
        **{
            "federation.rounds": 6,
            "federation.eval_every": 100,
            "train.local_steps": 1,
            "privacy.mode": "client-central",
            "privacy.clip_norm": 2.0,
            "privacy.noise_multiplier": 0.1,
            "privacy.adaptive_clip": True,
            "privacy.clip_lr": 1.0,
        }
    )
    norms: dict[int, list[float]] = {}
    summary, _ = _run(cfg, tmp_path, norms)
    rows = metrics_rows(tmp_path)[1:]
    clip = [r["dp_clip_norm"] for r in rows]
    frac = [r["dp_unclipped_fraction"] for r in rows]
    assert clip[0] == 2.0 and len(clip) == 6
    m, count_std = 4, 0.05 * 4  # all 4 sampled; default count_noise
    for r in range(1, len(rows) + 1):
        fits = sum(n <= clip[r - 1] for n in norms[r])
        n = torch.randn(
            (),
            generator=torch.Generator().manual_seed(derive_seed(cfg.federation.seed, "dp-count", r)),
            dtype=torch.float64,
        )
        # the release, from the clients' own norms and the count's (seed, round) stream
        assert frac[r - 1] == pytest.approx(0.5 + (fits - m / 2 + count_std * n.item()) / m, rel=1e-9)
        nxt = clip[r - 1] * math.exp(-1.0 * (frac[r - 1] - 0.5))
        assert (clip[r] if r < 6 else summary["privacy"]["adaptive_clip"]["final_clip_norm"]) == pytest.approx(nxt)
    every = sorted(x for v in norms.values() for x in v)
    median = every[len(every) // 2]
    gap = [abs(math.log(c / median)) for c in clip]
    assert gap[-1] < gap[0] / 3  # C came most of the way down to the update norms' median
    assert frac[0] > 0.8 and clip[1] < clip[0]  # everything fitted at C = 2, so C shrank


def test_epsilon_is_opacus_rdp_at_the_combined_z(tiny_cfg, tmp_path):
    z, q, rounds, delta = 1.0, 2 / 4, 3, 1e-5
    cfg = tiny_cfg.replace(
        **{
            "federation.rounds": rounds,
            "federation.fraction_train": 0.5,
            "federation.eval_every": 100,
            "train.local_steps": 1,
            "privacy.mode": "client-central",
            "privacy.clip_norm": 0.5,
            "privacy.noise_multiplier": z,
            "privacy.delta": delta,
            "privacy.adaptive_clip": True,
            "privacy.count_noise": 0.5,  # sigma_b = 0.5 * 2 sampled = 1 > z / 2
        }
    )
    summary, _ = _run(cfg, tmp_path)
    priv = summary["privacy"]
    want = opacus_epsilon(z, q, rounds, delta)
    assert priv["epsilon"] == pytest.approx(want, rel=1e-9)
    assert metrics_rows(tmp_path)[-1]["dp_epsilon"] == pytest.approx(want, rel=1e-9)
    # the update itself was noised at z_delta > z; the accountant records the pair's z, not z_delta
    z_delta = priv["adaptive_clip"]["update_noise_multiplier"]
    assert z_delta == pytest.approx(1 / math.sqrt(0.75))
    assert priv["epsilon"] > opacus_epsilon(z_delta, q, rounds, delta) * 1.05
    # the sampler draws 2 of 4 without replacement: the summary says what the Poisson figure assumes
    assert "without replacement" in priv["sampling"] and "not a proven bound" in priv["sampling"]
    assert priv["epsilon_without_sampling"] == pytest.approx(opacus_epsilon(z, 1.0, rounds, delta), rel=1e-9)


def test_resume_keeps_the_adapted_clip_norm(tiny_cfg, tmp_path):
    cfg = tiny_cfg.replace(
        **{
            "federation.rounds": 3,
            "federation.eval_every": 100,
            "train.local_steps": 1,
            "privacy.mode": "client-central",
            "privacy.clip_norm": 2.0,
            "privacy.noise_multiplier": 0.1,
            "privacy.adaptive_clip": True,
            "privacy.clip_lr": 1.0,
        }
    )
    whole, _ = _run(cfg, tmp_path / "whole")
    with pytest.raises(Crash):
        _run(cfg, tmp_path / "broken", grid_cls=CrashingGrid, crash_round=3)
    grid = LocalGrid(cfg.federation.num_clients, lambda m, c: handle_train(m, c, cfg))
    resumed = ServerLoop(cfg, tmp_path / "broken", progress=lambda s: None, resume=True).main(grid)
    a, b = metrics_rows(tmp_path / "whole"), metrics_rows(tmp_path / "broken")
    assert [r["round"] for r in b] == [0, 1, 2, 3]
    assert b[3]["dp_clip_norm"] == a[3]["dp_clip_norm"] != 2.0  # round 3 ran with round 2's adapted C
    assert resumed["privacy"]["adaptive_clip"] == whole["privacy"]["adaptive_clip"]
    assert resumed["final"] == whole["final"]
