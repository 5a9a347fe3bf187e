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


def test_mean_and_t_interval_over_seeds_from_ok_cells_only():
    results = [result("badnets", "none", 0, 0.10, 0.20), result("badnets", "none", 1, 0.20, 0.40),
               result("badnets", "none", 2, 0.30, 0.60),
               result("badnets", "none", 3, 0.99, 0.99, status="failed"),   # not counted
               result("none", "none", 0, 0.75)]
    agg = leaderboard.over_seeds(leaderboard.table(results)).set_index("attack")
    # ACC 0.1, 0.2, 0.3: mean 0.2, s 0.1, half-width t_{0.975,2}·s/√3 = 4.303·0.1/1.732 = 0.2484
    assert agg.loc["badnets", "seeds"] == 3 and agg.loc["badnets", "acc_n"] == 3
    assert agg.loc["badnets", "acc_mean"] == pytest.approx(0.2)
    assert agg.loc["badnets", "acc_sd"] == pytest.approx(0.1)
    assert agg.loc["badnets", "acc_lo"] == pytest.approx(0.2 - 0.2484, abs=1e-4)
    assert agg.loc["badnets", "acc_hi"] == pytest.approx(0.2 + 0.2484, abs=1e-4)
    assert agg.loc["badnets", "asr_mean"] == pytest.approx(0.40)
    assert agg.loc["none", "seeds"] == 1 and math.isnan(agg.loc["none", "acc_lo"])   # n = 1: no interval
    md = leaderboard.markdown(leaderboard.table(results))
    assert "over seeds 0, 1, 2" in md and "20.0 ± 24.8" in md and "40.0 ± 49.7" in md
    assert "| none     | ta       | none      |   1 |" in md    # n stated, no interval for one seed


def test_one_seed_has_no_aggregate_table():
    md = leaderboard.markdown(leaderboard.table([result("none", "none", 0, 0.75)]))
    assert "over seeds" not in md


def test_wilson_interval_of_asr_per_cell():
    r = result("badnets", "none", 0, 0.70, 0.0)
    r["metrics"]["asr_counts"] = [0, 10]     # k = 0 of n = 10: Wilson (0, 0.2775)
    df = leaderboard.table([r])
    cell = df.iloc[0]
    assert (cell.asr_k, cell.asr_n) == (0, 10)
    assert cell.asr_lo == pytest.approx(0.0, abs=1e-12) and cell.asr_hi == pytest.approx(0.2775, abs=1e-4)
    assert "[0.0, 27.8]" in leaderboard.markdown(df)
    old = result("badnets", "none", 0, 0.70, 0.5)   # an old result without counts: no interval
    assert math.isnan(leaderboard.table([old]).iloc[0].asr_lo)


def paired_results():
    """ibvs vs none over 3 seeds: ASR varies a lot between seeds (wide unpaired intervals that
    overlap), but ibvs is lower by 0.10, 0.11, 0.12 in each seed: the paired Δ excludes 0."""
    none_asr, ibvs_asr = [0.50, 0.70, 0.90], [0.40, 0.59, 0.78]
    none_acc, ibvs_acc = [0.70, 0.72, 0.74], [0.69, 0.72, 0.72]
    out = []
    for seed in range(3):
        out.append(result("badnets", "none", seed, none_acc[seed], none_asr[seed]))
        out.append(result("badnets", "ibvs", seed, ibvs_acc[seed], ibvs_asr[seed]))
    for r in out:
        r["metrics"]["standalone_asr"] = 1.0
    return out


