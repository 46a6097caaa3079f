"""Attack base classes and the attack registry.

Modelled on torchattacks (one small class per attack over a shared base) and pyiqa (a registry
that answers a typo with "did you mean"). The base owns parameter handling, presets and the input
contract; a subclass writes only its math. The harness, not the attack, owns the budget: an attack
receives it and must return a delta inside it (the harness re-checks anyway).
"""
from __future__ import annotations

import functools
import importlib.metadata
import warnings
from contextlib import contextmanager
from typing import Any, Callable, ClassVar, Iterator, Mapping, Optional, TypeVar, Union

import torch

from spdbench.budget import Budget
from spdbench.errors import InputError, RegistryError, UnknownNameError, did_you_mean
from spdbench.images import check_images
from spdbench.registry import load_group

ENTRY_POINT_GROUP = "spdbench.attacks"


class Attack:
    """A per-image immunization attack: `perturb(images, target, budget, generator) -> delta`.

    Subclasses declare `defaults` (every accepted parameter with its default) and optional
    `presets` (named parameter sets reproducing a paper's settings, with `preset_budgets` for the
    budget the paper used). Parameters are recorded in `params` for the result records.
    """

    name: ClassVar[str] = ""
    universal: ClassVar[bool] = False
    #: True for a feed-forward immunizer (AmortizedAttack): fit once on the train split, then apply
    amortized: ClassVar[bool] = False
    #: True when `fit(train_images, ...)` must run before the attack protects anything (universal
    #: and amortized attacks): the one flag callers branch on
    fits: ClassVar[bool] = False
    defaults: ClassVar[dict[str, Any]] = {}
    presets: ClassVar[dict[str, dict[str, Any]]] = {}
    preset_budgets: ClassVar[dict[str, Budget]] = {}
    #: True when `objective` measures what the attack optimizes (used by the "beats noise" tests)
    has_objective: ClassVar[bool] = False
    #: True for an inpainting attack that reads the editor's masks (DiffusionGuard): the harness then
    #: hands `perturb` (and `fit`) a `masks=` (N, 1, H, W) tensor, 1 = repaint, on an inpainting suite
    #: (None elsewhere); other attacks never see a mask
    uses_masks: ClassVar[bool] = False
    #: True for an attack that only makes sense against an inpainting model (DiffusionGuard): its
    #: checks run on an inpainting target with masks; an attack that merely *can* read masks
    #: (photoguard-diffusion's original inpainting setting) gets `masks=None` on an img2img target
    needs_inpainting: ClassVar[bool] = False

    def __init__(self, preset: Optional[str] = None, **params: Any) -> None:
        if preset is not None and preset not in self.presets:
            raise InputError(
                f"attack {self.name!r} has no preset {preset!r}; presets: {sorted(self.presets) or 'none'}"
            )
        unknown = sorted(set(params) - set(self.defaults))
        if unknown:
            raise InputError(
                f"attack {self.name!r} got unknown parameter(s) {unknown};"
                f" accepted: {sorted(self.defaults) or 'none'}"
            )
        merged = dict(self.defaults)
        if preset is not None:
            merged.update(self.presets[preset])
        merged.update(params)
        # on the instance, so it travels with the attack to its worker process (where the
        # registration that set the class attribute never happened)
        self.name = self.name or type(self).__name__
        self.preset = preset
        self.params: dict[str, Any] = merged
        #: the parameters the caller gave by name: the harness never overrides these
        self.explicit_params: frozenset[str] = frozenset(params)
        for key, value in merged.items():
            setattr(self, key, value)
        #: loss per iteration of the last call (host floats, copied once at the end)
        self.loss_history: list[float] = []

    def configure(self, **params: Any) -> "Attack":
        """A copy of this attack with `params` set (the harness applies the suite's step budget
        here, for instances and names alike); unknown names are an error, as in `__init__`."""
        import copy

        unknown = sorted(set(params) - set(self.defaults))
        if unknown:
            raise InputError(f"attack {self.name!r} got unknown parameter(s) {unknown};"
                             f" accepted: {sorted(self.defaults) or 'none'}")
        new = copy.copy(self)
        new.params = {**self.params, **params}
        for key, value in params.items():
            setattr(new, key, value)
        return new

    def param_source(self, key: str) -> str:
        """Where parameter `key` came from: "explicit", "preset:NAME" or "default"."""
        if key in self.explicit_params:
            return "explicit"
        if self.preset is not None and key in self.presets.get(self.preset, {}):
            return f"preset:{self.preset}"
        return "default"

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params.items())
        return f"{type(self).__name__}({args})"

    # --- what subclasses implement -------------------------------------------------------
    def perturb(self, images: torch.Tensor, target, budget: Budget,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Return delta, same shape as `images`, with ||delta|| <= budget.eps per image."""
        raise NotImplementedError

    def objective(self, adv: torch.Tensor, target, clean: torch.Tensor) -> torch.Tensor:
        """Per-image value of what the attack minimizes, shape (N,); lower = stronger."""
        raise NotImplementedError(f"attack {self.name!r} has no objective")

    def set_masks(self, masks: Optional[torch.Tensor]) -> "Attack":
        """The masks `objective()` scores with, for an attack that reads masks (`uses_masks`): the
        "beats noise" checks call `objective` without them. A no-op for any other attack."""
        if self.uses_masks:
            self._masks = None if masks is None else (masks >= 0.5).float()
        return self

    # --- shared --------------------------------------------------------------------------
    def __call__(self, images: torch.Tensor, target, budget: Budget,
                 generator: Optional[torch.Generator] = None, masks: Optional[torch.Tensor] = None) -> torch.Tensor:
        check_images(images, "images")
        if self.uses_masks:
            return self.perturb(images, target, budget, generator, masks=masks)
        return self.perturb(images, target, budget, generator)


class UniversalAttack(Attack):
    """One perturbation for every image: `fit(train_images, ...) -> delta` of shape (1, 3, H, W).

    The harness gives `fit` the training split only; `perturb` then applies the fitted delta.
    """

    universal: ClassVar[bool] = True
    fits: ClassVar[bool] = True

    def __init__(self, preset: Optional[str] = None, **params: Any) -> None:
        super().__init__(preset, **params)
        self.delta: Optional[torch.Tensor] = None

    def fit(self, train_images: torch.Tensor, target, budget: Budget,
            generator: Optional[torch.Generator] = None) -> torch.Tensor:
        raise NotImplementedError

    def perturb(self, images: torch.Tensor, target, budget: Budget,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
        if self.delta is None:
            raise InputError(f"universal attack {self.name!r} must be fit() before perturb()")
        return self.delta.to(images.device, images.dtype).expand_as(images).clone()


class AmortizedAttack(Attack):
    """A feed-forward immunizer: `fit(train_images, ...)` trains a network once, on the training
    split only (the same isolation and authority as a universal attack); `apply(images, budget)`
    then protects any batch in one forward pass, without the target.

    Subclasses implement `build_network()` (the untrained network, from `self.params` alone: the
    params are the config, so `verify` rebuilds it from the record), `fit` (returns the trained
    network) and, if the default does not fit, `apply`. The harness checks the network's size
    (`max_network_params`), counts the model passes `apply` makes (it must make none), projects and
    quantizes what comes back, and stores the weights as safetensors beside the perturbations.
    """

    amortized: ClassVar[bool] = True
    fits: ClassVar[bool] = True
    #: the largest network the harness accepts back from `fit` ("a few million parameters")
    max_network_params: ClassVar[int] = 8_000_000

    def __init__(self, preset: Optional[str] = None, **params: Any) -> None:
        super().__init__(preset, **params)
        self.network: Optional[torch.nn.Module] = None

    def build_network(self) -> torch.nn.Module:
        """The untrained network for `self.params` (deterministic shape; weights are loaded into it)."""
        raise NotImplementedError

    def fit(self, train_images: torch.Tensor, target, budget: Budget,
            generator: Optional[torch.Generator] = None) -> torch.nn.Module:
        raise NotImplementedError

    def apply(self, images: torch.Tensor, budget: Budget) -> torch.Tensor:
        """delta for `images`, feed-forward: the network's output, projected onto the budget."""
        if self.network is None:
            raise InputError(f"amortized attack {self.name!r} must be fit() before apply()")
        return budget.project(self.network(images).to(images.dtype))

    def perturb(self, images: torch.Tensor, target, budget: Budget,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
        with torch.no_grad():
            return self.apply(images, budget)


# --- registry ----------------------------------------------------------------------------
_REGISTRY: dict[str, type[Attack]] = {}
_entry_points_loaded = False
A = TypeVar("A", bound=type)


def register(name: str) -> Callable[[A], A]:
    """Class decorator: `@register("my-attack")` makes the class available by name."""

    def decorator(cls: A) -> A:
        if not (isinstance(cls, type) and issubclass(cls, Attack)):
            raise RegistryError(f"@register({name!r}) needs a subclass of spdbench.Attack, got {cls!r}")
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise RegistryError(
                f"attack name {name!r} is already registered by {_REGISTRY[name].__module__}."
                f"{_REGISTRY[name].__qualname__}; pick another name"
            )
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorator


def unregister(name: str) -> type[Attack]:
    """Remove `name` from the registry and return its class (tests, notebooks). A built-in removed
    this way does not come back in this process; an unknown name is an UnknownNameError."""
    if name not in _REGISTRY:
        raise UnknownNameError(f"cannot unregister attack {name!r}: it is not registered."
                               f"{did_you_mean(name, _REGISTRY)}")
    return _REGISTRY.pop(name)


@contextmanager
def registered(name: str, cls: A) -> Iterator[A]:
    """Register `cls` as `name` for the `with` block only, then restore the registry and the class's
    `name` exactly, so that test-only attacks never leak into later tests (`list_attacks()` is read
    at collection time by the registry-wide tests). A name already taken is a RegistryError, and
    nothing is changed then."""
    had_own_name = "name" in vars(cls) if isinstance(cls, type) else False
    old_name = vars(cls).get("name") if had_own_name else None
    register(name)(cls)
    try:
        yield cls
    finally:
        if _REGISTRY.get(name) is cls:
            del _REGISTRY[name]
        if had_own_name:
            cls.name = old_name
        else:
            try:
                delattr(cls, "name")
            except AttributeError:
                pass


def load_entry_points(force: bool = False) -> list[str]:
    """Import third-party attacks from the `spdbench.attacks` entry-point group.

    The contract (docs/writing-an-attack.md): each entry point names one `Attack` subclass, and
    the entry-point name is its registry name (a plugin needs no `@register`; if it uses one with
    another name, the entry-point name wins and the other is dropped, with a warning). A plugin
    that fails to import, names something else or takes a name already in use is reported with a
    warning naming its distribution and skipped, so one broken package does not break every
    command. Returns the names that loaded.
    """
    global _entry_points_loaded
    if _entry_points_loaded and not force:
        return []
    _entry_points_loaded = True

    def load_one(ep, where: str) -> None:
        obj = ep.load()
        if not (isinstance(obj, type) and issubclass(obj, Attack)):
            raise RegistryError(f"the entry point must name a subclass of spdbench.Attack, got {obj!r}")
        other = [n for n, c in _REGISTRY.items() if c is obj and n != ep.name]
        if other:
            warnings.warn(f"spdbench: {where} is also @register-ed as {other}; the entry-point name "
                          f"{ep.name!r} is its registry name")
            for n in other:
                del _REGISTRY[n]
        register(ep.name)(obj)

    return load_group(ENTRY_POINT_GROUP, "attack", load_one)


@functools.lru_cache(maxsize=1)
def _top_level_distributions() -> Mapping[str, list[str]]:
    """`packages_distributions()` once per process: it reads every installed distribution's file
    list (about a second with a few hundred installed), and every run and `spdbench list` asks.
    Entry points are read once per process too, so a plugin installed mid-process is missed by both."""
    return importlib.metadata.packages_distributions()


def attack_source(attack: Union[Attack, type]) -> dict[str, str]:
    """The installed distribution (name and version) whose files hold the attack's class.

    Why: a leaderboard record must say which code made it; a plugin's version changes its numbers.
    Found from the module's top-level package via `importlib.metadata.packages_distributions`;
    code that no installed distribution holds (a notebook, a test file) is "unknown".
    """
    cls = attack if isinstance(attack, type) else type(attack)
    module = cls.__module__
    top = module.split(".")[0]
    dists = _top_level_distributions().get(top, [])
    if not dists:
        return {"distribution": "unknown", "version": "unknown", "module": module}
    name = dists[0]
    try:
        version = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return {"distribution": name, "version": version, "module": module}


def _ensure_loaded() -> None:
    from spdbench.attacks import amortized, baselines, diffprotect, diffusionguard, pca, photoguard, spd  # noqa: F401  (built-ins)

    load_entry_points()


def list_attacks() -> list[str]:
    """Names of every registered attack, built-in and plugin."""
    _ensure_loaded()
    return sorted(_REGISTRY)


def attack_class(name: str) -> type[Attack]:
    _ensure_loaded()
    if name not in _REGISTRY:
        raise UnknownNameError(
            f"unknown attack {name!r}.{did_you_mean(name, _REGISTRY)} Available: {', '.join(sorted(_REGISTRY))}"
        )
    return _REGISTRY[name]


def get_attack(name: str, **params: Any) -> Attack:
    """Build a registered attack by name: `get_attack("pca-minus", steps=40)`."""
    return attack_class(name)(**params)
