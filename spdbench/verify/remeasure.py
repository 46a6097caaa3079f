"""Re-measure an entry's numbers: the claims checked in claims.py are consistent; these are *true*.

Two kinds of evidence, both drawn with the caller's random generator (verify seeds it
unpredictably and records the seed):
- `sample_cells`: from EVERY cell, `per_cell` random images are re-edited from the stored
  perturbation (clean edit, protected edit, every purifier) and all their per-image metrics are
  compared with the record; imperceptibility (no edit needed) is recomputed for every image.
- `reapply_networks`: an amortized entry's stored networks applied again (every image) must give
  the stored perturbations bit for bit;
- `rerun_group`: one random cell group (one eps: the attack on both splits, every prompt) is run
  again from scratch through the public `spdbench.run`; the attack is seeded, so its perturbation
  must be identical, and every per-image value of the group must reproduce.
A value matches when |claimed - measured| <= tolerance (x100 for PSNR in dB); written as
`not (diff <= tol)`, so a NaN never matches.
"""
from __future__ import annotations

import json
import math
import random
import tempfile
from dataclasses import dataclass, field
from math import comb
from typing import Callable, Optional, Sequence

import torch

from spdbench.scoring import metrics
from spdbench.scoring.regions import score_region
from spdbench.verify.claims import Cell, Claims
from spdbench.data.photos import split_indices
from spdbench.harness.editing import EditSettings, Editor
from spdbench.store.perturbations import apply_delta, delta_from_adv, load_delta
from spdbench.purifiers import get_purifier
from spdbench.budget import Budget
from spdbench.harness.pipeline import AttackRunner, run
from spdbench.harness.plan import installed_attack
from spdbench.harness.protect import enforce

SPLITS = ("train", "test")


@dataclass
class Measured:
    """What a re-measurement compared, its largest deviations, and what did not reproduce."""

    compared: int = 0
    sampled: dict[str, list[str]] = field(default_factory=dict)   # cell id -> image names re-edited
    max_dev: dict[str, float] = field(default_factory=dict)       # metric -> largest |claimed - measured|
    problems: list[str] = field(default_factory=list)
    #: perturbations re-made up to float rounding at the 8-bit grid (`reproduces`), in words
    notes: list[str] = field(default_factory=list)
    #: registered metrics a record does not hold (measured before they existed), re-measured on the
    #: re-edited images: cell rel -> block -> metric -> {image position in the cell: value} (fill.py)
    unmeasured: dict[str, dict[str, dict[str, dict[int, float]]]] = field(default_factory=dict)
    #: re-runs whose worker could not be sandboxed on this machine, in words (shown, never silent)
    unconfined: list[str] = field(default_factory=list)
    #: re-made perturbations that drifted beyond float rounding (`drifted`), accepted only because every
    #: per-image value the re-run measured reproduced; in words (shown as a warning, never as ok)
    drifted: list[str] = field(default_factory=list)

    def keep_unmeasured(self, rel: str, block: str, metric: str, k: int, value: float) -> None:
        self.unmeasured.setdefault(rel, {}).setdefault(block, {}).setdefault(metric, {})[k] = float(value)

    def add(self, where: str, metric: str, claimed: float, got: float, tolerance: float) -> None:
        tol = tolerance * (100 if metric == "psnr" else 1)
        diff = abs(float(claimed) - float(got))
        self.compared += 1
        if diff == diff:  # NaN never raises the maximum, it is a problem below
            self.max_dev[metric] = max(self.max_dev.get(metric, 0.0), diff)
        if not diff <= tol and len(self.problems) < 20:
            self.problems.append(f"{where} {metric} does not reproduce: claimed {claimed!r}, re-measured "
                                 f"{float(got):.6g} (tolerance {tol:g})")


def split_positions(n_images: int, split_seed: int) -> dict[str, list[int]]:
    train, test = split_indices(n_images, split_seed)
    return {"train": train, "test": test}


