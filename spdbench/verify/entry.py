"""The entry folder format: which files a submission may hold, and how each one is checked.

A leaderboard entry is data under one versioned schema (`spdbench-entry/1`):

    manifest.json                     every other file with its size and sha256 (written by submit)
    records/<cell id>.json            one record per cell (results.Record, schema v2)
    perturbations/<name>.safetensors  the stored perturbations (perturbation_file)
    networks/<name>.safetensors       an amortized attack's trained networks (network_file)
    examples/<name>.png               optional illustrations (never used for a number)

A run folder (what `spdbench run` writes, and what `submit` takes) may also hold `records.jsonl`
(an export), `cache/<hash>.safetensors` (clean edits), `report.html` (spdbench show) and
`digests/<record file>.hmac` (each record's HMAC under this machine's record key, store/digest.py);
those are checked the same way and never copied into an entry. Everything is allow-listed by place, extension *and* content; only regular
files with one link; sizes are bounded per file and per folder; JSON nesting is bounded before
parsing. Nothing in the folder is followed, executed or unpickled.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import stat
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from PIL import Image

from spdbench.errors import RecordError
from spdbench.store import digest as digest_mod
from spdbench.store import networks as network_file
from spdbench.store.perturbations import check_header, parse_header

log = logging.getLogger(__name__)

ENTRY_KIND = "spdbench-entry"
ENTRY_SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
MiB = 2**20

#: attack, preset and entry names: lowercase letters, digits, '.', '_' and '-' (safe in a path, in
#: Markdown and in HTML without escaping -- everything rendered is escaped anyway)
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
#: a file name inside an entry: no hidden files, no spaces, no separators
FILE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,199}$")
MAX_JSON_DEPTH = 32
MAX_FILES = 4096
MAX_ENTRY_BYTES = 4096 * MiB
MAX_PNG_SIDE = 4096
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@dataclass(frozen=True)
class Rule:
    """Where a kind of file lives, how big it may be, and whether an entry or a run folder holds it."""

    kind: str
    folder: str                  # "" = the folder's top level
    suffix: str                  # extension, or the exact file name at the top level
    max_bytes: int
    in_entry: bool = True


RULES = (
    Rule("manifest", "", MANIFEST, 16 * MiB),
    Rule("record", "records", ".json", 8 * MiB),
    Rule("perturbation", "perturbations", ".safetensors", 1024 * MiB),
    Rule("network", "networks", ".safetensors", 64 * MiB),
    Rule("example", "examples", ".png", 16 * MiB),
    Rule("export", "", "records.jsonl", 512 * MiB, in_entry=False),
    Rule("cache", "cache", ".safetensors", 64 * MiB, in_entry=False),
    Rule("report", "", "report.html", 64 * MiB, in_entry=False),
    Rule("digest", digest_mod.DIGEST_FOLDER, digest_mod.DIGEST_SUFFIX, 64 * 1024, in_entry=False),
)
_FOLDERS = {r.folder for r in RULES if r.folder}
#: what an entry (or run) folder copies into the leaderboard: the rest of a run folder stays behind
ENTRY_KINDS = ("record", "perturbation", "network", "example")


def check_name(what: str, value: Any) -> str:
    """`value` if it is a safe name, else a RecordError naming `what`, the value and the rule."""
    if not isinstance(value, str) or not NAME_RE.match(value):
        raise RecordError(f"{what} {value!r} is not a safe name: expected 1-64 characters of a-z, 0-9, "
                          "'.', '_' or '-', starting with a letter or digit")
    return value


#: the run lock of runfolder.RunLock (a run folder only): `.spdbench-run.lock` or `.spdbench-run-<scope>.lock`
LOCK_RE = re.compile(r"^\.spdbench-run(-[A-Za-z0-9._-]{1,100})?\.lock$")
LOCK_RULE = Rule("lock", "", ".lock", 64 * 1024, in_entry=False)
#: the temporary file of a write that was killed: `.NAME.XXXXXXXX.tmp` (store.records.atomic_write_bytes)
#: or `.spdbench-probe-XXXXXXXX.tmp` (runfolder's write probe); mkstemp's 8 random characters
TEMP_RE = re.compile(r"^\.[A-Za-z0-9][A-Za-z0-9._+-]{0,200}[.-][a-z0-9_]{8}\.tmp$")


def rule_for(rel: str) -> Optional[Rule]:
    if LOCK_RE.match(rel):
        return LOCK_RULE
    parts = rel.split("/")
    folder, name = ("", parts[0]) if len(parts) == 1 else (parts[0], parts[1])
    if len(parts) > 2:
        return None
    for rule in RULES:
        if rule.folder == folder and (name == rule.suffix if folder == "" else name.endswith(rule.suffix)):
            return rule
    return None


def allowed_layout(run_folder: bool) -> str:
    rules = [r for r in RULES if r.in_entry or run_folder]
    return ", ".join(f"{r.folder}/*{r.suffix}" if r.folder else r.suffix for r in rules)


# --- content checks ----------------------------------------------------------------------------
_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.S)


def json_depth(data: bytes) -> int:
    """Deepest nesting of [ and { in JSON text, counted without parsing (strings removed first)."""
    a = np.frombuffer(_JSON_STRING.sub(b'""', data), dtype=np.uint8)
    if not a.size:
        return 0
    step = (np.isin(a, (ord("["), ord("{"))).astype(np.int64) - np.isin(a, (ord("]"), ord("}"))))
    return int(np.cumsum(step).max(initial=0))


def load_json(data: bytes, name: str, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """Parse untrusted JSON text: nesting bounded before parsing (no RecursionError), UTF-8 only.
    NaN and Infinity literals parse to floats; the claim checks refuse them where numbers matter."""
    depth = json_depth(data)
    if depth > max_depth:
        raise RecordError(f"{name} nests JSON {depth} levels deep; at most {max_depth} are allowed")
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise RecordError(f"{name} is not valid JSON (truncated, corrupt or not text?): {exc}") from None


def png_size(head: bytes) -> Optional[tuple[int, int]]:
    """(width, height) from a PNG's first 24 bytes (signature and IHDR), or None if it is not one."""
    if not head.startswith(PNG_SIGNATURE) or len(head) < 24 or head[12:16] != b"IHDR":
        return None
    return struct.unpack(">II", head[16:24])


def check_png(data: bytes, name: str) -> tuple[int, int]:
    """A real PNG of bounded size: signature, IHDR dimensions read before decoding, then decoded."""
    size = png_size(data) if len(data) >= 33 else None
    if size is None:
        raise RecordError(f"{name} is not a PNG file (no PNG signature and IHDR chunk)")
    width, height = size
    if not (0 < width <= MAX_PNG_SIDE and 0 < height <= MAX_PNG_SIDE):
        raise RecordError(f"{name} declares {width}x{height} pixels; at most {MAX_PNG_SIDE} per side are allowed")

    try:
        with Image.open(io.BytesIO(data)) as img:
            img.verify()
        with Image.open(io.BytesIO(data)) as img:
            img.load()
    except Exception as exc:  # noqa: BLE001 - any decoder failure is a bad file
        raise RecordError(f"{name} is not a readable PNG file: {type(exc).__name__}: {exc}") from None
    return width, height


def _lock_held(path: Path) -> bool:
    """Whether a live run holds this lock file (RunLock keeps it flock()ed while it runs; a killed
    run's file stays behind, unlocked)."""
    try:
        import fcntl  # deferred: POSIX only; the except below is the other platforms' answer
    except ImportError:  # pragma: no cover - not POSIX: a present lock file counts as held
        return True
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)
    return False


def check_cache_header(header: dict, name: str) -> None:
    """A clean-edit cache file holds one float32 (3, H, W) tensor named 'edit'."""
    tensors = sorted(k for k in header if k != "__metadata__")
    info = header.get("edit")
    if tensors != ["edit"] or info["dtype"] != "F32" or len(info["shape"]) != 3:
        raise RecordError(f"{name} is not a clean-edit cache file (expected one F32 tensor 'edit' [3, H, W])")


# --- the folder --------------------------------------------------------------------------------
@dataclass
class EntryFile:
    rel: str
    kind: str
    size: int
    sha256: str
    data: Optional[bytes] = None          # kept for JSON files and PNGs (bounded), parsed once
    parsed: Any = None
    header: Optional[dict] = None         # safetensors header


@dataclass
class EntryFiles:
    """A scanned folder: every file, checked; `is_entry` when it holds a manifest (a leaderboard entry)."""

    folder: Path
    files: dict[str, EntryFile] = field(default_factory=dict)
    manifest: Optional["Manifest"] = None

    @property
    def is_entry(self) -> bool:
        return self.manifest is not None

    def of_kind(self, kind: str) -> list[EntryFile]:
        return [f for rel, f in sorted(self.files.items()) if f.kind == kind]

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files.values())


class ManifestFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    size: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class Manifest(BaseModel):
    """manifest.json of an entry: the schema version and every other file with its size and hash."""

    model_config = ConfigDict(extra="forbid")
    kind: str = Field(ENTRY_KIND, pattern=f"^{ENTRY_KIND}$")
    schema_version: int = ENTRY_SCHEMA_VERSION
    name: str
    files: dict[str, ManifestFile]
    #: what `verify` re-measured when the entry was submitted (seed, samples, tolerance, versions)
    verification: dict[str, Any] = {}


def _read_regular(path: Path, rel: str, limit: int, keep: bool, sink=None) -> tuple[str, int, Optional[bytes]]:
    """Read a file that must be a regular file with one link (re-checked on the open descriptor,
    so a swap after the directory scan is caught; O_NONBLOCK: a FIFO can never block the read).
    Returns (sha256, size, the bytes when `keep`); every chunk is also written to `sink` if given."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise RecordError(f"cannot open {rel}: {exc.strerror or exc} (symlinks are refused)") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        _check_stat(st, rel, limit)
        digest, chunks, size = hashlib.sha256(), [], 0
        while True:
            chunk = f.read(8 * MiB)
            if not chunk:
                break
            size += len(chunk)
            if size > limit:
                raise RecordError(f"{rel} is larger than the {limit // MiB} MiB allowed for this kind of file")
            digest.update(chunk)
            if sink is not None:
                sink.write(chunk)
            if keep:
                chunks.append(chunk)
    return digest.hexdigest(), size, (b"".join(chunks) if keep else None)


def _check_stat(st: os.stat_result, rel: str, limit: int) -> None:
    if stat.S_ISLNK(st.st_mode):
        raise RecordError(f"{rel} is a symlink; an entry holds regular files only")
    if not stat.S_ISREG(st.st_mode):
        raise RecordError(f"{rel} is not a regular file (a FIFO, device or socket); an entry holds regular files only")
    if st.st_nlink > 1:
        raise RecordError(f"{rel} is a hard link ({st.st_nlink} links); an entry holds files with one link only")
    if st.st_size > limit:
        raise RecordError(f"{rel} is {st.st_size / MiB:.1f} MiB; at most {limit // MiB} MiB are allowed for this kind of file")


def _listed_name(e: os.DirEntry, rel: str, prefix: str, run_folder: bool) -> bool:
    """Whether the scan takes this name: True for an allowed name, False for a run folder's stale
    temporary file (skipped with a warning), a RecordError for any other name.

    Why skip: a run killed mid-write leaves `.NAME.XXXXXXXX.tmp`; a resume within a minute keeps it
    (a parallel task may own it), and it then blocked `submit`. It is never read nor copied into the
    entry, and a live writer holds the run lock, which the scan refuses. An entry stays strict."""
    if FILE_RE.match(e.name) or (not prefix and LOCK_RE.match(e.name)):
        return True
    if run_folder and TEMP_RE.match(e.name) and e.is_file(follow_symlinks=False):
        log.warning("ignoring %s: a temporary file left by an interrupted write (never read, never copied)", rel)
        return False
    hint = " (a partial file left by an interrupted write?)" if e.name.startswith(".") else ""
    raise RecordError(f"{rel!r} is not an allowed file name{hint}: expected letters, digits, "
                      "'.', '_', '+' or '-', not starting with '.'")


def _walk(folder: Path) -> list[tuple[str, Path, os.stat_result]]:
    """Every non-directory below `folder` (one level of subfolders), never following a link."""
    out: list = []
    pending = [("", folder)]
    run_folder = not (folder / MANIFEST).exists()
    while pending:
        prefix, d = pending.pop()
        try:
            entries = sorted(os.scandir(d), key=lambda e: e.name)
        except OSError as exc:
            raise RecordError(f"cannot list {d}: {exc.strerror or exc}") from None
        for e in entries:
            rel = f"{prefix}{e.name}"
            if not _listed_name(e, rel, prefix, run_folder):
                continue
            st = e.stat(follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                if prefix:
                    raise RecordError(f"{rel}/ is a nested folder; an entry has one level of folders")
                if e.name not in _FOLDERS:
                    raise RecordError(f"{rel}/ is not an allowed folder: only {', '.join(sorted(_FOLDERS))}")
                pending.append((rel + "/", Path(e.path)))
            else:
                out.append((rel, Path(e.path), st))
            if len(out) > MAX_FILES:
                raise RecordError(f"{folder} holds more than {MAX_FILES} files")
    return sorted(out)


def scan(folder: Union[str, Path]) -> EntryFiles:
    """Check every file of an entry or run folder; the first problem is a RecordError naming it."""
    folder = Path(folder)
    if not folder.is_dir():
        raise RecordError(f"{folder} is not a folder (expected an entry or run folder with records/)")
    found = _walk(folder)
    entry = EntryFiles(folder)
    is_entry = any(rel == MANIFEST for rel, _, _ in found)
    total = 0
    for rel, path, st in found:
        rule = rule_for(rel)
        if rule is None or (is_entry and not rule.in_entry):
            where = "an entry" if is_entry else "a run folder"
            raise RecordError(f"{rel} is not allowed in {where}: only {allowed_layout(not is_entry)} "
                              "(data files; code, pickle and anything else are refused)")
        _check_stat(st, rel, rule.max_bytes)
        total += st.st_size
        if total > MAX_ENTRY_BYTES:
            raise RecordError(f"{folder} holds more than {MAX_ENTRY_BYTES // MiB} MiB of files")
        keep = rule.kind in ("manifest", "record", "example", "export", "lock", "report", "digest")
        sha, size, data = _read_regular(path, rel, rule.max_bytes, keep)
        f = EntryFile(rel, rule.kind, size, sha, data)
        _check_content(f, path)
        entry.files[rel] = f
    if MANIFEST in entry.files:
        entry.manifest = _check_manifest(entry)
    return entry


def _check_content(f: EntryFile, path: Path) -> None:
    """The check of a file's content by its kind; a kind not named in _CONTENT_CHECKS is a
    safetensors file (perturbation, network, cache), checked by its header."""
    _CONTENT_CHECKS.get(f.kind, _check_tensor_header)(f, path)


def _parse_json(f: EntryFile, path: Path) -> None:
    """A manifest or record: parsed here once (kept on the file for the checks that read it)."""
    f.parsed = load_json(f.data or b"", f.rel)


def _check_export(f: EntryFile, path: Path) -> None:
    """An export: JSON lines, each parsed (blank lines allowed)."""
    for i, line in enumerate((f.data or b"").splitlines()):
        if line.strip():
            load_json(line, f"{f.rel} line {i + 1}")


def _check_example(f: EntryFile, path: Path) -> None:
    check_png(f.data or b"", f.rel)


def _check_report(f: EntryFile, path: Path) -> None:
    """spdbench show's page: text, never read for a number, never copied."""
    try:
        text = (f.data or b"").decode("utf-8")
    except UnicodeDecodeError:
        raise RecordError(f"{f.rel} is not UTF-8 text") from None
    if not text.startswith("<!doctype html>"):
        raise RecordError(f"{f.rel} is not a page written by spdbench show")


