"""Projected first-order optimization of a perturbation: PGD (sign / normalized-gradient) and Adam.

Every attack in spdbench runs through `optimize`, so projection after every step, the step-size
schedule and the loss curve are implemented once. The loss curve is kept on the device and copied
to the host once at the end: logging it must not force a host-device sync per step.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Literal, Optional

import torch

from .budget import Budget, clamp_to_image

OptimizerName = Literal["pgd", "adam"]
LossFn = Callable[[torch.Tensor], torch.Tensor]


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
) -> OptimResult:
    """Minimize (or maximize) `loss_fn(delta)` (a scalar) over the budget ball.

    After every step delta is projected onto the ball and, when `images` is given, shrunk so that
    `images + delta` stays in [0, 1] (per-image attacks; a universal delta is clamped when applied).
    `stop_below` (optional, costs a sync per step) ends early once the minimized loss drops below it.
    """
    if optimizer not in ("pgd", "adam"):
        raise ValueError(f"unknown optimizer {optimizer!r}; expected 'pgd' or 'adam'")
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    sign = -1.0 if maximize else 1.0
    delta = delta.detach().clone().requires_grad_(True)
    adam = torch.optim.Adam([delta], lr=step_size) if optimizer == "adam" else None
    curve = torch.empty(steps, dtype=torch.float32, device=delta.device)
    ran = 0
    for i in range(steps):
        loss = loss_fn(delta)
        curve[i] = loss.detach().float()
        (grad,) = torch.autograd.grad(sign * loss, delta)
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
        if stop_below is not None and sign * float(curve[i]) < stop_below:
            break
    return OptimResult(delta=delta.detach(), losses=curve[:ran].tolist(), steps_run=ran)
