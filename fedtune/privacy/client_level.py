"""Client-level DP: clip each client's update, add Gaussian noise, account per round.

DP-FedAvg (McMahan, Ramage, Talwar, Zhang 2018, "Learning Differentially Private
Recurrent Language Models", arXiv:1710.06963): every sampled client's delta is
clipped to global L2 norm C ("flat clipping"), the server averages the m clipped
deltas and adds N(0, (z*C/m)^2) to every coordinate. Adding or removing one
client changes the *sum* by at most C, so the release is a Gaussian mechanism
with noise multiplier z, amplified by client sampling with rate q = m / N.

Two placements of the noise:

- central (``"client-central"``): std ``z*C/m`` on the mean, added once by the
  server; :func:`central_noise_std` equals Flower's
  ``flwr.supercore.differential_privacy.compute_stdv``, which
  ``DifferentialPrivacyServerSideFixedClipping`` adds to the aggregated
  parameters. The server is trusted with the clean updates.
- local (``"client-local"``): each client adds std ``z*C`` to its own clipped
  update (:func:`local_noise_std`) before sending; the server sees only noisy
  updates. See :func:`local_epsilon` for what that guarantees.

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


def central_noise_std(noise_multiplier: float, clip_norm: float, num_sampled_clients: int) -> float:
    """Std of the noise the server adds to the *mean* of m clipped deltas: z*C/m.

    McMahan et al. 2018 (arXiv:1710.06963), fixed-denominator estimator with
    sensitivity C/m. Same value as Flower's ``compute_stdv``. The mean must be
    the unweighted sum divided by the *sampled* count m (not weighted by example
    counts, which raises a client's influence above C/m; Flower's own accountant
    requires equal weights for this reason).
    """
    _check_nonneg("noise_multiplier", noise_multiplier)
    _check_positive("clip_norm", clip_norm)
    if isinstance(num_sampled_clients, bool) or not isinstance(num_sampled_clients, int) or num_sampled_clients < 1:
        raise ConfigError(f"num_sampled_clients={num_sampled_clients!r} must be an int >= 1")
    return float(noise_multiplier * clip_norm / num_sampled_clients)


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
    num_sampled_clients: int,
    generator: torch.Generator,
) -> Delta:
    """One DP-FedAvg aggregation: clip each delta, sum, divide by m, add central noise.

    McMahan et al. 2018 (arXiv:1710.06963), fixed denominator m =
    ``num_sampled_clients`` even if fewer replies arrived (dropping a reply must
    not raise anyone's weight above 1/m). Unweighted on purpose: see
    :func:`central_noise_std`. Sums in float64; returns each tensor in the first
    delta's dtype.
    """
    if not deltas:
        raise ValueError("private_mean needs at least one delta")
    std = central_noise_std(noise_multiplier, clip_norm, num_sampled_clients)
    if len(deltas) > num_sampled_clients:
        raise ValueError(f"got {len(deltas)} deltas but only {num_sampled_clients} clients were sampled")
    first = deltas[0]
    acc = {k: torch.zeros(v.shape, dtype=torch.float64, device=v.device) for k, v in first.items()}
    for d in deltas:
        if d.keys() != first.keys():
            raise PayloadError("deltas have different keys; cannot aggregate")
        clipped, _ = clip_delta(d, clip_norm)
        for k, v in clipped.items():
            acc[k] += v.to(torch.float64)
    mean = {k: (acc[k] / num_sampled_clients).to(first[k].dtype) for k in first}
    return add_gaussian_noise(mean, std, generator)


class ClientLevelAccountant:
    """RDP accountant for client-level DP over federated rounds.

    Each round is one sampled Gaussian mechanism with noise multiplier z and
    sampling rate q = sampled clients / total clients (McMahan et al. 2018,
    arXiv:1710.06963, Sec. 3; moments accountant replaced by opacus' RDP
    analysis). The amplification by q assumes each client is included
    independently with probability q (Poisson sampling); Flower's default
    samplers pick a fixed number of clients, for which ``sample_rate=1.0`` (no
    amplification) is the rigorous choice.

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
