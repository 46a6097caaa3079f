"""The scorer against independent implementations on real photos, and the traps of each metric.

Independent references: scikit-image (SSIM, PSNR), sewar (VIFp), torchmetrics (PSNR) and
piq itself for our fast kernels. FSIM has no second implementation in these libraries, so besides
fast == piq it is held to properties any FSIM must have (identity = 1, range, monotone in noise).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import spdbench
from spdbench.scoring import metrics
from spdbench.errors import InputError, UnknownNameError
from spdbench.purifiers import jpeg as _jpeg


@pytest.fixture(scope="module")
def pairs():
    """(distorted, reference): 6 real photos at 96 px under noise, JPEG and blur of two strengths."""
    ref = spdbench.load_photos(n=6, size=96)
    g = torch.Generator().manual_seed(0)
    noisy = (ref + 0.04 * torch.randn(ref.shape, generator=g)).clamp(0, 1)
    jpeg = _jpeg(ref, 30)
    blur = torch.nn.functional.avg_pool2d(torch.nn.functional.pad(ref, (1, 1, 1, 1), mode="replicate"), 3, 1)
    dist = torch.cat([noisy[:2], jpeg[2:4], blur[4:]])
    return dist, ref


def _hwc(t: torch.Tensor) -> np.ndarray:
    return t.permute(1, 2, 0).double().numpy()


def test_ssim_matches_scikit_image(pairs):
    from skimage.metrics import structural_similarity

    x, y = pairs
    ours = metrics.ssim(x, y)
    ref = [structural_similarity(_hwc(y[i]), _hwc(x[i]), gaussian_weights=True, sigma=1.5,
                                 use_sample_covariance=False, data_range=1.0, channel_axis=2)
           for i in range(len(x))]
    np.testing.assert_allclose(ours.numpy(), ref, atol=1e-3)
    assert ours.std() > 0.01  # the distortions differ: a constant would not pass by luck


def test_psnr_matches_scikit_image_and_torchmetrics(pairs):
    from skimage.metrics import peak_signal_noise_ratio
    from torchmetrics.functional.image import peak_signal_noise_ratio as tm_psnr

    x, y = pairs
    ours = metrics.psnr(x, y)
    sk = [peak_signal_noise_ratio(_hwc(y[i]), _hwc(x[i]), data_range=1.0) for i in range(len(x))]
    tm = [float(tm_psnr(x[i:i + 1].double(), y[i:i + 1].double(), data_range=1.0)) for i in range(len(x))]
    np.testing.assert_allclose(ours.numpy(), sk, atol=1e-4)
    np.testing.assert_allclose(ours.numpy(), tm, atol=1e-4)


def test_vifp_matches_sewar_on_luminance(pairs):
    from sewar.full_ref import vifp as sewar_vifp

    x, y = pairs
    ours = metrics.vifp(x, y)
    w = torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)
    ref = [sewar_vifp((y[i] * w).sum(0).double().numpy() * 255, (x[i] * w).sum(0).double().numpy() * 255)
           for i in range(len(x))]
    np.testing.assert_allclose(ours.numpy(), ref, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("name", ["ssim", "vifp", "fsim"])
def test_fast_kernels_equal_piq(pairs, name):
    x, y = pairs
    fn = getattr(metrics, name)
    np.testing.assert_allclose(fn(x, y).numpy(), fn(x, y, reference=True).numpy(), atol=1e-5)


def test_fast_kernels_equal_piq_at_512_with_fsim_pooling():
    """512 px is where piq's FSIM pools by 2 and piq's default SSIM would downsample: keep both right."""
    y = spdbench.load_photos(n=2, size=512)
    x = _jpeg(y, 20)
    for name in ("ssim", "vifp", "fsim"):
        fn = getattr(metrics, name)
        np.testing.assert_allclose(fn(x, y).numpy(), fn(x, y, reference=True).numpy(), atol=1e-5, err_msg=name)


def test_ssim_does_not_downsample_like_piq_default():
    import piq

    y = spdbench.load_photos(n=2, size=512)
    x = _jpeg(y, 20)
    ours = metrics.ssim(x, y)
    assert torch.allclose(ours, piq.ssim(x, y, data_range=1.0, reduction="none", downsample=False), atol=1e-5)
    assert not torch.allclose(ours, piq.ssim(x, y, data_range=1.0, reduction="none"), atol=1e-3)


def test_vifp_argument_order_is_distorted_then_reference(pairs):
    x, y = pairs
    assert not torch.allclose(metrics.vifp(x, y), metrics.vifp(y, x), atol=1e-3)  # VIF is asymmetric


def test_fsim_properties(pairs):
    x, y = pairs
    assert torch.allclose(metrics.fsim(y, y), torch.ones(len(y)), atol=1e-5)
    v = metrics.fsim(x, y)
    assert bool(((v > 0) & (v < 1)).all())
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(y.shape, generator=g)
    levels = [metrics.fsim((y + s * noise).clamp(0, 1), y).mean() for s in (0.01, 0.05, 0.15)]
    assert levels[0] > levels[1] > levels[2]


def test_identical_images(pairs):
    _, y = pairs
    s = metrics.score(y, y)
    assert torch.allclose(s["ssim"], torch.ones(len(y)), atol=1e-5)
    assert torch.all(s["psnr"] == metrics.PSNR_MAX_DB)  # capped, finite
    assert torch.allclose(s["vifp"], torch.ones(len(y)), atol=1e-4)


def test_score_equals_single_metrics_and_chunking(pairs):
    x, y = pairs
    s = metrics.score(x, y, chunk=4)
    for name in metrics.DEFAULT_METRICS:
        assert s[name].shape == (len(x),) and s[name].dtype == torch.float32
        np.testing.assert_allclose(s[name].numpy(), getattr(metrics, name)(x, y).numpy(), atol=1e-6)
    s1 = metrics.score(x, y, chunk=1)
    for name in metrics.DEFAULT_METRICS:
        np.testing.assert_allclose(s[name].numpy(), s1[name].numpy(), atol=1e-6)


def test_registry_and_conventions():
    assert metrics.get_metric("SSIM").name == "ssim"
    for name in metrics.DEFAULT_METRICS:
        info = metrics.get_metric(name)
        assert info.higher_is_better and info.convention
    with pytest.raises(UnknownNameError, match="Did you mean 'vifp'"):
        metrics.get_metric("vif")


@pytest.mark.parametrize("bad, match", [
    (lambda y: (y * 255).round(), r"\[0, 1\].*divide by 255"),
    (lambda y: (y * 255).round().to(torch.uint8), "dtype|uint8|float"),
    (lambda y: y[:, :1], "channel"),
    (lambda y: y[0], "shape|4-D|dimension"),
    (lambda y: torch.where(y > 0.5, torch.tensor(float("nan")), y), "NaN|finite"),
])
def test_bad_inputs_named(pairs, bad, match):
    _, y = pairs
    with pytest.raises(InputError, match=match):
        metrics.score(bad(y), y)


def test_mismatched_shapes_and_too_small():
    a = torch.rand(2, 3, 64, 64)
    with pytest.raises(InputError, match="shape"):
        metrics.ssim(a, torch.rand(2, 3, 64, 32))
    with pytest.raises(InputError, match="41|small|size"):
        metrics.vifp(torch.rand(1, 3, 32, 32), torch.rand(1, 3, 32, 32))


def test_score_many_equals_score_per_batch(pairs):
    x, y = pairs
    g = torch.Generator().manual_seed(3)
    other = (y + 0.1 * torch.rand(y.shape, generator=g)).clamp(0, 1)
    many = metrics.score_many({"a": x, "b": other}, y, chunk=4)
    for key, batch in (("a", x), ("b", other)):
        single = metrics.score(batch, y)
        for name in metrics.DEFAULT_METRICS:
            np.testing.assert_allclose(many[key][name].numpy(), single[name].numpy(), atol=1e-6)
    with pytest.raises(InputError, match="shape"):
        metrics.score_many({"a": x[:, :, :64]}, y)
