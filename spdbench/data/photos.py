"""Photos: the bundled offline set, image folders, the ImageNet-subset manifest, the split.

The bundled photos are real, permissively licensed colour photographs that installed packages
ship (scikit-image, scikit-learn, matplotlib), so tests and the smoke suite need no download.
Every image leaves this module as float32 in [0, 1], shape (N, 3, S, S), on the 8-bit grid.
Your own photos (folder, manifest) are centre-cropped and downsized, never upscaled: one whose
shorter side is below the suite's size is refused, as is the same picture twice; 16-bit photos
are scaled to 8 bits and decompression bombs refused before decoding (see `read_image`).
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import re
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from spdbench.errors import InputError

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


#: the most pixels a photo may declare: Pillow's own decompression-bomb limit (89.5 Mpx, e.g.
#: 9459 x 9459); a larger header is refused before any pixel is decoded
MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def read_image(path: Union[str, Path]) -> np.ndarray:
    """Read an image file as uint8 RGB (H, W, 3); clear errors for missing, unreadable or huge files.

    Documented conversions: 16-bit greyscale (Pillow mode I;16, or I from a PNG, whose depth is at
    most 16 bits) is scaled to 8 bits as round(v * 255 / 65535) -- Pillow's own convert("RGB")
    clips it, turning almost every pixel white; 16-bit RGB PNGs keep their high byte (Pillow);
    palette, greyscale, alpha and CMYK images are converted to RGB (alpha dropped). 32-bit
    integer and float images are refused: their range is unknown. A JPEG's EXIF orientation is
    applied (the photo as a viewer shows it); an animation (GIF, APNG, WebP, multi-page TIFF) is
    refused (see `_still_upright`).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"image file {path} does not exist")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit, below
            im = Image.open(path)
        with im:
            w, h = im.size
            if w * h > MAX_IMAGE_PIXELS:
                raise InputError(f"image file {path} declares {w}x{h} pixels ({w * h / 1e6:.1f} Mpx), above the "
                                 f"limit of {MAX_IMAGE_PIXELS / 1e6:.1f} Mpx: refused as a possible decompression bomb")
            return _to_rgb8(_still_upright(im, path), path)
    except Image.DecompressionBombError as exc:
        raise InputError(f"image file {path} declares too many pixels, refused as a possible decompression "
                         f"bomb (limit {MAX_IMAGE_PIXELS / 1e6:.1f} Mpx): {exc}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, TypeError, EOFError, struct.error) as exc:
        if isinstance(exc, InputError):
            raise
        raise InputError(f"image file {path} is not a readable image: {exc}") from None


def _still_upright(im: Image.Image, path: Path) -> Image.Image:
    """`im` turned upright by its EXIF orientation (in place: Pillow's format stays, `_to_rgb8` reads
    it); an animated image is refused with one line naming the file.

    Why: a phone stores a portrait JPEG as landscape pixels plus an orientation tag, so without it
    the photo was edited lying on its side; and Pillow reads only an animation's first frame, which
    silently made one picture of many. An MPO (a camera JPEG with previews or a depth map behind
    the picture) is kept: its first frame is the photo."""
    if getattr(im, "is_animated", False) and im.format != "MPO":
        raise InputError(f"image file {path} is animated ({im.format}, {getattr(im, 'n_frames', '?')} frames); "
                         "expected a still photo (save the frame you want as PNG)")
    ImageOps.exif_transpose(im, in_place=True)
    return im


def _to_rgb8(im: Image.Image, path: Path) -> np.ndarray:
    """The conversions documented in `read_image`."""
    mode = im.mode
    if mode in _SIXTEEN_BIT_MODES or (mode == "I" and im.format == "PNG"):
        grey = np.asarray(im).astype(np.float64)
        if grey.size and (grey.min() < 0 or grey.max() > 65535):
            raise InputError(f"image file {path}: 16-bit values outside 0..65535 ({grey.min():.0f}..{grey.max():.0f})")
        grey8 = np.round(grey * (255.0 / 65535.0)).astype(np.uint8)
        return np.repeat(grey8[..., None], 3, axis=2)
    if mode in ("I", "F"):
        kind = "32-bit integer" if mode == "I" else "32-bit float"
        raise InputError(f"image file {path} is a {kind} image (Pillow mode {mode}) of unknown range; "
                         "expected an 8- or 16-bit photo (convert it to 8-bit RGB)")
    return np.asarray(im.convert("RGB"))


def check_min_size(array: np.ndarray, size: int, what: str) -> None:
    """Refuse a photo whose shorter side is below the suite's size: upscaling an 8x8 (or a 1x500
    strip) to 128 px invents every pixel the attack and the editor would then see."""
    h, w = array.shape[:2]
    if min(h, w) < size:
        raise InputError(f"{what} is {w}x{h} px, smaller than the suite's image size {size}: its shorter side "
                         f"must be at least {size} px (spdbench crops and downsizes photos, it never upscales them)")


def check_size_multiple(images: torch.Tensor, factor: int = 8, name: str = "images") -> None:
    """Refuse images whose sides are not multiples of the VAE's factor: the img2img pipeline would
    silently edit a 60-px image at 56 px and the scores would compare different pixels."""
    h, w = int(images.shape[-2]), int(images.shape[-1])
    if h % factor or w % factor:
        def near(n: int) -> str:
            lo = n - n % factor
            return f"{lo} or {lo + factor}" if lo else f"{factor}"

        raise InputError(f"{name} are {w}x{h} px; the target needs sides that are multiples of {factor} "
                         f"(crop or resize width to {near(w)} and height to {near(h)} px)")


def pixel_digest(array: np.ndarray) -> str:
    """sha256 of decoded pixels and shape: the same photo saved twice (or re-encoded losslessly) matches."""
    return hashlib.sha256(repr(array.shape).encode() + np.ascontiguousarray(array).tobytes()).hexdigest()


def _refuse_duplicates(digests: Sequence[str], names: Sequence[str], where: str) -> None:
    seen: dict[str, str] = {}
    for digest, name in zip(digests, names):
        if digest in seen:
            raise InputError(f"{where} holds the same image twice: {seen[digest]!r} and {name!r}; a duplicate "
                             "would count one photo twice in every mean -- remove one")
        seen[digest] = name


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
    first n of the selection. Unlike your own folders, the bundled set is a fixed, documented
    selection: a photo whose shorter side is below `size` is upscaled (bicubic), which at 512 px
    concerns chelsea (300 px), coffee, rocket, china, flower (400-427 px) and motorcycle (500 px);
    `bundled_upscaled(size)` lists them.
    """
    if size < 8 or size % 8:
        raise InputError(f"size must be a positive multiple of 8 (the VAE's factor), got {size}")
    if split not in (None, "train", "test"):
        raise InputError(f"unknown split {split!r}; expected 'train' or 'test'")
    if names is None:
        names = bundled_split()[split] if split is not None else list(BUNDLED_NAMES)
    by_name = {p.name: p for p in BUNDLED}
    unknown = [x for x in names if x not in by_name]
    if unknown:
        raise InputError(f"unknown bundled photo(s) {unknown}; available: {', '.join(BUNDLED_NAMES)}")
    if n is not None:
        if n < 1 or n > len(names):
            raise InputError(f"n must be between 1 and {len(names)} for this selection, got {n}")
        names = list(names)[:n]
    return to_tensor([center_crop_resize(read_image(by_name[x].path), size) for x in names])


def bundled_upscaled(size: int) -> list[str]:
    """Names of the bundled photos whose shorter side is below `size` (load_photos upscales them)."""
    out = []
    for photo in BUNDLED:
        with Image.open(photo.path) as im:
            if min(im.size) < size:
                out.append(photo.name)
    return out


def load_folder(folder: Union[str, Path], size: int = 512) -> tuple[torch.Tensor, list[str]]:
    """Every image in a folder (sorted by name), centre-cropped and downsized; returns (images, names).

    Refused with one line: an image whose shorter side is below `size` (never upscaled), and the
    same picture twice (equal decoded pixels, whatever the file names).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"image folder {folder} does not exist or is not a folder")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise InputError(f"image folder {folder} contains no images ({', '.join(IMAGE_SUFFIXES)})")
    resized, digests = [], []
    for p in files:  # one full-size photo in memory at a time
        array = read_image(p)
        check_min_size(array, size, f"image {p}")
        digests.append(pixel_digest(array))
        resized.append(center_crop_resize(array, size))
    _refuse_duplicates(digests, [p.name for p in files], f"image folder {folder}")
    return to_tensor(resized), [p.name for p in files]


