"""Differential privacy for federated fine-tuning.

Two granularities (chosen by :class:`PrivacyConfig` ``mode``):

- example level (``"sample"``): DP-SGD on each client over the trainable adapter
  parameters (Abadi et al. 2016, arXiv:1607.00133) via opacus;
  :func:`make_private`, the client's :class:`RdpAccountant` keeps its spent budget
  across rounds (``state_dict`` is plain data for Flower's ``context.state``).
- client level (``"client-central"``, ``"client-local"``): DP-FedAvg (McMahan et
  al. 2018, arXiv:1710.06963): :func:`clip_delta`, :func:`add_gaussian_noise`,
  :func:`central_noise_std` / :func:`local_noise_std`, :func:`private_mean`, and a
  per-round :class:`ClientLevelAccountant` with an epsilon budget.

FFA-LoRA (Sun et al. 2024, arXiv:2403.12313; ``adapter.ffa``, frozen by
:func:`fedtune.adapters.wrap`) trains and sends only LoRA B and the head, which
suits both: with A fixed every update is linear in B, so averaging B is exact,
and DP noise goes to half as many numbers, no longer amplified by the product B A.

Order of operations
-------------------
DP noise is added *before* any compression (quantisation, sparsification, low-rank
codecs) or serialisation of an update::

    client:  delta = local - global
             [sample]        clipping + noise happened inside every DP-SGD step
             [client-local]  delta = add_gaussian_noise(clip_delta(delta, C)[0], z*C, g)
             payload = compress(delta)                      # post-processing
    server:  deltas = [decompress(p) for p in payloads]
             [client-central] update = private_mean(deltas, clip_norm=C, ...)
             compress(update) for the downlink               # post-processing

Anything computed from a DP output without touching private data again is
post-processing and cannot weaken the guarantee (Dwork & Roth 2014, Prop. 2.1), so
compression after noise is safe whatever it does. The other way round is not: a
codec applied to a released update before clipping and noise may break the norm
bound the noise is calibrated to, and a data-dependent codec (top-k indices,
per-tensor scales) leaks through its side information, which is not noised. In
``"client-central"`` mode the uplink goes to the trusted server, which decodes,
then clips and noises: the bound holds for what is averaged whatever codec the
client used, and only the noised aggregate (then compressed for the downlink) is
a release.

Logit adjustment under ``"sample"``: the client's label counts are a statistic of
its private data, so they are released once through the Gaussian mechanism
(:func:`noisy_label_counts`, std ``label_noise``), recorded in the client's
accountant and covered by ``target_epsilon``; every round reuses them.

Not covered by any mode: metrics sent beside the update (training loss,
accuracy, example counts used as FedAvg weights) are not clipped or noised; the
Poisson rate ``batch_size / examples`` treats a client's data-set size as public,
as opacus does.
"""

from fedtune.privacy.accounting import (
    DEFAULT_ALPHAS,
    PrivacyAccountant,
    RdpAccountant,
    calibrate_noise_multiplier,
    history_epsilon,
    max_steps_within,
)
from fedtune.privacy.client_level import (
    ClientLevelAccountant,
    add_gaussian_noise,
    central_noise_std,
    check_budget_at_start,
    clip_delta,
    local_epsilon,
    local_noise_std,
    next_round_within_budget,
    private_mean,
)
from fedtune.privacy.config import PrivacyConfig
from fedtune.privacy.sample_level import (
    PrivateTraining,
    accumulate_physical_batch_,
    check_dp_compatible,
    empty_batch_step,
    enable_per_sample_prompts_,
    is_dp_optimizer,
    make_private,
    noisy_label_counts,
    uses_dora,
)

__all__ = [
    "DEFAULT_ALPHAS",
    "ClientLevelAccountant",
    "PrivacyAccountant",
    "PrivacyConfig",
    "PrivateTraining",
    "RdpAccountant",
    "accumulate_physical_batch_",
    "add_gaussian_noise",
    "calibrate_noise_multiplier",
    "central_noise_std",
    "check_budget_at_start",
    "check_dp_compatible",
    "clip_delta",
    "empty_batch_step",
    "enable_per_sample_prompts_",
    "history_epsilon",
    "is_dp_optimizer",
    "local_epsilon",
    "local_noise_std",
    "make_private",
    "max_steps_within",
    "next_round_within_budget",
    "noisy_label_counts",
    "private_mean",
    "uses_dora",
]
