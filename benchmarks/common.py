"""Helpers shared by the benchmark modules: synthetic ViT-B-32-shaped weights, the machine's
copy bandwidth, interleaved timing of a subject against its reference, peak memory.

Every figure of the suite is a ratio against a reference measured in the same run (the
copy bandwidth, a bare PyTorch loop, a step written with ``torch.func.functional_call``),
so it holds on a noisy machine; ``conftest.py`` collects them into docs/performance.md.
"""
from __future__ import annotations

import gc
import re
import time
from pathlib import Path
from typing import Callable

import torch

WIDTH, LAYERS, PATCH, IMAGE, EMBED = 768, 12, 32, 224, 512
REPO = Path(__file__).resolve().parent.parent


def vit_shapes(layers: int = LAYERS, width: int = WIDTH) -> dict[str, tuple[int, ...]]:
    """Name → shape of open_clip ViT-B-32's image-encoder float tensors (``layers`` blocks).

    With the defaults: ≈ 87.8M float32 in 152 tensors (as benchmarks/bench_ties.py)."""
    tokens = (IMAGE // PATCH) ** 2 + 1
    shapes: dict[str, tuple[int, ...]] = {
        "conv1.weight": (width, 3, PATCH, PATCH), "class_embedding": (width,),
        "positional_embedding": (tokens, width), "ln_pre.weight": (width,), "ln_pre.bias": (width,)}
    for i in range(layers):
        b = f"transformer.resblocks.{i}."
        shapes.update({
            b + "ln_1.weight": (width,), b + "ln_1.bias": (width,),
            b + "attn.in_proj_weight": (3 * width, width), b + "attn.in_proj_bias": (3 * width,),
            b + "attn.out_proj.weight": (width, width), b + "attn.out_proj.bias": (width,),
            b + "ln_2.weight": (width,), b + "ln_2.bias": (width,),
            b + "mlp.c_fc.weight": (4 * width, width), b + "mlp.c_fc.bias": (4 * width,),
            b + "mlp.c_proj.weight": (width, 4 * width), b + "mlp.c_proj.bias": (width,)})
    shapes.update({"ln_post.weight": (width,), "ln_post.bias": (width,), "proj": (width, EMBED)})
    return shapes


def synthetic_weights(num_tasks: int, layers: int = LAYERS, seed: int = 0, width: int = WIDTH
                      ) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
    """θ_pre ~ N(0, 0.02²) and ``num_tasks`` task vectors ~ N(0, σ_k²) with a per-tensor scale."""
    generator = torch.Generator().manual_seed(seed)
    shapes = vit_shapes(layers, width)
    pre = {n: torch.randn(s, generator=generator).mul_(0.02) for n, s in shapes.items()}
    vectors = {f"task{k}": {n: torch.randn(s, generator=generator).mul_(
        1e-4 * (1 + 9 * float(torch.rand((), generator=generator)))) for n, s in shapes.items()}
        for k in range(num_tasks)}
    return pre, vectors


def nbytes(*state_dicts) -> int:
    return sum(t.numel() * t.element_size() for sd in state_dicts for t in sd.values())


def params(state_dict) -> int:
    return sum(t.numel() for t in state_dict.values())


# ``with threads(n):`` torch ops with n intra-op threads (TIES's own helper, not a second copy)
from mmbench_plugins.mergers.ties import _intra_op_threads as threads  # noqa: E402


def copy_bandwidth(mib: int = 512, rounds: int = 5) -> float:
    """Bytes per second of ``dst.copy_(src)`` on buffers far larger than the caches (read + write
    counted: 2 × the buffer per copy), best of ``rounds``, with the current thread count."""
    n = mib * 2 ** 20 // 4
    src, dst = torch.ones(n), torch.empty(n)
    dst.copy_(src)
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return 2 * n * 4 / best


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def paired(benchmark, subject: Callable[[], object], reference: Callable[[], object], rounds: int,
           warmup: bool = True) -> tuple[float, float]:
    """(best subject seconds, best reference seconds), the two interleaved round by round.

    The subject runs under pytest-benchmark (``benchmark.pedantic``); the reference runs in
    pedantic's untimed ``setup`` before each round, so subject and reference see the same
    machine state. Best-of-rounds: the least disturbed by other processes."""
    if warmup:
        subject()
        reference()
    ref_times: list[float] = []
    subject_times: list[float] = []

    def setup():
        gc.collect()
        ref_times.append(timed(reference))

    def timed_subject():
        subject_times.append(timed(subject))
    benchmark.pedantic(timed_subject, setup=setup, rounds=rounds, iterations=1)
    if not subject_times:  # --benchmark-disable runs the target once, without setup
        for _ in range(rounds):
            setup()
            timed_subject()
    return min(subject_times), min(ref_times)


def best_of(fn: Callable[[], object], rounds: int) -> float:
    return min(timed(fn) for _ in range(rounds))


# --- peak memory (Linux /proc) ---------------------------------------------------------------

def status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux ≥ 4.0); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def cold_log(path: str) -> dict | None:
    """What a finished ``mmbench run`` log says: ``seconds`` (its last line ``done in X s: ...``),
    ``cells`` (its first line ``... N cells ...``) and ``seeds`` (those
    of its merges and attacks, ``computing merge A/M (seed S)``: a fine-tune's may be a seed
    derived from the cell's); None when the log is missing or unfinished."""
    try:
        text = Path(path).read_text().strip()
    except OSError:
        return None
    lines = text.splitlines()
    if not lines or not lines[-1].startswith("done in "):
        return None
    cells = re.search(r"(\d+) cells", lines[0])
    return {"seconds": float(lines[-1].split()[2]), "cells": int(cells.group(1)) if cells else None,
            "seeds": sorted({int(s) for s in re.findall(r"computing (?:merge|attack) [^(\n]*\(seed (\d+)\)", text)})}
