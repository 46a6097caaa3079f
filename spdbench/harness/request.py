"""The run request: every input of a run, checked once, before anything is loaded or created.

Why one request: the CLI, the Python API (`spdbench.run`) and the grid each used to resolve the
run's inputs themselves (the suite three times in `cli.cmd_run` and again in the harness; the run
folder and its lock in both), so a check added in one place was missing in another and bad input
could be silently replaced by a default. `build_request` is the one function that checks the
arguments -- one line per bad input, naming the argument, its value and what is expected -- and
the stages (pipeline.py) read only the request. Nothing is created by it: `load_inputs` then loads
what the request names (photos, models, masks) and the pipeline creates the run folder last, so a
refused request leaves nothing behind.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch

from spdbench.attacks.base import Attack, AttackSpec
from spdbench.data.masks import load_masks, mask_set
from spdbench.data.photos import check_size_multiple
from spdbench.errors import InputError, UnknownNameError, did_you_mean
from spdbench.harness.editing import PROMPTS
from spdbench.harness.plan import AttackPlan, EpsArg, plan
from spdbench.images import check_images
from spdbench.purifiers import get_purifier
from spdbench.purifiers.base import Purifier, drawn
from spdbench.store.runfolder import RunLock, check_out
from spdbench.suites import Suite, get_suite
from spdbench.targets import Target, load_target, parse_device, parse_dtype

#: where the attack runs: its own worker process confined by the OS (sandbox.py; where the kernel lacks
#: it, the records say "process" with the reason), that process unconfined, or this process
#: (debugging; recorded, refused by verify)
ISOLATION_MODES = ("sandbox", "process", "none")
#: how an attack whose steps nobody set is matched to the others: by the suite's work budget, or its iterations
MATCH_MODES = ("work", "steps")
PathArg = Union[str, Path, None]


@dataclass(frozen=True)
class RunRequest:
    """Everything one run reads, checked: the stages consume this and never the raw arguments."""

    plan: AttackPlan                  # the configured attack (plain data), its budgets, each setting's source
    suite: Suite                      # the rule book (with the attack timeout applied)
    prompts: tuple[str, ...]          # prompt keys, each once
    purifiers: tuple[Purifier, ...]   # each once
    target: Union[str, Target]        # the attack's model: a name, folder or hub id, or a loaded Target
    device: Optional[torch.device]    # None: the target's default (CPU)
    dtype: Optional[torch.dtype]
    out: Path                         # the run folder (checked; created by the pipeline after loading)
    lock_scope: Optional[str] = None  # a grid task locks its own cell group in a shared folder
    images: Optional[torch.Tensor] = None        # given photos (else the suite's, or `data`/`manifest`)
    image_names: Optional[tuple[str, ...]] = None
    data: Optional[Path] = None
    manifest: Optional[Path] = None
    masks: Optional[Path] = None      # inpainting: the user's mask folder instead of the suite's set
    cache_dir: Optional[Path] = None  # clean-edit cache (None: one shared per model)
    protections_from: Optional[Path] = None
    resume: bool = True
    progress: bool = False
    compile_backend: Optional[str] = None
    isolation: str = "sandbox"

    @property
    def attack(self) -> AttackSpec:
        return self.plan.attack

    def lock(self) -> RunLock:
        """One writer per folder: a second run on it stops with one line."""
        return RunLock(self.out, scope=self.lock_scope)


def build_request(attack: Union[str, Attack, AttackSpec], suite: Union[str, Suite] = "smoke", eps: EpsArg = None,
                  out: PathArg = None, *, norm: Optional[str] = None, prompts: Optional[Sequence[str]] = None,
                  attack_params: Optional[dict[str, Any]] = None, target: Union[str, Target, None] = None,
                  images: Optional[torch.Tensor] = None, image_names: Optional[Sequence[str]] = None,
                  data: PathArg = None, manifest: PathArg = None,
                  device: Union[str, torch.device, None] = None, dtype: Union[str, torch.dtype, None] = None,
                  resume: bool = True, cache_dir: PathArg = None, progress: Optional[bool] = None,
                  purifiers: Optional[Sequence[str]] = None, compile_backend: Optional[str] = None,
                  isolation: str = "sandbox", attack_timeout_s: Optional[float] = None,
                  lock_scope: Optional[str] = None, masks: PathArg = None,
                  protections_from: PathArg = None, purifier_draws: Optional[int] = None,
                  match: str = "work") -> RunRequest:
    """Check every argument of `spdbench.run` (same names and meanings) and return the request.

    Cheap and side-effect free: nothing is loaded or created, so the CLI and the grid can check a
    whole command before the first model loads. A built-in attack is constructed here to check its
    parameters; a plugin is constructed and described by a worker process (plan.resolve_attack),
    never imported here."""
    isolation = _choice("isolation", isolation, ISOLATION_MODES)
    match = _choice("match", match, MATCH_MODES)
    the_suite = _suite(suite, attack_timeout_s)
    if purifier_draws is not None:  # recorded: the suite's draws as this run ran them
        the_suite = replace(the_suite, purifier_draws=_draws(purifier_draws))
    given_images, names = _given_images(images, image_names, data, manifest)
    return RunRequest(
        plan=plan(attack, the_suite, params=attack_params, eps=eps, norm=norm, isolation=isolation, match=match),
        suite=the_suite,
        prompts=_prompts(prompts, the_suite),
        purifiers=_purifiers(purifiers, the_suite),
        target=_target_spec(target, the_suite),
        device=parse_device(device),
        dtype=parse_dtype(dtype),
        out=_out(out, the_suite),
        lock_scope=_optional_text("lock_scope", lock_scope),
        images=given_images, image_names=names,
        data=_optional_path("data", data), manifest=_optional_path("manifest", manifest),
        masks=_optional_path("masks", masks), cache_dir=_optional_path("cache_dir", cache_dir),
        protections_from=_run_folder("protections_from", protections_from),
        resume=_flag("resume", resume),
        progress=interactive() if progress is None else _flag("progress", progress),
        compile_backend=_compile_backend(compile_backend),
        isolation=isolation,
    )


def interactive() -> bool:
    """True when stderr is a terminal (where a progress bar is read, not logged)."""
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stream
        return False


# --- one check per argument ---------------------------------------------------------------------
def _choice(name: str, value: Any, allowed: Sequence[str]) -> str:
    if value not in allowed:
        raise InputError(f"{name} must be one of {list(allowed)}, got {value!r}")
    return value


def _flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise InputError(f"{name} must be True or False, got {type(value).__name__} {value!r:.60}")
    return value


def _suite(suite: Union[str, Suite], attack_timeout_s: Optional[float]) -> Suite:
    """The suite, with a caller's attack timeout in place of the suite's."""
    the_suite = get_suite(suite)
    if attack_timeout_s is None:
        return the_suite
    if isinstance(attack_timeout_s, bool) or not (isinstance(attack_timeout_s, (int, float)) and attack_timeout_s > 0):
        raise InputError(f"attack_timeout_s must be a number of seconds > 0, got {attack_timeout_s!r}")
    return replace(the_suite, attack_timeout_s=float(attack_timeout_s))


def _names(name: str, values: Any, example: str) -> tuple[str, ...]:
    """A non-empty list of distinct, non-empty names (an empty list would silently mean "the default")."""
    if isinstance(values, str) or not isinstance(values, (list, tuple)):
        raise InputError(f"{name} must be a list of names such as [{example!r}], got {type(values).__name__} "
                         f"{values!r:.60}")
    if not values or not all(isinstance(v, str) and v.strip() for v in values):
        raise InputError(f"{name} {list(values)!r} holds no name or an empty one; expected names such as "
                         f"[{example!r}] (leave it out for the suite's)")
    twice = sorted({v for v in values if list(values).count(v) > 1})
    if twice:
        raise InputError(f"{name} {list(values)!r} lists {', '.join(map(repr, twice))} more than once; "
                         "expected each name once (a repeated one would be measured and recorded twice)")
    return tuple(values)


def _prompts(prompts: Optional[Sequence[str]], suite: Suite) -> tuple[str, ...]:
    keys = _names("prompts", list(suite.prompts) if prompts is None else prompts, "P3")
    for k in keys:
        if k not in PROMPTS:
            raise UnknownNameError(f"unknown prompt {k!r}.{did_you_mean(k, PROMPTS)} Available: {', '.join(PROMPTS)}")
    return keys


def _purifiers(purifiers: Optional[Sequence[str]], suite: Suite) -> tuple[Purifier, ...]:
    """The purifiers to score after: the suite's, or the caller's ([] = none)."""
    names = list(suite.purifiers) if purifiers is None else purifiers
    if isinstance(names, (list, tuple)) and len(names) == 0:
        return ()
    return drawn([get_purifier(n) for n in _names("purifiers", names, "jpeg75")], _draws(suite.purifier_draws))


def _draws(draws: Any) -> int:
    if not isinstance(draws, int) or isinstance(draws, bool) or draws < 1:
        raise InputError(f"purifier_draws must be an integer >= 1 (draws per image of a randomized purifier), "
                         f"got {draws!r}")
    return draws


def _target_spec(target: Union[str, Target, None], suite: Suite) -> Union[str, Target]:
    if target is None:
        return suite.target
    if isinstance(target, Target) or (isinstance(target, (str, Path)) and str(target).strip()):
        return target if isinstance(target, Target) else str(target)
    raise InputError(f"target must be a model name, folder or hub id, or a loaded spdbench.Target, got "
                     f"{type(target).__name__} {target!r:.60}")


def _out(out: PathArg, suite: Suite) -> Path:
    """The run folder, checked but not created (default spdbench-runs/SUITE)."""
    if out is None:
        return check_out(Path("spdbench-runs") / suite.name)
    if isinstance(out, (str, Path)) and not str(out).strip():
        raise InputError(f"out {str(out)!r} is empty; expected a run folder path (or None for spdbench-runs/{suite.name})")
    return check_out(out)


def _optional_text(name: str, value: Optional[str]) -> Optional[str]:
    if value is not None and not (isinstance(value, str) and value.strip()):
        raise InputError(f"{name} must be a non-empty string or None, got {value!r:.60}")
    return value


def _optional_path(name: str, value: PathArg) -> Optional[Path]:
    """None, or a non-empty path (an empty one would silently mean "not given")."""
    if value is None:
        return None
    if not isinstance(value, (str, Path)) or not str(value).strip():
        raise InputError(f"{name} {value!r:.60} is not a path; expected a folder or file path, or None")
    return Path(value).expanduser()


def _run_folder(name: str, value: PathArg) -> Optional[Path]:
    folder = _optional_path(name, value)
    if folder is not None and not (folder / "records").is_dir():
        raise InputError(f"{name} {str(folder)!r}: not a run folder (expected a folder with records/ and "
                         "perturbations/, made by an earlier run)")
    return folder


def _given_images(images: Optional[torch.Tensor], names: Optional[Sequence[str]], data: PathArg,
                  manifest: PathArg) -> tuple[Optional[torch.Tensor], Optional[tuple[str, ...]]]:
    """Photos the caller passed as a tensor, with their names (default image-0, image-1, ...)."""
    if images is None:
        if names is not None:
            raise InputError("image_names were given without images; pass both, or neither")
        return None, None
    if data is not None or manifest is not None:
        raise InputError("images were given together with data/manifest; pass the photos one way only")
    check_images(images, "images")
    names = tuple(names) if names is not None else tuple(f"image-{i}" for i in range(len(images)))
    if len(names) != len(images):
        raise InputError(f"got {len(images)} images but {len(names)} image names")
    return images, names


def _compile_backend(backend: Optional[str]) -> Optional[str]:
    """A torch.compile backend this torch has, checked now (a typo used to end the run in a traceback
    after the models had loaded)."""
    if backend is None:
        return None
    import torch._dynamo  # deferred: a second to import, and only a compiling run needs it

    if not isinstance(backend, str) or backend not in torch._dynamo.list_backends(exclude_tags=()):
        raise InputError(f"compile backend {backend!r} is not a torch.compile backend of this torch; expected one "
                         f"of {', '.join(torch._dynamo.list_backends())} (or a debug one such as eager)")
    return backend


# --- what the request names, loaded ------------------------------------------------------------
@dataclass(frozen=True)
class RunInputs:
    """The request's photos, models and masks, loaded and checked against each other."""

    images: torch.Tensor              # the harness's own copy, float32 on the target's device
    names: tuple[str, ...]
    target: Target                    # what the attack protects against
    edit_target: Optional[Target]     # transfer: the model that edits (None: `target` edits)
    masks: Optional[torch.Tensor]     # inpainting: (N, 1, H, W) on the target's device, 1 = repaint
    mask_set: Optional[str]
    #: mismatched-editor purifiers: each `Purifier.model` loaded (same device and dtype)
    purifier_models: dict = field(default_factory=dict)

    @property
    def editing(self) -> Target:
        """The model that edits and purifies."""
        return self.edit_target or self.target