def _block(rec, block: str) -> dict[str, list[float]]:
    """A record's per-image values of one block: protection, imperceptibility or a purifier's name."""
    if block == "protection":
        return rec.protection
    if block == "imperceptibility":
        return rec.imperceptibility
    return rec.purified[block]


def _values(rec, block: str, metric: str) -> list[float]:
    return _block(rec, block)[metric]


def _held(values: dict) -> list[str]:
    """The registered metrics a record's block holds, in registry order: each is re-measured and
    compared (an entry measured before a metric existed lacks it, and is compared on the rest)."""
    return [m for m in metrics.list_metrics() if m in values]


def _unheld(values: dict, scored: dict) -> list[str]:
    """The registered metrics just measured that a record's block lacks (registered after it was made)."""
    return [m for m in metrics.list_metrics() if m in scored and m not in values]


@dataclass
class _Draw:
    """What one re-measurement compares against: each split's image positions, each cell's drawn
    images (positions inside its split), the tolerance, and where results go."""

    out: Measured
    pos: dict[str, list[int]]
    picks: dict[str, list[int]]
    tolerance: float


def sample_cells(claims: Claims, deltas: dict, suite, target, images: torch.Tensor, rng: random.Random,
                 per_cell: int, tolerance: float, masks: Optional[torch.Tensor] = None,
                 on_prompt: Optional[Callable[[], object]] = None) -> Measured:
    """Re-edit `per_cell` random images of every cell from its stored perturbation; recompute the
    imperceptibility of every image. Edits of one prompt go in one batched call (an edit call has a
    large fixed cost on CPU; each image keeps its own seed, so batching does not change it).
    On an inpainting suite (`masks`: the suite's mask of every photo) each edit uses its photo's
    mask, and the region scores (repainted region, kept region) are compared too. `on_prompt` is
    called after each prompt's edits (the verify stage's "k/n prompts done, about N s left")."""
    d = _Draw(Measured(), split_positions(len(images), suite.split_seed), {}, tolerance)
    editor = Editor(target, EditSettings(**suite.edit.to_dict()), cache_dir=None, batch_size=suite.attack_batch_size)
    images = images.to(target.device, torch.float32)
    if masks is not None:
        masks = masks.to(target.device, torch.float32)
    groups = claims.groups()
    d.picks = draw_all(claims, rng, per_cell)    # cell rel -> positions inside its split
    for c in claims.ok_cells:
        d.out.sampled[c.record.cell_id] = [c.record.image_names[i] for i in d.picks[c.rel]]
    jobs: dict[str, dict[tuple, torch.Tensor]] = {}   # prompt -> {(eps, block, image index): image}
    for eps, cells in groups.items():
        if eps in deltas:
            _check_budget(d, eps, cells, images, deltas[eps], masks, suite, target, jobs)
    for prompt, job in jobs.items():
        edited = _edit_job(editor, claims, d.pos, prompt, job, masks)
        for eps, cells in groups.items():
            pcells = [c for c in cells if c.record.prompt == prompt and eps in deltas]
            _compare_edits(d, eps, pcells, edited, suite.purifiers, masks)
        if on_prompt is not None:
            on_prompt()
    return d.out


def _check_budget(d: _Draw, eps: str, cells: Sequence[Cell], images: torch.Tensor, delta: torch.Tensor,
                  masks: Optional[torch.Tensor], suite, target, jobs: dict[str, dict[tuple, torch.Tensor]]) -> None:
    """One budget: apply its stored perturbation, compare every image's imperceptibility (and kept
    region), and queue the drawn images' edits (clean, protected, each purifier) under their prompt."""
    adv = apply_delta(images, delta.to(images.device))
    imp = metrics.score(adv, images)
    kept = score_region({"": adv}, images, 1 - masks)[""] if masks is not None else {}
    purified = {p: get_purifier(p)(adv, target) for p in suite.purifiers}  # every image, as the harness does
    for c in cells:
        idx = d.pos[c.record.split.value]
        _compare_imperceptibility(d, c, idx, imp)
        _compare_kept(d, c, idx, kept)
        job = jobs.setdefault(c.record.prompt, {})
        for k in d.picks[c.rel]:
            i = idx[k]
            job[("", "clean", i)] = images[i]
            job[(eps, "protection", i)] = adv[i]
            job.update({(eps, p, i): img[i] for p, img in purified.items()})


