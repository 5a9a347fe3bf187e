"""SBV / SBV_SC combination math on hand-checkable tensors."""
from __future__ import annotations

import torch

from mmbench_plugins.attacks.sbv import (
    CORNERS, bv_plan, choose_operating_point, sign_consistent_mask, sparse_backdoor_vector,
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
