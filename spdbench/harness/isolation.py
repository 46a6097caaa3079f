"""The harness's handle on an attack worker process: start it, hand it a cell group, read the answer.

The worker is a fresh interpreter (`python -m spdbench.harness.worker`, not a fork: it inherits no
memory of the harness, so the test images, the budget object and the editing model are simply
not there). It runs in its own session, so a terminal Ctrl-C reaches the harness, which stops
it. Requests go to it pickled (trusted -> untrusted only); answers come back as `wire` frames
(JSON + safetensors), read with a size bound and a time limit.

No attack code runs here for an attack given by name: the worker constructs it from plain data
(`AttackSpec.payload`: name, entry point, preset, params), and a plugin's planning facts come
from a worker too (`describe_plugin`, answered as a checked `wire.AttackDescription`). Only an
object the Python caller made in its own process travels pickled (cloudpickle, by value or by
reference), and its records carry the flag `attack-from-caller`.

Costs are the harness's: each request's wall time is measured here (an amortized group is two
requests, fit and apply, so each has its own), and the model-call counts are the larger of the
worker runtime's hook count and the job's own count, flagged `model-calls-tampered` where they
disagree or the runtime's hooks were touched (worker.RuntimeCounter says what that can miss). A crash, `sys.exit`, a kill or a timeout ends that worker and becomes an
`AttackError` for the cell group; the next group gets a fresh worker.

With `sandbox=True` (isolation "sandbox", the default of `run`) the worker is started through
sandbox.py, which confines it (namespaces, Landlock, seccomp, limits, a scrubbed environment) before
it imports torch; its report of what took effect, probed on itself, decides `isolation` /
`isolation_detail` here, and those go into every record of the group.
"""
from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import subprocess
import tempfile
import sys
import threading
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any, Callable, Optional

import cloudpickle
import torch

from spdbench.attacks.base import AttackLocation, AttackSpec, describe
from spdbench.errors import AttackError, InputError
from spdbench.harness import sandbox as sandbox_mod
from spdbench.harness import wire
from spdbench.harness import zygote as zygote_mod
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
    #: visible warnings for the group's records: "attack-from-caller", "model-calls-tampered"
    flags: list[str] = field(default_factory=list)


#: a worker's error text for bad input to the attack's constructor: shown as the user's error
_INPUT_ERRORS = ("InputError: ", "UnknownNameError: ", "BudgetError: ")


#: progress frames one request may send before its answer (a worker that only reports is stopped):
#: at the worker's rate of two per second, more than five days of reports
MAX_PROGRESS_FRAMES = 1_000_000


_zygote: Optional[zygote_mod.Zygote] = None
_zygote_lock = threading.Lock()
_zygote_off: Optional[str] = None  # why workers are exec'd in this process (a failed zygote)


def shared_zygote() -> Optional[zygote_mod.Zygote]:
    """This process's worker zygote, started on first use; None where fork is not used (not Linux,
    SPDBENCH_ZYGOTE=0, or a zygote that failed: then every worker is exec'd)."""
    global _zygote
    if not _zygote_enabled():
        return None
    with _zygote_lock:
        if _zygote is None or not _zygote.alive:
            home = tempfile.mkdtemp(prefix="spdbench-zygote-")  # its HOME and TMPDIR (nothing of the user's)
            atexit.register(shutil.rmtree, home, True)
            try:
                _zygote = zygote_mod.Zygote(sandbox_mod.scrubbed_env(home, 1))
            except OSError as exc:
                _disable_zygote(f"did not start ({exc})")
                return None
        return _zygote


def warm_up() -> None:
    """Start this process's zygote in the background, so its imports overlap the caller's own
    loading (photos, models, clean edits) instead of delaying the first worker."""
    if _zygote is None and _zygote_enabled():
        threading.Thread(target=shared_zygote, daemon=True, name="spdbench-zygote-start").start()


def _zygote_enabled() -> bool:
    return sys.platform == "linux" and os.environ.get("SPDBENCH_ZYGOTE", "1") != "0" and not _zygote_off


