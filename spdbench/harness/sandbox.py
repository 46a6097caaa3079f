"""OS confinement of the attack worker (Linux): what attack code may read, write, reach and leave behind.

The worker process (worker.py) keeps the harness's memory out of the attack's reach; this module
takes away the user's authority too. The harness (`prepare`) writes a plan -- what to read, a
private temporary folder to write, the limits -- and starts this file *as a script* (stdlib only
at import time: a user namespace needs a single-threaded process, and torch starts threads). The
boot then, before anything imports torch or unpickles attack code:

1. enters new user, PID and network namespaces where the kernel permits (`unshare`): no network
   interface but a down loopback, no capability on the host, and the worker becomes PID 1 of its
   own PID namespace, so every process it starts (also after `setsid` and a double fork) is
   killed by the kernel when it ends and cannot see or signal the harness;
2. forks: the parent stays as a small supervisor the harness holds (its death kills the worker:
   PR_SET_PDEATHSIG, which seccomp then stops the worker from clearing);
3. in the child: a process-count cgroup (where writable), resource limits (RLIMIT_DATA,
   RLIMIT_CPU, RLIMIT_NPROC, no core files), no_new_privs, Landlock (the maintained `landlock`
   binding: read the Python installation, the importable code on sys.path and the model files;
   read-write only the private folder; the bundled test photos, the clean-edit cache, run folders
   and the home folder are not readable) and a seccomp filter (`pyseccomp` over libseccomp:
   no socket() of any family, no ptrace or cross-process memory access, no PR_SET_PDEATHSIG);
4. probes its own confinement (open a test photo, open an internet socket, write next to the
   private folder, signal the harness, list its environment) and hands the report to the worker,
   which sends it with its first answer; `check_report` on the harness side turns it into the
   record's `isolation` ("sandbox" with the mechanisms, or "process" with the reason).

Where a mechanism is missing (macOS, no Landlock, user namespaces forbidden) the worker still
runs, and the record says "process" with the reason: never a silent ok.
"""
from __future__ import annotations

import ctypes
import errno
import importlib.metadata
import importlib.util
import json
import os
import resource
import shutil
import signal
import socket
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

#: the plan file the harness writes into the worker's private folder
PLAN_NAME = "sandbox-plan.json"
#: what the record calls a confined worker and an unconfined one
SANDBOX, PROCESS = "sandbox", "process"
#: mechanisms that must all be in place (and pass their probe) for isolation "sandbox"
REQUIRED = ("landlock", "no-network", "no-new-privs", "scrubbed-env", "rlimits")
#: environment variables the worker keeps from the harness (no secrets: paths, locales, thread counts)
ENV_KEEP = ("PATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
            "OPENBLAS_NUM_THREADS", "CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER", "CUBLAS_WORKSPACE_CONFIG",
            "PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ENABLE_MPS_FALLBACK", "LD_LIBRARY_PATH", "PYTHONHASHSEED",
            "NVIDIA_VISIBLE_DEVICES", "NVIDIA_DRIVER_CAPABILITIES")
#: tests only: further paths the worker may write and variables it keeps (e.g. a spy file)
EXTRA_WRITE: list[str] = []
EXTRA_ENV: list[str] = []

_CLONE_NEWUSER, _CLONE_NEWPID, _CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
_PR_SET_PDEATHSIG, _PR_SET_NO_NEW_PRIVS = 1, 38
#: files outside the Python installation that Python, torch and CUDA read at start
_SYSTEM_READ = ("/usr", "/lib", "/lib64", "/lib32", "/bin", "/sbin", "/etc/ld.so.cache", "/etc/ld.so.conf",
                "/etc/ld.so.conf.d", "/etc/localtime", "/etc/passwd", "/etc/group", "/etc/nsswitch.conf",
                "/etc/os-release", "/etc/mime.types", "/proc/cpuinfo", "/proc/meminfo", "/proc/stat",
                "/sys/devices/system/cpu", "/sys/devices/system/node", "/sys/fs/cgroup",
                "/proc/driver/nvidia", "/sys/bus/pci", "/sys/devices/pci0000:00")
