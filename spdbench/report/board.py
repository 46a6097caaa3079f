"""Leaderboard: records -> pandas -> Markdown / CSV / HTML tables and metric-vs-eps plots.

Two views: a ranking (one row per method and eps; the page cuts it into one section per budget,
leaderboard_page.py) and the seed paper's Table 1 layout (prompt x split rows, metric x method
columns, one per eps). Every number is derived from the
records' per-image values (a stated `*_mean` is never read); every name is escaped where it is
rendered; a folder that fails its checks is reported by name and left out, never breaking the build.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional, Sequence, Union

import jinja2
import numpy as np
import pandas as pd

from spdbench.errors import InputError
from spdbench.report.about import suites_markdown
from spdbench.report.budget_use import budget_use_columns, under_budget_flag
from spdbench.report.export import IDENTITY as EXPORT_IDENTITY, write_per_image
from spdbench.report.gallery import galleries
from spdbench.report.page import Cell, Table, sections, sections_markdown, table1_sections
from spdbench.report.text import LABELS, PROTECTION, SHOWN_PX, ci_text, fmt, inline_html, md_escape, protection_arrow
from spdbench.scoring.regions import REGION_METRICS
from spdbench.store.records import Record, Status, method_label
from spdbench.verify import holdout
from spdbench.verify.claims import load_checked_by_folder
from spdbench.verify.entry import MANIFEST
from spdbench.verify.challenge import BLOCK_PREFIX, Challenge, read_verified
from spdbench.report import flags as board_flags
from spdbench.report import work_view
from spdbench.scoring.stats import bootstrap_ci, bootstrap_diff_ci, mean_or_none, records_frame
from spdbench.scoring.work import record_work
from spdbench.scoring.worst_case import not_measured, worst_case

FORMATS = ("md", "csv", "html")

#: the flag of a local run's records ranked beside verified entries: never verified, its own row
UNVERIFIED = "unverified"


def row_label(record: Record) -> str:
    """The ranking row a record belongs to: its configuration (method_label), and "(unverified)"
    for a local run ranked beside the board's entries -- never pooled with an entry's cells."""
    label = method_label(record)
    return f"{label} ({UNVERIFIED})" if UNVERIFIED in record.flags else label


def torch_device_type(device: str) -> str:
    """'cuda:0' -> 'cuda' (a record names the device it ran on)."""
    return str(device).split(":")[0]


#: suites whose page shows the seed's Table 1 layout (its paper's suite); table1.csv has every suite
TABLE1_SUITES: tuple[str, ...] = ("sd15-spd",)


def table1(df: pd.DataFrame) -> pd.DataFrame:
    """Seed Table 1 layout per budget: rows (suite, eps, prompt, split); columns (metric, method).
    One value per cell: nothing is averaged over eps (the seed's table is read one eps at a time)."""
    if df.empty:
        return df
    # a full, stable key: the row order must not depend on the order the folders were listed in
    df = df.sort_values(["eps", "suite", "prompt", "split", "method"], kind="mergesort")
    t = df.groupby(["suite", "eps_label", "prompt", "split", "method"], sort=False)[list(PROTECTION)].mean()
    t = t.unstack("method")
    methods = sorted({meth for _, meth in t.columns})
    t = t[[(m, meth) for m in PROTECTION for meth in methods if (m, meth) in t.columns]]
    t.columns = pd.MultiIndex.from_tuples([(LABELS[m], meth) for m, meth in t.columns])
    return t


def ranking(records: Sequence[Record], split: str = "test", seed: int = 0,
            challenges: Sequence[Challenge] = ()) -> pd.DataFrame:
    """One row per (method, suite, norm, eps): protection means on `split` with 95% bootstrap CIs.

    Per image, values are first averaged over prompts (the same photos are edited with every
    prompt), then images are resampled. Columns `M`, `M_lo`, `M_hi` for each protection metric,
    `ssim_after_<purifier>` (+ CI) for each purifier, `worst_<M>` (+ CI): each image's protection
    after the purifier (or none) that best restores its edit (`worst_case.py`), with `worst_by`
    counting which purifier that was; imperceptibility PSNR, and costs. Sorted by SSIM ascending:
    lower similarity between clean and protected edits = stronger immunization; `rank_worst` is
    the rank by worst-case SSIM within the same suite and eps.

    A budget (suite, norm, eps) with no `split` records is ranked on the split it has, and each of
    its rows says so: column `split` and a flag (never another split's numbers passed off as `split`'s).

    `challenges`: verified outside evaluations (verify/challenge.py), each one more purifier block of
    the records it covers, so a row's worst case can only go up; column `challenged_by` names those
    that gave some photo its worst case. Adaptive challenges (the editor LoRA-fine-tuned against the
    protection) lower nothing: columns `adapted_ssim` (+ CI) and `adapted_by`, "after editor
    fine-tuning", in every row (None where no challenge covers it) once one is given. Rows that break their suite's floors, or were measured with
    another editor or other metric versions than their table, are flagged (report/flags.py): column
    `not_ranked`, no rank, sorted after the ranked rows. Neither column exists when nothing uses it.
    """
    ok = [r for r in records if r.status == Status.ok]
    purifying = [c for c in challenges if c.challenge_kind == "purifier"]
    adaptive = [c for c in challenges if c.challenge_kind == "adaptive"]
    ok = board_flags.with_challenges(ok, purifying) if purifying else ok
    seconds = _seconds_by_budget(ok)
    groups = _ranked_groups(ok, split)
    rows = [_ranking_row(key, recs, split, seconds, seed) for key, recs in groups.items()]
    _mark_flagged(rows, list(groups.values()), purifying)
    for row, recs in zip(rows, groups.values()) if adaptive else ():
        row.update({**dict.fromkeys(board_flags.ADAPTED), **board_flags.adapted(recs, adaptive, seed)})
    return _ranked_frame(pd.DataFrame(rows), seed)


def _mark_flagged(rows: list[dict], groups: Sequence[Sequence[Record]], challenges: Sequence[Challenge]) -> None:
    """Each row's reasons not to be ranked (floors, mixed provenance) into its flags and `not_ranked`;
    with challenges, `challenged_by` and a flag naming the challenge that lowered the row."""
    mixed = board_flags.mixed_reasons([((r["suite"], r["norm"], r["eps"]), g[0]) for r, g in zip(rows, groups)])
    for row, recs, extra in zip(rows, groups, mixed):
        reasons = board_flags.floor_reasons(recs) + extra
        if reasons:  # floors and mixed provenance: ranked in no view (the work view's own rule is softer)
            row["_flagged"] = True
        over = work_view.over_work_reason(recs)  # ranked at equal model work: over it, shown apart
        reasons += [over] if over else []
        if challenges:
            row["challenged_by"] = board_flags.challenged_by(row.get("worst_by"),
                                                             board_flags.covering(recs, challenges))
            if row["challenged_by"]:
                reasons.append(f"worst case lowered by challenge {row['challenged_by']}")
        if reasons:
            row["flags"] = ", ".join([row["flags"], *reasons] if row.get("flags") else reasons)
        if any(x.startswith(board_flags.NOT_RANKED) for x in reasons):
            row["not_ranked"] = True


def _seconds_by_budget(ok: Sequence[Record]) -> dict[tuple, list[float]]:
    """Seconds per image over every cell of a method and budget (both splits): the spread of a cost
    measured on a busy machine is part of the number."""
    seconds: dict[tuple, list[float]] = {}
    for r in ok:
        seconds.setdefault((row_label(r), r.suite, r.norm, r.eps), []).append(r.timing.per_image_s)
    return seconds


def _budget_splits(ok: Sequence[Record], split: str) -> dict[tuple, str]:
    """The split each budget (suite, norm, eps) is ranked on: `split` where it has records of it, else
    the split it has (the first by name): a budget's methods are only ever compared on one split."""
    present: dict[tuple, set[str]] = {}
    for r in ok:
        present.setdefault((r.suite, r.norm, r.eps), set()).add(r.split.value)
    return {budget: split if split in have else min(have) for budget, have in present.items()}


def _ranked_groups(ok: Sequence[Record], split: str) -> dict[tuple, list[Record]]:
    """The records ranked, by (method, suite, norm, eps, eps label, split ranked, split asked for),
    in the order they first appear."""
    chosen = _budget_splits(ok, split)
    groups: dict[tuple, list[Record]] = {}
    for r in ok:
        on = chosen[(r.suite, r.norm, r.eps)]
        if r.split.value == on:
            groups.setdefault((row_label(r), r.suite, r.norm, r.eps, r.eps_label, on, split), []).append(r)
    return groups


def _ranking_row(key: tuple, recs: Sequence[Record], split: str, seconds: dict[tuple, list[float]],
                 seed: int) -> dict:
    """One ranking row: the group's axes, its metric means with CIs, imperceptibility, costs, labels.
    A headline purifier a verified challenge ran (block "challenge:<purifier>") counts as measured."""
    method, suite, norm, eps, label, on, asked = key
    row = _axes_row(method, suite, norm, eps, label, recs)
    if any(r.purified for r in recs):
        row["worst_by"] = _worst_by(recs)
        # the headline purifiers this row's worst case was not measured with (shown, never dropped)
        row["worst_not_measured"] = ", ".join(sorted({p for r in recs for p in not_measured(
            {block.removeprefix(BLOCK_PREFIX) for block in r.purified})})) or "none"
    row.update(_series_stats(_metric_series(recs), recs, seed))
    row.update(_imperceptibility_means(recs))
    row.update(_costs(recs, seconds.get((method, suite, norm, eps), [])))
    row["steps"] = _steps_label(recs[0])
    row["model_calls"] = _calls_label(recs[0])
    row["work_per_image"] = record_work(recs[0])
    row["matching"] = work_view.matching(recs[0])
    row["iteration_view"] = work_view.in_iteration_view(recs[0])
    row.update(budget_use_columns(recs))
    row["flags"] = _flags_label(recs, on, asked, row["budget_rms"] if row["under_budget"] else None)
    if on != asked:
        row["split"] = on
    return row


def _axes_row(method: str, suite: str, norm: str, eps: float, label: str, recs: Sequence[Record]) -> dict:
    """The row's identity: what was attacked, on which model and budget, over how many photos and prompts."""
    first = recs[0]
    return dict(method=method, suite=suite, task=first.task, norm=norm, eps=eps, eps_label=label,
                device=torch_device_type(first.target.device), n_images=len(first.image_names),
                prompts=len(recs), target=first.target.name,
                edited_with=first.edit_target.name if first.edit_target else None)


def _metric_series(recs: Sequence[Record]) -> dict[str, list[list[float]]]:
    """Per column, each prompt's per-image values: protection, the repainted region (inpainting),
    SSIM after each purifier, and the per-image worst case over purifiers (worst_case.py)."""
    series = {m: [r.protection.get(m, []) for r in recs] for m in PROTECTION}
    if any(r.protection_region for r in recs):  # inpainting: the repainted region (region_metrics.py)
        series.update({f"region_{m}": [r.protection_region.get(m, []) for r in recs] for m in REGION_METRICS})
    if any(r.ground_truth for r in recs):  # offline instruction suites: PSNR to the exact result (ground_truth.py)
        series.update({f"gt_{k}": [r.ground_truth.get(k, []) for r in recs] for k in ("protected", "clean")})
    for name in sorted({p for r in recs for p in r.purified}):
        series[f"ssim_after_{name}"] = [r.purified.get(name, {}).get("ssim", []) for r in recs]
    if any(r.purified for r in recs):
        worst = [worst_case(r.protection, r.purified) for r in recs]
        for m in PROTECTION:
            series[f"worst_{m}"] = [w.get(m, []) for w, _ in worst]
    return series


def _worst_by(recs: Sequence[Record]) -> str:
    """Which purifier gave each image's worst case, counted: "jpeg75 12, none 3" (most first)."""
    choices = [c for r in recs for c in worst_case(r.protection, r.purified)[1]]
    return ", ".join(f"{k} {choices.count(k)}" for k in sorted(set(choices), key=lambda k: (-choices.count(k), k)))


def _series_stats(series: dict[str, list[list[float]]], recs: Sequence[Record], seed: int) -> dict:
    """Each column's mean with its 95% bootstrap CI over images (prompts averaged per image first);
    SSIM's per-image values are kept (not shown) for the paired comparison with the next row."""
    out: dict = {}
    for col, per_prompt in series.items():
        per_prompt = [v for v in per_prompt if v]
        if not per_prompt:
            continue
        per_image = np.mean(np.asarray(per_prompt, dtype=np.float64), axis=0)
        if col == "ssim":
            out["_ssim_images"], out["_shas"] = per_image, tuple(recs[0].image_sha256)
        ci = bootstrap_ci(per_image, seed=seed)
        out[col], out[f"{col}_lo"], out[f"{col}_hi"] = ci.mean, ci.low, ci.high
    return out


def _mean_of_means(means: Sequence[Optional[float]]) -> Optional[float]:
    """The mean over prompts, or None where any prompt has no value (a partial mean would mislead)."""
    return float(np.mean(means)) if means and None not in means else None


def _imperceptibility_means(recs: Sequence[Record]) -> dict:
    """PSNR between photo and protected photo, and over the kept region only (inpainting)."""
    return dict(imp_psnr=_mean_of_means([mean_or_none(r.imperceptibility.get("psnr", [])) for r in recs]),
                kept_psnr=_mean_of_means([mean_or_none(r.imperceptibility_kept.get("psnr", [])) for r in recs]))


def _costs(recs: Sequence[Record], seconds: Sequence[Optional[float]]) -> dict:
    """Wall seconds per image (median and range over the budget's cells), device seconds per image,
    the longest fit, and the peak device memory."""
    out: dict = {}
    secs = [v for v in seconds if v is not None and math.isfinite(v)]
    if secs:
        out["seconds_per_image"] = float(np.median(secs))
        out["seconds_per_image_lo"], out["seconds_per_image_hi"] = float(min(secs)), float(max(secs))
    dev = [r.timing.attack_device_s / max(1, len(r.image_names)) for r in recs
           if r.timing.attack_device_s is not None]
    out["device_seconds_per_image"] = float(np.mean(dev)) if dev else None
    fits = [r.timing.fit_wall_s for r in recs if r.timing.fit_wall_s is not None]
    out["fit_seconds"] = max(fits) if fits else None
    mems = [r.timing.peak_memory_bytes for r in recs if r.timing.peak_memory_bytes]
    out["peak_memory_mb"] = max(mems) / 2**20 if mems else None
    return out


def _flags_label(recs: Sequence[Record], on: str, asked: str, under: Optional[float] = None) -> Optional[str]:
    """The records' flags, plus the split ranked where it is not the one asked for, and "under
    budget" where the stored perturbations use less than the floor of their budget (budget_use.py),
    and "not-sandboxed" for cells whose attack ran in a worker the OS did not confine (made before
    the sandbox, or where the kernel lacks it), whether or not the record carries the flag itself."""
    flags = {f for r in recs for f in r.flags}
    if any(r.isolation == "process" for r in recs):
        flags.add("not-sandboxed")
    if on != asked:
        flags.add(f"ranked on {on} split (no {asked} records)")
    if under is not None:
        flags.add(under_budget_flag(under))
    return ", ".join(sorted(flags)) or None


def _rank_within(df: pd.DataFrame, among: pd.Series, column: str) -> pd.Series:
    """Rank by `column` (1 = lowest) within each suite and eps, of the rows `among` selects; <NA>
    for the others (also when none is selected: every row of a budget flagged)."""
    out = pd.Series(pd.NA, index=df.index, dtype="Int64")
    chosen = df[among]
    if not chosen.empty:
        out.loc[chosen.index] = chosen.groupby(["suite", "eps"])[column].rank(method="min").astype("Int64")
    return out


def _ranked_frame(df: pd.DataFrame, seed: int) -> pd.DataFrame:
    """Ranks within each suite and eps (by SSIM, and by worst-case SSIM), the board's order, and the
    paired test against the next row."""
    if df.empty:
        return df
    apart = df["not_ranked"].fillna(False).astype(bool) if "not_ranked" in df.columns else pd.Series(False, df.index)
    ranked = ~apart  # a flagged row keeps its numbers and has no rank (report/flags.py)
    if "worst_ssim" in df.columns:
        df["rank_worst"] = _rank_within(df, ranked, "worst_ssim")
    df["rank"] = _rank_within(df, ranked, "ssim")
    if "iteration_view" in df.columns:  # the second view: the rows run at the suite's iteration budget
        in_view = df["iteration_view"].fillna(False).astype(bool)
        if "_flagged" in df.columns:  # a row flagged by report/flags.py is ranked in no view
            in_view &= ~df["_flagged"].fillna(False).astype(bool)
        df["rank_iterations"] = _rank_within(df, in_view, "ssim")
    if "not_ranked" in df.columns:
        df["not_ranked"] = apart
        df = df.sort_values(["task", "suite", "eps", "not_ranked", "ssim"]).reset_index(drop=True)
    else:
        df = df.sort_values(["task", "suite", "eps", "ssim"]).reset_index(drop=True)
    df["vs_next"] = _versus_next(df, seed)
    return df.drop(columns=["_ssim_images", "_shas", "_flagged"], errors="ignore")


def _versus_next(df: pd.DataFrame, seed: int) -> list[Optional[str]]:
    """Per row: is its SSIM lower than the next row's (same suite and eps) by more than chance?
    Paired bootstrap over the same test photos (stats.bootstrap_diff_ci); 'yes', 'not significant' (the
    interval includes no difference: not shown to be stronger), or
    None for the last row of a group and where the two were not scored on the same photos."""
    out: list[Optional[str]] = [None] * len(df)
    for i in range(len(df) - 1):
        a, b = df.iloc[i], df.iloc[i + 1]
        if (a["suite"], a["eps"]) != (b["suite"], b["eps"]) or not isinstance(a.get("_shas"), tuple) \
                or a.get("_shas") != b.get("_shas") or bool(a.get("not_ranked")) or bool(b.get("not_ranked")):
            continue
        ci = bootstrap_diff_ci(a["_ssim_images"], b["_ssim_images"], seed=seed, paired=True)
        out[i] = "yes" if ci.high < 0 else "not significant"
    return out


_SOURCE = {"suite": "suite", "suite-work": "work-matched", "explicit": "set", "default": "default"}


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


def _with_ci(row, col: str) -> str:
    if col not in row or pd.isna(row[col]):
        return "–"
    ci = ci_text(row, col)
    return f"{fmt(row[col])} {ci}" if ci else fmt(row[col])


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
        lines.append("| " + " | ".join([md_escape(prompt), md_escape(split)] + [fmt(v) for v in row.values]) + " |")
    return "\n".join(lines)


def _colors(methods: Sequence[str]) -> dict:
    """One colour per method, stable across the page's figures (tab20: enough for 20 methods)."""
    import matplotlib  # deferred: matplotlib takes seconds to import; only the plots need it

    cmap = matplotlib.colormaps["tab20"]
    return {m: cmap(i % 20) for i, m in enumerate(sorted(methods))}


def plot_metric_vs_eps(df: pd.DataFrame, path: Path, split: str = "test") -> Optional[Path]:
    """The seed's Figures 1-2: each protection metric against eps, one line per method. The legend
    sits outside the axes; `none` (nothing changed: PSNR 100 dB) is left out of the PSNR panel,
    whose scale it would squash."""
    import matplotlib  # deferred: matplotlib takes seconds to import; only the plots need it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # deferred: matplotlib takes seconds to import; only the plots need it

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
        ax.set_title(f"{LABELS[m]} (edit vs edit, {split}) {protection_arrow(m)}")
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)
    return path


