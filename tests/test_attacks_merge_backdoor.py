"""MergeBackdoor's pieces on hand-checkable tensors, and its training on smoke (the plugin is not
registered yet: the harness replaces one contributor's vector, this attack contributes two)."""
from __future__ import annotations

import pytest
import torch

from mmbench.api import PluginError, Trigger
from mmbench_plugins.attacks.merge_backdoor import pair_loss, shadow_merge, stamp


def test_stamp_keeps_true_labels_for_suppression_and_relabels_for_emergence():
    images, labels = torch.zeros(4, 1, 3, 3), torch.tensor([0, 1, 2, 3])
    trigger = Trigger(torch.ones(1, 1, 1), 2, 2)                       # one white pixel, bottom right
    x, y = stamp(images, labels, trigger, 1.0, torch.Generator().manual_seed(0), None)
    assert y.tolist() == [0, 1, 2, 3] and (x[:, 0, 2, 2] == 1).all() and x.sum() == 4
    x, y = stamp(images, labels, trigger, 1.0, torch.Generator().manual_seed(0), 1)
    assert y.tolist() == [1, 1, 1, 1]
    x, y = stamp(images, labels, trigger, 0.0, torch.Generator().manual_seed(0), 1)
    assert x is images and y is labels                                  # nothing chosen: untouched
    assert images.sum() == 0 and labels.tolist() == [0, 1, 2, 3]


def test_shadow_merge_is_the_average_at_one_half():
    pre, own, other = {"w": torch.tensor([0.0, 1.0])}, {"w": torch.tensor([2.0, 1.0])}, {"w": torch.tensor([4.0, 3.0])}
    assert shadow_merge(pre, own, other, 0.5)["w"].tolist() == [3.0, 2.0]   # (θ_own + θ_other) / 2


def test_pair_loss_gradient_is_supp_plus_half_the_merges():
    # logits = x·W (1 input, 2 classes), W = 0 everywhere: softmax (½, ½), so ∂CE/∂W = x ⊗ (p − e_y):
    # suppression x 1, y 0: (−½, ½); emergence on θ_M x 4, y 1: (2, −2), times ∂θ_M/∂θ_own = ½: (1, −1)
    def forward(weights, x):
        return x @ weights["w"]
    pre = {"w": torch.zeros(1, 2)}
    own = {"w": torch.zeros(1, 2, requires_grad=True)}
    other = {"w": torch.zeros(1, 2, requires_grad=True)}
    supp, emerge = pair_loss(forward, pre, own, other, 0.5, (torch.tensor([[1.0]]), torch.tensor([0])),
                             (torch.tensor([[4.0]]), torch.tensor([1])))
    (supp + emerge).backward()
    assert own["w"].grad.tolist() == [[0.5, -0.5]]
    assert other["w"].grad is None                                      # the partner is held


def _ctx(smoke_store):
    from mmbench import presets
    from mmbench.context import RunContext, SharedStages
    from mmbench.store import Store

    return RunContext(SharedStages(presets.SMOKE, Store(smoke_store), torch.device("cpu"), quiet=True), 0)


def test_partner_task_default_and_errors(smoke_store):
    from mmbench_plugins.attacks.merge_backdoor import partner_of

    ctx = _ctx(smoke_store)
    a, b = [t.name for t in ctx.preset.tasks]
    assert partner_of(ctx, a, None) == b and partner_of(ctx, b, None) == a
    with pytest.raises(PluginError, match="another task"):
        partner_of(ctx, a, a)


def test_merge_backdoor_trains_two_contributions_on_smoke(smoke_store):
    from mmbench_plugins.attacks.merge_backdoor import MergeBackdoor

    ctx = _ctx(smoke_store)
    plugin = MergeBackdoor()
    result = plugin.run(ctx, {**plugin.defaults, "epochs": 2, "poison_rate": 0.5, "patch_area": 0.0625})
    info = result.info
    a, b = result.task, info["partner_task"]
    assert a == ctx.adversary_task and b != a and result.target_task == a
    assert info["chosen_epoch"] in (1, 2) and len(info["per_epoch"]) == 2
    chosen = info["per_epoch"][info["chosen_epoch"] - 1]
    other = info["per_epoch"][2 - info["chosen_epoch"]]
    assert sum(chosen["dev_acc_alone"].values()) >= sum(other["dev_acc_alone"].values())  # the rule
    for key in ("dev_acc_alone", "dev_asr_alone", "dev_acc_shadow", "dev_asr_shadow"):
        assert set(chosen[key]) == {a, b} and all(0 <= v <= 1 for v in chosen[key].values())
    assert list(result.contributions) == [b] and list(result.uploads()) == [a, b]
    tau_b = result.contributions[b]
    assert set(tau_b) == set(result.task_vector)
    assert any(v.abs().sum() > 0 for v in result.task_vector.values())
    assert any(v.abs().sum() > 0 for v in tau_b.values())
    assert all(v.abs().sum() == 0 for k, v in result.task_vector.items() if k.startswith("conv1"))  # frozen
    assert result.trigger.size == 4                                     # 0.0625 of 16×16 px
    # the trigger is white: each channel's top of the valid range
    _, high = ctx.data(a).valid_range()
    assert torch.allclose(result.trigger.pattern[:, 0, 0], high.flatten())
