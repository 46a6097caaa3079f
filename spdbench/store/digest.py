"""Record digests: a run folder's records checked at read time against a key only the harness holds.

Why: a process left behind by an attack (where the worker ran unconfined, `isolation: process`),
or anything else that writes as the user, could rewrite a finished record with stronger-looking
numbers after the run; the local board and `compare` would then show them until a `verify` drew
that cell. Here the harness signs every record it writes with HMAC-SHA256 under a per-user secret
key, and the readers check each record against it.

- The key: 32 random bytes (hex) in `$XDG_CONFIG_HOME/spdbench/record-key` (else
  `~/.config/spdbench/record-key`), created once with mode 0600 in a 0700 folder; a key file that
  others may read, or that is not a regular file, is refused in one line. The sandboxed worker
  cannot read it (harness/sandbox.denied_paths denies the home folder and this folder).
- The manifest: `digests/<record file>.hmac` beside `records/`, one small JSON file per record,
  written atomically after the record. One file per record, not one list: parallel grid tasks
  write into one folder at once, and a file per record needs no read-modify-write under a lock.
  Each holds the record's path, its sha256, the key's id and the HMAC over all of them.
- States (`check`): "signed" (ok); "unsigned" (a folder written before digests, or a record that
  was already in the folder when this harness first signed it); "foreign" (signed with another
  key: a folder moved from another machine); "rewritten" (the digest does not match the record's
  bytes, the digest file is damaged, or a record has no digest in a signed folder); "removed" (a
  digest names a record the folder no longer holds).
"""
from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import secrets
import stat
from pathlib import Path
from typing import Callable, Mapping, Optional, Union

from spdbench.errors import InputError

log = logging.getLogger(__name__)

DIGEST_FOLDER = "digests"
DIGEST_SUFFIX = ".hmac"
DIGEST_KIND = "spdbench-record-digest"
DIGEST_VERSION = 1
KEY_NAME = "record-key"
_KEY_BYTES = 32

SIGNED, UNSIGNED, FOREIGN, REWRITTEN, REMOVED = "signed", "unsigned", "foreign", "rewritten", "removed"
#: the flag a record read in each flagged (not refused) state gets on the board and in `compare`
FLAGS = {UNSIGNED: "unsigned", FOREIGN: "unsigned-by-this-machine"}
#: states whose record is refused: the folder is left out of the board and `compare` refuses it
REFUSED = (REWRITTEN, REMOVED)


class KeyFileError(InputError):
    """A record key that cannot be trusted (readable by others, not a regular file, malformed)."""


# --- the key -----------------------------------------------------------------------------------
def key_path() -> Path:
    """Where this user's record key lives: `$XDG_CONFIG_HOME/spdbench/record-key`, else under ~/.config."""
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "spdbench" / KEY_NAME


def load_key(create: bool = False) -> Optional[bytes]:
    """The record key, or None when there is none (and `create` is false). A key file that others
    may read or write, a link, or one that does not hold 64 hex digits is a KeyFileError line."""
    path = key_path()
    if create and not path.exists():
        _create_key(path)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise KeyFileError(f"record key {path}: cannot read it ({exc.strerror or exc}); expected a file "
                           "only you can read (mode 0600), or no file (one is created)") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        text = f.read(256).decode("ascii", "replace").strip()
    if not stat.S_ISREG(st.st_mode) or st.st_mode & 0o077 or st.st_uid != os.getuid():
        raise KeyFileError(f"record key {path}: mode {stat.filemode(st.st_mode)}, owner uid {st.st_uid}; expected "
                           f"a regular file of uid {os.getuid()} that only you can read (chmod 600 {path})")
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) != _KEY_BYTES:
        raise KeyFileError(f"record key {path} does not hold {2 * _KEY_BYTES} hex digits; move it away and "
                           "a new key is made (records it signed then read as unsigned by this machine)")
    return key


def _create_key(path: Path) -> None:
    """A new random key, mode 0600 from its creation. Written to a private temporary file and then
    hard-linked into place: the link appears whole or not at all, so a concurrent reader (another
    pytest-xdist worker, a parallel grid task) never sees an empty key; a concurrent creator's link
    wins and ours is dropped (we then read theirs)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_bytes(_KEY_BYTES).hex().encode() + b"\n")
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass  # another process made it first: its key is the key
    finally:
        tmp.unlink(missing_ok=True)


def key_id(key: bytes) -> str:
    """A public name for the key (an HMAC of a constant): tells "another machine's key" apart from
    "rewritten" without revealing anything about the key."""
    return hmac.new(key, b"spdbench record key id", hashlib.sha256).hexdigest()[:16]


# --- signing -----------------------------------------------------------------------------------
def digest_rel(record_rel: str) -> str:
    """`records/X.json` -> `digests/X.json.hmac`."""
    return f"{DIGEST_FOLDER}/{Path(record_rel).name}{DIGEST_SUFFIX}"


def _mac(key: bytes, record_rel: str, state: str, sha256: str) -> str:
    message = json.dumps([DIGEST_KIND, DIGEST_VERSION, record_rel, key_id(key), state, sha256], separators=(",", ":"))
    return hmac.new(key, message.encode(), hashlib.sha256).hexdigest()


def digest_bytes(key: bytes, record_rel: str, data: bytes, state: str = SIGNED) -> bytes:
    """The digest file of one record: its path, sha256, state, the key's id and the HMAC of them all."""
    sha = hashlib.sha256(data).hexdigest()
    body = {"kind": DIGEST_KIND, "version": DIGEST_VERSION, "record": record_rel, "state": state,
            "sha256": sha, "key_id": key_id(key), "hmac": _mac(key, record_rel, state, sha)}
    return json.dumps(body, indent=1).encode()