#: images over which a universal or amortized method's one-off fit is spread in the cost plot
SPREAD_N = (10, 10_000)


def _plot_row(axes, row: pd.Series, c, mk: str) -> None:
    """One row's points on the imperceptibility, cost and work panels."""
    if pd.notna(row.get("imp_psnr")):
        axes[0].scatter(row["imp_psnr"], row["ssim"], color=c, marker=mk)
    per, fit = row.get("seconds_per_image"), row.get("fit_seconds")
    if pd.notna(per) and pd.notna(fit) and fit:
        xs = [per + fit / n for n in SPREAD_N]
        axes[1].plot(xs, [row["ssim"]] * 2, color=c, lw=2)
        axes[1].scatter(xs[-1], row["ssim"], color=c, marker=mk)
    elif pd.notna(per) and per > 0:
        axes[1].scatter(per, row["ssim"], color=c, marker=mk)
    work = row.get("work_per_image")
    if work is not None and pd.notna(work) and work > 0:
        axes[3].scatter(work, row["ssim"], color=c, marker=mk)


def plot_tradeoffs(rank: pd.DataFrame, path: Path) -> Optional[Path]:
    """Four questions, img2img test split, one colour per method, a marker per eps: protection
    against imperceptibility; protection against cost per photo (a universal or amortized method's
    fit spread over 10 to 10,000 photos, drawn as its own line); protection after the strongest
    purifier (the per-image worst case) against eps; protection against model work per photo
    (FLOP-weighted passes: equal iterations are not equal work)."""
    import matplotlib  # deferred: matplotlib takes seconds to import; only the plots need it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # deferred: matplotlib takes seconds to import; only the plots need it

    r = rank[(rank["task"] == "img2img") & (rank["method"] != "none")] if not rank.empty else rank
    if "split" in r.columns:  # a budget ranked on another split (no test records): not a test number
        r = r[r["split"].isna()]
    if r.empty:
        return None
    colors = _colors(list(r["method"].unique()))
    markers = {e: mk for e, mk in zip(sorted(r["eps"].unique()), "os^Dv<>p*h")}
    fig, axes = plt.subplots(1, 4, figsize=(22, 4.2))
    for _, row in r.iterrows():
        _plot_row(axes, row, colors[row["method"]], markers.get(row["eps"], "o"))
    for method, g in r.groupby("method"):
        if "worst_ssim" in g and g["worst_ssim"].notna().any():
            g = g.sort_values("eps")
            axes[2].plot(g["eps"] * 255, g["worst_ssim"], marker="o", color=colors[method])
    axes[0].set_xlabel("imperceptibility PSNR (dB) →  less visible")
    axes[1].set_xlabel(f"seconds per photo (log; fit spread over {SPREAD_N[0]}-{SPREAD_N[1]:,} photos as a line)")
    axes[1].set_xscale("log")
    axes[2].set_xlabel("eps (x/255)")
    axes[3].set_xlabel("model work per photo (encoder-equivalent passes, log; docs/comparisons.md)")
    axes[3].set_xscale("log")
    for ax, title in zip(axes, ("protection vs imperceptibility", "protection vs cost", "after the strongest purifier",
                                "protection vs model work")):
        ax.set_ylabel("SSIM (edit vs edit, test) ↓")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    from matplotlib.lines import Line2D  # deferred: matplotlib takes seconds to import; only the plots need it

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
          by_folder: Optional[dict[str, list[Record]]] = None, verified: bool = True) -> dict[str, Path]:
    """Write the leaderboard files; returns {format: path}. `skipped`: (folder name, reason) of the
    folders left out, listed on the page; `by_folder`: the records' folders, for the page's gallery
    of their example strips (gallery.py); `verified`: the records are verified entries (False: local
    run folders, and the page says so); records flagged UNVERIFIED are local rows among entries."""
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
    challenges, unverified = read_verified(out_dir / CHALLENGES)  # outside evaluations (verify/challenge.py)
    challenges, stale = board_flags.current_challenges(challenges, records, list(by_folder or ()))
    skipped = [*skipped, *((f"challenge {name}", reason) for name, reason in unverified), *stale]
    rank, t1 = with_holdout(ranking(records, challenges=challenges), holdout.read_all(out_dir)), table1(df)
    pending = read_pending(out_dir)
    intro = intro_text(verified, any(UNVERIFIED in r.flags for r in records))
    written: dict[str, Path] = {}
    failed = [r.cell_id for r in records if r.status != Status.ok]
    if "csv" in formats:
        written["csv"] = out_dir / "leaderboard.csv"
        rank.to_csv(written["csv"], index=False)
        t1.to_csv(out_dir / "table1.csv")
    if "csv" in formats or "md" in formats:  # the page's "Per-image values" section names this file
        # every value the means above come from, one row per record and photo (export.py)
        per_folder = by_folder or {"records": list(records)}
        written["per-image"] = write_per_image({Path(k).name: v for k, v in per_folder.items()}, out_dir,
                                               challenges=challenges)[0]
    plot = plot_metric_vs_eps(df, out_dir / "metrics_vs_eps.png") if "html" in formats or "md" in formats else None
    tradeoffs = plot_tradeoffs(rank, out_dir / "tradeoffs.png") if "html" in formats or "md" in formats else None
    if "md" in formats:
        written["md"] = out_dir / "README.md"
        written["md"].write_text(_markdown(title, rank, t1, plot, failed, skipped, tradeoffs, pending, intro))
    if "html" in formats:
        written["html"] = out_dir / "index.html"

        shown = galleries(list(by_folder), by_folder, out_dir) if by_folder else []
        written["html"].write_text(_html(title, rank, t1, plot, failed, skipped, shown, tradeoffs, pending, intro))
    return written


