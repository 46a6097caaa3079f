"""Attack base classes and the attack registry.

Modelled on torchattacks (one small class per attack over a shared base) and pyiqa (a registry
that answers a typo with "did you mean"). The base owns parameter handling, presets and the input
contract; a subclass writes only its math. The harness, not the attack, owns the budget: an attack
receives it and must return a delta inside it (the harness re-checks anyway).
"""
from __future__ import annotations

import copy
import functools
import importlib.metadata
import warnings
from contextlib import contextmanager
from enum import Enum
from typing import Any, Callable, ClassVar, Iterator, Mapping, Optional, TypeVar, Union

import torch

from spdbench.budget import Budget
from spdbench.errors import InputError, RegistryError
from spdbench.images import check_images
from spdbench.registry import Registry

ENTRY_POINT_GROUP = "spdbench.attacks"


class AttackKind(str, Enum):
    """How an attack protects, the one thing the harness branches on: what it may see and what it returns.

    per-image: `perturb` sees one batch; universal: `fit` sees the train split and returns one delta;
    amortized: `fit` trains a network on the train split, `apply` protects any batch feed-forward.
    The values are the words records and tables use (store.records.attack_kind)."""

    per_image = "per-image"
    universal = "universal"
    amortized = "amortized"

    @property
    def fits(self) -> bool:
        """True when `fit(train_images, ...)` runs before the attack protects anything."""
        return self is not AttackKind.per_image


def _declared_kind(cls: type) -> Optional[AttackKind]:
    """The kind a class declares itself: `kind = ...`, or the flags of plugins written before `kind`
    existed (`universal = True`, `amortized = True`, `fits = True`); None when it declares neither."""
    own = vars(cls)
    if "kind" in own:
        try:
            return AttackKind(own["kind"])
        except ValueError:
            raise RegistryError(f"attack class {cls.__qualname__}: kind {own['kind']!r} is not one of "
                                f"{[k.value for k in AttackKind]}") from None
    if own.get("amortized") is True:
        return AttackKind.amortized
    if own.get("universal") is True or own.get("fits") is True:
        return AttackKind.universal
    if own.get("universal") is False or own.get("amortized") is False:
        return AttackKind.per_image
    return None


class Attack:
    """A per-image immunization attack: `perturb(images, target, budget, generator) -> delta`.

    Subclasses declare `defaults` (every accepted parameter with its default) and optional
    `presets` (named parameter sets reproducing a paper's settings, with `preset_budgets` for the
    budget the paper used). Parameters are recorded in `params` for the result records.
    """

    name: ClassVar[str] = ""
    #: per-image, universal or amortized (AttackKind): the one attribute callers branch on
    kind: ClassVar[AttackKind] = AttackKind.per_image
    #: read-only aliases derived from `kind` (plugins written before `kind` read and set them; a
    #: subclass that sets `universal = True` gets kind universal, see __init_subclass__)
    universal: ClassVar[bool] = False
    amortized: ClassVar[bool] = False
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

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Settle the class's `kind` (declared, derived from legacy flags, or inherited) and derive the
        three legacy flags from it, so `kind` is the one source and old readers see the same answer."""
        super().__init_subclass__(**kwargs)
        cls.kind = _declared_kind(cls) or cls.kind
        cls.universal = cls.kind is AttackKind.universal
        cls.amortized = cls.kind is AttackKind.amortized
        cls.fits = cls.kind.fits

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

    kind: ClassVar[AttackKind] = AttackKind.universal

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

    kind: ClassVar[AttackKind] = AttackKind.amortized
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
A = TypeVar("A", bound=type)


def _check_attack(name: str, obj: Any) -> None:
    if not (isinstance(obj, type) and issubclass(obj, Attack)):
        raise RegistryError(f"@register({name!r}) needs a subclass of spdbench.Attack, got {obj!r}")


def _attack_from_entry_point(name: str, obj: Any, where: str) -> type[Attack]:
    """The contract (docs/writing-an-attack.md): an entry point names one `Attack` subclass and its
    name is the registry name (a plugin needs no `@register`; one `@register`-ed under another name
    is moved to the entry-point name, with a warning)."""
    if not (isinstance(obj, type) and issubclass(obj, Attack)):
        raise RegistryError(f"the entry point must name a subclass of spdbench.Attack, got {obj!r}")
    other = [n for n, c in ATTACKS.items() if c is obj and n != name]
    if other:
        warnings.warn(f"spdbench: {where} is also @register-ed as {other}; the entry-point name "
                      f"{name!r} is its registry name")
        for n in other:
            del ATTACKS[n]
    return obj


def _set_name(name: str, cls: type[Attack]) -> None:
    cls.name = name


#: every attack, built-in (each module of spdbench.attacks registers its own: one new file is one
#: new attack) and plugin (entry-point group `spdbench.attacks`)
ATTACKS: Registry[type[Attack]] = Registry("attack", package="spdbench.attacks", group=ENTRY_POINT_GROUP,
                                           check=_check_attack, from_entry_point=_attack_from_entry_point,
                                           on_add=_set_name)


def register(name: str, **metadata: Any) -> Callable[[A], A]:
    """Class decorator: `@register("my-attack")` makes the class available by name."""
    return ATTACKS.register(name, **metadata)


def unregister(name: str) -> type[Attack]:
    """Remove `name` from the registry and return its class (tests, notebooks). A built-in removed
    this way does not come back in this process; an unknown name is an UnknownNameError."""
    return ATTACKS.remove(name)


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
        if ATTACKS.get(name, None) is cls:
            del ATTACKS[name]
        if had_own_name:
            cls.name = old_name
        else:
            try:
                delattr(cls, "name")
            except AttributeError:
                pass


def load_entry_points(force: bool = False) -> list[str]:
    """Import third-party attacks from the `spdbench.attacks` entry-point group (see
    `_attack_from_entry_point`); a broken plugin is reported with a warning naming its distribution
    and skipped, so one broken package does not break every command. Returns the names that loaded."""
    return ATTACKS.load_entry_points(force)


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


def list_attacks() -> list[str]:
    """Names of every registered attack, built-in and plugin."""
    return sorted(ATTACKS.names())


def attack_class(name: str) -> type[Attack]:
    """The class registered as `name`; UnknownNameError with close matches otherwise."""
    return ATTACKS.get(name)


def get_attack(name: str, **params: Any) -> Attack:
    """Build a registered attack by name: `get_attack("pca-minus", steps=40)`."""
    return attack_class(name)(**params)
