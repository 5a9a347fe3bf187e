"""A mistake in a third-party plugin package is one line naming the package and what to change;
that plugin is skipped, everything else keeps working, and selecting it is a usage error (exit 2)
that says why it was skipped.

The plugin packages here are fake: modules built in the test, behind fake entry points added
to the real ones (the built-ins) through a patched ``importlib.metadata.entry_points``."""
from __future__ import annotations

import importlib.metadata as md
import sys
import types
import weakref

import pytest

import mmbench
from mmbench import plugins
from mmbench.api import Defense, Merged, Merger
from mmbench.cli import main
from mmbench.plugins import Registry, UsageError


class _Dist:
    def __init__(self, name: str, version: str = "0.1.0") -> None:
        self.name, self.version = name, version


class _EntryPoint:
    group = "mmbench"

    def __init__(self, name: str, target, dist: str) -> None:
        self.name, self.dist, self._target = name, _Dist(dist), target
        self.value = target.__name__ if isinstance(target, types.ModuleType) else f"{dist.replace('-', '_')}"

    def load(self):
        if isinstance(self._target, BaseException):
            raise self._target
        return self._target


@pytest.fixture
def install(monkeypatch):
    """``install(entry_point, module_or_exception, dist=None)``: one more plugin package."""
    real = list(md.entry_points(group="mmbench"))
    extra: list[_EntryPoint] = []

    def entry_points(**kwargs):
        assert kwargs == {"group": "mmbench"}
        return real + extra

    monkeypatch.setattr(md, "entry_points", entry_points)
    monkeypatch.setattr(plugins, "_cache", {})  # the CLI loads a fresh registry
    monkeypatch.setattr(plugins, "_registries", weakref.WeakSet())  # our skips stay out of other tests

    def add(name: str, target, dist: str | None = None) -> None:
        if isinstance(target, types.ModuleType):
            monkeypatch.setitem(sys.modules, target.__name__, target)
        extra.append(_EntryPoint(name, target, dist or f"mmbench-{name}"))
    return add


def plugin(module_name: str, **hooks) -> types.ModuleType:
    """A plugin module: each keyword is a hook function, marked with @mmbench.hookimpl."""
    module = types.ModuleType(module_name)
    for hook, function in hooks.items():
        setattr(module, hook, mmbench.hookimpl(function))
    return module


def merger(name, base=Merger):
    return type(f"Fake_{name}", (base,), {"name": name, "merge": lambda self, pre, tv, ctx, params: Merged(pre, {})})


def registers(*objects):
    def hook(register):
        for obj in objects:
            register(obj)
    return hook


def warnings(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("mmbench: warning:")]


# a name that clashes: with a built-in of the same kind, and with a built-in of another kind ---------

def test_same_kind_clash_keeps_the_builtin_and_skips_the_whole_plugin(install):
    # "aaa" sorts before the built-in entry point "ta": built-ins still load first and keep their names
    install("aaa", plugin("mmbench_aaa", mmbench_register_mergers=registers(merger("ta")(), merger("aaa_extra")())))
    reg = Registry()
    assert reg.problems == ["plugin package mmbench-aaa (entry point aaa) skipped: merger 'ta' is already "
                            "registered by plugin package mmbench (entry point ta); rename it"]
    assert reg.get("merger", "ta").distribution == "mmbench"
    assert "aaa_extra" not in reg.names("merger")   # all that entry point registered is skipped
    assert reg.pm.get_plugin("aaa") is None
    with pytest.raises(UsageError, match=r"unknown merger 'aaa_extra': its plugin package mmbench-aaa "
                                         r"\(entry point aaa\) was skipped: merger 'ta' is already registered"):
        reg.get("merger", "aaa_extra")


def test_a_name_is_unique_across_kinds(install):
    install("foo", plugin("mmbench_foo", mmbench_register_mergers=registers(merger("dam")())))
    reg = Registry()
    [line] = reg.problems
    assert line.startswith("plugin package mmbench-foo (entry point foo) skipped: merger 'dam' has the name of "
                           "defense 'dam' of plugin package mmbench (entry point dam); a name is unique across ")
    assert line.endswith("rename it")
    assert "dam" not in reg.names("merger")
    assert reg.get("defense", "dam").distribution == "mmbench"


def test_two_third_party_plugins_first_loaded_keeps_the_name(install):
    install("avg_a", plugin("mmbench_avg_a", mmbench_register_mergers=registers(merger("avg")())))
    install("avg_b", plugin("mmbench_avg_b", mmbench_register_mergers=registers(merger("avg")())))
    reg = Registry()
    assert reg.get("merger", "avg").distribution == "mmbench-avg_a"
    assert reg.problems == ["plugin package mmbench-avg_b (entry point avg_b) skipped: merger 'avg' is already "
                            "registered by plugin package mmbench-avg_a (entry point avg_a); rename it"]


