"""The privacy section of a run's configuration, parsed once at the boundary.

Modes:

- ``"none"``: no differential privacy.
- ``"sample"``: example-level DP-SGD on every client (Abadi et al. 2016,
  arXiv:1607.00133) through opacus; protects each training example of a client.
  Needs ``max_grad_norm`` and exactly one of ``noise_multiplier`` /
  ``target_epsilon``.
- ``"client-central"``: client-level DP-FedAvg (McMahan et al. 2018,
  arXiv:1710.06963): each update is clipped to ``clip_norm`` and the *server*
  adds Gaussian noise to the aggregate; protects a client's whole data set
  against anyone who sees the global model. Needs ``clip_norm`` and
  ``noise_multiplier``.
- ``"client-local"``: each *client* clips its update and adds Gaussian noise
  before sending it; protects against the server too. Needs ``clip_norm`` and
  ``noise_multiplier``.

``epsilon_budget`` (client modes only) caps the cumulative epsilon at ``delta``;
``budget_policy`` says what happens: ``"refuse"`` to start a run whose configured
rounds would exceed it, or ``"stop"`` training before the round that would.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fedtune.errors import ConfigError

MODES = ("none", "sample", "client-central", "client-local")
CLIENT_MODES = ("client-central", "client-local")
BUDGET_POLICIES = ("refuse", "stop")

# Fields that only make sense in some modes; setting one elsewhere is a mistake
# worth reporting (e.g. ``clip_norm`` under ``mode="sample"`` clips nothing).
_FIELD_MODES = {
    "noise_multiplier": ("sample", *CLIENT_MODES),
    "target_epsilon": ("sample",),
    "max_grad_norm": ("sample",),
    "clip_norm": CLIENT_MODES,
    "epsilon_budget": CLIENT_MODES,
}


@dataclass(frozen=True)
class PrivacyConfig:
    """Differential-privacy settings; validated on construction.

    Args:
        mode: one of ``"none"``, ``"sample"``, ``"client-central"``, ``"client-local"``.
        noise_multiplier: z, the Gaussian noise std in units of the clipping
            bound (``max_grad_norm`` for ``"sample"``, ``clip_norm`` for the client
            modes). ``0`` clips without noise (epsilon is infinite).
        target_epsilon: ``"sample"`` only, instead of ``noise_multiplier``: opacus
            calibrates z so that the planned number of steps spends exactly this.
        max_grad_norm: ``"sample"`` only: per-example gradient clipping bound.
        delta: the delta of (epsilon, delta)-DP; use less than 1 / (number of
            examples) for ``"sample"``, 1 / (number of clients) for client modes.
        clip_norm: client modes only: C, the global L2 bound on a client update.
        epsilon_budget: client modes only: the cumulative epsilon not to exceed.
        budget_policy: ``"refuse"`` or ``"stop"``, used with ``epsilon_budget``.
        label_noise: ``"sample"`` only, with ``train.logit_adjustment`` > 0: the std of
            the Gaussian noise on each label count behind a client's logit adjustment
            (the label prior is a statistic of the private data: it is released once
            per client by the Gaussian mechanism, sensitivity 1, and accounted).
    """

    mode: str = "none"
    noise_multiplier: float | None = None
    target_epsilon: float | None = None
    max_grad_norm: float | None = None
    delta: float = 1e-5
    clip_norm: float | None = None
    epsilon_budget: float | None = None
    budget_policy: str = "refuse"
    label_noise: float = 10.0

    def __post_init__(self) -> None:
        errors = _validate(self)
        if errors:
            raise ConfigError("invalid privacy config: " + "; ".join(errors))

    @property
    def enabled(self) -> bool:
        return self.mode != "none"

    @property
    def client_level(self) -> bool:
        return self.mode in CLIENT_MODES

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PrivacyConfig:
        """Build from plain data (a TOML table, Flower ``run_config`` entries).

        Unknown keys are rejected so that a typo (``noise_multiplyer``) cannot
        silently leave a run without noise.
        """
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown privacy config key(s) {unknown}; valid keys are {sorted(known)}")
        return cls(**dict(data))

    def to_dict(self) -> dict[str, Any]:
        """Plain data that :meth:`from_dict` turns back into an equal config."""
        return dataclasses.asdict(self)


def _validate(cfg: PrivacyConfig) -> list[str]:
    """Every problem at once, each naming the field and its bad value."""
    errors: list[str] = []
    if not isinstance(cfg.mode, str) or cfg.mode not in MODES:
        return [f"mode={cfg.mode!r} must be one of {list(MODES)}"]
    if not isinstance(cfg.budget_policy, str) or cfg.budget_policy not in BUDGET_POLICIES:
        errors.append(f"budget_policy={cfg.budget_policy!r} must be one of {list(BUDGET_POLICIES)}")

    def number(name: str, *, low: float, low_inclusive: bool, below_one: bool = False) -> None:
        value = getattr(cfg, name)
        if value is None:
            return
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            errors.append(f"{name}={value!r} must be a finite number")
            return
        if value < low or (value == low and not low_inclusive):
            errors.append(f"{name}={value!r} must be {'>=' if low_inclusive else '>'} {low}")
        elif below_one and value >= 1:
            errors.append(f"{name}={value!r} must be in (0, 1)")

    number("noise_multiplier", low=0.0, low_inclusive=True)
    number("target_epsilon", low=0.0, low_inclusive=False)
    number("max_grad_norm", low=0.0, low_inclusive=False)
    number("delta", low=0.0, low_inclusive=False, below_one=True)
    if cfg.delta is None:
        errors.append("delta=None must be a number in (0, 1)")
    number("clip_norm", low=0.0, low_inclusive=False)
    number("epsilon_budget", low=0.0, low_inclusive=False)
    number("label_noise", low=0.0, low_inclusive=False)
    if cfg.label_noise is None:
        errors.append("label_noise=None must be a number > 0")

    for name, modes in _FIELD_MODES.items():
        value = getattr(cfg, name)
        if value is not None and cfg.mode not in modes:
            errors.append(f"{name}={value!r} is not used with mode={cfg.mode!r} (only with {list(modes)})")

    if cfg.mode == "sample":
        if (cfg.noise_multiplier is None) == (cfg.target_epsilon is None):
            errors.append(
                "mode='sample' needs exactly one of noise_multiplier and target_epsilon, got "
                f"noise_multiplier={cfg.noise_multiplier!r}, target_epsilon={cfg.target_epsilon!r}"
            )
        if cfg.max_grad_norm is None:
            errors.append("max_grad_norm=None: mode='sample' needs a per-example clipping bound")
    elif cfg.mode in CLIENT_MODES:
        if cfg.noise_multiplier is None:
            errors.append(f"noise_multiplier=None: mode={cfg.mode!r} needs a noise multiplier")
        if cfg.clip_norm is None:
            errors.append(f"clip_norm=None: mode={cfg.mode!r} needs a clipping bound")
    return errors
