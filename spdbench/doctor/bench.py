"""`spdbench doctor --bench`: one command that proves the GPU path and leaves a self-contained report.

Why: GPU time comes in short windows, and the float16 path once returned a zero perturbation that
was recorded as `ok`. This runs every registered attack for a few iterations in every dtype on the
SD1.5 *architecture* with random weights (no download) at 512x512 — or, with `--quick`, on the
trained tiny target at 64 px on CPU — and fails loudly on anything a long run would silently waste
hours on. It calls attacks in-process: it diagnoses the user's own machine, it is not a leaderboard.
So it benches only this package's attacks (and classes the calling process registered itself): an
installed plugin's code runs only in a confined worker, never here, so a plugin is listed in the
report from its entry-point metadata as not benched (`spdbench run --attack NAME` measures it in
its worker), and naming one in `attacks` is refused with one line.

Per (attack, dtype) it measures seconds per iteration after a warm-up call (CUDA-synchronized),
peak memory (CUDA), and checks — each failed check makes the command exit 1:
- the call returns a finite delta of the input's shape (an exception is a failure);
- the loss curve (`loss_history`) is finite;
- the gradient of the attack's `objective_loss` at the protected image is finite and not all zero;
- the delta is not zero after the harness's budget projection and 8-bit rounding (`apply_budget`),
  except for the `none` reference, which must be exactly zero;
- for attacks with an objective: objective(x + delta) < objective(x + uniform noise of the same
  budget), both after `apply_budget` (lower is stronger); on the full bench's random weights the
  denoising-error objectives (AdvDM, SDS, Mist) are reported as notes, not judged: a random UNet's
  denoising error barely depends on the image (the quick bench judges them on the trained tiny);
- low-precision agreement, for float16/bfloat16 when float32 ran too: the low-precision delta,
  judged by the *float32* model's objective, beats the same uniform noise. Reported as the gain
  ratio (o32(noise) - o32(x + delta_lp)) / (o32(noise) - o32(x + delta_fp32)), 1 = as good as
  float32, <= 0 = failure, and the cosine between the two raw deltas (informative only: both start
  from the same seed).
Then img2img images/s at batch 1, 4, 8, metric pairs/s (`metrics.score`), torch.compile on vs off
for the encoder attack, and (full mode) the issue's goals: photoguard-encoder seconds per image for
1000 iterations at batch 8, photoguard-diffusion memory at batch 1. JSON (rewritten after every
cell, so a killed run keeps what it measured) and a Markdown table go to the output folder.
"""
from __future__ import annotations

import contextlib
import copy
import datetime as _dt
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import torch

from spdbench.errors import AttackError, InputError
from spdbench.attacks.base import ATTACKS, Attack, locate_attack
from spdbench.attacks.diffprotect import DiffProtectAttack
from spdbench.budget import Budget, apply_budget, quantize_8bit
from spdbench.data.photos import load_photos
from spdbench.doctor.env import device_checks, library_checks, torch_checks
from spdbench.harness.editing import EditSettings, Editor
from spdbench.scoring import metrics
from spdbench.store import provenance
from spdbench.targets import Target, load_target, parse_device
from spdbench.targets.inpaint import inpainting_twin
from spdbench.testing.check import mask_args

SCHEMA = "spdbench-doctor-bench/1"
DTYPES = ("float32", "float16", "bfloat16")
#: precisions an attack may refuse with an AttackError that names them (reported as unsupported)
LOW_PRECISION = ("float16", "bfloat16")
#: the issue's targets (docs/performance.md): 1000 encoder iterations per 512 px image in fp16/bf16 at
#: batch 8 within 10 s on one H100 (PhotoGuard's notebook: ~68 s), photoguard-diffusion within 24 GB
GOAL_ENCODER_S_PER_IMAGE = 10.0
PHOTOGUARD_NOTEBOOK_S_PER_IMAGE = 68.0
GOAL_DIFFUSION_GB = 24.0
ENCODER_ATTACK = "photoguard-encoder"
DIFFUSION_ATTACK = "photoguard-diffusion"


@dataclass(frozen=True)
class BenchConfig:
    """What the bench runs. `BenchConfig.for_mode(quick=...)` gives the two standard settings."""

    mode: str                          # "full" (SD1.5 architecture, 512 px) or "quick" (trained tiny, 64 px)
    device: str
    dtypes: tuple[str, ...] = DTYPES
    attacks: tuple[str, ...] = ()      # empty = every registered attack except names starting "test-"
    target: str = "sd15-arch-random"
    image_size: int = 512
    batch: int = 4                     # images per call of a per-image attack (sd15-spd's attack batch)
    fit_images: int = 4                # training images of a universal or amortized attack's fit
    steps: int = 5                     # timed iterations (the attack's `steps`)
    warmup_steps: int = 1              # iterations of the untimed warm-up call
    eps: str = "16/255"
    edit_batches: tuple[int, ...] = (1, 4, 8)
    edit_steps: int = 50
    metric_pairs: int = 16
    compile_backend: Optional[str] = "inductor"
    goals: bool = True
    time_limit_s: Optional[float] = None
    seed: int = 0

    @classmethod
    def for_mode(cls, quick: bool, device: Optional[str] = None, **overrides: Any) -> "BenchConfig":
        """The standard full (H100, ~8 min) or quick (2 CPU cores, < 3 min) settings, plus overrides."""
        if quick:
            base = cls(mode="quick", device=device or "cpu", target="tiny", image_size=64, batch=2,
                       fit_images=2, steps=3, edit_steps=10, metric_pairs=8, compile_backend="eager", goals=False)
        else:
            if device is None:
                if not torch.cuda.is_available():
                    raise InputError("--bench without --quick runs SD1.5 at 512 px and needs a CUDA GPU, which this "
                                     "machine lacks; use --quick, or --device cpu to insist (hours)")
                device = "cuda"
            base = cls(mode="full", device=device)
        overrides = {k: v for k, v in overrides.items() if v is not None}
        return replace(base, **overrides)

    def validate(self) -> None:
        parse_device(self.device)
        bad = [d for d in self.dtypes if d not in DTYPES]
        if bad or not self.dtypes:
            raise InputError(f"--dtypes {','.join(self.dtypes)!r}: expected a comma list of {', '.join(DTYPES)}")
        for key in ("batch", "fit_images", "steps", "edit_steps"):
            if getattr(self, key) < 1:
                raise InputError(f"bench {key} must be >= 1, got {getattr(self, key)}")
        if any(b < 1 for b in self.edit_batches) or self.metric_pairs < 0:
            raise InputError(f"bench edit batches must be >= 1 and metric pairs >= 0, got {self.edit_batches}, "
                             f"{self.metric_pairs}")


