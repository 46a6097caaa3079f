"""The run folder: prepare_out's one-line refusals, the run lock (live refused, stale taken over),
disk faults as one DiskError line with no partial file, and written files that respect the umask.

Tests run as root, so chmod cannot make a folder read-only: faults are injected where the kernel
would report them (os.open / os.mkdir / os.fsync raising OSError with the real errno), and one test
gets a real kernel write failure (EFBIG past RLIMIT_FSIZE, a partial write) in a subprocess.
"""
from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from spdbench.errors import SpdbenchError
from spdbench.store.records import atomic_write_bytes
from spdbench.store.runfolder import (LOCK_NAME, DiskError, RunFolderError, RunLock, RunLockedError, disk_error,
                                disk_faults, file_mode, lock_name, prepare_out, read_lock)

from fs_faults import hold_lock_in_other_process, inject_fault, temp_files

REPO = Path(__file__).resolve().parents[1]


def _one_line(exc: BaseException) -> str:
    text = str(exc)
    assert "\n" not in text and text, f"not one line: {text!r}"
    return text


# --- prepare_out --------------------------------------------------------------------------------
def test_prepare_out_creates_a_new_folder_and_accepts_an_existing_one(tmp_path):
    out = prepare_out(tmp_path / "a" / "b")
    assert out.is_dir() and out == tmp_path / "a" / "b"
    (out / "records").mkdir()
    (out / "records" / "x.json").write_text("{}")
    assert prepare_out(out) == out and (out / "records" / "x.json").read_text() == "{}"
    assert not list(temp_files(out)), "the writability probe leaves nothing behind"


@pytest.mark.parametrize("case,needle", [("out-is-file", "is a file, not a folder"),
                                         ("under-a-file", "lies under"),
                                         ("records-is-file", "'records'"),
                                         ("jsonl-is-folder", "'records.jsonl'")])
def test_prepare_out_refuses_what_cannot_hold_a_run(tmp_path, case, needle):
    blocker = tmp_path / "thing"
    out = {"out-is-file": blocker, "under-a-file": blocker / "run"}.get(case, tmp_path / "run")
    if case in ("out-is-file", "under-a-file"):
        blocker.write_text("precious")
    elif case == "records-is-file":
        out.mkdir()
        (out / "records").write_text("precious")
    else:
        (out / "records.jsonl").mkdir(parents=True)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(RunFolderError) as info:
        prepare_out(out)
    msg = _one_line(info.value)
    assert needle in msg and "out " in msg and str(out) in msg
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before, "nothing is replaced"


@pytest.mark.parametrize("code,words", [(errno.EROFS, "read-only"), (errno.EACCES, "permission denied"),
                                        (errno.ENOSPC, "no space left")])
def test_prepare_out_unwritable_folder_is_one_line(tmp_path, monkeypatch, code, words):
    out = tmp_path / "run"
    out.mkdir()
    inject_fault(monkeypatch, out, code, on="open")
    with pytest.raises(DiskError) as info:
        prepare_out(out)
    msg = _one_line(info.value)
    assert words in msg and str(out) in msg and errno.errorcode[code] in msg
    assert isinstance(info.value, SpdbenchError) and isinstance(info.value, OSError)
    assert info.value.errno == code


def test_prepare_out_cannot_create_the_folder(tmp_path, monkeypatch):
    inject_fault(monkeypatch, tmp_path, errno.EROFS, on="mkdir")
    with pytest.raises(DiskError, match="cannot create the run folder .*read-only"):
        prepare_out(tmp_path / "new")
    assert not (tmp_path / "new").exists()


def test_prepare_out_rejects_a_non_path():
    with pytest.raises(RunFolderError, match="out must be a folder path"):
        prepare_out(None)
    with pytest.raises(RunFolderError, match="out must be a folder path"):
        prepare_out("  ")


