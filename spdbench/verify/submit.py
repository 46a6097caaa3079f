"""Submissions are untrusted data: `verify` checks an entry whole; `submit` never destroys.

`verify` runs four stages and stops at the first that fails:
1. files   -- the folder under the entry schema (entry_schema: layout, content, sizes, links);
2. claims  -- the records against themselves, their suite and the stored perturbations (claims);
3. sample  -- from every cell, random images re-edited and re-scored (remeasure.sample_cells);
4. re-run  -- every cell group (each eps) run again, attack included (remeasure.rerun_group).
An amortized entry's stored networks are re-applied to every image between stages 2 and 3
(remeasure.reapply_networks): its perturbations must be what its networks make.
The random draws come from a seed taken from `secrets` unless one is given; the report records it,
so `verify --seed N` repeats a verification exactly.

`submit` copies the run folder's entry files into a temporary folder inside leaderboard/entries,
verifies that copy (what is verified is what lands), writes its manifest and renames it into
place. An existing entry is refused unless `replace=True`; it is then moved aside until the new one
is in place. A refused submit leaves leaderboard/ as it was.
"""
from __future__ import annotations

import math
import os
import random
import secrets
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch

from spdbench.verify import claims as claims_mod
from spdbench.verify import remeasure
from spdbench.verify import entry as entry_schema
from spdbench.verify import fill
from spdbench.errors import InputError, RecordError, SpdbenchError
from spdbench.store.records import Record, attack_kind
from spdbench.harness.isolation import warm_up
from spdbench.harness.pipeline import suite_masks
from spdbench.harness.plan import installed_attack
from spdbench.harness.progress import Stages, default_stages
from spdbench.targets import load_target, parse_device

DEFAULT_TOLERANCE = 2e-3


@dataclass
class VerifyReport:
    """What was checked, what was re-measured (with the seed of the draw), and every reason to refuse."""

    folder: str = ""
    seed: Optional[int] = None
    records: list[Record] = field(default_factory=list)
    checks: list[str] = field(default_factory=list)       # one line per stage that passed
    problems: list[str] = field(default_factory=list)
    sampled: dict[str, list[str]] = field(default_factory=dict)   # cell id -> images re-edited
    rerun: list[str] = field(default_factory=list)                # cell ids re-run with the attack
    #: one line per budget group whose re-run worker was NOT sandboxed (this machine could not confine it)
    rerun_unsandboxed: list[str] = field(default_factory=list)
    #: one line per budget group whose re-made perturbation drifted (remeasure.drifted): accepted with
    #: this warning because its per-image values reproduced; kept in the summary when there is one
    warnings: list[str] = field(default_factory=list)
    compared: int = 0
    max_deviation: dict[str, float] = field(default_factory=dict)
    remeasured: bool = False      # False: only the files and the claims were checked (--no-rerun)
    #: registered metrics the records lack, re-measured on the re-edited images (verify/fill.py):
    #: cell id -> block -> metric -> {image name: value}; and the same by cell file, for the fill
    unmeasured: dict[str, Any] = field(default_factory=dict)
    unmeasured_by_rel: dict[str, Any] = field(default_factory=dict, repr=False)
    #: the filled copy written by `fill_metrics` (None: none asked for, or nothing to fill)
    filled: Optional[str] = None

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> dict[str, Any]:
        """The verification as data (kept in the entry's manifest)."""
        out = dict(seed=self.seed, remeasured=self.remeasured, checks=self.checks, sampled=self.sampled,
                   rerun=self.rerun, values_compared=self.compared,
                   max_deviation={k: round(v, 9) for k, v in sorted(self.max_deviation.items())})
        if self.warnings:  # only when there is one: earlier summaries keep their bytes
            out["warnings"] = self.warnings
        return out


