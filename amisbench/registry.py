"""Name-keyed registries of method and dataset plugins.

Built-in plugins live in the ``amisbench.methods`` / ``amisbench.datasets`` packages, one module (or
subpackage) each, and register themselves with :func:`register_method` / :func:`register_dataset` when
imported. They are found by importing the package's modules by dotted name (never by file path), so a new
built-in method is one file plus one decorator. Third-party plugins register through the entry-point
groups ``amisbench.methods`` and ``amisbench.datasets``; an entry point may name the class itself or a
module whose import registers it. Both kinds are looked up the same way, lazily, by name.

``$AMISBENCH_PLUGINS`` (comma-separated distribution names, e.g. ``amisbench`` for none but the project's
own) limits the entry points loaded; unset, every installed plugin is. A plugin that fails to import is
one :class:`PluginWarning` line naming the entry point and the error; the other plugins still work.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import pkgutil
import re
import warnings
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any, Callable

from .errors import UserError


PLUGINS_ENV = "AMISBENCH_PLUGINS"


class PluginWarning(UserWarning):
    """A plugin entry point that could not be loaded (the command goes on without it)."""


@dataclass(frozen=True)
class Entry:
    name: str
    obj: Any
    description: str
    source: str  # "builtin" or the distribution/entry point that provided it


class Registry:
    """One registry per plugin kind (methods, datasets)."""

    def __init__(self, kind: str, package: str, group: str):
        self.kind = kind
        self.package = package
        self.group = group
        self._entries: dict[str, Entry] = {}
        self._scanned_builtins = False
        self._scanned_entry_points = False
        self.broken: dict[str, str] = {}  # entry point name -> why it could not be loaded

    # -- registration ---------------------------------------------------------------------------------
    def register(self, name: str, obj: Any = None, *, description: str | None = None) -> Any:
        """Register ``obj`` under ``name``; usable as ``@registry.register("name")``."""

        def deco(o: Any) -> Any:
            desc = description if description is not None else _first_line(o.__doc__)
            module = getattr(o, "__module__", "") or ""
            source = "builtin" if module.startswith(self.package + ".") else module
            old = self._entries.get(name)
            if old is not None and old.obj is not o:
                warnings.warn(f"{self.kind} '{name}' registered twice; the later one ({module}) wins",
                              stacklevel=3)
            self._entries[name] = Entry(name, o, desc, source)
            try:
                o.registry_name = name
            except (AttributeError, TypeError):
                pass
            return o

        return deco(obj) if obj is not None else deco

    def unregister(self, name: str) -> None:
        self._entries.pop(name, None)

    # -- discovery ------------------------------------------------------------------------------------
    def _import_builtins(self) -> None:
        if self._scanned_builtins:
            return
        self._scanned_builtins = True
        pkg = importlib.import_module(self.package)
        for info in pkgutil.iter_modules(pkg.__path__):
            if not info.name.startswith("_"):
                importlib.import_module(f"{self.package}.{info.name}")

    def _entry_points(self) -> list:
        eps = list(entry_points(group=self.group))
        allowed = os.environ.get(PLUGINS_ENV)
        if allowed is None:
            return eps
        names = {_norm(n) for n in allowed.split(",") if n.strip()}
        return [ep for ep in eps if ep.dist is not None and _norm(ep.dist.name) in names]

    def _load_entry_point(self, ep) -> None:
        try:
            obj = ep.load()
        except Exception as e:  # a broken plugin must not take the other methods down
            why = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}".rstrip(": ")
            self.broken[ep.name] = why
            warnings.warn(f"{self.kind} plugin '{ep.name}' ({ep.value}, entry point group {self.group}) could "
                          f"not be loaded and is left out: {why}", PluginWarning, stacklevel=2)
            return
        if ep.name not in self._entries and not _is_module(obj):
            self.register(ep.name, obj)
        if ep.name not in self._entries:
            raise UserError(f"entry point '{ep.name}' in group '{self.group}' ({ep.value}) did not register "
                            f"a {self.kind} named '{ep.name}'")

    def _import_entry_points(self) -> None:
        if self._scanned_entry_points:
            return
        self._scanned_entry_points = True
        for ep in self._entry_points():
            if ep.name not in self._entries and ep.name not in self.broken:
                try:
                    self._load_entry_point(ep)
                except UserError as e:  # registered nothing: listing goes on without it
                    self.broken[ep.name] = str(e)
                    warnings.warn(str(e), PluginWarning, stacklevel=2)

    def get(self, name: str) -> Any:
        """The plugin registered as ``name``; :class:`UserError` listing the known names otherwise."""
        if name in self._entries:
            return self._entries[name].obj
        # Cheapest first: the built-in module of the same name (file = id), then entry points, then all.
        try:
            importlib.import_module(f"{self.package}.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"{self.package}.{name}":
                raise
        if name not in self._entries:
            for ep in self._entry_points():
                if ep.name == name:
                    if name not in self.broken:
                        self._load_entry_point(ep)
                    if name in self.broken:
                        raise UserError(f"{self.kind} '{name}' is a plugin that could not be loaded "
                                        f"({ep.value}): {self.broken[name]}")
                    break
        if name not in self._entries:
            self._import_builtins()
        if name not in self._entries:
            raise UserError(f"unknown {self.kind} '{name}'; known: {', '.join(self.names())}")
        return self._entries[name].obj

    def has(self, name: str) -> bool:
        """Whether ``name`` is registered, a built-in module or an installed entry point, found without
        importing any plugin (tables ask it for every row, and must not load torch)."""
        if name in self._entries:
            return True
        try:
            if importlib.util.find_spec(f"{self.package}.{name}") is not None:
                return True
        except (ImportError, ValueError):
            pass
        return any(ep.name == name for ep in self._entry_points())

    def findable(self, name: str) -> bool:
        """Whether a fresh process finds ``name`` by itself: a built-in or an installed entry point (not a
        plugin registered by hand at run time)."""
        self.get(name)
        return self._entries[name].source == "builtin" or any(ep.name == name for ep in self._entry_points())

    def entries(self) -> list[Entry]:
        self._import_builtins()
        self._import_entry_points()
        return sorted(self._entries.values(), key=lambda e: e.name)

    def names(self) -> list[str]:
        return [e.name for e in self.entries()]

    def __contains__(self, name: str) -> bool:
        try:
            self.get(name)
        except UserError:
            return False
        return True


def _first_line(doc: str | None) -> str:
    return (doc or "").strip().splitlines()[0].strip() if (doc or "").strip() else ""


def _norm(dist_name: str) -> str:
    """A distribution name as pip compares them (case, ``-``/``_``/``.`` insensitive)."""
    return re.sub(r"[-_.]+", "-", dist_name.strip()).lower()


def _is_module(obj: Any) -> bool:
    return type(obj).__name__ == "module"


METHODS = Registry("method", "amisbench.methods", "amisbench.methods")
DATASETS = Registry("dataset", "amisbench.datasets", "amisbench.datasets")


def register_method(name: str, *, description: str | None = None) -> Callable[[Any], Any]:
    """Class decorator: register a method plugin under ``name``."""
    return METHODS.register(name, description=description)


def register_dataset(name: str, *, description: str | None = None) -> Callable[[Any], Any]:
    """Class decorator: register a dataset adapter under ``name``."""
    return DATASETS.register(name, description=description)
