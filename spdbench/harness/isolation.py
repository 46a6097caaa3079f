"""The harness's handle on an attack worker process: start it, hand it a cell group, read the answer.

The worker is a fresh interpreter (`python -m spdbench.harness.worker`, not a fork: it inherits no
memory of the harness, so the test images, the budget object and the editing model are simply
not there). It runs in its own session, so a terminal Ctrl-C reaches the harness, which stops
it. Requests go to it pickled (cloudpickle, so attacks defined in a script or a test module
travel by value or by reference); answers come back as `wire` frames, read with a size bound
and a time limit. A crash, `sys.exit`, a kill or a timeout ends that worker and becomes an
`AttackError` for the cell group; the next group gets a fresh worker.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any, Optional

import cloudpickle
import torch

from spdbench.harness import wire
from spdbench.errors import AttackError
from spdbench.harness.protect import SplitOutput

#: how long a worker may take to start and load its model copy
START_TIMEOUT_S = 600.0


def target_spec(target) -> dict[str, Any]:
    """How the worker gets its own copy of `target`: by its load name when it has one (cheap, and
    works for multi-GB models), else the components themselves, pickled to the worker."""
    spec = getattr(target, "load_spec", None)
    if spec is not None:
        return dict(target_spec=spec, target_object=None)
    return dict(target_spec=None, target_object=target)


@dataclass
class WorkerResult:
    splits: dict[str, SplitOutput]
    wall_s: float  # measured by the harness: handing over the group until the answer is read


class AttackWorker:
    """One worker process; `start` is timed apart from the optimization (`start_s`)."""

    def __init__(self, target, threads: Optional[int] = None) -> None:
        self.target = target
        self.threads = threads or torch.get_num_threads()
        self.proc: Optional[subprocess.Popen] = None
        self.start_s: Optional[float] = None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> float:
        t0 = time.perf_counter()
        to_child_r, to_child_w = os.pipe()
        from_child_r, from_child_w = os.pipe()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p and os.path.isdir(p))
        env["SPDBENCH_WORKER_THREADS"] = str(self.threads)
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "spdbench.harness.worker", str(to_child_r), str(from_child_w)],
                pass_fds=(to_child_r, from_child_w), env=env, stdin=subprocess.DEVNULL,
                start_new_session=True, close_fds=True)
        finally:
            os.close(to_child_r)
            os.close(from_child_w)
        self._out = Connection(to_child_w, readable=False)
        self._in = Connection(from_child_r, writable=False)
        device = self.target.device
        request = dict(kind="load", device=str(device), dtype=str(self.target.dtype).replace("torch.", ""),
                       **target_spec(self.target))
        reply, _ = self._ask(request, {}, START_TIMEOUT_S, "starting")
        if reply.kind != "ready":
            raise AttackError(f"the attack worker could not load the target: {reply.error}")
        if reply.fingerprint != self.target.fingerprint:
            raise AttackError(f"the attack worker's model copy has fingerprint {reply.fingerprint}, "
                              f"the harness's {self.target.fingerprint}")
        self.start_s = time.perf_counter() - t0
        return self.start_s

    def _ask(self, request: dict, expected: dict, timeout: Optional[float], what: str, network_max_values: int = 0):
        try:
            self._out.send_bytes(cloudpickle.dumps(request))
        except (BrokenPipeError, OSError):
            raise AttackError(f"the attack worker died while {what} ({self._exit_text()})") from None
        except Exception as exc:  # noqa: BLE001 - e.g. an attack object that cannot be pickled
            raise AttackError(f"cannot hand the attack to its worker process: {type(exc).__name__}: {exc}") from None
        if not self._in.poll(timeout):
            self.close()
            raise AttackError(f"the attack ran past the suite's time limit of {timeout:g} s while {what}; "
                              "its worker was stopped")
        try:
            frame = self._in.recv_bytes(maxlength=self._max_bytes(expected) + 4 * network_max_values
                                        + (wire.MAX_HEADER_BYTES if network_max_values else 0))
        except (EOFError, OSError) as exc:
            self.close()
            raise AttackError(f"the attack worker ended while {what} ({self._exit_text()})") from exc
        return wire.decode(frame, expected, network_max_values)

    @staticmethod
    def _max_bytes(expected: dict) -> int:
        tensors = sum(4 * int(torch.Size(s).numel()) for s in expected.values())
        return tensors + wire.MAX_HEADER_BYTES + (1 << 20)

    def _exit_text(self) -> str:
        if self.proc is None:
            return "not started"
        try:
            code = self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            return "still running"
        return f"exit code {code}" if code >= 0 else f"killed by signal {-code}"

    def run(self, *, attack, budget, universal: bool, batch_size: int, splits: dict[str, dict],
            timeout: Optional[float]) -> WorkerResult:
        """Hand one cell group to the worker. `splits` maps a name to {"images": cpu tensor, "seed"}."""
        if not self.alive:
            self.start()
        amortized = bool(getattr(attack, "amortized", False))
        expected = {name: ((1,) + tuple(job["images"].shape[1:]) if universal else tuple(job["images"].shape))
                    for name, job in splits.items() if not (amortized and name == "fit")}
        net_max = int(attack.max_network_params) if amortized else 0
        request = dict(kind="run", attack=attack, budget=budget, batch_size=batch_size, splits=splits)
        t0 = time.perf_counter()
        reply, tensors = self._ask(request, expected, timeout, f"running {getattr(attack, 'name', 'the attack')}",
                                   net_max)
        wall = time.perf_counter() - t0
        if reply.kind == "error":
            raise AttackError(reply.error or "the attack failed in its worker")
        if reply.kind != "result" or set(reply.splits) != set(splits):
            raise AttackError(f"the attack worker answered {reply.kind!r} for splits {sorted(reply.splits)}")
        network = {k[len(wire.NETWORK_PREFIX):]: v for k, v in tensors.items() if k.startswith(wire.NETWORK_PREFIX)}
        out = {name: SplitOutput(delta=tensors[name], **reply.splits[name].model_dump()) for name in splits
               if name in expected}
        if amortized:
            out["fit"] = SplitOutput(delta=torch.zeros(0), network=network, **reply.splits["fit"].model_dump())
        return WorkerResult(out, wall)

    def close(self) -> None:
        """Stop the worker (kill if it does not end at once) and close the pipes."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, 9)
            except (ProcessLookupError, PermissionError):
                self.proc.kill()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        for conn in (getattr(self, "_out", None), getattr(self, "_in", None)):
            if conn is not None:
                try:
                    conn.close()
                except OSError:
                    pass
        self._out = self._in = None

    def __enter__(self) -> "AttackWorker":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
