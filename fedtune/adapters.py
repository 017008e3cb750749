"""Parameter-efficient adapters through peft: LoRA, DoRA, prompt tuning, head only.

An adapter's *state* is the peft state dict (``get_peft_model_state_dict``):
LoRA A/B matrices (or DoRA magnitudes, or soft-prompt embeddings) plus, for
classification, the task head. Only the *trainable* part of it ever leaves a
client; with FFA-LoRA (Sun et al. 2024, arXiv:2403.12313) the A matrices stay
frozen at their shared initial value and only B and the head travel.

``method = "head"`` is a linear probe: only the classification head trains (the
DP-friendly choice: few coordinates to noise, Tramer & Boneh 2021,
arXiv:2011.11660). peft has no tuner without adapted modules, so the model carries
a LoRA whose A and B stay frozen at their initial value (B = 0: an exact
identity); the head is peft's ``modules_to_save`` as usual, and an exported
adapter loads with peft like any LoRA adapter.

``method = "lora-sb"`` is Fed-SB / LoRA-SB (Ponkshe et al. 2024/2025,
arXiv:2411.19557, arXiv:2502.15436; `fedtune.lorasb`): a peft LoRA whose A and
B are fixed, seeded factors shared by every party, with a trained r x r core R
between them; only R (and the head) trains and travels, FedAvg of R is exact, and
the export folds R into B, a plain LoRA adapter for peft's loader.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from fedtune.config import CAUSAL_LM, AdapterConfig
from fedtune.delta import Delta
from fedtune.errors import ConfigError

DEFAULT_TARGETS = {
    "bert": ("query", "value"),
    "llama": ("q_proj", "v_proj"),
    "gemma3_text": ("q_proj", "v_proj"),
    "gpt2": ("c_attn",),
}


def peft_config(cfg: AdapterConfig, task: str, model_type: str, tokenizer_path: str = ""):
    """Build the peft config for ``cfg`` on a model of ``model_type``."""
    from peft import LoraConfig, PromptTuningConfig, PromptTuningInit, TaskType

    task_type = TaskType.CAUSAL_LM if task == CAUSAL_LM else TaskType.SEQ_CLS
    if cfg.method == "head" and task == CAUSAL_LM:
        raise ConfigError(
            "adapter.method: 'head' trains only a classification head; a causal LM has none (use 'lora' or 'prompt')"
        )
    if cfg.method == "prompt":
        return PromptTuningConfig(
            task_type=task_type,
            num_virtual_tokens=cfg.num_virtual_tokens,
            prompt_tuning_init=PromptTuningInit.RANDOM,
        )
    targets = cfg.target_modules or DEFAULT_TARGETS.get(model_type)
    if not targets:
        raise ConfigError(
            f"adapter.target_modules: no default for model type {model_type!r}; "
            'name the linear layers to adapt, e.g. target_modules = ["q_proj", "v_proj"]'
        )
    return LoraConfig(
        task_type=task_type,
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=list(targets),
        use_dora=cfg.method == "dora",
    )  # "lora-sb": this LoRA, then `fedtune.lorasb.convert_` in `wrap`


def wrap(base, cfg: AdapterConfig, task: str):
    """Wrap a frozen base model with a fresh adapter, initialised from ``cfg.init_seed``."""
    from peft import get_peft_model

    pcfg = peft_config(cfg, task, base.config.model_type)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.init_seed)
        model = get_peft_model(base, pcfg)
    if cfg.method == "lora-sb":  # A and B fixed (adapter.sb_factors), only the r x r cores and the head train
        from fedtune import lorasb

        lorasb.convert_(model, cfg.init_seed, cfg.sb_factors)
    if cfg.ffa:  # FFA-LoRA: only B and the head train
        freeze_(model, ".lora_A.", ".lora_embedding_A.")
    if cfg.method == "head":  # every LoRA matrix (B = 0 at initialisation: an identity)
        freeze_(model, ".lora_")
    return model


def save_pretrained(model, path: str) -> None:
    """Save ``model``'s adapter in peft's format at ``path`` (LoRA-SB: as the plain LoRA it equals)."""
    from fedtune import lorasb

    if lorasb.is_lora_sb(model):
        lorasb.save_pretrained(model, path)
    else:
        model.save_pretrained(path)


def freeze_(model, *markers: str) -> None:
    """Stop training every parameter whose name contains one of ``markers`` (e.g. ``".lora_A."``)."""
    for name, p in model.named_parameters():
        if any(m in name for m in markers):
            p.requires_grad_(False)


def _peft_key(param_name: str, adapter_name: str = "default") -> str:
    # named_parameters: "...query.lora_A.default.weight"; peft state dict drops the adapter name
    return param_name.replace(f".{adapter_name}.", ".").replace(f".{adapter_name}", "")


def get_state(model) -> Delta:
    """The full adapter state (trainable and frozen parts), detached on the CPU, float32."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().to("cpu", torch.float32).clone() for k, v in get_peft_model_state_dict(model).items()}


def trainable_keys(model) -> list[str]:
    """Keys of the adapter state that are trained and therefore sent by clients."""
    state_keys = set(get_state_keys(model))
    keys = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if "prompt_encoder." in name:
            keys.append("prompt_embeddings")
            continue
        k = _peft_key(name)
        # modules_to_save: "classifier.modules_to_save.default.weight" -> "classifier.weight";
        # DoRA: "lora_magnitude_vector.default.weight" -> "lora_magnitude_vector"
        candidates = (k, k.replace(".modules_to_save", ""), k.removesuffix(".weight"))
        k = next((c for c in candidates if c in state_keys), "")
        if not k:
            raise RuntimeError(f"trainable parameter {name} has no key in the peft state dict")
        keys.append(k)
    return sorted(keys)


def get_state_keys(model) -> list[str]:
    from peft import get_peft_model_state_dict

    return list(get_peft_model_state_dict(model).keys())


def set_state_(model, state: Mapping[str, torch.Tensor]) -> None:
    """Load (part of) an adapter state into ``model`` in place; unknown keys are an error."""
    from peft import set_peft_model_state_dict

    known = set(get_state_keys(model))
    unknown = sorted(set(state) - known)
    if unknown:
        raise KeyError(f"adapter state has keys the model does not know: {unknown[:3]}")
    result = set_peft_model_state_dict(model, dict(state))
    # prompt learning: peft loads "prompt_embeddings" into the prompt encoder itself
    unexpected = [k for k in getattr(result, "unexpected_keys", []) if k != "prompt_embeddings"]
    if unexpected:
        raise KeyError(f"peft did not load keys: {unexpected[:3]}")


def num_trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