# --- small tools -----------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class _Clock:
    seconds: float = 0.0
    peak_gb: Optional[float] = None
    working_gb: Optional[float] = None   # peak minus what was allocated before (models, inputs)


@contextlib.contextmanager
def _clock(device: torch.device) -> Iterator[_Clock]:
    """Synchronized wall time and (CUDA) peak memory of a block; the bench's own small timer so that
    it does not depend on how the harness times attacks."""
    clock = _Clock()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    start = time.perf_counter()
    try:
        yield clock
    finally:
        _sync(device)
        clock.seconds = time.perf_counter() - start
        if cuda:
            peak = torch.cuda.max_memory_allocated(device)
            clock.peak_gb, clock.working_gb = peak / 2**30, (peak - before) / 2**30


def _short(exc: BaseException, limit: int = 200) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()[0]
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _finite(values: Sequence[float]) -> bool:
    return all(math.isfinite(v) for v in values)


def _cosine(a: torch.Tensor, b: torch.Tensor) -> Optional[float]:
    a, b = a.detach().double().flatten(), b.detach().double().flatten().to(a.device)
    denom = float(a.norm() * b.norm())
    return max(-1.0, min(1.0, float(a @ b) / denom)) if denom > 0 else None


def _model_gb(target) -> float:
    return sum(p.numel() * p.element_size() for m in (target.vae, target.unet, target.text_encoder)
               for p in m.parameters()) / 2**30


def cast_target(base, dtype: torch.dtype):
    """A copy of `base` in `dtype` with the *same* weights (so float16 and float32 are comparable)."""
    if base.dtype == dtype:
        return base
    return Target(copy.deepcopy(base.vae), copy.deepcopy(base.unet), copy.deepcopy(base.text_encoder),
                  base.tokenizer, base.scheduler, name=base.name, source=base.source, device=base.device,
                  dtype=dtype)


@contextlib.contextmanager
def _quiet_libraries() -> Iterator[None]:
    """diffusers warns on every dtype cast and transformers draws loading bars: noise in a report."""
    from diffusers.utils import logging as dlog  # deferred: diffusers takes seconds to import; only to quiet it
    from transformers.utils import logging as tlog  # deferred: transformers is slow to import; only to quiet it

    dlevel, tlevel = dlog.get_verbosity(), tlog.get_verbosity()
    tbar = tlog.is_progress_bar_enabled()
    dlog.set_verbosity_error()
    tlog.set_verbosity_error()
    tlog.disable_progress_bar()
    try:
        yield
    finally:
        dlog.set_verbosity(dlevel)
        tlog.set_verbosity(tlevel)
        if tbar:
            tlog.enable_progress_bar()


# --- one attack in one dtype -----------------------------------------------------------------------
@dataclass
class _Reference:
    """What the float32 run of an attack leaves for the low-precision agreement check."""

    delta: torch.Tensor
    o32_adv: float
    o32_noise: float


def attack_class(name: str) -> type[Attack]:
    """The class the bench calls for `name`: a built-in, or a class this process registered itself;
    a plugin is refused (its code runs only in a worker, never in this process)."""
    where = locate_attack(name)
    if where.origin == "plugin":
        raise InputError(f"attack {name!r} is a plugin ({where.source.get('distribution')} "
                         f"{where.source.get('version')}): doctor --bench calls attacks in its own process, and "
                         f"plugin code runs only in a confined worker; measure it with `spdbench run --attack {name} "
                         "--suite smoke`")
    return where.cls


def benched_names() -> list[str]:
    """Every attack the bench may call here (built-ins and this process's own), sorted."""
    return sorted(n for n in ATTACKS.known_names() if locate_attack(n).origin != "plugin")


def plugin_rows() -> list[dict]:
    """The installed attack plugins, from entry-point metadata only (nothing imported): the report
    lists them as not benched, with the command that measures them in their worker."""
    rows = []
    for name in sorted(ATTACKS.known_names()):
        where = locate_attack(name)
        if where.origin == "plugin":
            rows.append(dict(attack=name, distribution=where.source.get("distribution"),
                             version=where.source.get("version"), benched=False,
                             why="plugin code runs only in a confined worker, never in this process",
                             measure=f"spdbench run --attack {name} --suite smoke"))
    return rows


def bench_attack(name: str, steps: int, budget):
    """The attack with `steps` iterations and, where it takes one, a step of eps / 8 (the default step of a
    20-iteration run): the default 2.5 * eps / steps would jump across the whole ball at 2-5 iterations
    and make "the objective improved" a coin toss on random weights. An iteration costs the same either way."""
    defaults = attack_class(name).defaults
    params: dict[str, Any] = {}
    if "steps" in defaults:
        params["steps"] = steps
    if "step_size" in defaults:
        params["step_size"] = budget.eps / 8
    return attack_class(name)(**params)


