import importlib.metadata
import subprocess
import sys
import warnings

import pytest
import torch

import spdbench
from spdbench.attacks import base as attack_base
from spdbench.errors import InputError, RegistryError, UnknownNameError


def test_builtin_baselines_listed():
    names = spdbench.list_attacks()
    assert {"none", "uniform-noise"} <= set(names)


def test_unknown_attack_suggests_close_names():
    with pytest.raises(UnknownNameError) as info:
        spdbench.get_attack("unifrom-noise")
    msg = str(info.value)
    assert "Did you mean 'uniform-noise'" in msg and "Available:" in msg


def test_duplicate_and_non_attack_registration_rejected():
    with pytest.raises(RegistryError, match="already registered"):
        @spdbench.register("uniform-noise")
        class Other(spdbench.Attack):
            pass

    with pytest.raises(RegistryError, match="subclass of spdbench.Attack"):
        spdbench.register("not-an-attack")(dict)


def test_unknown_parameter_is_named():
    with pytest.raises(InputError, match=r"unknown parameter\(s\) \['stepz'\]"):
        spdbench.get_attack("uniform-noise", stepz=3)


class _PluginAttack(spdbench.Attack):
    """A third-party attack exposed only through an entry point."""

    def perturb(self, images, target, budget, generator=None):
        return budget.project(torch.full_like(images, 1.0))


class _FakeEntryPoint:
    def __init__(self, name, obj=None, error=None):
        self.name, self.value, self._obj, self._error = name, f"thirdparty:{name}", obj, error

    def load(self):
        if self._error:
            raise self._error
        return self._obj


def test_entry_point_plugin_is_listed_and_usable(monkeypatch):
    eps = [_FakeEntryPoint("third-party-ones", _PluginAttack),
           _FakeEntryPoint("broken-plugin", error=ImportError("no module named thirdparty_broken"))]
    real = importlib.metadata.entry_points

    def fake_entry_points(**kw):
        return eps if kw.get("group") == attack_base.ENTRY_POINT_GROUP else real(**kw)

    monkeypatch.setattr(importlib.metadata, "entry_points", fake_entry_points)
    monkeypatch.setattr(attack_base.ATTACKS, "failures", {})  # restored after
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = attack_base.load_entry_points(force=True)
    try:
        assert loaded == ["third-party-ones"]
        assert any("broken-plugin" in str(w.message) for w in caught), "a broken plugin is reported, not fatal"
        assert list(attack_base.ATTACKS.failures) == ["broken-plugin"], "and listed"
        assert "third-party-ones" in spdbench.list_attacks()
        attack = spdbench.get_attack("third-party-ones")
        x = torch.full((1, 3, 8, 8), 0.5)
        delta = attack(x, None, spdbench.Budget("linf", "4/255"))
        assert torch.allclose(delta, torch.full_like(x, 4 / 255))
    finally:
        attack_base.unregister("third-party-ones")


def test_cli_list_prints_attacks():
    out = subprocess.run([sys.executable, "-m", "spdbench.cli", "list"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "uniform-noise" in out.stdout and "none" in out.stdout


class _Scoped(spdbench.Attack):
    def perturb(self, images, target, budget, generator=None):
        return torch.zeros_like(images)


def test_registered_is_scoped_and_restores_the_class_name():
    assert "scoped-test" not in spdbench.list_attacks()
    with attack_base.registered("scoped-test", _Scoped) as cls:
        assert cls is _Scoped and "scoped-test" in spdbench.list_attacks()
        assert spdbench.get_attack("scoped-test").name == "scoped-test"
    assert "scoped-test" not in spdbench.list_attacks()
    assert "name" not in vars(_Scoped) and _Scoped().name == "_Scoped"
    with pytest.raises(KeyError), attack_base.registered("scoped-test", _Scoped):
        raise KeyError("a failing test body")
    assert "scoped-test" not in spdbench.list_attacks(), "removed even when the block raises"


def test_registered_refuses_a_taken_name_and_leaves_it():
    owner = attack_base.attack_class("uniform-noise")
    with pytest.raises(RegistryError, match="already registered"):
        with attack_base.registered("uniform-noise", _Scoped):
            pass
    assert attack_base.attack_class("uniform-noise") is owner and "name" not in vars(_Scoped)


def test_unregister():
    with attack_base.registered("scoped-test", _Scoped):
        assert attack_base.unregister("scoped-test") is _Scoped
        assert "scoped-test" not in spdbench.list_attacks()
    with pytest.raises(UnknownNameError, match="'scoped-tset'.*not registered"):
        attack_base.unregister("scoped-tset")


def test_harness_helpers_register_nothing_on_import():
    """Importing the deliberately broken test attacks must not put them in the registry: the
    registry-wide tests (test_attacks.py) collect `list_attacks()` and would run them."""
    import harness_helpers

    assert not set(spdbench.list_attacks()) & set(harness_helpers.TEST_ATTACKS)


def test_test_attacks_fixture_registers_them(test_attacks):
    assert set(test_attacks) <= set(spdbench.list_attacks())
