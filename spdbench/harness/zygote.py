"""Warm starts for attack workers (Linux): a process that has already imported torch and diffusers
forks each worker, instead of a new interpreter importing them again.

Why: a worker's start is mostly imports -- torch about 2 s and diffusers about 7 s on this 2-core
machine, before the model loads in about 1 s -- and every run, `verify` and `describe` starts one
per group (docs/performance.md has the measured start before and after). A fork takes milliseconds.

Why this keeps the worker's guarantees (docs/security.md):
- the zygote holds nothing a worker may not see: it is started with a scrubbed environment (no
  secrets: `/proc/self/environ` of every child is this one), imports only third-party libraries
  (`PRELOAD`: no spdbench module, no registry, no plugin, no model, no photo) and runs no attack
  code and no torch operation (no thread pool, no CUDA context for a child to inherit);
- each child is forked from the zygote's main thread, so it is single-threaded, and before any
  confinement or attack code it closes every descriptor but its two pipes and stdio (the zygote's
  socket, the other workers' status pipes), takes the request's environment, `sys.path` and
  folder, and then goes the very way an exec'd worker goes: `sandbox.boot` (namespaces, Landlock,
  seccomp, probes, each checked by the harness) or `worker.main`;
- the zygote ends when the harness does (its socket closes) and ends its children then.
Where fork is not safe (not Linux) or the zygote cannot start, workers are exec'd as before; the
environment variable SPDBENCH_ZYGOTE=0 forces that.

This file runs as a script (`python zygote.py FD`): stdlib only at import, like sandbox.py, so the
zygote imports no spdbench code that a worker should import fresh.
"""
from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
from typing import Optional

#: third-party modules a worker imports anyway, loaded once by the zygote (the slow part of a start)
PRELOAD = ("torch", "cloudpickle", "numpy", "PIL.Image", "safetensors.torch", "transformers", "diffusers")
#: diffusers and transformers load their classes lazily: these are what a worker's target builds on
PRELOAD_NAMES = {"diffusers": ("AutoencoderKL", "UNet2DConditionModel", "DDIMScheduler",
                               "StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline",
                               "StableDiffusionInstructPix2PixPipeline"),
                 "transformers": ("CLIPTextModel", "CLIPTokenizer")}
#: the longest the zygote's imports may take before workers are exec'd instead (a loaded machine)
READY_TIMEOUT_S = 300.0
_MAX_MESSAGE = 1 << 20
_FDS = 5  # read, write, status, stdout, stderr


# --- the zygote process ---------------------------------------------------------------------------

def _preload() -> None:
    import importlib  # stdlib; here so the module's import stays minimal

    for name in PRELOAD:
        module = importlib.import_module(name)
        for attr in PRELOAD_NAMES.get(name, ()):
            getattr(module, attr)


def _close_other_fds(keep: set[int]) -> None:
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd not in keep:
            try:
                os.close(fd)
            except OSError:
                pass  # the listing's own descriptor, already closed


def _become_worker(request: dict, fds: list[int], sock: socket.socket, zygote_pid: int) -> None:
    """In the forked child: drop everything of the zygote, then start as an exec'd worker would."""
    code = 1
    try:
        read_fd, write_fd, _status, out_fd, err_fd = fds
        sock.close()
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        os.setsid()  # its own process group: the harness kills the group (start_new_session, as exec'd)
        os.dup2(out_fd, 1)
        os.dup2(err_fd, 2)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        _close_other_fds({0, 1, 2, read_fd, write_fd})
        os.environ.clear()
        os.environ.update(request["env"])
        sys.path[:] = request["sys_path"]
        os.chdir(request["cwd"])
        if request.get("plan"):
            from spdbench.harness import sandbox  # deferred: imported fresh in each child, never by the zygote
            sandbox.boot(read_fd, write_fd, request["plan"], parent_pid=zygote_pid)
        else:
            from spdbench.harness import worker  # deferred: as above
            worker.main(read_fd, write_fd)
        code = 0
    except BaseException:  # noqa: BLE001 - a child must never fall back into the zygote's loop
        import traceback  # stdlib

        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001
                pass
        os._exit(code)


def _spawn(sock: socket.socket, children: dict[int, int]) -> bool:
    """One request: fork a worker; False when the harness closed the socket."""
    try:
        message, fds, _, _ = socket.recv_fds(sock, _MAX_MESSAGE, _FDS)
    except ConnectionResetError:
        return False
    if not message:
        return False
    if len(fds) != _FDS:
        for fd in fds:
            os.close(fd)
        sock.send(json.dumps({"error": f"expected {_FDS} descriptors, got {len(fds)}"}).encode())
        return True
    request = json.loads(message)
    pid = os.fork()
    if pid == 0:
        _become_worker(request, fds, sock, os.getppid())
    children[pid] = fds[2]
    for fd in fds[:2] + fds[3:]:
        os.close(fd)
    sock.send(json.dumps({"pid": pid}).encode())
    return True


