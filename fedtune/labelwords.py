"""Label-word classification with a causal LM: a prompt template and label words per class.

LM-BFF (Gao et al. 2021, "Making Pre-trained Language Models Better Few-shot
Learners", arXiv:2012.15723) and MeZO (Malladi et al. 2023, arXiv:2305.17333)
classify by asking the language model itself instead of training a new head: the
example's text goes into a template (``"Review: {text}\\nSentiment:"``) and each
class is named by one or more label words (``" negative"`` / ``" positive"``).
Training starts from the model's zero-shot accuracy, which is what lets
zeroth-order and private training work at all.

Scoring (the one rule, used for training, evaluation, zero-shot and export):

* prompt = the template with the text in its ``{text}`` slot, tokenized without
  special tokens (plus the tokenizer's BOS when it adds one by default);
* a word's score is the sum of the log-probabilities of its tokens after the
  prompt, ``sum_j log p(t_j | prompt, t_1..t_{j-1})``, its full log-likelihood;
* a class's score is the **logsumexp** over its words' scores, i.e. the log of the
  probability that the model continues the prompt with one of the class's words
  (equal to the word's log-probability when a class has one word);
* loss = cross-entropy over the class scores (plus logit adjustment when
  configured, as for classifier logits); prediction = argmax.

Words are grouped by their prefix ``t_1..t_{k-1}``: one forward pass per distinct
prefix over ``prompt + prefix`` gives every word of the group, so all single-token
words share one pass over the prompt (the next-token logits) and a single-token
word is scored exactly as in the general rule. Batches are right-padded (what
:func:`fedtune.data.collate` does): every position id is the default
``0..n-1``, which prompt tuning (virtual tokens prepended by peft) also needs.

Only the text is ever truncated to ``model.max_length``: the template's head and
tail (``"\\nSentiment:"``) are always kept whole.

The tokenized examples carry the label words' token ids, and
:func:`fedtune.data.collate` puts them into the batch (:data:`WORD_TOKENS`,
:data:`WORD_CLASSES`); :func:`fedtune.train.batch_loss` and
:func:`fedtune.train.evaluate` score any batch that has them, so gradient,
DP-SGD and zeroth-order clients all train on this objective.
"""

from __future__ import annotations

import functools
import inspect
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from fedtune.config import LABEL_WORDS
from fedtune.errors import ConfigError
from fedtune.validation import Section

SECTION = "label_words"
SLOT = "{text}"
EXPORT_FILE = "fedtune_label_words.json"
# batch keys written by fedtune.data.collate for label-word examples
WORD_TOKENS = "label_word_tokens"  # [W, K] token ids of every word, -1 past a word's end
WORD_CLASSES = "label_word_classes"  # [W] the class of each word
EXAMPLE_KEY = "label_words"  # tokenized example -> its WordIds (one shared object)

WordIds = tuple[tuple[tuple[int, ...], ...], ...]  # class -> word -> token ids