_DEVICES = ("/dev/null", "/dev/zero", "/dev/urandom", "/dev/random", "/dev/full")
_GPU_DEVICE_PREFIXES = ("nvidia", "dri", "kfd")


@dataclass
class Limits:
    """Resource limits of the worker (each process it starts gets the same): a runaway allocation
    or loop ends as a cell error in the worker instead of taking the machine."""

    memory_bytes: Optional[int] = None   # RLIMIT_DATA; None: 3/4 of the machine's memory (CPU workers)
    cpu_s: Optional[int] = 7 * 24 * 3600  # RLIMIT_CPU from the model load on (the wall limit is per group)
    nproc: int = 512                      # tasks (processes + threads): cgroup pids.max, RLIMIT_NPROC


DEFAULT_LIMITS = Limits()


@dataclass
class Plan:
    """What the worker may do, decided by the harness (plain data, written as JSON)."""

    tmp: str
    read: list[str]                 # whole trees, read-only (execute allowed)
    code_dirs: list[str]            # sys.path folders: only their packages and .py files are readable
    denied: list[str]               # never readable, even below a `read` or `code_dirs` entry
    write: list[str]                # read-write besides `tmp`
    devices: list[str]              # device files, read-write (GPU)
    limits: dict[str, Any]
    probe_read: Optional[str]       # a file the worker must NOT be able to read (a test photo)
    harness_pid: int
    harness_netns: Optional[str]
    cgroup: Optional[str] = None    # cgroup.procs file to join, where the harness could make one
    env_allowed: list[str] = field(default_factory=list)
    home: Optional[str] = None      # the user's home, for the probe that lists it


# --- harness side ------------------------------------------------------------------------------

def supported() -> Optional[str]:
    """None where the worker can be confined here, else the reason it cannot (recorded)."""
    if sys.platform != "linux":
        return f"no OS sandbox on {sys.platform} (Landlock, namespaces and seccomp are Linux-only)"
    try:
        import landlock  # deferred: optional, Linux-only binding; its absence is a recorded reason, not an import error
        version = landlock.landlock_abi_version()
    except Exception as exc:  # noqa: BLE001 - binding missing, or the kernel lacks Landlock
        return f"Landlock is not available: {str(exc).splitlines()[0][:200]}"
    return None if version >= 1 else "Landlock is not available (ABI version 0)"


def denied_paths(cache_root: Optional[str] = None, out: Optional[str] = None) -> list[str]:
    """What attack code must never read: the bundled photos' folders, the clean-edit cache, the
    run folder, the user's home and the folder of the record key (store/digest.py; it may lie
    outside the home through $XDG_CONFIG_HOME) -- carved out of any allowed tree that holds them."""
    from spdbench.data.photos import BUNDLED  # deferred: the boot runs this file as a stdlib-only script (no torch before unshare)
    from spdbench.harness.editing import default_cache_root  # deferred: imports torch; the boot must stay stdlib-only until confined
    from spdbench.store.digest import key_path  # deferred: this file runs as a stdlib-only script in the worker

    paths = set()
    for photo in BUNDLED:
        try:
            paths.add(str(photo.path.parent))
        except Exception:  # noqa: BLE001 - a photo's package not installed: nothing to hide
            pass
    paths.add(str(cache_root or default_cache_root()))
    paths.add(str(Path.home()))
    paths.add(str(key_path().parent))
    if out:
        paths.add(str(out))
    return sorted(os.path.realpath(p) for p in paths)


def _probe_photo() -> Optional[str]:
    from spdbench.data.photos import BUNDLED  # deferred: the boot runs this file as a stdlib-only script (no torch before unshare)

    for photo in BUNDLED:
        try:
            if photo.path.is_file():
                return str(photo.path)
        except Exception:  # noqa: BLE001
            continue
    return None


