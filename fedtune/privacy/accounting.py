"""Privacy accounting with Renyi DP over a history of sampled Gaussian steps.

The analysis is opacus' (``opacus.accountants.RDPAccountant`` and
``opacus.accountants.analysis.rdp``): RDP of the sampled Gaussian mechanism
(Mironov, Talwar, Zhang 2019, arXiv:1908.10530) composed over steps, converted to
(epsilon, delta) with Balle et al. 2020 (arXiv:1905.09982, Thm. 21), using
opacus' default orders. Both the example-level (DP-SGD steps) and the
client-level (DP-FedAvg rounds) accountants are this one object; only what a
"step" means differs. A step's ``sample_rate`` q < 1 is amplification by
*Poisson* sampling (each record or client in with probability q): exact for
client-level DP under ``federation.sampling = "poisson"``; for a fixed-size
sample it is an approximation (see
`fedtune.privacy.client_level.central_accounting_statement`), and q = 1 claims none.

State is plain data that fits a Flower ``ConfigRecord`` (flat lists of one scalar
type, no nesting), so a client can keep it in ``context.state`` between rounds::

    {"mechanism": "rdp", "noise_multipliers": [1.1], "sample_rates": [0.01], "steps": [1000]}
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from typing import Any, Protocol

import numpy as np
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis import rdp as rdp_analysis

from fedtune.errors import ConfigError, FedtuneError

DEFAULT_ALPHAS: tuple[float, ...] = tuple(RDPAccountant.DEFAULT_ALPHAS)
MAX_STEPS = 2**40  # search cap for max_steps_within; far beyond any real run

History = list[tuple[float, float, int]]  # (noise_multiplier, sample_rate, steps)


class PrivacyAccountant(Protocol):
    """What the apps need from an accountant: the spent budget, and state to keep."""

    def epsilon(self, delta: float | None = None) -> float: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


class RdpAccountant:
    """An opacus ``RDPAccountant`` plus a default delta and plain-data state.

    ``opacus`` is the wrapped accountant itself: :func:`fedtune.privacy.make_private`
    hands it to opacus' DP optimizer, which records one step per optimizer step.
    """

    def __init__(self, delta: float) -> None:
        _check_delta(delta)
        self.delta = float(delta)
        self.opacus = RDPAccountant()

    @property
    def history(self) -> History:
        """A copy of ``[(noise_multiplier, sample_rate, steps), ...]``."""
        return [(float(z), float(q), int(n)) for z, q, n in self.opacus.history]

    @property
    def steps(self) -> int:
        return sum(n for _, _, n in self.opacus.history)

    def record(self, noise_multiplier: float, sample_rate: float, steps: int = 1) -> None:
        """Record ``steps`` sampled Gaussian steps (merged with the last entry when equal)."""
        check_entry(noise_multiplier, sample_rate, steps)
        if steps == 0:
            return
        hist = self.opacus.history
        if hist and hist[-1][0] == noise_multiplier and hist[-1][1] == sample_rate:
            hist[-1] = (hist[-1][0], hist[-1][1], hist[-1][2] + steps)
        else:
            hist.append((float(noise_multiplier), float(sample_rate), int(steps)))

    def epsilon(self, delta: float | None = None) -> float:
        """Epsilon spent so far at ``delta`` (default: the accountant's), per opacus."""
        delta = self.delta if delta is None else delta
        _check_delta(delta)
        with warnings.catch_warnings():
            # "optimal order is the largest alpha": harmless for a bound, noisy in logs
            warnings.simplefilter("ignore", UserWarning)
            return float(self.opacus.get_epsilon(delta=delta))

    def epsilon_after(
        self, noise_multiplier: float, sample_rate: float, steps: int, delta: float | None = None
    ) -> float:
        """Epsilon if ``steps`` more such steps were taken; does not change the state."""
        delta = self.delta if delta is None else delta
        check_entry(noise_multiplier, sample_rate, steps)
        return history_epsilon(self.history + [(noise_multiplier, sample_rate, steps)], delta)

    def state_dict(self) -> dict[str, Any]:
        return history_to_state(self.history)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Replace the history with ``state``'s (from :meth:`state_dict`)."""
        self.opacus.history[:] = history_from_state(state)


def history_epsilon(history: History, delta: float) -> float:
    """Epsilon of a composed history at ``delta`` with opacus' default orders."""
    _check_delta(delta)
    if not history:
        return 0.0
    rdp = sum(
        rdp_analysis.compute_rdp(q=q, noise_multiplier=z, steps=n, orders=list(DEFAULT_ALPHAS)) for z, q, n in history
    )
    return _eps_from_rdp(rdp, delta)


def max_steps_within(budget: float, *, noise_multiplier: float, sample_rate: float, delta: float) -> int:
    """Largest ``n`` with epsilon(n steps of (noise_multiplier, sample_rate)) <= ``budget``.

    Epsilon is non-decreasing in ``n`` (a minimum over orders of functions linear
    in ``n``), so a doubling then a bisection search is exact. Capped at
    ``MAX_STEPS``. Returns 0 when even one step exceeds the budget (e.g. z = 0).
    """
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not budget > 0:
        raise ConfigError(f"budget={budget!r} must be a positive number")
    check_entry(noise_multiplier, sample_rate, 1)
    _check_delta(delta)
    # opacus' compute_rdp is per_step * steps, so this matches history_epsilon exactly
    per_step = np.asarray(
        rdp_analysis.compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=list(DEFAULT_ALPHAS))
    )

    def within(n: int) -> bool:
        return _eps_from_rdp(per_step * n, delta) <= budget

    if not within(1):
        return 0
    lo, hi = 1, 2
    while within(hi):
        if hi >= MAX_STEPS:
            return MAX_STEPS
        lo, hi = hi, min(2 * hi, MAX_STEPS)
    while hi - lo > 1:  # invariant: within(lo), not within(hi)
        mid = (lo + hi) // 2
        if within(mid):
            lo = mid
        else:
            hi = mid
    return lo


