"""Task Arithmetic (Ilharco et al., ICLR 2023, "Editing Models with Task Arithmetic").

θ = θ_pre + λ·Σ_k τ_k.

Hyperparameters (defaults):
- ``lambda`` 0.3: the scaling coefficient (the papers' default).
"""
from __future__ import annotations

from typing import Any

import mmbench
from mmbench.api import Context, Merged, Merger, Param, StateDict


def task_arithmetic(pretrained: StateDict, task_vectors: dict[str, StateDict], lam: float) -> StateDict:
    merged = {k: v.clone() for k, v in pretrained.items()}
    for vector in task_vectors.values():
        for k, v in vector.items():
            merged[k].add_(v, alpha=lam)
    return merged


class TaskArithmetic(Merger):
    name = "ta"
    description = "Task Arithmetic: θ_pre + λ·Σ τ_k"
    params = {"lambda": Param(0.3, "float", min=0, help="λ: the scaling coefficient of Σ τ_k (the papers' default)")}

    def merge(self, pretrained: StateDict, task_vectors: dict[str, StateDict], ctx: Context,
              params: dict[str, Any]) -> Merged:
        lam = float(params["lambda"])
        return Merged(task_arithmetic(pretrained, task_vectors, lam), {"lambda": lam})


@mmbench.hookimpl
def mmbench_register_mergers(register):
    register(TaskArithmetic())
