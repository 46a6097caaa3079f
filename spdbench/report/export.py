"""Per-image export: every record's per-image values as one flat table (issue 37).

Why: the board shows means with intervals; a reader who wants to re-analyse (another statistic, a
subset of photos, a paired test of their own) needs the values the means come from, in a format
any tool reads. One row per (record, photo), columns in a fixed order:

- identity: entry, cell_id, attack, preset, params (JSON of the non-preset parameters), kind,
  suite, task, target, target_fingerprint, norm, eps, eps_label, split, prompt_key, image_index,
  image_name, image_sha256, status;
- values: `protection.<metric>`, `imperceptibility.<metric>`, `protection_region.<metric>`,
  `imperceptibility_kept.<metric>`, `purified.<purifier>.<metric>`, `ground_truth.<series>` (edit
  success against ground truth on offline instruction suites, scoring/ground_truth.py: `protected`,
  `clean`) and `challenge.<column>.<metric>` (a verified challenge's value for that photo of that
  record, verify/challenge.py; `<column>` is the purifier's name for a purifier challenge -- one
  column per purifier, whoever filed it -- and the challenge's name for an adaptive one) -- one
  column per value the records and challenges hold, sorted by name after the identity columns.

Challenges: only the ones the caller passes, which must be the board's (verified as they are and
still fitting: `read_verified` then `flags.current_challenges`); a challenge joins a record by the
board's rule (`flags.with_challenges`: its cell id, and the record's photos in the record's order).

The schema only grows: a new metric, purifier, series or challenge adds columns, none is renamed or removed
(documented in leaderboard/README.md). CSV always; Parquet too where pandas has an engine.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

import pandas as pd

from spdbench.store.records import Record, attack_kind
from spdbench.verify.challenge import Challenge, mean_ssim

IDENTITY = ("entry", "cell_id", "attack", "preset", "params", "kind", "suite", "task", "target",
            "target_fingerprint", "norm", "eps", "eps_label", "split", "prompt_key", "image_index",
            "image_name", "image_sha256", "status")
#: record fields holding {metric: per-image list}, exported as "<field>.<metric>"
PER_IMAGE_FIELDS = ("protection", "imperceptibility", "protection_region", "imperceptibility_kept", "ground_truth")
#: a verified challenge's columns: "challenge.<Challenge.column>.<metric>"
CHALLENGE_PREFIX = "challenge."

#: per cell id: (challenge name, its photos, {metric: per-image values}) of every challenge covering it
ChallengeIndex = dict[str, list[tuple[str, list[str], dict[str, list[float]]]]]


def _challenge_index(challenges: Sequence[Challenge]) -> ChallengeIndex:
    """The challenges' cells by the cell id they cover (a record looks its challenges up once)."""
    index: ChallengeIndex = {}
    for ch in challenges:
        for cell in ch.cells:
            index.setdefault(cell.cell_id, []).append((ch.column, list(cell.image_names), cell.values))
    return index


def _challenge_values(rec: Record, index: ChallengeIndex) -> dict[str, dict[str, list[float]]]:
    """{column prefix: {metric: per-image values}} of the challenges covering the record: its cell,
    and its photos in its order (the board's rule, flags.with_challenges)."""
    out: dict[str, dict[str, list[float]]] = {}
    for column, names, values in index.get(rec.cell_id, ()):
        key = f"{CHALLENGE_PREFIX}{column}."
        if names == list(rec.image_names) and (key not in out or mean_ssim(values) > mean_ssim(out[key])):
            out[key] = values  # two of one purifier: the higher mean SSIM, as flags.with_challenges keeps
    return out


def _values(rec: Record, i: int, challenged: dict[str, dict[str, list[float]]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for field in PER_IMAGE_FIELDS:
        for metric, values in getattr(rec, field).items():
            if i < len(values):
                out[f"{field}.{metric}"] = values[i]
    for purifier, metrics in rec.purified.items():
        for metric, values in metrics.items():
            if i < len(values):
                out[f"purified.{purifier}.{metric}"] = values[i]
    for prefix, metrics in challenged.items():
        for metric, values in metrics.items():
            if i < len(values):
                out[f"{prefix}{metric}"] = values[i]
    return out


def _rows(entry: str, rec: Record, index: ChallengeIndex) -> Iterable[dict]:
    ident = dict(entry=entry, cell_id=rec.cell_id, attack=rec.attack, preset=rec.preset or "",
                 params=json.dumps(rec.attack_params, sort_keys=True), kind=attack_kind(rec.universal, rec.amortized),
                 suite=rec.suite, task=rec.task, target=rec.target.name, target_fingerprint=rec.target.fingerprint,
                 norm=rec.norm, eps=rec.eps, eps_label=rec.eps_label, split=rec.split.value,
                 prompt_key=rec.prompt_key, status=rec.status.value)
    challenged = _challenge_values(rec, index)
    for i, name in enumerate(rec.image_names):
        sha = rec.image_sha256[i] if i < len(rec.image_sha256) else ""
        yield {**ident, "image_index": i, "image_name": name, "image_sha256": sha, **_values(rec, i, challenged)}


def per_image_frame(records_by_entry: dict[str, Sequence[Record]],
                    challenges: Sequence[Challenge] = ()) -> pd.DataFrame:
    """The flat table over entries (name -> records), rows in entry, cell and photo order;
    `challenges`: the board's verified challenges (module docstring), each adding its columns."""
    index = _challenge_index(challenges)
    rows = [row for entry in sorted(records_by_entry)
            for rec in sorted(records_by_entry[entry], key=lambda r: r.cell_id) for row in _rows(entry, rec, index)]
    df = pd.DataFrame(rows)
    if df.empty:
        return pd.DataFrame(columns=list(IDENTITY))
    values = sorted(c for c in df.columns if c not in IDENTITY)
    return df[list(IDENTITY) + values]


def write_per_image(records_by_entry: dict[str, Sequence[Record]], out_dir: Union[str, Path],
                    stem: str = "per-image", challenges: Sequence[Challenge] = ()) -> list[Path]:
    """Write `<stem>.csv` (and `<stem>.parquet` where pandas has an engine); returns the paths.
    `challenges`: the board's verified challenges (module docstring)."""
    out_dir = Path(out_dir)
    df = per_image_frame(records_by_entry, challenges)
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
