"""SCAFFOLD control variates for adapter training (option II), as pure tensor math.

Karimireddy et al. 2020, "SCAFFOLD: Stochastic Controlled Averaging for
Federated Learning", ICML, arXiv:1910.06378, Algorithm 1. The server keeps a
control variate ``c`` and each client its own ``c_i`` (both zero at first), one
tensor per trainable adapter key. A client corrects every local gradient by
``c - c_i`` (`LocalCorrection`), and after its K local steps from the global
``x`` to ``y_i`` sets ``c_i+ = c_i - c + (x - y_i) / (K eta_l)``
(`client_control_update`, option II); it sends its update ``y_i - x`` and
``delta_c_i = c_i+ - c_i``. The server moves ``x += eta_g * mean(update)`` and
``c += (|S| / N) * mean(delta_c_i)`` (`server_control_update`).

The paper analyses plain SGD, where ``c_i+`` is exactly the mean of the
gradients the client stepped on. With another optimizer (AdamW, momentum) the
same correction is added to the gradient the optimizer reads, and ``c_i+`` is
the drift ``(x - y_i)`` per unit of learning rate: a heuristic there, not the
paper's estimate. ``K eta_l`` is the sum of the learning rates of the steps
actually taken (`LocalCorrection.lr_sum`), which is ``K eta_l`` under a
constant rate and stays right under a per-step schedule.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from fedtune.delta import Delta


def zeros_like(state: Mapping[str, torch.Tensor]) -> Delta:
    """A zero control variate for the keys and shapes of ``state`` (float32)."""
    return {k: torch.zeros(v.shape, dtype=torch.float32) for k, v in state.items()}


def correction(c: Mapping[str, torch.Tensor], c_i: Mapping[str, torch.Tensor]) -> Delta:
    """``c - c_i``, the term SCAFFOLD adds to every local gradient (Alg. 1, line 10)."""
    _same_keys(c, c_i, "c_i")
    return {k: c[k] - c_i[k] for k in c}


def client_control_update(
    c_i: Mapping[str, torch.Tensor], c: Mapping[str, torch.Tensor], update: Mapping[str, torch.Tensor], lr_sum: float
) -> tuple[Delta, Delta]:
    """Option II of Alg. 1, line 12: ``(c_i+, delta_c_i)``.

    ``c_i+ = c_i - c + (x - y_i) / lr_sum`` with ``update = y_i - x`` (what the
    client sends) and ``lr_sum`` the sum of the local steps' learning rates
    (``K * eta_l`` under a constant rate); ``delta_c_i = c_i+ - c_i``.

    Raises:
        ValueError: ``lr_sum`` is not positive (no step was taken), or keys differ.
    """
    if not lr_sum > 0:
        raise ValueError(f"SCAFFOLD needs at least one local step with a positive learning rate (lr_sum {lr_sum!r})")
    _same_keys(c, c_i, "c_i")
    _same_keys(c, update, "update")
    new = {k: c_i[k] - c[k] - update[k].to(torch.float32) / lr_sum for k in c}
    return new, {k: new[k] - c_i[k] for k in c}


def server_control_update(
    c: Mapping[str, torch.Tensor], deltas: Sequence[Mapping[str, torch.Tensor]], num_clients: int
) -> Delta:
    """Alg. 1, line 17: ``c + (|S| / N) * mean(delta_c_i) = c + sum(delta_c_i) / N``.

    ``deltas`` are the accepted clients' ``delta_c_i`` (unweighted, as in the
    paper: ``c`` stays the plain mean of all N clients' ``c_i``), ``num_clients``
    is N. No deltas: ``c`` unchanged.
    """
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients!r}")
    out = {k: v.clone() for k, v in c.items()}
    for d in deltas:
        _same_keys(c, d, "delta_c_i")
        for k in out:
            out[k] = out[k] + d[k].to(out[k].dtype) / num_clients
    return out


class LocalCorrection:
    """Adds ``c - c_i`` to the gradients before each optimizer step, and counts the steps.

    ``params`` maps a name to the trainable parameter, ``corr`` the same name to
    its correction (same shape). Call it with the optimizer right before
    ``optimizer.step()`` (after any gradient clipping, so that under SGD the
    clipped gradients are what ``c_i+`` averages); it records that step's
    learning rate. A parameter with no gradient this step gets the correction
    alone, as the update ``y - eta_l (g - c_i + c)`` with ``g = 0`` asks.
    """

    def __init__(self, params: Mapping[str, torch.nn.Parameter], corr: Mapping[str, torch.Tensor]):
        _same_keys(params, corr, "correction")
        self.pairs = [(params[k], corr[k].to(device=params[k].device, dtype=params[k].dtype)) for k in sorted(params)]
        self.steps = 0
        self.lr_sum = 0.0

    def __call__(self, optimizer: torch.optim.Optimizer) -> None:
        for p, d in self.pairs:
            if p.grad is None:
                p.grad = d.clone()
            else:
                p.grad.add_(d)
        lrs = {float(g["lr"]) for g in optimizer.param_groups}
        if len(lrs) != 1:
            raise ValueError(f"SCAFFOLD needs one learning rate for all parameter groups, got {sorted(lrs)}")
        self.steps += 1
        self.lr_sum += lrs.pop()


def _same_keys(a: Mapping, b: Mapping, what: str) -> None:
    if set(a) != set(b):
        missing, extra = sorted(set(a) - set(b)), sorted(set(b) - set(a))
        raise KeyError(f"{what} keys differ from the control variate's: missing {missing[:3]}, extra {extra[:3]}")


__all__ = [
    "LocalCorrection",
    "client_control_update",
    "correction",
    "server_control_update",
    "zeros_like",
]
