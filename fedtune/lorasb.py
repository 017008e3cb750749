"""LoRA-SB / Fed-SB: train only an r x r matrix between two fixed LoRA factors.

Every adapted weight becomes ``W + s * B R A`` (``s = alpha / r``, peft's LoRA
scaling) with ``A`` (r x in) and ``B`` (out x r) *fixed* and identical on every
party, and only the ``r x r`` core ``R`` trained (Ponkshe et al., "Initialization
using update approximation is a silver bullet for extreme efficient low-rank
fine-tuning", arXiv:2411.19557; "Fed-SB: A Silver Bullet for Extreme Communication
Efficiency and Performance in (Private) Federated LoRA Fine-Tuning",
arXiv:2502.15436). Two consequences make it fit federated and private training:

- aggregation is exact: ``B mean(R) A = mean(B R A)``, so FedAvg of the cores
  (``aggregation.lora_mode = "naive"``) is the mean of the clients' updates, and a
  client sends ``r * r`` numbers per adapted matrix (plus the head);
- DP-SGD noises ``r * r`` coordinates per matrix instead of ``r * (in + out)``.

Initialisation (``adapter.sb_factors``). Every party computes the factors on its own,
so they never travel; ``R`` starts at zero, so the adapted model starts as the base
model, and the core still gets a gradient (``A`` and ``B`` are non-zero):

- ``"random"`` (default): ``A ~ N(0, 1/in)`` and ``B ~ N(0, 1/out)`` (near-orthonormal
  rows of ``A`` and columns of ``B`` for ``r << in, out``), drawn from one CPU
  ``torch.Generator`` seeded with ``adapter.init_seed`` in module order: bit-identical
  on every machine. The core then trains in a random subspace.
- ``"svd"`` (LoRA-XS: Bałazy et al., "LoRA-XS: Low-Rank Adaptation with Extremely Small
  Number of Parameters", arXiv:2405.17604): ``A = V_r^T`` and ``B = U_r``, the top-``r``
  right and left singular vectors of the adapted base weight (`svd_factors`), so ``B R A``
  moves the weight inside its principal subspace. Data-free; computed in float64 on the
  CPU with a fixed sign rule, so parties with the same base weights and torch build get
  the same factors (another LAPACK build may differ in the last bits of float32, which
  moves ``B mean(R) A`` by as little).
- ``"gradient"`` (LoRA-SB's own initialisation, `gradient_factors_`): ``A`` and ``B`` from
  the top-``r`` singular vectors of each adapted weight's gradient at the base model, taken
  on ``adapter.sb_public_examples`` examples (drawn with ``adapter.init_seed``) of a
  *public* dataset that every party holds (``adapter.sb_public_data``; using public data
  to find the gradient subspace of a private task is Zhou et al. 2021, arXiv:2007.03813).
  LoRA-SB takes it on the training data; here that would be a release of private data
  before round 1, so only public data is accepted (under DP, a dataset other than the
  private one). The gradient is taken in
  the model's dtype without autocast, so parties on the same hardware and torch build get
  the same bits; elsewhere the factors agree to float rounding unless two of the top
  singular values nearly tie.

The singular vectors are unit-norm like the random factors, so one learning rate serves
all three (LoRA-XS folds the singular values into ``B``; they are left out for that reason).

On top of peft: the model is an ordinary peft LoRA (``LoraConfig``); each LoRA
layer gets a ``lora_R`` ``ModuleDict`` holding an ``nn.Linear(r, r)`` (so opacus
computes per-example gradients with its stock Linear rule) and peft's LoRA-variant
hook (`LoraSBVariant`, the mechanism DoRA uses) applies it between ``A`` and ``B``.
The adapter state gains ``...lora_R.weight`` keys; `folded_state_dict` turns a
model back into a plain LoRA (``B' = B R``) that peft's own loader reads.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from peft.tuners.lora.layer import LoraLayer, LoraVariant
from torch import nn

from fedtune.errors import ConfigError

CORE = "lora_R"  # the attribute (and adapter-state key part) of the trained r x r cores


class LoraSBVariant(LoraVariant):
    """peft's LoRA-variant hooks (the mechanism behind DoRA) for ``x -> W x + s * B R A x``:
    the forward pass, and merging into ``W`` (``merge_and_unload``)."""

    @staticmethod
    def init(module, adapter_name: str, **kwargs) -> None:  # the cores are inserted by `convert_`
        return None

    @staticmethod
    def forward(module, active_adapter: str, x: torch.Tensor, result: torch.Tensor, **kwargs) -> torch.Tensor:
        a, b = module.lora_A[active_adapter], module.lora_B[active_adapter]
        core = getattr(module, CORE)[active_adapter]
        dropout = module.lora_dropout[active_adapter]
        return result + b(core(a(dropout(x)))) * module.scaling[active_adapter]

    @staticmethod
    def merge_safe(module, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        return orig_weight + delta_weight(module, active_adapter).to(orig_weight.dtype)

    @staticmethod
    def merge_unsafe(module, active_adapter: str, orig_weight: torch.Tensor) -> None:
        orig_weight.data += delta_weight(module, active_adapter).to(orig_weight.dtype)

    @staticmethod
    def unmerge(module, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        return orig_weight - delta_weight(module, active_adapter).to(orig_weight.dtype)


def fixed_factors(r: int, fan_in: int, fan_out: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, B)``: ``A`` (r x fan_in) ~ N(0, 1/fan_in), ``B`` (fan_out x r) ~ N(0, 1/fan_out), float32 on the CPU.

    Drawn from ``generator`` on the CPU, so the same seed gives the same bits on
    every machine (what lets every party hold the same fixed factors).
    """
    a = torch.randn(r, fan_in, generator=generator, dtype=torch.float32) / fan_in**0.5
    b = torch.randn(fan_out, r, generator=generator, dtype=torch.float32) / fan_out**0.5
    return a, b


