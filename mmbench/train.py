"""The one fine-tuning loop: clean, poisoned, or with a plugin's own loss."""
from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F

from .api import LossFn, PoisonFn, StateDict, TaskData
from .presets import Recipe


def autocast(device: torch.device | str):
    """bf16 autocast on CUDA (the paper presets on a GPU); nothing elsewhere, so CPU runs are unchanged."""
    if torch.device(device).type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


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


class _Batches:
    """Shuffled batches of ``split``, epoch after epoch; a short last batch is dropped.

    Remembers the order generator's state at the start of the current epoch and how many
    batches of it were taken, so that a resumed run continues with the very same batches."""

    def __init__(self, data: TaskData, split: str, batch_size: int, generator: torch.Generator,
                 epoch_state: torch.Tensor | None = None, taken: int = 0) -> None:
        self.data, self.split, self.batch_size, self.generator = data, split, batch_size, generator
        if epoch_state is not None:
            generator.set_state(epoch_state)
        self._iter = self._epochs()
        for _ in range(taken):  # replay the epoch's order up to where the checkpoint was
            next(self._iter)

    def _epochs(self):
        while True:
            self.epoch_state = self.generator.get_state()
            self.taken = 0
            for x, y in self.data.batches(self.split, self.batch_size, shuffle=True, generator=self.generator):
                if x.shape[0] == self.batch_size or self.data.size(self.split) < self.batch_size:
                    self.taken += 1
                    yield x, y

    def __next__(self):
        return next(self._iter)


def recipe_step(opt: torch.optim.Optimizer, sched: Any, loss: torch.Tensor, params: Iterable[torch.Tensor],
                grad_clip: float | None) -> float:
    """One step of the recipe's optimiser: backward, clip the gradients' global norm to
    ``grad_clip`` (none when 0 or None), step, advance the schedule; returns the loss."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    opt.step()
    sched.step()
    return loss.item()


def is_frozen(name: str, recipe: Recipe) -> bool:
    return any(name == p or name.startswith(p) for p in recipe.frozen)


def finetune(module: torch.nn.Module, init: StateDict, data: TaskData,
             classify: Callable[[torch.Tensor], torch.Tensor], recipe: Recipe,
             generator: torch.Generator, *, poison: PoisonFn | None = None,
             poison_generator: torch.Generator | None = None, loss: LossFn | None = None,
             device: torch.device = torch.device("cpu"), split: str = "train",
             progress: Callable[[Iterable], Iterable] = lambda it: it,
             checkpoint: Any = None) -> tuple[StateDict, dict[str, Any]]:
    """Fine-tune ``module`` (the image encoder) from ``init`` on ``data``'s ``split``.

    AdamW(lr, weight decay), the recipe's schedule, grad-norm clipping,
    ``recipe.epochs`` passes of shuffled batches; parameters matching
    ``recipe.frozen`` stay at ``init``. ``poison(x, y, poison_generator)`` may
    rewrite a batch; ``loss(module, x, y, step)`` replaces cross-entropy of
    ``classify(module(x))``. Returns the fine-tuned weights (CPU) and a few
    training figures.

    Two random streams, never shared: ``generator`` draws the data order (one
    ``randperm`` per epoch, and nothing else), ``poison_generator`` whatever
    ``poison`` draws (required with ``poison``). So a poisoned fine-tune sees
    exactly the batches of its clean twin (same ``generator`` seed) however many
    numbers its poisoning consumes, and θ_backdoored − θ_clean holds the backdoor,
    not data-order noise. The loop uses no other randomness (the presets' ViTs have
    no dropout); a ``loss`` or ``poison`` that draws from torch's global RNG only
    moves that RNG, which the loop itself never reads.

    ``checkpoint`` (a :class:`mmbench.context.Checkpoint`) makes the run resumable: when it
    holds a state, training continues from it; whenever it is due, the trainable weights,
    AdamW's moments, the schedule, the data order (the epoch's generator state and the
    batches taken), the poisoning generator and torch's RNG are saved, so that a resumed
    run computes exactly what an uninterrupted one does (tests/test_crash.py).
    """
    if poison is not None and poison_generator is None:
        raise ValueError("finetune: poison needs its own poison_generator (not the data-order generator)")
    module.load_state_dict(init, strict=False)
    module.to(device).train()
    trainable = []
    for name, p in module.named_parameters():
        p.requires_grad_(not is_frozen(name, recipe))
        if p.requires_grad:
            trainable.append(p)
    n = data.size(split)
    steps_per_epoch = max(1, n // recipe.batch_size)
    steps = max(1, int(round(recipe.epochs * steps_per_epoch)))
    opt = torch.optim.AdamW(trainable, lr=recipe.lr, weight_decay=recipe.weight_decay)
    sched = schedule(opt, recipe, steps)
    losses: list[float] = []
    start, resumed = 0, checkpoint.load() if checkpoint is not None else None
    if resumed is not None:
        tensors, info = resumed
        names = [n for n, p in module.named_parameters() if p.requires_grad]
        with torch.no_grad():
            for name, p in zip(names, trainable):
                p.copy_(tensors[f"param.{name}"])
        state = opt.state_dict()
        state["state"] = {i: {k[len(f"opt.{i}."):]: v for k, v in tensors.items() if k.startswith(f"opt.{i}.")}
                          for i in range(len(trainable)) if f"opt.{i}.step" in tensors}
        state["param_groups"] = info["param_groups"]
        opt.load_state_dict(state)
        sched.load_state_dict(info["schedule"])
        if poison_generator is not None:
            poison_generator.set_state(tensors["rng.poison"])
        torch.set_rng_state(tensors["rng.torch"])
        start, losses = info["step"], list(info["losses"])
        batches = _Batches(data, split, recipe.batch_size, generator, tensors["rng.epoch"], info["taken"])
    else:
        batches = _Batches(data, split, recipe.batch_size, generator)
    for step in progress(range(start, steps)):
        x, y = next(batches)
        if poison is not None:
            x, y = poison(x, y, poison_generator)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast(device):
            if loss is None:
                value = F.cross_entropy(classify(module(x)), y)
            else:
                value = loss(module, x, y, step)
        losses.append(recipe_step(opt, sched, value, trainable, recipe.grad_clip))
        if checkpoint is not None and step + 1 < steps and checkpoint.due():
            names = [n for n, p in module.named_parameters() if p.requires_grad]
            tensors = {f"param.{n}": p.detach() for n, p in zip(names, trainable)}
            opt_state = opt.state_dict()
            for i, per in opt_state["state"].items():
                tensors.update({f"opt.{i}.{k}": v for k, v in per.items() if torch.is_tensor(v)})
            tensors["rng.epoch"] = batches.epoch_state
            tensors["rng.torch"] = torch.get_rng_state()
            if poison_generator is not None:
                tensors["rng.poison"] = poison_generator.get_state()
            checkpoint.save(tensors, {"step": step + 1, "taken": batches.taken, "losses": losses,
                                      "param_groups": opt_state["param_groups"], "schedule": sched.state_dict()})
    module.eval()
    for p in module.parameters():
        p.requires_grad_(True)
    weights = {k: v.detach().to("cpu", copy=True) for k, v in module.named_parameters()}
    tail = losses[-max(1, len(losses) // 10):]
    return weights, {"steps": steps, "final_loss": sum(tail) / len(tail)}
