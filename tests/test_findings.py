"""Findings: synthetic results for 3 seeds whose verdicts are known by hand, and the CLI."""
import json
import re

import pytest

from mmbench import findings
from mmbench.cli import main


def cell(attack, merger, defense, seed, acc=0.7, norm=0.8, asr=None, **extra):
    metrics = {"acc": acc, "normalized_acc": norm,
               "finetuned_acc_per_task": {"a": 0.9, "b": 0.8}, "base_acc_per_task": {"a": 0.1, "b": 0.2}}
    if asr is not None:
        metrics["asr"] = asr
    return {"preset": "p", "attack": attack, "merger": merger, "defense": defense, "seed": seed,
            "status": "ok", "metrics": metrics, "info": {"attack": extra} if attack != "none" else {}}


def synthetic():
    out = []
    for seed in range(3):
        # reproduced: TA normalised ACC 0.80, 0.82, 0.84 → 0.82 ± 4.303·0.02/√3 = [0.770, 0.870] ≥ 0.60
        out.append(cell("none", "ta", "none", seed, norm=[0.80, 0.82, 0.84][seed]))
        # not reproduced: BadNets after TA keeps 0.90, 0.92, 0.94 → [0.870, 0.970], all above 0.30
        out.append(cell("badnets", "ta", "none", seed, asr=[0.90, 0.92, 0.94][seed]))
        # inconclusive: IBVS − none = −0.30, −0.10, +0.05 → −0.117 ± 0.436 contains 0
        out.append(cell("badnets", "ta", "ibvs", seed, asr=[0.60, 0.82, 0.99][seed]))
        # DAM, paired: −0.06, −0.05, −0.05 ASR (unpaired intervals overlap) and −0.01, −0.01, −0.005 ACC
        out.append(cell("badnets", "ta", "dam", seed, acc=[0.69, 0.71, 0.735][seed], asr=[0.84, 0.87, 0.89][seed]))
    for r in out:   # ACC of the badnets/ta/none cells: 0.70, 0.72, 0.74
        if (r["attack"], r["defense"]) == ("badnets", "none"):
            r["metrics"]["acc"] = [0.70, 0.72, 0.74][r["seed"]]
    out.append({**cell("badnets", "ta", "none", 3, asr=0.0), "status": "failed"})   # never counted
    return out


def lines_by_label(results):
    df = findings.frame(results)
    return {(l.claim.id, l.sub): l for l in findings.evaluate(df)}


def test_verdicts_known_by_hand():
    lines = lines_by_label(synthetic())
    ta = lines[("ta_keeps_60", "")]
    assert ta.verdict == "reproduced"
    iv = ta.parts[0][1].interval
    assert iv.n == 3 and iv.mean == pytest.approx(0.82) and (iv.lo, iv.hi) == pytest.approx((0.7703, 0.8697), abs=1e-4)

    badnets = lines[("classic_collapses", "ta")]
    assert badnets.verdict == "not reproduced" and badnets.parts[0][1].interval.lo > 0.30

    ibvs = lines[("ibvs_lowers_asr", "ta")]
    assert ibvs.verdict == "inconclusive" and "contains 0" in ibvs.why
    assert ibvs.parts[0][1].interval.mean == pytest.approx(-0.35 / 3)

    assert lines[("badmerging_survives", "badmerging/ta")].verdict == "not measured"
    assert lines[("sbv_sc_beats_single_bv", "")].verdict == "not measured"
    assert lines[("badtv_survives_analogy", "")].verdict == "not measured"
    assert "does not evaluate task analogies" in lines[("badtv_survives_analogy", "")].why

    # fine-tuning gain: mean over tasks of (0.9 − 0.1, 0.8 − 0.2) = 0.7 in every seed: s = 0, [0.7, 0.7]
    gain = lines[("finetune_gain", "")]
    assert gain.verdict == "reproduced" and gain.parts[0][1].interval.mean == pytest.approx(0.7)


def test_compound_claim_needs_every_condition():
    lines = lines_by_label(synthetic())
    dam = lines[("dam_lowers_asr", "ta")]
    (asr_cond, asr), (acc_cond, acc) = dam.parts
    # ASR d = −0.06, −0.05, −0.05: −0.0533 ± 4.303·0.00577/√3 = [−0.068, −0.039] < 0
    assert asr.verdict == "reproduced" and asr.interval.hi == pytest.approx(-0.0390, abs=1e-4)
    # ACC d = −0.01, −0.01, −0.005: [−0.0155, −0.0012] ≥ −0.03
    assert acc.verdict == "reproduced" and acc.interval.lo == pytest.approx(-0.0155, abs=1e-4)
    assert dam.verdict == "reproduced"

    # the same ASR drop at a cost of 5 points of ACC in every seed: not reproduced
    costly = synthetic()
    for r in costly:
        if r["defense"] == "dam":
            r["metrics"]["acc"] = [0.65, 0.67, 0.69][r["seed"]]
    dam = lines_by_label(costly)[("dam_lowers_asr", "ta")]
    assert [p.verdict for _, p in dam.parts] == ["reproduced", "not reproduced"]
    assert dam.verdict == "not reproduced"


