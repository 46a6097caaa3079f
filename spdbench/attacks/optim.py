"""Projected first-order optimization of a perturbation: PGD (sign / normalized-gradient) and Adam.

Every attack in spdbench runs through `optimize`, so projection after every step, the step-size
schedule and the loss curve are implemented once. The loss curve is kept on the device and copied
to the host once at the end: logging it must not force a host-device sync per step. For the same
reason a non-finite loss or gradient is recorded on the device every step and checked every
`CHECK_EVERY` steps and at the end: it is an `AttackError`, never a silent zero step
(`torch.sign(NaN)` is 0, so PGD would otherwise keep delta unchanged and report success).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Literal, Optional

import torch

from spdbench.budget import Budget, clamp_to_image
from spdbench.errors import AttackError
from spdbench.attacks.progress import report_step

OptimizerName = Literal["pgd", "adam"]
LossFn = Callable[[torch.Tensor], torch.Tensor]

#: steps between host-side checks for a non-finite loss or gradient (one sync per this many steps)
CHECK_EVERY = 50


@dataclass
class OptimResult:
    """The optimized delta and the per-iteration loss (the value *before* each step)."""

    delta: torch.Tensor
    losses: list[float] = field(default_factory=list)
    steps_run: int = 0


def step_size_at(i: int, steps: int, step_size: float, schedule: str = "constant") -> float:
    """'constant', or PhotoGuard's 'linear' decay s_i = s * (1 - 0.99 * i / N)."""
    if schedule == "constant":
        return step_size
    if schedule == "linear":
        return step_size * (1.0 - 0.99 * i / steps)
    raise ValueError(f"unknown step schedule {schedule!r}; expected 'constant' or 'linear'")


def _pgd_direction(grad: torch.Tensor, norm: str) -> torch.Tensor:
    if norm == "linf":
        return grad.sign()
    flat = grad.flatten(1)
    return (flat / flat.norm(dim=1, keepdim=True).clamp_min(1e-12)).view_as(grad)


def optimize(
    loss_fn: LossFn,
    delta: torch.Tensor,
    budget: Budget,
    *,
    steps: int,
    step_size: float,
    optimizer: OptimizerName = "pgd",
    maximize: bool = False,
    schedule: str = "constant",
    images: Optional[torch.Tensor] = None,
    stop_below: Optional[float] = None,
    loss_scale: float = 1.0,
    label: str = "optimize",
    model_dtype: Optional[torch.dtype] = None,
) -> OptimResult:
    """Minimize (or maximize) `loss_fn(delta)` (a scalar) over the budget ball.

    After every step delta is projected onto the ball and, when `images` is given, shrunk so that
    `images + delta` stays in [0, 1] (per-image attacks; a universal delta is clamped when applied).
    `stop_below` (optional, costs a sync per step) ends early once the minimized loss drops below it.
    `loss_scale`: `loss_fn` returns the objective times this positive factor, chosen so that its
    gradient is representable in the model's dtype (the sign step, the normalized L2 step and
    Adam do not depend on it); the loss curve and `stop_below` are in the objective's own units.
    A NaN or Inf loss or gradient raises `AttackError` naming `label`, the step and `model_dtype`.
    """
    if optimizer not in ("pgd", "adam"):
        raise ValueError(f"unknown optimizer {optimizer!r}; expected 'pgd' or 'adam'")
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if not (loss_scale > 0 and math.isfinite(loss_scale)):
        raise ValueError(f"loss_scale must be a finite number > 0, got {loss_scale!r}")
    sign = -1.0 if maximize else 1.0
    delta = delta.detach().clone().requires_grad_(True)
    adam = torch.optim.Adam([delta], lr=step_size) if optimizer == "adam" else None
    curve = torch.empty(steps, dtype=torch.float32, device=delta.device)
    bad = torch.zeros(steps, dtype=torch.bool, device=delta.device)  # loss or gradient not finite
    ran = 0
    for i in range(steps):
        loss = loss_fn(delta)
        curve[i] = loss.detach().float() / loss_scale
        (grad,) = torch.autograd.grad(sign * loss, delta)
        bad[i] = ~(torch.isfinite(loss.detach()).all() & torch.isfinite(grad).all())
        with torch.no_grad():
            lr = step_size_at(i, steps, step_size, schedule)
            if adam is not None:
                for group in adam.param_groups:
                    group["lr"] = lr
                delta.grad = grad
                adam.step()
                delta.grad = None
            else:
                delta -= lr * _pgd_direction(grad, budget.norm)
            delta.copy_(budget.project(delta))
            if images is not None:
                delta.copy_(clamp_to_image(images, delta))
        ran = i + 1
        report_step(ran, steps)  # two ints, no host sync: the harness's estimate (progress.py)
        if stop_below is not None or ran % CHECK_EVERY == 0 or ran == steps:
            _raise_if_not_finite(bad[:ran], curve, steps, label, model_dtype, delta.dtype)
        if stop_below is not None and sign * float(curve[i]) < stop_below:
            break
    return OptimResult(delta=delta.detach(), losses=curve[:ran].tolist(), steps_run=ran)


def _raise_if_not_finite(bad: torch.Tensor, curve: torch.Tensor, steps: int, label: str,
                         model_dtype: Optional[torch.dtype], delta_dtype: torch.dtype) -> None:
    """One host sync: AttackError at the first step whose loss or gradient was NaN/Inf."""
    if not bool(bad.any()):
        return
    first = int(bad.nonzero()[0])
    what = "gradient" if bool(torch.isfinite(curve[first])) else f"loss ({float(curve[first])})"
    where = (f"with a {_dtype_name(model_dtype)} model" if model_dtype is not None
             else f"on a {_dtype_name(delta_dtype)} delta")
    raise AttackError(
        f"{label}: non-finite {what} at step {first + 1} of {steps} {where}; no zero step is taken "
        f"silently (an objective whose gradient overflows this dtype must scale its loss: "
        f"optim.optimize's loss_scale)")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")
