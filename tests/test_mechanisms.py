"""mmbench mechanisms: the cosine on small tensors, and the whole command on smoke."""
from __future__ import annotations

import json
import math

import torch

from mmbench.cli import main
from mmbench.mechanisms import LAMBDAS, cosine


def test_cosine_flattens_state_dicts_over_their_common_keys():
    a = {"w": torch.tensor([[1.0, 0.0]]), "b": torch.tensor([0.0]), "only_a": torch.tensor([5.0])}
    b = {"w": torch.tensor([[1.0, 1.0]]), "b": torch.tensor([1.0])}
    # (1, 0, 0) · (1, 1, 1) = 1; |a| = 1, |b| = √3
    assert math.isclose(cosine(a, b), 1 / math.sqrt(3))
    assert math.isclose(cosine(a, a), 1.0)
    assert math.isnan(cosine(a, {"w": torch.zeros(1, 2), "b": torch.zeros(1)}))


def test_mechanisms_on_smoke(store_copy, tmp_path, capsys):
    out = tmp_path / "mech.json"
    assert main(["mechanisms", "--preset", "smoke", "--store", str(store_copy), "--json", str(out),
                 "--quiet"]) == 0
    report = json.loads(out.read_text())
    names = report["names"]
    assert names == ["attacker", "other target", "other corner", "other task", "defender (IBVS)"]
    m = report["cosine"]
    for i in range(len(names)):
        assert math.isclose(m[i][i], 1.0, abs_tol=1e-9)
        for j in range(len(names)):
            assert math.isclose(m[i][j], m[j][i], abs_tol=1e-12) and -1 <= m[i][j] <= 1
    bv = report["backdoor_vectors"]
    assert bv["attacker"]["task"] == "digits" and bv["other task"]["task"] == "photo_patches"
    assert bv["other target"]["target_class"] == 1 and bv["other corner"]["position"] == "top-left"
    assert [r["lambda"] for r in report["asr_by_lambda"]] == list(LAMBDAS)
    assert [r["tasks"] for r in report["asr_by_tasks"]] == [1, 2]
    # smoke's TA λ is 1.0, so the one-task merge is θ_pre + τ_adv: the attacker's model alone,
    # whose test ASR the attack stage measured
    one = report["asr_by_tasks"][0]
    assert one["lambda"] == 1.0
    assert math.isclose(one["asr"], bv["attacker"]["standalone_asr"], abs_tol=1e-9)
    # and the λ = 1.0 row merges every task, as the two-task row does on this 2-task preset
    assert math.isclose(report["asr_by_lambda"][-1]["asr"], report["asr_by_tasks"][-1]["asr"], abs_tol=1e-9)
    text = capsys.readouterr().out
    assert "pairwise cosine" in text and "against λ" in text


def test_clean_ta_part_on_smoke(store_copy, tmp_path, capsys):
    out = tmp_path / "clean.json"
    assert main(["mechanisms", "--part", "clean-ta", "--preset", "smoke", "--store", str(store_copy),
                 "--json", str(out), "--quiet"]) == 0
    report = json.loads(out.read_text())
    assert report["tasks"] == ["digits", "photo_patches"] and report["ta_lambda"] == 1.0
    for t in report["tasks"]:
        row = report["per_task"][t]
        # smoke's λ is 1.0: θ_pre + 1·τ_t alone is the fine-tuned model itself
        assert set(row) == {"base", "finetuned", "alone@1", "merged@1"}
        assert math.isclose(row["alone@1"], row["finetuned"])
    m = report["cosine"]
    assert math.isclose(m[0][0], 1.0, abs_tol=1e-9) and math.isclose(m[0][1], m[1][0], abs_tol=1e-12)
    assert "Clean task vectors: pairwise cosine" in capsys.readouterr().out


def test_regmean_part_on_smoke(store_copy, tmp_path, capsys):
    out = tmp_path / "regmean.json"
    assert main(["mechanisms", "--part", "regmean", "--preset", "smoke", "--store", str(store_copy),
                 "--json", str(out), "--quiet"]) == 0
    report = json.loads(out.read_text())
    assert set(report["attacks"]) == {"badmerging", "badtv"}
    # smoke: TA λ 1.0, two tasks, so the mean is TA at λ ½
    for figures in report["attacks"].values():
        assert list(figures) == ["ta λ 1", "regmean", "regmean linear + ta λ 1 rest",
                                 "ta λ 1 linear + mean rest", "mean (ta λ 1/2)"]
        assert all(0 <= f["acc"] <= 1 and 0 <= f["asr"] <= 1 for f in figures.values())
    # the merge the harness makes: the cell badmerging/regmean/none of the same store has this ASR
    assert main(["run", "--preset", "smoke", "--attack", "badmerging", "--merger", "regmean", "--defense", "none",
                 "--store", str(store_copy), "--quiet"]) == 0
    cell = json.loads((store_copy / "results" / "smoke" / "badmerging__regmean__none__seed0.json").read_text())
    assert math.isclose(report["attacks"]["badmerging"]["regmean"]["asr"], cell["metrics"]["asr"])
    assert "## badtv" in capsys.readouterr().out


def test_task_order_part_on_smoke(store_copy, tmp_path, capsys):
    out = tmp_path / "order.json"
    assert main(["mechanisms", "--part", "task-order", "--preset", "smoke", "--store", str(store_copy),
                 "--json", str(out), "--quiet"]) == 0
    report = json.loads(out.read_text())
    assert report["attack"] == "badnets" and report["task"] == "digits" and report["lambda"] == 1.0
    # smoke has two tasks: the one pair is every task, and leaving photo_patches out leaves the
    # attacker alone, whose model at λ 1 is the attacker's fine-tune (its standalone ASR)
    assert list(report["pairs"]) == list(report["without"]) == ["photo_patches"]
    assert report["pairs"]["photo_patches"] == report["all"]
    assert report["without"]["photo_patches"] == report["alone"]
    # the merge of every task is the run's TA cell
    assert main(["run", "--preset", "smoke", "--attack", "badnets", "--merger", "ta", "--defense", "none",
                 "--store", str(store_copy), "--quiet"]) == 0
    cell = json.loads((store_copy / "results" / "smoke" / "badnets__ta__none__seed0.json").read_text())
    assert math.isclose(report["all"]["asr"], cell["metrics"]["asr"])
    assert -1 <= report["cosine_with_bv"]["photo_patches"] <= 1
    assert "t's part in all" in capsys.readouterr().out


def test_mechanisms_attack_goes_with_task_order(store_copy, capsys):
    assert main(["mechanisms", "--attack", "badtv", "--preset", "smoke", "--store", str(store_copy)]) == 2
    assert "--attack goes with --part task-order" in capsys.readouterr().err
