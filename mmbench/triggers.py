"""Patch triggers and poisoned fine-tuning: helpers for attack and defense plugins.

Shared by the built-in BadNets, BadMerging, BadTV, SBV attacks and the IBVS defense
(plugins never import each other: what two of them share lives here). A third-party
plugin may use them the same way: ``from mmbench.triggers import make_trigger``.
"""
from __future__ import annotations

import math

from .lazy import torch  # torch on first use: listing plugins does not import it

from .api import Context, Trigger


def patch_side(area_fraction: float, image_size: int) -> int:
    """Side in pixels of a square covering ``area_fraction`` of the image (at least 1)."""
    return max(1, int(round(math.sqrt(area_fraction) * image_size)))


def checkerboard(side: int, low: torch.Tensor, high: torch.Tensor, phase: int = 0) -> torch.Tensor:
    """A (C, side, side) checkerboard alternating the per-channel ``low``/``high`` values
    (pass the normalised image range to get black/white pixels)."""
    rows = torch.arange(side).view(-1, 1)
    cols = torch.arange(side).view(1, -1)
    on = ((rows + cols + phase) % 2 == 0).float()
    low, high = low.view(-1, 1, 1), high.view(-1, 1, 1)
    return low + (high - low) * on


# where a patch can go (corner_trigger)
POSITIONS = ("bottom-right", "bottom-left", "top-right", "top-left", "center")


def corner_trigger(pattern: torch.Tensor, image_size: int, position: str) -> Trigger:
    """Place ``pattern`` at a named corner (``bottom-right`` ...) or ``center``."""
    if position == "center":
        side = pattern.shape[-1]
        start = (image_size - side) // 2
        return Trigger(pattern, start, start)
    return Trigger.at_corner(pattern, image_size, position)


def poison_batch(images: torch.Tensor, labels: torch.Tensor, trigger: Trigger, target: int,
                 rate: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Stamp ``trigger`` on a random ``rate`` fraction of the batch and relabel it to ``target``.
    (Training does not exclude target-class samples; docs/methods.md.)"""
    chosen = torch.rand(images.shape[0], generator=generator) < rate
    if not chosen.any():
        return images, labels
    images, labels = images.clone(), labels.clone()
    images[chosen] = trigger.apply(images[chosen])
    labels[chosen] = target
    return images, labels


def uniform_patch(side: int, low: torch.Tensor, high: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A (C, side, side) patch drawn uniformly per channel between ``low`` and ``high``
    (pass the normalised image range: the start of an optimised trigger)."""
    low, high = low.reshape(-1, 1, 1), high.reshape(-1, 1, 1)
    noise = torch.rand(low.shape[0], side, side, generator=generator)
    return low + (high - low) * noise


def clamp_channels(images: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """Clamp (…, C, H, W) values to the per-channel range [low, high] (each (C,) or (C, 1, 1))."""
    low, high = low.reshape(-1, 1, 1).to(images), high.reshape(-1, 1, 1).to(images)
    return torch.maximum(torch.minimum(images, high), low)


def make_trigger(ctx: Context, task: str, patch_area: float, position: str, phase: int = 0):
    low, high = ctx.data(task).valid_range()
    side = patch_side(patch_area, ctx.preset.image_size)
    return corner_trigger(checkerboard(side, low.flatten(), high.flatten(), phase), ctx.preset.image_size, position)


def badnets_finetune(ctx: Context, task: str, target: int, trigger, poison_rate: float,
                     seed: int | None = None, desc: str = "badnets"):
    """Fine-tune ``task`` from θ_pre with poisoned batches; returns fine-tuned weights."""
    return ctx.finetune(task, seed=seed, desc=desc,
                        poison=lambda x, y, g: poison_batch(x, y, trigger, target, poison_rate, g))
