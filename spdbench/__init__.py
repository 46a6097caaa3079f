"""spdbench: one harness and one scorer for image immunization against diffusion editing.

Public API (DESIGN §4b): list_attacks, get_attack, register, Attack, UniversalAttack, AmortizedAttack, GradientAttack
(the author's base: write the objective, it owns the loop), Budget, load_target, load_photos, run,
metrics, testing.check_attack (docs/writing-an-attack.md).
"""
import importlib

from spdbench.attacks import AmortizedAttack, Attack, UniversalAttack, get_attack, list_attacks, register
from spdbench.attacks.objectives import GradientAttack
from spdbench.budget import Budget, apply_budget, format_eps, parse_eps
from spdbench.data.photos import load_photos
from spdbench.errors import (AttackError, BudgetError, InputError, RecordError, RegistryError, SpdbenchError,
                     TargetLoadError, UnknownNameError)
from spdbench.targets import Target, load_target

__version__ = "0.1.0"

__all__ = [
    "Attack", "UniversalAttack", "AmortizedAttack", "GradientAttack", "get_attack", "list_attacks", "register",
    "Budget", "apply_budget", "format_eps", "parse_eps", "load_photos", "Target", "load_target",
    "SpdbenchError", "InputError", "BudgetError", "UnknownNameError", "RegistryError",
    "TargetLoadError", "AttackError", "RecordError", "run", "metrics", "__version__",
]


def __getattr__(name: str):
    # heavy or later-built parts load lazily so `import spdbench` stays fast

    lazy = {"metrics": "spdbench.scoring.metrics", "harness": "spdbench.harness.pipeline",
            "leaderboard": "spdbench.report.board", "editing": "spdbench.harness.editing",
            "suites": "spdbench.suites", "testing": "spdbench.testing"}
    if name == "run":
        return importlib.import_module("spdbench.harness.pipeline").run
    if name == "protect":  # protect one's own photos (protect_photos.py)
        return importlib.import_module("spdbench.protect_photos").protect
    if name in lazy:
        return importlib.import_module(lazy[name])
    raise AttributeError(f"module 'spdbench' has no attribute {name!r}")
