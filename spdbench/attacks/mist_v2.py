"""Mist-v2 (psyker-team/mist-v2, `attacks/mist.py`, mode `lunet`, the tool's default): targeted
textural loss through the UNet, with a surrogate UNet fine-tuned by LoRA between PGD rounds.

Why its own attack: Diff-Protect's `mode=mist` (`mist-diffprotect`, diffprotect.py) pulls the
*encoder's* latent toward a pattern's; the tool people download as "Mist" (v2) instead asks the
*noise predictor* to output the pattern's latent:

    minimize  || eps_theta'(z_t, t, c) - z^T ||^2   (per image: mean over latent dims)
    z = scaling * mu(x)  (posterior mean),  z_t = sqrt(abar_t) z + sqrt(1 - abar_t) eps,
    t ~ U{0..T-1}, eps ~ N(0, I) fresh each step, c = "a picture",
    z^T = scaling * (mu_T + sigma_T * xi_T), ONE posterior sample of the pattern per run,

with the UNet's Jacobian (the gradient on z goes through eps_theta' and back through the encoder
mean). eps_theta' is a surrogate: the target's UNet in round 0, and a copy fine-tuned with LoRA
(peft) on the current protected images (the DreamBooth loss, AdamW, grad-norm clip 1) after each
round, so the perturbation is re-fit against a model that has started to learn it -- the anchor's
alternation of `max_adv_train_steps` PGD steps and `max_f_train_steps` fine-tuning steps for
`max_train_steps` rounds. The fine-tuning after the last round is skipped: its model is never
used (the anchor runs it and discards it).

Randomness, drawn from the attack's generator in this order (tests/test_attack_fidelity_v3.py
replays it): xi_T once; then per PGD step eps, then t (the anchor's order: `randn_like`, then
`randint`); per fine-tuning step the image index, then xi (the anchor's `latent_dist.sample()`),
eps, t. `objective()` is the loss under the *target's own* UNet (not the surrogate), averaged
over `eval_samples` draws from `eval_seed` with z^T the pattern's posterior mean: deterministic,
and what the editor's model sees.

Departures from the anchor (docs/attacks.md lists them with the settings): no prior-preservation
class images (the anchor generates 50 with the model; here the fine-tuning sees the protected
images only), the text encoder is not fine-tuned (the anchor's default too), float32 instead of
bf16 mixed precision, the pattern is diffprotect's shipped `mist_pattern.png` (Mist's MIST.png is
not redistributable), and the fine-tuning set is the batch being protected (the anchor's: every
image of its input folder), so the result depends on the batch's composition.
"""
from __future__ import annotations

import copy
from typing import Any, ClassVar, Optional

import torch

from spdbench.budget import Budget, clamp_to_image
from spdbench.errors import AttackError, InputError
from spdbench.attacks.base import register
from spdbench.attacks.diffprotect import pattern_posterior
from spdbench.attacks.objectives import (ITERATION_DEFAULTS, STOCHASTIC_FINISH, GradientAttack, check_norm, draw, ensure_generator,
                                         latent_shape, posterior_sample, resolve_step_size, start_delta,
                                         to_boundary)
from spdbench.attacks.optim import optimize

#: the attention projections lora_diffusion's `inject_trainable_lora` wraps (its default
#: CrossAttention/Attention/GEGLU targets), as diffusers names them
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj"]