def _compare_imperceptibility(d: _Draw, c: Cell, idx: list[int], imp: dict) -> None:
    """Every image's imperceptibility (no edit needed) against the record; a metric the record
    does not hold is kept for every image (`Measured.unmeasured`)."""
    for m in _held(c.record.imperceptibility):
        for k, i in enumerate(idx):
            d.out.add(f"{c.rel} image {c.record.image_names[k]} imperceptibility", m,
                      c.record.imperceptibility[m][k], imp[m][i], d.tolerance)
    for m in _unheld(c.record.imperceptibility, imp):
        for k, i in enumerate(idx):
            d.out.keep_unmeasured(c.rel, "imperceptibility", m, k, imp[m][i])


def _compare_kept(d: _Draw, c: Cell, idx: list[int], kept: dict) -> None:
    """Inpainting: every image's kept-region values against the record (a wrong count is a problem)."""
    for m, v in kept.items():
        claimed = c.record.imperceptibility_kept.get(m, [])
        if len(claimed) != len(idx):
            d.out.problems.append(f"{c.rel}: kept-region {m} has {len(claimed)} values for {len(idx)} images")
            continue
        for k, i in enumerate(idx):
            d.out.add(f"{c.rel} image {c.record.image_names[k]} kept region", m, claimed[k], v[i], d.tolerance)


def _edit_job(editor: Editor, claims: Claims, pos: dict[str, list[int]], prompt: str,
              job: dict[tuple, torch.Tensor], masks: Optional[torch.Tensor]) -> dict[tuple, torch.Tensor]:
    """Every queued image of one prompt edited in one batched call, each with its recorded seed."""
    keys = list(job)
    edits = editor.edit(torch.stack([job[k] for k in keys]), prompt, [_seed_of(claims, k[2], pos) for k in keys],
                        None if masks is None else torch.stack([masks[k[2]] for k in keys]))
    return dict(zip(keys, edits))


def _compare_edits(d: _Draw, eps: str, pcells: Sequence[Cell], edited: dict[tuple, torch.Tensor],
                   purifiers: Sequence[str], masks: Optional[torch.Tensor]) -> None:
    """One budget and prompt: score the drawn images' protected (and purified) edits against their
    clean edits, and compare with each cell's record, whole image and repainted region."""
    order = sorted({d.pos[c.record.split.value][k] for c in pcells for k in d.picks[c.rel]})
    if not order:
        return
    blocks = ["protection", *purifiers]
    distorted = {b: torch.stack([edited[(eps, b, i)] for i in order]) for b in blocks}
    reference = torch.stack([edited[("", "clean", i)] for i in order])
    scored = metrics.score_many(distorted, reference)
    region = score_region(distorted, reference, masks[order]) if masks is not None else {}
    where = {i: n for n, i in enumerate(order)}
    for c in pcells:
        idx = d.pos[c.record.split.value]
        for k in d.picks[c.rel]:
            _compare_scored(d, c, k, where[idx[k]], scored)
            _compare_region(d, c, k, len(idx), where[idx[k]], region)


def _compare_scored(d: _Draw, c: Cell, k: int, n: int, scored: dict) -> None:
    """Image k of cell c (row n of the scores): each block's whole-image metrics against the record;
    a metric the record does not hold is kept (`Measured.unmeasured`)."""
    for block, sc in scored.items():
        for m in _held(_block(c.record, block)):
            d.out.add(f"{c.rel} image {c.record.image_names[k]} {block}", m,
                      _values(c.record, block, m)[k], sc[m][n], d.tolerance)
        for m in _unheld(_block(c.record, block), sc):
            d.out.keep_unmeasured(c.rel, block, m, k, sc[m][n])


