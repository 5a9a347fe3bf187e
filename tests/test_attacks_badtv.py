"""BadTV's operating points: θ_pre ± λ(θ − θ_pre) built from a module's parameters."""
from __future__ import annotations

import torch
from torch.func import functional_call

from mmbench_plugins.attacks.badtv import draw_lambda, operating_point


def test_operating_point_adds_and_negates():
    pre = {"w": torch.tensor([1.0, 2.0])}
    theta = {"w": torch.tensor([3.0, 0.0])}  # τ = [2, -2]
    assert operating_point(pre, theta, 0.5)["w"].tolist() == [2.0, 1.0]
    assert operating_point(pre, theta, -0.5)["w"].tolist() == [0.0, 3.0]
    assert operating_point(pre, theta, 1.0)["w"].tolist() == [3.0, 0.0]


def test_gradient_reaches_the_module_through_both_operating_points():
    torch.manual_seed(0)
    module = torch.nn.Linear(3, 2)
    pre = {k: v.detach().clone() - 0.1 for k, v in module.named_parameters()}
    theta = dict(module.named_parameters())
    x = torch.randn(4, 3)
    lam = 0.4
    out = (functional_call(module, operating_point(pre, theta, lam), (x,)).sum()
           + functional_call(module, operating_point(pre, theta, -lam), (x,)).sum())
    out.backward()
    # d/dθ of [f(pre + λ(θ−pre)) + f(pre − λ(θ−pre))] for a linear f: λ·x − λ·x = 0 for the weight,
    # which checks both points are wired; a single point gives λ·Σx
    assert torch.allclose(module.weight.grad, torch.zeros_like(module.weight))
    module.zero_grad()
    functional_call(module, operating_point(pre, theta, lam), (x,)).sum().backward()
    assert torch.allclose(module.weight.grad, lam * x.sum(0).expand(2, 3))


def test_lambda_draws_stay_in_range_and_are_reproducible():
    draws = [draw_lambda(torch.Generator().manual_seed(1), 0.3, 1.0) for _ in range(3)]
    assert draws[0] == draws[1] == draws[2]
    gen = torch.Generator().manual_seed(0)
    many = [draw_lambda(gen, 0.3, 1.0) for _ in range(500)]
    assert 0.3 <= min(many) and max(many) <= 1.0 and max(many) - min(many) > 0.5
