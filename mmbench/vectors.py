"""State-dict arithmetic on task vectors: pure functions on name → tensor dicts.

Only floating-point tensors take part (integer buffers are skipped, as in
ALGORITHMS.md). Functions never modify their inputs.
"""
from __future__ import annotations

from typing import Iterable, Mapping

import torch

from .api import StateDict


def float_items(weights: Mapping[str, torch.Tensor]) -> StateDict:
    """The floating-point tensors of a state dict (integer buffers dropped)."""
    return {k: v for k, v in weights.items() if torch.is_floating_point(v)}


def subtract(a: StateDict, b: StateDict) -> StateDict:
    """a − b over a's float tensors (e.g. τ = θ_ft − θ_pre)."""
    return {k: a[k] - b[k] for k in float_items(a)}


def add(a: StateDict, b: StateDict, scale: float = 1.0) -> StateDict:
    """a + scale·b; names missing from b are kept as in a."""
    return {k: (v + scale * b[k] if k in b else v.clone()) for k, v in a.items()}


def scale(a: StateDict, factor: float) -> StateDict:
    return {k: v * factor for k, v in a.items()}


def weighted_sum(vectors: Iterable[StateDict], weights: Iterable[float]) -> StateDict:
    """Σ_i w_i·v_i, accumulated in place into one output dict."""
    out: StateDict = {}
    for vector, w in zip(vectors, weights):
        for k, v in vector.items():
            if k in out:
                out[k].add_(v, alpha=w)
            else:
                out[k] = v * w
    return out


def flatten(a: StateDict) -> torch.Tensor:
    """Concatenate the tensors (sorted by name) into one 1-D vector."""
    return torch.cat([a[k].reshape(-1) for k in sorted(a)])


def unflatten(flat: torch.Tensor, like: StateDict) -> StateDict:
    """Inverse of :func:`flatten` for tensors shaped like ``like``."""
    out, offset = {}, 0
    for k in sorted(like):
        n = like[k].numel()
        out[k] = flat[offset:offset + n].view_as(like[k]).clone()
        offset += n
    if offset != flat.numel():
        raise ValueError(f"flat vector has {flat.numel()} entries, shapes need {offset}")
    return out


def num_params(a: StateDict) -> int:
    return sum(v.numel() for v in a.values())


def norm(a: StateDict) -> float:
    return float(torch.sqrt(sum((v.double() ** 2).sum() for v in a.values())))


def cosine(a: StateDict, b: StateDict) -> float:
    dot = sum((a[k].double() * b[k].double()).sum() for k in a)
    return float(dot / (norm(a) * norm(b) + 1e-12))


def topk_mask(a: StateDict, fraction: float) -> StateDict:
    """Boolean masks keeping the ``fraction`` largest-|value| entries over the WHOLE vector.

    The threshold is the k-th largest magnitude over all tensors together
    (global, not per layer); entries equal to the threshold are kept, so ties
    can keep slightly more than k. fraction ≥ 1 keeps everything.
    """
    total = num_params(a)
    k = max(1, int(round(fraction * total)))
    if k >= total:
        return {n: torch.ones_like(v, dtype=torch.bool) for n, v in a.items()}
    threshold = kth_largest_magnitude(a.values(), k)
    return {n: v.abs() >= threshold for n, v in a.items()}


def kth_largest_magnitude(tensors: Iterable[torch.Tensor], k: int) -> torch.Tensor:
    """The k-th largest |x| over several tensors, without concatenating copies of all of them
    in float64: one float32 buffer of magnitudes and ``kthvalue`` (a selection, no full sort)."""
    tensors = list(tensors)
    total = sum(t.numel() for t in tensors)
    magnitudes = torch.empty(total, dtype=torch.float32)
    offset = 0
    for t in tensors:
        n = t.numel()
        torch.abs(t.reshape(-1).float(), out=magnitudes[offset:offset + n])
        offset += n
    # k-th largest == (total − k + 1)-th smallest
    return magnitudes.kthvalue(total - k + 1).values


def topk(a: StateDict, fraction: float) -> StateDict:
    """Keep the ``fraction`` largest-magnitude entries globally; zero the rest (TopK_ρ)."""
    masks = topk_mask(a, fraction)
    return {n: v * masks[n] for n, v in a.items()}
