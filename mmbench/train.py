"""The one fine-tuning loop: clean, poisoned, or with a plugin's own loss."""
from __future__ import annotations

import math
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F

from .api import LossFn, PoisonFn, StateDict
from .presets import Recipe


def schedule(opt: torch.optim.Optimizer, recipe: Recipe, steps: int):
    if recipe.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=recipe.lr, total_steps=max(steps, 2))
    if recipe.schedule == "cosine":  # linear warm-up, then cosine to 0 (the papers' recipe)
        warm = min(recipe.warmup_steps, max(steps - 1, 0))

        def factor(step: int) -> float:
            if step < warm:
                return (step + 1) / warm
            return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))
        return torch.optim.lr_scheduler.LambdaLR(opt, factor)
    if recipe.schedule == "constant":
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    raise ValueError(f"unknown schedule {recipe.schedule!r} (cosine | onecycle | constant)")


def is_frozen(name: str, recipe: Recipe) -> bool:
    return any(name == p or name.startswith(p) for p in recipe.frozen)


def finetune(module: torch.nn.Module, init: StateDict, images: torch.Tensor, labels: torch.Tensor,
             classify: Callable[[torch.Tensor], torch.Tensor], recipe: Recipe,
             generator: torch.Generator, *, poison: PoisonFn | None = None, loss: LossFn | None = None,
             device: torch.device = torch.device("cpu"),
             progress: Callable[[Iterable], Iterable] = lambda it: it) -> tuple[StateDict, dict[str, Any]]:
    """Fine-tune ``module`` (the image encoder) from ``init`` on (images, labels).

    AdamW(lr, weight decay), the recipe's schedule, grad-norm clipping,
    ``recipe.epochs`` passes of shuffled batches; parameters matching
    ``recipe.frozen`` stay at ``init``. ``poison`` may rewrite a batch;
    ``loss(module, x, y, step)`` replaces cross-entropy of ``classify(module(x))``.
    Returns the fine-tuned weights (CPU) and a few training figures.
    """
    module.load_state_dict(init, strict=False)
    module.to(device).train()
    trainable = []
    for name, p in module.named_parameters():
        p.requires_grad_(not is_frozen(name, recipe))
        if p.requires_grad:
            trainable.append(p)
    n = images.shape[0]
    steps_per_epoch = max(1, n // recipe.batch_size)
    steps = max(1, int(round(recipe.epochs * steps_per_epoch)))
    opt = torch.optim.AdamW(trainable, lr=recipe.lr, weight_decay=recipe.weight_decay)
    sched = schedule(opt, recipe, steps)
    order = torch.empty(0, dtype=torch.long)
    losses = []
    for step in progress(range(steps)):
        if order.numel() < recipe.batch_size:
            order = torch.cat([order, torch.randperm(n, generator=generator)])
        idx, order = order[:recipe.batch_size], order[recipe.batch_size:]
        x, y = images[idx], labels[idx]
        if poison is not None:
            x, y = poison(x, y, generator)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if loss is None:
            value = F.cross_entropy(classify(module(x)), y)
        else:
            value = loss(module, x, y, step)
        opt.zero_grad(set_to_none=True)
        value.backward()
        if recipe.grad_clip:
            torch.nn.utils.clip_grad_norm_(trainable, recipe.grad_clip)
        opt.step()
        sched.step()
        losses.append(value.item())
    module.eval()
    for p in module.parameters():
        p.requires_grad_(True)
    weights = {k: v.detach().to("cpu", copy=True) for k, v in module.named_parameters()}
    tail = losses[-max(1, len(losses) // 10):]
    return weights, {"steps": steps, "final_loss": sum(tail) / len(tail)}
