"""Worker start: forked by the zygote vs exec'd (a new interpreter importing torch and diffusers).

Every run, every `verify` re-run and every `describe` of a plugin starts an attack worker; on a
small model its start is longer than the attack. Both contenders start the same sandboxed worker
with its model copy (`AttackWorker.start`: spawn, confinement, model load, fingerprint check) and
are timed interleaved, round after round, so machine noise hits both alike. The zygote's own start
(its imports, once per harness process) is timed apart. Medians in `extra_info`.
"""
import statistics
import sys
import time

import pytest

import spdbench
from spdbench.harness import isolation
from spdbench.harness.isolation import AttackWorker

ROUNDS = 5


def _start(target) -> float:
    worker = AttackWorker(target, sandbox=True)
    try:
        return worker.start()
    finally:
        worker.close()


@pytest.mark.skipif(sys.platform != "linux", reason="the zygote is Linux-only")
@pytest.mark.parametrize("target_name", ["tiny"])
def test_worker_start_forked_vs_execed(benchmark, monkeypatch, target_name):
    target = spdbench.load_target(target_name)
    t0 = time.perf_counter()
    assert isolation.shared_zygote() is not None
    zygote_s = time.perf_counter() - t0
    forked, execed = [], []
    for _ in range(ROUNDS):
        monkeypatch.delenv("SPDBENCH_ZYGOTE", raising=False)
        forked.append(_start(target))
        monkeypatch.setenv("SPDBENCH_ZYGOTE", "0")
        execed.append(_start(target))
    monkeypatch.delenv("SPDBENCH_ZYGOTE", raising=False)
    benchmark.extra_info.update(forked_median_s=round(statistics.median(forked), 3),
                                execed_median_s=round(statistics.median(execed), 3),
                                zygote_start_s=round(zygote_s, 3), rounds=ROUNDS, target=target_name)
    benchmark.pedantic(_start, args=(target,), rounds=1, iterations=1)
    print(f"\nworker start, median of {ROUNDS}: forked {statistics.median(forked):.2f} s, "
          f"exec'd {statistics.median(execed):.2f} s (zygote's own start {zygote_s:.2f} s)")
