"""Protect one's own photos: `spdbench protect` and `spdbench.protect(...)`.

What a photographer or a platform runs: any registered per-image attack at a budget on any
target, or a universal / amortized entry's stored perturbation or network, applied to one photo or
a folder. The harness's rules hold as in a run: the attack (and an entry's network, which is attack
code) runs in a worker process (`AttackRunner`), and `enforce` projects, clamps and quantizes to 8
bits, so what is written is exactly what was measured. Outputs are lossless PNGs plus a JSON of
what was done (attack, params, budget, target, per-photo hashes and measured norms). Each stage
(loading, protecting, writing) is announced as it starts (harness/progress.py), with an estimate of
the photos left from the first photo on.

Photos keep their size, cropped (centred) to a multiple of 8 on each side, the latent grid of an
SD-architecture VAE; `size=` instead centre-crops and resizes to a square, as the suites do.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
from PIL import Image

from spdbench.attacks.base import Attack, AttackKind
from spdbench.budget import Budget
from spdbench.data.photos import IMAGE_SUFFIXES, center_crop_resize, check_min_size, read_image, sha256_file
from spdbench.errors import InputError
from spdbench.harness.pipeline import AttackRunner
from spdbench.harness.plan import installed_attack
from spdbench.harness.progress import Stages, default_stages
from spdbench.harness.protect import enforce
from spdbench.targets import load_target

#: the side of a photo is cropped to a multiple of this (the VAE's downsampling factor)
LATENT_FACTOR = 8
SUMMARY_NAME = "protection.json"
#: the model a per-image attack runs on unless told: the smoke suite's offline model
DEFAULT_TARGET = "tiny"


@dataclass
class Photo:
    """One input photo at its working size, [0,1] float (1, 3, H, W), and where it came from."""

    path: Path
    pixels: torch.Tensor
    original_hw: tuple[int, int]


@dataclass
class Protector:
    """What protects: an attack run per photo, an entry's universal delta, or an entry's network."""

    attack: Attack
    budget: Budget
    kind: str
    target_name: str
    target_fingerprint: str
    target: Any = None                      # a loaded Target (per-image, amortized), None for universal
    universal: Optional[torch.Tensor] = None  # (1, 3, h, w) on the [0,1] scale (whole 8-bit levels), universal only
    network: Optional[dict] = None          # amortized only
    entry: Optional[str] = None


def _crop_to_multiple(array: np.ndarray, factor: int = LATENT_FACTOR) -> np.ndarray:
    """Centre crop so each side is a multiple of `factor` (at most factor - 1 pixels lost per side)."""
    h, w = array.shape[:2]
    nh, nw = h - h % factor, w - w % factor
    if nh == 0 or nw == 0:
        raise InputError(f"photo is {w}x{h} px; expected at least {factor} px on each side")
    top, left = (h - nh) // 2, (w - nw) // 2
    return array[top:top + nh, left:left + nw]


def _photo_files(source: Path) -> list[Path]:
    if source.is_file():
        return [source]
    if source.is_dir():
        files = sorted(p for p in source.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise InputError(f"photos {str(source)!r}: the folder holds no images ({', '.join(IMAGE_SUFFIXES)})")
        return files
    raise InputError(f"photos {str(source)!r} does not exist (expected a photo file or a folder of photos)")


def _load_photo(path: Path, size: Optional[int]) -> Photo:
    array = read_image(path)
    if size is not None:
        check_min_size(array, size, f"photo {path}")
        work = center_crop_resize(array, size)
    else:
        work = _crop_to_multiple(array)
    pixels = torch.from_numpy(np.ascontiguousarray(work)).permute(2, 0, 1)[None].float() / 255.0
    return Photo(path=path, pixels=pixels, original_hw=(int(array.shape[0]), int(array.shape[1])))


def _output_paths(source: Path, files: list[Path], out: Optional[Union[str, Path]]) -> tuple[list[Path], Path]:
    """(one PNG per photo, the summary JSON): a file -> `out` (.png); a folder -> out/NAME.png."""
    if source.is_file():
        target = Path(out) if out is not None else source.with_name(f"{source.stem}-protected.png")
        if target.suffix.lower() != ".png":
            raise InputError(f"out {str(target)!r}: expected a .png file (lossless; JPEG would change the pixels)")
        if target.resolve() == source.resolve():
            raise InputError(f"out {str(target)!r} is the input photo; expected another file")
        return [target], target.with_suffix(".json")
    folder = Path(out) if out is not None else source.with_name(f"{source.name}-protected")
    if folder.exists() and not folder.is_dir():
        raise InputError(f"out {str(folder)!r} is a file; expected a folder for a folder of photos")
    if folder.resolve() == source.resolve():
        raise InputError(f"out {str(folder)!r} is the input folder; expected another folder")
    return [folder / f"{p.stem}.png" for p in files], folder / SUMMARY_NAME


def _entry_protector(entry: Union[str, Path], eps: Optional[str], device, dtype, stages: Stages) -> Protector:
    """A universal or amortized entry's stored perturbation or network, checked as verify checks it."""
    # deferred: the entry checks load the verify stack, which only --from-entry needs
    from spdbench.store.perturbations import load_delta
    from spdbench.verify import claims as claims_mod
    from spdbench.verify.holdout import kind_of, load_checked_entry, universal_delta

    folder = Path(entry)
    if not folder.is_dir():
        raise InputError(f"--from-entry {str(folder)!r} is not an existing entry folder")
    found, checked = load_checked_entry(folder)
    rec = checked.cells[0].record
    kind = kind_of(rec)
    if kind == "per-image":
        raise InputError(f"--from-entry {folder.name!r} is a per-image attack ({rec.attack!r}): it stores no "
                         f"reusable perturbation; run `--attack {rec.attack}` on the photos instead")
    groups = checked.groups()
    label = _entry_eps(groups, eps, folder.name)
    rec = groups[label][0].record
    attack = installed_attack(rec.attack, rec.attack_params)  # a plugin: described by a worker, not imported
    budget = Budget(rec.norm, rec.eps)
    common = dict(attack=attack, budget=budget, kind=kind, target_name=rec.target.name,
                  target_fingerprint=rec.target.fingerprint, entry=folder.resolve().name)
    stages.stage("loading", f"entry {folder.name}'s stored {'perturbation' if kind == 'universal' else 'network'} "
                 f"at {label}" + ("" if kind == "universal" else f" and model {rec.target.name}"))
    if kind == "universal":
        stored, _ = load_delta(found.folder / rec.perturbation_file, name=rec.perturbation_file)
        return Protector(**common, universal=universal_delta(stored.to(torch.float32)) / 255.0)
    networks = claims_mod.check_networks(checked, found)
    if checked.problems:
        raise InputError(f"--from-entry {folder.name!r}: its networks do not check: {checked.problems[0]}")
    suite = claims_mod.suite_of(rec, None)
    target = load_target(suite.target, device=device, dtype=dtype or rec.target.dtype)
    if target.fingerprint != rec.target.fingerprint:
        raise InputError(f"--from-entry {folder.name!r}: target {suite.target!r} has fingerprint "
                         f"{target.fingerprint}, the entry's network was fit on {rec.target.fingerprint}")
    return Protector(**{**common, "target_name": target.name}, target=target, network=networks[label])


