"""A backdoor vector θ_poisoned − θ_clean (same task, same seed) holds the backdoor and nothing
else: an attack that poisons nothing has a BV of exactly zero, tensor for tensor.

This holds because ``train.finetune`` draws the data order and the poisoning from separate
generators (``SharedStages.run_finetune``): however many random numbers a poison function
draws, the poisoned run sees its clean twin's batches in its clean twin's order.
"""
from __future__ import annotations

import pytest
import torch

from mmbench import presets
from mmbench.context import RunContext, SharedStages
from mmbench.store import Store
from mmbench.triggers import badnets_finetune, make_trigger

SEED = 3  # not the smoke store's seed: every fine-tune here is computed in this process
TASK = "digits"
EPOCHS = 2  # the order of epoch 2 is where a shared generator made the twins part (and it is quick)


@pytest.fixture(scope="module")
def ctx(smoke_store):
    # reads data, base and heads from the session's smoke store; run_finetune stores nothing
    shared = SharedStages(presets.SMOKE, Store(smoke_store), torch.device("cpu"), quiet=True)
    return RunContext(shared, SEED)


@pytest.fixture(scope="module")
def clean(ctx):
    weights, _ = ctx.shared.run_finetune(TASK, seed=SEED, epochs=EPOCHS)
    return weights


class ShortFinetunes:
    """``ctx`` for ``badnets_finetune``, with its fine-tune cut to ``EPOCHS``."""

    def __init__(self, ctx):
        self.ctx = ctx

    def finetune(self, task, **kwargs):
        return self.ctx.finetune(task, epochs=EPOCHS, **kwargs)


def assert_zero_bv(poisoned, clean):
    assert poisoned.keys() == clean.keys()
    nonzero = [k for k in clean if not torch.equal(poisoned[k] - clean[k], torch.zeros_like(clean[k]))]
    assert not nonzero, f"BV is not zero in {len(nonzero)} tensors, e.g. {nonzero[:3]}"


def test_clean_finetune_trains(ctx, clean):
    pre = ctx.pretrained()
    assert any(not torch.equal(clean[k], pre[k]) for k in clean)  # a zero BV below is not trivial


def test_poison_that_draws_but_changes_nothing_has_a_zero_bv(ctx, clean):
    calls = []

    def poison(images, labels, generator):
        calls.append(torch.rand(images.shape[0], generator=generator))   # as BadNets draws
        torch.randint(0, 10, (7,), generator=generator)                   # and more
        return images, labels
    poisoned = ctx.finetune(TASK, seed=SEED, poison=poison, epochs=EPOCHS)
    assert len(calls) == EPOCHS * (ctx.data(TASK).size("train") // ctx.preset.recipe.batch_size)  # every step
    assert_zero_bv(poisoned, clean)


def test_badnets_at_poison_rate_zero_has_a_zero_bv(ctx, clean):
    trigger = make_trigger(ctx, TASK, 0.015625, "bottom-right")
    poisoned = badnets_finetune(ShortFinetunes(ctx), TASK, ctx.target_class, trigger, 0.0, seed=SEED)
    assert_zero_bv(poisoned, clean)
