"""Leaderboard: records -> pandas -> Markdown / CSV / HTML tables and metric-vs-eps plots.

Two views: a ranking (one row per method and eps; the page cuts it into one section per budget,
leaderboard_page.py) and the seed paper's Table 1 layout (prompt x split rows, metric x method
columns, one per eps). Every number is derived from the
records' per-image values (a stated `*_mean` is never read); every name is escaped where it is
rendered; a folder that fails its checks is reported by name and left out, never breaking the build.
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

import numpy as np
import pandas as pd

from spdbench.errors import InputError, RecordError
from spdbench.scoring.regions import REGION_METRICS
from spdbench.store.records import Record, Status
from spdbench.scoring.stats import bootstrap_ci
from spdbench.scoring.worst_case import worst_case

FORMATS = ("md", "csv", "html")
#: the gallery shows each example panel this many pixels a side (gallery.py)
SHOWN_PX = 128
PROTECTION = ("ssim", "psnr", "vifp", "fsim")
LABELS = {"ssim": "SSIM", "psnr": "PSNR", "vifp": "VIFp", "fsim": "FSIM"}


def method_label(record: Record) -> str:
    """attack[preset], plus "+EOT(jpeg75, ...)" for an adaptive run: a different method on the board."""
    label = f"{record.attack}[{record.preset}]" if record.preset else record.attack
    robust = record.attack_params.get("robust_to") or ()
    return f"{label} +EOT({', '.join(robust)})" if robust else label


def torch_device_type(device: str) -> str:
    """'cuda:0' -> 'cuda' (a record names the device it ran on)."""
    return str(device).split(":")[0]


def _mean(values: Sequence[float]) -> Optional[float]:
    """Mean of per-image values (None for an empty list): the only way a mean enters a table."""
    return float(np.mean(np.asarray(values, dtype=np.float64))) if len(values) else None


def md_escape(value) -> str:
    """Text safe inside a Markdown table cell: no line breaks or control characters, `|` and
    Markdown punctuation backslash-escaped, and <, >, & as HTML entities (no raw HTML)."""
    text = re.sub(r"[\x00-\x1f\x7f]+", " ", str(value))
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return re.sub(r"([\\`*_{}\[\]()#+!|~])", r"\\\1", text)


def records_frame(records: Iterable[Record]) -> pd.DataFrame:
    """One row per ok record: axes, protection and imperceptibility means (of the per-image values), costs."""
    rows = []
    for r in records:
        if r.status != Status.ok:
            continue
        row = dict(method=method_label(r), attack=r.attack, suite=r.suite, task=r.task, target=r.target.name, norm=r.norm,
                   eps=r.eps, eps_label=r.eps_label, prompt=r.prompt_key, split=r.split.value,
                   n_images=len(r.image_names), universal=r.universal,
                   seconds_per_image=r.timing.per_image_s, fit_seconds=r.timing.fit_wall_s,
                   peak_memory_mb=(r.timing.peak_memory_bytes or 0) / 2**20 or None, cell_id=r.cell_id)
        row.update({m: _mean(r.protection.get(m, [])) for m in PROTECTION})
        row.update({f"imp_{m}": _mean(r.imperceptibility.get(m, [])) for m in PROTECTION})
        rows.append(row)
    return pd.DataFrame(rows)


#: suites whose page shows the seed's Table 1 layout (its paper's suite); table1.csv has every suite
TABLE1_SUITES: tuple[str, ...] = ("sd15-spd",)


def table1(df: pd.DataFrame) -> pd.DataFrame:
    """Seed Table 1 layout per budget: rows (suite, eps, prompt, split); columns (metric, method).
    One value per cell: nothing is averaged over eps (the seed's table is read one eps at a time)."""
    if df.empty:
        return df
    df = df.sort_values("eps")
    t = df.groupby(["suite", "eps_label", "prompt", "split", "method"], sort=False)[list(PROTECTION)].mean()
    t = t.unstack("method")
    methods = sorted({meth for _, meth in t.columns})
    t = t[[(m, meth) for m in PROTECTION for meth in methods if (m, meth) in t.columns]]
    t.columns = pd.MultiIndex.from_tuples([(LABELS[m], meth) for m, meth in t.columns])
    return t


def ranking(records: Sequence[Record], split: str = "test", seed: int = 0) -> pd.DataFrame:
    """One row per (method, suite, norm, eps): protection means on `split` with 95% bootstrap CIs.

    Per image, values are first averaged over prompts (the same photos are edited with every
    prompt), then images are resampled. Columns `M`, `M_lo`, `M_hi` for each protection metric,
    `ssim_after_<purifier>` (+ CI) for each purifier, `worst_<M>` (+ CI): each image's protection
    after the purifier (or none) that best restores its edit (`worst_case.py`), with `worst_by`
    counting which purifier that was; imperceptibility PSNR, and costs. Sorted by SSIM ascending:
    lower similarity between clean and protected edits = stronger immunization; `rank_worst` is
    the rank by worst-case SSIM within the same suite and eps.
    """
    ok = [r for r in records if r.status == Status.ok]
    # seconds per image over every cell of a method and budget (both splits): the spread of a cost
    # measured on a busy machine is part of the number
    seconds: dict[tuple, list[float]] = {}
    for r in ok:
        seconds.setdefault((method_label(r), r.suite, r.norm, r.eps), []).append(r.timing.per_image_s)
    if any(r.split.value == split for r in ok):
        ok = [r for r in ok if r.split.value == split]
    groups: dict[tuple, list[Record]] = {}
    for r in ok:
        groups.setdefault((method_label(r), r.suite, r.norm, r.eps, r.eps_label), []).append(r)
    rows = []
    for (method, suite, norm, eps, label), recs in groups.items():
        row: dict = dict(method=method, suite=suite, task=recs[0].task, norm=norm, eps=eps, eps_label=label,
                         device=torch_device_type(recs[0].target.device),
                         n_images=len(recs[0].image_names), prompts=len(recs), target=recs[0].target.name,
                         edited_with=recs[0].edit_target.name if recs[0].edit_target else None)
        series = {m: [r.protection.get(m, []) for r in recs] for m in PROTECTION}
        if any(r.protection_region for r in recs):  # inpainting: the repainted region (region_metrics.py)
            series.update({f"region_{m}": [r.protection_region.get(m, []) for r in recs] for m in REGION_METRICS})
        for name in sorted({p for r in recs for p in r.purified}):
            series[f"ssim_after_{name}"] = [r.purified.get(name, {}).get("ssim", []) for r in recs]
        if any(r.purified for r in recs):  # the per-image worst case over purifiers (worst_case.py)
            worst = [worst_case(r.protection, r.purified) for r in recs]
            for m in PROTECTION:
                series[f"worst_{m}"] = [w.get(m, []) for w, _ in worst]
            choices = [c for _, cs in worst for c in cs]
            row["worst_by"] = ", ".join(f"{k} {choices.count(k)}" for k in sorted(set(choices),
                                                                                 key=lambda k: (-choices.count(k), k)))
        for col, per_prompt in series.items():
            per_prompt = [v for v in per_prompt if v]
            if not per_prompt:
                continue
            per_image = np.mean(np.asarray(per_prompt, dtype=np.float64), axis=0)
            if col == "ssim":  # kept (not shown) for the paired comparison with the next row
                row["_ssim_images"], row["_shas"] = per_image, tuple(recs[0].image_sha256)
            ci = bootstrap_ci(per_image, seed=seed)
            row[col], row[f"{col}_lo"], row[f"{col}_hi"] = ci.mean, ci.low, ci.high
        imp = [_mean(r.imperceptibility.get("psnr", [])) for r in recs]
        row["imp_psnr"] = float(np.mean(imp)) if imp and None not in imp else None
        kept = [_mean(r.imperceptibility_kept.get("psnr", [])) for r in recs]
        row["kept_psnr"] = float(np.mean(kept)) if kept and None not in kept else None
        secs = [v for v in seconds.get((method, suite, norm, eps), []) if v is not None and math.isfinite(v)]
        if secs:
            row["seconds_per_image"] = float(np.median(secs))
            row["seconds_per_image_lo"], row["seconds_per_image_hi"] = float(min(secs)), float(max(secs))
        dev = [r.timing.attack_device_s / max(1, len(r.image_names)) for r in recs
               if r.timing.attack_device_s is not None]
        row["device_seconds_per_image"] = float(np.mean(dev)) if dev else None
        fits = [r.timing.fit_wall_s for r in recs if r.timing.fit_wall_s is not None]
        row["fit_seconds"] = max(fits) if fits else None
        mems = [r.timing.peak_memory_bytes for r in recs if r.timing.peak_memory_bytes]
        row["peak_memory_mb"] = max(mems) / 2**20 if mems else None
        row["steps"] = _steps_label(recs[0])
        row["model_calls"] = _calls_label(recs[0])
        row["flags"] = ", ".join(sorted({f for r in recs for f in r.flags})) or None
        rows.append(row)
    df = pd.DataFrame(rows)
    if df.empty:
        return df
    if "worst_ssim" in df.columns:
        df["rank_worst"] = df.groupby(["suite", "eps"])["worst_ssim"].rank(method="min").astype("Int64")
    df["rank"] = df.groupby(["suite", "eps"])["ssim"].rank(method="min").astype("Int64")
    df = df.sort_values(["task", "suite", "eps", "ssim"]).reset_index(drop=True)
    df["vs_next"] = _versus_next(df, seed)
    return df.drop(columns=["_ssim_images", "_shas"], errors="ignore")


def _versus_next(df: pd.DataFrame, seed: int) -> list[Optional[str]]:
    """Per row: is its SSIM lower than the next row's (same suite and eps) by more than chance?
    Paired bootstrap over the same test photos (stats.bootstrap_diff_ci); 'yes', 'not shown', or
    None for the last row of a group and where the two were not scored on the same photos."""
    from spdbench.scoring.stats import bootstrap_diff_ci

    out: list[Optional[str]] = [None] * len(df)
    for i in range(len(df) - 1):
        a, b = df.iloc[i], df.iloc[i + 1]
        if (a["suite"], a["eps"]) != (b["suite"], b["eps"]) or not isinstance(a.get("_shas"), tuple) \
                or a.get("_shas") != b.get("_shas"):
            continue
        ci = bootstrap_diff_ci(a["_ssim_images"], b["_ssim_images"], seed=seed, paired=True)
        out[i] = "yes" if ci.high < 0 else "not shown"
    return out


#: the leaderboard's task groups, in page order, with their section titles
TASKS = {"img2img": "img2img", "inpaint": "Inpainting (whole image, and the repainted region only)"}


def by_task(rank: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """The ranking split into its task groups (img2img, inpainting): they are different games."""
    if rank.empty or "task" not in rank.columns:
        return [("img2img", rank)]
    return [(t, rank[rank["task"] == t].dropna(axis=1, how="all").reset_index(drop=True))
            for t in TASKS if (rank["task"] == t).any()]


_SOURCE = {"suite": "suite", "explicit": "set", "default": "default"}


def _steps_label(rec: Record) -> Optional[str]:
    """The attack's steps and where they came from ("40 (suite)", "1000 (preset madry)")."""
    steps = rec.attack_params.get("steps")
    if steps is None:
        return None
    src = rec.param_sources.get("steps", "")
    src = f"preset {src.split(':', 1)[1]}" if src.startswith("preset:") else _SOURCE.get(src, src)
    return f"{steps} ({src})" if src else str(steps)


def _calls_label(rec: Record) -> Optional[str]:
    """Network passes per image (forward/backward) the attack made: the hardware-independent cost.
    For a universal attack, per training image of its fit."""
    calls = rec.model_calls
    if not calls or not any(calls.values()):
        return None
    parts = []
    for short, net in (("enc", "vae_encoder"), ("unet", "unet"), ("dec", "vae_decoder")):
        fwd, bwd = calls.get(f"{net}_fwd", 0), calls.get(f"{net}_bwd", 0)
        if fwd or bwd:
            parts.append(f"{short} {fwd:.4g}/{bwd:.4g}")
    return " · ".join(parts)


def _fmt(v) -> str:
    if v is None or v is pd.NA or (isinstance(v, float) and pd.isna(v)):
        return "–"
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 10 else f"{v:.2f}"
    return str(v)


def ci_text(row, col: str) -> str:
    """`[low, high]` of column `col`'s 95% interval, or "" where the row has none."""
    lo, hi = row.get(f"{col}_lo"), row.get(f"{col}_hi")
    if lo is None or pd.isna(lo) or hi is None or pd.isna(hi):
        return ""
    return f"[{_fmt(lo)}, {_fmt(hi)}]"


def _with_ci(row, col: str) -> str:
    if col not in row or pd.isna(row[col]):
        return "–"
    ci = ci_text(row, col)
    return f"{_fmt(row[col])} {ci}" if ci else _fmt(row[col])


def transfer_table(rank: pd.DataFrame) -> pd.DataFrame:
    """White box beside black box: each transfer row (a suite whose edits are another model's) with
    the same method and eps measured where the attack's own model edits, if that row exists."""
    if rank.empty or "edited_with" not in rank.columns or rank["edited_with"].isna().all():
        return pd.DataFrame()
    rows = []
    white = rank[rank["edited_with"].isna()]
    for _, b in rank[rank["edited_with"].notna()].iterrows():
        w = white[(white["method"] == b["method"]) & (white["eps"] == b["eps"]) & (white["target"] == b["target"])]
        wrow = w.iloc[0] if len(w) else None
        rows.append(dict(method=b["method"], eps_label=b["eps_label"], crafted_on=b["target"],
                         edited_with=b["edited_with"], white_box=_with_ci(wrow, "ssim") if wrow is not None else "–",
                         black_box=_with_ci(b, "ssim"), black_box_suite=b["suite"]))
    return pd.DataFrame(rows)


def transfer_markdown(t: pd.DataFrame) -> str:
    head = ["method", "eps", "crafted on", "edited with", "SSIM white box ↓", "SSIM black box ↓", "suite"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for _, r in t.iterrows():
        cells = [r["method"], r["eps_label"], r["crafted_on"], r["edited_with"], r["white_box"], r["black_box"],
                 r["black_box_suite"]]
        lines.append("| " + " | ".join(md_escape(c) for c in cells) + " |")
    return "\n".join(lines)


def table1_markdown(t: pd.DataFrame) -> str:
    if t.empty:
        return "(no records)"
    head = ["prompt", "split"] + [f"{m} {md_escape(meth)}" for m, meth in t.columns]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (prompt, split), row in t.iterrows():
        lines.append("| " + " | ".join([md_escape(prompt), md_escape(split)] + [_fmt(v) for v in row.values]) + " |")
    return "\n".join(lines)


def _colors(methods: Sequence[str]) -> dict:
    """One colour per method, stable across the page's figures (tab20: enough for 20 methods)."""
    import matplotlib

    cmap = matplotlib.colormaps["tab20"]
    return {m: cmap(i % 20) for i, m in enumerate(sorted(methods))}


def plot_metric_vs_eps(df: pd.DataFrame, path: Path, split: str = "test") -> Optional[Path]:
    """The seed's Figures 1-2: each protection metric against eps, one line per method. The legend
    sits outside the axes; `none` (nothing changed: PSNR 100 dB) is left out of the PSNR panel,
    whose scale it would squash."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if df.empty:
        return None
    d = df[df["split"] == split] if split in set(df["split"]) else df
    colors = _colors(list(d["method"].unique()))
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.8))
    for ax, m in zip(axes, PROTECTION):
        for method, g in d.groupby("method"):
            if m == "psnr" and method == "none":
                continue
            g = g.groupby("eps")[m].mean().sort_index()
            ax.plot(g.index * 255, g.values, marker="o", label=method, color=colors[method])
        ax.set_xlabel("eps (x/255)")
        ax.set_title(f"{LABELS[m]} (edit vs edit, {split}) ↓")
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)
    return path


#: images over which a universal or amortized method's one-off fit is spread in the cost plot
SPREAD_N = (10, 10_000)


def plot_tradeoffs(rank: pd.DataFrame, path: Path) -> Optional[Path]:
    """Three questions, img2img test split, one colour per method, a marker per eps: protection
    against imperceptibility; protection against cost per photo (a universal or amortized method's
    fit spread over 10 to 10,000 photos, drawn as its own line); protection after the strongest
    purifier (the per-image worst case) against eps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r = rank[(rank["task"] == "img2img") & (rank["method"] != "none")] if not rank.empty else rank
    if r.empty:
        return None
    colors = _colors(list(r["method"].unique()))
    markers = {e: mk for e, mk in zip(sorted(r["eps"].unique()), "os^Dv<>p*h")}
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.2))
    for _, row in r.iterrows():
        c, mk = colors[row["method"]], markers.get(row["eps"], "o")
        if pd.notna(row.get("imp_psnr")):
            axes[0].scatter(row["imp_psnr"], row["ssim"], color=c, marker=mk)
        per = row.get("seconds_per_image")
        fit = row.get("fit_seconds")
        if pd.notna(per) and pd.notna(fit) and fit:
            xs = [per + fit / n for n in SPREAD_N]
            axes[1].plot(xs, [row["ssim"]] * 2, color=c, lw=2)
            axes[1].scatter(xs[-1], row["ssim"], color=c, marker=mk)
        elif pd.notna(per) and per > 0:
            axes[1].scatter(per, row["ssim"], color=c, marker=mk)
    for method, g in r.groupby("method"):
        if "worst_ssim" in g and g["worst_ssim"].notna().any():
            g = g.sort_values("eps")
            axes[2].plot(g["eps"] * 255, g["worst_ssim"], marker="o", color=colors[method])
    axes[0].set_xlabel("imperceptibility PSNR (dB) →  less visible")
    axes[1].set_xlabel(f"seconds per photo (log; fit spread over {SPREAD_N[0]}-{SPREAD_N[1]:,} photos as a line)")
    axes[1].set_xscale("log")
    axes[2].set_xlabel("eps (x/255)")
    for ax, title in zip(axes, ("protection vs imperceptibility", "protection vs cost", "after the strongest purifier")):
        ax.set_ylabel("SSIM (edit vs edit, test) ↓")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=c, marker="o", ls="", label=m) for m, c in colors.items()]
    handles += [Line2D([], [], color="grey", marker=mk, ls="", label=f"eps {e * 255:.3g}/255")
                for e, mk in markers.items()]
    fig.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)
    return path


