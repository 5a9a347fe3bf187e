"""LoBAM's pieces on hand-checkable tensors (the end-to-end run is in test_attacks_e2e.py)."""
from __future__ import annotations

import math

import pytest
import torch

from mmbench_plugins.attacks.lobam import (choose_lambda, init_lora, lora_delta, lora_targets, upload,
                                           vector_norm)


def test_upload_amplifies_the_difference_only():
    ben = {"w": torch.tensor([1.0, 2.0])}
    mal = {"w": torch.tensor([3.0, 2.0])}
    # τ_ben + λ(τ_mal − τ_ben) with λ 2: [1 + 2·2, 2 + 2·0]
    assert upload(ben, mal, 2.0)["w"].tolist() == [5.0, 2.0]
    assert upload(ben, mal, 1.0)["w"].tolist() == [3.0, 2.0]  # λ 1 is the malicious LoRA model itself


def test_lora_delta_is_scale_times_b_times_a():
    a = torch.tensor([[1.0, 0.0]])        # r 1 × in 2
    b = torch.tensor([[2.0], [0.0]])      # out 2 × r 1
    assert lora_delta({"w": (a, b)}, 2.0)["w"].tolist() == [[4.0, 0.0], [0.0, 0.0]]


def test_init_lora_starts_at_zero_update():
    pre = {"blk.attn.in_proj_weight": torch.zeros(6, 4), "blk.ln.weight": torch.zeros(4)}
    names = lora_targets(pre, ["attn.in_proj_weight"])
    assert names == ["blk.attn.in_proj_weight"]  # 1-D tensors never get an update
    (a, b), = init_lora(pre, names, 2, torch.Generator().manual_seed(0)).values()
    assert a.shape == (2, 4) and b.shape == (6, 2)
    assert a.abs().max() <= 1 / math.sqrt(4) and a.abs().sum() > 0
    assert b.abs().sum() == 0 and lora_delta({"x": (a, b)}, 2.0)["x"].abs().sum() == 0


def test_vector_norm():
    assert vector_norm({"a": torch.tensor([3.0]), "b": torch.tensor([[4.0]])}) == pytest.approx(5.0)


def test_lambda_rule_takes_the_largest_that_keeps_dev_acc_and_norm():
    grid = [1.0, 2.0, 3.0]
    acc = {1.0: 0.80, 2.0: 0.79, 3.0: 0.70}
    norms = {1.0: 1.0, 2.0: 2.0, 3.0: 3.0}
    # benign dev ACC 0.80, tolerance 0.02: λ 1 and 2 qualify on ACC (0.79 ≥ 0.78), λ 3 does not
    assert choose_lambda(grid, acc, norms, 0.80, 0.02, None)[0] == 2.0
    assert choose_lambda(grid, acc, norms, 0.80, 0.02, 2.5)[0] == 2.0
    assert choose_lambda(grid, acc, norms, 0.80, 0.02, 1.5)[0] == 1.0   # the norm bound binds
    assert choose_lambda(grid, acc, norms, 0.80, 0.2, None)[0] == 3.0   # a loose tolerance
    lam, reason = choose_lambda(grid, acc, norms, 0.90, 0.02, None)     # nothing qualifies
    assert lam == 1.0 and "smallest" in reason
