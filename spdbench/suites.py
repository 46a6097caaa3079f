"""Named benchmark suites: which target, data, budgets, prompts, edit settings and iterations.

A suite is the rule book of a leaderboard column: every method run under it gets the same
photos, split, budgets, attack iterations and editing settings.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Optional, Union

import torch

from spdbench.data import photos as data
from spdbench.errors import InputError, RegistryError
from spdbench.registry import Registry
from spdbench.scoring.metrics import DEFAULT_METRICS, get_metric
from spdbench.targets import SD15_HUB_ID, SD15_INPAINT_HUB_ID
from spdbench.targets.instruct import IP2P_HUB_ID


@dataclass(frozen=True)
class EditSettings:
    """img2img settings; PhotoGuard's strength 0.5 / guidance 7.5 / 50 steps / seed 9222 by default.
    Here, in the protocol, because a suite names them; the editor (harness/editing.py) applies them."""

    strength: float = 0.5
    steps: int = 50
    guidance: float = 7.5
    seed: int = 9222
    eta: float = 0.0
    #: instruction editors (InstructPix2Pix) only: the image guidance scale; None for img2img and
    #: inpainting, and then left out of `to_dict`, so today's records and cache keys are unchanged
    image_guidance: Optional[float] = None

    def to_dict(self) -> dict:
        d = asdict(self)
        if self.image_guidance is None:
            del d["image_guidance"]
        return d


@dataclass(frozen=True)
class Floor:
    """The board's flags of a suite (report/flags.py): a row below a floor is flagged and listed
    apart, never ranked. Not a measurement setting (no value in a record depends on it), so it is
    left out of `Suite.to_dict` and records and cell ids are unchanged by it.

    - `psnr_db`, `ssim`: the invisibility floor, the mean imperceptibility (protected photo against
      the photo) a row must reach. On an L-inf suite the budget already bounds PSNR from below
      (20 log10(1/eps): 24.05 dB at 16/255), so the PSNR floor binds L2 budgets and larger eps;
      SSIM can fall far within an L-inf budget (a structured pattern), and is the floor that bites.
    - `benign_prompt`, `benign_ssim`: the benign-edit check. The benign edit is the suite's
      identity-like edit (the empty prompt P4: the editor re-renders the photo, asked for nothing);
      a row whose mean SSIM between that edit of the protected photo and of the photo falls below
      `benign_ssim` no longer leaves anything of the photo to an owner's harmless re-render -- it
      destroys rather than protects. None: the suite has no benign prompt (no check, said so).
    Values: below every committed honest entry (lowest measured: mean imperceptibility SSIM 0.692,
    smoke-spd-mist at 16/255; benign-edit SSIM 0.88) with room for stronger honest methods."""

    psnr_db: Optional[float] = None
    ssim: Optional[float] = None
    benign_prompt: Optional[str] = None
    benign_ssim: Optional[float] = None

    def to_dict(self) -> dict:
        return asdict(self)


#: the floor of the suites whose largest budget is 16/255 (L-inf)
FLOOR_16 = Floor(psnr_db=22.0, ssim=0.6, benign_prompt="P4", benign_ssim=0.3)


@dataclass(frozen=True)
class Suite:
    name: str
    target: str
    image_size: int
    eps: tuple[str, ...]
    prompts: tuple[str, ...]
    edit: EditSettings
    norm: str = "linf"
    data: str = "bundled"        # "bundled" | "folder" | "manifest"
    n_images: Optional[int] = None
    attack_steps: Optional[int] = None  # the iteration budget (the iteration-matched view, `match="steps"`)
    #: the model-work budget per photo, in encoder-equivalent passes (scoring/work.py: one VAE-encoder
    #: pass forward and backward = 1): under `match="work"` (the default where it is set) each attack's
    #: `steps` is derived from it (harness/work_match.py), so methods are compared at equal work, not
    #: equal iterations. None: iterations only. Left out of `to_dict` while None, and never part of a
    #: cell id (the steps it derives are), so records from before it are unchanged
    attack_work: Optional[float] = None
    attack_batch_size: int = 8
    split_seed: int = 0
    attack_seed: int = 0
    purifiers: tuple[str, ...] = ()  # optional robustness stage (spdbench.purifiers registry)
    #: transfer: the model that edits (and purifies), when it is not the one the attack sees
    #: (black box: protect against `target`, edit with `edit_target`); None = `target` (white box)
    edit_target: Optional[str] = None
    #: wall-clock limit for one cell group's attack (both splits, or the universal fit); the
    #: worker is stopped past it and the group is recorded as an error
    attack_timeout_s: Optional[float] = 3600.0
    #: inpainting suites: the mask set every photo is edited with (spdbench.data.masks.MASK_SETS:
    #: "centre-box", "strokes"; 1 = repaint); None for img2img. `run(masks=DIR)` replaces it with
    #: the user's PNGs. The target (or edit_target) must then be an inpainting model.
    masks: Optional[str] = None
    description: str = ""
    #: the metrics every record of the suite must hold (the claims check); the harness scores every
    #: registered metric, so an entry may hold more. Left out of `to_dict` while it is the default
    #: four, so records and cell ids of today's suites are unchanged
    metrics: tuple[str, ...] = DEFAULT_METRICS
    #: draws per image of every randomized purifier (one with a seed setting); the worst draw counts
    #: toward the worst case. Left out of `to_dict` while 1, so today's records and cell ids are unchanged
    purifier_draws: int = 1
    #: instruction suites on an offline editor trained on exact transforms: score each edit against
    #: the instruction's exact result too (scoring/ground_truth.py; spdbench.data.instructions).
    #: Left out of `to_dict` while False, so today's records and cell ids are unchanged
    ground_truth: bool = False
    #: the board's invisibility floor and benign-edit check (Floor, report/flags.py); the default
    #: checks nothing. Never in `to_dict`: records and cell ids are unchanged by it
    floor: Floor = Floor()

    @property
    def task(self) -> str:
        """The leaderboard's task group: "inpaint" when the suite edits with masks, "instruct" when its
        editor follows instructions (an image guidance scale), else "img2img": different games,
        never ranked in one table."""
        return "inpaint" if self.masks else "instruct" if self.edit.image_guidance is not None else "img2img"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["edit"] = self.edit.to_dict() if hasattr(self.edit, "to_dict") else asdict(self.edit)
        if self.attack_work is None:
            del d["attack_work"]
        del d["floor"]  # a board rule, not a measurement setting: records and cell ids stay as they were
        if tuple(self.metrics) == DEFAULT_METRICS:
            del d["metrics"]
        else:
            d["metrics"] = list(self.metrics)
        if self.purifier_draws == 1:
            del d["purifier_draws"]
        if not self.ground_truth:
            del d["ground_truth"]
        return d

    def load_images(self, data_path: Union[str, Path, None] = None,
                    manifest: Union[str, Path, None] = None) -> tuple[torch.Tensor, list[str]]:
        """The suite's photos and their names (bundled, an image folder, or a manifest + root)."""
        if manifest is not None:
            if data_path is None:
                raise InputError("a manifest needs --data pointing at the folder that holds its images")
            return data.load_manifest(manifest, data_path, size=self.image_size)
        if data_path is not None:
            images, names = data.load_folder(data_path, size=self.image_size)
        elif self.data == "bundled":
            names = list(data.BUNDLED_NAMES)
            images = data.load_photos(size=self.image_size, names=names)
        else:
            raise InputError(
                f"suite {self.name!r} needs its protocol images: pass --manifest FILE --data DIR "
                "(e.g. the 100 ImageNet images of the SPD protocol) or --data DIR"
            )
        if self.n_images is not None:
            images, names = images[: self.n_images], names[: self.n_images]
        return images, names


