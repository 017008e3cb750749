"""Local training and held-out evaluation of an adapter-wrapped model.

No Flower here: these functions take a model, tokenized examples and a
``torch.Generator`` and are used alike by clients, the server's evaluation and
the centralized baseline.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch

from fedtune.config import CAUSAL_LM, LABEL_WORDS, FedtuneConfig, TrainConfig
from fedtune.data import collate
from fedtune.labelwords import WORD_CLASSES, WORD_TOKENS, class_scores
from fedtune.models import pick_device, pick_dtype


def bf16_is_fast(device: torch.device) -> bool:
    """Whether ``device`` has native bfloat16 matmuls (CUDA Ampere+, CPUs with AVX512-BF16/AMX)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False
    return False


def forward_precision(device: torch.device, mixed_precision: str) -> str:
    """What ``train.mixed_precision`` ("no", "bf16" or "auto": bf16 where the device has native
    bfloat16 matmuls) resolves to on ``device``: "bf16" or "fp32"."""
    on = mixed_precision == "bf16" or (mixed_precision == "auto" and bf16_is_fast(device))
    return "bf16" if on else "fp32"


def run_precision(cfg: FedtuneConfig) -> str:
    """The precision a run's forward passes take on this machine: the base weights' dtype where
    ``model.dtype`` makes them half precision (``"auto"``: bfloat16 on a CUDA GPU with it), else
    `forward_precision`. What a run's line naming the model and summary.json report."""
    device = pick_device(cfg.model)
    half = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(pick_dtype(cfg.model, device))
    return half or forward_precision(device, cfg.train.mixed_precision)


def autocast(device: torch.device, mixed_precision: str):
    """The forward-pass context for ``train.mixed_precision`` (`forward_precision`)."""
    on = forward_precision(device, mixed_precision) == "bf16"
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=on)


def round_lr(cfg: TrainConfig, rnd: int, rounds: int) -> float:
    """The client learning rate of round ``rnd`` (1-based) out of ``rounds``.

    ``"cosine"`` anneals from ``lr`` (round 1) to ``lr * lr_min_ratio`` (last round)
    along half a cosine, as FL learning-rate decay across rounds is usually done.
    """
    if cfg.lr_schedule == "constant" or rounds <= 1:
        return cfg.lr
    t = min(max(rnd - 1, 0), rounds - 1) / (rounds - 1)
    lo = cfg.lr * cfg.lr_min_ratio
    return lo + (cfg.lr - lo) * 0.5 * (1.0 + math.cos(math.pi * t))


def batch_stream(data: list[dict], batch_size: int, generator: torch.Generator) -> Iterator[list[dict]]:
    """Endless shuffled mini-batches (a fresh permutation per epoch)."""
    if not data:
        raise ValueError("no training examples")
    while True:
        perm = torch.randperm(len(data), generator=generator).tolist()
        for i in range(0, len(perm), batch_size):
            chunk = perm[i : i + batch_size]
            if len(chunk) < batch_size and len(perm) >= batch_size:
                break  # drop the ragged tail; the next epoch reshuffles
            yield [data[j] for j in chunk]


def make_optimizer(model, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def train_local(
    model,
    data: list[dict],
    cfg: TrainConfig,
    *,
    task: str,
    pad_id: int,
    device: torch.device,
    generator: torch.Generator,
    steps: int | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    extra_loss: Callable[[], torch.Tensor] | None = None,
    batches: Iterator[list[dict]] | Iterator[dict[str, torch.Tensor]] | None = None,
    clip: bool = True,
    label_counts: list[float] | None = None,
    before_step: Callable[[torch.optim.Optimizer], None] | None = None,
) -> dict[str, float]:
    """Run ``steps`` optimizer steps (default ``cfg.local_steps``); return mean loss and counts.

    ``extra_loss`` is added to the task loss (e.g. FedProx's proximal term).
    ``before_step`` is called with the optimizer after the gradients are clipped
    and right before each step (e.g. SCAFFOLD's correction,
    `fedtune.aggregation.scaffold.LocalCorrection`).
    ``optimizer`` and ``batches`` may be supplied (e.g. by DP-SGD, which replaces both).
    ``label_counts`` replaces the counts of ``data``'s labels behind logit adjustment
    (DP-SGD passes noisy ones: `fedtune.privacy.noisy_label_counts`).
    """
    steps = cfg.local_steps if steps is None else steps
    # Dropout draws from torch's global RNG; fork it and seed it from the explicit
    # generator so a client's round is reproducible without touching the caller's RNG.
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator)))
        adjust = logit_adjustment_bias(model, data, cfg.logit_adjustment, task, device, counts=label_counts)
        return _train_steps(
            model,
            data,
            cfg,
            task,
            pad_id,
            device,
            generator,
            steps,
            optimizer,
            extra_loss,
            batches,
            clip,
            adjust,
            before_step,
        )


