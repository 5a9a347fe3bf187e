"""TSV-M on matrices small enough to check by hand."""
from __future__ import annotations

import pytest
import torch

from mmbench_plugins.mergers.tsvm import TaskSingularVectors, polar, tsv_merge_matrix


class Log:
    def __init__(self):
        self.lines = []

    def log(self, message):
        self.lines.append(message)


def merge(pre, vectors, **params):
    ctx = Log()
    return TaskSingularVectors().merge(pre, vectors, ctx, params), ctx


def test_each_task_keeps_its_top_singular_direction():
    # two tasks, 2×2: c = ⌊2 / 2⌋ = 1 component each. τ_1 = diag(3, 1): its top direction is
    # e1 with σ 3 (the σ-1 direction is dropped); τ_2 = diag(0, 2): e2 with σ 2. The kept
    # directions are already orthonormal, so the merge is diag(3, 2): a sum, not a mean.
    pre = {"w": torch.zeros(2, 2)}
    t1 = {"w": torch.tensor([[3.0, 0.0], [0.0, 1.0]])}
    t2 = {"w": torch.tensor([[0.0, 0.0], [0.0, 2.0]])}
    merged, _ = merge(pre, {"a": t1, "b": t2})
    torch.testing.assert_close(merged.weights["w"], torch.tensor([[3.0, 0.0], [0.0, 2.0]]))
    assert merged.info["components_per_task"] == [1] and merged.info["svd_tensors"] == 1


def test_other_tensors_are_averaged_and_alpha_scales_everything():
    pre = {"b": torch.tensor([1.0, 1.0]), "w": torch.ones(2, 2)}
    t1 = {"b": torch.tensor([2.0, 4.0]), "w": torch.tensor([[3.0, 0.0], [0.0, 1.0]])}
    t2 = {"b": torch.tensor([0.0, 0.0]), "w": torch.tensor([[0.0, 0.0], [0.0, 2.0]])}
    merged, _ = merge(pre, {"a": t1, "b": t2}, alpha=0.5)
    torch.testing.assert_close(merged.weights["b"], torch.tensor([1.5, 2.0]))  # 1 + 0.5 · mean
    torch.testing.assert_close(merged.weights["w"], torch.tensor([[2.5, 1.0], [1.0, 2.0]]))  # 1 + 0.5 · diag(3, 2)
    assert merged.info["averaged_tensors"] == 1


def test_one_task_gives_back_task_arithmetic():
    g = torch.Generator().manual_seed(0)
    pre = {"w": torch.randn(4, 3, generator=g), "b": torch.randn(3, generator=g)}
    tau = {"w": torch.randn(4, 3, generator=g), "b": torch.randn(3, generator=g)}
    merged, _ = merge(pre, {"only": tau}, alpha=0.7)
    for k in pre:  # c = r: the full SVD rebuilds τ, and the mean of one is itself
        torch.testing.assert_close(merged.weights[k], pre[k] + 0.7 * tau[k], atol=1e-5, rtol=1e-5)


def test_polar_factor():
    q = torch.tensor([[0.6, -0.8], [0.8, 0.6], [0.0, 0.0]])  # orthonormal columns
    torch.testing.assert_close(polar(q * torch.tensor([2.0, 5.0])), q)  # scaling the columns changes nothing
    p = polar(torch.tensor([[1.0, 1.0], [0.0, 1.0]]))
    torch.testing.assert_close(p.T @ p, torch.eye(2), atol=1e-6, rtol=0)


def test_rank_below_the_task_count_gives_a_zero_update_and_says_so():
    pre = {"w": torch.zeros(2, 2), "other": torch.zeros(5, 5)}
    vectors = {t: {"w": torch.eye(2), "other": torch.eye(5)} for t in "abc"}  # r = 2 < K = 3
    merged, ctx = merge(pre, vectors)
    assert torch.equal(merged.weights["w"], torch.zeros(2, 2))
    assert merged.info["zero_rank"] == ["w"] and "rank < 3" in ctx.lines[0]
    # 5×5 with 3 tasks: c = 1 component each, so this tensor is merged, not zeroed
    assert "other" not in merged.info["zero_rank"]
    assert merged.weights["other"].shape == (5, 5) and torch.isfinite(merged.weights["other"]).all()


def test_tsv_merge_matrix_counts_components():
    update, c = tsv_merge_matrix([torch.randn(8, 6), torch.randn(8, 6), torch.randn(8, 6)])
    assert c == 2 and update.shape == (8, 6)


def test_no_vectors_is_an_error():
    from mmbench.api import PluginError

    with pytest.raises(PluginError):
        merge({"w": torch.zeros(1, 1)}, {})