def test_fewer_than_two_seeds_is_inconclusive_and_says_why():
    one = [r for r in synthetic() if r["seed"] == 0]
    line = lines_by_label(one)[("ta_keeps_60", "")]
    assert line.verdict == "inconclusive" and "1 seed" in line.why


def test_verdict_thresholds_and_sides():
    gt = findings.Condition("x", ">", 0.0)
    ge = findings.Condition("x", ">=", 0.9)
    assert findings.verdict([0.1, 0.2, 0.3], gt).verdict == "inconclusive"       # [−0.048, 0.448]
    assert findings.verdict([0.2, 0.2, 0.2], gt).verdict == "reproduced"
    assert findings.verdict([-0.2, -0.2, -0.2], gt).verdict == "not reproduced"
    assert findings.verdict([0.0, 0.0, 0.0], gt).verdict == "not reproduced"     # equal is not above
    assert findings.verdict([0.9, 0.9, 0.9], ge).verdict == "reproduced"         # equal is at or above
    assert findings.verdict([], ge).verdict == "not measured"


def test_text_names_the_computation():
    df = findings.frame(synthetic())
    out = findings.text("p", df, findings.evaluate(df))
    assert "none/ta/none normalized_acc" in out and "ta_keeps_60" in out and "reproduced" in out
    assert "seeds 0, 1, 2" in out


