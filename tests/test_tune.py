"""`mmbench tune`: the selection rules on hand-made rows, and the command on smoke, which must
never touch a test split."""
from __future__ import annotations

import json

import pytest

from mmbench.cli import main
from mmbench.tune import choose_attack, choose_merger, grid_points, parse_grid


def test_grid_is_the_cartesian_product_in_the_order_given():
    grid = parse_grid(["k=0.2,1", "merge=sum,mean"])
    assert grid == {"k": [0.2, 1], "merge": ["sum", "mean"]}
    assert grid_points(grid) == [{"k": 0.2, "merge": "sum"}, {"k": 0.2, "merge": "mean"},
                                 {"k": 1, "merge": "sum"}, {"k": 1, "merge": "mean"}]


def test_merger_rule_takes_the_best_normalised_dev_acc_first_on_ties():
    rows = [{"point": {"lambda": 0.5}, "dev_normalized_acc": 0.80},
            {"point": {"lambda": 0.7}, "dev_normalized_acc": 0.92},
            {"point": {"lambda": 0.9}, "dev_normalized_acc": 0.92}]
    assert choose_merger(rows)["point"] == {"lambda": 0.7}


def test_attack_rule_takes_the_first_point_that_reaches_the_asr_within_the_acc_tolerance():
    row = lambda rate, asr, acc: {"point": {"poison_rate": rate}, "dev_asr": asr, "dev_acc": acc,  # noqa: E731
                                  "clean_dev_acc": 0.86}
    rows = [row(0.05, 0.20, 0.86), row(0.1, 0.95, 0.83), row(0.2, 0.97, 0.85), row(0.3, 0.99, 0.85)]
    # 0.1 reaches 90 % ASR but loses 3 points of ACC; 0.2 is the first within 2 points
    assert choose_attack(rows, 0.9, 0.02)["point"] == {"poison_rate": 0.2}
    # nothing within 1 point: the highest dev ASR
    assert choose_attack(rows, 0.9, 0.001)["point"] == {"poison_rate": 0.3}


@pytest.fixture
def no_test_split(monkeypatch):
    """Fail loudly if tuning evaluates a test split. The one exception is the attack stage's own
    record of the attacked model alone (Runner.standalone, stored with every attack artifact for
    the leaderboard), which tune computes as a side effect and never reads."""
    import inspect

    from mmbench.context import SharedStages

    original = SharedStages.run_predictions

    def guarded(self, weights, task, split, *args, **kwargs):
        inside_record = any(f.function == "standalone" for f in inspect.stack())
        assert split != "test" or inside_record, f"tune evaluated the test split of {task}"
        return original(self, weights, task, split, *args, **kwargs)
    monkeypatch.setattr(SharedStages, "run_predictions", guarded)


def test_tune_a_merger_on_smoke_uses_dev_only(store_copy, tmp_path, capsys, no_test_split):
    out = tmp_path / "ta.json"
    assert main(["tune", "--preset", "smoke", "--merger", "ta", "--grid", "lambda=0.1,0.5,1.0", "--seed", "0",
                 "--store", str(store_copy), "--quiet", "--json", str(out)]) == 0
    sweep = json.loads(out.read_text())
    rows = sweep["rows"]
    assert [r["point"]["lambda"] for r in rows] == [0.1, 0.5, 1.0]
    best = max(rows, key=lambda r: r["dev_normalized_acc"])
    assert sweep["chosen"] == best["point"]
    assert len({round(r["dev_acc"], 6) for r in rows}) == 3  # λ changes the merge
    assert "chosen: " + json.dumps(best["point"]) in capsys.readouterr().out


def test_tune_an_attack_on_smoke_uses_dev_only(store_copy, tmp_path, no_test_split):
    out = tmp_path / "badnets.json"
    assert main(["tune", "--preset", "smoke", "--attack", "badnets", "--grid", "poison_rate=0.0,0.3", "--seed", "0",
                 "--store", str(store_copy), "--quiet", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    no_poison, poison = rows
    assert poison["dev_asr"] > no_poison["dev_asr"] + 0.5  # poisoning is what makes the backdoor


@pytest.mark.parametrize("argv, message", [
    (["--merger", "ta", "--attack", "badnets", "--grid", "lambda=0.3"], "exactly one of"),
    (["--merger", "ta"], "at least one --grid"),
    (["--merger", "ta", "--grid", "lambda"], "--grid wants"),
    (["--merger", "ta", "--grid", "lambda=abc"], "ta.lambda"),
    (["--merger", "tie", "--grid", "k=0.2"], "did you mean 'ties'"),
])
def test_tune_mistakes_are_one_line_and_exit_2(argv, message, tmp_path, capsys):
    assert main(["tune", "--preset", "smoke", "--store", str(tmp_path), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mmbench: error:") and message in err[0]