def _entry_eps(groups: dict, eps: Optional[str], name: str) -> str:
    """The entry's eps label to apply: the one asked for (same budget), or its only one."""
    labels = sorted(groups, key=lambda k: groups[k][0].record.eps)
    if eps is None:
        if len(labels) == 1:
            return labels[0]
        raise InputError(f"--from-entry {name!r} holds budgets {', '.join(labels)}; pass --eps with one of them")
    asked = Budget(groups[labels[0]][0].record.norm, eps).eps
    for label in labels:
        if math.isclose(groups[label][0].record.eps, asked, abs_tol=1e-9):
            return label
    raise InputError(f"--eps {eps!r}: entry {name!r} stores budgets {', '.join(labels)}; expected one of them")


def _attack_protector(attack: str, params: Optional[dict], norm: str, eps: Optional[str], target: str,
                      device, dtype, stages: Stages) -> Protector:
    built = installed_attack(attack, params)  # a plugin: described by a worker, not imported here
    if built.kind is not AttackKind.per_image:
        raise InputError(f"--attack {attack!r} is {built.kind.value}: it is fit on a training set, not run on "
                         f"one photo; apply a fitted one with --from-entry ENTRY (e.g. leaderboard/entries/...)")
    budget = Budget(norm, eps if eps is not None else "8/255")
    stages.stage("loading", f"model {target} for {attack}")
    model = load_target(target, device=device, dtype=dtype)
    return Protector(attack=built, budget=budget, kind="per-image", target_name=model.name,
                     target_fingerprint=model.fingerprint, target=model)


