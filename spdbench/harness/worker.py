"""The attack worker: the process where untrusted attack code runs (`python -m spdbench.harness.worker R W`).

It holds only what it is handed: its own copy of the target model, and for each cell group the
images the attack may see (one split at a time for a per-image attack; the training split only
for a universal attack). It replies with plain data (wire.py). Whatever the attack does here —
mutate its inputs or its budget, tamper with its model copy, walk the heap, return a tensor
subclass, `sys.exit`, raise KeyboardInterrupt — stays here: the harness's images, budget and
editing model live in another process. Requests come pickled (cloudpickle) *from* the harness,
the trusted side; nothing is unpickled in the other direction.

The attack is constructed HERE, per cell group, from plain data (name, entry point, preset,
params): a plugin's module is imported in this process only, never in the harness; a "describe"
request constructs one and answers with its planning facts (wire.AttackDescription). The model
passes are counted by hooks this runtime installs when the model loads (`RuntimeCounter`), before
any attack code is unpickled or constructed.

Under isolation "sandbox" this module is entered from sandbox.py (`main(..., sandbox_report=...)`)
after the OS has confined the process: it may then read only code and its model files, write only
its private folder, open no socket, and everything it starts dies with it.
"""
from __future__ import annotations

import os
import math
import resource
import signal
import sys
import threading
import time
from multiprocessing.connection import Connection
from typing import Any, Optional

from spdbench.harness import wire


def _watch_parent(parent: int) -> None:
    """End this process when the harness dies, even in the middle of a long attack."""
    while True:
        time.sleep(1.0)
        if os.getppid() != parent:
            os._exit(3)


def _load(request: dict[str, Any]):
    """The worker's own model copy, or None for a worker that only describes attacks."""
    from spdbench.targets import load_target  # deferred: torch loads only once the worker is confined

    if request.get("target_object") is not None:
        return request["target_object"]
    if request.get("target_spec") is None:
        return None
    return load_target(request["target_spec"], device=request["device"], dtype=request["dtype"])


class RuntimeCounter:
    """The worker runtime's own count of model passes: hooks on the target's VAE encoder, UNet and
    decoder (model_calls.py), installed when the model loads -- before any attack code is unpickled
    or constructed -- and kept for the worker's life. Each job's count is the difference of two
    snapshots around it, reported beside the count the job's own hooks made (`run_jobs`), and the
    harness records the larger where they disagree, with a flag.

    What this does NOT guarantee (said plainly): the attack runs in this same process, so it can
    reach these hooks too -- remove or replace them (caught: `tampered` checks that each hook is
    still the one installed, on the very module the target holds), call a network's `forward`
    directly or run a copy of it without hooks (not caught), or rewrite the counts through the
    garbage collector (not caught). The counts are a cross-checked lower bound of the work done,
    not proof; the harness-measured wall time of each cell group is the authoritative cost."""

    def __init__(self, target) -> None:
        from spdbench.harness import model_calls  # deferred: torch, after confinement

        self.target = target
        counts = {k: 0 for k in model_calls.KEYS}  # held by the hooks' closures (no ModelCallCounter to find)

        def hook_for(net: str):
            def backward(n: int) -> None:
                counts[f"{net}_bwd"] += n

            def hook(module, args, kwargs, output):
                n = model_calls._batch_size(args, kwargs)
                counts[f"{net}_fwd"] += n
                out = model_calls._main_output(output)
                if out is not None and out.requires_grad:
                    out.register_hook(lambda grad: backward(n))

            return hook

        self._modules = self._networks()
        self._hooks = {}
        for net, module in self._modules.items():
            fn = hook_for(net)
            handle = module.register_forward_hook(fn, with_kwargs=True)
            self._hooks[net] = (handle.id, fn)
        self.snapshot = lambda: dict(counts)

    def _networks(self) -> dict[str, Any]:
        return {"vae_encoder": self.target.vae.encoder, "unet": self.target.unet,
                "vae_decoder": self.target.vae.decoder}

    def tampered(self) -> Optional[str]:
        """Why the count cannot be trusted (a hook removed or replaced, a network swapped), or None."""
        try:
            now = self._networks()
        except Exception as exc:  # noqa: BLE001 - the attack broke the target's attributes
            return f"the target's networks are unreachable ({type(exc).__name__})"
        for net, (hook_id, fn) in self._hooks.items():
            if now[net] is not self._modules[net]:
                return f"the target's {net} was replaced"
            if now[net]._forward_hooks.get(hook_id) is not fn:
                return f"the runtime's hook on the {net} was removed or replaced"
        return None

    @staticmethod
    def per_image(before: dict[str, int], after: dict[str, int], images: int) -> dict[str, float]:
        return {k: (after.get(k, 0) - before.get(k, 0)) / max(1, images) for k in after}


