"""`run`: the harness. It owns the data, the split, the budget, the seeds and the scorer.

Data flow: suite -> images + split -> attack (only what it may see) -> validated, projected,
quantized protection -> paired edits (same prompt, settings and seed per image; clean edits
cached) -> metrics -> one record per (attack, eps, prompt, split) cell -> leaderboard.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
from safetensors.torch import load_file, save

from . import metrics as metrics_mod
from .attacks.base import Attack, get_attack
from .budget import Budget, format_eps
from .data import split_indices
from .editing import PROMPTS, Editor, image_seed
from .errors import AttackError, InputError, SpdbenchError, UnknownNameError, did_you_mean
from .images import check_images
from .protect import Protection, fit_universal, protect
from .provenance import environment
from .purify import get_purifier
from .results import (Record, Split, Status, TargetInfo, Timing, Validation, atomic_write_bytes, cell_id,
                      finished_cells, write_jsonl, write_record, load_records)
from .suites import Suite, get_suite
from .targets import Target, load_target

log = logging.getLogger("spdbench")


@dataclass
class RunResult:
    """Records of a run (finished now or earlier), where they are, and which cells failed."""

    records: list[Record]
    out: Path
    computed: list[str] = field(default_factory=list)   # cell ids computed in this call
    reused: list[str] = field(default_factory=list)     # cell ids found finished (resume)
    #: clean-edit cache counters of this call: images served from the cache / edited anew, and
    #: every img2img image run (clean misses + protected + purified) -- counted, not timed
    clean_cache_hits: int = 0
    clean_cache_misses: int = 0
    edits_run: int = 0

    @property
    def failed(self) -> list[Record]:
        return [r for r in self.records if r.status == Status.error]

    @property
    def ok(self) -> bool:
        return not self.failed

    def table(self):
        """Per-cell means as a pandas DataFrame."""
        from .leaderboard import records_frame

        return records_frame(self.records)


def _sha(t: torch.Tensor) -> str:
    return hashlib.sha256((t.detach().cpu().clamp(0, 1) * 255).round().to(torch.uint8).numpy().tobytes()).hexdigest()


def _resolve_attack(attack: Union[str, Attack], suite: Suite, params: Optional[dict]) -> Attack:
    if isinstance(attack, Attack):
        if params:
            raise InputError("pass attack parameters either to get_attack() or to run(), not both")
        return attack
    params = dict(params or {})
    cls = get_attack(attack).__class__
    # the suite's iteration budget applies to every optimizing attack unless set explicitly
    if suite.attack_steps is not None and "steps" in cls.defaults and "steps" not in params and "preset" not in params:
        params["steps"] = suite.attack_steps
    return cls(**params)


def _resolve_prompts(keys: Sequence[str]) -> list[str]:
    for k in keys:
        if k not in PROMPTS:
            raise UnknownNameError(f"unknown prompt {k!r}.{did_you_mean(k, PROMPTS)} Available: {', '.join(PROMPTS)}")
    return list(keys)


def _save_protection(path: Path, adv: torch.Tensor, images: torch.Tensor, meta: dict[str, str]) -> str:
    """Store delta exactly as integers on the 8-bit grid (int16, -255..255); safetensors, no pickle."""
    delta255 = torch.round((adv - images) * 255).to(torch.int16).cpu().contiguous()
    atomic_write_bytes(path, save({"delta255": delta255}, metadata=meta))
    return delta_sha256(delta255)


def delta_sha256(delta255: torch.Tensor) -> str:
    """Hash of the perturbation itself (not of the file, whose metadata holds timings)."""
    return hashlib.sha256(delta255.to(torch.int16).contiguous().numpy().tobytes()).hexdigest()


def load_protection(path: Union[str, Path], images: torch.Tensor) -> torch.Tensor:
    """Protected images from a stored delta file (the inverse of _save_protection)."""
    delta255 = load_file(str(path))["delta255"].to(images.device)
    return ((images * 255).round() + delta255.to(images.dtype)).clamp(0, 255) / 255


def run(attack: Union[str, Attack], suite: Union[str, Suite] = "smoke", eps: Union[None, str, float, Sequence] = None,
        out: Union[str, Path, None] = None, *, norm: Optional[str] = None, prompts: Optional[Sequence[str]] = None,
        attack_params: Optional[dict[str, Any]] = None, target: Union[str, Target, None] = None,
        images: Optional[torch.Tensor] = None, image_names: Optional[Sequence[str]] = None,
        data: Union[str, Path, None] = None, manifest: Union[str, Path, None] = None,
        device: Union[str, torch.device, None] = None, dtype: Union[str, torch.dtype, None] = None,
        resume: bool = True, cache_dir: Union[str, Path, None] = None, progress: bool = False,
        purifiers: Optional[Sequence[str]] = None, compile_backend: Optional[str] = None) -> RunResult:
    """Run one attack over a suite's budget grid and prompts; write and return the records.

    Finished cells in `out` are reused (resume); a failing cell is recorded with its error and the
    run goes on with the others.
    """
    suite = get_suite(suite)
    attack = _resolve_attack(attack, suite, attack_params)
    eps_list = [eps] if isinstance(eps, (str, float, int)) else list(eps or suite.eps)
    budgets = [Budget(norm or suite.norm, e) for e in eps_list]
    prompt_keys = _resolve_prompts(prompts or suite.prompts)
    purifier_list = [get_purifier(p) for p in (suite.purifiers if purifiers is None else purifiers)]
    if not isinstance(target, Target):
        target = load_target(target or suite.target, device=device, dtype=dtype)
    if images is None:
        images, names = suite.load_images(data, manifest)
    else:
        names = list(image_names) if image_names is not None else [f"image-{i}" for i in range(len(images))]
    check_images(images, "images")
    if len(names) != len(images):
        raise InputError(f"got {len(images)} images but {len(names)} image names")
    if target.device.type == "cuda" and images.device.type == "cpu":
        images = images.float().pin_memory()  # one asynchronous copy; the set then stays on the GPU
    images = images.to(target.device, torch.float32, non_blocking=True)
    compile_s = None
    if compile_backend:
        t0 = time.perf_counter()
        target.accelerate(compile_backend=compile_backend)
        target.warmup(images)
        compile_s = time.perf_counter() - t0
    out = Path(out or Path("spdbench-runs") / suite.name)
    out.mkdir(parents=True, exist_ok=True)
    train_idx, test_idx = split_indices(len(images), suite.split_seed)
    splits = {Split.train: train_idx, Split.test: test_idx}
    editor = Editor(target, suite.edit, cache_dir=cache_dir or out / "cache", batch_size=suite.attack_batch_size)
    seeds = [image_seed(suite.edit, images[i]) for i in range(len(images))]
    shas = [_sha(images[i]) for i in range(len(images))]
    data_sha = hashlib.sha256("".join(shas).encode()).hexdigest()
    suite_cfg = suite.to_dict()
    suite_cfg["purifiers"] = [p.name for p in purifier_list]
    # the grid being run (eps list, prompts) is not part of a cell's identity: cells are shared across grids
    id_cfg = {k: v for k, v in suite_cfg.items() if k not in ("eps", "prompts", "description")}
    done = finished_cells(out) if resume else {}
    env = environment(target.device)
    tinfo = TargetInfo(name=target.name, source=target.source, fingerprint=target.fingerprint,
                       dtype=str(target.dtype).replace("torch.", ""), device=str(target.device))
    result = RunResult(records=[], out=out)
    from tqdm.auto import tqdm

    bar = tqdm(total=len(budgets) * len(prompt_keys), desc=f"{attack.name} on {suite.name}", unit="cell",
               disable=not progress, leave=False)
    for budget in budgets:
        bar.set_postfix_str(f"eps {format_eps(budget.eps)}")
        ids = {(pk, sp): cell_id(attack.name, _jsonable(attack.params), id_cfg, budget.norm,
                                 format_eps(budget.eps), pk, sp.value, target.fingerprint, data_sha)
               for pk in prompt_keys for sp in splits}
        if all(i in done for i in ids.values()):
            result.records.extend(done[i] for i in ids.values())
            result.reused.extend(ids.values())
            continue
        base = dict(attack=attack.name, attack_params=_jsonable(attack.params), preset=attack.preset,
                    universal=attack.universal, suite=suite.name, suite_config=suite_cfg, norm=budget.norm, eps=budget.eps,
                    eps_label=format_eps(budget.eps), attack_seed=suite.attack_seed, split_seed=suite.split_seed,
                    target=tinfo, edit=suite.edit.to_dict(), provenance=env,
                    metric_conventions={m: metrics_mod.METRICS[m].convention for m in metrics_mod.DEFAULT_METRICS})
        try:
            protections, pfile, psha = _protect_all(attack, target, images, splits, budget, suite, out, base)
        except SpdbenchError as exc:
            for (pk, sp), cid in ids.items():
                rec = Record(cell_id=cid, status=Status.error, error=str(exc), prompt_key=pk, prompt=PROMPTS[pk],
                             split=sp, **base)
                write_record(rec, out)
                result.records.append(rec)
                result.computed.append(cid)
            log.error("cell group %s %s failed: %s", attack.name, budget, exc)
            continue
        adv_all = torch.empty_like(images)
        for sp, idx in splits.items():
            adv_all[idx] = protections[sp].adv
        imperceptibility = metrics_mod.score(adv_all, images)
        purified_imgs = {p.name: p(adv_all, target) for p in purifier_list}
        for pk in prompt_keys:
            bar.update(1)
            if all(ids[(pk, sp)] in done for sp in splits):
                result.records.extend(done[ids[(pk, sp)]] for sp in splits)
                result.reused.extend(ids[(pk, sp)] for sp in splits)
                continue
            t0 = time.perf_counter()
            clean_edits = editor.edit_clean(images, PROMPTS[pk], seeds)
            adv_edits = editor.edit(adv_all, PROMPTS[pk], seeds)
            edit_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            purified_edits = {name: editor.edit(img, PROMPTS[pk], seeds) for name, img in purified_imgs.items()}
            edit_s += time.perf_counter() - t0
            t0 = time.perf_counter()
            # one call: the clean edits' features are computed once for every comparison
            scored = metrics_mod.score_many({"": adv_edits, **purified_edits}, clean_edits)
            protection = scored.pop("")
            purified = scored
            score_s = time.perf_counter() - t0
            for sp, idx in splits.items():
                p = protections[sp]
                n = len(idx)
                rec = Record(
                    cell_id=ids[(pk, sp)], prompt_key=pk, prompt=PROMPTS[pk], split=sp,
                    image_names=[names[i] for i in idx], image_sha256=[shas[i] for i in idx],
                    edit_seeds=[seeds[i] for i in idx],
                    protection={m: v[idx].tolist() for m, v in protection.items()},
                    protection_mean={m: float(v[idx].mean()) for m, v in protection.items()},
                    imperceptibility={m: v[idx].tolist() for m, v in imperceptibility.items()},
                    imperceptibility_mean={m: float(v[idx].mean()) for m, v in imperceptibility.items()},
                    purified={n: {m: v[idx].tolist() for m, v in sc.items()} for n, sc in purified.items()},
                    purified_mean={n: {m: float(v[idx].mean()) for m, v in sc.items()} for n, sc in purified.items()},
                    timing=Timing(compile_s=compile_s, attack_wall_s=p.wall_s, attack_device_s=p.device_s, fit_wall_s=p.fit_wall_s,
                                  per_image_s=p.wall_s / n, edit_wall_s=edit_s * n / len(images),
                                  score_wall_s=score_s * n / len(images), peak_memory_bytes=p.peak_memory_bytes),
                    validation=Validation(max_norm_returned=p.max_norm_returned,
                                          over_budget_images=p.over_budget_images,
                                          projected=p.over_budget_images > 0),
                    oom_events=p.oom_events + editor.oom_events,
                    loss_curve=p.loss_curve, perturbation_file=pfile, perturbation_sha256=psha, **base)
                write_record(rec, out)
                result.records.append(rec)
                result.computed.append(rec.cell_id)
    bar.close()
    result.clean_cache_hits, result.clean_cache_misses = editor.cache_hits, editor.cache_misses
    result.edits_run = editor.edits_run
    write_jsonl(load_records(out, strict=False), out / "records.jsonl")
    return result


def _protect_all(attack: Attack, target: Target, images: torch.Tensor, splits: dict, budget: Budget, suite: Suite,
                 out: Path, base: dict) -> tuple[dict, str, str]:
    """Protect every split once per budget; reuse a stored protection when resuming."""
    key = hashlib.sha256(repr((attack.name, sorted(base["attack_params"].items()), suite.name, budget.label,
                               base["target"].fingerprint, _sha(images))).encode()).hexdigest()[:16]
    rel = f"perturbations/{attack.name}__{budget.norm}-{format_eps(budget.eps).replace('/', 'o')}__{key}.safetensors"
    path = out / rel
    if path.is_file():
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
        adv = load_protection(path, images)
        stored = _protections_from_meta(meta, adv, splits)
        return stored, rel, delta_sha256(load_file(str(path))["delta255"])
    protections: dict = {}
    if attack.universal:
        train = images[splits[Split.train]]
        delta, clock, norm, over = fit_universal(attack, target, train, budget, suite.attack_seed)
        for sp, idx in splits.items():
            p = protect(attack, target, images[idx], budget, batch_size=suite.attack_batch_size,
                        seed=suite.attack_seed, fitted_delta=delta)
            p.fit_wall_s, p.max_norm_returned, p.over_budget_images = clock.wall_s, norm, over
            p.peak_memory_bytes = clock.peak_memory_bytes
            p.loss_curve = list(attack.loss_history)
            protections[sp] = p
    else:
        for sp, idx in splits.items():
            protections[sp] = protect(attack, target, images[idx], budget, batch_size=suite.attack_batch_size,
                                      seed=suite.attack_seed + 1000 * (sp == Split.test))
    adv_all = torch.empty_like(images)
    for sp, idx in splits.items():
        adv_all[idx] = protections[sp].adv
    meta = {f"{sp.value}.{k}": json.dumps(getattr(p, k)) for sp, p in protections.items()
            for k in ("wall_s", "device_s", "peak_memory_bytes", "max_norm_returned", "over_budget_images",
                      "fit_wall_s", "loss_curve", "oom_events")}
    meta["format"] = "spdbench-perturbation/1"
    sha = _save_protection(path, adv_all, images, meta)
    return protections, rel, sha


def _protections_from_meta(meta: dict[str, str], adv: torch.Tensor, splits: dict) -> dict:
    out = {}
    for sp, idx in splits.items():
        get = lambda k: json.loads(meta[f"{sp.value}.{k}"])  # noqa: E731 - data only, never code
        out[sp] = Protection(adv=adv[idx], wall_s=get("wall_s"), device_s=get("device_s"),
                             peak_memory_bytes=get("peak_memory_bytes"), max_norm_returned=get("max_norm_returned"),
                             over_budget_images=get("over_budget_images"), loss_curve=get("loss_curve"),
                             fit_wall_s=get("fit_wall_s"), oom_events=get("oom_events"))
    return out


def _jsonable(params: dict) -> dict:
    out = {}
    for k, v in params.items():
        if isinstance(v, torch.Tensor):
            out[k] = f"tensor(shape={tuple(v.shape)}, sha256={_sha(v)[:12]})"
        elif isinstance(v, (str, int, float, bool, type(None), list, tuple, dict)):
            out[k] = v
        else:
            out[k] = repr(v)
    return out