def _tile(u: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """A universal delta repeated over a photo of another size (it is periodic texture at heart);
    the harness projects the result onto the budget again in `enforce`."""
    h, w = u.shape[-2:]
    reps = (math.ceil(hw[0] / h), math.ceil(hw[1] / w))
    return u.repeat(1, 1, *reps)[..., : hw[0], : hw[1]]


def _protect_one(p: Protector, runner: Optional[AttackRunner], pixels: torch.Tensor, seed: int) -> torch.Tensor:
    """The protected photo (1, 3, H, W) on the 8-bit grid, within the budget (enforced here)."""
    if p.kind == "universal":
        return enforce(_tile(p.universal, tuple(pixels.shape[-2:])), pixels, p.budget, p.attack.name,
                       universal=True)[0]
    jobs: dict[str, dict] = {"test": {"images": pixels, "seed": seed}}
    if p.kind == "amortized":
        jobs["fit"] = {"network": p.network}
    outputs, _ = runner.run(p.attack, p.budget, jobs, 1)
    return enforce(outputs["test"].delta.to(pixels.device), pixels, p.budget, p.attack.name)[0]


def _to_uint8(image: torch.Tensor) -> np.ndarray:
    return (image[0].clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()


def _write_png(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format="PNG")


def _photo_entry(photo: Photo, out: Path, clean: np.ndarray, adv: np.ndarray) -> dict:
    """Per photo: hashes of the input file and output file, sizes, and the norms of the stored 8-bit
    perturbation (measured on the written pixels, not the attack's float output)."""
    delta = (adv.astype(np.float64) - clean.astype(np.float64)) / 255.0
    return {"input": str(photo.path), "output": str(out), "input_sha256": sha256_file(photo.path),
            "output_sha256": sha256_file(out), "input_size_hw": list(photo.original_hw),
            "working_size_hw": [int(clean.shape[0]), int(clean.shape[1])],
            "linf": float(np.abs(delta).max()), "linf_levels": int(np.abs(adv.astype(int) - clean.astype(int)).max()),
            "l2": float(np.sqrt((delta ** 2).sum()))}


def protect(photos: Union[str, Path], attack: Optional[str] = None, *, eps: Optional[str] = None,
            norm: str = "linf", out: Optional[Union[str, Path]] = None, target: Optional[str] = None,
            device: Optional[str] = None, dtype: Optional[str] = None, params: Optional[dict] = None,
            from_entry: Optional[Union[str, Path]] = None, size: Optional[int] = None, seed: int = 0,
            isolation: str = "sandbox", progress: Union[None, bool, Stages] = None) -> dict:
    """Protect a photo or a folder of photos; writes lossless PNGs and a JSON summary, returns it.

    Either `attack` (a registered per-image attack, run at `norm`/`eps` on `target`) or
    `from_entry` (a universal or amortized leaderboard entry: its stored perturbation or network at
    its own budget and target). `target` defaults to "tiny", the smoke suite's model. progress: each
    stage on stderr as it starts (None: when stderr is a terminal; or a Stages to announce with)."""
    if (attack is None) == (from_entry is None):
        raise InputError("protect: give exactly one of attack (a per-image attack such as 'pca-minus') or "
                         f"from_entry (a universal or amortized entry folder); got attack={attack!r}, "
                         f"from_entry={None if from_entry is None else str(from_entry)!r}")
    if from_entry is not None and target is not None:
        raise InputError(f"target {target!r}: an entry is applied on the target it was made on; "
                         "leave target out with from_entry")
    if size is not None and (size < LATENT_FACTOR or size % LATENT_FACTOR):
        raise InputError(f"size {size!r}: expected a positive multiple of {LATENT_FACTOR}")
    source = Path(photos)
    files = _photo_files(source)
    outputs, summary_path = _output_paths(source, files, out)
    stages = progress if isinstance(progress, Stages) else default_stages("protect", progress)
    loaded = [_load_photo(f, size) for f in files]  # every photo read (and refused) before any work
    # the first stage line comes after the name, kind and budget checks (a refusal stays one line)
    if from_entry is not None:
        protector = _entry_protector(from_entry, eps, device, dtype, stages)
    else:
        protector = _attack_protector(attack, params, norm, eps, target or DEFAULT_TARGET, device, dtype, stages)
    stages.stage("protecting", f"{len(loaded)} photo(s) with {protector.attack.name} ({protector.kind}) at "
                 f"{protector.budget.label}", items=len(loaded), unit="photos")
    results = _run_all(protector, loaded, outputs, seed, isolation, stages)
    stages.stage("writing", f"what was done to {summary_path}")
    summary = _summary(protector, results, size, seed)
    summary_path.parent.mkdir(parents=True, exist_ok=True)
    summary_path.write_text(json.dumps(summary, indent=1) + "\n")
    summary["summary_file"] = str(summary_path)
    stages.done()
    return summary


def _run_all(p: Protector, photos: list[Photo], outputs: list[Path], seed: int, isolation: str,
             stages: Stages) -> list[dict]:
    runner = AttackRunner(isolation, p.target, None) if p.kind != "universal" else None
    results = []
    try:
        for photo, out in zip(photos, outputs):
            pixels = photo.pixels.to(p.target.device if p.target is not None else "cpu")
            adv = _protect_one(p, runner, pixels, seed)
            clean_u8, adv_u8 = _to_uint8(pixels), _to_uint8(adv)
            _write_png(adv_u8, out)
            results.append(_photo_entry(photo, out, clean_u8, adv_u8))
            stages.advance()  # from the first photo on, about how long the rest take
    finally:
        if runner is not None:
            runner.close()
    return results


def _summary(p: Protector, results: list[dict], size: Optional[int], seed: int) -> dict:
    over = [r["output"] for r in results if _over_budget(r, p.budget)]
    if over:  # enforce guarantees this; a failure here is a harness bug, never a silent success
        raise InputError(f"protect: {over[0]} exceeds the budget {p.budget.label} after 8-bit rounding")
    return {"kind": "spdbench-protection", "attack": p.attack.name, "attack_kind": p.kind,
            "params": json.loads(json.dumps(p.attack.params, default=str)),
            "norm": p.budget.norm, "eps": p.budget.eps, "eps_label": p.budget.label,
            "from_entry": p.entry, "target": {"name": p.target_name, "fingerprint": p.target_fingerprint},
            "seed": seed,
            "resize": (f"centre-cropped and resized to {size}x{size}" if size is not None else
                       f"kept at its size, centre-cropped to a multiple of {LATENT_FACTOR} px per side"),
            "universal_tiling": ("the entry's delta is repeated over photos of another size"
                                 if p.kind == "universal" else None),
            "photos": results}


def _over_budget(result: dict, budget: Budget) -> bool:
    value = result["linf"] if budget.norm == "linf" else result["l2"]
    return value > budget.eps + 1e-6
