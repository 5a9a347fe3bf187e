"""TIES-Merging: trim, elect sign, disjoint merge.

Yadav, Tam, Choshen, Raffel, Bansal. "TIES-Merging: Resolving Interference
When Merging Models." NeurIPS 2023. arXiv:2306.01708.

On the task vectors τ_1..τ_K (every float tensor of the image encoder; each
task's tensors read as one flattened vector of d entries):

1. Trim (paper §3, step 1): per task, keep the ``k``·d entries of largest
   |value| over the task's WHOLE vector (global per task, not per layer);
   zero the rest → T̂_k.
2. Elect (step 2, Eq. 1): s = sign(Σ_k T̂_k); where that sum is 0, s takes
   the majority sign sign(Σ_coordinates s) (the reference code's
   ``resolve_zero_signs(..., "majority")``).
3. Disjoint merge (step 3, Eq. 2): per coordinate combine only the entries
   T̂_k ≠ 0 with sign(T̂_k) = s: ``"sum"`` (default of the BadMerging and
   AdaMerging code), ``"mean"`` (the paper: divide by the number of agreeing
   entries, 0 where there are none) or ``"max"`` (the agreeing entry of
   largest magnitude, with its sign).
4. θ = θ_pre + λ·merged.

Hyperparameters (plugin ``defaults``):

* ``k`` = 0.2 — fraction of each task vector kept by the trim (≥ 1 keeps all).
* ``merge`` = ``"sum"`` — disjoint merge: ``"sum"``, ``"mean"`` or ``"max"``.
* ``lambda`` = 0.3 — scale of the merged vector.

Reconstructed / this implementation's choices:

* The trim keeps max(1, round(k·d)) entries plus any whose magnitude equals
  the threshold (ties keep slightly more), as :func:`mmbench.vectors.topk_mask`
  does. The reference code keeps int(k·d)+1 (its ``kthvalue`` index is off by
  one): a negligible difference.
* If the majority sign is itself 0 (Σ s = 0 exactly), the coordinates whose
  sum is 0 merge to 0 (the reference code would keep their negative entries).
* Magnitudes are compared, and the merge computed, in float32; the result is
  cast back to θ_pre's dtype. Integer tensors are skipped (kept as in θ_pre),
  as are float tensors of θ_pre that have no task-vector entry.

Scale: :func:`ties_merge` streams. Each task's trim threshold is an exact
selection by two histogram passes over float32 bit patterns
(:func:`kth_largest_magnitude`); elect and disjoint merge then run tensor by
tensor over chunks of ``chunk_size`` coordinates, one task row at a time.
Nothing of size K·d is ever stacked, there is no sort and no float64 copy:
the extra memory is the output, one int8 sign per coordinate and a few chunks.
A few worker threads share the tasks and tensors (benchmarks/bench_ties.py:
8 × ViT-B-32 image encoders).
"""
from __future__ import annotations

import contextlib
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F

from mmbench.api import Cost, Merged, Merger, Param, PluginError, Sizes, StateDict
from mmbench.vectors import float_items, kth_largest_magnitude

MERGES = ("sum", "mean", "max")
CHUNK_SIZE = 1 << 16  # coordinates per step: a chunk of every task row stays in cache


# the trim / elect / disjoint-merge steps are public helpers (mmbench.vectors), shared with AdaMerging++
from mmbench.vectors import (  # noqa: E402,F401
    _just_below, _sign, agreeing_magnitudes, disjoint_merge, disjoint_merge_rows, elect, elect_rows,
    fill_zero_signs, sign_resolved, trim, trim_tensor, trim_threshold)


# --- the whole merge, streamed ------------------------------------------------