# --- ImageNet-subset manifest -----------------------------------------------------------------
def write_manifest(files: Sequence[Union[str, Path]], out: Union[str, Path], root: Union[str, Path]) -> Path:
    """Write a manifest {"format": "spdbench-manifest/1", "images": [{"file", "sha256"}]}."""
    root = Path(root)
    entries = [{"file": str(Path(f).relative_to(root)) if Path(f).is_absolute() else str(f),
                "sha256": sha256_file(root / f if not Path(f).is_absolute() else f)} for f in files]
    out = Path(out)
    out.write_text(json.dumps({"format": "spdbench-manifest/1", "images": entries}, indent=1))
    return out


_SHA256 = re.compile(r"^[0-9a-fA-F]{64}$")


def _manifest_entries(manifest: Path) -> list[tuple[Path, str]]:
    """The (relative file, sha256) pairs of a manifest, every entry checked before any file is read."""
    out: list[tuple[Path, str]] = []
    files: dict[str, int] = {}
    digests: dict[str, int] = {}
    for i, entry in enumerate(_manifest_images(manifest)):
        where = f"manifest {manifest}: images[{i}]"
        rel, digest = _manifest_entry(entry, where, manifest)
        key = rel.as_posix()
        if key in files:
            raise InputError(f"{where} lists {entry['file']!r} again (first at images[{files[key]}]); duplicates "
                             "would count one photo twice")
        if digest in digests:
            raise InputError(f"{where} ({entry['file']!r}) has the same sha256 as images[{digests[digest]}]: the "
                             "same image twice")
        files[key], digests[digest] = i, i
        out.append((rel, digest))
    return out


