"""A private hold-out: a universal or amortized entry re-measured on photos its author never had.

Why: a universal perturbation (or an amortized network) claims to generalise to unseen photos. The
bundled test photos are public, so an entry made on its author's machine may have seen them; only
photos that the leaderboard's maintainer keeps and never publishes can test that claim. The
maintainer runs `spdbench verify ENTRY --holdout DIR` (or `submit --holdout DIR`): the entry's
*stored* perturbation (universal: the one delta every stored photo carries) or its *stored*
network (amortized: applied in a worker, the network is attack code) protects each hold-out photo,
the harness's own `enforce` projects, clamps and quantizes it, and the suite's editor and scorer
measure it exactly as a run would (same prompts, settings, per-image seeds from each photo's bytes).
Nothing the author wrote is taken as a number: every value here is computed by this module.

The result is a plain JSON file (format `spdbench-holdout/1`) with per-image values; the board
reads it from `leaderboard/holdout/NAME.json` and shows the hold-out number beside the public one.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Union

import torch

from spdbench.budget import Budget
from spdbench.errors import InputError, RecordError
from spdbench.data.photos import load_folder
from spdbench.harness.editing import EditSettings, Editor, image_seed, resolve_prompt
from spdbench.harness.protect import enforce
from spdbench.scoring import metrics
from spdbench.store.records import atomic_write_bytes, method_label
from spdbench.verify import claims as claims_mod
from spdbench.verify import entry as entry_schema
from spdbench.harness.pipeline import AttackRunner
from spdbench.harness.plan import installed_attack
from spdbench.store.perturbations import load_delta
from spdbench.store.records import atomic_write_bytes
from spdbench.targets import load_target

FORMAT = "spdbench-holdout/1"
#: fewer hold-out photos than this give an interval too wide to rank on
MIN_PHOTOS = 4


@dataclass
class HoldoutCell:
    """One (eps, prompt) cell measured on the hold-out photos."""

    norm: str
    eps: float
    eps_label: str
    prompt_key: str
    prompt: str
    image_names: list[str]
    image_sha256: list[str]
    edit_seeds: list[int]
    protection: dict[str, list[float]]
    protection_mean: dict[str, float]


@dataclass
class HoldoutResult:
    """What `measure` found: per-cell per-image values, or the reasons it could not measure."""

    entry: str
    attack: str
    method: str
    suite: str
    kind: str
    holdout_sha256: str = ""
    n_photos: int = 0
    target_fingerprint: str = ""
    cells: list[HoldoutCell] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems and bool(self.cells)

    def to_json(self) -> str:
        data = {"format": FORMAT, **asdict(self)}
        data.pop("problems")
        return json.dumps(data, indent=1, sort_keys=True) + "\n"


def folder_digest(names: list[str], images: torch.Tensor) -> str:
    """One hash of the hold-out set as the harness loaded it (names and 8-bit pixels): which
    private set a number was measured on, without publishing the set."""
    h = hashlib.sha256()
    for name, img in zip(names, images):
        h.update(name.encode() + b"\0")
        h.update((img.clamp(0, 1) * 255).round().to(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def universal_delta(stored: torch.Tensor) -> torch.Tensor:
    """The one universal delta (1, 3, H, W) in 8-bit levels from the per-photo stored deltas.

    The harness quantized u once and stored, per photo, what was left of it after clamping x + u to
    [0, 1]; clamping only shrinks a value towards 0, so per pixel the stored value of largest
    magnitude over the photos is u itself (unless every photo clipped that pixel)."""
    idx = stored.abs().argmax(dim=0, keepdim=True)
    return torch.gather(stored, 0, idx)


def kind_of(rec) -> str:
    if rec.amortized:
        return "amortized"
    return "universal" if rec.universal else "per-image"


def entry_kind(folder: Union[str, Path]) -> str:
    """"per-image", "universal" or "amortized", from the entry's checked records."""
    _, checked = load_checked_entry(Path(folder))
    return kind_of(checked.cells[0].record)


def load_checked_entry(folder: Path):
    try:
        entry = entry_schema.scan(folder)
    except RecordError as exc:
        raise InputError(f"entry {str(folder)!r}: {exc}") from None
    checked = claims_mod.check(entry, None, strict=True)
    if checked.problems:
        raise InputError(f"entry {str(folder)!r} does not pass its claims check: {checked.problems[0]}")
    return entry, checked


def _holdout_photos(holdout: Path, size: int) -> tuple[torch.Tensor, list[str]]:
    if not holdout.is_dir():
        raise InputError(f"--holdout {str(holdout)!r} is not an existing folder (expected a folder of hold-out photos)")
    images, names = load_folder(holdout, size=size)
    if len(names) < MIN_PHOTOS:
        raise InputError(f"--holdout {str(holdout)!r} holds {len(names)} photo(s); expected at least {MIN_PHOTOS}")
    return images, names


def _protect_universal(claims, entry, suite, eps: str, images: torch.Tensor) -> torch.Tensor:
    rec = claims.groups()[eps][0].record
    stored, _ = load_delta(entry.folder / rec.perturbation_file, name=rec.perturbation_file)
    u = universal_delta(stored.to(torch.float32)) / 255.0
    if tuple(u.shape[-2:]) != tuple(images.shape[-2:]):
        raise InputError(f"entry's universal delta is {tuple(u.shape[-2:])} px, the hold-out photos "
                         f"{tuple(images.shape[-2:])} px (suite {suite.name!r} size {suite.image_size})")
    return enforce(u, images, Budget(rec.norm, rec.eps), rec.attack, universal=True)[0]


