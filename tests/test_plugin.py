"""The pytest plugin as an attack author uses it (pytester runs a separate pytest session)."""
import textwrap
from pathlib import Path



def test_attack_author_three_line_test(pytester):
    helpers = Path(__file__).parent
    pytester.makeconftest(f"import sys; sys.path.insert(0, {str(helpers)!r})")
    pytester.makepyfile(test_author=textwrap.dedent("""
        import pytest, torch, spdbench
        from harness_helpers import fast_suite, fast_images

        class MyNoise(spdbench.Attack):
            '''A third-party attack: sign noise of the full budget.'''
            def perturb(self, images, target, budget, generator=None):
                return budget.eps * torch.sign(torch.randn(images.shape, generator=generator))

        @pytest.fixture(scope="session")
        def spdbench_suite():
            return fast_suite()

        @pytest.mark.spdbench
        def test_my_attack(spdbench_run):
            result = spdbench_run(MyNoise(), images=fast_images(4))
            assert result.ok and result.records[0].protection_mean["ssim"] < 1.0
    """))
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--spdbench-target", "tiny-random", "--strict-markers")
    result.assert_outcomes(passed=1)


def test_plugin_options_are_registered(pytester):
    result = pytester.runpytest("--help")
    result.stdout.fnmatch_lines(["*--spdbench-suite*", "*--spdbench-baseline*"])