def _keep_digest(f: EntryFile, path: Path) -> None:
    """A record digest: its bytes are kept and judged by `digest_verdict` (a damaged one reads as a
    rewritten record there, on the board; `verify` re-measures instead and never reads it)."""


def _check_lock(f: EntryFile, path: Path) -> None:
    """A held lock: a run is still writing, so what it holds is not yet the whole claim."""
    if _lock_held(path):
        raise RecordError(f"a run is writing to this folder (its lock {f.rel} is held); verify it once the "
                          "run has finished")


def _check_tensor_header(f: EntryFile, path: Path) -> None:
    """A safetensors file: its header only, checked by kind (the tensor is read when it is used)."""
    with open(path, "rb") as fh:
        head = fh.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
        head += fh.read(min(n, 4 * MiB))
    f.header = parse_header(head, f.rel, size=f.size)
    if f.kind == "perturbation":
        check_header(f.header, f.rel)
    elif f.kind == "network":
        network_file.check_header(f.header, f.rel)
    else:
        check_cache_header(f.header, f.rel)


#: the content check of each kind of file that is not a safetensors file
_CONTENT_CHECKS = {"manifest": _parse_json, "record": _parse_json, "export": _check_export,
                   "example": _check_example, "report": _check_report, "lock": _check_lock,
                   "digest": _keep_digest}


