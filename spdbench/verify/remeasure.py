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
import random
import tempfile
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from spdbench.scoring import metrics
from spdbench.scoring.regions import score_region
from spdbench.verify.claims import Cell, Claims
from spdbench.data.photos import split_indices
from spdbench.harness.editing import EditSettings, Editor
from spdbench.store.perturbations import apply_delta, delta_sha256
from spdbench.purifiers import get_purifier

SPLITS = ("train", "test")


@dataclass
class Measured:
    """What a re-measurement compared, its largest deviations, and what did not reproduce."""

    compared: int = 0
    sampled: dict[str, list[str]] = field(default_factory=dict)   # cell id -> image names re-edited
    max_dev: dict[str, float] = field(default_factory=dict)       # metric -> largest |claimed - measured|
    problems: list[str] = field(default_factory=list)

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


def _values(rec, block: str, metric: str) -> list[float]:
    if block == "protection":
        return rec.protection[metric]
    if block == "imperceptibility":
        return rec.imperceptibility[metric]
    return rec.purified[block][metric]


def sample_cells(claims: Claims, deltas: dict, suite, target, images: torch.Tensor, rng: random.Random,
                 per_cell: int, tolerance: float, masks: Optional[torch.Tensor] = None) -> Measured:
    """Re-edit `per_cell` random images of every cell from its stored perturbation; recompute the
    imperceptibility of every image. Edits of one prompt go in one batched call (an edit call has a
    large fixed cost on CPU; each image keeps its own seed, so batching does not change it).
    On an inpainting suite (`masks`: the suite's mask of every photo) each edit uses its photo's
    mask, and the region scores (repainted region, kept region) are compared too."""
    out = Measured()
    pos = split_positions(len(images), suite.split_seed)
    editor = Editor(target, EditSettings(**suite.edit.to_dict()), cache_dir=None, batch_size=suite.attack_batch_size)
    images = images.to(target.device, torch.float32)
    if masks is not None:
        masks = masks.to(target.device, torch.float32)
    groups = claims.groups()
    picks = draw_all(claims, rng, per_cell)    # cell rel -> positions inside its split
    for c in claims.ok_cells:
        out.sampled[c.record.cell_id] = [c.record.image_names[i] for i in picks[c.rel]]
    jobs: dict[str, dict[tuple, torch.Tensor]] = {}   # prompt -> {(eps, block, image index): image}
    for eps, cells in groups.items():
        if eps not in deltas:
            continue
        adv = apply_delta(images, deltas[eps].to(images.device))
        imp = metrics.score(adv, images)
        kept = score_region({"": adv}, images, 1 - masks)[""] if masks is not None else {}
        purified = {p: get_purifier(p)(adv, target) for p in suite.purifiers}  # every image, as the harness does
        for c in cells:
            idx = pos[c.record.split.value]
            for m in metrics.DEFAULT_METRICS:
                for k, i in enumerate(idx):
                    out.add(f"{c.rel} image {c.record.image_names[k]} imperceptibility", m,
                            c.record.imperceptibility[m][k], imp[m][i], tolerance)
            for m, v in kept.items():  # inpainting: every image's kept-region values too
                claimed = c.record.imperceptibility_kept.get(m, [])
                if len(claimed) != len(idx):
                    out.problems.append(f"{c.rel}: kept-region {m} has {len(claimed)} values for {len(idx)} images")
                    continue
                for k, i in enumerate(idx):
                    out.add(f"{c.rel} image {c.record.image_names[k]} kept region", m, claimed[k], v[i], tolerance)
            job = jobs.setdefault(c.record.prompt, {})
            for k in picks[c.rel]:
                i = idx[k]
                job[("", "clean", i)] = images[i]
                job[(eps, "protection", i)] = adv[i]
                job.update({(eps, p, i): img[i] for p, img in purified.items()})
    for prompt, job in jobs.items():
        keys = list(job)
        edits = editor.edit(torch.stack([job[k] for k in keys]), prompt, [_seed_of(claims, k[2], pos) for k in keys],
                            None if masks is None else torch.stack([masks[k[2]] for k in keys]))
        edited = dict(zip(keys, edits))
        for eps, cells in groups.items():
            pcells = [c for c in cells if c.record.prompt == prompt and eps in deltas]
            order = sorted({pos[c.record.split.value][k] for c in pcells for k in picks[c.rel]})
            if not order:
                continue
            blocks = ["protection", *suite.purifiers]
            distorted = {b: torch.stack([edited[(eps, b, i)] for i in order]) for b in blocks}
            reference = torch.stack([edited[("", "clean", i)] for i in order])
            scored = metrics.score_many(distorted, reference)
            region = score_region(distorted, reference, masks[order]) if masks is not None else {}
            where = {i: n for n, i in enumerate(order)}
            for c in pcells:
                idx = pos[c.record.split.value]
                for k in picks[c.rel]:
                    for block, sc in scored.items():
                        for m in metrics.DEFAULT_METRICS:
                            out.add(f"{c.rel} image {c.record.image_names[k]} {block}", m,
                                    _values(c.record, block, m)[k], sc[m][where[idx[k]]], tolerance)
                    for block, sc in region.items():
                        for m, v in sc.items():
                            claimed = _region_values(c.record, block, m)
                            if len(claimed) != len(idx):
                                out.problems.append(f"{c.rel}: {block} repainted-region {m} has {len(claimed)} values "
                                                    f"for {len(idx)} images")
                                continue
                            out.add(f"{c.rel} image {c.record.image_names[k]} {block} (repainted region)", m,
                                    claimed[k], v[where[idx[k]]], tolerance)
    return out


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
    from math import comb

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
    from spdbench.attacks import get_attack
    from spdbench.budget import Budget
    from spdbench.harness.pipeline import AttackRunner
    from spdbench.store.perturbations import delta_from_adv
    from spdbench.harness.protect import enforce

    out = Measured()
    pos = {n: i for i, n in enumerate(image_names)}
    runner = AttackRunner("process", target, suite.attack_timeout_s)
    try:
        for eps, state in networks.items():
            cells = claims.groups()[eps]
            rec = cells[0].record
            attack = get_attack(rec.attack, **json.loads(json.dumps(rec.attack_params)))
            if not getattr(attack, "amortized", False):
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
            stored = deltas.get(eps)
            if stored is None or not torch.equal(again, stored.to(again.dtype)):
                what = levels_differ(stored, again) if stored is not None else "no stored perturbation"
                out.problems.append(f"eps {eps}: the stored network, re-applied, does not give the stored "
                                    f"perturbation ({what}); a stored perturbation must be what its network makes")
    finally:
        runner.close()
    return out