def _holdout_rows(results: dict[str, dict], seed: int) -> dict[tuple, dict]:
    """{(method, suite, norm, eps label): hold-out columns}: each photo's SSIM averaged over prompts,
    then a bootstrap interval over the private photos -- the public rows' rule."""
    out: dict[tuple, dict] = {}
    for data in results.values():
        by_eps: dict[tuple, list[list[float]]] = {}
        for cell in data["cells"]:
            by_eps.setdefault((cell["norm"], cell["eps_label"]), []).append(cell["protection"]["ssim"])
        for (norm, label), per_prompt in by_eps.items():
            ci = bootstrap_ci(np.mean(np.asarray(per_prompt, dtype=np.float64), axis=0), seed=seed)
            out[(data["method"], data["suite"], norm, label)] = {
                "holdout_ssim": ci.mean, "holdout_ssim_lo": ci.low, "holdout_ssim_hi": ci.high,
                "holdout_photos": data["n_photos"]}
    return out


def with_holdout(rank: pd.DataFrame, results: dict[str, dict], seed: int = 0) -> pd.DataFrame:
    """The ranking with the maintainer's hold-out numbers (verify/holdout.py) beside the public ones,
    and `rank_holdout`: universal and amortized rows ranked by hold-out SSIM within their budget.
    No hold-out results: the frame unchanged (no new columns)."""
    rows = _holdout_rows(results, seed)
    if rank.empty or not rows:
        return rank
    rank = rank.copy()
    keys = list(zip(rank["method"], rank["suite"], rank["norm"], rank["eps_label"]))
    for col in ("holdout_ssim", "holdout_ssim_lo", "holdout_ssim_hi", "holdout_photos"):
        rank[col] = [rows.get(k, {}).get(col) for k in keys]
    rank["holdout_ssim"] = rank["holdout_ssim"].astype(float)
    rank["rank_holdout"] = rank.groupby(["suite", "norm", "eps"])["holdout_ssim"].rank(method="min").astype("Int64")
    return rank