def _protect_amortized(claims, entry, suite, eps: str, images: torch.Tensor, target) -> torch.Tensor:
    networks = claims_mod.check_networks(claims, entry)
    if claims.problems:
        raise InputError(f"entry's networks do not check: {claims.problems[0]}")
    rec = claims.groups()[eps][0].record
    attack = installed_attack(rec.attack, rec.attack_params)  # a plugin: described by a worker, not imported
    budget = Budget(rec.norm, rec.eps)
    runner = AttackRunner("process", target, suite.attack_timeout_s)  # the network is attack code: it runs in a worker
    try:
        jobs = {"fit": {"network": networks[eps]}, "test": {"images": images, "seed": suite.attack_seed}}
        outputs, _ = runner.run(attack, budget, jobs, suite.attack_batch_size)
    finally:
        runner.close()
    return enforce(outputs["test"].delta.to(images.device), images, budget, rec.attack)[0]


def _score_cells(suite, target, rec, images: torch.Tensor, adv: torch.Tensor, names: list[str],
                 sha: list[str]) -> list[HoldoutCell]:
    settings = EditSettings(**suite.edit.to_dict())
    editor = Editor(target, settings, cache_dir=None, batch_size=suite.attack_batch_size)
    seeds = [image_seed(settings, img) for img in images]
    cells = []
    for key in suite.prompts:
        text = resolve_prompt(key)
        both = editor.edit(torch.cat([images, adv]), text, seeds + seeds)
        clean, protected = both[: len(images)], both[len(images):]
        scored = metrics.score(protected, clean)
        values = {m: [float(v) for v in t] for m, t in scored.items()}
        means = {m: float(torch.as_tensor(v, dtype=torch.float64).mean()) for m, v in values.items()}
        cells.append(HoldoutCell(norm=rec.norm, eps=rec.eps, eps_label=rec.eps_label, prompt_key=key, prompt=text,
                                 image_names=list(names), image_sha256=sha, edit_seeds=seeds,
                                 protection=values, protection_mean=means))
    return cells


def measure(folder: Union[str, Path], holdout: Union[str, Path], device: Optional[str] = None) -> HoldoutResult:
    """Re-measure a universal or amortized entry on the hold-out photos in `holdout`."""
    folder = Path(folder)
    entry, claims = load_checked_entry(folder)
    rec = claims.cells[0].record
    kind = kind_of(rec)
    result = HoldoutResult(entry=folder.resolve().name, attack=rec.attack, method=method_label(rec), suite=rec.suite,
                           kind=kind)
    if kind == "per-image":
        raise InputError(f"entry {folder.name!r} is a per-image attack ({rec.attack!r}); --holdout re-measures "
                         "universal and amortized entries (a per-image attack is re-run on any photo by verify)")
    suite = claims_mod.suite_of(rec, None)
    if suite.edit_target or suite.masks:
        raise InputError(f"--holdout: suite {suite.name!r} is a transfer or inpainting suite; hold-out "
                         "re-measurement covers img2img suites on their own target")
    images, names = _holdout_photos(Path(holdout), suite.image_size)
    target = load_target(suite.target, device=device or torch.device(rec.target.device).type, dtype=rec.target.dtype)
    if target.fingerprint != rec.target.fingerprint:
        result.problems.append(f"target {suite.target!r} has fingerprint {target.fingerprint}, the records claim "
                               f"{rec.target.fingerprint}")
        return result
    result.holdout_sha256 = folder_digest(names, images)
    result.n_photos, result.target_fingerprint = len(names), target.fingerprint
    sha = [hashlib.sha256((img.clamp(0, 1) * 255).round().to(torch.uint8).numpy().tobytes()).hexdigest()
           for img in images]
    images = images.to(target.device, torch.float32)
    for eps in sorted(claims.groups(), key=lambda e: claims.groups()[e][0].record.eps):
        if kind == "universal":
            adv = _protect_universal(claims, entry, suite, eps, images)
        else:
            adv = _protect_amortized(claims, entry, suite, eps, images, target)
        result.cells += _score_cells(suite, target, claims.groups()[eps][0].record, images, adv, names, sha)
    return result


def write(result: HoldoutResult, leaderboard_dir: Union[str, Path]) -> Path:
    """leaderboard/holdout/NAME.json, written atomically (the maintainer's own file, not the author's)."""
    out = Path(leaderboard_dir) / "holdout" / f"{result.entry}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, result.to_json().encode())
    return out


def read_all(leaderboard_dir: Union[str, Path]) -> dict[str, dict]:
    """{entry name: hold-out result as data} for every file under leaderboard/holdout/ (none: {})."""
    folder = Path(leaderboard_dir) / "holdout"
    out: dict[str, dict] = {}
    if not folder.is_dir():
        return out
    for path in sorted(folder.glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise RecordError(f"{path}: not a readable hold-out file ({exc})") from None
        if data.get("format") != FORMAT:
            raise RecordError(f"{path}: format {data.get('format')!r}, expected {FORMAT!r}")
        out[data["entry"]] = data
    return out
