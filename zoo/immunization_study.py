"""Is immunization measurable on a tiny target? Objective gains and edit-level effects vs uniform noise.

Why: the trained tiny target is the offline stand-in for SD1.5 in tests and the smoke suite. It is
only useful there if an optimized protection does something to it that random noise of the same
budget does not, at both levels that matter:

a) the attack's own objective: `attack.objective(x + delta_attack)` vs `attack.objective(x +
   delta_noise)` per image (lower = stronger), with a paired bootstrap CI of the difference;
b) the edit: SSIM(edit(x), edit(x + delta)) per image for noise and for the attack, and the drop
   SSIM_noise - SSIM_attack with a paired bootstrap CI (positive = the attack disturbs the edit more).

Images: the bundled *test* split (never trained on; 4 photos), each centre-resized to 256x256 and
cut into 4 quadrants of 128x128 = 16 images. Every protected image goes through
`protect.protect` (validate, project, clamp, 8-bit quantize: the harness rule). Edits use `Editor` with
a per-image seed from the *clean* image (`image_seed`), shared by the clean, noise and attack edits.

Crops of one photo are not independent; next to the per-image bootstrap the record holds a
photo-level (cluster) bootstrap over the 4 photos, which is crude (35 distinct resamples) but shows
how much of the per-image interval's width rests on treating the crops as independent.

Run: ``python -m zoo.immunization_study [--target tiny] [--out docs/tiny-immunization.json]``
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from spdbench.budget import Budget, format_eps
from spdbench.scoring.stats import bootstrap_ci, bootstrap_diff_ci

PROMPT = "add some snow"
EPS = "16/255"
STRENGTHS = (0.5, 0.3)
EDIT_STEPS = 20
GUIDANCE = 7.5
EDIT_SEED = 9222
N_BOOT = 10_000
BOOT_SEED = 0
#: attack name -> (constructor arguments, generator seed)
ATTACKS: dict[str, tuple[dict, int]] = {
    "photoguard-encoder": (dict(steps=100), 2),
    "pca-minus": (dict(preset="guo"), 3),
}
NOISE_SEED = 1
CROPS_PER_PHOTO = 4


def heldout_images() -> tuple[torch.Tensor, list[str]]:
    """(16, 3, 128, 128) quadrants of the 256x256 test-split photos and the photo of each crop."""
    from spdbench.data.photos import bundled_split
    from zoo.evaluate_tiny import heldout_crops

    names = bundled_split()["test"]
    x = heldout_crops()
    return x, [names[i // CROPS_PER_PHOTO] for i in range(len(x))]


def _interval(iv) -> dict:
    return dict(mean=iv.mean, low=iv.low, high=iv.high)


def cluster_diff_ci(a: Sequence[float], b: Sequence[float], groups: Sequence[str], n_boot: int = N_BOOT,
                    seed: int = BOOT_SEED, level: float = 0.95) -> dict:
    """Paired bootstrap of mean(a) - mean(b) that resamples whole photos (all crops of a photo together)."""
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    keys = sorted(set(groups))
    # equal crops per photo: resampling photos = the plain bootstrap of the per-photo mean differences
    per = [float(d[[g == k for g in groups]].mean()) for k in keys]
    return dict(**_interval(bootstrap_ci(per, n_boot=n_boot, level=level, seed=seed)),
                per_photo=dict(zip(keys, per)))


def paired(a, b, groups) -> dict:
    """mean(a) - mean(b): per-image paired bootstrap (stats.bootstrap_diff_ci) and the photo-level one."""
    a, b = [float(v) for v in a], [float(v) for v in b]
    iv = bootstrap_diff_ci(a, b, n_boot=N_BOOT, seed=BOOT_SEED, paired=True)
    return dict(per_image=_interval(iv), by_photo=cluster_diff_ci(a, b, groups),
                fraction_positive=float(np.mean(np.asarray(a) > np.asarray(b))))


def protect_crops(name: str, params: dict, seed: int, x: torch.Tensor, target, budget: Budget) -> tuple:
    """(attack, protected crops, seconds): one batch through the library's in-process `protect`
    (the harness's validation and budget enforcement; the study runs its own trusted attacks)."""
    from spdbench import get_attack
    from spdbench.harness.protect import protect

    attack = get_attack(name, **params)
    t0 = time.perf_counter()
    result = protect(attack, target, x, budget, batch_size=len(x), seed=seed)
    return attack, result.adv, time.perf_counter() - t0


def posterior_moments(target, images: torch.Tensor) -> dict:
    """Per-image mean over latent dims of mu^2 and sigma^2 (PCA-'s KL to N(0, vI) is ~ d (mu^2 + sigma^2) / 2v)."""
    with torch.no_grad():
        enc = target.encode(images)
    mu2 = enc.mean.float().pow(2).flatten(1).mean(1)
    var = enc.logvar.float().exp().flatten(1).mean(1)
    return dict(mu2=mu2.tolist(), sigma2=var.tolist())


def objective_report(name: str, attack, target, x, adv_attack, adv_noise, groups) -> dict:
    f_attack = attack.objective(adv_attack, target, x).cpu().double()
    f_noise = attack.objective(adv_noise, target, x).cpu().double()
    f_clean = attack.objective(x, target, x).cpu().double()
    out = dict(values=dict(clean=f_clean.tolist(), noise=f_noise.tolist(), attack=f_attack.tolist()),
               mean=dict(clean=float(f_clean.mean()), noise=float(f_noise.mean()), attack=float(f_attack.mean())),
               images_attack_below_noise=int((f_attack < f_noise).sum()))
    if name == "pca-minus":
        # KL to N(0, 1e-8 I) is ~ d * E[mu^2 + sigma^2] / 2e-8: its scale is set by v, it is
        # positive and it varies over orders of magnitude between images, so the paired statistic
        # is the difference of log10 KL (= log10 of the per-image ratio attack / noise).
        la, ln = torch.log10(f_attack), torch.log10(f_noise)
        out["statistic"] = "log10 KL(q(z|x+delta) || N(0, v I)), attack - noise (< 0: attack better)"
        out["diff"] = paired(la.tolist(), ln.tolist(), groups)
        out["ratio_geomean"] = float(10 ** (la - ln).mean())
        out["posterior"] = dict(clean=posterior_moments(target, x), noise=posterior_moments(target, adv_noise),
                                attack=posterior_moments(target, adv_attack))
        for k, v in list(out["posterior"].items()):
            v["mean_mu2"], v["mean_sigma2"] = float(np.mean(v["mu2"])), float(np.mean(v["sigma2"]))
    else:
        out["statistic"] = "objective (squared latent distance), attack - noise (< 0: attack better)"
        out["diff"] = paired(f_attack.tolist(), f_noise.tolist(), groups)
        out["relative_diff_of_means"] = float(f_attack.mean() / f_noise.mean() - 1.0)
    return out


def edit_report(target, x, protected: dict, groups, strength: float) -> dict:
    from spdbench.scoring import metrics
    from spdbench.harness.editing import EditSettings, Editor, image_seed

    settings = EditSettings(strength=strength, steps=EDIT_STEPS, guidance=GUIDANCE, seed=EDIT_SEED)
    editor = Editor(target, settings)
    seeds = [image_seed(settings, img) for img in x]  # from the CLEAN image, shared by every variant
    t0 = time.perf_counter()
    clean_edit = editor.edit(x, PROMPT, seeds)
    repeat = editor.edit(x, PROMPT, seeds)  # determinism check: the same edit twice
    sims = {name: metrics.ssim(editor.edit(adv, PROMPT, seeds), clean_edit) for name, adv in protected.items()}
    out = dict(settings=settings.to_dict(), prompt=PROMPT, seeds=seeds,
               clean_repeat_ssim_min=float(metrics.ssim(repeat, clean_edit).min()),
               edit_vs_input_ssim=float(metrics.ssim(clean_edit, x).mean()),
               ssim={k: v.tolist() for k, v in sims.items()},
               ssim_mean={k: _interval(bootstrap_ci(v.tolist(), n_boot=N_BOOT, seed=BOOT_SEED))
                          for k, v in sims.items()},
               drop={k: paired(sims["uniform-noise"].tolist(), sims[k].tolist(), groups)
                     for k in sims if k != "uniform-noise"})
    out["seconds"] = time.perf_counter() - t0
    return out


def run_study(target_name: str = "tiny", threads: Optional[int] = 1) -> dict:
    from spdbench.targets import load_target

    if threads:
        torch.set_num_threads(threads)
    t_start = time.perf_counter()
    torch.manual_seed(0)  # nothing below draws from the global RNG; set anyway
    target = load_target(target_name)
    budget = Budget("linf", EPS)
    x, groups = heldout_images()
    noise, adv_noise, noise_s = protect_crops("uniform-noise", {}, NOISE_SEED, x, target, budget)
    protected = {"uniform-noise": adv_noise}
    record: dict = dict(
        study="zoo.immunization_study",
        target=dict(name=target_name, fingerprint=target.fingerprint),
        images=dict(n=len(x), size=128, photos=sorted(set(groups), key=groups.index),
                    description="16 crops 128x128 = the 4 quadrants of each of the 4 bundled test-split "
                                "photos (data.bundled_split()['test']) centre-resized to 256x256; "
                                "never trained on", photo_of_crop=groups),
        budget=dict(norm=budget.norm, eps=format_eps(budget.eps),
                    rule="apply_budget: project, clamp to [0,1], 8-bit quantize"),
        attacks={"uniform-noise": dict(params={}, seed=NOISE_SEED, seconds=noise_s)},
        bootstrap=dict(n_boot=N_BOOT, seed=BOOT_SEED, level=0.95,
                       per_image="stats.bootstrap_diff_ci, paired, resampling the 16 crops",
                       by_photo="paired, resampling the 4 photos with all their crops (crude: 4 clusters)"),
        threads=torch.get_num_threads(), torch=torch.__version__, python=platform.python_version(),
        objective={}, edits={},
    )
    for name, (params, seed) in ATTACKS.items():
        attack, adv, seconds = protect_crops(name, params, seed, x, target, budget)
        protected[name] = adv
        record["attacks"][name] = dict(params=dict(attack.params),
                                       preset=attack.preset, seed=seed, seconds=seconds,
                                       loss_first=attack.loss_history[0] if attack.loss_history else None,
                                       loss_last=attack.loss_history[-1] if attack.loss_history else None)
        record["objective"][name] = objective_report(name, attack, target, x, adv, adv_noise, groups)
    from spdbench.scoring import metrics

    for name, adv in protected.items():
        info = record["attacks"][name]
        info["linf_max_255"] = float((adv - x).abs().amax() * 255)
        info["ssim_protected_vs_clean"] = float(metrics.ssim(adv, x).mean())
    for s in STRENGTHS:
        record["edits"][f"{s:g}"] = edit_report(target, x, protected, groups, s)
    record["wall_seconds"] = time.perf_counter() - t_start
    return record


def _ci(d: dict, fmt: str = "{:+.4f}") -> str:
    return f"{fmt.format(d['mean'])} [{fmt.format(d['low'])}, {fmt.format(d['high'])}]"


def markdown(record: dict) -> str:
    """The study's tables as Markdown."""
    eps = record["budget"]["eps"]
    lines = [f"Target `{record['target']['name']}` ({record['target']['fingerprint']}), "
             f"{record['images']['n']} held-out 128x128 crops from {len(record['images']['photos'])} photos "
             f"({', '.join(record['images']['photos'])}), L-inf eps {eps}, 8-bit quantized. "
             f"95% paired bootstrap CIs ({record['bootstrap']['n_boot']} resamples, seed "
             f"{record['bootstrap']['seed']}); 'by photo' resamples the 4 photos.", "",
             "**(a) The attack's own objective, attack vs uniform noise** (lower = stronger)", "",
             "| attack | statistic | noise | attack | attack - noise, per image [CI] | by photo [CI] | images better |",
             "|---|---|---|---|---|---|---|"]
    for name, o in record["objective"].items():
        n = record["images"]["n"]
        if name == "pca-minus":
            stat = "log10 KL to N(0, 1e-8 I)"
            noise = float(np.mean(np.log10(o["values"]["noise"])))
            att = float(np.mean(np.log10(o["values"]["attack"])))
        else:
            stat = "squared latent distance"
            noise, att = o["mean"]["noise"], o["mean"]["attack"]
        fmt = "{:+.3f}" if name == "pca-minus" else "{:+.1f}"
        lines.append(f"| {name} | {stat} | {noise:.3f} | {att:.3f} | {_ci(o['diff']['per_image'], fmt)} | "
                     f"{_ci(o['diff']['by_photo'], fmt)} | {o['images_attack_below_noise']}/{n} |")
    lines += ["", f"**(b) The edit: SSIM(edit(x), edit(x+delta))**, prompt \"{PROMPT}\", {EDIT_STEPS} steps, "
              f"guidance {GUIDANCE}, seed {EDIT_SEED} (per image via image_seed of the clean image); "
              "drop = SSIM_noise - SSIM_attack (> 0: the attack disturbs the edit more than noise)", "",
              "| strength | attack | SSIM noise | SSIM attack | drop per image [CI] | drop by photo [CI] | images with drop > 0 |",
              "|---|---|---|---|---|---|---|"]
    for s, e in record["edits"].items():
        for name, d in e["drop"].items():
            n = len(e["ssim"][name])
            lines.append(f"| {s} | {name} | {e['ssim_mean']['uniform-noise']['mean']:.4f} | "
                         f"{e['ssim_mean'][name]['mean']:.4f} | {_ci(d['per_image'])} | {_ci(d['by_photo'])} | "
                         f"{round(d['fraction_positive'] * n)}/{n} |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m zoo.immunization_study",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default="tiny")
    parser.add_argument("--out", default="docs/tiny-immunization.json")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: bitwise repeatable, leaves a core to others)")
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    record = run_study(args.target, args.threads)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(markdown(record))
    print(f"\nwall {record['wall_seconds']:.0f} s; record written to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