def _disable_zygote(reason: str) -> None:
    """Exec every later worker of this process, and say why in one line."""
    global _zygote_off
    _zygote_off = reason
    print(f"spdbench: the worker zygote {reason}; workers start from a new interpreter", file=sys.stderr)


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
        #: called with (step, steps) for every "progress" frame before an answer (the harness's estimate)
        self.on_progress: Optional[Callable[[int, int], None]] = None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> float:
        t0 = time.perf_counter()
        to_child_r, to_child_w = os.pipe()
        from_child_r, from_child_w = os.pipe()
        cmd, env, plan_path = self._command(str(to_child_r), str(from_child_w))
        try:
            self.proc = self._forked(to_child_r, from_child_w, env, plan_path)
            if self.proc is None:
                self.proc = subprocess.Popen(cmd, pass_fds=(to_child_r, from_child_w), env=env,
                                             stdin=subprocess.DEVNULL, start_new_session=True, close_fds=True)
        finally:
            os.close(to_child_r)
            os.close(from_child_w)
        self._out = Connection(to_child_w, readable=False)
        self._in = Connection(from_child_r, writable=False)
        request = dict(kind="load", device=self._device(), dtype=str(getattr(self.target, "dtype", "float32"))
                       .replace("torch.", ""), cpu_s=self.limits.cpu_s if self.sandbox else None,
                       **(target_spec(self.target) if self.target is not None
                          else dict(target_spec=None, target_object=None)))
        reply, _ = self._ask(request, {}, START_TIMEOUT_S, "starting")
        if reply.kind != "ready":
            raise AttackError(f"the attack worker could not load the target: {reply.error}")
        if self.target is not None and reply.fingerprint != self.target.fingerprint:
            raise AttackError(f"the attack worker's model copy has fingerprint {reply.fingerprint}, "
                              f"the harness's {self.target.fingerprint}")
        self.sandbox_report = reply.sandbox  # as sent; the record keeps only what check_report vouches for
        self.isolation, self.isolation_detail = sandbox_mod.check_report(reply.sandbox, self._plan)
        self.start_s = time.perf_counter() - t0
        return self.start_s

    @staticmethod
    def _forked(read_fd: int, write_fd: int, env: dict[str, str], plan_path: Optional[str]):
        """The worker forked by this process's zygote (zygote.py: the imports already done), or None
        where there is none (then it is exec'd; the same worker either way)."""
        zyg = shared_zygote()
        if zyg is None:
            return None
        try:
            return zyg.spawn(read_fd, write_fd, env=env, plan=plan_path)
        except OSError as exc:
            _disable_zygote(f"failed ({exc})")
            return None

    def _device(self) -> str:
        return str(self.target.device) if self.target is not None else "cpu"

    def _command(self, read_fd: str, write_fd: str) -> tuple[list[str], dict[str, str], Optional[str]]:
        """The worker's command line, environment and sandbox plan file: plain (`-m
        spdbench.harness.worker`, the harness's environment, no plan), or through sandbox.py with a
        plan, a private folder and a scrubbed environment."""
        if not self.sandbox:
            env = dict(os.environ)
            env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p and os.path.isdir(p))
            env["SPDBENCH_WORKER_THREADS"] = str(self.threads)
            return [sys.executable, "-m", "spdbench.harness.worker", read_fd, write_fd], env, None
        self._tmp = tempfile.mkdtemp(prefix="spdbench-worker-")
        self._cgroup = sandbox_mod.Cgroup.create(self.limits.nproc) if sys.platform == "linux" else None
        env = sandbox_mod.scrubbed_env(self._tmp, self.threads)
        denied = self.denied if self.denied is not None else sandbox_mod.denied_paths()
        self._plan = sandbox_mod.make_plan(self._tmp, getattr(self.target, "load_spec", None),
                                           self._device(), self.limits, denied,
                                           self._cgroup.procs_file if self._cgroup else None, env)
        plan_path = sandbox_mod.write_plan(self._plan)
        return [sys.executable, sandbox_mod.__file__, read_fd, write_fd, plan_path], env, plan_path

    def _ask(self, request: dict, expected: dict, timeout: Optional[float], what: str, network_max_values: int = 0):
        try:
            self._out.send_bytes(cloudpickle.dumps(request))
        except (BrokenPipeError, OSError):
            raise AttackError(f"the attack worker died while {what} ({self._exit_text()})") from None
        except Exception as exc:  # noqa: BLE001 - e.g. an attack object that cannot be pickled
            raise AttackError(f"cannot hand the attack to its worker process: {type(exc).__name__}: {exc}") from None
        deadline = None if timeout is None else time.perf_counter() + timeout
        for _ in range(MAX_PROGRESS_FRAMES):
            reply, tensors = wire.decode(self._frame(expected, deadline, timeout, what, network_max_values),
                                         expected, network_max_values)
            if reply.kind != "progress":
                return reply, tensors
            if self.on_progress is not None and reply.step is not None and reply.steps:
                self.on_progress(min(reply.step, reply.steps), reply.steps)
        self.close()
        raise AttackError(f"the attack worker sent more than {MAX_PROGRESS_FRAMES:,} progress messages while {what}; "
                          "its worker was stopped")

    def _frame(self, expected: dict, deadline: Optional[float], timeout: Optional[float], what: str,
               network_max_values: int) -> bytes:
        """The worker's next frame, within the request's time limit (progress frames do not extend it)."""
        if not self._in.poll(None if deadline is None else max(0.0, deadline - time.perf_counter())):
            self.close()
            raise AttackError(f"the attack ran past the suite's time limit of {timeout:g} s while {what}; "
                              "its worker was stopped")
        try:
            return self._in.recv_bytes(maxlength=self._max_bytes(expected) + 4 * network_max_values
                                       + (wire.MAX_HEADER_BYTES if network_max_values else 0))
        except (EOFError, OSError) as exc:
            ended = self._exit_text()  # before close(): a supervisor about to exit must not read as killed
            self.close()
            raise AttackError(f"the attack worker ended while {what} ({ended})") from exc

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

    def describe(self, payload: dict) -> wire.AttackDescription:
        """Construct the attack `payload` names in the worker and get its planning facts back as
        checked plain data; a constructor's refusal (unknown parameter, preset) is an InputError."""
        if not self.alive:
            self.start()
        reply, _ = self._ask(dict(kind="describe", attack=payload), {}, START_TIMEOUT_S,
                             f"describing attack {payload.get('name')!r}")
        if reply.kind == "error":
            text = reply.error or "the attack could not be constructed"
            if text.startswith(_INPUT_ERRORS):
                raise InputError(text.split(": ", 1)[1])
            raise AttackError(f"attack {payload.get('name')!r} could not be constructed in its worker: {text}")
        if reply.kind != "described" or reply.attack is None:
            raise AttackError(f"the attack worker answered {reply.kind!r} to a describe request")
        return reply.attack

    def run(self, *, attack, budget, universal: bool, batch_size: int, splits: dict[str, dict],
            timeout: Optional[float]) -> WorkerResult:
        """Hand one cell group to the worker. `splits` maps a name to {"images": cpu tensor, "seed"}.
        `attack` is an AttackSpec (or, from older callers, an Attack object: the caller's own)."""
        if not self.alive:
            self.start()
        payload = attack.payload() if isinstance(attack, AttackSpec) else {"object": attack}
        flags = ["attack-from-caller"] if "object" in payload else []
        amortized = bool(getattr(attack, "amortized", False))
        fit = splits.get("fit", {})
        if amortized and fit.get("images") is not None and len(splits) > 1:  # fit and apply timed apart
            first = self._ask_group(attack, payload, budget, False, batch_size, {"fit": fit}, timeout, "fit")
            left = None if timeout is None else max(1.0, timeout - first.wall_s)
            rest = {k: v for k, v in splits.items() if k != "fit"}
            second = self._ask_group(attack, payload, budget, False, batch_size, rest, left, "apply")
            for report in second.splits.values():
                _check_apply_made_no_calls(attack, report)
            out = {**second.splits, "fit": first.splits["fit"]}
            return WorkerResult(out, first.wall_s + second.wall_s, sorted(set(flags + first.flags + second.flags)))
        result = self._ask_group(attack, payload, budget, universal, batch_size, splits, timeout)
        result.flags = sorted(set(flags + result.flags))
        return result

    def _ask_group(self, attack, payload: dict, budget, universal: bool, batch_size: int, splits: dict[str, dict],
                   timeout: Optional[float], phase: str = "all") -> WorkerResult:
        """One request (an amortized group's "fit" keeps its attack in the worker for its "apply");
        each split's wall time is the harness's (the request's, shared by photo count)."""
        amortized = bool(getattr(attack, "amortized", False))
        expected = {name: ((1,) + tuple(job["images"].shape[1:]) if universal else tuple(job["images"].shape))
                    for name, job in splits.items() if not (amortized and name == "fit")}
        net_max = int(attack.max_network_params) if amortized and phase != "apply" else 0
        request = dict(kind="run", attack=payload, budget=budget, batch_size=batch_size, splits=splits, phase=phase)
        t0 = time.perf_counter()
        reply, tensors = self._ask(request, expected, timeout, f"running {getattr(attack, 'name', 'the attack')}",
                                   net_max)
        wall = time.perf_counter() - t0
        if reply.kind == "error":
            raise AttackError(reply.error or "the attack failed in its worker")
        if reply.kind != "result" or set(reply.splits) != set(splits):
            raise AttackError(f"the attack worker answered {reply.kind!r} for splits {sorted(reply.splits)}")
        flags: list[str] = []
        fields = {name: _checked_costs(report, flags) for name, report in reply.splits.items()}
        network = {k[len(wire.NETWORK_PREFIX):]: v for k, v in tensors.items() if k.startswith(wire.NETWORK_PREFIX)}
        out = {name: SplitOutput(delta=tensors[name], **fields[name]) for name in splits if name in expected}
        if amortized and phase != "apply":
            out["fit"] = SplitOutput(delta=torch.zeros(0), network=network, **fields["fit"])
        _harness_walls(out, splits, wall, flags)
        return WorkerResult(out, wall, sorted(set(flags)))

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