def model_paths(load_spec: Optional[str]) -> list[str]:
    """The files a worker loads its model copy from: a model folder, or a hub id's cache folder
    (the tiny models live in the spdbench package, already readable)."""
    if not load_spec:
        return []
    if os.path.exists(load_spec):
        return [os.path.realpath(load_spec)]
    if "/" in load_spec:
        try:
            from huggingface_hub import constants  # deferred: optional and slow to import; only hub-loaded models need its cache path
            folder = Path(constants.HF_HUB_CACHE) / ("models--" + load_spec.replace("/", "--"))
            return [str(folder)] if folder.exists() else []
        except Exception:  # noqa: BLE001 - no hub library: the load fails in the worker with its own error
            return []
    return []


def _plugin_dirs() -> list[str]:
    """Folders of installed spdbench plugins (an editable plugin's code is on no sys.path entry)."""

    dirs = set()
    for dist in importlib.metadata.distributions():
        for ep in dist.entry_points:
            if not ep.group.startswith("spdbench."):
                continue
            top = ep.value.split(":")[0].split(".")[0]
            try:
                spec = importlib.util.find_spec(top)
            except (ImportError, ValueError):
                continue
            if spec is not None and spec.submodule_search_locations:
                dirs.update(spec.submodule_search_locations)
            elif spec is not None and spec.origin:
                dirs.add(spec.origin)
    return sorted(dirs)


def _spdbench_dir() -> str:
    import spdbench  # deferred: the package imports torch; the boot is stdlib-only until confined
    return os.path.dirname(os.path.realpath(spdbench.__file__))


def scrubbed_env(tmp: str, threads: int, base: Optional[dict] = None) -> dict[str, str]:
    """Only what Python and torch need (paths, locale, thread counts): no token, key or secret of
    the user's environment reaches attack code."""
    base = dict(os.environ if base is None else base)
    env = {k: base[k] for k in (*ENV_KEEP, *EXTRA_ENV) if k in base}
    env.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin")
    env.update(HOME=tmp, TMPDIR=tmp, TMP=tmp, TEMP=tmp, XDG_CACHE_HOME=os.path.join(tmp, "cache"),
               MPLCONFIGDIR=os.path.join(tmp, "mpl"), PYTHONDONTWRITEBYTECODE="1", HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", SPDBENCH_WORKER_THREADS=str(threads),
               PYTHONPATH=os.pathsep.join(p for p in sys.path if p and os.path.isdir(p)))
    try:
        from huggingface_hub import constants  # deferred: optional and slow to import; only hub-loaded models need its cache path
        env["HF_HUB_CACHE"] = str(constants.HF_HUB_CACHE)  # the model files, now that HOME moved
    except Exception:  # noqa: BLE001
        pass
    return env


def make_plan(tmp: str, load_spec: Optional[str], device: str, limits: Limits,
              denied: list[str], cgroup: Optional[str], env: dict[str, str]) -> Plan:
    prefixes = {sys.prefix, sys.base_prefix, sys.exec_prefix, os.path.dirname(os.path.realpath(sys.executable))}
    read = sorted({os.path.realpath(p) for p in prefixes} | set(model_paths(load_spec)) | set(_plugin_dirs())
                  | {_spdbench_dir()})
    code_dirs = sorted({os.path.realpath(p) for p in sys.path if p and os.path.isdir(p)})
    devices = list(_DEVICES)
    if device.startswith("cuda") and os.path.isdir("/dev"):
        devices += [os.path.join("/dev", n) for n in sorted(os.listdir("/dev")) if n.startswith(_GPU_DEVICE_PREFIXES)]
    lim = asdict(limits)
    if lim["memory_bytes"] is None and not device.startswith("cuda"):  # CUDA's own mappings: untested
        lim["memory_bytes"] = _default_memory()
    try:
        netns = os.readlink("/proc/self/ns/net")
    except OSError:
        netns = None
    return Plan(tmp=tmp, read=read, code_dirs=code_dirs, denied=denied, write=list(EXTRA_WRITE), devices=devices,
                limits=lim, probe_read=_probe_photo(), harness_pid=os.getpid(), harness_netns=netns, cgroup=cgroup,
                env_allowed=sorted(env), home=os.path.realpath(str(Path.home())))


