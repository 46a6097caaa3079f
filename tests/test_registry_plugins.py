"""Every named kind -- attack, purifier, metric, suite, target -- is one Registry: a plugin from a
temporary package (a module plus a fake distribution's entry_points.txt on sys.path) is listed, runs and
is scored; a broken plugin is reported and listed while the rest load; a typo gets a did-you-mean; a new
attack file dropped into a scanned package is found; and a fifth metric takes no committed entry off
the board (issue 34)."""
from __future__ import annotations

import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

import spdbench
from spdbench.attacks.base import ATTACKS
from spdbench.errors import UnknownNameError
from spdbench.purifiers import get_purifier, list_purifiers
from spdbench.purifiers.base import PURIFIERS
from spdbench.registry import Registry
from spdbench.scoring import metrics
from spdbench.scoring.metrics import DEFAULT_METRICS, METRICS
from spdbench.suites import SUITES, get_suite
from spdbench.targets import TARGETS

ROOT = Path(__file__).resolve().parents[1]
DIST = "spdbench-plug-test"
REGISTRIES = {"attacks": ATTACKS, "purifiers": PURIFIERS, "metrics": METRICS, "suites": SUITES, "targets": TARGETS}
#: what the fake distribution plugs in, per entry-point group: the good plugin, then a broken one
PLUGINS = {"attacks": "plug-ones", "purifiers": "plug-quantize", "metrics": "plug-mad", "suites": "plug-suite",
           "targets": "plug-target"}

MODULE = '''
"""A third-party package with one plugin of every kind."""
import dataclasses

import torch

import spdbench
from spdbench.purifiers import Purifier
from spdbench.scoring import metrics
from spdbench.scoring.metrics import DEFAULT_METRICS
from spdbench.suites import get_suite


class Ones(spdbench.Attack):
    """Pushes every pixel up by the whole budget."""

    def perturb(self, images, target, budget, generator=None):
        return budget.project(torch.ones_like(images))


def quantize(images, levels=16):
    return (images * (levels - 1)).round() / (levels - 1)


QUANTIZE = Purifier("plug-quantize", "quantize", quantize, settings=dict(levels=16),
                    description="round every pixel to one of 16 levels")


@metrics.register("plug-mad", label="MAD-sim", higher_is_better=True, range=(0.0, 1.0),
                  convention="1 - mean absolute difference over RGB, data_range=1")
def mad_similarity(x, y):
    return 1 - (x - y).abs().flatten(1).mean(1)


def load_plug_target(device=None, dtype=None):
    from spdbench.targets import build_tiny

    return build_tiny(7, device=device, dtype=dtype)


_smoke = get_suite("smoke")
SUITE = dataclasses.replace(
    _smoke, name="plug-suite", target="plug-target", image_size=64, eps=("16/255",), prompts=("P3",),
    edit=dataclasses.replace(_smoke.edit, steps=4), attack_steps=3, attack_work=None, attack_batch_size=3,
    n_images=4, purifiers=("plug-quantize",), metrics=(*DEFAULT_METRICS, "plug-mad"), description="a plugin suite")
'''

ENTRY_POINTS = '''
[spdbench.attacks]
plug-ones = spdplug:Ones
plug-broken-attack = spdplug_missing:Nope

[spdbench.purifiers]
plug-quantize = spdplug:QUANTIZE
plug-broken-purifier = spdplug:NOT_THERE

[spdbench.metrics]
plug-mad = spdplug:mad_similarity
plug-broken-metric = spdplug:quantize

[spdbench.suites]
plug-suite = spdplug:SUITE
plug-broken-suite = spdplug_missing:SUITE

[spdbench.targets]
plug-target = spdplug:load_plug_target
plug-broken-target = spdplug:NOT_THERE
'''


@pytest.fixture(scope="module")
def plugins(tmp_path_factory):
    """The fake distribution installed on sys.path and every registry's entry points re-read; all
    taken out again after the module (registries, failures, sys.path, sys.modules)."""
    root = tmp_path_factory.mktemp("site")
    (root / "spdplug.py").write_text(textwrap.dedent(MODULE))
    info = root / f"{DIST.replace('-', '_')}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {DIST}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(ENTRY_POINTS)
    saved = {group: dict(reg.failures) for group, reg in REGISTRIES.items()}
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(root))
        caught = {}
        for group, reg in REGISTRIES.items():
            with warnings.catch_warnings(record=True) as got:
                warnings.simplefilter("always")
                reg.load_entry_points(force=True)
            caught[group] = [str(w.message) for w in got]
        try:
            yield caught
        finally:
            for group, reg in REGISTRIES.items():
                if PLUGINS[group] in reg:
                    reg.remove(PLUGINS[group])
                reg.failures.clear()
                reg.failures.update(saved[group])
            sys.modules.pop("spdplug", None)


def _suggests(fn, typo: str, name: str) -> None:
    with pytest.raises(UnknownNameError) as info:
        fn(typo)
    suggestion = str(info.value).split("Available:")[0]
    assert "Did you mean" in suggestion and repr(name) in suggestion, str(info.value)


