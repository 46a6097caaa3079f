"""Perturbation budgets on the [0, 1] image scale.

One place owns the budget arithmetic (parse, project, clamp, quantize) so that attacks and the
harness cannot disagree on what "16/255" means. eps is always on the [0, 1] scale.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from fractions import Fraction
from typing import Literal, Union

import torch

from .errors import BudgetError

NormName = Literal["linf", "l2"]
EpsLike = Union[float, int, str]
NORMS = ("linf", "l2")


def parse_eps(value: EpsLike, norm: str = "linf") -> float:
    """Parse eps given as a float on [0,1] or as a string "k/255" / "0.0627".

    An L-inf eps above 1 is meaningless on [0,1] images; the usual cause is writing `16` for
    `16/255`, so the error says exactly that.
    """
    if isinstance(value, bool):
        raise BudgetError(f"eps must be a number or 'k/255', got {value!r}")
    if isinstance(value, str):
        text = value.strip()
        try:
            eps = float(Fraction(text)) if "/" in text else float(text)
        except (ValueError, ZeroDivisionError):
            raise BudgetError(f"eps {value!r} is not a number or a fraction like '16/255'") from None
    elif isinstance(value, (int, float)):
        eps = float(value)
    else:
        raise BudgetError(f"eps must be a number or 'k/255', got {type(value).__name__}")
    if not math.isfinite(eps):
        raise BudgetError(f"eps must be finite, got {value!r}")
    if eps <= 0:
        raise BudgetError(f"eps must be > 0 (use the 'none' attack for no perturbation), got {value!r}")
    if norm == "linf" and eps > 1:
        raise BudgetError(
            f"eps {value!r} is above 1 on the [0,1] image scale; did you mean '{value}/255' "
            f"(= {eps / 255:.4f})?"
        )
    return eps


def format_eps(eps: float) -> str:
    """eps as 'k/255' when k is (close to) an integer, else as a decimal."""
    k = eps * 255
    if abs(k - round(k)) < 1e-6:
        return f"{int(round(k))}/255"
    return f"{eps:.6g}"


@dataclass(frozen=True)
class Budget:
    """A perturbation budget: ||delta||_norm <= eps on the [0,1] scale, per image.

    Attack iteration settings live on the attack, not here: the budget is the harness's rule,
    the iterations are the attack's business.
    """

    norm: NormName = "linf"
    eps: float = 16 / 255

    def __init__(self, norm: str = "linf", eps: EpsLike = "16/255") -> None:
        if norm not in NORMS:
            raise BudgetError(f"unknown norm {norm!r}; expected one of {NORMS}")
        object.__setattr__(self, "norm", norm)
        object.__setattr__(self, "eps", parse_eps(eps, norm))

    @property
    def label(self) -> str:
        return f"{self.norm}:{format_eps(self.eps)}"

    def __str__(self) -> str:
        return self.label

    def norms(self, delta: torch.Tensor) -> torch.Tensor:
        """Per-image norm of delta, shape (N,)."""
        flat = delta.detach().flatten(1).float()
        if self.norm == "linf":
            return flat.abs().amax(dim=1)
        return flat.norm(p=2, dim=1)

    def project(self, delta: torch.Tensor) -> torch.Tensor:
        """Project each image's delta onto the eps ball of this norm."""
        if self.norm == "linf":
            return delta.clamp(-self.eps, self.eps)
        flat = delta.flatten(1)
        norms = flat.norm(p=2, dim=1, keepdim=True).clamp_min(1e-12)
        factor = (self.eps / norms).clamp(max=1.0)
        return (flat * factor).view_as(delta)

    def contains(self, delta: torch.Tensor, tol: float = 1e-6) -> bool:
        return bool((self.norms(delta) <= self.eps + tol).all())

    def random(self, like: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """A random delta inside the ball: U[-eps, eps] for linf, a uniform-radius direction for l2."""
        u = torch.rand(like.shape, generator=generator, device=like.device, dtype=torch.float32)
        if self.norm == "linf":
            return ((u * 2 - 1) * self.eps).to(like.dtype)
        g = torch.randn(like.shape, generator=generator, device=like.device, dtype=torch.float32)
        r = torch.rand((like.shape[0],) + (1,) * (like.dim() - 1), generator=generator,
                       device=like.device, dtype=torch.float32)
        g = g / g.flatten(1).norm(dim=1).clamp_min(1e-12).view(r.shape)
        return (g * r * self.eps).to(like.dtype)


def clamp_to_image(images: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """Shrink delta so that images + delta stays in [0, 1]."""
    return (images + delta).clamp(0.0, 1.0) - images


def quantize_8bit(images: torch.Tensor) -> torch.Tensor:
    """Round to the 256 levels a PNG stores (protected photos are shared as 8-bit files)."""
    return torch.round(images.clamp(0.0, 1.0) * 255.0) / 255.0


def apply_budget(images: torch.Tensor, delta: torch.Tensor, budget: Budget,
                 quantize: bool = True) -> torch.Tensor:
    """The harness rule: project, clamp x+delta to [0,1], quantize to 8 bits. Returns x + delta.

    Rounding to nearest can push a coordinate up to 0.5/255 past the ball; for an image where it
    does, every coordinate is rounded toward the clean image instead, which never increases
    |delta| (the clean photos are themselves 8-bit), so the stored image respects the budget.
    """
    adv = images + clamp_to_image(images, budget.project(delta))
    if not quantize:
        return adv
    nearest = quantize_8bit(adv)
    over = budget.norms(nearest - images) > budget.eps + 1e-6
    if bool(over.any()):
        scaled = adv * 255.0
        toward = torch.where(adv >= images, torch.floor(scaled + 1e-4), torch.ceil(scaled - 1e-4)) / 255.0
        nearest = torch.where(over.view(-1, *([1] * (adv.dim() - 1))), toward.clamp(0.0, 1.0), nearest)
    return nearest


def warn_if_suspicious(eps: float, norm: str) -> None:
    """Warn for eps that parse but are unusual for the norm (L-inf above 64/255)."""
    if norm == "linf" and eps > 64 / 255:
        warnings.warn(f"eps {format_eps(eps)} is far above the usual immunization budgets (<= 40/255)")
