"""The leaderboard's table and its aggregate over seeds, on hand-made results."""
import math

import pytest

from mmbench import leaderboard


def result(attack, defense, seed, acc, asr=None, status="ok"):
    metrics = {"acc": acc, "normalized_acc": acc / 0.8}
    if asr is not None:
        metrics["asr"] = asr
    return {"preset": "p", "attack": attack, "merger": "ta", "defense": defense, "seed": seed,
            "status": status, "metrics": metrics, "durations": {"total": 1.0}}


def test_delta_against_defense_none_and_not_run_rows():
    df = leaderboard.table([result("badnets", "none", 0, 0.70, 0.30), result("badnets", "ibvs", 0, 0.68, 0.20)],
                           expected=[("p", "badnets", "ta", "dam", 0)])
    ibvs = df[df.defense == "ibvs"].iloc[0]
    assert ibvs.d_acc_vs_none == pytest.approx(-0.02) and ibvs.d_asr_vs_none == pytest.approx(-0.10)
    assert df[df.defense == "dam"].iloc[0].status == "not run"


def test_mean_and_sample_std_over_seeds_from_ok_cells_only():
    results = [result("badnets", "none", 0, 0.60, 0.20), result("badnets", "none", 1, 0.70, 0.40),
               result("badnets", "none", 2, 0.10, 0.90, status="failed"),   # not counted
               result("none", "none", 0, 0.75)]
    agg = leaderboard.over_seeds(leaderboard.table(results)).set_index("attack")
    assert agg.loc["badnets", "seeds"] == 2
    assert agg.loc["badnets", "acc_mean"] == pytest.approx(0.65)
    assert agg.loc["badnets", "acc_std"] == pytest.approx(math.sqrt(0.005))   # (0.05² · 2) / (2 − 1)
    assert agg.loc["badnets", "asr_mean"] == pytest.approx(0.30)
    assert agg.loc["none", "seeds"] == 1 and math.isnan(agg.loc["none", "acc_std"])
    md = leaderboard.markdown(leaderboard.table(results))
    assert "over seeds" in md and "65.0 ± 7.1" in md and "30.0 ± 14.1" in md


def test_one_seed_has_no_aggregate_table():
    md = leaderboard.markdown(leaderboard.table([result("none", "none", 0, 0.75)]))
    assert "over seeds" not in md
