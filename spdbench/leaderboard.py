"""Leaderboard: records -> pandas -> Markdown / CSV / HTML tables and metric-vs-eps plots.

Two views: the seed paper's Table 1 layout (prompt x split rows, metric x method columns,
averaged over eps) and a ranking (one row per method and eps). Every number comes from records.
"""
from __future__ import annotations

import html
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

import numpy as np
import pandas as pd

from .results import Record, Status, load_records
from .stats import bootstrap_ci

PROTECTION = ("ssim", "psnr", "vifp", "fsim")
LABELS = {"ssim": "SSIM", "psnr": "PSNR", "vifp": "VIFp", "fsim": "FSIM"}


def method_label(record: Record) -> str:
    return f"{record.attack}[{record.preset}]" if record.preset else record.attack


def records_frame(records: Iterable[Record]) -> pd.DataFrame:
    """One row per ok record: axes, protection and imperceptibility means, costs."""
    rows = []
    for r in records:
        if r.status != Status.ok:
            continue
        row = dict(method=method_label(r), attack=r.attack, suite=r.suite, target=r.target.name, norm=r.norm,
                   eps=r.eps, eps_label=r.eps_label, prompt=r.prompt_key, split=r.split.value,
                   n_images=len(r.image_names), universal=r.universal,
                   seconds_per_image=r.timing.per_image_s, fit_seconds=r.timing.fit_wall_s,
                   peak_memory_mb=(r.timing.peak_memory_bytes or 0) / 2**20 or None, cell_id=r.cell_id)
        row.update({m: r.protection_mean.get(m) for m in PROTECTION})
        row.update({f"imp_{m}": r.imperceptibility_mean.get(m) for m in PROTECTION})
        rows.append(row)
    return pd.DataFrame(rows)


def table1(df: pd.DataFrame) -> pd.DataFrame:
    """Seed Table 1 layout: rows (prompt, split); columns (metric, method); mean over eps."""
    if df.empty:
        return df
    t = df.groupby(["prompt", "split", "method"])[list(PROTECTION)].mean().unstack("method")
    methods = sorted({meth for _, meth in t.columns})
    t = t[[(m, meth) for m in PROTECTION for meth in methods if (m, meth) in t.columns]]
    t.columns = pd.MultiIndex.from_tuples([(LABELS[m], meth) for m, meth in t.columns])
    return t


def ranking(records: Sequence[Record], split: str = "test", seed: int = 0) -> pd.DataFrame:
    """One row per (method, suite, norm, eps): protection means on `split` with 95% bootstrap CIs.

    Per image, values are first averaged over prompts (the same photos are edited with every
    prompt), then images are resampled. Columns `M`, `M_lo`, `M_hi` for each protection metric,
    `ssim_after_<purifier>` (+ CI) for each purifier, imperceptibility PSNR, and costs. Sorted by
    SSIM ascending: lower similarity between clean and protected edits = stronger immunization.
    """
    ok = [r for r in records if r.status == Status.ok]
    if any(r.split.value == split for r in ok):
        ok = [r for r in ok if r.split.value == split]
    groups: dict[tuple, list[Record]] = {}
    for r in ok:
        groups.setdefault((method_label(r), r.suite, r.norm, r.eps, r.eps_label), []).append(r)
    rows = []
    for (method, suite, norm, eps, label), recs in groups.items():
        row: dict = dict(method=method, suite=suite, norm=norm, eps=eps, eps_label=label,
                         n_images=len(recs[0].image_names), prompts=len(recs))
        series = {m: [r.protection.get(m, []) for r in recs] for m in PROTECTION}
        for name in sorted({p for r in recs for p in r.purified}):
            series[f"ssim_after_{name}"] = [r.purified.get(name, {}).get("ssim", []) for r in recs]
        for col, per_prompt in series.items():
            per_prompt = [v for v in per_prompt if v]
            if not per_prompt:
                continue
            per_image = np.mean(np.asarray(per_prompt, dtype=np.float64), axis=0)
            ci = bootstrap_ci(per_image, seed=seed)
            row[col], row[f"{col}_lo"], row[f"{col}_hi"] = ci.mean, ci.low, ci.high
        row["imp_psnr"] = float(np.mean([r.imperceptibility_mean.get("psnr", np.nan) for r in recs]))
        row["seconds_per_image"] = float(np.mean([r.timing.per_image_s for r in recs]))
        dev = [r.timing.attack_device_s / max(1, len(r.image_names)) for r in recs
               if r.timing.attack_device_s is not None]
        row["device_seconds_per_image"] = float(np.mean(dev)) if dev else None
        fits = [r.timing.fit_wall_s for r in recs if r.timing.fit_wall_s is not None]
        row["fit_seconds"] = max(fits) if fits else None
        mems = [r.timing.peak_memory_bytes for r in recs if r.timing.peak_memory_bytes]
        row["peak_memory_mb"] = max(mems) / 2**20 if mems else None
        rows.append(row)
    df = pd.DataFrame(rows)
    if df.empty:
        return df
    return df.sort_values(["suite", "eps", "ssim"]).reset_index(drop=True)


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and pd.isna(v)):
        return "–"
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 10 else f"{v:.2f}"
    return str(v)


def _with_ci(row, col: str) -> str:
    if col not in row or pd.isna(row[col]):
        return "–"
    lo, hi = row.get(f"{col}_lo"), row.get(f"{col}_hi")
    if lo is None or pd.isna(lo):
        return _fmt(row[col])
    return f"{_fmt(row[col])} [{_fmt(lo)}, {_fmt(hi)}]"


