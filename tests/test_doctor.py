"""`spdbench doctor`: the environment report, the bench's correctness checks, and the cost model.

The bench must fail loudly on the failures a long GPU run would waste hours on (a zero delta, a NaN
loss, an objective that does not improve, a low-precision delta that float32 disagrees with); test
attacks that fail in each way are registered only for the test that needs them.
"""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import spdbench
from spdbench import cli
from spdbench.doctor import env as doctor
from spdbench.attacks.base import registered
from spdbench.doctor.bench import BenchConfig, run_bench
from spdbench.doctor.cost import cost_report, cost_rows, protocol_counts


# --- test attacks, each broken in one way ------------------------------------------------------------
class ZeroDelta(spdbench.Attack):
    defaults = {"steps": 3}

    def perturb(self, images, target, budget, generator=None):
        self.loss_history = [1.0, 0.5, 0.25]
        return torch.zeros_like(images)


class NaNLoss(spdbench.Attack):
    defaults = {"steps": 3}

    def perturb(self, images, target, budget, generator=None):
        self.loss_history = [1.0, float("nan"), 0.5]
        return budget.random(images.cpu(), generator=generator).to(images.device)


class WorseThanNoise(spdbench.Attack):
    """A small delta whose own objective (minus the mean |delta|) prefers the noise baseline."""

    has_objective = True

    def perturb(self, images, target, budget, generator=None):
        return torch.full_like(images, 1 / 255).clamp(max=budget.eps)

    def objective(self, adv, target, clean):
        return -(adv - clean).abs().flatten(1).mean(1)


class DisagreesWithFloat32(spdbench.Attack):
    """Optimal for its own objective in every dtype, but in low precision the objective (and the delta)
    point the opposite way: only the float32 judgement of the low-precision delta can see it."""

    has_objective = True

    @staticmethod
    def _sign(target):
        return 1.0 if target.dtype == torch.float32 else -1.0

    def perturb(self, images, target, budget, generator=None):
        return self._sign(target) * torch.full_like(images, budget.eps)

    def objective(self, adv, target, clean):
        want = self._sign(target) * 16 / 255
        return ((adv - clean) - want).pow(2).flatten(1).mean(1)


def _bench(tmp_path: Path, attacks: tuple[str, ...], dtypes=("float32",)):
    cfg = replace(BenchConfig.for_mode(True, attacks=attacks, dtypes=dtypes, edit_batches=(), metric_pairs=0),
                  compile_backend=None)  # attack cells only: seconds per test
    return run_bench(cfg, tmp_path / "bench", log=lambda line: None)


def _failures_of(report, attack: str) -> list[str]:
    return [f for r in report.data["attacks"] if r["attack"] == attack for f in r["failures"]]


# --- the bench fails on broken attacks ----------------------------------------------------------------
def test_bench_fails_on_a_zero_delta(tmp_path):
    with registered("test-doctor-zero", ZeroDelta):
        report = _bench(tmp_path, ("test-doctor-zero", "none"))
    assert not report.ok
    assert any("zero perturbation" in f for f in _failures_of(report, "test-doctor-zero"))
    assert _failures_of(report, "none") == []  # the reference is exempt: zero is its contract
    saved = json.loads((tmp_path / "bench" / "bench.json").read_text())
    assert saved["status"] == "fail" and any("test-doctor-zero" in f for f in report.failures)
    assert "**FAIL**" in (tmp_path / "bench" / "bench.md").read_text()


def test_bench_fails_on_a_nan_loss(tmp_path):
    with registered("test-doctor-nan", NaNLoss):
        report = _bench(tmp_path, ("test-doctor-nan",))
    failures = _failures_of(report, "test-doctor-nan")
    assert any("loss is nan at iteration 1" in f for f in failures), failures
    assert not any("zero perturbation" in f for f in failures)  # its delta is fine; only the loss is bad
    assert not report.ok


def test_bench_fails_when_the_objective_does_not_beat_noise(tmp_path):
    with registered("test-doctor-worse", WorseThanNoise):
        report = _bench(tmp_path, ("test-doctor-worse",))
    (row,) = report.data["attacks"]
    assert row["objective"]["adv"] > row["objective"]["noise"]
    assert any("objective not improved" in f for f in row["failures"])


def test_bench_checks_low_precision_against_float32(tmp_path):
    with registered("test-doctor-disagree", DisagreesWithFloat32):
        report = _bench(tmp_path, ("test-doctor-disagree",), dtypes=("float32", "bfloat16"))
    rows = {r["dtype"]: r for r in report.data["attacks"]}
    assert rows["float32"]["failures"] == []
    low = rows["bfloat16"]
    assert not any("objective not improved" in f for f in low["failures"])  # its own objective is fooled
    assert any("does not beat noise on the float32 objective" in f for f in low["failures"])
    assert low["fp32_gain_ratio"] < 0 and low["fp32_delta_cosine"] == pytest.approx(-1.0)


