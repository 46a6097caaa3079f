"""The purifier registry: named counter-measures with recorded settings, built-in and plugin.

Why a registry like the attacks': a protection is scored after every purifier a suite names, so a
purifier is part of the rule book -- its name must resolve the same way everywhere (did-you-mean
on a typo), its settings must be recorded, and a third-party purifier must plug in through the
`spdbench.purifiers` entry-point group without a broken one breaking every command.

A purifier maps protected images (N, 3, H, W) on [0, 1] to purified images of the same shape,
deterministically (any randomness from a seed in its settings).
"""
from __future__ import annotations

import inspect
import re
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Optional, Sequence

import torch

from spdbench.errors import InputError, RegistryError
from spdbench.registry import _NO_DEFAULT, Registry

ENTRY_POINT_GROUP = "spdbench.purifiers"
#: draw k >= 1 of a randomized purifier is named "<name>~<k>" (draw 0 keeps the plain name, so a
#: run with one draw records exactly what it recorded before draws existed)
DRAW_SEP = "~"
#: the seed offset between two draws (draw k runs at seed + k * DRAW_SEED_STRIDE): far apart, so the
#: per-image generators (seed + i) of two draws never coincide for batches under 1000 photos
DRAW_SEED_STRIDE = 1000


@dataclass(frozen=True)
class Purifier:
    """`fn(images, **settings)` or, with `needs_target`, `fn(images, target, **settings)` (the editing
    model: DiffPure-style purifiers use the model being attacked, the strongest choice an editor has).

    Why the settings are the call's keyword arguments: a record states the settings each purifier
    ran at; settings written down beside a call that does not pass them can drift from what ran."""

    name: str
    label: str
    fn: Callable[..., torch.Tensor]
    needs_target: bool = False
    settings: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    #: the model this purifier runs with instead of the editing model (a mismatched editor: a name,
    #: folder or hub id the harness loads through `load_target` and passes as `target`); None = the
    #: editing model. Recorded in `to_dict` only when set, so today's records are unchanged.
    model: Optional[str] = None

    def __post_init__(self) -> None:
        if self.model is not None and not self.needs_target:
            raise RegistryError(f"purifier {self.name!r} names a model ({self.model!r}) but does not take a target "
                                "(needs_target=False)")
        _check_settings(self)

    @property
    def randomized(self) -> bool:
        """A purifier with a `seed` setting draws noise: it can be drawn several times per image."""
        return "seed" in self.settings

    def draw(self, k: int) -> "Purifier":
        """Draw `k` of a randomized purifier: the same purifier at seed + k * DRAW_SEED_STRIDE, named
        "<name>~<k>" (draw 0 is the purifier itself). Its settings record the seed it ran at."""
        if not isinstance(k, int) or isinstance(k, bool) or k < 0:
            raise InputError(f"draw index must be an integer >= 0, got {k!r}")
        if k == 0:
            return self
        if not self.randomized:
            raise InputError(f"purifier {self.name!r} has no seed setting: it is deterministic and has one draw")
        settings = dict(self.settings, seed=int(self.settings["seed"]) + k * DRAW_SEED_STRIDE)
        return replace(self, name=f"{self.name}{DRAW_SEP}{k}", label=f"{self.label} (draw {k + 1})",
                       settings=settings)

    def __call__(self, images: torch.Tensor, target=None) -> torch.Tensor:
        if self.model is not None:
            _check_model(self, target)
        settings = dict(self.settings)
        out = self.fn(images, target, **settings) if self.needs_target else self.fn(images, **settings)
        if tuple(out.shape) != tuple(images.shape):
            raise RegistryError(f"purifier {self.name!r} returned shape {tuple(out.shape)} for images of shape "
                                f"{tuple(images.shape)}")
        return out

    def to_dict(self) -> dict:
        d = dict(name=self.name, label=self.label, needs_target=self.needs_target, settings=dict(self.settings))
        if self.model is not None:
            d["model"] = self.model
        return d


def _check_model(purifier: Purifier, target) -> None:
    """A mismatched-editor purifier given any model but its own would silently purify with the wrong
    one (e.g. a caller that passes the editing model): refused instead."""
    name = getattr(target, "name", None)
    source = str(getattr(target, "source", ""))
    if target is None or (name != purifier.model and source != purifier.model):
        raise RegistryError(f"purifier {purifier.name!r} runs with model {purifier.model!r}, but was given "
                            f"{name or target!r}: load it with load_target({purifier.model!r}) and pass it")


