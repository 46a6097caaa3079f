"""What the board's suites are, in plain words read from their definitions (suites.py): the model,
the resolution, how many photos each ranked number is over.

Why: the board never said its numbers come from a 128 px offline model with 4 test photos per
cell; a reader took them for Stable Diffusion numbers. Read from the definitions, never typed in,
so a changed suite changes its sentence.
"""
from __future__ import annotations

from typing import Iterable, Optional

from spdbench.data.photos import BUNDLED_NAMES, TRAIN_FRACTION, split_indices
from spdbench.errors import SpdbenchError
from spdbench.report.text import md_escape
from spdbench.suites import Suite, get_suite
from spdbench.targets import TARGETS


def _model(name: str) -> str:
    """A model as a reader needs it: a registered name ships with spdbench (small, offline, not Stable
    Diffusion); anything else is a hub id or a folder."""
    if name in TARGETS:
        return f"`{md_escape(name)}` (a small offline model that ships with spdbench, not Stable Diffusion)"
    return f"`{md_escape(name)}` (hub id or model folder)"


def _photos(suite: Suite) -> str:
    """How many photos, split how, and so how many each ranked (test-split) number is a mean over."""
    if suite.data != "bundled" and not suite.n_images:
        return f"the photos of your --manifest/--data, {round(TRAIN_FRACTION * 100)}% train by seed"
    n = suite.n_images or len(BUNDLED_NAMES)
    where = "bundled" if suite.data == "bundled" else "--manifest/--data"
    train, test = split_indices(n, suite.split_seed)
    return (f"{n} {where} photos split {len(train)} train / {len(test)} test: each ranked number is a mean "
            f"over {len(test)} test photos")


def suite_line(suite: Suite) -> str:
    """One suite in a sentence (Markdown)."""
    models = _model(suite.target) + (f", edited with {_model(suite.edit_target)}" if suite.edit_target else "")
    task = (f"inpainting ({suite.masks} masks)" if suite.masks
            else "instruction editing" if suite.task == "instruct" else "img2img")
    steps = (f"; attacks get the steps {suite.attack_work:g} encoder-equivalent passes per photo buy "
             f"({suite.attack_steps} at equal iterations)" if suite.attack_work is not None and suite.attack_steps
             else f"; attacks get {suite.attack_steps} steps" if suite.attack_steps else "")
    return (f"**{md_escape(suite.name)}**: {task} on model {models} at {suite.image_size} px; {_photos(suite)}; "
            f"{len(suite.prompts)} prompt{'s' if len(suite.prompts) != 1 else ''}; edits of {suite.edit.steps} steps{steps}.")


def suites_markdown(names: Iterable[str]) -> Optional[str]:
    """The "What the suites are" paragraph for the suites on a board (None when there are none)."""
    lines = []
    for name in sorted(set(names)):
        try:
            lines.append("- " + suite_line(get_suite(name)))
        except SpdbenchError:  # a plugin suite not installed here: say so, never guess
            lines.append(f"- **{md_escape(name)}**: not installed here (its definition is in the plugin that registers it).")
    if not lines:
        return None
    return "What the suites are (from their definitions in spdbench/suites.py):\n\n" + "\n".join(lines)