def _default_memory() -> Optional[int]:
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") * 3 // 4)
    except (ValueError, OSError, AttributeError):
        return None


def write_plan(plan: Plan) -> str:
    path = os.path.join(plan.tmp, PLAN_NAME)
    with open(path, "w") as f:
        json.dump(asdict(plan), f)
    return path


class Cgroup:
    """A process-count cgroup for one worker (v1 `pids` or v2 with the pids controller), where this
    user may make one: it caps processes for root too (RLIMIT_NPROC does not bind uid 0) and lets
    the harness kill every process of the worker, wherever it moved its session."""

    def __init__(self, path: str) -> None:
        self.path = path

    @classmethod
    def create(cls, nproc: int) -> Optional["Cgroup"]:
        for root in ("/sys/fs/cgroup/pids", "/sys/fs/cgroup", "/sys/fs/cgroup/unified"):
            if not os.path.isfile(os.path.join(root, "cgroup.procs")):
                continue
            controllers = os.path.join(root, "cgroup.controllers")
            if os.path.isfile(controllers):
                try:
                    if "pids" not in open(controllers).read().split():
                        continue
                except OSError:
                    continue
            path = os.path.join(root, f"spdbench-worker-{os.getpid()}-{os.urandom(4).hex()}")
            try:
                os.mkdir(path)
                with open(os.path.join(path, "pids.max"), "w") as f:
                    f.write(str(nproc))
                return cls(path)
            except OSError:
                try:
                    os.rmdir(path)
                except OSError:
                    pass
        return None

    @property
    def procs_file(self) -> str:
        return os.path.join(self.path, "cgroup.procs")

    def kill_all(self) -> None:

        kill_file = os.path.join(self.path, "cgroup.kill")
        for _ in range(50):
            try:
                if os.path.exists(kill_file):
                    with open(kill_file, "w") as f:
                        f.write("1")
                pids = [int(p) for p in open(self.procs_file).read().split()]
            except OSError:
                return
            if not pids:
                return
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
            time.sleep(0.02)

    def remove(self) -> None:
        self.kill_all()
        try:
            os.rmdir(self.path)
        except OSError:
            pass


def check_report(report: Optional[dict], plan: Optional[Plan]) -> tuple[str, dict[str, Any]]:
    """The record's isolation from what the worker measured on itself before any attack code ran:
    ("sandbox", {"mechanisms": [...]}) only where every required mechanism is in place *and* every
    probe was refused; else ("process", {"reason": ..., "mechanisms": [...]})."""
    if plan is None:
        return PROCESS, {"reason": "sandbox off (isolation 'process')", "mechanisms": []}
    if not isinstance(report, dict):
        return PROCESS, {"reason": "the worker sent no confinement report", "mechanisms": []}
    mechanisms = [str(m) for m in report.get("mechanisms", [])][:32]
    problems = [str(p)[:300] for p in report.get("failed", [])][:16]
    probes = report.get("probes", {})
    for name, outcome in sorted(probes.items()):
        if outcome != "refused" and not str(outcome).startswith("n/a"):
            problems.append(f"probe {name}: {str(outcome)[:200]}")
    extra_env = sorted(set(report.get("env", [])) - set(plan.env_allowed))
    if extra_env:
        problems.append(f"environment holds {extra_env[:5]} beyond the scrubbed set")
    missing = [m for m in REQUIRED if m not in mechanisms]
    if missing:
        problems.append(f"missing {', '.join(missing)}")
    if problems:
        return PROCESS, {"reason": "; ".join(problems)[:1000], "mechanisms": mechanisms}
    return SANDBOX, {"mechanisms": mechanisms}


# --- worker side: runs before torch and before any attack code ---------------------------------

def _libc():
    return ctypes.CDLL(None, use_errno=True)