def drawn(purifiers: Sequence[Purifier], draws: int) -> tuple[Purifier, ...]:
    """Each purifier, and for a randomized one its draws 1..draws-1 right after it (`draws` = 1: the
    purifiers unchanged)."""
    if not isinstance(draws, int) or isinstance(draws, bool) or draws < 1:
        raise InputError(f"purifier draws must be an integer >= 1, got {draws!r}")
    out: list[Purifier] = []
    for p in purifiers:
        out += [p.draw(k) for k in range(draws if p.randomized else 1)]
    return tuple(out)


def base_name(name: str) -> str:
    """The purifier a block name was drawn from: "diffpure0.2~3" -> "diffpure0.2"; other names unchanged."""
    m = _DRAW_NAME.fullmatch(name)
    return m.group(1) if m else name


_DRAW_NAME = re.compile(rf"(.+){re.escape(DRAW_SEP)}([1-9][0-9]*)")


def _check_settings(purifier: Purifier) -> None:
    """The function must accept the settings as keyword arguments (checked when the purifier is made,
    not when a run reaches it)."""
    if not callable(purifier.fn):
        raise RegistryError(f"purifier {purifier.name!r}: fn must be callable, got {purifier.fn!r}")
    try:
        sig = inspect.signature(purifier.fn)
    except (TypeError, ValueError):  # a builtin without a signature: checked when called
        return
    args = ("images", "target") if purifier.needs_target else ("images",)
    try:
        sig.bind(*args, **purifier.settings)
    except TypeError as exc:
        raise RegistryError(f"purifier {purifier.name!r}: its function cannot be called as fn({', '.join(args)}, "
                            f"**settings) with settings {sorted(purifier.settings)}: {exc}") from None


def _check_purifier(name: str, obj: Any) -> None:
    if not isinstance(obj, Purifier):
        raise RegistryError(f"register_purifier needs a spdbench.Purifier, got {obj!r}")
    if obj.name != name:
        raise RegistryError(f"purifier {obj.name!r} registered under another name {name!r}")


def _purifier_from_entry_point(name: str, obj: Any, where: str) -> Purifier:
    """Each entry point names one `Purifier` whose `name` is the entry-point name."""
    if not isinstance(obj, Purifier):
        raise RegistryError(f"the entry point must name a spdbench.Purifier, got {obj!r}")
    if obj.name != name:
        raise RegistryError(f"its Purifier is named {obj.name!r}, not the entry-point name {name!r}")
    return obj


class _PurifierRegistry(Registry):
    """Purifiers, where "<name>~<k>" also resolves: draw k of the randomized purifier `name` (a
    record of a run with several draws names each draw; its settings are derived, never stored)."""

    def get(self, name: str, default: Any = _NO_DEFAULT) -> Purifier:  # type: ignore[override]
        m = _DRAW_NAME.fullmatch(name) if isinstance(name, str) else None
        if m is None or super().get(name, None) is not None:
            return super().get(name, default)
        base = super().get(m.group(1), None)
        if base is not None and base.randomized:
            return base.draw(int(m.group(2)))
        return super().get(name, default)


#: every purifier: built-in (the modules of spdbench.purifiers register their own) and plugin
#: (entry-point group `spdbench.purifiers`)
PURIFIERS: Registry[Purifier] = _PurifierRegistry("purifier", package="spdbench.purifiers", group=ENTRY_POINT_GROUP,
                                                  check=_check_purifier, from_entry_point=_purifier_from_entry_point)


def register_purifier(purifier: Purifier) -> Purifier:
    """Add `purifier` under its own name; a taken name or a non-Purifier is a RegistryError."""
    if not isinstance(purifier, Purifier):
        raise RegistryError(f"register_purifier needs a spdbench.Purifier, got {purifier!r}")
    return PURIFIERS.add(purifier.name, purifier)


def unregister_purifier(name: str) -> Purifier:
    return PURIFIERS.remove(name)


def load_entry_points(force: bool = False) -> list[str]:
    """Plugins: each entry point names one `Purifier` whose `name` is the entry-point name. One that
    fails to import, names something else or takes a used name is skipped with a warning naming its
    distribution."""
    return PURIFIERS.load_entry_points(force)


def list_purifiers() -> list[str]:
    return sorted(PURIFIERS.names())


def get_purifier(name: str) -> Purifier:
    """The purifier registered as `name`; UnknownNameError with close matches otherwise."""
    return PURIFIERS.get(name)


def describe(name: Optional[str] = None) -> list[dict]:
    """Name, label, settings and description of one or every purifier (for records and `spdbench list`)."""
    names = [name] if name else list_purifiers()
    return [dict(get_purifier(n).to_dict(), description=get_purifier(n).description) for n in names]
