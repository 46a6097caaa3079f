"""The worker as a sandbox (issue 40): from inside an attack, the OS refuses what the user could do.

Each end-to-end test runs a hostile attack (hostile_attacks.py) through `spdbench.run` in a
confined worker and reads what it managed from its record; where it helps, the same attack in
an unconfined worker ("process") shows that the probe does see the hole it looks for.
"""
from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

import spdbench
from spdbench.harness import sandbox
from spdbench.harness.editing import default_cache_root
from spdbench.store.records import Record, Status

import hostile_attacks as H
from harness_helpers import fast_images, fast_suite

needs_sandbox = pytest.mark.skipif(sandbox.supported() is not None, reason=f"{sandbox.supported()}")
SECRET = "s3cret-40"


@pytest.fixture(scope="module")
def target():
    return spdbench.load_target("tiny-random")


def _run(attack, target, out, isolation="sandbox", **kw):
    return spdbench.run(attack, suite=fast_suite(), out=out, target=target, images=fast_images(4), eps="8/255",
                        isolation=isolation, **kw)


def _probes(res) -> dict:
    rec = res.records[0]
    assert rec.status == Status.error and "probes " in rec.error, rec.error
    return json.loads(rec.error.split("probes ", 1)[1])


def _bundled_photo() -> str:
    from spdbench.data.photos import BUNDLED

    return str(BUNDLED[0].path)


def _model_file() -> str:
    from spdbench.targets.tiny import TRAINED_DIR

    return str(next(p for p in sorted(TRAINED_DIR.rglob("*")) if p.is_file()))


def _sleepers(tag: str) -> list[int]:
    found = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                if Path(f"/proc/{pid}/cmdline").read_bytes() == b"sleep\0" + tag.encode() + b"\0":
                    found.append(int(pid))
            except OSError:
                continue
    return found


# --- end to end: what an attack can do from the worker ------------------------------------------

@needs_sandbox
def test_attack_can_read_no_photo_write_nothing_reach_no_network_and_see_no_secret(tmp_path, target, monkeypatch):
    monkeypatch.setenv("SPDBENCH_TEST_SECRET", SECRET)
    cache = default_cache_root()
    cache.mkdir(parents=True, exist_ok=True)
    reads = [_bundled_photo(), str(cache), str(Path.home()), str(tmp_path)]
    writes = [str(tmp_path / "forged.json"), _model_file(), "/tmp/spdbench-outside-40"]
    res = _run(H.Probes(read=reads, write=writes, harness_pid=os.getpid()), target, tmp_path / "run")
    got = _probes(res)
    assert all(got[f"read{i}"].startswith("refused") for i in range(len(reads))), got
    assert all(got[f"write{i}"].startswith("refused") for i in range(len(writes))), got
    assert got["socket"].startswith("refused") and got["udp"].startswith("refused"), got
    assert got["signal-harness"].startswith("refused"), got
    assert got["secret"] == "absent" and "SPDBENCH_TEST_SECRET" not in got["env"]
    assert not (tmp_path / "forged.json").exists() and not Path("/tmp/spdbench-outside-40").exists()
    rec = res.records[0]
    assert rec.isolation == "sandbox", rec.isolation_detail
    assert {"landlock", "seccomp", "no-network", "no-new-privs", "rlimits"} <= set(rec.isolation_detail["mechanisms"])


@needs_sandbox
def test_the_same_probes_succeed_in_an_unconfined_worker(tmp_path, target, monkeypatch):
    """The probes above can fail: without the sandbox the photo is read and the secret is there."""
    monkeypatch.setenv("SPDBENCH_TEST_SECRET", SECRET)
    res = _run(H.Probes(read=[_bundled_photo()], write=[str(tmp_path / "x")]), target, tmp_path / "run",
               isolation="process")
    got = _probes(res)
    assert got["read0"].startswith("succeeded") and got["write0"] == "succeeded" and got["secret"] == "leaked"
    assert res.records[0].isolation == "process"
    assert "sandbox off" in res.records[0].isolation_detail["reason"]


@needs_sandbox
def test_no_child_outlives_the_worker_even_after_setsid_and_a_double_fork(tmp_path, target):
    res = _run(H.SpawnsSleepers(tag="313.25"), target, tmp_path / "sb")
    assert res.ok and res.records[0].isolation == "sandbox"
    time.sleep(0.5)
    assert _sleepers("313.25") == []
    # the same attack unconfined: the double-forked daemon survives the process-group kill
    res = _run(H.SpawnsSleepers(tag="313.75"), target, tmp_path / "plain", isolation="process")
    survivors = _sleepers("313.75")
    for pid in survivors:
        os.kill(pid, signal.SIGKILL)
    assert res.ok and survivors, "an unconfined worker's setsid child is expected to survive"


