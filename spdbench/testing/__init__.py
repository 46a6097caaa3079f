"""Tools for attack authors: `check_attack` (the contract checks) and the pytest plugin.

`check_attack` loads lazily so that pytest, which imports the plugin at start-up, does not pay for torch.
"""
from typing import Any

__all__ = ["check_attack", "mask_args"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from spdbench.testing import check  # deferred: torch and the targets are heavy

        return getattr(check, name)
    raise AttributeError(f"module 'spdbench.testing' has no attribute {name!r}")
