"""Which stage a long command is in (fitting, protecting, editing, purifying, scoring, verifying)
and about how long it will take.

Why: a run's bar sat at 2/8 for minutes, and `verify`/`submit` printed nothing for 6-8 minutes, so
a user could not tell a slow stage from a hung one. Every wait longer than a few seconds now
announces itself when it starts, with an estimate where one is known (the stage's per-item rate or
length the last time it ran); a stage made of items (photos, edit passes, cells) also gives an
estimate of what is left after its first item, from the rate so far, as tqdm does -- so a stage
seen for the first time has one too. Where it goes: on a terminal in the run's progress bar (or as
a line where there is no bar); elsewhere as one plain line per stage on stderr (no bar redraws in a log file); with
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
STAGES = ("loading", "matching", "fitting", "protecting", "purifying", "editing", "scoring", "verifying", "building",
          "writing")


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
class _Count:
    """The items of the open stage: how many, how many done, since when counted, the last line."""

    total: int
    unit: str
    text: str
    since: float
    done: int = 0
    last_line: float = 0.0


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
    #: seconds per item of each stage that counted its items, measured the last time it ran
    per_item: dict[str, float] = field(default_factory=dict)
    #: in line mode (no bar), the least seconds between two "left" lines of one stage
    every_s: float = 30.0
    _open: Optional[tuple[str, float]] = None
    _items: Optional[_Count] = None
    _text: str = ""               # the open stage's announcement (what `fraction` lines extend)
    _last_fraction: float = 0.0   # when `fraction` last showed a line

    def stage(self, name: str, detail: str = "", estimate_s: Optional[float] = None, items: Optional[int] = None,
              unit: str = "items") -> str:
        """Announce stage `name` (one of STAGES) with what it works on and about how long it will
        take: `estimate_s`, else its per-item rate last time x `items`, else how long it took last
        time (none the first time: then `items` > 1, reported with `advance`, give one after the
        first item). Returns the text shown. The stage before it ends here (its length is kept)."""
        if name not in STAGES:
            raise ValueError(f"stage {name!r}: expected one of {', '.join(STAGES)}")
        if items is not None and (isinstance(items, bool) or not isinstance(items, int) or items < 1):
            raise ValueError(f"items {items!r}: expected a whole number >= 1")
        self.done()
        now = time.perf_counter()
        self._open = (name, now)
        if estimate_s is None:
            rate = self.per_item.get(name)
            estimate_s = rate * items if rate is not None and items else self.took.get(name)
        text = name + (f" {detail}" if detail else "")
        if estimate_s is not None and estimate_s >= 1:
            text += f" (about {duration(estimate_s)})"
        self._items = _Count(items, unit, text, since=now, last_line=now) if items else None
        self._text, self._last_fraction = text, now
        self._show(text)
        return text

    def advance(self, n: int = 1) -> Optional[str]:
        """`n` more items of the open stage are done. From the first item on, the rest is estimated
        at the rate so far: in the bar at every item; as a line at the first item and then at most
        every `every_s` seconds (a log gets no redraws). Returns the text shown, or None."""
        c = self._items
        if self._open is None or c is None:
            return None
        before, c.done = c.done, min(c.total, c.done + n)
        now = time.perf_counter()
        if c.done >= c.total:
            return None  # the stage is over; the next stage (or done) says so
        left = (now - c.since) / c.done * (c.total - c.done)
        shown = f"{c.text}: {c.done}/{c.total} {c.unit} done, about {duration(left)} left"
        if not self._in_bar and before > 0 and now - c.last_line < self.every_s:
            return None
        c.last_line = now
        self._show(shown)
        return shown

    def fraction(self, done: float, what: str) -> Optional[str]:
        """The open stage is `done` (0..1) finished, `what` says of what (e.g. "step 12/40"): the
        rest is estimated at the rate so far, shown like `advance` (a line at most every `every_s`)."""
        if self._open is None or not 0 < done < 1:
            return None
        now = time.perf_counter()
        since = self._items.since if self._items is not None else self._open[1]
        last = self._items.last_line if self._items is not None else self._open[1]
        if not self._in_bar and now - max(last, self._last_fraction) < self.every_s:
            return None
        self._last_fraction = now
        shown = f"{self._text}: {what}, about {duration((now - since) / done * (1 - done))} left"
        self._show(shown)
        return shown

    def discount(self, n: int = 1) -> None:
        """`n` items of the open stage cost nothing after all (a cache hit): they leave the count,
        and the rate is measured from here, so they do not make the rest look fast."""
        c = self._items
        if c is not None and c.done == 0:
            c.total = max(1, c.total - n)
            c.since = time.perf_counter()

    @property
    def _in_bar(self) -> bool:
        """Whether lines go to a live progress bar's postfix (redrawn: no rate limit needed)."""
        return self.bar is not None and not getattr(self.bar, "disable", True)

    def _show(self, text: str) -> None:
        self.current = text
        log.info("%s: %s", self.command, text)
        if not self.enabled:
            return
        if self._in_bar:
            self.bar.set_postfix_str(text)
            return
        minutes, seconds = divmod(int(time.perf_counter() - self.started), 60)
        print(f"spdbench {self.command} [{minutes}:{seconds:02d}]: {text}", file=self.stream or sys.stderr, flush=True)

    def done(self) -> None:
        """The open stage has ended: keep its length (and per-item rate) for the next estimate."""
        if self._open is not None:
            name, t0 = self._open
            self.took[name] = time.perf_counter() - t0
            c = self._items
            if c is not None and c.done >= c.total:
                self.per_item[name] = (time.perf_counter() - c.since) / c.total
            self._open = None
            self._items = None

    def note(self, text: str) -> None:
        """A line that must be read now, not at the end (the seed that repeats a verification)."""
        log.info("%s: %s", self.command, text)
        if self.enabled:
            print(f"spdbench {self.command}: {text}", file=self.stream or sys.stderr, flush=True)


class StepProgress:
    """A cell group's progress from its attack's optimization steps (attacks/progress.py), as a
    fraction of the group: `optimizations` is how many the harness expects (a per-image attack: one
    per batch of each split; a universal one: one fit); a new optimization is seen when the step
    count starts again. Where an attack runs more than expected, only the step is shown."""

    def __init__(self, stages: "Stages", optimizations: int) -> None:
        self.stages, self.total = stages, max(1, optimizations)
        self.k, self.last = 0, None

    def __call__(self, step: int, steps: int) -> None:
        if self.last is None or step <= self.last[0] or steps != self.last[1]:
            self.k += 1
        self.last = (step, steps)
        if self.k > self.total:  # more optimizations than expected: no estimate rather than a wrong one
            return
        what = f"step {step}/{steps}" + (f" of optimization {self.k}/{self.total}" if self.total > 1 else "")
        self.stages.fraction((self.k - 1 + step / max(steps, 1)) / self.total, what)


#: announcers for code that was given none (the Python API's defaults): lines only at a terminal
def default_stages(command: str, enabled: Optional[bool] = None) -> Stages:
    """A Stages for `command`: printing when `enabled`, or (None) when stderr is a terminal."""
    return Stages(command, enabled=is_terminal(sys.stderr) if enabled is None else enabled)
