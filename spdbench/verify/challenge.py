"""Outside evaluations (RobustBench's external evaluations): a stronger purifier run against an
entry's *stored* protections, filed as a challenge folder anyone can check, that can only lower
the entry on the board.

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
from typing import Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from spdbench.errors import InputError, RecordError
from spdbench.harness.editing import EditSettings, Editor
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
#: the prefix of a challenge's block among a record's purifiers on the board ("challenge:<name>")
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
    #: per image: sha256 of the 8-bit purified protected photo (the PNG in purified/)
    purified_sha256: list[str]


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
    purifier: dict
    editor_fingerprint: str
    device: str
    cells: list[ChallengeCell]
    provenance: dict = {}

    @property
    def block(self) -> str:
        return f"{BLOCK_PREFIX}{self.name}"


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
    if suite.masks:
        raise InputError(f"entry {folder.name}: suite {suite.name!r} is an inpainting suite; challenges cover "
                         "img2img suites only so far")
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
    the fingerprint the records claim; `model`: one the caller loaded already (checked the same way)."""
    rec = e.claims.cells[0].record
    name = e.suite.edit_target or e.suite.target
    claimed = (rec.edit_target or rec.target).fingerprint
    if model is None:
        model = load_target(name, device=device or torch.device(rec.target.device).type, dtype=rec.target.dtype)
    if model.fingerprint != claimed:
        raise RecordError(f"editing model {name!r} has fingerprint {model.fingerprint}, the entry's records claim "
                          f"{claimed}")
    return model


def _purifier(name: str):
    """The registered purifier `name`; one that runs with a model of its own is not supported here."""
    p = get_purifier(name)
    if p.model is not None:
        raise InputError(f"--purifier {name!r} runs with its own model {p.model!r}; challenges run purifiers with "
                         "the entry's editing model only so far")
    return p


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


def _edits(editor: Editor, images: torch.Tensor, rec, positions: Sequence[int]) -> torch.Tensor:
    """The record's edit (its prompt, each photo's seed) of `images` (the photos at `positions`
    of the record's split)."""
    seeds = [rec.edit_seeds[k] for k in positions]
    return editor.edit(images, rec.prompt, seeds).float().cpu()


def measure_cell(editor: Editor, rec, purified: torch.Tensor, clean: torch.Tensor,
                 positions: Sequence[int], clean_edits: Optional[dict] = None) -> dict[str, list[float]]:
    """Every registered metric, per photo at `positions` of the cell: the edit of the purified
    protected photo against the edit of the clean photo (the entry's `purified` blocks' rule).
    `clean_edits`: a cache of clean edits by (prompt, split), shared by a challenge's budgets."""
    key = (rec.prompt, rec.split.value, tuple(positions))
    cache = {} if clean_edits is None else clean_edits
    if key not in cache:
        cache[key] = _edits(editor, clean, rec, positions)
    got = metrics.score(_edits(editor, purified, rec, positions), cache[key])
    return {m: [float(v) for v in vals.cpu()] for m, vals in got.items()}