@dataclass(frozen=True)
class LabelWordsConfig(Section):
    """``[label_words]``: the prompt template and the label words of each class.

    Used when ``model.task = "label-words"`` (and only then).

    Fields:
        template: the prompt, with exactly one ``{text}`` slot for the example's text,
            e.g. ``"Review: {text}\\nSentiment:"``. The label word follows it directly,
            so put no trailing space in the template and a leading one in the words.
        words: class i's label words, a list of lists: ``[[" negative"], [" positive"]]``
            (class ids as the data's labels: 0..C-1, or label names in sorted order);
            a plain string is a class with that one word. A word may be several
            tokens; a class's score is the logsumexp of its words' log-likelihoods.
            Strings are kept as written: a word's leading space matters.
    """

    SECTION: ClassVar[str] = SECTION
    template: str = ""
    # a string item is a one-word class (declared so, the boundary keeps its leading space)
    words: tuple[tuple[str, ...] | str, ...] = ()

    def __post_init__(self) -> None:
        words = self.words
        if isinstance(words, (list, tuple)):
            words = tuple((w,) if isinstance(w, str) else tuple(w) if isinstance(w, list) else w for w in words)
            object.__setattr__(self, "words", words)
        super().__post_init__()

    def is_set(self) -> bool:
        return bool(self.template or self.words)

    def problems(self) -> list[str]:
        e: list[str] = []
        if self.template and self.template.count(SLOT) != 1:
            e.append(f"label_words.template: must hold the slot {SLOT} exactly once (got {self.template!r})")
        if self.words:
            got = f"(got {_show(self.words)})"
            if len(self.words) < 2:
                e.append(f"label_words.words: needs the words of at least 2 classes {got}")
            empty = [i for i, ws in enumerate(self.words) if not ws]
            if empty:
                e.append(f"label_words.words: class(es) {empty} have no word {got}")
            blank = sorted({i for i, ws in enumerate(self.words) for w in ws if not w.strip()})
            if blank:
                e.append(f"label_words.words: class(es) {blank} have an empty word {got}")
            owners: dict[str, list[int]] = {}
            for i, ws in enumerate(self.words):
                for w in dict.fromkeys(ws):
                    owners.setdefault(w, []).append(i)
            shared = {w: c for w, c in owners.items() if len(c) > 1}
            if shared:
                e.append(f"label_words.words: word(s) named by more than one class: {shared} {got}")
        return e


def _show(words) -> list[list[str]]:
    return [list(ws) for ws in words]


def config_problems(cfg) -> list[str]:
    """What ``[label_words]`` cannot be combined with (called by the config's cross-check)."""
    lw, task = cfg.label_words, cfg.model.task
    e: list[str] = []
    if task != LABEL_WORDS:
        if lw.is_set():
            e.append(f"label_words: set, but model.task is {task!r}; set model.task = '{LABEL_WORDS}' to use it")
        return e
    if not lw.template:
        e.append(f"label_words.template: model.task = '{LABEL_WORDS}' needs a template with a {SLOT} slot")
    if not lw.words:
        e.append(f"label_words.words: model.task = '{LABEL_WORDS}' needs the label words of each class")
    if cfg.adapter.method == "head":
        e.append(
            f"adapter.method: 'head' trains a new classification head; model.task = '{LABEL_WORDS}' scores "
            "label words with the model's own LM head (use 'lora', 'dora' or 'prompt')"
        )
    return e


# --- tokenization ------------------------------------------------------------------------------


def prompt_prefix(tokenizer) -> list[int]:
    """The special tokens a prompt starts with: the BOS when the tokenizer adds one by default."""
    bos = tokenizer.bos_token_id
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return [int(bos)] if bos is not None and ids and ids[0] == bos else []


def encode_words(lw: LabelWordsConfig, tokenizer) -> WordIds:
    """Token ids of every label word; a ConfigError naming ``label_words.words`` for any the
    tokenizer cannot encode (no tokens, an unknown token, or a decoding that differs)."""
    bad: list[str] = []
    out = []
    unk = tokenizer.unk_token_id
    for c, words in enumerate(lw.words):
        ids_c = []
        for w in words:
            ids = [int(t) for t in tokenizer(w, add_special_tokens=False)["input_ids"]]
            back = tokenizer.decode(ids, clean_up_tokenization_spaces=False) if ids else ""
            if not ids:
                bad.append(f"{w!r} (class {c}) encodes to no token")
            elif unk is not None and unk in ids:
                bad.append(f"{w!r} (class {c}) encodes to the unknown token")
            elif back != w and back.strip() != w.strip():
                # a leading space may be dropped by tokenizers that split on whitespace
                bad.append(f"{w!r} (class {c}) decodes back as {back!r}")
            ids_c.append(tuple(ids))
        out.append(tuple(ids_c))
    seen: dict[tuple[int, ...], tuple[str, int]] = {}
    for c, (words, ids_c) in enumerate(zip(lw.words, out)):
        for w, ids in zip(words, ids_c):
            first = seen.setdefault(ids, (w, c))
            if ids and first[1] != c:  # e.g. an uncased tokenizer: " Good" and " good"
                bad.append(f"{w!r} (class {c}) encodes to the tokens of {first[0]!r} (class {first[1]})")
    if bad:
        raise ConfigError([f"label_words.words: the tokenizer cannot encode {'; '.join(bad)} (got {_show(lw.words)})"])
    return tuple(out)