def _compare_region(d: _Draw, c: Cell, k: int, n_images: int, n: int, region: dict) -> None:
    """Image k of cell c (row n of the scores): each block's repainted-region metrics against the
    record (a record with another count of values is a problem)."""
    for block, sc in region.items():
        for m, v in sc.items():
            claimed = _region_values(c.record, block, m)
            if len(claimed) != n_images:
                d.out.problems.append(f"{c.rel}: {block} repainted-region {m} has {len(claimed)} values "
                                      f"for {n_images} images")
                continue
            d.out.add(f"{c.rel} image {c.record.image_names[k]} {block} (repainted region)", m,
                      claimed[k], v[n], d.tolerance)


def _region_values(rec, block: str, metric: str) -> list[float]:
    """A record's per-image repainted-region values of `block` ("protection" or a purifier)."""
    if block == "protection":
        return rec.protection_region.get(metric, [])
    return rec.purified_region.get(block, {}).get(metric, [])


def draw(n: int, k: int, rng: random.Random) -> list[int]:
    """k of n positions, uniformly without replacement (all n when k >= n)."""
    return sorted(rng.sample(range(n), min(k, n)))


def draw_all(claims: Claims, rng: random.Random, per_cell: int) -> dict[str, list[int]]:
    """The draw for every cell, in a fixed order (budget, then file name), so a seed repeats it."""
    return {c.rel: draw(len(c.record.image_names), per_cell, rng)
            for cells in claims.groups().values() for c in cells}


def catch_probability(n: int, k: int, tampered: int = 1) -> float:
    """Chance that a draw of k of a cell's n images includes at least one of `tampered` altered
    per-image values (hypergeometric): 1 - C(n - t, k) / C(n, k); k / n for one value."""
    k = min(k, n)
    return 1.0 - comb(n - tampered, k) / comb(n, k)


def _seed_of(claims: Claims, i: int, pos: dict[str, list[int]]) -> int:
    """The edit seed of global image i, from the records (checked against the images beforehand)."""
    for split, idx in pos.items():
        if i in idx:
            rec = next(c.record for c in claims.ok_cells if c.record.split.value == split)
            return rec.edit_seeds[idx.index(i)]
    raise KeyError(i)


def reapply_networks(claims: Claims, networks: dict, deltas: dict, suite, target, images: torch.Tensor,
                     image_names: Sequence[str]) -> Measured:
    """An amortized entry's stored networks, each rebuilt by the installed attack class from the
    records' params, loaded with the stored weights and applied again to every image of its group in
    a worker process (the network is attack code), split by split as the harness applied it; after
    the harness's own projection and quantization the perturbation must be the stored one, bit for
    bit. What the network was fit on is checked by `rerun_group` (the fit is re-run there)."""
    out = Measured()
    pos = {n: i for i, n in enumerate(image_names)}
    runner = AttackRunner("sandbox", target, suite.attack_timeout_s)
    try:
        for eps, state in networks.items():
            cells = claims.groups()[eps]
            rec = cells[0].record
            attack = installed_attack(rec.attack, rec.attack_params)  # a plugin: described by a worker, not imported
            if attack.kind != "amortized":
                out.problems.append(f"eps {eps}: attack {rec.attack!r} installed here is not amortized")
                continue
            idx = {c.record.split.value: [pos[n] for n in c.record.image_names] for c in cells}
            budget = Budget(rec.norm, rec.eps)
            jobs = {"fit": {"network": state}}
            jobs.update({sp: {"images": images[i], "seed": suite.attack_seed} for sp, i in idx.items()})
            try:
                outputs, _ = runner.run(attack, budget, jobs, suite.attack_batch_size)
            except Exception as exc:  # noqa: BLE001 - any failure of the attack's code is a refusal
                out.problems.append(f"eps {eps}: re-applying the stored network failed: {exc}")
                continue
            adv = images.clone()
            for sp, i in idx.items():
                adv[i] = enforce(outputs[sp].delta.to(images.device), images[i], budget, rec.attack)[0]
            again = delta_from_adv(adv, images)
            _note_reproduction(out, f"eps {eps}: the stored network, re-applied,", "does not give the stored perturbation",
                               deltas.get(eps), again, "a stored perturbation must be what its network makes")
    finally:
        runner.close()
    return out


