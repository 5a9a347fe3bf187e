"""Plugin discovery: pluggy over the entry-point group ``mmbench``.

``MMBENCH_PLUGINS=a,b`` (entry-point names) limits what loads, for
reproducible runs; unset, every installed plugin loads. Built-ins are entry
points of the ``mmbench`` distribution like any third-party plugin.
"""
from __future__ import annotations

import difflib
import hashlib
import inspect
import os
import re
import sys
import traceback
import weakref
from dataclasses import dataclass
from importlib import metadata
from types import ModuleType
from typing import Any

import pluggy

from . import hookspecs
from .keys import normalised_source

GROUP = "mmbench"
KINDS = ("attack", "merger", "defense", "detector", "preset", "executor")
_HOOKS = {
    "attack": "mmbench_register_attacks",
    "merger": "mmbench_register_mergers",
    "defense": "mmbench_register_defenses",
    "detector": "mmbench_register_detectors",
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
    """The module's AST without docstrings (:func:`mmbench.keys.normalised_source`): comments,
    formatting and docs do not count."""
    try:
        text = inspect.getsource(module)
    except (OSError, TypeError):  # no source (compiled, frozen): the name must do
        return ""
    return normalised_source(text)


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


def unknown_name(kind: str, name: str, known: list[str], registry: "Registry | None" = None) -> UsageError:
    """The one-line error for a name that is not registered: why, when a skipped plugin registered
    it (``registry``'s skips, or those of every live registry), else the closest known name."""
    why = _skip_reason(kind, name, [registry] if registry is not None else list(_registries))
    if why:
        return UsageError(f"unknown {kind} {name!r}: {why}")
    close = difflib.get_close_matches(name, known, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return UsageError(f"unknown {kind} {name!r}; known: {', '.join(sorted(known)) or 'none'}{hint}")


# every Registry alive, so that unknown_name (also called without a registry, by plan.py)
# can say that a name is unknown because its plugin was skipped, and why
_registries: "weakref.WeakSet[Registry]" = weakref.WeakSet()


def _skip_reason(kind: str, name: str, registries: list["Registry"]) -> str:
    """Why a plugin that registered (or is the entry point) ``name`` was skipped, or ''."""
    for registry in registries:
        for skipped_kind, skip in registry.skipped_names.get(name, []):
            if skipped_kind in (kind, None) or kind not in KINDS:
                return (f"its plugin package {skip.distribution} (entry point {skip.entry_point}) "
                        f"was skipped: {skip.reason}")
    return ""


@dataclass(frozen=True)
class Skipped:
    """A plugin entry point that did not load, and why: :attr:`message` is one line naming
    the package, the entry point and what to change."""
    distribution: str
    entry_point: str
    reason: str

    @property
    def message(self) -> str:
        return f"plugin package {self.distribution} (entry point {self.entry_point}) skipped: {self.reason}"


CORE_DISTRIBUTION = "mmbench"  # its entry points (the built-ins) load first and keep their names
_SPECS = tuple(sorted(n for n in vars(hookspecs) if n.startswith("mmbench_")))
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")
_NO_ATTACK = "none"  # ``--attack none``: no attack (mmbench.plan.NO_ATTACK)
_HARNESS = "merge"  # ``--set merge.tasks=K``: the harness's own setting (mmbench.graph.HARNESS)


def _one_line(text: Any, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _raised(exc: BaseException, package: str) -> str:
    """``ValueError: message (at module:line)``, the line being the deepest one in ``package``
    (a SyntaxError's message names its file and line itself)."""
    where = None
    for frame, line in traceback.walk_tb(exc.__traceback__):
        module = frame.f_globals.get("__name__", "")
        if module == package or module.startswith(package + "."):
            where = f"{module}:{line}"
    return f"{type(exc).__name__}: {_one_line(exc)}" + (f" (at {where})" if where else "")


def _kind_class(kind: str) -> tuple[type, str]:
    from . import api, detect, presets

    return {"attack": (api.Attack, "mmbench.api.Attack"), "merger": (api.Merger, "mmbench.api.Merger"),
            "defense": (api.Defense, "mmbench.api.Defense"), "detector": (detect.Detector, "mmbench.detect.Detector"),
            "preset": (presets.Preset, "mmbench.presets.Preset")}[kind]


def _describe(obj: Any) -> str:
    try:
        text = repr(obj)
    except Exception:
        text = ""
    return text if 0 < len(text) <= 60 else f"a {type(obj).__name__} object"


class Registry:
    def __init__(self, allow: list[str] | None = None) -> None:
        self.pm = pluggy.PluginManager(GROUP)
        self.pm.add_hookspecs(hookspecs)
        self.items: dict[str, dict[str, Registered]] = {k: {} for k in KINDS}
        self.entry_points: dict[str, tuple[str, str]] = {}  # plugin module name -> (dist, version)
        self.broken: dict[str, str] = {}  # entry point -> why it failed to import
        # every entry point that was skipped, in load order: Skipped.message is its one line
        self.skipped: list[Skipped] = []
        # a name the skipped plugins registered (and each skipped entry point's own name, kind
        # None) -> (kind, Skipped): how unknown_name explains a name that is missing
        self.skipped_names: dict[str, list[tuple[str | None, Skipped]]] = {}
        self.warned = False  # the CLI sets it once it has printed the problems
        self._load(allow)
        _registries.add(self)

    @property
    def problems(self) -> list[str]:
        """One line per skipped plugin entry point (commands print them as warnings)."""
        return [s.message for s in self.skipped]

    def _skip(self, dist: str, ep: str, reasons: list[str], names: list[tuple[str, str]] = ()) -> None:
        skip = Skipped(dist, ep, "; also ".join(reasons))
        self.skipped.append(skip)
        for kind, name in [(None, ep), *names]:
            self.skipped_names.setdefault(name, []).append((kind, skip))

    def _load(self, allow: list[str] | None) -> None:
        eps = list(metadata.entry_points(group=GROUP))
        names = {ep.name for ep in eps}
        if allow is not None:
            for name in allow:
                if name not in names:
                    raise unknown_name("plugin (MMBENCH_PLUGINS)", name, sorted(names))
        eps = [ep for ep in eps if allow is None or ep.name in allow]
        # the built-ins first, so that a third-party plugin can never take one of their names
        eps.sort(key=lambda e: (not (e.dist and e.dist.name == CORE_DISTRIBUTION), e.name,
                                e.dist.name if e.dist else ""))
        for ep in eps:
            dist = ep.dist.name if ep.dist else "?"
            version = ep.dist.version if ep.dist else "?"
            if ep.name in self.entry_points or any(s.entry_point == ep.name for s in self.skipped):
                owner = (self.entry_points[ep.name][0] if ep.name in self.entry_points else
                         next(s.distribution for s in self.skipped if s.entry_point == ep.name))
                self._skip(dist, ep.name, [f"entry point name {ep.name!r} is already used by plugin package "
                                           f"{owner}; rename the entry point in [project.entry-points.mmbench]"])
                continue
            try:
                plugin = ep.load()
            except (Exception, SystemExit) as exc:  # a broken plugin must not take the others down
                self.broken[ep.name] = f"{type(exc).__name__}: {_one_line(exc)}"
                self._skip(dist, ep.name, [f"importing {ep.value} failed: "
                                           f"{_raised(exc, ep.value.split(':')[0].split('.')[0])}; fix it"])
                continue
            hooks, problems = self._hooks(plugin)
            if not problems and self.pm.is_registered(plugin):
                other = next(n for n, p in self.pm.list_name_plugin() if p is plugin)
                problems = [f"{ep.value} is also the entry point {other!r} of plugin package "
                            f"{self.entry_points[other][0]}; declare it once"]
            if not problems:
                try:
                    self.pm.register(plugin, name=ep.name)
                except Exception as exc:  # pluggy's own checks, should ours miss one
                    problems = [f"pluggy refused it: {type(exc).__name__}: {_one_line(exc)}"]
            if problems:
                self._skip(dist, ep.name, problems)
                continue
            staged, problems = self._call(ep, plugin, hooks, dist, version)
            if problems:
                self.pm.unregister(plugin, name=ep.name)
                self._skip(dist, ep.name, problems, [(r.kind, r.name) for r in staged])
                continue
            self.entry_points[ep.name] = (dist, version)
            for r in staged:
                self.items[r.kind][r.name] = r

    def _hooks(self, plugin: Any) -> tuple[dict[str, Any], list[str]]:
        """The plugin's hook functions by hook name, and what is wrong with them: a hook name
        that is not in hookspecs, a hook function without @mmbench.hookimpl, a wrapper, a
        signature other than ``(register)``, no hook at all."""
        hooks: dict[str, Any] = {}
        problems: list[str] = []
        for attr in sorted(dir(plugin)):
            try:
                opts = self.pm.parse_hookimpl_opts(plugin, attr)
                value = getattr(plugin, attr, None)
            except Exception:  # an attribute that cannot be read is no hook
                continue
            if opts is None:
                if attr in _SPECS and callable(value) and getattr(value, "__module__", None) != hookspecs.__name__:
                    problems.append(f"defines {attr} without @mmbench.hookimpl, so it is never called; decorate it")
                continue
            hook = opts.get("specname") or attr
            if hook not in _SPECS:
                close = difflib.get_close_matches(hook, _SPECS, n=1)
                problems.append(f"defines {hook}, which is not an mmbench hook; " +
                                (f"did you mean {close[0]}?" if close else f"the hooks are {', '.join(_SPECS)}"))
                continue
            if opts.get("hookwrapper") or opts.get("wrapper"):
                problems.append(f"{hook} is declared as a hook wrapper; use a plain @mmbench.hookimpl")
                continue
            try:
                signature = inspect.signature(value)
            except (TypeError, ValueError):
                signature = None
            if signature is not None:
                params = signature.parameters.values()
                named = [p for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
                required = [p.name for p in named if p.default is p.empty]
                takes = ("register" in [p.name for p in named if p.kind is not p.POSITIONAL_ONLY]
                         or any(p.kind is p.VAR_KEYWORD for p in params))
                if not takes or set(required) - {"register"}:
                    problems.append(f"{hook} takes ({', '.join(p.name for p in named)}); an mmbench hook takes "
                                    "(register): rename its parameter to register")
                    continue
            hooks[hook] = value
        if not hooks and not problems:
            problems.append("defines no mmbench hook (an @mmbench.hookimpl function such as "
                            "mmbench_register_mergers); point the entry point at the module that does")
        return hooks, problems

    def _call(self, ep: Any, plugin: Any, hooks: dict[str, Any], dist: str,
              version: str) -> tuple[list[Registered], list[str]]:
        """Call the plugin's hooks; what they registered, and what is wrong with it (nothing
        of it is kept when something is)."""
        staged: list[Registered] = []
        problems: list[str] = []
        package = (getattr(plugin, "__name__", None) or ep.value.split(":")[0]).split(".")[0]
        for kind, hook in _HOOKS.items():
            if hook not in hooks:
                continue

            def register(obj: Any = None, factory: Any = None, *rest: Any, _kind: str = kind,
                         _hook: str = hook) -> None:
                problem, name, obj = self._check(_kind, _hook, obj, factory, rest, staged)
                if problem:
                    problems.append(problem)
                if isinstance(name, str) and name:
                    staged.append(Registered(_kind, name, obj, ep.name, dist, version))

            try:
                hooks[hook](register=register)
            except Exception as exc:
                problems.append(f"{hook} raised {_raised(exc, package)}; fix the hook")
        return staged, problems

    def _check(self, kind: str, hook: str, obj: Any, factory: Any, rest: tuple,
               staged: list[Registered]) -> tuple[str, Any, Any]:
        """(what is wrong with ``register(obj[, factory])`` from ``hook`` or '', its name, the object)."""
        if kind == "executor":
            if rest or not isinstance(obj, str) or not obj or not callable(factory):
                return (f"{hook} calls register({_describe(obj)}, {_describe(factory)}); it takes "
                        "register(name, factory): a string name and a callable", None, factory)
            name, obj = obj, factory
        else:
            cls, cls_name = _kind_class(kind)
            name = getattr(obj, "name", None)
            if factory is not None or rest:
                return f"{hook} passes register more than one object; call it once per {kind}", name, obj
            if isinstance(obj, type):
                return (f"{hook} registered the class {obj.__name__}; register an instance: "
                        f"register({obj.__name__}())", name, obj)
            if not isinstance(obj, cls):
                other = next((k for k in ("attack", "merger", "defense", "detector", "preset")
                              if k != kind and isinstance(obj, _kind_class(k)[0])), None)
                if other:
                    return (f"{hook} registered {other} {name!r} (a {_kind_class(other)[1]}); register it from "
                            f"{_HOOKS[other]}", name, obj)
                return (f"{hook} registered {_describe(obj)}, which is not a {cls_name}; register "
                        + ("a mmbench.presets.Preset(...)" if kind == "preset" else
                           f"an instance of a {cls_name} subclass"), name, obj)
            if not isinstance(name, str) or not name:
                return (f"{hook} registered a {type(obj).__name__} whose name is {name!r}; give it a string "
                        "name (name = \"...\" on the class)", None, obj)
        if not _NAME.fullmatch(name):
            return (f"{kind} name {name!r} has characters other than letters, digits, '_' and '-' (or does not "
                    "start with a letter or digit); rename it", None, obj)
        if kind == "attack" and name == _NO_ATTACK:
            return f"attack {name!r} is reserved (--attack none means no attack); rename it", name, obj
        if kind in ("attack", "merger", "defense", "detector") and name == _HARNESS:
            return (f"{kind} name {name!r} is reserved (--set {_HARNESS}.tasks=K is the harness's own "
                    "setting); rename it", name, obj)
        for other in staged:
            if other.name == name:
                if other.kind == kind:
                    return f"registers {kind} {name!r} twice; rename one", name, obj
                return (f"registers {name!r} as a {other.kind} and as a {kind}; a name is unique across kinds: "
                        "rename one", name, obj)
        for other_kind in KINDS:
            other = self.items[other_kind].get(name)
            if other is None:
                continue
            owner = f"plugin package {other.distribution} (entry point {other.entry_point})"
            if other_kind == kind:
                return f"{kind} {name!r} is already registered by {owner}; rename it", name, obj
            return (f"{kind} {name!r} has the name of {other_kind} {name!r} of {owner}; a name is unique across "
                    "attacks, mergers, defenses, detectors and presets (--set and plugin_params address plugins by name): "
                    "rename it", name, obj)
        return "", name, obj

    def names(self, kind: str) -> list[str]:
        return sorted(self.items[kind])

    def get(self, kind: str, name: str) -> Registered:
        try:
            return self.items[kind][name]
        except KeyError:
            raise unknown_name(kind, name, self.names(kind), self) from None

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
