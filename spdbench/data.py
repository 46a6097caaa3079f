"""Photos: the bundled offline set, image folders, the ImageNet-subset manifest, the split.

The bundled photos are real, permissively licensed colour photographs that installed packages
ship (scikit-image, scikit-learn, matplotlib), so tests and the smoke suite need no download.
Every image leaves this module as float32 in [0, 1], shape (N, 3, S, S), on the 8-bit grid.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .errors import InputError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


@dataclass(frozen=True)
class Photo:
    """A bundled photograph: where it lives in an installed package and its licence."""

    name: str
    package: str
    relpath: str
    license: str

    @property
    def path(self) -> Path:
        spec = importlib.util.find_spec(self.package)
        if spec is None or spec.origin is None:
            raise InputError(f"bundled photo {self.name!r} needs the package {self.package!r}, which is not installed")
        return Path(spec.origin).parent / self.relpath


BUNDLED: tuple[Photo, ...] = (
    Photo("astronaut", "skimage", "data/astronaut.png", "public domain (NASA)"),
    Photo("chelsea", "skimage", "data/chelsea.png", "CC0 (Stefan van der Walt)"),
    Photo("coffee", "skimage", "data/coffee.png", "CC0 (Rachel Michetti)"),
    Photo("rocket", "skimage", "data/rocket.jpg", "public domain (SpaceX)"),
    Photo("motorcycle", "skimage", "data/motorcycle_left.png", "Middlebury stereo data set, free for research"),
    Photo("hubble", "skimage", "data/hubble_deep_field.jpg", "public domain (NASA)"),
    Photo("retina", "skimage", "data/retina.jpg", "CC BY 4.0 (Hacks, Wikimedia)"),
    Photo("ihc", "skimage", "data/ihc.png", "public domain (Yang et al.)"),
    Photo("china", "sklearn", "datasets/images/china.jpg", "CC BY 2.0 (danielbuechele)"),
    Photo("flower", "sklearn", "datasets/images/flower.jpg", "CC BY 2.0 (vultilion)"),
    Photo("grace_hopper", "matplotlib", "mpl-data/sample_data/grace_hopper.jpg", "public domain (US Navy)"),
)
BUNDLED_NAMES = tuple(p.name for p in BUNDLED)
SPLIT_SEED = 0
TRAIN_FRACTION = 0.64  # the SPD protocol: 64 of 100 images train, 36 test


def sha256_file(path: Union[str, Path]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_image(path: Union[str, Path]) -> np.ndarray:
    """Read an image file as uint8 RGB (H, W, 3); clear errors for missing or unreadable files."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"image file {path} does not exist")
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise InputError(f"image file {path} is not a readable image: {exc}") from None


def center_crop_resize(array: np.ndarray, size: int) -> np.ndarray:
    """Centre square crop, then a bicubic resize to size x size (uint8 out)."""
    h, w = array.shape[:2]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    crop = Image.fromarray(array[top:top + s, left:left + s])
    if s != size:
        crop = crop.resize((size, size), Image.BICUBIC)
    return np.asarray(crop)


def to_tensor(arrays: Sequence[np.ndarray]) -> torch.Tensor:
    """uint8 (H, W, 3) arrays -> float32 (N, 3, H, W) in [0, 1]."""
    stacked = np.stack(arrays).astype(np.float32) / 255.0
    return torch.from_numpy(stacked).permute(0, 3, 1, 2).contiguous()


def split_indices(n: int, seed: int = SPLIT_SEED, train_fraction: float = TRAIN_FRACTION) -> tuple[list[int], list[int]]:
    """Deterministic seeded train/test split: 64:36 for 100 images (the SPD protocol)."""
    if n < 2:
        raise InputError(f"a train/test split needs at least 2 images, got {n}")
    n_train = min(max(1, round(n * train_fraction)), n - 1)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(order[:n_train]), sorted(order[n_train:])


