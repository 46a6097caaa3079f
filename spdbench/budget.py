"""Perturbation budgets on the [0, 1] image scale.

One place owns the budget arithmetic (parse, project, clamp, quantize) so that attacks and the
harness cannot disagree on what "16/255" means. eps is always on the [0, 1] scale.
"""
from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import dataclass
from fractions import Fraction
from typing import Optional, Literal, Union

import numpy as np
import torch

from spdbench.errors import BudgetError

NormName = Literal["linf", "l2"]
EpsLike = Union[float, int, str]
NORMS = ("linf", "l2")


def parse_eps(value: EpsLike, norm: str = "linf") -> float:
    """Parse eps given as a float on [0,1] or as a string "k/255" / "0.0627".

    Also accepted, by a documented conversion: any real scalar -- a numpy scalar, a 0-d numpy array
    or a 0-d torch tensor (on any device) -- is read with float(); a float16/bfloat16/float32 one is
    then snapped to the nearest k/255 when it lies within that dtype's rounding error of it, so
    np.float32(16/255) is the budget 16/255 and not 16.0000010/255. Booleans, complex numbers and
    tensors/arrays of more than one value are refused (pass a list for several budgets).

    An L-inf eps above 1 is meaningless on [0,1] images; the usual cause is writing `16` for
    `16/255`, so the error says exactly that.
    """
    eps, shown = _eps_number(value)
    if not math.isfinite(eps):
        raise BudgetError(f"eps must be finite, got {shown}")
    if eps <= 0:
        raise BudgetError(f"eps must be > 0 (use the 'none' attack for no perturbation), got {shown}")
    if norm == "linf" and eps > 1:
        fraction = isinstance(value, str) and "/" in value
        if not fraction and eps <= 255:
            plain = value.strip() if isinstance(value, str) else f"{eps:g}"
            hint = f"; did you mean '{plain}/255' (= {eps / 255:.4f})?"
        else:
            hint = ": an L-inf budget is at most 1 = 255/255 (usual budgets are 4/255 to 40/255)"
        value_text = f"{shown} = {eps:.6g}" if fraction else shown
        raise BudgetError(f"eps {value_text} is above 1 on the [0,1] image scale{hint}")
    return eps


def _eps_number(value) -> tuple[float, str]:
    """(float eps, how to show the value in an error) for every accepted input kind."""
    if isinstance(value, str):
        text = value.strip()
        if not text:
            raise BudgetError(f"eps {value!r} is empty; expected a number or a fraction like '16/255'")
        try:
            return (float(Fraction(text)) if "/" in text else float(text)), repr(value)
        except (ValueError, ZeroDivisionError):
            raise BudgetError(f"eps {value!r} is not a number or a fraction like '16/255'") from None
    if isinstance(value, torch.Tensor) or type(value).__module__ == "numpy":
        return _eps_from_array(value)
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value), repr(value)
    raise BudgetError(f"eps must be a number or 'k/255', got {type(value).__name__} {value!r:.60}")


def _eps_from_array(value) -> tuple[float, str]:
    """A numpy scalar / 0-d array / 0-d tensor as a float (see parse_eps for the snapping rule)."""
    kind = type(value).__name__
    shape = tuple(getattr(value, "shape", ()))
    if shape != ():
        raise BudgetError(f"eps must be one number, got a {kind} of shape {shape} "
                          "(pass a list of budgets for several cells)")
    dtype = value.dtype
    if isinstance(value, torch.Tensor):
        ok = dtype.is_floating_point or not (dtype.is_complex or dtype == torch.bool)
        tiny = torch.finfo(dtype).eps if dtype.is_floating_point else 0.0
    else:
        ok = np.issubdtype(dtype, np.floating) or np.issubdtype(dtype, np.integer)
        tiny = float(np.finfo(dtype).eps) if np.issubdtype(dtype, np.floating) else 0.0
    if not ok:
        raise BudgetError(f"eps must be a real number, got a {kind} of dtype {dtype}")
    eps = float(value.item())
    shown = " ".join(repr(value).split())[:80]
    if tiny < 1e-9 or not math.isfinite(eps):
        return eps, shown  # float64 / integers: exact, no snapping
    k = eps * 255
    if round(k) >= 1 and abs(k - round(k)) <= tiny * abs(k):
        eps = round(k) / 255
    return eps, shown