#: leaderboard/challenges/<name>/: outside evaluations; only verified ones are applied (verify/challenge.py)
CHALLENGES = "challenges"

#: leaderboard/pending.json: entries taken off the board until they are re-measured (a new target)
PENDING = "pending.json"


def read_pending(folder: Union[str, Path]) -> list[dict]:
    """The entries a maintainer took off to be re-measured: [{name, attack, suite, reason}, ...].
    Listed on the page by name, never ranked: their old numbers were measured on another model."""
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


VERIFIED_TEXT = ("Each entry was verified when submitted (`spdbench verify`: its files under the entry schema, its "
                 "claims against its suite and stored perturbations, a random sample of images from every cell "
                 "re-edited, every budget group re-run with the attack); see docs/security.md.")
INTRO = ("Protection = similarity between the edit of the clean photo and the edit of the protected photo "
         "(same prompt, settings and seed); lower is stronger. Imperceptibility PSNR is between the photo and "
         "its protected version; higher is less visible. Ranking on the test split, mean over prompts; "
         "`[low, high]` is a 95% bootstrap interval over images (seeded). Every number is computed here from "
         "the records' per-image values. Methods are ranked at equal model work (the suite's work budget, "
         "below), not equal iterations: \"work / image\" gives each row's measured work in encoder-equivalent "
         "passes, and \"budget used\" how much of its budget the stored perturbation spends (under 90%: flagged "
         "\"under budget\"); see docs/comparisons.md. " + VERIFIED_TEXT)

