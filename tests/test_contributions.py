"""An attacker with more than one upload (AttackResult.contributions, MergeBackdoor): the
detection figures with several malicious contributors by hand, the result's checks, and on
smoke through the CLI that every upload is merged, measured alone and counted malicious."""
from __future__ import annotations

import json

import pytest
import torch

from mmbench.api import AttackResult, PluginError, Trigger
from mmbench.cli import main
from mmbench.detect import malicious_figures, malicious_of


def test_malicious_figures_by_hand():
    scores = {"a": 3.0, "b": 2.0, "c": 1.0, "d": 0.0}
    # malicious a, c against clean b, d: (a,b) (a,d) (c,d) above, (c,b) below -> 3 of 4 pairs
    got = malicious_figures(scores, ["a", "c"])
    assert got == {"auroc": 0.75, "rank_of_malicious": 1, "tied_with_malicious": 0}
    # one malicious contributor: the earlier single-contributor figures
    assert malicious_figures(scores, ["c"]) == {"auroc": 1 / 3, "rank_of_malicious": 3, "tied_with_malicious": 0}
    # the top malicious score ties a clean one: rank counts only those strictly above
    assert malicious_figures({"a": 1.0, "b": 1.0, "c": 0.0}, ["a", "c"]) == {
        "auroc": 0.25, "rank_of_malicious": 1, "tied_with_malicious": 1}
    # every contributor malicious: no clean one to compare with
    assert malicious_figures({"a": 1.0, "b": 0.0}, ["a", "b"])["auroc"] is None
    assert malicious_figures(scores, []) == {"auroc": None, "rank_of_malicious": None, "tied_with_malicious": None}
    # older results carry only "malicious"
    assert malicious_of({"malicious": "a"}) == ["a"] and malicious_of({"malicious": None}) == []
    assert malicious_of({"malicious": "a", "malicious_all": ["a", "b"]}) == ["a", "b"]


def test_attack_result_uploads_and_checks():
    trigger = Trigger(torch.ones(1, 1, 1), 0, 0)
    tau_a, tau_b = {"w": torch.tensor([1.0])}, {"w": torch.tensor([2.0])}
    result = AttackResult(task="a", task_vector=tau_a, trigger=trigger, target_class=0, contributions={"b": tau_b})
    assert list(result.uploads()) == ["a", "b"] and result.uploads()["b"] is tau_b
    assert AttackResult(task="a", task_vector=tau_a, trigger=trigger, target_class=0).uploads() == {"a": tau_a}
    with pytest.raises(PluginError, match="its own task 'a'"):
        AttackResult(task="a", task_vector=tau_a, trigger=trigger, target_class=0, contributions={"a": tau_b})


def test_both_uploads_are_merged_measured_alone_and_counted_malicious(store_copy, capsys):
    from mmbench.execute import Runtime, Worker
    from mmbench.graph import plan
    from mmbench.plugins import load
    from mmbench.vectors import task_arithmetic

    sel = ["--preset", "smoke", "--attack", "merge_backdoor", "--merger", "ta", "--defense", "none",
           "--set", "merge_backdoor.epochs=1", "--set", "merge_backdoor.patch_area=0.0625"]
    assert main(["run", *sel, "--detector", "tv_cosine", "--store", str(store_copy)]) == 0
    out = capsys.readouterr().out
    assert "every contributor malicious: no AUROC" in out
    results = store_copy / "results" / "smoke"

    def one(pattern: str) -> dict:
        found = list(results.glob(pattern))
        assert len(found) == 1, found
        return json.loads(found[0].read_text())
    cell = one("merge_backdoor__ta__none__*seed0.json")
    assert cell["status"] == "ok"
    assert cell["info"]["attack"]["contributions"] == ["photo_patches"]
    extra = cell["metrics"]["contributions"]["photo_patches"]
    alone = extra["standalone"]
    k, n = alone["asr_counts"]
    assert alone["asr"] == k / n and 0 <= extra["asr"] <= 1 and extra["acc"] == cell["metrics"]["acc_per_task"][
        "photo_patches"]

    # rebuild what the cell merged from the stored attack: θ_pre + λ(τ_digits + τ_photo), both uploads
    registry = load()
    preset = registry.get("preset", "smoke").obj
    graph = plan(registry, preset, ["merge_backdoor"], ["ta"], ["none"], [0],
                 overrides={"merge_backdoor": {"epochs": 1, "patch_area": 0.0625}}, detectors=[])
    worker = Worker(graph, Runtime(str(store_copy), quiet=True), registry=registry)
    attack = worker.attack("merge_backdoor", 0)
    assert list(attack.uploads()) == ["digits", "photo_patches"]
    vectors = worker.cell_vectors("merge_backdoor", 0)
    for task, upload in attack.uploads().items():
        assert all(torch.equal(vectors[task][name], upload[name]) for name in upload)
    pre = worker.shared.pretrained()
    merged = task_arithmetic(pre, vectors, cell["params"]["merger"]["lambda"])
    for task in ("digits", "photo_patches"):
        got = worker.shared.evaluate(merged, task, "test", attack.trigger, attack.target_class)
        assert got["acc"] == cell["metrics"]["acc_per_task"][task]
    assert got["asr"] == extra["asr"]                                   # photo_patches in the merge
    photo_alone = {name: pre[name] + v for name, v in attack.contributions["photo_patches"].items()}
    got = worker.shared.evaluate(photo_alone, "photo_patches", "test", attack.trigger, attack.target_class)
    assert got["asr_counts"] == alone["asr_counts"] and got["acc_counts"] == alone["acc_counts"]

    # the detection track: both contributors malicious, no clean one left on smoke's two tasks
    det = one("detection/detect__tv_cosine__merge_backdoor__*seed0.json")
    assert det["malicious"] == "digits" and det["malicious_all"] == ["digits", "photo_patches"]
    assert det["auroc"] is None and det["rank_of_malicious"] == 1
    scr = one("detection/screen__tv_cosine__merge_backdoor__ta__*seed0.json")
    assert scr["left_out"] == det["flagged"] and scr["left_out_malicious"] is True
