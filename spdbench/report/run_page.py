"""`spdbench show RUN`: one self-contained HTML page of one run -- the images, the loss curves and
the per-image numbers -- so a reader sees a protected photo beside its failed edit.

Everything comes from the run folder's records (checked as for the leaderboard: claims.check, not
strict) and its example strips (examples.py); the page embeds them (PNG as data URIs), so it can
be mailed or attached as one file. Rendered with Jinja2, autoescaping on: names are text.
"""
from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Optional, Union

import jinja2

from spdbench.errors import InputError, RecordError
from spdbench.scoring.metrics import get_metric, list_metrics
from spdbench.store.strips import PANELS, example_rel, worst_purifier
from spdbench.store.records import Record, Status, atomic_write_bytes, attack_kind
from spdbench.verify import claims, entry as entry_schema

REPORT = "report.html"


def _png_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _loss_plot(records: list[Record]) -> Optional[str]:
    """One panel, a line per budget: the attack's loss curve (fit curve for universal/amortized)."""
    curves = {}
    for r in records:
        if r.loss_curve and r.split.value == "test" and r.eps_label not in curves:
            curves[r.eps_label] = (r.eps, r.loss_curve)
    if not curves:
        return None
    import matplotlib  # deferred: matplotlib takes seconds to import; only the loss plot needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # deferred: matplotlib takes seconds to import; only the loss plot needs it

    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=100)
    for label, (_, curve) in sorted(curves.items(), key=lambda kv: kv[1][0]):
        ax.plot(range(1, len(curve) + 1), curve, label=f"eps {label}")
    ax.set_xlabel("step")
    per_image = attack_kind(records[0].universal, records[0].amortized) == "per-image"
    ax.set_ylabel("objective (test-split group)" if per_image else "objective (fit on the train split)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return _png_uri(buf.getvalue())


def _metric_text(metric: str, values: Optional[list], i: int) -> str:
    """Image i's value of a metric, as the table prints it: "–" where the record predates the metric."""
    if not values:
        return "–"
    return f"{values[i]:.2f}" if get_metric(metric).unit == "dB" else f"{values[i]:.4f}"


def _metric_heads() -> list[str]:
    """The metric columns' heads, label and direction read from the metric registry."""
    return [f"{get_metric(m).label} {'↓' if get_metric(m).higher_is_better else '↑'}" for m in list_metrics()]


def _cells(folder: Path, records: list[Record]) -> list[dict]:
    out = []
    for r in sorted(records, key=lambda r: (r.eps, r.prompt_key, r.split.value)):
        rows = []
        ssim = {n: v["ssim"] for n, v in r.purified.items()}
        for i, name in enumerate(r.image_names):
            worst = worst_purifier(ssim, i)  # as the strip picked it
            rows.append(dict(name=name, scores=[_metric_text(m, r.protection.get(m), i) for m in list_metrics()],
                             imp_psnr=r.imperceptibility["psnr"][i], worst=worst,
                             worst_ssim=ssim[worst][i] if worst is not None else None))
        examples = []
        for name in r.image_names:
            path = folder / example_rel(r.cell_id, name)
            if path.is_file():
                examples.append(dict(name=name, uri=_png_uri(path.read_bytes())))
        out.append(dict(id=r.cell_id, eps=r.eps_label, norm=r.norm, prompt=r.prompt, prompt_key=r.prompt_key,
                        split=r.split.value, means=r.protection_mean, imp=r.imperceptibility_mean.get("psnr"),
                        rows=rows, examples=examples, flags=", ".join(r.flags),
                        per_image_s=r.timing.per_image_s, fit_s=r.timing.fit_wall_s))
    return out


def build_report(folder: Union[str, Path]) -> str:
    """The HTML page of the run folder `folder` (records checked, not strictly: a partial run shows)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"run folder {str(folder)!r} is not an existing folder (expected what spdbench run --out "
                         "wrote)")
    try:
        entry = entry_schema.scan(folder)
    except RecordError as exc:
        raise InputError(f"run folder {str(folder)!r}: {exc}") from None
    checked = claims.check(entry, strict=False)
    if checked.problems:
        raise InputError(f"run folder {str(folder)!r}: {checked.problems[0]}")
    ok = [r for r in checked.records if r.status == Status.ok]
    failed = [r for r in checked.records if r.status != Status.ok]
    if not ok:
        raise InputError(f"run folder {str(folder)!r} holds no finished cell to show")

    first = ok[0]
    kind = attack_kind(first.universal, first.amortized)
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    return env.from_string(_PAGE).render(
        title=f"{first.attack}{f'[{first.preset}]' if first.preset else ''} on {first.suite}", kind=kind,
        target=f"{first.target.name} ({first.target.fingerprint}, {first.target.device}, {first.target.dtype})",
        params=", ".join(f"{k}={v}" for k, v in sorted(first.attack_params.items())) or "none",
        panels=[p for p in PANELS if first.purified or p != PANELS[-1]], loss=_loss_plot(ok), metric_heads=_metric_heads(),
        cells=_cells(folder, ok), failed=[(r.cell_id, (r.error or "")[:300]) for r in failed])


def write_report(folder: Union[str, Path], out: Union[str, Path, None] = None) -> Path:
    """Write the page (default RUN/report.html, which the entry schema allows in a run folder and
    never copies into an entry); returns its path."""
    if out is None and (Path(folder) / "manifest.json").is_file():
        raise InputError(f"{str(folder)!r} is a leaderboard entry, which holds only its data: pass --out FILE "
                         "for the page")
    path = Path(out) if out is not None else Path(folder) / REPORT
    atomic_write_bytes(path, build_report(folder).encode("utf-8"))
    return path


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>spdbench: {{ title }}</title>
<style>
body { font-family: system-ui, sans-serif; max-width: 1360px; margin: 1.5em auto; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.15em; margin-top: 1.6em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.4em 0; }
td, th { border: 1px solid #ddd; padding: 2px 8px; text-align: right; white-space: nowrap; }
th { background: #f3f3f3; } td.l, th.l { text-align: left; }
.strip { display: inline-block; margin: 0.3em 0; }
.strip img { display: block; max-width: 100%; }
.panels { display: flex; gap: 4px; font-size: 0.75em; color: #555; }
.panels span { flex: 1 1 0; text-align: center; overflow: hidden; white-space: nowrap; }
.meta { color: #555; font-size: 0.9em; } .flag { color: #a40; }
</style></head><body>
<h1>{{ title }}</h1>
<p class="meta">{{ kind }} attack; parameters: {{ params }}; target {{ target }}.
Protection = similarity between the edit of the photo and the edit of the protected photo (same prompt and seed):
lower is stronger. Imperceptibility PSNR is between the photo and the protected photo.</p>
{% if loss %}<h2>Loss curves</h2><img src="{{ loss }}" alt="loss curves">{% endif %}
{% for c in cells %}
<h2>eps {{ c.eps }} ({{ c.norm }}) &middot; {{ c.prompt_key }} &middot; {{ c.split }} split</h2>
<p class="meta">prompt "{{ c.prompt }}"; mean SSIM {{ '%.4f' % c.means.ssim }}, PSNR {{ '%.2f' % c.means.psnr }} dB;
imperceptibility PSNR {{ '%.2f' % c.imp if c.imp is not none else 'n/a' }} dB;
{{ '%.4g' % c.per_image_s }} s / image{% if c.fit_s is not none %}, fit {{ '%.4g' % c.fit_s }} s{% endif %}
{% if c.flags %}; <span class="flag">flags: {{ c.flags }}</span>{% endif %}</p>
{% for e in c.examples %}
<div class="strip"><div class="panels">{% for p in panels %}<span>{{ p }}</span>{% endfor %}</div>
<img src="{{ e.uri }}" alt="{{ e.name }}: {{ panels|join(', ') }}"><div class="meta">{{ e.name }}</div></div><br>
{% endfor %}
<table><tr><th class="l">image</th>{% for h in metric_heads %}<th>{{ h }}</th>{% endfor %}
<th>imperceptibility PSNR</th><th class="l">best purifier for the editor</th><th>its SSIM</th></tr>
{% for r in c.rows %}<tr><td class="l">{{ r.name }}</td>{% for v in r.scores %}<td>{{ v }}</td>{% endfor %}
<td>{{ '%.2f' % r.imp_psnr }}</td>
<td class="l">{{ r.worst or '–' }}</td><td>{{ '%.4f' % r.worst_ssim if r.worst_ssim is not none else '–' }}</td></tr>
{% endfor %}</table>
{% endfor %}
{% if failed %}<h2>Failed cells</h2><ul>{% for id, err in failed %}<li>{{ id }}: {{ err }}</li>{% endfor %}</ul>{% endif %}
</body></html>
"""
