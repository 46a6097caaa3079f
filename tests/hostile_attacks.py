"""Attacks written as a hostile author would, one per case the outside review measured on 4814849.

Module-level classes: the harness hands them to the worker process by reference (this module is
importable there), exactly as a plugin's attack would travel. Where an attack needs to report
what it saw, it writes to the file named by the SPDBENCH_TEST_SPY environment variable.
"""
from __future__ import annotations

import gc
import os
import sys
import time

import torch

import spdbench


def _spy(line: str) -> None:
    path = os.environ.get("SPDBENCH_TEST_SPY")
    if path:
        with open(path, "a") as f:
            f.write(line + "\n")


from spdbench.images import image_sha256 as image_sha  # noqa: E402 - the records' image hash


class InPlaceMutation(spdbench.Attack):
    """Moves the reference the harness enforces against: writes into its input batch."""

    def perturb(self, images, target, budget, generator=None):
        images.add_(128 / 255).clamp_(0, 1)
        return torch.zeros_like(images)


class BudgetMutation(spdbench.Attack):
    """Enlarges the budget object it was handed, then uses it."""

    def perturb(self, images, target, budget, generator=None):
        object.__setattr__(budget, "eps", 1.0)
        return budget.project(torch.full_like(images, 0.5))


class _NoOpTensor(torch.Tensor):
    """A tensor whose clamp/amax/abs lie, so projection and norm checks see nothing."""

    def clamp(self, *args, **kwargs):
        return self

    def amax(self, *args, **kwargs):
        return torch.zeros(self.shape[0])

    def abs(self):
        return torch.zeros_like(torch.Tensor(self))


class TensorSubclass(spdbench.Attack):
    def perturb(self, images, target, budget, generator=None):
        return torch.full_like(images, 0.5).as_subclass(_NoOpTensor)


class _Peeker(torch.Tensor):
    """A universal delta that, when broadcast over the images, looks at them and adapts per image."""

    def expand_as(self, other):
        for i in range(other.shape[0]):
            _spy("expand_as " + image_sha(other[i]))
        return (0.5 - torch.Tensor(other)).clamp(-1, 1)


class UniversalPeek(spdbench.UniversalAttack):
    def fit(self, train_images, target, budget, generator=None):
        return torch.zeros_like(train_images[:1]).as_subclass(_Peeker)


class HeapWalker(spdbench.UniversalAttack):
    """Looks for image tensors anywhere in its process: gc objects and every stack frame."""

    def fit(self, train_images, target, budget, generator=None):
        seen = set()

        def note(obj):
            if isinstance(obj, torch.Tensor) and obj.dim() == 4 and obj.shape[1] == 3 and id(obj) not in seen:
                seen.add(id(obj))
                for i in range(obj.shape[0]):
                    _spy("heap " + image_sha(obj[i]))

        for obj in gc.get_objects():
            note(obj)
        for frame in sys._current_frames().values():
            while frame is not None:
                for value in list(frame.f_locals.values()):
                    note(value)
                frame = frame.f_back
        return torch.zeros_like(train_images[:1])


class WeightTamper(spdbench.Attack):
    """Zeroes the decoder it was handed: in one process this would ruin every edit."""

    def perturb(self, images, target, budget, generator=None):
        with torch.no_grad():
            for p in target.vae.decoder.parameters():
                p.zero_()
        return torch.zeros_like(images)


class Exits(spdbench.Attack):
    def perturb(self, images, target, budget, generator=None):
        sys.exit(0)


class HardExit(spdbench.Attack):
    def perturb(self, images, target, budget, generator=None):
        os._exit(0)


class Interrupts(spdbench.Attack):
    def perturb(self, images, target, budget, generator=None):
        raise KeyboardInterrupt


class Sleeps(spdbench.Attack):
    def perturb(self, images, target, budget, generator=None):
        time.sleep(120)
        return torch.zeros_like(images)


class ReportsForever(spdbench.Attack):
    """Reports optimization steps without end (attacks/progress.py) and never answers: its progress
    frames must not extend the suite's time limit."""

    def perturb(self, images, target, budget, generator=None):
        from spdbench.attacks.progress import report_step

        step = 0
        while True:
            step += 1
            report_step(step % 10 + 1, 11)
            time.sleep(0.01)