def rerun_group(cells: Sequence[Cell], deltas: dict, suite, target, images: torch.Tensor,
                image_names: Sequence[str], tolerance: float) -> Measured:
    """Run one cell group (one eps: attack on both splits, every prompt) again through `spdbench.run`
    and compare: the perturbation must be identical (the attack is seeded) and every per-image value
    must reproduce; model-call counts, where recorded, must be equal."""
    out = Measured()
    rec = cells[0].record
    with tempfile.TemporaryDirectory(prefix="spdbench-verify-") as tmp:
        result = run(rec.attack, suite=suite, eps=[rec.eps_label], out=tmp, norm=rec.norm,
                     attack_params=json.loads(json.dumps(rec.attack_params)), prompts=list(suite.prompts),
                     target=target, images=images, image_names=list(image_names),
                     purifiers=list(suite.purifiers), resume=False)
        _compare_rerun(cells, deltas, result, tolerance, out)
    return out


def _compare_rerun(cells: Sequence[Cell], deltas: dict, result, tolerance: float, out: Measured) -> None:
    """The re-run must succeed with the stored perturbation, then every cell must reproduce. The
    re-run's own confinement is reported: where this machine could not sandbox the worker, the note
    says so (the entry's numbers were then reproduced by attack code with the user's authority)."""
    _note_rerun_isolation(cells[0].record, result, out)
    if not _rerun_matches_perturbation(cells[0].record, deltas, result, out):
        return
    fresh = {(r.prompt_key, r.split.value): r for r in result.records}
    # a re-made perturbation that is not bit for bit the stored one (rounding or drift): a purifier's
    # values are compared more loosely (DRIFT_PURIFIED_TOLERANCE): JPEG's quantization turns even
    # one level on a few values into a visible step of its own
    remade = result.records[0].perturbation_sha256 != cells[0].record.perturbation_sha256
    loose = max(tolerance, DRIFT_PURIFIED_TOLERANCE) if remade else tolerance
    # under drift each photo's value at DRIFT_VALUE_TOLERANCE, and each cell's mean (the board's
    # number) at the verification's own tolerance
    per_image = max(tolerance, DRIFT_VALUE_TOLERANCE) if out.drifted else tolerance
    for c in cells:
        r = fresh.get((c.record.prompt_key, c.record.split.value))
        if r is None:
            out.problems.append(f"{c.rel}: the re-run has no such cell")
            continue
        _compare_rerun_values(c, r, per_image, out, loose)
        _compare_rerun_regions(c, r, per_image, out, loose)
        _compare_rerun_ground_truth(c, r, per_image, out)
        if out.drifted:
            _compare_rerun_means(c, r, tolerance, out)
        _compare_model_calls(c, r, out)
    if out.drifted and out.problems:  # drift is accepted only where the outcome reproduces
        out.problems.insert(0, f"{out.drifted.pop()}; but the re-run's per-image values do not reproduce (below)")


def _note_rerun_isolation(rec, result, out: Measured) -> None:
    """One line per budget group re-run without the sandbox (never silently ok)."""
    loose = sorted({(r.isolation, str((r.isolation_detail or {}).get("reason", ""))) for r in result.records
                    if r.isolation != "sandbox"})
    for isolation, reason in loose:
        out.unconfined.append(f"WARNING eps {rec.eps_label}: the re-run's worker was NOT sandboxed (isolation {isolation}"
                         + (f": {reason}" if reason else "") + "); its attack code ran with this user's authority")


