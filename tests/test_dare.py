"""DARE (drop and rescale, then TA or TIES) on hand-checkable tensors (plugins/mergers/dare.py).

The merger is not registered as an entry point yet: imported directly, merged on small tensors.
"""
import zlib

import pytest
import torch

from mmbench import params as mparams
from mmbench.api import Merged, PluginError, Sizes
from mmbench.vectors import task_arithmetic
from mmbench_plugins.mergers import ties
from mmbench_plugins.mergers.dare import Dare, drop_and_rescale


class FakeContext:
    """Only what DARE uses: ``generator(*salt)``, seeded from (seed, salt); logs every salt."""

    def __init__(self, seed=0):
        self.seed = seed
        self.salts = []

    def generator(self, *salt):
        self.salts.append(salt)
        return torch.Generator().manual_seed(zlib.crc32(repr((self.seed, salt)).encode()))


def t(*values):
    return torch.tensor(values, dtype=torch.float32)


def merge(pretrained, task_vectors, seed=0, **overrides):
    ctx = FakeContext(seed)
    return Dare().merge(pretrained, task_vectors, ctx, overrides), ctx


def small_case():
    pretrained = {"w": t(1, 2, 3, 4), "b": t(0.5, -0.5)}
    task_vectors = {"a": {"w": t(1, -2, 0.5, 0), "b": t(2, 0)},
                    "b": {"w": t(-1, 4, 0.5, 1), "b": t(-3, 1)}}
    return pretrained, task_vectors


# --- p = 0: exactly the base merger ------------------------------------------

def test_p0_is_task_arithmetic_exactly():
    pretrained, task_vectors = small_case()
    merged, ctx = merge(pretrained, task_vectors, p=0.0, base="ta", **{"lambda": 0.3})
    expected = task_arithmetic(pretrained, task_vectors, 0.3)
    assert isinstance(merged, Merged)
    for n in pretrained:
        assert torch.equal(merged.weights[n], expected[n]), n
    # by hand: w = (1,2,3,4) + 0.3·(0, 2, 1, 1) = (1, 2.6, 3.3, 4.3)
    assert torch.allclose(merged.weights["w"], t(1, 2.6, 3.3, 4.3))
    assert merged.info["kept"] == {"a": 1.0, "b": 1.0}


def test_p0_with_ties_base_is_the_ties_merger():
    g = torch.Generator().manual_seed(1)
    pretrained = {"x": torch.randn(40, 7, generator=g), "y": torch.randn(13, generator=g)}
    task_vectors = {task: {n: torch.randn(v.shape, generator=g) for n, v in pretrained.items()}
                    for task in ("a", "b", "c")}
    for mode in ("sum", "mean", "max"):
        merged, _ = merge(pretrained, task_vectors, p=0.0, base="ties", k=0.3, merge=mode, **{"lambda": 0.4})
        expected = ties.Ties().merge(pretrained, task_vectors, None, {"k": 0.3, "merge": mode, "lambda": 0.4})
        for n in pretrained:
            assert torch.equal(merged.weights[n], expected.weights[n]), (mode, n)


def test_ties_base_by_hand():
    # p = 0, k = 0.5 of 4 entries keeps 2 per task: a → (4, -3, 0, 0), b → (-1, 0, 0, 5)
    # elect: sign(3, -3, 0, 5) = (+, -, majority, +), majority = sign(1 - 1 + 1) = +; sum merge:
    # coordinate 0 keeps only a's 4 (b's -1 disagrees) → merged (4, -3, 0, 5); λ = 0.5 (auto for ties)
    pretrained = {"w": t(0, 0, 0, 0)}
    task_vectors = {"a": {"w": t(4, -3, 1, 0)}, "b": {"w": t(-1, 0.5, 0, 5)}}
    merged, _ = merge(pretrained, task_vectors, p=0.0, base="ties", k=0.5)
    assert merged.info["lambda"] == 0.5
    assert torch.equal(merged.weights["w"], t(2, -1.5, 0, 2.5))


# --- drop and rescale ----------------------------------------------------------

