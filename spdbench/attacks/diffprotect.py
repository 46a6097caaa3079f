"""The Diff-Protect family: AdvDM, SDS(+), SDS(-), SDS-T and Mist (Xue et al., "Toward effective
protection against diffusion-based mimicry through score distillation", ICLR 2024; code:
xavihart/Diff-Protect, `code/diff_mist.py` and `code/attacks.py`; Mist: Liang et al. 2023).

All of them read the *semantic loss* of the latent diffusion model, the denoising error

    L_sem(x) = mean_{latent dims} (eps_theta(z_t, t, c) - eps)^2,
    z = scaling * (mu(x) + sigma(x) * xi)   (a reparameterized posterior sample, differentiable),
    z_t = sqrt(abar_t) z + sqrt(1 - abar_t) eps,   t ~ U{0..T-1}, eps ~ N(0, I), c = "a photo",

one (xi, t, eps) draw per image per step, no classifier-free guidance. They differ in how they move:
AdvDM ascends L_sem with the full gradient (UNet and encoder); SDS replaces the UNet's Jacobian by
the identity, g_z = eps_theta(z_t) - eps pushed back through the encoder only (about half the
work: one UNet forward, no UNet backward), and ascends (+) or descends (-) it; Mist descends
L_tex - rate * L_sem with L_tex = sum (z(x) - z(x_T))^2 toward a pattern image x_T; SDS-T descends
rate * SDS + L_tex. Everything runs through `GradientAttack` and the `Target` diffusion
primitives (`latents`, `add_noise`, `predict_noise`), so the universal SPD versions (spd.py) reuse
these objectives unchanged.

Randomness, in the order it is drawn from the attack's generator every step (the parity tests in
tests/test_diffprotect_parity.py replay it): xi (posterior sample of x), t, eps; then for Mist
xi_T (the pattern's posterior sample); for SDS-T xi_T and then xi2 (a second sample of x for
L_tex, as the anchor encodes x again). `objective()` averages `eval_samples` draws from
`eval_seed`, so it is deterministic.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from importlib import resources
from typing import Any, ClassVar, Optional

import numpy as np
import torch
from PIL import Image

from spdbench.budget import Budget
from spdbench.errors import InputError
from spdbench.attacks.base import ATTACKS, register
from spdbench.attacks.objectives import (ITERATION_DEFAULTS, STOCHASTIC_FINISH, GradientAttack, check_choice, draw,
                                         latent_shape, posterior_sample, resize_image)

#: xavihart/Diff-Protect configs/attack/base.yaml + code/diff_mist.py: L-inf eps 16/255, sign
#: step 1/255 (2/255 on [-1, 1]), 100 iterations, constant step, prompt "a photo"
_ANCHOR = dict(steps=100, step_size=1 / 255, optimizer="pgd", schedule="constant", prompt="a photo")
_ANCHOR_BUDGET = Budget("linf", "16/255")
_COMMON = {**ITERATION_DEFAULTS, "prompt": "a photo", "eval_samples": 4, "eval_seed": 0, "finish": STOCHASTIC_FINISH}
PATTERN_FILE = "mist_pattern.png"


# --- the pattern image -----------------------------------------------------------------------------
def make_pattern(size: int = 512) -> np.ndarray:
    """The textural target, (size, size, 3) uint8, generated deterministically from arithmetic.

    Why not Mist's own MIST.png: its licence does not let us redistribute it. What matters for the
    textural loss is a target whose latent is far from a photo's: dense, high-contrast, colourful
    structure at several scales. This is three oriented sinusoidal gratings (periods 6, 11 and 23
    px) per colour channel, thresholded to full contrast, over a checkerboard of 32 px cells.
    """
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    out = np.empty((size, size, 3), dtype=np.uint8)
    for c, (angle, period) in enumerate(((0.3, 6.0), (1.4, 11.0), (2.5, 23.0))):
        u = x * math.cos(angle) + y * math.sin(angle)
        wave = np.sin(2 * math.pi * u / period) + 0.5 * np.sin(2 * math.pi * (x - y) / (period * 1.7))
        checker = ((x // 32 + y // 32 + c) % 2) * 2 - 1
        out[..., c] = np.where(wave + 0.6 * checker > 0, 235, 20).astype(np.uint8)
    return out


def load_pattern() -> torch.Tensor:
    """The shipped pattern PNG (512 px, == make_pattern(512)) as a (1, 3, 512, 512) float in [0, 1]."""
    with resources.files(__package__).joinpath("assets", PATTERN_FILE).open("rb") as fh:
        array = np.asarray(Image.open(fh).convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0).contiguous()


# --- the shared pieces -------------------------------------------------------------------------------
def pattern_posterior(cache, target_image, target, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mu, sigma) of the target pattern's posterior at the input's size, once per target and size
    in `cache` (Mist's and Mist-v2's z^T): `target_image` is "pattern" or a (1, 3, H, W) image."""
    size = tuple(like.shape[-2:])

    def make():
        image = load_pattern() if isinstance(target_image, str) else target_image.float()
        image = resize_image(image.reshape(-1, 3, *image.shape[-2:])[:1], size).to(target.device)
        with torch.no_grad():
            enc = target.encode(image)
        return enc.mean.detach(), (0.5 * enc.logvar).exp().detach()

    return cache.get(target, ("pattern", size), make)


