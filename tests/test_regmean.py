"""RegMean's closed form on hand-checkable matrices, its attention hook, and a merge on smoke."""
from __future__ import annotations

import pytest
import torch

from mmbench_plugins.mergers.regmean import RegMean, attention_input, regmean_update, shrink


def test_shrink_keeps_the_diagonal_and_scales_the_rest():
    g = torch.tensor([[2.0, 1.0], [1.0, 2.0]])
    assert shrink(g, 1.0).tolist() == g.tolist()
    assert shrink(g, 0.5).tolist() == [[2.0, 0.5], [0.5, 2.0]]
    assert shrink(g, 0.0).tolist() == [[2.0, 0.0], [0.0, 2.0]]


def test_closed_form_by_hand():
    # G1 = diag(3, 1), G2 = I; ΔW1 = [1, 0], ΔW2 = [0, 2] (out 1 × in 2):
    # Σ G = diag(4, 2); Σ G ΔWᵀ = [3, 0] + [0, 2] = [3, 2]; solve → [0.75, 1.0]
    grams = [torch.diag(torch.tensor([3.0, 1.0])), torch.eye(2)]
    deltas = [torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 2.0]])]
    assert torch.allclose(regmean_update(grams, deltas, 1.0), torch.tensor([[0.75, 1.0]]))
    # proj is applied as x @ P (in × out): the same numbers, transposed
    assert torch.allclose(regmean_update(grams, [d.T for d in deltas], 1.0, transposed=True),
                          torch.tensor([[0.75], [1.0]]))


def test_equal_grams_give_the_plain_average():
    g = torch.tensor([[2.0, 0.5], [0.5, 1.0]])
    deltas = [torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([[-1.0, 0.0], [1.0, 0.0]])]
    assert torch.allclose(regmean_update([g, g], deltas, 0.95), torch.tensor([[0.0, 1.0], [2.0, 2.0]]))


@pytest.mark.parametrize("batch_first", [True, False])
def test_attention_input_is_what_out_proj_receives(batch_first):
    torch.manual_seed(0)
    attn = torch.nn.MultiheadAttention(8, 2, batch_first=batch_first)
    x = torch.randn(3, 5, 8) if batch_first else torch.randn(5, 3, 8)
    expected = attn(x, x, x, need_weights=False)[0]
    got = attn.out_proj(attention_input(attn, x))           # (N, L, D)
    if not batch_first:
        got = got.transpose(0, 1)
    assert torch.allclose(got, expected, atol=1e-5)


def test_one_task_reproduces_its_model_and_every_linear_weight_has_a_gram(smoke_store):
    from mmbench import presets
    from mmbench.context import RunContext, SharedStages
    from mmbench.store import Store

    ctx = RunContext(SharedStages(presets.SMOKE, Store(smoke_store), torch.device("cpu"), quiet=True), 0)
    pre = ctx.pretrained()
    task = ctx.tasks[0]
    tau = ctx.task_vector(task)
    merged = RegMean().merge(pre, {task: tau}, ctx, {})
    # smoke: 2 blocks × (in_proj, out_proj, c_fc, c_proj) + proj solved; K = 1 gives W_pre + ΔW exactly
    assert merged.info["solved_tensors"] == 9 and merged.info["linear_without_gram"] == []
    for name, value in merged.weights.items():
        assert torch.allclose(value, pre[name] + tau[name], atol=1e-5), name
