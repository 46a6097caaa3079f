"""Attack code runs in its own process: every hostile case the review measured on 4814849 (where each
one defeated the harness from inside its process) now leaves the harness's numbers intact."""
from __future__ import annotations

import pytest

import spdbench
from spdbench.harness.plan import plan
from spdbench.data.photos import split_indices
from spdbench.harness.pipeline import load_protection
from spdbench.store.records import Status
from spdbench.suites import get_suite

import hostile_attacks as H
from harness_helpers import fast_images, fast_suite

EPS = 8 / 255


@pytest.fixture(scope="module")
def target():
    return spdbench.load_target("tiny-random")


@pytest.fixture
def spy(tmp_path, monkeypatch):
    """A file the test's attacks may write what they saw to: the sandboxed worker may write only its
    own folder, so this one folder (not the run folder) and the variable naming it are let through."""
    from spdbench.harness import sandbox

    folder = tmp_path / "spy"
    folder.mkdir()
    path = folder / "spy.txt"
    monkeypatch.setenv("SPDBENCH_TEST_SPY", str(path))
    monkeypatch.setattr(sandbox, "EXTRA_WRITE", [str(folder)])
    monkeypatch.setattr(sandbox, "EXTRA_ENV", ["SPDBENCH_TEST_SPY"])
    return path


def _run(attack, target, out, n=4, **kw):
    kw.setdefault("eps", "8/255")
    return spdbench.run(attack, suite=fast_suite(), out=out, target=target, images=fast_images(n), **kw)


def _stored_norm(res, images) -> float:
    rec = res.records[0]
    adv = load_protection(res.out / rec.perturbation_file, images)
    return float((adv - images).abs().amax())


def test_in_place_mutation_cannot_move_the_reference(tmp_path, target):
    images = fast_images(4)
    res = _run(H.InPlaceMutation(), target, tmp_path)
    assert res.ok
    assert _stored_norm(res, images) <= EPS + 1e-6, "old harness: 128/255 applied"
    for rec in res.records:
        assert rec.protection_mean["ssim"] == pytest.approx(1.0, abs=1e-5)
        assert "zero-delta" in rec.flags


def test_budget_mutation_cannot_enlarge_the_enforced_budget(tmp_path, target):
    images = fast_images(4)
    res = _run(H.BudgetMutation(), target, tmp_path)
    assert res.ok
    assert _stored_norm(res, images) <= EPS + 1e-6
    rec = res.records[0]
    assert rec.validation.over_budget_images > 0 and "budget-projected" in rec.flags
    assert rec.validation.max_norm_applied <= EPS + 1e-6


def test_tensor_subclass_cannot_skip_projection(tmp_path, target):
    images = fast_images(4)
    res = _run(H.TensorSubclass(), target, tmp_path)
    assert res.ok
    assert _stored_norm(res, images) <= EPS + 1e-6, "old harness: 127/255 applied, record said max norm 0"
    assert res.records[0].validation.max_norm_returned == pytest.approx(0.5, abs=1e-6)


def test_universal_attack_never_sees_test_images(tmp_path, target, spy):
    images = fast_images(6)
    res = _run(H.UniversalPeek(), target, tmp_path, n=6)
    assert res.ok
    _, test = split_indices(6)
    seen = spy.read_text() if spy.exists() else ""
    assert not any(H.image_sha(images[i]) in seen for i in test)
    # one delta for every image: the test images' stored deltas are the fit's, not per image
    adv = load_protection(tmp_path / res.records[0].perturbation_file, images)
    delta = adv - images
    assert float(delta.abs().amax()) == 0.0, "the fitted delta was zero; per-image adaptation was refused"


def test_heap_and_frames_hold_no_test_images(tmp_path, target, spy):
    images = fast_images(6)
    res = _run(H.HeapWalker(), target, tmp_path, n=6)
    assert res.ok
    train, test = split_indices(6)
    seen = spy.read_text()
    assert any(H.image_sha(images[i]) in seen for i in train), "the walker does find what it was given"
    assert not any(H.image_sha(images[i]) in seen for i in test)


def test_weight_tampering_stays_in_the_worker(tmp_path, target):
    fingerprint = target.fingerprint_now()
    res = _run(H.WeightTamper(), target, tmp_path)
    assert res.ok
    assert target.fingerprint_now() == fingerprint
    for rec in res.records:
        assert rec.protection_mean["ssim"] == pytest.approx(1.0, abs=1e-5), "old harness: SSIM 0.39, zero delta"


def test_weight_tampering_in_process_is_an_error(tmp_path):
    own = spdbench.load_target("tiny-random")
    res = _run(H.WeightTamper(), own, tmp_path, isolation="none")
    assert not res.ok and "changed the target's weights" in res.records[0].error
    assert all(r.isolation == "none" for r in res.records)


@pytest.mark.parametrize("attack,needle", [(H.Exits(), "SystemExit"), (H.Interrupts(), "KeyboardInterrupt"),
                                           (H.HardExit(), "worker ended")])