def bundled_split(seed: int = SPLIT_SEED) -> dict[str, list[str]]:
    """{'train': names, 'test': names} of the bundled photos under the protocol split."""
    train, test = split_indices(len(BUNDLED), seed)
    return {"train": [BUNDLED_NAMES[i] for i in train], "test": [BUNDLED_NAMES[i] for i in test]}


def load_photos(n: Optional[int] = None, size: int = 256, names: Optional[Sequence[str]] = None,
                split: Optional[str] = None) -> torch.Tensor:
    """Bundled photos as (N, 3, size, size) float32 in [0,1].

    `names` picks photos by name, `split` ('train' | 'test') picks a protocol split, `n` takes the
    first n of the selection.
    """
    if size < 8 or size % 8:
        raise InputError(f"size must be a positive multiple of 8 (the VAE's factor), got {size}")
    if names is None:
        names = bundled_split()[split] if split is not None else list(BUNDLED_NAMES)
    if split not in (None, "train", "test"):
        raise InputError(f"unknown split {split!r}; expected 'train' or 'test'")
    by_name = {p.name: p for p in BUNDLED}
    unknown = [x for x in names if x not in by_name]
    if unknown:
        raise InputError(f"unknown bundled photo(s) {unknown}; available: {', '.join(BUNDLED_NAMES)}")
    if n is not None:
        if n < 1 or n > len(names):
            raise InputError(f"n must be between 1 and {len(names)} for this selection, got {n}")
        names = list(names)[:n]
    return to_tensor([center_crop_resize(read_image(by_name[x].path), size) for x in names])


def load_folder(folder: Union[str, Path], size: int = 512) -> tuple[torch.Tensor, list[str]]:
    """Every image in a folder (sorted by name), centre-cropped and resized; returns (images, names)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"image folder {folder} does not exist or is not a folder")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise InputError(f"image folder {folder} contains no images ({', '.join(IMAGE_SUFFIXES)})")
    return to_tensor([center_crop_resize(read_image(p), size) for p in files]), [p.name for p in files]


# --- ImageNet-subset manifest -----------------------------------------------------------------
def write_manifest(files: Sequence[Union[str, Path]], out: Union[str, Path], root: Union[str, Path]) -> Path:
    """Write a manifest {"format": "spdbench-manifest/1", "images": [{"file", "sha256"}]}."""
    root = Path(root)
    entries = [{"file": str(Path(f).relative_to(root)) if Path(f).is_absolute() else str(f),
                "sha256": sha256_file(root / f if not Path(f).is_absolute() else f)} for f in files]
    out = Path(out)
    out.write_text(json.dumps({"format": "spdbench-manifest/1", "images": entries}, indent=1))
    return out


def load_manifest(manifest: Union[str, Path], root: Union[str, Path], size: int = 512) -> tuple[torch.Tensor, list[str]]:
    """Load the images a manifest lists from `root` (e.g. your ImageNet val folder), checking sha256.

    This is how the SPD protocol's 100 ImageNet images are pointed to without redistributing them.
    """
    manifest, root = Path(manifest), Path(root)
    try:
        data = json.loads(manifest.read_text())
        entries = data["images"]
        if data.get("format") != "spdbench-manifest/1":
            raise KeyError("format")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(f"manifest {manifest} is not a spdbench-manifest/1 JSON file ({exc})") from None
    arrays, names = [], []
    for entry in entries:
        rel = Path(entry["file"])
        if rel.is_absolute() or ".." in rel.parts:
            raise InputError(f"manifest {manifest}: file name {entry['file']!r} must be relative, without '..'")
        path = root / rel
        if not path.is_file():
            raise InputError(f"manifest {manifest}: {rel} not found under {root}")
        digest = sha256_file(path)
        if digest != entry["sha256"]:
            raise InputError(
                f"manifest {manifest}: sha256 of {rel} is {digest[:12]}..., expected {entry['sha256'][:12]}..."
                " (a different file than the protocol's)"
            )
        arrays.append(center_crop_resize(read_image(path), size))
        names.append(str(rel))
    if not arrays:
        raise InputError(f"manifest {manifest} lists no images")
    return to_tensor(arrays), names