def format_eps(eps: float) -> str:
    """eps as 'k/255' when k is (close to) a positive integer, else as a decimal: 1e-30 is "1e-30",
    never "0/255" (a label of zero would name a budget that was not run)."""
    k = eps * 255
    if round(k) >= 1 and abs(k - round(k)) < 1e-6:
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


#: slack, in 8-bit levels, for float error in eps * 255 (1e-4 levels = 4e-7 on [0, 1], inside the
#: 1e-6 every budget check allows)
_LEVEL_TOL = 1e-4
#: L2: the quantized norm is brought to eps * (1 - this), so float32 error in the stored image
#: cannot push it past eps + 1e-6 (costs 2e-6 of the energy)
_L2_MARGIN = 1e-6


def quantize_within(images: torch.Tensor, adv: torch.Tensor, budget: Budget) -> torch.Tensor:
    """8-bit `adv` (already inside the ball and in [0, 1]) that stays inside the ball.

    Each pixel is rounded to the nearest of the 256 levels; then only what the rounding pushed out
    of the ball moves back one level toward the clean pixel (the clean photos are 8-bit, so one
    level back is inside again):
      linf: the pixels whose |delta| exceeds eps (every level in [x - eps, x + eps] is allowed);
      l2:   the fewest pixels, largest reduction of ||delta||^2 first (ties: the pixels rounding
            pushed outward the most), until the norm is <= eps.
    The rule before (the whole image rounded toward the clean one as soon as one pixel rounded
    past eps) lost 18% of a uniform L-inf delta's energy at eps 0.03 and took an L2 boundary
    delta of norm 2.0 to 1.69 on 128 px photos (0.5 to 0.26). What no rule can keep is listed in
    `effective_eps`.
    """
    x = images.double() * 255.0
    a = adv.double() * 255.0
    q = torch.round(a).clamp(0.0, 255.0)
    e = budget.eps * 255.0
    if budget.norm == "linf":
        hi = torch.floor((x + e).clamp(max=255.0) + _LEVEL_TOL)
        lo = torch.ceil((x - e).clamp(min=0.0) - _LEVEL_TOL)
        # == one level back toward x for a pixel rounded past eps when x is 8-bit (an off-grid x
        # with eps < 1/255 can leave [lo, hi] empty: then lo, at most one level past)
        return (torch.maximum(torch.minimum(q, hi), lo) / 255.0).to(adv.dtype)
    d = _l2_onto_budget(q - x, a - x, e, x)
    return ((x + d.view_as(x)) / 255.0).to(adv.dtype)


