"""MeZO two-point zeroth-order steps whose direction is a pool seed.

MeZO: Malladi et al. 2023, "Fine-Tuning Language Models with Just Forward Passes",
arXiv:2305.17333 (the SPSA estimator of Spall 1992 applied to LLMs). FedKSeed
(Qin et al. 2024, arXiv:2312.06353) draws the direction's seed from a pool of K.

The projected gradient of one step is

    g = (L(theta + eps z) - L(theta - eps z)) / (2 eps)  ~  z^T grad L(theta)

(the error is O(eps^2), zero for a quadratic L), and the step is
``theta <- theta - lr * g * z``. No backward pass, no optimizer state.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import torch

from fedtune.zo.pool import NamedTensors, SeedPool, named, perturb_
from fedtune.zo.sampler import SeedSampler

LossFn = Callable[[], "float | torch.Tensor"]


def to_float32(x: float) -> float:
    """Round to the nearest float32 (the precision scalars have on the wire)."""
    return float(np.float32(x))


def apply_pair_(params: NamedTensors, pool: SeedPool, index: int, scalar: float, lr: float) -> None:
    """``theta <- theta - lr * scalar * z_index`` in place (one (seed, scalar) pair).

    The step size ``lr * scalar`` is computed in float64 and rounded to float32 once;
    local steps and `fedtune.zo.history.replay_` both go through here, so a pair gives
    the same bits wherever it is applied.
    """
    perturb_(params, pool.seed(index), -float(lr) * float(scalar), pool.distribution)


@torch.no_grad()
def zo_step_(
    params: NamedTensors,
    loss_fn: LossFn,
    seed_index: int,
    pool: SeedPool,
    eps: float,
    lr: float,
    grad_clip: float = 0.0,
) -> float:
    """One MeZO step along ``z`` of pool index ``seed_index``; returns the scalar ``g``.

    ``loss_fn`` must be deterministic between its two calls (same batch, dropout off:
    call it on a model in ``eval()`` mode); it runs at ``theta + eps z`` then at
    ``theta - eps z``. ``theta`` is then restored *exactly* from a copy (MeZO's in-place
    ``+eps, -2eps, +eps`` walk drifts by rounding, which would break replay) and moved
    by `apply_pair_`. ``g`` is returned rounded to float32, the value that was applied
    and that goes on the wire. With ``grad_clip > 0`` a step with ``|g| > grad_clip`` is
    skipped and 0.0 returned (FedKSeed's reference code does the same). A non-finite
    loss restores ``theta`` and raises ``FloatingPointError``.

    Memory: one copy of the tuned parameters (the restore point); ``z`` is regenerated
    per parameter from the seed, never held whole.
    """
    items = named(params)
    seed = pool.seed(seed_index)
    saved = [p.detach().clone() for _, p in items]

    def restore() -> None:
        for (_, p), s in zip(items, saved):
            p.detach().copy_(s)

    try:
        perturb_(items, seed, eps, pool.distribution)
        loss_plus = float(loss_fn())
        restore()
        perturb_(items, seed, -eps, pool.distribution)
        loss_minus = float(loss_fn())
    finally:
        restore()
    if not (math.isfinite(loss_plus) and math.isfinite(loss_minus)):
        raise FloatingPointError(f"non-finite loss at seed index {seed_index}: {loss_plus}, {loss_minus}")
    g = to_float32((loss_plus - loss_minus) / (2.0 * eps))
    if not math.isfinite(g):
        raise FloatingPointError(f"projected gradient overflows float32 at seed index {seed_index}")
    if grad_clip > 0 and abs(g) > grad_clip:
        return 0.0
    if g != 0.0:
        apply_pair_(items, pool, seed_index, g, lr)
    return g


def train_round_(
    params: NamedTensors,
    loss_fns: Iterable[LossFn],
    sampler: SeedSampler,
    generator: torch.Generator,
    pool: SeedPool,
    eps: float,
    lr: float,
    grad_clip: float = 0.0,
) -> list[tuple[int, float]]:
    """A client's local round: one `zo_step_` per loss function (one per batch).

    Seed indices come from ``sampler`` driven by ``generator``; returns the
    ``(seed index, scalar)`` pairs in step order, which is the whole uplink. The
    parameters end moved; FedKSeed clients then restore the round's starting point and
    `fedtune.zo.history.replay_` the server's aggregate, so the local model is discarded.
    """
    items = named(params)
    fns: Sequence[LossFn] = list(loss_fns)
    indices = sampler.sample(len(fns), generator)
    return [(int(i), zo_step_(items, fn, int(i), pool, eps, lr, grad_clip)) for i, fn in zip(indices, fns)]
