"""Tampered submissions, as data: each case edits a copy of an honest run folder the way a hostile
submitter would (issue 16's list, and a few more). Used by test_tampering.py; written with json,
hashlib and safetensors only, so the same cases can also be replayed against older spdbench code.

Each case: name, the stage that must refuse it ("files", "claims", "images", "sample", "rerun"),
a fragment of the expected one-line message, and the edit.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file


@dataclass(frozen=True)
class Case:
    name: str
    stage: str
    expect: str
    edit: Callable[[Path], None]
    v2_only: bool = False  # uses a field that records before schema 2 do not have


def records(folder: Path) -> list[Path]:
    return sorted((folder / "records").glob("*.json"))


def load(path: Path) -> dict:
    return json.loads(path.read_text())


def dump(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data))


def edit_all(folder: Path, fn) -> None:
    for p in records(folder):
        d = load(p)
        fn(d)
        dump(p, d)


def first(folder: Path, split: str = "test", eps: str = None) -> Path:
    for p in records(folder):
        d = load(p)
        if d["split"] == split and (eps is None or d["eps_label"] == eps):
            return p
    raise LookupError(split)


def edit_one(folder: Path, fn, split: str = "test") -> None:
    p = first(folder, split)
    d = load(p)
    fn(d)
    dump(p, d)


def _mean(v):
    return sum(v) / len(v)


def set_list(block: str, metric: str, fn, purifier: str = None):
    """Edit one per-image list and its stated mean consistently (a careful cheater)."""
    def go(d):
        if purifier:
            d["purified"][purifier][metric] = [fn(x) for x in d["purified"][purifier][metric]]
            d["purified_mean"][purifier][metric] = _mean(d["purified"][purifier][metric])
        else:
            d[block][metric] = [fn(x) for x in d[block][metric]]
            d[block + "_mean"][metric] = _mean(d[block][metric])
    return go


def pfiles(folder: Path) -> list[Path]:
    return sorted((folder / "perturbations").glob("*.safetensors"))


def sha(delta: torch.Tensor) -> str:
    return hashlib.sha256(delta.to(torch.int16).contiguous().numpy().tobytes()).hexdigest()


def replace_delta(folder: Path, fn, fix_max_norm: bool = False) -> None:
    """Rewrite every perturbation file through `fn` and update the records' hashes to match."""
    new = {}
    for p in pfiles(folder):
        d = fn(load_file(str(p))["delta255"]).to(torch.int16).contiguous()
        save_file({"delta255": d}, str(p), metadata={"format": "spdbench-perturbation/1"})
        new[f"perturbations/{p.name}"] = (sha(d), float(d.float().flatten(1).abs().amax(1).max()) / 255)

    def go(r):
        r["perturbation_sha256"], applied = new[r["perturbation_file"]]
        if fix_max_norm and r.get("validation", {}).get("max_norm_applied") is not None:
            r["validation"]["max_norm_applied"] = applied
    edit_all(folder, go)


def rename_cells(folder: Path, fn) -> None:
    """Edit records and keep cell ids and file names consistent with the edit (id prefix follows
    the fields; the 10-hex suffix is kept)."""
    for p in records(folder):
        d = load(p)
        fn(d)
        suffix = d["cell_id"].rsplit("__", 1)[1]
        d["cell_id"] = (f"{d['attack']}__{d['norm']}-{d['eps_label'].replace('/', 'o')}__{d['prompt_key']}__"
                        f"{d['split']}__{suffix}")
        p.unlink()
        dump(p.parent / f"{d['cell_id']}.json", d)


def png_declaring(width: int, height: int) -> bytes:
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def _hardlink(folder: Path) -> None:
    secret = folder.parent / "outside-secret.txt"
    secret.write_text("not yours")
    (folder / "examples").mkdir(exist_ok=True)
    os.link(secret, folder / "examples" / "leak.png")


def _put(folder: Path, rel: str, data: bytes) -> None:
    (folder / rel).parent.mkdir(parents=True, exist_ok=True)
    (folder / rel).write_bytes(data)


def _examples(folder: Path, name: str, data: bytes) -> None:
    (folder / "examples").mkdir(exist_ok=True)
    (folder / "examples" / name).write_bytes(data)


def _top_level(folder: Path) -> None:
    for p in records(folder):
        p.rename(folder / p.name)
    (folder / "records").rmdir()


def _swap_null(folder: Path) -> None:
    a, b = pfiles(folder)[:2]
    tmp = a.with_suffix(".tmpswap")
    a.rename(tmp), b.rename(a), tmp.rename(b)
    edit_all(folder, lambda d: d.update(perturbation_sha256=None))


def _duplicate(folder: Path) -> None:
    p = first(folder, "test")
    d = load(p)
    d["cell_id"] = d["cell_id"][:-10] + "0123456789"
    d["protection"]["ssim"] = [0.01 for _ in d["protection"]["ssim"]]
    d["protection_mean"]["ssim"] = 0.01
    dump(p.parent / f"{d['cell_id']}.json", d)


def _extra_prompt(folder: Path) -> None:
    p = first(folder, "test")
    d = load(p)
    d["prompt_key"], d["prompt"] = "P1", "make it like a watercolor painting"
    d["cell_id"] = d["cell_id"].replace("__P3__", "__P1__").replace("__P4__", "__P1__")
    dump(p.parent / f"{d['cell_id']}.json", d)


def _fifo(folder: Path) -> None:
    os.mkfifo(folder / "records" / "zz.json")


def _oversized(folder: Path) -> None:
    p = first(folder, "test")
    p.write_text(p.read_text() + " " * (20 * 2**20))


CASES: list[Case] = [
    # --- files: the folder under the entry schema ---------------------------------------------
    Case("cache-pickle", "files", "not allowed", lambda f: _put(f, "cache/evil.pkl", pickle.dumps({1: 2}))),
    Case("cache-python", "files", "not allowed", lambda f: _put(f, "cache/evil.py", b"import os\n")),
    Case("hardlink-named-png", "files", "hard link", _hardlink),
    Case("pickle-named-png", "files", "not a PNG", lambda f: _examples(f, "x.png", pickle.dumps({"a": 1}))),
    Case("png-declaring-20000px", "files", "declares 20000x20000", lambda f: _examples(f, "big.png", png_declaring(20000, 20000))),
    Case("fifo-record", "files", "not a regular file", _fifo),
    Case("deeply-nested-json", "files", "nests JSON", lambda f: first(f).write_text("[" * 200000 + "]" * 200000)),
    Case("oversized-record", "files", "MiB", _oversized),
    Case("symlink", "files", "symlink", lambda f: (f / "records" / "link.json").symlink_to(first(f).resolve())),
    Case("records-at-top-level", "files", "not allowed", _top_level),
    Case("pickle-pt-perturbation", "files", "not allowed", lambda f: (f / "perturbations" / "delta.pt").write_bytes(pickle.dumps([1]))),
    Case("html-with-script", "files", "not allowed", lambda f: (f / "records" / "index.html").write_text("<script>alert(1)</script>")),
    Case("partial-temp-file", "files", "partial file", lambda f: (f / "records" / ".x.json.1a2b.tmp").write_text("{}")),
    Case("unknown-folder", "files", "not an allowed folder", lambda f: (f / "evil").mkdir() or (f / "evil" / "x.json").write_text("{}")),
    Case("pickle-as-safetensors", "files", "not a safetensors", lambda f: pfiles(f)[0].write_bytes(pickle.dumps([0] * 100))),
    # --- claims: records against themselves and their suite ---------------------------------------
    Case("protection-mean-edited", "claims", "per-image values average",
         lambda f: edit_all(f, lambda d: d["protection_mean"].update(ssim=d["protection_mean"]["ssim"] - 0.2))),
    Case("nan-protection-mean", "claims", "non-finite", lambda f: edit_one(f, lambda d: d["protection_mean"].update(ssim="NaN"))),
    Case("nan-per-image", "claims", "non-finite",
         lambda f: edit_one(f, lambda d: (d["protection"]["ssim"].__setitem__(0, "NaN"), d["protection_mean"].update(ssim="NaN")))),
    Case("list-shorter-than-images", "claims", "values for",
         lambda f: edit_one(f, lambda d: (d["protection"]["ssim"].pop(), d["protection_mean"].update(
             ssim=_mean(d["protection"]["ssim"]) if d["protection"]["ssim"] else 0.0)), split="train")),
    Case("value-out-of-range", "claims", "outside", lambda f: edit_one(f, set_list("protection", "ssim", lambda x: 1.5))),
    Case("sha-null-perturbation-swapped", "claims", "not a sha256", _swap_null),
    Case("path-traversal", "claims", "not a perturbations", lambda f: edit_one(f, lambda d: d.update(perturbation_file="../../etc/passwd"))),
    Case("relabel-attack", "claims", "does not name its own cell", lambda f: edit_all(f, lambda d: d.update(attack="spd-encoder"))),
    Case("eps-label-2-on-8-data", "claims", "does not state its eps", lambda f: edit_all(
        f, lambda d: d.update(eps_label="2/255") if d["eps_label"] == "8/255" else None)),
    Case("suite-renamed", "claims", "suite", lambda f: edit_all(f, lambda d: d.update(suite="sd15-quick"))),
    Case("dropped-record", "claims", "missing", lambda f: first(f, "train").unlink()),
    Case("duplicated-record", "claims", "duplicate cell", _duplicate),
    Case("attack-name-pipe-newline", "claims", "not a safe name",
         lambda f: edit_all(f, lambda d: d.update(attack="x | 0.0001 |\n## forged")))
    ,
    Case("isolation-none", "claims", "isolation", lambda f: edit_all(f, lambda d: d.update(isolation="none")), v2_only=True),
    Case("split-relabelled", "claims", "duplicate cell", lambda f: rename_cells(
        f, lambda d: d.update(split="test") if d["split"] == "train" and d["eps_label"] == "8/255" else None)),
    Case("params-differ", "claims", "differs", lambda f: edit_one(f, lambda d: d["attack_params"].update(steps=999))),
    Case("failed-cell", "claims", "cell failed", lambda f: edit_one(f, lambda d: d.update(status="error", error="boom"))),
    Case("schema-v1", "claims", "schema_version", lambda f: edit_one(f, lambda d: d.update(schema_version=1)), v2_only=True),
    Case("foreign-json", "claims", "not a spdbench record", lambda f: first(f).write_text('{"hello": "world"}')),
    Case("extra-prompt", "claims", "outside suite", _extra_prompt),
    Case("max-norm-applied-lie", "claims", "max_norm_applied",
         lambda f: edit_all(f, lambda d: d["validation"].update(max_norm_applied=0.5 / 255)), v2_only=True),
    # --- against the stored perturbations and the suite's images -----------------------------------
    Case("zero-delta-rehashed", "claims", "max_norm_applied", lambda f: replace_delta(f, torch.zeros_like)),
    Case("delta-32px-rehashed", "claims", "shape", lambda f: replace_delta(f, lambda d: d[:, :, :32, :32])),
    Case("delta-scaled-past-eps", "claims", "over the budget", lambda f: replace_delta(f, lambda d: d * 3, True)),
    Case("eps-2-consistently-relabelled", "claims", "over the budget", lambda f: rename_cells(
        f, lambda d: d.update(eps=2 / 255, eps_label="2/255") if d["eps_label"] == "8/255" else None)),
    Case("universal-claimed-per-image", "images", "not one delta", lambda f: edit_all(f, lambda d: d.update(universal=True))),
    Case("image-names-changed", "images", "are not suite", lambda f: edit_all(
        f, lambda d: d.update(image_names=[f"{n}-x" for n in d["image_names"]]) if d["split"] == "test" else None)),
    # --- re-measured: numbers consistent with themselves, but false --------------------------------
    Case("per-image-ssim-0.01", "sample", "does not reproduce", lambda f: edit_one(f, set_list("protection", "ssim", lambda x: 0.01))),
    Case("purified-list-edited", "sample", "does not reproduce",
         lambda f: edit_one(f, set_list("purified", "ssim", lambda x: x - 0.3, purifier="jpeg75"))),
    Case("imperceptibility-edited", "sample", "does not reproduce",
         lambda f: edit_one(f, set_list("imperceptibility", "psnr", lambda x: x + 5), split="train")),
    Case("zero-delta-all-fields-fixed", "sample", "does not reproduce", lambda f: replace_delta(f, torch.zeros_like, True)),
    Case("relabel-attack-consistently", "rerun", "different perturbation",
         lambda f: rename_cells(f, lambda d: d.update(attack="none", attack_params={}))),
]

BY_NAME = {c.name: c for c in CASES}