def _tokenize_prompt(tokenizer, template: str, text: str, max_length: int, prefix: list[int]) -> list[int]:
    head, tail = template.split(SLOT)
    full = head + text + tail
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    excess = len(prefix) + len(ids) - max_length
    if excess > 0:
        # drop the last tokens that lie wholly inside the text; the template's tokens stay
        lo, hi = len(head), len(head) + len(text)
        inside = [i for i, (s, e) in enumerate(enc["offset_mapping"]) if lo <= s and e <= hi and s < e]
        drop = set(inside[max(len(inside) - excess, 0) :])
        ids = [t for i, t in enumerate(ids) if i not in drop]
    return prefix + ids


def check_template(lw: LabelWordsConfig, tokenizer, max_length: int) -> None:
    """Refuse a template that leaves no room for text in ``model.max_length`` tokens,
    or a tokenizer that cannot map tokens back to the text (truncation needs offsets)."""
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError(
            [
                f"model.name: label-word classification needs a fast tokenizer (token offsets keep the template "
                f"whole when the text is truncated) (got {type(tokenizer).__name__})"
            ]
        )
    n = len(prompt_prefix(tokenizer)) + len(
        tokenizer(lw.template.replace(SLOT, ""), add_special_tokens=False)["input_ids"]
    )
    if n >= max_length:
        raise ConfigError(
            [
                f"model.max_length: leaves no room for the text, label_words.template takes {n} tokens by itself "
                f"(got {max_length})"
            ]
        )


def check_classes(lw: LabelWordsConfig, labels: Sequence[str]) -> None:
    """Refuse label words for a number of classes other than the data's."""
    if len(lw.words) != len(labels):
        raise ConfigError(
            [
                f"label_words.words: names {len(lw.words)} classes but the data has {len(labels)} labels "
                f"({', '.join(map(str, labels))}) (got {_show(lw.words)})"
            ]
        )


def check_setup(lw: LabelWordsConfig, tokenizer, max_length: int, labels: Sequence[str]) -> None:
    """Every label-word refusal that needs the tokenizer or the data (`fedtune.workspace.check_data`
    runs it for ``fedtune check-config`` and ``simulate``): the template fits ``max_length``,
    the tokenizer encodes every word, the data has one label per class."""
    check_template(lw, tokenizer, max_length)
    encode_words(lw, tokenizer)
    check_classes(lw, labels)


def tokenize(examples: list[dict], tokenizer, lw: LabelWordsConfig, max_length: int, words: WordIds) -> list[dict]:
    """Tokenized label-word examples: the prompt's ids, the label, the shared word ids."""
    prefix = prompt_prefix(tokenizer)
    return [
        {
            "input_ids": _tokenize_prompt(tokenizer, lw.template, e["text"], max_length, prefix),
            "label": e["label"],
            EXAMPLE_KEY: words,
        }
        for e in examples
    ]


def word_tensors(words: WordIds) -> dict[str, torch.Tensor]:
    """The batch tensors of the label words: token ids ``[W, K]`` (-1 padded) and classes ``[W]``."""
    flat = [(c, ids) for c, ws in enumerate(words) for ids in ws]
    width = max(len(ids) for _, ids in flat)
    tokens = torch.full((len(flat), width), -1, dtype=torch.long)
    for i, (_, ids) in enumerate(flat):
        tokens[i, : len(ids)] = torch.tensor(ids)
    return {WORD_TOKENS: tokens, WORD_CLASSES: torch.tensor([c for c, _ in flat], dtype=torch.long)}


# --- scoring -----------------------------------------------------------------------------------


@functools.cache
def _keeps_logits(model_type: type) -> bool:
    return "logits_to_keep" in inspect.signature(model_type.forward).parameters