def run_challenge(entry: Union[str, Path], purifier: str, out: Union[str, Path],
                  eps: Optional[Sequence[str]] = None, prompts: Optional[Sequence[str]] = None,
                  split: str = "test", device: Optional[str] = None, data=None, manifest=None,
                  model=None) -> Challenge:
    """Run `purifier` against the entry's stored protections and write the challenge folder `out`
    (new or empty; its name is the challenge's); returns what was written. Covers every budget (or `eps`) and prompt (or
    `prompts`) on `split`; the board joins it to the cells it covers. `model`: the editing model,
    when the caller has it loaded (its fingerprint must be the records')."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InputError(f"--out {str(out)!r} exists and is not an empty folder; expected a new folder")
    name = check_name(out.name)
    e = _load_entry(entry, data, manifest)
    p, cells = _purifier(purifier), _chosen_cells(e, eps, prompts, split)
    model = _editing_model(e, device, model)
    editor = Editor(model, EditSettings(**e.suite.edit.to_dict()), cache_dir=None,
                    batch_size=e.suite.attack_batch_size)
    pos = split_positions(len(e.images), e.suite.split_seed)[split]
    purified = {label: purify_budget(e, label, p, model) for label in sorted({c.record.eps_label for c in cells})}
    every, cache = list(range(len(pos))), {}
    measured = [ChallengeCell(
        cell_id=c.record.cell_id, eps_label=c.record.eps_label, prompt_key=c.record.prompt_key, split=split,
        image_names=list(c.record.image_names),
        values=measure_cell(editor, c.record, purified[c.record.eps_label][pos], e.images[pos], every, cache),
        purified_sha256=[image_sha256(purified[c.record.eps_label][i]) for i in pos]) for c in cells]
    challenge = Challenge(name=name, entry=e.folder.name, entry_manifest_sha256=e.manifest_sha256,
                          suite=e.suite.name, purifier=p.to_dict(), editor_fingerprint=model.fingerprint,
                          device=str(model.device), cells=measured, provenance=environment(model.device))
    _write(out, challenge, purified, pos, e.names)
    return challenge


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


def _write(out: Path, challenge: Challenge, purified: dict, pos: Sequence[int], names: Sequence[str]) -> None:
    for label, imgs in purified.items():
        for i in pos:
            atomic_write_bytes(out / png_rel(label, names[i]), _png_bytes(imgs[i]))
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
        raise RecordError(f"{path}: not a challenge ({'.'.join(map(str, first['loc']))}: {first['msg']})") from None
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
                     data=None, manifest=None, model=None) -> ChallengeReport:
    """Re-check a challenge like an entry (module docstring); on success write its verification.json.
    `entry`: the entry folder (default: ../../entries/<its entry> beside leaderboard/challenges/)."""
    folder = Path(folder)
    report = ChallengeReport(str(folder), secrets.randbits(63) if seed is None else seed)
    try:
        ch, raw = read_challenge(folder)
        stored = _stored_images(folder, ch)
        report.checks.append(f"files: challenge.json and {len(stored)} purified photo(s), each the hash it names")
        e = _load_entry(Path(entry) if entry else folder.parent.parent / "entries" / ch.entry, data, manifest)
        _check_settings(ch, e)
        model = _editing_model(e, device or torch.device(ch.device).type, model)  # its edits' device type
        _check_purified(ch, e, stored, model, report)
        _check_values(ch, e, stored, model, random.Random(report.seed), sample, tolerance, report)
    except (RecordError, InputError) as exc:
        report.problems.append(str(exc))
        return report
    verdict = dict(kind="spdbench-challenge-verification", challenge_sha256=hashlib.sha256(raw).hexdigest(),
                   seed=report.seed, sample=sample, tolerance=tolerance, checks=report.checks,
                   provenance=environment(model.device))
    atomic_write_bytes(folder / VERIFIED_FILE, (json.dumps(verdict, indent=1) + "\n").encode())
    return report


def _check_settings(ch: Challenge, e: _Entry) -> None:
    """The challenge names this entry (its manifest), its suite, and its purifier as registered here."""
    if ch.entry != e.folder.name or ch.suite != e.suite.name:
        raise RecordError(f"the challenge is of entry {ch.entry!r} on suite {ch.suite!r}, checked against "
                          f"{e.folder.name!r} on {e.suite.name!r}")
    if ch.entry_manifest_sha256 != e.manifest_sha256:
        raise RecordError(f"the challenge was run against other files of entry {ch.entry!r} (manifest sha256 differs)")
    here = _purifier(str(ch.purifier.get("name"))).to_dict()
    if json.dumps(here, sort_keys=True) != json.dumps(ch.purifier, sort_keys=True):
        raise RecordError(f"purifier {here['name']!r} is registered here as {here}, the challenge ran {ch.purifier}")
    records = {c.record.cell_id: c.record for c in e.claims.ok_cells}
    for cell in ch.cells:
        rec = records.get(cell.cell_id)
        if rec is None or rec.image_names != cell.image_names or rec.split.value != cell.split \
                or rec.eps_label != cell.eps_label:
            raise RecordError(f"cell {cell.cell_id}: not a cell of entry {ch.entry!r} with these photos")


def _check_purified(ch: Challenge, e: _Entry, stored: dict, model, report: ChallengeReport) -> None:
    """Every photo purified again: it must be the stored PNG up to float rounding at the 8-bit grid."""
    p = _purifier(str(ch.purifier["name"]))
    index = {n: i for i, n in enumerate(e.names)}
    for label in sorted({k[0] for k in stored}):
        again = purify_budget(e, label, p, model)
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
    editor = Editor(model, EditSettings(**e.suite.edit.to_dict()), cache_dir=None,
                    batch_size=e.suite.attack_batch_size)
    records = {c.record.cell_id: c.record for c in e.claims.ok_cells}
    index = {n: i for i, n in enumerate(e.names)}
    compared, cache = 0, {}
    for cell in ch.cells:
        picks = sorted(rng.sample(range(len(cell.image_names)), min(sample, len(cell.image_names))))
        purified = torch.stack([stored[(cell.eps_label, cell.image_names[k])] for k in picks])
        clean = torch.stack([e.images[index[cell.image_names[k]]] for k in picks])
        got = measure_cell(editor, records[cell.cell_id], purified, clean, picks, cache)
        for m, claimed in cell.values.items():
            for n, k in enumerate(picks):
                tol = tolerance * (100 if m == "psnr" else 1)
                if m not in got or not abs(claimed[k] - got[m][n]) <= tol:
                    raise RecordError(f"cell {cell.cell_id} photo {cell.image_names[k]}: {m} does not reproduce: "
                                      f"claimed {claimed[k]!r}, re-measured {got.get(m, [float('nan')] * (n + 1))[n]:.6g}")
                compared += 1
    report.checks.append(f"values: {sample} photo(s) of each of {len(ch.cells)} cell(s) edited again from the stored "
                         f"purified photos: {compared} values reproduced")


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
            _stored_images(d, ch)  # the photos are the ones it names (cheap: no model)
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
