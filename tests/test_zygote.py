"""Workers forked by the zygote (spdbench/harness/zygote.py): faster to start, and the same worker.

What could go wrong with a fork and is checked here: a child that keeps the zygote's socket or
another worker's descriptors, an environment block inherited from the harness, numbers that differ
from an exec'd worker's, and a zygote that outlives its harness.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

import spdbench
from spdbench.harness import isolation, sandbox
from spdbench.harness.isolation import AttackWorker
from spdbench.harness.zygote import ForkedWorker

import hostile_attacks as H
from harness_helpers import fast_images, fast_suite

linux_only = pytest.mark.skipif(sys.platform != "linux", reason="the zygote is Linux-only (fork)")
needs_sandbox = pytest.mark.skipif(sandbox.supported() is not None, reason=f"{sandbox.supported()}")
SECRET = "s3cret-40"


@pytest.fixture(scope="module")
def target():
    return spdbench.load_target("tiny-random")


@pytest.fixture
def fresh_zygote(monkeypatch):
    """A zygote started inside the test (with whatever environment the test set), ended after it."""
    monkeypatch.setattr(isolation, "_zygote", None)
    monkeypatch.setattr(isolation, "_zygote_off", None)
    monkeypatch.delenv("SPDBENCH_ZYGOTE", raising=False)
    yield
    if isolation._zygote is not None:
        isolation._zygote.close()


def _probes(attack, target, out, isolation_kind):
    res = spdbench.run(attack, suite=fast_suite(), out=out, target=target, images=fast_images(4), eps="16/255",
                       isolation=isolation_kind)
    rec = res.records[0]
    assert "probes " in (rec.error or ""), rec.error
    return json.loads(rec.error.split("probes ", 1)[1])


@linux_only
@pytest.mark.parametrize("kind", ["sandbox", pytest.param("process", marks=pytest.mark.slow)])
def test_a_forked_worker_holds_no_descriptor_and_no_environment_of_the_harness(tmp_path, target, fresh_zygote,
                                                                               monkeypatch, kind):
    if kind == "sandbox" and sandbox.supported() is not None:
        pytest.skip(sandbox.supported())
    monkeypatch.setenv("SPDBENCH_TEST_SECRET", SECRET)  # in the harness's environment when the zygote starts
    got = _probes(H.Probes(), target, tmp_path / kind, kind)
    assert isolation._zygote is not None, "the worker was not forked by a zygote"
    assert got["initial-env"] == "absent", "the zygote's environment block carries the harness's secret"
    sockets = {fd: what for fd, what in got["fds"].items() if what.startswith("socket:")}
    assert sockets == {}, f"the worker inherited the zygote's socket: {sockets}"
    assert len(got["fds"]) <= 8, got["fds"]  # stdio, its two pipes, and what torch itself opened
    if kind == "sandbox":
        assert got["secret"] == "absent"
    else:  # an unconfined worker has the harness's environment, as documented: the probe can fail
        assert got["secret"] == "leaked"


@linux_only
@pytest.mark.slow
def test_forked_and_execed_workers_make_the_same_perturbation_and_confinement(tmp_path, target, fresh_zygote,
                                                                               monkeypatch):
    def run(out):
        return spdbench.run("photoguard-encoder", suite=fast_suite(), out=out, target=target, images=fast_images(4),
                            eps="16/255")

    forked = run(tmp_path / "forked")
    assert isolation._zygote is not None
    monkeypatch.setenv("SPDBENCH_ZYGOTE", "0")
    execed = run(tmp_path / "execed")
    assert forked.ok and execed.ok
    a = {(r.split, r.prompt_key): r for r in forked.records}
    b = {(r.split, r.prompt_key): r for r in execed.records}
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].perturbation_sha256 == b[key].perturbation_sha256, key
        assert a[key].isolation == b[key].isolation
        assert a[key].isolation_detail.get("mechanisms") == b[key].isolation_detail.get("mechanisms")


@linux_only
@pytest.mark.slow
def test_a_forked_worker_starts_faster_than_an_execed_one(fresh_zygote, monkeypatch):
    """The point of the zygote: the imports are done once (describe-only workers: no model)."""
    def start() -> tuple[float, object]:
        w = AttackWorker(None, sandbox=False)
        try:
            return w.start(), w.proc
        finally:
            w.close()

    start()  # the zygote's own start (its imports) is paid once, here
    forked_s, proc = start()
    assert isinstance(proc, ForkedWorker)
    monkeypatch.setenv("SPDBENCH_ZYGOTE", "0")
    execed_s, proc = start()
    assert isinstance(proc, subprocess.Popen)
    assert forked_s < execed_s, (forked_s, execed_s)


@linux_only
def test_a_killed_forked_worker_reports_its_signal():
    w = AttackWorker(None, sandbox=False)
    w.start()
    assert isinstance(w.proc, ForkedWorker)
    os.kill(w.proc.pid, signal.SIGKILL)
    assert w.proc.wait(timeout=30) == -signal.SIGKILL
    assert "killed by signal 9" in w._exit_text()
    w.close()


@linux_only
@pytest.mark.slow
def test_the_zygote_and_its_workers_end_with_the_harness(tmp_path):
    script = tmp_path / "harness.py"
    script.write_text(textwrap.dedent("""
        import sys, time
        from spdbench.harness import isolation
        w = isolation.AttackWorker(None, sandbox=False)
        w.start()
        print(isolation._zygote.proc.pid, w.proc.pid, flush=True)
        time.sleep(600)
    """))
    env = dict(os.environ, SPDBENCH_ZYGOTE="1")
    harness = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        line = harness.stdout.readline()
        zygote_pid, worker_pid = map(int, line.split())
        harness.kill()
        harness.wait(timeout=30)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(_alive(p) for p in (zygote_pid, worker_pid)):
            time.sleep(0.2)
        assert not _alive(zygote_pid), "the zygote outlived its harness"
        assert not _alive(worker_pid), "a forked worker outlived its harness"
    finally:
        if harness.poll() is None:
            harness.kill()


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for its reaper counts as ended)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