_counter: Optional[RuntimeCounter] = None


_warmed_up = False


def _warm_up(target, jobs: dict) -> None:
    """One untimed pass through every network before this process's first timed attack: a fresh
    process's first calls pay one-time set-up (kernel selection, allocator growth) that is not the
    attack's cost, and made the same kind of cell read 14.56 s/image in one run and 0.25 in the next."""
    global _warmed_up
    if _warmed_up:
        return
    _warmed_up = True
    first = next((j["images"] for j in jobs.values() if j.get("images") is not None and len(j["images"])), None)
    if first is not None:
        target.warmup(first[:1])


def _attack(payload: dict[str, Any]):
    """The attack for this cell group, constructed HERE from plain data (name, entry point, preset,
    params) -- a plugin is imported in this process only -- or the caller's own object."""
    from spdbench.attacks.base import AttackSpec  # deferred: torch loads only once the worker is confined

    return AttackSpec.build_payload(payload)


def _describe(request: dict[str, Any]) -> bytes:
    """A plugin attack constructed here and described as plain data (wire.AttackDescription)."""
    from spdbench.attacks.base import describe  # deferred: torch loads only once the worker is confined

    return wire.encode({"kind": "described", "attack": describe(_attack(request["attack"]))})


def _counted(attack, target, request: dict[str, Any]) -> tuple[dict, dict[str, dict]]:
    """run_jobs, job by job (per-image, universal) or as one (amortized: fit, then apply, which must
    make no model call), with the runtime counter's snapshots around each: (outputs, extra report
    fields per split)."""
    from spdbench.harness.protect import run_jobs  # deferred: torch loads only once the worker is confined

    jobs, budget, batch = request["splits"], request["budget"], request["batch_size"]
    amortized = getattr(attack, "kind", None) == "amortized"
    groups = [jobs] if amortized else [{name: job} for name, job in jobs.items()]
    outputs, extra = {}, {}
    for group in groups:
        before = _counter.snapshot() if _counter else {}
        outputs.update(run_jobs(attack, target, budget, group, batch))
        after = _counter.snapshot() if _counter else {}
        name = "fit" if amortized else next(iter(group))
        fit = group.get("fit", {}) if amortized else group[name]
        n = len(fit["images"]) if fit.get("images") is not None else 1
        tampered = _counter.tampered() if _counter else None
        extra[name] = dict(runtime_model_calls=RuntimeCounter.per_image(before, after, n) if _counter else {},
                           counter_tampered=tampered)
    return outputs, extra


_held: Any = None  # an amortized attack between its fit request and its apply request


def _applied(attack, target, request: dict[str, Any]) -> tuple[dict, dict[str, dict]]:
    """The apply phase of an amortized group, with the attack fitted by the previous request (the
    same object: what it learned stays as it was), split by split under the runtime counter."""
    from spdbench.harness.protect import apply_split  # deferred: torch loads only once the worker is confined

    outputs, extra = {}, {}
    for name, job in request["splits"].items():
        before = _counter.snapshot() if _counter else {}
        outputs[name] = apply_split(attack, target, job["images"].to(target.device), request["budget"],
                                    batch_size=request["batch_size"])
        after = _counter.snapshot() if _counter else {}
        extra[name] = dict(runtime_model_calls=RuntimeCounter.per_image(before, after, len(job["images"]))
                           if _counter else {}, counter_tampered=_counter.tampered() if _counter else None)
    return outputs, extra


def _run(request: dict[str, Any], target) -> bytes:
    global _held
    _warm_up(target, request["splits"])
    phase = request.get("phase", "all")
    if phase == "apply":
        if _held is None:
            raise RuntimeError("an apply request came before its fit")
        attack, _held = _held, None
        outputs, extra = _applied(attack, target, request)
    else:
        _held = None
        attack = _attack(request["attack"])
        outputs, extra = _counted(attack, target, request)
        _held = attack if phase == "fit" else None
    reports = {name: dict(loss_curve=o.loss_curve, wall_s=o.wall_s, device_s=o.device_s,
                          peak_memory_bytes=o.peak_memory_bytes, peak_rss_bytes=o.peak_rss_bytes, oom_events=o.oom_events, model_calls=o.model_calls,
                          **extra.get(name, {}))
               for name, o in outputs.items()}
    tensors = {}
    for name, o in outputs.items():
        if o.network is not None:  # an amortized fit: its network's weights, not a delta
            tensors.update({wire.NETWORK_PREFIX + k: v for k, v in o.network.items()})
        else:
            tensors[name] = o.delta
    return wire.encode({"kind": "result", "splits": reports}, tensors)


