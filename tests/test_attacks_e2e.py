"""badnets, badmerging, badmerging_off, badtv, sbv, sbv_sc and lobam end to end through the CLI (smoke
preset): each runs, and each backdoors the model it submits (its standalone ASR clearly above its
clean twin's)."""
from __future__ import annotations

import json
import shutil

import pytest

from mmbench.cli import main
from mmbench.evaluate import wilson

ATTACKS = ("badnets", "badmerging", "badmerging_off", "badtv", "sbv", "sbv_sc", "lobam")
# Least margin standalone ASR − clean twin's ASR. Measured on smoke, seed 0, --threads 1, with CHEAP
# (test splits of 272 or 270 non-target images; the clean twin: 1 or 2 hits, 0.4–0.7 %): badnets 98.2 %,
# badmerging 100 %, badmerging_off 100 %, badtv 51.1 %, sbv 13.2 %, sbv_sc 12.9 %. SBV calibrates
# its (ρ, λ) to the highest dev ASR whose dev ACC stays within 2 points of the clean model's, and on
# smoke's 100-image dev split that allows only ~12 % dev ASR (ρ 0.05, λ 0.75; λ 1.0 gives 62 % at
# -4 points), so smoke supports only a small margin for sbv/sbv_sc. The 95 % Wilson intervals of
# the two ASRs must not overlap for any attack. (Since smoke's base is pretrained on prompt-template
# captions, the 2-point tolerance left SBV no ASR at all: smoke sets sbv[_sc].acc_tolerance 0.1.)
MARGIN = {"badnets": 0.5, "badmerging": 0.5, "badmerging_off": 0.5, "badtv": 0.25, "sbv": 0.05, "sbv_sc": 0.05,
          "lobam": 0.5}
# stage 1 shrunk to seconds; the smoke preset's own plugin_params may set these too
CHEAP = ["badmerging.trigger_epochs=1", "badmerging.trigger_images_per_epoch=20",
         "badmerging.trigger_max_iterations=10", "badmerging_off.trigger_epochs=1",
         "badmerging_off.num_augmentations=20", "badmerging_off.pgd_steps=5",
         "badmerging_off.trigger_max_iterations=5", "sbv.n=2", "sbv_sc.n=2",
         "lobam.trigger_epochs=1", "lobam.trigger_images_per_epoch=20", "lobam.trigger_max_iterations=10"]


@pytest.fixture(scope="module")
def e2e(smoke_store, tmp_path_factory):
    """One CLI run of every attack (merger ta, defense none) on a copy of the smoke store."""
    store = tmp_path_factory.mktemp("e2e") / "store"
    shutil.copytree(smoke_store, store)
    argv = ["run", "--preset", "smoke", "--merger", "ta", "--defense", "none", "--store", str(store),
            "--quiet", "--strict", "--threads", "1"]
    for name in ATTACKS:
        argv += ["--attack", name]
    for item in CHEAP:
        argv += ["--set", item]
    assert main(argv) == 0
    results = {a: json.loads((store / "results" / "smoke" / f"{a}__ta__none__seed0.json").read_text())
               for a in ATTACKS}
    return store, results


@pytest.mark.parametrize("name", ATTACKS)
def test_the_attacked_model_alone_is_backdoored(e2e, name):
    _, results = e2e
    cell = results[name]
    assert cell["status"] == "ok", (name, cell.get("error"))
    m = cell["metrics"]
    asr, clean = m["standalone_asr"], m["standalone_clean_asr"]
    assert asr >= clean + MARGIN[name], (name, asr, clean)
    k, n = m["standalone_asr_counts"]
    assert n > 0 and asr == k / n
    assert m["standalone_asr_ci"][0] > wilson(*m["standalone_clean_asr_counts"])[1], name  # intervals apart
    assert 0 <= m["standalone_dev_asr"] <= 1 and 0 <= m["standalone_dev_acc"] <= 1
    # the attacker's own view (dev) agrees that the backdoor works
    assert m["standalone_dev_asr"] >= clean + MARGIN[name] / 2, (name, m["standalone_dev_asr"])


def test_badnets_alone_is_backdoored_far_above_chance(e2e):
    m = e2e[1]["badnets"]["metrics"]
    # chance: 1 of 10 digits classes; measured 98.2 % (267 / 272) against its clean twin's 0.4 % (1 / 272)
    assert m["standalone_asr"] >= 0.8 and m["standalone_clean_asr"] <= 0.1, m
    assert m["standalone_asr"] - m["standalone_clean_asr"] >= 0.6
    assert m["standalone_acc"] >= 0.5  # and it still does its task


def test_run_smoke_with_every_merge_aware_attack(e2e):
    store_copy, results = e2e
    for name, cell in results.items():
        assert cell["status"] == "ok", (name, cell.get("error"))
        metrics = cell["metrics"]
        for field in ("asr", "standalone_asr", "standalone_acc", "acc"):
            assert 0 <= metrics[field] <= 1, (name, field)
        assert metrics["asr"] == metrics["asr_counts"][0] / metrics["asr_counts"][1]
        assert metrics["asr_ci"][0] <= metrics["asr"] <= metrics["asr_ci"][1]
    info = {a: results[a]["info"]["attack"] for a in ATTACKS}
    assert info["badmerging"]["target_task"] == "digits"
    assert info["badmerging_off"]["target_task"] == "photo_patches"
    assert "pretrained_asr" in info["badmerging"]["stage1"]
    assert set(info["badtv"]["negation"]) == {"0.3", "0.5", "1.0"}
    assert 0 <= info["badtv"]["negation"]["0.3"]["asr"] <= 1
    assert len(info["sbv_sc"]["single_bvs"]) == 2 and "sign_consistent" in info["sbv_sc"]
    lobam = info["lobam"]
    assert lobam["lam"] in [float(v) for v in range(1, 11)] and set(lobam["rule"]) == {str(float(v)) for v in range(1, 11)}
    # the uploaded vector is the one the rule measured at the chosen λ; λ 1 is the malicious LoRA model
    assert lobam["norm_upload"] == pytest.approx(lobam["rule"][str(lobam["lam"])]["norm"], rel=1e-6)
    assert lobam["rule"]["1.0"]["norm"] == pytest.approx(lobam["norm_malicious"], rel=1e-6)
    assert lobam["lora_weights"] == 8  # in_proj, out_proj, c_fc, c_proj of smoke's 2 blocks

    kinds = [json.loads(p.read_text())["kind"] for p in (store_copy / "artifacts").glob("*/*.json")]
    assert kinds.count("plugin:sbv.backdoor_vector") == 2  # shared by sbv and sbv_sc
    assert kinds.count("plugin:badmerging.trigger") == 3   # on-task, off-task, and LoBAM's (its own code)
    # badtv keeps trigger B next to its task vector
    from safetensors import safe_open

    badtv = [p for p in (store_copy / "artifacts").glob("*/*.json")
             if json.loads(p.read_text())["kind"] == "attack"
             and "position_b" in json.loads(p.read_text())["info"]["params"]]
    assert len(badtv) == 1
    with safe_open(str(badtv[0].with_suffix(".safetensors")), "pt") as f:
        assert {"extra.trigger_b.pattern", "extra.trigger_b.position"} <= set(f.keys())
