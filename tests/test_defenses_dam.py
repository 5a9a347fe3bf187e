"""DAM: the mask's rescaling and merge math, and a zero task vector stays zero end to end."""
from __future__ import annotations

import zlib

import torch

from mmbench.api import BoundMerger, Merged, Merger
from mmbench_plugins.defenses.dam import (DefenseAwareMerging, final_mask, mask_task_vectors, masked_merge,
                                          relaxed_bernoulli, rescale)


def test_rescale_divides_each_tensor_by_its_mean():
    out = rescale({"a": torch.tensor([0.5, 1.5, 1.0, 0.0]), "b": torch.tensor([0.25]),
                   "zero": torch.zeros(3)})
    torch.testing.assert_close(out["a"], torch.tensor([2 / 3, 2.0, 4 / 3, 0.0]))
    assert torch.equal(out["b"], torch.tensor([1.0]))
    assert torch.equal(out["zero"], torch.zeros(3))  # an all-zero sample stays zero, no NaN
    assert float(out["a"].mean()) == 1.0


def test_masked_merge_exact_and_zero_vector_contributes_nothing():
    pre = {"w": torch.tensor([1.0, 1.0, 1.0]), "frozen": torch.tensor([5.0])}
    vectors = {"zero": {"w": torch.zeros(3)}, "real": {"w": torch.tensor([2.0, -4.0, 6.0])}}
    mask = {"w": torch.tensor([0.5, 1.0, 1.5])}
    stacked = {"w": torch.stack([vectors["zero"]["w"], vectors["real"]["w"]])}
    merged = masked_merge(pre, stacked, torch.tensor([0.3, 0.5]), mask)
    # θ = θ_pre + m ⊙ (0.3·0 + 0.5·τ_real) = 1 + [0.5, 1, 1.5] ⊙ [1, −2, 3]
    torch.testing.assert_close(merged["w"], torch.tensor([1.5, -1.0, 5.5]))
    assert torch.equal(merged["frozen"], pre["frozen"])
    alone = masked_merge(pre, {"w": stacked["w"][1:]}, torch.tensor([0.5]), mask)
    torch.testing.assert_close(merged["w"], alone["w"])
    masked = mask_task_vectors(vectors, mask)
    assert torch.equal(masked["zero"]["w"], torch.zeros(3))
    torch.testing.assert_close(masked["real"]["w"], torch.tensor([1.0, -4.0, 9.0]))


def test_masked_merge_gradients_reach_lambda_and_mask():
    pre = {"w": torch.zeros(2)}
    stacked = {"w": torch.tensor([[1.0, 2.0], [3.0, 4.0]])}
    lambdas = torch.tensor([0.3, 0.3], requires_grad=True)
    mask = {"w": torch.tensor([1.0, 2.0], requires_grad=True)}
    masked_merge(pre, stacked, lambdas, mask)["w"].sum().backward()
    torch.testing.assert_close(lambdas.grad, torch.tensor([1 + 4.0, 3 + 8.0]))  # Σ_i m_i τ_ki
    torch.testing.assert_close(mask["w"].grad, torch.tensor([0.3 * 4, 0.3 * 6]))


def test_relaxed_bernoulli_is_reproducible_and_follows_logits():
    logits = torch.tensor([-20.0, 0.0, 20.0]).repeat(1000, 1)
    a = relaxed_bernoulli(logits, 0.5, torch.Generator().manual_seed(1))
    b = relaxed_bernoulli(logits, 0.5, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and bool(((a >= 0) & (a <= 1)).all())
    means = a.mean(0)
    assert means[0] < 0.01 and abs(float(means[1]) - 0.5) < 0.05 and means[2] > 0.99


def test_final_mask_info_counts_kept_entries():
    logits = {"ts.w": torch.tensor([-1.0, 1.0, 2.0, 3.0])}
    mask, info = final_mask(logits, {"eval_mask": "discrete", "temperature": 0.5},
                            torch.Generator().manual_seed(0))
    assert info["mask_kept_fraction"] == 0.75
    assert set(mask) == {"w"} and abs(float(mask["w"].mean()) - 1) < 1e-6


# --- DAM end to end on a linear "encoder" ------------------------------------------

class FakeData:
    def __init__(self, generator):
        self.x = torch.randn(40, 1, 2, 2, generator=generator)

    def tensors(self, split):
        return self.x, torch.zeros(len(self.x), dtype=torch.long)

    def valid_range(self):
        return torch.full((1, 1, 1), -2.0), torch.full((1, 1, 1), 2.0)

    def batches(self, split, batch_size, *, shuffle=False, generator=None, limit=None):
        order = torch.randperm(len(self.x), generator=generator) if shuffle else torch.arange(len(self.x))
        for start in range(0, len(self.x), batch_size):
            idx = order[start:start + batch_size]
            yield self.x[idx], torch.zeros(len(idx), dtype=torch.long)


class FakeContext:
    """A linear model f(x) = flatten(x) @ w + b, through the same ctx.forward contract."""
    device = torch.device("cpu")
    seed = 0

    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self._data = {t: FakeData(g) for t in ("a", "b")}

    def data(self, task):
        return self._data[task]

    def forward(self, weights, images, task=None):
        return images.flatten(1) @ weights["w"] + weights["b"]

    def generator(self, *salt):
        return torch.Generator().manual_seed(zlib.crc32(repr(salt).encode()))

    def progress(self, iterable, total=None, desc=""):
        return iterable

    def cached(self, kind, params, compute, label=None):
        return compute()


class Recorder(Merger):
    name = "recorder"

    def merge(self, pretrained, task_vectors, ctx, params):
        self.seen = task_vectors
        return Merged({k: v + sum(tv[k] for tv in task_vectors.values()) for k, v in pretrained.items()})


def test_dam_defend_masks_vectors_and_keeps_a_zero_vector_zero():
    ctx = FakeContext()
    g = torch.Generator().manual_seed(1)
    pre = {"w": torch.randn(4, 3, generator=g), "b": torch.zeros(3)}
    vectors = {"a": {"w": torch.randn(4, 3, generator=g), "b": torch.zeros(3)},
               "b": {"w": torch.zeros(4, 3), "b": torch.zeros(3)}}
    plugin, recorder = DefenseAwareMerging(), Recorder()
    for masks in ("single", "dual"):
        params = {**plugin.defaults, "steps": 5, "batch_size": 8, "masks": masks}
        merged = plugin.defend(pre, vectors, BoundMerger(recorder, {}, ctx), ctx, params)
        seen = recorder.seen
        assert torch.equal(seen["b"]["w"], torch.zeros(4, 3))          # zero stays zero
        assert torch.equal(seen["a"]["b"], torch.zeros(3))              # untouched tensor, no mask
        ratio = seen["a"]["w"] / vectors["a"]["w"]                      # the mask itself
        assert bool((ratio >= 0).all()) and abs(float(ratio.mean()) - 1) < 1e-5  # rescaled
        info = merged.info
        assert info["steps"] == 5 and info["masked_tensors"] == 1
        assert 0 <= info["mask_kept_fraction"] <= 1
        assert set(info["final_losses"]) == {"entropy_clean", "entropy_perturbed", "perturbation_ce"}