@needs_sandbox
def test_memory_bomb_ends_as_one_line_cell_error(tmp_path, target, monkeypatch):
    monkeypatch.setattr(sandbox, "DEFAULT_LIMITS", sandbox.Limits(memory_bytes=4 << 30))
    res = _run(H.MemoryBomb(), target, tmp_path)
    rec = res.records[0]
    assert rec.status == Status.error and "MemoryError" in rec.error and "memory limit" in rec.error
    assert "\n" not in rec.error


@needs_sandbox
def test_endless_loop_ends_at_the_cpu_limit_as_one_line_cell_error(tmp_path, target, monkeypatch):
    monkeypatch.setattr(sandbox, "DEFAULT_LIMITS", sandbox.Limits(cpu_s=3))
    t0 = time.perf_counter()
    res = _run(H.EndlessLoop(), target, tmp_path)
    rec = res.records[0]
    assert rec.status == Status.error and "CPU time limit of 3 s" in rec.error and "\n" not in rec.error
    assert time.perf_counter() - t0 < 300


@needs_sandbox
def test_honest_numbers_are_the_same_with_and_without_the_sandbox(tmp_path, target):
    confined = _run("photoguard-encoder", target, tmp_path / "sb")
    plain = _run("photoguard-encoder", target, tmp_path / "plain", isolation="process")
    assert confined.ok and plain.ok
    assert confined.records[0].isolation == "sandbox" and plain.records[0].isolation == "process"
    assert "not-sandboxed" in plain.records[0].flags and "not-sandboxed" not in confined.records[0].flags
    for a, b in zip(confined.records, plain.records):
        assert a.protection == b.protection and a.perturbation_sha256 == b.perturbation_sha256


# --- the harness's check of the worker's report ------------------------------------------------

def _plan(**kw) -> sandbox.Plan:
    base = dict(tmp="/tmp/x", read=[], code_dirs=[], denied=[], write=[], devices=[], limits={}, probe_read=None,
                harness_pid=1, harness_netns=None, env_allowed=["PATH", "HOME"])
    base.update(kw)
    return sandbox.Plan(**base)


GOOD = {"mechanisms": list(sandbox.REQUIRED) + ["seccomp"], "failed": [],
        "probes": {"read-test-photo": "refused", "open-inet-socket": "refused"}, "env": ["HOME", "PATH"]}


def test_a_report_with_every_mechanism_and_every_probe_refused_is_a_sandbox():
    assert sandbox.check_report(GOOD, _plan()) == ("sandbox", {"mechanisms": GOOD["mechanisms"]})


@pytest.mark.parametrize("change,needle", [
    (lambda r: r["probes"].update({"read-test-photo": "succeeded"}), "probe read-test-photo: succeeded"),
    (lambda r: r["mechanisms"].remove("landlock"), "missing landlock"),
    (lambda r: r["env"].append("AWS_SECRET_ACCESS_KEY"), "AWS_SECRET_ACCESS_KEY"),
    (lambda r: r["failed"].append("seccomp: no libseccomp"), "no libseccomp"),
])
def test_any_gap_makes_it_process_with_the_reason(change, needle):
    report = json.loads(json.dumps(GOOD))
    change(report)
    isolation, detail = sandbox.check_report(report, _plan())
    assert isolation == "process" and needle in detail["reason"]


def test_no_report_or_sandbox_off_is_process_never_silently_ok():
    assert sandbox.check_report(None, _plan())[0] == "process"
    assert sandbox.check_report(GOOD, None) == ("process", {"reason": "sandbox off (isolation 'process')",
                                                            "mechanisms": []})


def test_without_linux_the_reason_is_named(monkeypatch):
    monkeypatch.setattr(sandbox.sys, "platform", "darwin")
    assert "darwin" in sandbox.supported()


class _Rules:
    """Stands in for landlock.Ruleset: records what would be granted."""

    def __init__(self):
        self.allowed = []

    def allow(self, path, rules=None):
        self.allowed.append(os.path.realpath(path))