def _check_manifest(entry: EntryFiles) -> Manifest:
    f = entry.files[MANIFEST]
    try:
        manifest = Manifest.model_validate(f.parsed)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise RecordError(f"{MANIFEST} fails the entry schema at {'.'.join(map(str, first['loc']))!r}: "
                          f"{first['msg']} (expected kind {ENTRY_KIND!r}, schema_version "
                          f"{ENTRY_SCHEMA_VERSION})") from None
    if manifest.schema_version != ENTRY_SCHEMA_VERSION:
        raise RecordError(f"{MANIFEST} has schema_version {manifest.schema_version}; this spdbench reads "
                          f"{ENTRY_SCHEMA_VERSION}")
    listed, present = set(manifest.files), set(entry.files) - {MANIFEST}
    if listed - present:
        raise RecordError(f"{MANIFEST} lists {sorted(listed - present)[0]}, which the entry does not hold")
    if present - listed:
        raise RecordError(f"{sorted(present - listed)[0]} is not listed in {MANIFEST}")
    for rel, info in sorted(manifest.files.items()):
        got = entry.files[rel]
        if (got.size, got.sha256) != (info.size, info.sha256):
            raise RecordError(f"{rel} does not match {MANIFEST} (size {got.size} vs {info.size}, "
                              f"sha256 {got.sha256[:12]} vs {info.sha256[:12]}): changed after submission")
    return manifest


