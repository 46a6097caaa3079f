"""Outside evaluations (RobustBench's external evaluations): a stronger purifier run against an
entry's *stored* protections, filed as a challenge folder anyone can check, that can only lower
the entry on the board; or the model-side adaptive attacker (harness/adaptive.py: the editor
LoRA-fine-tuned on the entry's protected train photos), shown beside it as its own column.

A challenge folder (`leaderboard/challenges/<name>/`) holds
- `challenge.json`: its settings (the purifier's name and settings, the entry, the editing model's
  fingerprint), and per cell of the entry it covers the per-image values of the edit of the purified
  protected photo against the edit of the clean photo (same prompt, settings and seed as the entry),
  and the sha256 of each purified photo;
- `purified/<eps>__<photo>.png`: the purified protected photos themselves (8-bit, what was edited:
  a purifier's output is a photo, so it is quantized to the 8-bit grid before the edit);
- `verification.json`, written by `verify_challenge` once the challenge reproduces: the sha256 of
  the challenge.json it verified and the seed of its draw. The board applies only such challenges.

`verify_challenge` re-checks it like an entry: the PNGs are the hashes the JSON names, every photo
is purified again (it must give the stored PNG, up to one 8-bit level on 0.1% of the values), and a
random sample of each cell's photos is edited again from the PNGs: the values must match. The first
problem refuses the challenge with one line.

An adaptive challenge (`challenge_kind` "adaptive", `spdbench challenge ENTRY --adaptive lora`)
holds instead of purified photos the LoRA patch of each budget, `lora/<eps>.safetensors` (never
pickle), its sha256, every setting it was trained with and the train photos it saw; its values
are the patched editor's edit of the stored protected photo against the original editor's edit of
the clean photo (and, beside them, against the patched editor's own: `adapted_values` says why
the first is the board's). Verification: the
weights are the hashes the JSON names, a random sample of each cell's photos edited again with the
STORED weights gives the values, and the patch trained again from scratch (seeded) gives the stored
weights up to `WEIGHT_RTOL` (`_check_retrained`).
"""
from __future__ import annotations

import hashlib
import io
import json
import random
import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from spdbench.errors import InputError, RecordError
from spdbench.harness.adaptive import LoraPatch, editor_kind, load_patch, lora_weights, patch_editor, ran_with
from spdbench.harness.editing import EditSettings, Editor
from spdbench.harness.progress import Stages, default_stages
from spdbench.harness.request import model_identity, suite_masks
from spdbench.images import image_sha256
from spdbench.purifiers import get_purifier
from spdbench.scoring import metrics
from spdbench.store.perturbations import apply_delta
from spdbench.store.provenance import environment
from spdbench.store.records import atomic_write_bytes
from spdbench.targets import load_target
from spdbench.verify import claims as claims_mod
from spdbench.verify import entry as entry_schema
from spdbench.verify.remeasure import reproduces, split_positions

KIND = "spdbench-challenge"
CHALLENGE_FILE = "challenge.json"
VERIFIED_FILE = "verification.json"
PURIFIED_DIR = "purified"
LORA_DIR = "lora"
#: a stored LoRA patch larger than this is refused unread (SD1.5 at rank 64 is ~100 MB)
MAX_WEIGHTS_BYTES = 512 * 2**20
#: how far the re-trained patch may be from the stored one: max |stored - again| <= WEIGHT_RTOL *
#: max |stored| per file. Why this size: on one machine, device type and thread count the seeded
#: fine-tune is bitwise repeatable (measured on smoke, 60 steps: difference 0.0); another thread
#: count sums in another order, and Adam carries that forward (measured: 1 against 2 CPU threads,
#: 60 steps: 3.7e-5), so equality would refuse honest challenges from another machine; a patch
#: trained with another seed differs by the order of the weights themselves (measured: seed 0
#: against seed 1, 2 or 60 steps: 1.9), so 1e-3 still refuses any other patch. Time: the default 60
#: steps train in ~35 s per budget on smoke on one CPU thread of this (shared) machine.
WEIGHT_RTOL = 1e-3
#: the prefix of a challenge's block among a record's purifiers on the board ("challenge:<purifier>")
BLOCK_PREFIX = "challenge:"
DEFAULT_TOLERANCE = 2e-3
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,79}$")


class ChallengeCell(BaseModel):
    """One cell of the entry, challenged: its photos' values after the challenge's purifier."""

    model_config = ConfigDict(extra="forbid")
    cell_id: str
    eps_label: str
    prompt_key: str
    split: str
    image_names: list[str]
    #: metric -> per image: edit(purified protected photo) against edit(clean photo)
    values: dict[str, list[float]]
    #: per image: sha256 of the 8-bit purified protected photo (the PNG in purified/); purifier
    #: challenges only (an adaptive challenge edits the entry's stored protected photos)
    purified_sha256: list[str] = []
    #: adaptive challenges: the same edits against the PATCHED editor's edit of the clean photo
    #: (`adapted_values` says why `values` is against the original editor's)
    values_same_editor: dict[str, list[float]] = {}


class LoraWeights(BaseModel):
    """One budget's LoRA patch of an adaptive challenge: its file, hash and what it was trained on."""

    model_config = ConfigDict(extra="forbid")
    eps_label: str
    file: str
    sha256: str
    #: the entry's train photos whose (clean, stored protected) pairs it was trained on, in order
    train_images: list[str]
    prompt_keys: list[str]
    #: the training loss per step
    losses: list[float]


