"""Running a grid of cells serially or as Ray tasks (one GPU each), writing the same records.

The unit of work is one (attack, eps) group of cells: its protection is computed once and shared
by all prompts and both splits. The grid checks every input first -- one run request per attack
(request.py), split into one request per budget -- so a bad argument stops it before any task
runs. Each task is idempotent: it executes its request on the shared output folder, which skips
finished cells, so a crashed or re-submitted grid resumes.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch

from spdbench.budget import format_eps
from spdbench.errors import InputError
from spdbench.harness.plan import EpsArg
from spdbench.harness.request import RunRequest, build_request
from spdbench.store.records import Record, load_records
from spdbench.store.runfolder import RunLock, check_out, prepare_out

BACKENDS = ("serial", "ray")


@dataclass(frozen=True)
class Task:
    attack: str
    eps: str
    attack_params: tuple = ()

    def kwargs(self) -> dict[str, Any]:
        return dict(attack_params=dict(self.attack_params))


def grid(attacks: Sequence[str], eps: Sequence[str], attack_params: Optional[dict] = None) -> list[Task]:
    """The (attack, eps) pairs of a grid, attack by attack."""
    params = tuple(sorted((attack_params or {}).items()))
    return [Task(a, e, params) for a in attacks for e in eps]


def grid_requests(attacks: Sequence[str], suite, eps: EpsArg, out: Union[str, Path],
                  attack_params: Optional[dict] = None, **run_kwargs) -> list[RunRequest]:
    """One checked request per (attack, budget): each attack in its own folder `out/ATTACK`, each
    budget locking its own scope there (tasks of one attack run in parallel). The budgets are the
    plan's (explicit eps, else the preset's or the suite's), as for a single run."""
    if isinstance(attacks, str) or not attacks or len(set(attacks)) != len(attacks):
        raise InputError(f"attacks {attacks!r:.80} must be a non-empty list of distinct attack names")
    out = check_out(out)
    requests = []
    for name in attacks:
        whole = build_request(name, suite, eps, out / name, attack_params=attack_params, **run_kwargs)
        requests += [replace(whole, plan=replace(whole.plan, budgets=[b]),
                             lock_scope=f"eps-{format_eps(b.eps).replace('/', 'o')}") for b in whole.plan.budgets]
    return requests


def _run_task(request: RunRequest, threads: int) -> list[str]:
    from spdbench.harness.pipeline import execute  # deferred: a Ray worker imports the pipeline itself

    torch.set_num_threads(threads)  # same thread count as the driver: bitwise-equal numbers
    return [r.cell_id for r in execute(request).records]


def run_grid(attacks: Sequence[str], suite, eps: EpsArg, out: Union[str, Path],
             backend: str = "serial", attack_params: Optional[dict] = None, ray_address: Optional[str] = None,
             **run_kwargs) -> list[Record]:
    """Run every (attack, eps) task with the chosen backend; returns all records under `out`.

    `eps` None: each attack's budgets as in a single run (the preset's, else the suite's grid).
    `run_kwargs` are `spdbench.run`'s other arguments, checked for every attack before any task
    runs. With backend="ray", each task asks for one GPU when CUDA is available (else one CPU);
    `out` must be on a filesystem every Ray node sees.
    """
    if backend not in BACKENDS:
        raise InputError(f"unknown backend {backend!r}; expected one of {list(BACKENDS)}")
    requests = grid_requests(attacks, suite, eps, out, attack_params, **run_kwargs)
    out = prepare_out(out)
    with RunLock(out):  # one grid per folder; its tasks lock their own attack folder's scope
        if backend == "ray":
            _run_ray(requests, ray_address)
        else:
            for request in requests:
                _run_task(request, torch.get_num_threads())
    return load_records([out / a for a in attacks])


def _run_ray(requests: list[RunRequest], ray_address: Optional[str]) -> None:
    try:
        import ray  # deferred: an optional dependency (spdbench[ray])
    except ImportError:
        raise InputError("backend 'ray' needs Ray: pip install 'spdbench[ray]'") from None
    threads = torch.get_num_threads()
    started = False
    if not ray.is_initialized():
        ray.init(address=ray_address, num_cpus=None if ray_address else 2, include_dashboard=False,
                 log_to_driver=False)
        started = True
    try:
        gpus = 1 if torch.cuda.is_available() else 0
        remote = ray.remote(num_gpus=gpus, num_cpus=1 if gpus else threads, max_retries=2)(_run_task)
        ray.get([remote.remote(r, threads) for r in requests])
    finally:
        if started:
            ray.shutdown()
