"""Result records: one validated JSON file per run cell, written atomically, never pickle.

A cell is (attack, params, eps, prompt, split) on one suite and target. Its record holds every
setting and seed, the per-image numbers, timings and provenance, so the cell can be re-run from
the record alone (RobustBench's lesson) and a resumed run knows what is already done.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import tempfile
import time
from enum import Enum
from pathlib import Path
from typing import Any, Iterable, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_serializer, model_validator

from spdbench.errors import RecordError
from spdbench.store import digest
from spdbench.store.runfolder import disk_error, file_mode

SCHEMA_VERSION = 2
RECORD_KIND = "spdbench-record"
#: the flag a record gets when any number in it is NaN or infinite
NON_FINITE_FLAG = "non-finite"
#: every model of a record: extra keys are an error, and NaN/Infinity are written as the JSON strings
#: "NaN", "Infinity", "-Infinity" (standard JSON that reads back into floats) instead of null, which
#: made the record unreadable -- recomputed forever on resume and refused by leaderboard/verify
_CONFIG = ConfigDict(extra="forbid", ser_json_inf_nan="strings")

log = logging.getLogger(__name__)


class Split(str, Enum):
    train = "train"
    test = "test"


class Status(str, Enum):
    ok = "ok"
    error = "error"


class Timing(BaseModel):
    model_config = _CONFIG
    attack_wall_s: float = 0.0          # optimization wall time for the images of this cell's split
    attack_device_s: Optional[float] = None  # device-synchronized time (CUDA events), None on CPU
    fit_wall_s: Optional[float] = None  # universal attacks: one-off fit cost
    per_image_s: float = 0.0            # attack seconds per protected image
    edit_wall_s: float = 0.0
    score_wall_s: float = 0.0
    peak_memory_bytes: Optional[int] = None
    #: CPU runs: the attack process's peak resident set (ru_maxrss, its model copy included) up to the end
    #: of this cell's attack; None on CUDA (peak_memory_bytes) and in records from before issue 37
    peak_rss_bytes: Optional[int] = None
    compile_s: Optional[float] = None   # torch.compile warm-up, reported apart from the attack time
    worker_start_s: Optional[float] = None  # spawning the attack worker + loading its model copy (isolation)


class Validation(BaseModel):
    """What the harness found in the attack's output before it enforced the budget."""

    model_config = _CONFIG
    max_norm_returned: float = 0.0
    over_budget_images: int = 0
    projected: bool = False
    #: largest per-image norm of the stored (projected, clamped, 8-bit quantized) perturbation
    max_norm_applied: Optional[float] = None
    #: the largest norm the 8-bit grid can hold within eps (L-inf: floor(255 eps)/255; L2: eps)
    effective_eps: Optional[float] = None


class TargetInfo(BaseModel):
    model_config = _CONFIG
    name: str
    source: str
    fingerprint: str
    dtype: str
    device: str
    #: the hub revision of a hub-loaded model (`source` is then the hub id); None for the offline models
    revision: Optional[str] = None

    @model_serializer(mode="wrap")
    def _omit_absent_revision(self, handler: Any) -> dict:
        """Records of models not from the hub (every committed one) serialize without the key, so
        they re-serialize byte for byte as they were written before the field existed."""
        data = handler(self)
        if data.get("revision") is None:
            data.pop("revision", None)
        return data


def attack_kind(universal: bool, amortized: bool) -> str:
    """'universal', 'amortized' or 'per-image': how an attack protects (its class flags, or a record's)."""
    return "universal" if universal else "amortized" if amortized else "per-image"


