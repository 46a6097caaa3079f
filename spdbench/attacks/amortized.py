"""Amortized immunizers: a small image-to-image network, trained once on the train split to minimize
a per-image attack's objective, then protecting any photo in one forward pass.

Why: per-image optimization costs seconds to minutes a photo, a universal delta costs nothing but
protects less; DiffVax (ICLR 2026) and FastProtect (CVPR 2025) train a feed-forward generator
instead. DiffVax's own code has no eps bound; here the network's output is tanh-bounded and scaled
to eps, and the harness projects and quantizes what comes back anyway. The objective is the
per-image attack's own `objective_loss` (photoguard.py, pca.py), as SPD does (spd.py).
"""
from __future__ import annotations

from typing import Any, ClassVar, Optional

import torch
from torch import nn

from spdbench.budget import Budget, clamp_to_image
from spdbench.errors import InputError
from spdbench.attacks.base import AmortizedAttack, register
from spdbench.attacks.objectives import GradientAttack, PerImageObjective, check_norm, ensure_generator
from spdbench.attacks.pca import PCAMinus
from spdbench.attacks.photoguard import PhotoGuardEncoder


class _Block(nn.Module):
    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.GroupNorm(4, c_out), nn.SiLU(),
                                  nn.Conv2d(c_out, c_out, 3, padding=1), nn.GroupNorm(4, c_out), nn.SiLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class ImmunizerUNet(nn.Module):
    """A small UNet (widths w, 2w, 4w; skip connections): image in [0, 1] -> tanh direction in [-1, 1].

    It works on `patch` x `patch` pixel blocks (pixel unshuffle in, pixel shuffle out), so every
    output pixel is still its own value while the convolutions run at 1/patch resolution: at 512 px
    on 2 cores a forward pass costs 486 ms at patch 1 (width 24), 117 ms at patch 2 (width 32),
    43 ms at patch 2 (width 16) and 41 ms at patch 4 (width 32); what each protects:
    docs/attacks.md, docs/amortized.md.

    The last convolution starts at zero, so an untrained network returns delta = 0 (the harness flags
    that as "zero-delta", never ok) and training starts from the clean image.
    """

    def __init__(self, width: int = 24, patch: int = 1) -> None:
        super().__init__()
        w, c = width, 3 * patch * patch
        self.patch = patch
        self.enc1, self.enc2, self.enc3 = _Block(c, w), _Block(w, 2 * w), _Block(2 * w, 4 * w)
        self.dec2, self.dec1 = _Block(4 * w + 2 * w, 2 * w), _Block(2 * w + w, w)
        self.out = nn.Conv2d(w, c, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        p = self.patch
        pad = ((-w) % p, (-h) % p)
        x = nn.functional.pad(x, (0, pad[0], 0, pad[1]), mode="replicate") if any(pad) else x
        h1 = self.enc1(nn.functional.pixel_unshuffle(x * 2 - 1, p))
        h2 = self.enc2(nn.functional.avg_pool2d(h1, 2))
        h3 = self.enc3(nn.functional.avg_pool2d(h2, 2))
        up = lambda h, like: nn.functional.interpolate(h, size=like.shape[-2:], mode="nearest")  # noqa: E731
        d2 = self.dec2(torch.cat([up(h3, h2), h2], 1))
        d1 = self.dec1(torch.cat([up(d2, h1), h1], 1))
        return torch.tanh(nn.functional.pixel_shuffle(self.out(d1), p))[..., :h, :w]


def _augment(batch: torch.Tensor, crop: int, gen: torch.Generator) -> torch.Tensor:
    """Random crops (when the photos are larger), flips and a +-10% colour gain, from the generator."""
    n, _, h, w = batch.shape
    out = []
    for i in range(n):
        top = int(torch.randint(0, h - crop + 1, (1,), generator=gen)) if h > crop else 0
        left = int(torch.randint(0, w - crop + 1, (1,), generator=gen)) if w > crop else 0
        img = batch[i:i + 1, :, top:top + min(crop, h), left:left + min(crop, w)]
        if float(torch.rand(1, generator=gen)) < 0.5:
            img = img.flip(-1)
        gain = 1 + 0.2 * (torch.rand(1, 3, 1, 1, generator=gen) - 0.5)
        out.append((img * gain.to(img.device)).clamp(0, 1))
    return torch.cat(out)


class AmortizedObjectiveAttack(PerImageObjective, AmortizedAttack):
    """Base of the amortized immunizers: a subclass names the per-image attack whose objective the
    network learns to minimize over the train split (`objective_attack`), as SPD does."""

    objective_attack: ClassVar[type[GradientAttack]]
    has_objective: ClassVar[bool] = True
    defaults: ClassVar[dict[str, Any]] = dict(
        width=16,           # UNet base width (16 with patch 2 -> 0.12 M parameters)
        patch=2,            # the UNet works on patch x patch pixel blocks (pixel unshuffle), 1 = pixels
        steps=400,          # Adam steps of the fit (a one-off training cost, reported apart); the
                            # suite's iteration budget applies, as to SPD's fit: preset "full" = 400
        lr=5e-3,            # Adam learning rate
        batch_size=8,       # augmented training crops per step
        crop=None,          # crop size in pixels; None = the photos' own size (no cropping)
    )
    #: "full": the fit this module's docs measure (400 Adam steps), at any budget the suite sets
    presets: ClassVar[dict[str, dict[str, Any]]] = {"full": dict(steps=400)}

    def __init__(self, preset: Optional[str] = None, **params: Any) -> None:
        super().__init__(preset, **params)
        for key in ("width", "patch", "steps", "batch_size"):
            value = self.params[key]
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"attack {self.name!r}: {key} must be an integer >= 1, got {value!r}")
        if self.params["width"] % 4:
            raise InputError(f"attack {self.name!r}: width must be a multiple of 4, got {self.params['width']!r}")
        self.per_image = self.objective_attack()

    def build_network(self) -> nn.Module:
        return ImmunizerUNet(int(self.params["width"]), int(self.params["patch"]))

    @property
    def stochastic(self) -> bool:
        """True: every fit step draws its own augmented batch, so the loss curve is noisy."""
        return True

    def delta_for(self, images: torch.Tensor, budget: Budget) -> torch.Tensor:
        """eps * network(x), inside the ball and the image range (differentiable: used in training)."""
        if self.network is None:
            raise InputError(f"amortized attack {self.name!r} must be fit() before apply()")
        delta = budget.eps * self.network(images.float())
        return clamp_to_image(images.float(), budget.project(delta))

    def apply(self, images: torch.Tensor, budget: Budget) -> torch.Tensor:
        return self.delta_for(images, budget).to(images.dtype)

    def fit(self, train_images: torch.Tensor, target, budget: Budget,
            generator: Optional[torch.Generator] = None) -> nn.Module:
        check_norm(self, budget)
        gen = ensure_generator(generator)
        cpu_gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen, device=gen.device)))
        with torch.random.fork_rng(devices=[]):  # the network's init, seeded, without touching the caller's RNG
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=cpu_gen)))
            self.network = self.build_network().to(train_images.device)
        self.network.train()
        opt = torch.optim.Adam(self.network.parameters(), lr=float(self.params["lr"]))
        crop = int(self.params["crop"] or min(train_images.shape[-2:]))
        scale = float(self.loss_scale) * (-1.0 if self.maximize else 1.0)  # the optimizer descends
        self.loss_history = []
        for _ in range(int(self.params["steps"])):
            pick = torch.randint(0, len(train_images), (int(self.params["batch_size"]),), generator=cpu_gen)
            x = _augment(train_images[pick.to(train_images.device)].float(), crop, cpu_gen)
            adv = (x + self.delta_for(x, budget)).to(target.dtype)
            loss = self.objective_loss(target, adv, x.to(target.dtype)).float().mean()
            opt.zero_grad(set_to_none=True)
            (loss * scale).backward()
            opt.step()
            self.loss_history.append(float(loss.detach()))
        self.network.eval()
        return self.network


@register("amortized-encoder")
class AmortizedEncoder(AmortizedObjectiveAttack):
    """Amortized PhotoGuard encoder attack: a small UNet trained on the train split, one forward pass a photo.

    After DiffVax (ICLR 2026) and FastProtect (CVPR 2025), with the objective of photoguard-encoder
    (||E(x + delta) - E(grey)||^2 on the posterior mean) and delta = eps * tanh(UNet(x)), trained
    with Adam on augmented crops. Fit once per budget on the train split only; `apply` makes no
    pass through the target. Shapes: images (N, 3, H, W) in [0, 1] -> delta (N, 3, H, W).
    """

    objective_attack = PhotoGuardEncoder


@register("amortized-pca-minus")
class AmortizedPCAMinus(AmortizedObjectiveAttack):
    """Amortized PCA-: a small UNet trained to collapse the VAE posterior of x + delta, one forward pass a photo.

    The objective of pca-minus (KL(q(z|x + delta) || N(0, 1e-8 I))) through the same network and fit
    as amortized-encoder.
    """

    objective_attack = PCAMinus
