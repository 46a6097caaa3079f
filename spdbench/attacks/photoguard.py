"""PhotoGuard's encoder and diffusion attacks (Salman et al., "Raising the Cost of Malicious
AI-Powered Image Editing", ICML 2023; code: MadryLab/photoguard).

Both are targeted: they pull something computed from `x + delta` toward a target (the VAE latent
of a target image, or the edited image toward a target image). Their `objective_loss` is the one
the universal variants in spd.py reuse.
"""
from __future__ import annotations

import contextlib
import functools
import math
from typing import Any, ClassVar, Optional

import torch
from torch.utils.checkpoint import checkpoint

from spdbench.budget import Budget
from spdbench.errors import InputError
from spdbench.attacks.base import register
from spdbench.attacks.objectives import (ITERATION_DEFAULTS, GradientAttack, check_choice, check_masks, draw, latent_distance,
                         latent_shape, posterior_sample, resize_image)
from spdbench.targets.instruct import is_instruct


def _as_batch(tensor: torch.Tensor, name: str) -> torch.Tensor:
    if tensor.dim() == 3:
        tensor = tensor.unsqueeze(0)
    if tensor.dim() != 4:
        raise InputError(f"{name} must have shape (C, H, W) or (N, C, H, W), got {tuple(tensor.shape)}")
    return tensor


def _match_batch(tensor: torch.Tensor, n: int, name: str) -> torch.Tensor:
    if tensor.shape[0] not in (1, n):
        raise InputError(f"{name} has batch size {tensor.shape[0]}; expected 1 or {n} (one per image)")
    return tensor