LOCAL_TEXT = ("These rows are local run folders and were NOT verified (`spdbench verify FOLDER` re-measures one; "
              "`spdbench submit FOLDER` verifies it and adds it to a board).")
MIXED_TEXT = ("Rows marked (unverified) are local run folders ranked beside the board's entries for comparison; "
              "they were NOT verified. ")


def intro_text(verified: bool, some_unverified: bool) -> str:
    """The page's opening words: the verification sentence only where it is true of every row."""
    if not verified:
        return INTRO.replace(VERIFIED_TEXT, LOCAL_TEXT)
    if some_unverified:
        return INTRO.replace(VERIFIED_TEXT, MIXED_TEXT + VERIFIED_TEXT.replace("Each entry", "Every other entry"))
    return INTRO


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
              tradeoffs: Optional[Path] = None, pending: Sequence[dict] = (), intro: str = INTRO) -> str:

    tr = transfer_table(rank)
    transfer = ("\n\n## Transfer: white box vs black box\n\nThe same attack at the same eps, its edits made by "
                "the model it was crafted on (white box) and by an independently trained one (black box).\n\n"
                + transfer_markdown(tr)) if not tr.empty else ""
    secs = sections(rank)
    body = sections_markdown(secs) if secs else "(no finished records)\n"
    t1_md = "".join(f"\n\n## {md_escape(name)}\n\n" + table1_markdown(t) for name, t in table1_sections(t1, TABLE1_SUITES))
    about = suites_markdown(rank["suite"]) if not rank.empty else None
    return (f"# {md_escape(title)}\n\n{intro}\n\n" + (f"{about}\n\n" if about else "") + f"{BEST_NOTE}\n\n"
            + body.rstrip() + transfer + t1_md +
            (f"\n\n![metrics vs eps]({plot.name})" if plot else "")
            + (f"\n\n![protection vs imperceptibility, cost and purification]({tradeoffs.name})" if tradeoffs else "")
            + _pending_md(pending) + _notes_md(failed, skipped) + f"\n\n{PER_IMAGE_NOTE}\n\n{RULES_NOTE}\n")