@dataclass
class Draws:
    """One step's randomness for a batch: posterior sample xi, timesteps t (N,), diffusion noise eps."""

    xi: torch.Tensor
    t: torch.Tensor
    eps: torch.Tensor


def draw_step(target, images: torch.Tensor, generator: torch.Generator) -> Draws:
    """xi, then t ~ U{0..T-1} per image, then eps: the anchor's order (encode, then q_sample)."""
    shape = latent_shape(target, images)
    xi = draw("randn", shape, generator, target.device)
    t = torch.randint(0, target.num_train_timesteps, (shape[0],), generator=generator,
                      device=generator.device).to(target.device)
    eps = draw("randn", shape, generator, target.device)
    return Draws(xi, t, eps)


def denoising_error(target, z: torch.Tensor, d: Draws, cond: torch.Tensor,
                    image: Optional[torch.Tensor] = None) -> torch.Tensor:
    """eps_theta(z_t, t, c) - eps, float32, for the scaled latents z (differentiable in z); `image`
    the instruction editor's image condition (`posterior_sample`), None on any other target."""
    pred = target.predict_noise(target.add_noise(z, d.eps, d.t), d.t, cond, image_latents=image)
    return pred.float() - d.eps.float()


def per_image_mean(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).mean(dim=1)


def per_image_sum(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).sum(dim=1)


