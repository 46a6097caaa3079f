"""DiffusionGuard (Choi et al., "DiffusionGuard: A Robust Defense Against Malicious Diffusion-based
Image Editing", ICLR 2025; code: choi403/DiffusionGuard, `attacks/attack_diffusionguard.py`,
`attacks/common.py`, `config/diffusionguard.yaml`, `utils/mask_generation.py`).

Why it differs from the img2img attacks: an inpainting model paints the hole from pure noise, so
the only thing a perturbation can reach is the *condition* -- the latent of the kept region. The
inpainting UNet draws fine detail at its first, noisiest step; DiffusionGuard makes that first
noise prediction as large as it can:

    maximize  || eps_theta([z_T, m', E(x_adv * (1 - m'))], t_1, c) ||_2   per image,
    z_T ~ N(0, I) fresh each step, t_1 = the first timestep of a 4-step schedule, c = prompt "",

where m' is the editor's mask *augmented* each step: the kept region shrunk along its contour by
a random depth, so the protection survives masks that differ from the one it was made with.

What the anchor does and what this port does (all budgets on spdbench's [0, 1] scale):
- The anchor works on [-1, 1] images: eps 0.0627 = 16/255 and step 0.00392 = 1/255 *there*, i.e.
  8/255 and 0.5/255 on [0, 1]. Preset "official" uses those (a third-party port that kept 16/255
  on [0, 1] doubled the budget). 800 signed-gradient steps, zero start, no guidance.
- The perturbation lives on the kept region only (the hole is blanked before encoding, so its
  gradient is zero there); the harness projects onto the budget and [0, 1] after every step.
- Mask augmentation: the anchor jitters the kept region's contour points inward (1..15 passes of
  random offsets up to int(1.1 * U(0, r)), smoothed, with OpenCV), r = sqrt(pi * A / 2) for a kept
  area of A pixels (`utils/utils.py:get_mask_radius_list`: the area of the 3-channel mask PNG over
  3 * 2 / pi). Here the kept region is eroded by a random depth k ~ U{0 .. int(1.1 * U(0, r))}
  pixels (a square structuring element: the repaint mask max-pooled), drawn from the attack's
  generator: the anchor's radius and depth bound without OpenCV's contour tracing. The erosion
  is harsher than the anchor's smoothed jitter: on smoke-inpaint's centre box (a 32 px kept frame
  at 128 px, r = 139) it removes the whole kept region in about half the steps, which then have
  no gradient. So the default stays `augment="disk"` (or True, what entries made before
  recorded), this port's earlier rule, r = sqrt(A / pi), 2.22x smaller: with the anchor's radius
  on a square erosion, DiffusionGuard no longer beat uniform noise on its own objective in
  `check_attack` (8 steps, tiny-inpaint). `augment="anchor"` (and the `official` preset) uses the
  anchor's radius; a faithful contour jitter needs OpenCV, which is not a dependency.
- The masked image's latent is the posterior mean (the anchor draws a sample): one less noise
  source, the same expectation.
`objective()` (lower = stronger) is minus the norm, averaged over `eval_samples` fixed z_T draws
with the editor's own (unaugmented) mask.
"""
from __future__ import annotations

import copy
import math
from typing import Any, ClassVar, Optional

import torch

from spdbench.budget import Budget
from spdbench.errors import InputError
from spdbench.targets.instruct import is_instruct
from spdbench.attacks.base import register
from spdbench.attacks.objectives import (ITERATION_DEFAULTS, STOCHASTIC_FINISH, GradientAttack, check_choice, check_masks,
                                         draw, latent_shape)


def first_timestep(target, num_inference_steps: int) -> int:
    """The first (noisiest) timestep of the target scheduler's `num_inference_steps` schedule."""
    scheduler = copy.deepcopy(target.scheduler)
    scheduler.set_timesteps(int(num_inference_steps))
    return int(scheduler.timesteps[0])


#: `augment`: "anchor" (the anchor's radius rule; the `official` preset), "disk" (this port's rule, the default),
#: True (what entries made before the choice existed recorded: the "disk" rule), False (no augmentation)
AUGMENT_CHOICES = ("anchor", "disk", True, False)
AUGMENT_RULE = {"anchor": "anchor", "disk": "disk", True: "disk"}

#: the radius rules of the augmentation: "anchor" = utils/utils.py:get_mask_radius_list (the kept
#: area counted over 3 RGB channels and divided by 3 * 2 / pi, i.e. sqrt(pi * A / 2)); "disk" = the
#: radius of the disk of area A, sqrt(A / pi), which this port used before (2.22x smaller)
RADIUS_RULES = ("anchor", "disk")


def kept_radius(kept_area: float, rule: str = "anchor") -> float:
    """The contour-shrink radius of a kept region of `kept_area` pixels under `rule` (RADIUS_RULES)."""
    if rule == "anchor":
        return math.sqrt(math.pi * kept_area / 2.0)
    if rule == "disk":
        return math.sqrt(kept_area / math.pi)
    raise InputError(f"radius rule must be one of {list(RADIUS_RULES)}, got {rule!r}")


