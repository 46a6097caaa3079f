"""Unit tests of the input contracts of issue 16: image files (16-bit, decompression bombs, too small,
duplicates), manifests, eps parsing and labels, devices, dtypes, target and suite names, and the
CLI's argument checks. Each bad input is one line that names the argument, the value and what is
expected; each accepted conversion is checked against the value it must produce."""
from __future__ import annotations

import json
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

import spdbench
from spdbench import cli
from spdbench.budget import Budget, format_eps, parse_eps
from spdbench.data.photos import (MAX_IMAGE_PIXELS, bundled_upscaled, check_size_multiple, load_folder, load_manifest,
                           read_image, write_manifest)
from spdbench.errors import BudgetError, InputError, SpdbenchError, TargetLoadError
from spdbench.suites import get_suite
from spdbench.targets import parse_device, parse_dtype


def _one_line(exc: BaseException) -> str:
    text = str(exc)
    assert text and "\n" not in text, f"not one line: {text!r}"
    return text


# --- PNG writing by hand: headers Pillow cannot or will not write ---------------------------------
def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _png(width: int, height: int, depth: int, colour: int, rows: bytes) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(rows))
            + _chunk(b"IEND", b""))


def _png16_rgb(values: np.ndarray) -> bytes:
    """A 16-bit RGB PNG (Pillow can read but not write one)."""
    h, w, _ = values.shape
    rows = b"".join(b"\0" + values[y].astype(">u2").tobytes() for y in range(h))
    return _png(w, h, 16, 2, rows)


# --- image files ----------------------------------------------------------------------------------
def test_16bit_greyscale_png_is_scaled_not_clipped(tmp_path):
    rng = np.random.default_rng(0)
    grey16 = rng.integers(0, 65536, size=(40, 48), dtype=np.uint16)
    Image.fromarray(grey16).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode in ("I;16", "I")
    rgb = read_image(tmp_path / "g16.png")
    expected = np.round(grey16 / 65535 * 255).astype(np.uint8)
    assert rgb.dtype == np.uint8 and rgb.shape == (40, 48, 3)
    assert np.array_equal(rgb[..., 0], expected) and np.array_equal(rgb[..., 2], expected)
    assert (rgb == 255).mean() < 0.01, "Pillow's own convert('RGB') clipped 99.6% of such pixels to 255"


def test_16bit_rgb_png_keeps_its_high_byte(tmp_path):
    values = np.random.default_rng(1).integers(0, 65536, size=(8, 8, 3), dtype=np.uint16)
    (tmp_path / "rgb16.png").write_bytes(_png16_rgb(values))
    assert np.abs(read_image(tmp_path / "rgb16.png").astype(int) - (values >> 8)).max() <= 1


@pytest.mark.parametrize("mode", ["I", "F"])
def test_32bit_images_of_unknown_range_are_refused(tmp_path, mode):
    arr = np.arange(64, dtype=np.int32 if mode == "I" else np.float32).reshape(8, 8) * 1000
    Image.fromarray(arr).save(tmp_path / "deep.tif")
    with pytest.raises(InputError, match=f"mode {mode}") as info:
        read_image(tmp_path / "deep.tif")
    assert "deep.tif" in _one_line(info.value)


@pytest.mark.parametrize("side", [20000, 10000])
def test_decompression_bomb_is_refused_before_decoding(tmp_path, side):
    # 20000^2 is past Pillow's error limit; 10000^2 only past its warning limit (it would decode)
    (tmp_path / "bomb.png").write_bytes(_png(side, side, 8, 2, b"\0" * 16))
    with pytest.raises(InputError) as info:
        read_image(tmp_path / "bomb.png")
    msg = _one_line(info.value)
    assert "bomb.png" in msg and "decompression bomb" in msg and f"{MAX_IMAGE_PIXELS / 1e6:.1f} Mpx" in msg


