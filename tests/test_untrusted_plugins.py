"""No plugin code in a trusted process (issue 40): a plugin attack is resolved from entry-point metadata,
constructed and described by a worker, and constructed again there for every cell group; its module
never runs in the harness (a run, or verify's look-ups). A hostile plugin whose import and constructor
leave a mark (a line in a spy file with their process id, an environment variable) proves where they ran.
"""
from __future__ import annotations

import os
import sys
import textwrap
from types import SimpleNamespace

import pytest

import spdbench
from spdbench.attacks.base import AttackSpec, locate_attack
from spdbench.errors import InputError
from spdbench.harness import isolation, sandbox
from spdbench.harness.request import build_request

from entry_helpers import suite_registered  # noqa: F401 (fixture)
from harness_helpers import fast_images, fast_suite

DIST = "spdbench-hostile-test"
NAME = "hostile-plug"
MODULE = '''
"""A plugin that acts the moment it is imported or constructed."""
import os

import torch

import spdbench


def _mark(what):
    path = os.environ.get("SPDBENCH_TEST_SPY")
    if path:
        with open(path, "a") as f:
            f.write(f"{what} {os.getpid()}\\n")


_mark("import")
os.environ["SPDBENCH_HOSTILE_PLUGIN"] = "imported"


class Hostile(spdbench.Attack):
    defaults = {"steps": 10, "strength": 1.0}
    presets = {"loud": {"strength": 2.0}}

    def __init__(self, preset=None, **params):
        super().__init__(preset, **params)
        _mark("construct")
        os.environ["SPDBENCH_HOSTILE_PLUGIN"] = "constructed"

    def perturb(self, images, target, budget, generator=None):
        _mark("perturb")
        return budget.project(torch.ones_like(images) * self.strength)
'''
ISOLATION = "sandbox" if sandbox.supported() is None else "process"


@pytest.fixture(scope="module")
def plugin(tmp_path_factory):
    """The hostile plugin as an installed distribution (a module and a dist-info on sys.path),
    installed after this process read its entry points (conftest's registry check reads them, with
    `ATTACKS.load()`, which imports plugins: that is the API's `get_attack`, not the harness's path)."""
    from spdbench.attacks.base import ATTACKS

    ATTACKS.load()
    root = tmp_path_factory.mktemp("site")
    (root / "hostplug.py").write_text(textwrap.dedent(MODULE))
    info = root / f"{DIST.replace('-', '_')}-2.5.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {DIST}\nVersion: 2.5\n")
    (info / "entry_points.txt").write_text(f"[spdbench.attacks]\n{NAME} = hostplug:Hostile\n")
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(root))
        try:
            yield root
        finally:
            isolation._described.clear()
            sys.modules.pop("hostplug", None)


@pytest.fixture
def spy(tmp_path, monkeypatch):
    """The one file the plugin may write its marks to (let through the sandbox for this test)."""
    folder = tmp_path / "spy"
    folder.mkdir()
    path = folder / "marks.txt"
    monkeypatch.setenv("SPDBENCH_TEST_SPY", str(path))
    monkeypatch.delenv("SPDBENCH_HOSTILE_PLUGIN", raising=False)
    monkeypatch.setattr(sandbox, "EXTRA_WRITE", [str(folder)])
    monkeypatch.setattr(sandbox, "EXTRA_ENV", ["SPDBENCH_TEST_SPY"])
    isolation._described.clear()
    return path


def _marks(path) -> list[tuple[str, int]]:
    if not path.exists():
        return []
    return [(what, int(pid)) for what, pid in (line.split() for line in path.read_text().splitlines())]


def _never_here(spy) -> None:
    here = [m for m in _marks(spy) if m[1] == os.getpid()]
    assert not here, f"plugin code ran in the harness process: {here}"
    assert "hostplug" not in sys.modules, "the plugin's module was imported in the harness process"
    assert "SPDBENCH_HOSTILE_PLUGIN" not in os.environ, "the plugin changed the harness's environment"


def test_a_plugin_name_is_located_from_metadata_alone(plugin, spy):
    where = locate_attack(NAME)
    assert (where.origin, where.entry_point) == ("plugin", "hostplug:Hostile")
    assert where.source == {"distribution": DIST, "version": "2.5", "module": "hostplug"}
    assert _marks(spy) == []
    _never_here(spy)


def test_a_plugin_is_planned_from_what_its_worker_describes(plugin, spy):
    req = build_request(NAME, fast_suite(), "8/255", spy.parent / "run", attack_params={"preset": "loud"},
                        isolation=ISOLATION)
    spec = req.attack
    assert isinstance(spec, AttackSpec) and spec.origin == "plugin" and spec.kind == "per-image"
    assert spec.params == {"steps": 3, "strength": 2.0}, "the suite's steps, the preset's strength"
    assert req.plan.sources["steps"] == "suite" and req.plan.sources["strength"] == "preset:loud"
    assert spec.payload() == {"name": NAME, "entry_point": "hostplug:Hostile", "preset": "loud",
                              "given": {"steps": 3}}, "plain data to the worker, no object"
    marks = _marks(spy)
    assert ("import", marks[0][1]) in marks and ("construct", marks[0][1]) in marks, marks
    _never_here(spy)


