"""Client-level DP: clip each client's update, add Gaussian noise, account per round.

DP-FedAvg (McMahan, Ramage, Talwar, Zhang 2018, "Learning Differentially Private
Recurrent Language Models", arXiv:1710.06963): every sampled client's delta is
clipped to global L2 norm C ("flat clipping"), the server averages the m clipped
deltas and adds N(0, (z*C/m)^2) to every coordinate. Adding or removing one
client changes the *sum* by at most C, so the release is a Gaussian mechanism
with noise multiplier z, amplified by client sampling with rate q = m / N.

Two samplers (``federation.sampling``): a fixed-size sample of m, the divisor m;
or Poisson sampling, each client in independently with probability q, where the
sum is divided by the *expected* count q*N whatever number were drawn, none
included (the estimator with fixed denominator of McMahan et al. 2018, Alg. 1 with
W = q*N): the noise std is then z*C/(q*N), and opacus' analysis of the
Poisson-subsampled Gaussian at q is exact for what ran
(:func:`central_accounting_statement`). ``expected_clients`` selects it below.

Two placements of the noise:

- central (``"client-central"``): std ``z*C/m`` on the mean, added once by the
  server; :func:`central_noise_std` equals Flower's
  ``flwr.supercore.differential_privacy.compute_stdv``, which
  ``DifferentialPrivacyServerSideFixedClipping`` adds to the aggregated
  parameters. The server is trusted with the clean updates.
- local (``"client-local"``): each client adds std ``z*C`` to its own clipped
  update (:func:`local_noise_std`) before sending; the server sees only noisy
  updates. See :func:`local_epsilon` for what that guarantees.

Adaptive clipping (``privacy.adaptive_clip``, central only): Andrew, Thakkar,
McMahan, Ramaswamy 2021, "Differentially Private Learning with Adaptive Clipping"
(arXiv:1905.03871). Each sampled client's bit b_i = 1[||delta_i|| <= C] is summed
beside its clipped update, the server releases the noisy unclipped fraction
(:func:`noisy_unclipped_fraction`) and moves C geometrically toward the target
quantile (:func:`next_clip_norm`); :func:`update_noise_multiplier` raises the
update's noise so that the pair keeps the privacy of noise multiplier z, which is
what the accountant records. :func:`adaptive_private_mean` is one such round.

The math is pure functions on :data:`fedtune.delta.Delta`; randomness comes only
from an explicit ``torch.Generator``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from fedtune.delta import Delta, global_norm
from fedtune.errors import ConfigError, PayloadError
from fedtune.privacy.accounting import RdpAccountant, check_entry, history_epsilon, max_steps_within
from fedtune.privacy.config import PrivacyConfig


def clip_delta(delta: Mapping[str, torch.Tensor], clip_norm: float) -> tuple[Delta, float]:
    """Scale ``delta`` so its global L2 norm is at most ``clip_norm``.

    Flat clipping of McMahan et al. 2018 (arXiv:1710.06963, Alg. 1 "ClipFn"): all
    tensors are one vector, scaled by ``min(1, C / ||delta||)``. A delta already
    within the bound is returned unchanged (copied). The bound holds after
    rounding to the tensors' dtype, which DP's sensitivity argument needs.

    Returns:
        ``(clipped, original_norm)``; the norm is useful as a metric (and for
        adaptive clipping) but is itself private: do not send it in the clear.

    Raises:
        PayloadError: the delta has a non-finite norm (NaN or inf entries).
    """
    _check_positive("clip_norm", clip_norm)
    norm = global_norm(delta)
    if not math.isfinite(norm):
        raise PayloadError(f"cannot clip a delta with non-finite norm ({norm}); the update is dropped")
    if norm <= clip_norm:
        return {k: v.detach().clone() for k, v in delta.items()}, norm
    factor = clip_norm / norm
    clipped = {k: v.detach() * factor for k, v in delta.items()}
    shrink = 1e-6
    while (new_norm := global_norm(clipped)) > clip_norm:  # rounding to the dtype can overshoot C slightly
        factor *= clip_norm / new_norm * (1 - shrink)
        shrink *= 4
        clipped = {k: v.detach() * factor for k, v in delta.items()}
    return clipped, norm


def add_gaussian_noise(delta: Mapping[str, torch.Tensor], std: float, generator: torch.Generator) -> Delta:
    """Return ``delta + N(0, std^2)`` element-wise; the Gaussian mechanism.

    Noise is drawn in float32 on ``generator``'s device, key by key in sorted key
    order, so the same seed gives the same noise however the dict was built. The
    result keeps each tensor's dtype and device.

    A seeded generator makes runs reproducible but the noise is only as secret as
    the seed: in a real deployment seed it from a secret source (e.g.
    ``secrets.randbits(63)``) and never log or send the seed.
    """
    if isinstance(std, bool) or not isinstance(std, (int, float)) or not (math.isfinite(std) and std >= 0):
        raise ConfigError(f"std={std!r} must be a finite number >= 0")
    out: Delta = {}
    for key in sorted(delta):
        v = delta[key]
        noise = torch.randn(v.shape, generator=generator, dtype=torch.float32, device=generator.device)
        out[key] = (v.detach().to(torch.float32) + std * noise.to(v.device)).to(v.dtype)
    return {k: out[k] for k in delta}


def central_noise_std(
    noise_multiplier: float,
    clip_norm: float,
    num_sampled_clients: int | None = None,
    *,
    expected_clients: float | None = None,
) -> float:
    """Std of the noise the server adds to the *mean* of m clipped deltas: z*C/m.

    McMahan et al. 2018 (arXiv:1710.06963), fixed-denominator estimator with
    sensitivity C/m. Same value as Flower's ``compute_stdv``. The mean must be
    the unweighted sum divided by the *sampled* count m (not weighted by example
    counts, which raises a client's influence above C/m; Flower's own accountant
    requires equal weights for this reason). Under Poisson sampling give
    ``expected_clients`` = q*N instead of m: z*C/(q*N).
    """
    _check_nonneg("noise_multiplier", noise_multiplier)
    _check_positive("clip_norm", clip_norm)
    return float(noise_multiplier * clip_norm / estimator_denominator(0, num_sampled_clients, expected_clients))


def estimator_denominator(count: int, num_sampled_clients: int | None, expected_clients: float | None) -> float:
    """What DP-FedAvg divides the clipped sum of ``count`` updates by: the sampled m, or q*N.

    Exactly one of ``num_sampled_clients`` (a fixed-size sample: an int >= 1, at
    least ``count``) and ``expected_clients`` (Poisson sampling: q*N > 0, any
    ``count``, since a draw may exceed its expectation) is given. Either way it is
    fixed before the draw, so one client moves the mean by at most C over it
    (McMahan et al. 2018, arXiv:1710.06963, the fixed-denominator estimator).
    """
    if (num_sampled_clients is None) == (expected_clients is None):
        raise ConfigError(
            f"num_sampled_clients={num_sampled_clients!r}, expected_clients={expected_clients!r}: give exactly one "
            "(the sampled count of a fixed-size sample, or q*N under Poisson sampling)"
        )
    if expected_clients is not None:
        _check_positive("expected_clients", expected_clients)
        return float(expected_clients)
    if isinstance(num_sampled_clients, bool) or not isinstance(num_sampled_clients, int) or num_sampled_clients < 1:
        raise ConfigError(f"num_sampled_clients={num_sampled_clients!r} must be an int >= 1")
    if count > num_sampled_clients:
        raise ValueError(f"got {count} updates but only {num_sampled_clients} clients were sampled")
    return num_sampled_clients


def local_noise_std(noise_multiplier: float, clip_norm: float) -> float:
    """Std each client adds to its own clipped delta in ``"client-local"`` mode: z*C.

    Against the server (local DP) see :func:`local_epsilon`. For the global model
    (central view), the mean of m such updates carries noise of std z*C/sqrt(m)
    with sensitivity C/m: a central noise multiplier of z*sqrt(m), so local mode
    needs far more total noise than central mode for the same central epsilon.
    """
    _check_nonneg("noise_multiplier", noise_multiplier)
    _check_positive("clip_norm", clip_norm)
    return float(noise_multiplier * clip_norm)


def local_epsilon(noise_multiplier: float, rounds: int, delta: float) -> float:
    """Local-DP epsilon of a client that sent ``rounds`` noised updates (std z*C each).

    In local DP any two inputs of the client are neighbours, so the clipped
    update's L2 sensitivity is 2C (two updates of norm <= C pointing opposite
    ways); the effective noise multiplier is z/2. The server knows which rounds
    the client took part in, so there is no sampling amplification: this is the
    RDP of the plain Gaussian mechanism (q = 1) composed ``rounds`` times.
    """
    _check_nonneg("noise_multiplier", noise_multiplier)
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 0:
        raise ConfigError(f"rounds={rounds!r} must be an int >= 0")
    return history_epsilon([(noise_multiplier / 2, 1.0, rounds)] if rounds else [], delta)


def private_mean(
    deltas: Sequence[Mapping[str, torch.Tensor]],
    *,
    clip_norm: float,
    noise_multiplier: float,
    num_sampled_clients: int | None = None,
    expected_clients: float | None = None,
    generator: torch.Generator,
    like: Mapping[str, torch.Tensor] | None = None,
) -> Delta:
    """One DP-FedAvg aggregation: clip each delta, sum, divide by m, add central noise.

    McMahan et al. 2018 (arXiv:1710.06963), fixed denominator m =
    ``num_sampled_clients`` even if fewer replies arrived (dropping a reply must
    not raise anyone's weight above 1/m), or under Poisson sampling the expected
    count ``expected_clients`` = q*N however many were drawn
    (:func:`estimator_denominator`). Unweighted on purpose: see
    :func:`central_noise_std`. Sums in float64; returns each tensor in the first
    delta's dtype. With no deltas (a Poisson round that drew nobody) the release
    is the noise alone, shaped like ``like``: the analysis of the subsampled
    Gaussian counts that round's noise as released.
    """
    template = deltas[0] if deltas else like
    if template is None:
        raise ValueError("private_mean needs at least one delta, or `like` for the keys and shapes of the noise")
    std = central_noise_std(noise_multiplier, clip_norm, num_sampled_clients, expected_clients=expected_clients)
    denominator = estimator_denominator(len(deltas), num_sampled_clients, expected_clients)
    first = template
    acc = {k: torch.zeros(v.shape, dtype=torch.float64, device=v.device) for k, v in first.items()}
    for d in deltas:
        if d.keys() != first.keys():
            raise PayloadError("deltas have different keys; cannot aggregate")
        clipped, _ = clip_delta(d, clip_norm)
        for k, v in clipped.items():
            acc[k] += v.to(torch.float64)
    mean = {k: (acc[k] / denominator).to(first[k].dtype) for k in first}
    return add_gaussian_noise(mean, std, generator)


def update_noise_multiplier(noise_multiplier: float, count_std: float) -> float:
    """z_delta, the update's noise multiplier when the unclipped count is released beside it.

    Andrew et al. 2021 (arXiv:1905.03871), Thm. 1: the clipped sum (sensitivity C,
    noise z_delta * C) and the sum of the centred bits b_i - 1/2 (sensitivity 1/2,
    noise ``count_std`` = sigma_b) are together one Gaussian mechanism with noise
    multiplier z when ``z_delta = (z^-2 - (2 sigma_b)^-2)^(-1/2)``: the squared
    sensitivities over the squared stds add up, 1/z_delta^2 + (1/2)^2/sigma_b^2 = 1/z^2.
    Needs sigma_b > z / 2 (else no z_delta exists: ConfigError). ``z = 0`` gives 0.
    """
    _check_nonneg("noise_multiplier", noise_multiplier)
    _check_nonneg("count_std", count_std)
    if noise_multiplier == 0:
        return 0.0
    if not count_std > noise_multiplier / 2:
        raise ConfigError(
            f"count_std={count_std!r} must exceed noise_multiplier / 2 = {noise_multiplier / 2:g} "
            "(Andrew et al. 2021, Thm. 1)"
        )
    return float((noise_multiplier**-2 - (2 * count_std) ** -2) ** -0.5)


def noisy_unclipped_fraction(
    norms: Sequence[float],
    clip_norm: float,
    *,
    count_std: float,
    num_sampled_clients: int | None = None,
    expected_clients: float | None = None,
    generator: torch.Generator,
) -> float:
    """The released fraction of sampled clients whose update fits in C: ``b~`` of Andrew et al. 2021.

    ``1/2 + (sum_i (b_i - 1/2) + N(0, sigma_b^2)) / m`` with b_i = 1[norm_i <= C] over
    the accepted updates' ``norms`` and the fixed denominator m =
    ``num_sampled_clients`` (arXiv:1905.03871, Sec. 3: centring the bits halves the
    sensitivity to 1/2). With all m replies in this is ``(sum_i b_i + noise) / m``; a
    dropped reply counts as half in, half out. Under Poisson sampling m is the
    expected count ``expected_clients`` = q*N (:func:`estimator_denominator`), and
    ``norms`` may be more than that, or none. One draw from ``generator`` (float64),
    so the same seed gives the same release.
    """
    _check_positive("clip_norm", clip_norm)
    _check_nonneg("count_std", count_std)
    denominator = estimator_denominator(len(norms), num_sampled_clients, expected_clients)
    centred = sum((1.0 if n <= clip_norm else 0.0) - 0.5 for n in norms)
    noise = float(torch.randn((), generator=generator, dtype=torch.float64, device=generator.device))
    return 0.5 + (centred + count_std * noise) / denominator


def next_clip_norm(clip_norm: float, unclipped_fraction: float, *, target_quantile: float, clip_lr: float) -> float:
    """The geometric update ``C * exp(-eta_C * (b~ - gamma))`` (Andrew et al. 2021, arXiv:1905.03871, Sec. 3).

    More clients than the target fit in C: C shrinks, fewer: it grows; by at most a
    factor exp(eta_C) a round whatever the noise on ``unclipped_fraction``, which is
    a DP release, so the new C is post-processing and may be published.
    """
    _check_positive("clip_norm", clip_norm)
    _check_positive("clip_lr", clip_lr)
    if not 0 < target_quantile < 1:
        raise ConfigError(f"target_quantile={target_quantile!r} must be in (0, 1)")
    return float(clip_norm * math.exp(-clip_lr * (unclipped_fraction - target_quantile)))


def adaptive_private_mean(
    deltas: Sequence[Mapping[str, torch.Tensor]],
    *,
    clip_norm: float,
    noise_multiplier: float,
    count_std: float,
    num_sampled_clients: int | None = None,
    expected_clients: float | None = None,
    generator: torch.Generator,
    count_generator: torch.Generator,
    like: Mapping[str, torch.Tensor] | None = None,
) -> tuple[Delta, float]:
    """One round of DP-FedAvg with adaptive clipping: ``(noised mean, released unclipped fraction)``.

    :func:`private_mean` at the current ``clip_norm`` with the raised update noise
    multiplier :func:`update_noise_multiplier` (``noise_multiplier`` is z, the
    privacy of the pair, which the accountant records), and
    :func:`noisy_unclipped_fraction` of the same deltas' norms with noise of std
    ``count_std`` (sigma_b) from ``count_generator``, a generator of its own so the
    update's noise is the same draw whether or not the count is released. Feed the
    fraction to :func:`next_clip_norm` for the next round's C. Both divide by the
    same denominator: ``num_sampled_clients``, or ``expected_clients`` = q*N under
    Poisson sampling (then ``deltas`` may be empty, ``like`` shaping the noise).
    """
    z_delta = update_noise_multiplier(noise_multiplier, count_std)
    count = {"num_sampled_clients": num_sampled_clients, "expected_clients": expected_clients}
    mean = private_mean(deltas, clip_norm=clip_norm, noise_multiplier=z_delta, generator=generator, like=like, **count)
    norms = [global_norm(d) for d in deltas]
    fraction = noisy_unclipped_fraction(norms, clip_norm, count_std=count_std, generator=count_generator, **count)
    return mean, fraction


class ClientLevelAccountant:
    """RDP accountant for client-level DP over federated rounds.

    Each round is one sampled Gaussian mechanism with noise multiplier z and
    sampling rate q = sampled clients / total clients (McMahan et al. 2018,
    arXiv:1710.06963, Sec. 3; moments accountant replaced by opacus' RDP
    analysis). The amplification by q is proven for Poisson sampling, each
    client included independently with probability q, which is what
    ``federation.sampling = "poisson"`` runs (q = ``fraction_train``,
    `fedtune.flower.server.poisson_sample_nodes`). By default the server draws
    exactly m of the N clients without replacement instead
    (`fedtune.flower.server.sample_nodes`), for which the Poisson figure is the
    usual approximation, not a proven bound: see
    :func:`central_accounting_statement`, which the run summary carries.
    ``sample_rate=1.0`` (no amplification) is a proven bound for any sampler that
    does not look at the data. With adaptive clipping z is the privacy of the
    update and the count together (:func:`update_noise_multiplier`), so the
    history records z, not the update's larger z_delta.

    Satisfies :class:`fedtune.privacy.accounting.PrivacyAccountant`.
    """

    def __init__(self, noise_multiplier: float, sample_rate: float, delta: float = 1e-5) -> None:
        self._rdp = RdpAccountant(delta)
        check_entry(noise_multiplier, sample_rate, 0)
        self.noise_multiplier = float(noise_multiplier)
        self.sample_rate = float(sample_rate)

    @classmethod
    def from_config(cls, cfg: PrivacyConfig, *, sample_rate: float | None = None) -> ClientLevelAccountant:
        """The accountant a client-level mode needs.

        ``"client-central"``: the server's accountant, steps once per released
        aggregate; ``sample_rate`` is required. ``"client-local"``: a client's own
        local-DP accountant (noise multiplier z/2, q = 1, see
        :func:`local_epsilon`), steps once per round the client took part in;
        ``sample_rate`` must be left out.
        """
        if cfg.mode == "client-central":
            if sample_rate is None:
                raise ConfigError("sample_rate=None: mode='client-central' needs sampled/total clients")
            return cls(cfg.noise_multiplier, sample_rate, cfg.delta)
        if cfg.mode == "client-local":
            if sample_rate is not None:
                raise ConfigError(f"sample_rate={sample_rate!r}: mode='client-local' has no sampling amplification")
            return cls(cfg.noise_multiplier / 2, 1.0, cfg.delta)
        raise ConfigError(f"mode={cfg.mode!r} has no client-level accountant")

    @property
    def delta(self) -> float:
        return self._rdp.delta

    @property
    def rounds(self) -> int:
        return self._rdp.steps

    @property
    def history(self) -> list[tuple[float, float, int]]:
        return self._rdp.history

    def step(self, rounds: int = 1) -> None:
        """Record ``rounds`` released aggregates (or sent updates, in local mode)."""
        self._rdp.record(self.noise_multiplier, self.sample_rate, rounds)

    def epsilon(self, delta: float | None = None) -> float:
        return self._rdp.epsilon(delta)

    def epsilon_after(self, rounds: int = 1, delta: float | None = None) -> float:
        """Epsilon if ``rounds`` more rounds ran; the state is not changed."""
        return self._rdp.epsilon_after(self.noise_multiplier, self.sample_rate, rounds, delta)

    def max_rounds_within(self, budget: float) -> int:
        """Largest number of rounds, counted from the start, with epsilon <= ``budget``.

        Depends only on (z, q, delta), not on rounds already recorded.
        """
        return max_steps_within(
            budget, noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate, delta=self.delta
        )

    def state_dict(self) -> dict[str, Any]:
        return self._rdp.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._rdp.load_state_dict(state)


def central_accounting_statement(accountant: ClientLevelAccountant, *, sampling: str = "fixed") -> dict[str, Any]:
    """What the server's ``"client-central"`` epsilon assumes, for the run summary's ``privacy`` block.

    ``sampling = "poisson"`` (``federation.sampling``): the server included each
    client independently with probability q and divided by the expected count q*N
    (:func:`private_mean`), so a round is exactly the Poisson-subsampled Gaussian
    mechanism (add/remove adjacency) that opacus analyses: ``epsilon`` is exact for
    what ran; ``epsilon_without_sampling`` (q = 1) is still reported.

    ``sampling = "fixed"``: ``epsilon`` is opacus' RDP analysis of the
    Poisson-subsampled Gaussian at q = m/N, while the server samples a fixed-size
    set, m of N without replacement. The two are close for small q, but the
    Poisson analysis is not a proven bound for fixed-size sampling, whose own
    bounds (Wang, Balle, Kasiviswanathan 2019, arXiv:1808.00087, for the
    replace-one relation) can be larger. So the summary
    says so and adds ``epsilon_without_sampling``: the same rounds at q = 1. That
    one is proven for this sampler under zero-out adjacency (a client's data
    replaced by one that contributes nothing, N unchanged; Kairouz et al. 2021,
    arXiv:2103.00039): for every fixed set of sampled clients a round is a plain
    Gaussian mechanism with noise multiplier z, and a data-independent mixture of
    such mechanisms is no less private than the worst of them.
    """
    if sampling not in ("fixed", "poisson"):
        raise ConfigError(f"sampling={sampling!r} must be 'fixed' or 'poisson'")
    history = accountant.history
    if accountant.sample_rate == 1.0:  # every client every round: no credit for sampling is claimed
        return {
            "accounting": (
                f"RDP (opacus) of the Gaussian mechanism: noise multiplier {accountant.noise_multiplier:g} a round, "
                "every client sampled (q = 1)"
            )
        }
    accounting = (
        f"RDP (opacus) of the Poisson-subsampled Gaussian mechanism: noise multiplier "
        f"{accountant.noise_multiplier:g}, sampling rate q = {accountant.sample_rate:g} a round"
    )
    without = history_epsilon([(z, 1.0, n) for z, _, n in history], accountant.delta)
    if sampling == "poisson":
        return {
            "accounting": accounting,
            "sampling": (
                f"Poisson sampling (federation.sampling = 'poisson'): each client was in a round independently with "
                f"probability q = {accountant.sample_rate:g} and the noised sum was divided by the expected count q*N, "
                "so the analysis is exact for the sampler that ran (a proven bound under add/remove adjacency, not an "
                "approximation). epsilon_without_sampling (q = 1) claims no credit for sampling"
            ),
            "epsilon_without_sampling": without,
        }
    return {
        "accounting": accounting,
        "sampling": (
            "the server samples exactly m of the N clients without replacement each round; the Poisson analysis "
            "of epsilon is the usual approximation for that, not a proven bound. epsilon_without_sampling (q = 1, "
            "zero-out adjacency) is proven"
        ),
        "epsilon_without_sampling": without,
    }


def check_budget_at_start(cfg: PrivacyConfig, accountant: ClientLevelAccountant, num_rounds: int) -> None:
    """Policy ``"refuse"``: raise ConfigError if ``num_rounds`` more rounds would exceed the budget.

    A no-op without ``epsilon_budget`` or under policy ``"stop"``. In local mode
    ``num_rounds`` bounds how often a client can take part.
    """
    if cfg.epsilon_budget is None or cfg.budget_policy != "refuse":
        return
    eps = accountant.epsilon_after(num_rounds)
    if eps > cfg.epsilon_budget:
        allowed = accountant.max_rounds_within(cfg.epsilon_budget) - accountant.rounds
        raise ConfigError(
            f"epsilon_budget={cfg.epsilon_budget!r} would be exceeded: {num_rounds} rounds give epsilon={eps:.4g} "
            f"at delta={cfg.delta:g} (noise_multiplier={accountant.noise_multiplier:g}, "
            f"sample_rate={accountant.sample_rate:g}); at most {max(allowed, 0)} rounds fit. "
            "Lower the number of rounds, raise noise_multiplier, or raise the budget."
        )


def next_round_within_budget(cfg: PrivacyConfig, accountant: ClientLevelAccountant) -> bool:
    """Policy ``"stop"``: whether one more round keeps epsilon within ``epsilon_budget``.

    Always True without a budget. Check *before* the round, so the budget is
    never exceeded (the last round is skipped rather than overshooting).
    """
    if cfg.epsilon_budget is None:
        return True
    return accountant.epsilon_after(1) <= cfg.epsilon_budget


def _check_positive(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
        raise ConfigError(f"{name}={value!r} must be a finite number > 0")


def _check_nonneg(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value >= 0):
        raise ConfigError(f"{name}={value!r} must be a finite number >= 0")
