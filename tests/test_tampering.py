"""A hostile submitter against `verify`: every tampering case of tampering_cases.py, applied to a copy
of a real run folder, is refused with one clear line at the stage that should catch it; the honest
folder passes; the random draw is unpredictable, recorded and repeatable; and the chance that one
tampered per-image value is caught is what docs/security.md states."""
from __future__ import annotations

import math
import random
import signal
from contextlib import contextmanager

import pytest

from spdbench.verify import remeasure
from spdbench.verify.submit import verify

from entry_helpers import FAST, copy, run_dir, suite_registered  # noqa: F401 (fixtures)
from tampering_cases import CASES, edit_one, set_list

STATIC = [c for c in CASES if c.stage in ("files", "claims", "images")]
SAMPLED = [c for c in CASES if c.stage == "sample"]


@contextmanager
def deadline(seconds: int):
    """Fail instead of hanging (a FIFO once blocked verify forever)."""
    def boom(*_):
        raise TimeoutError(f"verify did not return within {seconds} s")
    old = signal.signal(signal.SIGALRM, boom)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _refused(report, case):
    text = " | ".join(report.problems)
    assert not report.ok, f"{case.name} was accepted"
    assert case.expect in text, f"{case.name}: expected {case.expect!r} in {text!r}"
    assert all("\n" not in p and len(p) < 600 for p in report.problems), report.problems


@pytest.mark.parametrize("case", STATIC, ids=[c.name for c in STATIC])
def test_tampered_files_and_claims_refused(case, run_dir, tmp_path):
    d = copy(run_dir, tmp_path)
    case.edit(d)
    with deadline(120):
        report = verify(d, attack_rerun=False, seed=1)
    _refused(report, case)
    assert not report.remeasured  # refused before any edit was spent on it


@pytest.mark.parametrize("case", SAMPLED, ids=[c.name for c in SAMPLED])
def test_tampered_values_refused_by_remeasurement(case, run_dir, tmp_path):
    d = copy(run_dir, tmp_path)
    case.edit(d)
    report = verify(d, sample=3, attack_rerun=False, seed=1)  # 3 = every image of every cell here
    _refused(report, case)
    assert report.remeasured


def test_honest_folder_passes_sample_with_tiny_deviations(run_dir):
    report = verify(run_dir, sample=3, attack_rerun=False)
    assert report.ok, report.problems
    assert report.remeasured and report.seed is not None
    assert len(report.sampled) == 4 and report.compared >= 4 * 4 * 4
    assert all(v < 1e-3 for k, v in report.max_deviation.items() if k != "psnr"), report.max_deviation
    assert any("SKIPPED" in c for c in report.checks)  # a skipped stage is said, never silent


def test_honest_folder_passes_attack_rerun(run_dir):
    report = verify(run_dir, sample=1)
    assert report.ok, report.problems
    # every budget group is re-run (2 eps x 1 prompt x 2 splits), not one drawn at random: a group made
    # with other settings than its label cannot pass by being the one not drawn
    assert len(report.rerun) == 4 and len(set(report.rerun)) == 4
    assert sum("identical perturbation" in c for c in report.checks) == 2


def test_consistently_relabelled_attack_caught_by_rerun(run_dir, tmp_path):
    case = next(c for c in CASES if c.stage == "rerun")
    d = copy(run_dir, tmp_path)
    case.edit(d)
    _refused(verify(d, sample=1, seed=3), case)


def test_seed_is_unpredictable_recorded_and_repeatable(run_dir):
    a = verify(run_dir, rerun=False)
    b = verify(run_dir, rerun=False)
    assert a.seed != b.seed  # drawn from `secrets`, 63 bits
    picks = [remeasure.draw(7, 2, random.Random(s)) for s in (a.seed, a.seed, b.seed)]
    assert picks[0] == picks[1]


def test_catch_probability_of_one_tampered_value():
    """The number docs/security.md states: one tampered per-image protection value in a cell of n
    images is re-measured with probability k/n (k images drawn per cell); measured on the draw."""
    for n, k in ((7, 2), (4, 2), (36, 2), (7, 1)):
        trials = 4000
        hits = sum(0 in remeasure.draw(n, k, random.Random(seed)) for seed in range(trials))
        p = remeasure.catch_probability(n, k)
        assert p == pytest.approx(min(k, n) / n)
        assert abs(hits / trials - p) < 4 * math.sqrt(p * (1 - p) / trials) + 1e-9, (n, k, hits / trials, p)
    assert remeasure.catch_probability(7, 2, tampered=3) == pytest.approx(1 - (4 * 3) / (7 * 6))


