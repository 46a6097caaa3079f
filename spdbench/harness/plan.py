"""What an attack will run with: its parameters, its budgets, and where each value came from.

One place applies the rules, the same way for an attack given by name and for an instance:
- a value the user gave explicitly (a parameter, `eps`, `norm`) is used as given;
- otherwise a preset's values are used exactly — its parameters, its steps and its budget
  (`preset_budgets`), so `--preset madry` reproduces the paper's setting and says so;
- otherwise the suite's budget applies to every attack with a `steps` parameter: by default its
  *work* budget (`Suite.attack_work`, encoder-equivalent passes per photo; the steps derived from
  the passes one step costs, measured by harness/work_match.py: methods compared at equal work),
  or with `match="steps"` its iteration budget (`Suite.attack_steps`: equal iterations, the
  board's second view, docs/comparisons.md); the suite's eps grid and norm apply;
- otherwise the attack's default.
The record keeps `param_sources`, so nobody has to guess which rule produced a number.

The plan holds the attack as plain data (`AttackSpec`), never a plugin's object: a built-in is
constructed here (our own code) to check its parameters, a plugin is looked up in entry-point
metadata and constructed and described by a worker (`isolation.describe_plugin`), so its module
never runs in the harness; only an instance the Python caller passes stays the caller's object.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

from spdbench.attacks.base import Attack, AttackSpec, locate_attack
from spdbench.budget import Budget, format_eps
from spdbench.errors import BudgetError, InputError
from spdbench.harness.isolation import describe_plugin

EpsArg = Union[None, str, float, int, Sequence]


@dataclass
class AttackPlan:
    """The configured attack, the budgets of its cell groups, and the source of every setting."""

    attack: AttackSpec
    budgets: list[Budget]
    sources: dict[str, str] = field(default_factory=dict)
    #: the suite's work budget (encoder-equivalent passes per photo) the steps are still to be derived
    #: from (harness/work_match.py), or None (iteration-matched, preset, explicit or no steps)
    work: Optional[float] = None


def _eps_list(eps: EpsArg) -> Optional[list]:
    """None when eps was not given; a list otherwise (an empty grid is an error, not 'the default')."""
    if eps is None:
        return None
    if isinstance(eps, (str, float, int)) or _is_scalar(eps):
        if isinstance(eps, str) and not eps.strip():
            raise InputError("eps is empty: give a budget such as '16/255' or leave it out for the suite's grid")
        return [eps]
    values = list(eps)
    if not values:
        raise InputError("eps is an empty list: give at least one budget such as '16/255' or leave it out "
                         "for the suite's grid")
    return values


def _is_scalar(value: Any) -> bool:
    """numpy scalars and 0-d tensors count as one eps (converted by parse_eps)."""
    shape = getattr(value, "shape", None)
    return shape is not None and tuple(shape) == ()


def resolve_attack(attack: Union[str, Attack, AttackSpec], params: Optional[dict],
                   isolation: str = "sandbox") -> AttackSpec:
    """An attack's spec from a name (+ params, which may hold "preset") or from the caller's instance.

    A plugin name is resolved from entry-point metadata and described by a worker (confined under
    isolation "sandbox"; under "none", the debugging mode that runs attack code here anyway, in this
    process), so its code never runs in the harness."""
    if isinstance(attack, (Attack, AttackSpec)):
        if params:
            raise InputError("pass attack parameters either to get_attack() or to run(), not both")
        return attack if isinstance(attack, AttackSpec) else AttackSpec.from_instance(attack)
    if not isinstance(attack, str):
        raise InputError(f"attack must be a registered name or an spdbench.Attack instance, "
                         f"got {type(attack).__name__}")
    params = dict(params or {})
    preset = params.pop("preset", None)
    where = locate_attack(attack)
    if where.origin == "plugin":
        return describe_plugin(where, preset, params, isolation=isolation)
    return AttackSpec.from_instance(where.cls(preset=preset, **params))


def plan(attack: Union[str, Attack, AttackSpec], suite, *, params: Optional[dict] = None, eps: EpsArg = None,
         norm: Optional[str] = None, isolation: str = "sandbox", match: str = "work") -> AttackPlan:
    """Apply the precedence rules above; returns the configured attack (a copy) and its budgets.
    `match`: "work" derives the steps from the suite's work budget where it has one (the steps are
    set once the model is loaded, harness/work_match.py), "steps" gives every attack the suite's steps."""
    attack = resolve_attack(attack, params, isolation)
    sources = {key: attack.param_source(key) for key in attack.params}
    overrides: dict[str, Any] = {}
    work = None
    if "steps" in attack.defaults and sources.get("steps") == "default":
        work = _suite_steps(attack, suite, match, overrides, sources)
    if overrides:
        attack = attack.configure(**overrides)
    sources = _implicit_when_equal(attack, suite, sources, match)
    preset_budget = attack.preset_budgets.get(attack.preset) if attack.preset else None
    eps_values = _eps_list(eps)
    if eps_values is not None:
        budget_norm = norm or suite.norm
        sources["eps"] = "explicit"
        sources["norm"] = "explicit" if norm else "suite"
        budgets = [Budget(budget_norm, e) for e in eps_values]
    elif preset_budget is not None and norm in (None, preset_budget.norm):
        budgets = [Budget(preset_budget.norm, preset_budget.eps)]
        sources["eps"] = sources["norm"] = f"preset:{attack.preset}"
    else:
        budget_norm = norm or suite.norm
        sources["eps"] = "suite"
        sources["norm"] = "explicit" if norm else "suite"
        budgets = [Budget(budget_norm, e) for e in suite.eps]
    for budget in budgets:
        check_effective(budget)
    return AttackPlan(attack=attack, budgets=budgets, sources=dict(sorted(sources.items())), work=work)


