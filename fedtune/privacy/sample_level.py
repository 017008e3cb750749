"""Example-level DP-SGD on a client, over the trainable (adapter) parameters only.

DP-SGD (Abadi et al. 2016, "Deep Learning with Differential Privacy",
arXiv:1607.00133) through opacus (Yousefpour et al. 2021, arXiv:2109.12298):
Poisson-sampled batches, per-example gradients clipped to ``max_grad_norm``,
Gaussian noise of std ``noise_multiplier * max_grad_norm`` on their sum. peft
freezes the base model, so per-example gradients are computed only for the
trainable parameters: LoRA A/B, prompt embeddings, the ``modules_to_save`` head.

What works with peft 0.21 / opacus 1.6 (checked on a tiny random BERT):

- LoRA (``lora_A``/``lora_B`` are ``nn.Linear``; the ``modules_to_save``
  classifier copy is an ``nn.Linear``): ``grad_sample_mode`` ``"hooks"`` and
  ``"functorch"``, with or without ``wrap_model``.
- Prompt tuning: peft computes the prompt embeddings for *one* row and repeats
  them over the batch (peft issue #2043), which leaves opacus a batch of 1 for the
  embedding and crashes the clipping. :func:`enable_per_sample_prompts_` (applied
  by :func:`make_private`) computes them per row again.
- DoRA: refused (:func:`check_dp_compatible`): its magnitude module
  (``DoraLinearLayer``) has no per-example gradient rule and its forward needs
  keyword arguments opacus' functorch fallback cannot pass.
- ``"ew"`` (expanded weights) fails: its wrapper's ``forward(x)`` needs a
  positional input, HF models are called with keyword arguments. ``"ghost"``
  (fast gradient clipping) works on LoRA only if the loop computes the loss from
  the logits with the criterion opacus returns (HF's built-in ``labels=`` loss
  bypasses it), a different loop contract: both are refused here.
- Poisson batches can be empty and HF models cannot run on 0 rows: use
  :func:`empty_batch_step`.
- LoRA-SB (`fedtune.lorasb`): the trained r x r core is an ``nn.Linear`` between
  the frozen A and B, so opacus' stock Linear rule gives its per-example gradients.

Logical batches larger than the physical batch (``train.physical_batch_size``):
the Poisson batch of expected size ``batch_size`` (the logical batch, which sets q
and the accounting) runs in pieces; after every piece but the last,
:func:`accumulate_physical_batch_` has the optimizer clip that piece's per-example
gradients into the running sum without a step (what opacus' ``BatchMemoryManager``
does through its sampler); the last piece's ``step()`` adds the noise once and
divides by the expected logical batch size. One accounted step per logical batch,
as without pieces. Large logical batches are what DP fine-tuning recipes use (Yu
et al. 2022, arXiv:2110.06500: batch 2,000; Li et al. 2022, arXiv:2110.05679: 1,000).
"""

from __future__ import annotations

import types
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from opacus import PrivacyEngine
from opacus.data_loader import DPDataLoader
from opacus.optimizers import DPOptimizer
from torch import nn
from torch.utils.data import DataLoader

from fedtune.errors import ConfigError
from fedtune.privacy.accounting import History, RdpAccountant, calibrate_noise_multiplier
from fedtune.privacy.config import MODES, PrivacyConfig

GRAD_SAMPLE_MODES = ("hooks", "functorch")


def uses_dora(model: nn.Module) -> bool:
    """Whether a peft model has DoRA layers (by config or by magnitude parameters)."""
    for cfg in getattr(model, "peft_config", {}).values():
        if getattr(cfg, "use_dora", False):
            return True
    return any("lora_magnitude_vector" in name for name, _ in model.named_parameters())


def check_dp_compatible(mode: str, *, use_dora: bool) -> None:
    """Raise ConfigError for adapter / privacy-mode pairs that cannot work.

    DoRA (Liu et al. 2024, arXiv:2402.09353) with ``mode="sample"``: opacus cannot
    compute per-example gradients of the magnitude vector (checked on peft 0.21,
    opacus 1.6). Client-level modes only touch the delta, so DoRA is fine there.
    """
    if mode not in MODES:
        raise ConfigError(f"mode={mode!r} must be one of {list(MODES)}")
    if use_dora and mode == "sample":
        raise ConfigError(
            "use_dora=True cannot be combined with privacy mode='sample': opacus has no per-example "
            "gradients for DoRA's magnitude vector. Use plain LoRA (use_dora=False) for example-level "
            "DP, or a client-level mode ('client-central' / 'client-local') with DoRA."
        )


