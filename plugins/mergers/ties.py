"""TIES-Merging: trim, elect sign, disjoint merge.

Yadav, Tam, Choshen, Raffel, Bansal. "TIES-Merging: Resolving Interference
When Merging Models." NeurIPS 2023. arXiv:2306.01708.

On the task vectors τ_1..τ_K (every float tensor of the image encoder, each
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
   non-zero entries, 0 where there are none) or ``"max"`` (the agreeing entry
   of largest magnitude, with its sign).
4. θ = θ_pre + λ·merged.

Hyperparameters (plugin ``defaults``):

* ``k`` = 0.2 — fraction of each task vector kept by the trim (≥ 1 keeps all).
* ``merge`` = ``"sum"`` — disjoint merge: ``"sum"``, ``"mean"`` or ``"max"``.
* ``lambda`` = 0.3 — scale of the merged vector.

Reconstructed / this implementation's choices:

* The trim keeps max(1, round(k·d)) entries, and every entry whose magnitude
  equals the threshold (ties keep slightly more), as
  :func:`mmbench.vectors.topk_mask` does. The reference code keeps
  int(k·d)+1 (its ``kthvalue`` index is off by one): a negligible difference.
* If the majority sign is itself 0 (Σ s = 0 exactly), the coordinates whose
  sum is 0 merge to 0. (The reference code would keep their negative entries.)
* Magnitudes are compared in float32; the merge is computed in float32 and
  cast back to θ_pre's dtype. Integer tensors are skipped (kept as in θ_pre);
  float tensors of θ_pre without a task vector entry are kept as in θ_pre.

Scale: :func:`ties_merge` streams. The trim threshold of each task is an
exact selection by two histogram passes over the float32 bit patterns
(:func:`kth_largest_magnitude`); elect and disjoint merge then run tensor by
tensor on K × ``chunk_size`` blocks. Nothing of size K·d is ever stacked, there
is no sort and no float64 copy: extra memory is the output, one int8 sign per
coordinate and a few blocks.
"""
from __future__ import annotations

from typing import Any, Iterator, Mapping, Sequence

import torch

from mmbench.api import Merged, Merger, PluginError, StateDict
from mmbench.vectors import float_items

MERGES = ("sum", "mean", "max")


# --- 1. trim ---------------------------------------------------------------

def _magnitude_bits(t: torch.Tensor) -> torch.Tensor:
    """|t| as float32 bit patterns read as int32 (the sign bit cleared)."""
    return t.reshape(-1).float().view(torch.int32) & 0x7FFFFFFF


def _bin_of_rank(histogram: torch.Tensor, rank: int) -> tuple[int, int]:
    """The bin holding the ``rank``-th largest value, and that value's rank within the bin."""
    at_or_above = histogram.flip(0).cumsum(0).flip(0)
    b = int((at_or_above >= rank).nonzero().max())
    above = int(at_or_above[b + 1]) if b + 1 < histogram.numel() else 0
    return b, rank - above


def kth_largest_magnitude(tensors: Sequence[torch.Tensor], k: int) -> float:
    """The exact k-th largest |x| over several tensors (counted with repeats), as float32.

    Non-negative float32 numbers order like their bit patterns read as
    integers, so a radix selection finds it: a histogram of the top 16 bits
    picks the bin, a histogram of the low 16 bits within that bin the value.
    Two streaming passes, tensor by tensor, no sort; same result as
    :func:`mmbench.vectors.kth_largest_magnitude`, which needs a float32 copy
    of everything plus ``kthvalue``'s own copy and int64 indices (4× more
    memory, ~3 s per 88M entries on 2 cores).
    """
    total = sum(t.numel() for t in tensors)
    if not 1 <= k <= total:
        raise ValueError(f"k must be in [1, {total}], not {k}")
    high = torch.zeros(1 << 15, dtype=torch.int64)
    for t in tensors:
        high += torch.bincount(_magnitude_bits(t) >> 16, minlength=1 << 15)
    top, rank = _bin_of_rank(high, k)
    low = torch.zeros(1 << 16, dtype=torch.int64)
    for t in tensors:
        bits = _magnitude_bits(t)
        low += torch.bincount(bits[(bits >> 16) == top] & 0xFFFF, minlength=1 << 16)
    bottom, _ = _bin_of_rank(low, rank)
    return float(torch.tensor([(top << 16) | bottom], dtype=torch.int32).view(torch.float32))


