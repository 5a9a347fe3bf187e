"""Plugin parameters: declarations (:class:`mmbench.api.Param`) and the checks on set values.

Every value a preset's ``plugin_params`` or ``--set plugin.name=value`` gives a plugin
goes through :func:`check` before anything runs: an unknown name or a value that does
not fit its declaration is a :class:`~mmbench.plugins.UsageError` of one line saying
what is allowed (``mmbench: error: ...``, exit status 2), never a failed cell later.

A plugin that sets only ``defaults`` (the older contract) gets declarations inferred
from each default's Python type (:func:`infer`): 0.3 a float, 500 an int, "sum" a
string, True a bool, [0.2, 1.0] a list of floats; a None default accepts anything.
"""
from __future__ import annotations

import difflib
import json
import math
from dataclasses import replace
from typing import Any

from .api import PARAM_TYPES, Param
from .plugins import UsageError

_NOUNS = {"float": "a float", "int": "an integer", "bool": "true or false", "str": "a string",
          "list[float]": "a list of floats", "list[str]": "a list of strings", "any": "any value"}


class Invalid(ValueError):
    """A value does not fit a declaration (the message says why, in a few words)."""


# --- declarations ---------------------------------------------------------------------
def infer_type(default: Any) -> str:
    """The declared type a default implies (the fallback for plugins with only ``defaults``)."""
    if isinstance(default, bool):
        return "bool"
    if isinstance(default, int):
        return "int"
    if isinstance(default, float):
        return "float"
    if isinstance(default, str):
        return "str"
    if isinstance(default, (list, tuple)) and default:
        if all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in default):
            return "list[float]"
        if all(isinstance(x, str) for x in default):
            return "list[str]"
    return "any"


def infer(default: Any) -> Param:
    """The declaration of a parameter known only by its default."""
    return Param(default, infer_type(default), help="(undeclared: inferred from the default)")


def validate_declaration(p: Param) -> None:
    """Complete and check a :class:`Param` as it is made (a plugin author's mistake is a
    TypeError at import time, which ``mmbench plugins`` reports as a broken entry point)."""
    if not p.type:
        object.__setattr__(p, "type", infer_type(p.default))
    if p.type not in PARAM_TYPES:
        raise TypeError(f"Param type must be one of {', '.join(PARAM_TYPES)}, not {p.type!r}")
    if p.default is None:
        object.__setattr__(p, "nullable", True)
    if isinstance(p.special, str):
        object.__setattr__(p, "special", (p.special,))
    object.__setattr__(p, "special", tuple(p.special))
    if not all(isinstance(s, str) for s in p.special):
        raise TypeError(f"Param special values must be strings, not {p.special!r}")
    if p.choices is not None:
        object.__setattr__(p, "choices", tuple(p.choices))
        if not p.choices:
            raise TypeError("Param choices must not be empty")
    if "\n" in p.help:
        raise TypeError(f"Param help must be one line: {p.help!r}")
    if p.length is not None and not p.type.startswith("list"):
        raise TypeError(f"Param length applies to lists, not to {p.type}")
    try:
        coerce(p, p.default)
    except Invalid as exc:
        raise TypeError(f"Param default {show(p.default)} does not fit its own declaration: {exc}") from None


def derive_class_params(cls: type) -> tuple[dict[str, Param], dict[str, Any]]:
    """(params, defaults) of a plugin class as it is defined (``_Plugin.__init_subclass__``).

    ``params`` in the class body: ``defaults`` is derived from it. Only ``defaults``: each
    key keeps the inherited declaration with the new default, or is inferred. Neither:
    both inherited."""
    own = cls.__dict__
    if "params" in own:
        params = own["params"]
        if not isinstance(params, dict) or not all(isinstance(p, Param) for p in params.values()):
            raise TypeError(f"{cls.__name__}.params must be a dict of mmbench.api.Param")
        defaults = {k: p.default for k, p in params.items()}
        if "defaults" in own and own["defaults"] != defaults:
            raise TypeError(f"{cls.__name__} sets both params and defaults and they disagree: "
                            f"declare the defaults in params only")
        return dict(params), defaults
    if "defaults" in own:
        inherited = getattr(cls, "params", {}) or {}
        defaults = dict(own["defaults"] or {})
        return {k: replace(inherited[k], default=v) if k in inherited else infer(v)
                for k, v in defaults.items()}, defaults
    return dict(getattr(cls, "params", {}) or {}), dict(getattr(cls, "defaults", {}) or {})


def declared(obj: Any) -> dict[str, Param]:
    """A registered plugin object's declaration: its ``params``, or what its ``defaults``
    imply (for objects that are not :mod:`mmbench.api` subclasses, or whose ``defaults``
    were changed on the instance)."""
    params = getattr(obj, "params", None)
    base = params if isinstance(params, dict) and all(isinstance(p, Param) for p in params.values()) else {}
    defaults = getattr(obj, "defaults", None)
    if not isinstance(defaults, dict) or defaults == {k: p.default for k, p in base.items()}:
        return dict(base)
    return {k: replace(base[k], default=v) if k in base else infer(v) for k, v in defaults.items()}