def _call(attack, images: torch.Tensor, target, budget, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)  # a CPU generator: the same draws on every device
    masks = mask_args(attack, images, target)  # centre boxes for an attack that reads inpainting masks
    attack.set_masks(masks.get("masks"))
    if attack.kind.fits:
        attack.fit(images, target, budget, generator, **masks)
        return attack.perturb(images, target, budget)
    return attack(images, target, budget, generator, **masks)


def _noise_images(images: torch.Tensor, budget, seed: int) -> torch.Tensor:
    noise = budget.random(images.cpu(), generator=torch.Generator().manual_seed(seed)).to(images.device)
    return apply_budget(images, noise, budget)


def run_attack_cell(name: str, dtype: str, target, reference_target, images: torch.Tensor, budget,
                    cfg: BenchConfig, references: dict[str, _Reference]) -> dict:
    """Time and check one attack in one dtype; returns the report row (its `failures` decide the exit)."""
    cls = attack_class(name)
    iterates = "steps" in cls.defaults
    row: dict[str, Any] = dict(attack=name, dtype=dtype, universal=cls.kind == "universal", batch=int(images.shape[0]),
                               steps=cfg.steps if iterates else None, failures=[], notes=[])
    timed = _timed_call(name, target, images, budget, cfg, row)
    if timed is None:
        return row
    attack, delta = timed
    if iterates:
        row["s_per_iteration"] = row["seconds"] / cfg.steps
        row["s_per_image_iteration"] = row["seconds"] / cfg.steps / images.shape[0]
    delta = _finite_delta(delta, images, row)
    if delta is None:
        return row
    _loss_checks(attack, iterates and cls.has_objective, row)
    adv = _budget_checks(name, images, delta, budget, row)
    if hasattr(attack, "objective_loss"):
        _gradient_check(attack, target, adv, images, cfg.seed + 1, row)
    if cls.has_objective:
        _objective_checks(attack, name, dtype, target, reference_target, images, adv, delta, budget, cfg, references,
                          row)
    return row


def _timed_call(name: str, target, images: torch.Tensor, budget, cfg: BenchConfig, row: dict) -> Optional[tuple]:
    """(attack, its delta): one warm-up call of `warmup_steps`, then the timed call of `steps`, the
    times and memory into `row`; None (and the failure) where either raised."""
    device = images.device
    try:
        with _clock(device) as warm:
            _call(bench_attack(name, cfg.warmup_steps, budget), images, target, budget, cfg.seed)
        attack = bench_attack(name, cfg.steps, budget)
        with _clock(device) as clock:
            delta = _call(attack, images, target, budget, cfg.seed)
    except AttackError as exc:
        dtype = str(getattr(target, "dtype", "")).replace("torch.", "")
        if dtype in LOW_PRECISION and dtype in str(exc):
            # the attack refuses this precision and says why (as test_numerics accepts): a visible
            # "unsupported" note with no timing, not a silent pass and not a crash
            row["notes"].append(f"unsupported in {dtype}: {_short(exc)}")
            row["unsupported"] = True
        else:
            row["failures"].append(f"raised {_short(exc)}")
        return None
    except Exception as exc:  # noqa: BLE001 - a crash is a reported failure, the bench goes on
        row["failures"].append(f"raised {_short(exc)}")
        return None
    row.update(warmup_s=warm.seconds, seconds=clock.seconds, peak_memory_gb=clock.peak_gb,
               working_memory_gb=clock.working_gb)
    return attack, delta


def _finite_delta(delta, images: torch.Tensor, row: dict) -> Optional[torch.Tensor]:
    """The attack's output as a float32 delta on the images' device, if it is a finite tensor of the
    images' shape; None (and the failure) where not."""
    if not isinstance(delta, torch.Tensor) or tuple(delta.shape) != tuple(images.shape):
        row["failures"].append(f"returned {type(delta).__name__} of shape {tuple(getattr(delta, 'shape', ()))}, "
                               f"expected {tuple(images.shape)}")
        return None
    delta = delta.detach().to(images.device, torch.float32)
    if not bool(torch.isfinite(delta).all()):
        row["failures"].append("delta has NaN/Inf")
        return None
    return delta


def _loss_checks(attack, expects_loss: bool, row: dict) -> None:
    """The loss curve (`loss_history`), if recorded, is finite; an iterating attack with an
    objective that records none gets a note."""
    history = [float(v) for v in getattr(attack, "loss_history", [])]
    if history:
        row.update(loss_first=history[0], loss_last=history[-1], loss_steps=len(history))
        if not _finite(history):
            bad = next(i for i, v in enumerate(history) if not math.isfinite(v))
            row["failures"].append(f"loss is {history[bad]} at iteration {bad}")
    elif expects_loss:
        row["notes"].append("no loss curve recorded")


def _budget_checks(name: str, images: torch.Tensor, delta: torch.Tensor, budget, row: dict) -> torch.Tensor:
    """The protected images after the harness's budget and 8-bit rounding; the delta must change
    pixels there (the 'none' reference: none at all). A raw delta over the budget is a note."""
    excess = float((budget.norms(delta) - budget.eps).max())
    if excess > 1e-6:
        row["notes"].append(f"raw delta exceeds the budget by {excess * 255:.3g}/255 (the harness projects it)")
    adv = apply_budget(images, delta, budget)
    changed = float((adv != quantize_8bit(images)).float().mean())
    row.update(delta_linf_255=float(delta.abs().max()) * 255, changed_fraction=changed)
    if name == "none":
        if changed > 0:
            row["failures"].append(f"the 'none' reference changed {changed:.2%} of the pixels")
    elif changed == 0:
        row["failures"].append(f"zero perturbation after the budget and 8-bit rounding (raw max |delta| "
                               f"{float(delta.abs().max()) * 255:.3g}/255)")
    return adv


