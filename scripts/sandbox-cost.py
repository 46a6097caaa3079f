"""What the worker's OS confinement costs (issue 40): worker start and one attack step, with and without.

    python scripts/sandbox-cost.py [--repeats 3] [--steps 11] [--size 64] [--target tiny-random]

Starts an attack worker unconfined (isolation "process") and confined (isolation "sandbox"),
alternating so a busy machine weighs on both alike, and times: the start (spawn, confinement,
loading the model copy: `AttackWorker.start`), and one attack step (photoguard-encoder run with 1
and with `--steps` steps on 4 images; the difference over the extra steps). Medians are printed
as a Markdown table for docs/performance.md.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

import spdbench
from spdbench.budget import Budget
from spdbench.harness.isolation import AttackWorker


def _images(n: int, size: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return (torch.rand(n, 3, size, size, generator=g) * 255).round() / 255


def _cpu_s(worker: AttackWorker) -> float:
    """CPU seconds (user + system) of the worker's process group so far: steadier than wall time on
    a shared machine, where other jobs take turns on the cores."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == worker.proc.pid:  # process group id
            total += int(fields[11]) + int(fields[12])
    return total / tick


def _attack_s(worker: AttackWorker, steps: int, images: torch.Tensor) -> tuple[float, float]:
    """(wall s, CPU s) of one request running `steps` steps."""
    attack = spdbench.get_attack("photoguard-encoder", steps=steps)
    cpu0 = _cpu_s(worker)
    result = worker.run(attack=attack, budget=Budget("linf", 8 / 255), universal=False, batch_size=len(images),
                        splits={"train": {"images": images, "seed": 0}}, timeout=None)
    return result.wall_s, _cpu_s(worker) - cpu0


def measure(target, sandbox: bool, steps: int, images: torch.Tensor) -> tuple[float, float, float, float, str]:
    """(start s, wall s per attack step, CPU s per step, seconds the worker spent confining itself,
    isolation)."""
    with AttackWorker(target, sandbox=sandbox) as worker:
        start = worker.start()
        _attack_s(worker, 1, images)  # the first request also warms the model up: not timed
        one = _attack_s(worker, 1, images)
        many = _attack_s(worker, steps, images)
        confine = float((worker.sandbox_report or {}).get("confine_s") or 0.0)
        return (start, (many[0] - one[0]) / (steps - 1), (many[1] - one[1]) / (steps - 1), confine,
                worker.isolation)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=11)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--target", default="tiny-random")
    args = ap.parse_args()
    target = spdbench.load_target(args.target)
    images = _images(4, args.size)
    rows: dict[bool, list[tuple[float, ...]]] = {False: [], True: []}
    seen = {}
    for _ in range(args.repeats):
        for sandbox in (False, True):
            start, step, cpu, confine, isolation = measure(target, sandbox, args.steps, images)
            rows[sandbox].append((start, confine, step, cpu))
            seen[sandbox] = isolation
            print(f"  {isolation:8s} start {start:7.2f} s (confining {confine:5.2f} s)   step {1000 * step:8.1f} ms "
                  f"wall, {1000 * cpu:8.1f} ms CPU", flush=True)
    print(f"\n{args.target}, 4 images of {args.size} px, photoguard-encoder, {torch.get_num_threads()} threads, "
          f"median of {args.repeats}\n")
    print("| worker | start (s) | of which confining (s) | one attack step, wall (ms) | one attack step, CPU (ms) |\n"
          "|---|---|---|---|---|")
    for sandbox in (False, True):
        start, confine, step, cpu = (statistics.median(r[i] for r in rows[sandbox]) for i in range(4))
        print(f"| {seen[sandbox]} | {start:.2f} | {confine:.2f} | {1000 * step:.1f} | {1000 * cpu:.1f} |")


if __name__ == "__main__":
    t0 = time.perf_counter()
    main()
    print(f"\n({time.perf_counter() - t0:.0f} s)")
