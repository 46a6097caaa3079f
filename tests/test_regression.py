"""Regression mode: a significant weakening of protection versus a baseline is caught; noise is not."""
import numpy as np
import pytest

import spdbench
from spdbench.scoring.regression import compare
from spdbench.scoring.stats import bootstrap_ci, bootstrap_diff_ci

from harness_helpers import fast_images, fast_suite


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    out = tmp_path_factory.mktemp("baseline")
    return spdbench.run("uniform-noise", suite=fast_suite(), out=out, target="tiny-random",
                        images=fast_images(6)).records


def _shifted(records, delta):
    rng = np.random.default_rng(0)
    out = []
    for r in records:
        vals = np.asarray(r.protection["ssim"])
        new = np.clip(vals + delta + rng.normal(0, 0.002, vals.size), 0, 1).tolist()
        out.append(r.model_copy(update={"protection": {**r.protection, "ssim": new}}))
    return out


def test_weaker_protection_is_a_regression(baseline):
    stronger_baseline = _shifted(baseline, -0.2)  # the baseline protected much better
    found = compare(baseline, stronger_baseline)
    assert found and all(f.metric == "ssim" and f.diff.low > 0 for f in found)


def test_equal_or_stronger_protection_is_not(baseline):
    assert compare(baseline, baseline) == []
    assert compare(_shifted(baseline, -0.1), baseline) == []  # stronger than baseline


def test_bootstrap_intervals_cover_the_mean_and_are_seeded():
    x = np.random.default_rng(1).normal(0.5, 0.1, 40)
    ci = bootstrap_ci(x, seed=3)
    assert ci.low < x.mean() < ci.high and ci == bootstrap_ci(x, seed=3)
    d = bootstrap_diff_ci(x + 0.05, x, seed=0)
    assert d.low == pytest.approx(0.05) and d.high == pytest.approx(0.05)


@pytest.mark.slow
def test_plugin_baseline_option_fails_on_regression(pytester, baseline, tmp_path):
    import json
    from pathlib import Path

    from spdbench.store.records import write_record

    base_dir = tmp_path / "base"
    for r in _shifted(baseline, -0.3):
        write_record(r, base_dir)
    helpers = Path(__file__).parent
    pytester.makeconftest(f"import sys; sys.path.insert(0, {str(helpers)!r})")
    pytester.makepyfile(test_reg="""
        import pytest
        from harness_helpers import fast_suite, fast_images

        @pytest.fixture(scope="session")
        def spdbench_suite():
            return fast_suite()

        def test_noise(spdbench_run):
            spdbench_run("uniform-noise", images=fast_images(6))
    """)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--spdbench-target", "tiny-random",
                                           "--spdbench-baseline", str(base_dir))
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*spdbench regression:*", "*protection ssim weakened by*"])
