"""Opt-in plugins: installed and runnable by name, not in the default cross product (a preset's
``opt_in`` names, or ``opt_in = True`` on a plugin); the leaderboard shows their stored cells and
checks them for staleness without requiring them."""
from __future__ import annotations

import json
from dataclasses import replace
from types import SimpleNamespace

from mmbench.cli import main


def test_a_plugin_may_declare_itself_opt_in_everywhere():
    from mmbench import presets
    from mmbench.graph import opt_in
    from mmbench.plugins import Registered

    reg = Registered("defense", "x", SimpleNamespace(opt_in=True), "pkg", "mod", "1")
    plain = Registered("defense", "y", SimpleNamespace(), "pkg", "mod", "1")
    assert opt_in(reg) and opt_in(reg, presets.SMOKE) and not opt_in(plain)
    assert opt_in(plain, replace(presets.SMOKE, opt_in=("y",)))
    assert presets.SMOKE.key() == replace(presets.SMOKE, opt_in=("y",)).key()   # in no stage key


def test_opt_in_defense_runs_only_when_named(store_copy, tmp_path, monkeypatch, capsys):
    from mmbench.graph import default_names, plan
    from mmbench.plugins import Registered, load

    monkeypatch.setenv("MMBENCH_PLUGINS", "ta,none,awm,presets,executors")
    registry = load()
    smoke = replace(registry.get("preset", "smoke").obj, opt_in=("awm",))   # smoke with awm opt-in
    monkeypatch.setitem(registry.items["preset"], "smoke", Registered("preset", "smoke", smoke, "t", "t", "0"))
    assert registry.names("defense") == ["awm", "none"] and default_names(registry, "defense", smoke) == ["none"]
    assert {c.defense for c in plan(registry, smoke).cells} == {"none"}
    assert {c.defense for c in plan(registry, smoke, defenses=["awm"]).cells} == {"awm"}
    assert main(["plugins"]) == 0
    line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("defense") and " awm " in l)
    assert "[opt-in on smoke, tiny: runs there when named]" in line     # tiny leaves awm out too

    board = tmp_path / "board"
    board_args = ["leaderboard", "--preset", "smoke", "--store", str(store_copy), "--out", str(board)]
    assert main(board_args) == 0
    capsys.readouterr()
    assert main(board_args + ["--check"]) == 0                   # no awm cell stored: not required
    assert "none/ta/awm" not in capsys.readouterr().out

    assert main(["run", "--preset", "smoke", "--attack", "none", "--merger", "ta", "--defense", "awm",
                 "--store", str(store_copy), "--quiet", "--jobs", "1"]) == 0
    path = store_copy / "results" / "smoke" / "none__ta__awm__seed0.json"
    result = json.loads(path.read_text())
    assert result["status"] == "ok" and result["info"]["defense"]["steps"] == 5   # smoke's budget
    assert main(board_args) == 0
    assert "awm" in (board / "README.md").read_text()             # a stored opt-in cell is shown
    capsys.readouterr()
    assert main(board_args + ["--check"]) == 0
    assert main(["prune", "--store", str(store_copy)]) == 0
    assert "nothing to prune" in capsys.readouterr().out         # its key is a current cell's

    path.write_text(json.dumps({**result, "key": "0" * 64}))       # made by other code: stale
    assert main(board_args + ["--check"]) == 1
    assert "smoke none/ta/awm seed 0: stale" in capsys.readouterr().out
