"""The one scorer: SSIM, PSNR, VIFp and FSIMc, per image, with the conventions of DESIGN §2.

Every metric compares a distorted batch ``x`` with a REFERENCE batch ``y`` (piq's argument order;
sewar's is ``(ref, dist)``, so mind the swap when cross-checking), both float images in [0, 1] of
shape (N, 3, H, W), and returns a float32 tensor of shape (N,) on the inputs' device.

Each metric is registered (`register`, below) with keyword metadata -- label, direction, range,
convention, reference implementation -- that tables, the claims check and records read; a plugin adds
one through the `spdbench.metrics` entry-point group.

Conventions (each metric's `MetricInfo.convention` repeats its own line, so records can carry it):
- data_range = 1.0 everywhere.
- SSIM: Gaussian window 11x11, sigma 1.5, K1 = 0.01, K2 = 0.03, "valid" filtering, NO
  downsampling (piq's default average-pools 512 px images by 2 first), mean over RGB. Equals
  ``piq.ssim(x, y, downsample=False)`` and scikit-image's ``structural_similarity(
  gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1, channel_axis=2)``.
- PSNR: MSE over all three channels, ``10 log10(1 / MSE)``. Identical images would give +inf; we
  floor the MSE at 1e-10, i.e. PSNR is capped at 100 dB (piq instead adds 1e-8 to every MSE, which
  caps at 80 dB but also biases every finite value by up to ~1e-3 dB at 40 dB). A cap keeps
  leaderboard averages finite; a value of 100 means "identical to within float noise".
- VIFp: pixel-domain VIF (4 scales, sigma_n^2 = 2) on the BT.601 luminance
  Y = 0.299 R + 0.587 G + 0.114 B scaled to 0..255 — equals ``piq.vif_p`` and sewar's ``vifp`` on
  that luminance. VIF is asymmetric: swap the arguments and the number changes.
- FSIM: chromatic FSIMc (YIQ, 4 scales x 4 orientations of log-Gabor filters), computed after the
  average-pooling by ``round(min(H, W) / 256)`` that the authors' MATLAB code and piq both apply.

Speed: scoring runs every (attack, eps, prompt) cell, so the default path uses kernels of our own
that give piq's numbers (tested to 1e-5) in a fraction of its time — separable Gaussian filters
over stacked moment maps, one filtering pass per scale for x and y together, FSIM filter banks
cached per image size, and a cheaper but equal phase-congruency energy. ``reference=True`` runs
piq itself (the tests compare the two).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from spdbench.errors import InputError, RegistryError
from spdbench.images import check_images
from spdbench.registry import Registry

__all__ = ["ssim", "psnr", "vifp", "fsim", "score", "score_many", "MetricInfo", "METRICS", "get_metric",
           "list_metrics", "register", "LABELS", "DEFAULT_METRICS", "PSNR_MAX_DB"]

PSNR_MAX_DB = 100.0
_MSE_FLOOR = 10.0 ** (-PSNR_MAX_DB / 10.0)
#: the metrics a suite requires unless it names others (Suite.metrics): every entry on the board has them
DEFAULT_METRICS: Tuple[str, ...] = ("ssim", "psnr", "vifp", "fsim")

# SSIM constants (Wang et al. 2004; piq and scikit-image defaults)
_SSIM_K1, _SSIM_K2, _SSIM_SIZE, _SSIM_SIGMA = 0.01, 0.03, 11, 1.5
_VIF_SIGMA_N_SQ, _VIF_EPS, _VIF_MIN_SIZE = 2.0, 1e-8, 41
# FSIM constants (Zhang et al. 2011; piq defaults)
_FSIM_SCALES, _FSIM_ORIENT, _FSIM_MIN_LEN, _FSIM_MULT = 4, 4, 6, 2
_FSIM_SIGMA_F, _FSIM_DTHETA, _FSIM_K = 0.55, 1.2, 2.0
_FSIM_T1, _FSIM_T2, _FSIM_T3, _FSIM_T4, _FSIM_LAMBDA = 0.85, 160.0, 200.0, 200.0, 0.03


# --- input handling --------------------------------------------------------------------------------
def _prepare(x: torch.Tensor, y: torch.Tensor, min_size: int = 1) -> Tuple[torch.Tensor, torch.Tensor]:
    """Validate both batches (InputError on any violation) and return them as float32."""
    check_images(x, "x (distorted images)")
    check_images(y, "y (reference images)")
    if x.shape != y.shape:
        raise InputError(f"x and y (reference) must have the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.device != y.device:
        raise InputError(f"x and y (reference) must be on the same device, got {x.device} and {y.device}")
    if min(x.shape[-2:]) < min_size:
        raise InputError(f"images must be at least {min_size}x{min_size} for these metrics, got {tuple(x.shape[-2:])}")
    return x.detach().float(), y.detach().float()


# --- separable Gaussian filtering ------------------------------------------------------------------
_GAUSS_CACHE: Dict[tuple, torch.Tensor] = {}


def _gauss1d(size: int, sigma: float, device: torch.device) -> torch.Tensor:
    """Normalized 1-D Gaussian; its outer product is piq's 2-D `gaussian_filter` (separability)."""
    key = (size, sigma, str(device))
    g = _GAUSS_CACHE.get(key)
    if g is None:
        c = torch.arange(size, dtype=torch.float64) - (size - 1) / 2.0
        g = torch.exp(-(c ** 2) / (2.0 * sigma ** 2))
        g = (g / g.sum()).to(device=device, dtype=torch.float32)
        _GAUSS_CACHE[key] = g
    return g


