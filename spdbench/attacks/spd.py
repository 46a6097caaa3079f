"""SPD: one universal perturbation for every image, over any per-image objective (the SPD blog post,
ICLR 2025 blogpost track: "SPD Attack - Prevention of AI Powered Image Editing by Image Immunization").

delta_u = argmin_{||delta|| <= eps} mean_i L(x_i + delta), with L the *per-image attack's own*
`objective_loss` (photoguard.py, pca.py): an `SPDAttack` subclass names its per-image attack and
which of its parameters it forwards, nothing else. The optimization loop is `optim.optimize`.
"""
from __future__ import annotations

from typing import Any, ClassVar, Iterator, Optional

import torch

from spdbench.budget import Budget, clamp_to_image
from spdbench.errors import InputError
from spdbench.images import check_images
from spdbench.attacks.optim import optimize
from spdbench.attacks.base import UniversalAttack, register
from spdbench.attacks.objectives import (ALL_NORMS, GradientAttack, PerImageObjective, check_iteration_params, check_norm,
                         chunked_mean,
                         ensure_generator, resolve_step_size, start_delta)
from spdbench.attacks.diffprotect import AdvDM, Mist, SDSMinus, SDSPlus
from spdbench.attacks.pca import PCAMinus, PCAPlus
from spdbench.attacks.photoguard import PhotoGuardEncoder

SPD_DEFAULTS: dict[str, Any] = dict(
    steps=500,            # the SPD protocol's 500 iterations
    step_size=None,       # [0,1] scale (sign step for L-inf, step length for L2, Adam's lr); None = 2.5*eps/steps
    optimizer="pgd",      # "pgd" (sign of the mean gradient) or "adam"
    schedule="constant",  # or "linear" (s_i = s * (1 - 0.99 i / steps))
    init="zero",          # "zero" or "random" (uniform in the ball, from the generator)
    batch_size=None,      # training images per iteration; None = all (the blog's mean gradient)
    chunk_size=8,         # images per forward/backward pass (memory only; the result is the same)
)
#: the blog's algorithm: full-batch mean gradient, delta = 0 start, 500 iterations
_BLOG = dict(steps=500, init="zero", batch_size=None, schedule="constant")


