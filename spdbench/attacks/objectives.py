"""What the optimization attacks share: the per-image objectives and the public gradient-attack base.

An optimization attack is a per-image loss (`objective_loss`) handed to `optim.optimize`. The
per-image attacks (photoguard.py, pca.py) and their universal SPD variants (spd.py) call the *same*
`objective_loss`, so a fix to an objective fixes both. Every objective is computed in float32
whatever the target's dtype and returns one value per image; `GradientAttack.maximize` says
whether higher or lower means a stronger attack.

Low precision: the gradient flows back into a float16/bfloat16 model, so it must be representable
there (float16 overflows at 65504). An objective whose gradient is not (PCA-'s KL to N(0, v I)
has d/dmu = mu / v, ~1e8 x mu for v = 1e-8) declares a `loss_scale`: the optimized loss is the
objective times it, computed in float32 before the backward pass reaches the model. The sign
step, the normalized L2 step and Adam do not depend on the scale; `objective` and `loss_history`
stay in the objective's own units. Anything still non-finite is an error (`optim.optimize`).
"""
from __future__ import annotations

import math
import weakref
from typing import Any, Callable, ClassVar, Optional

import torch

from spdbench.budget import Budget, clamp_to_image
from spdbench.errors import InputError
from spdbench.attacks.optim import optimize
from spdbench.attacks.base import Attack
from spdbench.attacks.eot import check_robust_to, expectation
from spdbench.targets.instruct import is_instruct

#: the norms an optimization attack supports unless a class narrows it
ALL_NORMS = ("linf", "l2")

#: the iteration parameters of every per-image optimization attack; each family overrides defaults
ITERATION_DEFAULTS: dict[str, Any] = dict(
    steps=100,            # projected steps
    step_size=None,       # [0,1] scale: L-inf per-coordinate sign step / L2 step length; None = 2.5*eps/steps
    optimizer="pgd",      # "pgd" (sign step for L-inf, normalized gradient for L2) or "adam"
    schedule="constant",  # or "linear": PhotoGuard's s_i = s * (1 - 0.99 * i / steps)
    init="random",        # "random" (uniform in the ball, from the generator) or "zero"
    stop_below=None,      # stop early once the batch-mean loss is below this (costs a sync per step)
    finish=None,          # None, or "boundary": the optimized delta pushed onto the budget's boundary (to_boundary)
)
#: the `finish` of the attacks whose objective is re-drawn every step (AdvDM, SDS(+/-), SDS-T,
#: mist-diffprotect, mist-v2, DiffusionGuard): None keeps the committed leaderboard entries (made
#: before `finish` existed, so recorded without it) re-running bit for bit; "boundary" makes them
#: spend their budget (docs/attacks.md, "Budget used"). Under work matching the suite sets it to
#: "boundary" for these attacks (harness/plan._suite_steps), recorded as source "suite-work".
STOCHASTIC_FINISH = None
_CHOICES = {"optimizer": ("pgd", "adam"), "schedule": ("constant", "linear"), "init": ("zero", "random"),
            "finish": (None, "boundary")}


# --- small shared pieces -----------------------------------------------------------------------
def check_choice(attack: str, name: str, value: Any, choices) -> None:
    if value not in choices:
        raise InputError(f"attack {attack!r}: {name} must be one of {list(choices)}, got {value!r}")


def check_iteration_params(attack: Attack) -> None:
    """Validate steps / step_size / optimizer / schedule / init where the attack has them."""
    params = attack.params
    for name, choices in _CHOICES.items():
        if name in params:
            check_choice(attack.name, name, params[name], choices)
    if "steps" in params:
        steps = params["steps"]
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise InputError(f"attack {attack.name!r}: steps must be an integer >= 0, got {steps!r}")
    if "step_size" in params and params["step_size"] is not None:
        size = params["step_size"]
        if isinstance(size, bool) or not isinstance(size, (int, float)) or not size > 0 or not math.isfinite(size):
            raise InputError(f"attack {attack.name!r}: step_size must be a number > 0 on the [0,1] "
                             f"scale or None (= 2.5 * eps / steps), got {size!r}")


def check_norm(attack: Attack, budget: Budget) -> None:
    norms = getattr(attack, "norms", ALL_NORMS)
    if budget.norm not in norms:
        raise InputError(f"attack {attack.name!r} supports the norms {list(norms)}, got budget {budget}")