def _errno_text() -> str:
    return os.strerror(ctypes.get_errno())


def _enter_namespaces(done: list[str], failed: list[str]) -> bool:
    """New user + PID + network namespaces; True when the PID namespace was made (fork next)."""
    libc = _libc()
    uid, gid = os.getuid(), os.getgid()
    if libc.unshare(_CLONE_NEWUSER) != 0:
        failed.append(f"user namespace: {_errno_text()}")
    else:
        try:
            for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
                with open(f"/proc/self/{name}", "w") as f:
                    f.write(text)
            done.append("user-namespace")
        except OSError as exc:
            failed.append(f"user namespace id maps: {exc}")
    if libc.unshare(_CLONE_NEWNET) == 0:
        done.append("network-namespace")
    else:
        failed.append(f"network namespace: {_errno_text()}")
    if libc.unshare(_CLONE_NEWPID) == 0:
        done.append("pid-namespace")
        return True
    failed.append(f"pid namespace: {_errno_text()}")
    return False


def _set_limits(limits: dict, own_userns: bool, done: list[str], failed: list[str]) -> None:
    """No core files, RLIMIT_DATA, and RLIMIT_NPROC in the worker's own user namespace only (there
    it counts the worker's tasks; outside it would count every task of the user)."""

    want = [(resource.RLIMIT_CORE, 0), (resource.RLIMIT_NPROC, limits.get("nproc") if own_userns else None)]
    if limits.get("memory_bytes"):
        want.append((resource.RLIMIT_DATA, int(limits["memory_bytes"])))
    for which, value in want:
        if value is None:
            continue
        try:
            resource.setrlimit(which, (int(value), int(value)))
        except (ValueError, OSError) as exc:
            failed.append(f"rlimit {which}: {exc}")
            return
    done.append("rlimits")


def _join_cgroup(procs_file: Optional[str], done: list[str], failed: list[str]) -> None:
    if not procs_file:
        return
    try:
        with open(procs_file, "w") as f:
            f.write(str(os.getpid()))
        done.append("cgroup-pids")
    except OSError as exc:
        failed.append(f"cgroup: {exc}")


def _landlock(plan: dict, done: list[str], failed: list[str]) -> None:
    try:
        from landlock import FSAccess, Ruleset  # deferred: optional, Linux-only binding (see supported())
    except ImportError as exc:
        failed.append(f"landlock binding: {exc}")
        return
    try:
        rs = Ruleset()
        handled = rs.restrict_rules
        read = (FSAccess.READ_FILE | FSAccess.READ_DIR | FSAccess.EXECUTE) & handled
        read_file = (FSAccess.READ_FILE | FSAccess.EXECUTE) & handled
        denied = [os.path.realpath(d) for d in plan["denied"]]
        for root in plan["read"]:
            _allow_tree(rs, root, denied, read, read_file)
        for root in _SYSTEM_READ:
            _allow_tree(rs, root, denied, read, read_file)
        for folder in plan["code_dirs"]:
            _allow_code_dir(rs, folder, denied, read, read_file)
        device_rights = handled & (FSAccess.READ_FILE | FSAccess.WRITE_FILE | FSAccess.READ_DIR
                                   | getattr(FSAccess, "IOCTL_DEV", 0))
        for dev in plan["devices"]:
            _allow(rs, dev, device_rights)
        _allow(rs, "/proc/self", read)  # the worker's own /proc entries (not the harness's)
        for folder in [plan["tmp"], *plan["write"]]:
            _allow(rs, folder, handled)
        rs.apply()  # sets no_new_privs first
        done.append("landlock")
    except Exception as exc:  # noqa: BLE001 - a kernel without Landlock: recorded, never silent
        failed.append(f"landlock: {str(exc).splitlines()[0][:200]}")


