"""The pytest plugin as an attack author uses it (pytester runs a separate pytest session)."""
import textwrap

import pytest
from pathlib import Path



@pytest.mark.slow
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


SHORT_TEST = textwrap.dedent('''
    import pytest, torch, spdbench

    class MyEncoderAttack(spdbench.GradientAttack):
        """Pull the latent toward zero (a PhotoGuard-encoder-like objective)."""
        defaults = {**spdbench.GradientAttack.defaults, "init": "zero"}
        def objective_loss(self, target, adv, clean, generator=None):
            return target.latents(adv).float().pow(2).flatten(1).sum(1)

    class DoesNothing(spdbench.Attack):
        """Returns zeros: ran fine, protects nothing."""
        has_objective = True
        def perturb(self, images, target, budget, generator=None):
            return torch.zeros_like(images)
        def objective(self, adv, target, clean):
            return target.latents(adv).float().pow(2).flatten(1).sum(1)

    @pytest.mark.spdbench(eps=["16/255"])
    def test_protects(spdbench_check):
        report = spdbench_check(MyEncoderAttack)
        assert {c.setting.split()[0] for c in report.checks if c.name == "beats-noise"} >= {"linf:16/255"}

    @pytest.mark.spdbench(eps=["16/255"], norms=["linf"])
    def test_zero_attack_is_caught(spdbench_check):
        spdbench_check(DoesNothing)
''')


@pytest.mark.slow
def test_short_check_asserts_protection_and_the_marker_sets_defaults(pytester):
    """The README's short test: an attack that protects passes in seconds; one returning zeros (which
    `spdbench_run(...).ok` let through) fails, naming the failed checks."""
    pytester.makepyfile(test_author=SHORT_TEST)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--strict-markers", "-q")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*FAIL non-zero*linf:16/255 train*", "*FAIL beats-noise*"])
