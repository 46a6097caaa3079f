"""The harness's handle on an attack worker process: start it, hand it a cell group, read the answer.

The worker is a fresh interpreter (`python -m spdbench.harness.worker`, not a fork: it inherits no
memory of the harness, so the test images, the budget object and the editing model are simply
not there). It runs in its own session, so a terminal Ctrl-C reaches the harness, which stops
it. Requests go to it pickled (cloudpickle, so attacks defined in a script or a test module
travel by value or by reference); answers come back as `wire` frames, read with a size bound
and a time limit. A crash, `sys.exit`, a kill or a timeout ends that worker and becomes an
`AttackError` for the cell group; the next group gets a fresh worker.

With `sandbox=True` (isolation "sandbox", the default of `run`) the worker is started through
sandbox.py, which confines it (namespaces, Landlock, seccomp, limits, a scrubbed environment) before
it imports torch; its report of what took effect, probed on itself, decides `isolation` /
`isolation_detail` here, and those go into every record of the group.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import sys
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any, Optional

import cloudpickle
import torch

from spdbench.harness import sandbox as sandbox_mod
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

    def __init__(self, target, threads: Optional[int] = None, sandbox: bool = False,
                 limits: Optional[sandbox_mod.Limits] = None, denied: Optional[list[str]] = None) -> None:
        self.target = target
        self.threads = threads or torch.get_num_threads()
        self.proc: Optional[subprocess.Popen] = None
        self.start_s: Optional[float] = None
        self.sandbox = sandbox
        self.limits = limits or sandbox_mod.DEFAULT_LIMITS
        self.denied = denied  # None: sandbox.denied_paths()
        #: what the record says: "sandbox" (confinement checked) or "process", and the details
        self.isolation: str = sandbox_mod.PROCESS
        self.isolation_detail: dict = {}
        self._tmp: Optional[str] = None
        self._cgroup: Optional[sandbox_mod.Cgroup] = None
        self._plan: Optional[sandbox_mod.Plan] = None
        self.sandbox_report: Optional[dict] = None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> float:
        t0 = time.perf_counter()
        to_child_r, to_child_w = os.pipe()
        from_child_r, from_child_w = os.pipe()
        cmd, env = self._command(str(to_child_r), str(from_child_w))
        try:
            self.proc = subprocess.Popen(cmd, pass_fds=(to_child_r, from_child_w), env=env,
                                         stdin=subprocess.DEVNULL, start_new_session=True, close_fds=True)
        finally:
            os.close(to_child_r)
            os.close(from_child_w)
        self._out = Connection(to_child_w, readable=False)
        self._in = Connection(from_child_r, writable=False)
        device = self.target.device
        request = dict(kind="load", device=str(device), dtype=str(self.target.dtype).replace("torch.", ""),
                       cpu_s=self.limits.cpu_s if self.sandbox else None, **target_spec(self.target))
        reply, _ = self._ask(request, {}, START_TIMEOUT_S, "starting")
        if reply.kind != "ready":
            raise AttackError(f"the attack worker could not load the target: {reply.error}")
        if reply.fingerprint != self.target.fingerprint:
            raise AttackError(f"the attack worker's model copy has fingerprint {reply.fingerprint}, "
                              f"the harness's {self.target.fingerprint}")
        self.sandbox_report = reply.sandbox  # as sent; the record keeps only what check_report vouches for
        self.isolation, self.isolation_detail = sandbox_mod.check_report(reply.sandbox, self._plan)
        self.start_s = time.perf_counter() - t0
        return self.start_s

    def _command(self, read_fd: str, write_fd: str) -> tuple[list[str], dict[str, str]]:
        """The worker's command line and environment: plain (`-m spdbench.harness.worker`, the
        harness's environment), or through sandbox.py with a plan, a private folder and a
        scrubbed environment."""
        if not self.sandbox:
            env = dict(os.environ)
            env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p and os.path.isdir(p))
            env["SPDBENCH_WORKER_THREADS"] = str(self.threads)
            return [sys.executable, "-m", "spdbench.harness.worker", read_fd, write_fd], env
        self._tmp = tempfile.mkdtemp(prefix="spdbench-worker-")
        self._cgroup = sandbox_mod.Cgroup.create(self.limits.nproc) if sys.platform == "linux" else None
        env = sandbox_mod.scrubbed_env(self._tmp, self.threads)
        denied = self.denied if self.denied is not None else sandbox_mod.denied_paths()
        self._plan = sandbox_mod.make_plan(self._tmp, getattr(self.target, "load_spec", None),
                                           str(self.target.device), self.limits, denied,
                                           self._cgroup.procs_file if self._cgroup else None, env)
        plan_path = sandbox_mod.write_plan(self._plan)
        return [sys.executable, sandbox_mod.__file__, read_fd, write_fd, plan_path], env

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
            ended = self._exit_text()  # before close(): a supervisor about to exit must not read as killed
            self.close()
            raise AttackError(f"the attack worker ended while {what} ({ended})") from exc
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
        sig = -code if code < 0 else code - 128 if self.sandbox and code > 128 else 0
        if sig == signal.SIGXCPU or (self.sandbox and code == wire.CPU_LIMIT_EXIT):
            return f"it used up its CPU time limit of {self.limits.cpu_s} s (RLIMIT_CPU)"
        if sig:
            return f"killed by signal {sig}"
        return f"exit code {code}"

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
        """Stop the worker and everything it started (its process group; with the sandbox also its
        PID namespace, which dies with it, and its cgroup), close the pipes, remove its folder."""
        if self.proc is not None:
            self._kill_group()
        if self._cgroup is not None:
            self._cgroup.remove()
            self._cgroup = None
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None
        for conn in (getattr(self, "_out", None), getattr(self, "_in", None)):
            if conn is not None:
                try:
                    conn.close()
                except OSError:
                    pass
        self._out = self._in = None

    def _kill_group(self) -> None:
        if self.proc.returncode is None:  # not reaped yet: the group id is still this worker's
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass

    def __enter__(self) -> "AttackWorker":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