def rerun_group(cells: Sequence[Cell], deltas: dict, suite, target, images: torch.Tensor,
                image_names: Sequence[str], tolerance: float) -> Measured:
    """Run one cell group (one eps: attack on both splits, every prompt) again through `spdbench.run`
    and compare: the perturbation must be identical (the attack is seeded) and every per-image value
    must reproduce; model-call counts, where recorded, must be equal."""
    from spdbench.harness.pipeline import run

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
    rec = cells[0].record
    fresh = {(r.prompt_key, r.split.value): r for r in result.records}
    failed = [r for r in result.records if r.status.value != "ok"]
    if failed:
        out.problems.append(f"eps {rec.eps_label}: the attack re-run failed: {(failed[0].error or '')[:300]}")
        return
    new_sha = result.records[0].perturbation_sha256
    if new_sha != rec.perturbation_sha256:
        out.problems.append(f"eps {rec.eps_label}: re-running attack {rec.attack!r} gives a different perturbation "
                            f"({_delta_diff(deltas.get(rec.eps_label), result)}); the attack is seeded, so a "
                            "stored perturbation must be what it produces")
        return
    for c in cells:
        r = fresh.get((c.record.prompt_key, c.record.split.value))
        if r is None:
            out.problems.append(f"{c.rel}: the re-run has no such cell")
            continue
        blocks = ["protection", "imperceptibility", *sorted(c.record.purified)]
        for block in blocks:
            for m in metrics.DEFAULT_METRICS:
                for k, (a, b) in enumerate(zip(_values(c.record, block, m), _values(r, block, m))):
                    out.add(f"{c.rel} image {c.record.image_names[k]} {block} (attack re-run)", m, a, b, tolerance)
        regions = {"repainted region": (c.record.protection_region, r.protection_region),
                   "kept region": (c.record.imperceptibility_kept, r.imperceptibility_kept)}
        regions.update({f"{p} repainted region": (c.record.purified_region.get(p, {}), r.purified_region.get(p, {}))
                        for p in c.record.purified_region})
        for where_, (claimed, fresh_) in regions.items():
            if set(claimed) != set(fresh_):
                out.problems.append(f"{c.rel}: {where_} metrics {sorted(claimed)}, the re-run has {sorted(fresh_)}")
                continue
            for m in claimed:
                for k, (a, b) in enumerate(zip(claimed[m], fresh_[m])):
                    out.add(f"{c.rel} image {c.record.image_names[k]} {where_} (attack re-run)", m, a, b, tolerance)
        for key, value in c.record.model_calls.items():
            got = r.model_calls.get(key)
            if got is None or not abs(got - value) <= 1e-6 * max(1.0, abs(value)):
                out.problems.append(f"{c.rel}: model_calls.{key} claimed {value!r}, the re-run counts {got!r}")
                break


def _delta_diff(claimed: Optional[torch.Tensor], result) -> str:
    from spdbench.store.perturbations import load_delta

    try:
        new, _ = load_delta(result.out / result.records[0].perturbation_file)
    except Exception:  # noqa: BLE001 - only a description for the message
        return "the new one could not be read"
    if claimed is None or claimed.shape != new.shape:
        return f"sha256 {delta_sha256(new)[:12]}"
    return levels_differ(claimed, new)


def levels_differ(a: torch.Tensor, b: torch.Tensor) -> str:
    """How two 8-bit perturbations of one shape differ, in words."""
    diff = (a.int() - b.int()).abs()
    return f"{float((diff > 0).float().mean()):.1%} of values differ, by up to {int(diff.max())} levels"
