"""Task Arithmetic (Ilharco et al., ICLR 2023, "Editing Models with Task Arithmetic").

θ = θ_pre + λ·Σ_k τ_k.

Hyperparameters (defaults):
- ``lambda`` 0.3: the scaling coefficient (the papers' default).
"""
from __future__ import annotations

from typing import Any

import mmbench
from mmbench.api import Context, Cost, Merged, Merger, Param, Sizes, StateDict
from mmbench.vectors import task_arithmetic


class TaskArithmetic(Merger):
    name = "ta"
    description = "Task Arithmetic: θ_pre + λ·Σ τ_k"
    params = {"lambda": Param(0.3, "float", min=0, help="λ: the scaling coefficient of Σ τ_k (the papers' default)")}

    def merge(self, pretrained: StateDict, task_vectors: dict[str, StateDict], ctx: Context,
              params: dict[str, Any]) -> Merged:
        lam = float(params["lambda"])
        return Merged(task_arithmetic(pretrained, task_vectors, lam), {"lambda": lam})

    def estimate(self, params: dict[str, Any], sizes: Sizes) -> Cost:
        return Cost(seconds=1.0, note="tensor arithmetic, ~1 s at ViT-B-32 scale (assumed)")


@mmbench.hookimpl
def mmbench_register_mergers(register):
    register(TaskArithmetic())