def _allow(rs, path: str, rights) -> None:
    if not os.path.exists(path):
        return
    if not os.path.isdir(path):  # a file rule may hold file rights only
        from landlock import FSAccess  # deferred: optional, Linux-only binding (see supported())
        rights = rights & (FSAccess.READ_FILE | FSAccess.WRITE_FILE | FSAccess.EXECUTE | FSAccess.TRUNCATE
                           | getattr(FSAccess, "IOCTL_DEV", 0))
    try:
        rs.allow(path, rules=rights)
    except OSError:
        pass


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def _allow_tree(rs, root: str, denied: list[str], read, read_file) -> None:
    """Allow `root` whole, or, where a denied path lies below it, its listing and each child but
    the denied ones (Landlock only grants: a hole is made by granting around it)."""
    root = os.path.realpath(root)
    if not os.path.exists(root) or root in denied:
        return
    inside = [d for d in denied if _under(d, root) and d != root]
    if not inside:
        _allow(rs, root, read)
        return
    _allow(rs, root, read & ~read_file)  # listing only: names, never contents
    for name in os.listdir(root):
        child = os.path.join(root, name)
        if child in denied:
            continue
        if os.path.islink(child):  # a rule follows the link: carve its target the same way
            target = os.path.realpath(child)
            if not _under(target, root):
                _allow_tree(rs, target, denied, read, read_file)
        elif os.path.isdir(child):
            _allow_tree(rs, child, denied, read, read_file)
        else:
            _allow(rs, child, read)


def _allow_code_dir(rs, folder: str, denied: list[str], read, read_file) -> None:
    """A sys.path folder: its listing (the import system needs it), its packages and its modules;
    not its other files (a run folder or a photo folder beside the code stays unreadable)."""
    if not os.path.isdir(folder):
        return
    _allow(rs, folder, read & ~read_file)
    for name in os.listdir(folder):
        child = os.path.join(folder, name)
        if child in denied:
            continue
        if name.endswith((".py", ".pyc", ".so", ".pth")) and os.path.isfile(child):
            _allow(rs, child, read)
        elif _is_package(child):
            _allow_tree(rs, child, denied, read, read_file)


def _is_package(folder: str) -> bool:
    """A regular package, or a namespace package (a folder holding modules)."""
    if os.path.isfile(os.path.join(folder, "__init__.py")):
        return True
    try:
        return os.path.isdir(folder) and any(n.endswith(".py") for n in os.listdir(folder))
    except OSError:
        return False


def _seccomp(done: list[str], failed: list[str]) -> None:
    try:

        import pyseccomp as sc  # deferred: optional libseccomp binding; missing means "process" with the reason
        f = sc.SyscallFilter(sc.ALLOW)
        f.add_rule(sc.ERRNO(errno.EACCES), "socket")  # none, of any family (a named unix socket too)
        for name in ("ptrace", "process_vm_readv", "process_vm_writev"):
            f.add_rule(sc.ERRNO(errno.EPERM), name)
        f.add_rule(sc.ERRNO(errno.EPERM), "prctl", sc.Arg(0, sc.EQ, _PR_SET_PDEATHSIG))
        f.load()
        done.append("seccomp")
    except Exception as exc:  # noqa: BLE001 - no libseccomp: recorded
        failed.append(f"seccomp: {str(exc)[:200]}")


def _no_new_privs(done: list[str], failed: list[str]) -> None:
    if _libc().prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == 0:
        done.append("no-new-privs")
    else:
        failed.append(f"no_new_privs: {_errno_text()}")


def probe(plan: dict) -> dict[str, str]:
    """Try what attack code must not be able to do; each answer is "refused" or what happened."""

    out: dict[str, str] = {}

    def attempt(name: str, fn) -> None:
        try:
            fn()
            out[name] = "succeeded"
        except OSError:
            out[name] = "refused"

    if plan.get("probe_read"):
        attempt("read-test-photo", lambda: open(plan["probe_read"], "rb").close())
    else:
        out["read-test-photo"] = "n/a (no bundled photo installed)"
    attempt("open-inet-socket", lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM).close())
    outside = os.path.join(os.path.dirname(plan["tmp"].rstrip("/")), f".spdbench-probe-{os.getpid()}")
    attempt("write-outside-tmp", lambda: open(outside, "w").close())
    if out.get("write-outside-tmp") == "succeeded":
        try:
            os.unlink(outside)
        except OSError:
            pass
    attempt("signal-harness", lambda: os.kill(plan["harness_pid"], 0))
    if plan.get("home") and plan["home"] not in plan["code_dirs"]:
        attempt("list-home", lambda: os.listdir(plan["home"]))
    return out