def _reap(children: dict[int, int]) -> None:
    """Hand each ended child's wait status to its harness-side handle (its status pipe)."""
    while children:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        fd = children.pop(pid, None)
        if fd is not None:
            try:
                os.write(fd, status.to_bytes(4, "little", signed=True))
            except OSError:
                pass  # the harness stopped listening
            os.close(fd)


def serve(sock_fd: int) -> None:
    """The zygote's loop: preload, say ready, then fork on request and report exits, until the
    harness closes the socket (then its workers' groups get SIGTERM: a sandbox supervisor then
    removes its private folder)."""
    sock = socket.socket(fileno=sock_fd)
    _preload()
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    os.set_blocking(wake_r, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the harness's to handle
    children: dict[int, int] = {}
    sock.send(json.dumps({"ready": os.getpid()}).encode())
    while True:
        readable, _, _ = select.select([sock, wake_r], [], [])
        if wake_r in readable:
            try:
                os.read(wake_r, 4096)
            except BlockingIOError:
                pass
            _reap(children)
        if sock in readable and not _spawn(sock, children):
            break
    for pid in list(children):
        try:
            os.killpg(pid, signal.SIGTERM)
        except OSError:
            pass
    os._exit(0)


# --- the harness side -----------------------------------------------------------------------------

class ForkedWorker:
    """The harness's handle on a worker the zygote forked: what `subprocess.Popen` offers the
    isolation code (pid, returncode, poll, wait, kill), the exit status read from the status pipe
    the zygote writes when it reaps the worker."""

    def __init__(self, pid: int, status_fd: int) -> None:
        self.pid, self._status, self.returncode = pid, status_fd, None
        self.args = f"worker {pid} (forked by the zygote)"

    def poll(self) -> Optional[int]:
        if self.returncode is None and select.select([self._status], [], [], 0)[0]:
            self._read_status()
        return self.returncode

    def wait(self, timeout: Optional[float] = None) -> int:
        if self.returncode is None:
            if not select.select([self._status], [], [], timeout)[0]:
                raise subprocess.TimeoutExpired(self.args, timeout)
            self._read_status()
        return self.returncode

    def kill(self) -> None:
        if self.poll() is None:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def _read_status(self) -> None:
        data = os.read(self._status, 4)
        os.close(self._status)
        if len(data) == 4:
            status = int.from_bytes(data, "little", signed=True)
            self.returncode = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        else:  # the zygote ended before it could say (killed with the harness's other children)
            self.returncode = -signal.SIGKILL

    def __del__(self) -> None:
        if self.returncode is None:
            try:
                os.close(self._status)
            except OSError:
                pass


class Zygote:
    """One per harness process, started on the first worker and kept while the process lives."""

    def __init__(self, env: dict[str, str]) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), str(theirs.fileno())],
                                         pass_fds=(theirs.fileno(),), env=env, stdin=subprocess.DEVNULL,
                                         start_new_session=True, close_fds=True)
        finally:
            theirs.close()
        self.sock = ours
        self.lock = threading.Lock()
        self.owner = os.getpid()  # a forked harness must not share this socket
        if not select.select([ours], [], [], READY_TIMEOUT_S)[0]:
            self.close()
            raise OSError(f"the worker zygote did not import its libraries within {READY_TIMEOUT_S:g} s")
        reply = ours.recv(_MAX_MESSAGE)
        if not reply or "ready" not in json.loads(reply):
            self.close()
            raise OSError(f"the worker zygote did not start (exit code {self.proc.poll()})")

    @property
    def alive(self) -> bool:
        return self.owner == os.getpid() and self.proc.poll() is None

    def spawn(self, read_fd: int, write_fd: int, *, env: dict[str, str], plan: Optional[str]) -> ForkedWorker:
        """Fork a worker on (read_fd, write_fd); `plan` (a sandbox plan file) confines it."""
        status_r, status_w = os.pipe()
        request = dict(env=env, sys_path=[p for p in sys.path], cwd=os.getcwd(), plan=plan)
        try:
            with self.lock:
                socket.send_fds(self.sock, [json.dumps(request).encode()],
                                [read_fd, write_fd, status_w, 1, 2])  # stdio as an exec'd worker inherits it
                reply = self.sock.recv(_MAX_MESSAGE)
        except BaseException:
            os.close(status_r)
            raise
        finally:
            os.close(status_w)
        answer = json.loads(reply) if reply else {"error": "the zygote ended"}
        if "pid" not in answer:
            os.close(status_r)
            raise OSError(f"the worker zygote could not fork a worker: {answer.get('error')}")
        return ForkedWorker(int(answer["pid"]), status_r)

    def close(self) -> None:
        try:
            self.sock.close()
        finally:
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


if __name__ == "__main__":
    if sys.path and os.path.realpath(sys.path[0]) == os.path.dirname(os.path.realpath(__file__)):
        sys.path.pop(0)  # run as a script: its folder is not an import root
    serve(int(sys.argv[1]))