def test_bench_passes_real_attacks_and_reports_them(tmp_path):
    report = _bench(tmp_path, ("pca-plus", "spd-encoder", "uniform-noise"), dtypes=("float32", "bfloat16"))
    assert report.ok, report.failures
    for row in report.data["attacks"]:
        assert row["changed_fraction"] > 0.5
        if row["attack"] != "uniform-noise":
            assert row["s_per_iteration"] > 0 and row["objective"]["adv"] < row["objective"]["noise"]
            assert row["grad_norm"] > 0 and row["fp32_gain_ratio"] > 0
    assert "| pca-plus | bfloat16 |" in (tmp_path / "bench" / "bench.md").read_text()


def test_time_limit_leaves_a_report_that_fails(tmp_path):
    cfg = replace(BenchConfig.for_mode(True, attacks=("pca-plus",), dtypes=("float32",), edit_batches=(),
                                       metric_pairs=0), compile_backend=None, time_limit_s=0.0)
    report = run_bench(cfg, tmp_path / "bench", log=lambda line: None)
    assert not report.ok and report.data["attacks"] == []
    assert report.failures == ["not run: pca-plus float32 (time limit 0 s reached)"]
    assert json.loads((tmp_path / "bench" / "bench.json").read_text())["status"] == "fail"


def test_bench_rejects_bad_settings():
    with pytest.raises(spdbench.InputError, match="--dtypes"):
        BenchConfig.for_mode(True, dtypes=("float8",)).validate()
    with pytest.raises(spdbench.UnknownNameError):
        run_bench(BenchConfig.for_mode(True, attacks=("pca-minsu",)), Path("/nonexistent-never-created"))


