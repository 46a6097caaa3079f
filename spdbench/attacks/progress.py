"""Step progress of a running optimization, for the harness's "about N s left" (issue 36).

Why: one cell group is one request to the attack's worker, and a 40-step attack on 11 photos is
minutes of silence in between; the harness can only estimate what it hears about. `optimize`
(optim.py) reports every step here; the worker forwards it as a small "progress" frame (rate
limited, checked like every frame), and the harness turns it into a fraction of the group with an
estimate. An attack with a loop of its own may call `report_step` too; one that does not gets no
"about N s left" inside its group, only the estimate its group starts with (under work matching the
harness times its own probe of the attack, harness/work_match.py; after a group, that group's
length). The report carries two integers and nothing else.
"""
from __future__ import annotations

from typing import Callable, Optional

_reporter: Optional[Callable[[int, int], None]] = None


def set_reporter(fn: Optional[Callable[[int, int], None]]) -> Optional[Callable[[int, int], None]]:
    """Send every step to `fn(step, steps)` from now on (None: nowhere); returns the one before."""
    global _reporter
    before, _reporter = _reporter, fn
    return before


def report_step(step: int, steps: int) -> None:
    """Step `step` of `steps` of the current optimization is done (1-based)."""
    if _reporter is not None:
        _reporter(int(step), int(steps))