def _suite_steps(attack: AttackSpec, suite, match: str, overrides: dict, sources: dict) -> Optional[float]:
    """The suite's rule for an attack whose `steps` nobody set: under work matching, the work budget
    to derive them from (returned; steps provisionally the suite's, source "suite-work"), and a
    stochastic attack finishes on the boundary (it would end inside the ball, issue 35); else the
    suite's iteration budget (source "suite")."""
    if match == "work" and suite.attack_work is not None:
        overrides["steps"] = suite.attack_steps or attack.defaults["steps"]
        sources["steps"] = "suite-work"
        if attack.stochastic and "finish" in attack.defaults and sources.get("finish") == "default":
            overrides["finish"], sources["finish"] = "boundary", "suite-work"
        return float(suite.attack_work)
    if suite.attack_steps is not None:
        overrides["steps"] = suite.attack_steps
        sources["steps"] = "suite"
    return None


def _implicit_when_equal(attack: AttackSpec, suite, sources: dict[str, str], match: str = "steps") -> dict[str, str]:
    """An explicit value equal to the one the rules would give without it (preset, suite steps,
    default) takes that rule's source: `--param steps=3` on a 3-step suite is the default
    configuration, one leaderboard row (store.records.method_label names "explicit" values only).
    Under work matching the default steps are known only once measured (work_match.py): explicit
    steps stay explicit there."""
    out = dict(sources)
    work_steps = match == "work" and suite.attack_work is not None
    for key, source in sources.items():
        if source != "explicit" or key not in attack.params:
            continue
        if attack.preset is not None and key in attack.presets.get(attack.preset, {}):
            implicit, rule = attack.presets[attack.preset][key], f"preset:{attack.preset}"
        elif key == "steps" and work_steps:
            continue
        elif key == "steps" and suite.attack_steps is not None:
            implicit, rule = suite.attack_steps, "suite"
        else:
            implicit, rule = attack.defaults.get(key), "default"
        if _plain(attack.params[key]) == _plain(implicit):
            out[key] = rule
    return out


def _plain(value: Any) -> Any:
    """A parameter as a record holds it (JSON values), so 40 and 40.0 or a tuple and a list compare."""
    return json.loads(json.dumps(value, default=str))


#: below half an 8-bit level no pixel of the stored (8-bit) protected photo can change
HALF_LEVEL = 0.5 / 255


def check_effective(budget: Budget) -> None:
    """Refuse a budget that cannot change any pixel: every |delta_i| <= eps < 1/255/2 (under L-inf and
    L2 alike) rounds to nothing when the protected photo is stored with 8 bits, so a run at it would
    measure the clean photo under the attack's name."""
    if budget.eps < HALF_LEVEL:
        raise BudgetError(f"eps {format_eps(budget.eps)} ({budget.norm}) is below half an 8-bit level "
                          f"(1/255/2 = {HALF_LEVEL:.6f}): no pixel of the 8-bit protected photo can change; "
                          "expected eps >= 1/255/2 (immunization budgets are usually 4/255 to 16/255)")


def installed_attack(name: str, params: Optional[dict] = None, isolation: str = "sandbox") -> AttackSpec:
    """The installed attack `name` as plain data, for `verify`: a built-in from this package, a
    plugin described by a confined worker (its code never runs in verify's process); `params`
    (JSON values, as a record holds them) checked by its constructor there. Without `params`, its
    defaults: what the class declares (kind, preset budgets, network cap)."""
    return resolve_attack(name, json.loads(json.dumps(params or {})), isolation)