def confine(plan: dict, pid_namespace: bool, done: list[str], failed: list[str]) -> dict[str, Any]:
    """Steps 3-4 of the module doc, in the worker (child) process; returns the report."""
    libc = _libc()
    if pid_namespace:
        libc.prctl(_PR_SET_PDEATHSIG, 9, 0, 0, 0)  # the supervisor's death (or the harness's) ends it
    _set_limits(plan["limits"], "user-namespace" in done, done, failed)
    if os.environ.keys() <= set(plan["env_allowed"]):
        done.append("scrubbed-env")
    _no_new_privs(done, failed)
    _landlock(plan, done, failed)
    _seccomp(done, failed)
    probes = probe(plan) if "landlock" in done else {}
    if probes.get("open-inet-socket") == "refused" or (
            "network-namespace" in done and _netns() not in (None, plan.get("harness_netns"))):
        done.append("no-network")
    done.append("process-group")
    return {"mechanisms": done, "failed": failed, "probes": probes, "env": sorted(os.environ)}


def _netns() -> Optional[str]:
    try:
        return os.readlink("/proc/self/ns/net")
    except OSError:
        return None


def boot(read_fd: int, write_fd: int, plan_path: str, parent_pid: Optional[int] = None) -> None:
    """The worker's start: namespaces, fork (parent = supervisor), confine, then the worker loop.
    `parent_pid`: the process that started this one where it is not the harness (zygote.py)."""

    t0 = time.perf_counter()
    with open(plan_path) as f:
        plan = json.load(f)
    done: list[str] = []
    failed: list[str] = []
    libc = _libc()
    libc.prctl(_PR_SET_PDEATHSIG, 15, 0, 0, 0)  # the harness's (or zygote's) death ends the supervisor
    if os.getppid() != (parent_pid or plan["harness_pid"]):
        os._exit(3)
    _join_cgroup(plan.get("cgroup"), done, failed)
    pid_ns = _enter_namespaces(done, failed) if sys.platform == "linux" else False
    if pid_ns:
        child = os.fork()
        if child:
            _supervise(child, read_fd, write_fd, plan["tmp"])
    report = confine(plan, pid_ns, done, failed)
    report["confine_s"] = time.perf_counter() - t0  # namespaces, rules, filters and probes (docs/performance.md)
    if sys.path and os.path.realpath(sys.path[0]) == os.path.dirname(os.path.realpath(__file__)):
        sys.path.pop(0)  # this file ran as a script: its folder is not an import root
    from spdbench.harness import worker  # deferred: the worker imports torch, which may load only after confinement
    worker.main(read_fd, write_fd, sandbox_report=report, reap_children=pid_ns)


def _supervise(child: int, read_fd: int, write_fd: int, tmp: str) -> None:
    """The supervisor: holds nothing the worker needs, waits for it, exits with its status
    (128 + signal when it was killed, as a shell reports it). When the harness dies first
    (SIGTERM from PR_SET_PDEATHSIG) it kills the worker -- and with it its PID namespace -- and
    removes the private folder the harness can no longer remove."""

    def harness_gone(*_) -> None:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)
        shutil.rmtree(tmp, ignore_errors=True)
        os._exit(1)

    signal.signal(signal.SIGTERM, harness_gone)
    os.close(read_fd)
    os.close(write_fd)
    while True:
        try:
            _, status = os.waitpid(child, 0)
            break
        except ChildProcessError:
            os._exit(1)
        except InterruptedError:
            continue
    os._exit(128 + os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status))


if __name__ == "__main__":
    boot(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