def build_manifest(entry: EntryFiles, name: str, verification: dict[str, Any]) -> bytes:
    """manifest.json for the entry files of `entry` (records, perturbations, networks, examples)."""
    files = {rel: ManifestFile(size=f.size, sha256=f.sha256) for rel, f in sorted(entry.files.items())
             if f.kind in ENTRY_KINDS}
    m = Manifest(name=check_name("entry name", name), files=files, verification=verification)
    return m.model_dump_json(indent=1).encode()


def copy_files(entry: EntryFiles, dest: Union[str, Path]) -> None:
    """Copy the entry files (records, perturbations, networks, examples) of a scanned folder into `dest`, each
    read again through the same checks; a file that changed since the scan is refused."""
    dest = Path(dest)
    for rel, f in sorted(entry.files.items()):
        if f.kind not in ENTRY_KINDS:
            continue
        rule = rule_for(rel)
        out = dest / rel
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out, "xb") as sink:
            sha, _, _ = _read_regular(entry.folder / rel, rel, rule.max_bytes if rule else 0, False, sink)
        if sha != f.sha256:
            raise RecordError(f"{rel} changed while it was being submitted")


def digest_verdict(entry: EntryFiles) -> tuple[Optional[str], dict[str, str]]:
    """What the records' digests say about a scanned run folder, from the bytes the scan read (no
    second read to race): (the line that refuses it -- a record rewritten, or removed, after the
    harness wrote it -- or None; {record rel: flag} for records that read as "unsigned" or
    "unsigned-by-this-machine"). An entry (with a manifest) is judged by its manifest and `verify`
    instead: (None, {})."""
    if entry.is_entry:
        return None, {}
    records = {f.rel: f.data or b"" for f in entry.of_kind("record")}
    signed = (entry.folder / digest_mod.DIGEST_FOLDER).is_dir()
    digests = {f.rel: f.data or b"" for f in entry.of_kind("digest")} if signed else None
    states = digest_mod.check(entry.folder, records, digests)
    return digest_mod.refusal(states), digest_mod.flags(states)
