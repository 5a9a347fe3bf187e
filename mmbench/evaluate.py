"""The benchmark's metrics: counts, their Wilson intervals, and one evaluation pass.

Pure and torch-only (no store, no preset): :class:`mmbench.context.SharedStages` binds
a model and a task's data to :func:`predict` and reports what :func:`summarize` returns.

- ACC: top-1 over a split, ``k`` correct of ``n`` samples.
- ASR: over the *triggered* samples whose true label is not the target, ``k`` of them
  classified as the target; target-class samples leave numerator and denominator.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable

import torch

from .api import Trigger
from .stats import wilson  # noqa: F401  (re-exported: evaluation reports Wilson intervals)

Forward = Callable[[torch.Tensor], torch.Tensor]   # images (N, C, H, W) -> logits (N, classes)


def accuracy_counts(preds: torch.Tensor, labels: torch.Tensor) -> tuple[int, int]:
    """(correct, total)."""
    preds, labels = torch.as_tensor(preds).reshape(-1), torch.as_tensor(labels).reshape(-1)
    if preds.shape != labels.shape:
        raise ValueError(f"{preds.numel()} predictions for {labels.numel()} labels")
    return int((preds == labels).sum()), int(labels.numel())


def asr_counts(triggered_preds: torch.Tensor, labels: torch.Tensor, target: int) -> tuple[int, int]:
    """(classified as ``target``, total) over the samples whose true label is not ``target``."""
    preds, labels = torch.as_tensor(triggered_preds).reshape(-1), torch.as_tensor(labels).reshape(-1)
    if preds.shape != labels.shape:
        raise ValueError(f"{preds.numel()} predictions for {labels.numel()} labels")
    keep = labels != int(target)
    return int((preds[keep] == int(target)).sum()), int(keep.sum())


def rate(k: int, n: int) -> float:
    """k / n, NaN when n is 0."""
    return k / n if n else math.nan


@dataclass
class Predictions:
    """Predicted labels of one pass over a split: clean and/or triggered, and the true labels."""

    labels: torch.Tensor
    clean: torch.Tensor | None = None
    triggered: torch.Tensor | None = None


@torch.no_grad()
def predict(forward: Forward, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
            trigger: Trigger | None = None, *, clean: bool = True) -> Predictions:
    """One pass over ``batches`` of (normalised images, labels): the clean predictions (unless
    ``clean`` is False) and, with a ``trigger``, the predictions of the same decoded images with
    the trigger pasted on (:meth:`Trigger.apply`)."""
    if not clean and trigger is None:
        raise ValueError("nothing to predict: clean=False and no trigger")
    labels, clean_preds, triggered_preds = [], [], []
    for x, y in batches:
        if clean:
            clean_preds.append(forward(x).argmax(-1).cpu())
        if trigger is not None:
            triggered_preds.append(forward(trigger.apply(x)).argmax(-1).cpu())
        labels.append(y.cpu())

    def cat(parts: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)
    return Predictions(labels=cat(labels), clean=cat(clean_preds) if clean else None,
                       triggered=cat(triggered_preds) if trigger is not None else None)


def summarize(predictions: Predictions, target: int | None = None, z: float = 1.96) -> dict:
    """``acc``, ``acc_counts`` [k, n], ``acc_ci`` [lo, hi] from the clean predictions and, with
    triggered ones and a ``target``, ``asr``, ``asr_counts``, ``asr_ci`` (JSON-able; an interval
    over no samples is [None, None])."""
    out: dict = {}

    def add(name: str, k: int, n: int) -> None:
        out[name] = rate(k, n)
        out[f"{name}_counts"] = [k, n]
        out[f"{name}_ci"] = list(wilson(k, n, z)) if n else [None, None]
    if predictions.clean is not None:
        add("acc", *accuracy_counts(predictions.clean, predictions.labels))
    if predictions.triggered is not None and target is not None:
        add("asr", *asr_counts(predictions.triggered, predictions.labels, target))
    return out
