"""What the full `sd15-spd` protocol costs per attack, computed from a `spdbench doctor --bench` JSON.

Why: the protocol is hundreds of GPU-hours; the number must come from a measurement on the
machine that will run it, not from a guess, and must say what it was measured on. The counts come
from the suite itself (`suites.SUITES["sd15-spd"]`) and the split rule, so a change to the protocol
changes the cost. Usage: `spdbench doctor --cost spdbench-doctor/.../bench.json`
(or `python -m spdbench.doctor.cost bench.json`).

Per attack, in the bench's dtype (seconds, then / 3600):
  attack  = n_eps x steps x (n_train for universal attacks, fit on the full training batch; n_images
            for per-image attacks, which protect every image) x seconds per image-iteration
  edits   = n_eps x n_images x n_prompts / img2img images/s (at the suite's batch and 50 steps; a
            bench run at fewer steps gives a range: its rate as is, and scaled by steps)
  scoring = n_eps x n_images x (n_prompts + 1) / metric pairs/s (protection per prompt + imperceptibility)
The clean edits (n_images x n_prompts) are computed once and shared by every attack.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Optional, Union

from spdbench.errors import InputError
from spdbench.data.photos import split_indices
from spdbench.doctor.bench import SCHEMA
from spdbench.suites import get_suite

#: the protocol's image count (DESIGN §1: 100 ImageNet images, split 64:36)
PROTOCOL_IMAGES = 100


def protocol_counts(suite_name: str = "sd15-spd") -> dict:
    """The counts the cost multiplies, read from the suite and the split rule."""
    suite = get_suite(suite_name)
    train, _ = split_indices(PROTOCOL_IMAGES, suite.split_seed)
    return dict(suite=suite.name, eps=len(suite.eps), steps=int(suite.attack_steps or 0), images=PROTOCOL_IMAGES,
                train=len(train), prompts=len(suite.prompts), edit_batch=suite.attack_batch_size,
                edit_steps=suite.edit.steps)


def load_bench(path: Union[str, Path]) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"--cost {str(path)!r}: cannot read a bench JSON ({type(exc).__name__}: {exc})") from None
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        raise InputError(f"--cost {str(path)!r}: not a `spdbench doctor --bench` JSON (expected schema {SCHEMA!r})")
    return data


def _edit_rates(data: dict, dtype: str, batch: int, steps: int) -> tuple[Optional[float], Optional[float], str]:
    """img2img images/s for `dtype` at `batch` (else the nearest measured batch) at `steps` steps, as
    (fast, slow) bounds. Equal when the bench used `steps`; from a bench with fewer steps the
    measured rate is an upper bound on the speed (more steps cost more) and the rate scaled by
    steps a lower bound (it also multiplies the encode and decode, which do not grow with steps)."""
    rows = [r for r in data.get("edits", []) if r.get("dtype") == dtype and r.get("images_per_s") and not r["failures"]]
    if not rows:
        return None, None, "img2img not measured"
    row = min(rows, key=lambda r: (abs(r["batch"] - batch), -r["batch"]))
    if row["steps"] == steps:
        return row["images_per_s"], row["images_per_s"], f"batch {row['batch']}"
    return (row["images_per_s"], row["images_per_s"] * row["steps"] / steps,
            f"batch {row['batch']}, measured at {row['steps']} steps: bounds for {steps}")


def cost_rows(data: dict, counts: Optional[dict] = None) -> list[dict]:
    """One row per (attack, dtype) of the bench with seconds and hours per protocol part."""
    counts = counts or protocol_counts()
    metrics = data.get("metrics") or {}
    pairs_rate = metrics.get("pairs_per_s") if not metrics.get("failures") else None
    rows = []
    for r in data.get("attacks", []):
        row: dict[str, Any] = dict(attack=r["attack"], dtype=r["dtype"], universal=r["universal"],
                                   bench_ok=not r["failures"])
        if "seconds" not in r:
            row["note"] = ("not timed (the attack refuses this dtype and says why)" if r.get("unsupported")
                           else "not timed (the attack failed in the bench)")
            rows.append(row)
            continue
        per_image_it = r.get("s_per_image_iteration")
        images = counts["train"] if r["universal"] else counts["images"]
        row["s_per_image_iteration"] = per_image_it
        row["attack_s"] = counts["eps"] * counts["steps"] * images * per_image_it if per_image_it else 0.0
        fast, slow, how = _edit_rates(data, r["dtype"], counts["edit_batch"], counts["edit_steps"])
        n_edits = counts["eps"] * counts["images"] * counts["prompts"]
        row["edits_s"] = n_edits / slow if slow else None          # the upper bound of the time
        row["edits_s_low"] = n_edits / fast if fast else None
        row["edit_basis"] = how
        n_pairs = counts["eps"] * counts["images"] * (counts["prompts"] + 1)
        row["scoring_s"] = n_pairs / pairs_rate if pairs_rate else None
        parts = [row["attack_s"], row["edits_s"], row["scoring_s"]]
        row["total_s"] = sum(parts) if all(p is not None for p in parts) else None
        if row["total_s"] is not None:
            row["total_s_low"] = row["total_s"] - row["edits_s"] + row["edits_s_low"]
        rows.append(row)
    return rows


def _hours(seconds: Optional[float]) -> str:
    if seconds is None:
        return "-"
    hours = seconds / 3600
    return f"{hours:,.0f}" if hours >= 100 else f"{hours:,.1f}" if hours >= 1 else f"{hours:.2f}"


def _span(low: Optional[float], high: Optional[float]) -> str:
    """Hours, or 'low-high' when the bench only bounds them (img2img measured at fewer steps)."""
    if low is None or high is None or _hours(low) == _hours(high):
        return _hours(high)
    return f"{_hours(low)}-{_hours(high)}"


def cost_report(path_or_data: Union[str, Path, dict], counts: Optional[dict] = None) -> str:
    """Markdown: what was measured where, the protocol counts, and hours per attack and dtype."""
    data = path_or_data if isinstance(path_or_data, dict) else load_bench(path_or_data)
    counts = counts or protocol_counts()
    cfg, tgt = data["config"], data.get("target", {})
    device = cfg["device"]
    unit = "GPU-hours" if device.startswith("cuda") else "CPU-hours"
    where = tgt.get("device_name", device)
    lines = [f"# {counts['suite']} cost from the bench of {data.get('created', '?')}", ""]
    lines.append(f"Measured on **{where}** ({device}), {cfg['target']} at {cfg['image_size']} px, "
                 f"bench status **{data.get('status', '?')}**. Hours are **{unit} on this device**"
                 + ("." if unit == "GPU-hours" else ", not GPU-hours: no GPU was used for these numbers."))
    if cfg["target"].split("-")[0:3] != ["sd15", "arch", "random"] or cfg["image_size"] != 512:
        lines.append(f"**Not a protocol estimate**: the protocol runs the SD1.5 architecture at 512 px; this bench "
                     f"measured {cfg['target']} at {cfg['image_size']} px, so the hours below only show the "
                     "formula at work. Run `spdbench doctor --bench --device cuda` on the GPU that will do the run.")
    lines += ["", f"Counts: {counts['eps']} eps x {counts['steps']} iterations; {counts['images']} images "
              f"({counts['train']} train, which universal attacks fit on at full batch); {counts['prompts']} prompts; "
              f"edits at batch {counts['edit_batch']} with {counts['edit_steps']} steps; scoring = protection per "
              "prompt + imperceptibility.", ""]
    rows = cost_rows(data, counts)
    lines += [f"| attack | dtype | s / image-iteration | attack h | edits h | scoring h | **total {unit}** | bench |",
              "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "attack_s" not in r:
            lines.append(f"| {r['attack']} | {r['dtype']} | - | - | - | - | - | FAIL ({r['note']}) |")
            continue
        per = r["s_per_image_iteration"]
        lines.append(f"| {r['attack']} | {r['dtype']} | {f'{per:.3g}' if per else '- (no iterations)'} | "
                     f"{_hours(r['attack_s'])} | {_span(r.get('edits_s_low'), r['edits_s'])} | "
                     f"{_hours(r['scoring_s'])} | **{_span(r.get('total_s_low'), r['total_s'])}** | "
                     f"{'ok' if r['bench_ok'] else 'FAIL'} |")
    clean = []
    for dtype in dict.fromkeys(r["dtype"] for r in rows):
        fast, slow, how = _edit_rates(data, dtype, counts["edit_batch"], counts["edit_steps"])
        if slow:
            n = counts["images"] * counts["prompts"]
            clean.append(f"{dtype} {_span(n / fast, n / slow)} h ({how})")
    if clean:
        lines += ["", f"Clean edits, once for all attacks ({counts['images'] * counts['prompts']} edits): "
                  + "; ".join(clean) + "."]
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m spdbench.doctor.cost BENCH.json", file=sys.stderr)
        return 2
    try:
        print(cost_report(argv[0]))
    except InputError as exc:
        print(f"spdbench doctor_cost: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