def build(records: Sequence[Record], out_dir: Union[str, Path], formats: Sequence[str] = FORMATS,
          title: str = "spdbench leaderboard", skipped: Sequence[tuple[str, str]] = (),
          by_folder: Optional[dict[str, list[Record]]] = None) -> dict[str, Path]:
    """Write the leaderboard files; returns {format: path}. `skipped`: (folder name, reason) of the
    folders left out, listed on the page; `by_folder`: the records' folders, for the page's gallery
    of their example strips (gallery.py)."""
    formats = list(formats)
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise InputError(f"--format {','.join(formats)!r}: expected one or more of {', '.join(FORMATS)} "
                         "separated by commas")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    df = records_frame(records)
    if not df.empty:
        df = df[df["task"] == "img2img"]  # the seed's Table 1 and figures are img2img
    rank, t1 = ranking(records), table1(df)
    pending = read_pending(out_dir)
    written: dict[str, Path] = {}
    failed = [r.cell_id for r in records if r.status != Status.ok]
    if "csv" in formats:
        written["csv"] = out_dir / "leaderboard.csv"
        rank.to_csv(written["csv"], index=False)
        t1.to_csv(out_dir / "table1.csv")
    plot = plot_metric_vs_eps(df, out_dir / "metrics_vs_eps.png") if "html" in formats or "md" in formats else None
    tradeoffs = plot_tradeoffs(rank, out_dir / "tradeoffs.png") if "html" in formats or "md" in formats else None
    if "md" in formats:
        written["md"] = out_dir / "README.md"
        written["md"].write_text(_markdown(title, rank, t1, plot, failed, skipped, tradeoffs, pending))
    if "html" in formats:
        written["html"] = out_dir / "index.html"
        from spdbench.report.gallery import galleries

        shown = galleries(list(by_folder), by_folder, out_dir) if by_folder else []
        written["html"].write_text(_html(title, rank, t1, plot, failed, skipped, shown, tradeoffs, pending))
    return written


