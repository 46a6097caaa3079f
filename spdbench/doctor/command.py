"""`spdbench doctor`: choose the environment checks, the bench (`--bench`) or the cost model (`--cost`),
and print the result.

Why its own module: the checks (env.py), the bench (bench.py, which records the checks beside its
numbers) and the cost model (cost.py, which reads a bench) sit below it; the command that picks
among them is the one module that needs all three.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

from spdbench.doctor.bench import BenchConfig, run_bench
from spdbench.doctor.cost import cost_report
from spdbench.doctor.env import collect, render, worst
from spdbench.errors import InputError


def _default_out(mode: str, device: str) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("spdbench-doctor") / f"bench-{mode}-{device.replace(':', '')}-{stamp}"


def command(bench: bool = False, quick: bool = False, device: Optional[str] = None, dtypes: Optional[str] = None,
            attacks: Optional[str] = None, out: Optional[str] = None, steps: Optional[int] = None,
            compile_backend: Optional[str] = None, time_limit: Optional[float] = None, cost: Optional[str] = None,
            build_all: bool = False, json_out: bool = False) -> int:
    """`spdbench doctor [...]`: 0 = fine (warnings allowed), 1 = an error check or a bench failure."""
    if cost:
        print(cost_report(cost))
        return 0
    bench_only = dict(quick=quick, device=device, dtypes=dtypes, attacks=attacks, out=out, steps=steps,
                      compile_backend=compile_backend, time_limit=time_limit)
    given = [f"--{k.replace('_', '-')}" for k, v in bench_only.items() if v not in (None, False)]
    if given and not bench:
        raise InputError(f"{', '.join(given)} only apply with --bench (spdbench doctor --bench {given[0]} ...)")
    if bench:
        split = (lambda text: tuple(p.strip() for p in text.split(",") if p.strip()) if text else None)
        cfg = BenchConfig.for_mode(quick, device=device, dtypes=split(dtypes), attacks=split(attacks), steps=steps,
                                   compile_backend=compile_backend, time_limit_s=time_limit)
        cfg.validate()
        folder = Path(out) if out else _default_out(cfg.mode, cfg.device)
        report = run_bench(cfg, folder)
        for line in report.failures:
            print(f"FAILED {line}")
        print(f"{'PASS' if report.ok else 'FAIL'}: wrote {folder / 'bench.json'} and {folder / 'bench.md'}")
        return 0 if report.ok else 1
    checks = collect(build_all=build_all)
    if json_out:
        print(json.dumps([c.to_dict() for c in checks], indent=1))
    else:
        render(checks)
    return 1 if worst(checks) == "error" else 0
