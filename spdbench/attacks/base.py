"""Attack base classes and the attack registry.

Modelled on torchattacks (one small class per attack over a shared base) and pyiqa (a registry
that answers a typo with "did you mean"). The base owns parameter handling, presets and the input
contract; a subclass writes only its math. The harness, not the attack, owns the budget: an attack
receives it and must return a delta inside it (the harness re-checks anyway).
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import importlib.metadata
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Callable, ClassVar, Iterator, Mapping, Optional, TypeVar, Union

import torch

from spdbench.budget import Budget
from spdbench.errors import InputError, RegistryError, UnknownNameError, did_you_mean
from spdbench.images import check_images
from spdbench.registry import Registry

ENTRY_POINT_GROUP = "spdbench.attacks"


def param_source(key: str, explicit, preset: Optional[str], presets) -> str:
    """Where parameter `key` came from: "explicit" (set by the caller), "preset:NAME" or "default" --
    one rule for an Attack and for its plain-data AttackSpec."""
    if key in explicit:
        return "explicit"
    if preset is not None and key in presets.get(preset, {}):
        return f"preset:{preset}"
    return "default"

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
        return param_source(key, self.explicit_params, self.preset, self.presets)

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


def attack_source(attack: Union[Attack, type, "AttackSpec"]) -> dict[str, str]:
    """The installed distribution (name and version) whose files hold the attack's class.

    Why: a leaderboard record must say which code made it; a plugin's version changes its numbers.
    Found from the module's top-level package via `importlib.metadata.packages_distributions`;
    code that no installed distribution holds (a notebook, a test file) is "unknown".
    """
    if isinstance(attack, AttackSpec):  # a plugin's: read from its entry point's metadata, never imported
        return dict(attack.source)
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


# --- an attack as plain data: what the harness plans with, what the worker builds from ----------
#: where an attack's code comes from: this package ("builtin"), an installed entry point ("plugin",
#: never imported in the harness or verify), or the Python caller's own process ("caller": a class
#: or instance the caller made; it travels to the worker pickled, and the record says so)
ORIGINS = ("builtin", "plugin", "caller")


def is_builtin(cls: type) -> bool:
    """True for a class defined in this package's attacks (our code, scanned, safe to construct)."""
    module = getattr(cls, "__module__", "") or ""
    return module == __package__ or module.startswith(f"{__package__}.")


def class_description(cls: type[Attack]) -> dict[str, Any]:
    """What planning reads of an attack class, as plain data (JSON values): the worker sends this
    for a plugin (wire.AttackDescription checks it), the harness builds it itself for a built-in."""
    return dict(kind=AttackKind(cls.kind).value, defaults=dict(cls.defaults),
                presets={k: dict(v) for k, v in cls.presets.items()},
                preset_budgets={k: {"norm": b.norm, "eps": float(b.eps)} for k, b in cls.preset_budgets.items()},
                max_network_params=int(getattr(cls, "max_network_params", 0)) if cls.kind is AttackKind.amortized
                else None,
                uses_masks=bool(cls.uses_masks), needs_inpainting=bool(cls.needs_inpainting),
                has_objective=bool(cls.has_objective), stochastic=bool(getattr(cls, "stochastic", False)))


def describe(attack: Attack) -> dict[str, Any]:
    """An instance as plain data: its class's description, its name, preset and merged params, and
    its class's docstring (`summary`, cut to 4000 characters: what `spdbench list` shows)."""
    return dict(name=str(attack.name), preset=attack.preset, params=dict(attack.params),
                **class_description(type(attack)), summary=(type(attack).__doc__ or "").strip()[:4000])