class Challenge(BaseModel):
    """challenge.json: what was run against which entry, and what it measured."""

    model_config = ConfigDict(extra="forbid")
    kind: str = Field(KIND, pattern=f"^{KIND}$")
    schema_version: int = 1
    name: str
    entry: str
    #: sha256 of the entry's manifest.json: the challenge is of these exact files (None: a run folder)
    entry_manifest_sha256: Optional[str] = None
    suite: str
    #: what was run: a purifier (challenge files from before this field are purifier challenges) or
    #: the model-side adaptive attacker (`kind` is taken: it names the file type)
    challenge_kind: Literal["purifier", "adaptive"] = "purifier"
    purifier: Optional[dict] = None
    #: a purifier that runs with a model of its own (a mismatched editor): that model, as loaded
    #: ({"name", "source", "fingerprint"}); None for every other purifier (and all older challenges)
    purifier_model: Optional[dict] = None
    #: adaptive challenges: every setting the patch was trained with (harness/adaptive.ran_with)
    adaptive: Optional[dict] = None
    patches: list[LoraWeights] = []
    editor_fingerprint: str
    device: str
    cells: list[ChallengeCell]
    provenance: dict = {}

    @model_validator(mode="after")
    def _one_kind(self) -> "Challenge":
        purifier = self.challenge_kind == "purifier"
        if purifier and (self.purifier is None or self.adaptive is not None or self.patches):
            raise ValueError("a purifier challenge names its purifier and holds no adaptive settings or patches")
        if not purifier and (self.purifier is not None or self.adaptive is None or not self.patches):
            raise ValueError("an adaptive challenge holds its settings and patches and names no purifier")
        for cell in self.cells:
            n = len(cell.image_names)
            lists = [*cell.values.values(), *cell.values_same_editor.values()]
            if any(len(v) != n for v in lists) or len(cell.purified_sha256) != (n if purifier else 0) \
                    or (purifier and cell.values_same_editor):
                raise ValueError(f"cell {cell.cell_id}: per-image lists do not have one value per photo")
        return self

    @property
    def column(self) -> str:
        """What the board and the per-image export call this challenge's values: its purifier's
        name for a purifier challenge (one column per purifier, whoever filed it: the same purifier
        against many entries is one column, not one per challenge), its own name for an adaptive one."""
        if self.challenge_kind == "purifier" and self.purifier:
            return str(self.purifier.get("name"))
        return self.name

    @property
    def block(self) -> str:
        """Its block among a record's purifier blocks on the board: "challenge:<column>"."""
        return f"{BLOCK_PREFIX}{self.column}"


@dataclass
class _Entry:
    """An entry loaded for a challenge: its checked claims, suite, photos and stored perturbations."""

    folder: Path
    claims: claims_mod.Claims
    suite: object
    images: torch.Tensor
    names: list[str]
    deltas: dict
    manifest_sha256: Optional[str]
    #: an inpainting suite's mask of every photo, by name (1 = repaint); None on img2img suites
    masks: Optional[dict[str, torch.Tensor]] = None

    def masks_of(self, names: Sequence[str]) -> Optional[torch.Tensor]:
        """The (N, 1, H, W) masks of these photos, or None on an img2img suite."""
        return None if self.masks is None else torch.stack([self.masks[n] for n in names])


@dataclass
class ChallengeReport:
    """What a challenge verification checked, and the first reason to refuse it (if any)."""

    folder: str
    seed: int
    checks: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def mean_ssim(values: dict[str, list[float]]) -> float:
    """A cell's mean SSIM: where two challenges ran one purifier on one cell, the higher counts
    (the stronger purifier for it; the board and the export apply the same rule)."""
    ssim = values.get("ssim") or []
    return sum(ssim) / len(ssim) if ssim else float("-inf")


def is_challenge(folder: Union[str, Path]) -> bool:
    """A folder holding challenge.json (what `verify` checks as a challenge, not as an entry)."""
    return (Path(folder) / CHALLENGE_FILE).is_file()


def _load_entry(folder: Union[str, Path], data=None, manifest=None) -> _Entry:
    """The entry through the claims check, its suite's photos checked against the records, and its
    stored perturbations checked against the photos; RecordError with the first problem otherwise."""
    folder = Path(folder)
    entry = entry_schema.scan(folder)
    claims = claims_mod.check(entry, strict=entry.is_entry)
    if claims.problems:
        raise RecordError(f"entry {folder.name}: {claims.problems[0]}")
    suite = claims_mod.suite_of(claims.cells[0].record)
    images, names = suite.load_images(data, manifest)
    images = images.detach().float().cpu()
    problems = claims_mod.image_problems(claims, images, names, suite)
    deltas = claims_mod.check_perturbations(claims, entry, suite, images) if not problems else {}
    problems = problems or claims.problems
    if problems:
        raise RecordError(f"entry {folder.name}: {problems[0]}")
    man = folder / entry_schema.MANIFEST
    sha = hashlib.sha256(man.read_bytes()).hexdigest() if man.is_file() else None
    return _Entry(folder, claims, suite, images, names, deltas, sha)


