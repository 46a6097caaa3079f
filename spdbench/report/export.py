"""Per-image export: every record's per-image values as one flat table (issue 37).

Why: the board shows means with intervals; a reader who wants to re-analyse (another statistic, a
subset of photos, a paired test of their own) needs the values the means come from, in a format
any tool reads. One row per (record, photo), columns in a fixed order:

- identity: entry, cell_id, attack, preset, params (JSON of the non-preset parameters), kind,
  suite, task, target, target_fingerprint, norm, eps, eps_label, split, prompt_key, image_index,
  image_name, image_sha256, status;
- values: `protection.<metric>`, `imperceptibility.<metric>`, `protection_region.<metric>`,
  `imperceptibility_kept.<metric>`, `purified.<purifier>.<metric>` -- one column per value the
  records hold, sorted by name after the identity columns.

The schema only grows: a new metric or purifier adds columns, none is renamed or removed
(documented in leaderboard/README.md). CSV always; Parquet too where pandas has an engine.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

import pandas as pd

from spdbench.store.records import Record, attack_kind

IDENTITY = ("entry", "cell_id", "attack", "preset", "params", "kind", "suite", "task", "target",
            "target_fingerprint", "norm", "eps", "eps_label", "split", "prompt_key", "image_index",
            "image_name", "image_sha256", "status")
#: record fields holding {metric: per-image list}, exported as "<field>.<metric>"
PER_IMAGE_FIELDS = ("protection", "imperceptibility", "protection_region", "imperceptibility_kept")


def _values(rec: Record, i: int) -> dict[str, float]:
    out: dict[str, float] = {}
    for field in PER_IMAGE_FIELDS:
        for metric, values in getattr(rec, field).items():
            if i < len(values):
                out[f"{field}.{metric}"] = values[i]
    for purifier, metrics in rec.purified.items():
        for metric, values in metrics.items():
            if i < len(values):
                out[f"purified.{purifier}.{metric}"] = values[i]
    return out


def _rows(entry: str, rec: Record) -> Iterable[dict]:
    ident = dict(entry=entry, cell_id=rec.cell_id, attack=rec.attack, preset=rec.preset or "",
                 params=json.dumps(rec.attack_params, sort_keys=True), kind=attack_kind(rec.universal, rec.amortized),
                 suite=rec.suite, task=rec.task, target=rec.target.name, target_fingerprint=rec.target.fingerprint,
                 norm=rec.norm, eps=rec.eps, eps_label=rec.eps_label, split=rec.split.value,
                 prompt_key=rec.prompt_key, status=rec.status.value)
    for i, name in enumerate(rec.image_names):
        sha = rec.image_sha256[i] if i < len(rec.image_sha256) else ""
        yield {**ident, "image_index": i, "image_name": name, "image_sha256": sha, **_values(rec, i)}


def per_image_frame(records_by_entry: dict[str, Sequence[Record]]) -> pd.DataFrame:
    """The flat table over entries (name -> records), rows in entry, cell and photo order."""
    rows = [row for entry in sorted(records_by_entry)
            for rec in sorted(records_by_entry[entry], key=lambda r: r.cell_id) for row in _rows(entry, rec)]
    df = pd.DataFrame(rows)
    if df.empty:
        return pd.DataFrame(columns=list(IDENTITY))
    values = sorted(c for c in df.columns if c not in IDENTITY)
    return df[list(IDENTITY) + values]


def write_per_image(records_by_entry: dict[str, Sequence[Record]], out_dir: Union[str, Path],
                    stem: str = "per-image") -> list[Path]:
    """Write `<stem>.csv` (and `<stem>.parquet` where pandas has an engine); returns the paths."""
    out_dir = Path(out_dir)
    df = per_image_frame(records_by_entry)
    written = [out_dir / f"{stem}.csv"]
    df.to_csv(written[0], index=False, float_format="%.10g", lineterminator="\n")
    parquet = _parquet_engine()
    if parquet is not None:
        path = out_dir / f"{stem}.parquet"
        df.to_parquet(path, index=False, engine=parquet)
        written.append(path)
    return written


def _parquet_engine() -> Optional[str]:
    """pandas' Parquet engine where one is installed (pyarrow or fastparquet), else None."""
    for engine in ("pyarrow", "fastparquet"):
        if importlib.util.find_spec(engine) is not None:
            return engine
    return None
