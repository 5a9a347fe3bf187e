"""Plugin discovery: pluggy over the entry-point group ``mmbench``.

``MMBENCH_PLUGINS=a,b`` (entry-point names) limits what loads, for
reproducible runs; unset, every installed plugin loads. Built-ins are entry
points of the ``mmbench`` distribution like any third-party plugin.
"""
from __future__ import annotations

import ast
import difflib
import hashlib
import inspect
import os
import sys
from dataclasses import dataclass
from importlib import metadata
from types import ModuleType
from typing import Any

import pluggy

from . import hookspecs

GROUP = "mmbench"
KINDS = ("attack", "merger", "defense", "preset", "executor")
_HOOKS = {
    "attack": "mmbench_register_attacks",
    "merger": "mmbench_register_mergers",
    "defense": "mmbench_register_defenses",
    "preset": "mmbench_register_presets",
    "executor": "mmbench_register_executors",
}


class UsageError(Exception):
    """A mistake the user can fix (unknown name, bad option): one line, exit status 2."""


@dataclass(frozen=True)
class Registered:
    kind: str
    name: str
    obj: Any
    entry_point: str
    distribution: str
    version: str

    @property
    def description(self) -> str:
        return getattr(self.obj, "description", "") or ""

    @property
    def code(self) -> str:
        """12 hex digits of :func:`source_fingerprint` of the plugin object."""
        return source_fingerprint(self.obj)[:12]

    @property
    def key_version(self) -> str:
        """What stage keys record of the plugin: its distribution's version and its code,
        so that editing a plugin recomputes its stages without a version bump."""
        return f"{self.version}+{self.code}"


_fingerprints: dict[str, str] = {}


def _normalised_source(module: ModuleType) -> str:
    """The module's AST without docstrings: comments, formatting and docs do not count."""
    try:
        tree = ast.parse(inspect.getsource(module))
    except (OSError, TypeError, SyntaxError):  # no source (compiled, frozen): the name must do
        return ""
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (isinstance(body, list) and body and isinstance(body[0], ast.Expr)
                and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str)):
            node.body = body[1:] or [ast.Pass()]
    return ast.dump(tree)


def source_fingerprint(obj: Any) -> str:
    """sha256 of the code behind a plugin object: the module defining its class and every
    module of the same top-level package that module uses, transitively (a helper module
    shared by several plugins counts for each of them). Code outside that package (mmbench
    itself, torch) is covered by versions, not by this hash."""
    root = type(obj).__module__
    if root in _fingerprints:
        return _fingerprints[root]
    top = root.split(".")[0]
    seen: set[str] = set()
    stack = [root]
    while stack:
        name = stack.pop()
        module = sys.modules.get(name)
        if name in seen or module is None:
            continue
        seen.add(name)
        for value in vars(module).values():
            dep = value.__name__ if isinstance(value, ModuleType) else getattr(value, "__module__", None)
            if isinstance(dep, str) and (dep == top or dep.startswith(top + ".")) and dep not in seen:
                stack.append(dep)
    h = hashlib.sha256()
    for name in sorted(seen):
        h.update(f"{name}\n{_normalised_source(sys.modules[name])}\n".encode())
    _fingerprints[root] = h.hexdigest()
    return _fingerprints[root]


def unknown_name(kind: str, name: str, known: list[str]) -> UsageError:
    close = difflib.get_close_matches(name, known, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return UsageError(f"unknown {kind} {name!r}; known: {', '.join(sorted(known)) or 'none'}{hint}")


class Registry:
    def __init__(self, allow: list[str] | None = None) -> None:
        self.pm = pluggy.PluginManager(GROUP)
        self.pm.add_hookspecs(hookspecs)
        self.items: dict[str, dict[str, Registered]] = {k: {} for k in KINDS}
        self.entry_points: dict[str, tuple[str, str]] = {}  # plugin module name -> (dist, version)
        self.broken: dict[str, str] = {}  # entry point -> why it failed to import
        self._load(allow)

    def _load(self, allow: list[str] | None) -> None:
        eps = metadata.entry_points(group=GROUP)
        names = {ep.name for ep in eps}
        if allow is not None:
            for name in allow:
                if name not in names:
                    raise unknown_name("plugin (MMBENCH_PLUGINS)", name, sorted(names))
        for ep in sorted(eps, key=lambda e: e.name):
            if allow is not None and ep.name not in allow:
                continue
            if self.pm.get_plugin(ep.name) is not None:
                continue
            try:
                module = ep.load()
            except Exception as exc:  # a broken plugin must not take the others down
                self.broken[ep.name] = f"{type(exc).__name__}: {exc}"
                continue
            self.pm.register(module, name=ep.name)
            dist = ep.dist.name if ep.dist else "?"
            version = ep.dist.version if ep.dist else "?"
            self.entry_points[ep.name] = (dist, version)
        self.pm.check_pending()  # a misspelled hook fails loudly
        for kind, hook in _HOOKS.items():
            for impl in getattr(self.pm.hook, hook).get_hookimpls():
                dist, version = self.entry_points.get(impl.plugin_name, ("?", "?"))

                def register(obj: Any, factory: Any = None, *, _kind=kind, _ep=impl.plugin_name,
                             _dist=dist, _version=version) -> None:
                    if _kind == "executor":  # register(name, factory)
                        name, obj = obj, factory
                    else:
                        name = getattr(obj, "name", None)
                    if not name or not isinstance(name, str):
                        raise TypeError(f"{_ep}: a {_kind} needs a string name, got {obj!r}")
                    if name in self.items[_kind]:
                        other = self.items[_kind][name]
                        raise RuntimeError(f"{_kind} {name!r} registered by both {other.distribution} "
                                           f"({other.entry_point}) and {_dist} ({_ep})")
                    self.items[_kind][name] = Registered(_kind, name, obj, _ep, _dist, _version)

                impl.function(register=register)

    def names(self, kind: str) -> list[str]:
        return sorted(self.items[kind])

    def get(self, kind: str, name: str) -> Registered:
        try:
            return self.items[kind][name]
        except KeyError:
            raise unknown_name(kind, name, self.names(kind)) from None

    def all(self) -> list[Registered]:
        return [r for kind in KINDS for r in sorted(self.items[kind].values(), key=lambda r: r.name)]


_cache: dict[tuple, Registry] = {}


def load(allow: list[str] | None = None) -> Registry:
    """The registry for ``allow`` (default: ``MMBENCH_PLUGINS`` or everything installed)."""
    if allow is None:
        env = os.environ.get("MMBENCH_PLUGINS", "").strip()
        allow = [p.strip() for p in env.split(",") if p.strip()] if env else None
    key = tuple(allow) if allow is not None else None
    if key not in _cache:
        _cache[key] = Registry(allow)
    return _cache[key]
