"""Running an attack, and enforcing the budget on what comes back.

Two sides, kept apart because they run in different processes (docs/architecture.md):
- `run_attack` is the *attack side*: it calls untrusted attack code on exactly what the attack may
  see (one split's images for a per-image attack, the training images for a universal one) and
  returns plain data (`AttackOutput`). In the default mode it runs inside the worker process
  (worker.py); with `isolation="none"` it runs in the harness's process, for debugging only.
- `enforce` is the *harness side*: it checks the returned delta (type, shape, dtype, finite),
  projects it onto the budget (the excess is reported, not used), clamps x + delta to [0, 1] and
  quantizes to 8 bits, and measures the norm actually applied.
"""
from __future__ import annotations

import resource
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, Optional, Sequence

import torch

from spdbench.attacks.base import Attack, AttackKind
from spdbench.budget import Budget, apply_budget, quantize_delta
from spdbench.errors import AttackError, RecordError, SpdbenchError
from spdbench.harness.model_calls import ModelCallCounter
from spdbench.store.networks import load_into


@dataclass
class Clock:
    """Wall seconds, device-synchronized seconds (CUDA) and peak device memory of a block."""

    wall_s: float = 0.0
    device_s: Optional[float] = None
    peak_memory_bytes: Optional[int] = None
    peak_rss_bytes: Optional[int] = None  # off CUDA: this process's peak resident set so far