def label_counts(data: list[dict], num_labels: int) -> torch.Tensor:
    """How many of ``data``'s examples carry each label 0..num_labels-1 (int64)."""
    return torch.bincount(torch.tensor([int(d["label"]) for d in data], dtype=torch.long), minlength=num_labels)


def label_log_prior(data: list[dict], num_labels: int, counts: list[float] | None = None) -> torch.Tensor:
    """log of the client's label distribution (from ``counts`` if given), add-one smoothed (never -inf)."""
    if counts is None:
        c = label_counts(data, num_labels).double()
    else:
        if len(counts) != num_labels:
            raise ValueError(f"label counts {counts!r}: expected {num_labels} counts")
        c = torch.tensor(counts, dtype=torch.float64)
    return torch.log((c + 1) / (c.sum() + num_labels)).float()


def logit_adjustment_bias(
    model, data: list[dict], strength: float, task: str, device, counts: list[float] | None = None
) -> torch.Tensor | None:
    """``strength * log p_local(y)`` to add to the logits, or None (off, or a causal LM).

    Logit adjustment for label skew (Menon et al. 2021, arXiv:2007.07314; FedLC, Zhang
    et al. 2022, arXiv:2209.00189): train on logits + tau * log p_local(y), so a client
    whose data is mostly one label learns the label-balanced classifier instead of its
    own prior. Gradient and zeroth-order clients both train on it.
    """
    if strength <= 0 or task == CAUSAL_LM:
        return None
    return (strength * label_log_prior(data, num_labels(model), counts)).to(device)


def batch_loss(model, batch: dict[str, torch.Tensor], adjust: torch.Tensor | None) -> torch.Tensor:
    """The model's loss on ``batch`` (float32): its own, or with ``adjust`` (from
    `logit_adjustment_bias`) the cross-entropy of ``logits + adjust``. A label-word
    batch (`fedtune.labelwords`) has the class scores as its logits."""
    if WORD_TOKENS in batch:
        scores = class_scores(model, batch)
        return torch.nn.functional.cross_entropy(scores if adjust is None else scores + adjust, batch["labels"])
    if adjust is None:
        return model(**batch).loss.float()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    return torch.nn.functional.cross_entropy(model(**inputs).logits.float() + adjust, batch["labels"])


def num_labels(model) -> int:
    return int(model.config.num_labels) if hasattr(model, "config") else 2


def physical_batches(batch: dict[str, torch.Tensor], size: int) -> list[dict[str, torch.Tensor]]:
    """``batch`` cut into pieces of at most ``size`` rows (``train.physical_batch_size``; 0: one piece).

    The label words' tensors (one row per word, not per example) go whole into every piece.
    """
    n = batch["input_ids"].shape[0]
    if size <= 0 or n <= size:
        return [batch]
    shared = (WORD_TOKENS, WORD_CLASSES)
    return [{k: v if k in shared else v[i : i + size] for k, v in batch.items()} for i in range(0, n, size)]


