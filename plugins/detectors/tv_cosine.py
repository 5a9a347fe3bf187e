"""Task-vector cosine outlier: the cheapest pre-merge screen (a baseline, no paper).

A contributor whose task vector points away from the others is suspicious. For each
contributor k, with τ_k flattened over the image encoder's float tensors,

    score_k = 1 − mean_{j ≠ k} cos(τ_k, τ_j),

so the score lies in [0, 2] and is highest for the vector least aligned with the rest.
It needs nothing but the contributed vectors (no data, no model evaluation), which makes it
the trivial reference a real detector must beat. Whether a backdoored vector is *less*
aligned with the others is an empirical question the leaderboard answers: mmbench's
mechanisms (docs/presets.md) measured backdoor vectors to be nearly orthogonal to other
tasks' vectors, as clean vectors of different tasks are, so near-chance AUROC is the
expected outcome for backdoors that ride on a normal fine-tune.

Parameters:
- ``reduce`` "mean": how the cosines to the other contributors are combined ("mean" or
  "max": with "max", score_k = 1 − max_j cos(τ_k, τ_j), the contributor with no close ally).
"""
from __future__ import annotations

from typing import Any

import mmbench
from mmbench.api import Cost, Param, Sizes, StateDict
from mmbench.detect import Detector, DetectorContext, Scores
from mmbench.lazy import torch
from mmbench.vectors import flatten, float_items


class TaskVectorCosine(Detector):
    name = "tv_cosine"
    description = "1 − mean cosine of a contributor's task vector to the others' (baseline)"
    params = {"reduce": Param("mean", "str", choices=("mean", "max"),
                              help="combine the cosines to the other contributors by mean or max")}

    def estimate(self, params: dict[str, Any], sizes: Sizes) -> Cost:
        return Cost(seconds=1.0, note="vector arithmetic only (assumed ~1 s at ViT-B-32 scale)")

    def score(self, pretrained: StateDict, task_vectors: dict[str, StateDict], ctx: DetectorContext,
              params: dict[str, Any]) -> Scores:
        names = list(task_vectors)
        flat = torch.stack([flatten(float_items(task_vectors[t])).double() for t in names])
        unit = flat / flat.norm(dim=1, keepdim=True).clamp_min(1e-30)
        cos = unit @ unit.T
        scores: dict[str, float] = {}
        for i, t in enumerate(names):
            others = torch.cat([cos[i, :i], cos[i, i + 1:]])
            combined = others.mean() if params["reduce"] == "mean" else others.max()
            scores[t] = float(1.0 - combined) if len(others) else 0.0
        return Scores(scores, {"cosines": {a: {b: round(float(cos[i, j]), 6) for j, b in enumerate(names)}
                                           for i, a in enumerate(names)},
                               "norms": {t: float(flat[i].norm()) for i, t in enumerate(names)}})


@mmbench.hookimpl
def mmbench_register_detectors(register):
    register(TaskVectorCosine())
