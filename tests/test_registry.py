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
    monkeypatch.setattr(attack_base, "_REGISTRY", dict(attack_base._REGISTRY))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = attack_base.load_entry_points(force=True)
    assert loaded == ["third-party-ones"]
    assert any("broken-plugin" in str(w.message) for w in caught), "a broken plugin is reported, not fatal"
    assert "third-party-ones" in spdbench.list_attacks()
    attack = spdbench.get_attack("third-party-ones")
    x = torch.full((1, 3, 8, 8), 0.5)
    delta = attack(x, None, spdbench.Budget("linf", "4/255"))
    assert torch.allclose(delta, torch.full_like(x, 4 / 255))


def test_cli_list_prints_attacks():
    out = subprocess.run([sys.executable, "-m", "spdbench.cli", "list"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "uniform-noise" in out.stdout and "none" in out.stdout