# --- atomic writes under disk faults --------------------------------------------------------------
@pytest.mark.parametrize("code,on", [(errno.ENOSPC, "fsync"), (errno.ENOSPC, "open"), (errno.EROFS, "open"),
                                     (errno.EACCES, "open"), (errno.EDQUOT, "fsync"), (errno.EIO, "fsync")])
def test_failed_write_keeps_the_old_file_and_leaves_no_partial_file(tmp_path, monkeypatch, code, on):
    path = tmp_path / "records" / "cell.json"
    atomic_write_bytes(path, b'{"old": 1}')
    faults = inject_fault(monkeypatch, tmp_path, code, on=on)
    with pytest.raises(DiskError) as info:
        atomic_write_bytes(path, b'{"new": 2}' * 1000)
    assert faults.hits >= 1, "the fault was reached"
    msg = _one_line(info.value)
    assert str(path) in msg and errno.errorcode[code] in msg and "resumes" in msg
    assert path.read_bytes() == b'{"old": 1}', "the old file is intact"
    assert list(temp_files(tmp_path)) == [], "no partial temporary file"


def test_failed_write_of_a_new_file_creates_nothing(tmp_path, monkeypatch):
    inject_fault(monkeypatch, tmp_path, errno.ENOSPC, on="fsync")
    with pytest.raises(DiskError, match="no space left"):
        atomic_write_bytes(tmp_path / "cache" / "k.safetensors", b"x" * 4096)
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def test_a_file_where_a_folder_is_needed_is_named(tmp_path):
    (tmp_path / "records").write_text("not a folder")
    with pytest.raises(DiskError) as info:
        atomic_write_bytes(tmp_path / "records" / "cell.json", b"{}")
    msg = _one_line(info.value)
    assert f"{tmp_path / 'records'} is a file where a folder is needed" in msg