def test_kept_fraction_and_kept_entries_are_tau_over_1_minus_p():
    tau = torch.arange(1, 100_001, dtype=torch.float32) / 1000
    p = 0.75
    out, kept = drop_and_rescale({"w": tau}, p, torch.Generator().manual_seed(0))
    mask = out["w"] != 0
    # 100 000 Bernoulli(0.25): standard deviation of the fraction ≈ 0.0014; allow 5σ
    assert abs(mask.float().mean().item() - 0.25) < 0.007
    assert kept == pytest.approx(mask.float().mean().item())
    assert torch.equal(out["w"][mask], tau[mask] / (1 - p))  # exactly τ/(1−p) = 4τ
    assert torch.equal(out["w"][mask], tau[mask] * 4)


def test_without_rescale_kept_entries_are_tau():
    tau = torch.full((1000,), 2.0)
    out, _ = drop_and_rescale({"w": tau}, 0.5, torch.Generator().manual_seed(0), rescale=False)
    assert set(out["w"].unique().tolist()) == {0.0, 2.0}


def test_expectation_of_the_dare_vector_is_tau():
    # τ = (1, -2, 0.5, 3) at p = 0.5: each draw is 0 or 2τ; the mean of 4000 draws has standard
    # deviation |τ|/√4000 ≈ 0.016·|τ| per coordinate; allow 5σ
    tau = t(1, -2, 0.5, 3)
    draws = torch.stack([drop_and_rescale({"w": tau}, 0.5, torch.Generator().manual_seed(s))[0]["w"]
                         for s in range(4000)])
    assert torch.allclose(draws.mean(0), tau, rtol=0.08, atol=0)
    # through the merger: E[θ] = θ_pre + λ·Σ τ, averaged over cell seeds
    pretrained, task_vectors = small_case()
    mean = sum(merge(pretrained, task_vectors, seed=s, p=0.5)[0].weights["w"] for s in range(2000)) / 2000
    assert torch.allclose(mean, task_arithmetic(pretrained, task_vectors, 0.3)["w"], atol=0.06)


def test_p_close_to_one_keeps_few_and_scales_up():
    out, kept = drop_and_rescale({"w": torch.ones(10_000)}, 0.99, torch.Generator().manual_seed(3))
    assert 0.005 < kept < 0.015
    values = out["w"][out["w"] != 0]
    assert torch.equal(values, torch.ones(10_000)[: values.numel()] / (1 - 0.99))  # ≈ 100 each


# --- randomness: per task, from ctx.generator only ----------------------------

def test_masks_come_from_one_generator_per_task():
    pretrained, task_vectors = small_case()
    _, ctx = merge(pretrained, task_vectors, p=0.5)
    assert ctx.salts == [("dare", "a"), ("dare", "b")]


def test_a_tasks_mask_does_not_depend_on_the_others():
    # identical vectors for two tasks get different masks; a task's mask is the same whether it is
    # merged alone, first or last (the merged vector with λ = 1 is Σ of the per-task τ̃)
    ones = {"w": torch.ones(2000)}
    zero = {"w": torch.zeros(2000)}
    alone_a = merge(zero, {"a": ones}, p=0.5, **{"lambda": 1.0})[0].weights["w"]
    alone_b = merge(zero, {"b": ones}, p=0.5, **{"lambda": 1.0})[0].weights["w"]
    assert not torch.equal(alone_a != 0, alone_b != 0)
    agree = ((alone_a != 0) == (alone_b != 0)).float().mean().item()
    assert abs(agree - 0.5) < 0.06  # independent Bernoulli(0.5) masks agree half the time
    both = merge(zero, {"b": ones, "a": ones}, p=0.5, **{"lambda": 1.0})[0].weights["w"]
    assert torch.equal(both, alone_a + alone_b)
    reordered = merge(zero, {"a": ones, "b": ones}, p=0.5, **{"lambda": 1.0})[0].weights["w"]
    assert torch.equal(reordered, both)


