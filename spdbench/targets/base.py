"""`Target`: the latent diffusion model an immunization attack targets.

Exposes the diffusers components under their pipeline names (`vae`, `unet`, `text_encoder`,
`tokenizer`, `scheduler`) plus the few operations every attack needs. Images are [0, 1] at this
boundary; the [-1, 1] model range exists only inside these methods (DESIGN §2).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import torch

from spdbench.errors import TargetLoadError
from spdbench.images import check_images
from spdbench.data.masks import latent_mask


@dataclass
class Encoding:
    """The VAE posterior q(z|x) = N(mean, exp(logvar)) and the scaled latents fed to the UNet."""

    mean: torch.Tensor
    logvar: torch.Tensor
    latents: torch.Tensor

    @property
    def var(self) -> torch.Tensor:
        return self.logvar.exp()


class Target:
    """A Stable-Diffusion-1.5-architecture img2img model with `device`/`dtype` as arguments."""

    def __init__(self, vae, unet, text_encoder, tokenizer, scheduler, *,
                 name: str = "custom", source: Optional[str] = None,
                 device: Union[str, torch.device, None] = None, dtype: Optional[torch.dtype] = None) -> None:
        self.vae, self.unet, self.text_encoder = vae, unet, text_encoder
        self.tokenizer, self.scheduler = tokenizer, scheduler
        self.name = name
        self.source = source or name
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.dtype = dtype or torch.float32
        for module in (self.vae, self.unet, self.text_encoder):
            module.to(device=self.device)
            if module.dtype != self.dtype:  # only cast when needed (diffusers warns on every cast)
                module.to(dtype=self.dtype)
            module.eval()
            module.requires_grad_(False)
        self._pipe = None
        self._inpaint_pipe = None
        self._full_repaint: dict = {}  # (h, w, device, dtype) -> the "repaint everything" condition
        self._fingerprint: Optional[str] = None
        #: the `load_target` name that rebuilds this model (set by load_target; None = built by hand)
        self.load_spec: Optional[str] = None
        #: the hub revision the weights were loaded at (None: not from the hub)
        self.revision: Optional[str] = None

    def fingerprint_now(self) -> str:
        """The weights' hash recomputed now (not cached): detects in-process tampering."""
        self._fingerprint = None
        return self.fingerprint

    # --- components ----------------------------------------------------------------------
    @property
    def scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    @property
    def latent_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def components(self) -> dict:
        return dict(vae=self.vae, unet=self.unet, text_encoder=self.text_encoder,
                    tokenizer=self.tokenizer, scheduler=self.scheduler)

    def img2img(self):
        """A diffusers StableDiffusionImg2ImgPipeline over these components (built once)."""
        if self._pipe is None:
            # deferred: diffusers takes seconds to import; only an edit needs its pipeline
            from diffusers import StableDiffusionImg2ImgPipeline

            self._pipe = StableDiffusionImg2ImgPipeline(
                **self.components(), safety_checker=None, feature_extractor=None,
                requires_safety_checker=False,
            )
            self._pipe.set_progress_bar_config(disable=True)
        return self._pipe

    @property
    def inpainting(self) -> bool:
        """An SD-inpainting UNet: 9 input channels (noisy latent, downsampled mask, masked-image latent)."""
        return int(self.unet.config.in_channels) == 9

    def inpaint(self):
        """A diffusers StableDiffusionInpaintPipeline over these components (built once)."""
        if not self.inpainting:
            raise TargetLoadError(f"target {self.name!r} is not an inpainting model: its UNet takes "
                                  f"{self.unet.config.in_channels} input channels, inpainting needs 9")
        if self._inpaint_pipe is None:
            # deferred: diffusers takes seconds to import; only an edit needs its pipeline
            from diffusers import StableDiffusionInpaintPipeline

            self._inpaint_pipe = StableDiffusionInpaintPipeline(
                **self.components(), safety_checker=None, feature_extractor=None,
                requires_safety_checker=False,
            )
            self._inpaint_pipe.set_progress_bar_config(disable=True)
        return self._inpaint_pipe

    def save_pretrained(self, folder: Union[str, Path]) -> Path:
        """Save as a diffusers pipeline folder that `load_sd15(folder)` reads back."""
        folder = Path(folder)
        self.img2img().save_pretrained(folder, safe_serialization=True)
        return folder

    @property
    def fingerprint(self) -> str:
        """sha256 (first 16 hex) over every weight, so records name the exact model."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            for module in (self.vae, self.unet, self.text_encoder):
                for key, tensor in sorted(module.state_dict().items()):
                    # torch.compile wraps modules (keys gain "_orig_mod."); the weights are the same
                    h.update(key.replace("_orig_mod.", "").encode())
                    h.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint

    # --- speed ----------------------------------------------------------------------------
    def accelerate(self, channels_last: bool = True, compile_backend: Optional[str] = None) -> None:
        """GPU fast path: channels-last convolutions, optionally torch.compile of the VAE and UNet.

        diffusers already uses PyTorch's SDPA attention. `compile_backend` ("inductor" on a GPU;
        "eager" only checks the plumbing) wraps the modules; the first call then pays the compile
        time, which the harness measures separately (see `harness.run(compile_backend=...)`).
        """
        if channels_last and self.device.type == "cuda":
            for module in (self.vae, self.unet):
                module.to(memory_format=torch.channels_last)
        if compile_backend:
            self.vae.encoder = torch.compile(self.vae.encoder, backend=compile_backend)
            self.vae.decoder = torch.compile(self.vae.decoder, backend=compile_backend)
            self.unet = torch.compile(self.unet, backend=compile_backend)
            self._pipe = None

    def warmup(self, images: torch.Tensor) -> None:
        """One encode with gradient, one UNet call and one decode: triggers compilation up front."""
        x = images[:1].to(self.device).requires_grad_(True)
        enc = self.encode(x)
        enc.mean.float().sum().backward()
        with torch.no_grad():
            emb = self.encode_prompt([""])
            image = enc.mean.detach() if int(self.unet.config.in_channels) == 8 else None  # IP2P's image condition
            self.predict_noise(enc.latents.detach(), 500, emb, image_latents=image)
            self.decode(enc.latents.detach())

    # --- operations attacks need ---------------------------------------------------------
    def to_model(self, images: torch.Tensor) -> torch.Tensor:
        """[0,1] images -> [-1,1] in the model's device and dtype."""
        return (images.to(self.device, self.dtype) * 2.0 - 1.0)

    def encode(self, images: torch.Tensor, generator: Optional[torch.Generator] = None,
               sample: bool = False) -> Encoding:
        """Posterior of the VAE encoder; `latents` = scaling * (mean, or a sample if `sample`)."""
        dist = self.vae.encode(self.to_model(images)).latent_dist
        z = dist.sample(generator=generator) if sample else dist.mean
        return Encoding(mean=dist.mean, logvar=dist.logvar, latents=z * self.scaling_factor)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> [0,1] images (float32)."""
        out = self.vae.decode(latents.to(self.dtype) / self.scaling_factor).sample
        return ((out.float() + 1.0) / 2.0).clamp(0.0, 1.0)

    @torch.no_grad()
    def encode_prompt(self, prompts: Sequence[str]) -> torch.Tensor:
        """CLIP text embeddings, shape (len(prompts), 77, hidden)."""
        ids = self.tokenizer(list(prompts), padding="max_length", truncation=True,
                             max_length=self.tokenizer.model_max_length, return_tensors="pt").input_ids
        return self.text_encoder(ids.to(self.device))[0]

    # --- diffusion primitives (the public author API; docs/writing-an-attack.md) ------------
    @property
    def num_train_timesteps(self) -> int:
        """T: timesteps run 0 .. T-1 (1000 for SD1.5)."""
        return int(self.scheduler.config.num_train_timesteps)

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        """abar_t for t = 0 .. T-1, float32 on the target's device (the scheduler's own table)."""
        abar = getattr(self, "_abar", None)
        if abar is None or abar.device != self.device:
            abar = self.scheduler.alphas_cumprod.detach().to(self.device, torch.float32)
            self._abar = abar
        return abar

    def latents(self, images: torch.Tensor, sample: bool = False,
                noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Scaled latents z = scaling_factor * (mu + sigma * xi) of [0,1] images, *differentiable*
        (gradients flow back to `images` through the encoder), in the model's dtype.

        sample=False: the posterior mean (xi = 0). sample=True: a reparameterized posterior sample;
        `noise` is xi, a standard normal of the latents' shape (draw it from your generator so the
        attack is deterministic), required then -- a hidden global-RNG draw would not be.
        """
        enc = self.encode(images)
        if not sample:
            return enc.latents
        if noise is None:
            raise ValueError("Target.latents(sample=True) needs noise: a standard normal of shape "
                             f"{tuple(enc.mean.shape)} drawn from the attack's generator")
        std = (0.5 * enc.logvar).exp()
        return (enc.mean + std * noise.to(enc.mean.device, enc.mean.dtype)) * self.scaling_factor

    def _timesteps(self, t, n: int) -> torch.Tensor:
        """`t` (an int, or a tensor of n timesteps) as a long tensor (n,) on the device."""
        t = torch.as_tensor(t, device=self.device)
        if t.dtype.is_floating_point:
            raise TypeError(f"timesteps must be integers 0..{self.num_train_timesteps - 1}, got {t.dtype}")
        t = t.long().reshape(-1)
        return t.expand(n) if t.numel() == 1 else t

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, t) -> torch.Tensor:
        """z_t = sqrt(abar_t) z + sqrt(1 - abar_t) noise (the forward process q(z_t | z)); `t` an int
        or one timestep per image; coefficients in float32, result in `latents`' dtype."""
        abar = self.alphas_cumprod[self._timesteps(t, latents.shape[0])].view(-1, 1, 1, 1)
        out = abar.sqrt() * latents.float() + (1.0 - abar).sqrt() * noise.to(latents.device).float()
        return out.to(latents.dtype)

    def inpaint_condition(self, images: torch.Tensor, masks: Optional[torch.Tensor] = None,
                          noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The inpainting UNet's extra input channels (N, 5, h, w): the mask at latent resolution and
        the scaled latent (posterior mean) of the masked photo, *differentiable* in `images`.

        The pipeline's rule: the masked photo is the photo with the repaint region (mask 1) set to 0
        in the model's [-1, 1] space (mid grey). `masks` None means "repaint everything" (mask all
        ones), the condition under which an inpainting UNet acts as a text-to-image model.
        `noise` (xi, the latents' shape) makes the masked photo's latent a reparameterized posterior
        sample mu + sigma * xi, as the pipeline's `latent_dist.sample()` does; None: the mean.
        """
        n, _, h, w = images.shape
        if masks is None:
            masks = torch.ones(n, 1, h, w, device=self.device)
        m = masks.to(self.device, torch.float32)
        keep = (m < 0.5).to(self.dtype)
        dist = self.vae.encode(self.to_model(images) * keep).latent_dist
        masked = dist.mean if noise is None else dist.mean + dist.std * noise.to(dist.mean.device, dist.mean.dtype)
        masked = masked * self.scaling_factor
        return torch.cat([latent_mask(m, self.latent_factor).to(self.dtype), masked.to(self.dtype)], dim=1)

    def predict_noise(self, noisy_latents: torch.Tensor, t, cond: torch.Tensor,
                      guidance: float = 1.0, uncond: Optional[torch.Tensor] = None,
                      inpaint: Optional[torch.Tensor] = None,
                      image_latents: Optional[torch.Tensor] = None) -> torch.Tensor:
        """eps_theta(z_t, t, c): the UNet's noise prediction, in the model's dtype, differentiable.

        `cond`: prompt embeddings from `encode_prompt`, (1 or N, 77, D). `guidance` > 1 applies
        classifier-free guidance against `uncond` (default: the empty prompt's embedding), at the
        cost of a second UNet pass: eps_u + guidance * (eps_c - eps_u).
        On an inpainting target, `inpaint` is `inpaint_condition(images, masks)`; left None, the
        condition is "repaint everything", so img2img-style objectives run unchanged on it.
        On an instruction editor (InstructPix2Pix, 8 channels), `image_latents` is the input photo's
        VAE posterior mean, unscaled (the pipeline's condition); it is required there.
        """
        n = noisy_latents.shape[0]
        z = noisy_latents.to(self.dtype)
        if self.inpainting:
            if inpaint is None:
                inpaint = self._full_repaint_condition(z)
            z = torch.cat([z, inpaint.to(self.device, self.dtype).expand(n, -1, -1, -1)], dim=1)
        elif inpaint is not None:
            raise ValueError(f"target {self.name!r} is not an inpainting model: predict_noise(inpaint=...) "
                             "needs a 9-channel UNet")
        if int(self.unet.config.in_channels) == 8:  # InstructPix2Pix: the input photo's unscaled latent mode
            if image_latents is None:
                raise ValueError(f"target {self.name!r} is an instruction editor (8-channel UNet): predict_noise "
                                 "needs image_latents (the input photo's VAE posterior mean, unscaled)")
            z = torch.cat([z, image_latents.to(self.device, self.dtype).expand(n, -1, -1, -1)], dim=1)
        elif image_latents is not None:
            raise ValueError(f"target {self.name!r} is not an instruction editor: predict_noise(image_latents=...) "
                             "needs an 8-channel UNet")
        t = self._timesteps(t, n)
        cond = cond.to(self.device, self.dtype)
        cond = cond.expand(n, -1, -1) if cond.shape[0] == 1 else cond
        if guidance <= 1.0:
            return self.unet(z, t, encoder_hidden_states=cond).sample
        if uncond is None:
            uncond = self.encode_prompt([""])
        uncond = uncond.to(self.device, self.dtype)
        uncond = uncond.expand(n, -1, -1) if uncond.shape[0] == 1 else uncond
        eps_u, eps_c = self.unet(torch.cat([z, z]), torch.cat([t, t]),
                                 encoder_hidden_states=torch.cat([uncond, cond])).sample.chunk(2)
        return eps_u + guidance * (eps_c - eps_u)

    def _full_repaint_condition(self, latents: torch.Tensor) -> torch.Tensor:
        """(1, 5, h, w): mask all ones and the latent of an all-grey photo (cached per latent size)."""
        h, w = latents.shape[-2:]
        key = (h, w, self.device, self.dtype)
        if key not in self._full_repaint:
            f = self.latent_factor
            with torch.no_grad():
                self._full_repaint[key] = self.inpaint_condition(torch.full((1, 3, h * f, w * f), 0.5,
                                                                            device=self.device))
        return self._full_repaint[key]

    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        check_images(images)
        return self.decode(self.encode(images).latents)

    def __repr__(self) -> str:
        return f"Target(name={self.name!r}, device={self.device}, dtype={self.dtype})"