# --- one test per kind ---------------------------------------------------------------------------
def test_plugin_attack_is_listed_runs_and_has_a_did_you_mean(plugins):
    assert "plug-ones" in spdbench.list_attacks()
    attack = spdbench.get_attack("plug-ones")
    x = torch.full((1, 3, 48, 48), 0.5)
    delta = attack(x, None, spdbench.Budget("linf", "4/255"))
    assert torch.allclose(delta, torch.full_like(x, 4 / 255))
    assert metrics.score(x + delta, x)["psnr"].item() < 100, "scored: the protected photo differs"
    _suggests(spdbench.get_attack, "plug-one", "plug-ones")


def test_plugin_purifier_is_listed_runs_with_its_settings(plugins):
    assert "plug-quantize" in list_purifiers()
    p = get_purifier("plug-quantize")
    x = torch.rand(2, 3, 48, 48)
    out = p(x)
    assert torch.equal(out, (x * 15).round() / 15) and p.to_dict()["settings"] == {"levels": 16}
    assert metrics.score(out, x)["ssim"].min().item() < 1
    _suggests(get_purifier, "plug-quantise", "plug-quantize")


def test_plugin_metric_is_listed_and_score_includes_it(plugins):
    assert metrics.list_metrics()[:4] == list(DEFAULT_METRICS) and "plug-mad" in metrics.list_metrics()
    info = metrics.get_metric("PLUG-MAD")  # case-insensitive, as the built-ins
    assert (info.label, info.higher_is_better, info.range) == ("MAD-sim", True, (0.0, 1.0))
    x, y = torch.rand(2, 3, 48, 48), torch.rand(2, 3, 48, 48)
    scored = metrics.score(x, y)
    assert set(scored) == {*DEFAULT_METRICS, "plug-mad"}
    assert torch.allclose(scored["plug-mad"], 1 - (x - y).abs().flatten(1).mean(1))
    assert torch.equal(scored["ssim"], metrics.ssim(x, y)), "the built-ins are unchanged beside it"
    _suggests(metrics.get_metric, "plug-md", "plug-mad")


def test_plugin_suite_is_listed_and_names_its_required_metrics(plugins):
    assert "plug-suite" in SUITES
    suite = get_suite("plug-suite")
    assert suite.metrics == (*DEFAULT_METRICS, "plug-mad") and suite.to_dict()["metrics"] == list(suite.metrics)
    assert "metrics" not in get_suite("smoke").to_dict(), "today's suites keep their recorded config"
    _suggests(get_suite, "plug-suit", "plug-suite")


def test_plugin_target_is_listed_and_loads(plugins):
    assert "plug-target" in TARGETS.names()
    target = spdbench.load_target("plug-target")
    assert target.load_spec == "plug-target" and target.name == "tiny-random-7"
    with pytest.raises(spdbench.TargetLoadError, match="Did you mean 'plug-target'"):
        spdbench.load_target("plug-targt")


@pytest.fixture(scope="module")
def plugin_run(plugins, tmp_path_factory):
    """The plugin attack on the plugin suite, edited with the plugin target, purified by the plugin
    purifier and scored with the plugin metric (in this process: the module is on this sys.path)."""
    out = tmp_path_factory.mktemp("plugin-run") / "run"
    return out, spdbench.run("plug-ones", suite="plug-suite", out=out, isolation="none", progress=False)


def test_plugins_of_every_kind_run_and_are_scored_together(plugin_run):
    """The records hold every plugin's part and pass the claims check."""
    from spdbench.verify import claims
    from spdbench.verify.entry import scan

    out, res = plugin_run
    assert res.ok and len(res.records) == 2
    for rec in res.records:
        assert set(rec.protection) == set(rec.imperceptibility) == {*DEFAULT_METRICS, "plug-mad"}
        assert set(rec.purified) == {"plug-quantize"} and "plug-mad" in rec.purified["plug-quantize"]
        assert rec.suite_config["purifier_settings"]["plug-quantize"]["settings"] == {"levels": 16}
        assert "plug-mad" in rec.metric_conventions and rec.suite_config["metrics"][-1] == "plug-mad"
    assert claims.check(scan(out), strict=False).problems == []


def test_a_required_metric_missing_from_a_record_is_a_problem(plugin_run):
    """A suite that requires the plugin metric refuses a record without it (the other direction of the
    fifth-metric test: present when required, optional otherwise)."""
    from spdbench.verify.claims import _list_problems

    rec = plugin_run[1].records[0].model_copy(deep=True)
    assert _list_problems(rec) == []
    rec.protection.pop("plug-mad")
    rec.protection_mean.pop("plug-mad")
    assert any("lacks the required metric(s) ['plug-mad']" in p for p in _list_problems(rec))


