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

The paper analyses plain SGD, where option II's ``c_i+`` is exactly the mean of
the gradients the client stepped on (before the correction):
``(x - y_i) / (K eta_l) = mean_k(g_k + c - c_i)``, so ``c_i - c + (x - y_i) / (K eta_l)
= mean_k(g_k)``. That mean is what `LocalCorrection` records (weighted by each step's
learning rate, which is option II under a per-step schedule too), so ``c_i`` keeps
the units of a gradient whatever the optimizer: with AdamW the drift per unit of
learning rate is sign-like (about 1 per coordinate) while the gradients are ~1e-3, and a
correction built from the drift would swamp them. Adding ``c - c_i`` to the gradient
an adaptive optimizer reads is a heuristic there, not the paper's analysis.
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
    c_i: Mapping[str, torch.Tensor], mean_gradient: Mapping[str, torch.Tensor]
) -> tuple[Delta, Delta]:
    """Option II of Alg. 1, line 12: ``(c_i+, delta_c_i)``.

    ``c_i+`` is the client's learning-rate-weighted mean of the (clipped, uncorrected)
    gradients of its local steps (`LocalCorrection.mean_gradient`, keyed like ``c_i``),
    which under SGD equals option II's ``c_i - c + (x - y_i) / sum_k eta_k``;
    ``delta_c_i = c_i+ - c_i``.

    Raises:
        KeyError: the keys differ.
    """
    _same_keys(c_i, mean_gradient, "mean gradient")
    new = {k: mean_gradient[k].to(torch.float32) for k in c_i}
    return new, {k: new[k] - c_i[k] for k in c_i}


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
    """Adds ``c - c_i`` to the gradients before each optimizer step, and records the mean gradient.

    ``params`` maps a name to the trainable parameter, ``corr`` the same name to
    its correction (same shape). Call it with the optimizer right before
    ``optimizer.step()`` (after any gradient clipping): it adds that step's
    learning rate times the gradient it finds (zero for a parameter with no
    gradient) to a running sum, then adds the correction (a parameter with no
    gradient gets the correction alone, as the update ``y - eta_l (g - c_i + c)``
    with ``g = 0`` asks). `mean_gradient` is the learning-rate-weighted mean of the
    uncorrected gradients, SCAFFOLD's ``c_i+`` (`client_control_update`).
    """

    def __init__(self, params: Mapping[str, torch.nn.Parameter], corr: Mapping[str, torch.Tensor]):
        _same_keys(params, corr, "correction")
        self.names = sorted(params)
        self.pairs = [(params[k], corr[k].to(device=params[k].device, dtype=params[k].dtype)) for k in self.names]
        self.sums = [torch.zeros(params[k].shape, dtype=torch.float32, device=params[k].device) for k in self.names]
        self.steps = 0
        self.lr_sum = 0.0

    def __call__(self, optimizer: torch.optim.Optimizer) -> None:
        lrs = {float(g["lr"]) for g in optimizer.param_groups}
        if len(lrs) != 1:
            raise ValueError(f"SCAFFOLD needs one learning rate for all parameter groups, got {sorted(lrs)}")
        lr = lrs.pop()
        for (p, d), total in zip(self.pairs, self.sums):
            if p.grad is None:
                p.grad = d.clone()
            else:
                total.add_(p.grad.detach().float(), alpha=lr)
                p.grad.add_(d)
        self.steps += 1
        self.lr_sum += lr

    def mean_gradient(self) -> Delta:
        """The learning-rate-weighted mean of the uncorrected gradients, keyed by parameter name (float32, CPU).

        Raises:
            ValueError: no step with a positive learning rate was taken.
        """
        if not self.lr_sum > 0:
            raise ValueError(
                f"SCAFFOLD needs at least one local step with a positive learning rate (lr_sum {self.lr_sum!r})"
            )
        return {k: (total / self.lr_sum).cpu() for k, total in zip(self.names, self.sums)}


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