def load_inputs(request: RunRequest) -> RunInputs:
    """Load the photos and the models, then the masks (they depend on both)."""
    images, names = _photos(request)
    target = request.target if isinstance(request.target, Target) else load_target(
        request.target, device=request.device, dtype=request.dtype)
    # transfer: the editor's own model (same device and dtype)
    edit_target = load_target(request.suite.edit_target, device=target.device, dtype=target.dtype) \
        if request.suite.edit_target else None
    check_size_multiple(images, target.latent_factor, "images")
    masks, mask_set = suite_masks(request.suite, request.masks, names, images, edit_target or target)
    images = _harness_copy(images, target.device)
    if masks is not None:
        masks = masks.to(target.device, torch.float32)
    models = {p.model: load_target(p.model, device=target.device, dtype=target.dtype)
              for p in request.purifiers if p.model is not None}
    return RunInputs(images=images, names=tuple(names), target=target, edit_target=edit_target, masks=masks,
                     mask_set=mask_set, purifier_models=models)


def _photos(request: RunRequest) -> tuple[torch.Tensor, Sequence[str]]:
    if request.images is not None:
        return request.images, request.image_names
    images, names = request.suite.load_images(request.data, request.manifest)
    check_images(images, "images")
    return images, names


def _harness_copy(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The harness's own copy (nobody else holds a reference to it), float32 on the model's device."""
    images = images.detach().clone()
    if device.type == "cuda" and images.device.type == "cpu":
        images = images.float().pin_memory()  # one asynchronous copy; the set then stays on the GPU
    return images.to(device, torch.float32, non_blocking=True)


def model_identity(target: Target) -> dict:
    """What a record or challenge says of a model a purifier ran with: name, source, fingerprint."""
    return dict(name=target.name, source=str(target.source), fingerprint=target.fingerprint)


def suite_masks(suite: Suite, masks: PathArg, names: Sequence[str], images: torch.Tensor,
                editing: Target) -> tuple[Optional[torch.Tensor], Optional[str]]:
    """The (N, 1, H, W) mask of every photo (1 = repaint) and the set's name, or (None, None) for
    img2img. An inpainting model needs masks and an img2img model takes none: one line otherwise."""
    inpainting = bool(getattr(editing, "inpainting", False))
    if masks is not None:
        return _folder_masks(masks, inpainting, editing, names, images)
    if suite.masks is None:
        if inpainting:
            raise InputError(f"suite {suite.name!r} edits with {editing.name!r}, an inpainting model, but names no "
                             "mask set: use an inpainting suite (smoke-inpaint) or pass --masks DIR")
        return None, None
    return _set_masks(suite, inpainting, editing, names, images)


def _folder_masks(masks: PathArg, inpainting: bool, editing: Target, names: Sequence[str],
                  images: torch.Tensor) -> tuple[torch.Tensor, str]:
    if not inpainting:
        raise InputError(f"--masks {str(masks)!r}: the editing model {editing.name!r} is an img2img model; "
                         "masks apply to inpainting suites (e.g. smoke-inpaint)")
    return load_masks(masks, names, images.shape[-1]), "folder"


def _set_masks(suite: Suite, inpainting: bool, editing: Target, names: Sequence[str],
               images: torch.Tensor) -> tuple[torch.Tensor, str]:
    if not inpainting:
        raise InputError(f"suite {suite.name!r} has masks ({suite.masks!r}) but its editing model {editing.name!r} "
                         "is an img2img model, not inpainting")
    if images.shape[-1] != images.shape[-2]:
        raise InputError(f"mask set {suite.masks!r} needs square photos, got {images.shape[-2]}x{images.shape[-1]}")
    try:
        return mask_set(suite.masks, names, images.shape[-1]), suite.masks
    except ValueError as exc:
        raise InputError(f"suite {suite.name!r}: {exc}") from None