def test_cli_doctor_bad_inputs_are_one_line(capsys):
    assert cli.main(["doctor", "--quick"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--quick" in err and "--bench" in err and len(err.splitlines()) == 1
    assert cli.main(["doctor", "--bench", "--quick", "--dtypes", "float8", "--out", "/tmp/x"]) == 2
    assert "float8" in capsys.readouterr().err


# --- the environment report ---------------------------------------------------------------------------
def test_doctor_exits_0_and_names_the_essentials(capsys):
    assert cli.main(["doctor", "--json"]) == 0
    checks = {(c["section"], c["name"]): c for c in json.loads(capsys.readouterr().out)}
    assert checks[("targets", "tiny")]["level"] == "ok"
    assert checks[("targets", "tiny-random")]["level"] == "ok"
    assert "parameters" in checks[("targets", "sd15-arch-random")]["value"]
    assert checks[("dtypes", "cpu")]["value"].startswith("float32 ok")
    assert ("libraries", "torch/torchvision") in checks


def test_cuda_wheel_without_gpu_is_a_warning(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", "12.4")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(doctor, "_gpu_hardware_present", lambda: False)
    (cuda,) = [c for c in doctor.torch_checks() if c.name == "cuda"]
    assert cuda.level == "warn" and "no usable GPU" in cuda.value
    monkeypatch.setattr(doctor, "_gpu_hardware_present", lambda: True)
    (cuda,) = [c for c in doctor.torch_checks() if c.name == "cuda"]
    assert "driver" in cuda.hint


@pytest.mark.parametrize("torch_v, tv_v, problem", [
    ("2.14.1+cu130", "0.29.1+cu130", None),
    ("2.5.1", "0.20.1", None),
    ("2.14.1+cu130", "0.28.0+cu130", "pairs with torchvision 0.29"),
    ("2.14.1+cu130", "0.29.1+cpu", "cu130 build but torchvision a cpu"),
    ("2.14.1", None, "not installed"),
])
def test_torchvision_pairing(torch_v, tv_v, problem):
    got = doctor.torchvision_problem(torch_v, tv_v)
    assert (got is None) if problem is None else (problem in got)


def test_small_disk_warns_for_sd15(monkeypatch):
    monkeypatch.setattr(doctor, "_free_bytes", lambda path: 1 * 2**30)
    checks = {c.name: c for c in doctor.disk_checks(sd15_cached=False)}
    assert checks["hub cache"].level == "warn" and "SD1.5" in checks["hub cache"].hint
    assert doctor.disk_checks(sd15_cached=True)[0].level == "ok"


# --- the cost model -----------------------------------------------------------------------------------
def _synthetic_bench() -> dict:
    attack = dict(failures=[], notes=[], seconds=1.0)
    return dict(schema="spdbench-doctor-bench/1", created="now", status="pass",
                config=dict(device="cuda", target="sd15-arch-random", image_size=512),
                target=dict(device_name="Test GPU"),
                attacks=[dict(attack, attack="photoguard-encoder", dtype="float16", universal=False,
                              s_per_image_iteration=0.01),
                         dict(attack, attack="spd-encoder", dtype="float16", universal=True,
                              s_per_image_iteration=0.02),
                         dict(attack="pca-minus", dtype="float16", universal=False, failures=["raised X"], notes=[])],
                edits=[dict(dtype="float16", batch=4, steps=50, images_per_s=2.0, failures=[]),
                       dict(dtype="float16", batch=8, steps=50, images_per_s=3.0, failures=[])],
                metrics=dict(pairs_per_s=100.0, failures=[]))


def test_cost_model_multiplies_the_suites_counts():
    counts = protocol_counts()
    assert (counts["eps"], counts["steps"], counts["images"], counts["train"], counts["prompts"]) == (5, 500, 100, 64, 4)
    rows = {r["attack"]: r for r in cost_rows(_synthetic_bench(), counts)}
    edits = 5 * 100 * 4 / 2.0  # at the suite's edit batch (4)
    scoring = 5 * 100 * 5 / 100.0
    assert rows["photoguard-encoder"]["attack_s"] == pytest.approx(5 * 500 * 100 * 0.01)
    assert rows["spd-encoder"]["attack_s"] == pytest.approx(5 * 500 * 64 * 0.02)
    assert rows["photoguard-encoder"]["total_s"] == pytest.approx(5 * 500 * 100 * 0.01 + edits + scoring)
    assert "attack_s" not in rows["pca-minus"]
    text = cost_report(_synthetic_bench(), counts)
    assert "GPU-hours on this device" in text and "Test GPU" in text and "Not a protocol estimate" not in text
    total_h = (5 * 500 * 100 * 0.01 + edits + scoring) / 3600  # 0.98: shown with two decimals below 1 h
    assert "| photoguard-encoder | float16 | 0.01 |" in text and f"**{total_h:.2f}**" in text


def test_edits_measured_at_fewer_steps_give_bounds_not_a_guess():
    data = _synthetic_bench()
    for e in data["edits"]:
        e["steps"] = 10  # 5x fewer than the protocol's 50
    row = {r["attack"]: r for r in cost_rows(data)}["photoguard-encoder"]
    n_edits = 5 * 100 * 4
    assert row["edits_s_low"] == pytest.approx(n_edits / 2.0)  # the 10-step rate: 50 steps cost at least this
    assert row["edits_s"] == pytest.approx(n_edits / 2.0 * 5)  # scaled by steps: at most this
    assert row["total_s"] - row["total_s_low"] == pytest.approx(row["edits_s"] - row["edits_s_low"])
    assert "measured at 10 steps: bounds for 50" in cost_report(data)


def test_cost_of_a_cpu_quick_bench_says_it_is_not_an_estimate(tmp_path):
    data = _synthetic_bench()
    data["config"] = dict(device="cpu", target="tiny-random", image_size=64)
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(data))
    text = cost_report(path)
    assert "CPU-hours" in text and "not GPU-hours" in text and "Not a protocol estimate" in text
    other = tmp_path / "other.json"
    other.write_text("{}")
    with pytest.raises(spdbench.InputError, match="not a `spdbench doctor --bench` JSON"):
        cost_report(other)


# --- the whole quick bench, as CI runs it -----------------------------------------------------------------
@pytest.mark.slow
def test_quick_bench_cli_exits_0_with_every_attack_and_dtype(tmp_path, capsys):
    out = tmp_path / "quick"
    assert cli.main(["doctor", "--bench", "--quick", "--out", str(out)]) == 0, capsys.readouterr().out
    data = json.loads((out / "bench.json").read_text())
    assert data["status"] == "pass" and not data["skipped"]
    ran = {(r["attack"], r["dtype"]) for r in data["attacks"]}
    names = [n for n in spdbench.list_attacks() if not n.startswith("test-")]
    assert ran == {(n, d) for n in names for d in ("float32", "float16", "bfloat16")}
    assert {(e["dtype"], e["batch"]) for e in data["edits"]} >= {("float32", 1), ("float32", 4), ("float32", 8)}
    assert data["metrics"]["pairs_per_s"] > 0 and data["compile"]["delta_cosine"] > 0.99
    assert cli.main(["doctor", "--cost", str(out / "bench.json")]) == 0
    assert "Not a protocol estimate" in capsys.readouterr().out
