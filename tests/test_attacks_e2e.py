"""badmerging, badmerging_off, badtv, sbv and sbv_sc end to end through the CLI (smoke preset)."""
from __future__ import annotations

import json

from mmbench.cli import main

ATTACKS = ("badmerging", "badmerging_off", "badtv", "sbv", "sbv_sc")
# stage 1 shrunk to seconds; the smoke preset's own plugin_params may set these too
CHEAP = ["badmerging.trigger_epochs=1", "badmerging.trigger_images_per_epoch=20",
         "badmerging.trigger_max_iterations=10", "badmerging_off.trigger_epochs=1",
         "badmerging_off.num_augmentations=20", "badmerging_off.pgd_steps=5",
         "badmerging_off.trigger_max_iterations=5", "sbv.n=2", "sbv_sc.n=2"]


def test_run_smoke_with_every_merge_aware_attack(store_copy):
    argv = ["run", "--preset", "smoke", "--merger", "ta", "--defense", "none", "--store", str(store_copy),
            "--quiet", "--strict", "--threads", "1"]
    for name in ATTACKS:
        argv += ["--attack", name]
    for item in CHEAP:
        argv += ["--set", item]
    assert main(argv) == 0
    results = {a: json.loads((store_copy / "results" / "smoke" / f"{a}__ta__none__seed0.json").read_text())
               for a in ATTACKS}
    for name, cell in results.items():
        assert cell["status"] == "ok", (name, cell.get("error"))
        metrics = cell["metrics"]
        for field in ("asr", "standalone_asr", "standalone_acc", "acc"):
            assert 0 <= metrics[field] <= 1, (name, field)
    info = {a: results[a]["info"]["attack"] for a in ATTACKS}
    assert info["badmerging"]["target_task"] == "digits"
    assert info["badmerging_off"]["target_task"] == "photo_patches"
    assert "pretrained_asr" in info["badmerging"]["stage1"]
    assert set(info["badtv"]["negation"]) == {"0.3", "0.5", "1.0"}
    assert 0 <= info["badtv"]["negation"]["0.3"]["asr"] <= 1
    assert len(info["sbv_sc"]["single_bvs"]) == 2 and "sign_consistent" in info["sbv_sc"]

    kinds = [json.loads(p.read_text())["kind"] for p in (store_copy / "artifacts").glob("*/*.json")]
    assert kinds.count("plugin:sbv.backdoor_vector") == 2  # shared by sbv and sbv_sc
    assert kinds.count("plugin:badmerging.trigger") == 2   # one on-task, one off-task
    # badtv keeps trigger B next to its task vector
    from safetensors import safe_open

    badtv = [p for p in (store_copy / "artifacts").glob("*/*.json")
             if json.loads(p.read_text())["kind"] == "attack"
             and "position_b" in json.loads(p.read_text())["info"]["params"]]
    assert len(badtv) == 1
    with safe_open(str(badtv[0].with_suffix(".safetensors")), "pt") as f:
        assert {"extra.trigger_b.pattern", "extra.trigger_b.position"} <= set(f.keys())