def _sep_filter(maps: torch.Tensor, g: torch.Tensor, stride: int = 1) -> torch.Tensor:
    """'Valid' 2-D Gaussian filtering of every channel as two 1-D passes (k+k instead of k*k MACs).

    Channels-last layout lets the depthwise kernels vectorize across the stacked maps, which is
    where most of the speed over piq's 2-D depthwise convolutions comes from on CPU.
    """
    c, k = maps.shape[1], g.numel()
    maps = maps.contiguous(memory_format=torch.channels_last)
    out = F.conv2d(maps, g.view(1, 1, 1, k).expand(c, 1, 1, k), groups=c, stride=(1, stride))
    return F.conv2d(out, g.view(1, 1, k, 1).expand(c, 1, k, 1), groups=c, stride=(stride, 1))


# --- SSIM --------------------------------------------------------------------------------------------
def _ssim_fast(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    c = x.shape[1]
    g = _gauss1d(_SSIM_SIZE, _SSIM_SIGMA, x.device)
    # one filtering pass over the five moment maps of all channels
    moments = _sep_filter(torch.cat([x, y, x * x, y * y, x * y], dim=1), g)
    mu_x, mu_y, e_xx, e_yy, e_xy = moments.split(c, dim=1)
    mu_xx, mu_yy, mu_xy = mu_x * mu_x, mu_y * mu_y, mu_x * mu_y
    c1, c2 = _SSIM_K1 ** 2, _SSIM_K2 ** 2
    cs = (2.0 * (e_xy - mu_xy) + c2) / ((e_xx - mu_xx) + (e_yy - mu_yy) + c2)
    ss = (2.0 * mu_xy + c1) / (mu_xx + mu_yy + c1) * cs
    return ss.mean(dim=(1, 2, 3))


def _ssim_reference(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    import piq  # deferred: piq (and torchvision) is slow to import; only the reference cross-check needs it

    return piq.ssim(x, y, kernel_size=_SSIM_SIZE, kernel_sigma=_SSIM_SIGMA, data_range=1.0,
                    reduction="none", downsample=False, k1=_SSIM_K1, k2=_SSIM_K2)


# --- PSNR --------------------------------------------------------------------------------------------
def _psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    # accumulate in float64: cheap, and keeps high-PSNR pairs exact against float64 references
    mse = (x - y).square().mean(dim=(1, 2, 3), dtype=torch.float64)
    return (-10.0 * torch.log10(mse.clamp_min(_MSE_FLOOR))).float()


# --- VIFp --------------------------------------------------------------------------------------------
def _luma255(x: torch.Tensor) -> torch.Tensor:
    """BT.601 luminance on the 0..255 scale, (N, 1, H, W) — the VIFp convention (and piq's order)."""
    x = x * 255.0
    return (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)


def _vif_fast(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    n = x.shape[0]
    xy = torch.cat([_luma255(x), _luma255(y)], dim=1)  # (N, 2, H, W): x and y filtered together
    eps = _VIF_EPS
    num = torch.zeros(n, dtype=torch.float32, device=x.device)
    den = torch.zeros_like(num)
    for scale in range(4):
        k = 2 ** (4 - scale) + 1
        g = _gauss1d(k, k / 5.0, x.device)
        if scale > 0:  # blur + keep every second pixel == stride-2 valid filtering
            xy = _sep_filter(xy, g, stride=2)
        a, b = xy[:, :1], xy[:, 1:]
        mom = _sep_filter(torch.cat([xy, a * a, b * b, a * b], dim=1), g)
        mu_x, mu_y, e_xx, e_yy, e_xy = mom.unbind(dim=1)
        sigma_x_sq = torch.relu(e_xx - mu_x * mu_x)
        sigma_y_sq = torch.relu(e_yy - mu_y * mu_y)
        sigma_xy = e_xy - mu_x * mu_y
        # the guard chain of the authors' MATLAB code, as piq writes it
        gain = sigma_xy / (sigma_y_sq + eps)
        sigma_v_sq = sigma_x_sq - gain * sigma_xy
        ok_y = sigma_y_sq >= eps
        gain = torch.where(ok_y, gain, 0.0)
        sigma_v_sq = torch.where(ok_y, sigma_v_sq, sigma_x_sq)
        sigma_y_sq = torch.where(ok_y, sigma_y_sq, 0.0)
        ok_x = sigma_x_sq >= eps
        gain = torch.where(ok_x, gain, 0.0)
        sigma_v_sq = torch.where(ok_x, sigma_v_sq, 0.0)
        sigma_v_sq = torch.where(gain >= 0, sigma_v_sq, sigma_x_sq)
        gain = torch.relu(gain)
        sigma_v_sq = sigma_v_sq.clamp_min(eps)
        num = num + torch.log10(1.0 + gain * gain * sigma_y_sq / (sigma_v_sq + _VIF_SIGMA_N_SQ)).sum(dim=(1, 2))
        den = den + torch.log10(1.0 + sigma_y_sq / _VIF_SIGMA_N_SQ).sum(dim=(1, 2))
    return (num + eps) / (den + eps)


def _vif_reference(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    import piq  # deferred: piq (and torchvision) is slow to import; only the reference cross-check needs it

    # piq converts 3-channel input to the same BT.601 luminance internally
    return piq.vif_p(x, y, sigma_n_sq=_VIF_SIGMA_N_SQ, data_range=1.0, reduction="none")


# --- FSIMc -------------------------------------------------------------------------------------------
_FSIM_CACHE: Dict[tuple, tuple] = {}


def _ifftshift(t: torch.Tensor) -> torch.Tensor:
    return torch.roll(t, [-(s // 2) for s in t.shape], tuple(range(t.dim())))


def _fsim_filters(h: int, w: int, device: torch.device) -> tuple:
    """Log-Gabor filter bank and its noise constants for an h x w image (piq's construction)."""
    key = (h, w, str(device))
    cached = _FSIM_CACHE.get(key)
    if cached is not None:
        return cached
    dtype = torch.float32
    scales, orients = _FSIM_SCALES, _FSIM_ORIENT

    def axis(size: int) -> torch.Tensor:
        if size % 2:
            return torch.arange(-(size - 1) / 2, size / 2, dtype=dtype) / (size - 1)
        return torch.arange(-size / 2, size / 2, dtype=dtype) / size

    gx, gy = torch.meshgrid(axis(h), axis(w), indexing="ij")
    radius = torch.sqrt(gx ** 2 + gy ** 2)
    theta = torch.atan2(-gy, gx)
    lp = _ifftshift(1.0 / (1.0 + (radius / 0.45) ** (2 * 15)))
    radius, theta = _ifftshift(radius), _ifftshift(theta)
    radius[0, 0] = 1
    sintheta, costheta = torch.sin(theta), torch.cos(theta)
    log_gabor = []
    for s in range(scales):
        omega_0 = 1.0 / (_FSIM_MIN_LEN * _FSIM_MULT ** s)
        lg = torch.exp((-torch.log(radius / omega_0) ** 2) / (2 * math.log(_FSIM_SIGMA_F) ** 2)) * lp
        lg[0, 0] = 0
        log_gabor.append(lg)
    theta_sigma = math.pi / (orients * _FSIM_DTHETA)
    spread = []
    for o in range(orients):
        angle = o * math.pi / orients
        ds = sintheta * math.cos(angle) - costheta * math.sin(angle)
        dc = costheta * math.cos(angle) + sintheta * math.sin(angle)
        dtheta = torch.abs(torch.atan2(ds, dc))
        spread.append(torch.exp((-dtheta ** 2) / (2 * theta_sigma ** 2)))
    filters = torch.stack(spread).repeat_interleave(scales, dim=0) * torch.stack(log_gabor).repeat(orients, 1, 1)
    filters = filters.view(orients, scales, h, w)  # (O, S, h, w), orientation-major like piq
    # image-independent noise model constants (piq recomputes these on every call)
    em_n = (filters[:, 0] ** 2).sum(dim=(-2, -1))  # (O,)
    f_ifft = torch.fft.ifft2(filters).real * math.sqrt(h * w)
    sum_an2 = (f_ifft ** 2).sum(dim=(1, 2, 3))
    sum_ai_aj = torch.zeros(orients, dtype=dtype)
    for s in range(scales - 1):
        sum_ai_aj = sum_ai_aj + (f_ifft[:, s:s + 1] * f_ifft[:, s + 1:]).sum(dim=(1, 2, 3))
    cached = (filters.to(device), em_n.to(device), sum_an2.to(device), sum_ai_aj.to(device))
    if len(_FSIM_CACHE) > 16:
        _FSIM_CACHE.clear()
    _FSIM_CACHE[key] = cached
    return cached


def _phase_congruency(lum: torch.Tensor) -> torch.Tensor:
    """Phase congruency maps (N, 1, h, w) of luminance images (N, 1, h, w), Kovesi/piq model."""
    n, _, h, w = lum.shape
    filters, em_n, sum_an2, sum_ai_aj = _fsim_filters(h, w, lum.device)
    eps = torch.finfo(torch.float32).eps
    eo = torch.fft.ifft2(torch.fft.fft2(lum) * filters.view(1, -1, h, w)).view(n, _FSIM_ORIENT, _FSIM_SCALES, h, w)
    amplitude = eo.abs()                                      # (N, O, S, h, w)
    an_all = amplitude.sum(dim=(1, 2)) + eps                  # (N, h, w)
    sum_eo = eo.sum(dim=2, keepdim=True)                      # (N, O, 1, h, w)
    sum_abs = sum_eo.abs()
    x_energy = sum_abs + eps
    # sum_s (e*me + o*mo) = |sum_eo|^2 / x_energy exactly; only the |.| term needs every scale
    mean = torch.view_as_real(sum_eo / x_energy)
    parts = torch.view_as_real(eo)
    cross = parts[..., 0] * mean[..., 1] - parts[..., 1] * mean[..., 0]
    energy = sum_abs.square() / x_energy - cross.abs().sum(dim=2, keepdim=True)
    # noise threshold from the median response of the smallest scale (Kovesi's estimate)
    median_e2n = amplitude[:, :, 0].square().flatten(2).median(dim=-1).values  # (N, O)
    noise_power = (-median_e2n / math.log(0.5)) / em_n
    tau = torch.sqrt((2 * noise_power * sum_an2 + 4 * noise_power * sum_ai_aj) / 2)
    threshold = (tau * math.sqrt(math.pi / 2) + _FSIM_K * torch.sqrt((2 - math.pi / 2) * tau ** 2)) / 1.7
    energy = (energy - threshold.view(n, _FSIM_ORIENT, 1, 1, 1)).clamp_min(0.0)
    energy_all = energy.sum(dim=(1, 2)) + eps
    return (energy_all / an_all).unsqueeze(1)


def _similarity(a: torch.Tensor, b: torch.Tensor, constant: float) -> torch.Tensor:
    return (2.0 * a * b + constant) / (a * a + b * b + constant)


_YIQ = ((0.299, 0.587, 0.114), (0.5959, -0.2746, -0.3213), (0.2115, -0.5227, 0.3112))


def _fsim_features(images: torch.Tensor) -> torch.Tensor:
    """Per-image FSIMc features (N, 5, h, w): Y, I, Q, phase congruency, gradient magnitude.

    Half of FSIM's cost is the reference's features; computing them once lets `score_many` score
    several distorted versions of the same reference (protection, and after each purifier) for
    little more than the distorted images' own features.
    """
    img = images * 255.0
    f = max(1, round(min(img.shape[-2:]) / 256))
    if f > 1:
        img = F.avg_pool2d(img, f)
    yiq = torch.einsum("nchw,kc->nkhw", img, torch.tensor(_YIQ, dtype=img.dtype, device=img.device))
    lum = yiq[:, :1].contiguous()
    pc = _phase_congruency(lum)
    scharr = torch.tensor([[-3.0, 0.0, 3.0], [-10.0, 0.0, 10.0], [-3.0, 0.0, 3.0]], device=img.device) / 16
    grads = F.conv2d(lum, torch.stack([scharr, scharr.t()]).unsqueeze(1), padding=1)
    grad_mag = grads.square().sum(dim=1, keepdim=True).sqrt()
    return torch.cat([yiq, pc, grad_mag], dim=1)


def _fsim_compare(fx: torch.Tensor, fy: torch.Tensor) -> torch.Tensor:
    """FSIMc from the features of the distorted (fx) and reference (fy) images, shape (N,)."""
    pc_x, pc_y = fx[:, 3:4], fy[:, 3:4]
    pc_max = torch.maximum(pc_x, pc_y)
    s = _similarity(pc_x, pc_y, _FSIM_T1) * _similarity(fx[:, 4:5], fy[:, 4:5], _FSIM_T2) * pc_max
    s_i = _similarity(fx[:, 1:2], fy[:, 1:2], _FSIM_T3)
    s_q = _similarity(fx[:, 2:3], fy[:, 2:3], _FSIM_T4)
    s = s * torch.abs(s_i * s_q) ** _FSIM_LAMBDA
    return s.sum(dim=(1, 2, 3)) / pc_max.sum(dim=(1, 2, 3))


def _fsim_fast(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    feats = _fsim_features(torch.cat([x, y]))  # one batched pass for both
    return _fsim_compare(feats[: x.shape[0]], feats[x.shape[0]:])


def _fsim_reference(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    import piq  # deferred: piq (and torchvision) is slow to import; only the reference cross-check needs it

    return piq.fsim(x, y, reduction="none", data_range=1.0, chromatic=True)


# --- public per-metric functions ---------------------------------------------------------------------
def _default_chunk(x: torch.Tensor) -> int:
    """Images per pass: small enough to keep a chunk's maps cache/memory friendly (~2 at 512 px)."""
    return max(1, (1 << 19) // (x.shape[-2] * x.shape[-1]))


def _one_metric(x: torch.Tensor, y: torch.Tensor, min_size: int, fast: Callable, ref: Callable,
                reference: bool) -> torch.Tensor:
    """Validate, then piq itself (`reference`) or our kernel over cache-sized chunks."""
    x, y = _prepare(x, y, min_size)
    if reference:
        return ref(x, y).float()
    step = _default_chunk(x)
    return torch.cat([fast(x[i:i + step], y[i:i + step]) for i in range(0, x.shape[0], step)])


@torch.no_grad()
def ssim(x: torch.Tensor, y: torch.Tensor, *, reference: bool = False) -> torch.Tensor:
    """SSIM of each distorted image x[i] against reference y[i], shape (N,); see module docstring."""
    return _one_metric(x, y, _SSIM_SIZE, _ssim_fast, _ssim_reference, reference)


@torch.no_grad()
def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """PSNR in dB over all channels, capped at PSNR_MAX_DB (100 dB) for identical images, shape (N,)."""
    x, y = _prepare(x, y)
    return _psnr(x, y)


@torch.no_grad()
def vifp(x: torch.Tensor, y: torch.Tensor, *, reference: bool = False) -> torch.Tensor:
    """Pixel-domain VIF of distorted x against REFERENCE y on BT.601 luminance, shape (N,)."""
    return _one_metric(x, y, _VIF_MIN_SIZE, _vif_fast, _vif_reference, reference)


@torch.no_grad()
def fsim(x: torch.Tensor, y: torch.Tensor, *, reference: bool = False) -> torch.Tensor:
    """Chromatic FSIM (FSIMc) of distorted x against reference y, shape (N,)."""
    return _one_metric(x, y, 1, _fsim_fast, _fsim_reference, reference)


# --- registry ----------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class MetricInfo:
    """A metric and its keyword metadata: what tables print (`label`), which way is better
    (`higher_is_better`: every built-in is a similarity, so higher = closer to the reference; a
    protection is stronger when it is lower), the `range` a per-image value can take (the claims
    check refuses values outside it), the `convention` records carry, and the hooks: `fn(x, y)` the
    public function, `kernel(x, y)` the per-chunk kernel on validated float32 inputs (default `fn`),
    `reference(x, y)` an independent implementation the fast one is tested against (piq)."""

    name: str
    fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = field(repr=False)
    label: str
    higher_is_better: bool = True
    range: Tuple[float, float] = (-math.inf, math.inf)
    convention: str = ""
    unit: str = ""
    min_size: int = 1
    kernel: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = field(default=None, repr=False, compare=False)
    reference: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = field(default=None, repr=False,
                                                                                     compare=False)

    def __post_init__(self) -> None:
        lo, hi = self.range
        if not lo < hi:
            raise RegistryError(f"metric {self.name!r}: range must be (low, high) with low < high, got {self.range!r}")
        if not callable(self.fn):
            raise RegistryError(f"metric {self.name!r}: fn must be callable, got {self.fn!r}")


def _check_metric(name: str, obj: object) -> None:
    if not isinstance(obj, MetricInfo):
        raise RegistryError(f"a metric registration needs a spdbench MetricInfo, got {obj!r}")
    if obj.name != name or name != name.lower():
        raise RegistryError(f"metric {obj.name!r} must be registered under its own lower-case name, not {name!r}")


def _metric_from_entry_point(name: str, obj: object, where: str) -> MetricInfo:
    """An entry point names a MetricInfo, or a function made by `@register(...)` (which carries one)."""
    info = obj if isinstance(obj, MetricInfo) else getattr(obj, "metric_info", None)
    if not isinstance(info, MetricInfo):
        raise RegistryError(f"the entry point must name a spdbench MetricInfo or a @metrics.register-ed "
                            f"function, got {obj!r}")
    if info.name != name:
        raise RegistryError(f"its metric is named {info.name!r}, not the entry-point name {name!r}")
    return info


#: every metric: the four built-ins below and plugins (entry-point group `spdbench.metrics`);
#: names are case-insensitive on lookup
METRICS: Registry[MetricInfo] = Registry("metric", group="spdbench.metrics", check=_check_metric,
                                         from_entry_point=_metric_from_entry_point, normalize=str.lower)


def register(name: str, *, label: str, higher_is_better: bool, range: Tuple[float, float], convention: str,
             **hooks) -> Callable[[Callable], Callable]:
    """Decorator for a metric function `fn(x, y) -> (N,)` (x distorted, y the reference): registers
    it with its metadata (see MetricInfo; `hooks`: unit, min_size, kernel, reference) and hands the
    function back with its `metric_info`, so an entry point may name the function itself."""

    def decorator(fn: Callable) -> Callable:
        info = MetricInfo(name=name, fn=fn, label=label, higher_is_better=higher_is_better, range=tuple(range),
                          convention=convention, **hooks)
        METRICS.add(name, info, label=label, higher_is_better=higher_is_better, range=info.range)
        fn.metric_info = info
        return fn

    return decorator


register("ssim", label="SSIM", higher_is_better=True, range=(-1.0, 1.0), min_size=_SSIM_SIZE, kernel=_ssim_fast,
         reference=_ssim_reference,
         convention="SSIM: Gaussian 11x11 σ=1.5, K1=0.01, K2=0.03, valid filtering, no downsampling, "
                    "mean over RGB, data_range=1")(ssim)
register("psnr", label="PSNR", higher_is_better=True, range=(0.0, PSNR_MAX_DB), unit="dB", kernel=_psnr,
         convention=f"PSNR: MSE over all RGB channels, data_range=1, capped at {PSNR_MAX_DB:g} dB (MSE floored at "
                    f"{_MSE_FLOOR:g})")(psnr)
register("vifp", label="VIFp", higher_is_better=True, range=(0.0, math.inf), min_size=_VIF_MIN_SIZE,
         kernel=_vif_fast, reference=_vif_reference,
         convention="VIFp: pixel-domain VIF, 4 scales, σ_n²=2, on BT.601 luminance Y=0.299R+0.587G+0.114B at "
                    "0..255, y=reference (= piq.vif_p; = sewar vifp(ref_Y, dist_Y))")(vifp)
register("fsim", label="FSIM", higher_is_better=True, range=(0.0, 1.0), kernel=_fsim_fast, reference=_fsim_reference,
         convention="FSIMc: chromatic FSIM (YIQ, 4 scales x 4 orientations), after average-pooling by "
                    "round(min(H,W)/256) as in the authors' code, data_range=1 (= piq.fsim chromatic=True)")(fsim)


def list_metrics() -> list:
    """Every registered metric name, built-ins first, in registration order (the tables' column order)."""
    return METRICS.names()


def get_metric(name: str) -> MetricInfo:
    """The registered metric `name` (case-insensitive); UnknownNameError with close matches otherwise."""
    return METRICS.get(name)


class _Labels(Mapping):
    """name -> label of every registered metric, read from the registry at each use (a metric
    registered after import is in it)."""

    def __getitem__(self, name: str) -> str:
        return get_metric(name).label

    def __iter__(self):
        return iter(list_metrics())

    def __len__(self) -> int:
        return len(list_metrics())


#: name -> table label, live (see _Labels)
LABELS: Mapping[str, str] = _Labels()


@torch.no_grad()
def score(x: torch.Tensor, y: torch.Tensor, names: Optional[Iterable[str]] = None,
          chunk: Optional[int] = None) -> Dict[str, torch.Tensor]:
    """All requested metrics (default: every registered one) of distorted x against reference y in
    one call: {name: (N,) float32}.

    Inputs are validated once, converted to float32 once, and processed `chunk` images at a time
    (default: ~2 images at 512 px, which keeps each chunk's maps cache-sized on CPU and memory
    bounded on GPU), running every metric on a chunk before moving on.
    """
    return score_many({"x": x}, y, names, chunk)["x"]


def _chunk_scores(infos: Sequence[MetricInfo], prepared: Mapping[str, torch.Tensor], ys: torch.Tensor,
                  start: int, step: int, parts: Dict[str, Dict[str, list]]) -> None:
    """Every metric of one chunk of every distorted batch; the reference's FSIM features once."""
    fy = _fsim_features(ys) if any(i.name == "fsim" for i in infos) else None
    for key, x in prepared.items():
        xs = x[start:start + step]
        for info in infos:
            if info.name == "fsim":
                parts[key]["fsim"].append(_fsim_compare(_fsim_features(xs), fy))
            else:
                parts[key][info.name].append((info.kernel or info.fn)(xs, ys))


@torch.no_grad()
def score_many(distorted: Mapping[str, torch.Tensor], y: torch.Tensor, names: Optional[Iterable[str]] = None,
               chunk: Optional[int] = None) -> Dict[str, Dict[str, torch.Tensor]]:
    """Score several distorted batches against ONE reference batch: {key: {metric: (N,)}}; `names`
    default to every registered metric.

    Why: the harness compares the clean edits with the protected edits and with the edits of every
    purified image; the reference's FSIM features (the costly part) are computed once per chunk
    instead of once per comparison. Each result equals `score(distorted[key], y)`.
    """
    if names is None:
        names = list_metrics()
    elif isinstance(names, str):
        names = (names,)
    infos = [get_metric(n) for n in names]
    if not infos:
        raise InputError("score() needs at least one metric name")
    if not distorted:
        raise InputError("score_many() needs at least one distorted batch")
    min_size = max(i.min_size for i in infos)
    prepared = {}
    for key, x in distorted.items():
        prepared[key], y32 = _prepare(x, y, min_size)
    step = chunk if chunk is not None else _default_chunk(y32)
    if step < 1:
        raise InputError(f"chunk must be >= 1, got {chunk}")
    parts: Dict[str, Dict[str, list]] = {k: {i.name: [] for i in infos} for k in prepared}
    for start in range(0, y32.shape[0], step):
        _chunk_scores(infos, prepared, y32[start:start + step], start, step, parts)
    return {k: {name: torch.cat(vals).float() for name, vals in p.items()} for k, p in parts.items()}
