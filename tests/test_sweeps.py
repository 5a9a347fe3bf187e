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


# --- the number of merged tasks: the harness's own setting merge.tasks ---------------------------
def test_merge_tasks_all_is_the_presets_own_and_keeps_its_keys():
    from mmbench.graph import plan

    reg = load()
    preset = reg.get("preset", "smoke").obj
    own = plan(reg, preset, ["badnets"], ["ta"], ["none", "ibvs"], [0], detectors=[])
    same = plan(reg, preset, ["badnets"], ["ta"], ["none", "ibvs"], [0], {"merge": {"tasks": 2}}, detectors=[])
    one = plan(reg, preset, ["badnets"], ["ta"], ["none", "ibvs"], [0], {"merge": {"tasks": 1}}, detectors=[])
    assert list(own.stages) == list(same.stages)  # smoke has 2 tasks: merge.tasks=2 is the default
    assert {c.id for c in one.cells} == {"badnets__ta__none__set-merge.tasks=1-" + one.cells[0].setting[-8:] + "__seed0",
                                         "badnets__ta__ibvs__set-merge.tasks=1-" + one.cells[0].setting[-8:] + "__seed0"}
    # the shared stages are the preset's own; the merge and cells are new
    kinds = lambda g, kind: {s.key for s in g.of_kind(kind)}  # noqa: E731
    for kind in ("data", "base", "heads", "finetune", "eval-finetuned", "attack"):
        assert kinds(one, kind) == kinds(own, kind)
    for kind in ("merge", "cell"):
        assert kinds(one, kind).isdisjoint(kinds(own, kind))
    assert {s.tasks for s in one.of_kind("cell")} == {1} and {s.tasks for s in own.of_kind("cell")} == {None}


@pytest.mark.parametrize("value", [0, 3, 1.5, True, "two"])
def test_merge_tasks_out_of_range_is_a_usage_error(value):
    from mmbench.graph import plan

    reg = load()
    with pytest.raises(UsageError, match="merge.tasks must be a whole number from 1 to 2"):
        plan(reg, reg.get("preset", "smoke").obj, ["none"], ["ta"], ["none"], [0], {"merge": {"tasks": value}},
             detectors=[])


def test_only_merge_tasks_is_a_harness_setting():
    with pytest.raises(UsageError, match="the harness's own settings are merge.tasks"):
        parse(["merge.lambda=1,2"], load())


class _Upload:
    def __init__(self, *tasks):
        self.tasks = tasks

    def uploads(self):
        return {t: {} for t in self.tasks}


@pytest.mark.parametrize("n, attack, expected", [
    (None, ("c",), ["a", "b", "c", "d"]),      # every task, the default
    (1, ("c",), ["c"]),                        # the attacker's task alone
    (2, ("c",), ["a", "c"]),                   # then the others in preset order, kept in preset order
    (3, ("d", "b"), ["a", "b", "d"]),          # every upload of an attack on two tasks, then one more
    (2, None, ["a", "b"]),                     # no attack: the adversary task (b) comes first
])
def test_merged_tasks_are_the_uploads_then_the_others_in_preset_order(n, attack, expected):
    from types import SimpleNamespace

    from mmbench.execute import Worker

    preset = SimpleNamespace(task_names=("a", "b", "c", "d"), adversary_task="b")
    worker = SimpleNamespace(preset=preset)
    assert Worker.merged_tasks(worker, n, _Upload(*attack) if attack else None) == expected


def test_merged_tasks_fewer_than_the_uploads_is_an_error_of_the_cell():
    from types import SimpleNamespace

    from mmbench.execute import Worker

    worker = SimpleNamespace(preset=SimpleNamespace(task_names=("a", "b", "c"), adversary_task="a"))
    with pytest.raises(ValueError, match=r"merge.tasks=1 is fewer than the 2 tasks the attack uploads to \(a, c\)"):
        Worker.merged_tasks(worker, 1, _Upload("a", "c"))


def test_a_merge_tasks_sweep_through_the_cli_and_the_leaderboard(store_copy, tmp_path, capsys):
    args = ["run", "--preset", "smoke", "--attack", "none", "--attack", "badnets", "--merger", "ta",
            "--defense", "none", "--sweep", "merge.tasks=1,2", "--store", str(store_copy)]
    assert main(args) == 0
    # each cell's line says which sweep value (and seed) it is; K = 2 is smoke's own cell
    lines = [l for l in capsys.readouterr().out.splitlines() if l.split()[:3] == ["badnets", "ta", "none"]]
    assert [l.rsplit("[", 1)[1] for l in lines] == ["seed 0, merge.tasks=1]", "seed 0]"]
    folder = store_copy / "results" / "smoke"
    own = json.loads((folder / "badnets__ta__none__seed0.json").read_text())
    one = next(json.loads(p.read_text()) for p in folder.glob("badnets__ta__none__set-merge.tasks=1-*__seed0.json"))
    assert own["setting"] == {} and one["setting"] == {"merge": {"tasks": 1}}
    adversary = one["info"]["attack"]["task"]
    assert one["info"]["merged_tasks"] == [adversary]
    assert list(one["metrics"]["acc_per_task"]) == [adversary]
    # ACC is the mean over the merged tasks: with one task, that task's ACC
    assert one["metrics"]["acc"] == one["metrics"]["acc_per_task"][adversary]
    assert len(own["metrics"]["acc_per_task"]) == 2
    clean = next(json.loads(p.read_text()) for p in folder.glob("none__ta__none__set-merge.tasks=1-*__seed0.json"))
    assert clean["info"]["merged_tasks"] == [adversary]  # smoke's adversary task: the attacked merge's tasks
    out = tmp_path / "board"
    out.mkdir()
    assert main(["leaderboard", "--store", str(store_copy), "--preset", "smoke", "--out", str(out)]) == 0
    section = (out / "README.md").read_text().split("### Sweeps, preset `smoke`")[1].split("###")[0]
    rows = [line for line in section.splitlines() if "merge.tasks" in line and "| badnets" in line]
    assert [row.split("|")[5].strip() for row in rows] == ["1", "2"]


def test_plan_prices_a_sweep_with_shared_stages_once(tmp_path, capsys):
    # vit-b-32-6task, offline: one attack, TA at two λ and two task counts = 4 settings. The
    # settings share 6 data stages, base, heads, 6 fine-tunes, the eval and the attack (16 stages,
    # listed once); each has its own merge and cell: 16 + 4 × 2 = 24 stages, 4 cells.
    assert main(["plan", "--preset", "vit-b-32-6task", "--store", str(tmp_path), "--attack", "badnets",
                 "--merger", "ta", "--defense", "none", "--seed", "0",
                 "--sweep", "ta.lambda=0.3,0.5", "--sweep", "merge.tasks=2,6"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("sweep of 4 settings: ta.lambda=0.3, merge.tasks=2; ta.lambda=0.3, merge.tasks=6; "
                          "ta.lambda=0.5, merge.tasks=2; ta.lambda=0.5, merge.tasks=6")
    assert "4 cells: 1 attacks × 1 mergers × 1 defenses × 1 seeds × 4 settings" in out
    assert "0 of 24 stages cached" in out
    assert out.count("finetune[cifar100, seed 0]  ") == 1
    assert not (tmp_path / "artifacts").exists() and not (tmp_path / "results").exists()
