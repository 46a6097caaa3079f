"""`check_attack`: the properties every attack must have, as one function a plugin's CI can call.

Why a function and not only spdbench's own tests: a third-party attack is tested by its author's
CI, which cannot import spdbench's `tests/`. The same checks run there, in spdbench's registry-wide
tests and behind the pytest plugin's `spdbench_check` fixture:

- contract, for every supported norm and each eps, on the train and the test photos: a tensor of
  the images' shape, dtype and device, finite, inside the budget (1e-6), x + delta in [0, 1], a
  finite float loss curve with one value per step;
- non-zero: after the harness's own projection and 8-bit rounding the photo changed (except `none`);
- budget use (advisory, shown as "warn"): the RMS of the applied perturbation is at least
  `BUDGET_USE_FLOOR` of a full-budget one -- an attack that ends well inside its ball is compared
  at a smaller budget than its label says (the board flags such rows "under budget");
- determinism: the same generator seed gives the same delta, bitwise;
- protection: on its own objective (`objective()`, lower = stronger) the attack beats uniform noise
  of the same budget, on both splits; a universal attack is fit on the train photos only, so on
  the test photos this is the check that it generalizes.

It runs on the trained `tiny` target at 64 px with few steps: seconds per attack on 2 CPU cores.
It calls the attack in this process (it tests the author's own code; it is not a leaderboard run,
which isolates attack code in a worker process).
A random-weight model is not enough here: its UNet's denoising error barely depends on the image,
so a diffusion objective cannot be beaten there by any attack.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import torch

from spdbench.attacks.base import Attack, attack_class
from spdbench.budget import BUDGET_USE_FLOOR, NORMS, Budget, apply_budget, budget_use, quantize_8bit
from spdbench.data.masks import centre_box
from spdbench.data.photos import load_photos
from spdbench.errors import InputError
from spdbench.targets import load_target

AttackLike = Union[str, type, Attack]


@dataclass
class Check:
    """One property checked on one setting: what, where, passed or not, and the numbers."""

    name: str
    setting: str
    ok: bool
    detail: str = ""
    #: a finding shown as "warn", not a failure: budget use depends on the steps the check gives
    #: the attack (few, for speed), so falling short here is a hint, and the board flags real runs
    advisory: bool = False


@dataclass
class AttackReport:
    """Every check `check_attack` ran for one attack; `assert_ok()` fails with the failed ones."""

    attack: str
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(c.ok for c in self.checks if not c.advisory)

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.ok and not c.advisory]

    @property
    def warnings(self) -> list[Check]:
        """Advisory findings that did not pass (e.g. "under budget")."""
        return [c for c in self.checks if not c.ok and c.advisory]

    def add(self, name: str, setting: str, ok: bool, detail: str = "", advisory: bool = False) -> bool:
        self.checks.append(Check(name, setting, bool(ok), detail, advisory))
        return bool(ok)

    def __str__(self) -> str:
        required = [c for c in self.checks if not c.advisory]
        lines = [f"check_attack({self.attack!r}): {sum(c.ok for c in required)}/{len(required)} passed"
                 + (f", {len(self.warnings)} warning(s)" if self.warnings else "")]
        lines += [f"  {'ok  ' if c.ok else 'warn' if c.advisory else 'FAIL'} {c.name} [{c.setting}] {c.detail}".rstrip()
                  for c in self.checks]
        return "\n".join(lines)

    def assert_ok(self) -> "AttackReport":
        if not self.ok:
            raise AssertionError(str(self) if self.checks else f"check_attack({self.attack!r}) ran no check")
        return self


def _make(attack: AttackLike, steps: Optional[int], params: dict) -> Attack:
    """A fresh instance (a given instance is copied, never run itself), steps set as the harness does."""
    if isinstance(attack, Attack):
        made = copy.deepcopy(attack)
        if params:
            made = made.configure(**params)
    else:
        cls = attack_class(attack) if isinstance(attack, str) else attack
        made = cls(**params)
    if steps is not None and "steps" in made.defaults and "steps" not in params:
        made = made.configure(steps=steps)
    return made


def mask_args(attack: Attack, images: torch.Tensor, target=None) -> dict:
    """`masks=` for an attack that reads the editor's masks (`uses_masks`): the centre box, the
    smoke-inpaint suite's set (None on an img2img `target`, as the harness gives); nothing for any
    other attack."""
    if not attack.uses_masks:
        return {}
    if target is not None and not getattr(target, "inpainting", False):
        return {"masks": None}

    return {"masks": torch.stack([centre_box(images.shape[-1]) for _ in images]).to(images.device)}


def _protect(attack: Attack, images: torch.Tensor, target, budget: Budget, seed: int,
             train: Optional[torch.Tensor]) -> torch.Tensor:
    if attack.kind.fits:
        fit_on = train if train is not None else images
        attack.fit(fit_on, target, budget, torch.Generator().manual_seed(seed), **mask_args(attack, fit_on, target))
    return attack(images, target, budget, torch.Generator().manual_seed(seed), **mask_args(attack, images, target))


def _noise(images: torch.Tensor, budget: Budget, seed: int) -> torch.Tensor:
    """Uniform noise of the same budget: U[-eps, eps] per pixel (L-inf) or a uniform direction at
    norm eps (L2), kept inside [0, 1] -- the `uniform-noise` baseline at full budget."""
    g = torch.Generator().manual_seed(seed + 10_007)
    if budget.norm == "linf":
        delta = (torch.rand(images.shape, generator=g) * 2 - 1) * budget.eps
    else:
        d = torch.randn(images.shape, generator=g)
        delta = d / d.flatten(1).norm(dim=1).view(-1, 1, 1, 1) * budget.eps
    return (images + delta.to(images.device)).clamp(0, 1) - images


def _contract(report: AttackReport, attack: Attack, delta, images: torch.Tensor, budget: Budget,
              setting: str, steps: Optional[int]) -> bool:
    if not isinstance(delta, torch.Tensor) or type(delta) is not torch.Tensor:
        return report.add("contract", setting, False, f"returned {type(delta).__name__}, expected a plain torch.Tensor")
    problems = []
    if tuple(delta.shape) != tuple(images.shape):
        problems.append(f"shape {tuple(delta.shape)} != {tuple(images.shape)}")
    if delta.dtype != images.dtype or delta.device != images.device:
        problems.append(f"dtype/device {delta.dtype}/{delta.device} != {images.dtype}/{images.device}")
    if problems:
        return report.add("contract", setting, False, "; ".join(problems))
    if not bool(torch.isfinite(delta).all()):
        return report.add("contract", setting, False, "delta has NaN/Inf")
    excess = float((budget.norms(delta) - budget.eps).max())
    if excess > 1e-6:
        problems.append(f"outside the budget by {excess:.3g}")
    adv = images + delta
    if float(adv.min()) < -1e-6 or float(adv.max()) > 1 + 1e-6:
        problems.append(f"x + delta leaves [0, 1] ({float(adv.min()):.4g}..{float(adv.max()):.4g})")
    history = attack.loss_history
    if not isinstance(history, list) or not all(isinstance(v, float) and math.isfinite(v) for v in history):
        problems.append("loss_history is not a list of finite floats")
    elif steps is not None and "steps" in attack.defaults and len(history) != steps:
        problems.append(f"loss_history has {len(history)} values for {steps} steps")
    return report.add("contract", setting, not problems, "; ".join(problems))


def check_attack(attack: AttackLike, *, target="tiny", eps: Sequence[str] = ("8/255", "16/255"),
                 norms: Optional[Sequence[str]] = None, steps: Optional[int] = None, size: int = 64,
                 n_images: int = 2, seed: int = 0, params: Optional[dict] = None) -> AttackReport:
    """Run every property check on `attack` (a registered name, a class or an instance).

    `target`: a `load_target` name or a Target (default: the trained tiny target; for an attack that
    needs an inpainting model, `needs_inpainting`, the trained tiny-inpaint target; an attack that
    reads masks gets centre boxes on an inpainting target). `eps`: the
    L-inf budgets to check; the L2 budget of each is `l2_budget(eps, size)` (the same rms
    perturbation as a quarter of the L-inf ball). `norms`: default every norm the attack declares.
    `steps`: the iteration count set on optimizing attacks (default 8 per image, 20 for a universal
    attack, whose one delta must fit seven photos; 0 keeps the attack's own). `params`: extra
    parameters. Photos: the first `n_images` of the bundled train and test splits at `size` px; a
    universal attack is fit on the whole train split (7 photos).
    Returns an `AttackReport`; call `.assert_ok()` in a test.
    """
    params = dict(params or {})
    probe = _make(attack, None, params)
    if steps is None:
        steps = 20 if probe.kind.fits else 8
    steps = steps or None
    report = AttackReport(probe.name)
    model = _check_target(probe, target)
    splits = {s: load_photos(n=n_images, size=size, split=s).to(model.device) for s in ("train", "test")}
    # a universal attack is fit on the whole train split: a delta fit on two photos fits those two
    train = load_photos(size=size, split="train").to(model.device) if probe.kind.fits else splits["train"]
    norms = list(norms) if norms is not None else list(getattr(probe, "norms", NORMS))
    for norm in norms:
        for e in eps:
            budget = Budget("linf", e) if norm == "linf" else l2_budget(e, size)
            _check_budget(report, attack, probe, model, budget, splits, train, steps, params, seed)
    first = (Budget("linf", eps[0]) if norms[0] == "linf" else l2_budget(eps[0], size)) if norms and eps else None
    if first is not None:
        images = splits["test"]
        a, b = (_protect(_make(attack, min(steps or 3, 3), {**params, **_random_init(probe)}), images, model, first,
                         seed + 7, train) for _ in range(2))
        report.add("deterministic", f"{first} seed {seed + 7}", torch.equal(a, b),
                   "" if torch.equal(a, b) else f"max |difference| {float((a - b).abs().max()):.3g}")
    return report


def _check_target(probe: Attack, target):
    """The model the checks run on: an inpainting attack's default is the trained tiny-inpaint."""
    if probe.needs_inpainting and isinstance(target, str) and target == "tiny":
        target = "tiny-inpaint"
    model = load_target(target) if isinstance(target, str) else target
    if probe.needs_inpainting and not getattr(model, "inpainting", False):
        raise InputError(f"check_attack({probe.name!r}): the attack reads inpainting masks; target "
                         f"{getattr(model, 'name', model)!r} is not an inpainting model (use 'tiny-inpaint')")
    return model


def _check_budget(report: AttackReport, attack: AttackLike, probe: Attack, model, budget: Budget, splits: dict,
                  train: torch.Tensor, steps: Optional[int], params: dict, seed: int) -> None:
    """Contract, non-zero and beats-noise on both splits at one budget (a fitting attack fit once)."""
    fits = probe.kind.fits  # fit once on the train split, then protect any photo
    fitted = _make(attack, steps, params)
    if fits:
        fitted.fit(train, model, budget, torch.Generator().manual_seed(seed), **mask_args(fitted, train, model))
    for split, images in splits.items():
        setting = f"{budget} {split}"
        run = fitted if fits else _make(attack, steps, params)
        masks = mask_args(run, images, model)
        delta = run(images, model, budget, torch.Generator().manual_seed(seed), **masks)
        run.set_masks(masks.get("masks"))
        if not _contract(report, run, delta, images, budget, setting, steps):
            continue
        changed = float((apply_budget(images, delta, budget) != quantize_8bit(images)).float().mean())
        report.add("non-zero", setting, (changed == 0) if probe.name == "none" else (changed > 0),
                   f"{changed:.1%} of pixels changed after the budget and 8-bit rounding")
        if probe.name != "none":
            use = float(budget_use(apply_budget(images, delta, budget) - images, budget).mean())
            report.add("budget-use", setting, use >= BUDGET_USE_FLOOR,
                       f"RMS {use:.0%} of a full-budget perturbation (floor {BUDGET_USE_FLOOR:.0%}) at "
                       f"{steps if steps is not None else 'its own'} steps", advisory=True)
        if run.has_objective:
            adv = (images + delta).clamp(0, 1)
            o_attack = float(run.objective(adv, model, images).mean())
            o_noise = float(run.objective(images + _noise(images, budget, seed), model, images).mean())
            report.add("beats-noise", setting, o_attack < o_noise,
                       f"objective {o_attack:.6g} vs uniform noise {o_noise:.6g} (lower = stronger)")


def l2_budget(eps: str, size: int) -> Budget:
    """The L2 budget checked beside L-inf `eps`: eps * sqrt(3 size^2) / 4, an rms change of eps / 4
    per pixel (an L2 eps equal to the L-inf one would round to no change at all)."""
    return Budget("l2", Budget("linf", eps).eps * math.sqrt(3 * size * size) / 4)


def _random_init(attack: Attack) -> dict:
    """init='random' where the attack has it, so determinism covers its random start too."""
    return {"init": "random"} if "init" in attack.defaults else {}