@register("photoguard-encoder")
class PhotoGuardEncoder(GradientAttack):
    """PhotoGuard's encoder attack: pull the VAE latent of x + delta toward a target latent.

    Paper: Salman et al., "Raising the Cost of Malicious AI-Powered Image Editing", ICML 2023
    (MadryLab/photoguard). Minimizes ||E(x + delta) - z_targ||_2^2 per image, on the posterior
    *mean* (unscaled latents, as the reference code), by projected sign descent (or Adam).

    Args (all on the [0, 1] image scale):
        target_image: "grey" (latent of a mid-grey 0.5 image of the input's size; PhotoGuard's web
            demo), "zero" (the zero latent; the img2img notebook), or a Tensor: an image
            (3, H, W) / (1|N, 3, H, W) in [0, 1] (resized to the input) or a latent (1|N, C, h, w).
        steps: 100 iterations. step_size: None = 2.5 * eps / steps, else a float (1/255 = one
            8-bit level per sign step; the L2 step length for L2 budgets).
        optimizer: "pgd" | "adam". schedule: "constant" | "linear" (s_i = s * (1 - 0.99 i / N)).
        init: "random" (uniform in the eps ball, drawn with the generator) | "zero".
        stop_below: None, or stop once the batch-mean loss is below it.
    Presets: "madry" = img2img notebook (L-inf eps 0.03 = 7.65/255, 1000 steps, step 0.01 with
        linear decay, zero latent, random start); "madry-demo" = web demo (L-inf eps 0.06 =
        15.3/255, 200 steps, step 0.005 with linear decay, grey-image latent). Their budgets are in
        `preset_budgets`.
    Shapes: images (N, 3, H, W) in [0, 1] -> delta (N, 3, H, W); objective (N,) (squared distance).
    Usage: `delta = get_attack("photoguard-encoder", preset="madry")(x, target, Budget("linf", 0.03), g)`
    """

    defaults: ClassVar[dict[str, Any]] = {**ITERATION_DEFAULTS, "target_image": "grey"}
    presets: ClassVar[dict[str, dict[str, Any]]] = {
        # MadryLab/photoguard notebooks/demo_simple_attack_img2img.ipynb, converted from [-1,1]:
        # eps 0.06 -> 0.03, step 0.02 -> 0.01, 1000 iters, loss ||E(x')_mean||_2 (zero target)
        "madry": dict(steps=1000, step_size=0.01, schedule="linear", init="random", target_image="zero"),
        # MadryLab/photoguard demo/app.py: eps 0.12 -> 0.06, step 0.01 -> 0.005, 200 iters, grey target
        "madry-demo": dict(steps=200, step_size=0.005, schedule="linear", init="random", target_image="grey"),
    }
    preset_budgets: ClassVar[dict[str, Budget]] = {"madry": Budget("linf", 0.03),
                                                    "madry-demo": Budget("linf", 0.06)}

    def __init__(self, preset: Optional[str] = None, **params: Any) -> None:
        super().__init__(preset, **params)
        spec = self.target_image
        if isinstance(spec, str):
            check_choice(self.name, "target_image", spec, ("grey", "zero"))
        elif not isinstance(spec, torch.Tensor):
            raise InputError(f"attack {self.name!r}: target_image must be 'grey', 'zero' or a Tensor, "
                             f"got {type(spec).__name__}")

    def target_latent(self, target, like: torch.Tensor) -> torch.Tensor:
        """z_targ for images shaped like `like`, float32 on the target's device, (1|N, C, h, w)."""
        n, _, height, width = like.shape
        spec = self.target_image
        channels = int(target.vae.config.latent_channels)
        f = target.latent_factor
        if isinstance(spec, str) and spec == "zero":
            return torch.zeros(1, channels, height // f, width // f, device=target.device)

        def encode(image: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return target.encode(image).mean.float().detach()

        if isinstance(spec, str):  # "grey"
            grey = torch.full((1, 3, height, width), 0.5, device=target.device)
            return self._cache.get(target, ("grey", height, width), lambda: encode(grey))
        spec = _match_batch(_as_batch(spec, "target_image"), n, "target_image")
        if spec.shape[1] == 3:
            image = resize_image(spec.float(), (height, width))
            return self._cache.get(target, ("image", height, width, n), lambda: encode(image))
        if spec.shape[1] == channels:
            return spec.to(target.device, torch.float32)
        raise InputError(f"target_image must have 3 channels (an image) or {channels} (a latent), "
                         f"got shape {tuple(spec.shape)}")

    def objective_loss(self, target, adv: torch.Tensor, clean: torch.Tensor,
                       generator: Optional[torch.Generator] = None) -> torch.Tensor:
        return latent_distance(target, adv, self.target_latent(target, adv))


#: how f encodes x + delta: the posterior mean (this port's default) or a sample (the anchor's)
LATENT_CHOICES = ("mean", "sample")


@register("photoguard-diffusion")
class PhotoGuardDiffusion(GradientAttack):
    """PhotoGuard's diffusion attack: pull the img2img *edit* of x + delta toward a target image.

    Paper: Salman et al., "Raising the Cost of Malicious AI-Powered Image Editing", ICML 2023
    (MadryLab/photoguard, demo_complex_attack_inpainting.ipynb). f(x) encodes x (posterior mean),
    noises it to the img2img start timestep, runs `unroll_steps` DDIM steps of the target's UNet
    with classifier-free guidance and decodes; the attack minimizes ||f(x + delta) - x_targ||_2^2
    per image (on [0, 1] pixels), averaged over `grad_samples` noise draws per step. Each UNet
    call and the decoder are gradient-checkpointed (`checkpointing`), so memory holds one UNet
    call's activations at a time, not `unroll_steps` of them.

    Args (all on the [0, 1] image scale):
        target_image: "grey" (the 0.5 image = PhotoGuard's zero tensor on [-1, 1]) or a Tensor
            image (3, H, W) / (1|N, 3, H, W) in [0, 1], resized to the input.
        prompt: "" (the edit prompt the attack assumes). guidance_scale: 7.5 (classifier-free
            guidance; skipped, being the identity, when <= 1 or when the prompt is "").
        unroll_steps: 4 denoising steps, differentiated through. strength: 0.5, img2img strength:
            the DDIM schedule has ceil(unroll_steps / strength) steps and the last unroll_steps run.
        eta: 0.0 (DDIM; 1.0 = DDPM-like, PhotoGuard's setting). grad_samples: 1 noise draw per
            step (from the generator, fresh every step). eval_samples / eval_seed: 4 draws from
            seed 0 for `objective` (so it is deterministic). checkpointing: True.
        autocast_dtype: None | "float16" | "bfloat16" (mixed precision for the forward pass).
        latent: "mean" (x + delta encoded as its posterior mean) | "sample" (a reparameterized
            posterior sample, xi drawn after each draw's noise: the notebook's
            `latent_dist.sample()`, set by the "madry" presets).
        steps: 100. step_size: None = 2.5 * eps / steps. optimizer "pgd" | "adam". schedule
            "constant" | "linear". init "zero" (PhotoGuard) | "random". stop_below: None.
    Presets: "madry" = the notebook's L2 attack (L2 eps 16 on [-1,1] = 8.0, step 1 -> 0.5 on the
        L2-normalized gradient averaged over 10 draws, 200 steps, 4 steps, guidance 7.5, eta 1,
        prompt "", grey target, start at x; strength 1.0, the img2img analogue of its pure-noise
        start); "madry-linf" = its commented L-inf variant (eps 0.1 -> 0.05, step 0.006 -> 0.003,
        200 steps, 5 draws). Budgets in `preset_budgets`.
    Inpainting (the notebook's own setting): on an inpainting target the harness hands the editor's
        masks; f then starts from pure noise (strength is ignored), runs all `unroll_steps` steps
        of an `unroll_steps`-step DDIM schedule with x + delta entering only through the UNet's
        mask and masked-image channels (`Target.inpaint_condition`), and decodes -- what
        StableDiffusionInpaintPipeline does. On an img2img target the masks are None and
        nothing changes.
    Instruction editing (InstructPix2Pix): f starts from pure noise too (strength is ignored), runs
        all `unroll_steps` steps with x + delta entering only through the UNet's image channels (its
        unscaled posterior mean, or the sample for `latent="sample"`) and the prompt's text
        guidance; image guidance is 1 (the image condition in both CFG branches), the pipeline's
        third, image-free branch is not run.
    Memory: see docs/attacks.md (the reference notebook, without checkpointing, asks for >= 40 GB).
    Shapes: images (N, 3, H, W) in [0, 1] -> delta (N, 3, H, W); objective (N,) (squared distance).
    Usage: `delta = get_attack("photoguard-diffusion", steps=50)(x, target, Budget("linf", "16/255"), g)`
    """

    defaults: ClassVar[dict[str, Any]] = {
        **ITERATION_DEFAULTS, "init": "zero", "target_image": "grey", "prompt": "", "guidance_scale": 7.5,
        "unroll_steps": 4, "strength": 0.5, "eta": 0.0, "grad_samples": 1, "eval_samples": 4,
        "eval_seed": 0, "checkpointing": True, "autocast_dtype": None, "latent": "mean",
    }
    presets: ClassVar[dict[str, dict[str, Any]]] = {
        "madry": dict(steps=200, step_size=0.5, schedule="constant", init="zero", target_image="grey",
                      prompt="", guidance_scale=7.5, unroll_steps=4, strength=1.0, eta=1.0, grad_samples=10,
                      latent="sample"),
        "madry-linf": dict(steps=200, step_size=0.003, schedule="constant", init="zero", target_image="grey",
                           prompt="", guidance_scale=7.5, unroll_steps=4, strength=1.0, eta=1.0,
                           grad_samples=5, latent="sample"),
    }
    preset_budgets: ClassVar[dict[str, Budget]] = {"madry": Budget("l2", 8.0), "madry-linf": Budget("linf", 0.05)}

    stochastic: ClassVar[bool] = True
    uses_masks: ClassVar[bool] = True  # read on inpainting suites only (the original setting)
    _AUTOCAST = {None: None, "float16": torch.float16, "bfloat16": torch.bfloat16}

    def __init__(self, preset: Optional[str] = None, **params: Any) -> None:
        super().__init__(preset, **params)
        name = self.name
        spec = self.target_image
        if isinstance(spec, str):
            check_choice(name, "target_image", spec, ("grey",))
        elif not isinstance(spec, torch.Tensor):
            raise InputError(f"attack {name!r}: target_image must be 'grey' or a Tensor image, got "
                             f"{type(spec).__name__}")
        check_choice(name, "autocast_dtype", self.autocast_dtype, list(self._AUTOCAST))
        check_choice(name, "latent", self.latent, LATENT_CHOICES)
        for key in ("unroll_steps", "grad_samples", "eval_samples"):
            value = self.params[key]
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"attack {name!r}: {key} must be an integer >= 1, got {value!r}")
        if not 0.0 < float(self.strength) <= 1.0:
            raise InputError(f"attack {name!r}: strength must be in (0, 1], got {self.strength!r}")
        if float(self.eta) < 0.0:
            raise InputError(f"attack {name!r}: eta must be >= 0, got {self.eta!r}")
        if not isinstance(self.prompt, str):
            raise InputError(f"attack {name!r}: prompt must be a string, got {type(self.prompt).__name__}")
        self._masks: Optional[torch.Tensor] = None

    def perturb(self, images: torch.Tensor, target, budget: Budget, generator: Optional[torch.Generator] = None,
                masks: Optional[torch.Tensor] = None) -> torch.Tensor:
        self._masks = check_masks(self, images, masks, target) if getattr(target, "inpainting", False) else None
        return super().perturb(images, target, budget, generator)

    # --- pieces, cached per target ---------------------------------------------------------
    def scheduler(self, target):
        """(DDIM scheduler built from the target's config, the unroll_steps timesteps to run); an
        inpainting (or instruction-editing) target runs a whole `unroll_steps`-step schedule from pure noise."""
        inpainting = bool(getattr(target, "inpainting", False)) or is_instruct(target)

        def make():
            # deferred: diffusers takes seconds to import; only this variant needs its scheduler
            from diffusers import DDIMScheduler

            sched = DDIMScheduler.from_config(target.scheduler.config)
            total = self.unroll_steps if inpainting else max(
                self.unroll_steps, math.ceil(self.unroll_steps / float(self.strength) - 1e-9))
            sched.set_timesteps(total)
            return sched, [int(t) for t in sched.timesteps[-self.unroll_steps:]]

        return self._cache.get(target, ("scheduler", inpainting), make)

    @property
    def uses_guidance(self) -> bool:
        """CFG needs a second UNet pass, except when it cannot change anything: guidance <= 1, or
        the empty prompt (its conditional and unconditional predictions are the same)."""
        return self.guidance_scale > 1.0 and self.prompt != ""

    def embeddings(self, target) -> torch.Tensor:
        """Text embeddings for one image: (2, 77, D) = [unconditional, prompt] with CFG, else (1, ...)."""
        def make():
            if self.uses_guidance:
                return target.encode_prompt(["", self.prompt]).detach()
            return target.encode_prompt([self.prompt]).detach()

        return self._cache.get(target, ("prompt",), make)

    def target_pixels(self, like: torch.Tensor, device) -> torch.Tensor:
        if isinstance(self.target_image, str):  # "grey"
            return torch.full((1, 3) + tuple(like.shape[-2:]), 0.5, device=device)
        image = _match_batch(_as_batch(self.target_image, "target_image"), like.shape[0], "target_image")
        if image.shape[1] != 3:
            raise InputError(f"target_image must be an image (3 channels), got shape {tuple(image.shape)}")
        return resize_image(image.float(), like.shape[-2:]).to(device)

    def _autocast(self, target):
        dtype = self._AUTOCAST[self.autocast_dtype]
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=target.device.type, dtype=dtype)

    def _noise_eps(self, target, t: int, latents: torch.Tensor, emb: torch.Tensor,
                   inpaint: Optional[torch.Tensor] = None, image: Optional[torch.Tensor] = None) -> torch.Tensor:
        """One (guided) UNet call through `Target.predict_noise`: emb is [uncond, prompt] with CFG;
        `inpaint` the inpainting condition, `image` the instruction editor's (None on img2img)."""
        if emb.shape[0] == 2:
            return target.predict_noise(latents, t, emb[1:], guidance=self.guidance_scale, uncond=emb[:1],
                                        inpaint=inpaint, image_latents=image)
        return target.predict_noise(latents, t, emb, inpaint=inpaint, image_latents=image)

    @staticmethod
    def _decode(target, latents: torch.Tensor) -> torch.Tensor:
        # raw decoder output mapped to [0, 1] without clamping, so saturated pixels keep a gradient
        out = target.vae.decode(latents.to(target.dtype) / target.scaling_factor).sample
        return (out.float() + 1.0) / 2.0

    def edit(self, target, adv: torch.Tensor, noise: torch.Tensor,
             variance_noise: Optional[torch.Tensor], latent_noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The differentiable few-step img2img edit f(adv) for one noise draw -> (N, 3, H, W) float32.
        `latent_noise` (xi) encodes adv (or, inpainting, the masked photo) as the posterior sample
        mu + sigma * xi (`latent="sample"`, the notebook's `latent_dist.sample()`); None: the mean."""
        sched, timesteps = self.scheduler(target)
        run = (functools.partial(checkpoint, use_reentrant=False) if self.checkpointing
               else (lambda fn, *args: fn(*args)))
        image = None
        with self._autocast(target):
            if is_instruct(target):  # pure noise; x enters through the image channels only
                sample, image = posterior_sample(target, adv, latent_noise)
                image = image if latent_noise is None else sample / target.scaling_factor  # unscaled either way
                cond = None
                z = (noise * float(getattr(sched, "init_noise_sigma", 1.0))).to(image.dtype)
                emb = self.embeddings(target).to(image.dtype)
            elif getattr(target, "inpainting", False):  # pure noise; x enters through the condition only
                if self._masks is None or self._masks.shape[0] != adv.shape[0]:
                    raise InputError(f"attack {self.name!r}: an inpainting target needs perturb(..., masks=...) "
                                     "or set_masks() first")
                cond = target.inpaint_condition(adv, self._masks, noise=latent_noise)
                z = (noise * float(getattr(sched, "init_noise_sigma", 1.0))).to(cond.dtype)
                emb = self.embeddings(target).to(cond.dtype)
            else:
                cond = None
                z0 = target.latents(adv, sample=latent_noise is not None, noise=latent_noise)
                emb = self.embeddings(target).to(z0.dtype)
                z = target.add_noise(z0, noise, timesteps[0])
            for i, t in enumerate(timesteps):
                eps = run(functools.partial(self._noise_eps, target, t), z, emb, cond, image)
                vn = variance_noise[i].to(z.dtype) if variance_noise is not None and self.eta > 0 else None
                z = sched.step(eps, t, z, eta=float(self.eta), variance_noise=vn).prev_sample
            return run(functools.partial(self._decode, target), z)

    def _draws(self, target, like: torch.Tensor, samples: int, generator: Optional[torch.Generator]):
        shape = latent_shape(target, like)
        for _ in range(samples):
            noise = draw("randn", shape, generator, target.device)
            vn = (draw("randn", (self.unroll_steps,) + shape, generator, target.device)
                  if self.eta > 0 else None)
            xi = draw("randn", shape, generator, target.device) if self.latent == "sample" else None
            yield noise, vn, xi

    def objective_loss(self, target, adv: torch.Tensor, clean: torch.Tensor,
                       generator: Optional[torch.Generator] = None) -> torch.Tensor:
        if generator is None:  # the fixed evaluation draws: `objective` is deterministic
            generator = torch.Generator().manual_seed(int(self.eval_seed))
            samples = self.eval_samples
        else:
            samples = self.grad_samples
        x_targ = self.target_pixels(adv, target.device)
        total = 0.0
        for noise, vn, xi in self._draws(target, adv, samples, generator):
            edited = self.edit(target, adv, noise, vn, xi)
            total = total + (edited - x_targ).pow(2).flatten(1).sum(dim=1)
        return total / samples
