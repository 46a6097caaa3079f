"""The run folder (`--out`): checked before a run writes, locked while it writes, disk faults as one line.

Three things that used to end in a traceback or in silently doubled work:
- an `--out` that is a file, lies under a file, or whose `records/` is a file, or a folder that
  cannot be written (read-only file system, no permission) -> `prepare_out` says so in one line
  before any model is loaded;
- two runs on one `--out` both computing every cell -> `RunLock`: a lock file holding the pid,
  held with flock(2) so that the kernel releases it when its process dies; a stale lock left by a
  dead process is taken over, a live one is one clear error naming the pid;
- a full disk or a read-only folder in the middle of a run -> `disk_error` / `disk_faults` turn the
  OSError into one `DiskError` line naming the file; `results.atomic_write_bytes` (every record,
  perturbation, cache entry and export) removes its temporary file on failure, so nothing partial is
  left and the next run resumes from the finished cells.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import Iterator, Optional, Union

from spdbench.errors import InputError, SpdbenchError

try:  # POSIX; elsewhere the lock falls back to the pid check alone
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

LOCK_NAME = ".spdbench-run.lock"
#: what a run writes under its folder: these must be folders, and records.jsonl a file, when present
SUBFOLDERS = ("records", "perturbations", "cache")
FILES = ("records.jsonl",)

#: errno -> the words a user understands; every other OSError keeps its own strerror
_REASONS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EFBIG: "the file is larger than this process may write (file-size limit)",
    errno.EIO: "input/output error (a failing disk or a lost network mount?)",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.EISDIR: "the path is a folder, not a file",
}
DISK_ERRNOS = frozenset(_REASONS)


class DiskError(SpdbenchError, OSError):
    """A write the file system refused (full, read-only, no permission); one line, no partial file."""


class RunFolderError(InputError):
    """An `--out` that cannot hold a run (a file, under a file, records/ a file)."""


class RunLockedError(SpdbenchError, RuntimeError):
    """Another live run holds the run folder."""


# --- disk faults -------------------------------------------------------------------------------
def disk_error(exc: OSError, path: Union[str, Path], action: str = "write") -> DiskError:
    """One-line DiskError for an OSError met while `action`-ing `path` (the caller raises it)."""
    code = getattr(exc, "errno", None)
    reason = _REASONS.get(code) or exc.strerror or str(exc) or type(exc).__name__
    if code in (errno.EEXIST, errno.ENOTDIR):
        target = Path(path)
        blocker = next((p for p in (target, *target.parents) if p.exists() and not p.is_dir()), None)
        if blocker is not None:
            reason = f"{blocker} is a file where a folder is needed"
    name = errno.errorcode.get(code, "") if code is not None else ""
    advice = ("free some space" if code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) else
              "pick a writable --out (or fix its permissions)" if code in (errno.EROFS, errno.EACCES, errno.EPERM)
              else "move that file away" if code in (errno.EEXIST, errno.ENOTDIR, errno.EISDIR) else "fix the cause")
    err = DiskError(f"cannot {action} {path}: {reason}{f' ({name})' if name else ''}; nothing partial was "
                    f"left: {advice} and rerun the same command, finished cells are kept and the run resumes")
    err.errno = code  # type: ignore[misc]  # callers may still branch on errno like any OSError
    return err


@contextlib.contextmanager
def disk_faults(path: Union[str, Path], action: str = "write") -> Iterator[None]:
    """Turn a disk-fault OSError (see DISK_ERRNOS) raised inside the block into a DiskError line;
    SpdbenchErrors and unrelated OSErrors pass through unchanged."""
    try:
        yield
    except SpdbenchError:
        raise
    except OSError as exc:
        if exc.errno not in DISK_ERRNOS:
            raise
        raise disk_error(exc, getattr(exc, "filename", None) or path, action) from None


def current_umask() -> int:
    """The process umask, read without changing it where /proc allows (os.umask is a write)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode a plain open() would give a new file: 0666 minus the umask (mkstemp's is 0600)."""
    return 0o666 & ~current_umask()


# --- the run folder ----------------------------------------------------------------------------
def prepare_out(out: Union[str, Path]) -> Path:
    """Check and create the run folder; every problem is one RunFolderError / DiskError line.

    Nothing is deleted or overwritten: a file in the way is reported, never replaced.
    """
    out = check_out(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise disk_error(exc, out, "create the run folder") from None
    for folder in [out] + [out / n for n in SUBFOLDERS if (out / n).is_dir()]:
        _probe_writable(folder)
    return out


def check_out(out: Union[str, Path]) -> Path:
    """The checks of `prepare_out` that create nothing: a path that could hold a run folder (no file
    in the way). Why apart: a run request checks its folder before the models load, and creates it
    only once every input has passed (a refused run leaves no empty folder behind)."""
    if not isinstance(out, (str, Path)) or not str(out).strip():
        raise RunFolderError(f"out must be a folder path, got {out!r}")
    out = Path(out).expanduser()
    for parent in reversed(out.parents):
        if parent.exists() and not parent.is_dir():
            raise RunFolderError(f"out {str(out)!r} lies under {str(parent)!r}, which is a file, not a folder; "
                                 "expected a run folder path")
    if out.exists() and not out.is_dir():
        raise RunFolderError(f"out {str(out)!r} is a file, not a folder; expected a run folder (new or existing)")
    for name in SUBFOLDERS:
        sub = out / name
        if sub.exists() and not sub.is_dir():
            raise RunFolderError(f"out {str(out)!r} holds a file {name!r} where the run keeps its {name}/ folder; "
                                 "move it away or pick another --out")
    for name in FILES:
        f = out / name
        if f.exists() and not f.is_file():
            raise RunFolderError(f"out {str(out)!r} holds a folder {name!r} where the run writes that file; "
                                 "move it away or pick another --out")
    return out


def _probe_writable(folder: Path) -> None:
    """Create and remove one empty file: permission bits do not tell (root, read-only mounts, ACLs)."""
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".spdbench-probe-", suffix=".tmp")
    except OSError as exc:
        raise disk_error(exc, folder, "write to the run folder") from None
    os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(probe)


# --- the run lock ------------------------------------------------------------------------------
_HELD: dict[str, tuple[int, int]] = {}   # resolved lock path -> (owning thread id, depth)
_HELD_GUARD = threading.Lock()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    except OSError:
        return False
    return True


def lock_name(scope: Optional[str] = None) -> str:
    """`.spdbench-run.lock`, or `.spdbench-run-<scope>.lock` with the scope made file-name safe."""
    if scope is None:
        return LOCK_NAME
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", scope)[:80]
    digest = hashlib.sha256(scope.encode()).hexdigest()[:8]  # distinct scopes never share a file
    return f".spdbench-run-{safe}-{digest}.lock"


def read_lock(out: Union[str, Path], scope: Optional[str] = None) -> Optional[dict]:
    """The holder recorded in a run folder's lock file ({"pid", "host", "started", ...}), or None."""
    try:
        data = json.loads((Path(out) / lock_name(scope)).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


class RunLock:
    """`with RunLock(out): ...` -- one writing run per folder.

    The lock file `out/.spdbench-run.lock` holds {"pid", "host", "started"}; the open file is
    flock()ed, so a crashed or killed run's lock is released by the kernel and the next run takes
    it over (its pid is kept in `took_over`). Where flock is unavailable (some network file
    systems), a lock naming a dead pid on this host is taken over and any other one refused. The
    same thread may nest `RunLock`s on one folder (a grid calling run()); another thread may not.

    `scope` (e.g. "photoguard-encoder__linf:16/255") locks one cell group instead of the whole
    folder, in its own file `.spdbench-run-<scope>.lock`: runs of different groups may then share a
    folder (Ray tasks of one attack at different eps), two runs of one group may not.
    """

    def __init__(self, out: Union[str, Path], scope: Optional[str] = None) -> None:
        self.out = Path(out)
        self.path = self.out / lock_name(scope)
        self.took_over: Optional[dict] = None
        self._fd: Optional[int] = None
        self._key: Optional[str] = None

    # context manager
    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        key = str(self.out.resolve() / self.path.name)
        with _HELD_GUARD:
            held = _HELD.get(key)
            if held is not None:
                owner, depth = held
                if owner != threading.get_ident():
                    raise RunLockedError(f"run folder {self.out} is in use by another thread of this process "
                                         f"(pid {os.getpid()}); use another --out for a concurrent run")
                _HELD[key] = (owner, depth + 1)
                self._key = key
                return
        for _ in range(20):  # retried only if the file was replaced between open and flock
            fd = self._open()
            try:
                self._lock_fd(fd)
                if self._same_file(fd):
                    break
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)
        else:  # pragma: no cover - 20 replacements in a row
            raise RunLockedError(f"run folder {self.out}: its lock file {self.path} keeps being replaced")
        self._fd = fd
        previous = self._read_fd(fd)
        if previous.get("pid") not in (None, os.getpid()):
            self.took_over = previous
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(info).encode(), 0)
        except OSError as exc:
            self._close()
            raise disk_error(exc, self.path, "write the run lock") from None
        with _HELD_GUARD:
            _HELD[key] = (threading.get_ident(), 1)
        self._key = key

    def release(self) -> None:
        key = self._key
        if key is None:
            return
        self._key = None
        with _HELD_GUARD:
            owner, depth = _HELD.get(key, (0, 1))
            if depth > 1:
                _HELD[key] = (owner, depth - 1)
                return
            _HELD.pop(key, None)
        if self._fd is not None:
            if self._same_file(self._fd):
                with contextlib.suppress(OSError):
                    self.path.unlink()
            self._close()

    # internals
    def _open(self) -> int:
        try:
            return os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ENOTDIR):
                raise RunFolderError(f"out {str(self.out)!r} is not an existing folder; call "
                                     "prepare_out(out) first") from None
            raise disk_error(exc, self.path, "create the run lock") from None

    def _lock_fd(self, fd: int) -> None:
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                raise self._locked(self._read_fd(fd)) from None
            except OSError as exc:
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise self._locked(self._read_fd(fd)) from None
                # ENOLCK / EOPNOTSUPP / EINVAL: no flock on this file system, use the pid alone
        holder = self._read_fd(fd)
        pid = holder.get("pid")
        same_host = holder.get("host") in (None, socket.gethostname())
        if isinstance(pid, int) and pid != os.getpid() and (not same_host or _pid_alive(pid)):
            raise self._locked(holder)

    def _locked(self, holder: dict) -> RunLockedError:
        who = f"process {holder.get('pid', '?')} on {holder.get('host', '?')}, started {holder.get('started', '?')}"
        if holder.get("pid") == os.getpid():
            who = f"this process (pid {os.getpid()})"
        return RunLockedError(f"run folder {self.out} is in use by another run ({who}); wait for it to finish "
                              "or use another --out (two runs on one folder would compute every cell twice)")

    def _same_file(self, fd: int) -> bool:
        try:
            a, b = os.fstat(fd), os.stat(self.path)
        except OSError:
            return False
        return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)

    @staticmethod
    def _read_fd(fd: int) -> dict:
        try:
            data = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def _close(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None