def test_a_plugins_bad_parameter_is_one_input_error_from_its_worker(plugin, spy):
    with pytest.raises(InputError, match="unknown parameter"):
        build_request(NAME, fast_suite(), "8/255", spy.parent / "run", attack_params={"sterngth": 1.0},
                      isolation=ISOLATION)
    _never_here(spy)


def test_a_plugin_runs_constructed_only_in_its_worker(plugin, spy):
    target = spdbench.load_target("tiny-random")
    res = spdbench.run(NAME, suite=fast_suite(), out=spy.parent / "run", target=target, images=fast_images(4),
                       eps="8/255", isolation=ISOLATION, progress=False)
    assert res.ok, [r.error for r in res.records]
    rec = res.records[0]
    assert rec.attack_source["distribution"] == DIST and rec.attack_source["version"] == "2.5"
    assert "attack-from-caller" not in rec.flags
    assert rec.validation.max_norm_applied == pytest.approx(8 / 255, abs=1e-6), "the plugin's delta was used"
    perturbed = {pid for what, pid in _marks(spy) if what == "perturb"}
    assert perturbed and os.getpid() not in perturbed
    _never_here(spy)


def test_verify_looks_plugins_up_without_importing_them(plugin, spy):
    """What verify asks of an installed attack (its kind, a preset's budget, its network cap)."""
    from spdbench.verify import claims, submit

    rec = SimpleNamespace(attack=NAME, preset="loud", norm="linf", eps=8 / 255, universal=False, amortized=False)
    assert submit._installed_attack_problem(rec) is None
    assert claims._preset_budget_is(rec) is False, "the plugin's preset declares no budget"
    assert claims._network_cap(NAME) == claims.MAX_VALUES
    _never_here(spy)


def test_verify_reruns_a_plugin_entry_without_importing_it(plugin, spy, suite_registered, tmp_path):
    """`spdbench.run` by name, then `verify` (claims, the kind check, every group re-run): the plugin's
    marks come from workers only, and the entry verifies."""
    from spdbench.verify.submit import verify

    out = tmp_path / "run"
    res = spdbench.run(NAME, suite="test-fast", out=out, progress=False)
    assert res.ok, [r.error for r in res.records]
    ran = [m for m in _marks(spy) if m[0] == "perturb"]
    report = verify(out, sample=1, seed=3)
    assert report.ok, report.problems
    assert any(c.startswith("attack re-run") for c in report.checks), report.checks
    assert len([m for m in _marks(spy) if m[0] == "perturb"]) > len(ran) > 0, "run, then re-run, in workers"
    _never_here(spy)


def test_a_builtin_goes_to_the_worker_as_plain_data_and_a_callers_object_as_itself():
    builtin = AttackSpec.from_instance(spdbench.get_attack("pca-minus", steps=2))
    assert builtin.origin == "builtin" and "object" not in builtin.payload()
    assert builtin.payload()["given"]["steps"] == 2 and builtin.build().params == builtin.params

    class Mine(spdbench.Attack):
        def perturb(self, images, target, budget, generator=None):
            return images * 0

    mine = AttackSpec.from_instance(Mine())
    assert mine.origin == "caller" and mine.payload()["object"] is mine.instance


def test_list_describes_a_plugin_from_its_worker_without_importing_it(plugin, spy, capsys):
    """`spdbench list`: the plugin's kind and presets come from a worker, its description from its
    distribution's metadata; its import and constructor leave marks only from another process."""
    from spdbench.cli import main

    assert main(["list"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith(f"  {NAME} "))
    assert line.split()[1] == "per-image" and "presets: loud" in line and f"[plugin: {DIST} 2.5]" in line, line
    marks = _marks(spy)
    assert ("import", marks[0][1]) in marks and marks[0][1] != os.getpid(), marks
    _never_here(spy)


def test_doctor_bench_never_calls_a_plugin_in_its_process(plugin, spy):
    """The bench calls attacks in its own process, so it benches built-ins only: a plugin is listed
    (metadata only) as not benched, and naming one is refused in one line."""
    from spdbench.doctor import bench

    cfg = bench.BenchConfig.for_mode(quick=True)
    names = bench._attack_names(cfg)
    assert NAME not in names and "pca-minus" in names
    rows = bench.plugin_rows()
    assert [(r["attack"], r["distribution"], r["benched"]) for r in rows if r["attack"] == NAME] == [(NAME, DIST, False)]
    with pytest.raises(InputError, match=f"attack '{NAME}' is a plugin") as err:
        bench._attack_names(bench.BenchConfig.for_mode(quick=True, attacks=(NAME,)))
    assert "\n" not in str(err.value) and f"spdbench run --attack {NAME}" in str(err.value)
    assert "not benched: plugin(s) " + NAME in bench.markdown(dict(
        config=dict(cfg.__dict__), environment={"libraries": {}}, created="now", attacks=[], plugins=rows))
    assert _marks(spy) == []
    _never_here(spy)
