"""The board's flags and the rules that keep a table honest: rows that are listed, never ranked.

JailbreakBench flags defenses that game its metric; RobustBench lets outside evaluations lower an
entry; pyiqa #253 (NIQE 20.21 then 3.67 on the same files) is why numbers from different metric
versions are never ranked against each other. Here, per ranking row (one method at one budget):
- `floor_reasons`: the suite's invisibility floor (mean imperceptibility PSNR or SSIM of the
  protected photo to the photo below `Suite.floor`) and its benign-edit check (the identity-like
  edit, the empty prompt, destroyed: SSIM between its edit of the protected photo and of the photo
  below the floor). Floors come from the suite registered now (suites.py), not from the records.
- `mixed_reasons`: within one table (suite, norm, eps), the rows whose measurement provenance --
  editing model's weights fingerprint, metric implementations -- differs from the table's (the
  provenance of most rows; ties to the first row in the board's order) are separated with a note.
- `with_challenges`: verified challenges (verify/challenge.py) joined to the records they cover as
  one more purifier block, "challenge:<purifier>", so the per-image worst case over purifiers can only
  go up (the entry only down), and the row names the challenge that lowered it. Purifier
  challenges only: an adaptive challenge (the editor LoRA-fine-tuned against the protection) is
  another threat -- the attacker owns the model -- so `adapted` gives it its own column, "after
  editor fine-tuning", and it lowers neither the worst case nor the rank.
A flagged row keeps its numbers on the page and has no rank; it is sorted after the ranked rows.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from spdbench.errors import SpdbenchError
from spdbench.report.text import PROTECTION
from spdbench.scoring.stats import bootstrap_ci
from spdbench.store.records import Record
from spdbench.suites import Floor, get_suite
from spdbench.verify.challenge import BLOCK_PREFIX, Challenge, mean_ssim
from spdbench.verify.entry import MANIFEST

#: the words that start every reason a row is not ranked (the flags column)
NOT_RANKED = "not ranked"
#: libraries whose version is part of a metric implementation; two records are compared on those
#: both name (records from before a library was listed lack it: unknown is not a difference).
#: spdbench's own version is recorded but not compared: its kernels are pinned by each metric's stated
#: convention (compared) and tested against piq (compared), so a release alone separates nothing
METRIC_LIBRARIES = ("piq", "pyiqa", "scikit-image")


def suite_floor(suite: str) -> Floor:
    """The floor of a registered suite; a suite not registered here has none (no check)."""
    try:
        return get_suite(suite).floor
    except SpdbenchError:
        return Floor()


def _mean_of(recs: Sequence[Record], block: str, metric: str) -> Optional[float]:
    """Mean over prompts of each record's mean per-image value (None where a record lacks it)."""
    means = []
    for r in recs:
        values = getattr(r, block).get(metric) or []
        if not values:
            return None
        means.append(float(np.mean(values)))
    return float(np.mean(means)) if means else None


def floor_reasons(recs: Sequence[Record]) -> list[str]:
    """Why a row's records break their suite's floors, in words (empty: none broken)."""
    floor = suite_floor(recs[0].suite)
    out = []
    for metric, bound, unit in (("psnr", floor.psnr_db, " dB"), ("ssim", floor.ssim, "")):
        got = _mean_of(recs, "imperceptibility", metric) if bound is not None else None
        if got is not None and got < bound:
            out.append(f"{NOT_RANKED}: invisibility floor broken (imperceptibility {metric.upper()} "
                       f"{got:.3g}{unit} < {bound:g}{unit})")
    benign = [r for r in recs if r.prompt_key == floor.benign_prompt] if floor.benign_ssim is not None else []
    got = _mean_of(benign, "protection", "ssim") if benign else None
    if got is not None and got < floor.benign_ssim:
        out.append(f"{NOT_RANKED}: destroys benign edits (SSIM of the {floor.benign_prompt} "
                   f"\"\" edit {got:.3g} < {floor.benign_ssim:g})")
    return out


def editor_fingerprint(rec: Record) -> str:
    """The weights fingerprint of the model whose edits were scored."""
    return (rec.edit_target or rec.target).fingerprint


def metric_versions(rec: Record) -> dict[str, str]:
    """What defines a record's metric numbers: each protection metric's stated convention, and the
    versions of the metric libraries the record's provenance names (`metric_libraries`, and for
    records written before that key, `libraries`: spdbench and piq)."""
    libs = {**(rec.provenance.get("libraries") or {}), **(rec.provenance.get("metric_libraries") or {})}
    out = {f"convention:{m}": rec.metric_conventions.get(m, "") for m in PROTECTION if m in rec.metric_conventions}
    out.update({lib: str(libs[lib]) for lib in METRIC_LIBRARIES if libs.get(lib)})
    return out


def _differences(a: Record, b: Record) -> list[str]:
    """How record a's measurement provenance differs from b's, in words (empty: the same)."""
    out = []
    if editor_fingerprint(a) != editor_fingerprint(b):
        out.append(f"editor weights {editor_fingerprint(a)} (the table's: {editor_fingerprint(b)})")
    va, vb = metric_versions(a), metric_versions(b)
    for key in sorted(set(va) & set(vb)):
        if va[key] != vb[key]:
            what = f"metric convention {key.split(':', 1)[1]}" if key.startswith("convention:") else key
            out.append(f"{what} {va[key][:60]} (the table's: {vb[key][:60]})")
    return out