def check_masks(attack: Attack, images: torch.Tensor, masks: Optional[torch.Tensor], target) -> torch.Tensor:
    """The editor's masks as {0, 1} floats on the images' device: one (N, 1, H, W) per image, 1 =
    repaint; one line naming the attack and the target when they are missing or misshapen."""
    n, _, h, w = images.shape
    if masks is None or tuple(masks.shape) != (n, 1, h, w):
        got = None if masks is None else tuple(masks.shape)
        raise InputError(f"attack {attack.name!r} on inpainting target {target.name!r} needs the editor's masks "
                         f"{(n, 1, h, w)}, 1 = repaint; got {got}")
    return (masks >= 0.5).float().to(images.device)


def resolve_step_size(step_size: Optional[float], budget: Budget, steps: int) -> float:
    """`step_size`, or when None Madry et al.'s rule 2.5 * eps / steps (reaches the boundary from
    the centre in 40% of the iterations, for either norm)."""
    if step_size is not None:
        return float(step_size)
    return 2.5 * budget.eps / max(steps, 1)


def to_boundary(delta: torch.Tensor, budget: Budget, images: Optional[torch.Tensor] = None) -> torch.Tensor:
    """`delta` pushed onto the budget's boundary along its own direction: L-inf eps * sign(delta)
    (a coordinate the attack never moved stays 0), L2 delta * eps / ||delta|| per image (a zero delta
    stays 0); then `images + delta` clamped to [0, 1] when `images` is given.

    Why: an attack whose objective is re-drawn every step (t, noise, a mask) makes sign steps that
    half cancel, and ends well inside the ball (smoke 8/255: DiffusionGuard at 28-38% of the RMS of
    a full-budget sign perturbation); the sign of the accumulated steps is their majority vote,
    and taking it to the boundary spends the budget the run is ranked at (`finish="boundary"`)."""
    if budget.norm == "linf":
        out = budget.eps * torch.sign(delta)
    else:
        flat = delta.flatten(1)
        norm = flat.norm(dim=1, keepdim=True)
        out = torch.where(norm > 0, flat * (budget.eps / norm.clamp_min(1e-30)), flat).view_as(delta)
    return out if images is None else clamp_to_image(images, out)


def draw(kind: str, shape, generator: Optional[torch.Generator], device, dtype=torch.float32) -> torch.Tensor:
    """`torch.rand`/`torch.randn` drawn on the generator's own device, then moved to `device`.

    A CPU generator therefore gives the same numbers for a CPU and a CUDA run (device-agnostic)."""
    fn = {"rand": torch.rand, "randn": torch.randn}[kind]
    where = generator.device if generator is not None else torch.device(device)
    return fn(tuple(shape), generator=generator, device=where, dtype=torch.float32).to(device=device, dtype=dtype)


def latent_shape(target, images: torch.Tensor) -> tuple[int, int, int, int]:
    """(N, C, h, w) of the target's latents for `images` (N, 3, H, W)."""
    f = target.latent_factor
    return (images.shape[0], int(target.vae.config.latent_channels), images.shape[2] // f, images.shape[3] // f)


def ensure_generator(generator: Optional[torch.Generator]) -> torch.Generator:
    """`generator`, or a CPU generator seeded from torch's global RNG (so `torch.manual_seed`
    still makes a run reproducible, and stochastic objectives get fresh draws every step)."""
    if generator is not None:
        return generator
    return torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,))))


def start_delta(init: str, like: torch.Tensor, budget: Budget,
                generator: Optional[torch.Generator]) -> torch.Tensor:
    """The starting perturbation: zeros, or uniform inside the budget ball (drawn with `generator`)."""
    if init == "zero":
        return torch.zeros_like(like)
    where = generator.device if generator is not None else like.device
    start = budget.random(torch.empty(like.shape, device=where), generator=generator)
    return start.to(device=like.device, dtype=like.dtype)


def resize_image(image: torch.Tensor, size) -> torch.Tensor:
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    return torch.nn.functional.interpolate(image, size=tuple(size), mode="bilinear", antialias=True,
                                           align_corners=False).clamp(0.0, 1.0)


