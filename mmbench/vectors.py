"""State-dict arithmetic on task vectors: pure functions on name → tensor dicts.

Only floating-point tensors take part (integer buffers are skipped, as in
docs/methods.md). Functions never modify their inputs.
"""
from __future__ import annotations

import hashlib
import math
from typing import Iterable, Mapping, Sequence

from .lazy import torch, F  # torch on first use: listing plugins does not import it

from .api import StateDict

MERGES = ("sum", "mean", "max")  # how TIES combines the agreeing entries


def digest(vector: Mapping[str, torch.Tensor], h: "hashlib._Hash | None" = None) -> str:
    """sha256 of a state dict's names, dtypes, shapes and bytes, in name order: a cache key for
    work on one contributor's vector (RegMean's Grams, a detector's per-vector figures). With
    ``h``, the entries are fed into that hash (to digest several state dicts as one)."""
    h = hashlib.sha256() if h is None else h
    for name in sorted(vector):
        t = vector[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


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
    threshold = kth_largest_magnitude(list(a.values()), k)
    return {n: v.abs() >= threshold for n, v in a.items()}


def _magnitude_bits(t: torch.Tensor) -> torch.Tensor:
    """|t| as float32 bit patterns read as int32 (the sign bit cleared)."""
    return t.reshape(-1).float().view(torch.int32) & 0x7FFFFFFF


def _bin_of_rank(histogram: torch.Tensor, rank: int) -> tuple[int, int]:
    """The bin holding the ``rank``-th largest value, and that value's rank within the bin."""
    at_or_above = histogram.flip(0).cumsum(0).flip(0)
    b = int((at_or_above >= rank).nonzero().max())
    above = int(at_or_above[b + 1]) if b + 1 < histogram.numel() else 0
    return b, rank - above


def _kth_largest_magnitude_radix(pieces: Sequence[torch.Tensor], k: int) -> float:
    """The k-th largest |x| by radix selection: a histogram of the top 16 bits of the float32
    bit patterns picks the bin, a histogram of the low 16 bits within that bin the value.
    Two streaming passes; :func:`kth_largest_magnitude`'s fallback when its bracket misses."""
    high = torch.zeros(1 << 15, dtype=torch.int64)
    for p in pieces:
        high += torch.bincount(_magnitude_bits(p) >> 16, minlength=1 << 15)
    top, rank = _bin_of_rank(high, k)
    low = torch.zeros(1 << 16, dtype=torch.int64)
    for p in pieces:
        bits = _magnitude_bits(p)
        low += torch.bincount(bits[(bits >> 16) == top] & 0xFFFF, minlength=1 << 16)
    bottom, _ = _bin_of_rank(low, rank)
    return float(torch.tensor([(top << 16) | bottom], dtype=torch.int32).view(torch.float32))


SAMPLE_STEP = 211  # kth_largest_magnitude samples every 211th entry (≈ 0.5 %) to bracket the k-th
BRACKET_SIGMAS = 4.0  # half-width of the bracket in standard deviations of the sample's rank estimate
DIRECT_BELOW = 1 << 16  # fewer entries than this: one kthvalue over all of them


def _bracket(pieces: Sequence[torch.Tensor], k: int, total: int, step: int, sigmas: float
             ) -> tuple[float, float]:
    """(lo, hi): magnitudes that, by a strided sample, most likely bracket the k-th largest."""
    sample = torch.cat([p[::step].float().abs() for p in pieces])
    n = sample.numel()
    rank = k * n / total  # the k-th largest's expected rank (1-based) within the sample
    margin = sigmas * math.sqrt(rank * max(1.0 - rank / n, 0.0)) + 2
    hi_rank, lo_rank = math.floor(rank - margin), math.ceil(rank + margin)  # 1-based, largest first
    hi = float(sample.kthvalue(n - hi_rank + 1).values) if hi_rank >= 1 else math.inf
    lo = float(sample.kthvalue(n - lo_rank + 1).values) if lo_rank <= n else 0.0
    return lo, hi


def kth_largest_magnitude(tensors: Sequence[torch.Tensor], k: int, *, step: int = SAMPLE_STEP,
                          sigmas: float = BRACKET_SIGMAS, direct_below: int = DIRECT_BELOW) -> float:
    """The exact k-th largest |x| over several tensors (counting repeats), as float32.

    One streaming pass: a strided sample (every ``step``-th entry) brackets the k-th largest
    magnitude in [lo, hi]; the pass counts the entries above hi and keeps the few inside the
    bracket, where ``kthvalue`` picks the exact value. Should the bracket miss (the sample was
    unlucky, or NaNs), the two-pass radix selection (:func:`_kth_largest_magnitude_radix`)
    answers instead, so the result never depends on the sample. No sort and no copy of the whole
    vector. (CPU ``kthvalue`` over all entries took 3.4 s per 88M entries and ~16 bytes of extra
    memory per entry.)
    """
    pieces = [t.reshape(-1) for t in tensors]
    total = sum(p.numel() for p in pieces)
    if not 1 <= k <= total:
        raise ValueError(f"k must be in [1, {total}], not {k}")
    if total < direct_below:
        magnitudes = torch.cat([p.float().abs() for p in pieces])
        return float(magnitudes.kthvalue(total - k + 1).values)
    lo, hi = _bracket(pieces, k, total, step, sigmas)
    above, inside = 0, []
    for piece in pieces:
        for p in piece.split(1 << 18):
            a = p.float().abs()
            over = a > hi
            above += int(over.sum())
            inside.append(a[(a >= lo) ^ over])  # lo ≤ |x| ≤ hi (lo ≤ hi)
    within = k - above  # the k-th largest is the within-th largest inside the bracket
    inside = torch.cat(inside)
    if not 1 <= within <= inside.numel():
        return _kth_largest_magnitude_radix([p for t in pieces for p in t.split(1 << 18)], k)
    return float(inside.kthvalue(inside.numel() - within + 1).values)


def topk(a: StateDict, fraction: float) -> StateDict:
    """Keep the ``fraction`` largest-magnitude entries globally; zero the rest (TopK_ρ)."""
    masks = topk_mask(a, fraction)
    return {n: v * masks[n] for n, v in a.items()}


def task_arithmetic(pretrained: StateDict, task_vectors: Mapping[str, StateDict], lam: float) -> StateDict:
    """θ_pre + λ·Σ_k τ_k (applying a sum of vectors to θ_pre; the inputs are not modified)."""
    merged = {k: v.clone() for k, v in pretrained.items()}
    for vector in task_vectors.values():
        for k, v in vector.items():
            merged[k].add_(v, alpha=lam)
    return merged


# --- TIES's steps (Yadav et al., NeurIPS 2023): trim, elect signs, disjoint merge ---------------
# used by the ties merger (which streams them chunk by chunk) and by AdaMerging++

def _sign(x: float) -> float:
    return float((x > 0) - (x < 0))


def _just_below(threshold: float) -> float:
    """The float32 just below ``threshold`` (0 stays 0): ``|x| > _just_below(t)`` ⇔ ``|x| ≥ t``."""
    if threshold <= 0:
        return 0.0
    t = torch.tensor(threshold, dtype=torch.float32)
    return float(torch.nextafter(t, torch.zeros_like(t)))


# --- 1. trim ---------------------------------------------------------------

def trim_threshold(task_vector: Mapping[str, torch.Tensor], k: float) -> float:
    """The magnitude an entry needs to survive the trim: the max(1, round(k·d))-th largest
    |value| over the task's whole vector (its float tensors); 0.0 (keep all) when k ≥ 1."""
    tensors = list(float_items(task_vector).values())
    total = sum(t.numel() for t in tensors)
    count = max(1, int(round(k * total)))
    if count >= total:
        return 0.0
    return kth_largest_magnitude(tensors, count)


def trim_tensor(x: torch.Tensor, threshold: float) -> torch.Tensor:
    """T̂: the entries of ``x`` with |x| ≥ threshold (compared in float32), the others zeroed."""
    if x.dtype == torch.float32:
        return F.hardshrink(x, _just_below(threshold))
    return torch.where(x.float().abs() >= threshold, x, 0)


def trim(task_vector: Mapping[str, torch.Tensor], k: float) -> StateDict:
    """Step 1 on one whole task vector: zero all but its top-``k`` fraction by magnitude (global)."""
    threshold = trim_threshold(task_vector, k)
    return {n: trim_tensor(v, threshold) for n, v in float_items(task_vector).items()}


# --- 2. elect ----------------------------------------------------------------

def elect_rows(rows: Iterable[torch.Tensor], thresholds: Iterable[float]) -> torch.Tensor:
    """s = sign(Σ_k T̂_k) for the same coordinates of every task (row k trimmed at thresholds[k]);
    0 where the sum is 0 (filled afterwards by :func:`fill_zero_signs`)."""
    total = None
    for row, threshold in zip(rows, thresholds):
        trimmed = F.hardshrink(row.float(), _just_below(threshold))
        total = trimmed if total is None else total.add_(trimmed)
    return torch.sign(total)


def fill_zero_signs(signs: torch.Tensor, majority: float) -> torch.Tensor:
    """Where the elected sign is 0, use the majority sign sign(Σ s) of the whole vector."""
    return torch.where(signs == 0, torch.as_tensor(majority, dtype=signs.dtype), signs)


def elect(trimmed: Sequence[Mapping[str, torch.Tensor]]) -> StateDict:
    """Step 2 on whole trimmed task vectors: the elected sign (float ±1) of every coordinate."""
    signs = {n: elect_rows([t[n] for t in trimmed], [0.0] * len(trimmed)) for n in trimmed[0]}
    majority = _sign(sum(float(s.sum()) for s in signs.values()))
    return {n: fill_zero_signs(s, majority) for n, s in signs.items()}


# --- 3. disjoint merge --------------------------------------------------------

def agreeing_magnitudes(row: torch.Tensor, signs: torch.Tensor, threshold: float = 0.0) -> torch.Tensor:
    """|T̂_k| where T̂_k ≠ 0 has the elected sign, else 0 (row trimmed at ``threshold`` on the fly)."""
    return F.threshold(row.float() * signs, _just_below(threshold), 0.0)


def disjoint_merge_rows(rows: Iterable[torch.Tensor], signs: torch.Tensor,
                        thresholds: Iterable[float], merge: str = "sum") -> torch.Tensor:
    """Combine, coordinate by coordinate, the entries of the task rows that agree with ``signs``."""
    if merge not in MERGES:
        raise ValueError(f"merge must be one of {', '.join(MERGES)}, not {merge!r}")
    combined = torch.zeros_like(signs)
    count = torch.zeros_like(signs) if merge == "mean" else None
    for row, threshold in zip(rows, thresholds):
        magnitudes = agreeing_magnitudes(row, signs, threshold)
        if merge == "max":
            torch.maximum(combined, magnitudes, out=combined)
        else:
            combined.add_(magnitudes)
        if count is not None:
            count.add_(magnitudes > 0)
    if count is not None:
        combined.div_(count.clamp_(min=1))
    return combined.mul_(signs)


def disjoint_merge(trimmed: Sequence[Mapping[str, torch.Tensor]], signs: Mapping[str, torch.Tensor],
                   merge: str = "sum") -> StateDict:
    """Step 3 on whole trimmed task vectors and their elected signs."""
    return {n: disjoint_merge_rows([t[n] for t in trimmed], signs[n].float(), [0.0] * len(trimmed), merge)
            for n in signs}


def sign_resolved(task_vectors: Sequence[Mapping[str, torch.Tensor]], k: float = 0.2) -> list[StateDict]:
    """Per task, the trimmed entries that agree with the elected sign (AdaMerging++'s inputs):
    T̂_k ⊙ 1[sign(T̂_k) = s], so that their sum is the ``"sum"`` disjoint merge."""
    trimmed = [trim(tv, k) for tv in task_vectors]
    signs = elect(trimmed)
    return [{n: (agreeing_magnitudes(t[n], signs[n]) * signs[n]).to(t[n].dtype) for n in signs}
            for t in trimmed]