def _rerun_matches_perturbation(rec, deltas: dict, result, out: Measured) -> bool:
    """False (with the problem) where the re-run failed or made another perturbation than the stored one."""
    failed = [r for r in result.records if r.status.value != "ok"]
    if failed:
        out.problems.append(f"eps {rec.eps_label}: the attack re-run failed: {(failed[0].error or '')[:300]}")
        return False
    if result.records[0].perturbation_sha256 != rec.perturbation_sha256:
        stored, again = deltas.get(rec.eps_label), _rerun_delta(result)
        what = f"eps {rec.eps_label}: re-running attack {rec.attack!r}"
        ok, how = reproduces(stored, again, sign_flip_levels(rec))
        if not ok and drifted(rec, stored, again):
            out.drifted.append(f"DRIFT {what} gives a perturbation that drifted beyond float rounding ({how}; an "
                               f"iterative attack on another machine may differ on up to {DRIFT_FRACTION:.0%} of the "
                               "values), accepted because the re-run's values reproduce the claimed ones (each cell's "
                               f"means within the tolerance; each photo's within {DRIFT_VALUE_TOLERANCE:g}, a "
                               f"purifier's within {DRIFT_PURIFIED_TOLERANCE:g}: JPEG quantizes)")
            return True
        return _record_reproduction(out, what, "gives a different perturbation", ok, how,
                                    "the attack is seeded, so a stored perturbation must be what it produces",
                                    sign_flip_levels(rec))
    return True


def _compare_rerun_values(c: Cell, r, tolerance: float, out: Measured, purified_tolerance: float) -> None:
    """Every per-image whole-image value (protection, imperceptibility, each purifier) of one cell."""
    for block in ["protection", "imperceptibility", *sorted(c.record.purified)]:
        tol = tolerance if block in ("protection", "imperceptibility") else purified_tolerance
        for m in _held(_block(c.record, block)):
            for k, (a, b) in enumerate(zip(_values(c.record, block, m), _values(r, block, m))):
                out.add(f"{c.rel} image {c.record.image_names[k]} {block} (attack re-run)", m, a, b, tol)


def _compare_rerun_means(c: Cell, r, tolerance: float, out: Measured) -> None:
    """Under drift: each cell's mean of every protection and imperceptibility value (whole image and,
    on inpainting, the repainted and kept regions) at the verification's tolerance."""
    blocks = {"protection": (c.record.protection, r.protection),
              "imperceptibility": (c.record.imperceptibility, r.imperceptibility), **_region_blocks(c, r)}
    for where_, (claimed, fresh_) in blocks.items():
        for m in _held(claimed):
            a, b = claimed[m], fresh_.get(m, [])
            if a and len(a) == len(b):
                out.add(f"{c.rel} {where_} mean over {len(a)} photos (attack re-run, drift)", m,
                        sum(a) / len(a), sum(b) / len(b), tolerance)


def _region_blocks(c: Cell, r) -> dict[str, tuple[dict, dict]]:
    """The (claimed, re-run) region values of one cell: the repainted and the kept region."""
    return {"repainted region": (c.record.protection_region, r.protection_region),
            "kept region": (c.record.imperceptibility_kept, r.imperceptibility_kept)}


def _compare_rerun_regions(c: Cell, r, tolerance: float, out: Measured, purified_tolerance: float) -> None:
    """Every per-image region value (repainted, kept, repainted after each purifier) of one cell; the
    two must have the same metrics."""
    regions = _region_blocks(c, r)
    purified = {f"{p} repainted region": (c.record.purified_region.get(p, {}), r.purified_region.get(p, {}))
                for p in c.record.purified_region}
    regions.update(purified)
    for where_, (claimed, fresh_) in regions.items():
        if set(claimed) != set(fresh_):
            out.problems.append(f"{c.rel}: {where_} metrics {sorted(claimed)}, the re-run has {sorted(fresh_)}")
            continue
        for m in claimed:
            for k, (a, b) in enumerate(zip(claimed[m], fresh_[m])):
                out.add(f"{c.rel} image {c.record.image_names[k]} {where_} (attack re-run)", m, a, b,
                        purified_tolerance if where_ in purified else tolerance)


def _compare_rerun_ground_truth(c: Cell, r, tolerance: float, out: Measured) -> None:
    """Ground-truth edit success (offline instruction suites, scoring/ground_truth.py), per image, at
    PSNR's tolerance; the two must hold the same series."""
    if set(c.record.ground_truth) != set(r.ground_truth):
        out.problems.append(f"{c.rel}: ground truth {sorted(c.record.ground_truth)}, the re-run has {sorted(r.ground_truth)}")
        return
    for series, claimed in c.record.ground_truth.items():
        for k, (a, b) in enumerate(zip(claimed, r.ground_truth[series])):
            out.add(f"{c.rel} image {c.record.image_names[k]} ground truth {series} (attack re-run)", "psnr", a, b,
                    tolerance)