# --- costs the attack cannot set --------------------------------------------------------------
def _checked_costs(report: wire.SplitReport, flags: list[str]) -> dict:
    """A split's SplitOutput fields from the worker's report, with the model calls reconciled: where
    the job's own count and the runtime's count disagree (or the runtime's hooks were touched), each
    is a lower bound of the passes that ran, so the larger is recorded and the group is flagged."""
    fields = report.model_dump()
    claimed, counted = fields.pop("model_calls"), fields.pop("runtime_model_calls")
    tampered = fields.pop("counter_tampered")
    keys = set(claimed) | set(counted)
    differ = any(abs(claimed.get(k, 0.0) - counted.get(k, 0.0)) > 1e-6 * max(1.0, counted.get(k, 0.0))
                 for k in keys) if counted else False
    if differ or tampered:
        flags.append("model-calls-tampered")
        claimed = {k: max(claimed.get(k, 0.0), counted.get(k, 0.0)) for k in sorted(keys)}
    fields["model_calls"] = claimed
    return fields


def _check_apply_made_no_calls(attack, applied: SplitOutput) -> None:
    """An apply split's reconciled count must be zero: an amortized attack protects feed-forward;
    a pass the job's own check missed (but the runtime's hooks saw) is caught here."""
    used = {k: v for k, v in (applied.model_calls or {}).items() if v}
    if used:
        raise AttackError(f"amortized attack {getattr(attack, 'name', '?')!r}: apply() ran the target ({used}); "
                          "an amortized attack protects feed-forward, with its own network only")


