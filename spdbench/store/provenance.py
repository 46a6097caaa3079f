"""Provenance: what machine, libraries and code produced a number (every record carries it).

Where each thing the board compares lives: spdbench's version (`libraries.spdbench`) and commit
(`git_commit`, "-dirty" when the checkout had changes); the metric implementations' versions
(`metric_libraries`, and each metric's convention in the record's `metric_conventions`); the
editor's weights fingerprint in the record itself (`target.fingerprint`, or `edit_target` on a
transfer suite), beside the seeds (`attack_seed`, `split_seed`, `edit_seeds`)."""
from __future__ import annotations

import datetime as _dt
import importlib.metadata
import platform
import subprocess
from functools import lru_cache
from pathlib import Path
from typing import Optional

import torch

LIBRARIES = ("spdbench", "torch", "diffusers", "transformers", "piq", "numpy", "safetensors")
#: the libraries a metric, purifier or edit number can depend on besides spdbench's own kernels
#: (scoring/metrics.py: SSIM, PSNR, VIFp, FSIM are spdbench's, tested against piq; scikit-image and
#: Pillow run purifiers and exact edits; pyiqa where a metric plugin uses it). The board compares
#: them between the rows of one table (report/flags.py) and never ranks numbers from different ones
#: together. A separate key, so records written before it re-read unchanged.
METRIC_LIBRARIES = ("spdbench", "piq", "scikit-image", "pyiqa", "scipy", "Pillow")


def _version(name: str) -> Optional[str]:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


@lru_cache(maxsize=1)
def git_commit() -> Optional[str]:
    """Commit of the spdbench checkout (None for an installed wheel)."""
    root = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        if out.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def device_name(device: torch.device) -> str:
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> dict:
    """Libraries, machine, device and commit, for a record's `provenance` field."""
    return {
        "libraries": {name: _version(name) for name in LIBRARIES},
        "metric_libraries": {name: _version(name) for name in METRIC_LIBRARIES},
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "device": str(device),
        "device_name": device_name(device),
        "git_commit": git_commit(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
