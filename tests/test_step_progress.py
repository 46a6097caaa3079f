"""Progress inside one cell group (issue 36): the attack's optimization steps reach the harness
from its sandboxed worker as checked "progress" frames and become "about N s left"."""
import io

import pytest

from spdbench.harness.progress import Stages, StepProgress
from spdbench.harness.request import build_request, load_inputs
from spdbench.harness.runner import AttackRunner

from harness_helpers import fast_images, fast_suite


def _stages() -> tuple[Stages, io.StringIO]:
    out = io.StringIO()
    return Stages("run", stream=out, every_s=0.0), out


def test_steps_become_a_fraction_of_the_group_with_an_estimate():
    stages, out = _stages()
    stages.stage("protecting", "x at eps 8/255: 4 photos")
    progress = StepProgress(stages, optimizations=2)
    for step in (1, 2):
        progress(step, 4)
    progress(1, 4)  # the step count starts again: the second batch's optimization
    lines = out.getvalue().splitlines()
    assert "step 2/4 of optimization 1/2, about" in lines[2] and lines[2].endswith("left")
    assert "step 1/4 of optimization 2/2" in lines[3]
    progress(4, 4)  # the group's last step: done, the next stage says so
    progress(1, 4)  # a third optimization where two were expected: no estimate rather than a wrong one
    assert len(out.getvalue().splitlines()) == 4


def test_a_fraction_outside_an_open_stage_shows_nothing():
    stages, out = _stages()
    assert stages.fraction(0.5, "step 1/2") is None and out.getvalue() == ""
    stages.stage("protecting")
    assert stages.fraction(0.0, "step 0/2") is None and stages.fraction(1.0, "step 2/2") is None


@pytest.mark.parametrize("isolation", ["sandbox", "none"])
def test_a_sandboxed_attacks_steps_reach_the_harness(isolation):
    """Three photos in batches of two: two optimizations of four steps, each reported to its end
    (the worker rate-limits its frames but always sends an optimization's last step)."""
    suite = fast_suite(attack_steps=4, attack_batch_size=2)
    request = build_request("photoguard-encoder", suite, eps="16/255", prompts=["P3"], purifiers=[], progress=False,
                            isolation=isolation, target="tiny-random", images=fast_images(3),
                            image_names=["a", "b", "c"])
    inputs = load_inputs(request)
    seen: list[tuple[int, int]] = []
    with AttackRunner(isolation, inputs.target, None) as runner:
        runner.on_progress = lambda step, steps: seen.append((step, steps))
        outputs, _ = runner.run(request.plan.attack, request.plan.budgets[0],
                                {"train": {"images": inputs.images, "seed": 0}}, batch_size=2)
    assert outputs["train"].delta.shape == inputs.images.shape
    assert seen.count((4, 4)) == 2 and all(1 <= s <= n == 4 for s, n in seen)


@pytest.mark.slow
def test_verify_counts_its_edits_by_prompt(capsys):
    """verify's editing stage (one batched edit call per prompt) says how many prompts are done and
    what is left, on a committed two-prompt entry (no attack re-run: only the edits are counted)."""
    from spdbench import cli

    assert cli.main(["verify", "leaderboard/entries/smoke-none/", "--sample", "1", "--no-attack-rerun",
                     "--seed", "1"]) == 0
    err = capsys.readouterr().err
    assert "editing 1 image(s) of each of 8 cells again" in err and "1/2 prompts done, about" in err


def test_an_attack_that_never_reports_its_steps_still_gets_an_estimate(tmp_path, monkeypatch, capsys):
    """A plugin with a loop of its own that never calls report_step: under work matching its first
    protecting stage still gets an estimate, from the probe the harness timed itself (shown where it
    is a second or more; these photos take less, so the estimate handed to the stage is checked)."""
    from spdbench.attacks import optim
    from spdbench.harness.pipeline import run

    monkeypatch.setattr(optim, "report_step", lambda step, steps: None)  # as if the loop were its own
    given = []
    stage = Stages.stage

    def recording(self, name, detail="", estimate_s=None, **kw):
        given.append((name, estimate_s))
        return stage(self, name, detail, estimate_s, **kw)

    monkeypatch.setattr(Stages, "stage", recording)
    run("photoguard-encoder", fast_suite(attack_work=8.0, eps=("8/255", "16/255")), out=tmp_path / "r",
        target="tiny-random", images=fast_images(3), image_names=["a", "b", "c"], progress=True,
        isolation="none", purifiers=[])
    protecting = [e for name, e in given if name == "protecting"]
    assert len(protecting) == 2 and protecting[0] is not None and protecting[0] > 0, given
    assert protecting[1] is None, "the second group's estimate is the first group's length (Stages.took)"
    err = capsys.readouterr().err.splitlines()
    assert not [ln for ln in err if "step " in ln and "left" in ln], "no step was reported"


def test_the_probe_estimate_scales_with_the_photos_only_for_a_per_image_attack():
    from spdbench.harness.work_match import WorkMatch

    match = WorkMatch(budget=40.0, per_step=1.0, once=0.0, steps=40, step_s=0.5, once_s=2.0, photos=7)
    assert match.seconds(40, 7, per_image=True) == pytest.approx(22.0)
    assert match.seconds(40, 11, per_image=True) == pytest.approx(22.0 * 11 / 7)
    assert match.seconds(40, 11, per_image=False) == pytest.approx(22.0)  # a fit sees the training photos
    assert WorkMatch(budget=40.0, per_step=1.0, once=0.0, steps=40).seconds(40, 11, True) is None
