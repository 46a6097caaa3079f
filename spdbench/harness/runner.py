"""The attack's side of a run: where its cell groups execute (one job: run a group, say how it ran).

A worker process (isolation "sandbox", the default, or "process") is started for the first group
and kept for the next; an attack error ends it, so the next group starts from a fresh process and a
fresh model copy. Isolation "none" runs the attack in the harness's process, for debugging only
(recorded, refused by verify and submit). Split from pipeline.py so the work probe
(work_match.py) runs its two short groups exactly as a cell group runs.
"""
from __future__ import annotations

import time
from typing import Callable, Optional

import torch

from spdbench.attacks.base import Attack, AttackKind, AttackSpec
from spdbench.attacks.progress import set_reporter
from spdbench.budget import Budget
from spdbench.errors import AttackError
from spdbench.harness.isolation import AttackWorker
from spdbench.harness.protect import run_jobs
from spdbench.targets import Target


class AttackRunner:
    """Runs one attack's cell groups: in a worker process (isolation "sandbox", the default, or "process"), or in
    this process for debugging (isolation "none": recorded, refused by verify and submit)."""

    def __init__(self, isolation: str, target: Target, timeout_s: Optional[float]) -> None:
        self.isolation, self.target, self.timeout_s = isolation, target, timeout_s
        self.worker: Optional[AttackWorker] = None
        self.start_s: Optional[float] = None
        self._isolation_fields: dict = {}
        self.flags: list[str] = []  # the last group's cost / origin flags (isolation.WorkerResult.flags)
        #: told (step, steps) of the attack's optimization while a group runs (progress.StepProgress)
        self.on_progress: Optional[Callable[[int, int], None]] = None

    def run(self, attack: Attack, budget: Budget, jobs: dict[str, dict], batch_size: int) -> tuple[dict, float]:
        """{split name: SplitOutput}, and the harness-measured wall seconds of the whole group."""
        self.flags = []
        if self.isolation == "none":
            return self._in_process(attack, budget, jobs, batch_size)
        if self.worker is None or not self.worker.alive:
            self.close()
            self.worker = AttackWorker(self.target, sandbox=self.isolation == "sandbox")
            self._isolation_fields = {"isolation": "process", "isolation_detail": {"reason": "the worker did not start"}}
            self.start_s = self.worker.start()
            self._isolation_fields = {"isolation": self.worker.isolation,
                                      "isolation_detail": self.worker.isolation_detail}
        self.worker.on_progress = self.on_progress
        try:
            result = self.worker.run(attack=attack, budget=budget, universal=attack.kind is AttackKind.universal, batch_size=batch_size,
                                     splits={k: {kk: vv.cpu() if isinstance(vv, torch.Tensor) else vv
                                                 for kk, vv in v.items()} for k, v in jobs.items()},
                                     timeout=self.timeout_s)
        except AttackError:
            self.close()  # the next group starts from a fresh process and a fresh model copy
            raise
        self.flags = list(result.flags)
        return result.splits, result.wall_s

    def achieved(self) -> str:
        """The isolation the last group ran under, as checked (a sandbox that did not take is "process")."""
        return self.worker.isolation if self.isolation != "none" and self.worker is not None else self.isolation

    def isolation_fields(self) -> dict:
        """The records' `isolation` and `isolation_detail` for the group just run (kept after its
        worker was stopped); none until a worker has started."""
        return dict(self._isolation_fields)

    def _in_process(self, attack: Attack, budget: Budget, jobs: dict, batch_size: int) -> tuple[dict, float]:
        fingerprint = self.target.fingerprint
        t0 = time.perf_counter()
        before = set_reporter(self.on_progress)
        try:
            out = run_jobs(attack.build() if isinstance(attack, AttackSpec) else attack, self.target, budget, jobs,
                           batch_size)  # isolation "none": attack code in this process, on purpose
        finally:
            set_reporter(before)
        wall = time.perf_counter() - t0
        if self.target.fingerprint_now() != fingerprint:
            raise AttackError(f"attack {attack.name!r} changed the target's weights (isolation 'none')")
        return out, wall

    def close(self) -> None:
        if self.worker is not None:
            self.worker.close()
            self.worker = None

    def __enter__(self) -> "AttackRunner":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