def enable_per_sample_prompts_(model: nn.Module) -> bool:
    """Make a prompt-tuning PeftModel embed its virtual tokens once per batch row.

    peft (>= 0.13) embeds the virtual tokens for a single row and repeats the
    result over the batch, so every example shares one activation and opacus sees
    a batch of 1. This restores the per-row lookup (same values, B times the tiny
    prompt activation memory) while training. Returns whether the model was
    patched; undo with ``del model.get_prompt``.
    """
    cfg = getattr(model, "active_peft_config", None)
    if cfg is None or cfg.peft_type != "PROMPT_TUNING" or "get_prompt" in vars(model):
        return False
    original = model.get_prompt

    def get_prompt(self: Any, batch_size: int, task_ids: Any = None, max_cache_len: Any = None) -> torch.Tensor:
        if self.active_peft_config.inference_mode or not self.training:
            return original(batch_size, task_ids=task_ids, max_cache_len=max_cache_len)
        encoder = self.prompt_encoder[self.active_adapter]
        tokens = self.prompt_tokens[self.active_adapter].unsqueeze(0).expand(batch_size, -1)
        return encoder(tokens.to(encoder.embedding.weight.device))

    model.get_prompt = types.MethodType(get_prompt, model)
    return True


@dataclass
class PrivateTraining:
    """What :func:`make_private` returns; call :meth:`close` after the round.

    Attributes:
        model: the module to call in the training loop: the model itself
            (``wrap_model=False``, the default) or opacus' ``GradSampleModule``.
        optimizer: opacus' ``DPOptimizer``; call ``zero_grad()`` every step
            (gradient accumulation across Poisson batches is forbidden).
        data_loader: a Poisson-sampling loader; batches have random size and
            can be empty: on an empty one call :func:`empty_batch_step`.
        accountant: the client's accountant; opacus records every optimizer step.
        noise_multiplier: z in use (calibrated when the config gave target_epsilon).
        sample_rate: q, the Poisson rate that is accounted.
    """

    model: nn.Module
    optimizer: DPOptimizer
    data_loader: DataLoader
    accountant: RdpAccountant
    noise_multiplier: float
    sample_rate: float
    _hooks: Any
    _original: nn.Module
    _patched_prompts: bool

    def close(self) -> None:
        """Remove opacus' hooks and attributes so the model can be made private again."""
        self._hooks.cleanup()
        if self._patched_prompts:
            del self._original.get_prompt
            self._patched_prompts = False


