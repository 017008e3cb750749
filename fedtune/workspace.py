"""A process's loaded model and data, built once and reused across rounds.

Loading a base model costs seconds; a round swaps only adapter weights. One
:class:`Workspace` per (model, adapter, data) configuration is cached per process,
so a Flower simulation actor or a long-lived SuperNode client loads the base
model once.
"""

from __future__ import annotations

import json
import threading
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from fedtune import adapters, data, models
from fedtune.config import CAUSAL_LM, CLASSIFICATION, LABEL_WORDS, FedtuneConfig
from fedtune.delta import Delta
from fedtune.errors import ConfigError


@dataclass
class Workspace:
    cfg: FedtuneConfig
    resolved: models.ResolvedModel
    tokenizer: object
    model: object  # peft model
    device: torch.device
    splits: data.Splits | None = None
    _client_data: dict[int, list[dict]] = field(default_factory=dict)
    _test_data: list[dict] | None = None
    _parts: list[list[int]] | None = None
    _initial: Delta | None = None
    _files: dict[str, list[dict]] = field(default_factory=dict)
    _rank_models: dict[int, object] = field(default_factory=dict)
    label_word_ids: tuple | None = None  # model.task = "label-words": class -> word -> token ids

    @property
    def task(self) -> str:
        return self.resolved.task

    @property
    def pad_id(self) -> int:
        return int(self.tokenizer.pad_token_id)

    def initial_state(self) -> Delta:
        """The adapter as first built (from ``adapter.init_seed``): identical on every party."""
        if self._initial is None:
            self._initial = adapters.get_state(self.model)
        return {k: v.clone() for k, v in self._initial.items()}

    def model_for_rank(self, rank: int):
        """The peft model with LoRA at ``rank`` (heterogeneous ranks): ``model`` itself at
        ``adapter.r``, else one built on a second copy of the base model, cached per rank.

        A second base copy costs its memory once per rank a process serves; peft
        injects LoRA layers into the base in place, so two ranks cannot share one.
        """
        if rank == self.cfg.adapter.r:
            return self.model
        if rank not in self._rank_models:
            model_cfg = (
                replace(self.cfg.model, num_labels=self.num_labels) if self.task == CLASSIFICATION else self.cfg.model
            )
            base = models.load_base(self.resolved, model_cfg, self.tokenizer, self.device)
            self._rank_models[rank] = adapters.wrap(
                base, replace(self.cfg.adapter, r=rank), models.architecture_task(self.task)
            )
        return self._rank_models[rank]

    def trainable_keys(self) -> list[str]:
        return adapters.trainable_keys(self.model)

    @property
    def num_labels(self) -> int:
        """The classes the model scores (its head's outputs; the label words' classes for label-word tasks)."""
        return int(self.model.config.num_labels)

    def _ensure_splits(self) -> data.Splits:
        if self.splits is None:
            splits = data.split(self.cfg.data, self.task)
            if self.task == CLASSIFICATION:  # an explicit model.num_labels is checked when the data is first read
                data.num_labels(splits, self.num_labels, self.cfg.data.dataset)
            if self.task == LABEL_WORDS:
                from fedtune.labelwords import check_classes

                check_classes(self.cfg.label_words, splits.labels)
            self.splits = splits
        return self.splits

    def tokenize(self, examples: list[dict]) -> list[dict]:
        """Tokenize examples for this run's task (no padding)."""
        if self.task == LABEL_WORDS:
            from fedtune import labelwords

            return labelwords.tokenize(
                examples, self.tokenizer, self.cfg.label_words, self.cfg.model.max_length, self.label_word_ids
            )
        return data.tokenize(examples, self.tokenizer, self.task, self.cfg.model.max_length)

    def partitions(self) -> list[list[int]]:
        if self._parts is None:
            self._parts = data.client_indices(
                self.cfg.data, self._ensure_splits(), self.cfg.federation.num_clients, self.task
            )
        return self._parts

    def client_data(self, partition_id: int) -> list[dict]:
        """Tokenized training examples of one simulated client."""
        if partition_id not in self._client_data:
            parts = self.partitions()
            if not 0 <= partition_id < len(parts):
                raise ValueError(f"partition-id {partition_id} out of range 0..{len(parts) - 1}")
            train = self._ensure_splits().train
            ex = [train[i] for i in parts[partition_id]]
            self._client_data[partition_id] = self.tokenize(ex)
        return self._client_data[partition_id]

    def file_data(self, path: str) -> list[dict]:
        """Tokenized training examples from a silo's own file (node_config ``data-path``).

        Columns are read as configured in ``[data]``. Class labels must be the
        integers 0..C-1, or names that sort the same way on every silo.
        """
        key = f"file:{path}"
        if key not in self._files:
            ex = data.load_examples(replace(self.cfg.data, dataset=path, domains=()), self.task)
            if self.task != CAUSAL_LM:
                ex, names = data.encode_labels(ex)
                if self.task == CLASSIFICATION and len(names) > self.num_labels:
                    raise ConfigError(
                        f"model.num_labels: data-path {path} has {len(names)} labels ({', '.join(names[:10])}) but the "
                        f"classifier has {self.num_labels}; set model.num_labels to the count of every silo's labels"
                    )
            if not ex:
                raise ValueError(f"data-path {path} has no examples")
            self._files[key] = self.tokenize(ex)
        return self._files[key]

    def test_examples(self) -> list[dict]:
        """The held-out split's raw examples (text, label, prompt, response, domain), in test_data's order."""
        return self._ensure_splits().test

    def test_data(self) -> list[dict]:
        if self._test_data is None:
            self._test_data = self.tokenize(self._ensure_splits().test)
        return self._test_data

    def all_train_data(self) -> list[dict]:
        return self.tokenize(self._ensure_splits().train)


