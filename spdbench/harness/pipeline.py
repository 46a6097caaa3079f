"""`run`: the harness. It owns the data, the split, the budget, the seeds and the scorer.

A run reads as a pipeline of stages, each owning its inputs and outputs:
plan (attack_plan: parameters, budgets and where each came from) -> cells (ids, what is done)
-> protect (the attack runs in its worker process and sees only what it may: isolation.py,
worker.py) -> enforce (protect.enforce: validate, project, clamp, quantize) -> edit (editing.py,
clean edits cached) -> score (metrics.py) -> record (results.py).
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch

from spdbench.scoring import metrics as metrics_mod
from spdbench.store import networks as network_file
from spdbench.store import perturbations as perturbation_file
from spdbench.harness.plan import AttackPlan, plan
from spdbench.attacks.base import Attack, attack_source
from spdbench.budget import Budget, effective_eps, format_eps
from spdbench.data.photos import split_indices
from spdbench.harness.editing import PROMPTS, Editor, clean_edit_cache_dir, image_seed
from spdbench.errors import AttackError, InputError, SpdbenchError, UnknownNameError, did_you_mean
from spdbench.store.strips import write_cell_examples
from spdbench.images import check_images, image_sha256
from spdbench.harness.isolation import AttackWorker
from spdbench.harness.protect import Protection, SplitOutput, enforce, run_jobs
from spdbench.store.provenance import environment
from spdbench.purifiers import get_purifier
from spdbench.scoring.regions import score_region
from spdbench.store.runfolder import DiskError, RunLock, prepare_out
from spdbench.data.photos import check_size_multiple
from spdbench.store.records import (Record, Split, Status, TargetInfo, Timing, Validation, atomic_write_bytes, cell_id,
                      finished_cells, load_records, remove_stale_temp, write_jsonl, write_record)
from spdbench.suites import Suite, get_suite
from spdbench.targets import Target, load_target

log = logging.getLogger("spdbench")

ISOLATION_MODES = ("process", "none")


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
    #: of the hits, those on clean edits this run made itself (for another eps)
    clean_cache_hits_own: int = 0
    #: the clean-edit cache folder this run read and wrote (shared per model unless `cache_dir` was given)
    clean_cache_dir: Optional[Path] = None
    edits_run: int = 0
    #: clean-edit cache files found bad on read (wrong shape, non-finite, constant, ...) and recomputed
    clean_cache_rejected: list[str] = field(default_factory=list)
    #: where each setting came from ("suite", "preset:NAME", "explicit", "default")
    param_sources: dict[str, str] = field(default_factory=dict)

    @property
    def failed(self) -> list[Record]:
        return [r for r in self.records if r.status == Status.error]

    @property
    def flagged(self) -> list[Record]:
        return [r for r in self.records if r.flags]

    @property
    def ok(self) -> bool:
        return not self.failed

    def table(self, full: bool = False):
        """Per-cell means as a pandas DataFrame: method, eps, prompt, split and the four protection
        metrics (lower = stronger); `full=True` adds every column (imperceptibility, costs, ids)."""
        from spdbench.report.board import PROTECTION, records_frame

        df = records_frame(self.records)
        if full or df.empty:
            return df
        return df[["method", "eps_label", "prompt", "split", *PROTECTION]].rename(columns={"eps_label": "eps"})




def _resolve_prompts(keys: Sequence[str]) -> list[str]:
    for k in keys:
        if k not in PROMPTS:
            raise UnknownNameError(f"unknown prompt {k!r}.{did_you_mean(k, PROMPTS)} Available: {', '.join(PROMPTS)}")
    return list(keys)


def load_protection(path: Union[str, Path], images: torch.Tensor) -> torch.Tensor:
    """Protected images from a stored perturbation file (perturbation_file owns the format)."""
    delta255, _ = perturbation_file.load_delta(path)
    return perturbation_file.apply_delta(images, delta255)


# --- stage: protect (the attack runs where it may see only its inputs) -------------------------
class AttackRunner:
    """Runs one attack's cell groups: in a worker process (isolation "process", the default), or in
    this process for debugging (isolation "none": recorded, refused by verify and submit)."""

    def __init__(self, isolation: str, target: Target, timeout_s: Optional[float]) -> None:
        self.isolation, self.target, self.timeout_s = isolation, target, timeout_s
        self.worker: Optional[AttackWorker] = None
        self.start_s: Optional[float] = None

    def run(self, attack: Attack, budget: Budget, jobs: dict[str, dict], batch_size: int) -> tuple[dict, float]:
        """{split name: SplitOutput}, and the harness-measured wall seconds of the whole group."""
        if self.isolation == "none":
            return self._in_process(attack, budget, jobs, batch_size)
        if self.worker is None or not self.worker.alive:
            self.close()
            self.worker = AttackWorker(self.target)
            self.start_s = self.worker.start()
        try:
            result = self.worker.run(attack=attack, budget=budget, universal=attack.universal, batch_size=batch_size,
                                     splits={k: {kk: vv.cpu() if isinstance(vv, torch.Tensor) else vv
                                                 for kk, vv in v.items()} for k, v in jobs.items()},
                                     timeout=self.timeout_s)
        except AttackError:
            self.close()  # the next group starts from a fresh process and a fresh model copy
            raise
        return result.splits, result.wall_s

    def _in_process(self, attack: Attack, budget: Budget, jobs: dict, batch_size: int) -> tuple[dict, float]:
        fingerprint = self.target.fingerprint
        t0 = time.perf_counter()
        out = run_jobs(attack, self.target, budget, jobs, batch_size)
        wall = time.perf_counter() - t0
        if self.target.fingerprint_now() != fingerprint:
            raise AttackError(f"attack {attack.name!r} changed the target's weights (isolation 'none')")
        return out, wall

    def close(self) -> None:
        if self.worker is not None:
            self.worker.close()
            self.worker = None

    def __enter__(self) -> "AttackRunner":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _group_flags(attack: Attack, outputs: dict[str, SplitOutput], protections: dict[Split, Protection],
                 isolation: str) -> list[str]:
    """Visible warnings: never let a run that did nothing read as a plain ok."""
    flags = []
    if any(p.zero_delta for p in protections.values()):
        flags.append("zero-delta")
    curves = [o.loss_curve for o in outputs.values() if len(o.loss_curve) >= 2]
    if curves and all(max(c) == min(c) for c in curves):
        flags.append("loss-flat")
    if any(p.over_budget_images for p in protections.values()):
        flags.append("budget-projected")
    if isolation == "none":
        flags.append("isolation-none")
    return flags


def _check_outputs(attack: Attack, outputs: dict[str, SplitOutput], dtype: torch.dtype) -> None:
    """A non-finite loss during optimization is an error of the group, never a zero step."""
    for name, out in outputs.items():
        bad = [i for i, v in enumerate(out.loss_curve) if not math.isfinite(v)]
        if bad:
            raise AttackError(f"attack {attack.name!r}: non-finite loss at step {bad[0]} on the {name} split "
                              f"(target dtype {str(dtype).replace('torch.', '')})")


def _protect_group(runner: AttackRunner, attack: Attack, target: Target, images: torch.Tensor, splits: dict,
                   budget: Budget, suite: Suite,
                   masks: Optional[torch.Tensor] = None) -> tuple[dict[Split, Protection], list[str]]:
    """Run the attack on what it may see (an inpainting attack also its split's masks), then
    enforce the budget on what came back."""
    if attack.universal or attack.amortized:
        jobs = {"fit": {"images": images[splits[Split.train]], "seed": suite.attack_seed}}
        fit_idx = {"fit": splits[Split.train]}
        if attack.amortized:  # fit on the train split, then apply to every split, feed-forward
            jobs.update({sp.value: {"images": images[idx], "seed": suite.attack_seed} for sp, idx in splits.items()})
    else:
        jobs = {sp.value: {"images": images[idx], "seed": suite.attack_seed + 1000 * (sp == Split.test)}
                for sp, idx in splits.items()}
        fit_idx = {sp.value: idx for sp, idx in splits.items()}
    if attack.uses_masks and masks is not None:
        for name, idx in fit_idx.items():
            jobs[name]["masks"] = masks[idx]
    outputs, wall = runner.run(attack, budget, jobs, suite.attack_batch_size)
    _check_outputs(attack, outputs, target.dtype)
    protections: dict[Split, Protection] = {}
    n_all = sum(len(idx) for idx in splits.values())
    for sp, idx in splits.items():
        x = images[idx]
        out = outputs["fit"] if attack.universal else outputs[sp.value]
        t0 = time.perf_counter()
        adv, returned, over, applied, zero = enforce(out.delta.to(x.device), x, budget, attack.name,
                                                     universal=attack.universal)
        if attack.universal:  # the fit is a one-off cost; applying the delta is this split's cost
            wall_s, fit_s = time.perf_counter() - t0, wall
        elif attack.amortized:  # the fit is a one-off cost; the forward passes are this split's cost
            wall_s, fit_s = out.wall_s, outputs["fit"].wall_s
        else:
            wall_s, fit_s = wall * len(idx) / n_all, None
        protections[sp] = Protection(adv=adv, wall_s=wall_s, device_s=out.device_s,
                                     peak_memory_bytes=out.peak_memory_bytes, max_norm_returned=returned,
                                     over_budget_images=over, max_norm_applied=applied,
                                     loss_curve=outputs["fit"].loss_curve if attack.amortized else out.loss_curve,
                                     fit_wall_s=fit_s, oom_events=out.oom_events,
                                     model_calls=outputs["fit"].model_calls if attack.amortized else out.model_calls,
                                     zero_delta=zero)
        if attack.amortized:
            protections[sp].network_state = outputs["fit"].network
    return protections, _group_flags(attack, outputs, protections, runner.isolation)


# --- the run -----------------------------------------------------------------------------------

def _check_same_models(out: Path, records: Sequence[Record], target, edit_target) -> None:
    """Refuse a run folder whose `records` were measured on other weights.

    Why: cell ids include the target's fingerprint, so a run on a retrained model would add its
    cells beside the old ones instead of resuming them, and the folder would then mix two models'
    measurements (a table over it, or a submission of it, would silently pool them). Nothing in the
    folder is touched; the user picks another --out."""
    def label(model) -> str:
        return "none (white box)" if model is None else f"{model.name} {model.fingerprint}"

    for rec in records:
        for what, old, new in (("target", rec.target, target), ("edit target", rec.edit_target, edit_target)):
            if (old and old.fingerprint) != (new and new.fingerprint):
                raise InputError(
                    f"--out {out}: holds records measured on {what} {label(old)} (cell {rec.cell_id}); this "
                    f"run's {what} is {label(new)}. A run folder holds one model's measurements: pass another "
                    f"--out (nothing in {out} was changed)")


def run(attack: Union[str, Attack], suite: Union[str, Suite] = "smoke", eps: Union[None, str, float, Sequence] = None,
        out: Union[str, Path, None] = None, *, norm: Optional[str] = None, prompts: Optional[Sequence[str]] = None,
        attack_params: Optional[dict[str, Any]] = None, target: Union[str, Target, None] = None,
        images: Optional[torch.Tensor] = None, image_names: Optional[Sequence[str]] = None,
        data: Union[str, Path, None] = None, manifest: Union[str, Path, None] = None,
        device: Union[str, torch.device, None] = None, dtype: Union[str, torch.dtype, None] = None,
        resume: bool = True, cache_dir: Union[str, Path, None] = None, progress: Optional[bool] = None,
        purifiers: Optional[Sequence[str]] = None, compile_backend: Optional[str] = None,
        isolation: str = "process", attack_timeout_s: Optional[float] = None,
        lock_scope: Optional[str] = None, masks: Union[str, Path, None] = None,
        protections_from: Union[str, Path, None] = None) -> RunResult:
    """Run one attack over its budgets and the suite's prompts; write and return the records.

    The attack runs in its own worker process (`isolation="process"`); `isolation="none"` runs it
    here for debugging and marks every record so. Finished cells in `out` are reused (resume); a
    failing cell group is recorded with its error and the run goes on with the others.
    `protections_from`: a run folder whose protections this attack made under the same attack
    settings (model, parameters, budget, seeds, photos) are reused instead of re-running the attack,
    e.g. to edit a white-box run's protected photos with a transfer suite's other model.
    `progress=None` shows a progress bar when stderr is a terminal. Clean edits are cached in `cache_dir`, by default one folder per model under the user's cache
    folder ($SPDBENCH_CACHE_DIR, else $XDG_CACHE_HOME/spdbench or ~/.cache/spdbench), shared by
    every run folder. On an inpainting suite every photo is edited with its mask (the suite's set, or `masks`: a
    folder of NAME.png, white = repaint) and also scored on the repainted and the kept region.
    """
    if isolation not in ISOLATION_MODES:
        raise InputError(f"isolation must be one of {list(ISOLATION_MODES)}, got {isolation!r}")
    if progress is None:  # a person at a terminal sees progress; a log file or CI does not
        progress = interactive()
    suite = get_suite(suite)
    if protections_from is not None:
        protections_from = Path(protections_from)
        if not (protections_from / "records").is_dir():
            raise InputError(f"protections_from {str(protections_from)!r}: not a run folder (expected a folder "
                             "with records/ and perturbations/, made by an earlier run)")
    if attack_timeout_s is not None:
        if not (isinstance(attack_timeout_s, (int, float)) and attack_timeout_s > 0):
            raise InputError(f"attack_timeout_s must be a number of seconds > 0, got {attack_timeout_s!r}")
        from dataclasses import replace

        suite = replace(suite, attack_timeout_s=float(attack_timeout_s))
    the_plan: AttackPlan = plan(attack, suite, params=attack_params, eps=eps, norm=norm)
    attack = the_plan.attack
    prompt_keys = _resolve_prompts(prompts or suite.prompts)
    purifier_list = [get_purifier(p) for p in (suite.purifiers if purifiers is None else purifiers)]
    if images is None:
        images, names = suite.load_images(data, manifest)
    else:
        names = list(image_names) if image_names is not None else [f"image-{i}" for i in range(len(images))]
    check_images(images, "images")
    if not isinstance(target, Target):
        target = load_target(target or suite.target, device=device, dtype=dtype)
    # transfer: the editor's own model (same device and dtype); None = the attack's target edits
    edit_target = load_target(suite.edit_target, device=target.device, dtype=target.dtype) \
        if suite.edit_target else None
    mask_tensor, mask_set_name = suite_masks(suite, masks, names, images, edit_target or target)
    # every input is checked before anything is created (the CLI checks --out before the model load)
    out = prepare_out(out or Path("spdbench-runs") / suite.name)  # one line if it cannot hold a run
    # one writer per folder: a second run on it stops with one line; a grid's parallel tasks on one
    # attack folder (backends.py) each lock their own scope
    with RunLock(out, scope=lock_scope):
        return _run_locked(suite, the_plan, prompt_keys, purifier_list, target, images, names, out, cache_dir,
                           resume, progress, compile_backend, isolation, edit_target, mask_tensor, mask_set_name,
                           protections_from)


def interactive() -> bool:
    """True when stderr is a terminal (where a progress bar is read, not logged)."""
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stream
        return False


def suite_masks(suite: Suite, masks: Union[str, Path, None], names: Sequence[str], images: torch.Tensor,
                editing: Target) -> tuple[Optional[torch.Tensor], Optional[str]]:
    """The (N, 1, H, W) mask of every photo (1 = repaint) and the set's name, or (None, None) for
    img2img. An inpainting model needs masks and an img2img model takes none: one line otherwise."""
    from spdbench.data.masks import load_masks, mask_set

    inpainting = bool(getattr(editing, "inpainting", False))
    if masks is not None:
        if not inpainting:
            raise InputError(f"--masks {str(masks)!r}: the editing model {editing.name!r} is an img2img model; "
                             "masks apply to inpainting suites (e.g. smoke-inpaint)")
        return load_masks(masks, names, images.shape[-1]), "folder"
    if suite.masks is None:
        if inpainting:
            raise InputError(f"suite {suite.name!r} edits with {editing.name!r}, an inpainting model, but names no "
                             "mask set: use an inpainting suite (smoke-inpaint) or pass --masks DIR")
        return None, None
    if not inpainting:
        raise InputError(f"suite {suite.name!r} has masks ({suite.masks!r}) but its editing model {editing.name!r} "
                         "is an img2img model, not inpainting")
    if images.shape[-1] != images.shape[-2]:
        raise InputError(f"mask set {suite.masks!r} needs square photos, got {images.shape[-2]}x{images.shape[-1]}")
    try:
        return mask_set(suite.masks, names, images.shape[-1]), suite.masks
    except ValueError as exc:
        raise InputError(f"suite {suite.name!r}: {exc}") from None


def _run_locked(suite: Suite, the_plan: AttackPlan, prompt_keys, purifier_list, target: Target, images, names,
                out: Path, cache_dir, resume: bool, progress: bool, compile_backend, isolation: str,
                edit_target: Optional[Target] = None, masks: Optional[torch.Tensor] = None,
                mask_set_name: Optional[str] = None, protections_from: Optional[Path] = None) -> RunResult:
    attack = the_plan.attack
    editing = edit_target or target  # edits and purifies
    check_size_multiple(images, target.latent_factor, "images")
    if len(names) != len(images):
        raise InputError(f"got {len(images)} images but {len(names)} image names")
    images = images.detach().clone()  # the harness's own copy: nobody else holds a reference to it
    if target.device.type == "cuda" and images.device.type == "cpu":
        images = images.float().pin_memory()  # one asynchronous copy; the set then stays on the GPU
    images = images.to(target.device, torch.float32, non_blocking=True)
    compile_s = None
    if compile_backend:
        t0 = time.perf_counter()
        target.accelerate(compile_backend=compile_backend)
        target.warmup(images)
        compile_s = time.perf_counter() - t0
    stale = remove_stale_temp(out, min_age_s=60)  # a parallel task (Ray) may be writing right now
    # clean edits: the caller's folder, else one shared per model in the user's cache folder
    cache_dir = Path(cache_dir) if cache_dir is not None else clean_edit_cache_dir(editing)
    if cache_dir.is_dir() and not cache_dir.resolve().is_relative_to(out.resolve()):
        stale += remove_stale_temp(cache_dir, min_age_s=600)  # a shared cache may have live writers
    if stale:
        log.warning("removed %d temporary file(s) left by a killed write: %s", len(stale),
                    ", ".join(str(p) for p in stale[:5]))
    train_idx, test_idx = split_indices(len(images), suite.split_seed)
    splits = {Split.train: train_idx, Split.test: test_idx}
    editor = Editor(editing, suite.edit, cache_dir=cache_dir, batch_size=suite.attack_batch_size)
    seeds = [image_seed(suite.edit, images[i]) for i in range(len(images))]
    shas = [image_sha256(images[i]) for i in range(len(images))]
    mask_shas = None
    if masks is not None:
        from spdbench.data.masks import mask_sha256

        masks = masks.to(target.device, torch.float32)
        mask_shas = [mask_sha256(m) for m in masks]
    # a cell is defined by its photos, and on an inpainting suite by their masks too
    data_sha = hashlib.sha256(("".join(shas) + "".join(mask_shas or [])).encode()).hexdigest()
    suite_cfg = suite.to_dict()
    suite_cfg["purifiers"] = [p.name for p in purifier_list]
    suite_cfg["purifier_settings"] = {p.name: p.to_dict() for p in purifier_list}  # what each name ran as
    # the grid being run (eps list, prompts) is not part of a cell's identity: cells are shared across
    # grids; the device type and dtype are (CPU and CUDA generators draw different noise for one seed)
    id_cfg = {k: v for k, v in suite_cfg.items() if k not in ("eps", "prompts", "description", "attack_timeout_s",
                                                           "purifier_settings")}
    id_cfg["device_type"], id_cfg["dtype"] = target.device.type, str(target.dtype).replace("torch.", "")
    if edit_target is None:
        id_cfg.pop("edit_target", None)  # white box: cell ids as before transfer suites existed
    else:
        id_cfg["edit_target_fingerprint"] = edit_target.fingerprint
    existing = load_records(out, strict=False)  # read once: the model check and resume (corrupt ones skipped)
    _check_same_models(out, existing, target, edit_target)
    done = finished_cells(existing) if resume else {}
    env = environment(target.device)
    tinfo = TargetInfo(name=target.name, source=target.source, fingerprint=target.fingerprint,
                       dtype=str(target.dtype).replace("torch.", ""), device=str(target.device))
    result = RunResult(records=[], out=out, param_sources=dict(the_plan.sources))
    from tqdm.auto import tqdm

    def group_ids(budget: Budget) -> dict:
        return {(pk, sp): cell_id(attack.name, _jsonable(attack.params), id_cfg, budget.norm,
                                  format_eps(budget.eps), pk, sp.value, target.fingerprint, data_sha)
                for pk in prompt_keys for sp in splits}

    all_ids = [group_ids(b) for b in the_plan.budgets]
    n_cells = sum(len(g) for g in all_ids)            # what the summary counts: one cell per prompt and split
    n_done = sum(i in done for g in all_ids for i in g.values())
    if progress and n_done:
        print(f"resuming: {n_done} of {n_cells} cells already done in {out}", file=sys.stderr, flush=True)
    bar = tqdm(total=n_cells, desc=f"{attack.name} on {suite.name}", unit="cell", disable=not progress, leave=False)
    common = dict(attack=attack.name, attack_params=_jsonable(attack.params), preset=attack.preset,
                  universal=attack.universal, amortized=attack.amortized, suite=suite.name, suite_config=suite_cfg, attack_seed=suite.attack_seed,
                  split_seed=suite.split_seed, target=tinfo, edit=suite.edit.to_dict(), provenance=env,
                  edit_target=None if edit_target is None else TargetInfo(
                      name=edit_target.name, source=edit_target.source, fingerprint=edit_target.fingerprint,
                      dtype=str(edit_target.dtype).replace("torch.", ""), device=str(edit_target.device)),
                  metric_conventions={m: metrics_mod.METRICS[m].convention for m in metrics_mod.DEFAULT_METRICS},
                  isolation=isolation, param_sources=dict(the_plan.sources), attack_source=attack_source(attack),
                  task=suite.task)
    with AttackRunner(isolation, target, suite.attack_timeout_s) as runner:
        ctx = _Run(result=result, runner=runner, attack=attack, target=target, suite=suite, out=out, images=images,
                   names=names, shas=shas, seeds=seeds, splits=splits, editor=editor, purifiers=purifier_list,
                   prompt_keys=prompt_keys, done=done, common=common, compile_s=compile_s, bar=bar,
                   masks=masks, mask_shas=mask_shas, mask_set=mask_set_name, protections_from=protections_from,
                   source_records=_source_records(protections_from))
        for budget, ids in zip(the_plan.budgets, all_ids):
            bar.set_postfix_str(f"eps {format_eps(budget.eps)}")
            if all(i in done for i in ids.values()):
                result.records.extend(done[i] for i in ids.values())
                result.reused.extend(ids.values())
                bar.update(len(ids))
                continue
            _run_group(ctx, budget, ids)
    bar.close()
    result.clean_cache_hits, result.clean_cache_misses = editor.cache_hits, editor.cache_misses
    result.clean_cache_dir = cache_dir
    result.clean_cache_hits_own = editor.cache_hits_own
    result.edits_run = editor.edits_run
    result.clean_cache_rejected = list(editor.cache_rejected)
    write_jsonl(load_records(out, strict=False), out / "records.jsonl")
    return result


@dataclass
class _Run:
    """What every cell group of one run shares (the harness's side only)."""

    result: RunResult
    runner: AttackRunner
    attack: Attack
    target: Target        # the attack's (what it protects against)
    suite: Suite
    out: Path
    images: torch.Tensor
    names: list
    shas: list
    seeds: list
    splits: dict
    editor: Editor
    purifiers: list
    prompt_keys: list
    done: dict
    common: dict
    compile_s: Optional[float]
    bar: Any
    masks: Optional[torch.Tensor] = None     # inpainting: (N, 1, H, W), 1 = repaint
    mask_shas: Optional[list] = None
    mask_set: Optional[str] = None
    protections_from: Optional[Path] = None  # a run folder whose matching protections are reused
    source_records: Optional[list] = None    # its records, read once for every budget


def _run_group(ctx: _Run, budget: Budget, ids: dict) -> None:
    """One cell group (one budget): protect, then edit, score and record every prompt and split."""
    base = dict(ctx.common, norm=budget.norm, eps=budget.eps, eps_label=format_eps(budget.eps))
    try:
        protections, flags, pfile, psha = _stored_or_new(ctx.runner, ctx.attack, ctx.target, ctx.images, ctx.splits,
                                                         budget, ctx.suite, ctx.out, base, ctx.masks, ctx.mask_shas,
                                                         ctx.protections_from, ctx.shas, ctx.source_records)
    except DiskError:
        raise  # a full or read-only disk ends the run with one line; nothing to record
    except SpdbenchError as exc:
        for (pk, sp), cid in ids.items():
            rec = Record(cell_id=cid, status=Status.error, error=str(exc), prompt_key=pk, prompt=PROMPTS[pk],
                         split=sp, **base)
            write_record(rec, ctx.out)
            ctx.result.records.append(rec)
            ctx.result.computed.append(cid)
        log.error("cell group %s %s failed: %s", ctx.attack.name, budget, exc)
        ctx.bar.update(len(ids))
        return
    _edit_score_record(ctx, protections, flags, pfile, psha, ids, base)


def _edit_score_record(ctx: _Run, protections: dict, flags: list, pfile: str, psha: str, ids: dict,
                       base: dict) -> None:
    """Stages edit -> score -> record for one cell group (every prompt and both splits)."""
    result, editor, images, names, shas, seeds, splits = (ctx.result, ctx.editor, ctx.images, ctx.names, ctx.shas,
                                                          ctx.seeds, ctx.splits)
    target, done, bar, out = ctx.editor.target, ctx.done, ctx.bar, ctx.out  # the editing model purifies
    compile_s, start_s, purifier_list = ctx.compile_s, ctx.runner.start_s, ctx.purifiers
    adv_all = torch.empty_like(images)
    for sp, idx in splits.items():
        adv_all[idx] = protections[sp].adv
    imperceptibility = metrics_mod.score(adv_all, images)
    masks = ctx.masks
    kept = score_region({"": adv_all}, images, 1 - masks)[""] if masks is not None else {}
    purified_imgs = {p.name: p(adv_all, target) for p in purifier_list}
    for pk in ctx.prompt_keys:
        bar.update(len(splits))
        if all(ids[(pk, sp)] in done for sp in splits):
            result.records.extend(done[ids[(pk, sp)]] for sp in splits)
            result.reused.extend(ids[(pk, sp)] for sp in splits)
            continue
        t0 = time.perf_counter()
        clean_edits = editor.edit_clean(images, PROMPTS[pk], seeds, masks)
        adv_edits = editor.edit(adv_all, PROMPTS[pk], seeds, masks)
        purified_edits = {name: editor.edit(img, PROMPTS[pk], seeds, masks) for name, img in purified_imgs.items()}
        edit_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        # one call: the clean edits' features are computed once for every comparison
        scored = metrics_mod.score_many({"": adv_edits, **purified_edits}, clean_edits)
        protection = scored.pop("")
        # inpainting: the same comparisons on the repainted region only (region_metrics.py)
        region = score_region({"": adv_edits, **purified_edits}, clean_edits, masks) if masks is not None else {}
        protection_region = region.pop("", {})
        score_s = time.perf_counter() - t0
        for sp, idx in splits.items():
            if ids[(pk, sp)] in done:  # a finished cell (its sibling split was cut short) is never rewritten
                result.records.append(done[ids[(pk, sp)]])
                result.reused.append(ids[(pk, sp)])
                continue
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
                purified={n_: {m: v[idx].tolist() for m, v in sc.items()} for n_, sc in scored.items()},
                purified_mean={n_: {m: float(v[idx].mean()) for m, v in sc.items()} for n_, sc in scored.items()},
                timing=Timing(compile_s=compile_s, attack_wall_s=p.wall_s, attack_device_s=p.device_s,
                              fit_wall_s=p.fit_wall_s, per_image_s=p.wall_s / n, edit_wall_s=edit_s * n / len(images),
                              score_wall_s=score_s * n / len(images), peak_memory_bytes=p.peak_memory_bytes,
                              worker_start_s=start_s),
                validation=Validation(max_norm_returned=p.max_norm_returned, over_budget_images=p.over_budget_images,
                                      projected=p.over_budget_images > 0, max_norm_applied=p.max_norm_applied,
                                      effective_eps=effective_eps(Budget(base['norm'], base['eps']))),
                oom_events=p.oom_events + editor.oom_events, flags=list(flags), model_calls=p.model_calls,
                loss_curve=p.loss_curve, perturbation_file=pfile, perturbation_sha256=psha, network=p.network,
                **_region_fields(ctx, idx, protection_region, region, kept), **base)
            if sp == Split.test:  # illustrations first: a finished record implies its examples exist
                write_cell_examples(out, rec.cell_id, names, idx, images, adv_all, clean_edits, adv_edits,
                                    purified_edits, {n_: sc["ssim"] for n_, sc in scored.items()})
            write_record(rec, out)
            result.records.append(rec)
            result.computed.append(rec.cell_id)


def _region_fields(ctx: "_Run", idx, protection_region: dict, purified_region: dict, kept: dict) -> dict:
    """An inpainting record's masks and its region scores (per image; means derived from them)."""
    if ctx.masks is None:
        return {}
    per = lambda sc: {m: v[idx].tolist() for m, v in sc.items()}  # noqa: E731
    mean = lambda sc: {m: float(v[idx].mean()) for m, v in sc.items()}  # noqa: E731
    return dict(masks=dict(set=ctx.mask_set, convention="1 = repaint (white), 0 = keep",
                           sha256=[ctx.mask_shas[i] for i in idx],
                           repaint_fraction=[round(float(ctx.masks[i].mean()), 6) for i in idx]),
                protection_region=per(protection_region), protection_region_mean=mean(protection_region),
                purified_region={n: per(sc) for n, sc in purified_region.items()},
                imperceptibility_kept=per(kept), imperceptibility_kept_mean=mean(kept))


_META_KEYS = ("wall_s", "device_s", "peak_memory_bytes", "max_norm_returned", "over_budget_images",
              "max_norm_applied", "fit_wall_s", "loss_curve", "oom_events", "model_calls", "zero_delta", "network")


def _source_records(source: Optional[Path]) -> Optional[list[Record]]:
    """The records of a `protections_from` folder, read once per run (None: no folder, or unreadable
    records -- then nothing is reused and the attack runs)."""
    if source is None:
        return None
    try:
        return load_records(source)
    except SpdbenchError:
        return None


def reusable_protection(source: Path, attack: Attack, params: dict, budget: Budget, target_fingerprint: str,
                        suite: Suite, shas: Sequence[str], splits: dict,
                        mask_shas: Optional[Sequence[str]] = None,
                        records: Optional[Sequence[Record]] = None) -> Optional[Path]:
    """The perturbation file of run folder `source` that this attack would make here, or None.

    Matched through the source's records (which name their file): same attack and parameters,
    budget, attack model, attack and split seeds, batch size, photos per split (and masks, for an
    attack that reads them). Why: a transfer suite edits with another model the very protection the
    white-box suite made; re-running a seeded attack to get the same bytes is waste. The file is
    read as data and shape-checked like any stored perturbation, and `verify` re-runs the attack.
    `records`: the source's records if already read (a run reads them once for all its budgets)."""
    if attack.amortized:  # its records also name a network file: fit it here instead
        return None
    recs = _source_records(source) if records is None else records
    if recs is None:
        return None
    by_file: dict[str, dict[str, list]] = {}
    for r in recs:
        if r.status != Status.ok or not r.perturbation_file:
            continue
        if (r.attack, r.norm, r.target.fingerprint, r.attack_seed, r.split_seed) != (
                attack.name, budget.norm, target_fingerprint, suite.attack_seed, suite.split_seed) \
                or not math.isclose(r.eps, budget.eps, rel_tol=1e-9) \
                or json.dumps(r.attack_params, sort_keys=True) != json.dumps(params, sort_keys=True) \
                or r.suite_config.get("attack_batch_size") != suite.attack_batch_size:
            continue
        if attack.uses_masks:  # the same masks -- or none on either side (an img2img suite has none)
            want = None if mask_shas is None else [mask_shas[shas.index(h)] for h in r.image_sha256 if h in shas]
            if (r.masks.get("sha256") if r.masks else None) != want:
                continue
        by_file.setdefault(r.perturbation_file, {})[r.split.value] = list(r.image_sha256)
    for rel, covered in by_file.items():
        if all(covered.get(sp.value) == [shas[i] for i in idx] for sp, idx in splits.items()):
            path = (source / rel).resolve()
            if path.is_file() and path.is_relative_to(source.resolve()):
                return path
    return None


def _stored_or_new(runner: AttackRunner, attack: Attack, target: Target, images: torch.Tensor, splits: dict,
                   budget: Budget, suite: Suite, out: Path, base: dict, masks: Optional[torch.Tensor] = None,
                   mask_shas: Optional[list] = None, protections_from: Optional[Path] = None,
                   shas: Optional[Sequence[str]] = None,
                   source_records: Optional[list] = None) -> tuple[dict, list[str], str, str]:
    """Protect every split once per budget; reuse a stored protection when resuming, or one made by
    the same attack in `protections_from` (reusable_protection)."""
    what = (attack.name, sorted(base["attack_params"].items()), suite.name, budget.label,
            base["target"].fingerprint, target.device.type, image_sha256(images))
    if attack.uses_masks and mask_shas:  # a mask-reading attack's delta depends on the masks
        what += (tuple(mask_shas),)
    key = hashlib.sha256(repr(what).encode()).hexdigest()[:16]
    rel = f"perturbations/{attack.name}__{budget.norm}-{format_eps(budget.eps).replace('/', 'o')}__{key}.safetensors"
    path = out / rel
    if not path.is_file() and protections_from is not None and shas is not None:
        src = reusable_protection(protections_from, attack, base["attack_params"], budget,
                                  base["target"].fingerprint, suite, shas, splits, mask_shas, source_records)
        if src is not None:
            atomic_write_bytes(path, src.read_bytes())
            print(f"protection at {budget.label} reused from {protections_from}", file=sys.stderr, flush=True)
    if path.is_file():
        delta255, meta = perturbation_file.load_delta(path, shape=tuple(images.shape))
        if meta.get("format") == perturbation_file.FORMAT:
            stored = _protections_from_meta(meta, perturbation_file.apply_delta(images, delta255), splits)
            return stored, json.loads(meta["flags"]), rel, perturbation_file.delta_sha256(delta255)
    protections, flags = _protect_group(runner, attack, target, images, splits, budget, suite, masks)
    if attack.amortized:
        info = network_file.save_network(out, rel.replace("perturbations/", "networks/"), attack.name,
                                         base["attack_params"], protections[Split.train].network_state,
                                         suite.attack_batch_size)
        for p in protections.values():
            p.network = info
    adv_all = torch.empty_like(images)
    for sp, idx in splits.items():
        adv_all[idx] = protections[sp].adv
    meta = {f"{sp.value}.{k}": json.dumps(getattr(p, k)) for sp, p in protections.items() for k in _META_KEYS}
    meta["flags"] = json.dumps(flags)
    sha = perturbation_file.save_delta(path, perturbation_file.delta_from_adv(adv_all, images), meta)
    return protections, flags, rel, sha


def _protections_from_meta(meta: dict[str, str], adv: torch.Tensor, splits: dict) -> dict:
    out = {}
    for sp, idx in splits.items():
        # data only, never code; "network" is absent from files written before amortized attacks
        values = {k: json.loads(meta[f"{sp.value}.{k}"]) for k in _META_KEYS if f"{sp.value}.{k}" in meta}
        out[sp] = Protection(adv=adv[idx], **values)
    return out


def _jsonable(params: dict) -> dict:
    out = {}
    for k, v in params.items():
        if isinstance(v, torch.Tensor):
            out[k] = f"tensor(shape={tuple(v.shape)}, sha256={image_sha256(v)[:12]})"
        elif isinstance(v, (str, int, float, bool, type(None), list, tuple, dict)):
            out[k] = v
        else:
            out[k] = repr(v)
    return out