@dataclass(frozen=True)
class AttackSpec:
    """A configured attack as plain data. The harness plans, records and verifies with this; the
    worker constructs the attack itself from `(name, entry_point, preset, given)` (`build`). Only an
    attack the Python caller made in its own process (`origin` "caller") carries the object
    (`instance`), which then travels to the worker pickled: it is the caller's code already."""

    name: str
    kind: AttackKind
    params: dict[str, Any]               # every parameter, merged (recorded)
    preset: Optional[str]
    given: dict[str, Any]                # what the worker constructs with: cls(preset=preset, **given)
    explicit_params: frozenset[str]
    defaults: dict[str, Any]
    presets: dict[str, dict[str, Any]]
    preset_budgets: dict[str, Budget]
    origin: str
    source: dict[str, str]
    uses_masks: bool = False
    needs_inpainting: bool = False
    has_objective: bool = False
    #: its objective is re-drawn every step (a timestep, noise, a mask): its sign steps half cancel
    #: and it ends inside the ball, so under work matching it finishes on the budget's boundary
    stochastic: bool = False
    max_network_params: Optional[int] = None
    entry_point: Optional[str] = None    # "module:attr" of a plugin, read from metadata
    instance: Optional[Attack] = field(default=None, compare=False, repr=False)

    def __getattr__(self, key: str) -> Any:
        """A parameter by name, as on an Attack (`spec.steps`); only for names not otherwise set."""
        params = self.__dict__.get("params")
        if params is not None and key in params:
            return params[key]
        raise AttributeError(f"{type(self).__name__} {self.__dict__.get('name')!r} has no attribute {key!r}")

    @property
    def universal(self) -> bool:
        return self.kind is AttackKind.universal

    @property
    def amortized(self) -> bool:
        return self.kind is AttackKind.amortized

    @property
    def fits(self) -> bool:
        return self.kind.fits

    @classmethod
    def from_instance(cls, attack: Attack) -> "AttackSpec":
        """A built-in instance becomes (name, params) (the worker rebuilds it; one path for all);
        anything else the caller made stays the caller's object."""
        builtin = is_builtin(type(attack)) and ATTACKS.local(attack.name, None) is type(attack)
        info = class_description(type(attack))
        return cls(name=str(attack.name), kind=AttackKind(info.pop("kind")), params=dict(attack.params),
                   preset=attack.preset, given=dict(attack.params), explicit_params=frozenset(attack.explicit_params),
                   preset_budgets=dict(type(attack).preset_budgets), origin="builtin" if builtin else "caller",
                   source=attack_source(attack), instance=None if builtin else attack,
                   **{k: v for k, v in info.items() if k != "preset_budgets"})

    @classmethod
    def from_description(cls, info: dict[str, Any], *, given: dict[str, Any], entry_point: str,
                         source: dict[str, str]) -> "AttackSpec":
        """A plugin's spec from what its worker described (checked by wire.AttackDescription);
        `given`, `entry_point` and `source` are the harness's own, not the worker's word."""
        info = dict(info)
        info.pop("summary", None)  # display text (`spdbench list`), not a planning fact
        budgets = {k: Budget(b["norm"], b["eps"]) for k, b in info.pop("preset_budgets").items()}
        return cls(kind=AttackKind(info.pop("kind")), given=dict(given), explicit_params=frozenset(given),
                   preset_budgets=budgets, origin="plugin", source=dict(source), entry_point=entry_point, **info)

    def param_source(self, key: str) -> str:
        """Where parameter `key` came from: "explicit", "preset:NAME" or "default" (as Attack's)."""
        return param_source(key, self.explicit_params, self.preset, self.presets)

    def configure(self, **params: Any) -> "AttackSpec":
        """A copy with `params` set (the suite's step budget); unknown names are an error."""
        unknown = sorted(set(params) - set(self.defaults))
        if unknown:
            raise InputError(f"attack {self.name!r} got unknown parameter(s) {unknown};"
                             f" accepted: {sorted(self.defaults) or 'none'}")
        instance = self.instance.configure(**params) if self.instance is not None else None
        return dataclasses.replace(self, params={**self.params, **params}, given={**self.given, **params},
                                   instance=instance)

    def payload(self) -> dict[str, Any]:
        """What the worker gets: plain (name, entry point, preset, params), or the caller's object."""
        if self.instance is not None:
            return {"object": self.instance}
        return {"name": self.name, "entry_point": self.entry_point, "preset": self.preset, "given": dict(self.given)}

    def build(self) -> Attack:
        """The attack object, constructed in THIS process: called by the worker (and by isolation
        "none", which runs attack code in the harness on purpose)."""
        return self.build_payload(self.payload())

    @staticmethod
    def build_payload(payload: Mapping[str, Any]) -> Attack:
        """The attack a `payload()` names, constructed here (or the caller's object it carries)."""
        if "object" in payload:
            return payload["object"]
        return build_attack(payload["name"], payload["entry_point"], payload["preset"], payload["given"])


def plugin_class(name: str, entry_point: str) -> type[Attack]:
    """Import the plugin class `entry_point` ("module:attr") names, as `name`: for the worker only."""
    ep = importlib.metadata.EntryPoint(name=name, value=entry_point, group=ENTRY_POINT_GROUP)
    cls = _attack_from_entry_point(name, ep.load(), f"attack plugin {name!r} ({entry_point})")
    if ATTACKS.local(name, None) is not cls:
        ATTACKS[name] = cls
    _set_name(name, cls)
    return cls


def build_attack(name: str, entry_point: Optional[str], preset: Optional[str], given: Mapping[str, Any]) -> Attack:
    """Construct `name` from plain data: a built-in from the package scan, a plugin from its entry
    point (imported here: call this only where attack code may run)."""
    cls = plugin_class(name, entry_point) if entry_point else ATTACKS.local(name)
    return cls(preset=preset, **dict(given))


@dataclass(frozen=True)
class AttackLocation:
    """Where a name's code is, found without importing a plugin: a class (built-in or the caller's)
    or an entry point (a plugin: `entry_point` "module:attr", and its distribution)."""

    name: str
    origin: str
    cls: Optional[type[Attack]] = None
    entry_point: Optional[str] = None
    source: dict[str, str] = field(default_factory=dict)


def locate_attack(name: str) -> AttackLocation:
    """A built-in first, then an installed entry point (metadata only: the plugin is not imported,
    even when this process imported it before), then a class this process registered itself."""
    if not isinstance(name, str) or not name.strip():
        raise InputError(f"attack must be a registered name or an spdbench.Attack instance, got {name!r}")
    cls = ATTACKS.local(name, None)
    if cls is not None and is_builtin(cls):
        return AttackLocation(name, "builtin", cls=cls)
    ep = ATTACKS.entry_point(name)
    if ep is not None:
        dist = getattr(ep, "dist", None)
        source = {"distribution": getattr(dist, "name", None) or "unknown",
                  "version": getattr(dist, "version", None) or "unknown", "module": ep.value.split(":")[0]}
        return AttackLocation(name, "plugin", entry_point=ep.value, source=source)
    if cls is not None:
        return AttackLocation(name, "caller", cls=cls)
    known = ATTACKS.known_names()
    raise UnknownNameError(f"unknown attack {name!r}.{did_you_mean(name, known)} Available: {', '.join(sorted(known))}")