def test_same_seed_same_result_other_seed_other_masks():
    pretrained, task_vectors = small_case()
    g = torch.Generator().manual_seed(7)
    pretrained["big"] = torch.zeros(500)
    for tv in task_vectors.values():
        tv["big"] = torch.randn(500, generator=g)
    for base in ("ta", "ties"):
        first = merge(pretrained, task_vectors, seed=5, p=0.5, base=base)[0]
        again = merge(pretrained, task_vectors, seed=5, p=0.5, base=base)[0]
        other = merge(pretrained, task_vectors, seed=6, p=0.5, base=base)[0]
        assert all(torch.equal(first.weights[n], again.weights[n]) for n in pretrained)
        assert first.info == again.info
        assert not torch.equal(first.weights["big"], other.weights["big"])


def test_global_rng_is_neither_used_nor_moved():
    pretrained, task_vectors = small_case()
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = merge(pretrained, task_vectors, p=0.5)[0]
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(999)
    second = merge(pretrained, task_vectors, p=0.5)[0]
    assert all(torch.equal(first.weights[n], second.weights[n]) for n in pretrained)


def test_tensor_order_in_the_dict_does_not_change_the_mask():
    pretrained, task_vectors = small_case()
    flipped = {task: dict(reversed(list(tv.items()))) for task, tv in task_vectors.items()}
    a = merge(pretrained, task_vectors, p=0.5)[0]
    b = merge(pretrained, flipped, p=0.5)[0]
    assert all(torch.equal(a.weights[n], b.weights[n]) for n in pretrained)


# --- plumbing -------------------------------------------------------------------

def test_integer_buffers_are_skipped_and_inputs_untouched():
    pretrained, task_vectors = small_case()
    pretrained["steps"] = torch.tensor([7, 8])
    task_vectors["a"]["steps"] = torch.tensor([1, 1])
    before = {task: {n: v.clone() for n, v in tv.items()} for task, tv in task_vectors.items()}
    for base in ("ta", "ties"):
        merged = merge(pretrained, task_vectors, p=0.5, base=base)[0]
        assert torch.equal(merged.weights["steps"], torch.tensor([7, 8]))
        assert set(merged.weights) == set(pretrained)
    assert torch.equal(pretrained["w"], t(1, 2, 3, 4))
    for task, tv in task_vectors.items():
        assert all(torch.equal(tv[n], before[task][n]) for n in tv)


def test_lambda_auto_follows_the_base_and_an_explicit_value_wins():
    pretrained, task_vectors = small_case()
    assert merge(pretrained, task_vectors)[0].info["lambda"] == 0.3
    assert merge(pretrained, task_vectors, base="ties")[0].info["lambda"] == 0.5
    info = merge(pretrained, task_vectors, base="ties", **{"lambda": 0.7})[0].info
    assert info["lambda"] == 0.7 and info["k"] == 0.2 and info["merge"] == "sum" and info["p"] == 0.5


def test_p_range_is_zero_inclusive_one_exclusive():
    declared = Dare().params
    assert mparams.check("merger", "dare", declared, {"p": 0}, "--set") == {"p": 0.0}
    assert mparams.check("merger", "dare", declared, {"p": 0.99}, "--set") == {"p": 0.99}
    for bad in (1, 1.0, 1.5, -0.1):
        with pytest.raises(mparams.UsageError):
            mparams.check("merger", "dare", declared, {"p": bad}, "--set")
    pretrained, task_vectors = small_case()
    with pytest.raises(PluginError):
        merge(pretrained, task_vectors, p=1.0)
    with pytest.raises(PluginError):
        merge(pretrained, {}, p=0.5)
    with pytest.raises(PluginError):
        merge(pretrained, task_vectors, base="average")


def test_estimate_is_tensor_arithmetic_seconds():
    sizes = Sizes(tasks=("a", "b"), finetune_images={}, test_images={}, dev_images={}, adversary_task="a")
    cost = Dare().estimate(Dare.defaults, sizes)
    assert cost.train_images == 0 and cost.eval_images == 0 and cost.seconds > 0
    assert Dare().estimate({**Dare.defaults, "base": "ties"}, sizes).seconds > cost.seconds