def test_a_denied_folder_inside_an_allowed_tree_is_carved_out(tmp_path):
    from landlock import FSAccess

    (tmp_path / "pkg" / "data").mkdir(parents=True)
    (tmp_path / "pkg" / "data" / "photo.png").write_bytes(b"x")
    (tmp_path / "pkg" / "code.py").write_text("")
    (tmp_path / "other").mkdir()
    rules = _Rules()
    read = FSAccess.READ_FILE | FSAccess.READ_DIR
    sandbox._allow_tree(rules, str(tmp_path), [str(tmp_path / "pkg" / "data")], read, FSAccess.READ_FILE)
    assert str(tmp_path / "pkg" / "code.py") in rules.allowed and str(tmp_path / "other") in rules.allowed
    assert not any(p.startswith(str(tmp_path / "pkg" / "data")) for p in rules.allowed)


def test_a_code_folder_gives_its_modules_and_packages_not_its_data(tmp_path):
    from landlock import FSAccess

    (tmp_path / "mod.py").write_text("")
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "runs").mkdir()
    (tmp_path / "photo.png").write_bytes(b"x")
    rules = _Rules()
    sandbox._allow_code_dir(rules, str(tmp_path), [], FSAccess.READ_FILE | FSAccess.READ_DIR, FSAccess.READ_FILE)
    assert {str(tmp_path / "mod.py"), str(tmp_path / "pkg")} <= set(rules.allowed)
    assert str(tmp_path / "runs") not in rules.allowed and str(tmp_path / "photo.png") not in rules.allowed


def test_the_environment_is_scrubbed(monkeypatch):
    monkeypatch.setenv("SPDBENCH_TEST_SECRET", SECRET)
    monkeypatch.setenv("HF_TOKEN", "hf_x")
    env = sandbox.scrubbed_env("/tmp/w", 2)
    assert "SPDBENCH_TEST_SECRET" not in env and "HF_TOKEN" not in env
    assert env["HOME"] == env["TMPDIR"] == "/tmp/w" and env["SPDBENCH_WORKER_THREADS"] == "2"


def test_records_before_the_sandbox_still_load():
    """Old records say isolation 'process' and have no isolation_detail: they load unchanged."""
    entries = Path(__file__).resolve().parents[1] / "leaderboard" / "entries"
    path = next(entries.rglob("records/*.json"))
    data = json.loads(path.read_text())
    assert "isolation_detail" not in data
    rec = Record.model_validate(data)
    assert rec.isolation == "process" and rec.isolation_detail is None


# --- issue 40: costs measured where the attack cannot set them ---------------------------------

def test_an_attack_that_under_reports_its_model_calls_gets_its_real_counts_recorded(tmp_path, target):
    """The job's own counter is made to say 1 forward / 0 backward; the worker runtime's hooks,
    installed before the attack existed, counted the real passes, and those are recorded, flagged."""
    res = _run(H.UnderReports(), target, tmp_path / "run")
    assert res.ok, [r.error for r in res.records]
    rec = res.records[0]
    assert rec.model_calls["vae_encoder_fwd"] >= 3 and rec.model_calls["vae_encoder_bwd"] >= 3, rec.model_calls
    assert "model-calls-tampered" in rec.flags and "attack-from-caller" in rec.flags
    honest = _run("photoguard-encoder", target, tmp_path / "honest")
    assert "model-calls-tampered" not in honest.records[0].flags
    assert "attack-from-caller" not in honest.records[0].flags, "a built-in by name travels as plain data"


def test_an_attack_that_removes_the_counting_hooks_is_flagged(tmp_path, target):
    res = _run(H.RemovesHooks(), target, tmp_path / "run")
    assert res.ok, [r.error for r in res.records]
    assert all("model-calls-tampered" in r.flags for r in res.records)


def test_attack_time_is_the_harness_measured_share_not_the_workers_figure(tmp_path, target, monkeypatch):
    """The worker's own clock says 0 s for every split; the records hold the harness's wall time."""
    from spdbench.harness import isolation, wire

    real = wire.decode

    def lying(frame, expected, network_max_values=0):
        reply, tensors = real(frame, expected, network_max_values)
        for report in reply.splits.values():
            report.wall_s, report.device_s = 2.5e-7, 1e6
        return reply, tensors

    monkeypatch.setattr(isolation.wire, "decode", lying)
    res = _run("uniform-noise", target, tmp_path / "run")
    assert res.ok
    rec = res.records[0]
    assert rec.timing.attack_wall_s > 1e-4, "the harness's measured share, not the worker's 2.5e-7 s"
    assert rec.timing.attack_device_s is None and "device-time-dropped" in rec.flags
