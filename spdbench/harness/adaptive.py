"""The model-side adaptive attacker: LoRA-fine-tune the editor so protected photos edit like clean ones.

Why: a protection is a property of a photo against a fixed model, but the person who edits owns
the model. LoRA Patching (the field's library: peft) fine-tunes the editor's UNet on protected
photos, after which their edits come out as the clean photos' do. Here the patch is trained on the
TRAIN split's protected photos of an entry (clean originals at hand, as an attacker who protects
photos of their own would have), then the TEST photos are edited with the patched editor and
scored against the ORIGINAL editor's clean edit (what the user would have got without any
protection), with the entry's own per-image protection as the paired "before".

The objective (one UNet pass per step, no pass through the whole edit): at a timestep the edit
visits (t <= strength * T), from the protected photo's noised latent the patched UNet's estimate
of the clean latent must be the CLEAN photo's latent (its noise target is derived from that), and
from the clean photo's noised latent it must predict the true noise (the ordinary denoising loss:
clean photos keep editing as before). Same code for the offline tiny models (CPU minutes) and an
SD1.5 hub id on a GPU.

Inpainting and instruction editors start from pure noise and see the photo only through their
extra input channels (the masked photo's latent and the mask; the photo's latent): there the
patched UNet, conditioned on the PROTECTED photo, must predict what the ORIGINAL UNet predicts
conditioned on the CLEAN photo, and conditioned on the clean photo it must keep doing so
(distillation at the clean photo's noised latent, t over the whole schedule those edits visit):
one more UNet pass per step (the original's, without gradient).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import torch

from spdbench.attacks.mist_v2 import LORA_TARGETS, lora_unet, with_unet
from spdbench.data.photos import split_indices
from spdbench.errors import InputError, RecordError
from spdbench.harness.editing import PROMPTS, Editor, clean_edit_cache_dir
from spdbench.harness.request import suite_masks
from spdbench.scoring import metrics as metrics_mod
from spdbench.scoring.stats import bootstrap_diff_ci
from spdbench.store.perturbations import apply_delta, load_delta
from spdbench.store.records import Record, Split, Status, load_records
from spdbench.suites import get_suite
from spdbench.targets import Target, load_target
from spdbench.targets.instruct import is_instruct

#: the board's column name for a protection after the editor was fine-tuned against it
COLUMN = "after editor fine-tuning"
METHOD = "lora-patch"
OBJECTIVE = "x0(protected) -> clean latent; eps(clean) -> noise"
#: inpainting and instruction editors: the photo enters through the UNet's condition channels
CONDITIONED_OBJECTIVE = ("eps_patched(z_t | protected photo) -> eps_original(z_t | clean photo); "
                         "eps_patched(z_t | clean photo) -> eps_original(z_t | clean photo); z_t: the clean latent noised")


@dataclass(frozen=True)
class LoraPatch:
    """The attacker's settings (recorded with every result)."""

    steps: int = 60
    rank: int = 4
    lr: float = 1e-3
    batch_size: int = 4
    preserve: float = 1.0     # weight of the clean photos' ordinary denoising loss
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "rank", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InputError(f"lora {name} must be an integer >= 1, got {value!r}")
        if not self.lr > 0 or not self.preserve >= 0:
            raise InputError(f"lora lr must be > 0 and preserve >= 0, got lr={self.lr!r}, preserve={self.preserve!r}")

    def to_dict(self) -> dict:
        return dict(asdict(self), method=METHOD, objective=OBJECTIVE)

    @classmethod
    def from_dict(cls, data: dict) -> "LoraPatch":
        """The settings back from `to_dict`'s JSON (a challenge's): every key must be one this
        version runs with, and its method and objective this code's (else the JSON is not of it)."""
        data = dict(data)
        method, objective = data.pop("method", None), data.pop("objective", None)
        if method != METHOD or objective != OBJECTIVE:
            raise RecordError(f"lora settings name method {method!r} / objective {objective!r}; this version runs "
                              f"{METHOD!r} / {OBJECTIVE!r}")
        if set(data) != set(cls.__dataclass_fields__):
            raise RecordError(f"lora settings {sorted(data)}: expected exactly {sorted(cls.__dataclass_fields__)}")
        return cls(**data)


