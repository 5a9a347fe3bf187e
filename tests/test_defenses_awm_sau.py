"""AWM's and SAU's pieces on hand-checkable tensors, and both defenses end to end on smoke."""
from __future__ import annotations

import math

import pytest
import torch

from mmbench_plugins.defenses.awm import apply_mask, changed_tensors, final_mask
from mmbench_plugins.defenses.sau import js_divergence, potential_poison, shared_loss, shared_mask


def test_apply_mask_scales_the_merged_task_vector_only():
    pre = {"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([5.0])}
    merged = {"a": torch.tensor([3.0, 6.0]), "b": torch.tensor([5.0])}
    out = apply_mask(pre, merged, {"a": torch.tensor([0.5, 2.0])})
    assert out["a"].tolist() == [2.0, 10.0]      # 1 + 0.5·2, 2 + 2·4
    assert out["b"] is merged["b"]               # unmasked tensors are the merge's own


def test_only_tensors_the_merge_changed_are_masked():
    pre = {"a": torch.zeros(2), "b": torch.ones(2), "n": torch.tensor([3])}
    merged = {"a": torch.tensor([0.0, 1.0]), "b": torch.ones(2), "n": torch.tensor([4])}
    assert changed_tensors(pre, merged) == ["a"]  # b unchanged; n is not floating point


def test_final_mask_expected_at_logits_zero_is_all_ones_after_rescale():
    logits = {"a": torch.zeros(3), "b": torch.tensor([2.0, -2.0])}
    params = {"final_mask": "expected", "temperature": 0.5}
    mask, info = final_mask(logits, params, torch.Generator().manual_seed(0))
    assert torch.allclose(mask["a"], torch.ones(3))                        # σ(0) = 0.5, / mean
    s = torch.sigmoid(torch.tensor([2.0, -2.0]))
    assert torch.allclose(mask["b"], s / s.mean())
    assert info["mask_kept_fraction"] == pytest.approx(4 / 5)              # logits ≥ 0: 3 + 1 of 5
    assert info["mask_keep_probability"] == pytest.approx((1.5 + float(s.sum())) / 5)


def test_js_divergence_zero_for_equal_rows_and_log2_for_disjoint_ones():
    p = torch.tensor([[0.2, 0.8], [1.0, 0.0]])
    q = torch.tensor([[0.2, 0.8], [0.0, 1.0]])
    js = js_divergence(p, q)
    assert js[0].item() == pytest.approx(0.0, abs=1e-7)
    assert js[1].item() == pytest.approx(math.log(2), abs=1e-6)


def test_shared_and_potential_poison_sets_by_hand():
    # 3 samples, 3 classes; argmax rows: clean (0,1,2), adv (1,1,0), clean_ref (0,1,1), adv_ref (1,2,0)
    def rows(*labels):
        return torch.nn.functional.one_hot(torch.tensor(labels), 3).float() * 5
    clean, adv, clean_ref, adv_ref = rows(0, 1, 2), rows(1, 1, 0), rows(0, 1, 1), rows(1, 2, 0)
    # sample 0: both fooled, both say 1: shared; 1: θ not fooled; 2: both fooled, both say 0: shared
    assert shared_mask(clean, adv, clean_ref, adv_ref).tolist() == [True, False, True]
    # t = (1, 2, 0): t ≠ ŷ = (0, 1, 2) everywhere; t ≠ ref's clean (0, 1, 1) everywhere
    assert potential_poison(clean, clean_ref, adv_ref).tolist() == [True, True, True]
    assert potential_poison(clean, clean_ref, rows(0, 2, 0)).tolist() == [False, True, True]


def test_shared_loss_is_minus_log_one_minus_p_target_over_the_batch():
    adv = torch.log(torch.tensor([[0.5, 0.5], [0.9, 0.1]]))    # p_θ on x̃
    adv_ref = torch.tensor([[0.0, 1.0], [1.0, 0.0]])           # t = (1, 0)
    poison = torch.tensor([True, False])
    # one poisoned sample with p_t = 0.5: both forms give −log(0.5 + 1e-6); divided by B = 2
    assert shared_loss(adv, adv_ref, poison).item() == pytest.approx(-math.log(0.5 + 1e-6) / 2, rel=1e-5)
    assert shared_loss(adv, adv_ref, torch.tensor([False, False])).item() == 0.0


def _smoke(smoke_store):
    from mmbench import presets
    from mmbench.api import BoundMerger
    from mmbench.context import RunContext, SharedStages
    from mmbench.plugins import load
    from mmbench.store import Store

    ctx = RunContext(SharedStages(presets.SMOKE, Store(smoke_store), torch.device("cpu"), quiet=True), 0)
    pre = ctx.pretrained()
    vectors = {t: ctx.task_vector(t) for t in ctx.tasks}
    ta = load().get("merger", "ta").obj
    merger = BoundMerger(ta, {**ta.defaults, **presets.SMOKE.plugin_params["ta"]}, ctx)
    return ctx, pre, vectors, merger


def test_awm_without_steps_and_expected_mask_returns_the_merge(smoke_store):
    from mmbench_plugins.defenses.awm import AdversarialWeightMasking

    ctx, pre, vectors, merger = _smoke(smoke_store)
    merged = merger(pre, vectors)
    params = {**AdversarialWeightMasking.defaults, "steps": 0, "final_mask": "expected"}
    out = AdversarialWeightMasking().defend(pre, vectors, merger, ctx, params)
    for k, v in merged.weights.items():
        assert torch.allclose(out.weights[k], v, atol=1e-6), k
    assert out.info["mask_keep_probability"] == pytest.approx(0.5)


@pytest.mark.parametrize("name", ["awm", "sau"])
def test_post_merge_masks_on_smoke_train_and_are_reproducible(smoke_store, name):
    from mmbench_plugins.defenses.awm import AdversarialWeightMasking
    from mmbench_plugins.defenses.sau import SharedAdversarialUnlearning

    plugin = {"awm": AdversarialWeightMasking, "sau": SharedAdversarialUnlearning}[name]()
    ctx, pre, vectors, merger = _smoke(smoke_store)
    params = {**plugin.defaults, "steps": 4, "lr": 0.1}
    first = plugin.defend(pre, vectors, merger, ctx, params)
    second = plugin.defend(pre, vectors, merger, ctx, params)
    assert all(torch.equal(first.weights[k], second.weights[k]) for k in first.weights)  # seeded
    info = first.info
    assert info["steps"] == 4 and info["masked_entries"] > 0
    assert info["mask_keep_probability"] != pytest.approx(0.5, abs=1e-4)   # the logits moved
    assert all(d > 0 for d in info["perturbation_linf"])                  # δ moved
    assert "entropy_clean" in info["final_losses"]
    if name == "sau":
        assert 0 <= info["final_losses"]["poison_fraction"] <= 1
        assert 0 <= info["final_losses"]["shared_fraction"] <= 1
    merged = merger(pre, vectors).weights
    assert any(not torch.equal(first.weights[k], merged[k]) for k in merged)
