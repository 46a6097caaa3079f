"""One `Registry` class for every named kind: attacks, purifiers, metrics, suites and targets.

Why one class (pyiqa's model): a name must resolve the same way for every kind -- a decorator to
register, a typo answered with "did you mean", built-ins found by scanning their package (one new
file in `spdbench/attacks/` is one new attack, no list to edit), third-party code through one
entry-point group per kind (`spdbench.attacks`, `spdbench.purifiers`, `spdbench.metrics`,
`spdbench.suites`, `spdbench.targets`), and a broken plugin reported the same way everywhere: a
warning naming the plugin, its distribution and the error, the plugin listed in `failures` and
skipped, the rest loaded. Loading is lazy (first lookup), so `import spdbench` stays fast.

A registry is a mutable mapping name -> object: `registry[name] = obj` stores without checks (tests
swap entries with `monkeypatch.setitem`); `add`/`register` are the checked doors.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import pkgutil
import warnings
from collections.abc import MutableMapping
from typing import Any, Callable, Generic, Iterator, Optional, TypeVar

from spdbench.errors import RegistryError, UnknownNameError, did_you_mean

T = TypeVar("T")
O = TypeVar("O")
_NO_DEFAULT: Any = object()


def load_group(group: str, kind: str, load_one: Callable[[object, str], None],
               failures: Optional[dict[str, str]] = None) -> list[str]:
    """Call `load_one(entry_point, where)` for each entry point of `group`; `where` describes it for
    messages ("attack plugin 'x' of dist (module:Obj)"). A failure is a warning (and, given
    `failures`, an entry there), never an exception. Returns the names that loaded."""
    loaded = []
    for ep in importlib.metadata.entry_points(group=group):
        dist = getattr(getattr(ep, "dist", None), "name", None) or "unknown distribution"
        where = f"{kind} plugin {ep.name!r} of {dist} ({ep.value})"
        try:
            load_one(ep, where)
            loaded.append(ep.name)
            if failures is not None:
                failures.pop(ep.name, None)  # an earlier failed try (e.g. mid-import) is over
        except Exception as exc:  # noqa: BLE001 - isolate broken plugins
            message = f"spdbench: could not load {where}: {exc}"
            if failures is not None:
                failures[ep.name] = message
            warnings.warn(message)
    return loaded


def _owner(obj: Any) -> str:
    """' by module.Name' for a class or function (where a clashing name was registered), else ''."""
    module, qualname = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
    return f" by {module}.{qualname}" if isinstance(module, str) and isinstance(qualname, str) else ""


class Registry(MutableMapping, Generic[T]):
    """Named objects of one kind, with metadata, built-ins scanned from `package` and plugins from
    the entry-point group `group` (default `spdbench.<kind>s`).

    `check(name, obj)` raises RegistryError for an object of the wrong type; `from_entry_point(name,
    obj)` turns what an entry point names into the object to register (default: itself);
    `on_add(name, obj)` runs after a successful `add` (attacks learn their name); `normalize` maps a
    looked-up name to its key (metrics: case-insensitive).
    """

    def __init__(self, kind: str, *, package: Optional[str] = None, group: Optional[str] = None,
                 check: Optional[Callable[[str, Any], None]] = None,
                 from_entry_point: Optional[Callable[[str, Any, str], T]] = None,
                 on_add: Optional[Callable[[str, T], None]] = None,
                 normalize: Callable[[str], str] = str) -> None:
        self.kind = kind
        self.package = package
        self.group = group or f"spdbench.{kind}s"
        self._check = check
        self._from_entry_point = from_entry_point
        self._on_add = on_add
        self._base_normalize = normalize
        #: old name -> current name (`alias`): looked-up names resolve through it, `names()` omits them
        self._aliases: dict[str, str] = {}
        self._normalize = self._resolve
        self._items: dict[str, T] = {}
        self._meta: dict[str, dict[str, Any]] = {}
        #: plugins that failed to load this process: entry-point name -> the warning's text
        self.failures: dict[str, str] = {}
        self._scanned = False
        self._entry_points_loaded = False

    # --- the checked doors ------------------------------------------------------------------
    def add(self, name: str, obj: T, **metadata: Any) -> T:
        """Register `obj` as `name` with keyword `metadata`; a taken name (by another object), an
        empty name or an object `check` refuses is a RegistryError, and nothing changes then."""
        if not isinstance(name, str) or not name.strip():
            raise RegistryError(f"a {self.kind} name must be a non-empty string, got {name!r}")
        if self._check is not None:
            self._check(name, obj)
        old = self._items.get(name)
        if old is not None and old is not obj:
            raise RegistryError(f"{self.kind} name {name!r} is already registered{_owner(old)}; pick another name")
        if old is obj and not metadata:  # registered again (a plugin's own decorator, then its entry point)
            return obj
        self._items[name] = obj
        self._meta[name] = dict(metadata)
        if self._on_add is not None:
            self._on_add(name, obj)
        return obj

    def register(self, name: str, **metadata: Any) -> Callable[[O], O]:
        """Decorator: `@REGISTRY.register("name", key=value)` adds the decorated object."""

        def decorator(obj: O) -> O:
            self.add(name, obj, **metadata)
            return obj

        return decorator

    def remove(self, name: str) -> T:
        """Take `name` out and return its object; an unknown name is an UnknownNameError."""
        if name not in self._items:
            raise UnknownNameError(f"cannot unregister {self.kind} {name!r}: it is not registered."
                                   f"{did_you_mean(str(name), self._items)}")
        self._meta.pop(name, None)
        return self._items.pop(name)

    # --- lookup --------------------------------------------------------------------------------
    def get(self, name: str, default: Any = _NO_DEFAULT) -> T:  # type: ignore[override]
        """The object registered as `name`. Unlike dict.get, an unknown name is an UnknownNameError
        with close matches and the available names, unless a `default` is given."""
        self.load()
        key = self._normalize(name) if isinstance(name, str) else name
        if isinstance(key, str) and key in self._items:
            return self._items[key]
        if default is not _NO_DEFAULT:
            return default
        raise UnknownNameError(f"unknown {self.kind} {name!r}.{did_you_mean(str(key), self._items)} "
                               f"Available: {', '.join(sorted(self._items))}")

    def metadata(self, name: str) -> dict[str, Any]:
        """The keyword metadata `name` was registered with (a copy)."""
        self.get(name)
        return dict(self._meta.get(self._normalize(name), {}))

    def names(self) -> list[str]:
        """Every registered name, built-in and plugin, in registration order."""
        self.load()
        return list(self._items)

    # --- loading -------------------------------------------------------------------------------
    def load(self, force: bool = False) -> None:
        """Import the built-ins (every module of `package`) and the entry-point plugins, once per
        process (`force` again: a module added since is imported, a plugin installed since loads)."""
        self._scan_once(force)
        self.load_entry_points(force)

    def _scan_once(self, force: bool = False) -> None:
        if not self._scanned or force:
            self._scanned = True  # first, so that a module looking a name up while it loads does not recurse
            try:
                self.scan()
            except BaseException:
                self._scanned = False
                raise

    # --- lookup without importing plugins (attacks: plugin code never runs in the harness) -----
    def local(self, name: str, default: Any = _NO_DEFAULT) -> T:
        """`name` among the built-ins (the package scan) and what this process registered itself (a
        decorator in a notebook or a test), WITHOUT importing any entry-point plugin: the harness
        and `verify` look attacks up this way, so a plugin's module never runs in their process.
        A plugin this process already imported (e.g. through `get`) is found too."""
        self._scan_once()
        key = self._normalize(name) if isinstance(name, str) else name
        if isinstance(key, str) and key in self._items:
            return self._items[key]
        if default is not _NO_DEFAULT:
            return default
        raise UnknownNameError(f"unknown {self.kind} {name!r}.{did_you_mean(str(key), self.known_names())} "
                               f"Available: {', '.join(sorted(self.known_names()))}")

    def entry_point(self, name: str) -> Optional[importlib.metadata.EntryPoint]:
        """The entry point that plugs `name` in, read from the installed distributions' metadata
        only (nothing is imported), or None. The first one wins, as in `load_entry_points` (a
        second one with the same name fails to register there)."""
        for ep in importlib.metadata.entry_points(group=self.group):
            if ep.name == name:
                return ep
        return None

    def known_names(self) -> list[str]:
        """Built-in, locally registered and entry-point names, without importing any plugin."""
        self._scan_once()
        names = list(self._items)
        names += [ep.name for ep in importlib.metadata.entry_points(group=self.group) if ep.name not in names]
        return names

    def scan(self) -> list[str]:
        """Import every module of `package` (each registers its own objects); returns their names.
        A built-in that fails to import raises: it is a bug of this package, not a plugin's."""
        if self.package is None:
            return []
        pkg = importlib.import_module(self.package)
        found = sorted(m.name for m in pkgutil.iter_modules(pkg.__path__) if not m.name.startswith("_"))
        for name in found:
            importlib.import_module(f"{self.package}.{name}")
        return found

    def load_entry_points(self, force: bool = False) -> list[str]:
        """Register the plugins of the entry-point group: the entry-point name is the registered
        name. A plugin that fails to import, names the wrong kind of object or takes a used name is
        reported (a warning, and `failures`) and skipped. Returns the names that loaded."""
        if self._entry_points_loaded and not force:
            return []
        self._entry_points_loaded = True

        def load_one(ep, where: str) -> None:
            obj = ep.load()
            if self._from_entry_point is not None:
                obj = self._from_entry_point(ep.name, obj, where)
            self.add(ep.name, obj)

        return load_group(self.group, self.kind, load_one, self.failures)

    # --- the mapping (unchecked: tests swap entries with monkeypatch.setitem) ------------------
    def __getitem__(self, name: str) -> T:
        self.load()
        return self._items[name]

    def __setitem__(self, name: str, obj: T) -> None:
        self._items[name] = obj
        self._meta.setdefault(name, {})

    def __delitem__(self, name: str) -> None:
        del self._items[name]
        self._meta.pop(name, None)

    def __contains__(self, name: object) -> bool:
        self.load()
        return name in self._items or (isinstance(name, str) and self._resolve(name) in self._items)

    # --- aliases: a renamed object keeps its old name for what was recorded under it -----------
    def alias(self, old: str, new: str) -> None:
        """Make `old` resolve to `new` in every lookup (`get`, `in`, `metadata`), without listing it in
        `names()`: a renamed built-in keeps answering to the name old records hold. A name already
        registered as itself cannot become an alias (RegistryError)."""
        if not isinstance(old, str) or not old.strip() or not isinstance(new, str) or not new.strip():
            raise RegistryError(f"a {self.kind} alias maps a non-empty name to a non-empty name, got {old!r} -> {new!r}")
        if old in self._items:
            raise RegistryError(f"{self.kind} name {old!r} is registered{_owner(self._items[old])}; it cannot be an alias")
        self._aliases[self._base_normalize(old)] = self._base_normalize(new)

    def aliases(self) -> dict[str, str]:
        """Every alias, old name -> current name (a copy)."""
        return dict(self._aliases)

    def _resolve(self, name: str) -> str:
        key = self._base_normalize(name)
        return self._aliases.get(key, key)

    def __iter__(self) -> Iterator[str]:
        self.load()
        return iter(list(self._items))

    def __len__(self) -> int:
        self.load()
        return len(self._items)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {len(self._items)} registered)"