def round_steps(steps: int, rounds: int) -> list[int]:
    """`steps` PGD steps split over `rounds` rounds as evenly as possible, earlier rounds first."""
    return [steps // rounds + (1 if r < steps % rounds else 0) for r in range(rounds)]


def lora_unet(unet: torch.nn.Module, rank: int, seed: int = 0) -> torch.nn.Module:
    """A copy of `unet` with trainable LoRA adapters (rank `rank`, scale 1: alpha = rank, B = 0 at
    the start, so the copy first computes exactly what `unet` does) and every other weight frozen.
    peft draws the A matrices from torch's global generator: they are drawn here under `seed` in a
    forked RNG state, so the attack stays a function of its own generator (and leaves the global
    state as it was)."""
    # deferred: peft imports transformers' machinery; only this attack needs it
    from peft import LoraConfig, inject_adapter_in_model

    copy_ = copy.deepcopy(unet)
    copy_.requires_grad_(False)
    config = LoraConfig(r=int(rank), lora_alpha=int(rank), lora_dropout=0.0, init_lora_weights=True,
                        target_modules=LORA_TARGETS)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        copy_ = inject_adapter_in_model(config, copy_)
    trainable = [p for n, p in copy_.named_parameters() if "lora_" in n]
    if not trainable:
        raise InputError(f"mist-v2: the target's UNet has none of the layers LoRA adapts ({LORA_TARGETS})")
    for p in trainable:
        p.requires_grad_(True)
    return copy_


def with_unet(target, unet: torch.nn.Module):
    """The target with its UNet replaced by `unet` (a shallow copy: every other part is shared)."""
    swapped = copy.copy(target)
    swapped.unet = unet
    return swapped


@register("mist-v2")
class MistV2(GradientAttack):
    """Mist-v2 (lunet): make the (surrogate) noise predictor output the pattern's latent.

    Paper / tool: Zheng et al., "Understanding and Improving Adversarial Attacks on Latent
    Diffusion Model" (Mist-v2), code psyker-team/mist-v2 `attacks/mist.py`, `--mode lunet`.

    Args (all on the [0, 1] image scale):
        steps: PGD steps in all (split evenly over `rounds`; the suite's step budget applies to it).
        rounds: 5 PGD rounds, a LoRA fine-tuning of the surrogate between two rounds.
        lora_steps: 10 fine-tuning steps per round. lora_rank: 4. lora_lr: 1e-4 (AdamW, weight
            decay 0.01, betas 0.9/0.999, grad-norm clip 1.0, as the anchor).
        prompt: "a picture" (the anchor's instance prompt). target_image: "pattern" (the shipped
            pattern) or a Tensor image (3, H, W) / (1, 3, H, W) in [0, 1], resized to the input.
        eval_samples: 4, eval_seed: 0 (the fixed draws `objective()` averages).
        step_size: None = 2.5 * eps / steps; optimizer, schedule, init ("zero": the anchor starts at x).
    Presets: "mist-v2" = the anchor's defaults: 30 PGD steps x 5 rounds, sign step 0.005 on [-1, 1]
        = 0.0025 on [0, 1], L-inf 8/255 on [-1, 1] = 4/255 on [0, 1], 10 LoRA steps per round,
        rank 4, lr 1e-4, prompt "a picture".
    Shapes: images (N, 3, H, W) in [0, 1] -> delta (N, 3, H, W); objective (N,) (lower = stronger).
    """

    defaults: ClassVar[dict[str, Any]] = {
        **ITERATION_DEFAULTS, "init": "zero", "prompt": "a picture", "target_image": "pattern", "rounds": 5,
        "lora_steps": 10, "lora_rank": 4, "lora_lr": 1e-4, "eval_samples": 4, "eval_seed": 0,
        "finish": STOCHASTIC_FINISH,
    }
    presets: ClassVar[dict[str, dict[str, Any]]] = {
        "mist-v2": dict(steps=150, rounds=5, step_size=0.0025, optimizer="pgd", schedule="constant", init="zero",
                        lora_steps=10, lora_rank=4, lora_lr=1e-4, prompt="a picture"),
    }
    preset_budgets: ClassVar[dict[str, Budget]] = {"mist-v2": Budget("linf", "4/255")}
    maximize: ClassVar[bool] = False
    stochastic: ClassVar[bool] = True

    def __init__(self, preset: Optional[str] = None, **params: Any) -> None:
        super().__init__(preset, **params)
        if not isinstance(self.prompt, str):
            raise InputError(f"attack {self.name!r}: prompt must be a string, got {type(self.prompt).__name__}")
        for key in ("rounds", "lora_rank", "eval_samples"):
            self._check_int(key, 1)
        self._check_int("lora_steps", 0)
        lr = self.lora_lr
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
            raise InputError(f"attack {self.name!r}: lora_lr must be a number > 0, got {lr!r}")
        spec = self.target_image
        if not (spec == "pattern" if isinstance(spec, str) else
                isinstance(spec, torch.Tensor) and spec.dim() in (3, 4) and spec.shape[-3] == 3):
            raise InputError(f"attack {self.name!r}: target_image must be 'pattern' or a Tensor image (3, H, W) "
                             f"/ (1, 3, H, W) in [0, 1], got {spec if isinstance(spec, str) else type(spec).__name__}")
        self._surrogate = None  # the target with the surrogate UNet, during perturb
        self._z_target: Optional[torch.Tensor] = None

    def _check_int(self, key: str, low: int) -> None:
        value = self.params[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise InputError(f"attack {self.name!r}: {key} must be an integer >= {low}, got {value!r}")

    # --- pieces ------------------------------------------------------------------------------
    def condition(self, target) -> torch.Tensor:
        return self._cache.get(target, ("prompt", self.prompt), lambda: target.encode_prompt([self.prompt]).detach())

    def pattern_posterior(self, target, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) of the pattern's posterior at the input's size, once per target and size."""
        return pattern_posterior(self._cache, self.target_image, target, like)

    def target_latent(self, target, like: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
        """z^T (1, C, h, w), scaled: a posterior sample drawn with `generator`, or the mean for None."""
        mean, std = self.pattern_posterior(target, like)
        if generator is None:
            return mean * target.scaling_factor
        xi = draw("randn", mean.shape, generator, target.device)
        return (mean + std * xi.to(mean.dtype)) * target.scaling_factor

    def shift_loss(self, model, adv: torch.Tensor, z_target: torch.Tensor, cond: torch.Tensor,
                   generator: torch.Generator) -> torch.Tensor:
        """mean over latent dims of (eps_theta'(z_t, t, c) - z^T)^2 per image (N,), one (eps, t) draw."""
        z, image = posterior_sample(model, adv, None)  # scaled posterior mean, differentiable (+ IP2P's condition)
        shape = latent_shape(model, adv)
        eps = draw("randn", shape, generator, model.device)
        t = torch.randint(0, model.num_train_timesteps, (shape[0],), generator=generator,
                          device=generator.device).to(model.device)
        pred = model.predict_noise(model.add_noise(z, eps, t), t, cond, image_latents=image)
        return (pred.float() - z_target.float()).pow(2).flatten(1).mean(dim=1)

    # --- the objective -----------------------------------------------------------------------
    def objective_loss(self, target, adv: torch.Tensor, clean: torch.Tensor,
                       generator: Optional[torch.Generator] = None) -> torch.Tensor:
        cond = self.condition(target)
        if generator is None:  # evaluation: the target's own UNet, fixed draws, the pattern's mean
            gen = torch.Generator().manual_seed(int(self.eval_seed))
            z_target = self.target_latent(target, adv, None)
            total = torch.zeros(adv.shape[0], device=adv.device)
            for _ in range(int(self.eval_samples)):
                total = total + self.shift_loss(target, adv, z_target, cond, gen).to(total.device)
            return total / int(self.eval_samples)
        model = self._surrogate if self._surrogate is not None else target
        z_target = self._z_target if self._z_target is not None else self.target_latent(target, adv, None)
        return self.shift_loss(model, adv, z_target, cond, generator)

    # --- the alternation ---------------------------------------------------------------------
    def finetune(self, target, unet: Optional[torch.nn.Module], protected: torch.Tensor,
                 generator: torch.Generator) -> torch.nn.Module:
        """`lora_steps` DreamBooth steps of the surrogate on the protected images (a fresh AdamW, as
        the anchor builds one per round); the first call makes the LoRA copy of the target's UNet."""
        if unet is None:
            seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator, device=generator.device))
            unet = lora_unet(target.unet, self.lora_rank, seed)
        params = [p for p in unet.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=float(self.lora_lr), betas=(0.9, 0.999), weight_decay=0.01, eps=1e-8)
        view = with_unet(target, unet)
        cond = self.condition(target)
        unet.train()
        for k in range(int(self.lora_steps)):
            i = int(torch.randint(0, protected.shape[0], (1,), generator=generator, device=generator.device))
            x = protected[i:i + 1].detach()
            with torch.no_grad():
                xi = draw("randn", latent_shape(target, x), generator, target.device)
                z, image = posterior_sample(target, x, xi)
            eps = draw("randn", z.shape, generator, target.device)
            t = torch.randint(0, target.num_train_timesteps, (1,), generator=generator,
                              device=generator.device).to(target.device)
            self._scaled_backward(view, target, z, eps, t, cond, params, k, image)
            opt.step()
            opt.zero_grad()
        unet.eval()
        return unet

    def _scaled_backward(self, view, target, z, eps, t, cond, params, k: int, image=None) -> None:
        """The fine-tuning loss's gradient into `params`, clipped to norm 1. In a float16 model the
        backward pass can overflow; as the anchor's GradScaler does, the loss scale is then halved
        (here from 1, the step retried with the same draws, at most 30 times) and the gradient
        unscaled. Still non-finite: an AttackError naming the dtype, never a silent skip."""
        scale = 1.0
        for _ in range(30):
            pred = view.predict_noise(target.add_noise(z, eps, t), t, cond, image_latents=image)
            (torch.nn.functional.mse_loss(pred.float(), eps.float()) * scale).backward()
            grads = [p.grad for p in params if p.grad is not None]
            if all(bool(torch.isfinite(g).all()) for g in grads):
                for g in grads:
                    g.div_(scale)
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                return
            for p in params:
                p.grad = None
            scale /= 2.0
        raise AttackError(f"attack {self.name!r}: the LoRA fine-tuning's gradient is not finite (step {k + 1} of "
                          f"{self.lora_steps}) with a {str(target.dtype).replace('torch.', '')} model even at loss "
                          f"scale {scale * 2:.3g}: run a float32 or bfloat16 target, or lora_steps=0 (no surrogate)")

    def perturb(self, images: torch.Tensor, target, budget: Budget,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
        check_norm(self, budget)
        generator = ensure_generator(generator)
        self._z_target = self.target_latent(target, images, generator)
        delta = clamp_to_image(images, budget.project(start_delta(self.init, images, budget, generator)))
        step_size = resolve_step_size(self.step_size, budget, self.steps)
        unet, losses = None, []
        plan = round_steps(int(self.steps), int(self.rounds))
        try:
            for r, n in enumerate(plan):
                self._surrogate = None if unet is None else with_unet(target, unet)

                def loss_fn(d: torch.Tensor) -> torch.Tensor:
                    return self.objective_loss(target, images + d, images, generator).mean()

                result = optimize(loss_fn, delta, budget, steps=n, step_size=step_size, optimizer=self.optimizer,
                                  maximize=False, schedule=self.schedule,
                                  images=images, label=f"attack {self.name!r} round {r + 1}", model_dtype=target.dtype)
                delta, losses = result.delta, losses + result.losses
                if r + 1 < len(plan):  # the last round's fine-tuning would never be used
                    unet = self.finetune(target, unet, (images + delta).detach(), generator)
        finally:
            self._surrogate, self._z_target = None, None
        self.loss_history = losses
        return to_boundary(delta, budget, images) if self.finish == "boundary" else delta
