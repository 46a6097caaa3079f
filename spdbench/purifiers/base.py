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
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from spdbench.errors import RegistryError
from spdbench.registry import Registry

ENTRY_POINT_GROUP = "spdbench.purifiers"


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

    def __post_init__(self) -> None:
        _check_settings(self)

    def __call__(self, images: torch.Tensor, target=None) -> torch.Tensor:
        settings = dict(self.settings)
        out = self.fn(images, target, **settings) if self.needs_target else self.fn(images, **settings)
        if tuple(out.shape) != tuple(images.shape):
            raise RegistryError(f"purifier {self.name!r} returned shape {tuple(out.shape)} for images of shape "
                                f"{tuple(images.shape)}")
        return out

    def to_dict(self) -> dict:
        return dict(name=self.name, label=self.label, needs_target=self.needs_target, settings=dict(self.settings))


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


#: every purifier: built-in (the modules of spdbench.purifiers register their own) and plugin
#: (entry-point group `spdbench.purifiers`)
PURIFIERS: Registry[Purifier] = Registry("purifier", package="spdbench.purifiers", group=ENTRY_POINT_GROUP,
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
