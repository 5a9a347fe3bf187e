"""TSV-M: Task Singular Vectors, the merge variant.

Gargiulo, Crisostomi, Bucarelli, Scardapane, Silvestri, Rodolà. "Task Singular Vectors:
Reducing Task Interference in Model Merging." CVPR 2025. arXiv:2412.00081.

On the task vectors τ_1..τ_K, tensor by tensor:

1. A 2-D tensor ΔW_k (m × n): thin SVD of each task's, ΔW_k = U_k diag(σ_k) V_kᵀ, in float32.
   With r = min(m, n), keep the c = ⌊r / K⌋ leading components of each task (the rank budget
   split evenly over the tasks).
2. Concatenate across tasks: U = [U_1[:, :c] … U_K[:, :c]] (m × Kc), s = [σ_1[:c] … σ_K[:c]],
   V = [V_1[:, :c] … V_K[:, :c]] (n × Kc).
3. Decorrelate: replace U by the nearest matrix with orthonormal columns, U⊥ = P Qᵀ where
   U = P Σ Qᵀ (the orthogonal Procrustes / polar factor); the same for V.
4. ΔW_merged = U⊥ diag(s) V⊥ᵀ: the singular values are not rescaled, so the result has the
   scale of a sum (Task Arithmetic at λ = 1), not of a mean.
5. Every other tensor (biases, LayerNorm, the class embedding, the 4-D patch convolution):
   the plain mean (1/K) Σ_k τ_k (the mean, not the sum).
6. θ = θ_pre + α · merged.

Defaults and sources (FusionBench ``method/task_singular_vector/TSVM.py``,
``utils/TSVM_utils.py``, ``config/method/task_singular_vector/TaskSingularVectorMerging.yaml``;
the authors' ``src/eval/aggregation.py``):

* ``alpha`` = 1.0 — FusionBench's config. The authors choose α on the validation splits from
  {0.1, 0.2, …, 3.0}: with mmbench, ``mmbench tune --merger tsvm --grid alpha=...`` does that
  on the dev splits.
* Keys containing ``text_projection`` are excluded by the authors (text tower only; mmbench
  merges the image encoder, which has none).

Reconstructed / this implementation's choices:

* RECONSTRUCTED: a 2-D tensor with r < K gets c = 0 and a merged update of zero, as
  FusionBench's code does; it is kept and counted in the merge's info (``zero_rank``).
* Exactly Kc columns are concatenated (FusionBench pads with zero columns up to r, which
  changes nothing).
* The polar factor comes from ``torch.linalg.svd`` of U (the default "SVD form"; the
  whitening form U (UᵀU)^(-1/2) is the same matrix when U has full column rank).
* Integer tensors and θ_pre's tensors with no task-vector entry stay at θ_pre. Computed in
  float32, cast back to θ_pre's dtype.
"""
from __future__ import annotations

from typing import Any

from mmbench.lazy import torch  # torch on first use: listing plugins does not import it

import mmbench
from mmbench.api import Cost, Merged, Merger, Param, PluginError, Sizes, StateDict
from mmbench.vectors import float_items


def polar(matrix: torch.Tensor) -> torch.Tensor:
    """The nearest matrix with orthonormal columns (Frobenius norm): P Qᵀ for matrix = P Σ Qᵀ."""
    p, _, qt = torch.linalg.svd(matrix, full_matrices=False)
    return p @ qt


def tsv_merge_matrix(deltas: list[torch.Tensor]) -> tuple[torch.Tensor, int]:
    """TSV-M of one 2-D tensor over K tasks (steps 1-4): the merged update and c, the
    components kept per task (0 when min(m, n) < K: the update is then zero)."""
    k = len(deltas)
    m, n = deltas[0].shape
    c = min(m, n) // k
    if c == 0:
        return torch.zeros((m, n), dtype=torch.float32), 0
    us, ss, vs = [], [], []
    for delta in deltas:
        u, s, vt = torch.linalg.svd(delta.float(), full_matrices=False)
        us.append(u[:, :c])
        ss.append(s[:c])
        vs.append(vt[:c, :].T)
    u_perp, v_perp = polar(torch.cat(us, dim=1)), polar(torch.cat(vs, dim=1))
    return (u_perp * torch.cat(ss)) @ v_perp.T, c


class TaskSingularVectors(Merger):
    """TSV-M (Gargiulo et al., CVPR 2025): per 2-D tensor, each task's top singular vectors
    (an equal share of the rank), decorrelated; other tensors averaged; θ_pre + α·merged."""

    name = "tsvm"
    description = "TSV-M: per matrix, each task's top singular vectors (rank/K each), decorrelated; others averaged"
    params = {
        "alpha": Param(1.0, "float", min=0,
                       help="α: scale of the merged update (FusionBench's default 1.0; the authors pick it "
                            "on validation data from 0.1-3.0)"),
    }

    def estimate(self, params: dict[str, Any], sizes: Sizes) -> Cost:
        return Cost(seconds=5.0 * len(sizes.tasks),
                    note="a thin SVD of every weight matrix of every task (~5 s a task at ViT-B-32 scale, assumed)")

    def merge(self, pretrained: StateDict, task_vectors: dict[str, StateDict],
              ctx: Any, params: dict[str, Any]) -> Merged:
        params = {**self.defaults, **params}
        alpha = float(params["alpha"])
        if not task_vectors:
            raise PluginError("tsvm: no task vectors to merge")
        tasks = list(task_vectors)
        vectors = {t: float_items(task_vectors[t]) for t in tasks}
        names = [n for n in pretrained if all(n in vectors[t] for t in tasks)
                 and "text_projection" not in n]
        merged = dict(pretrained)
        svd, averaged, zero_rank, kept = [], [], [], {}
        with torch.no_grad():
            for name in names:
                deltas = [vectors[t][name] for t in tasks]
                if deltas[0].dim() == 2:
                    update, c = tsv_merge_matrix(deltas)
                    svd.append(name)
                    kept[name] = c
                    if c == 0:
                        zero_rank.append(name)
                else:
                    update = torch.stack([d.float() for d in deltas]).mean(0)
                    averaged.append(name)
                base = pretrained[name]
                merged[name] = (base.float() + alpha * update).to(base.dtype)
        if zero_rank:
            ctx.log(f"tsvm: {len(zero_rank)} matrices have rank < {len(tasks)} tasks: their merged update is zero")
        info = {"alpha": alpha, "svd_tensors": len(svd), "averaged_tensors": len(averaged),
                "components_per_task": sorted(set(kept.values())), "zero_rank": zero_rank}
        return Merged(merged, info)


@mmbench.hookimpl
def mmbench_register_mergers(register):
    register(TaskSingularVectors())