def ran_with(settings: LoraPatch, strength: float, editor: str = "img2img") -> dict:
    """Every setting a patch is trained with, as recorded in a challenge: the attacker's settings and
    what this code fixes (the layers LoRA adapts, its scale and dropout, the optimizer, the timesteps
    drawn; torch's AdamW defaults other than lr); for an inpainting or instruction `editor` also the
    objective (an img2img challenge's record is as it was before those editors were patched)."""
    out = dict(settings=settings.to_dict(), lora_targets=list(LORA_TARGETS), lora_alpha=settings.rank,
               lora_dropout=0.0, optimizer="AdamW (torch defaults other than lr)",
               timesteps=f"uniform in 1..int({strength!r} * T) - 1 (the edit's strength)",
               generator="torch CPU generator seeded with settings.seed (batch, timestep, prompt, noise)")
    if editor != "img2img":
        out.update(editor=editor, objective=CONDITIONED_OBJECTIVE)
    return out


def editor_kind(target: Target) -> str:
    """"img2img", "inpainting" or "instruct": which objective patches this editor."""
    if is_instruct(target):
        return "instruct"
    return "inpainting" if getattr(target, "inpainting", False) else "img2img"


def patch_editor(target: Target, clean: torch.Tensor, protected: torch.Tensor, prompts: Sequence[str],
                 strength: float, settings: LoraPatch = LoraPatch(),
                 masks: Optional[torch.Tensor] = None) -> tuple[Target, list[float]]:
    """A copy of `target` whose UNet carries a LoRA trained on (clean, protected) pairs; the loss
    per step. `target` itself is left unchanged. `masks`: the photos' masks on an inpainting editor
    (required there, as its edits use them)."""
    if clean.shape != protected.shape or len(clean) == 0:
        raise InputError(f"patch_editor needs clean and protected photos of one shape, got {tuple(clean.shape)} "
                         f"and {tuple(protected.shape)}")
    kind = editor_kind(target)
    if kind == "inpainting" and (masks is None or len(masks) != len(clean)):
        raise InputError(f"patch_editor: inpainting editor {target.name!r} needs one mask per photo "
                         f"({len(clean)}), got {None if masks is None else len(masks)}")
    unet = lora_unet(target.unet, settings.rank, settings.seed)
    patched = _patched(target, unet)
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=settings.lr)
    gen = torch.Generator().manual_seed(settings.seed)
    with torch.no_grad():
        z_clean, z_adv = target.latents(clean).float(), target.latents(protected).float()
        conds = target.encode_prompt([resolve(p) for p in prompts]).detach()
        photo_conds = None if kind == "img2img" else _photo_conditions(target, kind, clean, protected, masks)
    t_max = max(1, int(strength * target.num_train_timesteps) - 1)
    losses = []
    unet.train()
    for _ in range(settings.steps):
        if photo_conds is None:
            loss = _step_loss(patched, z_clean, z_adv, conds, t_max, settings, gen)
        else:
            loss = _conditioned_step_loss(target, patched, z_clean, photo_conds, conds, t_max, settings, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    unet.eval()
    unet.requires_grad_(False)
    return patched, losses


def _patched(target: Target, unet: torch.nn.Module) -> Target:
    """`target` with `unet` (its LoRA copy) as a new target: a shallow copy shares the original's
    built pipelines (over the original UNet) and fingerprint, so those are dropped."""
    patched = with_unet(target, unet)
    patched._pipe, patched._inpaint_pipe, patched._fingerprint = None, None, None
    patched.name = f"{target.name}+lora"
    return patched


def lora_weights(patched: Target) -> dict[str, torch.Tensor]:
    """The LoRA adapter's weights of a patched editor (float32 on the CPU): what a challenge stores
    as safetensors; every other weight is the original editor's."""
    return {n: p.detach().float().cpu().contiguous() for n, p in patched.unet.named_parameters() if "lora_" in n}


def load_patch(target: Target, weights: dict[str, torch.Tensor], settings: LoraPatch) -> Target:
    """`target` patched with stored LoRA weights: a fresh adapter of `settings`' rank, every one of
    its weights replaced by the stored one (same names and shapes, else RecordError)."""
    unet = lora_unet(target.unet, settings.rank, settings.seed)
    params = {n: p for n, p in unet.named_parameters() if "lora_" in n}
    if set(params) != set(weights):
        missing, extra = sorted(set(params) - set(weights)), sorted(set(weights) - set(params))
        raise RecordError(f"LoRA weights do not fit the editor at rank {settings.rank}: missing {missing[:2]}, "
                          f"unknown {extra[:2]}")
    with torch.no_grad():
        for n, p in params.items():
            if tuple(weights[n].shape) != tuple(p.shape):
                raise RecordError(f"LoRA weight {n}: shape {tuple(weights[n].shape)}, the editor's {tuple(p.shape)}")
            p.copy_(weights[n].to(p.device, p.dtype))
    unet.eval()
    unet.requires_grad_(False)
    return _patched(target, unet)


def resolve(prompt: str) -> str:
    return PROMPTS.get(prompt, prompt)


def _draw(patched: Target, z_clean: torch.Tensor, conds: torch.Tensor, t_max: int, settings: LoraPatch,
          gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One step's draws from the patch's generator, in this order (a stored patch re-trains bit for
    bit only if it never changes): photos `idx`, timesteps `t`, prompt embeddings, noise; and
    alpha-bar at `t`."""
    idx = torch.randint(0, len(z_clean), (min(settings.batch_size, len(z_clean)),), generator=gen)
    t = torch.randint(1, t_max + 1, (len(idx),), generator=gen)
    cond = conds[torch.randint(0, len(conds), (len(idx),), generator=gen)].to(patched.device)
    noise = torch.randn(z_clean[idx].shape, generator=gen).to(z_clean.device)
    abar = patched.alphas_cumprod[t.to(patched.alphas_cumprod.device)].view(-1, 1, 1, 1).float().to(z_clean.device)
    return idx, t, cond, noise, abar


def _step_loss(patched: Target, z_clean: torch.Tensor, z_adv: torch.Tensor, conds: torch.Tensor, t_max: int,
               settings: LoraPatch, gen: torch.Generator) -> torch.Tensor:
    idx, t, cond, noise, abar = _draw(patched, z_clean, conds, t_max, settings, gen)
    noisy_adv = abar.sqrt() * z_adv[idx] + (1 - abar).sqrt() * noise
    # the noise that makes x0-estimate(noisy_adv) = the clean latent
    want_adv = (noisy_adv - abar.sqrt() * z_clean[idx]) / (1 - abar).sqrt()
    noisy_clean = abar.sqrt() * z_clean[idx] + (1 - abar).sqrt() * noise
    pred_adv = patched.predict_noise(noisy_adv.to(patched.dtype), t.to(patched.device), cond).float()
    pred_clean = patched.predict_noise(noisy_clean.to(patched.dtype), t.to(patched.device), cond).float()
    return (pred_adv - want_adv).pow(2).mean() + settings.preserve * (pred_clean - noise).pow(2).mean()


def _photo_conditions(target: Target, kind: str, clean: torch.Tensor, protected: torch.Tensor,
                      masks: Optional[torch.Tensor]) -> tuple[str, torch.Tensor, torch.Tensor]:
    """How the photo enters an inpainting or instruction editor's UNet, for the clean and the
    protected photos: (predict_noise's keyword, clean condition, protected condition)."""
    if kind == "inpainting":
        m = masks.to(target.device, target.dtype)
        return "inpaint", target.inpaint_condition(clean, m).detach(), target.inpaint_condition(protected, m).detach()
    # InstructPix2Pix: the photo's VAE posterior mean, unscaled (the pipeline's image condition)
    return "image_latents", target.encode(clean).mean.detach(), target.encode(protected).mean.detach()


def _conditioned_step_loss(original: Target, patched: Target, z_clean: torch.Tensor,
                           photo_conds: tuple[str, torch.Tensor, torch.Tensor], conds: torch.Tensor, t_max: int,
                           settings: LoraPatch, gen: torch.Generator) -> torch.Tensor:
    """CONDITIONED_OBJECTIVE: the patched UNet given the protected photo predicts what the original
    gives the clean photo (and keeps doing so given the clean photo), at the clean latent noised."""
    key, c_clean, c_adv = photo_conds
    idx, t, cond, noise, abar = _draw(patched, z_clean, conds, t_max, settings, gen)
    z_t = (abar.sqrt() * z_clean[idx] + (1 - abar).sqrt() * noise).to(patched.dtype)
    tt = t.to(patched.device)
    with torch.no_grad():
        want = original.predict_noise(z_t, tt, cond, **{key: c_clean[idx]}).float()
    pred_adv = patched.predict_noise(z_t, tt, cond, **{key: c_adv[idx]}).float()
    pred_clean = patched.predict_noise(z_t, tt, cond, **{key: c_clean[idx]}).float()
    return (pred_adv - want).pow(2).mean() + settings.preserve * (pred_clean - want).pow(2).mean()


# --- an entry's protections, patched against and scored -----------------------------------------
def adapt_entry(folder: Union[str, Path], settings: LoraPatch = LoraPatch(), device: Optional[str] = None,
                eps_labels: Optional[Sequence[str]] = None) -> dict:
    """For each budget of a run folder or entry: patch the editor on the TRAIN split's protected
    photos, edit the TEST photos with it, and score them against the original editor's clean edits.
    Returns {"settings", "model", "budgets": [{eps, prompts: {key: {before, after}}, paired}]}."""
    recs = [r for r in load_records(Path(folder) / "records") if r.status == Status.ok and r.perturbation_file]
    if not recs:
        raise InputError(f"adapt: {str(folder)!r} holds no finished record with stored perturbations")
    suite = get_suite(recs[0].suite)
    target = load_target(suite.edit_target or suite.target, device=device)
    images, names = suite.load_images()
    images = images.to(target.device)
    masks, _ = suite_masks(suite, None, names, images, target)  # the suite's mask set (inpainting), else None
    tr, te = split_indices(len(images), suite.split_seed)
    by_eps: dict[str, list[Record]] = {}
    for r in recs:
        by_eps.setdefault(r.eps_label, []).append(r)
    budgets = []
    for label in sorted(by_eps, key=lambda e: by_eps[e][0].eps):
        if eps_labels and label not in eps_labels:
            continue
        budgets.append(_adapt_budget(Path(folder), by_eps[label], target, suite, images, tr, te, settings, masks))
    return dict(column=COLUMN, settings=settings.to_dict(), suite=suite.name, attack=recs[0].attack,
                model=dict(name=target.name, source=str(target.source), fingerprint=target.fingerprint),
                budgets=budgets)


def _adapt_budget(folder: Path, recs: list[Record], target: Target, suite, images: torch.Tensor,
                  tr, te, settings: LoraPatch, masks: Optional[torch.Tensor] = None) -> dict:
    delta, _ = load_delta(folder / recs[0].perturbation_file, shape=tuple(images.shape))
    adv = apply_delta(images, delta.to(images.device))
    prompts = sorted({r.prompt_key for r in recs})
    at = (lambda idx: None) if masks is None else (lambda idx: masks[idx])
    patched, losses = patch_editor(target, images[tr], adv[tr], prompts, suite.edit.strength, settings, at(tr))
    original = Editor(target, suite.edit, cache_dir=clean_edit_cache_dir(target))
    editor = Editor(patched, suite.edit, cache_dir=None)
    out = {}
    for r in (r for r in recs if r.split == Split.test):
        seeds = list(r.edit_seeds)
        clean_edit = original.edit_clean(images[te], PROMPTS[r.prompt_key], seeds, at(te))
        after = metrics_mod.score(editor.edit(adv[te], PROMPTS[r.prompt_key], seeds, at(te)), clean_edit)
        out[r.prompt_key] = dict(before=r.protection.get("ssim", []), after=after["ssim"].tolist(),
                                 after_all={m: v.tolist() for m, v in after.items()})
    before = [v for p in sorted(out) for v in out[p]["before"]]
    after = [v for p in sorted(out) for v in out[p]["after"]]
    ci = bootstrap_diff_ci(after, before, seed=0) if before and len(before) == len(after) else None
    return dict(eps=recs[0].eps_label, losses=[losses[0], losses[-1]] if losses else [], prompts=out,
                ssim_before=sum(before) / len(before) if before else None,
                ssim_after=sum(after) / len(after) if after else None,
                paired_after_minus_before=None if ci is None else dict(mean=ci.mean, low=ci.low, high=ci.high))


def write_result(result: dict, path: Union[str, Path]) -> Path:
    """The result as JSON (never pickle)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    return path