def make_private(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data_loader: DataLoader,
    cfg: PrivacyConfig,
    *,
    generator: torch.Generator,
    total_steps: int | None = None,
    noise_generator: torch.Generator | None = None,
    accountant_state: Mapping[str, Any] | None = None,
    grad_sample_mode: str = "hooks",
    wrap_model: bool = False,
    released: History = (),
) -> PrivateTraining:
    """Set up DP-SGD (Abadi et al. 2016, arXiv:1607.00133) for one client's round.

    Args:
        model: a peft model (or any module); only ``requires_grad`` parameters
            get per-example gradients, clipping and noise.
        optimizer: over (a subset of) ``model``'s trainable parameters.
        data_loader: its ``batch_size`` sets the Poisson rate q = 1 / len(loader).
        cfg: ``mode="sample"`` config.
        generator: CPU generator for Poisson sampling (and the noise, unless
            ``noise_generator`` is given). Seed it from a secret source in
            deployment: whoever knows the seed can subtract the noise.
        total_steps: with ``cfg.target_epsilon``, the optimizer steps the budget
            must cover over the *whole* run (all rounds this client may train,
            e.g. rounds * local epochs * len(data_loader)); z is calibrated once
            for that many steps, so every round uses the same z and the total
            stays within the target. Must be None with ``cfg.noise_multiplier``.
        noise_generator: generator on the parameters' device for the noise.
        accountant_state: the previous rounds' ``accountant.state_dict()``, so the
            spent budget carries over (rounds compose).
        released: with ``cfg.target_epsilon``, the client's other releases the target
            must also cover, as ``(noise_multiplier, sample_rate, steps)`` entries (e.g.
            :func:`noisy_label_counts`' one Gaussian release): z is calibrated for them
            plus ``total_steps`` DP-SGD steps.
        grad_sample_mode: ``"hooks"`` (default, fastest) or ``"functorch"``.
        wrap_model: False keeps ``model`` itself the thing to call (peft/HF
            methods and state-dict keys unchanged); True returns a GradSampleModule.
    """
    if cfg.mode != "sample":
        raise ConfigError(f"mode={cfg.mode!r}: make_private is for mode='sample'")
    check_dp_compatible(cfg.mode, use_dora=uses_dora(model))
    if grad_sample_mode not in GRAD_SAMPLE_MODES:
        raise ConfigError(f"grad_sample_mode={grad_sample_mode!r} must be one of {list(GRAD_SAMPLE_MODES)}")
    if not any(p.requires_grad for p in model.parameters()):
        raise ConfigError("model has no trainable parameters to make private")
    if cfg.target_epsilon is not None:
        if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
            raise ConfigError(
                f"total_steps={total_steps!r}: target_epsilon needs the planned number of steps (int >= 1)"
            )
    elif total_steps is not None:
        raise ConfigError(f"total_steps={total_steps!r} is only used with target_epsilon")

    # Build the Poisson loader ourselves: opacus would draw the batches from the
    # global RNG (it only uses its own generator in secure mode).
    dp_loader = DPDataLoader.from_data_loader(data_loader, generator=generator)
    sample_rate = 1 / len(dp_loader)  # what opacus accounts, same as in make_private
    if cfg.target_epsilon is not None:
        noise_multiplier = calibrate_noise_multiplier(
            cfg.target_epsilon,
            sample_rate=sample_rate,
            steps=total_steps,
            delta=cfg.delta,
            released=released,
        )
    else:
        noise_multiplier = float(cfg.noise_multiplier)

    accountant = RdpAccountant(cfg.delta)
    if accountant_state is not None:
        accountant.load_state_dict(accountant_state)
    engine = PrivacyEngine(accountant="rdp")
    engine.accountant = accountant.opacus  # opacus' optimizer hook now steps our history
    patched = enable_per_sample_prompts_(model)
    # opacus refuses a module in eval mode; a process's cached model may come from an
    # evaluation or a zeroth-order round (both leave it in eval())
    model.train()
    try:
        hooks, dp_optimizer, dp_loader = engine.make_private(
            module=model,
            optimizer=optimizer,
            data_loader=dp_loader,
            noise_multiplier=noise_multiplier,
            max_grad_norm=cfg.max_grad_norm,
            poisson_sampling=False,  # already Poisson; opacus would re-wrap with the global RNG
            noise_generator=noise_generator if noise_generator is not None else generator,
            grad_sample_mode=grad_sample_mode,
            wrap_model=wrap_model,
        )
    except Exception:
        if patched:
            del model.get_prompt
        raise
    hooks.forbid_grad_accumulation()  # opacus does this itself only when it builds the Poisson loader
    return PrivateTraining(
        model=hooks if wrap_model else model,
        optimizer=dp_optimizer,
        data_loader=dp_loader,
        accountant=accountant,
        noise_multiplier=float(noise_multiplier),
        sample_rate=sample_rate,
        _hooks=hooks,
        _original=model,
        _patched_prompts=patched,
    )


def noisy_label_counts(labels: list[int], num_labels: int, std: float, generator: torch.Generator) -> list[float]:
    """A client's label histogram through the Gaussian mechanism, for logit adjustment.

    Adding or removing one example changes one count by 1 (L2 sensitivity 1), so this
    is the Gaussian mechanism with noise multiplier ``std``: record it in the client's
    accountant once as ``(std, 1.0, 1)`` and reuse the counts every round (reuse is
    post-processing). Negative noisy counts are clipped to 0 (post-processing too).
    """
    if not std > 0:
        raise ConfigError(f"std={std!r} must be > 0")
    counts = torch.bincount(torch.tensor(labels, dtype=torch.long), minlength=num_labels).double()
    noise = torch.randn(num_labels, generator=generator, dtype=torch.float64) * float(std)
    return [float(c) for c in (counts + noise).clamp_min(0.0)]


def is_dp_optimizer(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer`` is opacus' (per-example clipping and noise at its step)."""
    return isinstance(optimizer, DPOptimizer)


def accumulate_physical_batch_(optimizer: DPOptimizer) -> None:
    """Clip the per-example gradients of the physical batch just back-propagated and add them
    to the logical batch's sum, without an optimizer step, noise or an accounted step.

    Call it after every physical batch but the last of a logical (Poisson) batch; the
    last one's ``optimizer.step()`` then adds the noise once and steps. The same
    mechanism as opacus' ``BatchMemoryManager`` (``signal_skip_step``), for a loop that
    splits the logical batch itself.
    """
    optimizer.signal_skip_step(do_skip=True)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)  # drops grad_sample; a skipped step keeps the summed clipped grads


def empty_batch_step(optimizer: DPOptimizer) -> None:
    """Take the DP-SGD step for an empty Poisson batch: zero clipped sum plus noise.

    Skipping it would change the sampling the accountant assumes; HF models
    cannot run a forward pass on a 0-row batch, so no forward/backward is done.
    """
    for p in optimizer.params:
        p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
    optimizer.step()