class Record(BaseModel):
    """One cell's result. Numbers are numbers; enums for the axes; validated on read and write."""

    model_config = _CONFIG
    kind: str = Field(RECORD_KIND, pattern=f"^{RECORD_KIND}$")
    schema_version: int = SCHEMA_VERSION
    cell_id: str
    status: Status = Status.ok
    error: Optional[str] = None
    attack: str
    attack_params: dict[str, Any] = {}
    preset: Optional[str] = None
    universal: bool = False
    amortized: bool = False  # a feed-forward immunizer fit on the train split (AmortizedAttack)
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
    #: the model that edited and purified, when a transfer suite names one other than `target`
    edit_target: Optional[TargetInfo] = None
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
    #: an amortized attack's trained network: {"file", "sha256", "values", "bytes", "apply_batch_size"}
    network: Optional[dict[str, Any]] = None
    provenance: dict[str, Any] = {}
    #: "sandbox": the attack ran in its own worker process, confined by the OS and checked
    #: (harness/sandbox.py); "process": in its own worker process without (full) confinement -- the
    #: reason is in `isolation_detail`; verify/submit accept both. "none": in the harness's
    #: process, for debugging only
    isolation: str = "process"
    #: how `isolation` was established: {"mechanisms": [...]} and, for "process", {"reason": ...};
    #: absent (None) in records written before the sandbox
    isolation_detail: Optional[dict[str, Any]] = None
    #: visible warnings about this cell, never silently ok: "zero-delta", "loss-flat",
    #: "non-finite" (a NaN/Inf number in the record), ...
    flags: list[str] = []
    #: where each setting that defines the run came from: {"steps": "suite", "eps": "preset:madry",
    #: "step_size": "default", ...}; values "default" | "suite" | "preset:NAME" | "explicit"
    param_sources: dict[str, str] = {}
    #: model work per protected image, counted in the worker: {"vae_encoder_fwd": ..,
    #: "vae_encoder_bwd": .., "unet_fwd": .., "unet_bwd": .., "vae_decoder_fwd": .., "vae_decoder_bwd": ..}
    model_calls: dict[str, float] = {}
    #: where the attack's code came from: {"distribution": "spdbench" | the plugin's package,
    #: "version": ..., "module": ...}; "distribution" is "unknown" for code no installed package holds
    attack_source: dict[str, str] = {}
    #: the leaderboard's task group: "img2img", "inpaint" (edited with a mask per photo) or
    #: "instruct" (an instruction editor; records before it said "img2img" and none was committed)
    task: str = Field("img2img", pattern="^(img2img|inpaint|instruct)$")
    #: inpainting only: the mask set, its convention, one sha256 and repaint fraction per image
    masks: Optional[dict[str, Any]] = None
    #: inpainting only: protection on the repainted region (SSIM, PSNR: region_metrics.py), per image
    #: and mean; the same after each purifier; imperceptibility on the kept region
    protection_region: dict[str, list[float]] = {}
    protection_region_mean: dict[str, float] = {}
    purified_region: dict[str, dict[str, list[float]]] = {}
    imperceptibility_kept: dict[str, list[float]] = {}
    imperceptibility_kept_mean: dict[str, float] = {}
    #: instruction suites with exact transforms (Suite.ground_truth): per image, PSNR (dB) of the
    #: protected photo's edit ("protected") and of the clean photo's edit ("clean") against the
    #: instruction's exact result on the clean photo (scoring/ground_truth.py); empty elsewhere
    ground_truth: dict[str, list[float]] = {}

    @model_validator(mode="after")
    def _flag_non_finite(self) -> "Record":
        flag_non_finite(self)
        return self


def cell_id(attack: str, params: dict, suite: dict, norm: str, eps_label: str, prompt_key: str, split: str,
            target_fingerprint: str, data_sha256: str = "") -> str:
    """Stable id of a cell: readable prefix + hash of everything that defines it (attack and its
    parameters, the full suite settings, budget, prompt, split, model weights and the images)."""
    blob = json.dumps([attack, params, suite, norm, eps_label, prompt_key, split, target_fingerprint, data_sha256],
                      sort_keys=True, default=str)
    short = hashlib.sha256(blob.encode()).hexdigest()[:10]
    return f"{attack}__{norm}-{eps_label.replace('/', 'o')}__{prompt_key}__{split}__{short}"


def set_params(record: Record) -> dict[str, Any]:
    """The attack parameters the user set (source "explicit"), beyond its preset, the suite and the
    defaults; `robust_to` aside (the label's "+EOT(...)")."""
    return {k: record.attack_params[k] for k in sorted(record.attack_params)
            if record.param_sources.get(k) == "explicit" and k != "robust_to"}


