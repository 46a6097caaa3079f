"""The purifier registry: named counter-measures with recorded settings, built-in and plugin.

Why a registry like the attacks': a protection is scored after every purifier a suite names, so a
purifier is part of the rule book -- its name must resolve the same way everywhere (did-you-mean
on a typo), its settings must be recorded, and a third-party purifier must plug in through the
`spdbench.purifiers` entry-point group without a broken one breaking every command.

A purifier maps protected images (N, 3, H, W) on [0, 1] to purified images of the same shape,
deterministically (any randomness from a seed in its settings).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from spdbench.errors import RegistryError, UnknownNameError, did_you_mean
from spdbench.registry import load_group

ENTRY_POINT_GROUP = "spdbench.purifiers"


@dataclass(frozen=True)
class Purifier:
    """`fn(images)` or, with `needs_target`, `fn(images, target)` (the editing model: DiffPure-style
    purifiers use the model being attacked, the strongest choice an editor has)."""

    name: str
    label: str
    fn: Callable[..., torch.Tensor]
    needs_target: bool = False
    settings: dict[str, Any] = field(default_factory=dict)
    description: str = ""

    def __call__(self, images: torch.Tensor, target=None) -> torch.Tensor:
        out = self.fn(images, target) if self.needs_target else self.fn(images)
        if tuple(out.shape) != tuple(images.shape):
            raise RegistryError(f"purifier {self.name!r} returned shape {tuple(out.shape)} for images of shape "
                                f"{tuple(images.shape)}")
        return out

    def to_dict(self) -> dict:
        return dict(name=self.name, label=self.label, needs_target=self.needs_target, settings=dict(self.settings))


_REGISTRY: dict[str, Purifier] = {}
_entry_points_loaded = False


def register_purifier(purifier: Purifier) -> Purifier:
    if not isinstance(purifier, Purifier):
        raise RegistryError(f"register_purifier needs a spdbench.Purifier, got {purifier!r}")
    old = _REGISTRY.get(purifier.name)
    if old is not None and old is not purifier:
        raise RegistryError(f"purifier name {purifier.name!r} is already registered; pick another name")
    _REGISTRY[purifier.name] = purifier
    return purifier


def unregister_purifier(name: str) -> Purifier:
    if name not in _REGISTRY:
        raise UnknownNameError(f"cannot unregister purifier {name!r}: it is not registered.{did_you_mean(name, _REGISTRY)}")
    return _REGISTRY.pop(name)


def load_entry_points(force: bool = False) -> list[str]:
    """Plugins: each entry point names one `Purifier` whose `name` is the entry-point name. One that
    fails to import, names something else or takes a used name is skipped with a warning naming its
    distribution."""
    global _entry_points_loaded
    if _entry_points_loaded and not force:
        return []
    _entry_points_loaded = True

    def load_one(ep, where: str) -> None:
        obj = ep.load()
        if not isinstance(obj, Purifier):
            raise RegistryError(f"the entry point must name a spdbench.Purifier, got {obj!r}")
        if obj.name != ep.name:
            raise RegistryError(f"its Purifier is named {obj.name!r}, not the entry-point name {ep.name!r}")
        register_purifier(obj)

    return load_group(ENTRY_POINT_GROUP, "purifier", load_one)


def _ensure_loaded() -> None:
    from spdbench.purifiers import builtin  # noqa: F401  (registers the built-ins)

    load_entry_points()


def list_purifiers() -> list[str]:
    _ensure_loaded()
    return sorted(_REGISTRY)


def get_purifier(name: str) -> Purifier:
    _ensure_loaded()
    if not isinstance(name, str) or name not in _REGISTRY:
        raise UnknownNameError(f"unknown purifier {name!r}.{did_you_mean(str(name), _REGISTRY)} "
                               f"Available: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def describe(name: Optional[str] = None) -> list[dict]:
    """Name, label, settings and description of one or every purifier (for records and `spdbench list`)."""
    names = [name] if name else list_purifiers()
    return [dict(get_purifier(n).to_dict(), description=get_purifier(n).description) for n in names]
