"""Running an untrusted attack under the harness's authority: inputs it may see, output checks, timing.

The attack is handed only what it may use (a universal attack gets the training split, a per-image
attack one batch at a time); what it returns is checked for type, shape, device, dtype and
finiteness, projected onto the budget (the excess is reported, not used), clamped and quantized.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, Optional, Sequence

import torch

from .attacks.base import Attack, UniversalAttack
from .budget import Budget, apply_budget
from .errors import AttackError, SpdbenchError


@dataclass
class Clock:
    """Wall seconds, device-synchronized seconds (CUDA) and peak device memory of a block."""

    wall_s: float = 0.0
    device_s: Optional[float] = None
    peak_memory_bytes: Optional[int] = None


@contextmanager
def timed(device: torch.device) -> Iterator[Clock]:
    clock = Clock()
    cuda = device.type == "cuda" and torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start_ev, end_ev = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start_ev.record()
    start = time.perf_counter()
    try:
        yield clock
    finally:
        if cuda:
            end_ev.record()
            torch.cuda.synchronize(device)
            clock.device_s = start_ev.elapsed_time(end_ev) / 1000.0
            clock.peak_memory_bytes = int(torch.cuda.max_memory_allocated(device))
        clock.wall_s = time.perf_counter() - start


@dataclass
class Protection:
    """The protected images of one split and what it cost."""

    adv: torch.Tensor
    wall_s: float
    device_s: Optional[float]
    peak_memory_bytes: Optional[int]
    max_norm_returned: float
    over_budget_images: int
    loss_curve: list[float] = field(default_factory=list)
    fit_wall_s: Optional[float] = None
    oom_events: list[dict] = field(default_factory=list)  # batch halvings after CUDA OOM


def validate_delta(delta, like: torch.Tensor, attack_name: str, universal: bool = False) -> torch.Tensor:
    """Refuse malformed attack output with an error that says what was wrong."""
    expected = (1,) + tuple(like.shape[1:]) if universal else tuple(like.shape)
    if not isinstance(delta, torch.Tensor):
        raise AttackError(f"attack {attack_name!r} returned {type(delta).__name__}, expected a torch.Tensor delta")
    if tuple(delta.shape) != expected:
        raise AttackError(f"attack {attack_name!r} returned a delta of shape {tuple(delta.shape)}, expected {expected}")
    if delta.device != like.device:
        raise AttackError(f"attack {attack_name!r} returned a delta on {delta.device}, expected {like.device}")
    if delta.dtype != like.dtype:
        raise AttackError(f"attack {attack_name!r} returned a delta of dtype {delta.dtype}, expected {like.dtype}"
                          " (return delta.to(images.dtype))")
    if not bool(torch.isfinite(delta).all()):
        raise AttackError(f"attack {attack_name!r} returned a delta with NaN or Inf values")
    return delta.detach()


def _call_attack(fn, attack: Attack, *args):
    try:
        return fn(*args)
    except SpdbenchError:
        raise
    except Exception as exc:  # noqa: BLE001 - the attack is untrusted code
        raise AttackError(f"attack {attack.name!r} raised {type(exc).__name__}: {exc}") from exc


def _enforce(delta: torch.Tensor, images: torch.Tensor, budget: Budget) -> tuple[torch.Tensor, float, int]:
    norms = budget.norms(delta)
    over = int((norms > budget.eps + 1e-6).sum())
    return apply_budget(images, delta, budget), float(norms.max()), over


def protect(attack: Attack, target, images: torch.Tensor, budget: Budget, *, batch_size: int,
            seed: int, fitted_delta: Optional[torch.Tensor] = None) -> Protection:
    """Protect `images` (one split) with a per-image attack, or apply a fitted universal delta."""
    device = images.device
    if attack.universal:
        assert fitted_delta is not None, "fit the universal attack first"
        with timed(device) as clock:
            delta = fitted_delta.expand_as(images)
            adv, max_norm, over = _enforce(delta, images, budget)
        return Protection(adv, clock.wall_s, clock.device_s, clock.peak_memory_bytes, max_norm, over)
    advs, curves, max_norm, over_total, ooms = [], [], 0.0, 0, []
    with timed(device) as clock:
        start, b = 0, 0
        while start < len(images):
            batch = images[start:start + batch_size]
            # the seed follows the first image of the batch, so a retry after OOM stays deterministic
            gen = torch.Generator(device=device).manual_seed(seed + start)
            try:
                raw = _call_attack(attack, attack, batch, target, budget, gen)
            except AttackError as exc:
                if not _is_oom(exc.__cause__) or batch_size == 1:
                    raise
                ooms.append({"batch_size": batch_size, "retry_with": batch_size // 2})
                batch_size //= 2
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                continue
            delta = validate_delta(raw, batch, attack.name)
            adv, m, over = _enforce(delta, batch, budget)
            advs.append(adv)
            max_norm, over_total = max(max_norm, m), over_total + over
            if attack.loss_history:
                curves.append(list(attack.loss_history))
            start, b = start + len(batch), b + 1
    return Protection(torch.cat(advs), clock.wall_s, clock.device_s, clock.peak_memory_bytes, max_norm,
                      over_total, loss_curve=_mean_curve(curves), oom_events=ooms)


def _is_oom(exc: Optional[BaseException]) -> bool:
    """CUDA out-of-memory (torch raises OutOfMemoryError, older builds a RuntimeError)."""
    return exc is not None and (isinstance(exc, torch.cuda.OutOfMemoryError)
                                or "out of memory" in str(exc).lower())


def fit_universal(attack: UniversalAttack, target, train_images: torch.Tensor, budget: Budget,
                  seed: int) -> tuple[torch.Tensor, Clock, float, int]:
    """Fit on the training split only; returns (projected delta, clock, max norm returned, over-budget)."""
    with timed(train_images.device) as clock:
        gen = torch.Generator(device=train_images.device).manual_seed(seed)
        raw = _call_attack(attack.fit, attack, train_images, target, budget, gen)
        delta = validate_delta(raw, train_images, attack.name, universal=True)
    norm = float(budget.norms(delta).max())
    over = int(norm > budget.eps + 1e-6)
    delta = budget.project(delta)
    attack.delta = delta
    return delta, clock, norm, over


def _mean_curve(curves: Sequence[Sequence[float]]) -> list[float]:
    if not curves:
        return []
    n = min(len(c) for c in curves)
    return [sum(c[i] for c in curves) / len(curves) for i in range(n)]