def test_exit_and_interrupt_become_error_records_and_the_run_goes_on(tmp_path, target, attack, needle):
    res = _run(attack, target, tmp_path, eps=["4/255", "8/255"])
    assert len(res.records) == 4, "both cell groups recorded: the run went on after the first"
    assert all(r.status == Status.error and needle in r.error for r in res.records)


def test_cli_exit_code_is_not_zero_when_the_attack_exits(tmp_path, monkeypatch):
    from spdbench import cli
    from spdbench.attacks.base import ATTACKS

    monkeypatch.setitem(ATTACKS, "test-exits", H.Exits)
    monkeypatch.setattr(H.Exits, "name", "test-exits")
    code = cli.main(["run", "--attack", "test-exits", "--suite", "smoke", "--target", "tiny-random",
                     "--eps", "8/255", "--prompts", "P4", "--out", str(tmp_path / "r"), "--quiet"])
    assert code == 1


def test_attack_past_the_time_limit_is_stopped(tmp_path, target):
    import time

    t0 = time.perf_counter()
    res = _run(H.Sleeps(), target, tmp_path, attack_timeout_s=2)
    assert time.perf_counter() - t0 < 60
    assert all(r.status == Status.error and "time limit" in r.error for r in res.records)


def test_progress_reports_do_not_extend_the_time_limit(tmp_path, target):
    import time

    t0 = time.perf_counter()
    res = _run(H.ReportsForever(), target, tmp_path, attack_timeout_s=2)
    assert time.perf_counter() - t0 < 60
    assert all(r.status == Status.error and "time limit" in r.error for r in res.records)


def test_non_finite_loss_is_an_error_not_ok(tmp_path, target):
    res = _run(H.NaNLoss(), target, tmp_path)
    assert all(r.status == Status.error and "non-finite loss" in r.error for r in res.records)


def test_suite_steps_apply_to_instances_and_names_alike(tmp_path, target, spy):
    res = _run(H.ClaimsSteps(), target, tmp_path)
    assert res.ok and res.records[0].attack_params["steps"] == 3 and res.param_sources["steps"] == "suite"
    assert "steps 3" in spy.read_text(), "old harness: an instance ran its own 100 steps"
    explicit = _run(H.ClaimsSteps(steps=5), target, tmp_path / "b")
    assert explicit.records[0].attack_params["steps"] == 5 and explicit.param_sources["steps"] == "explicit"


@pytest.mark.parametrize("name,preset,norm,eps,steps", [("photoguard-encoder", "madry", "linf", 0.03, 1000),
                                                        ("photoguard-diffusion", "madry", "l2", 8.0, 200),
                                                        ("pca-minus", "guo", "linf", 16 / 255, 40)])
def test_presets_use_their_budget_and_steps(name, preset, norm, eps, steps):
    for attack in (name, spdbench.get_attack(name, preset=preset)):
        p = plan(attack, get_suite("smoke"), params={"preset": preset} if isinstance(attack, str) else None)
        assert [(b.norm, b.eps) for b in p.budgets] == [(norm, pytest.approx(eps))]
        assert p.attack.steps == steps
        assert p.sources["steps"] == p.sources["eps"] == p.sources["norm"] == f"preset:{preset}"


def test_explicit_values_win_over_a_preset(tmp_path, target):
    res = _run("photoguard-encoder", target, tmp_path, eps=None, attack_params={"preset": "madry", "steps": 2})
    assert res.ok
    rec = res.records[0]
    assert rec.eps == pytest.approx(0.03) and rec.norm == "linf" and rec.preset == "madry"
    assert rec.attack_params["steps"] == 2 and rec.param_sources["steps"] == "explicit"
    assert rec.param_sources["eps"] == "preset:madry" and rec.param_sources["step_size"] == "preset:madry"
    assert rec.validation.max_norm_applied <= 0.03 + 1e-6
    assert rec.model_calls["vae_encoder_bwd"] == pytest.approx(2.0), "two steps, one encoder backward each"


def test_records_carry_worker_start_and_model_calls_apart(tmp_path, target):
    res = _run("photoguard-encoder", target, tmp_path)
    rec = res.records[0]
    from spdbench.harness import sandbox

    assert rec.isolation == ("sandbox" if sandbox.supported() is None else "process")
    assert rec.timing.worker_start_s > 0
    assert rec.model_calls["vae_encoder_fwd"] >= 3 and rec.model_calls["unet_fwd"] == 0
    # on CPU the peak memory is the worker's own peak resident set (torch and its model copy: > 50 MB)
    assert rec.timing.peak_memory_bytes is None and rec.timing.peak_rss_bytes > 50 * 2**20


def test_the_worker_warms_the_model_up_once_before_its_first_timed_attack(monkeypatch):
    """Timings are taken after a warm-up: the first request of a worker process passes one image
    through every network untimed; later requests do not repeat it."""
    import torch

    from spdbench.harness import worker

    calls = []

    class Target:
        def warmup(self, images):
            calls.append(tuple(images.shape))

    monkeypatch.setattr(worker, "_warmed_up", False)
    jobs = {"train": {"images": torch.zeros(3, 3, 16, 16), "seed": 0}}
    worker._warm_up(Target(), jobs)
    worker._warm_up(Target(), jobs)
    assert calls == [(1, 3, 16, 16)]