def params_text(params: dict[str, Any]) -> str:
    """"steps=5, step_size=0.01": parameters as a reader types them after --param."""
    return ", ".join(f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in params.items())


def method_label(record: Record) -> str:
    """One configuration: attack[preset], then every parameter set beyond the preset ("(steps=5)"),
    "(work-matched)" where the steps were derived from the suite's work budget (not its iterations),
    plus "+EOT(jpeg75, ...)" for an adaptive run -- each a different method on the board, never
    pooled with another configuration's cells. Here, beside the record, because scoring, report
    and verify all group records by it."""
    label = f"{record.attack}[{record.preset}]" if record.preset else record.attack
    params = set_params(record)
    if params:
        label += f" ({params_text(params)})"
    if "suite-work" in record.param_sources.values():  # steps from the suite's work budget (issue 35)
        label += " (work-matched)"
    robust = record.attack_params.get("robust_to") or ()
    return f"{label} +EOT({', '.join(robust)})" if robust else label


def atomic_write_bytes(path: Union[str, Path], data: bytes) -> None:
    """Write-then-rename, so a kill at any moment leaves either the old file or the new one.

    The file gets the mode a plain open() would give it (0666 minus the umask), not mkstemp's
    0600. A write the file system refuses (full disk, read-only folder, no permission, a file where
    a folder should be) removes the temporary file and raises one `runfolder.DiskError` line
    naming the file (an OSError subclass, so `except OSError` still holds).
    """
    path = Path(path)
    tmp: Optional[str] = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            if hasattr(os, "fchmod"):
                os.fchmod(f.fileno(), file_mode())
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
    except OSError as exc:
        raise disk_error(exc, path, "write") from None
    finally:
        if tmp is not None:  # any failure, a KeyboardInterrupt included: no partial file stays
            try:
                os.unlink(tmp)
            except OSError:
                pass


def non_finite_fields(record: Record) -> list[str]:
    """Dotted paths of every NaN/Inf number in the record (e.g. 'loss_curve.3', 'protection_mean.ssim')."""
    found: list[str] = []

    def walk(obj: Any, where: str) -> None:
        if isinstance(obj, float):
            if not math.isfinite(obj):
                found.append(where)
        elif isinstance(obj, dict):
            for k, v in obj.items():
                walk(v, f"{where}.{k}" if where else str(k))
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                walk(v, f"{where}.{i}")

    walk(record.model_dump(), "")
    return found


def flag_non_finite(record: Record) -> bool:
    """Add NON_FINITE_FLAG to `record.flags` when any number in it is NaN/Inf: such a record is kept
    (it reads back) but is never silently ok. Returns whether the record has non-finite numbers."""
    bad = non_finite_fields(record)
    if bad and NON_FINITE_FLAG not in record.flags:
        record.flags.append(NON_FINITE_FLAG)
    return bool(bad)


def remove_stale_temp(folder: Union[str, Path], min_age_s: float = 0.0) -> list[Path]:
    """Delete the `.NAME.*.tmp` files that a killed `atomic_write_bytes` left under `folder`
    (records/, perturbations/, cache/, ...), and return them.

    Call it when a run starts on a folder it holds: no writer is live there, so every temporary
    file is stale. For a folder other runs may be writing to (a shared cache), pass `min_age_s`
    so that only files older than that are removed. Symbolic links are not followed.
    """
    folder = Path(folder)
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    now = time.time()
    for root, _dirs, files in os.walk(folder, followlinks=False):
        for name in files:
            if not (name.startswith(".") and name.endswith(".tmp")):
                continue
            path = Path(root) / name
            try:
                st = path.lstat()
                if min_age_s > 0 and now - st.st_mtime < min_age_s:
                    continue
                path.unlink()
            except FileNotFoundError:
                continue  # removed meanwhile: nothing left to clean
            removed.append(path)
    if removed:
        log.info("removed %d stale temporary file(s) under %s", len(removed), folder)
    return sorted(removed)