def _check_options(sample: Any, tolerance: Any, seed: Any) -> None:
    if isinstance(sample, bool) or not isinstance(sample, int) or sample < 1:
        raise InputError(f"sample must be a whole number of images per cell >= 1, got {sample!r}")
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not (
            math.isfinite(tolerance) and 0 < tolerance < 1):
        raise InputError(f"tolerance must be a number in (0, 1), got {tolerance!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise InputError(f"seed must be a whole number >= 0, got {seed!r}")


def verify(folder: Union[str, Path], sample: int = 2, tolerance: float = DEFAULT_TOLERANCE, rerun: bool = True,
           attack_rerun: bool = True, seed: Optional[int] = None, device: Optional[str] = None,
           images: Optional[torch.Tensor] = None, image_names: Optional[list[str]] = None,
           data: Union[str, Path, None] = None, manifest: Union[str, Path, None] = None, suite=None,
           progress: Union[None, bool, Stages] = None,
           fill_metrics: Union[str, Path, None] = None) -> VerifyReport:
    """Check a folder as an untrusted submission; `report.problems` lists every reason to refuse it.

    sample: images re-edited per cell; rerun=False checks files and claims only (the report says so);
    attack_rerun=False skips stage 4; seed: the draw's seed (default: unpredictable, recorded);
    images/image_names or data/manifest: the suite's photos when they are not bundled; suite: a
    Suite object the entry claims (default: the registered suite the records name). progress: each
    stage and its estimate on stderr as it starts, the seed first (None: when stderr is a terminal;
    a Stages that has announced a stage already: the caller printed the seed and the first stage).
    fill_metrics: a new folder; once the entry verifies, a copy of it is written there whose fully
    re-edited cells carry the registered metrics the records lack (verify/fill.py; never in place).
    """
    dest = check_options(sample, tolerance, seed, device, fill_metrics, rerun)
    report = VerifyReport(folder=str(folder), seed=secrets.randbits(63) if seed is None else seed)
    stages = progress if isinstance(progress, Stages) else default_stages("verify", progress)
    if stages.current is None:
        stages.note(f"seed {report.seed} (repeat this verification with --seed {report.seed})")
        stages.stage("verifying", f"files and claims of {folder}")
    try:
        entry = entry_schema.scan(folder)
    except RecordError as exc:
        report.problems.append(str(exc))
        return report
    report.checks.append(f"files: {len(entry.files)} files, {entry.total_bytes / 2**20:.1f} MiB, all data under "
                         f"the entry schema{' and its manifest' if entry.is_entry else ''}")
    claims = claims_mod.check(entry, suite, strict=True)
    report.records = claims.records
    if claims.problems:
        report.problems += claims.problems
        return report
    try:
        suite = claims_mod.suite_of(claims.cells[0].record, suite)
    except SpdbenchError as exc:
        report.problems.append(str(exc))
        return report
    groups = claims.groups()
    report.checks.append(f"claims: {len(claims.cells)} cells = {len(groups)} eps x {len(suite.prompts)} prompts x "
                         f"2 splits of suite {suite.name!r}, per-image lists whole, means derived")
    if not rerun:
        _static_only(report, claims, entry, suite, images, image_names, data, manifest)
        return report
    if attack_rerun:
        warm_up()  # the re-run's worker imports while this process loads the model and re-edits
    _remeasure(report, claims, entry, suite, sample, tolerance, attack_rerun, device, images, image_names, data,
               manifest, stages)
    if dest is not None and report.ok:
        _fill(report, claims, entry, dest)
    stages.done()
    return report


def check_options(sample: Any = 2, tolerance: Any = DEFAULT_TOLERANCE, seed: Any = None,
                  device: Optional[str] = None, fill_metrics: Union[str, Path, None] = None,
                  rerun: bool = True) -> Optional[Path]:
    """Every option of `verify` checked before anything is printed or loaded: the CLI calls this
    before its seed line, so a bad option is the command's one and only line. Returns the
    --fill-metrics destination (None: none asked for)."""
    _check_options(sample, tolerance, seed)
    dest = _fill_dest(fill_metrics, rerun)
    parse_device(device)
    return dest


def _fill_dest(fill_metrics: Union[str, Path, None], rerun: bool) -> Optional[Path]:
    """--fill-metrics DIR, checked before anything is loaded: a new folder, and re-editing asked for."""
    if fill_metrics is None:
        return None
    if not rerun:
        raise InputError("--fill-metrics needs the re-edit (it fills metrics from the re-edited images); "
                         "drop --no-rerun")
    return fill.check_dest(fill_metrics)


def _fill(report: VerifyReport, claims, entry, dest: Path) -> None:
    """The verified entry copied to `dest` with its unmeasured metrics filled where every image of a
    cell was re-edited; nothing is written when no cell could be filled (said in the checks)."""
    provenance = fill.provenance(report.seed)
    records, notes = fill.filled_records(claims, report.unmeasured_by_rel, provenance)
    report.checks += [f"fill: {n}" for n in notes]
    if not records:
        report.checks.append(f"fill: NOTHING WRITTEN to {dest}: no cell lacks a registered metric on all of its "
                             "re-edited images" if not report.unmeasured else
                             f"fill: NOTHING WRITTEN to {dest}: no cell had every image re-edited")
        return
    metrics = sorted({f.split(":", 1)[1] for r in records.values() for f in r.flags if f.startswith(fill.FLAG)})
    verification = {**report.summary(), "filled_by_reedit": {"metrics": metrics, "cells": len(records), **provenance}}
    report.filled = str(fill.write_copy(entry, records, dest, verification))
    report.checks.append(f"fill: wrote {dest}: {len(records)} of {len(claims.ok_cells)} cell(s) now carry "
                         f"{', '.join(metrics)} (flagged {fill.FLAG}:<metric>; the entry itself is unchanged)")


def _remeasure(report: VerifyReport, claims, entry, suite, sample: int, tolerance: float, attack_rerun: bool,
               device: Optional[str], images, image_names, data, manifest, stages: Stages) -> None:
    """The re-measurement, each stage only once the one before passed: the stored perturbations
    against the suite's photos, the models' fingerprints, stored networks re-applied, a sample of
    every cell re-edited, and one cell group's attack re-run."""
    rec = claims.cells[0].record
    measured_on = _measured_device_type(rec, device)
    images, names = _suite_images(suite, images, image_names, data, manifest)
    deltas, networks = _check_against_images(report, claims, entry, suite, images, names)
    if not report.ok:
        return
    stages.stage("loading", f"model {suite.target}" + (f" and {suite.edit_target}" if suite.edit_target else ""))
    models = _load_models(report, suite, rec, device or measured_on)
    if models is None:
        return
    target, editing = models
    if networks:
        stages.stage("protecting", f"{len(names)} photos again with the {len(networks)} stored network(s)")
    if networks and not _reapply_networks(report, claims, networks, deltas, suite, target, images, names):
        return
    rng = random.Random(report.seed)
    prompts = len({c.record.prompt for c in claims.cells})  # one batched edit call per prompt: the items counted
    stages.stage("editing", f"{sample} image(s) of each of {len(claims.cells)} cells again",
                 _sample_estimate(claims, sample), items=prompts if prompts > 1 else None, unit="prompts")
    if not _sample_cells(report, claims, deltas, suite, editing, images, names, rng, sample, tolerance,
                         stages.advance):
        return
    if not attack_rerun:
        report.checks.append("attack re-run: SKIPPED (attack_rerun=False)")
        return
    problem = _installed_attack_problem(rec)
    if problem:
        report.problems.append(problem)
        return
    _rerun_group(report, claims, deltas, suite, target, images, names, rng, tolerance, stages)


def _sample_estimate(claims, sample: int) -> float:
    """The records' own edit seconds, scaled to the images re-edited: about how long the sample takes."""
    return sum(c.record.timing.edit_wall_s * min(sample, len(c.record.image_names)) / max(1, len(c.record.image_names))
               for c in claims.cells)


def _rerun_estimate(cells) -> float:
    """The records' own attack, fit, edit and scoring seconds: about how long re-running a group takes."""
    t = [c.record.timing for c in cells]
    return max((x.fit_wall_s or 0.0) for x in t) + sum(x.attack_wall_s + x.edit_wall_s + x.score_wall_s for x in t)


def _measured_device_type(rec, device: Optional[str]) -> str:
    """The device type the entry was measured on; a `device` of another type is refused (edits
    reproduce only on the same device type: its random generators differ)."""
    measured_on = torch.device(rec.target.device).type
    if device is not None and torch.device(device).type != measured_on:
        raise InputError(f"device {device!r}: this entry was measured on {measured_on}, and edits reproduce only on "
                         f"the same device type (its random generators differ); use --device {measured_on}")
    return measured_on


def _load_models(report: VerifyReport, suite, rec, device: str) -> Optional[tuple]:
    """(attacked model, editing model) of the suite, each with the fingerprint the records claim;
    None (and the problem) where one differs."""
    target = load_target(suite.target, device=device, dtype=rec.target.dtype)
    if target.fingerprint != rec.target.fingerprint:
        report.problems.append(f"target: suite {suite.name!r}'s model {suite.target!r} has fingerprint "
                               f"{target.fingerprint}, the records claim {rec.target.fingerprint}")
        return None
    editing = target
    if suite.edit_target:  # transfer: the edits are the edit target's, and must be re-made with it
        editing = load_target(suite.edit_target, device=device, dtype=rec.target.dtype)
        claimed = rec.edit_target.fingerprint if rec.edit_target else None
        if editing.fingerprint != claimed:
            report.problems.append(f"edit target: suite {suite.name!r}'s editing model {suite.edit_target!r} has "
                                   f"fingerprint {editing.fingerprint}, the records claim {claimed}")
            return None
    return target, editing


def _reapply_networks(report: VerifyReport, claims, networks: dict, deltas: dict, suite, target, images,
                      names: list[str]) -> bool:
    """An amortized entry's stored networks re-applied to every image; True where they reproduce."""
    rec = claims.cells[0].record
    t0 = time.perf_counter()
    got = remeasure.reapply_networks(claims, networks, deltas, suite, target, images, names)
    report.problems += got.problems
    if not report.ok:
        return False
    report.checks.append(f"networks: {len(networks)} stored network(s) rebuilt by attack {rec.attack!r} from "
                         f"the records' params and re-applied in a worker to all {len(names)} images: "
                         f"{_same(got)} perturbations ({time.perf_counter() - t0:.0f} s)")
    report.checks += got.notes
    return True


def _same(got) -> str:
    """How a re-made perturbation matched: bit for bit, up to float rounding (remeasure.reproduces),
    or up to an iterative attack's drift across machines (remeasure.drifted, a warning of its own)."""
    if getattr(got, "drifted", None):
        return "up to drift across machines (the warning below), the stored"
    return "identical" if not got.notes else "up to float rounding at the 8-bit grid, the stored"


def _sample_cells(report: VerifyReport, claims, deltas: dict, suite, editing, images, names: list[str],
                  rng: random.Random, sample: int, tolerance: float, on_prompt=None) -> bool:
    """`sample` random images of every cell re-edited (remeasure.sample_cells); True where all reproduce."""
    t0 = time.perf_counter()

    masks, _ = suite_masks(suite, None, names, images, editing)  # inpainting: the suite's mask of every photo
    got = remeasure.sample_cells(claims, deltas, suite, editing, images, rng, sample, tolerance, masks, on_prompt)
    _merge(report, got)
    report.sampled = got.sampled
    report.unmeasured_by_rel = got.unmeasured
    report.unmeasured = fill.values_by_name(claims, got.unmeasured)
    report.remeasured = True
    if got.problems:
        return False
    report.checks.append(f"sample: {sample} image(s) from each of {len(got.sampled)} cells re-edited and every "
                         f"image's imperceptibility recomputed ({got.compared} values, {time.perf_counter() - t0:.0f} s)")
    report.checks += fill.unmeasured_lines(claims, got.unmeasured)
    return True


def _installed_attack_problem(rec) -> Optional[str]:
    """Why the attack cannot be re-run here: not installed, or installed as another kind; None if it can."""
    try:
        cls = installed_attack(rec.attack)  # a plugin: described by a worker, never imported here
    except SpdbenchError as exc:
        return f"attack {rec.attack!r} is not installed here, so it cannot be re-run: {exc}"
    if cls.kind != attack_kind(rec.universal, rec.amortized):  # a str Enum: its values are the records' words
        return (f"attack {rec.attack!r} is {cls.kind.value}, the records "
                f"claim {attack_kind(rec.universal, rec.amortized)}")
    return None


def _rerun_group(report: VerifyReport, claims, deltas: dict, suite, target, images, names: list[str],
                 rng: random.Random, tolerance: float, stages: Stages) -> None:
    """EVERY cell group (each eps) run again from scratch (remeasure.rerun_group): re-running one
    group drawn at random let a group made with other settings (200 steps under a 40-step label)
    pass whenever the draw fell on the other group. Stops at the first group that does not reproduce."""
    report.rerun = []
    for eps in sorted(claims.groups(), key=lambda e: claims.groups()[e][0].record.eps):
        cells = claims.groups()[eps]
        stages.stage("protecting", f"eps {eps} again from scratch, attack {cells[0].record.attack} included "
                     f"({len(cells)} cells), then editing and scoring", _rerun_estimate(cells))
        t0 = time.perf_counter()
        got = remeasure.rerun_group(cells, deltas, suite, target, images, names, tolerance)
        _merge(report, got)
        report.rerun += [c.record.cell_id for c in cells]
        if got.problems:
            return
        reproduced = ("every cell's means and every per-image value within the drift's tolerances" if got.drifted
                      else "every per-image value")
        report.checks.append(f"attack re-run: eps {eps} ({len(cells)} cells) run again from scratch: {_same(got)} "
                             f"perturbation, {reproduced} reproduced ({time.perf_counter() - t0:.0f} s)")
        report.checks += got.notes
        report.checks += got.unconfined
        report.rerun_unsandboxed += got.unconfined
        report.warnings += got.drifted


def _suite_images(suite, images, image_names, data, manifest) -> tuple[torch.Tensor, list[str]]:
    if images is None:
        images, names = suite.load_images(data, manifest)
    else:
        names = list(image_names) if image_names is not None else [f"image-{i}" for i in range(len(images))]
    return images.detach().float().cpu(), names


def _check_against_images(report: VerifyReport, claims, entry, suite, images, names) -> tuple[dict, dict]:
    """The records name the suite's images; the perturbations fit them (and are one delta if
    universal); an amortized entry's networks are the ones the records describe."""
    report.problems += claims_mod.image_problems(claims, images, names, suite)
    if not report.ok:
        return {}, {}
    deltas = claims_mod.check_perturbations(claims, entry, suite, images)
    networks = claims_mod.check_networks(claims, entry)
    report.problems += claims.problems
    rec = claims.cells[0].record
    if report.ok:
        report.checks.append("images and perturbations: the suite's images and split; shapes, hashes, norms within "
                             "eps on the 8-bit grid" + (", one universal delta" if rec.universal else "")
                             + (", networks: hashes, attack, config and size" if rec.amortized else ""))
    return deltas, networks


def _static_only(report: VerifyReport, claims, entry, suite, images, image_names, data, manifest) -> None:
    """--no-rerun: everything but the re-measurement (the images too, when they can be loaded)."""
    if images is None and data is None and suite.data != "bundled":
        claims_mod.check_perturbations(claims, entry, suite)
        claims_mod.check_networks(claims, entry)
        report.problems += claims.problems
        if report.ok:
            report.checks.append(f"perturbations: shapes, hashes and norms within eps; images NOT checked (suite "
                                 f"{suite.name!r} needs --data/--manifest)")
    else:
        _check_against_images(report, claims, entry, suite, *_suite_images(suite, images, image_names, data,
                                                                            manifest))
    if report.ok:
        report.checks.append("per-image values NOT re-measured (--no-rerun)")


def _merge(report: VerifyReport, got) -> None:
    report.problems += got.problems
    report.compared += got.compared
    for k, v in got.max_dev.items():
        report.max_deviation[k] = max(report.max_deviation.get(k, 0.0), v)


# --- submit --------------------------------------------------------------------------------------
def submit(folder: Union[str, Path], leaderboard_dir: Union[str, Path] = "leaderboard", name: Optional[str] = None,
           replace: bool = False, **verify_kw) -> tuple[VerifyReport, Optional[Path]]:
    """Verify `folder` and add it as leaderboard/entries/NAME; (report, entry path or None if refused).

    Never destroys: the entry is assembled and verified in a temporary folder next to the others and
    renamed into place; an existing NAME needs `replace=True` and is moved aside until the new entry
    is in place (restored if that fails). Refused: nothing under leaderboard/ changes.
    """
    folder = Path(folder)
    name = name if name is not None else folder.resolve().name
    try:
        entry_schema.check_name("entry name", name)
    except RecordError as exc:
        raise InputError(f"--name: {exc}") from None
    entries = Path(leaderboard_dir) / "entries"
    dest = entries / name
    if (dest.exists() or dest.is_symlink()) and not replace:
        raise InputError(f"entry {name!r} already exists in {entries}; pass --replace to replace it "
                         "(or --name to submit under another name)")
    report = VerifyReport(folder=str(folder))
    try:
        source = entry_schema.scan(folder)
    except RecordError as exc:
        report.problems.append(str(exc))
        return report, None
    created = not entries.exists()
    entries.mkdir(parents=True, exist_ok=True)
    stage = entries / f".submit-{name}-{secrets.token_hex(4)}"
    try:
        stage.mkdir()
        entry_schema.copy_files(source, stage)
        report = verify(stage, **verify_kw)
        report.folder = str(folder)
        if report.ok:
            report.problems += unsandboxed_problems(report)
        if not report.ok:
            return report, None
        clash = _same_method_elsewhere(report.records, entries, name)
        if clash:
            report.problems.append(f"entry {clash!r} already holds {report.records[0].attack!r} on suite "
                                   f"{report.records[0].suite!r}; to update it, submit with --name {clash} --replace")
            return report, None
        staged = entry_schema.scan(stage)
        manifest = entry_schema.build_manifest(staged, name, report.summary())
        with open(stage / entry_schema.MANIFEST, "xb") as f:
            f.write(manifest)
            f.flush()
            os.fsync(f.fileno())
        entry_schema.scan(stage)  # the entry as it will be read: manifest and files agree
        _swap_in(stage, dest)
        return report, dest
    except SpdbenchError as exc:
        report.problems.append(str(exc))
        return report, None
    finally:
        shutil.rmtree(stage, ignore_errors=True)
        if created and not any(entries.iterdir()):
            entries.rmdir()


def unsandboxed_problems(report: VerifyReport) -> list[str]:
    """Why a verified folder may not become an entry: cells made without the sandbox (isolation
    "process": attack code that could read the test photos and rewrite its own records) land only
    when this submit re-ran every one of them itself, in a worker the OS confined. Empty: it may land."""
    loose = [r for r in report.records if r.isolation != "sandbox"]
    if not loose:
        return []
    what = f"{len(loose)} of {len(report.records)} cell(s) were made without the sandbox (isolation {loose[0].isolation!r})"
    missing = [r.cell_id for r in loose if r.cell_id not in set(report.rerun)]
    if missing:
        return [f"{what} and {len(missing)} of them were not re-run here (e.g. {missing[0]}): submit lands such "
                "cells only after re-running them under the sandbox; leave out --no-rerun / rerun=False / "
                "attack_rerun=False"]
    if report.rerun_unsandboxed:
        return [f"{what}, and this machine re-ran them without the sandbox too ({report.rerun_unsandboxed[0]}); "
                "submit them on a Linux machine with Landlock, user namespaces and seccomp (`spdbench doctor`)"]
    return []


def _same_method_elsewhere(records: list[Record], entries: Path, name: str) -> Optional[str]:
    """The name of another (valid) entry holding the same method on the same suite, or None."""
    others = sorted(p for p in entries.iterdir() if p.is_dir() and not p.name.startswith(".") and p.name != name)
    ours = {claims_mod.method_key(r) for r in records}
    for other in others:
        theirs, _ = claims_mod.load_checked([other])
        if ours & {claims_mod.method_key(r) for r in theirs}:
            return other.name
    return None


def _swap_in(stage: Path, dest: Path) -> None:
    """Rename `stage` to `dest`; an existing `dest` is moved aside first and removed only after."""
    aside = None
    if dest.exists() or dest.is_symlink():
        aside = dest.parent / f".replaced-{dest.name}-{secrets.token_hex(4)}"
        os.rename(dest, aside)
    try:
        os.rename(stage, dest)
    except OSError as exc:
        if aside is not None:
            os.rename(aside, dest)
        raise RecordError(f"could not move the new entry into {dest}: {exc.strerror or exc}; nothing changed") from None
    if aside is not None:
        if aside.is_symlink() or not aside.is_dir():
            aside.unlink()
        else:
            shutil.rmtree(aside)
