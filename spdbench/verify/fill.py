"""Metrics an entry was measured without, filled by re-editing (issue 34: adding a metric takes no
entry off the board, and `verify --sample` can fill it).

Why here and not in the records' folder: the committed entry is evidence as it was submitted; a
fill is new evidence, so it goes into a new copy (`verify --fill-metrics DIR`) with its own
manifest, never into the entry in place. A cell gets a metric only when every one of its images
was re-edited (a partial per-image list would be refused by the claim checks and would mislead);
it then holds the metric in every block (protection, imperceptibility, each purifier), its means,
its convention, the flag `filled-by-reedit:<metric>` (visible in the board's flags column) and,
in its provenance, the seed and spdbench version of the re-edit. Region scores of inpainting
suites are not filled (their metric set is fixed, regions.py).
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any, Union

import numpy as np

from spdbench import __version__
from spdbench.errors import InputError
from spdbench.scoring.metrics import METRICS
from spdbench.store.records import Record, atomic_write_bytes
from spdbench.verify import entry as entry_schema
from spdbench.verify.claims import Claims

FLAG = "filled-by-reedit"


def check_dest(dest: Union[str, Path]) -> Path:
    """--fill-metrics DIR: a new folder (never an existing one: nothing is overwritten) whose name
    is a safe entry name; checked before any model is loaded."""
    dest = Path(dest)
    if not str(dest).strip():
        raise InputError("--fill-metrics '' is empty; expected a new folder for the filled copy of the entry")
    if dest.exists():
        raise InputError(f"--fill-metrics {str(dest)!r} already exists; expected a new folder (the filled copy is "
                         "written there, nothing existing is overwritten, the entry itself is never edited)")
    entry_schema.check_name("--fill-metrics folder name", dest.name)
    return dest


def provenance(seed: int) -> dict[str, Any]:
    """What a filled record says about its fill: the command, the draw's seed, the spdbench version."""
    return {"by": "spdbench verify --fill-metrics", "seed": seed, "spdbench": __version__}


def unmeasured_lines(claims: Claims, unmeasured: dict) -> list[str]:
    """One line per metric the records lack: on how many re-edited images of how many cells it was
    measured now, and its protection mean over them (the values themselves are in the report)."""
    per_metric: dict[str, list] = {}
    for rel, blocks in unmeasured.items():
        for m, vals in blocks.get("protection", {}).items():
            per_metric.setdefault(m, []).append((rel, vals))
    lines = []
    for m, cells in sorted(per_metric.items()):
        values = [v for _, vals in cells for v in vals.values()]
        lines.append(f"not measured in the records: {m} (registered after the entry was made) -- re-measured on "
                     f"{len(values)} re-edited image(s) of {len(cells)} cell(s), protection mean "
                     f"{float(np.mean(values)):.4f}; `--fill-metrics DIR` writes a copy that carries it")
    return lines


def values_by_name(claims: Claims, unmeasured: dict) -> dict[str, dict[str, dict[str, dict[str, float]]]]:
    """The re-measured values as data: cell id -> block -> metric -> {image name: value}."""
    cells = {c.rel: c.record for c in claims.ok_cells}
    return {cells[rel].cell_id: {b: {m: {cells[rel].image_names[k]: v for k, v in sorted(vals.items())}
                                     for m, vals in ms.items()} for b, ms in blocks.items()}
            for rel, blocks in unmeasured.items() if rel in cells}


def _complete(rec: Record, blocks: dict) -> list[str]:
    """The metrics measured on every image of the cell in every block it holds."""
    n = len(rec.image_names)
    names = ["protection", "imperceptibility", *sorted(rec.purified)]
    metrics = set.intersection(*(set(blocks.get(b, {})) for b in names))
    return sorted(m for m in metrics if all(len(blocks[b][m]) == n for b in names))


def _filled(rec: Record, blocks: dict, metrics: list[str], provenance: dict) -> Record:
    new = rec.model_copy(deep=True)
    n = len(rec.image_names)
    targets = {"protection": (new.protection, new.protection_mean),
               "imperceptibility": (new.imperceptibility, new.imperceptibility_mean),
               **{p: (new.purified[p], new.purified_mean[p]) for p in new.purified}}
    for m in metrics:
        for b, (values, means) in targets.items():
            values[m] = [blocks[b][m][k] for k in range(n)]
            means[m] = float(np.mean(values[m]))
        new.metric_conventions[m] = METRICS[m].convention
        new.flags.append(f"{FLAG}:{m}")
    new.provenance = {**new.provenance, "filled_by_reedit": {m: provenance for m in metrics}}
    return new


def filled_records(claims: Claims, unmeasured: dict, provenance: dict) -> tuple[dict[str, Record], list[str]]:
    """{cell rel: the record with its unmeasured metrics filled} for every cell whose images were
    all re-edited, and one line per cell left as it was (and why)."""
    out, notes = {}, []
    for c in claims.ok_cells:
        blocks = unmeasured.get(c.rel)
        if not blocks:
            continue
        metrics = _complete(c.record, blocks)
        n = len(c.record.image_names)
        if not metrics:
            got = max((len(v) for v in blocks.get("protection", {}).values()), default=0)
            notes.append(f"{c.rel}: {got} of {n} images re-edited, not filled (pass --sample {n} to fill it)")
            continue
        out[c.rel] = _filled(c.record, blocks, metrics, provenance)
    return out, notes


def write_copy(entry: entry_schema.EntryFiles, records: dict[str, Record], dest: Path,
               verification: dict[str, Any]) -> Path:
    """The entry's files copied into the new folder `dest` (each re-read through the scan's checks),
    the filled records written over their copies, then a new manifest; built in a temporary folder
    beside `dest` and renamed into place, so a failure leaves no half copy."""
    dest = check_dest(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        entry_schema.copy_files(entry, tmp)
        for rel, rec in records.items():
            atomic_write_bytes(tmp / rel, rec.model_dump_json(indent=1).encode())
        manifest = entry_schema.build_manifest(entry_schema.scan(tmp), dest.name, verification)
        atomic_write_bytes(tmp / entry_schema.MANIFEST, manifest)
        tmp.rename(dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest
