"""The zoo's training/held-out photo list (photos.json): where each photo comes from, its licence,
its sha256, and the command that installs them offline.

Why a list and not the photos: the photos are hundreds of MB of other projects' artwork; the
repository keeps only the record (package, version, path inside the package, licence, sha256),
and `python -m zoo.photos fetch DIR` rebuilds the exact set from Debian packages
(`apt-get download` + `dpkg-deb -x`, no root needed for either) and checks every hash. Photos
whose source is an installed PyPI package (the bundled train split) are read in place and
checked the same way.

Layout of DIR after fetch: DIR/debs/*.deb and DIR/pkgs/<package>/<file>.
"""
from __future__ import annotations

import argparse
import fnmatch
import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from spdbench.data.photos import BUNDLED, sha256_file
from spdbench.errors import InputError

DATA_LIST = Path(__file__).with_name("photos.json")
SPLITS = ("train", "heldout")


@dataclass(frozen=True)
class ZooPhoto:
    """One photo of the list, resolved to a path on this machine."""

    name: str
    package: str
    file: str
    license: str
    sha256: str
    split: str
    caption: str
    path: Path


def load_list(list_path: Path = DATA_LIST) -> dict:
    """The parsed data list; a missing or malformed list is an InputError, not a KeyError later."""
    try:
        data = json.loads(Path(list_path).read_text())
    except FileNotFoundError:
        raise InputError(f"--data-list {list_path}: file not found; expected a JSON photo list") from None
    except json.JSONDecodeError as exc:
        raise InputError(f"--data-list {list_path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict) or "photos" not in data or "packages" not in data:
        raise InputError(f"--data-list {list_path}: expected an object with 'packages' and 'photos'")
    return data


def _pypi_root(package: str) -> Path:
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise InputError(f"photo list needs the Python package {package!r}, which is not installed")
    return Path(spec.origin).parent


def resolve(entry: dict, packages: dict, root: Optional[Path]) -> Path:
    """Path of one list entry: under root/pkgs/<package>/ for Debian, in site-packages for PyPI."""
    source = packages[entry["package"]]["source"]
    if source == "pypi-installed":
        return _pypi_root(packages[entry["package"]]["module"]) / entry["file"]
    if root is None:
        raise InputError(f"photo {entry['name']!r} comes from a Debian package: pass --photos DIR "
                         "(made by `python -m zoo.photos fetch DIR`)")
    return Path(root) / "pkgs" / entry["package"] / entry["file"]


def photos(split: str, root: Optional[Path], list_path: Path = DATA_LIST, verify: bool = True) -> list[ZooPhoto]:
    """The photos of one split, every file present and (by default) hash-checked.

    Raises on the first missing or changed file: training on a silently different set would
    make the recorded data list a lie.
    """
    if split not in SPLITS:
        raise InputError(f"split {split!r}: expected one of {SPLITS}")
    data = load_list(list_path)
    out = []
    for e in data["photos"]:
        if e["split"] != split:
            continue
        p = resolve(e, data["packages"], root)
        if not p.is_file():
            raise InputError(f"photo {e['name']!r}: {p} is missing; run `python -m zoo.photos fetch DIR`")
        if verify and sha256_file(p) != e["sha256"]:
            raise InputError(f"photo {e['name']!r}: {p} has sha256 {sha256_file(p)}, the list says {e['sha256']}")
        out.append(ZooPhoto(e["name"], e["package"], e["file"], e["license"], e["sha256"], split,
                            e.get("caption", ""), p))
    if not out:
        raise InputError(f"the data list {list_path} has no {split!r} photos")
    _check_disjoint(data)
    return out


HALVES = ("a", "b")


def half_of(sha256: str) -> str:
    """Which half of the list a photo falls in: "a" if its sha256's first hex digit is 0-7, else "b".

    Why: sibling models (tiny-b) are trained on disjoint halves of the train split to see how much
    a figure depends on the exact photos. The rule reads only the photo's own recorded hash, so a
    photo never changes half when others are added to or dropped from the list (the real list:
    157 a / 151 b).
    """
    if not isinstance(sha256, str) or len(sha256) != 64:
        raise InputError(f"half_of: expected a 64-digit sha256, got {sha256!r}")
    return HALVES[0] if int(sha256[0], 16) < 8 else HALVES[1]


def select_half(entries: Sequence, half: Optional[str]) -> list:
    """The entries (list dicts or ZooPhoto) of one half; half=None keeps them all."""
    if half is None:
        return list(entries)
    if half not in HALVES:
        raise InputError(f"--photo-half {half!r}: expected one of {HALVES}")
    return [e for e in entries if half_of(e["sha256"] if isinstance(e, dict) else e.sha256) == half]


def _check_disjoint(data: dict) -> None:
    """Held-out packages never feed training, and the bundled test split is never trained on."""
    from spdbench.data.photos import bundled_split

    held = {e["package"] for e in data["photos"] if e["split"] == "heldout"}
    train = [e for e in data["photos"] if e["split"] == "train"]
    leak = sorted({e["package"] for e in train} & held)
    if leak:
        raise InputError(f"data list: package(s) {leak} are in both the train and the held-out split")
    test_files = {(p.package, p.relpath) for p in BUNDLED if p.name in bundled_split()["test"]}
    bad = [e["name"] for e in train if (data["packages"][e["package"]].get("module"), e["file"]) in test_files]
    if bad:
        raise InputError(f"data list: bundled test photos {bad} are in the train split")
    hashes = {}
    for e in data["photos"]:
        if e["sha256"] in hashes and hashes[e["sha256"]][1] != e["split"]:
            raise InputError(f"data list: {e['name']!r} and {hashes[e['sha256']][0]!r} are the same file in two splits")
        hashes[e["sha256"]] = (e["name"], e["split"])


# --- Debian copyright files -----------------------------------------------------------------
def debian_license(copyright_text: str, path: str) -> Optional[tuple[str, str]]:
    """(License, Copyright) of `path` by the machine-readable copyright file: last match wins.

    Patterns are relative to the source tree, paths are as installed, so a pattern matches the
    path's tail or, failing that, its base name (e.g. "16.04/x.jpg" vs ".../backgrounds/x.jpg").
    """
    found = None
    for para in copyright_text.split("\n\n"):
        fields, key = {}, None
        for line in para.splitlines():
            if line[:1] in (" ", "\t") and key:
                fields[key] += " " + line.strip()
            elif ":" in line:
                key, _, val = line.partition(":")
                key = key.strip()
                fields[key] = val.strip()
        if "Files" not in fields or "License" not in fields:
            continue
        for pat in fields["Files"].split():
            if pat.startswith("debian/"):
                continue  # the packaging, never an installed file
            base = pat.rsplit("/", 1)[-1]
            same_name = "*" not in base and base == path.rsplit("/", 1)[-1]
            if pat == "*" or fnmatch.fnmatch(path, "*/" + pat) or same_name:
                found = (fields["License"].split()[0] if fields["License"] else "", fields.get("Copyright", ""))
                break
    return found


# --- fetch ----------------------------------------------------------------------------------
def _run(cmd: list, cwd: Path, hint: str) -> None:
    """Run a tool; a failure becomes one InputError line naming the command (no traceback)."""
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or [""])[-1]
        raise InputError(f"`{' '.join(cmd)}` failed (exit {done.returncode}: {last}); {hint}")