class DiffProtectAttack(GradientAttack):
    """Shared parameters and helpers of the family: the prompt's embedding, the evaluation draws."""

    defaults: ClassVar[dict[str, Any]] = dict(_COMMON)
    stochastic: ClassVar[bool] = True

    def __init__(self, preset: Optional[str] = None, **params: Any) -> None:
        super().__init__(preset, **params)
        if not isinstance(self.prompt, str):
            raise InputError(f"attack {self.name!r}: prompt must be a string, got {type(self.prompt).__name__}")
        for key in ("eval_samples",):
            value = self.params[key]
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"attack {self.name!r}: {key} must be an integer >= 1, got {value!r}")

    def condition(self, target) -> torch.Tensor:
        """CLIP embedding of the prompt (1, 77, D), once per target."""
        return self._cache.get(target, ("prompt", self.prompt), lambda: target.encode_prompt([self.prompt]).detach())

    def draws_for(self, generator: Optional[torch.Generator]) -> tuple[torch.Generator, int]:
        """(generator, draws to average): the attack's for a step, fixed ones for `objective`."""
        if generator is None:
            return torch.Generator().manual_seed(int(self.eval_seed)), int(self.eval_samples)
        return generator, 1

    def step_loss(self, target, adv: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The per-image loss for one draw of the step's randomness (N,), float32."""
        raise NotImplementedError

    def objective_loss(self, target, adv: torch.Tensor, clean: torch.Tensor,
                       generator: Optional[torch.Generator] = None) -> torch.Tensor:
        generator, samples = self.draws_for(generator)
        total = self.step_loss(target, adv, generator)
        for _ in range(samples - 1):
            total = total + self.step_loss(target, adv, generator)
        return total / samples


class _PatternMixin:
    """The textural target: the latent of the pattern (or a user image), resized to the input."""

    target_image: Any

    def _check_target_image(self) -> None:
        spec = self.target_image
        if isinstance(spec, str):
            check_choice(self.name, "target_image", spec, ("pattern",))
        elif not (isinstance(spec, torch.Tensor) and spec.dim() in (3, 4) and spec.shape[-3] == 3):
            raise InputError(f"attack {self.name!r}: target_image must be 'pattern' or a Tensor image "
                             f"(3, H, W) / (1, 3, H, W) in [0, 1], got {getattr(spec, 'shape', type(spec).__name__)}")

    def pattern_posterior(self, target, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mu, sigma) of the pattern's posterior at the input's size (computed once per target)."""
        return pattern_posterior(self._cache, self.target_image, target, like)

    def pattern_latents(self, target, like: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """z(x_T): a fresh posterior sample of the pattern per step (as the anchor re-encodes it)."""
        mean, std = self.pattern_posterior(target, like)
        xi = draw("randn", (like.shape[0],) + tuple(mean.shape[1:]), generator, target.device)
        return (mean + std * xi.to(mean.dtype)) * target.scaling_factor

    def texture_loss(self, target, z: torch.Tensor, like: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """L_tex = sum (z - z(x_T))^2 per image (N,), float32, against a fresh sample of the pattern."""
        z_target = self.pattern_latents(target, like, generator)
        return per_image_sum((z.float() - z_target.float()).pow(2))


_ARGS = """
    Args (all on the [0, 1] image scale):{extra}
        prompt: "a photo" (the condition c; the anchor's default). eval_samples: 4 and eval_seed: 0,
            the fixed draws `objective()` averages.
        steps: 100. step_size: None = 2.5 * eps / steps, else a float (1/255 in the anchor).
        optimizer: "pgd" | "adam". schedule: "constant" | "linear". init: {init}. stop_below: None.
        finish: None | "boundary" (the result pushed onto the budget's boundary, objectives.to_boundary:
            one draw per step leaves these attacks well inside the ball).
    Presets: "diff-protect" = the anchor's code (L-inf eps 16/255, sign step 1/255, 100 steps,
        constant step, init {init}, prompt "a photo"{preset_extra}).
    Shapes: images (N, 3, H, W) in [0, 1] -> delta (N, 3, H, W); objective (N,) {shape}.
    Usage: `delta = get_attack("{name}", preset="diff-protect")(x, target, Budget("linf", "16/255"), g)`
"""


@register("advdm")
class AdvDM(DiffProtectAttack):
    __doc__ = """AdvDM: raise the diffusion model's denoising error on x + delta (ascend L_sem).

    Paper: Liang et al., "Adversarial Example Does Good: Preventing Painting Imitation from
    Diffusion Models via Adversarial Examples", ICML 2023; as implemented in Diff-Protect
    (`mode=advdm`, advertorch LinfPGDAttack): full gradient through the UNet and the encoder of a
    reparameterized posterior sample, one (xi, t, eps) draw per step, random start.
    """ + _ARGS.format(extra="", init='"random" (the anchor)', preset_extra="",
                       shape="= L_sem (mean squared denoising error; `objective()` returns -L_sem)",
                       name="advdm")

    maximize: ClassVar[bool] = True
    defaults: ClassVar[dict[str, Any]] = {**_COMMON, "init": "random"}
    presets: ClassVar[dict[str, dict[str, Any]]] = {"diff-protect": dict(_ANCHOR, init="random")}
    preset_budgets: ClassVar[dict[str, Budget]] = {"diff-protect": _ANCHOR_BUDGET}

    def step_loss(self, target, adv: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        d = draw_step(target, adv, generator)
        z, image = posterior_sample(target, adv, d.xi)
        return per_image_mean(denoising_error(target, z, d, self.condition(target), image).pow(2))


class _SDS(DiffProtectAttack):
    """SDS: the denoising error as the gradient on z, without the UNet's Jacobian.

    The value is L_sem (for the loss curve and `objective`); the gradient is (dz/dx)^T g_z with
    g_z = eps_theta(z_t) - eps computed without gradient, through a straight-through surrogate
    L_sem + <g_z, z> - <g_z, z>.detach(). The sign step and the per-image L2 step do not see the
    anchor's missing constant factor; Adam would.
    """

    defaults: ClassVar[dict[str, Any]] = {**_COMMON, "init": "zero"}
    presets: ClassVar[dict[str, dict[str, Any]]] = {"diff-protect": dict(_ANCHOR, init="zero")}
    preset_budgets: ClassVar[dict[str, Budget]] = {"diff-protect": _ANCHOR_BUDGET}

    def sds(self, target, adv: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        d = draw_step(target, adv, generator)
        z, image = posterior_sample(target, adv, d.xi)
        with torch.no_grad():  # the UNet's Jacobian (its image channels included) replaced by the identity
            g = denoising_error(target, z.detach(), d, self.condition(target),
                                None if image is None else image.detach())
        value = per_image_mean(g.pow(2))
        surrogate = per_image_sum(g * z.float())
        return value + (surrogate - surrogate.detach())

    def step_loss(self, target, adv: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return self.sds(target, adv, generator)


@register("sds-plus")
class SDSPlus(_SDS):
    __doc__ = """SDS(+): a cheap AdvDM -- ascend L_sem with the score-distillation gradient.

    Paper: Xue et al., "Toward effective protection against diffusion-based mimicry through score
    distillation", ICLR 2024 (xavihart/Diff-Protect, `mode=sds g_mode=+`): g_z = eps_theta(z_t, t, c)
    - eps taken as the gradient on z (no UNet backward), pushed through the encoder only.
    """ + _ARGS.format(extra="", init='"zero" (the anchor)', preset_extra="",
                       shape="= L_sem (`objective()` returns -L_sem)", name="sds-plus")

    maximize: ClassVar[bool] = True


@register("sds-minus")
class SDSMinus(_SDS):
    __doc__ = """SDS(-): descend L_sem with the score-distillation gradient (the paper's strongest).

    Paper: Xue et al., "Toward effective protection against diffusion-based mimicry through score
    distillation", ICLR 2024 (xavihart/Diff-Protect, `mode=sds g_mode=-`, the config's default):
    moving x so the model finds it *easier* to denoise pulls the edit toward the model's own
    smooth prior. Same gradient as sds-plus, opposite direction.
    """ + _ARGS.format(extra="", init='"zero" (the anchor)', preset_extra="",
                       shape="= L_sem (lower = stronger)", name="sds-minus")

    maximize: ClassVar[bool] = False


@register("sds-t")
class SDST(_PatternMixin, _SDS):
    __doc__ = """SDS-T(-): descend rate * SDS + L_tex, the SDS gradient plus a pull toward a pattern.

    Paper: Xue et al., ICLR 2024 (xavihart/Diff-Protect, `mode=sds g_mode=- using_target=True`,
    target_rate 5): x <- x - alpha * sign(rate * g_x + grad_x L_tex), L_tex = sum (z(x) - z(x_T))^2
    on posterior samples (x encoded a second time for L_tex, as the anchor does).
    """ + _ARGS.format(extra="""
        target_image: "pattern" (the shipped pattern, `make_pattern`; Mist's own image is not
            redistributable) or a Tensor image (3, H, W) in [0, 1], resized to the input.
        rate: 5.0 (the anchor's target_rate), the weight of the SDS term.""",
                       init='"zero" (the anchor)', preset_extra=", rate 5",
                       shape="= rate * L_sem + L_tex (lower = stronger)", name="sds-t")

    maximize: ClassVar[bool] = False
    defaults: ClassVar[dict[str, Any]] = {**_SDS.defaults, "target_image": "pattern", "rate": 5.0}
    presets: ClassVar[dict[str, dict[str, Any]]] = {"diff-protect": dict(_ANCHOR, init="zero", rate=5.0)}

    def __init__(self, preset: Optional[str] = None, **params: Any) -> None:
        super().__init__(preset, **params)
        self._check_target_image()

    def step_loss(self, target, adv: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        sds = self.sds(target, adv, generator)
        z_target = self.pattern_latents(target, adv, generator)  # drawn before x's second sample
        xi2 = draw("randn", latent_shape(target, adv), generator, target.device)
        z = target.latents(adv, sample=True, noise=xi2)
        return float(self.rate) * sds + per_image_sum((z.float() - z_target.float()).pow(2))


@register("mist-diffprotect")
class Mist(_PatternMixin, DiffProtectAttack):
    __doc__ = """Mist as Diff-Protect implements it: pull the latent toward a pattern's while raising the denoising error.

    Named `mist-diffprotect` (formerly `mist`, still accepted: records made under that name
    resolve here): it is Diff-Protect's `mode=mist`, not the Mist-v2 tool (`mist-v2`, mist_v2.py).
    Paper: Liang et al., "Mist: Towards Improved Adversarial Examples for Diffusion Models", 2023;
    as implemented in Diff-Protect (`mode=mist`): PGD descent of L_tex - rate * L_sem with
    L_tex = sum (z(x) - z(x_T))^2 on posterior samples (the same z feeds L_sem), full gradient
    through the UNet and the encoder, random start.
    """ + _ARGS.format(extra="""
        target_image: "pattern" (the shipped pattern, `make_pattern`; Mist's own MIST.png is not
            redistributable) or a Tensor image (3, H, W) in [0, 1], resized to the input.
        rate: 1e4 (the anchor's fusion weight of L_sem; L_tex is a sum over latent dims, L_sem a
            mean, so the balance shifts toward L_sem at sizes below the anchor's 512 px).""",
                       init='"random" (the anchor)', preset_extra=", rate 1e4",
                       shape="= L_tex - rate * L_sem (lower = stronger)", name="mist-diffprotect")

    maximize: ClassVar[bool] = False
    defaults: ClassVar[dict[str, Any]] = {**_COMMON, "init": "random", "target_image": "pattern", "rate": 1e4}
    presets: ClassVar[dict[str, dict[str, Any]]] = {"diff-protect": dict(_ANCHOR, init="random", rate=1e4)}
    preset_budgets: ClassVar[dict[str, Budget]] = {"diff-protect": _ANCHOR_BUDGET}

    def __init__(self, preset: Optional[str] = None, **params: Any) -> None:
        super().__init__(preset, **params)
        self._check_target_image()

    def step_loss(self, target, adv: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        d = draw_step(target, adv, generator)
        z, image = posterior_sample(target, adv, d.xi)
        semantic = per_image_mean(denoising_error(target, z, d, self.condition(target), image).pow(2))
        return self.texture_loss(target, z, adv, generator) - float(self.rate) * semantic


#: the name this attack had before Mist-v2 joined (issue 35): old records and entries still resolve
ATTACKS.alias("mist", "mist-diffprotect")