def test_paired_differences_der_and_merged_vs_alone_over_seeds():
    from mmbench import stats

    df = leaderboard.table(paired_results())
    agg = leaderboard.over_seeds(df).set_index("defense")
    none_iv = stats.t_interval([0.50, 0.70, 0.90])
    ibvs_iv = stats.t_interval([0.40, 0.59, 0.78])
    assert ibvs_iv.hi > none_iv.lo                        # the unpaired intervals overlap
    ibvs = agg.loc["ibvs"]
    # d = −0.10, −0.11, −0.12: mean −0.11, s 0.01, half 4.303·0.01/√3 = 0.0248
    assert ibvs.d_asr_vs_none_n == 3 and ibvs.d_asr_vs_none_mean == pytest.approx(-0.11)
    assert (ibvs.d_asr_vs_none_lo, ibvs.d_asr_vs_none_hi) == pytest.approx((-0.1348, -0.0852), abs=1e-4)
    # ΔACC −0.01, 0, −0.02: mean −0.01, s 0.01 → contains 0
    assert ibvs.d_acc_vs_none_mean == pytest.approx(-0.01) and ibvs.d_acc_vs_none_hi > 0
    # DER per seed, e.g. seed 0: [0.10 − 0.01 + 1]/2 = 0.545; seeds 1, 2: 0.555, 0.55
    row0 = df[(df.defense == "ibvs") & (df.seed == 0)].iloc[0]
    assert row0.der_vs_none == pytest.approx(0.545)
    assert ibvs.der_vs_none_mean == pytest.approx((0.545 + 0.555 + 0.55) / 3)
    # merged − alone, paired per seed: 0.5 − 1, 0.7 − 1, 0.9 − 1 for defense none
    assert agg.loc["none"].d_asr_vs_alone_mean == pytest.approx(-0.3)
    md = leaderboard.markdown(df)
    assert "-11.0 ± 2.5 *" in md          # ΔASR: the paired interval excludes 0
    assert "-1.0 ± 2.5 |" in md           # ΔACC: it does not (no star)


def test_rankings_of_attacks_and_defenses():
    results = paired_results()
    for seed, asr in enumerate([0.95, 0.96, 0.97]):
        results.append(result("sbv", "none", seed, 0.7, asr))
        results.append(result("sbv", "ibvs", seed, 0.7, asr))   # ibvs removes nothing from sbv
    df = leaderboard.table(results)
    attacks = leaderboard.attack_ranking(df)
    assert list(attacks.attack) == ["sbv", "badnets"] and attacks.iloc[0].next == "badnets"
    assert attacks.iloc[0].d_next.mean == pytest.approx((0.45 + 0.26 + 0.07) / 3)
    defenses = leaderboard.defense_ranking(df).set_index("merger")
    ibvs = defenses.loc["ta"]
    assert ibvs.attacks == 2
    # ASR removed per seed: mean over badnets (0.10, 0.11, 0.12) and sbv (0, 0, 0)
    assert ibvs.asr_removed.mean == pytest.approx(0.055)
    md = leaderboard.markdown(df)
    assert "Rankings" in md and "vs badnets" in md


def test_render_is_deterministic_and_has_summary():
    results = paired_results()
    a = leaderboard.render(leaderboard.table(results))
    b = leaderboard.render(leaderboard.table(list(reversed(results))))
    assert a == b and set(a) == {"README.md", "results.csv", "summary.csv"}
    summary = a["summary.csv"].decode().splitlines()
    assert summary[0].startswith("preset,attack,merger,defense,seeds,acc_n,acc_mean,acc_sd,acc_lo,acc_hi")
    assert len(summary) == 3     # badnets/ta/ibvs and badnets/ta/none


def test_check_lists_problems(tmp_path):
    files = leaderboard.render(leaderboard.table(paired_results()))
    assert len(leaderboard.differences(files, tmp_path)) == 3          # nothing written yet
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    assert leaderboard.differences(files, tmp_path) == []
    (tmp_path / "summary.csv").write_text("edited")
    assert [p.split(":")[0] for p in leaderboard.differences(files, tmp_path)] == [str(tmp_path / "summary.csv")]


