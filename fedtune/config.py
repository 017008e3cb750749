"""Run configuration, parsed once at the boundary into frozen dataclasses.

A run is described by a TOML file (see ``simulations/configs/``) with one table
per section, plus ``key=value`` overrides with dotted keys (``train.lr=2e-3``),
or by Flower's flat ``run_config`` (the same dotted keys). Everything is
validated before any training starts; every problem found is reported at once
in one :class:`~fedtune.errors.ConfigError` whose message names the keys.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedtune.errors import ConfigError

CLASSIFICATION = "classification"
CAUSAL_LM = "causal-lm"


def _choice(section: str, name: str, value: Any, allowed: tuple[str, ...], errors: list[str]) -> None:
    if value not in allowed:
        errors.append(f"{section}.{name}: {value!r} is not one of {', '.join(allowed)}")


def _positive(section: str, name: str, value: float | int | None, errors: list[str], *, allow_zero=False) -> None:
    if value is None:
        return
    if value < 0 or (value == 0 and not allow_zero):
        errors.append(f"{section}.{name}: must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")


def _fraction(section: str, name: str, value: float, errors: list[str], *, open_low=True) -> None:
    if not ((0 < value if open_low else 0 <= value) and value <= 1):
        errors.append(f"{section}.{name}: must be in {'(0, 1]' if open_low else '[0, 1]'}, got {value!r}")


class _Section:
    """Mixin: ``problems()`` lists every bad field; ``__post_init__`` raises them all in one ConfigError."""

    SECTION = ""

    def problems(self) -> list[str]:
        return []

    def __post_init__(self) -> None:
        errs = self.problems()
        if errs:
            raise ConfigError("invalid configuration:\n  " + "\n  ".join(errs))


POOLINGS = ("auto", "mean")


@dataclass(frozen=True)
class ModelConfig(_Section):
    """The pre-trained base model.

    ``name`` is a bundled alias (``minilm``, ``smollm2``, ``tiny-bert``,
    ``tiny-llama``), a local directory holding a Hugging Face checkpoint, or a hub
    id (only when hub access is allowed, see ``fedtune.models``).
    """

    SECTION = "model"
    name: str = "minilm"
    task: str = "auto"
    num_labels: int = 2
    max_length: int = 64
    dtype: str = "auto"
    quantization: str = "none"
    device: str = "auto"
    # "auto": the model's own classification head input (BERT: the [CLS] pooler);
    # "mean": the attention-masked mean of the last hidden states (how Sentence-Transformers
    # models such as all-MiniLM-L6-v2 were trained to embed a sentence), BERT-family classifiers only
    pooling: str = "auto"

    def problems(self) -> list[str]:
        e: list[str] = []
        if not self.name:
            e.append("model.name: must not be empty")
        _choice("model", "pooling", self.pooling, POOLINGS, e)
        _choice("model", "task", self.task, ("auto", CLASSIFICATION, CAUSAL_LM), e)
        _choice("model", "dtype", self.dtype, ("auto", "float32", "bfloat16", "float16"), e)
        _choice("model", "quantization", self.quantization, ("none", "4bit"), e)
        _choice("model", "device", self.device, ("auto", "cpu", "cuda"), e)
        if self.num_labels < 2:
            e.append(f"model.num_labels: must be >= 2, got {self.num_labels!r}")
        _positive("model", "max_length", self.max_length, e)
        return e


@dataclass(frozen=True)
class AdapterConfig(_Section):
    """The parameter-efficient adapter each client trains (through peft)."""

    SECTION = "adapter"
    method: str = "lora"
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ()
    num_virtual_tokens: int = 16
    ffa: bool = False
    init_seed: int = 0

    def problems(self) -> list[str]:
        e: list[str] = []
        _choice("adapter", "method", self.method, ("lora", "dora", "prompt", "head"), e)
        _positive("adapter", "r", self.r, e)
        _positive("adapter", "alpha", self.alpha, e)
        _positive("adapter", "num_virtual_tokens", self.num_virtual_tokens, e)
        if not 0 <= self.dropout < 1:
            e.append(f"adapter.dropout: must be in [0, 1), got {self.dropout!r}")
        if self.ffa and self.method in ("prompt", "head"):
            e.append(f"adapter.ffa: FFA-LoRA freezes LoRA A matrices; it does not apply to method {self.method!r}")
        return e


@dataclass(frozen=True)
class DataConfig(_Section):
    """Where the examples come from and how they are split among clients.

    ``dataset`` is a bundled name (``rotten_tomatoes``, ``imdb``, ``chatterbot``)
    or a local CSV / JSONL / parquet file.
    """

    SECTION = "data"
    dataset: str = "rotten_tomatoes"
    text_column: str = "text"
    label_column: str = "label"
    prompt_column: str = "prompt"
    response_column: str = "response"
    domain_column: str = "domain"
    domains: tuple[str, ...] = ()
    test_fraction: float = 0.2
    max_train_examples: int = 0
    max_test_examples: int = 0
    partition: str = "dirichlet"
    dirichlet_alpha: float = 0.5
    labels_per_client: int = 1
    min_examples_per_client: int = 8
    seed: int = 0

    def problems(self) -> list[str]:
        e: list[str] = []
        if not self.dataset:
            e.append("data.dataset: must not be empty")
        _choice("data", "partition", self.partition, ("iid", "dirichlet", "pathological", "domain"), e)
        if not 0 < self.test_fraction < 1:
            e.append(f"data.test_fraction: must be in (0, 1), got {self.test_fraction!r}")
        _positive("data", "dirichlet_alpha", self.dirichlet_alpha, e)
        _positive("data", "labels_per_client", self.labels_per_client, e)
        _positive("data", "max_train_examples", self.max_train_examples, e, allow_zero=True)
        _positive("data", "max_test_examples", self.max_test_examples, e, allow_zero=True)
        _positive("data", "min_examples_per_client", self.min_examples_per_client, e, allow_zero=True)
        return e


@dataclass(frozen=True)
class TrainConfig(_Section):
    """Local training on each client."""

    SECTION = "train"
    mode: str = "backprop"
    local_steps: int = 30
    batch_size: int = 16
    optimizer: str = "adamw"
    lr: float = 1e-3
    momentum: float = 0.0
    weight_decay: float = 0.0
    eval_batch_size: int = 64
    max_grad_norm: float = 0.0
    logit_adjustment: float = 0.0
    # "bf16": forward passes autocast to bfloat16 (HF Trainer's bf16=True); weights,
    # gradients and optimizer state stay float32. ~1.7x faster on CPUs with AVX512-BF16/AMX.
    # "auto": bf16 where the device has native bfloat16 matmuls, else float32.
    mixed_precision: str = "no"
    # Client learning rate across rounds: "constant", or "cosine" from lr in round 1
    # down to lr * lr_min_ratio in the last round (the local steps of one round share it).
    lr_schedule: str = "constant"
    lr_min_ratio: float = 0.1
    seed: int = 0

    def problems(self) -> list[str]:
        e: list[str] = []
        _positive("train", "logit_adjustment", self.logit_adjustment, e, allow_zero=True)
        for name in ("local_steps", "batch_size", "lr", "eval_batch_size"):
            _positive("train", name, getattr(self, name), e)
        _choice("train", "optimizer", self.optimizer, ("adamw", "sgd"), e)
        _choice("train", "mixed_precision", self.mixed_precision, ("no", "bf16", "auto"), e)
        _choice("train", "lr_schedule", self.lr_schedule, ("constant", "cosine"), e)
        _fraction("train", "lr_min_ratio", self.lr_min_ratio, e, open_low=False)
        _choice("train", "mode", self.mode, ("backprop", "zo"), e)
        if not 0 <= self.momentum < 1:
            e.append(f"train.momentum: must be in [0, 1), got {self.momentum!r}")
        _positive("train", "weight_decay", self.weight_decay, e, allow_zero=True)
        _positive("train", "max_grad_norm", self.max_grad_norm, e, allow_zero=True)
        return e


@dataclass(frozen=True)
class FederationConfig(_Section):
    """The federated loop run by the ServerApp."""

    SECTION = "federation"
    num_clients: int = 10
    rounds: int = 5
    fraction_train: float = 0.5
    min_train_clients: int = 2
    min_available_clients: int = 2
    round_timeout: float = 600.0
    eval_every: int = 1
    round_eval_examples: int = 0
    seed: int = 0

    @property
    def clients_per_round(self) -> int:
        """How many clients the server samples each round with all of them up (`sample_nodes`' rule)."""
        return min(self.num_clients, max(int(self.num_clients * self.fraction_train), self.min_train_clients))

    def problems(self) -> list[str]:
        e: list[str] = []
        for name in ("num_clients", "rounds", "min_train_clients", "min_available_clients", "round_timeout", "eval_every"):
            _positive("federation", name, getattr(self, name), e)
        _fraction("federation", "fraction_train", self.fraction_train, e)
        _positive("federation", "round_eval_examples", self.round_eval_examples, e, allow_zero=True)
        if self.min_available_clients > self.num_clients:
            e.append(
                f"federation.min_available_clients: {self.min_available_clients} is more than "
                f"federation.num_clients ({self.num_clients})"
            )
        if self.min_train_clients > self.num_clients:
            e.append(
                f"federation.min_train_clients: {self.min_train_clients} is more than "
                f"federation.num_clients ({self.num_clients})"
            )
        return e


@dataclass(frozen=True)
class SimulationConfig(_Section):
    """Flower's simulation engine (Ray backend) on one machine."""

    SECTION = "simulation"
    backend: str = "ray"
    cpus: int = 0
    cpus_per_client: float = 1.0
    threads_per_client: int = 1
    gpus_per_client: float = 0.0

    def problems(self) -> list[str]:
        e: list[str] = []
        _choice("simulation", "backend", self.backend, ("ray",), e)
        _positive("simulation", "cpus", self.cpus, e, allow_zero=True)
        _positive("simulation", "cpus_per_client", self.cpus_per_client, e)
        _positive("simulation", "threads_per_client", self.threads_per_client, e)
        _positive("simulation", "gpus_per_client", self.gpus_per_client, e, allow_zero=True)
        return e


@dataclass(frozen=True)
class EvalConfig(_Section):
    """Optional held-out metrics for causal LMs, computed at every evaluation (see ``fedtune.metrics``).

    ``rouge_examples`` held-out prompts are answered by greedy generation (at most
    ``max_new_tokens`` tokens) and scored with ROUGE-L F1 against the reference
    responses. ``forgetting_examples`` texts from ``forgetting_source``, never used
    for tuning, give a perplexity to compare before (round 0) and after tuning:
    ``auto`` takes the chatterbot categories left out of ``data.domains`` when
    tuning on chatterbot with a subset of domains, else Rotten Tomatoes review text
    (``rotten_tomatoes``); ``chatterbot`` forces the former. 0 turns a metric off.
    """

    SECTION = "eval"
    rouge_examples: int = 0
    max_new_tokens: int = 32
    forgetting_examples: int = 0
    forgetting_source: str = "auto"

    def problems(self) -> list[str]:
        e: list[str] = []
        _positive("eval", "rouge_examples", self.rouge_examples, e, allow_zero=True)
        _positive("eval", "max_new_tokens", self.max_new_tokens, e)
        _positive("eval", "forgetting_examples", self.forgetting_examples, e, allow_zero=True)
        _choice("eval", "forgetting_source", self.forgetting_source, ("auto", "chatterbot", "rotten_tomatoes"), e)
        return e


@dataclass(frozen=True)
class OutputConfig(_Section):
    """Where a run writes its adapter, metrics and summary."""

    SECTION = "output"
    dir: str = ""
    name: str = "run"
    save_adapter: bool = True

    def problems(self) -> list[str]:
        return []


def _compression_default():
    from fedtune.compression import CompressionConfig

    return CompressionConfig()


def _privacy_default():
    from fedtune.privacy import PrivacyConfig

    return PrivacyConfig()


def _aggregation_default():
    from fedtune.aggregation import AggregationConfig

    return AggregationConfig()


def _zo_default():
    from fedtune.zo import ZOConfig

    return ZOConfig()


@dataclass(frozen=True)
class FedtuneConfig:
    """The whole validated configuration of a run.

    The last four sections belong to their packages (``fedtune.compression``,
    ``fedtune.privacy``, ``fedtune.aggregation``, ``fedtune.zo``), which
    validate them with their own ``from_dict``.
    """

    model: ModelConfig = field(default_factory=ModelConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    simulation: SimulationConfig = field(default_factory=SimulationConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    compression: Any = field(default_factory=_compression_default)
    privacy: Any = field(default_factory=_privacy_default)
    aggregation: Any = field(default_factory=_aggregation_default)
    zo: Any = field(default_factory=_zo_default)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Nested plain dict (TOML- and JSON-serializable)."""
        out: dict[str, dict[str, Any]] = {}
        for f in dataclasses.fields(self):
            section = getattr(self, f.name)
            out[f.name] = {
                k: list(v) if isinstance(v, tuple) else v
                for k, v in dataclasses.asdict(section).items()
            }
        return out

    def to_flat(self) -> dict[str, Any]:
        """Flat dotted keys, the form of Flower's ``run_config``."""
        return {f"{s}.{k}": v for s, d in self.to_dict().items() for k, v in d.items()}

    def replace(self, **overrides: Any) -> FedtuneConfig:
        """Return a copy with dotted-key overrides applied and validated."""
        return from_dict(_merge(self.to_dict(), _nest({k.replace("__", "."): v for k, v in overrides.items()})))


_CORE = {
    "model": ModelConfig, "adapter": AdapterConfig, "data": DataConfig, "train": TrainConfig,
    "federation": FederationConfig, "simulation": SimulationConfig, "output": OutputConfig,
    "eval": EvalConfig,
}
_EXTENSIONS = ("compression", "privacy", "aggregation", "zo")
SECTIONS = (*_CORE, *_EXTENSIONS)


def _coerce(section: str, name: str, tp: Any, value: Any) -> Any:
    """Convert a TOML / run_config value to the declared field type, or raise."""
    origin = typing.get_origin(tp)
    where = f"{section}.{name}"
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return int(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if origin is tuple:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item_tp, _ellipsis) = typing.get_args(tp)
        return tuple(_coerce(section, name, item_tp, v) for v in value)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(section, name, args[0], value)
    return value


def section_from_dict(cls: type, section: str, values: Mapping[str, Any]) -> Any:
    """Build one section dataclass, rejecting unknown keys and wrong types."""
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise ConfigError(
            f"unknown key(s) in [{section}]: {', '.join(unknown)} (known: {', '.join(sorted(fields))})"
        )
    kwargs = {k: _coerce(section, k, hints[k], v) for k, v in values.items()}
    return cls(**kwargs)


def from_dict(data: Mapping[str, Any]) -> FedtuneConfig:
    """Validate a nested mapping (a parsed TOML file) into a :class:`FedtuneConfig`."""
    unknown = sorted(set(data) - set(SECTIONS))
    errors: list[str] = []
    if unknown:
        errors.append(f"unknown section(s): {', '.join(unknown)} (known: {', '.join(SECTIONS)})")
    built: dict[str, Any] = {}
    for name in SECTIONS:
        values = data.get(name, {})
        if not isinstance(values, Mapping):
            errors.append(f"[{name}] must be a table, got {values!r}")
            continue
        try:
            if name in _CORE:
                built[name] = section_from_dict(_CORE[name], name, values)
            else:
                ext_cls = type(FedtuneConfig.__dataclass_fields__[name].default_factory())
                built[name] = ext_cls.from_dict(dict(values))
        except ConfigError as exc:
            for line in str(exc).removeprefix("invalid configuration:\n  ").split("\n  "):
                errors.append(line if name in _CORE or line.startswith(f"{name}.") else f"{name}.{line}")
        except (TypeError, ValueError) as exc:
            errors.append(f"[{name}]: {exc}")
    if errors:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(errors))
    cfg = FedtuneConfig(**built)
    _cross_check(cfg)
    return cfg


def _cross_check(cfg: FedtuneConfig) -> None:
    errors: list[str] = []
    if cfg.model.quantization == "4bit" and cfg.model.device == "cpu":
        errors.append("model.quantization: '4bit' (QLoRA through bitsandbytes) needs a CUDA device, model.device is 'cpu'")
    if cfg.privacy.mode == "sample" and cfg.adapter.method == "dora":
        errors.append(
            "privacy.mode: sample-level DP-SGD cannot be combined with adapter.method = 'dora' "
            "(opacus cannot compute per-sample gradients of DoRA layers); use 'lora' or a client-level mode"
        )
    if cfg.adapter.method == "head" and cfg.aggregation.lora_mode != "naive":
        errors.append(
            f"aggregation.lora_mode: {cfg.aggregation.lora_mode!r} aggregates LoRA factors; adapter.method = 'head' "
            "trains none (set lora_mode = 'naive')"
        )
    if cfg.train.mode == "zo" and cfg.privacy.mode == "sample":
        errors.append("train.mode: zeroth-order training has no per-sample gradients for DP-SGD; use a client-level privacy mode")
    if cfg.train.mode == "zo" and cfg.compression.codec != "none":
        errors.append("compression.codec: zeroth-order mode already sends only (seed, scalar) pairs; set it to 'none'")
    agg = cfg.aggregation
    if agg.lora_mode == "ffa" and not cfg.adapter.ffa:
        errors.append("aggregation.lora_mode: 'ffa' needs adapter.ffa = true (A frozen on every client)")
    if agg.lora_mode == "hetero":
        errors.extend(_hetero_problems(cfg))
    if agg.lora_mode == "exact" and agg.server_optimizer not in ("fedavg", "fedprox"):
        errors.append(
            f"aggregation.lora_mode: 'exact' re-factors the mean product; it cannot be combined with "
            f"server_optimizer = {agg.server_optimizer!r} (use fedavg or fedprox)"
        )
    if agg.secure != "none":
        errors.extend(_secure_problems(cfg))
    if errors:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(errors))


def _secure_problems(cfg: FedtuneConfig) -> list[str]:
    """What ``aggregation.secure = 'secagg+'`` (the server sees only the sum) cannot be combined with."""
    e = []
    if cfg.compression.codec != "none":
        e.append(
            f"compression.codec: SecAgg+ quantizes the dense delta itself and sums it under masks; "
            f"{cfg.compression.codec!r} cannot be summed that way, set it to 'none' (aggregation.secure = 'secagg+')"
        )
    if cfg.compression.downlink != "none":
        e.append("compression.downlink: not supported with aggregation.secure = 'secagg+' (the broadcast is the full adapter); set it to 'none'")
    if cfg.privacy.mode == "client-central":
        e.append(
            "privacy.mode: 'client-central' clips each update on the server, which SecAgg+ hides; "
            "use 'client-local' or 'sample' with aggregation.secure = 'secagg+'"
        )
    if cfg.privacy.epsilon_budget is not None:
        e.append("privacy.epsilon_budget: not supported with aggregation.secure = 'secagg+'; unset it")
    if cfg.train.mode != "backprop":
        e.append(f"train.mode: aggregation.secure = 'secagg+' needs 'backprop' (dense deltas), got {cfg.train.mode!r}")
    sampled = cfg.federation.clients_per_round
    if sampled < 2:
        e.append(
            f"federation.min_train_clients: SecAgg+ needs at least 2 clients a round; this config samples {sampled} "
            "(raise federation.min_train_clients or federation.fraction_train)"
        )
    return e


def _hetero_problems(cfg: FedtuneConfig) -> list[str]:
    """What ``aggregation.lora_mode = 'hetero'`` (clients at their own LoRA rank) cannot be combined with."""
    e: list[str] = []
    ranks = cfg.aggregation.client_ranks or ()
    if cfg.adapter.method not in ("lora", "dora"):
        e.append(f"aggregation.lora_mode: 'hetero' needs LoRA factors; adapter.method is {cfg.adapter.method!r} (use 'lora' or 'dora')")
    if cfg.adapter.ffa:
        e.append("aggregation.lora_mode: 'hetero' re-factors A every round, so A cannot stay frozen; set adapter.ffa = false")
    above = sorted({r for r in ranks if r > cfg.adapter.r})
    if above:
        e.append(
            f"aggregation.client_ranks: {above} above adapter.r = {cfg.adapter.r}, the rank of the global adapter; "
            f"set adapter.r = max(client_ranks) = {max(ranks)}"
        )
    if cfg.train.mode != "backprop":
        e.append(f"aggregation.lora_mode: 'hetero' needs train.mode = 'backprop', got {cfg.train.mode!r}")
    if cfg.privacy.mode == "client-central":
        e.append(
            "privacy.mode: 'client-central' averages same-shape deltas on the server; it cannot be combined with "
            "aggregation.lora_mode = 'hetero' (use 'client-local' or 'sample')"
        )
    if cfg.compression.downlink != "none":
        e.append(
            "compression.downlink: the compressed broadcast is one copy for all clients, but with "
            "aggregation.lora_mode = 'hetero' each client gets the global at its own rank; set it to 'none'"
        )
    return e


def parse_value(text: str) -> Any:
    """Parse the right-hand side of ``--set key=value`` as a TOML value, else a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def parse_overrides(items: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """``["train.lr=2e-3", "data.partition=iid"]`` -> ``{"train.lr": 0.002, ...}``."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or "." not in key:
            raise ConfigError(f"--set {item!r}: expected SECTION.KEY=VALUE, e.g. train.lr=2e-3")
        out[key] = parse_value(value.strip())
    return out


def _nest(flat: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    nested: dict[str, dict[str, Any]] = {}
    for key, value in flat.items():
        section, sep, name = key.partition(".")
        if not sep or not name:
            raise ConfigError(f"config key {key!r}: expected SECTION.KEY")
        nested.setdefault(section, {})[name] = value
    return nested


def _merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = {k: dict(v) if isinstance(v, Mapping) else v for k, v in base.items()}
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = {**out[k], **v}
        else:
            out[k] = v
    return out


def load(path: str | Path | None = None, overrides: Mapping[str, Any] | None = None) -> FedtuneConfig:
    """Load a TOML config file (or the defaults) and apply dotted-key overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            data = tomllib.loads(p.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {p} is not valid TOML: {exc}") from None
    return from_dict(_merge(data, _nest(overrides or {})))


def from_run_config(run_config: Mapping[str, Any], base_dir: str | Path | None = None) -> FedtuneConfig:
    """Parse Flower's flat ``run_config``.

    The key ``config`` (optional) names a TOML file, relative to ``base_dir``;
    ``overrides`` (optional) is a space-separated list of ``SECTION.KEY=VALUE``
    (Flower only accepts run-config keys declared in ``pyproject.toml``, so
    fedtune's own keys travel inside this one string); ``resume`` is the
    ServerApp's switch (see `fedtune.flower.apps`), not part of the config; any
    other key is a dotted override itself.
    """
    import shlex

    flat = dict(run_config)
    flat.pop("resume", None)
    path = flat.pop("config", None)
    packed = flat.pop("overrides", "")
    if packed:
        flat.update(parse_overrides(shlex.split(str(packed))))
    if path:
        p = Path(path)
        if not p.is_absolute() and base_dir is not None:
            p = Path(base_dir) / p
        path = p
    return load(path, flat)


def to_toml(cfg: FedtuneConfig) -> str:
    """Serialize a config back to TOML (for the run directory)."""
    lines: list[str] = []
    for name, values in cfg.to_dict().items():
        lines.append(f"[{name}]")
        for k, v in values.items():
            if v is None:
                continue
            lines.append(f"{k} = {_toml_value(v)}")
        lines.append("")
    return "\n".join(lines)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    s = str(v).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{s}"'
