"""Running a grid of cells serially or as Ray tasks (one GPU each), writing the same records.

The unit of work is one (attack, eps) group of cells: its protection is computed once and shared
by all prompts and both splits. Each task is idempotent: it calls `harness.run` on the shared
output folder, which skips finished cells, so a crashed or re-submitted grid resumes.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch

from spdbench.errors import InputError
from spdbench.store.records import Record, load_records


@dataclass(frozen=True)
class Task:
    attack: str
    eps: str
    attack_params: tuple = ()

    def kwargs(self) -> dict[str, Any]:
        return dict(attack_params=dict(self.attack_params))


def grid(attacks: Sequence[str], eps: Sequence[str], attack_params: Optional[dict] = None) -> list[Task]:
    params = tuple(sorted((attack_params or {}).items()))
    return [Task(a, e, params) for a in attacks for e in eps]


def _run_task(task: Task, suite, out: str, run_kwargs: dict, threads: int) -> list[str]:
    from spdbench.harness.pipeline import run

    torch.set_num_threads(threads)  # same thread count as the driver: bitwise-equal numbers
    # tasks of one attack share its folder and run in parallel: each locks its own eps scope
    res = run(task.attack, suite=suite, eps=[task.eps], out=Path(out) / task.attack, **task.kwargs(),
              lock_scope=f"eps-{task.eps.replace('/', 'o')}", **run_kwargs)
    return [r.cell_id for r in res.records]


def run_grid(attacks: Sequence[str], suite, eps: Sequence[str], out: Union[str, Path], backend: str = "serial",
             attack_params: Optional[dict] = None, ray_address: Optional[str] = None, **run_kwargs) -> list[Record]:
    """Run every (attack, eps) task with the chosen backend; returns all records under `out`.

    With backend="ray", each task asks for one GPU when CUDA is available (else one CPU); `out`
    must be on a filesystem every Ray node sees.
    """
    tasks = grid(attacks, eps, attack_params)
    out = Path(out)
    threads = torch.get_num_threads()
    if backend == "serial":
        for t in tasks:
            _run_task(t, suite, str(out), run_kwargs, threads)
    elif backend == "ray":
        try:
            import ray
        except ImportError:
            raise InputError("backend 'ray' needs Ray: pip install 'spdbench[ray]'") from None
        started = False
        if not ray.is_initialized():
            ray.init(address=ray_address, num_cpus=None if ray_address else 2, include_dashboard=False,
                     log_to_driver=False)
            started = True
        try:
            gpus = 1 if torch.cuda.is_available() else 0
            remote = ray.remote(num_gpus=gpus, num_cpus=1 if gpus else threads, max_retries=2)(_run_task)
            ray.get([remote.remote(t, suite, str(out), run_kwargs, threads) for t in tasks])
        finally:
            if started:
                ray.shutdown()
    else:
        raise InputError(f"unknown backend {backend!r}; expected 'serial' or 'ray'")
    return load_records([out / a for a in dict.fromkeys(attacks)])
