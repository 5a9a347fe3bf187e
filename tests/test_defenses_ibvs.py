"""IBVS: the subtraction on hand-made tensors, and BV_inj computed once per preset and seed."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from mmbench.api import BoundMerger, Merged, Merger
from mmbench_plugins.defenses.ibvs import InjectionBackdoorVectorSubtraction, subtract_backdoor_vector


class HalfSum(Merger):
    """A fake merger: θ_pre + 0.5·Σ τ_k."""
    name = "half-sum"

    def merge(self, pretrained, task_vectors, ctx, params):
        out = {k: v.clone() for k, v in pretrained.items()}
        for vector in task_vectors.values():
            for k, v in vector.items():
                out[k] += 0.5 * v
        return Merged(out, {"fake": True})


class FakeData:
    def valid_range(self):
        return torch.full((1, 1, 1), -1.0), torch.full((1, 1, 1), 1.0)


class FakeContext:
    """Just what IBVS touches: fixed clean/triggered fine-tunes, a counting cache."""

    def __init__(self):
        self.tasks = ("adversary", "defender")
        self.preset = SimpleNamespace(name="fake", image_size=8)
        self.finetunes = 0
        self.computed = 0
        self._cache = {}

    def data(self, task):
        return FakeData()

    def clean_finetune(self, task, seed=None):
        return {"w": torch.tensor([1.0, 1.0]), "b": torch.tensor([0.0])}

    def finetune(self, task, **kwargs):
        self.finetunes += 1
        assert task == "defender" and kwargs["poison"] is not None
        return {"w": torch.tensor([3.0, 0.0]), "b": torch.tensor([0.5])}

    def accuracy(self, weights, task, split="test"):
        return 0.5

    def attack_success_rate(self, weights, task, trigger, target_class, split="test"):
        return 0.9 if (trigger.top, trigger.left) == (0, 0) else 0.8

    def cached(self, kind, params, compute, label=None):
        key = (kind, json.dumps(params, sort_keys=True))
        if key not in self._cache:
            self.computed += 1
            self._cache[key] = compute()
        return self._cache[key]


def defend(ctx, task_vectors, **params):
    plugin = InjectionBackdoorVectorSubtraction()
    merger = BoundMerger(HalfSum(), {}, ctx)
    pretrained = {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor([0.0])}
    return plugin.defend(pretrained, task_vectors, merger, ctx, {**plugin.defaults, **params})


def test_subtract_backdoor_vector_exact():
    weights = {"w": torch.tensor([1.5, 3.0]), "frozen": torch.tensor([7.0])}
    out = subtract_backdoor_vector(weights, {"w": torch.tensor([2.0, -1.0])}, 0.5)
    assert torch.equal(out["w"], torch.tensor([0.5, 3.5]))
    assert torch.equal(out["frozen"], torch.tensor([7.0]))
    assert torch.equal(weights["w"], torch.tensor([1.5, 3.0]))  # input untouched


def test_defend_subtracts_lambda_times_injection_vector():
    ctx = FakeContext()
    vectors = {"adversary": {"w": torch.tensor([1.0, 0.0]), "b": torch.tensor([0.0])},
               "defender": {"w": torch.tensor([0.0, 2.0]), "b": torch.tensor([1.0])}}
    merged = defend(ctx, vectors, **{"lambda": 0.5})
    # merge: [1, 2] + 0.5·[1, 2] = [1.5, 3]; BV_inj = [3, 0] − [1, 1] = [2, −1]; minus 0.5·BV
    assert torch.equal(merged.weights["w"], torch.tensor([0.5, 3.5]))
    # b: 0 + 0.5·1 − 0.5·(0.5 − 0) = 0.25
    assert torch.equal(merged.weights["b"], torch.tensor([0.25]))
    info = merged.info
    assert info["merger"] == {"fake": True} and info["lambda"] == 0.5
    assert info["injection_vector"]["task"] == "defender"  # default: the preset's last task
    assert info["injection_vector"]["injection"]["asr"] == pytest.approx(0.9)  # top-left patch


def test_injection_vector_is_computed_once():
    ctx = FakeContext()
    clean = {"adversary": {"w": torch.zeros(2), "b": torch.zeros(1)},
             "defender": {"w": torch.zeros(2), "b": torch.zeros(1)}}
    attacked = {**clean, "adversary": {"w": torch.tensor([5.0, 5.0]), "b": torch.zeros(1)}}
    first = defend(ctx, clean)
    second = defend(ctx, attacked, **{"lambda": 2.0})  # another attack, another λ: same BV_inj
    assert ctx.finetunes == 1 and ctx.computed == 1
    assert torch.equal(first.weights["w"], torch.tensor([-1.0, 3.0]))    # [1, 2] − 1·[2, −1]
    assert torch.equal(second.weights["w"], torch.tensor([-0.5, 6.5]))  # [3.5, 4.5] − 2·[2, −1]
    defend(ctx, clean, position="bottom-left")  # another trigger is another injection
    assert ctx.finetunes == 2 and ctx.computed == 2


def test_unknown_task_is_a_plugin_error():
    from mmbench.api import PluginError

    with pytest.raises(PluginError, match="not a task"):
        defend(FakeContext(), {}, task="nope")


def test_subtract_backdoor_vector_in_place_spares_shared_tensors():
    pre = {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor([0.5])}
    own = torch.tensor([3.0, 4.0])
    bv = {"w": torch.tensor([1.0, 1.0]), "b": torch.tensor([0.25])}
    merged = {"w": own, "b": pre["b"]}  # "b" is θ_pre's own tensor, as a lazy merger might return it
    out = subtract_backdoor_vector(merged, bv, 2.0, in_place=True, keep=pre)
    assert out["w"] is own and torch.equal(own, torch.tensor([1.0, 2.0]))  # in place
    assert torch.equal(out["b"], torch.tensor([0.0])) and torch.equal(pre["b"], torch.tensor([0.5]))
    assert torch.equal(bv["w"], torch.tensor([1.0, 1.0]))
    half = {"w": torch.tensor([1.0, 2.0]).half()}  # the float32 vector would change its dtype
    out = subtract_backdoor_vector(half, bv, 1.0, in_place=True)
    assert out["w"].dtype == torch.float32 and half["w"].dtype == torch.float16
