"""`mmbench run --sweep`: one setting per value, each its own cells; the leaderboard's sweep table."""
from __future__ import annotations

import json

import pytest

from mmbench.cli import main
from mmbench.plugins import UsageError, load
from mmbench.sweeps import parse


def test_parse_gives_the_cartesian_product_in_order():
    reg = load()
    assert parse(["ta.lambda=0.1,0.3"], reg) == [{"ta": {"lambda": 0.1}}, {"ta": {"lambda": 0.3}}]
    combos = parse(["ta.lambda=0.1,0.3", "ties.k=0.2,0.4"], reg)
    assert combos == [{"ta": {"lambda": 0.1}, "ties": {"k": 0.2}}, {"ta": {"lambda": 0.1}, "ties": {"k": 0.4}},
                      {"ta": {"lambda": 0.3}, "ties": {"k": 0.2}}, {"ta": {"lambda": 0.3}, "ties": {"k": 0.4}}]


@pytest.mark.parametrize("item, message", [("ta.lambda", "PLUGIN.PARAM=V1,V2"), ("ta.lambda=0.1,,0.3", "empty"),
                                           ("ta.lambda=0.1,0.1", "repeats"), ("tiess.k=0.1", "in --sweep .*did you mean 'ties'")])
def test_bad_sweeps_are_usage_errors(item, message):
    with pytest.raises(UsageError, match=message):
        parse([item], load())


def test_a_sweep_through_the_cli_and_the_leaderboard(store_copy, tmp_path, capsys):
    args = ["run", "--preset", "smoke", "--attack", "none", "--merger", "ta", "--defense", "none",
            "--sweep", "ta.lambda=0.5,1.0,1.5", "--store", str(store_copy)]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "sweep 1/3: ta.lambda=0.5" in err and "sweep 3/3: ta.lambda=1.5" in err
    folder = store_copy / "results" / "smoke"
    results = {p.stem: json.loads(p.read_text()) for p in folder.glob("none__ta__none*.json")}
    # 1.0 is smoke's own λ: the preset's own cell; the others carry their setting
    assert results["none__ta__none__seed0"]["setting"] == {}
    swept = {r["setting"]["ta"]["lambda"]: r for r in results.values() if r["setting"]}
    assert set(swept) == {0.5, 1.5}
    assert swept[0.5]["metrics"]["acc"] != swept[1.5]["metrics"]["acc"]
    out = tmp_path / "board"
    out.mkdir()
    assert main(["leaderboard", "--store", str(store_copy), "--preset", "smoke", "--out", str(out)]) == 0
    readme = (out / "README.md").read_text()
    section = readme.split("### Sweeps, preset `smoke`")[1].split("###")[0]
    rows = [line for line in section.splitlines() if "ta.lambda" in line]
    assert [row.split("|")[5].strip() for row in rows] == ["0.5", "1", "1.5"]
    assert (out / "plots" / "smoke-sweeps.svg").exists()