def mixed_reasons(rows: Sequence[tuple[tuple, Record]]) -> list[list[str]]:
    """Per row ((suite, norm, eps), its first record), in the board's order: why it cannot be ranked
    in its table (measured with another editor or other metric versions than most of the table)."""
    tables: dict[tuple, list[int]] = {}
    for i, (table, _) in enumerate(rows):
        tables.setdefault(table, []).append(i)
    out: list[list[str]] = [[] for _ in rows]
    for members in tables.values():
        ref = _reference(members, rows)
        for i in members:
            diff = _differences(rows[i][1], ref)
            if diff:
                out[i].append(f"{NOT_RANKED}: measured with other versions than this table's rows ("
                              + "; ".join(diff) + ")")
    return out


def _reference(members: Sequence[int], rows: Sequence[tuple[tuple, Record]]) -> Record:
    """The record whose provenance most of a table's rows share (the first such row on a tie)."""
    agree = [sum(not _differences(rows[j][1], rows[i][1]) for j in members) for i in members]
    return rows[members[int(np.argmax(agree))]][1]


def with_challenges(records: Sequence[Record], challenges: Sequence[Challenge]) -> list[Record]:
    """Copies of the records a challenge covers with its values as one more purifier block,
    "challenge:<purifier>" (the photos must be the record's, in its order); the others as they
    are. Two verified challenges of one purifier on one cell: the one with the higher mean SSIM
    (the stronger purifier for that cell: the worst case only goes up)."""
    blocks: dict[str, dict[str, tuple[list[str], dict[str, list[float]]]]] = {}
    for ch in (c for c in challenges if c.challenge_kind == "purifier"):
        for cell in ch.cells:
            have = blocks.setdefault(cell.cell_id, {}).get(ch.block)
            if have is None or mean_ssim(cell.values) > mean_ssim(have[1]):
                blocks[cell.cell_id][ch.block] = (cell.image_names, cell.values)
    out = []
    for r in records:
        extra = {name: values for name, (names, values) in blocks.get(r.cell_id, {}).items()
                 if names == r.image_names}
        out.append(r.model_copy(update={"purified": {**r.purified, **extra}}) if extra else r)
    return out


def covering(recs: Sequence[Record], challenges: Sequence[Challenge]) -> dict[str, list[str]]:
    """Per purifier block, the names of the challenges that cover some record of a row."""
    cells = {r.cell_id for r in recs}
    out: dict[str, list[str]] = {}
    for ch in challenges:
        if ch.challenge_kind == "purifier" and any(c.cell_id in cells for c in ch.cells):
            out.setdefault(ch.block, []).append(ch.name)
    return out


#: the column "after editor fine-tuning" (harness/adaptive.COLUMN): the row's SSIM with the patched editor
ADAPTED = ("adapted_ssim", "adapted_ssim_lo", "adapted_ssim_hi", "adapted_by")


def adapted(recs: Sequence[Record], challenges: Sequence[Challenge], seed: int = 0) -> dict:
    """A row's protection (SSIM) measured with the editor LoRA-fine-tuned against it, from the verified
    adaptive challenges that cover every record of the row (the photos in the record's order): per
    photo averaged over prompts, then a bootstrap interval over photos (the row's own rule). Several:
    the strongest attacker (the highest SSIM), named in `adapted_by`. None covers the row: {}."""
    best: dict = {}
    for ch in (c for c in challenges if c.challenge_kind == "adaptive"):
        cells = {c.cell_id: c for c in ch.cells}
        got = [cells.get(r.cell_id) for r in recs]
        if not recs or any(c is None or c.image_names != r.image_names or not c.values.get("ssim")
                           for c, r in zip(got, recs)):
            continue
        ci = bootstrap_ci(np.mean(np.asarray([c.values["ssim"] for c in got], dtype=np.float64), axis=0), seed=seed)
        if not best or ci.mean > best["adapted_ssim"]:
            best = dict(zip(ADAPTED, (ci.mean, ci.low, ci.high, ch.name)))
    return best


def challenged_by(worst_by: Optional[str], names: Optional[dict[str, list[str]]] = None) -> Optional[str]:
    """The challenges that gave some photo its worst case, from a row's "worst case by" counts
    ("challenge:noisy-upscale 3, jpeg75 1" -> the names of the row's challenges of that purifier,
    `names` as `covering` gives them; without `names`, the purifier); None where no challenge did."""
    blocks = [part.strip().split(" ")[0] for part in (worst_by or "").split(",")
              if part.strip().startswith(BLOCK_PREFIX)]
    found = [n for b in blocks for n in ((names or {}).get(b) or [b[len(BLOCK_PREFIX):]])]
    return ", ".join(dict.fromkeys(found)) or None


def current_challenges(challenges: Sequence[Challenge], records: Sequence[Record],
                       folders: Sequence[str] = ()) -> tuple[list[Challenge], list[tuple[str, str]]]:
    """The verified challenges that still fit the board: every cell they cover is a record here and,
    where the entry folders are known, the entry's manifest is the one the challenge ran against.
    The others as (name, reason): listed on the page, never applied (an entry replaced since)."""
    cells = {r.cell_id for r in records}
    by_name = {Path(f).name: Path(f) for f in folders}
    ok, stale = [], []
    for ch in challenges:
        reason = None
        folder = by_name.get(ch.entry)
        if folders and folder is None:
            reason = f"its entry {ch.entry!r} is not on this board"
        elif folder is not None and _manifest_sha256(folder) != ch.entry_manifest_sha256:
            reason = f"it was run against other files of entry {ch.entry!r} (its manifest changed since)"
        elif any(c.cell_id not in cells for c in ch.cells):
            reason = f"it covers cells entry {ch.entry!r} does not hold on this board"
        if reason:
            stale.append((f"challenge {ch.name}", f"not applied: {reason}"))
        else:
            ok.append(ch)
    return ok, stale


def _manifest_sha256(folder: Path) -> Optional[str]:
    path = folder / MANIFEST
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None