class NaNLoss(spdbench.Attack):
    """Reports a loss curve that went non-finite, and returns a delta anyway."""

    def perturb(self, images, target, budget, generator=None):
        self.loss_history = [1.0, float("nan"), float("nan")]
        return budget.random(images, generator)


class ClaimsSteps(spdbench.Attack):
    """An optimizing attack whose steps the suite must set, instance or name alike."""

    defaults = {"steps": 100}

    def perturb(self, images, target, budget, generator=None):
        _spy(f"steps {self.steps}")
        return torch.zeros_like(images)


# --- issue 40: what attack code may do to the machine (contained by the sandbox, sandbox.py) -----

class Probes(spdbench.Attack):
    """Tries what a hostile author would from the worker and reports each outcome in its error
    (the one channel out that needs no file): "refused" or what it got."""

    defaults = {"read": [], "write": [], "harness_pid": 0}

    def perturb(self, images, target, budget, generator=None):
        import json
        import socket

        out = {}

        def attempt(name, fn):
            try:
                got = fn()
                out[name] = "succeeded" if got is None else f"succeeded: {got}"
            except OSError as exc:
                out[name] = f"refused ({type(exc).__name__})"

        for i, path in enumerate(self.read):
            attempt(f"read{i}", lambda p=path: len(os.listdir(p)) if os.path.isdir(p) else len(open(p, "rb").read(16)))
        for i, path in enumerate(self.write):
            attempt(f"write{i}", lambda p=path: open(p, "ab").close())
        attempt("socket", lambda: socket.create_connection(("127.0.0.1", 9), timeout=1).close())
        attempt("udp", lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM).close())
        if self.harness_pid:
            attempt("signal-harness", lambda: os.kill(self.harness_pid, 0))
        out["secret"] = "leaked" if any("s3cret-40" in v for v in os.environ.values()) else "absent"
        out["env"] = sorted(os.environ)
        try:  # the environment block the process began with (a forked worker's: its zygote's)
            with open("/proc/self/environ", "rb") as f:
                out["initial-env"] = "leaked" if b"s3cret-40" in f.read() else "absent"
        except OSError as exc:
            out["initial-env"] = f"refused ({type(exc).__name__})"
        fds = {}
        for fd in os.listdir("/proc/self/fd"):
            try:
                fds[fd] = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                pass  # the listing's own descriptor
        out["fds"] = fds
        raise RuntimeError("probes " + json.dumps(out))


class SpawnsSleepers(spdbench.Attack):
    """Leaves processes behind: a plain child, and a double-forked one in its own session (the
    shape of a daemon, which a process-group kill alone does not reach)."""

    defaults = {"tag": "313.25"}

    def perturb(self, images, target, budget, generator=None):
        import subprocess

        subprocess.Popen(["sleep", self.tag])
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                os.execvp("sleep", ["sleep", self.tag])
            os._exit(0)
        time.sleep(0.5)
        return torch.zeros_like(images)


class MemoryBomb(spdbench.Attack):
    """Allocates 1 GiB at a time (address space only, never touched), up to 64 GiB."""

    def perturb(self, images, target, budget, generator=None):
        hoard = [bytearray(1 << 30) for _ in range(64)]
        del hoard
        return torch.zeros_like(images)


class EndlessLoop(spdbench.Attack):
    def perturb(self, images, target, budget, generator=None):
        while True:
            pass


# --- issue 40: costs the attack reports about itself ---------------------------------------------

class UnderReports(spdbench.Attack):
    """Runs `steps` encoder forward + backward passes, then makes the per-job counter report 1
    forward and 0 backward passes (the issue: 40 real steps recorded as 1 / 0)."""

    defaults = {"steps": 4}

    def perturb(self, images, target, budget, generator=None):
        from spdbench.harness import model_calls

        delta = torch.zeros_like(images, requires_grad=True)
        for _ in range(self.steps):
            target.encode(images + delta).mean.float().mean().backward()
        model_calls.ModelCallCounter.per_image = lambda self, n: {k: (1.0 if k == "vae_encoder_fwd" else 0.0)
                                                                  for k in model_calls.KEYS}
        return torch.zeros_like(images)


class RemovesHooks(spdbench.Attack):
    """Takes every forward hook off the encoder before running it: nothing is counted at all."""

    def perturb(self, images, target, budget, generator=None):
        target.vae.encoder._forward_hooks.clear()
        with torch.no_grad():
            target.encode(images)
        return torch.zeros_like(images)
