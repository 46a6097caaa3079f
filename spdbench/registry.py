"""Entry-point plugins, loaded one by one so that one broken package does not break every command.

Why one helper: attacks (`spdbench.attacks`) and purifiers (`spdbench.purifiers`) plug in the same
way, and a failure must read the same way for both -- a warning naming the plugin, its
distribution and the error, and the plugin skipped.
"""
from __future__ import annotations

import importlib.metadata
import warnings
from typing import Callable


def load_group(group: str, kind: str, load_one: Callable[[object, str], None]) -> list[str]:
    """Call `load_one(entry_point, where)` for each entry point of `group`; `where` describes it for
    messages ("attack plugin 'x' of dist (module:Obj)"). Returns the names that loaded."""
    loaded = []
    for ep in importlib.metadata.entry_points(group=group):
        dist = getattr(getattr(ep, "dist", None), "name", None) or "unknown distribution"
        where = f"{kind} plugin {ep.name!r} of {dist} ({ep.value})"
        try:
            load_one(ep, where)
            loaded.append(ep.name)
        except Exception as exc:  # noqa: BLE001 - isolate broken plugins
            warnings.warn(f"spdbench: could not load {where}: {exc}")
    return loaded
