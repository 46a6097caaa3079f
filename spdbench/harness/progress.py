"""Which stage a long command is in (fitting, protecting, editing, purifying, scoring, verifying)
and about how long it will take.

Why: a run's bar sat at 2/8 for minutes, and `verify`/`submit` printed nothing for 6-8 minutes, so
a user could not tell a slow stage from a hung one. Every wait longer than a few seconds now
announces itself when it starts: on a terminal in the run's progress bar (or as a line where there
is no bar); elsewhere as one plain line per stage on stderr (no bar redraws in a log file); with
`enabled=False` only through the "spdbench" logger (level INFO), for a program that configures
logging.
"""
from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Optional, TextIO

log = logging.getLogger("spdbench")

#: the words a stage is named by (a stage's detail says what exactly)
STAGES = ("loading", "fitting", "protecting", "purifying", "editing", "scoring", "verifying", "building")


def is_terminal(stream: Any) -> bool:
    """True when `stream` is a terminal (a bar is read there, not logged)."""
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # replaced or closed stream
        return False


def duration(seconds: float) -> str:
    """"40 s", "3 min", "1.5 h": an estimate as a reader says it."""
    if seconds < 90:
        return f"{max(1, round(seconds))} s"
    if seconds < 90 * 60:
        return f"{round(seconds / 60)} min"
    return f"{seconds / 3600:.1f} h"


@dataclass
class Stages:
    """One command's stage announcer.

    `command` prefixes each line ("spdbench verify: editing ..."); `enabled=False` logs only;
    `bar`: a tqdm bar whose postfix shows the stage instead of a line (the run's bar on a terminal);
    `stream`: where lines go (default: sys.stderr, looked up at each line)."""

    command: str
    enabled: bool = True
    bar: Any = None
    stream: Optional[TextIO] = None
    started: float = field(default_factory=time.perf_counter)
    current: Optional[str] = None
    #: the last measured length of each stage (by name): the estimate of its next time
    took: dict[str, float] = field(default_factory=dict)
    _open: Optional[tuple[str, float]] = None

    def stage(self, name: str, detail: str = "", estimate_s: Optional[float] = None) -> str:
        """Announce stage `name` (one of STAGES) with what it works on and about how long it will
        take: `estimate_s`, else how long the same stage took last time (none the first time);
        returns the text shown. The stage before it ends here (its length is kept)."""
        if name not in STAGES:
            raise ValueError(f"stage {name!r}: expected one of {', '.join(STAGES)}")
        self.done()
        self._open = (name, time.perf_counter())
        estimate_s = self.took.get(name) if estimate_s is None else estimate_s
        text = name + (f" {detail}" if detail else "")
        if estimate_s is not None and estimate_s >= 1:
            text += f" (about {duration(estimate_s)})"
        self.current = text
        log.info("%s: %s", self.command, text)
        if not self.enabled:
            return text
        if self.bar is not None and not getattr(self.bar, "disable", True):
            self.bar.set_postfix_str(text)
            return text
        minutes, seconds = divmod(int(time.perf_counter() - self.started), 60)
        print(f"spdbench {self.command} [{minutes}:{seconds:02d}]: {text}", file=self.stream or sys.stderr, flush=True)
        return text

    def done(self) -> None:
        """The open stage has ended: keep its length for the next estimate."""
        if self._open is not None:
            name, t0 = self._open
            self.took[name] = time.perf_counter() - t0
            self._open = None

    def note(self, text: str) -> None:
        """A line that must be read now, not at the end (the seed that repeats a verification)."""
        log.info("%s: %s", self.command, text)
        if self.enabled:
            print(f"spdbench {self.command}: {text}", file=self.stream or sys.stderr, flush=True)


#: announcers for code that was given none (the Python API's defaults): lines only at a terminal
def default_stages(command: str, enabled: Optional[bool] = None) -> Stages:
    """A Stages for `command`: printing when `enabled`, or (None) when stderr is a terminal."""
    return Stages(command, enabled=is_terminal(sys.stderr) if enabled is None else enabled)