#: leaderboard/pending.json: entries taken off the board until they are re-measured (a new target)
PENDING = "pending.json"


def read_pending(folder: Union[str, Path]) -> list[dict]:
    """The entries a maintainer took off to be re-measured: [{name, attack, suite, reason}, ...].
    Listed on the page by name, never ranked: their old numbers were measured on another model."""
    import json

    path = Path(folder) / PENDING
    if not path.is_file():
        return []
    try:
        entries = json.loads(path.read_text())["entries"]
        return [dict(name=str(e["name"]), attack=str(e["attack"]), suite=str(e["suite"]),
                     reason=str(e.get("reason", ""))) for e in entries]
    except (ValueError, KeyError, TypeError) as exc:
        raise InputError(f"{path}: not a pending list ({type(exc).__name__}: {exc}); expected "
                         '{"entries": [{"name", "attack", "suite", "reason"}, ...]}') from None


INTRO = ("Protection = similarity between the edit of the clean photo and the edit of the protected photo "
         "(same prompt, settings and seed); lower is stronger. Imperceptibility PSNR is between the photo and "
         "its protected version; higher is less visible. Ranking on the test split, mean over prompts; "
         "`[low, high]` is a 95% bootstrap interval over images (seeded). Every number is computed here from "
         "the records' per-image values. Each entry was verified when submitted (`spdbench verify`: its files "
         "under the entry schema, its claims against its suite and stored perturbations, a random sample of "
         "images from every cell re-edited, one cell group re-run with the attack); see docs/security.md.")


