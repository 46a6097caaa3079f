"""The perturbation file: the one owner of how a protection is stored on disk.

A run stores, per cell group (attack, eps), the applied perturbation of every image exactly as
integers on the 8-bit grid: safetensors holding one tensor `delta255`, int16, shape (N, 3, H, W),
values in -255..255, plus string metadata (timings, loss curves: JSON text, never code). The same
file is read from untrusted submissions, so reading it parses the header by hand first (size,
keys, dtype, shape, offsets) and only then lets safetensors load the bytes.
"""
from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from safetensors.torch import load as load_bytes
from safetensors.torch import save

from spdbench.errors import RecordError
from spdbench.store.records import atomic_write_bytes

FORMAT = "spdbench-perturbation/2"  # /2: metadata also holds model calls, flags, applied norms
TENSOR = "delta255"
#: a header is a few KB (metadata holds loss curves); anything bigger is not ours
MAX_HEADER_BYTES = 4 * 2**20
_DTYPE_BYTES = {"I16": 2, "F32": 4, "F16": 2, "BF16": 2, "U8": 1, "I32": 4, "I64": 8, "F64": 8, "BOOL": 1, "I8": 1}


def delta_from_adv(adv: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """The stored form of a protection: (adv - images) on the 8-bit grid, int16 on the CPU."""
    return torch.round((adv.double() - images.double()) * 255).to(torch.int16).cpu().contiguous()


def delta_sha256(delta255: torch.Tensor) -> str:
    """Hash of the perturbation itself (not of the file, whose metadata holds timings)."""
    return hashlib.sha256(delta255.to(torch.int16).cpu().contiguous().numpy().tobytes()).hexdigest()


def save_delta(path: Union[str, Path], delta255: torch.Tensor, meta: Optional[dict[str, str]] = None) -> str:
    """Write `delta255` atomically (write-then-rename); returns its `delta_sha256`."""
    delta255 = delta255.to(torch.int16).cpu().contiguous()
    if delta255.dim() != 4 or delta255.shape[1] != 3:
        raise RecordError(f"a perturbation must be (N, 3, H, W), got {tuple(delta255.shape)}")
    meta = {**(meta or {}), "format": FORMAT}
    atomic_write_bytes(path, save({TENSOR: delta255}, metadata=meta))
    return delta_sha256(delta255)


def apply_delta(images: torch.Tensor, delta255: torch.Tensor) -> torch.Tensor:
    """Protected images from the clean ones and a stored delta: 8-bit x + delta, clamped to [0, 1]."""
    d = delta255.to(images.device, torch.float32)
    return ((images.float() * 255).round() + d).clamp(0, 255) / 255


def parse_header(data: bytes, name: str, size: Optional[int] = None) -> dict:
    """The safetensors header of `data` (the file's first bytes), checked for consistency: every
    tensor's offsets inside the file and contiguous, and the file exactly as long as they say.
    `size` is the whole file's size when `data` holds only its beginning."""
    size = len(data) if size is None else size
    if size < 8:
        raise RecordError(f"{name} is not a safetensors file ({size} bytes)")
    (n,) = struct.unpack("<Q", data[:8])
    if n > MAX_HEADER_BYTES or 8 + n > size:
        raise RecordError(f"{name} is not a safetensors file (header of {n} bytes in a {size}-byte file)")
    header = _header_object(data[8:8 + n], name)
    meta = header.pop("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise RecordError(f"{name}: safetensors metadata must map strings to strings")
    end = _tensors_end(header, name)
    if 8 + n + end != size:
        raise RecordError(f"{name}: file is {size} bytes, its header describes {8 + n + end}")
    header["__metadata__"] = meta
    return header


def _header_object(raw: bytes, name: str) -> dict:
    """The header's bytes as a JSON object (anything else is not a safetensors file)."""
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise RecordError(f"{name} is not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise RecordError(f"{name} is not a safetensors file (its header is not a JSON object)")
    return header


def _tensors_end(header: dict, name: str) -> int:
    """Where the last tensor's bytes end: the tensors, in offset order, are contiguous from 0 and
    each spans exactly its dtype's size times its shape's element count."""
    end = 0
    for key, info in sorted(header.items(), key=lambda kv: _offsets(kv[1], name)[0]):
        begin, stop = _offsets(info, name)
        dtype, shape = info.get("dtype"), info.get("shape")
        if dtype not in _DTYPE_BYTES or not isinstance(shape, list) or not all(
                isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape):
            raise RecordError(f"{name}: tensor {key!r} has dtype {dtype!r} / shape {shape!r}")
        count = 1
        for s in shape:
            count *= s
        if begin != end or stop - begin != count * _DTYPE_BYTES[dtype]:
            raise RecordError(f"{name}: tensor {key!r} offsets [{begin}, {stop}] do not match its dtype and shape")
        end = stop
    return end


def _offsets(info, name: str) -> tuple[int, int]:
    off = info.get("data_offsets") if isinstance(info, dict) else None
    if (not isinstance(off, list) or len(off) != 2 or not all(isinstance(o, int) and not isinstance(o, bool)
                                                              for o in off) or not 0 <= off[0] <= off[1]):
        raise RecordError(f"{name}: a tensor entry without valid data_offsets")
    return off[0], off[1]


def check_header(header: dict, name: str, shape: Optional[Sequence[int]] = None) -> tuple[int, ...]:
    """A perturbation header holds exactly one int16 `delta255` of 4 dimensions (N, 3, H, W),
    of `shape` when given; returns its shape."""
    tensors = sorted(k for k in header if k != "__metadata__")
    if tensors != [TENSOR]:
        raise RecordError(f"{name}: a perturbation file holds exactly one tensor {TENSOR!r}, found {tensors}")
    info = header[TENSOR]
    got = tuple(info["shape"])
    if info["dtype"] != "I16" or len(got) != 4 or got[1] != 3:
        raise RecordError(f"{name}: {TENSOR} is {info['dtype']} {list(got)}, expected I16 [N, 3, H, W]")
    if shape is not None and got != tuple(shape):
        raise RecordError(f"{name}: {TENSOR} has shape {list(got)}, the suite's images need {list(shape)}")
    return got


def load_delta(path: Union[str, Path], shape: Optional[Sequence[int]] = None,
               name: Optional[str] = None) -> tuple[torch.Tensor, dict[str, str]]:
    """Read a perturbation file (trusted or not): (delta255 int16, metadata). Checks the header,
    the shape (when given) and that every value is a possible 8-bit difference (|d| <= 255)."""
    name = name or str(path)
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise RecordError(f"cannot read perturbation file {name}: {exc.strerror or exc}") from None
    header = parse_header(data, name)
    check_header(header, name, shape)
    try:
        delta = load_bytes(data)[TENSOR]
    except Exception as exc:  # noqa: BLE001 - any failure to decode is a bad file
        raise RecordError(f"{name} is not a readable safetensors file: {exc}") from None
    if delta.numel() and int(delta.abs().max()) > 255:
        raise RecordError(f"{name}: {TENSOR} holds values beyond -255..255 (not an 8-bit difference)")
    return delta, header["__metadata__"]


def load_metadata(path: Union[str, Path]) -> dict[str, str]:
    """Only the metadata of a perturbation file (what a resumed run reads back)."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise RecordError(f"{path} is not a safetensors file")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES:
            raise RecordError(f"{path} is not a safetensors file (header of {n} bytes)")
        data = head + f.read(n)
    header = parse_header(data, str(path), size=Path(path).stat().st_size)
    return header["__metadata__"]
