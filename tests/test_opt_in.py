"""Opt-in plugins (``opt_in = True``): installed and runnable by name, not in the default cross
product; the leaderboard shows their stored cells and checks them for staleness without
requiring them."""
from __future__ import annotations

import json

from mmbench.cli import main


def test_opt_in_defense_runs_only_when_named(store_copy, tmp_path, monkeypatch, capsys):
    from mmbench import presets
    from mmbench.graph import default_names, plan
    from mmbench.plugins import load

    monkeypatch.setenv("MMBENCH_PLUGINS", "ta,none,awm,presets,executors")
    registry = load()
    assert registry.names("defense") == ["awm", "none"] and default_names(registry, "defense") == ["none"]
    assert {c.defense for c in plan(registry, presets.SMOKE).cells} == {"none"}
    assert {c.defense for c in plan(registry, presets.SMOKE, defenses=["awm"]).cells} == {"awm"}
    assert main(["plugins"]) == 0
    line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("defense") and " awm " in l)
    assert "[opt-in: runs when named, e.g. --defense awm]" in line

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
