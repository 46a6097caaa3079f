"""Submissions are data, never code: validate, re-measure the budget, re-run a sample of cells.

`verify` recomputes each perturbation's norm from the stored tensor, re-edits and re-scores a
sample of cells from the stored perturbation and settings, and checks the split; `submit` verifies
and copies the entry into the leaderboard.
"""
from __future__ import annotations

import hashlib
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from .errors import RecordError
from .results import Record, Status, read_record, record_paths

ALLOWED_SUFFIXES = {".json", ".jsonl", ".safetensors", ".png", ".md", ".csv", ".html"}
PICKLE_MAGIC = (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05", b"PK\x03\x04")


@dataclass
class VerifyReport:
    records: list[Record] = field(default_factory=list)
    rerun: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _safe_relpath(folder: Path, rel: str) -> Path:
    p = Path(rel)
    if p.is_absolute() or ".." in p.parts:
        raise RecordError(f"file name {rel!r} in the submission escapes its folder (absolute or '..')")
    full = (folder / p).resolve()
    if folder.resolve() not in full.parents:
        raise RecordError(f"file name {rel!r} in the submission escapes its folder")
    return full


def check_files(folder: Path) -> None:
    """Only data files; no pickle (by suffix or by magic bytes), no symlinks."""
    for path in sorted(folder.rglob("*")):
        if path.is_symlink():
            raise RecordError(f"submission contains a symlink: {path.relative_to(folder)}")
        if not path.is_file() or "cache" in path.relative_to(folder).parts:
            continue
        rel = path.relative_to(folder)
        if path.suffix.lower() not in ALLOWED_SUFFIXES:
            raise RecordError(f"submission file {rel} is not allowed: only data files "
                              f"({', '.join(sorted(ALLOWED_SUFFIXES))}); pickle and code are refused")
        with open(path, "rb") as f:
            head = f.read(4)
        if path.suffix.lower() in {".json", ".jsonl"} and head.startswith(PICKLE_MAGIC):
            raise RecordError(f"submission file {rel} is a pickle disguised as {path.suffix}")


def _stored_delta(folder: Path, rec: Record) -> torch.Tensor:
    if not rec.perturbation_file:
        raise RecordError(f"record {rec.cell_id} has no perturbation file")
    path = _safe_relpath(folder, rec.perturbation_file)
    if not path.is_file():
        raise RecordError(f"record {rec.cell_id}: perturbation file {rec.perturbation_file} is missing")
    from .harness import delta_sha256

    try:
        delta255 = load_file(str(path))["delta255"]
    except (SafetensorError, KeyError, OSError) as exc:
        raise RecordError(f"perturbation file {rec.perturbation_file} is not a spdbench safetensors file: {exc}") from None
    if rec.perturbation_sha256 and delta_sha256(delta255) != rec.perturbation_sha256:
        raise RecordError(f"record {rec.cell_id}: perturbation file {rec.perturbation_file} does not match its sha256")
    return delta255.float() / 255.0


def verify(folder: Union[str, Path], sample: int = 1, tolerance: float = 2e-3, rerun: bool = True,
           seed: int = 0, device: Optional[str] = None, images: Optional[torch.Tensor] = None) -> VerifyReport:
    """Check a run folder as untrusted data; `report.problems` lists every reason to reject it."""
    from .budget import Budget
    from .data import split_indices
    from .suites import get_suite

    folder = Path(folder)
    report = VerifyReport()
    try:
        check_files(folder)
        paths = record_paths(folder)
        if not paths:
            raise RecordError(f"{folder} holds no records (expected {folder}/records/*.json)")
        report.records = [read_record(p) for p in paths]
    except RecordError as exc:
        report.problems.append(str(exc))
        return report
    ok = [r for r in report.records if r.status == Status.ok]
    for rec in ok:
        try:
            delta = _stored_delta(folder, rec)
        except RecordError as exc:
            report.problems.append(str(exc))
            continue
        budget = Budget(rec.norm, rec.eps)
        norms = budget.norms(delta)
        if bool((norms > budget.eps + 1e-5).any()):
            report.problems.append(f"record {rec.cell_id}: stored perturbation has {rec.norm} norm "
                                   f"{float(norms.max()) * 255:.2f}/255, over its eps {rec.eps_label}")
        try:
            suite = get_suite(rec.suite)
        except Exception as exc:  # noqa: BLE001
            report.problems.append(f"record {rec.cell_id}: {exc}")
            continue
        n_total = delta.shape[0]
        tr, te = split_indices(n_total, rec.split_seed)
        expect = tr if rec.split.value == "train" else te
        if rec.split_seed != suite.split_seed or len(expect) != len(rec.image_names):
            report.problems.append(f"record {rec.cell_id}: split does not match the {suite.name} protocol "
                                   f"(seed {rec.split_seed}, {len(rec.image_names)} {rec.split.value} images)")
    if report.problems or not rerun or not ok:
        return report
    rng = random.Random(seed)
    for rec in rng.sample(ok, min(sample, len(ok))):
        report.rerun.append(rec.cell_id)
        problem = _rerun_cell(folder, rec, tolerance, device, images)
        if problem:
            report.problems.append(problem)
    return report


def _rerun_cell(folder: Path, rec: Record, tolerance: float, device: Optional[str],
                images: Optional[torch.Tensor]) -> Optional[str]:
    """Re-edit and re-score one cell from its stored perturbation; a problem string or None."""
    from . import metrics
    from .data import split_indices
    from .editing import EditSettings, Editor
    from .suites import get_suite
    from .targets import load_target

    suite = get_suite(rec.suite)
    target = load_target(rec.target.name if rec.target.name.startswith("tiny") else rec.target.source, device=device,
                         dtype=rec.target.dtype)
    if target.fingerprint != rec.target.fingerprint:
        return f"record {rec.cell_id}: target {rec.target.name} fingerprint differs ({target.fingerprint})"
    if images is None:
        images, _ = suite.load_images()
    images = images.to(target.device)
    delta = _stored_delta(folder, rec).to(target.device)
    tr, te = split_indices(len(images), rec.split_seed)
    idx = tr if rec.split.value == "train" else te
    x = images[idx]
    from .harness import _sha

    if [_sha(x[i]) for i in range(len(idx))] != rec.image_sha256:
        return f"record {rec.cell_id}: the suite's images differ from the record's (sha256)"
    adv = ((x * 255).round() + (delta[idx] * 255).round()).clamp(0, 255) / 255
    editor = Editor(target, EditSettings(**rec.edit), cache_dir=None)
    clean = editor.edit(x, rec.prompt, rec.edit_seeds)
    edited = editor.edit(adv, rec.prompt, rec.edit_seeds)
    scores = metrics.score(edited, clean)
    for m, claimed in rec.protection_mean.items():
        got = float(scores[m].mean())
        tol = tolerance * (100 if m == "psnr" else 1)
        if abs(got - claimed) > tol:
            return (f"record {rec.cell_id}: {m} does not reproduce: claimed {claimed:.4f}, re-run gives {got:.4f}"
                    f" (tolerance {tol:g})")
    return None


def submit(folder: Union[str, Path], leaderboard_dir: Union[str, Path] = "leaderboard", name: Optional[str] = None,
           **verify_kw) -> tuple[VerifyReport, Optional[Path]]:
    """Verify, then copy the records and perturbations into leaderboard/entries/NAME."""
    folder = Path(folder)
    report = verify(folder, **verify_kw)
    if not report.ok:
        return report, None
    name = name or folder.resolve().name
    if not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
        report.problems.append(f"entry name {name!r} must be letters, digits, '-', '_' or '.'")
        return report, None
    dest = Path(leaderboard_dir) / "entries" / name
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    shutil.copytree(folder / "records", dest / "records")
    if (folder / "perturbations").is_dir():
        shutil.copytree(folder / "perturbations", dest / "perturbations")
    return report, dest
