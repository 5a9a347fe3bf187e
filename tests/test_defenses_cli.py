"""IBVS and DAM end to end through the CLI on the smoke preset."""
from __future__ import annotations

import json

from mmbench.cli import main


def test_run_smoke_with_ibvs_and_dam(tmp_path):
    store = tmp_path / "store"
    code = main(["run", "--preset", "smoke", "--attack", "none", "--attack", "badnets", "--merger", "ta",
                 "--defense", "ibvs", "--defense", "dam", "--set", "dam.steps=5", "--store", str(store),
                 "--quiet", "--jobs", "1"])
    assert code == 0
    results = {p.stem: json.loads(p.read_text()) for p in (store / "results" / "smoke").glob("*.json")}
    assert set(results) == {f"{a}__ta__{d}__seed0" for a in ("none", "badnets") for d in ("ibvs", "dam")}
    for cell in results.values():
        assert cell["status"] == "ok", cell.get("error")
        assert 0 <= cell["metrics"]["acc"] <= 1
    assert "asr" in results["badnets__ta__ibvs__seed0"]["metrics"]
    assert 0 <= results["badnets__ta__dam__seed0"]["info"]["defense"]["mask_kept_fraction"] <= 1
    # BV_inj does not depend on the attack: one artifact serves both IBVS cells
    kinds = [json.loads(p.read_text())["kind"] for p in (store / "artifacts").glob("*/*.json")]
    assert kinds.count("plugin:ibvs.injection_vector") == 1
    assert kinds.count("plugin:dam.mask") == 2  # one mask per set of task vectors (per attack)
