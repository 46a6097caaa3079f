"""EditShield (Chen et al., "EditShield: Protecting Unauthorized Image Editing by Instruction-guided
Diffusion Models", ECCV 2024, arXiv 2311.12066; code: Allen-piexl/Editshield).

An instruction editor (InstructPix2Pix) sees the photo only through its VAE latent (the UNet's extra
image channels), so EditShield moves that latent as far as the budget allows: it *maximizes* the
latent shift ||E(T(x + delta)) - E(T(x))||^2, with T drawn every step from the transformations a
photo meets on its way to the editor (Expectation over Transformation): a centre crop, Gaussian
noise, a down-and-up resize. The loop is `GradientAttack`'s projected sign ascent.
"""
from __future__ import annotations

from typing import Any, ClassVar, Optional

import torch
import torch.nn.functional as F

from spdbench.budget import Budget
from spdbench.errors import InputError
from spdbench.attacks.base import register
from spdbench.attacks.objectives import ITERATION_DEFAULTS, GradientAttack, draw, resize_image

#: the EOT transformations EditShield's code ships one script each for (EOT_Center.py,
#: EOT_Gaussion.py, EOT_Resize.py); here one is drawn per step
TRANSFORMS = ("crop", "noise", "resize")


def centre_crop(x: torch.Tensor, scale: float) -> torch.Tensor:
    """The centre `scale` of the image (each side), resized back to the input's size."""
    h, w = x.shape[-2:]
    ch, cw = max(1, round(h * scale)), max(1, round(w * scale))
    top, left = (h - ch) // 2, (w - cw) // 2
    return resize_image(x[..., top:top + ch, left:left + cw], (h, w))


def down_up(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Resized to `scale` of its size and back (bilinear, antialiased): the detail a resize loses."""
    h, w = x.shape[-2:]
    small = F.interpolate(x, size=(max(1, round(h * scale)), max(1, round(w * scale))), mode="bilinear",
                          antialias=True, align_corners=False)
    return resize_image(small.clamp(0.0, 1.0), (h, w))


@register("editshield")
class EditShield(GradientAttack):
    """EditShield: push the instruction editor's image latent away from the clean photo's.

    Paper: Chen et al., ECCV 2024 (arXiv 2311.12066), code Allen-piexl/Editshield. Objective per
    image: ||mu(T(x + delta)) - mu(T(x))||_2^2 on the VAE posterior mean (unscaled: what
    InstructPix2Pix concatenates to its noisy latent), T one EOT draw per step shared by both
    sides, maximized by sign steps. It needs no UNet, so it runs on any target with a VAE; its
    objective is the instruction editor's image input.

    Args (all on the [0, 1] image scale):
        eot: which transformations to draw from, a subset of ("crop", "noise", "resize"); () = none.
        crop_min: 0.8, the centre crop keeps a side fraction drawn from U[crop_min, 1].
        noise_std: 0.05, the Gaussian noise's standard deviation.
        resize_min: 0.5, the resize scale drawn from U[resize_min, 1] (down, then back up).
        eval_samples: 4 and eval_seed: 0, the fixed EOT draws `objective()` averages.
        steps: 100. step_size: None = 2.5 * eps / steps. optimizer "pgd" | "adam". schedule.
        init: "random" (the shift and its gradient are zero at delta = 0: a sign step from 0 does
            not move). stop_below: None.
    Presets: "paper" = the code's PGD settings (EOT_*.py: pgd_eps 0.05, pgd_alpha 1/255,
        max_steps 30): L-inf 0.05, sign step 1/255, 30 steps, every transformation.
    Shapes: images (N, 3, H, W) in [0, 1] -> delta (N, 3, H, W); objective (N,) (-shift: lower = stronger).
    Usage: `delta = get_attack("editshield", preset="paper")(x, target, Budget("linf", 0.05), g)`
    """

    defaults: ClassVar[dict[str, Any]] = {
        **ITERATION_DEFAULTS, "init": "random", "eot": TRANSFORMS, "crop_min": 0.8, "noise_std": 0.05,
        "resize_min": 0.5, "eval_samples": 4, "eval_seed": 0,
    }
    presets: ClassVar[dict[str, dict[str, Any]]] = {
        "paper": dict(steps=30, step_size=1 / 255, optimizer="pgd", schedule="constant", init="random",
                      eot=TRANSFORMS),
    }
    preset_budgets: ClassVar[dict[str, Budget]] = {"paper": Budget("linf", 0.05)}
    maximize: ClassVar[bool] = True
    stochastic: ClassVar[bool] = True

    def __init__(self, preset: Optional[str] = None, **params: Any) -> None:
        super().__init__(preset, **params)
        eot = self.params["eot"]
        eot = (eot,) if isinstance(eot, str) else eot
        if not isinstance(eot, (list, tuple)) or any(e not in TRANSFORMS for e in eot):
            raise InputError(f"attack {self.name!r}: eot must be a subset of {list(TRANSFORMS)}, got {eot!r}")
        self.params["eot"] = tuple(eot)
        for key, low in (("crop_min", 0.0), ("resize_min", 0.0)):
            v = self.params[key]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not low < v <= 1.0:
                raise InputError(f"attack {self.name!r}: {key} must be a number in (0, 1], got {v!r}")
        v = self.params["noise_std"]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0:
            raise InputError(f"attack {self.name!r}: noise_std must be a number >= 0, got {v!r}")
        v = self.params["eval_samples"]
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise InputError(f"attack {self.name!r}: eval_samples must be an integer >= 1, got {v!r}")

    def transform(self, generator: torch.Generator, like: torch.Tensor):
        """One EOT draw as a function of an image batch (the identity when `eot` is empty)."""
        eot = self.params["eot"]
        if not eot:
            return lambda x: x
        kind = eot[int(torch.randint(0, len(eot), (1,), generator=generator, device=generator.device))]
        u = float(torch.rand((1,), generator=generator, device=generator.device))
        if kind == "crop":
            scale = float(self.crop_min) + (1.0 - float(self.crop_min)) * u
            return lambda x: centre_crop(x, scale)
        if kind == "resize":
            scale = float(self.resize_min) + (1.0 - float(self.resize_min)) * u
            return lambda x: down_up(x, scale)
        noise = draw("randn", like.shape, generator, like.device) * float(self.noise_std)
        return lambda x: (x + noise.to(x.dtype)).clamp(0.0, 1.0)

    def shift(self, target, adv: torch.Tensor, clean: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """||mu(T(adv)) - mu(T(clean))||^2 per image (N,), float32, for one draw of T."""
        t = self.transform(generator, adv)
        moved = target.encode(t(adv)).mean.float()
        with torch.no_grad():
            anchor = target.encode(t(clean)).mean.float()
        return (moved - anchor.to(moved.device)).pow(2).flatten(1).sum(dim=1)

    def objective_loss(self, target, adv: torch.Tensor, clean: torch.Tensor,
                       generator: Optional[torch.Generator] = None) -> torch.Tensor:
        if generator is not None:
            return self.shift(target, adv, clean, generator)
        gen = torch.Generator().manual_seed(int(self.eval_seed))
        total = self.shift(target, adv, clean, gen)
        for _ in range(int(self.eval_samples) - 1):
            total = total + self.shift(target, adv, clean, gen)
        return total / int(self.eval_samples)