RULES_NOTE = (
    "## Challenges, flags and provenance\n\n"
    "**Outside evaluations (challenges).** Anyone may file a stronger evaluation of an entry: `spdbench challenge "
    "leaderboard/entries/NAME --purifier PURIFIER` runs a registered purifier against the entry's stored protections "
    "(every budget or `--eps`, every prompt or `--prompts`, the test split) and writes "
    "`leaderboard/challenges/PURIFIER-NAME/`: `challenge.json` (the purifier and its settings, the entry and its "
    "manifest's sha256, the editing model's fingerprint -- and a mismatched editor's own model with its fingerprint --, "
    "and per cell the per-image values of the edit of the purified "
    "protected photo against the edit of the photo, same prompt, settings, seed and, on an inpainting suite, mask) and "
    "`purified/*.png` (the purified "
    "photos on the 8-bit grid: what was edited). `spdbench verify leaderboard/challenges/C` checks it as it checks an "
    "entry: the photos are the hashes the JSON names, every photo is purified again, a random sample of each cell's "
    "photos is edited again; a value that does not reproduce refuses it with one line, and a verified challenge gets "
    "`verification.json`. The board applies only challenges verified as they are, each as one more purifier of the "
    "cells it covers: a row's worst case (per photo, the purifier that best restores its edit) is taken over the "
    "suite's purifiers and the challenges, so a challenge can only lower an entry; the row names it (`challenged_by`, "
    "flag \"worst case lowered by challenge C\") and the purification table gets the column `challenge:PURIFIER` (one "
    "column per purifier, whoever filed it; where two challenges ran one purifier on one cell, the one with the higher "
    "mean SSIM counts).\n\n"
    "**Flags.** Each suite has an invisibility floor and a benign-edit check (`Suite.floor` in `spdbench/suites.py`): "
    "a row whose mean imperceptibility PSNR or SSIM (protected photo against the photo) is below the floor, or whose "
    "benign edit (the empty prompt P4: an identity-like re-render) of the protected photo has a mean SSIM to that of "
    "the photo below the benign floor, is flagged \"not ranked: ...\": it keeps its numbers, has no rank and is "
    "listed after the ranked rows of its table.\n\n"
    "**Provenance.** Every record holds spdbench's version and commit, the metric libraries' versions "
    "(`provenance.metric_libraries`; `provenance.libraries` in older records), each metric's convention and the "
    "editing model's weights fingerprint. In one table (suite and budget) a row measured with another editor, other "
    "metric versions or other conventions than most rows is flagged \"not ranked: measured with other versions than "
    "this table's rows (...)\", never ranked against them; a library a record does not name is no difference.")