def ranking_markdown(r: pd.DataFrame) -> str:
    """The ranking as a Markdown table; metric cells read `mean [95% CI]`."""
    if r.empty:
        return "(no finished records)"
    after = [c for c in r.columns if c.startswith("ssim_after_") and not c.endswith(("_lo", "_hi"))]
    head = (["method", "suite", "eps", "SSIM ↓", "PSNR ↓", "VIFp ↓", "FSIM ↓"]
            + [f"SSIM after {c[len('ssim_after_'):]} ↓" for c in after]
            + ["imperceptibility PSNR ↑", "s / image", "device s / image", "fit s", "peak MB", "images"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for _, row in r.iterrows():
        cells = [row["method"], row["suite"], row["eps_label"]] + [_with_ci(row, m) for m in PROTECTION]
        cells += [_with_ci(row, c) for c in after]
        cells += [_fmt(row.get("imp_psnr")), _fmt(row.get("seconds_per_image")),
                  _fmt(row.get("device_seconds_per_image")), _fmt(row.get("fit_seconds")),
                  _fmt(row.get("peak_memory_mb")), _fmt(row.get("n_images"))]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def table1_markdown(t: pd.DataFrame) -> str:
    if t.empty:
        return "(no records)"
    head = ["prompt", "split"] + [f"{m} {meth}" for m, meth in t.columns]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (prompt, split), row in t.iterrows():
        lines.append("| " + " | ".join([prompt, split] + [_fmt(v) for v in row.values]) + " |")
    return "\n".join(lines)


def plot_metric_vs_eps(df: pd.DataFrame, path: Path, split: str = "test") -> Optional[Path]:
    """The seed's Figures 1-2: each protection metric against eps, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if df.empty:
        return None
    d = df[df["split"] == split] if split in set(df["split"]) else df
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    for ax, m in zip(axes, PROTECTION):
        for method, g in d.groupby("method"):
            g = g.groupby("eps")[m].mean().sort_index()
            ax.plot(g.index * 255, g.values, marker="o", label=method)
        ax.set_xlabel("eps (x/255)")
        ax.set_title(f"{LABELS[m]} (edit vs edit, {split}) ↓")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def build(records: Sequence[Record], out_dir: Union[str, Path], formats: Sequence[str] = ("md", "csv", "html"),
          title: str = "spdbench leaderboard") -> dict[str, Path]:
    """Write the leaderboard files; returns {format: path}."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    df = records_frame(records)
    rank, t1 = ranking(records), table1(df)
    written: dict[str, Path] = {}
    failed = [r for r in records if r.status != Status.ok]
    note = (f"\n\n{len(failed)} failed cell(s): " + ", ".join(r.cell_id for r in failed)) if failed else ""
    if "csv" in formats:
        written["csv"] = out_dir / "leaderboard.csv"
        rank.to_csv(written["csv"], index=False)
        t1.to_csv(out_dir / "table1.csv")
    plot = plot_metric_vs_eps(df, out_dir / "metrics_vs_eps.png") if "html" in formats or "md" in formats else None
    md = (f"# {title}\n\nProtection = similarity between the edit of the clean photo and the edit of the "
          "protected photo (same prompt, settings and seed); lower is stronger. Imperceptibility PSNR is "
          "between the photo and its protected version; higher is less visible. Ranking on the test split, "
          "mean over prompts; `[low, high]` is a 95% bootstrap interval over images (seeded). Every record "
          "carries its attack parameters, suite settings, seeds, model fingerprint, library versions and "
          "perturbation hash: `spdbench verify FOLDER` recomputes each stored perturbation's norm and "
          "re-runs a sample of cells from those settings, and the same `spdbench run` settings "
          "recompute an entry from scratch.\n\n## Ranking\n\n" + ranking_markdown(rank) +
          "\n\n## Table 1 layout (mean over eps)\n\n" + table1_markdown(t1) +
          (f"\n\n![metrics vs eps]({plot.name})" if plot else "") + note + "\n")
    if "md" in formats:
        written["md"] = out_dir / "README.md"
        written["md"].write_text(md)
    if "html" in formats:
        written["html"] = out_dir / "index.html"
        body = _markdown_table_to_html(ranking_markdown(rank))
        body1 = t1.to_html(float_format=lambda v: f"{v:.4f}", na_rep="–") if not t1.empty else ""
        img = f'<img src="{plot.name}" alt="metrics vs eps" style="max-width:100%">' if plot else ""
        written["html"].write_text(
            f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;font-size:13px}"
            "td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}</style></head><body>"
            f"<h1>{html.escape(title)}</h1><p>Lower protection similarity = stronger immunization. "
            f"Ranking on the test split.</p><h2>Ranking</h2>{body}<h2>Table 1 layout</h2>{body1}{img}"
            f"<p>{html.escape(note)}</p></body></html>")
    return written


def _markdown_table_to_html(md: str) -> str:
    """The same table (with its CI cells) as HTML, so the page and the Markdown never disagree."""
    lines = [ln for ln in md.splitlines() if ln.startswith("|")]
    if len(lines) < 2:
        return f"<p>{html.escape(md)}</p>"
    cells = [[html.escape(c.strip()) for c in ln.strip("|").split("|")] for ln in lines]
    head = "".join(f"<th>{c}</th>" for c in cells[0])
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in cells[2:])
    return f"<table class='rank'><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def build_from_dirs(dirs: Sequence[Union[str, Path]], out_dir: Union[str, Path], formats=("md", "csv", "html")):
    return build(load_records(dirs), out_dir, formats)
