"""A suite's protocol card and its submission spec, read from the suite's definition (suites.py)
and from what `verify` / `submit` check (verify/claims.py, verify/entry.py).

Why read, never typed in: a card that drifts from the rule book it describes is worse than none.
The site (site/pages.py) and `spdbench list --suites` print the same rows.
"""
from __future__ import annotations

from typing import Optional

from spdbench.data.photos import BUNDLED_NAMES, TRAIN_FRACTION, split_indices
from spdbench.harness.editing import PROMPTS
from spdbench.scoring.metrics import LABELS
from spdbench.suites import Suite
from spdbench.targets import TARGETS
from spdbench.verify.entry import MANIFEST, RULES



def _model(name: str) -> str:
    if name in TARGETS:
        return f"{name} (small offline model shipped with spdbench, not Stable Diffusion)"
    return f"{name} (hub id or model folder)"


def _photos(suite: Suite) -> str:
    if suite.data != "bundled" and not suite.n_images:
        return (f"your --manifest/--data photos, {round(TRAIN_FRACTION * 100)}% train by seed "
                f"{suite.split_seed}")
    n = suite.n_images or len(BUNDLED_NAMES)
    train, test = split_indices(n, suite.split_seed)
    where = "bundled" if suite.data == "bundled" else "--manifest/--data"
    return (f"{n} {where} photos: {len(train)} train / {len(test)} test (split seed {suite.split_seed}); "
            f"each ranked number is a mean over the {len(test)} test photos")


def _floor(suite: Suite):
    """The suite's board rules (suites.Floor: invisibility floor, benign-edit check), read with a
    default so a suite (or a plugin) defined before issue 37 still has a card."""
    return getattr(suite, "floor", None)


def invisibility_floor(suite: Suite) -> Optional[str]:
    """The suite's invisibility floor as text, or None where the suite defines none."""
    floor = _floor(suite)
    parts = []
    psnr, ssim = getattr(floor, "psnr_db", None), getattr(floor, "ssim", None)
    if psnr is not None:
        parts.append(f"mean imperceptibility PSNR ≥ {psnr:g} dB")
    if ssim is not None:
        parts.append(f"mean imperceptibility SSIM ≥ {ssim:g}")
    return ", ".join(parts) + " (protected photo vs photo; below it: flagged, not ranked)" if parts else None


def benign_check(suite: Suite) -> Optional[str]:
    """The suite's benign-edit check as text, or None where it has none."""
    floor = _floor(suite)
    prompt, ssim = getattr(floor, "benign_prompt", None), getattr(floor, "benign_ssim", None)
    if prompt is None or ssim is None:
        return None
    return (f"prompt {prompt} (\"{PROMPTS.get(prompt, '?')}\"): mean SSIM between the edits of the protected photo "
            f"and of the photo ≥ {ssim:g} (below it: the protection destroys benign edits; flagged, not ranked)")


def _edit(suite: Suite) -> list[tuple[str, str]]:
    e = suite.edit
    rows = [("edit steps", str(e.steps)), ("edit strength", f"{e.strength:g}"), ("guidance", f"{e.guidance:g}")]
    if e.image_guidance is not None:
        rows.append(("image guidance", f"{e.image_guidance:g}"))
    rows.append(("edit seed", f"{e.seed} (per photo: a hash of it and the photo's 8-bit bytes; clean and "
                              "protected edits share it)"))
    return rows


def _work(suite: Suite) -> list[tuple[str, str]]:
    """The model-work budget per photo where the suite sets one (read with a default: newer field)."""
    work = getattr(suite, "attack_work", None)
    draws = getattr(suite, "purifier_draws", 1)
    rows = [("attack work", f"{work:g} encoder-equivalent passes per photo (steps derived from it)")] if work else []
    return rows + ([("purifier draws", f"{draws} per image (the worst counts)")] if draws and draws > 1 else [])


def protocol_card(suite: Suite) -> list[tuple[str, str]]:
    """The suite's rule book as (label, value) rows, in reading order."""
    editor = _model(suite.edit_target or suite.target)
    rows = [("task", {"inpaint": "inpainting", "instruct": "instruction editing"}.get(suite.task, "img2img")),
            ("attacked model", _model(suite.target)),
            ("editor", editor + (" (black box: not the attacked model)" if suite.edit_target else "")),
            ("resolution", f"{suite.image_size} px"), *_edit(suite),
            ("prompts", "; ".join(f"{k}: \"{PROMPTS.get(k, '?')}\"" for k in suite.prompts)),
            ("masks", suite.masks or "none (img2img)"),
            ("photos", _photos(suite)),
            ("budgets", f"{suite.norm} eps " + ", ".join(suite.eps)),
            ("attack steps", str(suite.attack_steps) if suite.attack_steps else "the attack's own default"),
            *_work(suite),
            ("attack seed", f"{suite.attack_seed} (batch b: seed + b)"),
            ("attack time limit", f"{suite.attack_timeout_s:g} s per cell group" if suite.attack_timeout_s
             else "none"),
            ("metrics", ", ".join(f"{m} ({LABELS.get(m, m)})" for m in suite.metrics)),
            ("purifiers", ", ".join(suite.purifiers) or "none")]
    rows += [("invisibility floor", invisibility_floor(suite) or "none defined"),
             ("benign-edit check", benign_check(suite) or "none defined")]
    return rows


def submission_spec(suite: Suite) -> list[str]:
    """What a complete entry of `suite` must hold: what `spdbench verify` and `submit` check."""
    grid = " × ".join([f"prompts {', '.join(suite.prompts)}", "splits train, test"])
    files = ", ".join(f"{r.folder + '/' if r.folder else ''}{'*' if r.folder else ''}{r.suffix}"
                      for r in RULES if r.in_entry)
    spec = [f"One run folder of one attack configuration (attack, preset, parameters) on suite {suite.name}, "
            f"written by `spdbench run --suite {suite.name}` (isolation sandbox or process; never none).",
            f"For each budget it reports (any of {', '.join(suite.eps)}, {suite.norm} unless the preset fixes "
            f"its own norm): one record per cell of {grid}, all finished, with the same photo lists per split.",
            "Every record holds the per-image values of the metrics " + ", ".join(suite.metrics)
            + (" and SSIM after each purifier " + ", ".join(suite.purifiers) if suite.purifiers else "")
            + "; the stated means are re-derived from them.",
            "One stored perturbation per budget (8-bit grid, within the budget) or, for an amortized attack, "
            "its trained network: verify re-edits a random sample of every cell and re-runs every budget group.",
            "The suite's seeds and edit settings as recorded (split, attack and edit seeds); nothing else "
            f"in the folder: allowed files are {files} ({MANIFEST} is written by `spdbench submit`).",
            "A universal or amortized entry may also be re-measured on the maintainer's private photos "
            "(`spdbench verify --holdout`); the board then shows that number beside the public one."]
    return spec


def card_text(suite: Suite) -> str:
    """The card and the spec as plain text (`spdbench list --suites`)."""
    width = max(len(label) for label, _ in protocol_card(suite))
    lines = [f"{suite.name}: {suite.description}"]
    lines += [f"  {label:<{width}}  {value}" for label, value in protocol_card(suite)]
    lines.append("  a complete entry:")
    lines += [f"    - {item}" for item in submission_spec(suite)]
    return "\n".join(lines)