def test_cli_findings_on_a_smoke_store(store_copy, capsys):
    # three seeds of the no-attack TA cell (the fixture has seed 0)
    assert main(["run", "--preset", "smoke", "--attack", "none", "--merger", "ta", "--defense", "none",
                 "--seed", "1", "--seed", "2", "--store", str(store_copy), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["findings", "--preset", "smoke", "--store", str(store_copy)]) == 0
    out = capsys.readouterr().out
    line = next(l for l in out.splitlines() if l.startswith("ta_keeps_60"))
    fields = re.split(r"\s{2,}", line)                      # claim, verdict, mean, interval, n, claimed
    assert fields[4] == "3" and fields[5] == "normalised ACC ≥ 0.6"
    stored = [json.loads(p.read_text()) for p in sorted((store_copy / "results" / "smoke").glob("*.json"))]
    expected = {(l.claim.id, l.sub): l.verdict for l in findings.evaluate(findings.frame(stored))}
    assert fields[1] == expected[("ta_keeps_60", "")]
    assert "seeds 0, 1, 2" in out
    assert any(l.startswith("badmerging_survives") and "not measured" in l for l in out.splitlines())

    # a result made with other parameters is stale: left out, and said so
    path = store_copy / "results" / "smoke" / "none__ta__none__seed2.json"
    stale = json.loads(path.read_text())
    path.write_text(json.dumps({**stale, "key": "0" * 64}))
    assert main(["findings", "--preset", "smoke", "--store", str(store_copy)]) == 0
    out = capsys.readouterr().out
    assert "1 stale result(s) left out" in out and "seeds 0, 1;" in out


def test_cli_findings_unknown_preset(tmp_path, capsys):
    assert main(["findings", "--preset", "smok", "--store", str(tmp_path)]) == 2
    err = [l for l in capsys.readouterr().err.strip().splitlines() if not l.startswith("mmbench: warning")]
    assert len(err) == 1 and "did you mean 'smoke'" in err[0]


def test_combined_verdicts():
    r, n, i, m = (findings.Verdict(v, None, w) for v, w in (("reproduced", ""), ("not reproduced", ""),
                                                              ("inconclusive", "straddles"),
                                                              ("not measured", "missing")))
    assert findings.combine([r, r]) == ("reproduced", "")
    assert findings.combine([r, n])[0] == "not reproduced"
    assert findings.combine([m, n])[0] == "not reproduced"      # one failed condition settles it
    assert findings.combine([m, r]) == ("not measured", "missing")
    assert findings.combine([r, i]) == ("inconclusive", "straddles")


def test_cli_findings_judges_the_results_of_the_settings_given_with_set(store_copy, capsys):
    """Results made with --set are kept beside the preset's own: findings judges the preset's
    results by default, and those of the settings it is given with --set."""
    assert main(["run", "--preset", "smoke", "--attack", "none", "--merger", "ta", "--defense", "none",
                 "--seed", "0", "--set", "ta.lambda=0.9", "--store", str(store_copy), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["findings", "--preset", "smoke", "--store", str(store_copy)]) == 0
    assert "1 ok cells" in capsys.readouterr().out  # the fixture's own none/ta/none cell
    assert main(["findings", "--preset", "smoke", "--store", str(store_copy), "--set", "ta.lambda=0.9"]) == 0
    assert "1 ok cells" in capsys.readouterr().out


def test_merge_backdoor_claim_takes_the_worst_upload_alone():
    # merged ASR 0.95, 0.97, 0.99 → 0.97 ± 4.303·0.02/√3 = [0.920, 1.020] ≥ 0.90; alone the largest of
    # the two uploads: max(0.02, 0.05) = 0.05, max(0.04, 0.01) = 0.04, max(0.03, 0.06) = 0.06
    # → 0.05 ± 4.303·0.01/√3 = [0.025, 0.075] ≤ 0.10: reproduced
    out = []
    for seed, merged, own, other in ((0, 0.95, 0.02, 0.05), (1, 0.97, 0.04, 0.01), (2, 0.99, 0.03, 0.06)):
        out.append(cell("merge_backdoor", "ta", "none", seed, asr=merged,
                        standalone={"asr": own, "contributions": {"b": {"asr": other}}}))
    line = lines_by_label(out)[("merge_backdoor_needs_merge", "ta")]
    assert line.verdict == "reproduced"
    merged, alone = (part[1].interval for part in line.parts)
    assert merged.mean == pytest.approx(0.97) and alone.mean == pytest.approx(0.05)
    assert alone.hi == pytest.approx(0.05 + 4.303 * 0.01 / 3 ** 0.5, abs=1e-3)
    # the second upload backdoors alone (0.5, 0.6, 0.7 → 0.6 ± 0.248 = [0.352, 0.848] > 0.10)
    for r, asr in zip(out, (0.5, 0.6, 0.7)):
        r["info"]["attack"]["standalone"]["contributions"]["b"]["asr"] = asr
    assert lines_by_label(out)[("merge_backdoor_needs_merge", "ta")].verdict == "not reproduced"
    # at one seed only it does: the interval of the largest-alone ASR spans 0.10, inconclusive
    for r, asr in zip(out, (0.05, 0.6, 0.06)):
        r["info"]["attack"]["standalone"]["contributions"]["b"]["asr"] = asr
    assert lines_by_label(out)[("merge_backdoor_needs_merge", "ta")].verdict == "inconclusive"


def test_badmerging_over_tasks_from_the_sweep_points():
    def point(merger, k, asrs):
        return {"param": "merge.tasks", "attack": "badmerging", "merger": merger, "defense": "none",
                "value": float(k), "seeds": {s: {"asr": a, "acc": 0.5, "normalized_acc": 0.7}
                                             for s, a in enumerate(asrs)}}
    points = [point("ties", 1, [0.10, 0.10, 0.10]),      # K = 1 is not in "2 to 8": left out
              point("ties", 2, [0.97, 0.96, 0.98]), point("ties", 3, [0.95, 0.97, 0.96]),
              point("ta", 2, [0.56, 0.55, 0.58]), point("ta", 3, [0.57, 0.60, 0.54]),
              point("ta", 9, [0.00, 0.00, 0.00]),         # beyond 8: left out
              {**point("ties", 2, [0.0, 0.0, 0.0]), "attack": "badnets"}]   # another attack
    lines = {(l.claim.id, l.sub): l for l in findings.evaluate(findings.frame(synthetic(), points))}
    # TIES, per seed the smaller of K = 2, 3: 0.95, 0.96, 0.96 → 0.9567 ± 4.303·0.00577/√3 = [0.9423, 0.9710] > 0.92
    ties = lines[("badmerging_over_tasks", "ties, K 2–3")]
    assert ties.verdict == "reproduced"
    iv = ties.parts[0][1].interval
    assert iv.mean == pytest.approx(0.95667, abs=1e-4) and iv.lo == pytest.approx(0.9423, abs=1e-4)
    # TA: 0.56, 0.55, 0.54, all far below
    assert lines[("badmerging_over_tasks", "ta, K 2–3")].verdict == "not reproduced"
    # without the sweep: not measured
    assert lines_by_label(synthetic())[("badmerging_over_tasks", "")].verdict == "not measured"