def _compare_model_calls(c: Cell, r, out: Measured) -> None:
    """Model-call counts, where recorded, must be equal (the first difference is the problem)."""
    for key, value in c.record.model_calls.items():
        got = r.model_calls.get(key)
        if got is None or not abs(got - value) <= 1e-6 * max(1.0, abs(value)):
            out.problems.append(f"{c.rel}: model_calls.{key} claimed {value!r}, the re-run counts {got!r}")
            break


def _rerun_delta(result) -> Optional[torch.Tensor]:
    """The re-run's perturbation, or None where it cannot be read."""
    try:
        return load_delta(result.out / result.records[0].perturbation_file)[0]
    except Exception:  # noqa: BLE001 - None is then a refusal
        return None


#: a re-made perturbation may differ from the stored one by one 8-bit level on at most this fraction
#: of its values. Why: x + delta is rounded to the grid, and float rounding that differs between
#: machines (BLAS kernels, thread counts; in a fit, 40 Adam steps of it) moves a value sitting on a
#: half level to the other side. Measured: smoke-amortized-encoder's 8/255 fit re-run on another
#: machine gave weights 2e-6 apart and 8 of 540,672 values (0.0015%) one level off. One level on 0.1%
#: of the values moves no metric beyond the tolerance and cannot carry a perturbation of its own.
REPRODUCE_TIE_FRACTION = 1e-3


def sign_flip_levels(rec) -> int:
    """The largest difference (8-bit levels) one flipped sign step makes in a sign-PGD attack: 2 x
    its step size. Why: on another CPU the float sums differ in the last bits, and a gradient
    component within rounding of zero takes the other sign at one step; at smoke 16/255 (step 1/255)
    that is 2 levels on 20 of 540,672 values (smoke-mist, measured on two machines with the same
    code). Other attacks (Adam, L2, no steps) keep the one-level rule."""
    params = getattr(rec, "attack_params", None) or {}
    steps = params.get("steps")
    if getattr(rec, "norm", None) != "linf" or not isinstance(steps, int) or params.get("optimizer", "pgd") != "pgd":
        return 1
    step = params.get("step_size")
    step = float(step) if isinstance(step, (int, float)) else 2.5 * float(rec.eps) / max(steps, 1)
    return max(1, math.ceil(2 * step * 255 - 1e-6))


#: an iterative attack's re-made perturbation may differ from the stored one on at most this fraction
#: of its values (by any amount within the budget) and still be accepted -- with a DRIFT warning, and
#: only where every per-image value the re-run measures reproduces the claimed one. Why: a step's
#: sign or Adam's direction taken on a gradient within rounding of zero differs between machines,
#: and later steps carry it on. Measured: smoke-transfer-sds-minus (40 sign steps of 1/255, one
#: random timestep per step) made on one machine and re-run on two others with the same code:
#: 8/255 differs on 19 of 540,672 values (0.0035%, 1 level), 16/255 on 1,165 (0.2155%, up to
#: 4 levels). A perturbation that is materially another one cannot hide here: the stored one is
#: re-edited (`sample_cells`) and the re-run's own numbers must equal the claims.
DRIFT_FRACTION = 1e-2
#: where the re-made perturbation is not bit for bit the stored one (float rounding or drift), a
#: purifier's per-image values (whole image and repainted region) are compared at this tolerance
#: (x100 for PSNR) instead of the verification's: JPEG quantizes, so a few levels moved can move a
#: block across a quantization step. Measured: the sds-minus drift above moved one photo's JPEG
#: q70/q75 VIFp by up to 0.019 (protection and imperceptibility within 2e-3); smoke-sds-t at 8/255,
#: re-made up to rounding, moved the same photo's JPEG q70 VIFp by 0.0030.
#: Every purified value of the *stored* perturbation is still compared at the verification's
#: tolerance on the re-edited sample (`sample_cells`).
DRIFT_PURIFIED_TOLERANCE = 5e-2
#: under drift, each photo's protection and imperceptibility value is compared at this tolerance
#: (x100 for PSNR: 1 dB), and each cell's MEAN -- what the board ranks -- at the verification's
#: own (2e-3). Measured: smoke-transfer-sds-minus's 16/255 drift kept every value within 2e-3;
#: smoke-sds-t's (1,167 of 540,672 values, 0.2158%, up to 4 levels) moved one photo's protection
#: VIFp by 0.004 (0.2100 -> 0.2140), its cell's mean by less than 0.001.
DRIFT_VALUE_TOLERANCE = 1e-2