def test_real_partial_write_is_removed(tmp_path):
    """A real kernel failure mid-write: RLIMIT_FSIZE stops the write after 1000 bytes (EFBIG), leaving
    a partial temporary file that atomic_write_bytes must remove."""
    script = textwrap.dedent(f"""
        import resource, signal, sys
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        from spdbench.store.records import atomic_write_bytes
        from spdbench.store.runfolder import DiskError
        atomic_write_bytes({str(tmp_path / 'ok.json')!r}, b"small")
        resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000))
        try:
            atomic_write_bytes({str(tmp_path / 'big.json')!r}, b"x" * 100000)
        except DiskError as exc:
            print("DISKERROR", exc)
            sys.exit(0)
        sys.exit(3)
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = proc.stdout.strip()
    assert line.startswith("DISKERROR") and "EFBIG" in line and "\n" not in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok.json"], "no partial file, the earlier file kept"


def test_disk_faults_context_converts_only_disk_errors(tmp_path):
    with pytest.raises(DiskError, match="cannot save .*no space left"):
        with disk_faults(tmp_path, "save"):
            raise OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(ConnectionResetError):  # not a disk fault: unchanged
        with disk_faults(tmp_path):
            raise ConnectionResetError(errno.ECONNRESET, "reset")
    err = disk_error(OSError(errno.EROFS, "Read-only file system"), tmp_path / "x")
    assert isinstance(err, SpdbenchError) and "read-only" in str(err) and "pick a writable --out" in str(err)


# --- file mode ----------------------------------------------------------------------------------
@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664), (0o027, 0o640)])
def test_written_files_respect_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        assert file_mode() == mode
        atomic_write_bytes(tmp_path / "r.json", b"{}")
        atomic_write_bytes(tmp_path / "r.json", b"{}")  # replacing keeps the umask's mode too
    finally:
        os.umask(old)
    assert (tmp_path / "r.json").stat().st_mode & 0o777 == mode


# --- the run lock ---------------------------------------------------------------------------------
def test_lock_file_holds_the_pid_and_is_removed_after(tmp_path):
    with RunLock(tmp_path) as lock:
        holder = read_lock(tmp_path)
        assert holder["pid"] == os.getpid() and holder["host"] and holder["started"]
        assert lock.took_over is None
    assert not (tmp_path / LOCK_NAME).exists()


def test_live_lock_of_another_process_is_refused_then_taken_over_when_it_dies(tmp_path):
    (tmp_path / "records").mkdir()
    (tmp_path / "records" / "done.json").write_text("{}")
    proc = hold_lock_in_other_process(tmp_path)
    try:
        with pytest.raises(RunLockedError) as info:
            with RunLock(tmp_path):
                pytest.fail("entered a folder another live run holds")
        msg = _one_line(info.value)
        assert f"process {proc.pid}" in msg and str(tmp_path) in msg and "another --out" in msg
        assert read_lock(tmp_path)["pid"] == proc.pid, "the refused run did not touch the holder's lock"
    finally:
        proc.kill()  # SIGKILL: no cleanup, the lock file stays behind with a dead pid
        proc.wait()
    assert read_lock(tmp_path)["pid"] == proc.pid, "a killed run leaves its (stale) lock file"
    with RunLock(tmp_path) as lock:
        assert lock.took_over["pid"] == proc.pid and read_lock(tmp_path)["pid"] == os.getpid()
    assert (tmp_path / "records" / "done.json").read_text() == "{}"


@pytest.mark.parametrize("content", [None, "garbage{", json.dumps([1, 2]), "dead"])
def test_stale_or_unreadable_lock_file_is_taken_over(tmp_path, content):
    if content == "dead":
        proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
        content = json.dumps({"pid": int(proc.stdout), "host": os.uname().nodename, "started": "earlier"})
    if content is not None:
        (tmp_path / LOCK_NAME).write_text(content)
    with RunLock(tmp_path):
        assert read_lock(tmp_path)["pid"] == os.getpid()
    assert not (tmp_path / LOCK_NAME).exists()


def test_without_flock_a_live_pid_is_refused_and_a_dead_one_taken_over(tmp_path, monkeypatch):
    import spdbench.store.runfolder as rf

    monkeypatch.setattr(rf, "fcntl", None)  # a file system without flock: the pid decides
    parent = os.getppid()
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": parent, "host": os.uname().nodename}))
    with pytest.raises(RunLockedError, match=f"process {parent}"):
        RunLock(tmp_path).acquire()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": int(dead.stdout), "host": os.uname().nodename}))
    with RunLock(tmp_path) as lock:
        assert lock.took_over["pid"] == int(dead.stdout)


def test_same_thread_nests_other_thread_is_refused(tmp_path):
    errors = []

    def other():
        try:
            RunLock(tmp_path).acquire()
        except RunLockedError as exc:
            errors.append(str(exc))

    with RunLock(tmp_path):
        with RunLock(tmp_path):  # a grid calling run() on the folder it holds
            pass
        assert (tmp_path / LOCK_NAME).exists(), "the inner exit does not release the outer lock"
        t = threading.Thread(target=other)
        t.start()
        t.join()
    assert errors and "another thread" in errors[0]
    assert not (tmp_path / LOCK_NAME).exists()


def test_scoped_locks_let_different_groups_share_a_folder(tmp_path):
    proc = hold_lock_in_other_process(tmp_path, scope="pgd__linf:16/255")
    try:
        with RunLock(tmp_path, scope="pgd__linf:8/255"):  # another cell group: fine
            pass
        with pytest.raises(RunLockedError, match=f"process {proc.pid}"):
            RunLock(tmp_path, scope="pgd__linf:16/255").acquire()
    finally:
        proc.kill()
        proc.wait()
    assert lock_name("a/b") != lock_name("a_b") and "/" not in lock_name("a/b")


def test_lock_needs_an_existing_folder(tmp_path):
    with pytest.raises(RunFolderError, match="prepare_out"):
        RunLock(tmp_path / "missing").acquire()


def test_lock_on_an_unwritable_folder_is_one_line(tmp_path, monkeypatch):
    inject_fault(monkeypatch, tmp_path, errno.EROFS, on="open")
    with pytest.raises(DiskError, match="cannot create the run lock .*read-only"):
        RunLock(tmp_path).acquire()
