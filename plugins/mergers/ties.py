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
selection in one pass (a strided sample brackets the k-th magnitude, the
pass counts the entries above the bracket and keeps the few inside it, a
selection picks the value); elect and disjoint merge then run fused,
tensor by tensor: each block of coordinates' K trimmed rows are summed for
the sign and merged while in cache. Where a block's sum is 0 the merge takes
+1 provisionally; the few coordinates the whole vector's majority sign could
change are redone at the end. Results are bit-identical to the three steps.
Nothing of size K·d is ever stacked, there is no sort and no float64 copy:
the extra memory is the output and a few blocks.
Both passes run in a small C kernel compiled on first use
(:mod:`mmbench_plugins.mergers.ties_kernel`), each reading every entry once;
where it cannot be compiled (no C compiler) or a tensor is not float32, the
same passes run as eager PyTorch ops over chunks of ``chunk_size``
coordinates, with the same results (tests/test_ties.py compares the two).
8 × ViT-B-32 image encoders on one CPU core (2-core AMD EPYC): 0.49–0.52 s
with the kernel, 4.5–5.0 s eager; docs/performance.md has the benchmark's
figure against the copy bound. A few worker threads share the tasks and
tensors.
"""
from __future__ import annotations

import contextlib
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterable, Mapping, Sequence

from mmbench.lazy import torch, F  # torch on first use: listing plugins does not import it

from mmbench.api import Cost, Merged, Merger, Param, PluginError, Sizes, StateDict
from mmbench.vectors import float_items, kth_largest_magnitude
from mmbench_plugins.mergers import ties_kernel

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


def task_threshold(task_vector: Mapping[str, torch.Tensor], k: float, lib: Any = None) -> float:
    """The task's trim threshold (:func:`trim_threshold`); with ``lib`` (:func:`ties_kernel.load`)
    its selection pass runs in the compiled kernel (the same value)."""
    if lib is None:
        return trim_threshold(task_vector, k)
    tensors = list(float_items(task_vector).values())
    total = sum(t.numel() for t in tensors)
    count = max(1, int(round(k * total)))  # as trim_threshold
    return 0.0 if count >= total else ties_kernel.kth_largest_magnitude(lib, tensors, count)


def ties_merge(pretrained: Mapping[str, torch.Tensor], task_vectors: Mapping[str, Mapping[str, torch.Tensor]],
               k: float = 0.2, merge: str = "sum", lam: float = 0.3, *,
               chunk_size: int = CHUNK_SIZE, workers: int | None = None,
               kernel: bool | None = None) -> StateDict:
    """θ = θ_pre + λ·disjoint_merge(elect(trim(τ_1..τ_K))), streamed chunk by chunk.

    ``workers`` threads (default: torch's intra-op thread count) share the tasks
    (thresholds) and the tensors (elect, merge); each runs single-threaded ops.
    ``kernel``: run the two passes in the compiled C kernel (:mod:`ties_kernel`; same
    results): None uses it where it loads and every tensor is float32, False never, True
    requires it (an error where it cannot load).
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
    lib = ties_kernel.load() if kernel is not False else None
    if kernel and lib is None:
        raise RuntimeError(f"the TIES kernel is not available: {ties_kernel.why_not()}")
    if lib is not None and not ties_kernel.usable(*(pretrained[n] for n in names),
                                                    *(tv[n] for tv in vectors for n in names)):
        if kernel:
            raise RuntimeError("the TIES kernel reads float32 contiguous CPU tensors only")
        lib = None

    flats = {n: [tv[n].reshape(-1) for tv in vectors] for n in names}

    def merge_tensor(name: str) -> tuple[torch.Tensor, float, list[torch.Tensor]]:
        """Elect and disjoint-merge tensor ``name`` chunk by chunk, each chunk's K trimmed rows
        used by both while in cache. Where the elected sign is 0 (Σ_k T̂_k = 0) the merge
        provisionally takes +1; returns (θ_pre + λ·merged, Σ s, the coordinates the majority
        sign could still change)."""
        weight = pretrained[name]
        if lib is not None:
            return ties_kernel.merge_tensor(lib, weight, flats[name], cuts, lam, merge)
        w_flat = weight.reshape(-1)
        out = torch.empty(weight.numel(), dtype=weight.dtype)
        rows_of = flats[name]
        sign_total = 0.0
        pending: list[torch.Tensor] = []
        for start in range(0, weight.numel(), chunk_size):
            where = slice(start, start + chunk_size)
            trimmed = [F.hardshrink(f[where].float(), cut) for f, cut in zip(rows_of, cuts)]
            total = trimmed[0].clone()
            for t in trimmed[1:]:
                total.add_(t)
            s = torch.sign(total)  # elect, as elect_rows
            nonzero = int(torch.count_nonzero(s))
            sign_total += float(s.sum())
            s_fill = s.masked_fill_(total == 0, 1.0) if nonzero < s.numel() else s
            combined = torch.zeros_like(s_fill)  # disjoint merge, as disjoint_merge_rows
            count = torch.zeros_like(s_fill) if merge == "mean" else None
            for t in trimmed:
                # |T̂_k| where T̂_k ≠ 0 agrees with the sign (= agreeing_magnitudes(row, s, threshold))
                magnitudes = F.threshold(t.mul_(s_fill), 0.0, 0.0)
                if merge == "max":
                    torch.maximum(combined, magnitudes, out=combined)
                else:
                    combined.add_(magnitudes)
                if count is not None:
                    count.add_(magnitudes > 0)
            if nonzero < s.numel():
                # a zero sum with a surviving entry has a positive one (a sum of entries of one sign
                # is never 0), so combined > 0 there under the provisional +1; a zero θ_pre entry
                # would take the sign of λ·(±0): both wait for the majority sign
                zero = total == 0
                w = w_flat[where]
                suspect = zero & ((combined > 0) | (w == 0))
                if bool(suspect.any()):
                    pending.append(suspect.nonzero().reshape(-1).add_(start))
            if count is not None:
                combined.div_(count.clamp_(min=1))
            merged = combined.mul_(s_fill)
            out[where] = (w_flat[where].float() + lam * merged).to(weight.dtype)
        return out, sign_total, pending

    def fix_pending(name: str, where: torch.Tensor, out: torch.Tensor) -> None:
        """Redo coordinates whose elected sign was 0 with the majority sign, as the unfused steps."""
        rows = [f[where] for f in flats[name]]
        s = fill_zero_signs(torch.zeros(where.numel()), majority)
        merged = disjoint_merge_rows(rows, s, thresholds, merge)
        out[where] = (pretrained[name].reshape(-1)[where].float() + lam * merged).to(out.dtype)

    with _intra_op_threads(1), ThreadPoolExecutor(workers) as pool:
        # 1. one threshold per task, over its whole vector
        thresholds = list(pool.map(lambda tv: task_threshold({n: tv[n] for n in names}, k, lib), vectors))
        cuts = [_just_below(t) for t in thresholds]  # |x| > cut ⇔ |x| ≥ threshold (trim_tensor)
        # 2. + 3. + 4. elect and disjoint merge in one pass, θ_pre + λ·merged
        results = dict(zip(names, pool.map(merge_tensor, names)))
        # the majority sign of the whole vector, for coordinates whose sum is 0
        majority = _sign(sum(total for _, total, _ in results.values()))
        merged = {n: out.view_as(pretrained[n]) for n, (out, _, _) in results.items()}
        if majority != 1.0:
            for n, (out, _, pending) in results.items():
                for where in pending:
                    fix_pending(n, where, out)
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
        return Cost(seconds=2.0, note="trim, elect, merge: 8 × ViT-B-32 on one CPU core took 0.49-0.52 s with "
                                      "the compiled kernel, 4.5 s eager (benchmarks/bench_merge.py, 2-core AMD EPYC)")

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