def drifted(rec, stored: Optional[torch.Tensor], again: Optional[torch.Tensor]) -> bool:
    """Whether `again`, which `reproduces` refused, differs from `stored` only by the drift an
    iterative attack (one with integer `steps`) accumulates across machines: same shape, at most
    DRIFT_FRACTION of the values."""
    params = getattr(rec, "attack_params", None) or {}
    if stored is None or again is None or stored.shape != again.shape or not isinstance(params.get("steps"), int):
        return False
    return float(((stored.int() - again.int()) != 0).double().mean()) <= DRIFT_FRACTION


def reproduces(stored: Optional[torch.Tensor], again: Optional[torch.Tensor],
               max_levels: int = 1) -> tuple[bool, str]:
    """(whether `again` is `stored` up to float rounding at the 8-bit grid -- at most `max_levels`
    (one level, or one flipped sign step: `sign_flip_levels`), on at most REPRODUCE_TIE_FRACTION of
    the values --, how they differ in words; "" when identical)."""
    if stored is None or again is None:
        return False, "no stored perturbation" if stored is None else "the new one could not be read"
    if stored.shape != again.shape:
        return False, f"shape {tuple(again.shape)}, the stored one {tuple(stored.shape)}"
    diff = (stored.int() - again.int()).abs()
    if not bool(diff.any()):
        return True, ""
    within = int(diff.max()) <= max_levels and float((diff > 0).double().mean()) <= REPRODUCE_TIE_FRACTION
    return within, levels_differ(stored, again, precise=True)


def _note_reproduction(out: Measured, what: str, refusal: str, stored, again, why: str, max_levels: int = 1) -> bool:
    """Compare with `reproduces`: a difference beyond float rounding is the problem "WHAT REFUSAL
    (how); WHY", one within it a note (the verification report says it). Returns whether it reproduced."""
    ok, how = reproduces(stored, again, max_levels)
    return _record_reproduction(out, what, refusal, ok, how, why, max_levels)


def _record_reproduction(out: Measured, what: str, refusal: str, ok: bool, how: str, why: str,
                         max_levels: int = 1) -> bool:
    """`reproduces`'s verdict (`ok`, `how`) kept in `out`: a problem where refused, a note where it
    reproduced only up to float rounding. Returns `ok`."""
    if not ok:
        out.problems.append(f"{what} {refusal} ({how}); {why}")
    elif how:
        out.notes.append(f"{what} gives the stored perturbation up to float rounding at the 8-bit grid ({how}; "
                         f"at most {'one level' if max_levels == 1 else f'{max_levels} levels (one flipped sign step)'} "
                         f"on {REPRODUCE_TIE_FRACTION:.1%} of the values is accepted)")
    return ok


def levels_differ(a: torch.Tensor, b: torch.Tensor, precise: bool = False) -> str:
    """How two 8-bit perturbations of one shape differ, in words (`precise`: the count too, for
    differences far below 0.1%)."""
    diff = (a.int() - b.int()).abs()
    n = int((diff > 0).sum())
    share = n / diff.numel()
    count = f"{n:,} of {diff.numel():,} values ({share:.4%})" if precise else f"{share:.1%} of values"
    return f"{count} differ, by up to {int(diff.max())} levels"
