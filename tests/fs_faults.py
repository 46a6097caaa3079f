"""Disk faults on demand, for tests that run as root (chmod does not stop root), and a run lock
held by another live process.

`inject_fault` makes the kernel-facing call that would fail on a full disk or a read-only mount
raise the real OSError, only for paths under one folder (optionally only paths containing `match`):
  on="open":  os.open of a file for writing (mkstemp, the run lock, the writability probe)
  on="mkdir": os.mkdir of a new folder
  on="fsync": os.fsync of a file -- after its bytes were written, so a partial temporary file
              exists at that moment, as on a disk that fills up mid-write
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

_WRITE_FLAGS = os.O_CREAT | os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND


@dataclass
class Fault:
    folder: str
    code: int
    match: Optional[str]
    hits: int = 0

    def applies(self, path) -> bool:
        text = os.path.realpath(os.fspath(path))
        inside = text == self.folder or text.startswith(self.folder + os.sep)
        return inside and (self.match is None or self.match in text)

    def raise_(self, path) -> None:
        self.hits += 1
        raise OSError(self.code, os.strerror(self.code), os.fspath(path))


def inject_fault(monkeypatch, folder, code: int, on: str = "open", match: Optional[str] = None) -> Fault:
    fault = Fault(os.path.realpath(folder), code, match)
    if on == "open":
        real_open = os.open

        def fake_open(path, flags, *args, **kwargs):
            if flags & _WRITE_FLAGS and fault.applies(path):
                fault.raise_(path)
            return real_open(path, flags, *args, **kwargs)

        monkeypatch.setattr(os, "open", fake_open)
    elif on == "mkdir":
        real_mkdir = os.mkdir

        def fake_mkdir(path, *args, **kwargs):
            if not os.path.exists(path) and fault.applies(path):
                fault.raise_(path)
            return real_mkdir(path, *args, **kwargs)

        monkeypatch.setattr(os, "mkdir", fake_mkdir)
    elif on == "fsync":
        real_fsync = os.fsync

        def fake_fsync(fd):
            number = fd if isinstance(fd, int) else fd.fileno()
            try:
                path = os.readlink(f"/proc/self/fd/{number}")
            except OSError:
                path = ""
            if path and fault.applies(path):
                fault.raise_(path)
            return real_fsync(fd)

        monkeypatch.setattr(os, "fsync", fake_fsync)
    else:
        raise ValueError(f"unknown fault point {on!r}")
    return fault


def temp_files(folder) -> Iterator[Path]:
    """Temporary files (atomic-write leftovers) anywhere under folder."""
    return (p for p in Path(folder).rglob("*") if p.is_file() and p.name.endswith(".tmp"))


_HOLDER = textwrap.dedent("""
    import sys, time
    from spdbench.store.runfolder import RunLock
    lock = RunLock(sys.argv[1], scope=sys.argv[2] or None)
    lock.acquire()
    print("locked", flush=True)
    time.sleep(300)
""")


def hold_lock_in_other_process(out, scope: str = "") -> subprocess.Popen:
    """A live process holding the run lock of `out` (kill() it: its lock file stays, stale)."""
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(out), scope], cwd=repo, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if line.strip() != "locked":
        proc.kill()
        raise RuntimeError(f"the lock holder did not start: {proc.stderr.read()[-2000:]}")
    return proc