Writer = Callable[[Path, bytes], None]


def sign_record(folder: Union[str, Path], record_rel: str, data: bytes, write: Writer) -> bool:
    """Write the digest of `folder/record_rel` (whose bytes are `data`) with `write` (an atomic
    write). The first signature in a folder that already holds records marks those "unsigned":
    this harness did not write them, and cannot vouch for them. Returns False, with a warning, when
    no key can be made (a read-only home): the folder then reads as unsigned, visibly."""
    folder = Path(folder)
    try:
        key = load_key(create=True)
    except (OSError, KeyFileError) as exc:
        log.warning("record %s is not signed: no usable record key at %s (%s); it reads as %r",
                    record_rel, key_path(), getattr(exc, "strerror", None) or exc, FLAGS[UNSIGNED])
        return False
    assert key is not None  # created above
    if not (folder / DIGEST_FOLDER).is_dir():
        _adopt_unsigned(folder, key, record_rel, write)
    write(folder / digest_rel(record_rel), digest_bytes(key, record_rel, data))
    return True


def _adopt_unsigned(folder: Path, key: bytes, skip_rel: str, write: Writer) -> None:
    for path in sorted((folder / "records").glob("*.json")):
        rel = f"records/{path.name}"
        target = folder / digest_rel(rel)
        if rel == skip_rel or target.exists():
            continue
        try:
            data = path.read_bytes()
        except OSError:
            continue  # unreadable: it reads as rewritten, as any record without a digest in a signed folder
        write(target, digest_bytes(key, rel, data, state=UNSIGNED))


# --- checking ----------------------------------------------------------------------------------
def check(folder: Union[str, Path], records: Mapping[str, bytes], digests: Optional[Mapping[str, bytes]] = None,
          key: Optional[bytes] = None) -> dict[str, tuple[str, str]]:
    """{record rel: (state, why)} for every record of a run folder (`records`: rel -> bytes, as read
    once by the caller). `digests`: rel -> bytes of the digest files (read from the folder when None).
    A folder without a digests/ folder reads wholly "unsigned". `key`: this machine's (loaded when None)."""
    folder = Path(folder)
    if digests is None:
        digests = _read_digests(folder)
        if digests is None:
            return {rel: (UNSIGNED, "written before record digests (no digests/ folder)") for rel in records}
    if key is None:
        key = load_key()
    out = {rel: _check_one(rel, data, digests.get(digest_rel(rel)), key) for rel, data in records.items()}
    names = {digest_rel(rel) for rel in records}
    for drel in sorted(set(digests) - names):
        out[f"records/{Path(drel).name[:-len(DIGEST_SUFFIX)]}"] = (REMOVED, f"{drel} names a record the folder no "
                                                                   "longer holds (removed after the run)")
    return out


def _read_digests(folder: Path) -> Optional[dict[str, bytes]]:
    base = folder / DIGEST_FOLDER
    if not base.is_dir():
        return None
    out = {}
    for p in sorted(base.glob(f"*{DIGEST_SUFFIX}")):
        try:
            out[f"{DIGEST_FOLDER}/{p.name}"] = p.read_bytes()
        except OSError:
            continue  # unreadable: its record reads as having no digest
    return out


def _check_one(rel: str, data: bytes, digest: Optional[bytes], key: Optional[bytes]) -> tuple[str, str]:
    drel = digest_rel(rel)
    if digest is None:
        return REWRITTEN, f"{rel} has no digest ({drel}): not written by the harness of this run"
    try:
        body = json.loads(digest.decode("utf-8"))
        fields = [body[k] for k in ("record", "state", "sha256", "key_id", "hmac")]
    except (ValueError, UnicodeDecodeError, TypeError, KeyError):
        return REWRITTEN, f"{drel} is not a record digest (damaged or rewritten)"
    record, state, sha, kid, mac = fields
    if key is None or kid != key_id(key):
        return FOREIGN, f"{rel} was signed with another machine's record key (key id {str(kid)[:16]})"
    if record != rel or state not in (SIGNED, UNSIGNED) or not hmac.compare_digest(
            str(mac), _mac(key, rel, str(state), str(sha))):
        return REWRITTEN, f"{drel} does not carry this machine's HMAC for {rel} (the digest was rewritten)"
    if hashlib.sha256(data).hexdigest() != sha:
        return REWRITTEN, f"{rel} was rewritten after the harness wrote it (its sha256 differs from {drel})"
    return (SIGNED, "signed by this machine") if state == SIGNED else (
        UNSIGNED, f"{rel} was in the folder before this machine signed its records")


def refusal(states: Mapping[str, tuple[str, str]]) -> Optional[str]:
    """The one line that refuses a folder (its first rewritten or removed record), or None."""
    bad = sorted((rel, why) for rel, (state, why) in states.items() if state in REFUSED)
    if not bad:
        return None
    more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
    return (f"{bad[0][1]}{more}; refused: its numbers are not the harness's. Rerun the same command to "
            "recompute the cell (the harness recomputes records whose digest does not match)")


def flags(states: Mapping[str, tuple[str, str]]) -> dict[str, str]:
    """{record rel: flag} for the records that read, but not as signed by this machine."""
    return {rel: FLAGS[state] for rel, (state, _) in states.items() if state in FLAGS}


def trusted_on_resume(state: str) -> bool:
    """Whether a resumed run may keep a finished record in this state: not when it was rewritten
    (the cell is recomputed and signed); an unsigned or foreign record is kept, as before digests."""
    return state not in REFUSED