class SPDAttack(PerImageObjective, UniversalAttack):
    """Base of the SPD attacks: a universal delta minimizing the mean of a per-image objective.

    Subclasses set `objective_attack` (an `GradientAttack` class) and `objective_params` (its
    parameters that define the objective, forwarded with the same names and defaults).
    """

    objective_attack: ClassVar[type[GradientAttack]]
    objective_params: ClassVar[tuple[str, ...]] = ()
    has_objective: ClassVar[bool] = True
    norms: ClassVar[tuple[str, ...]] = ALL_NORMS
    #: every SPD attack runs the blog's algorithm, with PGD or with Adam
    presets: ClassVar[dict[str, dict[str, Any]]] = {"blog": dict(_BLOG, optimizer="pgd"),
                                                    "blog-adam": dict(_BLOG, optimizer="adam")}

    def __init__(self, preset: Optional[str] = None, **params: Any) -> None:
        super().__init__(preset, **params)
        check_iteration_params(self)
        for key in ("batch_size", "chunk_size"):
            value = self.params[key]
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise InputError(f"attack {self.name!r}: {key} must be an integer >= 1 or None, got {value!r}")
        #: the per-image attack whose objective this one averages (its iteration settings unused)
        self.per_image = self.objective_attack(**{k: self.params[k] for k in self.objective_params})


    def _batches(self, n: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
        """Index batches forever: all images each step, or `batch_size` of a fresh permutation per
        epoch (an incomplete last batch is dropped, so every step averages the same count)."""
        size = n if self.batch_size is None else min(self.batch_size, n)
        while True:
            order = (torch.arange(n) if size == n
                     else torch.randperm(n, generator=generator, device=generator.device).cpu())
            for start in range(0, n - size + 1, size):
                yield order[start:start + size]

    def fit(self, train_images: torch.Tensor, target, budget: Budget,
            generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Fit delta_u on the training images; returns it, shape (1, 3, H, W), also kept in `delta`."""
        check_images(train_images, "train_images")
        check_norm(self, budget)
        generator = ensure_generator(generator)
        batches = self._batches(train_images.shape[0], generator)
        scale = self.loss_scale  # applied per chunk: each chunk's backward runs on its own

        def chunk_sum(delta: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
            adv = (images + delta).clamp(0.0, 1.0)  # what applying delta_u gives
            return self.objective_loss(target, adv, images, generator).sum() * scale

        def loss_fn(delta: torch.Tensor) -> torch.Tensor:
            images = train_images[next(batches).to(train_images.device)]
            return chunked_mean(chunk_sum, delta, images, self.chunk_size)

        start = start_delta(self.init, train_images[:1], budget, generator)
        result = optimize(loss_fn, budget.project(start), budget, steps=self.steps,
                          step_size=resolve_step_size(self.step_size, budget, self.steps),
                          optimizer=self.optimizer, maximize=self.maximize, schedule=self.schedule,
                          loss_scale=scale, label=f"attack {self.name!r}", model_dtype=target.dtype)
        self.delta = result.delta
        self.loss_history = result.losses
        return self.delta

    def perturb(self, images: torch.Tensor, target, budget: Budget,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """The fitted delta_u for every image, projected on `budget`, with x + delta in [0, 1]."""
        if self.delta is None:
            raise InputError(f"universal attack {self.name!r} must be fit() before perturb()")
        if tuple(images.shape[-2:]) != tuple(self.delta.shape[-2:]):
            raise InputError(f"attack {self.name!r} was fit on {tuple(self.delta.shape[-2:])} images; "
                             f"got images of size {tuple(images.shape[-2:])} (resize them to match)")
        delta = budget.project(self.delta.to(images.device, images.dtype)).expand_as(images)
        return clamp_to_image(images, delta)


_DOC = """{what}

    Paper: the SPD blog post (ICLR 2025 blogpost track), over the objective of
    {paper}. One delta_u, fit on the training images only, minimizes
    the mean over the training set (mini-batches of `batch_size`) of the per-image objective
    {objective}, with x + delta_u clipped to [0, 1]; PGD (sign of the mean gradient) or Adam,
    projected onto the budget after every step.

    Args (all on the [0, 1] image scale):{extra}
        steps: 500 iterations (the SPD protocol). step_size: None = 2.5 * eps / steps, else a float
            (sign step for L-inf / step length for L2 / Adam's learning rate).
        optimizer: "pgd" | "adam". schedule: "constant" | "linear". init: "zero" | "random".
        batch_size: None = every training image each step (the blog), else a mini-batch size
            (a fresh permutation per epoch from the generator). chunk_size: 8 images per
            forward/backward pass (memory only).
    Presets: "blog" (PGD, 500 steps, full batch, zero start) and "blog-adam" (the same with Adam);
        the protocol sweeps eps over {{4, 13, 22, 31, 40}}/255 L-inf, so no preset budget.
    Shapes: fit(train (N, 3, H, W)) -> delta (1, 3, H, W); perturb(images (M, 3, H, W)) -> (M, 3, H, W)
        with images + delta in [0, 1]; objective (M,) = the per-image attack's.
    Usage: `attack = get_attack("{name}", preset="blog"); attack.fit(train, target, Budget("linf", "16/255"), g)`
    """


@register("spd-encoder")
class SPDEncoder(SPDAttack):
    __doc__ = _DOC.format(
        what="SPD over PhotoGuard's encoder objective: one delta_u pulling every latent toward z_targ.",
        paper="photoguard-encoder (Salman et al., ICML 2023)", objective="||E(x + delta_u) - z_targ||^2",
        extra="\n        target_image: \"grey\" | \"zero\" | Tensor, as photoguard-encoder.", name="spd-encoder")
    objective_attack = PhotoGuardEncoder
    objective_params = ("target_image",)
    defaults: ClassVar[dict[str, Any]] = {**SPD_DEFAULTS, "target_image": PhotoGuardEncoder.defaults["target_image"]}


@register("spd-pca-plus")
class SPDPCAPlus(SPDAttack):
    __doc__ = _DOC.format(
        what="SPD over PCA+: one delta_u pushing every posterior away from N(0, I).",
        paper="pca-plus (Guo et al., IEEE T-IFS 2025)", objective="-KL(q(z|x + delta_u) || N(0, I))",
        extra="", name="spd-pca-plus")
    objective_attack = PCAPlus
    defaults: ClassVar[dict[str, Any]] = dict(SPD_DEFAULTS)


@register("spd-pca-minus")
class SPDPCAMinus(SPDAttack):
    __doc__ = _DOC.format(
        what="SPD over PCA-: one delta_u collapsing every posterior toward N(0, v I).",
        paper="pca-minus (Guo et al., IEEE T-IFS 2025)", objective="KL(q(z|x + delta_u) || N(0, v I))",
        extra="\n        v: 1e-8, as pca-minus.", name="spd-pca-minus")
    objective_attack = PCAMinus
    objective_params = ("v",)
    defaults: ClassVar[dict[str, Any]] = {**SPD_DEFAULTS, "v": PCAMinus.defaults["v"]}


_DIFF_PROTECT_PARAMS = ("prompt", "eval_samples", "eval_seed")


def _diffprotect_spd(class_name: str, name: str, per_image: type[GradientAttack], what: str, objective: str,
                     extra_params: tuple[str, ...] = ()) -> type[SPDAttack]:
    """An SPD class over one Diff-Protect objective: its parameters forwarded, nothing else new."""
    params = _DIFF_PROTECT_PARAMS + extra_params
    extra = "\n        " + ", ".join(f"{p}: {per_image.defaults[p]!r}" for p in params) + f", as {per_image.name}."
    cls = type(class_name, (SPDAttack,), dict(
        __qualname__=class_name,
        __doc__=_DOC.format(what=what, paper=f"{per_image.name} (Diff-Protect, ICLR 2024)",
                            objective=objective, extra=extra, name=name),
        __module__=__name__,
        objective_attack=per_image,
        objective_params=params,
        defaults={**SPD_DEFAULTS, **{p: per_image.defaults[p] for p in params}},
    ))
    return register(name)(cls)


SPDAdvDM = _diffprotect_spd("SPDAdvDM", "spd-advdm", AdvDM, "SPD over AdvDM: one delta_u raising every image's denoising error.",
                            "-L_sem (ascended)")
SPDSDSPlus = _diffprotect_spd("SPDSDSPlus", "spd-sds-plus", SDSPlus, "SPD over SDS(+): one delta_u ascending L_sem by score distillation.",
                              "-L_sem via the SDS gradient")
SPDSDSMinus = _diffprotect_spd("SPDSDSMinus", "spd-sds-minus", SDSMinus,
                               "SPD over SDS(-): one delta_u descending L_sem by score distillation.",
                               "L_sem via the SDS gradient")
SPDMist = _diffprotect_spd("SPDMist", "spd-mist", Mist, "SPD over Mist: one delta_u pulling every latent toward the pattern's.",
                           "L_tex - rate * L_sem", ("target_image", "rate"))
