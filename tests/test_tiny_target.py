"""The shipped trained tiny targets: integrity and reproducibility of training (v2, trained on the
bundled photos, replays offline; v3 = `tiny` replays with the fetched photo list), quality guards
of `tiny`."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

from spdbench.scoring import metrics
from spdbench.targets.tiny import TRAINED_DIR, V2_DIR
from zoo import train_tiny

RECORD = V2_DIR / train_tiny.TRAINING_JSON
pytestmark = pytest.mark.skipif(not RECORD.is_file(), reason="trained tiny target not shipped")
#: a folder made by `python -m zoo.photos fetch DIR` (about 500 MB): enables v3's replay
PHOTOS = os.environ.get("SPDBENCH_ZOO_PHOTOS")


@pytest.fixture(scope="module")
def record() -> dict:
    return json.loads(RECORD.read_text())


@pytest.fixture(scope="module")
def target():
    from spdbench import load_target

    return load_target("tiny")


def test_shipped_files_load_and_match_record(record):
    from spdbench import load_target

    v2 = load_target("tiny-v2")
    assert v2.name == "tiny-v2"
    assert train_tiny.weight_hashes(V2_DIR) == record["weights_sha256"]
    assert len(record["weights_sha256"]) == 3  # vae, unet, text_encoder
    assert math.isclose(v2.scaling_factor, record["scaling_factor"], rel_tol=1e-9)
    assert train_tiny.folder_bytes(V2_DIR) < 25e6
    # no held-out (test split) photo was trained on
    names = {d["name"] for d in record["data"]}
    assert not names & set(train_tiny.FORBIDDEN)


@pytest.mark.slow
def test_first_steps_reproduce(record):
    """Rerun the first 3 optimizer steps of each stage from the seed: same losses.

    The UNet stage encodes with the *shipped* VAE encoder, so the check also fails if the shipped
    encoder (the latent space the UNet was trained on) ever changes without a retrained UNet.
    """
    threads = torch.get_num_threads()
    try:
        got = train_tiny.check_steps(3, V2_DIR)
    finally:
        torch.set_num_threads(threads)
    for stage in ("vae", "unet"):
        want = record[stage]["first_losses"][:3]
        assert got[stage] == pytest.approx(want, rel=1e-5), stage


@pytest.mark.slow
@pytest.mark.skipif(not PHOTOS, reason="v3's replay needs the zoo's photos: set SPDBENCH_ZOO_PHOTOS to a folder "
                                       "made by `python -m zoo.photos fetch DIR` (about 500 MB, 1 min)")
def test_v3_first_steps_reproduce():
    """`tiny` (v3) from its photo list and seed: the recorded first losses of both stages."""
    record = json.loads((TRAINED_DIR / train_tiny.TRAINING_JSON).read_text())
    threads = torch.get_num_threads()
    try:
        got = train_tiny.check_steps(3, TRAINED_DIR, photos_dir=Path(PHOTOS))
    finally:
        torch.set_num_threads(threads)
    for stage in ("vae", "unet"):
        assert got[stage] == pytest.approx(record[stage]["first_losses"][:3], rel=1e-5), stage


def test_refuses_to_overwrite_without_force(tmp_path):
    with pytest.raises(SystemExit, match="--force"):
        train_tiny.main(["--out", str(TRAINED_DIR)])
    (tmp_path / "model_index.json").write_text("{}")
    with pytest.raises(SystemExit, match="--force"):
        train_tiny.check_overwrite(tmp_path, force=False)
    train_tiny.check_overwrite(tmp_path, force=True)  # allowed with --force
    train_tiny.check_overwrite(tmp_path / "new", force=False)  # a fresh folder is fine


def test_heldout_reconstruction_psnr(target):
    """CI guard of the recorded figure (>= 20 dB on 16 crops): > 18 dB on one photo's 4 crops."""
    from zoo.evaluate_tiny import heldout_crops

    x = heldout_crops(n_photos=1)
    assert x.shape == (4, 3, 128, 128)
    with torch.no_grad():
        value = float(metrics.psnr(target.reconstruct(x).clamp(0, 1), x).mean())
    assert value > 18.0


def test_denoise_probe_loses_structure_with_noise(target):
    """The trained UNet denoises: x0 error grows and SSIM falls with t, and at small t the one-step
    estimate is close to plain reconstruction (a random UNet would give noise at every t)."""
    from zoo.evaluate_tiny import denoise_probe, heldout_crops

    x = heldout_crops(n_photos=1)
    probe = denoise_probe(target, x, timesteps=(20, 300, 500))
    x0_mse = [probe[t]["x0_mse"] for t in ("20", "300", "500")]
    ssims = [probe[t]["ssim"] for t in ("20", "300", "500")]
    assert x0_mse == sorted(x0_mse) and ssims == sorted(ssims, reverse=True)
    with torch.no_grad():
        rec = float(metrics.ssim(target.reconstruct(x).clamp(0, 1), x).mean())
    assert ssims[0] > rec - 0.1


@pytest.mark.parametrize("latent_noise", [0.0, 0.3])
def test_refine_decoder_trains_only_the_decoder(latent_noise):
    from spdbench.targets.tiny import build_tiny_components

    vae = build_tiny_components(0)["vae"]
    before = {k: v.clone() for k, v in vae.state_dict().items()}
    ds = train_tiny.DecoderSettings(batch=2, crop=32, warmup=1, latent_noise=latent_noise)
    out = train_tiny.refine_decoder(vae, train_tiny.training_photos(), ds, steps=2, log=lambda *_: None)
    assert out["steps_run"] == 2
    after = vae.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items() if k.startswith(("encoder.", "quant_conv.")))
    assert not torch.equal(before["decoder.conv_in.weight"], after["decoder.conv_in.weight"])


def test_refinement_cli_needs_force_and_from_shipped():
    with pytest.raises(SystemExit, match="--from-shipped"):
        train_tiny.main(["--out", str(TRAINED_DIR), "--refine-decoder-steps", "1"])
    with pytest.raises(SystemExit, match="--force"):
        train_tiny.main(["--out", str(TRAINED_DIR), "--refine-decoder-steps", "1", "--from-shipped"])


def test_unet_continuation_cli_needs_force_and_from_shipped():
    with pytest.raises(SystemExit, match="--from-shipped"):
        train_tiny.main(["--out", str(TRAINED_DIR), "--continue-unet-steps", "1"])
    with pytest.raises(SystemExit, match="--force"):
        train_tiny.main(["--out", str(TRAINED_DIR), "--continue-unet-steps", "1", "--from-shipped"])