def test_truncated_and_garbage_files_are_one_line(tmp_path):
    good = tmp_path / "good.png"
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(good)
    (tmp_path / "cut.png").write_bytes(good.read_bytes()[:60])
    with pytest.raises(InputError, match="not a readable image"):
        read_image(tmp_path / "cut.png")


@pytest.mark.parametrize("w,h", [(1, 1), (1, 500), (500, 1), (8, 8), (127, 300)])
def test_images_smaller_than_the_suite_size_are_refused(tmp_path, w, h):
    Image.fromarray(np.full((h, w, 3), 90, np.uint8)).save(tmp_path / "small.png")
    Image.fromarray(np.full((200, 200, 3), 30, np.uint8)).save(tmp_path / "big.png")
    with pytest.raises(InputError) as info:
        load_folder(tmp_path, size=128)
    msg = _one_line(info.value)
    assert "small.png" in msg and f"{w}x{h} px" in msg and "128" in msg


def test_images_at_exactly_the_suite_size_are_kept(tmp_path):
    Image.fromarray(np.full((128, 160, 3), 90, np.uint8)).save(tmp_path / "a.png")
    x, names = load_folder(tmp_path, size=128)
    assert x.shape == (1, 3, 128, 128) and names == ["a.png"]


def test_the_same_picture_twice_in_a_folder_is_refused(tmp_path):
    arr = (np.random.default_rng(2).random((64, 64, 3)) * 255).astype(np.uint8)
    Image.fromarray(arr).save(tmp_path / "a.png")
    Image.fromarray(arr).save(tmp_path / "b.bmp")  # other name, other format, same pixels
    with pytest.raises(InputError, match="same image twice: 'a.png' and 'b.bmp'"):
        load_folder(tmp_path, size=64)


def test_bundled_upscaling_is_listed():
    assert "chelsea" in bundled_upscaled(512) and "astronaut" not in bundled_upscaled(512)
    assert bundled_upscaled(128) == []


@pytest.mark.parametrize("hw,ok", [((64, 64), True), ((60, 60), False), ((64, 60), False), ((56, 72), True)])
def test_sides_must_be_multiples_of_the_vae_factor(hw, ok):
    x = torch.zeros(1, 3, *hw)
    if ok:
        check_size_multiple(x, 8)
    else:
        with pytest.raises(InputError, match="multiples of 8") as info:
            check_size_multiple(x, 8)
        assert f"{hw[1]}x{hw[0]} px" in _one_line(info.value)


# --- manifests ----------------------------------------------------------------------------------
def _manifest(tmp_path, images):
    path = tmp_path / "m.json"
    path.write_text(json.dumps({"format": "spdbench-manifest/1", "images": images}))
    return path


@pytest.fixture
def photo_root(tmp_path):
    for i in range(2):
        arr = (np.random.default_rng(10 + i).random((40, 40, 3)) * 255).astype(np.uint8)
        Image.fromarray(arr).save(tmp_path / f"p{i}.png")
    return tmp_path


@pytest.mark.parametrize("images,needle", [
    ("p0.png", "'images' must be a list"),
    ({"file": "p0.png"}, "'images' must be a list"),
    (["p0.png", "p1.png"], "images[0] must be an object"),
    ([{"file": "p0.png"}], "images[0] ('p0.png') needs 'sha256'"),
    ([{"file": "p0.png", "sha256": 5}], "needs 'sha256', 64 hex digits"),
    ([{"file": "p0.png", "sha256": "abc"}], "needs 'sha256', 64 hex digits"),
    ([{"sha256": "0" * 64}], "images[0] needs 'file'"),
    ([{"file": 7, "sha256": "0" * 64}], "images[0] needs 'file'"),
    ([], "lists no images"),
])
def test_malformed_manifest_entries_are_one_line(photo_root, images, needle):
    with pytest.raises(InputError) as info:
        load_manifest(_manifest(photo_root, images), photo_root, size=32)
    msg = _one_line(info.value)
    assert needle in msg and "m.json" in msg