#: the tiny suites' purifier ladder: the cheap counter-measures a person who edits a photo would
#: try (GrIDPure and impress-ssim cost ~1 min per 11 photos each on 2 cores, more than the rest of a
#: smoke run's scoring together; pass them with --purifiers, docs/threat-model.md)
LADDER = ("jpeg70", "jpeg75", "jpeg90", "resize0.5", "blur1", "tv0.05", "diffpure0.2")

def _check_suite(name: str, obj: object) -> None:
    if not isinstance(obj, Suite):
        raise RegistryError(f"a suite registration needs a spdbench Suite, got {obj!r}")
    if obj.name != name:
        raise RegistryError(f"suite {obj.name!r} must be registered under its own name, not {name!r}")


def _suite_from_entry_point(name: str, obj: object, where: str) -> Suite:
    """An entry point of `spdbench.suites` names one Suite whose `name` is the entry-point name."""
    _check_suite(name, obj)
    return obj


#: every suite: the built-ins below and plugins (entry-point group `spdbench.suites`)
SUITES: Registry[Suite] = Registry("suite", check=_check_suite, from_entry_point=_suite_from_entry_point)
_BUILT_INS = (
    Suite(
        name="smoke", target="tiny", image_size=128, eps=("8/255", "16/255"), prompts=("P3", "P4"),
        edit=EditSettings(strength=0.5, steps=20, guidance=7.5, seed=9222),
        attack_steps=40, attack_work=40.0, attack_batch_size=11, purifiers=LADDER,
        floor=FLOOR_16,
        description="offline trained tiny target, 11 bundled photos at 128 px (7 train / 4 test), CPU minutes",
    ),
    Suite(
        name="smoke-transfer", target="tiny", edit_target="tiny-b", image_size=128, eps=("8/255", "16/255"),
        prompts=("P3", "P4"), edit=EditSettings(strength=0.5, steps=20, guidance=7.5, seed=9222),
        attack_steps=40, attack_work=40.0, attack_batch_size=11, purifiers=LADDER,
        floor=FLOOR_16,
        description="smoke, but crafted on tiny and edited with tiny-b (trained apart: other seed, other "
                    "half of the photos): black-box protection beside white box",
    ),
    Suite(
        name="smoke-inpaint", target="tiny-inpaint", image_size=128, eps=("8/255", "16/255"), prompts=("P3", "P4"),
        edit=EditSettings(strength=1.0, steps=20, guidance=7.5, seed=9222), masks="centre-box",
        attack_steps=40, attack_work=40.0, attack_batch_size=11, purifiers=("jpeg75", "resize0.5", "blur1"),
        floor=FLOOR_16,
        description="inpainting on the offline tiny-inpaint target: 11 bundled photos at 128 px, the centre box "
                    "repainted from noise (strength 1), scored on the whole image and on the box, CPU minutes",
    ),
    Suite(
        name="smoke-inpaint-subject", target="tiny-inpaint", image_size=128, eps=("8/255", "16/255"),
        prompts=("P3", "P4"), edit=EditSettings(strength=1.0, steps=20, guidance=7.5, seed=9222), masks="subject",
        attack_steps=40, attack_work=40.0, attack_batch_size=11, purifiers=("jpeg75", "resize0.5", "blur1"),
        floor=FLOOR_16,
        description="smoke-inpaint in PhotoGuard's setting: each photo's subject kept (hand-drawn masks), its "
                    "surroundings repainted from noise, CPU minutes",
    ),
    Suite(
        name="smoke-instruct", target="tiny-ip2p", image_size=128, eps=("8/255", "16/255"),
        prompts=("I1", "I2"),  # "make it black and white", "invert the colors" (harness/editing.PROMPTS)
        edit=EditSettings(strength=1.0, steps=20, guidance=7.5, seed=9222, image_guidance=1.5),
        attack_steps=40, attack_work=40.0, attack_batch_size=11, purifiers=("jpeg75", "resize0.5", "blur1"),
        floor=Floor(psnr_db=22.0, ssim=0.6),  # no empty prompt among its instructions: no benign-edit check
        ground_truth=True,  # tiny-ip2p learnt exact transforms: edit success against them (offline only)
        description="instruction editing (InstructPix2Pix's architecture) on the offline tiny-ip2p target: 11 "
                    "bundled photos at 128 px, instructions as prompts, text guidance 7.5 and image guidance 1.5 "
                    "(strength 1: the pipeline starts from noise), CPU minutes",
    ),
    Suite(
        name="sd15-quick", target=SD15_HUB_ID, image_size=512, eps=("16/255",),
        prompts=("P1", "P2", "P3", "P4"), edit=EditSettings(strength=0.5, steps=50, guidance=7.5, seed=9222),
        n_images=8, attack_steps=100, attack_work=100.0, attack_batch_size=4, attack_timeout_s=4 * 3600.0,
        floor=FLOOR_16,
        description="Stable Diffusion 1.5, 8 bundled photos at 512 px, one GPU, minutes",
    ),
    Suite(
        name="sd15-spd", target=SD15_HUB_ID, image_size=512,
        eps=("4/255", "13/255", "22/255", "31/255", "40/255"), prompts=("P1", "P2", "P3", "P4"),
        edit=EditSettings(strength=0.5, steps=50, guidance=7.5, seed=9222), data="manifest",
        attack_steps=500, attack_work=500.0, attack_batch_size=4, attack_timeout_s=48 * 3600.0,
        # eps up to 40/255: a full L-inf budget is 16.1 dB, so the floors sit lower
        floor=Floor(psnr_db=14.0, ssim=0.3, benign_prompt="P4", benign_ssim=0.2),
        description="the SPD protocol: SD1.5, 100 ImageNet images at 512 px split 64:36, eps 4..40/255, 500 iters",
    ),
    Suite(
        name="sd15-inpaint", target=SD15_INPAINT_HUB_ID, image_size=512, eps=("8/255", "16/255"),
        prompts=("P3", "P4"), edit=EditSettings(strength=1.0, steps=50, guidance=7.5, seed=9222, eta=1.0),
        masks="centre-box", n_images=8, attack_steps=100, attack_work=100.0, attack_batch_size=2, purifiers=("jpeg75", "blur1"),
        attack_timeout_s=4 * 3600.0,
        floor=FLOOR_16,
        description="Stable Diffusion 1.5 inpainting, 8 bundled photos at 512 px with the centre box repainted "
                    "(guidance 7.5, eta 1, seed 9222 as in PhotoGuard's inpainting demo; 50 steps), one GPU",
    ),
    Suite(
        name="sd15-instruct", target=IP2P_HUB_ID, image_size=512, eps=("8/255", "16/255"),
        prompts=("I1", "I2", "I3", "I4"),  # instructions (harness/editing.PROMPTS)
        edit=EditSettings(strength=1.0, steps=50, guidance=7.5, seed=9222, image_guidance=1.5),
        n_images=8, attack_steps=100, attack_work=100.0, attack_batch_size=4, purifiers=("jpeg75", "blur1"),
        attack_timeout_s=4 * 3600.0,
        floor=Floor(psnr_db=22.0, ssim=0.6),  # no empty prompt among its instructions: no benign-edit check
        description="InstructPix2Pix (timbrooks/instruct-pix2pix), 8 bundled photos at 512 px, instructions as "
                    "prompts, text guidance 7.5 and image guidance 1.5 (the pipeline's defaults), 50 steps, one GPU; "
                    "no ground-truth edit success (offline suites only)",
    ),
)
for _suite in _BUILT_INS:
    SUITES.add(_suite.name, _suite)


def get_suite(name: Union[str, Suite], **overrides) -> Suite:
    """A registered suite by name (UnknownNameError with close matches otherwise), or a Suite as
    given; `overrides` replace fields. Its required metrics must be registered."""
    if isinstance(name, Suite):
        suite = name
    elif isinstance(name, str):
        suite = SUITES.get(name)
    else:
        raise InputError(f"suite must be a suite name ({', '.join(SUITES)}) or a Suite, got "
                         f"{type(name).__name__} {name!r:.60}")
    suite = replace(suite, **overrides) if overrides else suite
    for m in suite.metrics:
        get_metric(m)  # an unknown metric name: UnknownNameError with close matches
    return suite
