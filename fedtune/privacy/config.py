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

``adaptive_clip`` (``"client-central"`` only): the clipping bound follows a target
quantile of the clients' update norms (Andrew, Thakkar, McMahan, Ramaswamy 2021,
"Differentially Private Learning with Adaptive Clipping", arXiv:1905.03871);
``clip_norm`` is then the bound of round 1, and ``target_quantile``, ``clip_lr`` and
``count_noise`` tune the quantile estimate (`AdaptiveClipSettings`). Its count of
unclipped clients is a second release each round; ``noise_multiplier`` stays the
privacy of the pair (see `fedtune.privacy.client_level.update_noise_multiplier`).
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

# Andrew et al. 2021 (arXiv:1905.03871), Sec. 3 and 4: the median, a geometric step of
# 0.2, and count noise sigma_b = m / 20 (TensorFlow Federated's default too)
DEFAULT_TARGET_QUANTILE = 0.5
DEFAULT_CLIP_LR = 0.2
DEFAULT_COUNT_NOISE = 0.05
_ADAPTIVE_FIELDS = ("target_quantile", "clip_lr", "count_noise")


@dataclass(frozen=True)
class AdaptiveClipSettings:
    """``privacy.adaptive_clip``'s settings, defaults filled in (Andrew et al. 2021, arXiv:1905.03871).

    Args:
        initial_clip_norm: C of round 1 (``privacy.clip_norm``).
        target_quantile: gamma, the fraction of sampled clients whose update should fit in C.
        clip_lr: eta_C of the geometric update ``C <- C * exp(-eta_C * (b - gamma))``.
        count_noise: the std of the Gaussian noise on the released *fraction* b of
            unclipped clients, i.e. sigma_b / m with m the clients sampled per round
            (``federation.clients_per_round``; the expected count q * N under
            ``federation.sampling = "poisson"``); 0.05 is the paper's sigma_b = m / 20.
            Relative to m so that one value means the same estimate at any scale.
    """

    initial_clip_norm: float
    target_quantile: float = DEFAULT_TARGET_QUANTILE
    clip_lr: float = DEFAULT_CLIP_LR
    count_noise: float = DEFAULT_COUNT_NOISE

    def count_std(self, clients_per_round: float) -> float:
        """sigma_b, the std of the noise on the *count* of unclipped clients: ``count_noise * m``."""
        return self.count_noise * clients_per_round


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
        adaptive_clip: ``"client-central"`` only: adapt C each round toward
            ``target_quantile`` of the update norms (`AdaptiveClipSettings`).
        target_quantile, clip_lr, count_noise: with ``adaptive_clip`` only; unset
            means 0.5, 0.2 and 0.05 (see `AdaptiveClipSettings`).
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
    adaptive_clip: bool = False
    target_quantile: float | None = None
    clip_lr: float | None = None
    count_noise: float | None = None

    @property
    def enabled(self) -> bool:
        return self.mode != "none"

    @property
    def adaptive(self) -> AdaptiveClipSettings | None:
        """The adaptive-clipping settings with defaults filled in, or None without ``adaptive_clip``."""
        if not self.adaptive_clip:
            return None
        given = {k: getattr(self, k) for k in _ADAPTIVE_FIELDS if getattr(self, k) is not None}
        return AdaptiveClipSettings(initial_clip_norm=self.clip_norm, **given)

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
        between(e, "privacy.target_quantile", self.target_quantile, 0, 1, "()")
        positive(e, "privacy.clip_lr", self.clip_lr)
        positive(e, "privacy.count_noise", self.count_noise, allow_zero=True)
        if self.mode not in MODES:
            return e  # which settings a mode needs is moot until the mode is known
        for name, modes in _FIELD_MODES.items():
            only_with(e, f"privacy.{name}", getattr(self, name), "privacy.mode", self.mode, modes)
        only_with(e, "privacy.label_noise", self.changed("label_noise"), "privacy.mode", self.mode, ("sample",))
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
        e.extend(self._adaptive_problems())
        return e

    def _adaptive_problems(self) -> list[str]:
        e: list[str] = []
        if self.adaptive_clip and self.mode == "client-local":
            e.append(
                "privacy.adaptive_clip: cannot be combined with privacy.mode = 'client-local' (the quantile estimate "
                "of Andrew et al. 2021 is a central release: the server would see each client's clipped-or-not bit "
                "in the clear, and local noise on each bit is not implemented); use privacy.mode = 'client-central' "
                "or a fixed privacy.clip_norm (got true)"
            )
        elif self.adaptive_clip and self.mode != "client-central":
            e.append(
                f"privacy.adaptive_clip: only used with privacy.mode = 'client-central', which is {self.mode!r} "
                "(it adapts the client-level clipping bound); unset it (got true)"
            )
        if self.adaptive_clip and self.mode == "client-central":
            return e
        for name in _ADAPTIVE_FIELDS:  # it would tune an estimate that is never made
            if getattr(self, name) is not None:
                e.append(
                    f"privacy.{name}: only used with privacy.adaptive_clip = true and privacy.mode = 'client-central', "
                    f"which are {str(self.adaptive_clip).lower()} and {self.mode!r}; unset it (got {getattr(self, name)!r})"
                )
        return e


def adaptive_clip_problems(cfg: PrivacyConfig, clients_per_round: float) -> list[str]:
    """What adaptive clipping needs from the federation: count noise that leaves room for the update's.

    The update and the count are released together with the privacy of noise
    multiplier z only if sigma_b > z / 2 (Andrew et al. 2021, arXiv:1905.03871,
    Thm. 1; `fedtune.privacy.client_level.update_noise_multiplier`). sigma_b is
    ``count_noise * m`` with m = ``clients_per_round`` (`FederationConfig.clients_per_round`, or
    the expected count q * N under Poisson sampling), so this is a cross-section check (`fedtune.config.cross_section_problems`).
    """
    adaptive = cfg.adaptive
    if adaptive is None or cfg.mode != "client-central" or not cfg.noise_multiplier:
        return []  # z = 0 adds no noise to the update: any count noise will do
    z, count_std = cfg.noise_multiplier, adaptive.count_std(clients_per_round)
    if count_std > z / 2:
        return []
    return [
        f"privacy.count_noise: the count of unclipped clients gets noise of std count_noise x "
        f"{clients_per_round} clients a round = {count_std:g}, which must exceed privacy.noise_multiplier / 2 = "
        f"{z / 2:g} for the update's own noise multiplier (z^-2 - (2 sigma_b)^-2)^-1/2 to exist (Andrew et al. "
        f"2021, Thm. 1); raise privacy.count_noise above {z / (2 * clients_per_round):.4g}, sample more clients "
        f"a round or lower privacy.noise_multiplier (got {adaptive.count_noise!r})"
    ]