def test_a_broken_plugin_is_reported_and_listed_and_the_rest_load(plugins):
    for group, reg in REGISTRIES.items():
        broken = f"plug-broken-{group[:-1]}"
        assert broken in reg.failures, f"{group}: the broken plugin is listed"
        assert any(broken in m and DIST in m for m in plugins[group]), f"{group}: reported, naming its distribution"
        assert PLUGINS[group] in reg.names() and broken not in reg.names()
    assert any("MetricInfo" in m for m in plugins["metrics"]), "a metric plugin naming a plain function is refused"


def test_cli_list_shows_metrics_targets_and_broken_plugins(plugins, capsys):
    from spdbench.cli import main

    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "plug-mad" in out and "plug-target" in out and "plug-broken-suite" in out


def test_recorded_purifier_settings_must_be_the_ones_that_run():
    """A committed record's purifier settings equal the registered purifier's (they are its call's
    keyword arguments); a record stating other settings is a claims problem."""
    import json

    from spdbench.store.records import record_from_data
    from spdbench.verify.claims import Cell, _purifier_settings_problems

    path = next((ROOT / "leaderboard" / "entries").glob("smoke-*/records/*.json"))
    rec = record_from_data(json.loads(path.read_text()), path.name)
    assert rec.suite_config["purifier_settings"] and _purifier_settings_problems(Cell("r.json", rec)) == []
    rec.suite_config["purifier_settings"]["jpeg75"]["settings"]["quality"] = 95
    assert any("purifier_settings.jpeg75" in p for p in _purifier_settings_problems(Cell("r.json", rec)))


# --- package scanning ------------------------------------------------------------------------------
def test_a_new_attack_file_in_the_scanned_package_is_found(tmp_path, monkeypatch):
    """One new file in spdbench/attacks is one new attack: nothing else to edit (here the file lies
    in a folder added to the package's path, so the source tree is left alone)."""
    import spdbench.attacks as pkg

    (tmp_path / "dropped_attack.py").write_text(textwrap.dedent('''
        import torch
        from spdbench.attacks.base import Attack, register


        @register("test-dropped")
        class Dropped(Attack):
            """Returns no perturbation."""

            def perturb(self, images, target, budget, generator=None):
                return torch.zeros_like(images)
        '''))
    monkeypatch.setattr(pkg, "__path__", [*pkg.__path__, str(tmp_path)])
    assert "test-dropped" not in spdbench.list_attacks()
    try:
        assert "dropped_attack" in ATTACKS.scan()  # what the first lookup of a fresh process does
        assert "test-dropped" in spdbench.list_attacks() and spdbench.get_attack("test-dropped").name == "test-dropped"
    finally:
        if "test-dropped" in ATTACKS:
            ATTACKS.remove("test-dropped")
        sys.modules.pop("spdbench.attacks.dropped_attack", None)


def test_registry_basics():
    reg: Registry[int] = Registry("widget", check=lambda n, o: None)

    @reg.register("one", colour="red")
    def one():
        return 1

    assert reg.names() == ["one"] and reg.metadata("one") == {"colour": "red"} and reg.get("one") is one
    with pytest.raises(spdbench.RegistryError, match="already registered by .*one"):
        reg.add("one", lambda: 2)
    with pytest.raises(UnknownNameError, match="unknown widget 'onee'. Did you mean 'one'"):
        reg.get("onee")
    assert reg.remove("one") is one and reg.names() == []


# --- the fifth metric ------------------------------------------------------------------------------
def test_a_fifth_metric_keeps_every_committed_entry_on_the_board(tmp_path):
    """Adding a metric took all committed entries off the board once (the claims check demanded exactly
    the four). Now every entry still loads through the claims check and shows the new metric as not
    measured ("–"); its direction (a distance: higher = more different) comes from the registry."""
    from spdbench.report.board import build_from_dirs

    @metrics.register("test-l1", label="L1dist", higher_is_better=False, range=(0.0, 1.0),
                      convention="mean absolute difference over RGB, data_range=1")
    def l1(x, y):
        return (x - y).abs().flatten(1).mean(1)

    entries = sorted(p for p in (ROOT / "leaderboard" / "entries").iterdir() if p.is_dir() and not p.name.startswith("."))
    try:
        assert "test-l1" in metrics.score(torch.rand(1, 3, 48, 48), torch.rand(1, 3, 48, 48))
        _, skipped = build_from_dirs(entries, tmp_path, ["md", "csv"])
        assert skipped == [], f"entries taken off the board: {skipped}"
        page = (tmp_path / "README.md").read_text()
    finally:
        METRICS.remove("test-l1")
    assert len(entries) > 40
    heads = [ln for ln in page.splitlines() if ln.startswith("| rank |")]
    assert heads and all("L1dist ↑" in h for h in heads), "every protection table shows it, direction from the registry"
    shown = 0
    for block in page.split("\n\n"):
        lines = block.splitlines()
        if not lines or not lines[0].startswith("| rank |"):
            continue
        col = [c.strip() for c in lines[0].strip("|").split("|")].index("L1dist ↑")
        for row in lines[2:]:
            assert row.strip("|").split("|")[col].strip() == "–", row
            shown += 1
    assert shown > 40, "every method row shows it as not measured"