def write_record(record: Record, folder: Union[str, Path]) -> Path:
    """Validate-flag-write one record atomically, then its digest (store/digest.py: the HMAC under
    this user's record key that the board and `compare` check it against); non-finite numbers are
    flagged (they may have been set after the record was built) and stored so that they read back."""
    path = Path(folder) / "records" / f"{record.cell_id}.json"
    bad = non_finite_fields(record)
    if bad:
        flag_non_finite(record)
        log.warning("record %s holds non-finite numbers (%s%s); flagged %r", record.cell_id,
                    ", ".join(bad[:4]), ", ..." if len(bad) > 4 else "", NON_FINITE_FLAG)
    data = record.model_dump_json(indent=1).encode()
    atomic_write_bytes(path, data)
    digest.sign_record(folder, f"records/{path.name}", data, atomic_write_bytes)
    return path


def read_record(path: Union[str, Path]) -> Record:
    """Read and validate one record; any corruption is a RecordError naming the file and the problem."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise RecordError(f"cannot read record {path}: {exc}") from None
    return record_from_bytes(raw, str(path))


def record_from_bytes(raw: bytes, name: str) -> Record:
    """A record file's bytes -> Record; see record_from_data."""
    try:
        data = json.loads(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise RecordError(f"record {name} is not valid JSON (truncated or corrupt?): {exc}") from None
    return record_from_data(data, name)


def record_from_data(data: Any, name: str) -> Record:
    """Parsed JSON -> Record, checked in order: kind, schema version, then the schema; every
    problem is one RecordError line naming `name` (a file, or a submission's relative path)."""
    if not isinstance(data, dict) or data.get("kind") != RECORD_KIND:
        raise RecordError(f"{name} is not a spdbench record (missing kind={RECORD_KIND!r})")
    if data.get("schema_version") != SCHEMA_VERSION:
        raise RecordError(f"record {name} has schema_version {data.get('schema_version')!r}; "
                          f"this spdbench reads {SCHEMA_VERSION} (re-run it with this spdbench)")
    try:
        return Record.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise RecordError(f"record {name} fails the schema at {where!r}: {first['msg']}") from None


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


def load_vouched(folder: Union[str, Path]) -> list[Record]:
    """The records of a run folder that a resumed run may keep, each file read once and checked
    against its digest (store/digest.py). A rewritten record (or one without a digest in a signed
    folder) is left out with a warning naming it: its cell is recomputed and signed anew, never
    reused. Unsigned and other machines' records are kept, as before digests; corrupt ones skipped
    (as load_records(strict=False))."""
    folder = Path(folder)
    raw: dict[str, bytes] = {}
    for path in sorted((folder / "records").glob("*.json")):
        try:
            raw[f"records/{path.name}"] = path.read_bytes()
        except OSError:
            continue  # unreadable: recomputed, as a corrupt record
    states = digest.check(folder, raw)
    out = []
    for rel, data in raw.items():
        state, why = states[rel]
        if not digest.trusted_on_resume(state):
            log.warning("%s: its cell is recomputed", why)
            continue
        try:
            out.append(record_from_bytes(data, str(folder / rel)))
        except RecordError:
            continue
    return out


def finished_cells(folder: Union[str, Path, Iterable[Record]]) -> dict[str, Record]:
    """Cells with an ok record: what a resumed run must not recompute. `folder`: a run folder, or
    its records already read (the harness reads them once for this and its model check). A corrupt
    record is skipped: its cell is recomputed, and the file overwritten atomically."""
    records = load_records(folder, strict=False) if isinstance(folder, (str, Path)) else folder
    return {rec.cell_id: rec for rec in records if rec.status == Status.ok}


def write_jsonl(records: Iterable[Record], path: Union[str, Path]) -> Path:
    """All records as one JSONL file (an export; the per-cell files are the source of truth)."""
    data = "".join(r.model_dump_json() + "\n" for r in records)
    atomic_write_bytes(path, data.encode())
    return Path(path)