def _l2_onto_budget(d: torch.Tensor, wanted: torch.Tensor, e: float,
                    x: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Rounded L2 deltas `d` (levels) as close to the budget as the grid allows: rows rounding pushed
    past `e` levels come back inside (`_l2_back_inside`); rows rounding left short are filled back
    up toward `e` (`_l2_fill`) -- without the fill a flat-magnitude delta of L2 2.0 at 128 px (2.3
    levels per pixel, all rounded to 2) was stored at norm 1.739, a quarter of its energy lost.
    `x` (levels), when given, keeps x + d on [0, 255]. Returns (N, P)."""
    d = _l2_back_inside(d, wanted, e)
    return _l2_fill(d, wanted.flatten(1), e, None if x is None else x.flatten(1))


def _l2_fill(d: torch.Tensor, wanted: torch.Tensor, e: float, x: Optional[torch.Tensor]) -> torch.Tensor:
    """Move pixels of rows under the budget one level further out, in the direction the attack
    wanted, while the norm stays <= e: the pixels rounding pulled inward the most go first (they
    are the ones closest to where the attack put them), each costing (|d| + 1)^2 - |d|^2."""
    limit = (e * (1.0 - _L2_MARGIN)) ** 2
    slack = limit - d.pow(2).sum(dim=1)
    rows = torch.nonzero(slack >= 1.0).flatten()  # a single move costs at least one level^2
    if not rows.numel():
        return d
    dr, wr = d[rows], wanted[rows]
    step = torch.sign(wr)
    pulled_in = wr.abs() - dr.abs()  # > 0: rounding moved this pixel toward zero
    ok = (pulled_in > _LEVEL_TOL) & (step != 0) & (torch.sign(dr) * step >= 0)
    if x is not None:
        after = x[rows] + dr + step
        ok &= (after >= 0.0) & (after <= 255.0)
    cost = 2.0 * dr.abs() + 1.0
    order = torch.where(ok, pulled_in, torch.full_like(pulled_in, -1.0)).argsort(dim=1, descending=True, stable=True)
    spent = torch.where(ok, cost, torch.full_like(cost, float("inf"))).gather(1, order).cumsum(dim=1)
    take = torch.zeros_like(dr).scatter_(1, order, (spent <= slack[rows, None]).to(dr.dtype))
    d = d.clone()
    d[rows] = dr + take * step
    return d


def _l2_back_inside(d: torch.Tensor, wanted: torch.Tensor, e: float) -> torch.Tensor:
    """Rounded deltas `d` (levels, (N, ...)) whose L2 norm rounding pushed past `e` levels, brought
    back inside by moving the fewest pixels one level toward zero (largest reduction of ||d||^2
    first; ties: the pixels that rounding pushed outward the most from `wanted`). Returns (N, P)."""
    d = d.flatten(1).clone()
    limit = (e * (1.0 - _L2_MARGIN)) ** 2
    excess = d.pow(2).sum(dim=1) - limit
    rows = torch.nonzero(excess > 0).flatten()
    if rows.numel():
        dr = d[rows]
        size = dr.abs()
        movable = size >= 1.0 - _LEVEL_TOL
        reduction = torch.where(movable, size.pow(2) - (size - 1.0).pow(2), torch.zeros_like(size))
        outward = (size - wanted.flatten(1)[rows].abs()).clamp(-0.5, 0.5)  # rounding's push outward
        key = torch.where(movable, reduction + 0.9 * outward, torch.full_like(size, -1.0))
        order = key.argsort(dim=1, descending=True)
        gained = reduction.gather(1, order).cumsum(dim=1)
        count = (gained < excess[rows, None]).sum(dim=1, keepdim=True) + 1  # pixels to move back
        ranks = torch.arange(dr.shape[1], device=dr.device).expand_as(dr)
        move = torch.zeros_like(dr).scatter_(1, order, (ranks < count).to(dr.dtype))
        d[rows] = dr - move * dr.sign()
    return d


def quantize_delta(delta: torch.Tensor, budget: Budget) -> torch.Tensor:
    """A delta (already inside the ball) on the 8-bit grid of differences, still inside the ball.

    Why: a universal delta u is one perturbation shared by every photo. Rounding x + u photo by
    photo (`quantize_within`) rounds a u that sits on a half level up for one photo and down for
    another, so the stored photos would no longer carry one u (4.9% of positions for SPD(SDS-)'s
    default half-level step) and the submission check could not tell it from per-image deltas.
    The harness therefore puts u itself on whole levels, once, before it is broadcast: then
    clamp(x + u) of an 8-bit photo is already 8-bit and inside the ball, and every photo carries u
    exactly (or is clamped at 0 or 255). Same rules as `quantize_within` with x = 0 and no range.
    """
    d = delta.double() * 255.0
    q = torch.round(d)
    e = budget.eps * 255.0
    if budget.norm == "linf":
        k = math.floor(e + _LEVEL_TOL)
        return (q.clamp(-k, k) / 255.0).to(delta.dtype)
    return (_l2_onto_budget(q, d, e).view_as(q) / 255.0).to(delta.dtype)


def apply_budget(images: torch.Tensor, delta: torch.Tensor, budget: Budget,
                 quantize: bool = True) -> torch.Tensor:
    """The harness rule: project, clamp x+delta to [0,1], quantize to 8 bits. Returns x + delta.

    Quantization (`quantize_within`) rounds to nearest and moves back one level only the pixels
    that rounding pushed past the budget, so the stored image keeps both the budget and (up to
    the grid) the energy; `applied_norms` gives the norm that was actually applied.
    """
    adv = images + clamp_to_image(images, budget.project(delta))
    if not quantize:
        return adv
    return quantize_within(images, adv, budget)


def applied_norms(images: torch.Tensor, adv: torch.Tensor, budget: Budget) -> torch.Tensor:
    """Per-image norm of what was applied, ||adv - images|| (N,), float32: the record's
    `max_norm_applied` is its max (the attack's own delta may have been larger before projection)."""
    return budget.norms(adv - images)


def effective_eps(budget: Budget, quantize: bool = True) -> float:
    """The largest norm an 8-bit image can reach inside the budget around an 8-bit photo.

    L-inf: floor(eps * 255) / 255 (0.03 = 7.65/255 -> 7/255: no 8-bit pixel can sit 7.65 levels
    away, so a full-budget sign perturbation keeps (7 / 7.65)^2 = 84% of its energy whatever the
    rounding rule). L2: eps, to within one level's worth of norm: rounding that leaves a
    boundary delta short (a flat-magnitude delta rounded down everywhere) is filled back up
    (`_l2_fill`) and one that pushes it out is brought back (`_l2_back_inside`); the pixels that
    can move are the ones the attack moved, so a delta of a few pixels that sit at 0/255 can
    still end short, which `applied_norms` shows.
    """
    if not quantize or budget.norm == "l2":
        return budget.eps
    return math.floor(budget.eps * 255.0 + _LEVEL_TOL) / 255.0


def warn_if_suspicious(eps: float, norm: str) -> None:
    """Warn for eps that parse but are unusual for the norm (L-inf above 64/255)."""
    if norm == "linf" and eps > 64 / 255:
        warnings.warn(f"eps {format_eps(eps)} is far above the usual immunization budgets (<= 40/255)")


#: a perturbation using less of its budget than this (its RMS over the strongest one the 8-bit grid
#: allows) is flagged "under budget" on the board and by `check_attack`: ranking it "at 8/255" would
#: compare it with methods that spend the whole ball (a suite may set its own floor)
BUDGET_USE_FLOOR = 0.9


def full_budget_rms(budget: Budget, n_values: int) -> float:
    """RMS (on [0, 1]) of the strongest 8-bit perturbation inside `budget` over `n_values` values:
    every value at the effective eps (L-inf), or the norm eps spread evenly (L2)."""
    if budget.norm == "linf":
        return effective_eps(budget)
    return budget.eps / math.sqrt(n_values)


def budget_use(delta: torch.Tensor, budget: Budget) -> torch.Tensor:
    """Per image (N,): the RMS of `delta` as a fraction of `full_budget_rms` -- 1.0 for a full
    sign perturbation, about 0.58 for uniform noise U[-eps, eps], 0 for no change."""
    rms = delta.flatten(1).double().pow(2).mean(dim=1).sqrt()
    return (rms / full_budget_rms(budget, delta[0].numel())).float()


def budget_use_from_psnr(psnr_db: float, budget: Budget, n_values: int) -> float:
    """`budget_use` from a stored per-image PSNR (data range 1): RMS = 10^(-PSNR / 20). The board
    derives it from the records' per-image values, never from what an attack reports."""
    return 10.0 ** (-psnr_db / 20.0) / full_budget_rms(budget, n_values)