def test_one_tampered_value_is_caught_exactly_when_drawn(run_dir, tmp_path):
    """End to end: one train image's SSIM is tampered in one cell (3 images, 1 drawn). A seed whose
    draw includes it refuses the entry; a seed whose draw misses it accepts it -- the stated limit."""
    d = copy(run_dir, tmp_path)
    edit_one(d, lambda r: (r["protection"]["ssim"].__setitem__(0, 0.01),
                           r["protection_mean"].update(ssim=sum(r["protection"]["ssim"]) / 3)), split="train")
    hit = verify(d, sample=1, attack_rerun=False, seed=_seed_drawing(d, position=0, hit=True))
    miss = verify(d, sample=1, attack_rerun=False, seed=_seed_drawing(d, position=0, hit=False))
    assert not hit.ok and "does not reproduce" in hit.problems[0]
    assert miss.ok, miss.problems


def _seed_drawing(folder, position: int, hit: bool) -> int:
    """A seed whose draw (replayed here as verify makes it) does / does not pick `position` of the
    first train cell of `folder`."""
    from spdbench.verify import claims
    from spdbench.verify import entry as entry_schema

    c = claims.check(entry_schema.scan(folder), FAST)
    first_train = next(x for x in sorted(c.ok_cells, key=lambda x: x.rel) if x.record.split.value == "train")
    for seed in range(1000):
        picks = remeasure.draw_all(c, random.Random(seed), 1)
        if (position in picks[first_train.rel]) == hit:
            return seed
    raise AssertionError("no such seed")


def test_probability_sample_covers_issue_case(run_dir, tmp_path):
    """Issue 16: every per-image SSIM of ONE record set to 0.01 moved a leaderboard row; the
    per-cell sample always includes an image of that record, whatever the seed."""
    d = copy(run_dir, tmp_path)
    edit_one(d, set_list("protection", "ssim", lambda x: 0.01), split="train")
    report = verify(d, sample=1, attack_rerun=False)
    assert not report.ok and "does not reproduce" in " ".join(report.problems)


def test_universal_check_accepts_one_delta_and_refuses_per_image_ones():
    import torch

    from spdbench.verify.claims import universal_problem

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (6, 3, 16, 16), generator=g).double()
    u = torch.randint(-8, 9, (1, 3, 16, 16), generator=g).double()
    d = (x + u).clamp(0, 255) - x                     # how the harness applies one delta
    assert universal_problem(d.short(), x) is None
    ties = d.clone()
    ties[0, 0, 0, 0] += 1 if x[0, 0, 0, 0] + d[0, 0, 0, 0] < 255 else -1  # one rounding tie in 768 positions
    assert universal_problem(ties.short(), x) is None
    per_image = d.clone()
    per_image[2] = torch.randint(-8, 9, (3, 16, 16), generator=g).double().clamp(-x[2], 255 - x[2])
    assert "not one delta" in universal_problem(per_image.short(), x)


def test_real_universal_run_verifies(tmp_path, suite_registered):
    import spdbench

    out = tmp_path / "uap"
    assert spdbench.run("spd-encoder", suite="test-fast", out=out).ok
    report = verify(out, sample=1, attack_rerun=False)
    assert report.ok, report.problems
    assert any("one universal delta" in c for c in report.checks)


@pytest.mark.parametrize("norm,eps", [("linf", 16 / 255), ("linf", 0.03), ("l2", 0.5)])
def test_harness_applies_a_half_level_universal_delta_as_one_delta(norm, eps):
    """A universal u on half levels (SPD's default step 2.5 eps / steps = 0.5/255 at 16/255) used to
    be rounded photo by photo, so 4.9% of positions differed and `submit` refused the run; the
    harness now puts u on whole levels once, inside the budget, before it broadcasts it."""
    import torch

    from spdbench import Budget
    from spdbench.budget import quantize_within
    from spdbench.verify.claims import universal_problem
    from spdbench.harness.protect import enforce

    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (8, 3, 24, 24), generator=g).double() / 255
    budget = Budget(norm, eps)
    u = budget.project((torch.randint(-40, 41, (1, 3, 24, 24), generator=g) + 0.5).double() / 255)
    adv, _returned, over, applied, zero = enforce(u.float(), x.float(), budget, "u", universal=True)
    d = ((adv.double() - x) * 255).round()
    assert universal_problem(d, (x * 255).round()) is None
    free = (x * 255 + d > 0) & (x * 255 + d < 255)              # where a photo is not clamped
    inf = torch.full_like(d, float("inf"))
    spread = torch.where(free, d, -inf).amax(0) - torch.where(free, d, inf).amin(0)
    assert bool(spread[free.any(0)].eq(0).all()), "every unclamped pixel carries the same u"
    assert over == 0 and not zero and applied <= eps + 1e-6
    assert bool(budget.norms((adv.double() - x)).le(eps + 1e-6).all())
    # the old per-photo rounding of the same u is what the check refuses (the regression this guards)
    if norm == "linf":  # (projection onto the L2 ball rescales u off the half levels)
        old = ((quantize_within(x, (x + u).clamp(0, 1), budget) - x) * 255).round()
        assert universal_problem(old, (x * 255).round()) is not None
