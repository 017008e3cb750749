"""Configuration of zeroth-order federated tuning with a seed pool (FedKSeed).

FedKSeed: Qin et al. 2024, "Federated Full-Parameter Tuning of Billion-Sized
Language Models with Communication Cost under 18 Kilobytes", arXiv:2312.06353.
Parsed once, at the boundary (Flower ``run_config``, TOML), with `ZOConfig.from_dict`
(`fedtune.validation.Section`: integers are accepted where floats are expected).
"""

from __future__ import annotations

from dataclasses import dataclass

from fedtune.validation import Section, between, choice, positive
from fedtune.zo.pool import DISTRIBUTIONS, MAX_NUM_SEEDS, MAX_POOL_SEED, SeedPool

SCOPES = ("adapter", "full")


@dataclass(frozen=True)
class ZOConfig(Section):
    """Hyper-parameters of FedKSeed; every party of a run must hold the same values.

    Fields:
        num_seeds: K, the size of the seed pool (paper: 1024-4096).
        eps: perturbation scale of the two-point estimate (MeZO, paper: 5e-4 .. 1e-3).
        lr: step size; the update of one (seed, scalar) pair is ``-lr * scalar * z``.
        scope: ``"adapter"`` tunes the trainable (``requires_grad``) parameters, i.e. a
            PEFT adapter; ``"full"`` tunes every parameter of the model.
        local_steps: ZO steps a client takes per round (one pair each).
        pro: FedKSeed-Pro, sample seeds with probabilities from their history.
        pro_clip: FedKSeed-Pro clips scalars to ``[-pro_clip, pro_clip]`` before
            averaging their magnitudes (the reference code's ``bias_loss_clip``).
        pro_temperature: softmax temperature over the min-max-normalized magnitudes
            (1.0 is the paper's rule; smaller favours large-magnitude seeds more).
        pool_seed: derives the K seeds; changing it changes every perturbation.
        distribution: ``"rademacher"`` (default; bit-exact on every machine and device)
            or ``"gaussian"`` (the paper's choice; ``torch.randn`` on the CPU, whose bits
            depend on the CPU kernel torch dispatches to, see `fedtune.zo.pool`).
        grad_clip: when > 0, a local step whose |scalar| exceeds it is skipped (the
            reference code's ``grad_clip``); 0 disables.
    """

    SECTION = "zo"
    num_seeds: int = 4096
    eps: float = 1e-3
    lr: float = 1e-6
    scope: str = "adapter"
    local_steps: int = 200
    pro: bool = False
    pro_clip: float = 0.5
    pro_temperature: float = 1.0
    pool_seed: int = 0
    distribution: str = "rademacher"
    grad_clip: float = 0.0

    def problems(self) -> list[str]:
        e: list[str] = []
        between(e, "zo.num_seeds", self.num_seeds, 1, MAX_NUM_SEEDS)
        positive(e, "zo.eps", self.eps)
        positive(e, "zo.lr", self.lr, allow_zero=True)
        choice(e, "zo.scope", self.scope, SCOPES)
        positive(e, "zo.local_steps", self.local_steps, allow_zero=True)
        positive(e, "zo.pro_clip", self.pro_clip)
        positive(e, "zo.pro_temperature", self.pro_temperature)
        between(e, "zo.pool_seed", self.pool_seed, 0, MAX_POOL_SEED, "[)")
        choice(e, "zo.distribution", self.distribution, DISTRIBUTIONS)
        positive(e, "zo.grad_clip", self.grad_clip, allow_zero=True)
        return e

    def pool(self) -> SeedPool:
        """The `SeedPool` these settings define."""
        return SeedPool(num_seeds=self.num_seeds, pool_seed=self.pool_seed, distribution=self.distribution)