def fetch(dest: Path, list_path: Path = DATA_LIST, log=print) -> dict:
    """Download and unpack every Debian package of the list into dest, then verify all photos.

    Needs `apt-get` (with package lists: run `apt-get update` once) and `dpkg-deb`. A package
    whose recorded version is no longer downloadable fails loudly: a newer version may hold
    other files, so the record would no longer describe the training set.
    """
    data = load_list(list_path)
    dest = Path(dest)
    (dest / "debs").mkdir(parents=True, exist_ok=True)
    for tool in ("apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise InputError(f"fetch needs {tool!r} on PATH (a Debian-based machine)")
    for name, pkg in sorted(data["packages"].items()):
        if pkg["source"] != "debian":
            continue
        deb = dest / "debs" / pkg["deb"]
        if not (deb.is_file() and sha256_file(deb) == pkg["deb_sha256"]):
            log(f"apt-get download {name}={pkg['version']}")
            _run(["apt-get", "download", f"{name}={pkg['version']}"], dest / "debs",
                 "run `apt-get update` first; if it still fails, that version has left the archive "
                 "and the list must be rebuilt (new hashes, re-measured figures)")
        if not deb.is_file():
            raise InputError(f"package {name}: apt-get did not produce {deb.name}")
        if sha256_file(deb) != pkg["deb_sha256"]:
            raise InputError(f"package {name}: {deb.name} has sha256 {sha256_file(deb)}, "
                             f"the list says {pkg['deb_sha256']}")
        target = dest / "pkgs" / name
        if not target.is_dir():
            tmp = target.with_name(name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            _run(["dpkg-deb", "-x", str(deb), str(tmp)], dest, "is the .deb complete?")
            tmp.rename(target)
    counts = {s: len(photos(s, dest, list_path)) for s in SPLITS}
    log(f"verified {counts} photos under {dest}")
    return counts


def summary(list_path: Path = DATA_LIST) -> dict:
    """Counts per split, package and licence (what docs/zoo.md tabulates)."""
    data = load_list(list_path)
    out: dict = {}
    for e in data["photos"]:
        key = (e["split"], e["package"], e["license"])
        out[key] = out.get(key, 0) + 1
    return {" | ".join(k): v for k, v in sorted(out.items())}


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fetch", help="download, unpack and verify the listed photos into DIR")
    f.add_argument("dir", type=Path)
    f.add_argument("--data-list", type=Path, default=DATA_LIST)
    s = sub.add_parser("summary", help="counts per split, package and licence")
    s.add_argument("--data-list", type=Path, default=DATA_LIST)
    args = ap.parse_args(argv)
    if args.cmd == "fetch":
        fetch(args.dir, args.data_list)
    else:
        print(json.dumps(summary(args.data_list), indent=1))
    return 0


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2)