def _start_counting(target) -> None:
    global _counter
    _counter = RuntimeCounter(target) if target is not None and hasattr(target, "unet") else None


def _out_of_memory(exc: BaseException) -> bool:
    """Whether a MemoryError is behind `exc` (run_jobs wraps what the attack raised)."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, MemoryError):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def _reap_children() -> None:
    """As PID 1 of the worker's own PID namespace (sandbox.py): end every other process in it, so
    nothing an attack started (also after setsid and a double fork) outlives its cell group."""
    try:
        os.kill(-1, signal.SIGKILL)
    except OSError:
        pass  # none left


def main(read_fd: int, write_fd: int, sandbox_report: Optional[dict] = None, reap_children: bool = False) -> None:
    """The request loop. `sandbox_report` is what sandbox.py measured on this process before any
    attack code ran; it goes to the harness with the first answer."""
    # Ctrl-C in the terminal is the harness's to handle (it stops the worker); an attack that
    # raises KeyboardInterrupt itself is caught below like any other exception.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_watch_parent, args=(os.getppid(),), daemon=True).start()
    inbox, outbox = Connection(read_fd, writable=False), Connection(write_fd, readable=False)
    import cloudpickle  # deferred: loaded after confinement, like everything that can unpickle
    import torch  # deferred: torch starts threads; the sandbox's unshare needs a single-threaded boot

    torch.set_num_threads(int(os.environ.get("SPDBENCH_WORKER_THREADS", torch.get_num_threads())))
    from spdbench.attacks.progress import set_reporter  # deferred: imports torch, after confinement

    set_reporter(_ProgressSender(outbox))
    target = None
    while True:
        try:
            request = cloudpickle.loads(inbox.recv_bytes())
        except EOFError:
            return
        try:
            if request["kind"] == "load":
                t0 = time.perf_counter()
                target = _load(request)
                _start_counting(target)  # before any attack code is unpickled or constructed
                reply = wire.encode({"kind": "ready", "fingerprint": getattr(target, "fingerprint", None),
                                     "load_s": time.perf_counter() - t0, "sandbox": sandbox_report})
                if sandbox_report is not None:  # from now on, before any attack is unpickled
                    limit_cpu(request.get("cpu_s"))
            elif request["kind"] == "describe":
                reply = _describe(request)
            else:
                reply = _run(request, target)
        except BaseException as exc:  # noqa: BLE001 - untrusted code: report, never die silently
            text = f"{type(exc).__name__}: {exc}"
            if sandbox_report is not None and _out_of_memory(exc):
                text += " (the worker's memory limit, RLIMIT_DATA, was reached)"
            reply = wire.encode({"kind": "error", "error": text[:wire.MAX_ERROR_CHARS]})
        if reap_children and request.get("kind") in ("run", "describe"):
            _reap_children()
        outbox.send_bytes(reply)


class _ProgressSender:
    """Forwards an optimization's steps to the harness as "progress" frames, at most one per
    PROGRESS_EVERY_S (and the last step of each optimization), so a fast attack is not slowed down
    by its own reports."""

    def __init__(self, outbox: Connection) -> None:
        self.outbox, self.last = outbox, 0.0

    def __call__(self, step: int, steps: int) -> None:
        now = time.perf_counter()
        if step < steps and now - self.last < PROGRESS_EVERY_S:
            return
        self.last = now
        self.outbox.send_bytes(wire.encode({"kind": "progress", "step": step, "steps": steps}))


#: the least seconds between two progress frames of the worker
PROGRESS_EVERY_S = 0.5


def limit_cpu(seconds: Optional[float]) -> None:
    """RLIMIT_CPU: `seconds` of CPU time (all threads) from now on -- called by the worker after
    loading its model and before it unpickles any attack, so the start is not counted. At the soft
    limit the worker exits with wire.CPU_LIMIT_EXIT; one second later the kernel kills it anyway (the
    attack can neither raise the hard limit nor catch SIGKILL)."""

    if not seconds:
        return
    use = resource.getrusage(resource.RUSAGE_SELF)
    soft = int(math.ceil(use.ru_utime + use.ru_stime + seconds))
    signal.signal(signal.SIGXCPU, lambda *_: os._exit(wire.CPU_LIMIT_EXIT))
    resource.setrlimit(resource.RLIMIT_CPU, (soft, soft + 1))


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]))
