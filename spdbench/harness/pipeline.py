"""`run`: the harness. It owns the data, the split, the budget, the seeds and the scorer.

A run is one checked request (request.py: every argument checked once, for the API, the CLI and
the grid alike) consumed by a pipeline of stages, each a function below:
plan (request.plan: parameters, budgets and where each came from) -> cells (ids, what is done:
_open_run) -> protect (the attack runs in its worker process and sees only what it may:
_protect_group, isolation.py, worker.py) -> enforce (_enforce_group: validate, project, clamp,
quantize) -> edit (_edit: editing.py, clean edits cached) -> score (_score: metrics.py) -> record
(_record: records.py).
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
from typing import Any, Iterable, Optional, Sequence, Union

import torch
from tqdm import auto as tqdm_auto  # looked up per run: a test (or a notebook) may swap the bar

from spdbench.attacks.base import Attack, AttackKind, attack_source
from spdbench.budget import Budget, effective_eps, format_eps
from spdbench.data.masks import mask_sha256
from spdbench.data.photos import split_indices
from spdbench.errors import AttackError, InputError, SpdbenchError
from spdbench.harness.editing import PROMPTS, Editor, clean_edit_cache_dir, image_seed, prepare_cache_dir
from spdbench.harness import work_match
from spdbench.harness.runner import AttackRunner
from spdbench.harness.isolation import warm_up
from spdbench.harness.progress import Stages, StepProgress
from spdbench.harness.protect import Protection, SplitOutput, batch_count, enforce
from spdbench.harness.request import (ISOLATION_MODES, RunInputs, RunRequest, build_request, interactive,
                                      load_inputs, model_identity, suite_masks)
from spdbench.images import image_sha256
from spdbench.scoring import metrics as metrics_mod
from spdbench.scoring.ground_truth import edit_success
from spdbench.scoring.regions import score_region
from spdbench.scoring.stats import records_frame
from spdbench.store import networks as network_file
from spdbench.store import perturbations as perturbation_file
from spdbench.store.provenance import environment
from spdbench.store.records import (Record, Split, Status, TargetInfo, Timing, Validation, atomic_write_bytes, cell_id,
                                    finished_cells, load_records, load_vouched, remove_stale_temp, write_jsonl,
                                    write_record)
from spdbench.store.runfolder import DiskError, prepare_out
from spdbench.store.strips import write_cell_examples
from spdbench.suites import Suite
from spdbench.targets import Target

log = logging.getLogger("spdbench")

#: re-exported: verify and the tests reach these through the pipeline
__all__ = ["run", "execute", "RunResult", "RunRequest", "build_request", "load_protection", "AttackRunner",
           "suite_masks", "interactive", "reusable_protection", "ISOLATION_MODES"]


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
        """Per-cell means as a pandas DataFrame: method, eps, prompt, split and every registered
        protection metric (lower = stronger for a similarity); `full=True` adds every column
        (imperceptibility, costs, ids)."""
        df = records_frame(self.records)
        if full or df.empty:
            return df
        return df[["method", "eps_label", "prompt", "split", *metrics_mod.list_metrics()]].rename(
            columns={"eps_label": "eps"})

def load_protection(path: Union[str, Path], images: torch.Tensor) -> torch.Tensor:
    """Protected images from a stored perturbation file (perturbation_file owns the format)."""
    delta255, _ = perturbation_file.load_delta(path)
    return perturbation_file.apply_delta(images, delta255)


# --- stage: protect (the attack runs where it may see only its inputs) -------------------------
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
    elif isolation == "process":  # a worker the OS did not confine (or confinement off): visible
        flags.append("not-sandboxed")
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
    """Stages protect -> enforce for one budget: run the attack on what it may see (an inpainting
    attack also its split's masks), then enforce the budget on what came back."""
    jobs = _attack_jobs(attack, images, splits, suite.attack_seed, masks)
    outputs, wall = runner.run(attack, budget, jobs, suite.attack_batch_size)
    _check_outputs(attack, outputs, target.dtype)
    protections = _enforce_group(attack, images, splits, budget, outputs, wall)
    return protections, _group_flags(attack, outputs, protections, runner.achieved()) + runner.flags


def expected_optimizations(attack: Attack, splits: dict, batch_size: int) -> int:
    """How many optimizations (optim.optimize calls) one cell group of `attack` runs: one per batch
    of each split for a per-image attack, one fit otherwise (StepProgress's denominator)."""
    if attack.kind is not AttackKind.per_image:
        return 1
    return sum(batch_count(len(idx), batch_size) for idx in splits.values())


def _attack_jobs(attack: Attack, images: torch.Tensor, splits: dict, seed: int,
                 masks: Optional[torch.Tensor]) -> dict[str, dict]:
    """What the attack may see: each split (per-image), or the train split alone ("fit": universal
    and amortized; an amortized network is then applied to every split, feed-forward)."""
    if attack.kind is AttackKind.per_image:
        jobs = {sp.value: {"images": images[idx], "seed": seed + 1000 * (sp == Split.test)}
                for sp, idx in splits.items()}
        seen = {sp.value: idx for sp, idx in splits.items()}
    else:
        jobs = {"fit": {"images": images[splits[Split.train]], "seed": seed}}
        seen = {"fit": splits[Split.train]}
        if attack.kind is AttackKind.amortized:
            jobs.update({sp.value: {"images": images[idx], "seed": seed} for sp, idx in splits.items()})
    if attack.uses_masks and masks is not None:
        for name, idx in seen.items():
            jobs[name]["masks"] = masks[idx]
    return jobs


# --- stage: enforce (the harness's side: validate, project, clamp, quantize) --------------------
def _enforce_group(attack: Attack, images: torch.Tensor, splits: dict, budget: Budget,
                   outputs: dict[str, SplitOutput], wall: float) -> dict[Split, Protection]:
    """Each split's protected photos from what the attack returned; a per-image attack's group wall
    time is shared among the splits by their photo counts."""
    n_all = sum(len(idx) for idx in splits.values())
    return {sp: _enforce_split(attack, images[idx], budget, outputs, sp, wall * len(idx) / n_all, wall)
            for sp, idx in splits.items()}


def _enforce_split(attack: Attack, x: torch.Tensor, budget: Budget, outputs: dict[str, SplitOutput], sp: Split,
                   share_s: float, wall: float) -> Protection:
    kind = attack.kind
    fit = outputs.get("fit")
    out = fit if kind is AttackKind.universal else outputs[sp.value]
    t0 = time.perf_counter()
    adv, returned, over, applied, zero = enforce(out.delta.to(x.device), x, budget, attack.name,
                                                 universal=kind is AttackKind.universal)
    wall_s, fit_s = _split_costs(kind, time.perf_counter() - t0, out, fit, share_s, wall)
    learned = fit if kind is AttackKind.amortized else out  # an amortized attack's curve and calls are its fit's
    protection = Protection(adv=adv, wall_s=wall_s, device_s=out.device_s, peak_memory_bytes=out.peak_memory_bytes,
                            max_norm_returned=returned, over_budget_images=over, max_norm_applied=applied,
                            loss_curve=learned.loss_curve, fit_wall_s=fit_s, oom_events=out.oom_events,
                            model_calls=learned.model_calls, zero_delta=zero,
                            peak_rss_bytes=max((v for v in (out.peak_rss_bytes, getattr(fit, "peak_rss_bytes", None))
                                                if v), default=None))
    if kind is AttackKind.amortized:
        protection.network_state = fit.network
    return protection


def _split_costs(kind: AttackKind, enforce_s: float, out: SplitOutput, fit: Optional[SplitOutput], share_s: float,
                 wall: float) -> tuple[float, Optional[float]]:
    """(this split's attack seconds, the one-off fit seconds): a fit is a one-off cost; applying the
    universal delta (the enforce step) or the amortized network's forward passes is the split's."""
    if kind is AttackKind.universal:
        return enforce_s, wall
    if kind is AttackKind.amortized:
        return out.wall_s, fit.wall_s
    return share_s, None


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


def _check_same_configuration(out: Path, records: Sequence[Record], request: RunRequest) -> None:
    """Refuse a run folder holding this attack on this suite with other parameters or another preset.

    Why: cell ids include the parameters, so a `--param steps=5` run would add its cells beside the
    default run's and every table over the folder would pool two configurations into one number.
    Nothing in the folder is touched; the user picks another --out."""
    attack, suite = request.plan.attack, request.suite.name
    params = json.loads(json.dumps(_jsonable(attack.params), default=str))  # as a record holds them
    for rec in records:
        if rec.attack != attack.name or rec.suite != suite:
            continue
        if rec.preset != attack.preset or rec.attack_params != params:
            new = {k: v for k, v in params.items() if k not in rec.attack_params or rec.attack_params[k] != v}
            old = {k: rec.attack_params.get(k) for k in new}
            raise InputError(
                f"--out {out}: holds {attack.name} on {suite} with preset {rec.preset} and {json.dumps(old, default=str)}"
                f" (cell {rec.cell_id}); this run has preset {attack.preset} and {json.dumps(new, default=str)}. A run "
                f"folder holds one configuration of an attack: pass another --out (nothing in {out} was changed)")


def run(attack: Union[str, Attack], suite: Union[str, Suite] = "smoke", eps: Union[None, str, float, Sequence] = None,
        out: Union[str, Path, None] = None, *, norm: Optional[str] = None, prompts: Optional[Sequence[str]] = None,
        attack_params: Optional[dict[str, Any]] = None, target: Union[str, Target, None] = None,
        images: Optional[torch.Tensor] = None, image_names: Optional[Sequence[str]] = None,
        data: Union[str, Path, None] = None, manifest: Union[str, Path, None] = None,
        device: Union[str, torch.device, None] = None, dtype: Union[str, torch.dtype, None] = None,
        resume: bool = True, cache_dir: Union[str, Path, None] = None, progress: Optional[bool] = None,
        purifiers: Optional[Sequence[str]] = None, compile_backend: Optional[str] = None,
        isolation: str = "sandbox", attack_timeout_s: Optional[float] = None,
        lock_scope: Optional[str] = None, masks: Union[str, Path, None] = None,
        protections_from: Union[str, Path, None] = None, match: str = "work",
        purifier_draws: Optional[int] = None) -> RunResult:
    """Run one attack over its budgets and the suite's prompts; write and return the records.

    The attack runs in its own worker process, confined by the OS (`isolation="sandbox"`, sandbox.py;
    the records say "process" with the reason where that is not possible; `isolation="process"`
    skips the confinement); `isolation="none"` runs it
    here for debugging and marks every record so. Finished cells in `out` are reused (resume); a
    failing cell group is recorded with its error and the run goes on with the others.
    `protections_from`: a run folder whose protections this attack made under the same attack
    settings (model, parameters, budget, seeds, photos) are reused instead of re-running the attack,
    e.g. to edit a white-box run's protected photos with a transfer suite's other model.
    `match="work"` (default): an attack whose steps nobody set gets the steps the suite's work budget
    buys (measured first on the training photos, work_match.py); `match="steps"`: the suite's iteration budget.
    `progress=None` shows a progress bar when stderr is a terminal (with the stage: fitting,
    protecting, purifying, editing, scoring, and an estimate once a stage has run); `progress=True`
    elsewhere prints one line per stage on stderr instead. `purifiers=["none"]` (or "none"): no purifier. Clean edits are cached in `cache_dir`, by default one folder per model under the user's cache
    folder ($SPDBENCH_CACHE_DIR, else $XDG_CACHE_HOME/spdbench or ~/.cache/spdbench), shared by
    every run folder. On an inpainting suite every photo is edited with its mask (the suite's set, or `masks`: a
    folder of NAME.png, white = repaint) and also scored on the repainted and the kept region.
    `purifier_draws` (default: the suite's, 1): each randomized purifier is drawn that many times per
    photo, draw k >= 1 recorded as "<purifier>~<k>" (the worst case takes the worst draw).
    """
    if isinstance(purifiers, (str, list, tuple)) and list([purifiers] if isinstance(purifiers, str) else purifiers) \
            == ["none"]:
        purifiers = []  # "none": no purifier, as `spdbench run --purifiers none` reads it
    return execute(build_request(attack, suite, eps, out, norm=norm, prompts=prompts, attack_params=attack_params,
                                 target=target, images=images, image_names=image_names, data=data,
                                 manifest=manifest, device=device, dtype=dtype, resume=resume, cache_dir=cache_dir,
                                 progress=progress, purifiers=purifiers, compile_backend=compile_backend,
                                 isolation=isolation, attack_timeout_s=attack_timeout_s, lock_scope=lock_scope,
                                 masks=masks, protections_from=protections_from, match=match,
                                 purifier_draws=purifier_draws))


def execute(request: RunRequest) -> RunResult:
    """Run one checked request: load its photos and models, create its folder (only now: a refused
    request leaves no folder behind), then run the stages under its lock (one writer per folder; a
    grid's parallel tasks on one attack folder each lock their own scope)."""
    Stages("run", enabled=request.progress).stage(
        "loading", f"photos and model {getattr(request.target, 'name', request.target)}")
    if request.isolation != "none":
        warm_up()  # the worker's imports, while this process loads its own
    inputs = load_inputs(request)
    prepare_out(request.out)
    with request.lock():
        return _run_locked(request, inputs)


def _run_locked(request: RunRequest, inputs: RunInputs) -> RunResult:
    """The pipeline: open the run (its cells, what is done), then per budget protect -> enforce ->
    edit -> score -> record (_run_budget), then the run's export."""
    with AttackRunner(request.isolation, inputs.target, request.suite.attack_timeout_s) as runner:
        request, match = _work_matched(request, inputs, runner)
        ctx = _open_run(request, inputs)
        ctx.runner, ctx.match = runner, match
        for budget, ids in zip(request.plan.budgets, ctx.cell_ids):
            _run_budget(ctx, budget, ids)
    ctx.bar.close()
    return _close_run(ctx)


def _work_matched(request: RunRequest, inputs: RunInputs,
                  runner: AttackRunner) -> tuple[RunRequest, Optional[work_match.WorkMatch]]:
    """The steps the suite's work budget buys this attack (work_match.py), said on a line of its own,
    and what the probe measured (None where the plan is not work-matched)."""
    if request.plan.work is None:
        return request, None
    Stages("run", enabled=request.progress).stage("matching", "work: the passes one attack step costs, measured on the training photos")
    request, match = work_match.matched(request, inputs, runner)
    log.info("%s", match.describe())
    if request.progress:
        print(match.describe(), file=sys.stderr)
    return request, match


@dataclass
class _Run:
    """What every cell group of one run shares (the harness's side only)."""

    request: RunRequest
    inputs: RunInputs
    result: RunResult
    editor: Editor
    cache_dir: Path
    splits: dict                       # Split -> photo indices
    shas: list                         # per photo
    seeds: list                        # per photo: the edit's generator seed
    mask_shas: Optional[list]
    done: dict                         # cell id -> finished Record (resume)
    common: dict                       # the fields every record of the run shares
    cell_ids: list                     # per budget: {(prompt key, Split): cell id}
    compile_s: Optional[float]
    bar: Any
    source_records: Optional[list]     # the protections_from folder's records, read once
    runner: Optional[AttackRunner] = None
    stages: Optional[Stages] = None    # the stage being run, in the bar or as a line (progress.py)
    match: Optional[work_match.WorkMatch] = None  # the work probe's measurements (work-matched runs)

    @property
    def attack(self) -> Attack:
        return self.request.plan.attack

    @property
    def out(self) -> Path:
        return self.request.out

    @property
    def images(self) -> torch.Tensor:
        return self.inputs.images

    @property
    def masks(self) -> Optional[torch.Tensor]:
        return self.inputs.masks


# --- stage: cells (what the run is made of, and what is already done) --------------------------
def _open_run(request: RunRequest, inputs: RunInputs) -> _Run:
    """Compile if asked, tidy the folders, derive the photos' ids and seeds, the cells and what is done."""
    images, target, suite = inputs.images, inputs.target, request.suite
    compile_s = _compile(target, images, request.compile_backend)
    cache_dir = prepare_cache_dir(request.cache_dir if request.cache_dir is not None
                                  else clean_edit_cache_dir(inputs.editing))  # before any attack runs
    _remove_stale(request.out, cache_dir)
    train_idx, test_idx = split_indices(len(images), suite.split_seed)
    splits = {Split.train: train_idx, Split.test: test_idx}
    shas = [image_sha256(images[i]) for i in range(len(images))]
    mask_shas = None if inputs.masks is None else [mask_sha256(m) for m in inputs.masks]
    existing = load_vouched(request.out)  # read once: the model check and resume (corrupt, rewritten ones skipped)
    _check_same_models(request.out, existing, target, inputs.edit_target)
    _check_same_configuration(request.out, existing, request)
    suite_cfg = _suite_config(request, inputs)
    ids = _cell_ids_of(request, inputs, suite_cfg, splits, shas, mask_shas)
    done = finished_cells(existing) if request.resume else {}
    ctx = _Run(request=request, inputs=inputs,
                result=RunResult(records=[], out=request.out, param_sources=dict(request.plan.sources)),
                editor=Editor(inputs.editing, suite.edit, cache_dir=cache_dir, batch_size=suite.attack_batch_size),
                cache_dir=cache_dir, splits=splits, shas=shas,
                seeds=[image_seed(suite.edit, images[i]) for i in range(len(images))], mask_shas=mask_shas,
                done=done, common=_record_fields(request, inputs, suite_cfg), cell_ids=ids, compile_s=compile_s,
                bar=_progress(request, ids, done), source_records=_source_records(request.protections_from))
    ctx.stages = Stages("run", enabled=request.progress, bar=ctx.bar)
    return ctx


def _compile(target: Target, images: torch.Tensor, backend: Optional[str]) -> Optional[float]:
    """torch.compile the target's modules and warm them up; the seconds are recorded apart."""
    if not backend:
        return None
    t0 = time.perf_counter()
    target.accelerate(compile_backend=backend)
    target.warmup(images)
    return time.perf_counter() - t0


def _remove_stale(out: Path, cache_dir: Path) -> None:
    """Temporary files a killed write left behind (old enough that no live writer owns them)."""
    stale = remove_stale_temp(out, min_age_s=60)  # a parallel task (Ray) may be writing right now
    if cache_dir.is_dir() and not cache_dir.resolve().is_relative_to(out.resolve()):
        stale += remove_stale_temp(cache_dir, min_age_s=600)  # a shared cache may have live writers
    if stale:
        log.warning("removed %d temporary file(s) left by a killed write: %s", len(stale),
                    ", ".join(str(p) for p in stale[:5]))


def _suite_config(request: RunRequest, inputs: RunInputs) -> dict:
    """The suite as recorded: its rules, and the purifiers this run scored after (what each name ran as);
    a mismatched-editor purifier's model with its fingerprint (only when one ran: a cell id part)."""
    suite_cfg = request.suite.to_dict()
    suite_cfg["purifiers"] = [p.name for p in request.purifiers]
    suite_cfg["purifier_settings"] = {p.name: p.to_dict() for p in request.purifiers}
    if inputs.purifier_models:
        suite_cfg["purifier_models"] = {name: model_identity(t) for name, t in sorted(inputs.purifier_models.items())}
    return suite_cfg


def _cell_ids_of(request: RunRequest, inputs: RunInputs, suite_cfg: dict, splits: dict, shas: list,
                 mask_shas: Optional[list]) -> list[dict]:
    """Per budget, {(prompt key, split): cell id}. A cell is defined by its photos (and on an inpainting
    suite their masks); the grid being run (eps list, prompts) is not part of its identity, so cells
    are shared across grids; the device type and dtype are (CPU and CUDA draw different noise)."""
    target, edit_target, attack = inputs.target, inputs.edit_target, request.attack
    data_sha = hashlib.sha256(("".join(shas) + "".join(mask_shas or [])).encode()).hexdigest()
    id_cfg = {k: v for k, v in suite_cfg.items() if k not in ("eps", "prompts", "description", "attack_timeout_s",
                                                           "purifier_settings", "attack_work")}
    id_cfg["device_type"], id_cfg["dtype"] = target.device.type, _dtype_name(target.dtype)
    if edit_target is None:
        id_cfg.pop("edit_target", None)  # white box: cell ids as before transfer suites existed
    else:
        id_cfg["edit_target_fingerprint"] = edit_target.fingerprint
    params = _jsonable(attack.params)
    return [{(pk, sp): cell_id(attack.name, params, id_cfg, b.norm, format_eps(b.eps), pk, sp.value,
                               target.fingerprint, data_sha)
             for pk in request.prompts for sp in splits} for b in request.plan.budgets]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _target_info(target: Optional[Target]) -> Optional[TargetInfo]:
    if target is None:
        return None
    return TargetInfo(name=target.name, source=target.source, fingerprint=target.fingerprint,
                      dtype=_dtype_name(target.dtype), device=str(target.device),
                      revision=getattr(target, "revision", None))


def _record_fields(request: RunRequest, inputs: RunInputs, suite_cfg: dict) -> dict:
    """The fields every record of this run shares (records keep `universal` and `amortized`, derived
    from the attack's kind)."""
    attack, suite = request.attack, request.suite
    return dict(attack=attack.name, attack_params=_jsonable(attack.params), preset=attack.preset,
                universal=attack.kind is AttackKind.universal, amortized=attack.kind is AttackKind.amortized,
                suite=suite.name, suite_config=suite_cfg, attack_seed=suite.attack_seed,
                split_seed=suite.split_seed, target=_target_info(inputs.target), edit=suite.edit.to_dict(),
                provenance=environment(inputs.target.device), edit_target=_target_info(inputs.edit_target),
                metric_conventions={m: metrics_mod.METRICS[m].convention for m in metrics_mod.list_metrics()},
                isolation=request.isolation, param_sources=dict(request.plan.sources),
                attack_source=attack_source(attack), task=suite.task)


def _progress(request: RunRequest, ids: list[dict], done: dict):
    """A progress bar over the cells (one per prompt and split), disabled unless asked for."""
    n_cells = sum(len(g) for g in ids)
    n_done = sum(i in done for g in ids for i in g.values())
    if request.progress and n_done:
        print(f"resuming: {n_done} of {n_cells} cells already done in {request.out}", file=sys.stderr, flush=True)
    # a bar on a terminal only; elsewhere one line per stage (progress.Stages), no redraws in a log
    return tqdm_auto.tqdm(total=n_cells, desc=f"{request.attack.name} on {request.suite.name}", unit="cell",
                          disable=not (request.progress and interactive()), leave=False)


def _reuse(ctx: _Run, ids: Iterable[str]) -> None:
    """Finished cells found in the folder: returned as they are, never recomputed or rewritten."""
    for i in ids:
        ctx.result.records.append(ctx.done[i])
        ctx.result.reused.append(i)


def _close_run(ctx: _Run) -> RunResult:
    """The run's counters, and records.jsonl over every record now in the folder."""
    result, editor = ctx.result, ctx.editor
    result.clean_cache_hits, result.clean_cache_misses = editor.cache_hits, editor.cache_misses
    result.clean_cache_dir = ctx.cache_dir
    result.clean_cache_hits_own = editor.cache_hits_own
    result.edits_run = editor.edits_run
    result.clean_cache_rejected = list(editor.cache_rejected)
    write_jsonl(load_records(ctx.out, strict=False), ctx.out / "records.jsonl")
    return result


# --- one budget: protect -> enforce -> edit -> score -> record ---------------------------------
@dataclass
class _Group:
    """One budget's protected photos, shared by every prompt and split of its cells."""

    base: dict                    # the record fields of this budget's cells
    protections: dict             # Split -> Protection
    flags: list
    pfile: str                    # the perturbation file, relative to the run folder
    psha: str
    adv: torch.Tensor             # every photo, protected
    imperceptibility: dict        # metric -> per photo, protected vs clean
    kept: dict                    # inpainting: the same on the kept region
    purified: dict                # purifier name -> the protected photos, purified


@dataclass
class _Edits:
    clean: torch.Tensor
    adv: torch.Tensor
    purified: dict
    wall_s: float


@dataclass
class _Scores:
    protection: dict              # metric -> per photo: edit of the protected vs of the clean photo
    purified: dict                # purifier name -> the same after that purifier
    protection_region: dict       # inpainting: on the repainted region
    purified_region: dict
    wall_s: float
    ground_truth: dict = field(default_factory=dict)  # Suite.ground_truth: scoring/ground_truth.py


def _run_budget(ctx: _Run, budget: Budget, ids: dict) -> None:
    ctx.bar.set_postfix_str(f"eps {format_eps(budget.eps)}")
    if all(i in ctx.done for i in ids.values()):
        _reuse(ctx, ids.values())
        ctx.bar.update(len(ids))
        return
    _run_group(ctx, budget, ids)


def _run_group(ctx: _Run, budget: Budget, ids: dict) -> None:
    """One cell group (one budget): protect, then edit, score and record every prompt and split. A
    failing protection is recorded as the error of every cell of the group; the run goes on."""
    base = dict(ctx.common, norm=budget.norm, eps=budget.eps, eps_label=format_eps(budget.eps))
    fits = ctx.attack.kind is not AttackKind.per_image
    name = "fitting" if fits else "protecting"
    ctx.stages.stage(name, f"{ctx.attack.name} at eps {format_eps(budget.eps)}: {len(ctx.images)} photos",
                     estimate_s=_first_group_estimate(ctx, name, fits))
    try:
        protections, flags, pfile, psha = _stored_or_new(ctx, budget, base)
    except DiskError:
        raise  # a full or read-only disk ends the run with one line; nothing to record
    except SpdbenchError as exc:
        _record_group_error(ctx, budget, ids, base, exc)
        return
    group = _group(ctx, base, protections, flags, pfile, psha)
    for pk in ctx.request.prompts:
        ctx.bar.update(len(ctx.splits))
        prompt_ids = {sp: ids[(pk, sp)] for sp in ctx.splits}
        if all(i in ctx.done for i in prompt_ids.values()):
            _reuse(ctx, prompt_ids.values())
            continue
        ctx.stages.stage("editing", f"prompt {pk} at eps {format_eps(budget.eps)}: clean, protected and "
                         f"{len(group.purified)} purified version(s) of {len(ctx.images)} photos",
                         items=2 + len(group.purified), unit="edit passes")
        edits = _edit(ctx, group, pk)
        ctx.stages.stage("scoring", f"prompt {pk} at eps {format_eps(budget.eps)}")
        _record(ctx, group, pk, prompt_ids, edits, _score(ctx, edits, pk))
    ctx.stages.done()


def _record_group_error(ctx: _Run, budget: Budget, ids: dict, base: dict, exc: SpdbenchError) -> None:
    for (pk, sp), cid in ids.items():
        rec = Record(cell_id=cid, status=Status.error, error=str(exc), prompt_key=pk, prompt=PROMPTS[pk],
                     split=sp, **base)
        write_record(rec, ctx.out)
        ctx.result.records.append(rec)
        ctx.result.computed.append(cid)
    log.error("cell group %s %s failed: %s", ctx.attack.name, budget, exc)
    ctx.bar.update(len(ids))


def _group(ctx: _Run, base: dict, protections: dict, flags: list, pfile: str, psha: str) -> _Group:
    """The protected photos put together, their imperceptibility, and every purifier's output (the
    editing model purifies)."""
    images, masks = ctx.images, ctx.masks
    adv = torch.empty_like(images)
    for sp, idx in ctx.splits.items():
        adv[idx] = protections[sp].adv
    imperceptibility = metrics_mod.score(adv, images)
    if ctx.request.purifiers:
        ctx.stages.stage("purifying", f"{len(images)} protected photos with "
                         + ", ".join(p.name for p in ctx.request.purifiers))
    kept = score_region({"": adv}, images, 1 - masks)[""] if masks is not None else {}
    return _Group(base=base, protections=protections, flags=flags, pfile=pfile, psha=psha, adv=adv,
                  imperceptibility=imperceptibility, kept=kept,
                  purified={p.name: p(adv, ctx.inputs.purifier_models.get(p.model, ctx.editor.target))
                            for p in ctx.request.purifiers})


# --- stage: edit -------------------------------------------------------------------------------
def _edit(ctx: _Run, group: _Group, pk: str) -> _Edits:
    """Clean, protected and purified photos edited with one prompt, the same seed per photo."""
    editor, prompt, seeds, masks = ctx.editor, PROMPTS[pk], ctx.seeds, ctx.masks
    t0 = time.perf_counter()
    misses = editor.cache_misses
    clean = editor.edit_clean(ctx.images, prompt, seeds, masks)
    if editor.cache_misses > misses:  # from the first pass on, an estimate of the rest (progress.Stages)
        ctx.stages.advance()
    else:
        ctx.stages.discount()  # every clean edit came from the cache: no pass, and no rate from it
    adv = editor.edit(group.adv, prompt, seeds, masks)
    ctx.stages.advance()
    purified = {}
    for name, img in group.purified.items():
        purified[name] = editor.edit(img, prompt, seeds, masks)
        ctx.stages.advance()
    return _Edits(clean=clean, adv=adv, purified=purified, wall_s=time.perf_counter() - t0)


# --- stage: score ------------------------------------------------------------------------------
def _score(ctx: _Run, edits: _Edits, pk: str) -> _Scores:
    """Every edit against the clean edit, in one call (the clean edits' features are computed once);
    on an inpainting suite also on the repainted region only (regions.py); on a suite with exact
    instruction results also against them (ground_truth.py)."""
    t0 = time.perf_counter()
    scored = metrics_mod.score_many({"": edits.adv, **edits.purified}, edits.clean)
    protection = scored.pop("")
    region = score_region({"": edits.adv, **edits.purified}, edits.clean, ctx.masks) if ctx.masks is not None else {}
    protection_region = region.pop("", {})
    truth = (edit_success(ctx.images, PROMPTS[pk], edits.clean, edits.adv) if ctx.request.suite.ground_truth
             else {})
    return _Scores(protection=protection, purified=scored, protection_region=protection_region,
                   purified_region=region, wall_s=time.perf_counter() - t0, ground_truth=truth)


# --- stage: record -----------------------------------------------------------------------------
def _record(ctx: _Run, group: _Group, pk: str, prompt_ids: dict, edits: _Edits, scores: _Scores) -> None:
    """One record per split; the test split's example strip first (a finished record implies its
    examples exist); a finished cell (its sibling split was cut short) is never rewritten."""
    for sp, idx in ctx.splits.items():
        cid = prompt_ids[sp]
        if cid in ctx.done:
            _reuse(ctx, [cid])
            continue
        rec = _cell_record(ctx, group, pk, sp, idx, cid, edits, scores)
        if sp == Split.test:
            write_cell_examples(ctx.out, cid, ctx.inputs.names, idx, ctx.images, group.adv, edits.clean, edits.adv,
                                edits.purified, {n: sc["ssim"] for n, sc in scores.purified.items()})
        write_record(rec, ctx.out)
        ctx.result.records.append(rec)
        ctx.result.computed.append(cid)


def _per_image(scores: dict, idx) -> dict:
    return {m: v[idx].tolist() for m, v in scores.items()}


def _mean(scores: dict, idx) -> dict:
    return {m: float(v[idx].mean()) for m, v in scores.items()}


def _cell_record(ctx: _Run, group: _Group, pk: str, sp: Split, idx, cid: str, edits: _Edits,
                 scores: _Scores) -> Record:
    p, n, n_all, base = group.protections[sp], len(idx), len(ctx.images), group.base
    return Record(
        cell_id=cid, prompt_key=pk, prompt=PROMPTS[pk], split=sp,
        image_names=[ctx.inputs.names[i] for i in idx], image_sha256=[ctx.shas[i] for i in idx],
        edit_seeds=[ctx.seeds[i] for i in idx],
        protection=_per_image(scores.protection, idx), protection_mean=_mean(scores.protection, idx),
        imperceptibility=_per_image(group.imperceptibility, idx),
        imperceptibility_mean=_mean(group.imperceptibility, idx),
        purified={name: _per_image(sc, idx) for name, sc in scores.purified.items()},
        purified_mean={name: _mean(sc, idx) for name, sc in scores.purified.items()},
        timing=Timing(compile_s=ctx.compile_s, attack_wall_s=p.wall_s, attack_device_s=p.device_s,
                      fit_wall_s=p.fit_wall_s, per_image_s=p.wall_s / n, edit_wall_s=edits.wall_s * n / n_all,
                      score_wall_s=scores.wall_s * n / n_all, peak_memory_bytes=p.peak_memory_bytes,
                      peak_rss_bytes=p.peak_rss_bytes,
                      worker_start_s=ctx.runner.start_s),
        validation=Validation(max_norm_returned=p.max_norm_returned, over_budget_images=p.over_budget_images,
                              projected=p.over_budget_images > 0, max_norm_applied=p.max_norm_applied,
                              effective_eps=effective_eps(Budget(base['norm'], base['eps']))),
        oom_events=p.oom_events + ctx.editor.oom_events, flags=list(group.flags), model_calls=p.model_calls,
        loss_curve=p.loss_curve, perturbation_file=group.pfile, perturbation_sha256=group.psha, network=p.network,
        ground_truth=_per_image(scores.ground_truth, idx), **_region_fields(ctx, idx, scores, group.kept), **base)


def _region_fields(ctx: _Run, idx, scores: _Scores, kept: dict) -> dict:
    """An inpainting record's masks and its region scores (per image; means derived from them)."""
    if ctx.masks is None:
        return {}
    return dict(masks=dict(set=ctx.inputs.mask_set, convention="1 = repaint (white), 0 = keep",
                           sha256=[ctx.mask_shas[i] for i in idx],
                           repaint_fraction=[round(float(ctx.masks[i].mean()), 6) for i in idx]),
                protection_region=_per_image(scores.protection_region, idx),
                protection_region_mean=_mean(scores.protection_region, idx),
                purified_region={n: _per_image(sc, idx) for n, sc in scores.purified_region.items()},
                imperceptibility_kept=_per_image(kept, idx), imperceptibility_kept_mean=_mean(kept, idx))


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
    if attack.kind is AttackKind.amortized:  # its records also name a network file: fit it here instead
        return None
    recs = _source_records(source) if records is None else records
    if recs is None:
        return None
    by_file: dict[str, dict[str, list]] = {}
    for r in recs:
        if _same_protection(r, attack, params, budget, target_fingerprint, suite, shas, mask_shas):
            by_file.setdefault(r.perturbation_file, {})[r.split.value] = list(r.image_sha256)
    for rel, covered in by_file.items():
        if all(covered.get(sp.value) == [shas[i] for i in idx] for sp, idx in splits.items()):
            path = (source / rel).resolve()
            if path.is_file() and path.is_relative_to(source.resolve()):
                return path
    return None


def _same_protection(r: Record, attack: Attack, params: dict, budget: Budget, target_fingerprint: str,
                     suite: Suite, shas: Sequence[str], mask_shas: Optional[Sequence[str]]) -> bool:
    """Whether finished record `r` names a protection made by this attack under these settings."""
    if r.status != Status.ok or not r.perturbation_file:
        return False
    if (r.attack, r.norm, r.target.fingerprint, r.attack_seed, r.split_seed) != (
            attack.name, budget.norm, target_fingerprint, suite.attack_seed, suite.split_seed) \
            or not math.isclose(r.eps, budget.eps, rel_tol=1e-9) \
            or json.dumps(r.attack_params, sort_keys=True) != json.dumps(params, sort_keys=True) \
            or r.suite_config.get("attack_batch_size") != suite.attack_batch_size:
        return False
    if not attack.uses_masks:
        return True
    # the same masks -- or none on either side (an img2img suite has none)
    want = None if mask_shas is None else [mask_shas[shas.index(h)] for h in r.image_sha256 if h in shas]
    return (r.masks.get("sha256") if r.masks else None) == want


def _first_group_estimate(ctx: _Run, stage: str, fits: bool) -> Optional[float]:
    """Before a run's first group: the work probe's timings (any attack, its steps reported or not);
    after it, None -- the stage's own last length (progress.Stages) is the better estimate."""
    if ctx.match is None or stage in ctx.stages.took:
        return None
    return ctx.match.seconds(int(ctx.attack.params.get("steps") or 0), len(ctx.images), per_image=not fits)


def _stored_or_new(ctx: _Run, budget: Budget, base: dict) -> tuple[dict, list[str], str, str]:
    """Protect every split once per budget; reuse a stored protection when resuming, or one made by
    the same attack in `protections_from` (reusable_protection)."""
    rel = _perturbation_file(ctx, budget, base)
    path = ctx.out / rel
    if not path.is_file() and ctx.request.protections_from is not None:
        _copy_reusable(ctx, budget, base, path)
    stored = _load_stored(ctx, path, rel)
    if stored is not None:
        if "not-sandboxed" in stored[1] and base["isolation"] == "sandbox":  # made by an unconfined worker
            base.update(isolation="process", isolation_detail={"reason": "resumed from a protection an "
                                                                         "unconfined worker made"})
        return stored
    attack, suite = ctx.attack, ctx.request.suite
    if ctx.stages is not None:  # "about N s left" inside the group, from the attack's steps
        ctx.runner.on_progress = StepProgress(ctx.stages, expected_optimizations(attack, ctx.splits,
                                                                                 suite.attack_batch_size))
    try:
        protections, flags = _protect_group(ctx.runner, attack, ctx.inputs.target, ctx.images, ctx.splits, budget,
                                            suite, ctx.masks)
    finally:  # error records too say what the worker's confinement was, as checked
        base.update(ctx.runner.isolation_fields())
        ctx.runner.on_progress = None
    if attack.kind is AttackKind.amortized:
        info = network_file.save_network(ctx.out, rel.replace("perturbations/", "networks/"), attack.name,
                                         base["attack_params"], protections[Split.train].network_state,
                                         suite.attack_batch_size)
        for p in protections.values():
            p.network = info
    return protections, flags, rel, _save_protections(ctx, path, protections, flags)


def _perturbation_file(ctx: _Run, budget: Budget, base: dict) -> str:
    """Where this budget's perturbation is stored, named by everything it depends on."""
    attack = ctx.attack
    what = (attack.name, sorted(base["attack_params"].items()), ctx.request.suite.name, budget.label,
            base["target"].fingerprint, ctx.inputs.target.device.type, image_sha256(ctx.images))
    if attack.uses_masks and ctx.mask_shas:  # a mask-reading attack's delta depends on the masks
        what += (tuple(ctx.mask_shas),)
    key = hashlib.sha256(repr(what).encode()).hexdigest()[:16]
    return f"perturbations/{attack.name}__{budget.norm}-{format_eps(budget.eps).replace('/', 'o')}__{key}.safetensors"


def _copy_reusable(ctx: _Run, budget: Budget, base: dict, path: Path) -> None:
    source = ctx.request.protections_from
    src = reusable_protection(source, ctx.attack, base["attack_params"], budget, base["target"].fingerprint,
                              ctx.request.suite, ctx.shas, ctx.splits, ctx.mask_shas, ctx.source_records)
    if src is not None:
        atomic_write_bytes(path, src.read_bytes())
        print(f"protection at {budget.label} reused from {source}", file=sys.stderr, flush=True)


def _load_stored(ctx: _Run, path: Path, rel: str) -> Optional[tuple[dict, list[str], str, str]]:
    """A stored protection of this budget (resume, or reused), or None."""
    if not path.is_file():
        return None
    delta255, meta = perturbation_file.load_delta(path, shape=tuple(ctx.images.shape))
    if meta.get("format") != perturbation_file.FORMAT:
        return None
    stored = _protections_from_meta(meta, perturbation_file.apply_delta(ctx.images, delta255), ctx.splits)
    return stored, json.loads(meta["flags"]), rel, perturbation_file.delta_sha256(delta255)


def _save_protections(ctx: _Run, path: Path, protections: dict, flags: list[str]) -> str:
    """The group's perturbation (every photo) with what the records need to resume from it; its sha256."""
    adv_all = torch.empty_like(ctx.images)
    for sp, idx in ctx.splits.items():
        adv_all[idx] = protections[sp].adv
    meta = {f"{sp.value}.{k}": json.dumps(getattr(p, k)) for sp, p in protections.items() for k in _META_KEYS}
    meta["flags"] = json.dumps(flags)
    return perturbation_file.save_delta(path, perturbation_file.delta_from_adv(adv_all, ctx.images), meta)


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