def _gradient_check(attack, target, adv: torch.Tensor, images: torch.Tensor, seed: int, row: dict) -> None:
    try:
        x = adv.clone().requires_grad_(True)
        # the gradient the optimizer sees: the objective times the attack's `loss_scale` (which keeps
        # it representable in a float16 model), scaled in float32 before the backward pass
        scale = float(getattr(attack, "loss_scale", 1.0))
        with torch.enable_grad():
            loss = attack.objective_loss(target, x, images, torch.Generator().manual_seed(seed)).float().mean()
            (grad,) = torch.autograd.grad(loss * scale, x)
    except Exception as exc:  # noqa: BLE001
        row["failures"].append(f"gradient of objective_loss raised {_short(exc)}")
        return
    norm = float(grad.float().norm())
    row["grad_norm"] = norm
    if not math.isfinite(norm):
        row["failures"].append("gradient of the objective is NaN/Inf")
    elif norm == 0.0:
        row["failures"].append("gradient of the objective is exactly zero (underflow?)")


def _reads_denoising_error(attack) -> bool:
    """AdvDM, SDS, Mist and their SPD versions: objectives made of the UNet's denoising error."""
    return isinstance(getattr(attack, "per_image", attack), DiffProtectAttack)


def _objective_checks(attack, name: str, dtype: str, target, reference_target, images: torch.Tensor,
                      adv: torch.Tensor, delta: torch.Tensor, budget, cfg: BenchConfig,
                      references: dict[str, _Reference], row: dict) -> None:
    """The delta beats uniform noise of the same budget on the attack's objective; float32's result
    is kept as the reference that a low-precision dtype's delta is then judged against."""
    fail = _judge(attack, cfg, row)

    def objective(x: torch.Tensor, model) -> float:
        return float(attack.objective(x, model, images).float().mean())

    got = _objective_vs_noise(objective, target, images, adv, budget, cfg, row, fail)
    if got is None:
        return
    o_adv, o_noise = got
    if dtype == "float32":
        references[name] = _Reference(delta=delta, o32_adv=o_adv, o32_noise=o_noise)
        row["fp32_gain_ratio"], row["fp32_delta_cosine"] = 1.0, 1.0
        return
    ref = references.get(name)
    if ref is None:
        row["notes"].append("no float32 reference (float32 not run or failed): agreement not checked")
        return
    _fp32_agreement(objective, dtype, reference_target, adv, delta, ref, row, fail)


def _judge(attack, cfg: BenchConfig, row: dict) -> Callable[[str], None]:
    """Where an objective check's verdict goes: a failure, or a note where it cannot be judged."""
    if cfg.mode == "full" and _reads_denoising_error(attack):
        # the full bench's SD1.5 has random weights: its UNet's denoising error barely depends on
        # the image, so "beats noise" cannot be judged there (it is, on the trained tiny: --quick)
        def note(message: str) -> None:
            row["notes"].append(f"not judged on random weights: {message}")
        return note
    return row["failures"].append


def _objective_vs_noise(objective: Callable, target, images: torch.Tensor, adv: torch.Tensor, budget,
                        cfg: BenchConfig, row: dict, fail: Callable[[str], None]) -> Optional[tuple[float, float]]:
    """(objective at x + delta, at x + noise), recorded with the clean one in `row`; the delta must
    be lower (stronger). None where the objective raised or is not finite."""
    noisy = _noise_images(images, budget, cfg.seed + 2)
    try:
        o_adv, o_noise, o_clean = objective(adv, target), objective(noisy, target), objective(images, target)
    except Exception as exc:  # noqa: BLE001
        fail(f"objective raised {_short(exc)}")
        return None
    row["objective"] = dict(adv=o_adv, noise=o_noise, clean=o_clean)
    if not _finite([o_adv, o_noise, o_clean]):
        fail(f"objective is NaN/Inf (adv {o_adv}, noise {o_noise}, clean {o_clean})")
        return None
    if not o_adv < o_noise:
        fail(f"objective not improved: {o_adv:.5g} at x+delta vs {o_noise:.5g} at x+noise (lower is stronger)")
    return o_adv, o_noise


def _fp32_agreement(objective: Callable, dtype: str, reference_target, adv: torch.Tensor, delta: torch.Tensor,
                    ref: _Reference, row: dict, fail: Callable[[str], None]) -> None:
    """A low-precision delta, judged by the float32 model's objective, beats the same noise; its
    gain relative to float32's delta and the cosine between the two deltas are reported."""
    try:
        o32 = objective(adv, reference_target)
    except Exception as exc:  # noqa: BLE001
        fail(f"float32 objective of the {dtype} delta raised {_short(exc)}")
        return
    gain, gain32 = ref.o32_noise - o32, ref.o32_noise - ref.o32_adv
    row["fp32_objective_of_delta"] = o32
    row["fp32_gain_ratio"] = gain / gain32 if gain32 > 0 else None
    row["fp32_delta_cosine"] = _cosine(delta, ref.delta)
    if not gain > 0:
        fail(f"{dtype} delta does not beat noise on the float32 objective ({o32:.5g} vs noise {ref.o32_noise:.5g})")