def _editing_model(e: _Entry, device: Optional[str], model=None):
    """The model that edits the entry's photos (its suite's edit target on a transfer suite), with
    the fingerprint the records claim; `model`: one the caller loaded already (checked the same way).
    On an inpainting suite the suite's masks are loaded into the entry here (they need the model)."""
    rec = e.claims.cells[0].record
    name = e.suite.edit_target or e.suite.target
    claimed = (rec.edit_target or rec.target).fingerprint
    if model is None:
        model = load_target(name, device=device or torch.device(rec.target.device).type, dtype=rec.target.dtype)
    if model.fingerprint != claimed:
        raise RecordError(f"editing model {name!r} has fingerprint {model.fingerprint}, the entry's records claim "
                          f"{claimed}")
    masks, _ = suite_masks(e.suite, None, e.names, e.images, model)  # the mask set the records name (claims)
    e.masks = None if masks is None else {n: masks[i] for i, n in enumerate(e.names)}
    return model


def _purifier_model(p, model, claimed: Optional[dict] = None):
    """The model purifier `p` runs with: the editing model, or -- a mismatched editor -- its own,
    loaded through the one loading door on the editing model's device and dtype. `claimed`: what a
    challenge says it ran with; the model loaded here must have that fingerprint."""
    if p.model is None:
        if claimed is not None:
            raise RecordError(f"purifier {p.name!r} runs with the editing model, the challenge names model {claimed}")
        return model
    own = load_target(p.model, device=model.device, dtype=model.dtype)
    if claimed is not None and claimed.get("fingerprint") != own.fingerprint:
        raise RecordError(f"purifier {p.name!r}'s model {p.model!r} has fingerprint {own.fingerprint} here, the "
                          f"challenge ran with {claimed.get('fingerprint')}")
    return own


def _model_fields(p, purifier_model) -> dict:
    return {} if p.model is None else {"purifier_model": model_identity(purifier_model)}


def _chosen_cells(e: _Entry, eps: Optional[Sequence[str]], prompts: Optional[Sequence[str]], split: str) -> list:
    """The entry's cells a challenge covers: every budget (or `eps`) and prompt (or `prompts`), on `split`."""
    if split not in ("train", "test"):
        raise InputError(f"split {split!r}: expected train or test")
    for what, asked, have in (("--eps", eps, sorted(e.claims.groups())),
                              ("--prompts", prompts, sorted({c.record.prompt_key for c in e.claims.ok_cells}))):
        for value in asked or ():
            if value not in have:
                raise InputError(f"{what} {value!r}: entry {e.folder.name} has {', '.join(have)}")
    cells = [c for c in e.claims.ok_cells if c.record.split.value == split
             and (not eps or c.record.eps_label in eps) and (not prompts or c.record.prompt_key in prompts)]
    if not cells:
        raise InputError(f"entry {e.folder.name} has no {split} cells to challenge")
    return sorted(cells, key=lambda c: (c.record.eps, c.record.prompt_key))


def to_8bit(images: torch.Tensor) -> torch.Tensor:
    """A purifier's output as a photo: clamped and rounded to the 8-bit grid (float in [0, 1])."""
    return (images.detach().float().cpu().clamp(0, 1) * 255).round() / 255


def purify_budget(e: _Entry, eps: str, purifier, model) -> torch.Tensor:
    """Every photo of one budget: the stored protection applied, then the purifier, on the 8-bit grid."""
    adv = apply_delta(e.images, e.deltas[eps])
    return to_8bit(purifier(adv.to(model.device), model))


