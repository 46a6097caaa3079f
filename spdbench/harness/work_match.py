"""Steps from a work budget: methods compared at equal model work, not equal iterations (issue 35).

Why: per step, PhotoGuard's encoder attack makes one VAE-encoder pass forward and backward, AdvDM
adds a UNet pass, PhotoGuard's diffusion attack four UNet passes and a decoder pass; at the same 40
steps they spend 40 to 226 encoder-equivalent passes per photo. A suite with a work budget
(`Suite.attack_work`) gives each attack the steps that budget buys.

How the cost of a step is known without trusting the attack: the attack runs twice, for 1 and for 2
steps, on training photos, as a cell group runs (in its worker, under the sandbox), and the
harness reads the passes counted by the hooks installed before any attack code (worker
.RuntimeCounter, cross-checked with the job's counter), weighted by each pass's FLOPs on the
suite's model (scoring/work.py). Their difference is one step's work, the rest is what the attack
spends once (a surrogate's fine-tuning, a network's set-up); steps = floor((budget - once) / step).
Counts, not seconds: the same steps on every machine, so an entry re-runs bit for bit.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

from spdbench.attacks.base import AttackKind, AttackSpec
from spdbench.data.photos import split_indices
from spdbench.errors import AttackError, InputError
from spdbench.harness.request import RunInputs, RunRequest
from spdbench.harness.protect import batch_count
from spdbench.harness.runner import AttackRunner
from spdbench.scoring.work import encoder_equivalents, known_weights, pass_flops, pass_weights

#: the step counts the probe runs (two points of the line work(steps) = once + steps * per_step)
PROBE_STEPS = (1, 2)


@dataclass(frozen=True)
class WorkMatch:
    """What the probe measured and the steps it gives (the run prints it; the records keep the steps,
    their source "suite-work" and the suite's `attack_work`)."""

    budget: float       # encoder-equivalent passes per photo the suite allows
    per_step: float     # measured: the work of one step per photo
    once: float         # measured: the work the attack spends once per photo, whatever its steps
    steps: int          # 0: the attack makes no model pass (matched by iterations instead)
    #: harness-measured wall seconds of one step and of the once-part, on the probe's photos: only
    #: the estimate a protecting stage shows before its first group has run (never recorded)
    step_s: float = 0.0
    once_s: float = 0.0
    photos: int = 0     # how many photos the probe ran on (_probe_job)

    def seconds(self, steps: int, photos: int, per_image: bool) -> Optional[float]:
        """About how long `steps` steps take on `photos` photos (a per-image attack's time grows
        with them; a universal or amortized fit runs on the training photos, as the probe did).
        Why here: an attack with a loop of its own that never reports its steps (attacks/progress.py)
        still gets an estimate, from the probe the harness ran anyway -- not from the attack."""
        if self.photos < 1 or steps < 1:
            return None
        scale = photos / self.photos if per_image else 1.0
        return (self.once_s + steps * self.step_s) * scale

    def describe(self) -> str:
        if self.steps == 0:
            return ("work matching: the attack made no model pass in 1 or 2 steps, so its steps cost no model "
                    "work; it runs at the suite's iteration budget")
        return (f"work matching: {self.budget:g} encoder-equivalent passes per photo; one step costs "
                f"{self.per_step:.3f}" + (f" (+{self.once:.3f} once)" if abs(self.once) > 1e-9 else "")
                + f" -> {self.steps} steps")


def derive_steps(budget: float, per_step: float, once: float, attack: str) -> int:
    """floor((budget - once) / per_step); an attack whose work does not grow with its steps, or whose
    fixed work alone exceeds the budget, cannot be matched: an error naming `--match steps`."""
    if not math.isfinite(per_step) or per_step <= 1e-9:
        raise AttackError(f"attack {attack!r}: its model work does not grow with `steps` (one step measured "
                          f"{per_step:g} encoder-equivalent passes), so no step count matches a work budget; "
                          "run it with --match steps (equal iterations) or give --param steps=N")
    steps = math.floor((budget - once) / per_step + 1e-9)
    if steps < 1:
        raise InputError(f"the suite's work budget of {budget:g} encoder-equivalent passes per photo buys no "
                         f"step of attack {attack!r} (one step costs {per_step:.3f}, plus {once:.3f} once); "
                         "expected a larger budget, or --match steps")
    return steps


def _weights(inputs: RunInputs, size: int) -> dict[str, float]:
    """Each pass's cost in encoder-equivalents on the attack's model: the committed table for the
    offline models, counted here (our own code, torch's FlopCounterMode) for any other."""
    target = inputs.target
    return known_weights(target.fingerprint, size) or pass_weights(pass_flops(target, size))


def probe_photos(split_sizes: list[int], batch_size: int) -> int:
    """How many photos a per-image attack's probe runs on: as many as the split whose photos share
    the fewest batches' worth of photos (most batches per photo; the smaller on a tie).
    Why: what an attack spends once per batch (a surrogate's fine-tuning, a target's encoding) is
    shared by the photos of that batch: probed on 7 training photos, mist-v2's surrogate fine-tuning
    was then spread over a test batch of 4 (31.7 UNet passes per training photo, 36.0 per test photo:
    42.8 of a budget of 40). Probed on the costliest split's shape, every split stays within it."""
    sizes = [n for n in split_sizes if n > 0]
    return max(sizes, key=lambda n: (batch_count(n, batch_size) / n, -n))


def _probe_job(request: RunRequest, inputs: RunInputs, attack: AttackSpec) -> dict[str, dict]:
    """Training photos (and their masks where the attack reads masks), as the attack's group sees
    them: a fit (universal, amortized) runs on the training split, as in the run; a per-image attack
    on as many photos as its costliest split per photo holds (probe_photos; the training photos
    repeated where that split is the larger), so its per-batch work is shared as in that split."""
    train, test = split_indices(len(inputs.images), request.suite.split_seed)
    if attack.kind is AttackKind.per_image:
        n = probe_photos([len(train), len(test)], request.suite.attack_batch_size)
        train = [train[i % len(train)] for i in range(n)]
    job = {"images": inputs.images[train], "seed": request.suite.attack_seed}
    if attack.uses_masks and inputs.masks is not None:
        job["masks"] = inputs.masks[train]
    return {"fit" if attack.kind is not AttackKind.per_image else "train": job}


def probe(request: RunRequest, inputs: RunInputs, runner: AttackRunner) -> WorkMatch:
    """Run the attack for each of PROBE_STEPS on the probe's photos (_probe_job) through `runner`; fit the line."""
    plan, attack = request.plan, request.plan.attack
    weights = _weights(inputs, int(inputs.images.shape[-1]))
    jobs = _probe_job(request, inputs, attack)
    work, wall = [], []
    for steps in PROBE_STEPS:
        outputs, wall_s = runner.run(attack.configure(steps=steps), plan.budgets[0], jobs,
                                     batch_size=request.suite.attack_batch_size)
        calls = next(iter(outputs.values())).model_calls
        measured = encoder_equivalents(calls, weights)
        work.append(0.0 if measured is None else measured)
        wall.append(wall_s)
    span = PROBE_STEPS[1] - PROBE_STEPS[0]
    per_step = (work[1] - work[0]) / span
    once = max(0.0, work[0] - PROBE_STEPS[0] * per_step)
    # seconds: a noisy difference of two short runs -- never below the longer run's mean per step
    step_s = max((wall[1] - wall[0]) / span, wall[1] / PROBE_STEPS[1] / 2)
    timing = dict(step_s=step_s, once_s=max(0.0, wall[0] - PROBE_STEPS[0] * step_s),
                  photos=len(next(iter(jobs.values()))["images"]))
    if max(work) <= 1e-12:  # no model pass at all: any steps cost the same nothing
        return WorkMatch(budget=float(plan.work), per_step=0.0, once=0.0, steps=0, **timing)
    return WorkMatch(budget=float(plan.work), per_step=per_step, once=once,
                     steps=derive_steps(float(plan.work), per_step, once, attack.name), **timing)


def matched(request: RunRequest, inputs: RunInputs, runner: AttackRunner) -> tuple[RunRequest, Optional[WorkMatch]]:
    """The request with its steps derived from the suite's work budget (when its plan asks for it),
    and what was measured; the request unchanged (and None) otherwise."""
    if request.plan.work is None:
        return request, None
    match = probe(request, inputs, runner)
    if match.steps == 0:  # no model work to match: the suite's iteration budget, said so in the record
        plan = _iteration_matched(request)
    else:
        plan = dataclasses.replace(request.plan, attack=request.plan.attack.configure(steps=match.steps), work=None)
    return dataclasses.replace(request, plan=plan), match


def _iteration_matched(request: RunRequest):
    """The plan of an attack that makes no model pass: the suite's steps (source "suite"), and its
    own finish (work matching's boundary finish is for attacks that spend model work)."""
    plan, suite = request.plan, request.suite
    attack = plan.attack.configure(steps=suite.attack_steps or plan.attack.defaults["steps"])
    sources = dict(plan.sources, steps="suite")
    if sources.get("finish") == "suite-work":
        attack = attack.configure(finish=attack.defaults["finish"])
        sources["finish"] = "default"
    return dataclasses.replace(plan, attack=attack, sources=sources, work=None)


__all__ = ["WorkMatch", "derive_steps", "probe", "probe_photos", "matched", "PROBE_STEPS"]
