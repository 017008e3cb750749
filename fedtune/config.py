"""Run configuration, parsed once at the boundary into frozen dataclasses.

A run is described by a TOML file (see ``simulations/configs/``) with one table
per section, plus ``key=value`` overrides with dotted keys (``train.lr=2e-3``),
or by Flower's flat ``run_config`` (the same dotted keys). Everything is
validated before any training starts; every problem found is reported at once
in one :class:`~fedtune.errors.ConfigError` whose message names the keys.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedtune.errors import ConfigError
from fedtune.validation import Section, at_least, between, build_section, choice, fraction, only_with, positive

CLASSIFICATION = "classification"
CAUSAL_LM = "causal-lm"
LABEL_WORDS = "label-words"  # a causal LM scoring label words after a prompt (fedtune.labelwords)


POOLINGS = ("auto", "mean")


@dataclass(frozen=True)
class ModelConfig(Section):
    """The pre-trained base model.

    ``name`` is a bundled alias (``minilm``, ``smollm2``, ``tiny-bert``,
    ``tiny-llama``), a local directory holding a Hugging Face checkpoint, or a hub
    id (only when hub access is allowed, see ``fedtune.models``).

    ``num_labels``: the classifier's number of classes. Unset, it is the number of
    distinct labels in the data (as in Hugging Face's classification examples); set,
    it must equal that number (`fedtune.data.num_labels` refuses a conflict before
    any training). A deployment whose clients cannot read ``data.dataset`` sets it.
    """

    SECTION = "model"
    name: str = "minilm"
    task: str = "auto"
    num_labels: int | None = None
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
            e.append("model.name: must not be empty (got '')")
        choice(e, "model.pooling", self.pooling, POOLINGS)
        choice(e, "model.task", self.task, ("auto", CLASSIFICATION, CAUSAL_LM, LABEL_WORDS))
        choice(e, "model.dtype", self.dtype, ("auto", "float32", "bfloat16", "float16"))
        choice(e, "model.quantization", self.quantization, ("none", "4bit"))
        choice(e, "model.device", self.device, ("auto", "cpu", "cuda"))
        at_least(e, "model.num_labels", self.num_labels, 2)
        positive(e, "model.max_length", self.max_length)
        return e


@dataclass(frozen=True)
class AdapterConfig(Section):
    """The parameter-efficient adapter each client trains (through peft).

    ``method``: ``lora``, ``dora``, ``prompt``, ``head`` (a linear probe) or
    ``lora-sb`` (Fed-SB / LoRA-SB, `fedtune.lorasb`: A and B fixed from
    ``init_seed`` on every party, only an ``r`` x ``r`` core per adapted matrix and
    the head train and travel).

    ``sb_factors``: where LoRA-SB's fixed ``A`` and ``B`` come from (`fedtune.lorasb`).
    ``"random"``: scaled Gaussians drawn from ``init_seed``. ``"svd"``: the top-``r``
    singular vectors of each adapted base weight (LoRA-XS). ``"gradient"``: the top-``r``
    singular vectors of each adapted weight's gradient on ``sb_public_examples`` examples
    of the *public* dataset ``sb_public_data`` (LoRA-SB's initialisation, on public data
    as in Zhou et al. 2021's public gradient subspace), so the core trains where the
    task's gradient lies; every party computes it from the same public examples.
    ``sb_gradient_head``: the classifier head that gradient flows through. ``"seeded"``:
    the head as the model is built (random unless loaded); ``"prototypes"``: the
    nearest-class-mean head of the same public examples (`fedtune.prototypes`), so the
    gradient points where the task's classes separate instead of along a random head's
    direction; the model keeps its own head afterwards.

    ``head_init``: how a classifier's head starts. ``"random"``: as the model is built
    (seeded, the same on every party). ``"prototypes"``: before round 1 every node sends
    its per-class means of the pooled features the head sees, and the head starts as the
    nearest-class-mean classifier (`fedtune.prototypes`; what zeroth-order training
    needs, as it cannot train a random head).

    ``init_from``: start from an adapter a fedtune run exported (its ``RUN/adapter``
    directory, which holds ``fedtune_state.safetensors``) instead of the seeded one:
    continue a run under a new config, or train on public data first and on the
    private silos after. It replaces the whole adapter state (LoRA-SB's fixed factors
    included) on every party, so every party must hold the directory, like
    ``sb_public_data``, and the settings that would build the seeded state
    (``init_seed``, ``sb_*``) are refused with it; the model and the adapter's method,
    ``r``, ``alpha`` and target modules must be the ones it was trained with
    (`fedtune.workspace.init_state`).
    """

    SECTION = "adapter"
    method: str = "lora"
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ()
    num_virtual_tokens: int = 16
    ffa: bool = False
    init_seed: int = 0
    head_init: str = "random"
    sb_factors: str = "random"
    sb_public_data: str = ""
    sb_public_examples: int = 64
    sb_gradient_head: str = "seeded"
    init_from: str = ""

    def problems(self) -> list[str]:
        e: list[str] = []
        choice(e, "adapter.method", self.method, ("lora", "dora", "prompt", "head", "lora-sb"))
        if self.init_from and self.head_init == "prototypes":
            e.append(
                "adapter.head_init: 'prototypes' replaces the head before round 1, and adapter.init_from starts "
                f"from a trained one ({self.init_from!r}); use 'random' or leave init_from out"
            )
        for name in ("init_seed", "sb_factors", "sb_public_data", "sb_public_examples", "sb_gradient_head"):
            if self.init_from and self.changed(name) is not None:
                e.append(
                    f"adapter.{name}: the seeded adapter and LoRA-SB's factors come whole from adapter.init_from = "
                    f"{self.init_from!r}, so this would not be read; leave it out (got {getattr(self, name)!r})"
                )
        choice(e, "adapter.sb_factors", self.sb_factors, ("random", "svd", "gradient"))
        positive(e, "adapter.sb_public_examples", self.sb_public_examples)
        if self.sb_factors != "random" and self.method != "lora-sb":
            e.append(
                f"adapter.sb_factors: sets the fixed factors of adapter.method = 'lora-sb', and the method is "
                f"{self.method!r}; set adapter.method = 'lora-sb' or leave sb_factors out (got {self.sb_factors!r})"
            )
        if self.sb_factors == "gradient" and not self.sb_public_data:
            e.append(
                "adapter.sb_public_data: sb_factors = 'gradient' takes the gradient on public examples; name a "
                "bundled dataset or a file that every party holds (got '')"
            )
        if self.sb_public_data and self.sb_factors != "gradient":
            e.append(
                f"adapter.sb_public_data: only sb_factors = 'gradient' reads it, and sb_factors is "
                f"{self.sb_factors!r}; set sb_factors = 'gradient' or leave sb_public_data out "
                f"(got {self.sb_public_data!r})"
            )
        if self.changed("sb_public_examples") is not None and self.sb_factors != "gradient":
            e.append(
                f"adapter.sb_public_examples: only sb_factors = 'gradient' reads it, and sb_factors is "
                f"{self.sb_factors!r}; set sb_factors = 'gradient' or leave sb_public_examples out "
                f"(got {self.sb_public_examples!r})"
            )
        choice(e, "adapter.sb_gradient_head", self.sb_gradient_head, ("seeded", "prototypes"))
        if self.sb_gradient_head != "seeded" and self.sb_factors != "gradient":
            e.append(
                f"adapter.sb_gradient_head: picks the head of sb_factors = 'gradient', and sb_factors is "
                f"{self.sb_factors!r}; set sb_factors = 'gradient' or leave sb_gradient_head out "
                f"(got {self.sb_gradient_head!r})"
            )
        choice(e, "adapter.head_init", self.head_init, ("random", "prototypes"))
        positive(e, "adapter.r", self.r)
        positive(e, "adapter.alpha", self.alpha)
        positive(e, "adapter.num_virtual_tokens", self.num_virtual_tokens)
        between(e, "adapter.dropout", self.dropout, 0, 1, "[)")
        if self.ffa and self.method in ("prompt", "head"):
            e.append(
                f"adapter.ffa: FFA-LoRA freezes LoRA A matrices; adapter.method = {self.method!r} has none (got True)"
            )
        if self.ffa and self.method == "lora-sb":
            e.append(
                "adapter.ffa: FFA-LoRA trains B, and adapter.method = 'lora-sb' keeps A and B fixed and trains only "
                "the r x r core between them; set adapter.ffa = false (got True)"
            )
        return e


@dataclass(frozen=True)
class DataConfig(Section):
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
            e.append("data.dataset: must not be empty (got '')")
        choice(e, "data.partition", self.partition, ("iid", "dirichlet", "pathological", "domain"))
        between(e, "data.test_fraction", self.test_fraction, 0, 1, "()")
        positive(e, "data.dirichlet_alpha", self.dirichlet_alpha)
        positive(e, "data.labels_per_client", self.labels_per_client)
        for name in ("max_train_examples", "max_test_examples", "min_examples_per_client"):
            positive(e, f"data.{name}", getattr(self, name), allow_zero=True)
        return e


@dataclass(frozen=True)
class TrainConfig(Section):
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
    # The most examples one forward/backward pass holds (0: the whole batch at once). A larger
    # batch (DP-SGD's logical batch, e.g. 1024) runs in pieces of this size: their gradients
    # (DP-SGD: their clipped per-example gradients) are summed and the optimizer steps once;
    # DP-SGD's noise is added once per logical batch, so the accounting is unchanged.
    physical_batch_size: int = 0
    # Client learning rate across rounds: "constant", or "cosine" from lr in round 1
    # down to lr * lr_min_ratio in the last round (the local steps of one round share it).
    lr_schedule: str = "constant"
    lr_min_ratio: float = 0.1
    seed: int = 0

    def problems(self) -> list[str]:
        e: list[str] = []
        positive(e, "train.logit_adjustment", self.logit_adjustment, allow_zero=True)
        for name in ("local_steps", "batch_size", "lr", "eval_batch_size"):
            positive(e, f"train.{name}", getattr(self, name))
        positive(e, "train.physical_batch_size", self.physical_batch_size, allow_zero=True)
        choice(e, "train.optimizer", self.optimizer, ("adamw", "sgd"))
        choice(e, "train.mixed_precision", self.mixed_precision, ("no", "bf16", "auto"))
        choice(e, "train.lr_schedule", self.lr_schedule, ("constant", "cosine"))
        fraction(e, "train.lr_min_ratio", self.lr_min_ratio, open_low=False)
        only_with(
            e, "train.lr_min_ratio", self.changed("lr_min_ratio"), "train.lr_schedule", self.lr_schedule, ("cosine",)
        )
        choice(e, "train.mode", self.mode, ("backprop", "zo"))
        between(e, "train.momentum", self.momentum, 0, 1, "[)")
        # AdamW's momentum is its betas; 0 (the default) is no momentum, so it counts as unset
        only_with(e, "train.momentum", self.changed("momentum"), "train.optimizer", self.optimizer, ("sgd",))
        positive(e, "train.weight_decay", self.weight_decay, allow_zero=True)
        positive(e, "train.max_grad_norm", self.max_grad_norm, allow_zero=True)
        return e


SAMPLINGS = ("fixed", "poisson", "label-balanced")  # federation.sampling


def fixed_sample_size(available: int, fraction: float, minimum: int) -> int:
    """How many of ``available`` nodes a fixed-size round samples: ``fraction`` of them, at least ``minimum``."""
    return min(available, max(int(available * fraction), minimum))


@dataclass(frozen=True)
class FederationConfig(Section):
    """The federated loop run by the ServerApp.

    ``sampling`` picks each round's clients (seeded by (seed, round), `fedtune.flower.server`):
    ``"fixed"`` draws exactly `clients_per_round` of the available clients without
    replacement; ``"poisson"`` includes each available client independently with
    probability q = ``fraction_train``, so a round's count varies and may be 0, which is
    the sampler that client-level DP's accountant analyses exactly (`sample_rate`).
    Under ``"poisson"`` ``min_train_clients`` is no floor: drawing again until enough
    clients were in would change that analysis, so a value above the expected count
    is refused and a smaller one is not enforced. ``"label-balanced"`` draws as many
    clients as ``"fixed"``, chosen so that the round's pooled classes are as mixed as
    the federation's (`fedtune.flower.server.balanced_sample_nodes`): each client tells
    the server its count of training examples per class, once, with its partition id.
    """

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
    sampling: str = "fixed"

    @property
    def clients_per_round(self) -> int:
        """How many clients the server samples each round with all of them up (`sample_nodes`' rule);
        under ``"poisson"`` the whole part of the expected count (at least 1)."""
        return fixed_sample_size(self.num_clients, self.fraction_train, self.min_train_clients)

    @property
    def expected_clients_per_round(self) -> float:
        """The clients a round has on average with all of them up: q*N under ``"poisson"``, else
        `clients_per_round`; client-level DP's fixed denominator (McMahan et al. 2018)."""
        if self.sampling == "poisson":
            return self.fraction_train * self.num_clients
        return self.clients_per_round

    @property
    def sample_rate(self) -> float:
        """q, the probability that a given client is in a round, as client-level DP accounts it:
        ``fraction_train`` under ``"poisson"`` (exact), m/N under ``"fixed"`` (see
        `fedtune.privacy.client_level.central_accounting_statement`)."""
        if self.sampling == "poisson":
            return self.fraction_train
        return self.clients_per_round / self.num_clients

    def problems(self) -> list[str]:
        e: list[str] = []
        for name in (
            "num_clients",
            "rounds",
            "min_train_clients",
            "min_available_clients",
            "round_timeout",
            "eval_every",
        ):
            positive(e, f"federation.{name}", getattr(self, name))
        fraction(e, "federation.fraction_train", self.fraction_train)
        positive(e, "federation.round_eval_examples", self.round_eval_examples, allow_zero=True)
        for name in ("min_available_clients", "min_train_clients"):
            if getattr(self, name) > self.num_clients:
                e.append(
                    f"federation.{name}: must be at most federation.num_clients = {self.num_clients} "
                    f"(got {getattr(self, name)!r})"
                )
        choice(e, "federation.sampling", self.sampling, SAMPLINGS)
        expected = max(1, int(self.num_clients * self.fraction_train))
        if self.sampling == "poisson" and self.min_train_clients > expected:
            e.append(
                "federation.min_train_clients: federation.sampling = 'poisson' keeps no minimum (each client is in "
                "a round with probability federation.fraction_train, so a round may have fewer, even none; drawing "
                "again until enough were in would break the privacy analysis of that sampler); lower it to at most "
                f"{expected} (fraction_train x num_clients = {self.fraction_train * self.num_clients:g} expected a "
                "round), which is then not enforced, raise federation.fraction_train, or use federation.sampling = "
                f"'fixed' (got {self.min_train_clients!r})"
            )
        return e


_RAY_ADDRESS = re.compile(r"^(auto|(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+):\d{1,5})$")


@dataclass(frozen=True)
class SimulationConfig(Section):
    """Flower's simulation engine (Ray backend): a Ray instance of its own on this machine, or,
    with ``ray_address`` (``HOST:PORT`` of a head started with ``ray start --head``, or
    ``auto``), an existing Ray cluster whose nodes host the clients (``cpus_per_client`` and
    ``gpus_per_client`` are fitted on each node; ``cpus`` must stay 0, the cluster's own)."""

    SECTION = "simulation"
    backend: str = "ray"
    cpus: int = 0
    cpus_per_client: float = 1.0
    threads_per_client: int = 1
    gpus_per_client: float = 0.0
    ray_address: str = ""

    def problems(self) -> list[str]:
        e: list[str] = []
        choice(e, "simulation.backend", self.backend, ("ray",))
        positive(e, "simulation.cpus", self.cpus, allow_zero=True)
        if self.ray_address and not _RAY_ADDRESS.match(self.ray_address):
            e.append(f"simulation.ray_address: expected HOST:PORT of the Ray head or auto (got {self.ray_address!r})")
        if self.ray_address and self.cpus:
            e.append(
                f"simulation.cpus: must be 0 with simulation.ray_address, a cluster's CPUs are its nodes' "
                f"(got {self.cpus!r})"
            )
        positive(e, "simulation.cpus_per_client", self.cpus_per_client)
        positive(e, "simulation.threads_per_client", self.threads_per_client)
        positive(e, "simulation.gpus_per_client", self.gpus_per_client, allow_zero=True)
        return e


@dataclass(frozen=True)
class EvalConfig(Section):
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
        positive(e, "eval.rouge_examples", self.rouge_examples, allow_zero=True)
        positive(e, "eval.max_new_tokens", self.max_new_tokens)
        positive(e, "eval.forgetting_examples", self.forgetting_examples, allow_zero=True)
        choice(e, "eval.forgetting_source", self.forgetting_source, ("auto", "chatterbot", "rotten_tomatoes"))
        return e


@dataclass(frozen=True)
class OutputConfig(Section):
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


def _label_words_default():
    from fedtune.labelwords import LabelWordsConfig

    return LabelWordsConfig()


def _attack_default():
    from fedtune.attack import AttackConfig

    return AttackConfig()


@dataclass(frozen=True)
class FedtuneConfig:
    """The whole validated configuration of a run.

    The sections after ``eval`` belong to their packages (``fedtune.compression``,
    ``fedtune.privacy``, ``fedtune.aggregation``, ``fedtune.zo``, ...); every
    section is validated the same way (`fedtune.validation.Section`).
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
    label_words: Any = field(default_factory=_label_words_default)
    attack: Any = field(default_factory=_attack_default)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Nested plain dict (TOML- and JSON-serializable)."""
        out: dict[str, dict[str, Any]] = {}
        for f in dataclasses.fields(self):
            section = getattr(self, f.name)
            out[f.name] = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(section).items()}
        return out

    def to_flat(self) -> dict[str, Any]:
        """Flat dotted keys, the form of Flower's ``run_config``."""
        return {f"{s}.{k}": v for s, d in self.to_dict().items() for k, v in d.items()}

    def replace(self, **overrides: Any) -> FedtuneConfig:
        """Return a copy with dotted-key overrides applied and validated."""
        return from_dict(_merge(self.to_dict(), _nest({k.replace("__", "."): v for k, v in overrides.items()})))


_CORE = {
    "model": ModelConfig,
    "adapter": AdapterConfig,
    "data": DataConfig,
    "train": TrainConfig,
    "federation": FederationConfig,
    "simulation": SimulationConfig,
    "output": OutputConfig,
    "eval": EvalConfig,
}
_EXTENSIONS = ("compression", "privacy", "aggregation", "zo", "label_words", "attack")
SECTIONS = (*_CORE, *_EXTENSIONS)


def section_from_dict(cls: type, section: str, values: Mapping[str, Any]) -> Any:
    """Build one section dataclass from plain data, every problem (unknown keys, types, values) at once."""
    return build_section(cls, section, values)


def _section_class(name: str) -> type:
    if name in _CORE:
        return _CORE[name]
    return type(FedtuneConfig.__dataclass_fields__[name].default_factory())  # the extension's own class


def from_dict(data: Mapping[str, Any]) -> FedtuneConfig:
    """Validate a nested mapping (a parsed TOML file) into a :class:`FedtuneConfig`.

    Every section's problems are reported together; the checks across sections
    (`cross_section_problems`) run once every section is valid on its own.
    """
    unknown = sorted(set(data) - set(SECTIONS))
    errors: list[str] = []
    if unknown:
        errors.append(f"unknown section(s): {', '.join(unknown)} (known: {', '.join(SECTIONS)})")
    built: dict[str, Any] = {}
    for name in SECTIONS:
        try:
            built[name] = section_from_dict(_section_class(name), name, data.get(name, {}))
        except ConfigError as exc:
            errors.extend(exc.problems)
    if errors:
        raise ConfigError(errors)
    cfg = FedtuneConfig(**built)
    errors = cross_section_problems(cfg)
    if errors:
        raise ConfigError(errors)
    return cfg


def cross_section_problems(cfg: FedtuneConfig) -> list[str]:
    """Every setting that cannot be combined with another section's, each naming both keys.

    These are all the refusals a run can decide from its configuration alone, so
    ``fedtune check-config`` makes each of them before any run would.
    """
    errors: list[str] = []
    if cfg.model.quantization == "4bit" and cfg.model.device == "cpu":
        errors.append(
            "model.quantization: '4bit' cannot be combined with model.device = 'cpu' "
            "(QLoRA through bitsandbytes needs a CUDA device); use 'none' or device = 'cuda'"
        )
    if cfg.adapter.sb_factors in ("svd", "gradient") and cfg.model.quantization != "none":
        errors.append(
            f"adapter.sb_factors: {cfg.adapter.sb_factors!r} factors the base weights or their gradient, which "
            f"model.quantization = {cfg.model.quantization!r} does not keep in full precision; use sb_factors = "
            "'random' or quantization = 'none'"
        )
    if (
        cfg.adapter.sb_factors == "gradient"
        and cfg.privacy.mode != "none"
        and (cfg.adapter.sb_public_data == cfg.data.dataset)
    ):
        errors.append(
            f"adapter.sb_public_data: the factors would be a gradient of data.dataset itself, the data "
            f"privacy.mode = {cfg.privacy.mode!r} protects, and that gradient is not privatised; name a public "
            f"dataset (got {cfg.adapter.sb_public_data!r})"
        )
    if (
        cfg.privacy.mode == "sample"
        and cfg.train.logit_adjustment == 0
        and cfg.privacy.changed("label_noise") is not None
    ):
        errors.append(
            "privacy.label_noise: noises the label counts behind train.logit_adjustment, which is 0 (no counts are "
            f"released); unset it (got {cfg.privacy.label_noise!r})"
        )
    if cfg.privacy.mode == "sample" and cfg.adapter.method == "dora":
        errors.append(
            "privacy.mode: 'sample' cannot be combined with adapter.method = 'dora' "
            "(opacus cannot compute per-sample gradients of DoRA layers); use 'lora' or a client-level mode"
        )
    if (
        cfg.eval.forgetting_examples
        and cfg.eval.forgetting_source == "chatterbot"
        and (cfg.data.dataset == "chatterbot" and not cfg.data.domains)
    ):
        errors.append(
            "eval.forgetting_source: 'chatterbot' cannot be combined with data.dataset = 'chatterbot' and no "
            "data.domains (every category is tuned on, none is left to measure forgetting); set data.domains "
            "or use forgetting_source = 'rotten_tomatoes'"
        )
    errors.extend(_aggregation_problems(cfg))
    if cfg.federation.sampling == "label-balanced":
        errors.extend(_balanced_sampling_problems(cfg))
    if cfg.adapter.head_init == "prototypes":
        errors.extend(_head_init_problems(cfg))
    if cfg.adapter.sb_gradient_head == "prototypes" and cfg.model.task in (CAUSAL_LM, LABEL_WORDS):
        errors.append(
            f"adapter.sb_gradient_head: 'prototypes' builds a classification head from the public examples, "
            f"and model.task = {cfg.model.task!r} has none; leave it out (got 'prototypes')"
        )
    if cfg.train.mode == "zo":
        errors.extend(_zo_problems(cfg))
    else:  # a [zo] setting away from its default would be ignored by gradient training
        for f in dataclasses.fields(cfg.zo):
            only_with(errors, f"zo.{f.name}", cfg.zo.changed(f.name), "train.mode", cfg.train.mode, ("zo",))
    if cfg.aggregation.lora_mode == "hetero":
        errors.extend(_hetero_problems(cfg))
    if cfg.aggregation.secure != "none":
        errors.extend(_secure_problems(cfg))
    errors.extend(_budget_problems(cfg))
    from fedtune.privacy.config import adaptive_clip_problems

    # sigma_b scales with the estimator's denominator: m, or q*N under Poisson sampling
    errors.extend(adaptive_clip_problems(cfg.privacy, cfg.federation.expected_clients_per_round))
    from fedtune.labelwords import config_problems as label_words_problems

    errors.extend(label_words_problems(cfg))
    from fedtune.attack import config_problems as attack_problems

    errors.extend(attack_problems(cfg))
    return errors


def _aggregation_problems(cfg: FedtuneConfig) -> list[str]:
    """Aggregation settings that the adapter or the privacy mode would leave unused.

    Which step decides the new global state (`fedtune.flower.server`): client-central
    DP's private mean, else a LoRA-aware aggregator (``lora_mode`` exact / ffa /
    hetero), else the Flower strategy (a robust rule, else the server optimizer).
    A setting of a step that does not run would be computed and thrown away, so
    each such pair is refused, naming both keys (the pairs inside ``[aggregation]``
    are `AggregationConfig`'s own checks).
    """
    from fedtune.aggregation.config import SERVER_MEAN_OPTIMIZERS, multikrum_problems

    agg, e = cfg.aggregation, []
    e.extend(multikrum_problems(agg, cfg.federation))  # Multi-Krum's m against the round's size
    if agg.lora_mode in ("exact", "ffa") and cfg.adapter.method == "lora-sb":
        e.append(
            f"aggregation.lora_mode: {agg.lora_mode!r} cannot be combined with adapter.method = 'lora-sb' (only the "
            "r x r cores between fixed factors travel, and their plain mean is already the exact mean of the "
            "updates B R A); use 'naive'"
        )
    if agg.lora_mode in ("exact", "ffa") and cfg.adapter.method in ("head", "prompt"):
        e.append(
            f"aggregation.lora_mode: {agg.lora_mode!r} cannot be combined with adapter.method = "
            f"{cfg.adapter.method!r} (it aggregates LoRA factors, and this adapter has none); use 'naive'"
        )
    if (
        agg.lora_mode in ("exact", "ffa")
        and cfg.adapter.method in ("lora", "dora")
        and (agg.server_optimizer not in SERVER_MEAN_OPTIMIZERS)
    ):
        e.append(
            f"aggregation.server_optimizer: {agg.server_optimizer!r} cannot be combined with aggregation.lora_mode = "
            f"{agg.lora_mode!r} (the LoRA-aware {agg.lora_mode} aggregator decides the new global state, so the "
            "optimizer's step would never run); use 'fedavg' or 'fedprox', or lora_mode = 'naive'"
        )
    if agg.lora_mode == "ffa" and not cfg.adapter.ffa:
        e.append("aggregation.lora_mode: 'ffa' needs adapter.ffa = true (A frozen on every client), which is false")
    if agg.swa_start is not None and agg.swa_start > cfg.federation.rounds:
        e.append(
            f"aggregation.swa_start: round {agg.swa_start} is after the last round (federation.rounds = "
            f"{cfg.federation.rounds}), so no average would be taken; lower it or unset it"
        )
    if cfg.privacy.mode == "client-central":
        # DP-FedAvg's clipped, unweighted, noised mean replaces whatever the strategy or a LoRA aggregator computes
        why = "the server's DP-FedAvg step, a clipped mean plus Gaussian noise, replaces it"
        if agg.robust != "none":
            e.append(
                f"aggregation.robust: {agg.robust!r} cannot be combined with privacy.mode = 'client-central' ({why}); "
                "use robust = 'none', or privacy.mode = 'client-local' (clients add the noise, then the robust rule "
                "aggregates)"
            )
        if agg.server_optimizer not in SERVER_MEAN_OPTIMIZERS:
            e.append(
                f"aggregation.server_optimizer: {agg.server_optimizer!r} cannot be combined with privacy.mode = "
                f"'client-central' ({why}); use 'fedavg' or 'fedprox', or privacy.mode = 'client-local'"
            )
        if agg.lora_mode != "naive":
            hint = (
                " (with adapter.ffa = true, A is not trained and the private mean averages B only)"
                if (agg.lora_mode == "ffa")
                else ""
            )
            e.append(
                f"aggregation.lora_mode: {agg.lora_mode!r} cannot be combined with privacy.mode = 'client-central' "
                f"({why}, averaging each factor of same-shape deltas); use 'naive'{hint}, or privacy.mode = "
                "'client-local'"
            )
    if agg.server_optimizer == "scaffold":
        e.extend(_scaffold_problems(cfg))
    return e


def _scaffold_problems(cfg: FedtuneConfig) -> list[str]:
    """What SCAFFOLD's control variates cannot survive (`fedtune.aggregation.scaffold`).

    Its invariants are exact: the server adds the very update the client measured
    its drift on, and the client's correction reaches the optimizer's step. Robust
    rules, LoRA-aware aggregators, SecAgg+, client-central DP and zeroth-order
    rounds are refused for every server optimizer but FedAvg's mean
    (`AggregationConfig`, `_aggregation_problems`, `_zo_problems`).
    """
    e, comp = [], cfg.compression
    if comp.codec != "none":
        e.append(
            f"compression.codec: {comp.codec!r} cannot be combined with aggregation.server_optimizer = 'scaffold' "
            "(a client's c_i+ is computed from its exact update, while the server would add the decoded one, "
            "with the codec's error, to x); use 'none'"
        )
    if comp.downlink != "none":
        e.append(
            f"compression.downlink: {comp.downlink!r} cannot be combined with aggregation.server_optimizer = "
            "'scaffold' (clients would train from a compressed copy of x, so their c_i+ would measure the drift "
            "from that copy while the server adds their updates to x itself); use 'none'"
        )
    if cfg.privacy.mode == "sample":
        e.append(
            "privacy.mode: 'sample' cannot be combined with aggregation.server_optimizer = 'scaffold' (opacus "
            "replaces each gradient by the clipped, noised sum of per-sample gradients inside its step, so the "
            "correction c - c_i would be dropped); use 'none'"
        )
    if cfg.privacy.mode == "client-local":
        e.append(
            "privacy.mode: 'client-local' cannot be combined with aggregation.server_optimizer = 'scaffold' "
            "(delta_c_i is computed from the unclipped, un-noised update and would travel in the clear, outside "
            "the clipping and the accountant); use 'none'"
        )
    return e


def _balanced_sampling_problems(cfg: FedtuneConfig) -> list[str]:
    """What ``federation.sampling = 'label-balanced'`` (class counts sent in the clear, clients picked by them) cannot serve."""
    e: list[str] = []
    if cfg.model.task == CAUSAL_LM:
        e.append(
            "federation.sampling: 'label-balanced' balances the classes of a round's clients, and model.task = "
            "'causal-lm' has no classes; use 'fixed'"
        )
    if cfg.privacy.mode != "none":
        e.append(
            f"federation.sampling: 'label-balanced' cannot be combined with privacy.mode = {cfg.privacy.mode!r} "
            "(each client's class counts reach the server without noise, outside the privacy accounting, and "
            "choosing clients by them breaks the uniform or Poisson client sampling the accountant assumes); "
            "use 'fixed' or 'poisson'"
        )
    return e


def _head_init_problems(cfg: FedtuneConfig) -> list[str]:
    """What ``adapter.head_init = 'prototypes'`` (class means sent in the clear before round 1) cannot serve."""
    e: list[str] = []
    if cfg.model.task in (CAUSAL_LM, LABEL_WORDS):
        e.append(
            f"adapter.head_init: 'prototypes' initialises a classification head, and model.task = "
            f"{cfg.model.task!r} has none; use 'random' (got 'prototypes')"
        )
    if cfg.privacy.mode != "none":
        e.append(
            f"adapter.head_init: 'prototypes' cannot be combined with privacy.mode = {cfg.privacy.mode!r} (each "
            "client's class means of its raw embeddings are sent without clipping or noise, outside the privacy "
            "accounting); use 'random' (got 'prototypes')"
        )
    if cfg.aggregation.secure != "none":
        e.append(
            f"adapter.head_init: 'prototypes' cannot be combined with aggregation.secure = "
            f"{cfg.aggregation.secure!r} (the server would see each client's class means in the clear, which "
            "secure aggregation is meant to hide); use 'random' (got 'prototypes')"
        )
    return e


def _zo_problems(cfg: FedtuneConfig) -> list[str]:
    """What zeroth-order training (clients send (seed, scalar) pairs, the server averages scalars) ignores."""
    e: list[str] = []
    agg = cfg.aggregation
    if cfg.train.lr_schedule != "constant":
        e.append(
            f"train.lr_schedule: {cfg.train.lr_schedule!r} cannot be combined with train.mode = 'zo' (zeroth-order "
            "clients step with zo.lr in every round, not train.lr); use 'constant'"
        )
    if cfg.train.physical_batch_size:
        e.append(
            "train.physical_batch_size: cannot be combined with train.mode = 'zo' (zeroth-order clients evaluate "
            f"whole batches and do not split them); set it to 0 (got {cfg.train.physical_batch_size!r})"
        )
    if cfg.privacy.enabled:
        why = (
            "it has no per-sample gradients for DP-SGD"
            if cfg.privacy.mode == "sample"
            else ("no client-level mechanism is implemented for (seed, scalar) pairs")
        )
        e.append(f"privacy.mode: {cfg.privacy.mode!r} cannot be combined with train.mode = 'zo' ({why}); use 'none'")
    if cfg.compression.codec != "none":
        e.append(
            f"compression.codec: {cfg.compression.codec!r} cannot be combined with train.mode = 'zo' (zeroth-order "
            "clients already send only (seed, scalar) pairs); use 'none'"
        )
    if cfg.compression.downlink != "none":
        e.append(
            f"compression.downlink: {cfg.compression.downlink!r} cannot be combined with train.mode = 'zo' "
            "(the server broadcasts (seed, scalar) pairs); use 'none'"
        )
    why = "the server averages the clients' scalars of shared seeds, FedAvg"
    if agg.robust != "none":
        e.append(f"aggregation.robust: {agg.robust!r} cannot be combined with train.mode = 'zo' ({why}); use 'none'")
    if agg.server_optimizer != "fedavg":
        e.append(
            f"aggregation.server_optimizer: {agg.server_optimizer!r} cannot be combined with train.mode = 'zo' "
            f"({why}); use 'fedavg'"
        )
    if agg.lora_mode in ("exact", "ffa"):
        e.append(
            f"aggregation.lora_mode: {agg.lora_mode!r} cannot be combined with train.mode = 'zo' ({why}, never "
            "LoRA factors); use 'naive' (adapter.ffa = true still keeps A frozen)"
        )
    if agg.swa_start is not None:
        e.append(
            f"aggregation.swa_start: cannot be combined with train.mode = 'zo' (the global model is the seed history "
            f"replayed, there is no adapter to average); unset it (got {agg.swa_start!r})"
        )
    if agg.max_update_norm is not None:
        e.append(
            f"aggregation.max_update_norm: cannot be combined with train.mode = 'zo' (there is no update tensor to "
            f"bound); bound the scalars with zo.grad_clip (got {agg.max_update_norm!r})"
        )
    if cfg.zo.scope == "full" and cfg.model.quantization != "none":
        e.append(
            f"zo.scope: 'full' cannot be combined with model.quantization = {cfg.model.quantization!r} (it would "
            "perturb quantized base weights); use 'adapter'"
        )
    return e


def _budget_problems(cfg: FedtuneConfig) -> list[str]:
    """``privacy.budget_policy = 'refuse'``: the configured rounds must fit ``privacy.epsilon_budget``."""
    priv, fed = cfg.privacy, cfg.federation
    if not priv.client_level or priv.epsilon_budget is None or priv.budget_policy != "refuse":
        return []
    from fedtune.privacy import ClientLevelAccountant

    # the server's accountant (ServerLoop): central DP is amplified by client sampling, local DP is not
    rate = fed.sample_rate if priv.mode == "client-central" else None
    acc = ClientLevelAccountant.from_config(priv, sample_rate=rate)
    eps = acc.epsilon_after(fed.rounds)
    if eps <= priv.epsilon_budget:
        return []
    fit = max(acc.max_rounds_within(priv.epsilon_budget), 0)
    return [
        f"privacy.epsilon_budget: federation.rounds = {fed.rounds} would spend epsilon {eps:.4g} at delta "
        f"{priv.delta:g} (privacy.noise_multiplier = {priv.noise_multiplier:g}, client sampling rate "
        f"{acc.sample_rate:g}); at most {fit} rounds fit: lower federation.rounds, raise privacy.noise_multiplier, "
        f"raise the budget or set budget_policy = 'stop' (got {priv.epsilon_budget!r})"
    ]


def _secure_problems(cfg: FedtuneConfig) -> list[str]:
    """What ``aggregation.secure = 'secagg+'`` (the server sees only the sum) cannot be combined with."""
    e, comp, agg = [], cfg.compression, cfg.aggregation
    if comp.codec not in ("none", "randk"):
        # the masks cancel only in a sum of vectors over the same coordinates, on a grid shared by all clients
        e.append(
            f"compression.codec: {comp.codec!r} cannot be combined with aggregation.secure = 'secagg+' (SecAgg+ sums "
            "the clients' vectors under masks, so every client must send the same coordinates as plain numbers); "
            "use 'none' or 'randk' (coordinates drawn from the round seed, the same for every client)"
        )
    if comp.small_codec != "same":
        e.append(
            f"compression.small_codec: {comp.small_codec!r} cannot be combined with aggregation.secure = 'secagg+' "
            "(every tensor goes through compression.codec); set it to 'same'"
        )
    if comp.error_feedback:
        e.append("compression.error_feedback: not implemented with aggregation.secure = 'secagg+'; set it to false")
    m = cfg.federation.clients_per_round
    if isinstance(agg.modulus_range, int) and isinstance(agg.quantization_range, int):
        if m * agg.quantization_range >= agg.modulus_range:
            e.append(
                f"aggregation.modulus_range: the sum of {m} clients' quantized entries (each up to "
                f"aggregation.quantization_range = {agg.quantization_range}) would wrap around it; raise it above "
                f"{m * agg.quantization_range} or lower aggregation.quantization_range (got {agg.modulus_range})"
            )
    if cfg.compression.downlink != "none":
        e.append(
            "compression.downlink: not supported with aggregation.secure = 'secagg+' (the broadcast is the full adapter); set it to 'none'"
        )
    if cfg.privacy.mode == "client-central":
        e.append(
            "privacy.mode: 'client-central' clips each update on the server, which SecAgg+ hides; "
            "use 'client-local' or 'sample' with aggregation.secure = 'secagg+'"
        )
    if cfg.privacy.epsilon_budget is not None:
        e.append("privacy.epsilon_budget: not supported with aggregation.secure = 'secagg+'; unset it")
    if cfg.train.mode != "backprop":
        e.append(f"train.mode: aggregation.secure = 'secagg+' needs 'backprop' (dense deltas) (got {cfg.train.mode!r})")
    if cfg.federation.sampling == "poisson":
        e.append(
            "federation.sampling: 'poisson' cannot be combined with aggregation.secure = 'secagg+' (a Poisson round "
            "may sample fewer than the 2 clients, or the secret-sharing threshold, that SecAgg+ needs, and "
            "aggregation.modulus_range is sized for a fixed count); use sampling = 'fixed'"
        )
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
    if cfg.adapter.method == "lora-sb":
        e.append(
            "aggregation.lora_mode: 'hetero' re-factors A and B at each client's rank, and adapter.method = "
            "'lora-sb' keeps them fixed (a client's rank is the core's size); use 'naive'"
        )
    elif cfg.adapter.method not in ("lora", "dora"):
        e.append(
            f"aggregation.lora_mode: 'hetero' needs LoRA factors, which adapter.method = {cfg.adapter.method!r} has not (use 'lora' or 'dora')"
        )
    if cfg.adapter.ffa:
        e.append(
            "aggregation.lora_mode: 'hetero' re-factors A every round, so A cannot stay frozen; set adapter.ffa = false"
        )
    above = sorted({r for r in ranks if r > cfg.adapter.r})
    if above:
        e.append(
            f"aggregation.client_ranks: {above} above adapter.r = {cfg.adapter.r}, the rank of the global adapter; "
            f"set adapter.r = max(client_ranks) = {max(ranks)}"
        )
    if cfg.train.mode != "backprop":
        e.append(f"aggregation.lora_mode: 'hetero' needs train.mode = 'backprop', which is {cfg.train.mode!r}")
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


class _Unset:
    def __repr__(self) -> str:
        return "UNSET"


UNSET = _Unset()
"""An override's value that removes the key from the config file, so the setting takes its default."""


def parse_overrides(items: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """``["train.lr=2e-3", "~aggregation.server_lr"]`` -> ``{"train.lr": 0.002, "aggregation.server_lr": UNSET}``.

    ``~SECTION.KEY`` (Hydra's spelling) unsets a key the config file sets, so it
    falls back to its default: e.g. a file's ``server_lr`` when switching its
    server optimizer back to FedAvg, which takes none.
    """
    out: dict[str, Any] = {}
    for item in items:
        if item.startswith("~"):
            key = item[1:].strip()
            if "=" in key or "." not in key:
                raise ConfigError(f"--unset {key!r}: expected SECTION.KEY, e.g. aggregation.server_lr")
            out[key] = UNSET
            continue
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


def _read(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """One TOML config file as nested data, on top of the file its ``base`` key names (if any).

    ``base = "other.toml"`` (a path relative to this file) makes this file a variant:
    it holds only what it changes, key by key, section by section, as ``--set`` would.
    """
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}" + (f" (the base of {seen[-1]})" if seen else ""))
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str) or not base:
        raise ConfigError(f'{path}: base must name another config file, e.g. base = "default.toml" (got {base!r})')
    base_path = path.parent / base
    chain = (*seen, path)
    if any(base_path.resolve() == p.resolve() for p in chain):
        raise ConfigError(f"{path}: base = {base!r} makes a cycle: {' -> '.join(str(p) for p in (*chain, base_path))}")
    return _merge(_read(base_path, chain), data)


def _unset(data: dict[str, Any]) -> dict[str, Any]:
    """Drop the keys an override unsets (`UNSET`); each must be a setting fedtune has."""
    errors = []
    for section, values in data.items():
        if not isinstance(values, dict):
            continue
        for key in [k for k, v in values.items() if v is UNSET]:
            del values[key]
            fields = {f.name for f in dataclasses.fields(_section_class(section))} if section in SECTIONS else set()
            if key not in fields:
                errors.append(f"--unset {section}.{key}: there is no such setting")
    if errors:
        raise ConfigError(errors)
    return data


def load(path: str | Path | None = None, overrides: Mapping[str, Any] | None = None) -> FedtuneConfig:
    """Load a TOML config file (or the defaults) and apply dotted-key overrides (`UNSET` removes a key)."""
    data = _read(Path(path)) if path is not None else {}
    return from_dict(_unset(_merge(data, _nest(overrides or {}))))


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
    cfg = load(path, flat)
    from fedtune.attack import deployment_problems  # simulated attacks: tests only, outside simulations

    errors = deployment_problems(cfg)
    if errors:
        raise ConfigError(errors)
    return cfg


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
    # a basic string holds no raw control character (a template's newline)
    s = "".join(
        c if c >= " " and c != "\x7f" else {"\n": "\\n", "\t": "\\t", "\r": "\\r"}.get(c, f"\\u{ord(c):04x}") for c in s
    )
    return f'"{s}"'