# --- values -----------------------------------------------------------------------------
def show(value: Any) -> str:
    """A value as a user would type it: strings quoted, JSON for the rest (null, true, [..])."""
    if isinstance(value, str):
        return repr(value)
    try:
        return json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        return repr(value)


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def bounds(p: Param) -> str:
    """The range of a number as text: "≥ 0", "> 0", "≤ 1", "in [0, 1]", "in (0, 1]" ("" if none)."""
    if p.min is not None and p.max is not None:
        return f"in {'(' if p.min_exclusive else '['}{_num(p.min)}, {_num(p.max)}]"
    if p.min is not None:
        return f"{'>' if p.min_exclusive else '≥'} {_num(p.min)}"
    if p.max is not None:
        return f"≤ {_num(p.max)}"
    return ""


def allowed(p: Param) -> str:
    """What a value may be besides its type: range or choices, special strings, null."""
    if p.choices is not None:
        parts = [" | ".join(show(c) for c in p.choices)]
    elif p.type == "bool":
        parts = ["true | false"]
    else:
        rng = bounds(p)
        parts = [f"{p.length} elements" if p.length is not None else "",
                 ("each " if rng and p.type.startswith("list") else "") + rng]
        parts = [", ".join(x for x in parts if x) or "any"]
    parts += [show(s) for s in p.special] + (["null"] if p.nullable else [])
    return " or ".join(x for x in parts if x)


def describe(p: Param) -> str:
    """ "a float ≥ 0", "one of 'sum', 'mean', 'max'", "an integer ≥ 0 or null", ..."""
    if p.choices is not None:
        text = "one of " + ", ".join(show(c) for c in p.choices)
    else:
        noun = _NOUNS[p.type]
        if p.length is not None:
            noun = f"a list of {p.length} {p.type[5:-1]}s" if p.type != "list[str]" else f"a list of {p.length} strings"
        rng = bounds(p)
        text = noun + (f" {'each ' if p.type.startswith('list') else ''}{rng}" if rng else "")
    alts = [show(s) for s in p.special] + (["null"] if p.nullable else [])
    return text + "".join(f" or {a}" for a in alts)


def _number(value: Any, what: str = "") -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise Invalid(f"{what}not a number")
    if not math.isfinite(value):
        raise Invalid(f"{what}not a finite number")
    return value


def _in_range(p: Param, x: float, what: str = "") -> None:
    if p.min is not None and (x <= p.min if p.min_exclusive else x < p.min):
        raise Invalid(f"{what}{'not above' if p.min_exclusive else 'below'} the minimum {_num(p.min)}")
    if p.max is not None and x > p.max:
        raise Invalid(f"{what}above the maximum {_num(p.max)}")


def coerce(p: Param, value: Any) -> Any:
    """The value the plugin gets (ints become floats for float parameters), or :class:`Invalid`."""
    if value is None:
        if p.nullable:
            return None
        raise Invalid("null is not allowed")
    if isinstance(value, str) and value in p.special:
        return value
    t = p.type
    if t == "any":
        out = value
    elif t == "float":
        out = float(_number(value))
    elif t == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise Invalid("not an integer")
        out = value
    elif t == "bool":
        if not isinstance(value, bool):
            raise Invalid("not true or false")
        out = value
    elif t == "str":
        if not isinstance(value, str):
            raise Invalid("not a string")
        out = value
    else:  # lists
        if not isinstance(value, (list, tuple)):
            raise Invalid("not a list")
        if p.length is not None and len(value) != p.length:
            raise Invalid(f"{len(value)} element{'s' * (len(value) != 1)}, not {p.length}")
        if t == "list[float]":
            out = [float(_number(x, f"element {i} ")) for i, x in enumerate(value)]
        else:
            for i, x in enumerate(value):
                if not isinstance(x, str):
                    raise Invalid(f"element {i} is not a string")
            out = list(value)
    if p.choices is not None and out not in p.choices:
        raise Invalid("not one of the choices")
    if t in ("float", "int"):
        _in_range(p, out)
    elif t == "list[float]":
        for i, x in enumerate(out):
            _in_range(p, x, f"element {i} ")
    return out


def check(kind: str, plugin_name: str, declared: dict[str, Param], values: dict[str, Any],
          source: str) -> dict[str, Any]:
    """``values`` checked against ``declared`` and coerced; a :class:`UsageError` of one line
    for an unknown name or a bad value. ``source`` is ``"--set"`` or ``"preset NAME"``."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        full = f"{plugin_name}.{key}"
        if key not in declared:
            known = sorted(declared)
            close = difflib.get_close_matches(key, known, n=1)
            has = (f"{kind} {plugin_name} has: {', '.join(known)}" if known
                   else f"{kind} {plugin_name} has no parameters")
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            where = (f"--set {full}={show(value)}: unknown parameter {full}" if source == "--set"
                     else f"{source} sets unknown parameter {full}")
            raise UsageError(f"{where}; {has}{hint}")
        p = declared[key]
        try:
            out[key] = coerce(p, value)
        except Invalid as exc:
            where = f"--set {full}={show(value)}" if source == "--set" else f"{source} sets {full}={show(value)}"
            help_ = f": {p.help}" if p.help else ""
            raise UsageError(f"{where}: {exc}; {full} is {describe(p)} (default {show(p.default)}){help_}") from None
    return out