def posterior_sample(target, adv: torch.Tensor,
                     xi: Optional[torch.Tensor]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(z, image): the scaled latents of `adv` (a reparameterized posterior sample for `xi`, the
    mean for None), differentiable, and the UNet's image condition -- on an instruction editor
    (InstructPix2Pix) the *unscaled* posterior mean of `adv`, what its pipeline concatenates to the
    noisy latent; None on any other target. One encoder pass either way.

    Why the attacked photo is both: the editor is handed the protected photo, and an attack that
    reads the UNet's denoising (AdvDM, SDS, Mist, PhotoGuard's diffusion attack) is then scored on
    the editor's own 8-channel objective. Off instruction editors this is `target.latents` exactly
    (the committed img2img/inpainting numbers re-run bit for bit)."""
    if not is_instruct(target):
        return target.latents(adv, sample=xi is not None, noise=xi), None
    enc = target.encode(adv)
    if xi is None:
        return enc.latents, enc.mean
    std = (0.5 * enc.logvar).exp()
    return (enc.mean + std * xi.to(enc.mean.device, enc.mean.dtype)) * target.scaling_factor, enc.mean


class TargetCache:
    """Per-target cache for tensors an objective needs again every step (target latents, prompt
    embeddings). Keyed by the target object itself (weakly), so a new target never reuses them."""

    def __init__(self) -> None:
        self._store: dict = {}

    def get(self, target, key, make: Callable[[], Any]):
        ref, entries = self._store.get("target", (None, {}))
        if ref is None or ref() is not target:
            entries = {}
            self._store["target"] = (weakref.ref(target), entries)
        if key not in entries:
            entries[key] = make()
        return entries[key]


# --- the objectives --------------------------------------------------------------------------
def latent_distance(target, adv: torch.Tensor, z_targ: torch.Tensor) -> torch.Tensor:
    """||E(adv) - z_targ||_2^2 per image on the posterior *mean* (unscaled latents), float32, (N,)."""
    mean = target.encode(adv).mean.float()
    return (mean - z_targ.to(mean.device, torch.float32)).pow(2).flatten(1).sum(dim=1)


def kl_to_isotropic_gaussian(mean: torch.Tensor, logvar: torch.Tensor, v: float) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, v I)) in nats, summed over latent dims, float32, shape (N,).

    = 1/2 * sum((mu^2 + sigma^2) / v - 1 + ln v - logvar) = -l + d/2 * ln v, where
    l = 1/2 * sum(1 + logvar - (mu^2 + sigma^2) / v) is PosteriorCollapseAttack's loss.
    """
    mean, logvar = mean.float(), logvar.float()
    per_dim = (mean.pow(2) + logvar.exp()) / v - 1.0 + math.log(v) - logvar
    return 0.5 * per_dim.flatten(1).sum(dim=1)


class PerImageObjective:
    """Mixin for an attack that optimizes a per-image attack's objective, held as `self.per_image`
    (SPD's universal delta, the amortized immunizers' network): the objective, its direction, its
    float16 loss scale and whether it is stochastic are the per-image attack's own."""

    per_image: "GradientAttack"

    def objective_loss(self, target, adv: torch.Tensor, clean: torch.Tensor,
                       generator: Optional[torch.Generator] = None) -> torch.Tensor:
        return self.per_image.objective_loss(target, adv, clean, generator)

    def objective(self, adv: torch.Tensor, target, clean: torch.Tensor) -> torch.Tensor:
        return self.per_image.objective(adv, target, clean)

    @property
    def stochastic(self) -> bool:
        """The per-image objective's: one random draw per step makes the loss curve noisy."""
        return self.per_image.stochastic

    @property
    def maximize(self) -> bool:
        """The per-image attack's direction (AdvDM's loss is ascended here too)."""
        return self.per_image.maximize

    @property
    def loss_scale(self) -> float:
        """The per-image attack's (its gradient must fit a float16 model here too)."""
        return self.per_image.loss_scale


