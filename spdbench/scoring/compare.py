"""Two methods, same photos: the paired difference of their protection, per budget.

Why its own module: the leaderboard's intervals are per method (each resamples its own images),
so two overlapping intervals do not say whether one method beats the other. On one suite both
methods protect and edit the *same* test photos with the same seeds, so the per-image difference
is what to resample (paired bootstrap, stats.bootstrap_diff_ci). Values are the records' per-image
lists, averaged over prompts per image, as the leaderboard ranks.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from spdbench.errors import InputError
from spdbench.scoring.metrics import METRICS
from spdbench.store.records import Record, Status, method_label
from spdbench.scoring.stats import Interval, bootstrap_diff_ci


@dataclass(frozen=True)
class PairedDifference:
    """mean(a) - mean(b) over the same images, its interval, and which side it falls on."""

    eps_label: str
    metric: str
    a: float
    b: float
    diff: Interval
    n_images: int
    region: str = "whole"  # REGIONS: the whole edit, or an inpainting edit's repainted region

    @property
    def label(self) -> str:
        """The metric and, off the whole edit, where it was measured: "ssim (repainted region)"."""
        return self.metric if self.region == "whole" else f"{self.metric} ({self.region} region)"

    @property
    def verdict(self) -> str:
        """'a stronger' / 'b stronger' when the interval excludes 0, else 'no difference shown'.
        Protection metrics are similarities: lower is stronger."""
        lower_is_stronger = METRICS[self.metric].higher_is_better
        if self.diff.high < 0:
            return "a stronger" if lower_is_stronger else "b stronger"
        if self.diff.low > 0:
            return "b stronger" if lower_is_stronger else "a stronger"
        return "no difference shown"


#: where a protection metric is measured: the whole edit, only what an inpainting edit repainted, or
#: (offline instruction suites, PSNR only) the protected photo's edit against the instruction's exact result
REGIONS = ("whole", "repainted", "ground-truth")


def _values(r: Record, metric: str, region: str) -> list[float]:
    if region == "whole":
        return r.protection[metric]
    if region == "ground-truth":
        if metric != "psnr" or "protected" not in r.ground_truth:
            raise InputError(f"--region ground-truth: record {r.cell_id} needs --metric psnr and a suite with exact "
                             f"instruction results (smoke-instruct); got metric {metric!r}, ground truth "
                             f"{sorted(r.ground_truth) or 'none'}")
        return r.ground_truth["protected"]
    if metric not in r.protection_region:
        raise InputError(f"--region repainted: record {r.cell_id} has no repainted-region {metric} (only "
                         f"inpainting suites have one, with {sorted(r.protection_region) or 'no metric'})")
    return r.protection_region[metric]


def _per_image(records: Sequence[Record], metric: str, region: str = "whole") -> tuple[list[str], np.ndarray]:
    """(image sha256s, per-image values averaged over prompts) of one method's cells at one eps."""
    shas = records[0].image_sha256
    if any(r.image_sha256 != shas for r in records):
        raise InputError("the records of one method and eps disagree on their images")
    rows = [_values(r, metric, region) for r in sorted(records, key=lambda r: r.prompt_key)]
    return list(shas), np.mean(np.asarray(rows, dtype=np.float64), axis=0)


def paired(a: Sequence[Record], b: Sequence[Record], metric: str = "ssim", split: str = "test",
           seed: int = 0, level: float = 0.95, region: str = "whole") -> list[PairedDifference]:
    """Per eps both methods report on `split`: the paired difference a - b of protection `metric`
    on `region` (REGIONS). The two must cover the same images (by sha256) with the same prompts;
    anything else is an error."""
    if metric not in METRICS:
        raise InputError(f"metric {metric!r} is not one of {sorted(METRICS)}")
    if region not in REGIONS:
        raise InputError(f"region {region!r} is not one of {', '.join(REGIONS)}")
    pick = lambda recs: [r for r in recs if r.status == Status.ok and r.split.value == split]  # noqa: E731
    ra, rb = pick(a), pick(b)
    for name, recs in (("a", ra), ("b", rb)):
        if len({method_label(r) for r in recs}) > 1 or len({r.suite for r in recs}) > 1:
            raise InputError(f"records {name} hold several methods or suites; pass one run folder or entry each")
    by_eps = lambda recs: {r.eps_label: [x for x in recs if x.eps_label == r.eps_label] for r in recs}  # noqa: E731
    ea, eb = by_eps(ra), by_eps(rb)
    out = []
    for eps in sorted(set(ea) & set(eb), key=lambda e: ea[e][0].eps):
        if {r.prompt_key for r in ea[eps]} != {r.prompt_key for r in eb[eps]}:
            raise InputError(f"eps {eps}: the two methods were edited with different prompts")
        sha_a, va = _per_image(ea[eps], metric, region)
        sha_b, vb = _per_image(eb[eps], metric, region)
        if sha_a != sha_b:
            raise InputError(f"eps {eps}: the two methods were scored on different {split} images; a paired "
                             "comparison needs the same photos (same suite and split)")
        ci = bootstrap_diff_ci(va, vb, seed=seed, level=level, paired=True)
        out.append(PairedDifference(eps, metric, float(va.mean()), float(vb.mean()), ci, len(va), region))
    if not out:
        raise InputError(f"the two methods share no budget on the {split} split")
    return out


def markdown(name_a: str, name_b: str, rows: Sequence[PairedDifference], level: float = 0.95,
             title: Optional[str] = None) -> str:
    head = title or f"{name_a} (a) vs {name_b} (b), paired by image"
    lines = [head, "", f"| eps | metric | a | b | a - b [{level:.0%} paired bootstrap] | images | verdict |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.eps_label} | {r.label} | {r.a:.4f} | {r.b:.4f} | {r.diff.signed()} | {r.n_images} "
                     f"| {r.verdict} |")
    return "\n".join(lines)