# hooks: misspelt, undecorated, wrong signature, none at all, raising ------------------------------

def test_misspelt_hook_names_the_closest_hook_and_skips_only_that_plugin(install):
    install("typo", plugin("mmbench_typo", mmbench_register_merger=registers(merger("typo")())))
    reg = Registry()
    assert reg.problems == ["plugin package mmbench-typo (entry point typo) skipped: defines "
                            "mmbench_register_merger, which is not an mmbench hook; did you mean "
                            "mmbench_register_mergers?"]
    assert reg.pm.get_plugin("typo") is None
    reg.pm.check_pending()  # nothing unknown is left registered with pluggy
    assert "ta" in reg.names("merger") and "badnets" in reg.names("attack")


def _undecorated(module_name):
    module = types.ModuleType(module_name)
    module.mmbench_register_mergers = registers(merger("plain")())
    return module


@pytest.mark.parametrize("target, expected", [
    (lambda: plugin("m1", mmbench_register_mergers=lambda reg: None),
     "mmbench_register_mergers takes (reg); an mmbench hook takes (register): rename its parameter to register"),
    (lambda: plugin("m2", mmbench_register_mergers=lambda: None),
     "mmbench_register_mergers takes (); an mmbench hook takes (register)"),
    (lambda: _undecorated("m3"),
     "defines mmbench_register_mergers without @mmbench.hookimpl, so it is never called; decorate it"),
    (lambda: types.ModuleType("m4"), "defines no mmbench hook"),
    (lambda: plugin("m5", mmbench_register_stuff=lambda register: None),
     "defines mmbench_register_stuff, which is not an mmbench hook; did you mean mmbench_register_"),
])
def test_bad_hook_definitions(install, target, expected):
    install("bad", target())
    reg = Registry()
    [line] = reg.problems
    assert line.startswith("plugin package mmbench-bad (entry point bad) skipped: ") and expected in line, line
    assert "\n" not in line


def test_raising_hook_is_one_line(install):
    def hook(register):
        register(merger("boomy")())
        raise ValueError("no weights\nfound")
    install("boom", plugin("mmbench_boom", mmbench_register_mergers=hook))
    reg = Registry()
    [line] = reg.problems
    assert line.startswith("plugin package mmbench-boom (entry point boom) skipped: mmbench_register_mergers "
                           "raised ValueError: no weights found")
    assert line.endswith("; fix the hook")
    assert "boomy" not in reg.names("merger")


def test_import_failure_is_one_line(install):
    install("gone", ModuleNotFoundError("No module named 'scipy'"))
    reg = Registry()
    assert reg.problems == ["plugin package mmbench-gone (entry point gone) skipped: importing mmbench_gone "
                            "failed: ModuleNotFoundError: No module named 'scipy'; fix it"]
    assert reg.broken == {"gone": "ModuleNotFoundError: No module named 'scipy'"}


def test_an_entry_point_name_used_twice(install):
    install("dup", plugin("mmbench_dup1", mmbench_register_mergers=registers(merger("dup1")())), "pkg-one")
    install("dup", plugin("mmbench_dup2", mmbench_register_mergers=registers(merger("dup2")())), "pkg-two")
    reg = Registry()
    assert reg.problems == ["plugin package pkg-two (entry point dup) skipped: entry point name 'dup' is already "
                            "used by plugin package pkg-one; rename the entry point in [project.entry-points.mmbench]"]
    assert "dup1" in reg.names("merger") and "dup2" not in reg.names("merger")


# bad registrations --------------------------------------------------------------------------------

class _NoName(Merger):
    pass


class _IntName(Merger):
    name = 3


class _DefenseX(Defense):
    name = "def_x"