def calibrate_noise_multiplier(
    target_epsilon: float,
    *,
    sample_rate: float,
    steps: int,
    delta: float,
    released: History = (),
    tolerance: float = 0.01,
) -> float:
    """The smallest z (to ``tolerance`` in epsilon) such that ``released`` plus ``steps``
    sampled Gaussian steps of (z, ``sample_rate``) spend at most ``target_epsilon``.

    With nothing ``released`` this is opacus' ``get_noise_multiplier`` (RDP accountant,
    same orders): epsilon lands in ``[target - tolerance, target]``. ``released`` are
    other mechanisms on the same data the budget must also cover (e.g. the noisy label
    counts of logit adjustment); ConfigError if they alone spend the target.
    """
    _check_delta(delta)
    check_entry(1.0, sample_rate, steps)
    if isinstance(target_epsilon, bool) or not isinstance(target_epsilon, (int, float)) or not target_epsilon > 0:
        raise ConfigError(f"target_epsilon={target_epsilon!r} must be a positive number")
    released = list(released)
    base = history_epsilon(released, delta) if released else 0.0
    if base >= target_epsilon - tolerance:
        raise ConfigError(
            f"target_epsilon={target_epsilon}: the other releases on this data already spend epsilon {base:.3f}"
        )

    def eps(z: float) -> float:
        return history_epsilon(released + [(z, sample_rate, steps)], delta)

    lo, hi = 0.0, 10.0
    while eps(hi) > target_epsilon:
        lo, hi = hi, 2 * hi
        if hi > 1e6:
            raise ConfigError(
                f"target_epsilon={target_epsilon} is out of reach for {steps} steps at rate {sample_rate}"
            )
    for _ in range(100):  # invariant: eps(hi) <= target < eps(lo) (eps(0) is infinite)
        mid = (lo + hi) / 2
        e = eps(mid)
        if e > target_epsilon:
            lo = mid
        else:
            hi = mid
            if e >= target_epsilon - tolerance:
                break
    return hi


def history_to_state(history: History) -> dict[str, Any]:
    return {
        "mechanism": "rdp",
        "noise_multipliers": [float(z) for z, _, _ in history],
        "sample_rates": [float(q) for _, q, _ in history],
        "steps": [int(n) for _, _, n in history],
    }


def history_from_state(state: Mapping[str, Any]) -> History:
    """Parse and check state from :func:`history_to_state`; FedtuneError if malformed."""
    if not isinstance(state, Mapping):
        raise FedtuneError(f"accountant state must be a mapping, got {type(state).__name__}")
    if state.get("mechanism") != "rdp":
        raise FedtuneError(f"accountant state: mechanism={state.get('mechanism')!r}, expected 'rdp'")
    cols = []
    for key in ("noise_multipliers", "sample_rates", "steps"):
        value = state.get(key)
        if not isinstance(value, (list, tuple)):
            raise FedtuneError(f"accountant state: {key}={value!r} must be a list")
        cols.append(list(value))
    if not len(cols[0]) == len(cols[1]) == len(cols[2]):
        raise FedtuneError(f"accountant state: lists have different lengths {[len(c) for c in cols]}")
    history: History = []
    for z, q, n in zip(*cols):
        try:
            check_entry(z, q, n)
        except ConfigError as err:
            raise FedtuneError(
                f"accountant state: bad entry (noise_multiplier={z!r}, sample_rate={q!r}, steps={n!r}): {err}"
            ) from None
        history.append((float(z), float(q), int(n)))
    return history


def _eps_from_rdp(rdp: Any, delta: float) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        eps, _ = rdp_analysis.get_privacy_spent(orders=list(DEFAULT_ALPHAS), rdp=rdp, delta=delta)
    return float(eps)


def _check_delta(delta: float) -> None:
    if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not 0 < delta < 1:
        raise ConfigError(f"delta={delta!r} must be in (0, 1)")


def check_entry(noise_multiplier: float, sample_rate: float, steps: int) -> None:
    if (
        isinstance(noise_multiplier, bool)
        or not isinstance(noise_multiplier, (int, float))
        or not (math.isfinite(noise_multiplier) and noise_multiplier >= 0)
    ):
        raise ConfigError(f"noise_multiplier={noise_multiplier!r} must be a finite number >= 0")
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, float)) or not 0 < sample_rate <= 1:
        raise ConfigError(f"sample_rate={sample_rate!r} must be in (0, 1]")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ConfigError(f"steps={steps!r} must be an int >= 0")
