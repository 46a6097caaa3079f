"""Result records: one validated JSON file per run cell, written atomically, never pickle.

A cell is (attack, params, eps, prompt, split) on one suite and target. Its record holds every
setting and seed, the per-image numbers, timings and provenance, so the cell can be re-run from
the record alone (RobustBench's lesson) and a resumed run knows what is already done.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from enum import Enum
from pathlib import Path
from typing import Any, Iterable, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import RecordError

SCHEMA_VERSION = 1
RECORD_KIND = "spdbench-record"


class Split(str, Enum):
    train = "train"
    test = "test"


class Status(str, Enum):
    ok = "ok"
    error = "error"


class Timing(BaseModel):
    model_config = ConfigDict(extra="forbid")
    attack_wall_s: float = 0.0          # optimization wall time for the images of this cell's split
    attack_device_s: Optional[float] = None  # device-synchronized time (CUDA events), None on CPU
    fit_wall_s: Optional[float] = None  # universal attacks: one-off fit cost
    per_image_s: float = 0.0            # attack seconds per protected image
    edit_wall_s: float = 0.0
    score_wall_s: float = 0.0
    peak_memory_bytes: Optional[int] = None
    compile_s: Optional[float] = None   # torch.compile warm-up, reported apart from the attack time


class Validation(BaseModel):
    """What the harness found in the attack's output before it enforced the budget."""

    model_config = ConfigDict(extra="forbid")
    max_norm_returned: float = 0.0
    over_budget_images: int = 0
    projected: bool = False


class TargetInfo(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    source: str
    fingerprint: str
    dtype: str
    device: str


class Record(BaseModel):
    """One cell's result. Numbers are numbers; enums for the axes; validated on read and write."""

    model_config = ConfigDict(extra="forbid")
    kind: str = Field(RECORD_KIND, pattern=f"^{RECORD_KIND}$")
    schema_version: int = SCHEMA_VERSION
    cell_id: str
    status: Status = Status.ok
    error: Optional[str] = None
    attack: str
    attack_params: dict[str, Any] = {}
    preset: Optional[str] = None
    universal: bool = False
    suite: str
    suite_config: dict[str, Any] = {}
    norm: str
    eps: float = Field(gt=0)
    eps_label: str
    prompt_key: str
    prompt: str
    split: Split
    image_names: list[str] = []
    image_sha256: list[str] = []
    edit: dict[str, Any] = {}
    edit_seeds: list[int] = []
    attack_seed: int = 0
    split_seed: int = 0
    target: TargetInfo
    protection: dict[str, list[float]] = {}
    protection_mean: dict[str, float] = {}
    imperceptibility: dict[str, list[float]] = {}
    imperceptibility_mean: dict[str, float] = {}
    #: protection after each purifier (edit(purify(x+delta)) vs edit(x)), per image and mean
    purified: dict[str, dict[str, list[float]]] = {}
    purified_mean: dict[str, dict[str, float]] = {}
    metric_conventions: dict[str, str] = {}
    timing: Timing = Timing()
    validation: Validation = Validation()
    loss_curve: list[float] = []
    oom_events: list[dict[str, int]] = []  # batch-size halvings after CUDA out-of-memory (attack and edits)
    perturbation_file: Optional[str] = None
    perturbation_sha256: Optional[str] = None
    provenance: dict[str, Any] = {}


def cell_id(attack: str, params: dict, suite: dict, norm: str, eps_label: str, prompt_key: str, split: str,
            target_fingerprint: str, data_sha256: str = "") -> str:
    """Stable id of a cell: readable prefix + hash of everything that defines it (attack and its
    parameters, the full suite settings, budget, prompt, split, model weights and the images)."""
    blob = json.dumps([attack, params, suite, norm, eps_label, prompt_key, split, target_fingerprint, data_sha256],
                      sort_keys=True, default=str)
    short = hashlib.sha256(blob.encode()).hexdigest()[:10]
    return f"{attack}__{norm}-{eps_label.replace('/', 'o')}__{prompt_key}__{split}__{short}"


def atomic_write_bytes(path: Union[str, Path], data: bytes) -> None:
    """Write-then-rename, so a kill at any moment leaves either the old file or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_record(record: Record, folder: Union[str, Path]) -> Path:
    path = Path(folder) / "records" / f"{record.cell_id}.json"
    atomic_write_bytes(path, record.model_dump_json(indent=1).encode())
    return path


def read_record(path: Union[str, Path]) -> Record:
    """Read and validate one record; any corruption is a RecordError naming the file and the problem."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise RecordError(f"cannot read record {path}: {exc}") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise RecordError(f"record {path} is not valid JSON (truncated or corrupt?): {exc}") from None
    if not isinstance(data, dict) or data.get("kind") != RECORD_KIND:
        raise RecordError(f"{path} is not a spdbench record (missing kind={RECORD_KIND!r})")
    if data.get("schema_version") != SCHEMA_VERSION:
        raise RecordError(f"record {path} has schema_version {data.get('schema_version')!r}; "
                          f"this spdbench reads {SCHEMA_VERSION}")
    try:
        return Record.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise RecordError(f"record {path} fails the schema at {where!r}: {first['msg']}") from None


def record_paths(folder: Union[str, Path]) -> list[Path]:
    folder = Path(folder)
    base = folder / "records" if (folder / "records").is_dir() else folder
    return sorted(base.glob("*.json"))


def load_records(folders: Union[str, Path, Iterable[Union[str, Path]]], strict: bool = True) -> list[Record]:
    """All records under one or more run folders (or their records/ subfolders)."""
    if isinstance(folders, (str, Path)):
        folders = [folders]
    out = []
    for folder in folders:
        for path in record_paths(folder):
            try:
                out.append(read_record(path))
            except RecordError:
                if strict:
                    raise
    return out


def finished_cells(folder: Union[str, Path]) -> dict[str, Record]:
    """Cells with an ok record: what a resumed run must not recompute."""
    done = {}
    for path in record_paths(folder):
        try:
            rec = read_record(path)
        except RecordError:
            continue  # a corrupt record is recomputed, and overwritten atomically
        if rec.status == Status.ok:
            done[rec.cell_id] = rec
    return done


def write_jsonl(records: Iterable[Record], path: Union[str, Path]) -> Path:
    """All records as one JSONL file (an export; the per-cell files are the source of truth)."""
    data = "".join(r.model_dump_json() + "\n" for r in records)
    atomic_write_bytes(path, data.encode())
    return Path(path)
