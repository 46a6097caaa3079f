"""A registered fast test suite and a real run folder under it, shared by the submission tests."""
from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
from pathlib import Path

import pytest

import spdbench
from spdbench.suites import SUITES

from harness_helpers import fast_suite

#: a registered test suite: 4 bundled photos at 64 px (3 train / 1 test), two budgets, one prompt,
#: one cheap purifier -- a complete grid of 4 cells in seconds
FAST = dataclasses.replace(fast_suite(eps=("8/255", "16/255"), prompts=("P3",), purifiers=("jpeg75",), n_images=4),
                           name="test-fast")


@pytest.fixture(scope="module")
def suite_registered():
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(SUITES, "test-fast", FAST)
        yield FAST


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, suite_registered):
    """A real run folder: uniform-noise through the whole harness (worker process, edits, scores)."""
    out = tmp_path_factory.mktemp("honest") / "test-fast-uniform"
    res = spdbench.run("uniform-noise", suite="test-fast", out=out)
    assert res.ok and len(res.records) == 4
    return out


def copy(run_dir: Path, tmp_path: Path, name: str = "entry") -> Path:
    dest = tmp_path / name
    shutil.copytree(run_dir, dest, symlinks=True)
    return dest


def snapshot(root: Path) -> dict:
    """Every path under `root` (hidden ones included) with its type, mode and content hash: equal
    snapshots = `git status` could not tell the trees apart."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            digest = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() and not p.is_symlink() else None
            out[str(p.relative_to(root))] = (st.st_mode, digest)
    return out
