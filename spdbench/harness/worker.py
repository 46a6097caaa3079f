"""The attack worker: the process where untrusted attack code runs (`python -m spdbench.harness.worker R W`).

It holds only what it is handed: its own copy of the target model, and for each cell group the
images the attack may see (one split at a time for a per-image attack; the training split only
for a universal attack). It replies with plain data (wire.py). Whatever the attack does here —
mutate its inputs or its budget, tamper with its model copy, walk the heap, return a tensor
subclass, `sys.exit`, raise KeyboardInterrupt — stays here: the harness's images, budget and
editing model live in another process. Requests come pickled (cloudpickle) *from* the harness,
the trusted side; nothing is unpickled in the other direction.

Under isolation "sandbox" this module is entered from sandbox.py (`main(..., sandbox_report=...)`)
after the OS has confined the process: it may then read only code and its model files, write only
its private folder, open no socket, and everything it starts dies with it.
"""
from __future__ import annotations

import os
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
    from spdbench.targets import load_target

    if request.get("target_object") is not None:
        target = request["target_object"]
    else:
        target = load_target(request["target_spec"], device=request["device"], dtype=request["dtype"])
    return target


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


def _run(request: dict[str, Any], target) -> bytes:
    from spdbench.harness.protect import run_jobs

    _warm_up(target, request["splits"])
    outputs = run_jobs(request["attack"], target, request["budget"], request["splits"], request["batch_size"])
    reports = {name: dict(loss_curve=o.loss_curve, wall_s=o.wall_s, device_s=o.device_s,
                          peak_memory_bytes=o.peak_memory_bytes, oom_events=o.oom_events, model_calls=o.model_calls)
               for name, o in outputs.items()}
    tensors = {}
    for name, o in outputs.items():
        if o.network is not None:  # an amortized fit: its network's weights, not a delta
            tensors.update({wire.NETWORK_PREFIX + k: v for k, v in o.network.items()})
        else:
            tensors[name] = o.delta
    return wire.encode({"kind": "result", "splits": reports}, tensors)


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
    import cloudpickle
    import torch

    torch.set_num_threads(int(os.environ.get("SPDBENCH_WORKER_THREADS", torch.get_num_threads())))
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
                reply = wire.encode({"kind": "ready", "fingerprint": target.fingerprint,
                                     "load_s": time.perf_counter() - t0, "sandbox": sandbox_report})
                if sandbox_report is not None:  # from now on, before any attack is unpickled
                    limit_cpu(request.get("cpu_s"))
            else:
                reply = _run(request, target)
        except BaseException as exc:  # noqa: BLE001 - untrusted code: report, never die silently
            text = f"{type(exc).__name__}: {exc}"
            if sandbox_report is not None and _out_of_memory(exc):
                text += " (the worker's memory limit, RLIMIT_DATA, was reached)"
            reply = wire.encode({"kind": "error", "error": text[:wire.MAX_ERROR_CHARS]})
        if reap_children and request.get("kind") == "run":
            _reap_children()
        outbox.send_bytes(reply)


def limit_cpu(seconds: Optional[float]) -> None:
    """RLIMIT_CPU: `seconds` of CPU time (all threads) from now on -- called by the worker after
    loading its model and before it unpickles any attack, so the start is not counted. At the soft
    limit the worker exits with wire.CPU_LIMIT_EXIT; one second later the kernel kills it anyway (the
    attack can neither raise the hard limit nor catch SIGKILL)."""
    import math
    import resource
    import signal

    if not seconds:
        return
    use = resource.getrusage(resource.RUSAGE_SELF)
    soft = int(math.ceil(use.ru_utime + use.ru_stime + seconds))
    signal.signal(signal.SIGXCPU, lambda *_: os._exit(wire.CPU_LIMIT_EXIT))
    resource.setrlimit(resource.RLIMIT_CPU, (soft, soft + 1))


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]))