def svd_factors(weight: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, B) = (V_r^T, U_r)`` of ``weight`` (out x in), float32 on the CPU (LoRA-XS).

    ``U_r`` and ``V_r`` are the left and right singular vectors of the ``r`` largest
    singular values, computed in float64 on the CPU. Signs are fixed as scikit-learn's
    ``svd_flip`` fixes them: the largest-magnitude entry of each column of ``U_r`` is
    positive (a singular pair is defined only up to a shared sign).
    """
    out_features, in_features = weight.shape
    if r > min(out_features, in_features):
        raise ConfigError(
            f"adapter.r: the fixed factors are the top r singular vectors of each adapted weight, and a "
            f"{out_features} x {in_features} weight has {min(out_features, in_features)}; lower adapter.r "
            f"(got {r})"
        )
    u, _, vh = torch.linalg.svd(weight.detach().to("cpu", torch.float64), full_matrices=False)
    u, vh = u[:, :r], vh[:r]
    signs = torch.sign(u.gather(0, u.abs().argmax(dim=0, keepdim=True)))
    signs[signs == 0] = 1.0
    return (vh * signs.T).float(), (u * signs).float()


def gradient_factors_(model: nn.Module, losses: Iterable[torch.Tensor]) -> int:
    """Give every LoRA-SB layer of ``model`` the `svd_factors` of its base weight's gradient; return how many.

    LoRA-SB's initialisation (Ponkshe et al.): the top-``r`` singular vectors of the
    full-weight gradient, so the ``r x r`` core holds the directions the task's gradient
    takes instead of random ones. ``losses`` yields the losses whose summed gradient is
    factored (one per batch, weighted by the caller); it is consumed with the adapted
    base weights requiring grad, at the model's present cores (zero for a fresh adapter:
    the base model's gradient). Only ``A`` and ``B`` change; every gradient is dropped.
    """
    layers = [m for m in model.modules() if isinstance(getattr(m, CORE, None), nn.ModuleDict)]
    if not layers:
        raise ValueError("gradient_factors_: the model has no LoRA-SB layer (convert_ it first)")
    weights = [m.get_base_layer().weight for m in layers]
    for w in weights:
        w.requires_grad_(True)
    try:
        for loss in losses:
            loss.backward()
        with torch.no_grad():
            for module, w in zip(layers, weights):
                if w.grad is None:
                    raise ValueError("gradient_factors_: a LoRA-SB layer got no gradient from the losses")
                grad = _out_by_in(module, w.grad)
                for adapter, lin_a in module.lora_A.items():
                    a, b = svd_factors(grad, lin_a.out_features)
                    lin_a.weight.copy_(a)
                    module.lora_B[adapter].weight.copy_(b)
    finally:
        for w in weights:
            w.requires_grad_(False)
        model.zero_grad(set_to_none=True)
    return len(layers)


def convert_(model: nn.Module, seed: int, factors: str = "random") -> int:
    """Turn every LoRA layer of a peft LoRA ``model`` into LoRA-SB in place; return how many.

    ``A`` and ``B`` get `fixed_factors` (``factors = "random"``, and ``"gradient"`` until
    `gradient_factors_` replaces them: one generator seeded with ``seed``, in module order)
    or `svd_factors` of the layer's base weight (``"svd"``) and stop training; a zero
    ``r x r`` core ``R`` is added and is the only LoRA parameter that trains (the task head, peft's
    ``modules_to_save``, trains as usual).
    """
    gen = torch.Generator().manual_seed(int(seed))
    variant = LoraSBVariant()
    converted = 0
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        if not module.lora_A or module.lora_embedding_A or module.lora_variant:
            raise ConfigError(
                f"adapter.method: 'lora-sb' needs plain linear LoRA layers; {name} is not one "
                f"(type {type(module).__name__}); adapt linear layers only (got 'lora-sb')"
            )
        cores = nn.ModuleDict()
        for adapter, lin_a in module.lora_A.items():
            lin_b = module.lora_B[adapter]
            if not isinstance(lin_a, nn.Linear) or not isinstance(lin_b, nn.Linear):
                raise ConfigError(
                    f"adapter.method: 'lora-sb' needs nn.Linear LoRA factors; {name} has "
                    f"{type(lin_a).__name__} (got 'lora-sb')"
                )
            r = lin_a.out_features
            if factors == "svd":
                a, b = svd_factors(_out_by_in(module, module.get_base_layer().weight), r)
            else:
                a, b = fixed_factors(r, lin_a.in_features, lin_b.out_features, gen)
            with torch.no_grad():
                lin_a.weight.copy_(a)
                lin_b.weight.copy_(b)
            lin_a.weight.requires_grad_(False)
            lin_b.weight.requires_grad_(False)
            # peft re-freezes these whenever it re-enables the adapter (set_adapter, after disable_adapter())
            module.frozen_peft_weight_names = {**module.frozen_peft_weight_names, adapter: ("lora_A", "lora_B")}
            core = nn.Linear(r, r, bias=False, device=lin_a.weight.device, dtype=lin_a.weight.dtype)
            nn.init.zeros_(core.weight)
            cores[adapter] = core
            module.lora_variant[adapter] = variant
        setattr(module, CORE, cores)
        # peft moves, deletes and (de)activates an adapter through these names
        module.adapter_layer_names = (*type(module).adapter_layer_names, CORE)
        converted += 1
    if not converted:
        raise ConfigError("adapter.method: 'lora-sb' found no LoRA layer to convert; check adapter.target_modules")
    return converted


def is_lora_sb(model: nn.Module) -> bool:
    """Whether ``model`` carries LoRA-SB cores (`convert_`)."""
    return any(isinstance(getattr(m, CORE, None), nn.ModuleDict) for m in model.modules())


def delta_weight(module, adapter: str = "default") -> torch.Tensor:
    """``s * B R A`` of one LoRA-SB layer, shaped like its base weight (transposed for Conv1D-style layers)."""
    b = module.lora_B[adapter].weight
    core = getattr(module, CORE)[adapter].weight
    a = module.lora_A[adapter].weight
    w = (b @ core @ a) * module.scaling[adapter]
    return _out_by_in(module, w)


def _out_by_in(module, t: torch.Tensor) -> torch.Tensor:
    """``t`` between the (out x in) layout and the layer's storage: transposed for Conv1D-style
    (``fan_in_fan_out``) layers, as is."""
    return t.T if getattr(module, "fan_in_fan_out", False) else t


def folded_state_dict(model: nn.Module, adapter: str = "default") -> dict[str, torch.Tensor]:
    """``model.state_dict()`` as a plain LoRA's: every ``lora_B`` replaced by ``B R``, the cores dropped.

    ``s * (B R) A = s * B R A``, so a plain LoRA with these factors (and the same
    ``r``, ``alpha``) computes what the LoRA-SB model computes.
    """
    prefix_of = {}
    for name, module in model.named_modules():
        cores = getattr(module, CORE, None)
        if isinstance(cores, nn.ModuleDict) and adapter in cores:
            prefix_of[f"{name}.lora_B.{adapter}.weight"] = (module, adapter)
    state = {}
    for k, v in model.state_dict().items():
        if f".{CORE}." in k:
            continue
        if k in prefix_of:
            module, name = prefix_of[k]
            v = (v @ getattr(module, CORE)[name].weight).detach()
        state[k] = v
    return state


def save_pretrained(model: nn.Module, path: str) -> None:
    """Save a LoRA-SB peft model as a plain peft LoRA adapter (``B`` folded with ``R``) at ``path``."""
    model.save_pretrained(path, state_dict=folded_state_dict(model))


__all__ = [
    "CORE",
    "LoraSBVariant",
    "convert_",
    "delta_weight",
    "fixed_factors",
    "folded_state_dict",
    "gradient_factors_",
    "is_lora_sb",
    "save_pretrained",
    "svd_factors",
]