@pytest.mark.parametrize("hook, obj, expected", [
    ("mmbench_register_mergers", _NoName(), "registered a _NoName whose name is ''; give it a string name"),
    ("mmbench_register_mergers", _IntName(), "registered a _IntName whose name is 3; give it a string name"),
    ("mmbench_register_mergers", object(), "which is not a mmbench.api.Merger; register an instance of a "
                                           "mmbench.api.Merger subclass"),
    ("mmbench_register_mergers", merger("cls"), "registered the class Fake_cls; register an instance: "
                                                "register(Fake_cls())"),
    ("mmbench_register_mergers", _DefenseX(), "registered defense 'def_x' (a mmbench.api.Defense); register it "
                                              "from mmbench_register_defenses"),
    ("mmbench_register_presets", {"name": "p"}, "which is not a mmbench.presets.Preset; register a "
                                                "mmbench.presets.Preset(...)"),
    ("mmbench_register_mergers", merger("my.avg")(), "merger name 'my.avg' has characters other than"),
    ("mmbench_register_mergers", merger("bad_ok")(), "registers merger 'bad_ok' twice; rename one"),
    ("mmbench_register_attacks", type("NoneAttack", (mmbench.api.Attack,), {"name": "none"})(),
     "attack 'none' is reserved (--attack none means no attack); rename it"),
    ("mmbench_register_mergers", merger("merge")(), "merger name 'merge' is reserved (--set merge.tasks=K is the "
                                                    "harness's own setting); rename it"),
])
def test_bad_registrations(install, hook, obj, expected):
    install("bad", plugin("mmbench_bad", **{hook: registers(merger("bad_ok")(), obj)}
                          if hook == "mmbench_register_mergers" else {hook: registers(obj)}))
    reg = Registry()
    [line] = reg.problems
    assert line.startswith("plugin package mmbench-bad (entry point bad) skipped: ") and expected in line, line
    assert "bad_ok" not in reg.names("merger")


# the CLI: warnings once, on stderr; exit 0 unless a skipped plugin is selected (then exit 2) --------

def _install_all_mistakes(install):
    install("clash", plugin("mmbench_clash", mmbench_register_mergers=registers(merger("ta")())))
    install("across", plugin("mmbench_across", mmbench_register_mergers=registers(merger("dam")())))
    install("typo", plugin("mmbench_typo", mmbench_register_merger=registers(merger("typo")())))

    def hook(register):
        register(merger("boomy")())
        raise RuntimeError("boom")
    install("boom", plugin("mmbench_boom", mmbench_register_mergers=hook))
    install("good", plugin("mmbench_good", mmbench_register_mergers=registers(merger("good")())))


def test_plugins_command_lists_the_rest_and_warns_once_per_mistake(install, capsys):
    _install_all_mistakes(install)
    assert main(["plugins"]) == 0
    out, err = capsys.readouterr()
    lines = warnings(err)
    assert len(lines) == 4 and len(err.splitlines()) == 4, err
    for package in ("mmbench-clash", "mmbench-across", "mmbench-typo", "mmbench-boom"):
        assert sum(f"plugin package {package} " in line for line in lines) == 1
    rows = {tuple(line.split()[:3]) for line in out.splitlines()}
    assert ("merger", "ta", "mmbench") in rows and ("defense", "dam", "mmbench") in rows
    assert ("merger", "good", "mmbench-good") in rows
    assert not any(name in out for name in ("boomy", "typo", "mmbench-clash"))
    assert main(["presets"]) == 0           # the same registry: warned once, not again
    assert warnings(capsys.readouterr().err) == []


@pytest.mark.parametrize("argv, expected", [
    (["--merger", "boomy"], "unknown merger 'boomy': its plugin package mmbench-boom (entry point boom) was "
                            "skipped: mmbench_register_mergers raised RuntimeError: boom"),
    (["--merger", "dam"], "unknown merger 'dam': its plugin package mmbench-across (entry point across) was "
                          "skipped: merger 'dam' has the name of defense 'dam'"),
    (["--merger", "typo"], "unknown merger 'typo': its plugin package mmbench-typo (entry point typo) was "
                           "skipped: defines mmbench_register_merger, which is not an mmbench hook"),
    (["--set", "boomy.x=1"], "unknown plugin in --set 'boomy': its plugin package mmbench-boom"),
])
def test_selecting_a_skipped_plugin_exits_2_and_says_why(install, capsys, tmp_path, argv, expected):
    _install_all_mistakes(install)
    code = main(["run", "--preset", "smoke", "--store", str(tmp_path / "store"), "--device", "cpu", *argv])
    err = capsys.readouterr().err
    assert code == 2
    assert f"mmbench: error: {expected}" in err, err
    assert len(warnings(err)) == 4
    assert not (tmp_path / "store" / "results").exists()


def test_selecting_a_working_plugin_is_not_an_error(install, capsys, tmp_path):
    _install_all_mistakes(install)
    assert main(["plugins", "--params", "good"]) == 0
    assert main(["plugins", "--params", "boomy"]) == 2
    assert "unknown plugin 'boomy': its plugin package mmbench-boom (entry point boom) was skipped" in \
        capsys.readouterr().err
