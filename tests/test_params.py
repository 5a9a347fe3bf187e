"""Declared plugin parameters: --set and preset values are checked before anything runs."""
from dataclasses import replace

import pytest

from mmbench.api import Merger, Param
from mmbench.cli import main
from mmbench.params import check, declared
from mmbench.graph import resolve_params
from mmbench.plugins import Registered, UsageError, load


def error_lines(capsys) -> list[str]:
    err = capsys.readouterr().err
    return [line for line in err.strip().splitlines() if not line.startswith("mmbench: warning")]


@pytest.fixture
def nothing_runs(monkeypatch):
    """Fail the test if a run gets as far as computing a cell."""
    from mmbench import run

    def refuse(*args, **kwargs):
        raise AssertionError("execute_graph was reached: the check came too late")
    monkeypatch.setattr(run, "execute_graph", refuse)


@pytest.mark.parametrize("setting, needles", [
    ("ta.lambda=abc", ["--set ta.lambda='abc': not a number", "ta.lambda is a float ≥ 0 (default 0.3)"]),
    ("ta.lambda=-1", ["--set ta.lambda=-1: below the minimum 0", "a float ≥ 0"]),
    ("ties.merge=median", ["not one of the choices", "one of 'sum', 'mean', 'max' (default 'sum')"]),
    ("ta.lamda=0.5", ["unknown parameter ta.lamda", "merger ta has: lambda (did you mean 'lambda'?)"]),
    ("ties.k=0", ["not above the minimum 0", "ties.k is a float > 0 (default 0.2)"]),
    ("adamerging.steps=2.5", ["not an integer", "an integer ≥ 0 (default 500)"]),
    ("adamerging.plus=1", ["not true or false"]),
    ("badtv.lambda_range=[0.3]", ["1 element, not 2", "a list of 2 floats each ≥ 0"]),
    ("sbv.fraction=1.5", ["above the maximum 1", "a float in (0, 1] or 'auto' (default 'auto')"]),
    ("badnets.task=3", ["not a string", "a string or null (default null)"]),
])
def test_bad_set_is_one_line_exit_2_before_anything_runs(setting, needles, tmp_path, capsys, nothing_runs):
    store = tmp_path / "store"
    assert main(["run", "--preset", "smoke", "--set", setting, "--store", str(store)]) == 2
    lines = error_lines(capsys)
    assert len(lines) == 1 and lines[0].startswith("mmbench: error: "), lines
    for needle in needles:
        assert needle in lines[0]
    assert not store.exists() or not any(store.rglob("*"))  # nothing computed, nothing written


def test_plan_gets_the_same_checks(tmp_path, capsys):
    assert main(["plan", "--preset", "smoke", "--set", "ta.lambda=abc", "--store", str(tmp_path)]) == 2
    lines = error_lines(capsys)
    assert len(lines) == 1 and "--set ta.lambda='abc': not a number" in lines[0]


def test_set_for_a_plugin_outside_the_selection_is_checked_too(tmp_path, capsys, nothing_runs):
    argv = ["run", "--preset", "smoke", "--merger", "ties", "--set", "ta.lambda=abc", "--store", str(tmp_path)]
    assert main(argv) == 2
    assert "ta.lambda='abc'" in error_lines(capsys)[0]


def register_preset(monkeypatch, name: str, plugin_params: dict) -> None:
    """Register a variant of `smoke` with other plugin_params, as an installed preset would be."""
    registry = load()
    smoke = registry.get("preset", "smoke")
    preset = replace(smoke.obj, name=name, plugin_params=plugin_params)
    monkeypatch.setitem(registry.items["preset"], name,
                        Registered("preset", name, preset, "test", "tests", "0"))


def test_misspelt_preset_key_is_an_error(monkeypatch, tmp_path, capsys, nothing_runs):
    register_preset(monkeypatch, "typo", {"ta": {"lamda": 0.5}})
    assert main(["run", "--preset", "typo", "--store", str(tmp_path / "store")]) == 2
    lines = error_lines(capsys)
    assert lines == ["mmbench: error: preset typo sets unknown parameter ta.lamda; "
                     "merger ta has: lambda (did you mean 'lambda'?)"]
    assert not (tmp_path / "store").exists() or not any((tmp_path / "store").rglob("*"))


def test_bad_preset_value_is_an_error(monkeypatch, tmp_path, capsys):
    register_preset(monkeypatch, "bad", {"dam": {"masks": "triple"}})
    assert main(["plan", "--preset", "bad", "--store", str(tmp_path)]) == 2
    line = error_lines(capsys)[0]
    assert "preset bad sets dam.masks='triple': not one of the choices" in line
    assert "one of 'single', 'dual'" in line


def test_preset_may_configure_plugins_that_are_not_installed(monkeypatch):
    register_preset(monkeypatch, "optional", {"not_installed": {"anything": 1}, "ta": {"lambda": 1}})
    registry = load()
    preset = registry.get("preset", "optional").obj
    params = resolve_params(registry.get("merger", "ta"), preset, {})
    assert params == {"lambda": 1.0} and isinstance(params["lambda"], float)  # int 1 → float 1.0