def _harness_walls(out: dict[str, SplitOutput], splits: dict[str, dict], wall: float, flags: list[str]) -> None:
    """Each split's wall_s is its share (by photo count) of the harness-measured request time, not the
    worker's figure; a device time over the whole request's cannot be true: dropped, and flagged."""
    sizes = {n: len(j["images"]) for n, j in splits.items() if j.get("images") is not None and n in out}
    total = sum(sizes.values())
    for name, o in out.items():
        share = wall * sizes[name] / total if total and name in sizes else wall
        if o.device_s is not None and o.device_s > wall + 0.05:
            o.device_s = None
            flags.append("device-time-dropped")
        o.wall_s = share


# --- a plugin described without importing it here ----------------------------------------------
_described: dict[str, wire.AttackDescription] = {}


def plugin_description(where: AttackLocation, preset: Optional[str], params: dict, *, isolation: str = "sandbox",
                       limits: Optional[sandbox_mod.Limits] = None) -> dict[str, Any]:
    """What a plugin's worker described, checked (wire.AttackDescription) as plain data, with its
    docstring (`summary`, for `spdbench list`); `describe_plugin` turns it into a spec."""
    describe_plugin(where, preset, params, isolation=isolation, limits=limits)
    payload = {"name": where.name, "entry_point": where.entry_point, "preset": preset, "given": dict(params)}
    return _described[json.dumps([payload, isolation], sort_keys=True, default=repr)].model_dump()


def describe_plugin(where: AttackLocation, preset: Optional[str], params: dict, *, isolation: str = "sandbox",
                    limits: Optional[sandbox_mod.Limits] = None) -> AttackSpec:
    """A plugin attack's spec: a worker (confined under isolation "sandbox") imports and constructs
    it from (entry point, preset, params) and describes it; the harness checks that answer (wire)
    and keeps its own facts (name, entry point, distribution, the params it gave). Under isolation
    "none" (attack code in this process, on purpose, refused by verify) it is described here.
    Cached per process and isolation."""
    payload = {"name": where.name, "entry_point": where.entry_point, "preset": preset, "given": dict(params)}
    key = json.dumps([payload, isolation], sort_keys=True, default=repr)
    if key not in _described:
        if isolation == "none":
            _described[key] = wire.AttackDescription.model_validate(
                json.loads(json.dumps(describe(AttackSpec.build_payload(payload)), allow_nan=True)))
        else:
            with AttackWorker(None, threads=1, sandbox=isolation == "sandbox", limits=limits) as worker:
                _described[key] = worker.describe(payload)
    info = _described[key].model_dump()
    if info["name"] != where.name or info["preset"] != preset:
        raise AttackError(f"attack plugin {where.name!r}: its worker described {info['name']!r} preset "
                          f"{info['preset']!r}, not the attack asked for")
    missing = sorted(set(params) - set(info["params"]))
    if missing or any(k not in info["defaults"] for k in info["params"]):
        raise AttackError(f"attack plugin {where.name!r}: its described parameters do not match its defaults")
    return AttackSpec.from_description(info, given=params, entry_point=where.entry_point, source=where.source)