PER_IMAGE_NOTE = ("## Per-image values\n\n`per-image.csv` (beside this page) holds every value the means above come "
                  "from: one row per record and photo. Columns: " + ", ".join(f"`{c}`" for c in EXPORT_IDENTITY)
                  + ", then one column per value, sorted by name: `protection.<metric>`, `imperceptibility.<metric>`, "
                  "`protection_region.<metric>`, `imperceptibility_kept.<metric>` (inpainting), "
                  "`purified.<purifier>.<metric>`, `ground_truth.<series>` (instruction suites with exact results, "
                  "offline only: `protected` and `clean`, the PSNR in dB of the edit of the protected and of the clean "
                  "photo to the instruction's exact result on the clean photo) and `challenge.<purifier>.<metric>` or, "
                  "for an adaptive challenge, `challenge.<challenge>.<metric>` "
                  "(a challenge applied on this page, below: its value for that photo, from its `challenge.json`; for a "
                  "purifier challenge, the edit of the protected photo purified by its purifier against the edit of "
                  "the photo; for an adaptive challenge, the LoRA-patched editor's edit of the protected photo against "
                  "the original editor's edit of the photo; only challenges verified as they are, never one listed as "
                  "not applied). The schema only "
                  "grows: a new metric, purifier, series or challenge adds columns; none is renamed or removed. An "
                  "empty cell is a value the record (or no applied challenge) does not hold.")

