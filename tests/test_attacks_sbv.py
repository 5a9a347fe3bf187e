"""SBV / SBV_SC combination math on hand-checkable tensors; each single BV calibrated like the SBV."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from mmbench_plugins.attacks.sbv import (
    CORNERS, SignConsistentSparseBackdoorVector, SparseBackdoorVector, bv_plan, calibrate,
    choose_operating_point, search_grid, sign_consistent_mask, sparse_backdoor_vector,
)


def vectors():
    return [
        {"w": torch.tensor([1.0, -2.0, 3.0, 0.5]), "b": torch.tensor([0.0, 1.0])},
        {"w": torch.tensor([2.0, -1.0, -3.0, 0.5]), "b": torch.tensor([1.0, 1.0])},
        {"w": torch.tensor([0.5, -4.0, 1.0, 0.5]), "b": torch.tensor([1.0, -1.0])},
    ]


def test_sign_consistent_mask():
    mask = sign_consistent_mask(vectors())
    assert mask["w"].tolist() == [True, True, False, True]
    assert mask["b"].tolist() == [False, False]  # a zero breaks agreement; mixed signs too


def test_sbv_is_topk_of_the_sum():
    # Σ: w = [3.5, -7, 1, 1.5], b = [2, 1]; 6 entries, ρ = 0.5 keeps the 3 largest |·|: -7, 3.5, 2
    sbv = sparse_backdoor_vector(vectors(), 0.5, sign_consistent=False)
    assert sbv["w"].tolist() == [3.5, -7.0, 0.0, 0.0]
    assert sbv["b"].tolist() == [2.0, 0.0]


def test_sbv_sc_masks_before_topk():
    # masked Σ: w = [3.5, -7, 0, 1.5], b = [0, 0]; ρ = 0.5 keeps -7, 3.5, 1.5
    sbv_sc = sparse_backdoor_vector(vectors(), 0.5, sign_consistent=True)
    assert sbv_sc["w"].tolist() == [3.5, -7.0, 0.0, 1.5]
    assert sbv_sc["b"].tolist() == [0.0, 0.0]


def test_full_fraction_keeps_the_sum_and_inputs_are_untouched():
    vs = vectors()
    before = [{k: v.clone() for k, v in bv.items()} for bv in vs]
    sbv = sparse_backdoor_vector(vs, 1.0, sign_consistent=False)
    assert sbv["w"].tolist() == [3.5, -7.0, 1.0, 1.5]
    for bv, old in zip(vs, before):
        assert all(torch.equal(bv[k], old[k]) for k in bv)


def test_bv_plan_varies_corner_and_seed():
    plan = bv_plan(5, seed=7)
    assert [c for c, _ in plan] == list(CORNERS) + [CORNERS[0]]
    assert [s for _, s in plan] == [7, 1007, 2007, 3007, 4007]
    assert plan[0] == ("bottom-right", 7)  # BV 0: the cell's own seed and the evaluated trigger


def test_operating_point_is_the_strongest_that_keeps_accuracy():
    table = [{"fraction": 0.05, "lambda": 0.5, "acc": 0.80, "asr": 0.30},
             {"fraction": 0.05, "lambda": 1.0, "acc": 0.70, "asr": 0.99},   # too costly
             {"fraction": 0.02, "lambda": 1.0, "acc": 0.79, "asr": 0.60},
             {"fraction": 0.02, "lambda": 1.5, "acc": 0.79, "asr": 0.60}]  # tie: smaller λ wins
    assert choose_operating_point(table, clean_acc=0.80, tolerance=0.02) == table[2]
    # nothing within tolerance: the least harmful row
    assert choose_operating_point(table[1:2] + table[3:], clean_acc=0.90, tolerance=0.02) == table[3]


# --- single BVs: the SBV's own calibration --------------------------------------------------
def test_one_vector_sign_consistent_mask_is_its_nonzero_entries():
    bv = {"w": torch.tensor([1.0, -2.0, 0.0, 0.5, -0.0]), "b": torch.tensor([0.0, 3.0])}
    mask = sign_consistent_mask([bv])
    assert mask["w"].tolist() == [True, True, False, True, False] and mask["b"].tolist() == [False, True]
    for fraction in (0.2, 0.5, 1.0):  # so sbv_sc's rule on one BV is sbv's rule
        plain = sparse_backdoor_vector([bv], fraction, sign_consistent=False)
        masked = sparse_backdoor_vector([bv], fraction, sign_consistent=True)
        assert all(torch.equal(plain[k], masked[k]) for k in bv)


def test_search_grid_is_the_grids_or_the_values_set():
    params = {"fraction": "auto", "lambda_sbv": "auto", "fraction_grid": [0.1, 0.05], "lambda_grid": [2, 0.5]}
    assert search_grid(params) == ([0.1, 0.05], [0.5, 2.0])  # λ ascending: the early stop needs it
    assert search_grid({**params, "fraction": 0.3}) == ([0.3], [0.5, 2.0])
    assert search_grid({**params, "lambda_sbv": 1}) == ([0.1, 0.05], [1.0])


class L1Context:
    """dev ACC = 0.9 − 0.1·‖w − clean‖₁ and dev ASR = min(1, 0.5·‖w − clean‖₁): hand-checkable."""

    def __init__(self, clean):
        self.clean = clean
        self.triggers = []

    def distance(self, weights):
        return sum(float((weights[k] - self.clean[k]).abs().sum()) for k in self.clean)

    def accuracy(self, weights, task, split="test"):
        return 0.9 - 0.1 * self.distance(weights)

    def attack_success_rate(self, weights, task, trigger, target_class, split="test"):
        self.triggers.append(trigger)
        return min(1.0, 0.5 * self.distance(weights))


def test_calibration_by_hand():
    clean = {"w": torch.zeros(4)}
    bv = {"w": torch.tensor([4.0, -2.0, 1.0, 0.5])}  # TopK 0.25 keeps [4], 0.5 keeps [4, -2]
    ctx = L1Context(clean)
    chosen, table = calibrate(ctx, "t", 0, clean, [bv], "trigger", [0.25, 0.5], [0.25, 0.5, 1.0], 0.25,
                              sign_consistent=False)
    # ‖λ·TopK‖₁: ρ .25 → 1, 2, 4 (ACC .8, .7, .5: .5 leaves the tolerance .65, stop); ρ .5 → 1.5, 3 (stop)
    got = [(r["fraction"], r["lambda"], round(r["acc"], 6), round(r["asr"], 6)) for r in table["grid"]]
    assert got == [(0.25, 0.25, 0.8, 0.5), (0.25, 0.5, 0.7, 1.0), (0.25, 1.0, 0.5, 1.0),
                   (0.5, 0.25, 0.75, 0.75), (0.5, 0.5, 0.6, 1.0)]
    assert (chosen["fraction"], chosen["lambda"]) == (0.25, 0.5)  # the highest dev ASR within tolerance
    assert chosen == choose_operating_point(table["grid"], table["clean_dev_acc"], 0.25)
    assert table["clean_dev_acc"] == pytest.approx(0.9) and table["tolerance"] == 0.25
    assert set(ctx.triggers) == {"trigger"}


class FakeData:
    def valid_range(self):
        return torch.full((1, 1, 1), -1.0), torch.full((1, 1, 1), 1.0)


class FakeAttackContext:
    """Everything SBV touches, on 4-entry 'models': BV i = [1+i, −(2−i), 0.5, i/4] / (1+i), ACC and
    ASR from the distance to the cell's θ_clean, ASR scaled by the trigger's corner."""

    def __init__(self, seed=0):
        self.seed = seed
        self.tasks = ("adv", "other")
        self.adversary_task = "adv"
        self.target_class = 0
        self.preset = SimpleNamespace(name="fake", image_size=8, plugin_params={"ta": {"lambda": 0.5}})
        self.cache, self.computed = {}, []

    def data(self, task):
        return FakeData()

    def pretrained(self):
        return {"w": torch.zeros(4)}

    def clean_finetune(self, task, seed=None):
        seed = self.seed if seed is None else seed
        return {"w": torch.tensor([0.1, 0.2, 0.3, 0.4]) * (1 + seed % 7) + (task == "other")}

    def task_vector(self, task, seed=None):
        pre = self.pretrained()
        return {k: v - pre[k] for k, v in self.clean_finetune(task, seed).items()}

    def finetune(self, task, *, seed=None, poison=None, desc="", **recipe):
        assert poison is not None
        i = (seed - self.seed) // 1000
        bv = torch.tensor([1.0 + i, -(2.0 - i), 0.5, 0.25 * i]) / (1 + i)
        return {k: v + bv for k, v in self.clean_finetune(task, seed).items()}

    def distance(self, weights):
        clean = self.clean_finetune("adv")
        return sum(float((weights[k] - clean[k]).abs().sum()) for k in clean)

    def accuracy(self, weights, task, split="test"):
        return 0.9 - 0.05 * self.distance(weights)

    def attack_success_rate(self, weights, task, trigger, target_class, split="test"):
        corner = (trigger.top, trigger.left)
        return min(1.0, (0.2 + 0.1 * sum(corner)) * self.distance(weights))

    def cached(self, kind, params, compute, label=None):
        key = (kind, json.dumps(params, sort_keys=True))
        if key not in self.cache:
            self.computed.append(kind)
            self.cache[key] = compute()
        return self.cache[key]


def sbv_params(cls, **overrides):
    params = {name: p.default for name, p in cls.params.items()}
    params.update({"fraction_grid": [0.25, 0.5, 1.0], "lambda_grid": [0.5, 1.0, 2.0, 3.0], "acc_tolerance": 0.1})
    params.update(overrides)
    return params


@pytest.mark.parametrize("cls", [SparseBackdoorVector, SignConsistentSparseBackdoorVector])
def test_with_one_bv_the_sbv_is_its_single_bv(cls):
    """n = 1: SBV (and SBV_SC) = TopK(BV_0), so the same search must give the same everything."""
    ctx = FakeAttackContext()
    info = cls().run(ctx, sbv_params(cls, n=1)).info
    single = info["single_bvs"][0]
    assert single["calibration"] == info["calibration"]
    assert (single["fraction"], single["lambda"]) == (info["fraction"], info["lambda_sbv"])
    assert (single["dev_acc"], single["dev_asr"]) == (info["dev_acc"], info["dev_asr"])
    assert single["probe_merged_asr"] == info["probe_merged_asr_per_trigger"][0]
    assert single["probe_merged_acc"] == info["probe_merged_acc"]
    assert single["asr"] == info["asr_per_trigger"][0]
    assert len(info["calibration"]["grid"]) > 1  # a real search, not one fixed point


def test_single_bvs_are_calibrated_alike_and_shared_by_sbv_and_sbv_sc():
    ctx = FakeAttackContext()
    infos = {cls.name: cls().run(ctx, sbv_params(cls, n=2)).info
             for cls in (SparseBackdoorVector, SignConsistentSparseBackdoorVector)}
    assert ctx.computed.count("sbv.backdoor_vector") == 2 and ctx.computed.count("sbv.single_bv") == 2
    assert infos["sbv"]["single_bvs"] == infos["sbv_sc"]["single_bvs"]
    info = infos["sbv_sc"]
    assert info["probe_lambda"] == 0.5  # the preset's ta.lambda
    fractions, lambdas = search_grid(sbv_params(SparseBackdoorVector))
    for i, single in enumerate(info["single_bvs"]):
        assert {"position", "seed", "backdoored_acc", "backdoored_asr", "fraction", "lambda", "dev_acc",
                "dev_asr", "calibration", "kept", "acc", "asr", "probe_merged_acc", "probe_merged_asr",
                "uncalibrated_acc", "uncalibrated_asr", "uncalibrated_probe_merged_asr"} <= set(single)
        assert (single["position"], single["seed"]) == bv_plan(2, 0)[i]
        cal = single["calibration"]
        assert cal["clean_dev_acc"] == info["calibration"]["clean_dev_acc"]  # same θ_clean, same dev split
        assert cal["tolerance"] == info["calibration"]["tolerance"] == 0.1
        tried = [(r["fraction"], r["lambda"]) for r in cal["grid"]]
        assert set(tried) <= {(f, lam) for f in fractions for lam in lambdas}
        assert {f for f, _ in tried} == set(fractions)  # every ρ is tried (λ stops early)
        assert cal["grid"][0]["lambda"] == lambdas[0]
        row = choose_operating_point(cal["grid"], cal["clean_dev_acc"], cal["tolerance"])
        assert (single["fraction"], single["lambda"], single["dev_acc"], single["dev_asr"]) == (
            row["fraction"], row["lambda"], row["acc"], row["asr"])
    # BV 1 is calibrated and measured with its own trigger (top-left), so its figures differ from BV 0's
    assert info["single_bvs"][0]["calibration"] != info["single_bvs"][1]["calibration"]
    assert info["best_single_probe_merged_asr"] == max(s["probe_merged_asr"] for s in info["single_bvs"])
    assert len(info["probe_merged_asr_per_trigger"]) == len(info["asr_per_trigger"]) == 2


def test_fixed_fraction_and_lambda_apply_to_the_single_bvs_too():
    ctx = FakeAttackContext()
    info = SparseBackdoorVector().run(ctx, sbv_params(SparseBackdoorVector, n=2, fraction=0.5, lambda_sbv=1.0)).info
    assert (info["fraction"], info["lambda_sbv"]) == (0.5, 1.0)
    for single in info["single_bvs"]:
        assert (single["fraction"], single["lambda"]) == (0.5, 1.0)
        assert [(r["fraction"], r["lambda"]) for r in single["calibration"]["grid"]] == [(0.5, 1.0)]


def test_smoke_wiring_and_the_probe_is_the_ta_none_cell(store_copy):
    """On smoke: the info keys, one single-BV stage per BV for both attacks, the real BVs' one-vector
    sign-consistent mask, and probe merge = the ta/none cell (the findings table relies on it)."""
    from safetensors.torch import load_file

    from mmbench.cli import main

    argv = ["run", "--preset", "smoke", "--attack", "sbv", "--attack", "sbv_sc", "--merger", "ta",
            "--defense", "none", "--store", str(store_copy), "--quiet", "--strict", "--set", "sbv.n=2",
            "--set", "sbv_sc.n=2"]
    assert main(argv) == 0
    cells = {a: json.loads((store_copy / "results" / "smoke" / f"{a}__ta__none__seed0.json").read_text())
             for a in ("sbv", "sbv_sc")}
    for name, cell in cells.items():
        assert cell["status"] == "ok", (name, cell.get("error"))
        info, metrics = cell["info"]["attack"], cell["metrics"]
        assert info["probe_lambda"] == cell["info"]["merge"]["lambda"] == 1.0  # smoke sets ta.lambda 1.0
        assert metrics["asr"] == info["probe_merged_asr_per_trigger"][0]
        assert metrics["attacked_task_acc"] == info["probe_merged_acc"]
        assert metrics["standalone_asr"] == info["asr_per_trigger"][0]
        assert info["best_single_probe_merged_asr"] == max(s["probe_merged_asr"] for s in info["single_bvs"])
        for single in info["single_bvs"]:
            for key in ("acc", "asr", "probe_merged_acc", "probe_merged_asr", "dev_acc", "dev_asr",
                        "uncalibrated_acc", "uncalibrated_asr", "uncalibrated_probe_merged_asr",
                        "backdoored_acc", "backdoored_asr", "kept"):
                assert 0 <= single[key] <= 1, (name, key)
            assert single["calibration"]["clean_dev_acc"] == info["calibration"]["clean_dev_acc"]
            tried = {(r["fraction"], r["lambda"]) for r in single["calibration"]["grid"]}
            assert (single["fraction"], single["lambda"]) in tried
    assert cells["sbv"]["info"]["attack"]["single_bvs"] == cells["sbv_sc"]["info"]["attack"]["single_bvs"]

    metas = [json.loads(p.read_text()) for p in (store_copy / "artifacts").glob("*/*.json")]
    kinds = [m["kind"] for m in metas]
    assert kinds.count("plugin:sbv.backdoor_vector") == 2 and kinds.count("plugin:sbv.single_bv") == 2
    for meta in metas:
        if meta["kind"] == "plugin:sbv.backdoor_vector":
            bv = load_file(str(store_copy / "artifacts" / meta["key"][:2] / f"{meta['key']}.safetensors"))
            mask = sign_consistent_mask([bv])
            assert all(torch.equal(mask[k], bv[k] != 0) for k in bv)
            assert all(torch.equal(a, b) for a, b in zip(
                sparse_backdoor_vector([bv], 0.05, True).values(), sparse_backdoor_vector([bv], 0.05, False).values()))
