"""Issue 34: one checked run request (built once, for the CLI, the API and the grid alike) and one
`kind` on an attack instead of three flags (with the flags still honoured for old plugins)."""
from __future__ import annotations

import pytest
import torch

import spdbench
from spdbench import cli
from spdbench.attacks.base import AttackKind, attack_class, list_attacks, registered
from spdbench.errors import RegistryError, SpdbenchError
from spdbench.harness import request as request_mod
from spdbench.harness.grid import grid_requests
from spdbench.harness.request import RunRequest, build_request

from harness_helpers import fast_images, fast_suite


# --- one request --------------------------------------------------------------------------------
def test_cli_run_resolves_its_inputs_once(tmp_path, monkeypatch):
    """`spdbench run` used to look its suite up three times and prepare and lock its folder twice
    (CLI and harness); now it builds one request and hands it to the pipeline."""
    from spdbench.harness import pipeline

    calls, seen = [], []
    real = request_mod.get_suite
    monkeypatch.setattr(request_mod, "get_suite", lambda *a, **k: calls.append(a) or real(*a, **k))

    def fake_execute(req: RunRequest):
        seen.append(req)
        raise SpdbenchError("stop here")

    monkeypatch.setattr(pipeline, "execute", fake_execute)
    code = cli.main(["run", "--attack", "uniform-noise", "--suite", "smoke", "--prompts", "P4", "--purifiers", "none",
                     "--eps", "8/255", "--out", str(tmp_path / "run"), "--quiet"])
    assert code == 2 and len(calls) == 1 and len(seen) == 1
    req = seen[0]
    assert req.suite.name == "smoke" and req.prompts == ("P4",) and req.purifiers == ()
    assert [b.label for b in req.plan.budgets] == ["linf:8/255"] and req.plan.sources["eps"] == "explicit"
    assert req.out == tmp_path / "run" and not req.out.exists(), "checked, not created, before the stages run"


def test_request_is_frozen_and_checks_before_creating_anything(tmp_path):
    req = build_request("none", fast_suite(), out=tmp_path / "r", target="tiny-random", images=fast_images(2))
    with pytest.raises(AttributeError):
        req.out = tmp_path / "elsewhere"  # type: ignore[misc]
    assert not (tmp_path / "r").exists()
    assert req.image_names == ("image-0", "image-1") and req.target == "tiny-random"


def test_grid_builds_one_checked_request_per_budget(tmp_path):
    reqs = grid_requests(["none", "uniform-noise"], fast_suite(), ["8/255", "16/255"], tmp_path / "g",
                         target="tiny-random", images=fast_images(2))
    assert [(r.attack.name, r.plan.budgets[0].label, r.lock_scope) for r in reqs] == [
        ("none", "linf:8/255", "eps-8o255"), ("none", "linf:16/255", "eps-16o255"),
        ("uniform-noise", "linf:8/255", "eps-8o255"), ("uniform-noise", "linf:16/255", "eps-16o255")]
    assert {r.out for r in reqs} == {tmp_path / "g" / "none", tmp_path / "g" / "uniform-noise"}


def test_a_grid_with_a_bad_input_for_one_attack_runs_nothing(tmp_path):
    """Every attack's request is checked before the first task runs (a parameter one attack lacks
    used to fail midway, after the other attacks' tasks had run)."""
    from spdbench.harness.grid import run_grid

    with pytest.raises(SpdbenchError, match="unknown parameter"):
        run_grid(["uniform-noise", "photoguard-encoder"], fast_suite(), ["8/255"], tmp_path / "g",
                 attack_params={"steps": 2}, target="tiny-random", images=fast_images(2))
    assert not (tmp_path / "g").exists()
    with pytest.raises(SpdbenchError, match="distinct attack names"):
        grid_requests(["none", "none"], fast_suite(), None, tmp_path / "g")


# --- one kind -----------------------------------------------------------------------------------
def test_every_builtin_attack_has_one_kind_and_the_flags_follow_it():
    for name in list_attacks():
        cls = attack_class(name)
        assert isinstance(cls.kind, AttackKind)
        assert (cls.universal, cls.amortized, cls.fits) == (
            cls.kind is AttackKind.universal, cls.kind is AttackKind.amortized, cls.kind is not AttackKind.per_image)
    assert attack_class("spd-encoder").kind is AttackKind.universal
    assert attack_class("amortized-encoder").kind is AttackKind.amortized
    assert attack_class("pca-minus").kind == "per-image"  # a str Enum: the word records and tables use


def test_kind_is_derived_from_a_legacy_plugins_flags():
    """docs/writing-an-attack.md: a plugin written before `kind` sets `universal = True`."""
    class OldUAP(spdbench.Attack):
        universal = True

    class OldAmortized(spdbench.Attack):
        amortized = True

    class Declared(spdbench.Attack):
        kind = "universal"

    class Inherits(spdbench.UniversalAttack):
        pass

    assert OldUAP.kind is AttackKind.universal and OldUAP.fits and not OldUAP.amortized
    assert OldAmortized.kind is AttackKind.amortized and OldAmortized.fits and not OldAmortized.universal
    assert Declared.kind is AttackKind.universal and Declared.universal
    assert Inherits.kind is AttackKind.universal
    with pytest.raises(RegistryError, match="kind 'global' is not one of"):
        class Bad(spdbench.Attack):  # noqa: F841
            kind = "global"


class LegacyUAP(spdbench.Attack):
    """A universal attack written against the old flag (module level: the worker imports it)."""

    universal = True

    def fit(self, train_images, target, budget, generator=None):
        return torch.full_like(train_images[:1], budget.eps)


def test_a_legacy_universal_plugin_runs_as_universal_and_records_keep_their_fields(tmp_path):
    with registered("legacy-uap", LegacyUAP):
        res = spdbench.run("legacy-uap", suite=fast_suite(purifiers=()), out=tmp_path / "r", target="tiny-random",
                           images=fast_images(4), isolation="none", prompts=["P4"])
    assert res.ok
    for r in res.records:
        assert (r.universal, r.amortized) == (True, False)
        assert r.timing.fit_wall_s is not None, "fit once on the train split, applied to both splits"