def test_values_are_coerced_and_layered():
    registry = load()
    smoke = registry.get("preset", "smoke").obj
    ties = registry.get("merger", "ties")
    # defaults, then the preset (smoke sets ties.lambda 1.5, nothing else for ties), then --set
    assert resolve_params(ties, smoke, {}) == {"k": 0.2, "merge": "sum", "lambda": 1.5}
    got = resolve_params(ties, smoke, {"ties": {"k": 1, "merge": "max"}})
    assert got == {"k": 1.0, "merge": "max", "lambda": 1.5} and type(got["k"]) is float
    assert resolve_params(ties, smoke, {"ties": {"lambda": 1}})["lambda"] == 1.0
    # the smoke preset's own values pass through unchanged: dam.steps 5 stays the int 5
    assert resolve_params(registry.get("defense", "dam"), smoke, {})["steps"] == 5
    sbv = declared(registry.get("attack", "sbv").obj)
    assert check("attack", "sbv", sbv, {"fraction": "auto", "lambda_sbv": 2, "target_class": None,
                                         "lambda_grid": (1, 0.5)}, "--set") == \
        {"fraction": "auto", "lambda_sbv": 2.0, "target_class": None, "lambda_grid": [1.0, 0.5]}
    with pytest.raises(UsageError, match="not an integer"):
        check("attack", "sbv", sbv, {"n": True}, "--set")  # a bool is not an int
    with pytest.raises(UsageError, match="null is not allowed"):
        check("attack", "sbv", sbv, {"n": None}, "--set")


def test_every_builtin_declares_its_parameters():
    registry = load()
    for kind in ("attack", "merger", "defense"):
        for name in registry.names(kind):
            reg = registry.get(kind, name)
            if reg.distribution != "mmbench":
                continue
            params = declared(reg.obj)
            assert params == reg.obj.params and reg.obj.defaults == {k: p.default for k, p in params.items()}
            for key, p in params.items():
                assert p.help and p.type != "any", f"{name}.{key} is not declared"
    # the built-in presets' values all fit the declarations
    for preset in registry.names("preset"):
        p = registry.get("preset", preset).obj
        for kind in ("attack", "merger", "defense"):
            for name in registry.names(kind):
                resolve_params(registry.get(kind, name), p, {})


def test_plugins_params_shows_the_declaration(capsys):
    assert main(["plugins", "--params", "ta"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("lambda"))
    from mmbench.presets import TINY

    tiny_lambda = str(TINY.plugin_params["ta"]["lambda"])
    assert row.split()[:4] == ["lambda", "float", "0.3", "≥"] and row.split()[5] == tiny_lambda  # tiny's override
    assert main(["plugins", "--params", "dam", "--preset", "smoke"]) == 0
    out = capsys.readouterr().out
    assert "preset smoke" in out and next(l for l in out.splitlines() if l.startswith("steps")).split()[5] == "5"
    assert main(["plugins", "--params", "ties", "--preset", "smoke"]) == 0
    out = capsys.readouterr().out
    assert "'sum' | 'mean' | 'max'" in out and "preset smoke" in out  # smoke sets ties.lambda
    assert next(l for l in out.splitlines() if l.startswith("lambda")).split()[5] == "1.5"
    assert main(["plugins", "--params", "tie"]) == 2
    line = error_lines(capsys)
    assert len(line) == 1 and "unknown plugin 'tie'" in line[0] and "did you mean 'ties'?" in line[0]


class LegacyMerger(Merger):
    """A third-party merger written before Param existed: only ``defaults``."""

    name = "legacy"
    defaults = {"scale": 1.0, "steps": 3, "mode": "a", "extra": None, "flag": False}

    def merge(self, pretrained, task_vectors, ctx, params):
        raise NotImplementedError


class DuckMerger:
    """Not even a subclass: an object with a name and ``defaults``."""

    name = "duck"
    defaults = {"scale": 0.5}


def test_plugin_with_only_defaults_still_resolves():
    smoke = load().get("preset", "smoke").obj
    legacy = Registered("merger", "legacy", LegacyMerger(), "legacy", "third-party", "1.0")
    assert resolve_params(legacy, smoke, {}) == LegacyMerger.defaults
    got = resolve_params(legacy, smoke, {"legacy": {"scale": 2, "steps": 7, "extra": {"any": "thing"}}})
    assert got == {"scale": 2.0, "steps": 7, "mode": "a", "extra": {"any": "thing"}, "flag": False}
    # the declaration inferred from each default's type: 1.0 a float, 3 an int, None anything
    assert {k: p.type for k, p in LegacyMerger.params.items()} == \
        {"scale": "float", "steps": "int", "mode": "str", "extra": "any", "flag": "bool"}
    with pytest.raises(UsageError, match="legacy.steps=0.5: not an integer"):
        resolve_params(legacy, smoke, {"legacy": {"steps": 0.5}})
    with pytest.raises(UsageError, match="did you mean 'scale'"):
        resolve_params(legacy, smoke, {"legacy": {"scal": 1.0}})
    duck = Registered("merger", "duck", DuckMerger(), "duck", "third-party", "1.0")
    assert resolve_params(duck, smoke, {"duck": {"scale": 1}}) == {"scale": 1.0}


def test_declarations_are_checked_when_written():
    with pytest.raises(TypeError, match="does not fit its own declaration"):
        Param(-1.0, "float", min=0)
    with pytest.raises(TypeError, match="type must be one of"):
        Param(1, "number")
    with pytest.raises(TypeError, match="disagree"):
        class Both(Merger):
            params = {"a": Param(1.0)}
            defaults = {"a": 2.0}
    assert Param(None, "int").nullable and Param(0.3).type == "float"


def test_subclass_changing_a_default_keeps_the_declaration():
    ta = type(load().get("merger", "ta").obj)

    class Half(ta):
        name = "half"
        defaults = {"lambda": 0.5}
    assert Half.params["lambda"].default == 0.5 and Half.params["lambda"].min == 0
    assert Half.params["lambda"].help == ta.params["lambda"].help