_CACHE: dict[str, Workspace] = {}
_LOCK = threading.Lock()


def _key(cfg: FedtuneConfig) -> str:
    d = cfg.to_dict()
    return json.dumps({k: d[k] for k in ("model", "adapter", "data")}, sort_keys=True) + str(cfg.federation.num_clients)


def get(cfg: FedtuneConfig) -> Workspace:
    """The cached workspace for ``cfg`` in this process (built on first use)."""
    key = _key(cfg)
    with _LOCK:
        ws = _CACHE.get(key)
        if ws is None:
            ws = build(cfg)
            _CACHE.clear()  # one model per process at a time: memory, not speed, is scarce
            _CACHE[key] = ws
        return ws


def check_data(cfg: FedtuneConfig) -> models.ResolvedModel:
    """Refuse what a run of ``cfg`` would refuse once it reads its model and data, before any weights load.

    The config's own checks (`fedtune.config.from_dict`) need neither; these do:
    the model name resolves (no weights are read) on a device this machine has,
    the adapter and pooling fit the model's task, ``adapter.init_from`` holds a fitting
    adapter, the data loads with the
    configured columns, ``model.num_labels`` agrees with the data's labels
    (`fedtune.data.num_labels`), and the partition gives every client examples.
    ``fedtune simulate`` and ``fedtune check-config`` run it; returns the resolved model.
    """
    resolved = models.resolve(cfg.model)
    device = models.pick_device(cfg.model)
    task = models.architecture_task(resolved.task)
    problems = []
    if cfg.model.quantization == "4bit" and device.type != "cuda":
        problems.append(
            "model.quantization: '4bit' (QLoRA through bitsandbytes) needs a CUDA device; this machine has none"
        )
    if cfg.adapter.method == "head" and task == CAUSAL_LM:
        problems.append(
            f"adapter.method: 'head' trains only a classification head, and model.name = {cfg.model.name!r} is a "
            "causal LM, which has none (use 'lora' or 'prompt')"
        )
    if cfg.adapter.head_init == "prototypes" and resolved.task != CLASSIFICATION:
        problems.append(
            f"adapter.head_init: 'prototypes' initialises a classification head, and model.name = "
            f"{cfg.model.name!r} ({resolved.task}) has none; use 'random' (got 'prototypes')"
        )
    if cfg.adapter.sb_gradient_head == "prototypes" and resolved.task != CLASSIFICATION:
        problems.append(
            f"adapter.sb_gradient_head: 'prototypes' builds a classification head from the public examples, and "
            f"model.name = {cfg.model.name!r} ({resolved.task}) has none; leave it out (got 'prototypes')"
        )
    if cfg.adapter.init_from:  # the directory is there and fits (its tensors are checked when the model loads)
        problems.extend(init_problems(cfg))
    if cfg.federation.sampling == "label-balanced" and resolved.task == CAUSAL_LM:
        problems.append(
            f"federation.sampling: 'label-balanced' balances the classes of a round's clients, and model.name = "
            f"{cfg.model.name!r} is trained as a causal LM, whose examples have no class; use 'fixed'"
        )
    if cfg.model.pooling == "mean" and task != CLASSIFICATION:
        problems.append(
            f"model.pooling: 'mean' needs a BERT-family sequence classifier, and model.name = {cfg.model.name!r} is "
            "a causal LM; use 'auto'"
        )
    if problems:
        raise ConfigError(problems)
    splits = data.split(cfg.data, resolved.task)
    if resolved.task == CLASSIFICATION:
        data.num_labels(splits, cfg.model.num_labels, cfg.data.dataset)
    if resolved.task == LABEL_WORDS:  # the template fits, the tokenizer encodes every word, one class per label
        from fedtune.labelwords import check_setup

        check_setup(cfg.label_words, models.load_tokenizer(resolved), cfg.model.max_length, splits.labels)
    if cfg.adapter.sb_factors == "gradient":  # the public data loads and fits the task's classes
        classes = {LABEL_WORDS: len(cfg.label_words.words), CAUSAL_LM: 0}.get(
            resolved.task, cfg.model.num_labels or len(splits.labels)
        )
        public_examples(cfg, resolved.task, classes)
    parts = data.client_indices(cfg.data, splits, cfg.federation.num_clients, resolved.task)
    empty = [i for i, p in enumerate(parts) if not p]
    if empty:
        raise ConfigError(
            f"data.partition: clients {empty[:5]} get no examples with {cfg.data.partition!r}; "
            "use fewer clients, a larger data.dirichlet_alpha or data.partition = 'iid'"
        )
    return resolved