# --- the other sections ------------------------------------------------------------------------------
def edit_rows(target, dtype: str, photos: torch.Tensor, cfg: BenchConfig) -> list[dict]:
    """img2img images/s at each batch size (strength 0.5, guidance 7.5, `edit_steps` steps, prompt P1)."""
    device = target.device
    rows = []
    try:
        Editor(target, EditSettings(steps=2)).edit(photos[:1], "P1", [0])  # warm-up: kernels, pipeline
    except Exception as exc:  # noqa: BLE001
        return [dict(dtype=dtype, batch=None, failures=[f"img2img raised {_short(exc)}"], notes=[])]
    for b in cfg.edit_batches:
        row: dict[str, Any] = dict(dtype=dtype, batch=b, steps=cfg.edit_steps, failures=[], notes=[])
        editor = Editor(target, EditSettings(steps=cfg.edit_steps), batch_size=b)
        try:
            with _clock(device) as clock:
                out = editor.edit(photos[:b], "P1", list(range(b)))
        except Exception as exc:  # noqa: BLE001
            row["failures"].append(f"img2img raised {_short(exc)}")
            rows.append(row)
            continue
        row.update(seconds=clock.seconds, images_per_s=b / clock.seconds, peak_memory_gb=clock.peak_gb)
        if tuple(out.shape) != tuple(photos[:b].shape) or not bool(torch.isfinite(out).all()):
            row["failures"].append(f"edit output of shape {tuple(out.shape)} is not a finite image batch")
        if editor.oom_events:
            row["notes"].append(f"out of memory, batch halved: {editor.oom_events}")
        rows.append(row)
    return rows


