"""DARE: drop and rescale each task vector, then merge (Task Arithmetic or TIES).

Yu, Yu, Yu, Huang, Li. "Language Models are Super Mario: Absorbing Abilities
from Homologous Models as a Free Lunch." ICML 2024. arXiv:2311.03099.

On the task vectors τ_1..τ_K (every float tensor of the image encoder):

1. Drop (paper §3, Eq. 1): per task k, draw a mask m_k with each coordinate
   kept independently with probability 1 − p (dropped with probability p);
   the masks of different tasks are independent.
2. Rescale (Eq. 2): τ̃_k = m_k ⊙ τ_k / (1 − p), so that E[τ̃_k] = τ_k.
3. Merge the sparsified vectors with a base merger:

   * ``base = "ta"``: θ = θ_pre + λ·Σ_k τ̃_k (Task Arithmetic);
   * ``base = "ties"``: θ = θ_pre + λ·disjoint_merge(elect(trim(τ̃_1..τ̃_K))) (TIES-Merging on
     the sparsified vectors: top-``k`` trim over each whole vector, sign election, disjoint
     merge ``merge``, as the ``ties`` merger does; :mod:`mmbench.vectors`' helpers).

   With p = 0 nothing is dropped and the result is exactly the base merger's.

Hyperparameters (plugin ``defaults``) and where each comes from:

* ``p`` = 0.5 — the drop rate (FusionBench's ``sparsity_ratio`` in its
  ``config/method/dare/task_arithmetic.yaml``, ``ties_merging.yaml`` and
  ``simple_average.yaml``, tanganke/fusion_bench). The paper tunes p per merge and
  shows that the SFT deltas of LLMs survive drop rates of 0.9 and more; CLIP task
  vectors are denser, and FusionBench's vision setting uses 0.5. In [0, 1).
* ``base`` = ``"ta"`` — the merger applied after the drop (FusionBench:
  ``DareTaskArithmetic``, ``DareTiesMerging``).
* ``lambda`` = ``"auto"`` — λ, the scale of the merged vector; ``"auto"`` is
  FusionBench's default of the chosen base: 0.3 for TA (``scaling_factor`` of
  ``dare/task_arithmetic.yaml``, also the ``ta`` merger's), 0.5 for TIES
  (``scaling_factor`` of ``dare/ties_merging.yaml``; note the ``ties`` merger's is 0.3:
  set ``lambda`` to compare the two at one λ).
* ``k`` = 0.2 — TIES only: the fraction of each sparsified vector kept by the trim
  (FusionBench ``threshold: 20``, i.e. the top 20 %, as the ``ties`` merger).
* ``merge`` = ``"sum"`` — TIES only: the disjoint merge (FusionBench ``merge_func: sum``).
* ``rescale`` = true — divide the kept entries by 1 − p (FusionBench ``rescale: true``;
  false is the paper's "drop only" ablation, whose merged vector shrinks by 1 − p on average).

Reconstructed / this implementation's choices:

* RECONSTRUCTED: the drop applies to every float tensor of the task vector (FusionBench's
  ``only_on_linear_weights: false``); no parameter restricts it to linear weights, which a
  state dict alone does not identify.
* RECONSTRUCTED: randomness. Task k's mask is drawn from ``ctx.generator("dare", k)``, its
  tensors in sorted name order, a coordinate kept when U[0, 1) ≥ p (FusionBench keeps it when
  ``rand > p``: the two differ only on U = p exactly). So a task's mask depends on the cell's
  seed and the task's name only, never on the other tasks or their order; the global RNG is
  never used. FusionBench draws from torch's global RNG (``torch.rand_like``).
* The TIES trim counts the dropped (zero) coordinates in d, as FusionBench's TIES on the
  flattened sparsified vectors does: k·d entries survive, not k·(1 − p)·d.
* Integer tensors are skipped (kept as in θ_pre), as are float tensors of θ_pre that have no
  task-vector entry. The TIES branch computes in float32 and casts back to θ_pre's dtype, as
  the ``ties`` merger does. The TA branch adds in θ_pre's dtype, as :func:`task_arithmetic` does.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

from mmbench.lazy import torch  # torch on first use: listing plugins does not import it

import mmbench
from mmbench.api import Cost, Merged, Merger, Param, PluginError, Sizes, StateDict
from mmbench.vectors import MERGES, disjoint_merge, elect, float_items, trim

BASES = ("ta", "ties")
DEFAULT_LAMBDA = {"ta": 0.3, "ties": 0.5}  # FusionBench's dare/task_arithmetic.yaml, dare/ties_merging.yaml
BELOW_ONE = math.nextafter(1.0, 0.0)  # Param has no exclusive maximum: the largest float < 1 makes p ∈ [0, 1)


def drop_and_rescale(task_vector: Mapping[str, torch.Tensor], p: float, generator: torch.Generator,
                     rescale: bool = True) -> tuple[StateDict, float]:
    """τ̃ = m ⊙ τ / (1 − p) over the float tensors of one task vector (m: each coordinate kept
    with probability 1 − p, drawn from ``generator``, tensors in sorted name order); returns
    τ̃ and the fraction of coordinates kept. p = 0 returns the tensors themselves (no copy)."""
    if not 0 <= p < 1:
        raise ValueError(f"p must be in [0, 1), not {p}")
    vector = float_items(task_vector)
    if p == 0:
        return dict(vector), 1.0
    out: StateDict = {}
    kept = total = 0
    for name in sorted(vector):
        v = vector[name]
        keep = torch.rand(v.shape, generator=generator) >= p
        kept += int(keep.sum())
        total += keep.numel()
        out[name] = torch.where(keep, v / (1 - p) if rescale else v, torch.zeros((), dtype=v.dtype))
    return {n: out[n] for n in vector}, (kept / total if total else 1.0)


class Dare(Merger):
    """DARE (Yu et al., ICML 2024): drop each task vector's entries with probability p, rescale
    the rest by 1/(1 − p), then Task Arithmetic or TIES."""

    name = "dare"
    description = "DARE: drop each task vector's entries with probability p, rescale by 1/(1-p), then TA or TIES"
    params = {
        "p": Param(0.5, "float", min=0, max=BELOW_ONE,
                   help="drop rate: the probability that a coordinate of a task vector is zeroed, in [0, 1) "
                        "(FusionBench's sparsity_ratio)"),
        "base": Param("ta", "str", choices=BASES,
                      help="the merger applied to the sparsified vectors: ta (θ_pre + λ·Σ τ̃) or ties"),
        "lambda": Param("auto", "float", min=0, special=("auto",),
                        help="λ: scale of the merged vector; auto = FusionBench's default of the base "
                             "(0.3 for ta, 0.5 for ties)"),
        "k": Param(0.2, "float", min=0, min_exclusive=True,
                   help="ties base only: fraction of each sparsified vector kept by the trim (≥ 1 keeps all)"),
        "merge": Param("sum", "str", choices=MERGES,
                       help="ties base only: disjoint merge of the agreeing entries (sum, mean or max)"),
        "rescale": Param(True, "bool", help="divide the kept entries by 1 − p (false: the paper's drop-only ablation)"),
    }

    def estimate(self, params: dict[str, Any], sizes: Sizes) -> Cost:
        base = params.get("base", "ta")
        merge = 10.0 if base == "ties" else 1.0
        return Cost(seconds=merge + 1.0 * len(sizes.tasks),
                    note=f"a random mask per task (~1 s each) and {base}: at ViT-B-32 scale (assumed)")

    def merge(self, pretrained: StateDict, task_vectors: dict[str, StateDict],
              ctx: Any, params: dict[str, Any]) -> Merged:
        params = {**self.defaults, **params}
        p, base, rescale = float(params["p"]), params["base"], bool(params["rescale"])
        if not 0 <= p < 1:
            raise PluginError(f"dare: p must be in [0, 1) (the drop rate), not {p}")
        if base not in BASES:
            raise PluginError(f"dare: base must be one of {', '.join(BASES)}, not {base!r}")
        if not task_vectors:
            raise PluginError("dare: no task vectors to merge")
        lam = DEFAULT_LAMBDA[base] if params["lambda"] == "auto" else float(params["lambda"])
        info: dict[str, Any] = {"p": p, "base": base, "lambda": lam, "rescale": rescale, "kept": {}}

        def sparsified(task: str) -> StateDict:
            vector, kept = drop_and_rescale(task_vectors[task], p, ctx.generator("dare", task), rescale)
            info["kept"][task] = kept
            return vector

        if base == "ta":
            # θ_pre + λ·Σ τ̃_k, one task at a time (as mmbench.vectors.task_arithmetic adds)
            merged = {n: w.clone() for n, w in pretrained.items()}
            for task in task_vectors:
                for n, v in sparsified(task).items():
                    merged[n].add_(v, alpha=lam)
            return Merged(merged, info)

        k, merge = float(params["k"]), params["merge"]
        if not k > 0:
            raise PluginError(f"dare: k must be > 0 (the fraction of entries kept by the trim), not {k}")
        if merge not in MERGES:
            raise PluginError(f"dare: merge must be one of {', '.join(MERGES)}, not {merge!r}")
        floats = [set(float_items(tv)) for tv in task_vectors.values()]
        names = {n for n, w in pretrained.items() if torch.is_floating_point(w) and all(n in f for f in floats)}
        trimmed = [trim({n: v for n, v in sparsified(task).items() if n in names}, k) for task in task_vectors]
        merged_vector = disjoint_merge(trimmed, elect(trimmed), merge)
        del trimmed
        weights = {n: ((w.float() + lam * merged_vector[n]).to(w.dtype) if n in merged_vector else w.clone())
                   for n, w in pretrained.items()}
        info.update(k=k, merge=merge)
        return Merged(weights, info)


@mmbench.hookimpl
def mmbench_register_mergers(register):
    register(Dare())
