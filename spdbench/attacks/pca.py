"""Posterior Collapse Attacks PCA+ and PCA- (Guo et al., "A Gray-Box Attack Against Latent Diffusion
Model-Based Image Editing by Posterior Collapse", IEEE T-IFS 2025 / arXiv 2024; code:
ZhongliangGuo/PosteriorCollapseAttack).

Both act on the VAE posterior q(z|x) = N(mu, diag(sigma^2)) only, through the KL divergence to an
isotropic Gaussian N(0, v I) computed in float32 whatever the target's dtype
(`objectives.kl_to_isotropic_gaussian`). Their `objective_loss` is the one spd.py reuses.
"""
from __future__ import annotations

import math
from typing import Any, ClassVar, Optional

import torch

from spdbench.budget import Budget
from spdbench.errors import InputError
from spdbench.attacks.base import register
from spdbench.attacks.objectives import ITERATION_DEFAULTS, GradientAttack, kl_to_isotropic_gaussian

#: ZhongliangGuo/PosteriorCollapseAttack main.py / vae_attack.py: eps 16/255, alpha 2/255 sign
#: steps, 40 iterations, delta = 0 start, delta clipped to eps then x + delta to [0, 1]
_GUO = dict(steps=40, step_size=2 / 255, optimizer="pgd", schedule="constant", init="zero")
_GUO_BUDGET = Budget("linf", "16/255")
_PCA_DEFAULTS = {**ITERATION_DEFAULTS, "init": "zero"}


@register("pca-plus")
class PCAPlus(GradientAttack):
    """PCA+: push the VAE posterior of x + delta away from the prior, max KL(q(z|x+delta) || N(0, I)).

    Paper: Guo et al., "A Gray-Box Attack Against Latent Diffusion Model-Based Image Editing by
    Posterior Collapse", IEEE T-IFS 2025 (ZhongliangGuo/PosteriorCollapseAttack, v = 1 with
    `reverse_direct`). Minimizes -KL per image (summed over latent dims) with projected sign
    descent (or Adam); KL in float32.

    Args (all on the [0, 1] image scale):
        steps: 100 iterations. step_size: None = 2.5 * eps / steps, else a float (2/255 in the paper).
        optimizer: "pgd" | "adam". schedule: "constant" | "linear". init: "zero" (the paper) |
        "random". stop_below: None.
    Presets: "guo" = the reference code (L-inf eps 16/255, step 2/255 sign, 40 steps, delta = 0 start).
    Shapes: images (N, 3, H, W) in [0, 1] -> delta (N, 3, H, W); objective (N,) = -KL in nats.
    Usage: `delta = get_attack("pca-plus", preset="guo")(x, target, Budget("linf", "16/255"), g)`
    """

    defaults: ClassVar[dict[str, Any]] = dict(_PCA_DEFAULTS)
    presets: ClassVar[dict[str, dict[str, Any]]] = {"guo": dict(_GUO)}
    preset_budgets: ClassVar[dict[str, Budget]] = {"guo": _GUO_BUDGET}

    def objective_loss(self, target, adv: torch.Tensor, clean: torch.Tensor,
                       generator: Optional[torch.Generator] = None) -> torch.Tensor:
        posterior = target.encode(adv)
        return -kl_to_isotropic_gaussian(posterior.mean, posterior.logvar, 1.0)


@register("pca-minus")
class PCAMinus(GradientAttack):
    """PCA-: collapse the VAE posterior of x + delta to a point, min KL(q(z|x+delta) || N(0, v I)).

    Paper: Guo et al., "A Gray-Box Attack Against Latent Diffusion Model-Based Image Editing by
    Posterior Collapse", IEEE T-IFS 2025 (ZhongliangGuo/PosteriorCollapseAttack, v = 1e-8). Minimizes the KL
    per image (summed over latent dims; = -l + d/2 ln v for the reference's loss
    l = 1/2 sum(1 + logvar - (mu^2 + sigma^2) / v), so the gradient is the reference's) with
    projected sign descent (or Adam); KL in float32.

    Args (all on the [0, 1] image scale):
        v: 1e-8, the variance of the collapsed prior N(0, v I).
        steps: 100 iterations. step_size: None = 2.5 * eps / steps, else a float (2/255 in the paper).
        optimizer: "pgd" | "adam". schedule: "constant" | "linear". init: "zero" (the paper) |
        "random". stop_below: None.
    Presets: "guo" = the reference code (L-inf eps 16/255, step 2/255 sign, 40 steps, delta = 0 start).
    Shapes: images (N, 3, H, W) in [0, 1] -> delta (N, 3, H, W); objective (N,) = KL in nats
        (of order d / v: ~1e12 for SD at 512x512 with v = 1e-8; only its order matters).
        The optimizer minimizes v * KL (`loss_scale`, same direction, a gradient float16 can
        hold); `objective` and `loss_history` are the KL itself.
    Usage: `delta = get_attack("pca-minus", preset="guo")(x, target, Budget("linf", "16/255"), g)`
    """

    defaults: ClassVar[dict[str, Any]] = {**_PCA_DEFAULTS, "v": 1e-8}
    presets: ClassVar[dict[str, dict[str, Any]]] = {"guo": dict(_GUO, v=1e-8)}
    preset_budgets: ClassVar[dict[str, Budget]] = {"guo": _GUO_BUDGET}

    def __init__(self, preset: Optional[str] = None, **params: Any) -> None:
        super().__init__(preset, **params)
        v = self.v
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not (v > 0 and math.isfinite(v)):
            raise InputError(f"attack {self.name!r}: v must be a number > 0, got {v!r}")

    def objective_loss(self, target, adv: torch.Tensor, clean: torch.Tensor,
                       generator: Optional[torch.Generator] = None) -> torch.Tensor:
        posterior = target.encode(adv)
        return kl_to_isotropic_gaussian(posterior.mean, posterior.logvar, float(self.v))

    @property
    def loss_scale(self) -> float:
        """v: the KL's gradient is mu / v (and (sigma^2 / v - 1) / 2 for logvar), ~1e8 x mu for
        v = 1e-8, which overflows a float16 encoder's backward pass (every gradient became NaN,
        `sign(NaN)` = 0: delta stayed exactly zero). v * KL has gradient mu: the same direction."""
        return float(self.v)