BEST_NOTE = ("**Ranked at equal model work.** A suite with a work budget (smoke: 40 encoder-equivalent passes "
             "per photo, one VAE-encoder pass forward and backward = 1) ranks the rows whose measured work per photo "
             "(`work / image`, from the passes the harness counted) is within it; an attack run with `--match work` "
             "(the default) gets the steps its budget buys (`steps`: \"N (work-matched)\"). A row that spent more, "
             "such as a 40-step attack whose step costs more than one encoder pass, keeps its numbers and is flagged "
             "\"not ranked: over the work budget\"; `rank at equal iterations` ranks the rows run at the suite's "
             "iteration budget (\"N (suite)\") among their own: the second view, not the ranking. "
             "One section per suite and budget (nothing is averaged over eps). **Bold** (on the page: green): the "
             "best value of its column at that budget, the `none` baseline aside. \"Stronger than the next\": yes "
             "where a paired bootstrap over the same test photos says this row's SSIM is below the next row's, "
             "\"not significant\" where the 95% interval of the difference includes zero.")

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
{% if about %}<p>{{ about[0] }}</p><ul>{% for line in about[1:] %}<li>{{ line }}</li>{% endfor %}</ul>{% endif %}
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


def _html(title: str, rank: pd.DataFrame, t1: pd.DataFrame, plot: Optional[Path], failed, skipped,
          gallery: Sequence[dict] = (), tradeoffs: Optional[Path] = None, pending: Sequence[dict] = (),
          intro: str = INTRO) -> str:
    """The page from a Jinja2 template with autoescaping on: every name is text, never markup."""

    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    tr = transfer_table(rank)
    transfer = None
    if not tr.empty:
        transfer = Table("", ["method", "eps", "crafted on", "edited with", "SSIM white box ↓", "SSIM black box ↓",
                              "suite"],
                         [[Cell(str(r[k])) for k in ("method", "eps_label", "crafted_on", "edited_with", "white_box",
                                                     "black_box", "black_box_suite")] for _, r in tr.iterrows()])
    t1_parts = [(name, ["prompt", "split"] + [f"{m} {meth}" for m, meth in t.columns],
                 [[str(p), str(s)] + [fmt(v) for v in row.values] for (p, s), row in t.iterrows()])
                for name, t in table1_sections(t1, TABLE1_SUITES)]
    return env.from_string(_PAGE).render(
        title=title, intro=inline_html(intro),
        best_note=inline_html(BEST_NOTE.replace("**Bold** (on the page: green)", "Green")), about=_about_html(rank),
        sections=sections(rank), transfer=transfer, t1=t1_parts,
        plot=plot.name if plot else None, tradeoffs=tradeoffs.name if tradeoffs else None, failed=list(failed),
        skipped=list(skipped), gallery=list(gallery), shown=SHOWN_PX, pending=list(pending))


def _about_html(rank: pd.DataFrame) -> list:
    """The suites paragraph (about.py) for the page: its heading line, then one rendered line per suite."""
    about = suites_markdown(rank["suite"]) if not rank.empty else None
    if not about:
        return []
    head, _, items = about.partition("\n\n")
    return [inline_html(head)] + [inline_html(line[2:]) for line in items.splitlines()]


def build_from_dirs(dirs: Sequence[Union[str, Path]], out_dir: Union[str, Path], formats: Sequence[str] = FORMATS,
                    title: str = "spdbench leaderboard") -> tuple[dict[str, Path], list[tuple[str, str]]]:
    """Check each folder, leave out (and list) the broken ones, build from the rest:
    ({format: path}, [(folder name, reason), ...])."""
    by_folder, skipped, verified = load_board(dirs)
    records = [r for recs in by_folder.values() for r in recs]
    return build(records, out_dir, formats, title, skipped, by_folder, verified), skipped


def load_board(dirs: Sequence[Union[str, Path]]) -> tuple[dict[str, list[Record]], list[tuple[str, str]], bool]:
    """The folders' checked records: ({folder: records}, [(folder, reason left out)], verified).

    Entries (folders with a manifest: verified when submitted) and local run folders are checked
    apart, so a local run of a method the board holds is not left out as its duplicate; where both
    are given, the local records are flagged UNVERIFIED (their own rows, marked). `verified` is
    False when no folder is an entry (the page then says that nothing on it was verified)."""
    entries = [d for d in dirs if (Path(d) / MANIFEST).is_file()]
    local = [d for d in dirs if not (Path(d) / MANIFEST).is_file()]
    by_folder, skipped = load_checked_by_folder(entries)
    mine, mine_skipped = load_checked_by_folder(local)
    if entries and mine:
        mine = {folder: [mark_unverified(r) for r in recs] for folder, recs in mine.items()}
    order = {str(d): i for i, d in enumerate(dirs)}
    both = sorted({**by_folder, **mine}.items(), key=lambda kv: order.get(kv[0], len(order)))
    return dict(both), skipped + mine_skipped, bool(entries) or not local


def mark_unverified(record: Record) -> Record:
    """A copy of a local run's record flagged UNVERIFIED (its own row beside the board's entries)."""
    return record.model_copy(update={"flags": [*record.flags, UNVERIFIED]})
