"""The model-side adaptive attacker (harness/adaptive.py): LoRA Patching of the editor's UNet."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import spdbench
from spdbench.errors import InputError
from spdbench.harness.adaptive import COLUMN, LoraPatch, adapt_entry, patch_editor
from spdbench.harness.editing import PROMPTS, Editor
from spdbench.suites import EditSettings

ENTRIES = Path(__file__).resolve().parents[1] / "leaderboard" / "entries"


def test_a_lora_patch_learns_and_edits_with_the_patched_unet_only():
    """Two photos, a few steps on the offline tiny model: the loss falls, the original editor is
    untouched (fingerprint), and the patched editor's edits are its own (not the original pipeline's)."""
    torch.manual_seed(0)
    target = spdbench.load_target("tiny")
    clean = spdbench.load_photos(n=2, size=64).to(target.device)
    protected = (clean + (16 / 255) * torch.randn_like(clean).sign()).clamp(0, 1)
    settings = EditSettings(strength=0.5, steps=2, guidance=7.5, seed=9222)
    before = Editor(target, settings).edit(protected, PROMPTS["P3"], [1, 2])  # builds the original's pipeline first
    fingerprint = target.fingerprint_now()
    patched, losses = patch_editor(target, clean, protected, ["P3"], settings.strength,
                                   LoraPatch(steps=12, lr=5e-3, batch_size=2))
    assert target.fingerprint_now() == fingerprint and target.name == "tiny"
    assert patched.name == "tiny+lora" and len(losses) == 12
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
    after = Editor(patched, settings).edit(protected, PROMPTS["P3"], [1, 2])
    assert (after - before).abs().max() > 1e-4
    again = Editor(target, settings).edit(protected, PROMPTS["P3"], [1, 2])
    assert torch.equal(again, before)


def test_lora_settings_are_checked():
    with pytest.raises(InputError, match="lora steps"):
        LoraPatch(steps=0)
    with pytest.raises(InputError, match="lr"):
        LoraPatch(lr=0.0)
    assert LoraPatch().to_dict()["method"] == "lora-patch"


@pytest.mark.slow
def test_an_untrained_patch_reproduces_the_entrys_own_numbers():
    """With a vanishing learning rate the patched editor is the editor: the test photos' SSIM after
    "fine-tuning" equals the committed record's per-image protection (the scoring path is the harness's)."""
    result = adapt_entry(ENTRIES / "smoke-photoguard-encoder", LoraPatch(steps=1, lr=1e-12), eps_labels=["16/255"])
    assert result["column"] == COLUMN and result["model"]["name"] == "tiny"
    (budget,) = result["budgets"]
    for prompt in budget["prompts"].values():
        assert prompt["after"] == pytest.approx(prompt["before"], abs=2e-4)
    assert abs(budget["paired_after_minus_before"]["mean"]) < 2e-4


@pytest.mark.parametrize("name, prompt, steps", [("tiny-inpaint", "P3", 16), ("tiny-ip2p", "I1", 40)])
def test_a_conditioned_editor_is_patched_through_its_photo_channels(name, prompt, steps):
    """Inpainting and instruction editors see the photo only through their condition channels: the
    patch learns to answer the protected photo's condition as the original answers the clean one's
    (that term falls), while the clean photo's answer starts exactly at the original's (LoRA B = 0)."""
    from spdbench.harness.adaptive import _photo_conditions, editor_kind

    torch.manual_seed(0)
    target = spdbench.load_target(name)
    clean = spdbench.load_photos(n=2, size=64).to(target.device)
    protected = (clean + (16 / 255) * torch.randn_like(clean).sign()).clamp(0, 1)
    masks = torch.zeros(2, 1, 64, 64)
    masks[..., 16:48, 16:48] = 1.0
    kind = editor_kind(target)
    assert kind == ("inpainting" if name == "tiny-inpaint" else "instruct")
    if kind == "inpainting":
        with pytest.raises(InputError, match="needs one mask per photo"):
            patch_editor(target, clean, protected, ["P3"], 1.0, LoraPatch(steps=1))
    use = masks if kind == "inpainting" else None
    patched, losses = patch_editor(target, clean, protected, [prompt], 1.0, LoraPatch(steps=steps, lr=5e-3, batch_size=2),
                                   use)
    assert len(losses) == steps and all(v == v for v in losses)
    key, c_clean, c_adv = _photo_conditions(target, kind, clean, protected, use)
    gen = torch.Generator().manual_seed(1)
    z0 = target.latents(clean).detach()
    cond = target.encode_prompt([PROMPTS[prompt]] * 2)

    def gap(model) -> float:
        """The protected term, averaged over the same 8 draws of (t, noise) for either model."""
        gen.manual_seed(1)
        total = 0.0
        for _ in range(8):
            t = torch.randint(1, 999, (2,), generator=gen)
            noise = torch.randn(z0.shape, generator=gen)
            abar = target.alphas_cumprod[t].view(-1, 1, 1, 1)
            z_t = abar.sqrt() * z0 + (1 - abar).sqrt() * noise
            with torch.no_grad():
                want = target.predict_noise(z_t, t, cond, **{key: c_clean})
                total += float((model.predict_noise(z_t, t, cond, **{key: c_adv}) - want).pow(2).mean())
        return total / 8

    assert gap(patched) < gap(target)