def build(cfg: FedtuneConfig) -> Workspace:
    resolved = models.resolve(cfg.model)
    device = models.pick_device(cfg.model)
    tok = models.load_tokenizer(resolved)
    word_ids, splits, model_cfg = None, None, cfg.model
    if resolved.task == CLASSIFICATION and cfg.model.num_labels is None:
        # the head has as many outputs as the data has labels (Hugging Face's run_glue: len(label_list))
        splits = data.split(cfg.data, resolved.task)
        model_cfg = replace(cfg.model, num_labels=data.num_labels(splits, None, cfg.data.dataset))
    if resolved.task == LABEL_WORDS:  # refused here, before any model is loaded or trained
        from fedtune import labelwords

        labelwords.check_template(cfg.label_words, tok, cfg.model.max_length)
        word_ids = labelwords.encode_words(cfg.label_words, tok)
    base = models.load_base(resolved, model_cfg, tok, device)
    if word_ids is not None:
        base.config.num_labels = len(word_ids)  # the classes that logit adjustment counts
    model = adapters.wrap(base, cfg.adapter, models.architecture_task(resolved.task))
    ws = Workspace(
        cfg=cfg, resolved=resolved, tokenizer=tok, model=model, device=device, splits=splits, label_word_ids=word_ids
    )
    if cfg.adapter.sb_factors == "gradient":
        _public_gradient_factors_(ws)
    if cfg.adapter.init_from:
        adapters.set_state_(ws.model, init_state(cfg, adapters.get_state(ws.model)))
    ws.initial_state()  # snapshot before any round loads another state
    return ws