# --- the skeleton ----------------------------------------------------------------------------
class GradientAttack(Attack):
    """The public base of a per-image gradient attack: write the objective, the base owns the loop.

    A subclass writes `objective_loss(target, adv, clean, generator=None) -> (N,)`: a differentiable
    float32 loss per image, and sets `maximize` (False: lower loss = stronger protection; True:
    higher). `perturb` then runs `optim.optimize` -- PGD (sign step for L-inf, per-image normalized
    gradient for L2) or Adam, the step schedule, a zero or random start drawn from the generator,
    projection onto the budget and [0, 1] after every step, the loss curve -- for `steps`
    iterations, which the harness sets from the suite (equal iterations, not equal work: docs/comparisons.md) or the preset.

    `finish="boundary"` pushes the optimized delta onto the budget's boundary (`to_boundary`).

    `loss_history`: the batch mean of `objective_loss` before each step, in its own units (it
    rises for a maximizing attack). `objective(adv, target, clean)` is the evaluation form used
    by every "beats noise" check: no gradient, `generator=None` (a stochastic objective uses its
    fixed evaluation draws), and *lower = stronger* whatever `maximize` says.
    The universal SPD variants (spd.py) reuse `objective_loss` and `maximize` unchanged.
    """

    has_objective: ClassVar[bool] = True
    norms: ClassVar[tuple[str, ...]] = ALL_NORMS
    #: the loop's parameters (steps, step_size, optimizer, schedule, init, stop_below); a subclass
    #: adds its own with `defaults = {**GradientAttack.defaults, "my_param": 1.0}`
    defaults: ClassVar[dict[str, Any]] = dict(ITERATION_DEFAULTS, robust_to=())
    #: True when the attack ascends `objective_loss` (AdvDM, SDS(+)); False when it descends it
    maximize: ClassVar[bool] = False
    #: True when each step's loss is one random draw (of t, noise, ...): the loss curve is then a
    #: noisy estimate that need not move monotonically; `objective()` uses fixed draws
    stochastic: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Every gradient attack can be made adaptive (`robust_to`, eot.py), whatever defaults it declares."""
        super().__init_subclass__(**kwargs)
        if "robust_to" not in cls.defaults:
            cls.defaults = {**cls.defaults, "robust_to": ()}

    def __init__(self, preset: Optional[str] = None, **params: Any) -> None:
        super().__init__(preset, **params)
        check_iteration_params(self)
        self.robust_to = check_robust_to(self.params.get("robust_to", ()))
        self._cache = TargetCache()

    def objective_loss(self, target, adv: torch.Tensor, clean: torch.Tensor,
                       generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Differentiable per-image loss (N,), float32, optimized in the direction `maximize` says.
        `generator` feeds the randomness of stochastic objectives (None: their fixed evaluation
        draws)."""
        raise NotImplementedError

    @property
    def loss_scale(self) -> float:
        """Positive factor on the optimized loss that keeps its gradient representable in a
        float16/bfloat16 model (1.0: the objective's gradient already is). See the module doc."""
        return 1.0

    def objective(self, adv: torch.Tensor, target, clean: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            value = self.objective_loss(target, adv, clean).float()
        return -value if self.maximize else value

    def perturb(self, images: torch.Tensor, target, budget: Budget,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
        check_norm(self, budget)
        generator = ensure_generator(generator)
        delta = clamp_to_image(images, budget.project(start_delta(self.init, images, budget, generator)))

        scale = self.loss_scale

        robust_to = check_robust_to(self.params.get("robust_to", ()))

        def loss_fn(d: torch.Tensor) -> torch.Tensor:
            if robust_to:  # adaptive: the objective after each purifier the attacker expects (eot.py)
                per_image = expectation(lambda a: self.objective_loss(target, a, images, generator),
                                        images + d, robust_to, generator)
                return per_image.mean() * scale
            return self.objective_loss(target, images + d, images, generator).mean() * scale

        result = optimize(loss_fn, delta, budget, steps=self.steps,
                          step_size=resolve_step_size(self.step_size, budget, self.steps),
                          optimizer=self.optimizer, maximize=self.maximize, schedule=self.schedule,
                          images=images, stop_below=self.params.get("stop_below"), loss_scale=scale,
                          label=f"attack {self.name!r}", model_dtype=target.dtype)
        self.loss_history = result.losses
        if self.params.get("finish") == "boundary":
            return to_boundary(result.delta, budget, images)
        return result.delta


class _ChunkedMean(torch.autograd.Function):
    """Mean of a per-chunk summed loss whose gradient is accumulated chunk by chunk in forward, so
    the memory is that of one chunk and every chunk runs forward and backward exactly once."""

    @staticmethod
    def forward(ctx, delta, fn, chunks, count):  # noqa: D102 - autograd API
        total = torch.zeros((), dtype=torch.float32, device=delta.device)
        grad = torch.zeros_like(delta)
        with torch.enable_grad():
            for chunk in chunks:
                d = delta.detach().requires_grad_(True)
                loss = fn(d, chunk)
                (g,) = torch.autograd.grad(loss, d)
                grad += g
                total += loss.detach().float().to(total.device)
        ctx.save_for_backward(grad / count)
        return total / count

    @staticmethod
    def backward(ctx, grad_output):  # noqa: D102 - autograd API
        (grad,) = ctx.saved_tensors
        return grad_output.to(grad.dtype) * grad, None, None, None


def chunked_mean(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], delta: torch.Tensor,
                 images: torch.Tensor, chunk_size: Optional[int]) -> torch.Tensor:
    """mean over images of the per-image loss, where `fn(delta, chunk)` returns the chunk's *sum*.

    With one chunk it is plain autograd; with several, memory stays that of one chunk."""
    if chunk_size is None or chunk_size >= images.shape[0]:
        return fn(delta, images) / images.shape[0]
    return _ChunkedMean.apply(delta, fn, images.split(chunk_size), images.shape[0])
