"""Work matching (issue 35): a suite's work budget gives each attack the steps it buys, measured."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from spdbench.data import photos
from spdbench.errors import AttackError, InputError
from spdbench.harness import work_match
from spdbench.harness.plan import plan
from spdbench.harness.request import build_request, load_inputs
from spdbench.harness.runner import AttackRunner
from spdbench.scoring.work import known_weights
from spdbench.suites import get_suite


def test_derive_steps_floors_the_budget_over_a_step():
    assert work_match.derive_steps(40.0, 1.0, 0.0, "a") == 40
    assert work_match.derive_steps(40.0, 1.652, 0.0, "a") == 24   # 24 * 1.652 = 39.6 <= 40 < 25 * 1.652
    assert work_match.derive_steps(40.0, 1.0, 10.0, "a") == 30    # the once-only work comes off first
    assert work_match.derive_steps(40.0, 0.1, 0.0, "a") == 400    # no float shortfall: 400 * 0.1 == 40


def test_derive_steps_refuses_what_cannot_be_matched():
    with pytest.raises(AttackError, match="--match steps"):
        work_match.derive_steps(40.0, 0.0, 3.0, "flat")
    with pytest.raises(InputError, match="buys no step"):
        work_match.derive_steps(1.0, 5.0, 0.0, "dear")


def test_plan_marks_suite_work_and_finishes_stochastic_attacks_on_the_boundary():
    smoke = get_suite("smoke")
    p = plan("advdm", smoke, match="work")
    assert p.work == smoke.attack_work == 40.0
    assert p.sources["steps"] == "suite-work" and p.sources["finish"] == "suite-work"
    assert p.attack.params["finish"] == "boundary"
    it = plan("advdm", smoke, match="steps")
    assert it.work is None and it.sources["steps"] == "suite" and it.attack.params["steps"] == 40
    assert it.attack.params["finish"] is None
    enc = plan("photoguard-encoder", smoke, match="work")  # deterministic: its finish stays its anchor's
    assert enc.sources["steps"] == "suite-work" and enc.attack.params["finish"] is None
    own = plan("advdm", smoke, params={"steps": 7}, match="work")
    assert own.work is None and own.attack.params["steps"] == 7


def test_a_suite_without_a_work_budget_keeps_its_records_unchanged():
    smoke = get_suite("smoke")
    assert smoke.to_dict()["attack_work"] == 40.0
    assert "attack_work" not in get_suite("smoke", attack_work=None).to_dict()


@pytest.mark.parametrize("attack", ["photoguard-encoder", pytest.param("advdm", marks=pytest.mark.slow)])
def test_the_probe_measures_one_steps_passes_with_the_harness_counter(attack):
    """photoguard-encoder: one encoder pass forward and backward per step = 1.0; advdm adds one UNet
    pass forward and backward, whose FLOPs come from the committed table. Measured by running the
    attack for 1 and 2 steps on the training photos (in this process: isolation "none", the same
    counter as in a worker)."""
    torch.manual_seed(0)
    names = list(photos.BUNDLED_NAMES[:3])  # a 2:1 split: two training photos, one batch
    request = build_request(attack, "smoke", eps="8/255", prompts=["P3"], purifiers=[], isolation="none",
                            progress=False, images=photos.load_photos(size=128, names=names), image_names=names)
    inputs = load_inputs(request)
    with AttackRunner("none", inputs.target, None) as runner:
        match = work_match.probe(request, inputs, runner)
    weights = known_weights(inputs.target.fingerprint, 128)
    expected = 1.0 if attack == "photoguard-encoder" else 1.0 + weights["unet_fwd"] + weights["unet_bwd"]
    assert match.per_step == pytest.approx(expected, rel=1e-6)
    assert match.once >= 0.0
    # probed on the 1-photo test split's shape (its per-batch work weighs most per photo there)
    assert match.photos == 1
    if attack == "photoguard-encoder":  # its target latent: one encoder forward per batch (1 photo)
        assert match.once == pytest.approx(0.5, rel=1e-6) and match.steps == 39
    assert match.steps == work_match.derive_steps(40.0, match.per_step, match.once, attack)
    assert match.steps < 40 or attack == "photoguard-encoder"


@pytest.mark.slow
def test_a_work_matched_run_records_the_derived_steps_and_where_they_came_from(tmp_path):
    """End to end through a worker: the probe's steps are what the records hold, with source
    "suite-work", a stochastic attack finishes on the boundary, the row is its own configuration,
    and the work it spent per photo (the harness's count) is within the budget."""
    from harness_helpers import fast_images, fast_suite

    import spdbench
    from spdbench.scoring.work import encoder_equivalents, pass_flops, pass_weights
    from spdbench.store.records import method_label
    from spdbench.targets import load_target

    suite = dataclasses.replace(fast_suite(attack_work=5.0), name="test-work")
    result = spdbench.run("advdm", suite, out=tmp_path / "run", images=fast_images(4), isolation="process",
                          progress=False)
    rec = next(r for r in result.records if r.split.value == "train")
    weights = pass_weights(pass_flops(load_target("tiny-random"), 64))
    per_step = 1.0 + weights["unet_fwd"] + weights["unet_bwd"]
    assert rec.attack_params["steps"] == work_match.derive_steps(5.0, per_step, 0.0, "advdm") > 1
    assert rec.param_sources["steps"] == "suite-work" and rec.attack_params["finish"] == "boundary"
    assert rec.suite_config["attack_work"] == 5.0
    assert method_label(rec) == "advdm (work-matched)"
    for r in result.records:  # every split's photos within the budget, not only the probed shape's
        assert encoder_equivalents(r.model_calls, weights) <= 5.0 + 1e-6, r.split


def test_the_probe_runs_on_the_split_whose_photos_share_the_fewest_batches():
    assert work_match.probe_photos([7, 4], 11) == 4     # smoke: one batch each, 4 photos share less
    assert work_match.probe_photos([64, 36], 4) == 36   # ceil(36/4)/36 == ceil(64/4)/64: the smaller
    assert work_match.probe_photos([4, 5], 4) == 5      # 2 batches for 5 photos weigh more than 1 for 4
    assert work_match.probe_photos([5, 0], 8) == 5


class _PerBatchCost:
    """A runner whose attack spends `once` encoder passes (fwd) per batch and one pass fwd+bwd per
    step and photo -- the shape of mist-v2's surrogate fine-tuning; counts as the worker reports
    them (passes per photo of the job)."""

    def __init__(self, once: float):
        self.once, self.photos = once, []

    def calls(self, steps: int, n: int, batch_size: int) -> dict:
        batches = -(-n // batch_size)
        per_photo = self.once * batches / n
        return {"vae_encoder_fwd": steps + per_photo / 0.5, "vae_encoder_bwd": float(steps)}

    def run(self, attack, budget, jobs, batch_size):
        from spdbench.harness.protect import SplitOutput
        (name, job), = jobs.items()
        self.photos.append(len(job["images"]))
        return {name: SplitOutput(delta=torch.zeros(1), model_calls=self.calls(
            attack.params["steps"], len(job["images"]), batch_size))}, 0.0


def test_a_per_batch_cost_is_probed_where_it_weighs_most_so_every_split_is_within_budget():
    """smoke's 11 photos split 7:4, one batch each: a fixed cost of 10 passes per batch is 1.43 per
    training photo but 2.5 per test photo. Probed on 4 photos, the derived steps keep the test split
    within the 40-pass budget; probed on the 7 training photos (the old rule) it went over."""
    from types import SimpleNamespace

    from spdbench.scoring.work import encoder_equivalents

    request = build_request("photoguard-encoder", "smoke", eps="8/255", prompts=["P3"], purifiers=[],
                            isolation="none", progress=False)
    suite = request.suite
    inputs = SimpleNamespace(images=torch.zeros(11, 3, 128, 128), masks=None,
                             target=SimpleNamespace(fingerprint="e0a9820bca1b1f17"))
    weights = known_weights("e0a9820bca1b1f17", 128)
    runner = _PerBatchCost(once=10.0)
    match = work_match.probe(request, inputs, runner)
    assert runner.photos == [4, 4] and match.photos == 4
    assert match.once == pytest.approx(2.5) and match.steps == 37
    train, test = photos.split_indices(11, suite.split_seed)
    for n in (len(train), len(test)):
        assert encoder_equivalents(runner.calls(match.steps, n, suite.attack_batch_size), weights) <= 40.0
    old = work_match.derive_steps(40.0, 1.0, 10.0 / len(train), "x")  # the training split's shape
    assert encoder_equivalents(runner.calls(old, len(test), suite.attack_batch_size), weights) > 40.0


def test_an_attack_that_makes_no_model_pass_keeps_the_suites_iterations():
    """Zero passes in 1 and in 2 steps: its steps cost no model work, so it runs at the suite's
    iteration budget, recorded as source "suite" (not "suite-work"), with its own finish."""
    from types import SimpleNamespace

    from spdbench.harness.protect import SplitOutput

    class NoPasses:
        def run(self, attack, budget, jobs, batch_size):
            return {"train": SplitOutput(delta=torch.zeros(1), model_calls={"unet_fwd": 0.0})}, 0.0

    names = list(photos.BUNDLED_NAMES[:3])
    request = build_request("advdm", "smoke", eps="8/255", prompts=["P3"], purifiers=[], isolation="none",
                            progress=False, images=photos.load_photos(size=128, names=names), image_names=names)
    inputs = SimpleNamespace(images=photos.load_photos(size=128, names=names), masks=None,
                             target=SimpleNamespace(fingerprint="e0a9820bca1b1f17"))
    matched, match = work_match.matched(request, inputs, NoPasses())
    assert match.steps == 0 and "no model pass" in match.describe()
    assert matched.plan.attack.params["steps"] == 40 and matched.plan.sources["steps"] == "suite"
    assert matched.plan.attack.params["finish"] is None and matched.plan.sources["finish"] == "default"
