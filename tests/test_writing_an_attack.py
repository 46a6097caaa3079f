"""docs/writing-an-attack.md holds a working plugin: its code blocks are the example package's files,
and that package, installed (a dist-info folder on the path, as pip leaves it), is listed with its
distribution, and its short test passes."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "writing-an-attack.md"
EXAMPLE = ROOT / "examples" / "spdbench-myadvdm"
FILES = ("pyproject.toml", "src/spdbench_myadvdm/__init__.py", "tests/test_my_advdm.py")


def doc_blocks() -> dict[str, str]:
    """{example file: the code block that follows its name in the doc}."""
    text = DOC.read_text()
    blocks = {}
    for rel in FILES:
        match = re.search(rf"`examples/spdbench-myadvdm/{re.escape(rel)}`:\n\n```\w+\n(.*?)```", text, re.S)
        assert match, f"the doc has no block for {rel}"
        blocks[rel] = match.group(1)
    return blocks


def test_the_doc_shows_the_example_files_verbatim():
    for rel, block in doc_blocks().items():
        assert block == (EXAMPLE / rel).read_text(), f"docs/writing-an-attack.md differs from {rel}"


def installed(tmp_path: Path) -> dict:
    """The example 'pip installed' into tmp_path/site: its package plus a dist-info with its entry point."""
    site = tmp_path / "site"
    shutil.copytree(EXAMPLE / "src" / "spdbench_myadvdm", site / "spdbench_myadvdm")
    info = site / "spdbench_myadvdm-0.1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: spdbench-myadvdm\nVersion: 0.1.0\n")
    (info / "top_level.txt").write_text("spdbench_myadvdm\n")
    (info / "entry_points.txt").write_text("[spdbench.attacks]\nmy-advdm = spdbench_myadvdm:MyAdvDM\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]))
    return env


def test_installed_plugin_is_listed_with_its_distribution(tmp_path):
    env = installed(tmp_path)
    # one new interpreter (each pays torch's and diffusers' imports): `spdbench list`, then the source
    code = ("import spdbench.cli, spdbench.attacks; from spdbench.attacks.base import attack_source; "
            "code = spdbench.cli.main(['list']); "
            "print('SOURCE', attack_source(spdbench.attacks.attack_class('my-advdm'))); raise SystemExit(code)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    line = next(l for l in out.stdout.splitlines() if "my-advdm" in l and not l.startswith("SOURCE"))
    assert "Raise the diffusion model's denoising error" in line and "[plugin: spdbench-myadvdm 0.1.0]" in line
    assert "'distribution': 'spdbench-myadvdm', 'version': '0.1.0'" in out.stdout, out.stderr


@pytest.mark.slow
def test_the_plugins_short_test_passes(tmp_path):
    env = installed(tmp_path)
    shutil.copytree(EXAMPLE / "tests", tmp_path / "tests")
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--strict-markers",
                          str(tmp_path / "tests")], capture_output=True, text=True, env=env, timeout=900,
                         cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "1 passed" in out.stdout
