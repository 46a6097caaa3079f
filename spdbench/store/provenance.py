"""Provenance: what machine, libraries and code produced a number (every record carries it)."""
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
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "device": str(device),
        "device_name": device_name(device),
        "git_commit": git_commit(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