def _train_steps(
    model, data, cfg, task, pad_id, device, generator, steps, optimizer, extra_loss, batches, clip, adjust, before_step
):
    model.train()
    opt = optimizer or make_optimizer(model, cfg)
    stream = batches or batch_stream(data, cfg.batch_size, generator)
    params = [p for p in model.parameters() if p.requires_grad]
    private = False
    if cfg.physical_batch_size:
        from fedtune.privacy import accumulate_physical_batch_, is_dp_optimizer

        private = is_dp_optimizer(opt)
    total, seen = 0.0, 0
    for _ in range(steps):
        raw = next(stream)
        batch = raw if isinstance(raw, dict) else collate(raw, pad_id, task)
        batch = {k: v.to(device) for k, v in batch.items()}
        if batch["input_ids"].shape[0] == 0:
            # an empty Poisson batch (DP-SGD): the noise-only step the accountant assumes
            from fedtune.privacy import empty_batch_step

            empty_batch_step(opt)
            continue
        n = batch["input_ids"].shape[0]
        pieces = physical_batches(batch, cfg.physical_batch_size)
        opt.zero_grad(set_to_none=True)
        for i, piece in enumerate(pieces):
            # the mean loss of the logical batch is the row-weighted mean of its pieces' means
            weight = piece["input_ids"].shape[0] / n
            with autocast(device, cfg.mixed_precision):
                task_loss = loss = batch_loss(model, piece, adjust)
            if extra_loss is not None:
                loss = loss + extra_loss()
            if private:
                # opacus computes each example's gradient whatever the piece size; the DP optimizer
                # clips and sums them, and only the logical batch's last piece steps and adds noise
                loss.backward()
                if i < len(pieces) - 1:
                    accumulate_physical_batch_(opt)
            else:
                (loss * weight if len(pieces) > 1 else loss).backward()
            total += float(task_loss.detach()) * weight
        if clip and cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        if before_step is not None:
            before_step(opt)
        opt.step()
        seen += n
    return {"train_loss": total / max(steps, 1), "steps": float(steps), "examples_seen": float(seen)}


@torch.no_grad()
def evaluate(
    model,
    data: list[dict],
    *,
    task: str,
    pad_id: int,
    device: torch.device,
    batch_size: int = 64,
    num_labels: int = 2,
    mixed_precision: str = "no",
) -> dict[str, float]:
    """Held-out metrics: accuracy, macro-F1 and loss (classification, label words); loss and perplexity (causal LM)."""
    was_training = model.training
    model.eval()
    order = sorted(range(len(data)), key=lambda i: len(data[i]["input_ids"]))  # less padding
    loss_sum, weight = 0.0, 0
    correct = 0
    confusion = torch.zeros((num_labels, num_labels), dtype=torch.long)
    for i in range(0, len(order), batch_size):
        batch = collate([data[j] for j in order[i : i + batch_size]], pad_id, task)
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast(device, mixed_precision):
            out = class_scores(model, batch) if task == LABEL_WORDS else model(**batch)
        if task == CAUSAL_LM:
            logits = out.logits[:, :-1].float()
            labels = batch["labels"][:, 1:]
            n_prompt = logits.shape[1] - labels.shape[1]  # prompt tuning prepends virtual tokens
            if n_prompt > 0:
                logits = logits[:, n_prompt:]
            tok_loss = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="sum"
            )
            loss_sum += float(tok_loss)
            weight += int((labels != -100).sum())
        else:
            logits = out.float() if task == LABEL_WORDS else out.logits.float()
            labels = batch["labels"]
            loss_sum += float(torch.nn.functional.cross_entropy(logits, labels, reduction="sum"))
            weight += labels.shape[0]
            pred = logits.argmax(-1)
            correct += int((pred == labels).sum())
            idx = labels.cpu() * num_labels + pred.cpu()
            confusion += torch.bincount(idx, minlength=num_labels * num_labels).reshape(num_labels, num_labels)
    if was_training:
        model.train()
    loss = loss_sum / max(weight, 1)
    if task == CAUSAL_LM:
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": float(weight)}
    tp = confusion.diag().double()
    precision = tp / confusion.sum(0).clamp(min=1)
    recall = tp / confusion.sum(1).clamp(min=1)
    f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall), torch.zeros_like(tp))
    return {"accuracy": correct / max(weight, 1), "macro_f1": float(f1.mean()), "loss": loss, "examples": float(weight)}