@contextlib.contextmanager
def _intra_op_threads(n: int):
    """Run torch ops with ``n`` intra-op threads: chunk-sized ops gain nothing from OpenMP, and its
    barriers stall when another process takes a core (a 2-core merge went from 6 s to 110 s)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def ties_merge(pretrained: Mapping[str, torch.Tensor], task_vectors: Mapping[str, Mapping[str, torch.Tensor]],
               k: float = 0.2, merge: str = "sum", lam: float = 0.3, *,
               chunk_size: int = CHUNK_SIZE, workers: int | None = None) -> StateDict:
    """θ = θ_pre + λ·disjoint_merge(elect(trim(τ_1..τ_K))), streamed chunk by chunk.

    ``workers`` threads (default: torch's intra-op thread count) share the tasks
    (thresholds) and the tensors (elect, merge); each runs single-threaded ops.
    """
    if merge not in MERGES:
        raise ValueError(f"merge must be one of {', '.join(MERGES)}, not {merge!r}")
    vectors = [float_items(tv) for tv in task_vectors.values()]
    if not vectors:
        raise ValueError("TIES needs at least one task vector")
    names = [n for n, p in pretrained.items() if torch.is_floating_point(p) and n in vectors[0]]
    for tv in vectors:
        for n in names:
            if n not in tv:
                raise ValueError(f"task vectors disagree on their tensors: {n!r} is missing from one")
            if tv[n].shape != pretrained[n].shape:
                raise ValueError(f"{n}: task vector shape {tuple(tv[n].shape)} != {tuple(pretrained[n].shape)}")
    workers = workers or torch.get_num_threads()

    def chunks(name: str):
        """(coordinates, one row per task) of tensor ``name``, chunk by chunk."""
        flat = [tv[name].reshape(-1) for tv in vectors]
        for start in range(0, flat[0].numel(), chunk_size):
            where = slice(start, start + chunk_size)
            yield where, [f[where] for f in flat]

    def elect_tensor(name: str) -> tuple[torch.Tensor, float]:
        signs = torch.empty(pretrained[name].numel(), dtype=torch.int8)
        total = 0.0
        for where, rows in chunks(name):
            s = elect_rows(rows, thresholds)
            signs[where] = s.to(torch.int8)
            total += float(s.sum())
        return signs, total

    def merge_tensor(name: str) -> torch.Tensor:
        weight = pretrained[name]
        merged = torch.empty(weight.numel(), dtype=torch.float32)
        for where, rows in chunks(name):
            s = fill_zero_signs(signs[name][where].float(), majority)
            merged[where] = disjoint_merge_rows(rows, s, thresholds, merge)
        return (weight.float() + lam * merged.view_as(weight)).to(weight.dtype)

    with _intra_op_threads(1), ThreadPoolExecutor(workers) as pool:
        # 1. one threshold per task, over its whole vector
        thresholds = list(pool.map(lambda tv: trim_threshold({n: tv[n] for n in names}, k), vectors))
        # 2. elect: one int8 sign per coordinate, and Σ s for the majority sign
        elected = dict(zip(names, pool.map(elect_tensor, names)))
        signs = {n: s for n, (s, _) in elected.items()}
        majority = _sign(sum(total for _, total in elected.values()))
        # 3. + 4. disjoint merge, θ_pre + λ·merged
        merged = dict(zip(names, pool.map(merge_tensor, names)))
    return {n: merged[n] if n in merged else w.clone() for n, w in pretrained.items()}


class Ties(Merger):
    """TIES-Merging (Yadav et al., NeurIPS 2023): trim to the top-k, elect signs, merge agreeing entries."""

    name = "ties"
    description = "TIES-Merging: trim each task vector to its top-k, elect signs, merge the agreeing entries"
    params = {
        "k": Param(0.2, "float", min=0, min_exclusive=True,
                   help="fraction of each task vector's entries kept by the trim (≥ 1 keeps all)"),
        "merge": Param("sum", "str", choices=MERGES,
                       help="disjoint merge of the agreeing entries: sum (BadMerging/AdaMerging code), "
                            "mean (the paper) or max (largest magnitude)"),
        "lambda": Param(0.3, "float", min=0, help="λ: scale of the merged vector (θ = θ_pre + λ·merged)"),
    }

    def estimate(self, params: dict[str, Any], sizes: Sizes) -> Cost:
        return Cost(seconds=10.0, note="trim, elect, merge: ~10 s at ViT-B-32 scale (assumed)")

    def merge(self, pretrained: StateDict, task_vectors: dict[str, StateDict],
              ctx: Any, params: dict[str, Any]) -> Merged:
        params = {**self.defaults, **params}
        k, merge, lam = float(params["k"]), params["merge"], float(params["lambda"])
        if not k > 0:
            raise PluginError(f"ties: k must be > 0 (the fraction of entries kept), not {k}")
        if merge not in MERGES:
            raise PluginError(f"ties: merge must be one of {', '.join(MERGES)}, not {merge!r}")
        if not task_vectors:
            raise PluginError("ties: no task vectors to merge")
        weights = ties_merge(pretrained, task_vectors, k=k, merge=merge, lam=lam)
        return Merged(weights, info={"k": k, "merge": merge, "lambda": lam})


import mmbench  # noqa: E402  (the hook is this module's only tie to the harness)


@mmbench.hookimpl
def mmbench_register_mergers(register):
    register(Ties())