def _continuation_logprobs(model, ids: torch.Tensor, mask: torch.Tensor, prefix: tuple[int, ...]) -> torch.Tensor:
    """log p(. | prompt + prefix[:j]) for j = 0..len(prefix): ``[B, len(prefix) + 1, V]``, float32.

    ``ids``/``mask`` are right-padded prompts; the prefix is written right after each
    prompt's last token, so every row keeps the position ids 0..n-1. Positions are
    counted from the end of the sequence, which prompt tuning's virtual tokens
    (prepended) leave unchanged; the LM head runs only at the positions read
    (Hugging Face's ``logits_to_keep``), not over the whole vocabulary at every token.
    """
    lengths = mask.sum(1)
    rows, p = ids.shape[0], len(prefix)
    if p:
        pos = lengths[:, None] + torch.arange(p, device=ids.device)
        ids = torch.cat([ids, ids.new_zeros((rows, p))], 1)
        mask = torch.cat([mask, mask.new_zeros((rows, p))], 1)
        ids = ids.scatter(1, pos, torch.tensor(prefix, device=ids.device).expand(rows, p))
        mask = mask.scatter(1, pos, torch.ones_like(pos, dtype=mask.dtype))
    read = (lengths - 1)[:, None] + torch.arange(p + 1, device=ids.device)
    keep, where = torch.unique(read, return_inverse=True)
    from_end = keep - ids.shape[1]
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if _keeps_logits(type(base)):
        logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=from_end).logits
        if logits.shape[1] != keep.numel():
            raise RuntimeError(f"{type(base).__name__} ignored logits_to_keep ({logits.shape[1]} positions returned)")
    else:
        logits = model(input_ids=ids, attention_mask=mask).logits[:, from_end]
    picked = logits.gather(1, where[..., None].expand(-1, -1, logits.shape[-1]))
    return picked.float().log_softmax(-1)


def class_scores(model, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Class scores ``[B, C]`` (float32) of a label-word batch: per class, the logsumexp over
    its words of the word's summed token log-probabilities after the prompt."""
    tokens, classes = batch[WORD_TOKENS], batch[WORD_CLASSES]
    words = [tuple(int(t) for t in row if t >= 0) for row in tokens.tolist()]
    groups: dict[tuple[int, ...], list[int]] = {}
    for w, ids in enumerate(words):
        groups.setdefault(ids[:-1], []).append(w)
    scores: list[torch.Tensor | None] = [None] * len(words)
    for prefix, members in groups.items():
        logp = _continuation_logprobs(model, batch["input_ids"], batch["attention_mask"], prefix)
        for w in members:
            idx = torch.tensor(words[w], device=logp.device)
            scores[w] = logp.gather(2, idx.view(1, -1, 1).expand(logp.shape[0], -1, 1)).sum((1, 2))
    per_word = torch.stack(scores, 1)  # type: ignore[arg-type]
    cls = classes.tolist()
    return torch.stack(
        [per_word[:, [w for w, c in enumerate(cls) if c == k]].logsumexp(1) for k in range(max(cls) + 1)], 1
    )


# --- export ------------------------------------------------------------------------------------


def export_spec(lw: LabelWordsConfig, tokenizer, words: WordIds) -> dict[str, Any]:
    """What ``fedtune_label_words.json`` holds next to an exported adapter."""
    return {
        "template": lw.template,
        "words": [list(ws) for ws in lw.words],
        "word_token_ids": [[list(ids) for ids in ws] for ws in words],
        "prompt_prefix_token_ids": prompt_prefix(tokenizer),
        "class_score": "logsumexp over the class's words of the sum of the word's token log-probabilities",
    }


def write_export(directory: str | Path, spec: Mapping[str, Any]) -> None:
    (Path(directory) / EXPORT_FILE).write_text(json.dumps(spec, indent=2) + "\n", encoding="utf-8")


__all__ = [
    "LabelWordsConfig",
    "config_problems",
    "encode_words",
    "check_template",
    "check_classes",
    "tokenize",
    "word_tensors",
    "class_scores",
    "export_spec",
    "write_export",
    "prompt_prefix",
    "WORD_TOKENS",
    "WORD_CLASSES",
    "EXPORT_FILE",
]