INPAINT_NOTE = ("Inpainting: the mask's region is repainted from noise and the rest kept. Protection is scored on "
                "the whole edit and on the repainted region only (SSIM, PSNR: the metrics with a per-pixel map); "
                "kept-region PSNR is the perturbation's visibility where the owner keeps the photo.")


def _notes_md(failed: Sequence[str], skipped: Sequence[tuple[str, str]]) -> str:
    out = ""
    if failed:
        out += f"\n\n{len(failed)} failed cell(s): " + ", ".join(md_escape(c) for c in failed)
    if skipped:
        out += "\n\n## Left out (failed their checks)\n\n" + "\n".join(
            f"- {md_escape(name)}: {md_escape(reason)}" for name, reason in skipped)
    return out


def _pending_md(pending: Sequence[dict]) -> str:
    if not pending:
        return ""
    return ("\n\n## Awaiting re-measurement\n\nTaken off the board until re-run on the suite's current "
            "target (their old numbers were measured on another model): "
            + ", ".join(f"{md_escape(p['name'])} ({md_escape(p['reason'])})" if p["reason"] else md_escape(p["name"])
                        for p in pending) + ".")


def _markdown(title: str, rank: pd.DataFrame, t1: pd.DataFrame, plot: Optional[Path], failed, skipped,
              tradeoffs: Optional[Path] = None, pending: Sequence[dict] = ()) -> str:
    from spdbench.report.page import sections, sections_markdown, table1_sections

    tr = transfer_table(rank)
    transfer = ("\n\n## Transfer: white box vs black box\n\nThe same attack at the same eps, its edits made by "
                "the model it was crafted on (white box) and by an independently trained one (black box).\n\n"
                + transfer_markdown(tr)) if not tr.empty else ""
    secs = sections(rank)
    body = sections_markdown(secs) if secs else "(no finished records)\n"
    t1_md = "".join(f"\n\n## {md_escape(name)}\n\n" + table1_markdown(t) for name, t in table1_sections(t1, TABLE1_SUITES))
    return (f"# {md_escape(title)}\n\n{INTRO}\n\n{BEST_NOTE}\n\n" + body.rstrip() + transfer + t1_md +
            (f"\n\n![metrics vs eps]({plot.name})" if plot else "")
            + (f"\n\n![protection vs imperceptibility, cost and purification]({tradeoffs.name})" if tradeoffs else "")
            + _pending_md(pending) + _notes_md(failed, skipped) + "\n")