def test_duplicate_manifest_entries_are_refused(photo_root):
    m = write_manifest(["p0.png", "p1.png"], photo_root / "ok.json", root=photo_root)
    entries = json.loads(m.read_text())["images"]
    with pytest.raises(InputError, match=r"images\[2\] lists 'p0.png' again \(first at images\[0\]\)"):
        load_manifest(_manifest(photo_root, entries + [entries[0]]), photo_root, size=32)
    (photo_root / "copy.png").write_bytes((photo_root / "p0.png").read_bytes())
    same = {"file": "copy.png", "sha256": entries[0]["sha256"]}
    with pytest.raises(InputError, match=r"same sha256 as images\[0\]"):
        load_manifest(_manifest(photo_root, entries + [same]), photo_root, size=32)
    x, names = load_manifest(m, photo_root, size=32)  # the clean manifest still loads
    assert names == ["p0.png", "p1.png"] and x.shape == (2, 3, 32, 32)


@pytest.mark.parametrize("text,needle", [("[1, 2]", "spdbench-manifest/1"), ("{not json", "not a spdbench-manifest/1"),
                                         ("[" * 100000 + "]" * 100000, "not a spdbench-manifest/1")])
def test_manifest_that_is_not_an_object(tmp_path, text, needle):
    (tmp_path / "m.json").write_text(text)
    with pytest.raises(InputError, match=needle) as info:
        load_manifest(tmp_path / "m.json", tmp_path)
    _one_line(info.value)


def test_manifest_images_below_the_suite_size_are_refused(photo_root):
    m = write_manifest(["p0.png"], photo_root / "ok.json", root=photo_root)
    with pytest.raises(InputError, match="40x40 px, smaller than the suite's image size 64"):
        load_manifest(m, photo_root, size=64)


# --- eps ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", [np.float32(16 / 255), np.float64(16 / 255), np.array(16 / 255, np.float32),
                                   torch.tensor(16 / 255), torch.tensor(16 / 255, dtype=torch.float16),
                                   torch.tensor(16 / 255, dtype=torch.bfloat16),
                                   torch.tensor(16 / 255, dtype=torch.float64)])
def test_numpy_and_tensor_scalars_are_the_budget_they_round_to(value):
    assert parse_eps(value) == 16 / 255, "snapped to k/255 within the dtype's rounding error"
    assert Budget("linf", value) == Budget("linf", "16/255")


def test_scalar_off_the_grid_is_converted_with_float():
    assert parse_eps(np.float32(0.03)) == float(np.float32(0.03))
    assert parse_eps(np.int64(1)) == 1.0 and parse_eps(torch.tensor(8.0), "l2") == 8.0


@pytest.mark.parametrize("value,needle", [
    (torch.tensor([0.1, 0.2]), "one number, got a Tensor of shape (2,)"),
    (np.array([16 / 255]), "one number, got a ndarray of shape (1,)"),
    (torch.tensor(True), "real number"), (np.bool_(True), "real number"), (True, "got bool"),
    (1 + 2j, "got complex"), (None, "got NoneType"), ("", "is empty"), ("  ", "is empty"),
    (np.float32("nan"), "finite"), (torch.tensor(float("inf")), "finite"),
])
def test_bad_eps_values_are_one_line(value, needle):
    with pytest.raises(BudgetError) as info:
        parse_eps(value)
    assert needle in _one_line(info.value)


def test_tiny_eps_is_never_labelled_zero():
    assert format_eps(1e-30) == "1e-30" and format_eps(0.4 / 255) != "0/255"
    assert Budget("linf", 1e-30).label == "linf:1e-30"
    assert format_eps(16 / 255) == "16/255" and format_eps(255 / 255) == "255/255"