INIT_STATE = "fedtune_state.safetensors"  # an exported adapter's full state, as `adapter.init_from` reads it
INIT_META = "fedtune_state.json"  # what it fits: the model and the adapter settings that give its tensors meaning
_INIT_ADAPTER_KEYS = ("method", "r", "alpha", "target_modules", "num_virtual_tokens")


def _init_meta(cfg: FedtuneConfig) -> dict:
    adapter = cfg.to_dict()["adapter"]  # JSON-plain: tuples as lists
    return {"model": cfg.model.name, "adapter": {k: adapter[k] for k in _INIT_ADAPTER_KEYS}}


def init_problems(cfg: FedtuneConfig) -> list[str]:
    """What makes ``adapter.init_from`` unusable for ``cfg``, read from its metadata alone (no weights)."""
    src = Path(cfg.adapter.init_from)
    if not (src / INIT_STATE).is_file() or not (src / INIT_META).is_file():
        return [
            f"adapter.init_from: {str(src)!r} holds no {INIT_STATE} and {INIT_META}; name the adapter "
            "directory of a fedtune run (RUN/adapter)"
        ]
    try:
        saved = json.loads((src / INIT_META).read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        return [f"adapter.init_from: {src / INIT_META} is not valid JSON: {err}"]
    want = _init_meta(cfg)
    errors = []
    if saved.get("model") != want["model"]:
        errors.append(
            f"adapter.init_from: {str(src)!r} was trained on model.name = {saved.get('model')!r}, and this run's is "
            f"{want['model']!r}"
        )
    for key, value in want["adapter"].items():
        if saved.get("adapter", {}).get(key) != value:
            errors.append(
                f"adapter.{key}: {value!r}, and the adapter of adapter.init_from = {str(src)!r} was trained with "
                f"{saved.get('adapter', {}).get(key)!r}; set it so or start from another adapter"
            )
    return errors


def init_state(cfg: FedtuneConfig, built: Delta) -> Delta:
    """The adapter state ``adapter.init_from`` names, checked against ``built`` (the seeded adapter):
    the same tensors, shape for shape; refused naming the setting otherwise."""
    from safetensors.torch import load_file

    errors = init_problems(cfg)
    if errors:
        raise ConfigError(errors)
    state = load_file(str(Path(cfg.adapter.init_from) / INIT_STATE))
    missing, extra = sorted(set(built) - set(state)), sorted(set(state) - set(built))
    shapes = [k for k in set(built) & set(state) if tuple(built[k].shape) != tuple(state[k].shape)]
    if missing or extra or shapes:
        raise ConfigError(
            f"adapter.init_from: {cfg.adapter.init_from!r} does not fit this model's adapter "
            f"(missing {missing[:2]}, unexpected {extra[:2]}, other shape {sorted(shapes)[:2]}); was it trained "
            "with another head (model.num_labels) or base model?"
        )
    return {k: state[k].to(torch.float32) for k in built}


def public_examples(cfg: FedtuneConfig, task: str, classes: int) -> list[dict]:
    """The raw public examples that ``adapter.sb_factors = "gradient"`` takes the gradient on;
    refused if their labels do not fit the ``classes`` the model scores."""
    ex = data.public_sample(
        cfg.data, cfg.adapter.sb_public_data, cfg.adapter.sb_public_examples, cfg.adapter.init_seed, task
    )
    top = max(e["label"] for e in ex) if task != CAUSAL_LM else -1
    if top >= classes:
        raise ConfigError(
            f"adapter.sb_public_data: {cfg.adapter.sb_public_data!r} has labels up to class {top}, and the model "
            f"scores {classes} classes; name a public dataset with the task's labels"
        )
    return ex


def _public_gradient_factors_(ws: Workspace, batch_size: int = 16) -> None:
    """LoRA-SB's gradient initialisation on public examples (`fedtune.lorasb.gradient_factors_`):
    the mean loss over them, in eval mode and the model's dtype (no autocast: the same bits on every
    party with the same hardware). With ``adapter.sb_gradient_head = "prototypes"`` the loss is taken
    through the public examples' own nearest-class-mean head, and the model's head is put back after."""
    classes = ws.num_labels if ws.task != CAUSAL_LM else 0
    tokenized = ws.tokenize(public_examples(ws.cfg, ws.task, classes))
    through_prototypes = ws.cfg.adapter.sb_gradient_head == "prototypes"
    with _public_prototype_head(ws, tokenized, classes, batch_size) if through_prototypes else nullcontext():
        _gradient_factors_(ws, tokenized, batch_size)


@contextmanager
def _public_prototype_head(ws: Workspace, tokenized: list[dict], classes: int, batch_size: int):
    """The model's head replaced by the nearest-class-mean head of ``tokenized`` (`fedtune.prototypes`)
    for the duration; its own head, bit for bit, afterwards."""
    from fedtune import prototypes

    keys = prototypes.head_keys(ws.model)
    own = {k: v for k, v in adapters.get_state(ws.model).items() if k in keys}
    stats = prototypes.data_stats(
        ws.model, tokenized, pad_id=ws.pad_id, task=ws.task, num_classes=classes, batch_size=batch_size
    )
    try:
        head = prototypes.head_from_stats(stats)
    except ValueError as err:  # a class with no public example has no mean
        raise ConfigError(
            f"adapter.sb_gradient_head: 'prototypes' needs every class among the adapter.sb_public_examples = "
            f"{ws.cfg.adapter.sb_public_examples} public examples of {ws.cfg.adapter.sb_public_data!r}: {err}"
        ) from err
    adapters.set_state_(ws.model, prototypes.head_state(ws.model, *head))
    try:
        yield
    finally:
        adapters.set_state_(ws.model, own)


def _gradient_factors_(ws: Workspace, tokenized: list[dict], batch_size: int) -> None:
    from fedtune import lorasb
    from fedtune.train import batch_loss

    n = len(tokenized)

    def losses():
        for i in range(0, n, batch_size):
            chunk = tokenized[i : i + batch_size]
            batch = {k: v.to(ws.device) for k, v in data.collate(chunk, ws.pad_id, ws.task).items()}
            yield batch_loss(ws.model, batch, None) * (len(chunk) / n)

    training = ws.model.training
    ws.model.eval()
    try:
        lorasb.gradient_factors_(ws.model, losses())
    finally:
        ws.model.train(training)


def export_adapter(ws: Workspace, state: Delta, target) -> None:
    """Write ``state`` as a PEFT-format adapter (loadable by ``PeftModel.from_pretrained``), atomically."""
    from fedtune.rundir import replace_dir

    adapters.set_state_(ws.model, state)
    ws.model.peft_config["default"].base_model_name_or_path = models.base_path_for_export(ws.resolved)

    def fill(tmp) -> None:
        adapters.save_pretrained(ws.model, str(tmp))  # LoRA-SB: as the plain LoRA it equals
        if ws.task == CLASSIFICATION:
            ws.tokenizer.save_pretrained(str(tmp))
        if ws.cfg.model.pooling != "auto":
            # PEFT's config cannot say it: the head was trained on mean-pooled states, so the base
            # must get `fedtune.models.use_mean_pooling_` before the adapter is loaded
            (Path(tmp) / "fedtune_model.json").write_text(json.dumps({"pooling": ws.cfg.model.pooling}) + "\n")
        if ws.task == LABEL_WORDS:  # the template and words to score with (README: label-word adapters)
            from fedtune import labelwords

            labelwords.write_export(tmp, labelwords.export_spec(ws.cfg.label_words, ws.tokenizer, ws.label_word_ids))

        # the full state (LoRA-SB's core and factors apart, not folded) for `adapter.init_from`
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(Path(tmp) / INIT_STATE))
        (Path(tmp) / INIT_META).write_text(json.dumps(_init_meta(ws.cfg), indent=1) + "\n")

    replace_dir(target, fill)
