"""pytest plugin (registered under `pytest11`): an attack author's tests in three lines.

    @pytest.mark.spdbench(eps=["16/255"])
    def test_my_attack(spdbench_check):
        spdbench_check(MyAttack)   # fails unless it stays in budget, is deterministic and *protects*

`spdbench_check(attack, **kw)` runs `spdbench.testing.check.check_attack` (seconds on 2 CPU cores: the
trained tiny target, 64 px, few steps) and fails the test with every failed check listed; it
returns the report. `spdbench_run(attack, **run_kwargs)` runs the whole harness on the suite
(minutes), for end-to-end tests. The `spdbench` marker's keyword arguments are the defaults of
both fixtures in that test (check_attack's `eps`, `norms`, `steps`, `params`, ... or `run`'s).

Options: --spdbench-suite (default smoke), --spdbench-target (default: the suite's, and the
trained tiny target for spdbench_check), --spdbench-baseline DIR (regression mode: fail when
protection weakens significantly). To use a custom suite, override the session-scoped
`spdbench_suite` fixture in a conftest.py (or the test module) with `@pytest.fixture(scope="session")`.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from spdbench.store.records import load_records
from spdbench.suites import get_suite
from spdbench.targets import load_target
from spdbench.testing.check import check_attack


def pytest_addoption(parser) -> None:
    group = parser.getgroup("spdbench", "spdbench immunization harness")
    group.addoption("--spdbench-suite", default="smoke", help="suite for the spdbench fixtures (default smoke)")
    group.addoption("--spdbench-target", default=None, help="target override (tiny, tiny-random, folder, hub id)")
    group.addoption("--spdbench-device", default=None, help="device for the spdbench fixtures (cpu, cuda)")
    group.addoption("--spdbench-baseline", default=None,
                    help="run folder of baseline records; spdbench_run fails on a significant regression")


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "spdbench(**defaults): a test of an attack through spdbench; the keyword "
                            "arguments are the defaults of spdbench_check / spdbench_run in that test")


@pytest.fixture(scope="session")
def spdbench_suite(request):
    return get_suite(request.config.getoption("--spdbench-suite"))


def _device(config) -> str | None:
    """--spdbench-device, or under pytest-xdist on a multi-GPU machine one GPU per worker (gwN -> cuda:N)."""
    device = config.getoption("--spdbench-device")
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    if device in (None, "cuda") and worker.startswith("gw") and torch.cuda.is_available():
        return f"cuda:{int(worker[2:]) % torch.cuda.device_count()}"
    return device


@pytest.fixture(scope="session")
def spdbench_target(request, spdbench_suite):
    name = request.config.getoption("--spdbench-target") or spdbench_suite.target
    return load_target(name, device=_device(request.config))


@pytest.fixture(scope="session")
def _spdbench_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("spdbench-edit-cache")


def _marker_defaults(request) -> dict:
    marker = request.node.get_closest_marker("spdbench")
    return dict(marker.kwargs) if marker is not None else {}


@pytest.fixture
def spdbench_check(request) -> Callable[..., Any]:
    """`spdbench_check(attack, **check_attack_kwargs) -> AttackReport`; fails the test on any failed check."""
    defaults = _marker_defaults(request)
    target = request.config.getoption("--spdbench-target")
    if target and "target" not in defaults:
        defaults["target"] = target

    def _check(attack, **kwargs):
        report = check_attack(attack, **{**defaults, **kwargs})
        if not report.ok:
            pytest.fail(str(report), pytrace=False)
        return report

    return _check


@pytest.fixture
def spdbench_run(request, spdbench_suite, spdbench_target, _spdbench_cache, tmp_path) -> Callable[..., Any]:
    """`spdbench_run(attack, **run_kwargs) -> RunResult`, on the session's target, into tmp_path.

    Clean edits are cached for the whole session. With --spdbench-baseline, a significant
    weakening versus the baseline records fails the test.
    """
    from spdbench.harness.pipeline import run  # deferred: the plugin loads in every pytest session
    from spdbench.scoring.regression import compare  # deferred: (pandas) the plugin loads in every pytest session

    baseline = request.config.getoption("--spdbench-baseline")

    defaults = _marker_defaults(request)

    def _run(attack, **kwargs):
        kwargs = {**defaults, **kwargs}
        kwargs.setdefault("out", tmp_path / "run")
        kwargs.setdefault("cache_dir", _spdbench_cache)
        result = run(attack, suite=spdbench_suite, target=spdbench_target, **kwargs)
        if baseline:
            regressions = compare(result.records, load_records(baseline))
            if regressions:
                pytest.fail("spdbench regression:\n" + "\n".join(map(str, regressions)), pytrace=False)
        return result

    return _run