@pytest.mark.parametrize("value,hint,not_hint", [
    ("300/255", "at most 1 = 255/255", "/255/255"), ("16", "did you mean '16/255'", "at most"),
    (16, "did you mean '16/255'", "at most"), (300, "at most 1 = 255/255", "did you mean"),
    (np.float32(40), "did you mean '40/255'", "np.float32"),
])
def test_eps_above_one_hint_names_a_valid_budget(value, hint, not_hint):
    with pytest.raises(BudgetError) as info:
        parse_eps(value)
    msg = _one_line(info.value)
    assert hint in msg and not_hint not in msg.split("above 1")[1]


# --- devices, dtypes, names -----------------------------------------------------------------------
@pytest.mark.parametrize("device,needle", [
    ("foo", "device 'foo' is not a device: expected 'cpu', 'cuda', 'cuda:N' or 'mps'"),
    ("gpu", "did you mean 'cuda'?"), ("CUDA", "did you mean 'cuda'?"), ("cuda:x", "is not a device"),
    ("meta", "is not supported"), ("xpu", "is not supported"), (0, "must be a string"),
])
def test_bad_device_names_are_one_line(device, needle):
    with pytest.raises(InputError) as info:
        parse_device(device)
    assert needle in _one_line(info.value)


def test_cuda_devices_are_checked_against_this_machine(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(InputError, match="'cuda': this machine cannot use CUDA"):
        parse_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(InputError, match=r"'cuda:7' does not exist: this machine has 2 CUDA GPU\(s\), cuda:0..cuda:1"):
        parse_device("cuda:7")
    assert parse_device("cuda:1") == torch.device("cuda:1") and parse_device(torch.device("cuda")).type == "cuda"
    assert parse_device(None) is None and parse_device(" cpu ") == torch.device("cpu")


@pytest.mark.parametrize("dtype", [torch.int32, torch.float64, torch.uint8, torch.bool])
def test_non_model_dtypes_are_refused(dtype):
    with pytest.raises(TargetLoadError, match=f"dtype {dtype} is not a model dtype") as info:
        parse_dtype(dtype)
    _one_line(info.value)
    assert parse_dtype(torch.bfloat16) is torch.bfloat16 and parse_dtype("fp16") is torch.float16


@pytest.mark.parametrize("name", ["tiny-random-abc", "tiny-random-", "tiny-random-1-2", "sd15-arch-random-x",
                                  "tiny-randomx"])
def test_malformed_seeded_target_names_are_one_line(name):
    with pytest.raises(TargetLoadError) as info:
        spdbench.load_target(name)
    msg = _one_line(info.value)
    assert repr(name) in msg and "SEED" in msg


@pytest.mark.parametrize("name", [None, 3, ["smoke"]])
def test_suite_must_be_a_name(name):
    with pytest.raises(InputError, match="suite must be a suite name .*smoke") as info:
        get_suite(name)
    _one_line(info.value)


# --- CLI argument checks --------------------------------------------------------------------------
@pytest.mark.parametrize("argv,needle", [
    (["leaderboard", "--format", "pdf"], "argument --format: unknown format(s) 'pdf'"),
    (["leaderboard", "--format", "md,"], "argument --format: unknown format(s) ''"),
    (["verify", "x", "--sample", "-1"], "argument --sample: expected a whole number"),
    (["verify", "x", "--sample", "two"], "argument --sample: expected a whole number"),
])
def test_cli_argument_errors_exit_2_naming_the_option(capsys, argv, needle):
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2 and needle in capsys.readouterr().err


@pytest.mark.parametrize("text,ok", [("4/255,16/255", True), ("", False), (",", False), ("4/255,", False),
                                     ("4/255, 8/255", True)])
def test_cli_eps_list(text, ok):
    if ok:
        assert all(cli._eps_arg(text))
    else:
        with pytest.raises(InputError, match="--eps .* holds an empty budget"):
            cli._eps_arg(text)


def test_spdbench_errors_stay_one_class():
    assert issubclass(InputError, SpdbenchError) and issubclass(BudgetError, SpdbenchError)