def metric_row(device: torch.device, cfg: BenchConfig, budget) -> dict:
    """Metric pairs per second with all four metrics (`metrics.score`), and score(x, x) == identity."""
    n = cfg.metric_pairs
    row: dict[str, Any] = dict(pairs=n, size=cfg.image_size, failures=[], notes=[])
    try:
        x = load_photos(n=min(n, 8), size=cfg.image_size).repeat((n + 7) // 8, 1, 1, 1)[:n].to(device)
        y = _noise_images(x, budget, cfg.seed + 3)
        metrics.score(y[:1], x[:1])  # warm-up (filter banks are cached per size)
        with _clock(device) as clock:
            values = metrics.score(y, x)
        same = metrics.score(x[:1], x[:1])
    except Exception as exc:  # noqa: BLE001
        row["failures"].append(f"metrics raised {_short(exc)}")
        return row
    row.update(seconds=clock.seconds, pairs_per_s=n / clock.seconds,
               means={k: float(v.float().mean()) for k, v in values.items()})
    if not all(bool(torch.isfinite(v).all()) for v in values.values()):
        row["failures"].append("a metric gave NaN/Inf")
    if abs(float(same["ssim"][0]) - 1.0) > 1e-4:
        row["failures"].append(f"SSIM of an image with itself is {float(same['ssim'][0]):.6f}, not 1")
    return row


def compile_row(base, dtype: str, images: torch.Tensor, budget, cfg: BenchConfig) -> dict:
    """The encoder attack with torch.compile (what `spdbench run --compile` does) vs without: s/it,
    compile time (the warm-up call), and the cosine between the two deltas (same seed)."""
    backend = cfg.compile_backend
    row: dict[str, Any] = dict(attack=ENCODER_ATTACK, dtype=dtype, backend=backend, batch=int(images.shape[0]),
                               steps=cfg.steps, failures=[], notes=[])
    if backend == "eager":
        row["notes"].append("backend 'eager' checks the compile plumbing only; no speed-up is expected")
    target = cast_target(base, getattr(torch, dtype))
    device = images.device
    try:
        _call(bench_attack(ENCODER_ATTACK, cfg.warmup_steps, budget), images, target, budget, cfg.seed)
        with _clock(device) as off:
            delta_off = _call(bench_attack(ENCODER_ATTACK, cfg.steps, budget), images, target, budget, cfg.seed)

        compiled = Target(copy.deepcopy(target.vae), target.unet, target.text_encoder, target.tokenizer,
                          target.scheduler, name=target.name, device=target.device, dtype=target.dtype)
        compiled.accelerate(compile_backend=backend)
        with _clock(device) as first:
            _call(bench_attack(ENCODER_ATTACK, cfg.warmup_steps, budget), images, compiled, budget, cfg.seed)
        with _clock(device) as on:
            delta_on = _call(bench_attack(ENCODER_ATTACK, cfg.steps, budget), images, compiled, budget, cfg.seed)
    except Exception as exc:  # noqa: BLE001
        row["failures"].append(f"torch.compile ({backend}) raised {_short(exc)}")
        return row
    finally:
        torch._dynamo.reset()  # compiled graphs must not outlive the bench
    row.update(s_per_iteration_off=off.seconds / cfg.steps, s_per_iteration_on=on.seconds / cfg.steps,
               compile_s=first.seconds, speedup=off.seconds / on.seconds,
               delta_cosine=_cosine(delta_on, delta_off))
    if not bool(torch.isfinite(delta_on).all()) or float(delta_on.abs().max()) == 0.0:
        row["failures"].append("the compiled attack returned a zero or non-finite delta")
    return row


def goal_rows(target, dtype: str, photos: torch.Tensor, budget, cfg: BenchConfig) -> list[dict]:
    """The issue's two targets: encoder seconds per image for 1000 iterations at batch 8 (fp16/bf16),
    and photoguard-diffusion memory at batch 1 with checkpointing (weights of this dtype + working)."""
    rows, device = [], photos.device
    registered = set(benched_names())
    runs = []
    if dtype != "float32" and ENCODER_ATTACK in registered:
        runs.append((ENCODER_ATTACK, 8))
    if DIFFUSION_ATTACK in registered and device.type == "cuda":
        runs.append((DIFFUSION_ATTACK, 1))
    for name, batch in runs:
        row: dict[str, Any] = dict(goal=name, dtype=dtype, batch=batch, steps=cfg.steps, failures=[], notes=[])
        images = photos[:batch]
        try:
            _call(bench_attack(name, cfg.warmup_steps, budget), images, target, budget, cfg.seed)
            with _clock(device) as clock:
                _call(bench_attack(name, cfg.steps, budget), images, target, budget, cfg.seed)
        except Exception as exc:  # noqa: BLE001
            row["failures"].append(f"raised {_short(exc)}")
            rows.append(row)
            continue
        if name == ENCODER_ATTACK:
            per_image = clock.seconds / cfg.steps / batch * 1000
            row.update(what=f"seconds per {cfg.image_size} px image for 1000 iterations", value=per_image,
                       limit=GOAL_ENCODER_S_PER_IMAGE, met=per_image <= GOAL_ENCODER_S_PER_IMAGE,
                       reference=f"PhotoGuard notebook ~{PHOTOGUARD_NOTEBOOK_S_PER_IMAGE:.0f} s (fp16, GPU not named)")
        else:
            alone = _model_gb(target) + (clock.working_gb or 0.0)
            row.update(what="GB: this dtype's weights + working memory (checkpointing on)", value=alone,
                       limit=GOAL_DIFFUSION_GB, met=alone <= GOAL_DIFFUSION_GB,
                       reference="its anchor (no checkpointing) needs ~40 GB", s_per_iteration=clock.seconds / cfg.steps)
        rows.append(row)
    return rows


# --- the run -----------------------------------------------------------------------------------------
@dataclass
class BenchReport:
    """The bench's result; `data` is exactly what bench.json holds."""

    data: dict
    out: Path
    failures: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures


def _attack_names(cfg: BenchConfig) -> list[str]:
    if cfg.attacks:
        for name in cfg.attacks:
            attack_class(name)  # an unknown name is one clear line, before anything is built
        return list(cfg.attacks)
    return [n for n in benched_names() if not n.startswith("test-")]


def collect_failures(data: dict) -> list[str]:
    """Every failure in the report as 'where: what' lines (the exit status is their absence)."""
    out = []
    for row in data.get("attacks", []):
        out += [f"{row['attack']} {row['dtype']}: {f}" for f in row["failures"]]
    for row in data.get("goals", []):
        out += [f"goal {row['goal']} {row['dtype']}: {f}" for f in row["failures"]]
    for row in data.get("edits", []):
        out += [f"img2img {row['dtype']} batch {row.get('batch')}: {f}" for f in row["failures"]]
    for key in ("metrics", "compile"):
        row = data.get(key) or {}
        out += [f"{key}: {f}" for f in row.get("failures", [])]
    out += [f"not run: {s}" for s in data.get("skipped", [])]
    return out


@contextlib.contextmanager
def _threads(cfg: BenchConfig) -> Iterator[None]:
    """One CPU thread in quick mode: at 64 px a second thread gains little, and on a busy machine
    two threads stall each other (measured here: 161 s with 2 threads vs 52 s with 1 under load)."""
    before = torch.get_num_threads()
    if cfg.mode == "quick" and torch.device(cfg.device).type == "cpu":
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_bench(cfg: BenchConfig, out: Path, log: Callable[[str], None] = print) -> BenchReport:
    """Run the bench described by `cfg`, writing bench.json (after every cell) and bench.md into `out`."""
    with _threads(cfg):
        return _run_bench(cfg, Path(out), log)


@dataclass
class _Run:
    """A bench in progress: its settings, the report it fills, and the clock its lines are stamped with."""

    cfg: BenchConfig
    device: torch.device
    log: Callable[[str], None]
    report: BenchReport
    start: float
    twin: Any = None  # an inpainting twin of the target, built once, for attacks that read masks

    @property
    def data(self) -> dict:
        return self.report.data

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def save(self) -> None:
        """bench.json rewritten after every cell, so a killed bench keeps what it measured."""
        self.data["elapsed_s"] = self.elapsed()
        self.report.failures = collect_failures(self.data)
        _write_atomic(self.report.out / "bench.json", json.dumps(self.data, indent=1, default=str))

    def over_time(self, what: str) -> bool:
        """True (and `what` listed as not run) once the time limit is reached."""
        if self.cfg.time_limit_s is not None and self.elapsed() > self.cfg.time_limit_s:
            self.data["skipped"].append(f"{what} (time limit {self.cfg.time_limit_s:.0f} s reached)")
            return True
        return False

    def free_cuda(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def _run_bench(cfg: BenchConfig, out: Path, log: Callable[[str], None]) -> BenchReport:
    cfg.validate()
    names = _attack_names(cfg)
    device = parse_device(cfg.device)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    run = _Run(cfg, device, log, BenchReport(data=_initial_data(cfg, device), out=out), start)
    for p in run.data["plugins"]:
        log(f"not benched: plugin {p['attack']} ({p['distribution']} {p['version']}): {p['why']}; `{p['measure']}`")
    budget = Budget("linf", cfg.eps)
    photos_cpu = _bench_photos(cfg)
    photos = photos_cpu.to(device)
    order = sorted(cfg.dtypes, key=DTYPES.index)  # float32 first: it is the others' reference
    with _quiet_libraries():
        base = _build_base(run, names, order)
        references: dict[str, _Reference] = {}
        for dtype in order:
            target = cast_target(base, getattr(torch, dtype))
            _attack_stage(run, names, dtype, target, base, photos, budget, references)
            _goal_stage(run, dtype, target, photos, budget)
            _edit_stage(run, dtype, target, photos_cpu)
            if target is not base:
                del target
                run.free_cuda()
        _metric_stage(run, budget)
        _compile_stage(run, base, names, order, photos, budget)
    run.save()
    run.data["status"] = "pass" if run.report.ok else "fail"
    run.save()
    _write_atomic(out / "bench.md", markdown(run.data))
    return run.report


def _initial_data(cfg: BenchConfig, device: torch.device) -> dict[str, Any]:
    """bench.json before any cell: the settings, the environment and its checks, empty sections."""
    return dict(
        schema=SCHEMA, created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        config=asdict(cfg), environment=provenance.environment(device),
        checks=[c.to_dict() for c in torch_checks() + device_checks() + library_checks()],
        attacks=[], goals=[], edits=[], metrics=None, compile=None, skipped=[], status="running",
        plugins=plugin_rows())


def _bench_photos(cfg: BenchConfig) -> torch.Tensor:
    """As many bundled photos as the largest batch needs (repeated where there are too few)."""
    n_photos = max([cfg.batch, cfg.fit_images, *cfg.edit_batches, 8 if cfg.goals else 1])
    photos_cpu = load_photos(n=min(n_photos, 11), size=cfg.image_size)
    if photos_cpu.shape[0] < n_photos:
        photos_cpu = photos_cpu.repeat((n_photos + photos_cpu.shape[0] - 1) // photos_cpu.shape[0], 1, 1, 1)[:n_photos]
    return photos_cpu


def _build_base(run: _Run, names: list[str], order: list[str]):
    """The float32 target every dtype is cast from, its build time and size recorded."""
    cfg, device = run.cfg, run.device
    with _clock(device) as build:
        base = load_target(cfg.target, device=device, dtype=torch.float32)
    run.data["target"] = dict(name=cfg.target, build_s=build.seconds, weights_gb_fp32=_model_gb(base),
                              device_name=provenance.device_name(device))
    run.log(f"bench ({cfg.mode}) on {run.data['target']['device_name']} ({device}): {cfg.target} at "
            f"{cfg.image_size} px, built in {build.seconds:.1f} s; {len(names)} attacks x {', '.join(order)}")
    return base


def _attack_stage(run: _Run, names: list[str], dtype: str, target, base, photos: torch.Tensor, budget,
                  references: dict[str, _Reference]) -> None:
    """Every attack in one dtype, one cell each, saved and logged as it finishes."""
    cfg = run.cfg
    for name in names:
        if run.over_time(f"{name} {dtype}"):
            continue
        images = photos[: cfg.fit_images if _fits(name) else cfg.batch]
        if _needs_inpainting(name):
            run.twin = run.twin or inpainting_twin(base, seed=cfg.seed)
            row = run_attack_cell(name, dtype, cast_target(run.twin, getattr(torch, dtype)), run.twin, images,
                                  budget, cfg, references)
        else:
            row = run_attack_cell(name, dtype, target, base, images, budget, cfg, references)
        run.data["attacks"].append(row)
        run.save()
        run.log(_cell_line(row, run.elapsed()))
        run.free_cuda()  # one cell's cached blocks (or an OOM's) must not burden the next


def _goal_stage(run: _Run, dtype: str, target, photos: torch.Tensor, budget) -> None:
    """The issue's goals in one dtype (full mode)."""
    if not run.cfg.goals or run.over_time(f"goals {dtype}"):
        return
    rows = goal_rows(target, dtype, photos, budget, run.cfg)
    run.data["goals"] += rows
    run.save()
    for g in rows:
        run.log(f"[{run.elapsed():6.1f}s] goal {g['goal']} {dtype} batch {g['batch']}: "
                + (f"{g['value']:.3g} ({g['what']}; goal <= {g['limit']:g})" if "value" in g else "FAIL"))


def _edit_stage(run: _Run, dtype: str, target, photos_cpu: torch.Tensor) -> None:
    """img2img images/s at each batch size in one dtype."""
    if not run.cfg.edit_batches or run.over_time(f"img2img {dtype}"):
        return
    rows = edit_rows(target, dtype, photos_cpu, run.cfg)
    run.data["edits"] += rows
    run.save()
    run.log(f"[{run.elapsed():6.1f}s] img2img {dtype}: " + ", ".join(
        f"b{r['batch']} {r['images_per_s']:.3g} img/s" if "images_per_s" in r else f"b{r.get('batch')} FAIL"
        for r in rows))


def _metric_stage(run: _Run, budget) -> None:
    """Metric pairs per second."""
    if not run.cfg.metric_pairs or run.over_time("metrics"):
        return
    run.data["metrics"] = metric_row(run.device, run.cfg, budget)
    run.save()
    run.log(f"[{run.elapsed():6.1f}s] metrics: {run.data['metrics'].get('pairs_per_s', 0):.3g} pairs/s")


def _compile_stage(run: _Run, base, names: list[str], order: list[str], photos: torch.Tensor, budget) -> None:
    """torch.compile on vs off for the encoder attack, in the lowest precision run."""
    cfg = run.cfg
    if not cfg.compile_backend or run.over_time("torch.compile"):
        return
    if ENCODER_ATTACK not in names:
        run.data["compile"] = dict(failures=[], notes=[f"{ENCODER_ATTACK} not in the attack list: not measured"])
        return
    dtype = next((d for d in ("bfloat16", "float16") if d in order), "float32")
    run.data["compile"] = c = compile_row(base, dtype, photos[: cfg.batch], budget, cfg)
    run.log(f"[{run.elapsed():6.1f}s] torch.compile ({cfg.compile_backend}) {dtype}: "
            + (f"{c['s_per_iteration_off']:.3g} -> {c['s_per_iteration_on']:.3g} s/it, compile "
               f"{c['compile_s']:.1f} s" if "speedup" in c else "FAIL"))


def _write_atomic(path: Path, text: str) -> None:
    """Write-then-rename: a bench killed mid-write leaves the previous complete JSON."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _needs_inpainting(name: str) -> bool:
    return bool(attack_class(name).needs_inpainting)


def _fits(name: str) -> bool:
    return attack_class(name).kind.fits


def _fmt(value: Any, spec: str = ".3g") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return format(value, spec)
    return str(value)


def _cell_line(row: dict, elapsed: float) -> str:
    status = "ok" if not row["failures"] else "FAIL: " + "; ".join(row["failures"])
    speed = f"{row['s_per_iteration']:.3g} s/it" if row.get("s_per_iteration") else f"{_fmt(row.get('seconds'))} s"
    return f"[{elapsed:6.1f}s] {row['attack']:<22} {row['dtype']:<8} {speed:<12} {status}"


def markdown(data: dict) -> str:
    """The report as Markdown: what ran where, one table per section, then every failure."""
    cfg, env, tgt = data["config"], data["environment"], data.get("target", {})
    failures = collect_failures(data)
    lines = [
        f"# spdbench doctor --bench ({cfg['mode']})", "",
        f"- device: **{tgt.get('device_name', '?')}** ({cfg['device']}); torch {env['libraries'].get('torch')}, "
        f"diffusers {env['libraries'].get('diffusers')}; {env.get('cpu_threads')} CPU threads; "
        f"commit {env.get('git_commit')}; {data['created']}",
        f"- target: {cfg['target']} (random weights) at {cfg['image_size']} px; L-inf eps {cfg['eps']}; "
        f"{cfg['steps']} timed iterations after a {cfg['warmup_steps']}-iteration warm-up call; per-image attacks "
        f"at batch {cfg['batch']}, universal fits on {cfg['fit_images']} images",
        f"- result: **{'PASS' if not failures else f'FAIL ({len(failures)} failure(s))'}** in "
        f"{data.get('elapsed_s', 0):.0f} s",
        *([f"- not benched: plugin(s) {', '.join(p['attack'] for p in data['plugins'])} (plugin code runs only "
           "in a confined worker, never in this process; `spdbench run --attack NAME` measures one there)"]
          if data.get("plugins") else []), "",
        "## Attacks", "",
        "s/it = seconds per iteration of the whole batch; changed = pixels changed after the budget and 8-bit "
        "rounding; objective: lower is stronger; vs fp32 = gain ratio of the delta over noise judged by the "
        "float32 model (1 = as good as float32) and cosine of the raw deltas.", "",
        "| attack | dtype | batch | s/it | s/image-it | peak GB | loss first -> last | changed | "
        "objective adv / noise / clean | vs fp32 (ratio, cos) | status |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in data["attacks"]:
        obj = r.get("objective")
        lines.append("| " + " | ".join([
            r["attack"], r["dtype"], str(r["batch"]), _fmt(r.get("s_per_iteration")),
            _fmt(r.get("s_per_image_iteration")), _fmt(r.get("peak_memory_gb")),
            f"{_fmt(r.get('loss_first'), '.4g')} -> {_fmt(r.get('loss_last'), '.4g')}" if "loss_first" in r else "-",
            f"{r['changed_fraction']:.0%}" if "changed_fraction" in r else "-",
            " / ".join(_fmt(obj[k], ".4g") for k in ("adv", "noise", "clean")) if obj else "-",
            f"{_fmt(r.get('fp32_gain_ratio'), '.2f')}, {_fmt(r.get('fp32_delta_cosine'), '.2f')}"
            if "fp32_gain_ratio" in r else "-",
            "ok" if not r["failures"] else "**FAIL**",
        ]) + " |")
    if data.get("goals"):
        lines += ["", "## Goals (issue 17)", "", "| goal | dtype | batch | measured | goal | met |", "|---|---|---|---|---|---|"]
        for g in data["goals"]:
            lines.append(f"| {g['goal']}: {g.get('what', '-')} | {g['dtype']} | {g['batch']} | {_fmt(g.get('value'))} | "
                         f"<= {_fmt(g.get('limit'))} ({g.get('reference', '')}) | "
                         f"{'yes' if g.get('met') else ('no' if 'met' in g else 'FAIL')} |")
    if data.get("edits"):
        lines += ["", "## img2img", "", "strength 0.5, guidance 7.5, prompt P1.", "",
                  "| dtype | batch | steps | seconds | images/s | peak GB | status |", "|---|---|---|---|---|---|---|"]
        for e in data["edits"]:
            lines.append(f"| {e['dtype']} | {e.get('batch')} | {e.get('steps', '-')} | {_fmt(e.get('seconds'))} | "
                         f"{_fmt(e.get('images_per_s'))} | {_fmt(e.get('peak_memory_gb'))} | "
                         f"{'ok' if not e['failures'] else '**FAIL**'} |")
    m = data.get("metrics")
    if m:
        lines += ["", "## Metrics", "", f"`metrics.score` (SSIM, PSNR, VIFp, FSIMc) on {m['pairs']} pairs at "
                  f"{m['size']} px: **{_fmt(m.get('pairs_per_s'))} pairs/s** "
                  f"({'ok' if not m['failures'] else 'FAIL'})"]
    c = data.get("compile")
    if c and "backend" in c:
        lines += ["", "## torch.compile", "",
                  f"{c['attack']} {c['dtype']}, batch {c['batch']}, backend {c['backend']}: "
                  + (f"{_fmt(c['s_per_iteration_off'])} s/it off, {_fmt(c['s_per_iteration_on'])} s/it on "
                     f"(x{_fmt(c['speedup'], '.2f')}), compile + first call {_fmt(c['compile_s'])} s, delta cosine "
                     f"{_fmt(c.get('delta_cosine'), '.4f')}" if "speedup" in c else "FAIL")]
    notes = [f"{r.get('attack', r.get('goal', 'img2img'))} {r.get('dtype', '')}: {n}"
             for key in ("attacks", "goals", "edits") for r in data.get(key, []) for n in r.get("notes", [])]
    notes += [f"{key}: {n}" for key in ("metrics", "compile") for n in (data.get(key) or {}).get("notes", [])]
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    lines += ["", "## Failures", ""] + ([f"- {f}" for f in failures] if failures else ["none"])
    return "\n".join(lines) + "\n"