def _manifest_images(manifest: Path) -> list:
    """The manifest's 'images' list: a spdbench-manifest/1 JSON object with a non-empty list."""
    try:
        data = json.loads(manifest.read_text())
    except (OSError, ValueError, RecursionError) as exc:
        raise InputError(f"manifest {manifest} is not a spdbench-manifest/1 JSON file ({exc})") from None
    if not isinstance(data, dict) or data.get("format") != "spdbench-manifest/1":
        raise InputError(f"manifest {manifest} is not a spdbench-manifest/1 JSON file "
                         "(expected an object with \"format\": \"spdbench-manifest/1\")")
    entries = data.get("images")
    expected = 'a list of {"file": "RELATIVE/PATH", "sha256": "64 hex digits"} objects'
    if not isinstance(entries, list):
        raise InputError(f"manifest {manifest}: 'images' must be {expected}, got {type(entries).__name__}")
    if not entries:
        raise InputError(f"manifest {manifest} lists no images")
    return entries


def _manifest_entry(entry, where: str, manifest: Path) -> tuple[Path, str]:
    """One entry: an object with a relative 'file' (no '..') and a 64-hex 'sha256' (returned lower-case)."""
    if not isinstance(entry, dict):
        raise InputError(f"{where} must be an object with 'file' and 'sha256', got {type(entry).__name__} "
                         f"{str(entry)[:60]!r}")
    file, digest = entry.get("file"), entry.get("sha256")
    if not isinstance(file, str) or not file:
        raise InputError(f"{where} needs 'file', a relative path string, got {file!r}")
    rel = Path(file)
    if rel.is_absolute() or ".." in rel.parts:
        raise InputError(f"manifest {manifest}: file name {file!r} must be relative, without '..'")
    if not isinstance(digest, str) or not _SHA256.match(digest):
        raise InputError(f"{where} ({file!r}) needs 'sha256', 64 hex digits, got {str(digest)[:70]!r}")
    return rel, digest.lower()


def load_manifest(manifest: Union[str, Path], root: Union[str, Path], size: int = 512) -> tuple[torch.Tensor, list[str]]:
    """Load the images a manifest lists from `root` (e.g. your ImageNet val folder), checking sha256.

    This is how the SPD protocol's 100 ImageNet images are pointed to without redistributing them.
    Every entry is validated first (an object with a relative 'file' and a 64-hex 'sha256', no
    file or hash twice); images below `size` are refused like in `load_folder`.
    """
    manifest, root = Path(manifest), Path(root)
    entries = _manifest_entries(manifest)
    arrays, names = [], []
    for rel, expected in entries:
        path = root / rel
        if not path.is_file():
            raise InputError(f"manifest {manifest}: {rel} not found under {root}")
        digest = sha256_file(path)
        if digest != expected:
            raise InputError(
                f"manifest {manifest}: sha256 of {rel} is {digest[:12]}..., expected {expected[:12]}..."
                " (a different file than the protocol's)"
            )
        array = read_image(path)
        check_min_size(array, size, f"image {path}")
        arrays.append(center_crop_resize(array, size))
        names.append(str(rel))
    return to_tensor(arrays), names