def peak_rss_bytes() -> int:
    """This process's peak resident set size (ru_maxrss: KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


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
        else:
            clock.peak_rss_bytes = peak_rss_bytes()
        clock.wall_s = time.perf_counter() - start


# --- the attack side ---------------------------------------------------------------------------
@dataclass
class SplitOutput:
    """What the attack returned for one split (per-image) or for the fit (universal): plain data."""

    delta: torch.Tensor                  # raw, before the harness enforces anything
    loss_curve: list[float] = field(default_factory=list)
    wall_s: float = 0.0                  # measured where the attack ran
    device_s: Optional[float] = None
    peak_memory_bytes: Optional[int] = None
    oom_events: list[dict] = field(default_factory=list)
    model_calls: dict[str, float] = field(default_factory=dict)  # per image
    #: an amortized attack's fit: its trained network's weights (state_dict, float32), plain data
    network: Optional[dict[str, torch.Tensor]] = None
    peak_rss_bytes: Optional[int] = None  # off CUDA: the attack process's peak resident set (Clock)


def validate_delta(delta, like: torch.Tensor, attack_name: str, universal: bool = False) -> torch.Tensor:
    """Refuse malformed attack output with an error that says what was wrong; returns a plain tensor
    (a subclass of torch.Tensor is turned into a plain one, so none of its methods run later)."""
    expected = (1,) + tuple(like.shape[1:]) if universal else tuple(like.shape)
    if not isinstance(delta, torch.Tensor):
        raise AttackError(f"attack {attack_name!r} returned {type(delta).__name__}, expected a torch.Tensor delta")
    if type(delta) is not torch.Tensor:
        delta = torch.Tensor._make_subclass(torch.Tensor, delta.detach())  # plain data, no overrides
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


def _call_attack(fn, attack: Attack, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except SpdbenchError:
        raise
    except BaseException as exc:  # noqa: BLE001 - untrusted code: KeyboardInterrupt/SystemExit too
        raise AttackError(f"attack {attack.name!r} raised {type(exc).__name__}: {exc}") from exc


def _is_oom(exc: Optional[BaseException]) -> bool:
    """CUDA out-of-memory (torch raises OutOfMemoryError, older builds a RuntimeError)."""
    return exc is not None and (isinstance(exc, torch.cuda.OutOfMemoryError)
                                or "out of memory" in str(exc).lower())


def _mean_curve(curves: Sequence[Sequence[float]]) -> list[float]:
    if not curves:
        return []
    n = min(len(c) for c in curves)
    return [sum(c[i] for c in curves) / len(curves) for i in range(n)]


def _mask_kwargs(attack: Attack, masks: Optional[torch.Tensor], lo: int = 0, hi: Optional[int] = None) -> dict:
    """`masks=` for an attack that reads them (Attack.uses_masks); nothing for any other."""
    if not attack.uses_masks:
        return {}
    return {"masks": None if masks is None else masks[lo:hi].clone()}


def batch_count(n: int, batch_size: int) -> int:
    """How many batches perturb_split runs a split of `n` photos in (no OOM retry): one optimization
    each, and what an attack spends once per batch is spent that many times. The one rule the
    progress denominator (pipeline.expected_optimizations) and the work probe (work_match) share."""
    return -(-n // max(1, batch_size))


def perturb_split(attack: Attack, target, images: torch.Tensor, budget: Budget, *, batch_size: int,
                  seed: int, masks: Optional[torch.Tensor] = None) -> SplitOutput:
    """A per-image attack over one split, batch by batch; the batch's seed follows its first image,
    so a retry after CUDA OOM (batch halved) stays deterministic."""
    device = images.device
    deltas, curves, ooms = [], [], []
    with timed(device) as clock:
        start = 0
        while start < len(images):
            batch = images[start:start + batch_size]
            gen = torch.Generator(device=device).manual_seed(seed + start)
            try:
                raw = _call_attack(attack, attack, batch.clone(), target, Budget(budget.norm, budget.eps), gen,
                                   **_mask_kwargs(attack, masks, start, start + len(batch)))
            except AttackError as exc:
                if not _is_oom(exc.__cause__) or batch_size == 1:
                    raise
                ooms.append({"batch_size": batch_size, "retry_with": batch_size // 2})
                batch_size //= 2
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                continue
            deltas.append(validate_delta(raw, batch, attack.name).float())
            if attack.loss_history:
                curves.append([float(v) for v in attack.loss_history])
            start += len(batch)
    return SplitOutput(torch.cat(deltas), _mean_curve(curves), clock.wall_s, clock.device_s,
                       clock.peak_memory_bytes, ooms, peak_rss_bytes=clock.peak_rss_bytes)


def fit_split(attack: Attack, target, train_images: torch.Tensor, budget: Budget, *, seed: int,
              masks: Optional[torch.Tensor] = None) -> SplitOutput:
    """Fit a universal attack on the training images only; the raw delta (1, 3, H, W)."""
    with timed(train_images.device) as clock:
        gen = torch.Generator(device=train_images.device).manual_seed(seed)
        raw = _call_attack(attack.fit, attack, train_images.clone(), target, Budget(budget.norm, budget.eps), gen,
                           **_mask_kwargs(attack, masks))
        delta = validate_delta(raw, train_images, attack.name, universal=True).float()
    curve = [float(v) for v in attack.loss_history]
    return SplitOutput(delta, curve, clock.wall_s, clock.device_s, clock.peak_memory_bytes,
                       peak_rss_bytes=clock.peak_rss_bytes)


def network_state(attack: Attack, network) -> dict[str, torch.Tensor]:
    """The trained network of an amortized attack as plain float32 tensors, checked: a module, no
    larger than the attack kind allows, every weight finite (what travels back and lands on disk)."""
    if not isinstance(network, torch.nn.Module):
        raise AttackError(f"amortized attack {attack.name!r}: fit() returned {type(network).__name__}, "
                          "expected the trained torch.nn.Module")
    state = {k: torch.Tensor._make_subclass(torch.Tensor, v.detach()).to("cpu", torch.float32).contiguous()
             for k, v in network.state_dict().items()}
    n = sum(v.numel() for v in state.values())
    if n > attack.max_network_params:
        raise AttackError(f"amortized attack {attack.name!r}: its network has {n:,} values, "
                          f"more than the {attack.max_network_params:,} an amortized attack may return")
    bad = [k for k, v in state.items() if not bool(torch.isfinite(v).all())]
    if bad:
        raise AttackError(f"amortized attack {attack.name!r}: network weights {bad[:3]} hold NaN or Inf")
    return state


def fit_network(attack: Attack, target, train_images: torch.Tensor, budget: Budget, *, seed: int) -> SplitOutput:
    """Fit an amortized attack on the training images only; the output carries its network."""
    with timed(train_images.device) as clock:
        gen = torch.Generator(device=train_images.device).manual_seed(seed)
        network = _call_attack(attack.fit, attack, train_images.clone(), target, Budget(budget.norm, budget.eps), gen)
        attack.network = network
        state = network_state(attack, network)
    curve = [float(v) for v in attack.loss_history]
    return SplitOutput(torch.zeros(0), curve, clock.wall_s, clock.device_s, clock.peak_memory_bytes, network=state,
                       peak_rss_bytes=clock.peak_rss_bytes)


def load_fitted_network(attack: Attack, state: dict[str, torch.Tensor]) -> SplitOutput:
    """An amortized attack's network rebuilt from stored weights instead of fit (verify's re-apply):
    the class builds it from its params, the weights must fit it name for name and shape for shape."""
    try:
        network = load_into(attack, state, "the stored network")
    except RecordError as exc:
        raise AttackError(f"amortized attack {attack.name!r}: {exc}") from None
    return SplitOutput(torch.zeros(0), [], 0.0, None, None, network=network_state(attack, network))


def apply_split(attack: Attack, target, images: torch.Tensor, budget: Budget, *, batch_size: int) -> SplitOutput:
    """Apply a fitted amortized attack, batch by batch, feed-forward: no autograd, and the target is
    not handed over; a pass through the target during apply (counted) is an error."""
    deltas = []
    with ModelCallCounter(target) as counter:
        if len(images):  # one untimed pass first: the per-image cost is the steady state, not the
            with torch.no_grad():  # first call's one-off kernel set-up (its output is discarded)
                _call_attack(attack.apply, attack, images[:1].clone(), Budget(budget.norm, budget.eps))
        with timed(images.device) as clock, torch.no_grad():
            for start in range(0, len(images), batch_size):
                batch = images[start:start + batch_size]
                raw = _call_attack(attack.apply, attack, batch.clone(), Budget(budget.norm, budget.eps))
                deltas.append(validate_delta(raw, batch, attack.name).float())
    used = {k: v for k, v in counter.counts.items() if v}
    if used:
        raise AttackError(f"amortized attack {attack.name!r}: apply() ran the target ({used}); "
                          "an amortized attack protects feed-forward, with its own network only")
    return SplitOutput(torch.cat(deltas), [], clock.wall_s, clock.device_s, clock.peak_memory_bytes,
                       peak_rss_bytes=clock.peak_rss_bytes)


def run_jobs(attack: Attack, target, budget: Budget, jobs: dict[str, dict], batch_size: int) -> dict[str, SplitOutput]:
    """The attack side of one cell group, wherever it runs (worker, or in-process for debugging):
    `jobs` maps a split name to {"images", "seed"} (and "masks" on an inpainting suite, for an
    attack that reads them); a universal attack fits on its one job; an amortized attack fits on the
    job "fit" (or loads the weights that job carries as "network"), then applies its network to every
    other job. Each output carries the model passes the attack made per image (model_calls.py)."""
    out: dict[str, SplitOutput] = {}
    if attack.kind is AttackKind.amortized:
        job = jobs["fit"]
        if job.get("network") is not None:  # verify: re-apply the stored network, no fit
            out["fit"] = load_fitted_network(attack, job["network"])
        else:
            images = job["images"].to(target.device)
            with ModelCallCounter(target) as counter:
                out["fit"] = fit_network(attack, target, images, budget, seed=job["seed"])
            out["fit"].model_calls = counter.per_image(len(images))
        for name, job in jobs.items():
            if name != "fit":
                out[name] = apply_split(attack, target, job["images"].to(target.device), budget,
                                        batch_size=batch_size)
        return out
    for name, job in jobs.items():
        images = job["images"].to(target.device)
        masks = job.get("masks")
        masks = None if masks is None else masks.to(target.device)
        with ModelCallCounter(target) as counter:
            if attack.kind is AttackKind.universal:
                res = fit_split(attack, target, images, budget, seed=job["seed"], masks=masks)
            else:
                res = perturb_split(attack, target, images, budget, batch_size=batch_size, seed=job["seed"],
                                    masks=masks)
        res.model_calls = counter.per_image(len(images))
        out[name] = res
    return out


# --- the harness side --------------------------------------------------------------------------
@dataclass
class Protection:
    """The protected images of one split, what the attack returned, and what it cost."""

    adv: torch.Tensor
    wall_s: float
    device_s: Optional[float]
    peak_memory_bytes: Optional[int]
    max_norm_returned: float
    over_budget_images: int
    max_norm_applied: float = 0.0
    loss_curve: list[float] = field(default_factory=list)
    fit_wall_s: Optional[float] = None
    oom_events: list[dict] = field(default_factory=list)  # batch halvings after CUDA OOM
    model_calls: dict[str, float] = field(default_factory=dict)
    zero_delta: bool = False
    #: an amortized attack's stored network: {"file", "sha256", "values", "apply_batch_size"}
    network: Optional[dict] = None
    #: its weights on the way to the run folder (not part of the record)
    network_state: Optional[dict] = None
    peak_rss_bytes: Optional[int] = None  # off CUDA: the attack process's peak resident set


def enforce(raw: torch.Tensor, images: torch.Tensor, budget: Budget, attack_name: str,
            universal: bool = False) -> tuple[torch.Tensor, float, int, float, bool]:
    """Check and apply a raw delta: (adv, max norm returned, images over budget, max norm applied,
    nothing applied). A universal delta (1, 3, H, W) is quantized once and broadcast here, by the harness."""
    if universal:
        raw = validate_delta(raw, images[:1], attack_name, universal=True)
        norms = budget.norms(raw)
        # u goes on whole 8-bit levels once, so every stored photo carries the same u (quantize_delta)
        delta = quantize_delta(budget.project(raw), budget).expand_as(images)
    else:
        delta = validate_delta(raw, images, attack_name)
        norms = budget.norms(delta)
    adv = apply_budget(images, delta, budget)
    applied = budget.norms(adv - images)
    zero = not bool((adv != images).any())  # nothing reached the stored photos: flagged, never ok
    over = int((norms > budget.eps + 1e-6).sum()) * (len(images) if universal else 1)
    return adv, float(norms.max()), over, float(applied.max()), zero


def protect(attack: Attack, target, images: torch.Tensor, budget: Budget, *, batch_size: int,
            seed: int) -> Protection:
    """Both sides in one call, in *this* process (no isolation): for notebooks, tests and quick
    checks of one's own attack. The harness never uses it for records."""
    out = perturb_split(attack, target, images, budget, batch_size=batch_size, seed=seed)
    adv, returned, over, applied, zero = enforce(out.delta.to(images.device), images, budget, attack.name)
    return Protection(adv=adv, wall_s=out.wall_s, device_s=out.device_s, peak_memory_bytes=out.peak_memory_bytes,
                      max_norm_returned=returned, over_budget_images=over, max_norm_applied=applied,
                      loss_curve=out.loss_curve, oom_events=out.oom_events, zero_delta=zero)
