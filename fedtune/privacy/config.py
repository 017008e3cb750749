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

from dataclasses import dataclass

from fedtune.validation import Section, between, choice, only_with, positive

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
class PrivacyConfig(Section):
    """Differential-privacy settings; validated on construction (`fedtune.validation.Section`).

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

    SECTION = "privacy"
    mode: str = "none"
    noise_multiplier: float | None = None
    target_epsilon: float | None = None
    max_grad_norm: float | None = None
    delta: float = 1e-5
    clip_norm: float | None = None
    epsilon_budget: float | None = None
    budget_policy: str = "refuse"
    label_noise: float = 10.0

    @property
    def enabled(self) -> bool:
        return self.mode != "none"

    @property
    def client_level(self) -> bool:
        return self.mode in CLIENT_MODES

    def problems(self) -> list[str]:
        """Every problem at once, each naming the key and its bad value."""
        e: list[str] = []
        choice(e, "privacy.mode", self.mode, MODES)
        choice(e, "privacy.budget_policy", self.budget_policy, BUDGET_POLICIES)
        positive(e, "privacy.noise_multiplier", self.noise_multiplier, allow_zero=True)
        for name in ("target_epsilon", "max_grad_norm", "clip_norm", "epsilon_budget", "label_noise"):
            positive(e, f"privacy.{name}", getattr(self, name))
        between(e, "privacy.delta", self.delta, 0, 1, "()")
        if self.mode not in MODES:
            return e  # which settings a mode needs is moot until the mode is known
        for name, modes in _FIELD_MODES.items():
            only_with(e, f"privacy.{name}", getattr(self, name), "privacy.mode", self.mode, modes)
        if self.mode == "sample":
            if (self.noise_multiplier is None) == (self.target_epsilon is None):
                e.append(
                    "privacy.target_epsilon: mode 'sample' needs exactly one of privacy.noise_multiplier and "
                    f"privacy.target_epsilon (got noise_multiplier = {self.noise_multiplier!r}, "
                    f"target_epsilon = {self.target_epsilon!r})"
                )
            if self.max_grad_norm is None:
                e.append("privacy.max_grad_norm: mode 'sample' needs a per-example clipping bound (got None)")
        elif self.mode in CLIENT_MODES:
            if self.noise_multiplier is None:
                e.append(f"privacy.noise_multiplier: mode {self.mode!r} needs a noise multiplier (got None)")
            if self.clip_norm is None:
                e.append(f"privacy.clip_norm: mode {self.mode!r} needs a clipping bound (got None)")
        return e
