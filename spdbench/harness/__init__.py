"""The harness: plan -> protect (in the worker) -> enforce -> edit -> score -> record.

Named `harness`, not `run`, so that the public function `spdbench.run(...)` is never shadowed by a
subpackage of the same name once it is imported. `spdbench.harness.run` is the pipeline's `run`.
"""
from typing import Any


def __getattr__(name: str) -> Any:
    if name in ("run", "RunResult"):
        from spdbench.harness import pipeline  # deferred: the pipeline pulls in torch, the targets and the editors

        return getattr(pipeline, name)
    raise AttributeError(f"module 'spdbench.harness' has no attribute {name!r}")
