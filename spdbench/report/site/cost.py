"""The cost card: what protecting one photo took -- seconds, model passes, peak memory -- with the
device named. Shown beside the ranking, never ranked on (issue 37: a cost column is read with its
hardware, fairchem #126, RobustBench #208).

Peak memory is the harness's measurement: CUDA's peak allocation where the attack ran on a GPU
(`Timing.peak_memory_bytes`), else the attack worker's peak resident set (`Timing.peak_rss_bytes`,
recorded since issue 37; read with a default so older records still load and say "not recorded").
"""
from __future__ import annotations

import math
import statistics
from typing import Optional, Sequence

from spdbench.scoring.work import record_work
from spdbench.store.records import Record

HEAD = ("device", "s / image (median over cells)", "fit s (universal / amortized)",
        "model passes / image (fwd+bwd)", "work / image (encoder-equivalent passes)", "peak memory")
_NETS = (("enc", "vae_encoder"), ("unet", "unet"), ("dec", "vae_decoder"))


def device_text(rec: Record) -> str:
    """'cpu (x86_64, 2 threads)', 'cuda (NVIDIA H100 80GB HBM3)': the kind and the hardware's name."""
    prov = rec.provenance or {}
    kind = str(prov.get("device") or rec.target.device).split(":")[0]
    name = prov.get("device_name")
    threads = prov.get("cpu_threads") if kind == "cpu" else None
    detail = ", ".join(str(p) for p in (name, f"{threads} threads" if threads else None) if p)
    return f"{kind} ({detail})" if detail else kind


def _mb(value: Optional[float]) -> Optional[str]:
    return None if value is None else f"{value / 2**20:.0f} MB"


def peak_memory_text(recs: Sequence[Record]) -> str:
    """The largest peak over the cells, and which counter it is."""
    cuda = [r.timing.peak_memory_bytes for r in recs if r.timing.peak_memory_bytes]
    if cuda:
        return f"{_mb(max(cuda))} (CUDA peak allocated)"
    rss = [v for v in (getattr(r.timing, "peak_rss_bytes", None) for r in recs) if v]
    if rss:
        return f"{_mb(max(rss))} (attack process peak RSS, CPU)"
    return "not recorded"


def passes_text(rec: Record) -> str:
    calls = rec.model_calls or {}
    parts = []
    for short, net in _NETS:
        total = calls.get(f"{net}_fwd", 0) + calls.get(f"{net}_bwd", 0)
        if total:
            parts.append(f"{short} {total:.4g}")
    return " · ".join(parts) or "none counted"


def _work(rec: Record) -> str:
    work = record_work(rec)
    return "–" if work is None else f"{work:.4g}"


def cost_row(recs: Sequence[Record]) -> list[str]:
    """One budget's cost card row (HEAD order) over its cells' records (one method, one budget)."""
    first = recs[0]
    secs = [r.timing.per_image_s for r in recs if r.timing.per_image_s is not None
            and math.isfinite(r.timing.per_image_s)]
    fits = [r.timing.fit_wall_s for r in recs if r.timing.fit_wall_s is not None]
    return [device_text(first), f"{statistics.median(secs):.4g}" if secs else "–",
            f"{max(fits):.4g}" if fits else "–", passes_text(first), _work(first), peak_memory_text(recs)]