def shrink_kept_region(masks: torch.Tensor, generator: torch.Generator, strength: float = 1.1,
                       rule: str = "disk") -> torch.Tensor:
    """Each repaint mask (N, 1, H, W; 1 = repaint) grown by a random depth, i.e. its kept region
    eroded by k ~ U{0 .. D} px with D = int(strength * U(0, r)) under the anchor's rule (its
    `eps=int(perturb_dist * contour_strength)`) and D = round(strength * U(0, r)) under "disk"
    (this port's earlier rule, kept so entries made with it re-run bit for bit); r = kept_radius."""
    out = []
    for m in masks:
        radius = kept_radius(float((m < 0.5).sum()), rule)
        u = float(torch.rand((), generator=generator, device=generator.device))
        depth_max = int(strength * u * radius) if rule == "anchor" else int(round(strength * u * radius))
        k = int(torch.randint(0, depth_max + 1, (1,), generator=generator, device=generator.device)) if depth_max else 0
        grown = torch.nn.functional.max_pool2d(m[None], 2 * k + 1, stride=1, padding=k)[0] if k else m
        out.append(grown)
    return torch.stack(out)


@register("diffusionguard")
class DiffusionGuard(GradientAttack):
    """DiffusionGuard (ICLR 2025): maximize the inpainting UNet's first noise prediction, with mask augmentation.

    Needs an inpainting target (smoke-inpaint, sd15-inpaint) and reads the editor's masks.

    Args (on the [0, 1] image scale):
        prompt: "" (the anchor's). inference_steps: 4 (t = the first timestep of this schedule).
        augment: "disk" (default; shrink the kept region by a random depth each step, radius
            sqrt(A / pi)) or True (the same), "anchor" (the anchor's radius sqrt(pi * A / 2)), False (none). contour_strength: 1.1.
        finish: None | "boundary" (push the result onto the budget's boundary: objectives.to_boundary).
        eval_samples: 4, eval_seed: 0 (the fixed z_T draws `objective()` averages).
        steps, step_size, optimizer, schedule, stop_below: the GradientAttack loop; init "zero" (the
            anchor's). The returned delta is zero on the repaint region, whatever the start.
    Presets: "official" = the anchor's config: L-inf 8/255 (16/255 on [-1, 1]), sign step 0.5/255,
        800 steps, zero start, 4-step schedule, augmentation on.
    Shapes: images (N, 3, H, W) in [0, 1], masks (N, 1, H, W) -> delta (N, 3, H, W); objective (N,).
    """

    defaults: ClassVar[dict[str, Any]] = {**ITERATION_DEFAULTS, "init": "zero", "prompt": "", "inference_steps": 4,
                                          "augment": "disk",
                                          "contour_strength": 1.1, "eval_samples": 4, "eval_seed": 0,
                                          "finish": STOCHASTIC_FINISH}
    presets: ClassVar[dict[str, dict[str, Any]]] = {
        "official": dict(steps=800, step_size=0.5 / 255, optimizer="pgd", schedule="constant", init="zero",
                         inference_steps=4, augment="anchor", prompt=""),
    }
    preset_budgets: ClassVar[dict[str, Budget]] = {"official": Budget("linf", "8/255")}
    maximize: ClassVar[bool] = True
    stochastic: ClassVar[bool] = True
    uses_masks: ClassVar[bool] = True
    needs_inpainting: ClassVar[bool] = True

    def __init__(self, preset: Optional[str] = None, **params: Any) -> None:
        super().__init__(preset, **params)
        if not isinstance(self.prompt, str):
            raise InputError(f"attack {self.name!r}: prompt must be a string, got {type(self.prompt).__name__}")
        check_choice(self.name, "augment", self.augment, AUGMENT_CHOICES)
        for key in ("inference_steps", "eval_samples"):
            value = self.params[key]
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"attack {self.name!r}: {key} must be an integer >= 1, got {value!r}")
        self._masks: Optional[torch.Tensor] = None

    def perturb(self, images: torch.Tensor, target, budget: Budget, generator: Optional[torch.Generator] = None,
                masks: Optional[torch.Tensor] = None) -> torch.Tensor:
        if not getattr(target, "inpainting", False):
            what = "an instruction editor" if is_instruct(target) else "an img2img model"
            raise InputError(f"attack {self.name!r} protects against inpainting: target {target.name!r} is {what}, "
                             "not an inpainting model (use an inpainting suite such as smoke-inpaint)")
        self._masks = check_masks(self, images, masks, target)
        delta = super().perturb(images, target, budget, generator)
        return delta * (1 - self._masks)  # the editor repaints the hole: nothing is spent there (a random start)

    def objective_loss(self, target, adv: torch.Tensor, clean: torch.Tensor,
                       generator: Optional[torch.Generator] = None) -> torch.Tensor:
        masks = self._masks
        if masks is None or masks.shape[0] != adv.shape[0]:
            raise InputError(f"attack {self.name!r}: call perturb(..., masks=...) or set_masks() first")
        cond = self._cache.get(target, ("prompt", self.prompt), lambda: target.encode_prompt([self.prompt]).detach())
        t = self._cache.get(target, ("t1", self.inference_steps), lambda: first_timestep(target, self.inference_steps))
        evaluation = generator is None
        gen = torch.Generator().manual_seed(int(self.eval_seed)) if evaluation else generator
        samples = int(self.eval_samples) if evaluation else 1
        total = torch.zeros(adv.shape[0], device=adv.device)
        for _ in range(samples):
            m = masks if (self.augment is False or evaluation) else \
                shrink_kept_region(masks, gen, self.contour_strength, AUGMENT_RULE[self.augment])
            z_t = draw("randn", latent_shape(target, adv), gen, target.device)
            z_t = z_t * float(getattr(target.scheduler, "init_noise_sigma", 1.0))
            eps = target.predict_noise(z_t, t, cond, inpaint=target.inpaint_condition(adv, m))
            total = total + eps.float().flatten(1).norm(dim=1).to(total.device)
        return total / samples