def trim_threshold(task_vector: Mapping[str, torch.Tensor], k: float) -> float:
    """The magnitude an entry needs to survive the trim: the max(1, round(k·d))-th largest
    |value| over the task's whole vector (its float tensors); 0.0 (keep all) when k ≥ 1."""
    tensors = list(float_items(task_vector).values())
    total = sum(t.numel() for t in tensors)
    count = max(1, int(round(k * total)))
    if count >= total:
        return 0.0
    return kth_largest_magnitude(tensors, count)


def trim_block(block: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """T̂ for a (K, ...) block: row k keeps its entries with |value| ≥ thresholds[k]."""
    thresholds = thresholds.reshape(-1, *([1] * (block.dim() - 1)))
    return torch.where(block.abs() >= thresholds, block, 0)


def trim(task_vector: Mapping[str, torch.Tensor], k: float) -> StateDict:
    """Step 1 on one whole task vector: zero all but its top-``k`` fraction by magnitude (global)."""
    threshold = trim_threshold(task_vector, k)
    return {n: torch.where(v.float().abs() >= threshold, v, 0)
            for n, v in float_items(task_vector).items()}


# --- 2. elect ----------------------------------------------------------------

def elect_block(trimmed: torch.Tensor) -> torch.Tensor:
    """s = sign(Σ_k T̂_k) over a (K, ...) block; 0 where the sum is 0 (filled by :func:`fill_zero_signs`)."""
    return torch.sign(trimmed.sum(0))


def fill_zero_signs(signs: torch.Tensor, majority: float) -> torch.Tensor:
    """Where the elected sign is 0, use the majority sign sign(Σ s) of the whole vector."""
    return torch.where(signs == 0, torch.as_tensor(majority, dtype=signs.dtype), signs)


def elect(trimmed: Sequence[Mapping[str, torch.Tensor]]) -> StateDict:
    """Step 2 on whole trimmed task vectors: the elected sign (float ±1) of every coordinate."""
    signs = {n: elect_block(torch.stack([t[n].float() for t in trimmed])) for n in trimmed[0]}
    majority = float(torch.sign(sum(s.sum() for s in signs.values())))
    return {n: fill_zero_signs(s, majority) for n, s in signs.items()}


# --- 3. disjoint merge --------------------------------------------------------

def agreeing_block(trimmed: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """The entries of a (K, ...) block whose sign is the elected one (zeros never agree)."""
    return torch.where(trimmed * signs > 0, trimmed, 0)


def disjoint_merge_block(trimmed: torch.Tensor, signs: torch.Tensor, merge: str = "sum") -> torch.Tensor:
    """Combine the agreeing entries of a (K, ...) block: sum, mean over them, or the largest one."""
    agreeing = agreeing_block(trimmed, signs)
    if merge == "sum":
        return agreeing.sum(0)
    if merge == "mean":
        count = (agreeing != 0).sum(0)
        return agreeing.sum(0) / count.clamp(min=1)
    if merge == "max":
        return agreeing.abs().amax(0) * signs
    raise ValueError(f"merge must be one of {', '.join(MERGES)}, not {merge!r}")


def disjoint_merge(trimmed: Sequence[Mapping[str, torch.Tensor]], signs: Mapping[str, torch.Tensor],
                   merge: str = "sum") -> StateDict:
    """Step 3 on whole trimmed task vectors and their elected signs."""
    return {n: disjoint_merge_block(torch.stack([t[n].float() for t in trimmed]), signs[n], merge)
            for n in signs}


def sign_resolved(task_vectors: Sequence[Mapping[str, torch.Tensor]], k: float = 0.2) -> list[StateDict]:
    """Per task, the trimmed entries that agree with the elected sign (AdaMerging++'s inputs):
    T̂_k ⊙ 1[sign(T̂_k) = s], so that Σ_k of them is the ``"sum"`` disjoint merge."""
    trimmed = [trim(tv, k) for tv in task_vectors]
    signs = elect(trimmed)
    return [{n: torch.where(t[n].float() * signs[n] > 0, t[n], 0) for n in signs} for t in trimmed]


# --- the whole merge, streamed ------------------------------------------------

def _blocks(task_vectors: Sequence[Mapping[str, torch.Tensor]], name: str,
            chunk_size: int) -> Iterator[tuple[slice, torch.Tensor]]:
    """(coordinates, K × n float32 block) of tensor ``name`` across the task vectors, chunk by chunk."""
    flat = [tv[name].reshape(-1) for tv in task_vectors]
    for start in range(0, flat[0].numel(), chunk_size):
        where = slice(start, start + chunk_size)
        yield where, torch.stack([f[where] for f in flat]).float()


def ties_merge(pretrained: Mapping[str, torch.Tensor], task_vectors: Mapping[str, Mapping[str, torch.Tensor]],
               k: float = 0.2, merge: str = "sum", lam: float = 0.3, *,
               chunk_size: int = 1 << 20) -> StateDict:
    """θ = θ_pre + λ·disjoint_merge(elect(trim(τ_1..τ_K))), streamed over K × chunk_size blocks."""
    if merge not in MERGES:
        raise ValueError(f"merge must be one of {', '.join(MERGES)}, not {merge!r}")
    vectors = [float_items(tv) for tv in task_vectors.values()]
    if not vectors:
        raise ValueError("TIES needs at least one task vector")
    names = [n for n, p in pretrained.items() if torch.is_floating_point(p) and n in vectors[0]]
    for tv in vectors:
        missing = [n for n in names if n not in tv]
        if missing:
            raise ValueError(f"task vectors disagree on their tensors (e.g. {missing[0]!r})")
        for n in names:
            if tv[n].shape != pretrained[n].shape:
                raise ValueError(f"{n}: task vector shape {tuple(tv[n].shape)} != {tuple(pretrained[n].shape)}")

    # 1. one threshold per task, over its whole vector
    thresholds = torch.tensor([trim_threshold({n: tv[n] for n in names}, k) for tv in vectors])

    # 2. elect, keeping one int8 sign per coordinate and Σ s for the majority sign
    signs: dict[str, torch.Tensor] = {}
    sign_total = 0
    for name in names:
        signs[name] = torch.empty(pretrained[name].numel(), dtype=torch.int8)
        for where, block in _blocks(vectors, name, chunk_size):
            s = elect_block(trim_block(block, thresholds))
            signs[name][where] = s.to(torch.int8)
            sign_total += int(s.sum())
    majority = float((sign_total > 0) - (sign_total < 0))

    # 3. + 4. disjoint merge, θ_pre + λ·merged
    merged_weights: StateDict = {}
    for name, weight in pretrained.items():
        if name not in signs:
            merged_weights[name] = weight.clone()
            continue
        merged = torch.empty(weight.numel(), dtype=torch.float32)
        for where, block in _blocks(vectors, name, chunk_size):
            s = fill_zero_signs(signs[name][where].float(), majority)
            merged[where] = disjoint_merge_block(trim_block(block, thresholds), s, merge)
        del signs[name]
        merged_weights[name] = (weight.float() + lam * merged.view_as(weight)).to(weight.dtype)
    return merged_weights


class Ties(Merger):
    """TIES-Merging (Yadav et al., NeurIPS 2023): trim to the top-k, elect signs, merge agreeing entries."""

    name = "ties"
    description = "TIES-Merging: trim each task vector to its top-k, elect signs, merge the agreeing entries"
    defaults = {"k": 0.2, "merge": "sum", "lambda": 0.3}

    def merge(self, pretrained: StateDict, task_vectors: dict[str, StateDict],
              ctx: Any, params: dict[str, Any]) -> Merged:
        params = {**self.defaults, **params}
        k, merge, lam = float(params["k"]), params["merge"], float(params["lambda"])
        if not k > 0:
            raise PluginError(f"ties: k must be > 0 (a fraction of entries kept), not {k}")
        if merge not in MERGES:
            raise PluginError(f"ties: merge must be one of {', '.join(MERGES)}, not {merge!r}")
        if not task_vectors:
            raise PluginError("ties: no task vectors to merge")
        weights = ties_merge(pretrained, task_vectors, k=k, merge=merge, lam=lam)
        return Merged(weights, info={"k": k, "merge": merge, "lambda": lam})


import mmbench  # noqa: E402  (the hook below is this module's only tie to the harness)


@mmbench.hookimpl
def mmbench_register_mergers(register):
    register(Ties())