def _edits(editor: Editor, images: torch.Tensor, rec, positions: Sequence[int],
           masks: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The record's edit (its prompt, each photo's seed, on an inpainting suite its mask) of
    `images` (the photos at `positions` of the record's split)."""
    seeds = [rec.edit_seeds[k] for k in positions]
    return editor.edit(images, rec.prompt, seeds, masks).float().cpu()


def measure_cell(editor: Editor, rec, purified: torch.Tensor, clean: torch.Tensor,
                 positions: Sequence[int], clean_edits: Optional[dict] = None,
                 masks: Optional[torch.Tensor] = None) -> dict[str, list[float]]:
    """Every registered metric, per photo at `positions` of the cell: the edit of the purified
    protected photo against the edit of the clean photo (the entry's `purified` blocks' rule:
    the whole image, on an inpainting suite too). `clean_edits`: a cache of clean edits by
    (prompt, split), shared by a challenge's budgets; `masks`: those photos' masks (inpainting)."""
    key = (rec.prompt, rec.split.value, tuple(positions))
    cache = {} if clean_edits is None else clean_edits
    if key not in cache:
        cache[key] = _edits(editor, clean, rec, positions, masks)
    got = metrics.score(_edits(editor, purified, rec, positions, masks), cache[key])
    return {m: [float(v) for v in vals.cpu()] for m, vals in got.items()}


def run_challenge(entry: Union[str, Path], purifier: str, out: Union[str, Path],
                  eps: Optional[Sequence[str]] = None, prompts: Optional[Sequence[str]] = None,
                  split: str = "test", device: Optional[str] = None, data=None, manifest=None,
                  model=None, stages: Optional[Stages] = None) -> Challenge:
    """Run `purifier` against the entry's stored protections and write the challenge folder `out`
    (new or empty; its name is the challenge's); returns what was written. Covers every budget (or `eps`) and prompt (or
    `prompts`) on `split`; the board joins it to the cells it covers. `model`: the editing model,
    when the caller has it loaded (its fingerprint must be the records')."""
    out, name = _new_folder(out)
    st = stages or default_stages("challenge")
    st.stage("loading", f"entry {Path(entry).name}, its photos and its editing model")
    e = _load_entry(entry, data, manifest)
    p, cells = get_purifier(purifier), _chosen_cells(e, eps, prompts, split)
    model = _editing_model(e, device, model)
    editor = _editor(e, model)
    pos = split_positions(len(e.images), e.suite.split_seed)[split]
    labels = sorted({c.record.eps_label for c in cells})
    own = _purifier_model(p, model)
    st.stage("purifying", f"{len(e.images)} protected photos with {purifier} at eps {', '.join(labels)}")
    purified = {label: purify_budget(e, label, p, own) for label in labels}
    st.stage("editing", f"the {split} photos of {len(cells)} cell(s), clean and purified")
    every, cache = list(range(len(pos))), {}
    measured = [ChallengeCell(
        cell_id=c.record.cell_id, eps_label=c.record.eps_label, prompt_key=c.record.prompt_key, split=split,
        image_names=list(c.record.image_names),
        values=measure_cell(editor, c.record, purified[c.record.eps_label][pos], e.images[pos], every, cache,
                            e.masks_of([e.names[i] for i in pos])),
        purified_sha256=[image_sha256(purified[c.record.eps_label][i]) for i in pos]) for c in cells]
    challenge = Challenge(**_identity(name, e, model), purifier=p.to_dict(), cells=measured, **_model_fields(p, own))
    st.stage("writing", str(out))
    _write(out, challenge, {png_rel(label, e.names[i]): _png_bytes(imgs[i])
                            for label, imgs in purified.items() for i in pos})
    st.done()
    return challenge


def _new_folder(out: Union[str, Path]) -> tuple[Path, str]:
    """The challenge folder to write (new or empty) and the challenge's name (the folder's)."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InputError(f"--out {str(out)!r} exists and is not an empty folder; expected a new folder")
    return out, check_name(out.name)


def _editor(e: _Entry, model) -> Editor:
    """The entry's suite's editor over `model` (the original editing model or its patched copy)."""
    return Editor(model, EditSettings(**e.suite.edit.to_dict()), cache_dir=None, batch_size=e.suite.attack_batch_size)


# --- the model-side adaptive attacker as a challenge (harness/adaptive.py) -----------------------
def run_adaptive_challenge(entry: Union[str, Path], out: Union[str, Path], settings: LoraPatch = LoraPatch(),
                           eps: Optional[Sequence[str]] = None, device: Optional[str] = None, data=None,
                           manifest=None, model=None, stages: Optional[Stages] = None) -> Challenge:
    """LoRA-patch the entry's editor per budget on the TRAIN split's (clean, stored protected) photos,
    edit every TEST photo with the patched editor, and write the challenge folder `out`:
    challenge.json (kind "adaptive", values as `adapted_values` says) and the patches as
    safetensors. Covers every budget (or `eps`) and every prompt of it (the patch is trained on them all)."""
    out, name = _new_folder(out)
    st = stages or default_stages("challenge")
    st.stage("loading", f"entry {Path(entry).name}, its photos and its editing model")
    e = _load_entry(entry, data, manifest)
    cells = _chosen_cells(e, eps, None, "test")
    model = _editing_model(e, device, model)
    original, original_cache = _editor(e, model), {}
    patches, files, measured = [], {}, []
    for label in dict.fromkeys(c.record.eps_label for c in cells):  # cells are sorted by eps
        st.stage("fitting", f"the LoRA patch at eps {label} ({settings.steps} steps on the train photos), then "
                 "editing the test photos with it")
        patch, blob, done = _adaptive_budget(e, [c for c in cells if c.record.eps_label == label], settings,
                                             model, original, original_cache)
        patches.append(patch)
        files[patch.file] = blob
        measured += done
    challenge = Challenge(**_identity(name, e, model), challenge_kind="adaptive",
                          adaptive=ran_with(settings, e.suite.edit.strength, editor_kind(model)), patches=patches,
                          cells=measured)
    st.stage("writing", str(out))
    _write(out, challenge, files)
    st.done()
    return challenge


def _adaptive_budget(e: _Entry, cells: Sequence, settings: LoraPatch, model, original: Editor,
                     original_cache: dict) -> tuple[LoraWeights, bytes, list[ChallengeCell]]:
    """One budget of an adaptive challenge: its patch (as LoraWeights and safetensors bytes) and
    its cells measured with the patched editor."""
    label, keys = cells[0].record.eps_label, sorted({c.record.prompt_key for c in cells})
    pos = split_positions(len(e.images), e.suite.split_seed)
    patched, losses = train_patch(e, label, keys, settings, model)
    blob = save_safetensors(lora_weights(patched))
    patch = LoraWeights(eps_label=label, file=weights_rel(label), sha256=hashlib.sha256(blob).hexdigest(),
                        train_images=[e.names[i] for i in pos["train"]], prompt_keys=keys, losses=losses)
    editors = (_editor(e, patched), original)
    adv, caches, every = apply_delta(e.images, e.deltas[label]), ({}, original_cache), list(range(len(pos["test"])))
    masks = e.masks_of([e.names[i] for i in pos["test"]])
    done = []
    for c in cells:
        values, same = adapted_values(editors, c.record, adv[pos["test"]], e.images[pos["test"]], every, caches, masks)
        done.append(ChallengeCell(cell_id=c.record.cell_id, eps_label=label, prompt_key=c.record.prompt_key,
                                  split="test", image_names=list(c.record.image_names), values=values,
                                  values_same_editor=same))
    return patch, blob, done


def adapted_values(editors: tuple[Editor, Editor], rec, protected: torch.Tensor, clean: torch.Tensor,
                   positions: Sequence[int], caches: tuple[dict, dict],
                   masks: Optional[torch.Tensor] = None) -> tuple[dict, dict]:
    """Every registered metric per photo: the PATCHED editor's edit of the protected photo against
    (1) the ORIGINAL editor's edit of the clean photo -- `values`, the board's column: the edit the
    person would have got without any protection, as `spdbench adapt` scores it -- and (2) the
    patched editor's own edit of the clean photo -- `values_same_editor`: the fine-tune moves clean
    edits too, so (2) alone would hide what the attacker won back (measured on smoke-pca-minus
    16/255, 60 steps: (1) 0.9555, (2) 0.8967, the entry's own 0.8947). `editors`: (patched,
    original); `caches`: their clean edits by (prompt, split, positions); `masks`: the photos'
    masks on an inpainting suite (each edit uses its photo's)."""
    key = (rec.prompt, rec.split.value, tuple(positions))
    for editor, cache in zip(editors, caches):
        if key not in cache:
            cache[key] = _edits(editor, clean, rec, positions, masks)
    edited = _edits(editors[0], protected, rec, positions, masks)
    return tuple({m: [float(v) for v in vals.cpu()] for m, vals in metrics.score(edited, cache[key]).items()}
                 for cache in (caches[1], caches[0]))


def train_patch(e: _Entry, label: str, prompt_keys: Sequence[str], settings: LoraPatch, model):
    """The LoRA patch of one budget, trained on the train split's clean photos and their stored
    protections (harness/adaptive.patch_editor); (patched model, loss per step)."""
    train = split_positions(len(e.images), e.suite.split_seed)["train"]
    adv = apply_delta(e.images, e.deltas[label])
    return patch_editor(model, e.images[train].to(model.device), adv[train].to(model.device), prompt_keys,
                        e.suite.edit.strength, settings, e.masks_of([e.names[i] for i in train]))


def weights_rel(eps_label: str) -> str:
    """Where one budget's LoRA patch lives inside a challenge folder."""
    safe = "".join(ch if ch.isalnum() or ch in "._-" else "-" for ch in eps_label)[:80]
    return f"{LORA_DIR}/{safe}.safetensors"


def _stored_weights(folder: Path, ch: Challenge) -> dict[str, dict[str, torch.Tensor]]:
    """Every LoRA patch of an adaptive challenge by budget: at the path its budget gives, of at most
    MAX_WEIGHTS_BYTES, the hash challenge.json names, float32 safetensors (never pickle)."""
    out = {}
    for patch in ch.patches:
        if patch.file != weights_rel(patch.eps_label) or patch.eps_label in out:
            raise RecordError(f"patch {patch.file!r}: expected one patch per budget at {weights_rel(patch.eps_label)!r}")
        path = folder / patch.file
        if not path.is_file() or path.stat().st_size > MAX_WEIGHTS_BYTES:
            raise RecordError(f"{patch.file}: missing or larger than {MAX_WEIGHTS_BYTES} bytes")
        blob = path.read_bytes()
        if hashlib.sha256(blob).hexdigest() != patch.sha256:
            raise RecordError(f"{patch.file} is not the LoRA patch challenge.json names (sha256 differs)")
        try:
            weights = load_safetensors(blob)
        except (SafetensorError, ValueError) as exc:
            raise RecordError(f"{patch.file}: not a safetensors file ({exc})") from None
        if not weights or any(w.dtype != torch.float32 for w in weights.values()):
            raise RecordError(f"{patch.file}: expected float32 LoRA weights")
        out[patch.eps_label] = weights
    missing = sorted({c.eps_label for c in ch.cells} - set(out))
    if missing:
        raise RecordError(f"cells at eps {', '.join(missing)} have no LoRA patch")
    return out


def check_name(name: str) -> str:
    """A challenge name: letters, digits, '.', '_', '-' (it names a folder and a board column)."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise InputError(f"challenge name {name!r}: expected 1-80 letters, digits, '.', '_' or '-', starting with "
                         "a letter or digit")
    return name


def png_rel(eps_label: str, image_name: str) -> str:
    """Where one purified photo lives inside a challenge folder."""
    safe = "".join(ch if ch.isalnum() or ch in "._-" else "-" for ch in f"{eps_label}__{image_name}")[:120]
    return f"{PURIFIED_DIR}/{safe}.png"


def _png_bytes(image: torch.Tensor) -> bytes:
    arr = (image.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def read_png(path: Path) -> torch.Tensor:
    """A purified photo back as (3, H, W) float on the 8-bit grid; RecordError for anything else."""
    data = path.read_bytes() if path.is_file() else b""
    entry_schema.check_png(data, str(path))
    with Image.open(io.BytesIO(data)) as img:
        if img.mode != "RGB":
            raise RecordError(f"{path}: a purified photo must be an RGB PNG, got mode {img.mode}")
        arr = np.asarray(img, dtype=np.uint8).copy()
    return torch.from_numpy(arr).permute(2, 0, 1).float() / 255


def _identity(name: str, e: _Entry, model) -> dict:
    """What every challenge says of itself, whatever its kind: its name, the entry (and the manifest
    it was run against), the suite, the editing model and the machine."""
    return dict(name=name, entry=e.folder.name, entry_manifest_sha256=e.manifest_sha256, suite=e.suite.name,
                editor_fingerprint=model.fingerprint, device=str(model.device), provenance=environment(model.device))


def _write(out: Path, challenge: Challenge, files: dict[str, bytes]) -> None:
    """The challenge's own files (purified PNGs or LoRA patches, by path in the folder), then its
    challenge.json last: a folder without one is not a challenge."""
    for rel, blob in files.items():
        atomic_write_bytes(out / rel, blob)
    atomic_write_bytes(out / CHALLENGE_FILE, (challenge.model_dump_json(indent=1) + "\n").encode())


def read_challenge(folder: Union[str, Path]) -> tuple[Challenge, bytes]:
    """challenge.json parsed (untrusted: a bounded JSON depth, the schema, extra keys refused) and its bytes."""
    path = Path(folder) / CHALLENGE_FILE
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise RecordError(f"cannot read {path}: {exc.strerror or exc}") from None
    raw = entry_schema.load_json(data, str(path))
    try:
        ch = Challenge.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(map(str, first["loc"]))
        raise RecordError(f"{path}: not a challenge ({where + ': ' if where else ''}{first['msg']})") from None
    check_name(ch.name)
    return ch, data


def _stored_images(folder: Path, ch: Challenge) -> dict[tuple[str, str], torch.Tensor]:
    """Every purified photo of the challenge, each with the hash challenge.json names for it."""
    out: dict[tuple[str, str], torch.Tensor] = {}
    for cell in ch.cells:
        if len(cell.purified_sha256) != len(cell.image_names) or any(
                len(v) != len(cell.image_names) for v in cell.values.values()):
            raise RecordError(f"cell {cell.cell_id}: per-image lists do not have one value per photo")
        for name, sha in zip(cell.image_names, cell.purified_sha256):
            key = (cell.eps_label, name)
            if key not in out:
                out[key] = read_png(folder / png_rel(*key))
            if image_sha256(out[key]) != sha:
                raise RecordError(f"{png_rel(*key)} is not the purified photo challenge.json names (sha256 differs)")
    return out


def verify_challenge(folder: Union[str, Path], entry: Union[str, Path, None] = None, sample: int = 2,
                     tolerance: float = DEFAULT_TOLERANCE, seed: Optional[int] = None, device: Optional[str] = None,
                     data=None, manifest=None, model=None, stages: Optional[Stages] = None) -> ChallengeReport:
    """Re-check a challenge like an entry (module docstring); on success write its verification.json.
    `entry`: the entry folder (default: ../../entries/<its entry> beside leaderboard/challenges/)."""
    folder = Path(folder)
    report = ChallengeReport(str(folder), secrets.randbits(63) if seed is None else seed)
    st = stages or default_stages("verify")
    try:
        ch, raw = read_challenge(folder)
        stored = _stored_files(folder, ch, report)
        st.stage("loading", f"entry {ch.entry}, its photos and its editing model")
        e = _load_entry(Path(entry) if entry else folder.parent.parent / "entries" / ch.entry, data, manifest)
        model = _editing_model(e, device or torch.device(ch.device).type, model)  # its edits' device type
        _check_settings(ch, e, model)
        rng = random.Random(report.seed)
        if ch.challenge_kind == "adaptive":
            st.stage("editing", f"{sample} photo(s) of each of {len(ch.cells)} cell(s) again with the stored LoRA patches")
            _check_adaptive(ch, e, stored, model, rng, sample, tolerance, report)
            st.stage("fitting", f"{len(ch.patches)} LoRA patch(es) again from scratch")
            _check_retrained(ch, e, stored, _lora_settings(ch), model, report)
        else:
            st.stage("purifying", f"all {len(stored)} photo(s) again with {ch.purifier['name']}")
            _check_purified(ch, e, stored, model, report)
            st.stage("editing", f"{sample} photo(s) of each of {len(ch.cells)} cell(s) again from the stored photos")
            _check_values(ch, e, stored, model, rng, sample, tolerance, report)
        st.done()
    except (RecordError, InputError) as exc:
        report.problems.append(str(exc))
        return report
    verdict = dict(kind="spdbench-challenge-verification", challenge_sha256=hashlib.sha256(raw).hexdigest(),
                   seed=report.seed, sample=sample, tolerance=tolerance, checks=report.checks,
                   provenance=environment(model.device))
    atomic_write_bytes(folder / VERIFIED_FILE, (json.dumps(verdict, indent=1) + "\n").encode())
    return report


def _stored_files(folder: Path, ch: Challenge, report: Optional[ChallengeReport] = None) -> dict:
    """The challenge's own files, each the hash challenge.json names: purified photos by (eps, photo),
    or an adaptive challenge's LoRA patches by eps."""
    if ch.challenge_kind == "adaptive":
        stored = _stored_weights(folder, ch)
        what = f"{len(stored)} LoRA patch(es) (safetensors)"
    else:
        stored = _stored_images(folder, ch)
        what = f"{len(stored)} purified photo(s)"
    if report is not None:
        report.checks.append(f"files: challenge.json and {what}, each the hash it names")
    return stored


def _check_settings(ch: Challenge, e: _Entry, model) -> None:
    """The challenge names this entry (its manifest), its suite, and its purifier as registered here
    (or its LoRA settings as this version trains them on `model`, the editing model); its cells are
    the entry's."""
    if ch.entry != e.folder.name or ch.suite != e.suite.name:
        raise RecordError(f"the challenge is of entry {ch.entry!r} on suite {ch.suite!r}, checked against "
                          f"{e.folder.name!r} on {e.suite.name!r}")
    if ch.entry_manifest_sha256 != e.manifest_sha256:
        raise RecordError(f"the challenge was run against other files of entry {ch.entry!r} (manifest sha256 differs)")
    if ch.challenge_kind == "adaptive":
        _check_adaptive_settings(ch, e, model)
    else:
        here = get_purifier(str(ch.purifier.get("name"))).to_dict()
        if json.dumps(here, sort_keys=True) != json.dumps(ch.purifier, sort_keys=True):
            raise RecordError(f"purifier {here['name']!r} is registered here as {here}, the challenge ran {ch.purifier}")
    records = {c.record.cell_id: c.record for c in e.claims.ok_cells}
    for cell in ch.cells:
        rec = records.get(cell.cell_id)
        if rec is None or rec.image_names != cell.image_names or rec.split.value != cell.split \
                or rec.eps_label != cell.eps_label:
            raise RecordError(f"cell {cell.cell_id}: not a cell of entry {ch.entry!r} with these photos")


def _lora_settings(ch: Challenge) -> LoraPatch:
    try:
        return LoraPatch.from_dict((ch.adaptive or {}).get("settings") or {})
    except TypeError as exc:
        raise RecordError(f"adaptive settings: {exc}") from None


def _check_adaptive_settings(ch: Challenge, e: _Entry, model) -> None:
    """The settings are what this version trains with, every cell is a test cell, and each patch was
    trained on the entry's train photos with the prompts of the cells of its budget."""
    here = ran_with(_lora_settings(ch), e.suite.edit.strength, editor_kind(model))
    if json.dumps(here, sort_keys=True) != json.dumps(ch.adaptive, sort_keys=True):
        raise RecordError(f"the adaptive settings are {ch.adaptive}; this version trains with {here}")
    train = [e.names[i] for i in split_positions(len(e.images), e.suite.split_seed)["train"]]
    for patch in ch.patches:
        keys = sorted({c.prompt_key for c in ch.cells if c.eps_label == patch.eps_label})
        if patch.train_images != train or patch.prompt_keys != keys:
            raise RecordError(f"patch {patch.file}: trained on photos {patch.train_images[:3]} with prompts "
                              f"{patch.prompt_keys}; the entry's train photos are {train[:3]}, its cells' prompts {keys}")
    if any(c.split != "test" for c in ch.cells):
        raise RecordError("an adaptive challenge is measured on the test split (its patch saw the train split)")


def _check_adaptive(ch: Challenge, e: _Entry, weights: dict, model, rng: random.Random, sample: int,
                    tolerance: float, report: ChallengeReport) -> None:
    """Per budget: a sample of each cell's photos edited again with the STORED patch (values; the
    patch is then trained again from scratch by `_check_retrained`)."""
    settings, index, compared = _lora_settings(ch), {n: i for i, n in enumerate(e.names)}, 0
    original, original_cache = _editor(e, model), {}
    for patch in ch.patches:
        adv = apply_delta(e.images, e.deltas[patch.eps_label])
        editors = (_editor(e, load_patch(model, weights[patch.eps_label], settings)), original)
        cells = [c for c in ch.cells if c.eps_label == patch.eps_label]
        photos = {(c.eps_label, n): adv[index[n]] for c in cells for n in c.image_names}
        compared += _compare_adapted(cells, e, photos, editors, rng, sample, tolerance, original_cache)
    report.checks.append(f"values: {sample} photo(s) of each of {len(ch.cells)} cell(s) edited again with the stored "
                         f"LoRA patches: {compared} values reproduced")


def _check_retrained(ch: Challenge, e: _Entry, weights: dict, settings: LoraPatch, model,
                     report: ChallengeReport) -> None:
    """Each patch trained again from scratch with the recorded settings on the entry's photos: its
    weights must be the stored ones up to WEIGHT_RTOL of the largest stored weight (its comment says why)."""
    worst = 0.0
    for patch in ch.patches:
        again = lora_weights(train_patch(e, patch.eps_label, patch.prompt_keys, settings, model)[0])
        stored = weights[patch.eps_label]
        if set(again) != set(stored):
            raise RecordError(f"{patch.file}: its tensors are not those of a rank-{settings.rank} patch of this editor")
        scale = max(float(w.abs().max()) for w in stored.values()) or 1.0
        diff = max(float((stored[k] - again[k].to(stored[k].dtype)).abs().max()) for k in stored) / scale
        if not diff <= WEIGHT_RTOL:
            raise RecordError(f"{patch.file}: the patch trained again from scratch differs from the stored one (max "
                              f"difference {diff:.3g} of the largest weight, tolerance {WEIGHT_RTOL:g})")
        worst = max(worst, diff)
    report.checks.append(f"retrained: {len(ch.patches)} LoRA patch(es) trained again from scratch ({settings.steps} "
                         f"steps each): the stored weights up to {worst:.3g} of the largest (tolerance {WEIGHT_RTOL:g})")


def _check_purified(ch: Challenge, e: _Entry, stored: dict, model, report: ChallengeReport) -> None:
    """Every photo purified again: it must be the stored PNG up to float rounding at the 8-bit grid."""
    p = get_purifier(str(ch.purifier["name"]))
    if p.model is not None and ch.purifier_model is None:
        raise RecordError(f"purifier {p.name!r} runs with its own model {p.model!r}; the challenge does not say which")
    own = _purifier_model(p, model, ch.purifier_model)
    index = {n: i for i, n in enumerate(e.names)}
    for label in sorted({k[0] for k in stored}):
        again = purify_budget(e, label, p, own)
        keys = [k for k in stored if k[0] == label]
        a = torch.stack([stored[k] for k in keys]).mul(255).round().to(torch.int16)
        b = torch.stack([again[index[k[1]]] for k in keys]).mul(255).round().to(torch.int16)
        ok, how = reproduces(a, b)
        if not ok:
            raise RecordError(f"eps {label}: purifying the entry's photos again does not give the stored purified "
                              f"photos ({how})")
    report.checks.append(f"purified: all {len(stored)} photo(s) purified again with {p.name!r}: the stored ones")


def _check_values(ch: Challenge, e: _Entry, stored: dict, model, rng: random.Random, sample: int,
                  tolerance: float, report: ChallengeReport) -> None:
    """`sample` random photos of every cell edited again from the stored PNGs: every value must match."""
    compared = _compare_values(ch.cells, e, stored, _editor(e, model), rng, sample, tolerance)
    report.checks.append(f"values: {sample} photo(s) of each of {len(ch.cells)} cell(s) edited again from the stored "
                         f"purified photos: {compared} values reproduced")


def _compare_values(cells: Sequence[ChallengeCell], e: _Entry, photos: dict, editor: Editor, rng: random.Random,
                    sample: int, tolerance: float) -> int:
    """`sample` random photos of each cell (`photos`: the edited photo by (eps, photo)) edited again
    with `editor`: every value must match; the number compared."""
    records, compared, cache = {c.record.cell_id: c.record for c in e.claims.ok_cells}, 0, {}
    for cell in cells:
        picks, edited, clean = _picked(cell, e, photos, rng, sample)
        got = measure_cell(editor, records[cell.cell_id], edited, clean, picks, cache,
                           e.masks_of([cell.image_names[k] for k in picks]))
        compared += _compare(cell, cell.values, got, picks, tolerance)
    return compared


def _compare_adapted(cells: Sequence[ChallengeCell], e: _Entry, photos: dict, editors: tuple[Editor, Editor],
                     rng: random.Random, sample: int, tolerance: float, original_cache: dict) -> int:
    """As `_compare_values` for an adaptive challenge's cells: both of its value blocks (`adapted_values`)."""
    records, compared, caches = {c.record.cell_id: c.record for c in e.claims.ok_cells}, 0, ({}, original_cache)
    for cell in cells:
        picks, edited, clean = _picked(cell, e, photos, rng, sample)
        masks = e.masks_of([cell.image_names[k] for k in picks])
        values, same = adapted_values(editors, records[cell.cell_id], edited, clean, picks, caches, masks)
        compared += _compare(cell, cell.values, values, picks, tolerance)
        compared += _compare(cell, cell.values_same_editor, same, picks, tolerance, "values_same_editor: ")
    return compared


def _picked(cell: ChallengeCell, e: _Entry, photos: dict, rng: random.Random, sample: int):
    """A random sample of the cell's photos: (positions, their edited photos, their clean photos)."""
    index = {n: i for i, n in enumerate(e.names)}
    picks = sorted(rng.sample(range(len(cell.image_names)), min(sample, len(cell.image_names))))
    edited = torch.stack([photos[(cell.eps_label, cell.image_names[k])] for k in picks])
    clean = torch.stack([e.images[index[cell.image_names[k]]] for k in picks])
    return picks, edited, clean


def _compare(cell: ChallengeCell, claimed: dict, got: dict, picks: Sequence[int], tolerance: float,
             block: str = "") -> int:
    """Every claimed value at `picks` against the re-measured one (PSNR to 100x the tolerance); the
    number compared; RecordError at the first that does not reproduce."""
    compared = 0
    for m, values in claimed.items():
        for n, k in enumerate(picks):
            tol = tolerance * (100 if m == "psnr" else 1)
            if m not in got or not abs(values[k] - got[m][n]) <= tol:
                raise RecordError(f"cell {cell.cell_id} photo {cell.image_names[k]}: {block}{m} does not reproduce: "
                                  f"claimed {values[k]!r}, re-measured {got.get(m, [float('nan')] * (n + 1))[n]:.6g}")
            compared += 1
    return compared


def read_verified(folder: Union[str, Path]) -> tuple[list[Challenge], list[tuple[str, str]]]:
    """The challenges under `folder` (leaderboard/challenges/) that were verified as they are now: a
    verification.json naming the sha256 of the challenge.json beside it, the folder named as the
    challenge, and every purified photo the hash it names. The others are returned as (name, reason):
    listed on the board, never applied."""
    root = Path(folder)
    if not root.is_dir():
        return [], []
    found, left = [], []
    for d in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        try:
            ch, raw = read_challenge(d)
            if ch.name != d.name:
                raise RecordError(f"challenge.json names challenge {ch.name!r}, its folder is {d.name!r}")
            _stored_files(d, ch)  # its photos or patches are the ones it names (cheap: no model)
            verdict = entry_schema.load_json((d / VERIFIED_FILE).read_bytes(), str(d / VERIFIED_FILE)) \
                if (d / VERIFIED_FILE).is_file() else {}
        except RecordError as exc:
            left.append((d.name, str(exc)))
            continue
        if not isinstance(verdict, dict) or verdict.get("challenge_sha256") != hashlib.sha256(raw).hexdigest():
            left.append((d.name, "not verified as it is (no verification.json for this challenge.json): "
                                 f"run `spdbench verify {d}`"))
            continue
        found.append(ch)
    return found, left
