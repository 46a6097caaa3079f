"""Exception types. Every user error is a subclass of `SpdbenchError` so the CLI can print it as one
line and exit non-zero instead of showing a traceback from deep inside torch."""

import difflib


class SpdbenchError(Exception):
    """Base class of every error spdbench raises on purpose."""


class InputError(SpdbenchError, ValueError):
    """Images, budgets or settings that violate the input contract (shape, range, dtype, NaN...)."""


class BudgetError(InputError):
    """An eps or norm that is not a valid perturbation budget."""


class UnknownNameError(SpdbenchError, KeyError):
    """A name (attack, suite, prompt, metric) that is not registered; the message lists close matches."""

    def __str__(self) -> str:  # KeyError quotes its message; we want it plain
        return str(self.args[0]) if self.args else ""


class RegistryError(SpdbenchError, TypeError):
    """A bad registration: duplicate name or a class that is not an Attack."""


class TargetLoadError(SpdbenchError, OSError):
    """A model that cannot be loaded (unreachable hub id, folder missing components)."""


class AttackError(SpdbenchError, RuntimeError):
    """An attack raised, or returned something the harness refuses (wrong shape, NaN, device...)."""


class RecordError(SpdbenchError, ValueError):
    """A record or submission file that is corrupt, truncated, foreign or tampered with."""


def did_you_mean(name: str, choices) -> str:
    """' Did you mean 'x'?' for close matches (difflib), or an empty string."""
    close = difflib.get_close_matches(name, list(choices), n=3, cutoff=0.5)
    return f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
