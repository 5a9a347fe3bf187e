"""BadMerging's pure pieces: interpolation loss, ratio draws, patch sizes, shadow head, stage 1."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mmbench.api import Trigger
from mmbench_plugins.attacks.badmerging import (
    default_target_task, draw_ratio, interpolate_features, interpolation_loss, optimise_patch, paste,
    preset_shadow_head, random_resized_crop, random_shadow_head, reference_images, shuffled, targeted_pgd,
)
from mmbench.triggers import patch_side


def test_ratio_is_drawn_in_range_reproducibly():
    gen = torch.Generator().manual_seed(0)
    draws = [draw_ratio(gen, 0.2, 1.0) for _ in range(1000)]
    assert 0.2 <= min(draws) < 0.25 and 0.95 < max(draws) <= 1.0
    again = torch.Generator().manual_seed(0)
    assert [draw_ratio(again, 0.2, 1.0) for _ in range(5)] == draws[:5]


def test_interpolated_features_and_loss():
    ft, pre = torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 4.0]])
    assert interpolate_features(ft, pre, 1.0).tolist() == [[2.0, 0.0]]
    assert interpolate_features(ft, pre, 0.25).tolist() == [[0.5, 3.0]]
    clean, labels = torch.tensor([[1.0, 0.0], [0.0, 2.0]]), torch.tensor([0, 1])
    backdoor = torch.tensor([[0.0, 3.0]])
    expected = F.cross_entropy(clean, labels) + 5 * F.cross_entropy(backdoor, torch.tensor([0]))
    assert torch.allclose(interpolation_loss(clean, labels, backdoor, 0, 5.0), expected)


@pytest.mark.parametrize("area, size, side", [(0.01, 224, 22), (0.015, 224, 27), (0.01, 32, 3),
                                              (0.015, 32, 4), (0.01, 16, 2), (0.0625, 32, 8), (1e-5, 16, 1)])
def test_patch_side_scales_with_the_image(area, size, side):
    assert patch_side(area, size) == side


def test_paste_matches_trigger_apply():
    images = torch.randn(2, 3, 8, 8)
    patch = torch.randn(3, 3, 3)
    assert torch.equal(paste(images, patch, 5, 2), Trigger(patch, 5, 2).apply(images))


def test_random_shadow_head_keeps_the_target_row_first_and_the_rest_orthogonal():
    target = torch.randn(16) * 3
    head = random_shadow_head(target, 300, torch.Generator().manual_seed(0))
    assert head.shape == (16, 16)  # 300 others capped at d − 1
    assert torch.equal(head[0], target)
    unit = head / head.norm(dim=1, keepdim=True)
    assert torch.allclose(unit @ unit.T, torch.eye(16), atol=1e-5)
    assert torch.allclose(head.norm(dim=1), target.norm().expand(16), atol=1e-4)


def test_preset_shadow_head_moves_the_target_to_index_0():
    heads = {"a": torch.arange(6.0).view(3, 2), "b": torch.arange(6.0, 10.0).view(2, 2)}
    head = preset_shadow_head(heads, "b", 1)
    assert head.tolist() == [[8.0, 9.0], [0.0, 1.0], [2.0, 3.0], [4.0, 5.0], [6.0, 7.0]]


def test_default_target_task():
    assert default_target_task(("a", "b", "c"), "a") == "b"
    assert default_target_task(("a", "b", "c"), "b") == "a"


def toy_model(classes=3, dim=3 * 6 * 6, seed=0):
    weight = torch.randn(classes, dim, generator=torch.Generator().manual_seed(seed))
    return lambda x: x.flatten(1) @ weight.T


def test_stage1_patch_raises_the_target_probability_and_stays_in_range():
    logits_fn = toy_model()
    images = torch.randn(20, 3, 6, 6, generator=torch.Generator().manual_seed(1)).clamp(-1, 1)
    low, high = -torch.ones(3), torch.ones(3)
    start = torch.zeros(3, 2, 2)

    def target_prob(patch):
        return F.softmax(logits_fn(paste(images, patch, 4, 4)), -1)[:, 2].mean()
    gen = torch.Generator().manual_seed(0)
    patch, history = optimise_patch(logits_fn, lambda epoch: shuffled(images, 10, gen, batch_size=4), start,
                                    4, 4, 2, epochs=2, max_iterations=20, step=0.1, phi=1.0,
                                    early_stop=True, skip_predicted=True, low=low, high=high)
    assert target_prob(patch) > target_prob(start)
    assert patch.min() >= -1 and patch.max() <= 1
    assert len(history) == 2 and all(0 <= h["success_rate"] <= 1 for h in history)
    assert all(h["attacked"] <= 10 for h in history)


def test_crop_and_pgd_shapes_and_budget():
    images = torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(2)).clamp(-1, 1)
    crops = random_resized_crop(images, (0.2, 0.5), (0.75, 4 / 3), torch.Generator().manual_seed(0))
    assert crops.shape == images.shape
    eps = torch.full((3, 1, 1), 0.1)
    adv, reached = targeted_pgd(toy_model(), crops, torch.tensor([0, 1, 2, 0]), eps, eps / 4, 10,
                                -torch.ones(3), torch.ones(3))
    assert (adv - crops).abs().max() <= 0.1 + 1e-6
    assert reached.dtype == torch.bool and reached.shape == (4,)
    assert torch.equal(adv[~reached], crops[~reached])  # never-reached images stay un-attacked
    assert not math.isnan(float(adv.sum()))


class FakeData:
    def __init__(self, x, y):
        self.x, self.y = x, y

    def batches(self, split, batch_size, *, shuffle=False, generator=None, limit=None):
        order = torch.randperm(len(self.y), generator=generator) if shuffle else torch.arange(len(self.y))
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            yield self.x[idx], self.y[idx]


def test_reference_images_are_of_the_target_class():
    y = torch.arange(600) % 3
    x = y.float().view(-1, 1, 1, 1).expand(600, 3, 2, 2)
    ref = reference_images(FakeData(x, y), 2, 5, torch.Generator().manual_seed(0))
    assert ref.shape == (5, 3, 2, 2) and bool((ref == 2).all())
    assert reference_images(FakeData(x, y), 2, 1000, torch.Generator()).shape[0] == 200