BEST_NOTE = ("One section per suite and budget (nothing is averaged over eps). **Bold** (on the page: green): the "
             "best value of its column at that budget, the `none` baseline aside. \"Stronger than the next\": a "
             "paired bootstrap over the same test photos says this row's SSIM is below the next row's.")

_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>{{ title }}</title>
<style>body{font-family:sans-serif;margin:1.5em;max-width:1360px}table{border-collapse:collapse;font-size:12px;
margin:0 0 1em 0}td,th{border:1px solid #ccc;padding:2px 5px;text-align:right;vertical-align:top}
th{background:#f4f4f4;font-weight:600}td.name{text-align:left}
td small{display:block;color:#666;font-size:10px;white-space:nowrap}td.best{background:#dff3df;font-weight:700}
h3{font-size:14px;margin:.6em 0 .3em 0}.tables{display:flex;flex-wrap:wrap;gap:0 1.5em;align-items:flex-start}
table.gallery td{padding:2px}.pn{width:{{ shown }}px;height:{{ shown }}px;overflow:hidden}
.pn img{display:block;max-width:none}</style></head><body>
<h1>{{ title }}</h1>
<p>{{ intro }}</p>
<p>{{ best_note }}</p>
{% macro table(t) %}<div><h3>{{ t.title }}</h3><table><thead><tr>{% for h in t.head %}<th>{{ h }}</th>{% endfor %}
</tr></thead><tbody>{% for row in t.rows %}<tr>{% for c in row %}<td class="{{ 'best' if c.best }} {{ 'name' if c.name }}">{{ c.text }}
{% if c.ci %}<small>{{ c.ci }}</small>{% endif %}</td>{% endfor %}</tr>{% endfor %}</tbody></table></div>{% endmacro %}
{% for s in sections %}<h2>{{ s.title }}</h2>{% if s.note %}<p>{{ s.note }}</p>{% endif %}
{{ table(s.tables[0]) }}<div class="tables">{% for t in s.tables[1:] %}{{ table(t) }}{% endfor %}</div>
{% else %}<p>(no finished records)</p>{% endfor %}
{% if transfer %}<h2>Transfer: white box vs black box</h2><p>The same attack at the same eps, its edits made by the
model it was crafted on (white box) and by an independently trained one (black box).</p>{{ table(transfer) }}{% endif %}
{% for name, head, rows in t1 %}<h2>{{ name }}</h2><table class="table1"><thead><tr>{% for h in head %}<th>{{ h }}</th>
{% endfor %}</tr></thead><tbody>{% for row in rows %}<tr>{% for c in row %}<td>{{ c }}</td>{% endfor %}</tr>{% endfor %}
</tbody></table>{% endfor %}
{% if plot %}<h2>Protection vs eps</h2><img src="{{ plot }}" alt="metrics vs eps" style="max-width:100%">{% endif %}
{% if tradeoffs %}<h2>Trade-offs</h2><img src="{{ tradeoffs }}" alt="protection vs imperceptibility, cost and purification" style="max-width:100%">{% endif %}
{% if gallery %}<h2>Gallery: one test photo across the budgets</h2>
<p>Per method: the photo and its edit, then the protected photo and its edit at each eps (same prompt and
seed). A protection works where the bottom row's edit no longer looks like the photo's edit.</p>
{% macro panel(p) %}{% if p %}<div class="pn"><img src="{{ p.src }}" width="{{ p.width }}" height="{{ shown }}"
style="margin-left:-{{ p.left }}px" alt=""></div>{% endif %}{% endmacro %}
{% for g in gallery %}<h3>{{ g.method }} ({{ g.suite }}; {{ g.image }}; "{{ g.prompt }}")</h3>
<table class="gallery"><tr><th></th><th>clean</th>{% for c in g.columns %}<th>eps {{ c.eps }}</th>{% endfor %}</tr>
<tr><th>photo</th><td>{{ panel(g.photo) }}</td>{% for c in g.columns %}<td>{{ panel(c.protected) }}</td>{% endfor %}</tr>
<tr><th>edit</th><td>{{ panel(g.clean_edit) }}</td>{% for c in g.columns %}<td>{{ panel(c.edit) }}</td>{% endfor %}</tr>
</table>{% endfor %}{% endif %}
{% if pending %}<h2>Awaiting re-measurement</h2><p>Taken off the board until re-run on the suite's current target
(their old numbers were measured on another model):</p><ul>{% for p in pending %}<li>{{ p.name }} ({{ p.attack }} on
{{ p.suite }}){% if p.reason %}: {{ p.reason }}{% endif %}</li>{% endfor %}</ul>{% endif %}
{% if failed %}<p>{{ failed|length }} failed cell(s): {{ failed|join(", ") }}</p>{% endif %}
{% if skipped %}<h2>Left out (failed their checks)</h2><ul>
{% for name, reason in skipped %}<li>{{ name }}: {{ reason }}</li>{% endfor %}</ul>{% endif %}
</body></html>
"""


def _missing(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def _html(title: str, rank: pd.DataFrame, t1: pd.DataFrame, plot: Optional[Path], failed, skipped,
          gallery: Sequence[dict] = (), tradeoffs: Optional[Path] = None, pending: Sequence[dict] = ()) -> str:
    """The page from a Jinja2 template with autoescaping on: every name is text, never markup."""
    import jinja2

    from spdbench.report.page import Cell, Table, sections, table1_sections

    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    tr = transfer_table(rank)
    transfer = None
    if not tr.empty:
        transfer = Table("", ["method", "eps", "crafted on", "edited with", "SSIM white box ↓", "SSIM black box ↓",
                              "suite"],
                         [[Cell(str(r[k])) for k in ("method", "eps_label", "crafted_on", "edited_with", "white_box",
                                                     "black_box", "black_box_suite")] for _, r in tr.iterrows()])
    t1_parts = [(name, ["prompt", "split"] + [f"{m} {meth}" for m, meth in t.columns],
                 [[str(p), str(s)] + [_fmt(v) for v in row.values] for (p, s), row in t.iterrows()])
                for name, t in table1_sections(t1, TABLE1_SUITES)]
    return env.from_string(_PAGE).render(
        title=title, intro=INTRO, best_note=BEST_NOTE.replace("**Bold** (on the page: green)", "Green"),
        sections=sections(rank), transfer=transfer, t1=t1_parts,
        plot=plot.name if plot else None, tradeoffs=tradeoffs.name if tradeoffs else None, failed=list(failed),
        skipped=list(skipped), gallery=list(gallery), shown=SHOWN_PX, pending=list(pending))


def load_checked(dirs: Sequence[Union[str, Path]]) -> tuple[list[Record], list[tuple[str, str]]]:
    """The records of every folder that passes its checks (see load_checked_by_folder), flat."""
    by_folder, skipped = load_checked_by_folder(dirs)
    return [r for recs in by_folder.values() for r in recs], skipped


def load_checked_by_folder(dirs: Sequence[Union[str, Path]]) -> tuple[dict[str, list[Record]],
                                                                       list[tuple[str, str]]]:
    """The records of every folder that passes its checks, and (folder name, reason) for the others.

    A leaderboard entry (a folder with a manifest) gets the full claim checks of `verify` except
    re-measurement; a local run folder the lighter ones (failed cells and partial grids allowed).
    Either way the numbers the build derives are well defined: whole per-image lists, finite values,
    safe names, one record per cell. Hidden folders (a submit in progress) are not entries.
    """
    from spdbench.verify import claims
    from spdbench.verify import entry as entry_schema

    records: dict[str, list[Record]] = {}
    skipped: list[tuple[str, str]] = []
    owners: dict[tuple, str] = {}  # method key -> the folder that holds it
    for d in dirs:
        d = Path(d)
        if d.name.startswith("."):
            continue
        try:
            entry = entry_schema.scan(d)
        except RecordError as exc:
            skipped.append((d.name, str(exc)))
            continue
        checked = claims.check(entry, strict=entry.is_entry)
        if checked.problems:
            skipped.append((d.name, checked.problems[0]))
            continue
        keys = {claims.method_key(r) for r in checked.records}
        taken = sorted({owners[k] for k in keys if k in owners})
        if taken:
            skipped.append((d.name, f"holds the same method and suite as {taken[0]} (one folder per row)"))
            continue
        owners.update({k: d.name for k in keys})
        records[str(d)] = checked.records
    return records, skipped


def build_from_dirs(dirs: Sequence[Union[str, Path]], out_dir: Union[str, Path], formats: Sequence[str] = FORMATS,
                    title: str = "spdbench leaderboard") -> tuple[dict[str, Path], list[tuple[str, str]]]:
    """Check each folder, leave out (and list) the broken ones, build from the rest:
    ({format: path}, [(folder name, reason), ...])."""
    by_folder, skipped = load_checked_by_folder(dirs)
    records = [r for recs in by_folder.values() for r in recs]
    return build(records, out_dir, formats, title, skipped, by_folder), skipped