def test_check_command_stale_failed_not_run_and_edited_files(store_copy, tmp_path, monkeypatch, capsys):
    import json

    from mmbench.cli import main

    board = tmp_path / "board"
    args = ["leaderboard", "--preset", "smoke", "--store", str(store_copy), "--out", str(board)]
    # every installed plugin: the store holds only none/ta/none, the rest is not run
    assert main(args + ["--check"]) == 1
    out = capsys.readouterr().out
    assert "smoke badnets/ta/none seed 0: not run" in out and f"{board / 'README.md'}: missing" in out
    assert not board.exists()                                 # --check writes nothing

    monkeypatch.setenv("MMBENCH_PLUGINS", "ta,none,presets")  # the cross product is none/ta/none seed 0
    assert main(args) == 0
    assert {p.name for p in board.iterdir()} == {"README.md", "results.csv", "summary.csv", "index.html"}
    capsys.readouterr()
    assert main(args + ["--check"]) == 0
    assert capsys.readouterr().out.strip() == "leaderboard up to date"

    readme = board / "README.md"
    readme.write_text(readme.read_text() + "\nhand edit\n")
    assert main(args + ["--check"]) == 1
    assert f"{readme}: differs" in capsys.readouterr().out
    assert main(args) == 0                                    # regenerated: up to date again
    assert main(args + ["--check"]) == 0

    path = store_copy / "results" / "smoke" / "none__ta__none__seed0.json"
    result = json.loads(path.read_text())
    path.write_text(json.dumps({**result, "key": "0" * 64}))  # made with other parameters
    capsys.readouterr()
    assert main(args + ["--check"]) == 1
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "smoke none/ta/none seed 0: stale"
    assert any("results.csv: differs" in l for l in lines)

    path.write_text(json.dumps({**result, "status": "failed", "error": "RuntimeError: boom"}))
    assert main(args + ["--check"]) == 1
    assert "smoke none/ta/none seed 0: failed" in capsys.readouterr().out


def _attacked(cell, acc_k, asr_k, *, seed=0, setting=None, code="c1", params=None, status="ok"):
    return {"preset": "p", "attack": "badnets", "seed": seed, "cell": cell, "status": status,
            "setting": setting or {}, "plugins": {"attack": {"code": code}},
            "params": {"attack": params or {"poison_rate": 0.1}},
            "info": {"attack": {"standalone": {"acc_counts": [acc_k, 1000], "asr_counts": [asr_k, 900],
                                               "clean_asr_counts": [10, 900]}}}}


def test_attack_disagreements_flag_cells_of_one_attack_stage_computed_twice():
    same = [_attacked("badnets__ta__none__seed0", 721, 875),
            _attacked("badnets__ties__ibvs__seed0", 721, 875),
            _attacked("badnets__ta__none__seed0", 721, 875, setting={"merge": {"tasks": 3}})]
    assert leaderboard.attack_disagreements(same) == []
    # another seed, attack parameter or attack code is another stage: no disagreement
    others = [_attacked("badnets__ta__none__seed1", 700, 800, seed=1),
              _attacked("badnets__ta__none__seed0", 690, 850, params={"poison_rate": 0.2}),
              _attacked("badnets__ta__none__seed0", 600, 850, code="c2"),
              _attacked("badnets__dare__none__seed0", 1, 1, status="failed")]
    assert leaderboard.attack_disagreements(same + others) == []
    # a sweep cell read a recomputation of the stage that gave one more correct image
    odd = _attacked("badnets__ta__none__seed0", 722, 875, setting={"merge": {"tasks": 2}})
    (line,) = leaderboard.attack_disagreements(same + others + [odd])
    assert line.startswith("p badnets seed 0: its cells read different computations of one attack stage: "
                           '3 cell(s) with {"acc_counts":[721,1000]')
    assert 'badnets__ta__none__seed0 ({"merge":{"tasks":2}})' in line
    assert "--attack badnets --seed 0 --rerun cells" in line


def test_leaderboard_with_set_reads_no_sweep_into_its_claims(tmp_path):
    # the task-count sweep was run around the preset's own settings: with --set, README.md's
    # claims leave it out, as `mmbench findings --set` does (the committed store has the sweep)
    from pathlib import Path

    from mmbench.cli import main

    store = Path(__file__).resolve().parent.parent / "leaderboard" / "store"
    if not (store / "results" / "tiny").is_dir():
        pytest.skip("no committed tiny results")
    assert main(["leaderboard", "--store", str(store), "--set", "ta.lambda=0.3", "--out", str(tmp_path)]) == 0
    lines = [line.split("|") for line in (tmp_path / "README.md").read_text().splitlines()
             if line.startswith("| badmerging_over_tasks")]
    assert [cells[2].strip() for cells in lines] == ["not measured"]
