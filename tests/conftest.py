"""Shared fixtures. Tests run on CPU with a fixed thread count so results are bitwise repeatable."""
import os

import pytest

pytest_plugins = ["pytester"]
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never try the network in tests (load_sd15 test overrides)


def _test_threads() -> int:
    """$SPDBENCH_TEST_THREADS, else the cores shared among pytest-xdist's workers (at most 2, at least 1).

    Why: with `-n 2` on 2 cores, two workers of 2 threads each oversubscribe the CPU and both slow
    down several-fold; these models are small enough that one thread per worker loses little."""
    if os.environ.get("SPDBENCH_TEST_THREADS"):
        return int(os.environ["SPDBENCH_TEST_THREADS"])
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    return max(1, min(2, (os.cpu_count() or 2) // workers))


torch.set_num_threads(_test_threads())


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module's tests (used by the attack modules through `pytestmark`):
    bitwise-repeatable and light on a shared machine; the previous count is restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_random():
    import spdbench

    return spdbench.load_target("tiny-random")


@pytest.fixture(scope="session")
def photos64():
    import spdbench

    return spdbench.load_photos(n=4, size=64)


@pytest.fixture(autouse=True)
def _private_clean_edit_cache(tmp_path, monkeypatch):
    """Each test gets its own user-level clean-edit cache: a cache shared across tests would make a
    test's counts depend on which tests ran before it."""
    from spdbench.harness.editing import CACHE_ENV

    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "user-cache"))


@pytest.fixture
def test_attacks():
    """The deliberately broken attacks of harness_helpers, registered by name for this test only."""
    from harness_helpers import registered_test_attacks

    with registered_test_attacks() as attacks:
        yield attacks


@pytest.fixture(autouse=True)
def _attack_registry_unchanged():
    """Every test leaves the attack registry as it found it: a leaked registration changes what the
    registry-wide tests collect and run, so the suite would pass or fail by test order."""
    from spdbench.attacks import base

    base.ATTACKS.load()  # import the built-ins first, so loading them is not mistaken for a leak
    before = dict(base.ATTACKS)
    yield
    after = dict(base.ATTACKS)
    if after != before:
        added, removed = sorted(set(after) - set(before)), sorted(set(before) - set(after))
        removed += sorted(n for n in set(after) & set(before) if after[n] is not before[n])  # replaced
        base.ATTACKS.clear()
        base.ATTACKS.update(before)  # restore, so one leaky test does not break the ones after it
        pytest.fail(f"test changed the attack registry (added {added}, removed {removed}); "
                    f"register test-only attacks with spdbench.attacks.base.registered()")
